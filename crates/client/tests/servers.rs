//! A client of several servers (`http://a:8080,http://b:8080`): a dead first server is
//! skipped for REST calls and subscriptions, a POST that reached a server is never sent to
//! the next one, and a router whose server stops moves to the next. The servers are real test
//! servers; the failing ones are a closed port, or fake servers that hang up or answer `503`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use drover_client::{Client, Error, Event, RouterBuilder, Subscribe};
use drover_test_support::{ADMIN_ACCESS, ADMIN_SECRET, TestServer, wait_for, within};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// `http://127.0.0.1:<port>` of a port nothing listens on (bound, then closed).
async fn dead_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

/// An admin client of `urls`.
fn admin(urls: &[&str]) -> Client {
    drover_test_support::init();
    Client::new(&urls.join(","), ADMIN_ACCESS, ADMIN_SECRET).unwrap()
}

/// How a fake server answers.
#[derive(Clone, Copy)]
enum Fake {
    /// Reads the request, then closes the connection without a word.
    HangUp,
    /// Answers `503 Service Unavailable`.
    Unavailable,
}

/// A fake server; counts the requests it read.
async fn fake_server(fake: Fake) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                // Read until the end of the head; a body, if any, is left unread.
                let mut head = Vec::new();
                let mut buffer = [0u8; 4096];
                while !head.windows(4).any(|window| window == b"\r\n\r\n") {
                    match tcp.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buffer[..n]),
                    }
                }
                counted.fetch_add(1, Ordering::SeqCst);
                if let Fake::Unavailable = fake {
                    let body =
                        r#"{"type":"error","status":503,"code":"Unavailable","message":"not now"}"#;
                    let answer = format!(
                        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tcp.write_all(answer.as_bytes()).await;
                }
                let _ = tcp.shutdown().await;
            });
        }
    });
    (url, requests)
}

/// How many projects named `name` the server has.
async fn projects_named(server: &TestServer, name: &str) -> usize {
    let projects = server.admin.get("projects?limit=1000").await.unwrap();
    let data = projects["data"].as_array().unwrap();
    data.iter()
        .filter(|project| project["name"] == name)
        .count()
}

#[tokio::test]
async fn a_dead_first_server_is_skipped_by_rest_calls_and_subscriptions() {
    let live = TestServer::start().await;
    let dead = dead_url().await;
    let live_base = format!("{}/v1", live.url);

    // A GET moves on and stays with the server that answered.
    let client = admin(&[&dead, &live.url]);
    assert_eq!(client.base_urls().len(), 2);
    let projects = client.get("projects").await.unwrap();
    assert_eq!(projects["type"], "collection");
    assert_eq!(client.base_url(), live_base, "the working server is kept");

    // A POST whose connection was refused certainly reached no server: it moves on.
    let client = admin(&[&dead, &live.url]);
    client
        .post("projects", &json!({"name": "moved-post"}))
        .await
        .unwrap();
    assert_eq!(projects_named(&live, "moved-post").await, 1);
    // So does a create, and an absolute link to the dead server follows the current one.
    let client = admin(&[&dead, &live.url]);
    let created = client
        .create("projects", &json!({"name": "moved-create"}))
        .await
        .unwrap();
    assert_eq!(projects_named(&live, "moved-create").await, 1);
    let link = format!("{dead}/v1/projects/{}", created["id"].as_str().unwrap());
    assert_eq!(client.get(&link).await.unwrap()["name"], "moved-create");

    // A subscription moves on too, and receives what is published.
    let client = admin(&[&dead, &live.url]);
    let mut stream = within(
        "a subscription",
        client.subscribe(Subscribe::names(["work"])),
    )
    .await
    .unwrap();
    assert_eq!(stream.server_url(), live_base);
    let ping = within("the first frame", stream.next_event())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ping.name(), "ping", "the server's first frame");
    client
        .publish(&Event::new("work").with_data(json!({"n": 1})))
        .await
        .unwrap();
    let work = within("the published event", stream.next_non_ping())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(work.name(), "work");
    assert_eq!(work.data, Some(json!({"n": 1})));

    // With every server dead, a call fails (after trying each once) with the last error.
    let all_dead = admin(&[&dead, &dead_url().await]);
    match all_dead.get("projects").await {
        Err(error @ Error::Http(_)) => assert!(error.is_server_failure(), "{error}"),
        other => panic!("expected a connection error, got {other:?}"),
    }
    match all_dead.subscribe(Subscribe::names(["work"])).await {
        Err(error) => assert!(error.is_server_failure(), "{error}"),
        Ok(_) => panic!("nothing listens"),
    }
}

