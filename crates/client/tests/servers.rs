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

/// The NATS server for cluster tests (`DROVER_TEST_NATS_URL`), or `None` after a `SKIP` line
/// (a panic in CI).
fn nats_url(what: &str) -> Option<String> {
    match std::env::var("DROVER_TEST_NATS_URL") {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            let ci = std::env::var("CI").unwrap_or_default();
            if !ci.is_empty() && ci != "false" && ci != "0" {
                panic!("NATS required in CI: DROVER_TEST_NATS_URL is not set ({what})");
            }
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIP: {what}: DROVER_TEST_NATS_URL is not set"
            );
            None
        }
    }
}

/// A node of a cluster: one PostgreSQL schema, one NATS.
async fn node(
    schema: &drover_test_support::postgres::Schema,
    nats: &str,
    name: &str,
    dir: &std::path::Path,
) -> drover_server::Server {
    let mut config = drover_server::Config::new(dir.join(name));
    config.admin_access_key = Some(ADMIN_ACCESS.into());
    config.admin_secret_key = Some(ADMIN_SECRET.into());
    config.database_url = Some(schema.url.clone());
    config.database_schema = Some(schema.name.clone());
    config.nats_url = Some(nats.to_owned());
    config.node_name = Some(name.to_owned());
    config.settings = drover_test_support::FAST
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    drover_server::Server::start(listener, config)
        .await
        .expect("the node starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_moves_between_the_nodes_of_a_cluster_with_its_one_key() {
    const WHAT: &str = "a router moving between cluster nodes";
    drover_test_support::init();
    let Some(nats) = nats_url(WHAT) else { return };
    let Some(schema) = drover_test_support::postgres::Schema::create("urls", WHAT).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let first = node(&schema, &nats, "n1", dir.path()).await;
    let second = node(&schema, &nats, "n2", dir.path()).await;
    let urls = [
        format!("http://{}", first.addr),
        format!("http://{}", second.addr),
    ];
    // One agent key, made on the first node: the nodes share the database, so it works on both.
    let project = first.state.default_project.id;
    let (agent_id, _account, key) = first
        .state
        .store
        .create_agent(project, "host-a", None)
        .await
        .unwrap();
    let agent = Client::new(
        &urls.join(","),
        &key.credential.public_value,
        &key.secret_value,
    )
    .unwrap();
    let router = RouterBuilder::new(agent.clone())
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .agent_id(drover_proto::ids::format("agent", agent_id))
        .on("config.update", |event, _| async move {
            Ok(Some(json!({"seen": event.data})))
        })
        .build();
    let mut connections = router.connections();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(router.run(shutdown.clone()));
    within("the first subscription", connections.wait_for(|n| *n >= 1))
        .await
        .unwrap();
    let request =
        |n: i64| Event::new(format!("config.update;agent={agent_id}")).with_data(json!({"n": n}));
    let call = |server: &drover_server::Server, n: i64| {
        let hub = server.state.hub.clone();
        let event = request(n);
        async move { within("a reply", hub.call(event, Duration::from_secs(10), |_| {})).await }
    };
    let reply = call(&first, 1).await.unwrap();
    assert_eq!(reply.data, Some(json!({"seen": {"n": 1}})));

    // The first node stops: the agent subscribes on the second with the same key and answers
    // what the second asks, its reply posted to the second.
    within("the first node to stop", first.stop()).await;
    within("the second subscription", connections.wait_for(|n| *n >= 2))
        .await
        .unwrap();
    assert_eq!(agent.base_url(), format!("{}/v1", urls[1]));
    let reply = call(&second, 2).await.unwrap();
    assert_eq!(reply.data, Some(json!({"seen": {"n": 2}})));

    shutdown.cancel();
    within("the router to stop", task).await.unwrap().unwrap();
    within("the second node to stop", second.stop()).await;
}