#[tokio::test]
async fn a_post_that_reached_a_server_is_not_sent_to_the_next() {
    let live = TestServer::start().await;
    let (hangs_up, requests) = fake_server(Fake::HangUp).await;

    let client = admin(&[&hangs_up, &live.url]);
    let lost = client
        .post("projects", &json!({"name": "sent-once"}))
        .await
        .unwrap_err();
    assert!(
        matches!(&lost, Error::Http(error) if !error.is_connect()),
        "{lost:?}"
    );
    assert_eq!(requests.load(Ordering::SeqCst), 1, "it reached the first");
    assert_eq!(
        projects_named(&live, "sent-once").await,
        0,
        "and was not sent again to the second"
    );
    // But the next call starts at the next server.
    assert_eq!(client.base_url(), format!("{}/v1", live.url));
    client
        .post("projects", &json!({"name": "next-call"}))
        .await
        .unwrap();
    assert_eq!(projects_named(&live, "next-call").await, 1);
    assert_eq!(requests.load(Ordering::SeqCst), 1);

    // A GET that was lost the same way is sent to the next server.
    let client = admin(&[&hangs_up, &live.url]);
    assert_eq!(client.get("projects").await.unwrap()["type"], "collection");
    assert_eq!(requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_503_moves_gets_and_creates_but_not_posts() {
    let live = TestServer::start().await;
    let (unavailable, requests) = fake_server(Fake::Unavailable).await;

    let client = admin(&[&unavailable, &live.url]);
    match client.post("projects", &json!({"name": "refused"})).await {
        Err(Error::Api { status: 503, .. }) => {}
        other => panic!("expected the 503, got {other:?}"),
    }
    assert_eq!(projects_named(&live, "refused").await, 0);
    assert_eq!(requests.load(Ordering::SeqCst), 1);

    let client = admin(&[&unavailable, &live.url]);
    assert_eq!(client.get("projects").await.unwrap()["type"], "collection");
    assert_eq!(requests.load(Ordering::SeqCst), 2);

    // A create carries its idempotency key: safe to send to the next server.
    let client = admin(&[&unavailable, &live.url]);
    client
        .create("projects", &json!({"name": "created-once"}))
        .await
        .unwrap();
    assert_eq!(projects_named(&live, "created-once").await, 1);
    assert_eq!(requests.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_whose_server_stops_moves_to_the_next_and_replies_there() {
    let first = TestServer::start().await;
    let second = TestServer::start().await;
    let client = admin(&[&first.url, &second.url]);
    let (tx, mut rx) = mpsc::unbounded_channel::<Value>();
    let router = RouterBuilder::new(client.clone())
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .on("work", move |event, _| {
            let tx = tx.clone();
            async move {
                tx.send(event.data.clone().unwrap_or_default()).unwrap();
                Ok(Some(json!({"handled": event.data})))
            }
        })
        .build();
    let mut connections = router.connections();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(router.run(shutdown.clone()));
    within("the first subscription", connections.wait_for(|n| *n >= 1))
        .await
        .unwrap();
    assert_eq!(first.metric("drover_connections"), 1.0);
    assert_eq!(second.metric("drover_connections"), 0.0);
    first
        .admin
        .publish(&Event::new("work").with_data(json!({"on": "first"})))
        .await
        .unwrap();
    let seen = within("the event on the first server", rx.recv()).await;
    assert_eq!(seen, Some(json!({"on": "first"})));

    // The first server stops: the router subscribes on the second.
    let TestServer { server, .. } = first;
    within("the first server to stop", server.stop()).await;
    within("the second subscription", connections.wait_for(|n| *n >= 2))
        .await
        .unwrap();
    assert_eq!(second.metric("drover_connections"), 1.0);
    assert_eq!(client.base_url(), format!("{}/v1", second.url));
    second
        .admin
        .publish(&Event::new("work").with_data(json!({"on": "second"})))
        .await
        .unwrap();
    let seen = within("the event on the second server", rx.recv()).await;
    assert_eq!(seen, Some(json!({"on": "second"})));
    // A request's reply goes to the server the router is on now.
    let reply = within(
        "a reply",
        second.server.state.hub.call(
            Event::new("work").with_data(json!({"call": 2})),
            Duration::from_secs(10),
            |_| {},
        ),
    )
    .await
    .unwrap();
    assert_eq!(reply.data, Some(json!({"handled": {"call": 2}})));

    shutdown.cancel();
    within("the router to stop", task).await.unwrap().unwrap();
    wait_for("the second server to see the socket close", || async {
        (second.metric("drover_connections") == 0.0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_moves_the_router_on_even_when_the_server_still_accepts() {
    // A server that accepts every subscription, sends the first `ping` and hangs up: it keeps
    // accepting, so only the router's own move takes it to the next server.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let flaky = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(mut socket) = tokio_tungstenite::accept_async(tcp).await else {
                continue;
            };
            counted.fetch_add(1, Ordering::SeqCst);
            use futures_util::SinkExt;
            let ping = tokio_tungstenite::tungstenite::Message::Text(r#"{"name":"ping"}"#.into());
            let _ = socket.send(ping).await;
            let _ = socket.close(None).await;
        }
    });
    let live = TestServer::start().await;
    let router = RouterBuilder::new(admin(&[&flaky, &live.url]))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .on("work", |_, _| async { Ok(None) })
        .build();
    let mut connections = router.connections();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(router.run(shutdown.clone()));
    within("two subscriptions", connections.wait_for(|n| *n >= 2))
        .await
        .unwrap();
    wait_for("the live server to hold the subscription", || async {
        (live.metric("drover_connections") == 1.0).then_some(())
    })
    .await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "after the lost connection the router went to the next server, not back"
    );
    shutdown.cancel();
    within("the router to stop", task).await.unwrap().unwrap();
}
