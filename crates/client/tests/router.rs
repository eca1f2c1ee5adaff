//! The event router end to end: a real server, real sockets, real replies.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use drover_client::{Client, Event, HandlerError, RouterBuilder};
use drover_server::hub::CallError;
use drover_test_support::{ADMIN_ACCESS, TestServer, wait_for, within};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

/// A client of a fake server.
fn fake_client(url: &str) -> Client {
    drover_test_support::init();
    Client::new(url, "a", "b").unwrap()
}

/// A new agent in the default project and a client with its agent key.
async fn agent(server: &TestServer, name: &str) -> (i64, Client) {
    server.agent(server.default_project(), name).await
}

/// Calls an agent through the hub, as the engine does, and returns the reply.
async fn call(server: &TestServer, event: Event) -> Result<Event, CallError> {
    within(
        "a reply",
        server
            .server
            .state
            .hub
            .call(event, Duration::from_secs(10), |_| {}),
    )
    .await
}

/// A router running in a task until the test stops it.
struct Running {
    connections: watch::Receiver<u64>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<drover_client::Result<()>>,
}

impl Running {
    fn start(builder: RouterBuilder) -> Running {
        let router = builder.build();
        let connections = router.connections();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(router.run(shutdown.clone()));
        Running {
            connections,
            shutdown,
            task,
        }
    }

    /// Waits until the router has subscribed `n` times in all.
    async fn connected(&mut self, n: u64) {
        within(
            &format!("subscription #{n}"),
            self.connections.wait_for(|count| *count >= n),
        )
        .await
        .expect("the router is running");
    }

    async fn stop(self) {
        self.shutdown.cancel();
        within("the router to stop", self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

/// A router on `client` with quick reconnects.
fn router(client: Client) -> RouterBuilder {
    RouterBuilder::new(client)
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
}

async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    within("a handler", rx.recv())
        .await
        .expect("handlers are running")
}

#[tokio::test]
async fn a_handlers_result_is_the_reply_the_caller_gets() {
    let server = TestServer::start().await;
    let (agent_id, agent) = agent(&server, "host-a").await;
    let mut running = Running::start(router(agent).on(
        "compute.instance.activate",
        |event, context| async move {
            assert_eq!(context.request().id, event.id);
            context
                .progress("half way", Some(50))
                .await
                .map_err(|error| error.to_string())?;
            let name = event.data.as_ref().unwrap()["instance"]["name"].clone();
            Ok(Some(
                json!({"instance": {"name": name, "externalId": "pid-7"}}),
            ))
        },
    ));
    running.connected(1).await;

    let request = Event::new(format!("compute.instance.activate;agent={agent_id}"))
        .with_resource("container", "1i7")
        .with_data(json!({"instance": {"name": "web"}}));
    let mut progress = Vec::new();
    let reply = within(
        "a reply",
        server
            .server
            .state
            .hub
            .call(request, Duration::from_secs(10), |event| {
                progress.push((
                    event.transitioning_message.clone(),
                    event.transitioning_progress,
                ))
            }),
    )
    .await
    .unwrap();
    assert_eq!(
        reply.data,
        Some(json!({"instance": {"name": "web", "externalId": "pid-7"}}))
    );
    assert_eq!(reply.resource_id.as_deref(), Some("1i7"));
    assert_eq!(progress, vec![(Some("half way".to_owned()), Some(50))]);
    running.stop().await;
}

#[tokio::test]
async fn errors_and_panics_become_error_replies() {
    let server = TestServer::start().await;
    let (agent_id, agent) = agent(&server, "host-a").await;
    let mut running = Running::start(
        router(agent)
            .on("storage.volume.activate", |_, _| async {
                Err("disk full".into())
            })
            .on("compute.instance.activate", |_, _| async {
                Err(HandlerError::permanent("no such executable: /bin/nope"))
            })
            .on("storage.volume.remove", |_, _| async {
                panic!("the volume driver fell over")
            }),
    );
    running.connected(1).await;

    let failed = call(
        &server,
        Event::new(format!("storage.volume.activate;agent={agent_id}")),
    )
    .await;
    assert_eq!(failed, Err(CallError::ErrorReply("disk full".into())));
    // A permanent error reaches the server as one (`data.permanent: true`).
    let permanent = call(
        &server,
        Event::new(format!("compute.instance.activate;agent={agent_id}")),
    )
    .await;
    assert_eq!(
        permanent,
        Err(CallError::Permanent("no such executable: /bin/nope".into()))
    );
    let panicked = call(
        &server,
        Event::new(format!("storage.volume.remove;agent={agent_id}")),
    )
    .await;
    match panicked {
        Err(CallError::ErrorReply(message)) => {
            assert!(
                message.contains("panicked") && message.contains("fell over"),
                "{message}"
            )
        }
        other => panic!("expected an error reply, got {other:?}"),
    }
    // The router survived both: it still answers (a dead router would time out).
    assert_eq!(
        call(
            &server,
            Event::new(format!("storage.volume.activate;agent={agent_id}"))
        )
        .await,
        Err(CallError::ErrorReply("disk full".into()))
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_resource_is_handled_in_order_while_others_proceed() {
    let server = TestServer::start().await;
    let (agent_id, agent) = agent(&server, "host-a").await;
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let gate = Arc::new(Semaphore::new(0));
    let mut running = Running::start(router(agent).on("work", {
        let gate = gate.clone();
        move |event, _| {
            let tx = tx.clone();
            let gate = gate.clone();
            async move {
                let label = event.data.as_ref().unwrap()["label"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                tx.send(format!("start {label}")).unwrap();
                if label == "A1" || label.starts_with('N') {
                    gate.acquire().await.unwrap().forget();
                }
                tx.send(format!("done {label}")).unwrap();
                Ok(None)
            }
        }
    }));
    running.connected(1).await;

    let publish = |label: &str, resource: Option<&str>| {
        let mut event =
            Event::new(format!("work;agent={agent_id}")).with_data(json!({"label": label}));
        if let Some(id) = resource {
            event = event.with_resource("container", id);
        }
        let admin = server.admin.clone();
        async move { admin.publish(&event).await.unwrap() }
    };
    for label in ["A1", "A2", "A3"] {
        publish(label, Some("1i1")).await;
    }
    publish("B1", Some("1i2")).await;

    // A1 blocks; B1, read after A2 and A3, runs to the end meanwhile.
    let first = [
        recv(&mut rx).await,
        recv(&mut rx).await,
        recv(&mut rx).await,
    ];
    assert!(first.contains(&"start A1".to_owned()), "{first:?}");
    let b = first.iter().filter(|line| line.contains('B'));
    assert_eq!(b.collect::<Vec<_>>(), ["start B1", "done B1"], "{first:?}");
    // Events without a resource are not serialized against each other: both start.
    publish("N1", None).await;
    publish("N2", None).await;
    let mut started = vec![recv(&mut rx).await, recv(&mut rx).await];
    started.sort();
    assert_eq!(
        started,
        ["start N1", "start N2"],
        "A2 must not start before A1 ends"
    );

    // Release A1 (and the two N events): A's events then follow one at a time, in order.
    gate.add_permits(3);
    let mut rest = Vec::new();
    while rest.len() < 7 {
        rest.push(recv(&mut rx).await);
    }
    let a: Vec<&str> = rest
        .iter()
        .map(String::as_str)
        .filter(|line| line.contains('A'))
        .collect();
    assert_eq!(a, ["done A1", "start A2", "done A2", "start A3", "done A3"]);
    let mut n: Vec<&str> = rest
        .iter()
        .map(String::as_str)
        .filter(|line| line.contains('N'))
        .collect();
    n.sort();
    assert_eq!(n, ["done N1", "done N2"]);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_applies_backpressure_and_drops_nothing() {
    let server = TestServer::start().await;
    let (agent_id, agent) = agent(&server, "host-a").await;
    let (tx, mut rx) = mpsc::unbounded_channel::<i64>();
    let gate = Arc::new(Semaphore::new(0));
    let mut running = Running::start(router(agent).workers(1).queue_capacity(2).on("work", {
        let gate = gate.clone();
        move |event, _| {
            let tx = tx.clone();
            let gate = gate.clone();
            async move {
                gate.acquire().await.unwrap().forget();
                tx.send(event.data.as_ref().unwrap()["seq"].as_i64().unwrap())
                    .unwrap();
                Ok(None)
            }
        }
    }));
    running.connected(1).await;

    // All 50 are published while the one worker is blocked: the queue fills and the router
    // stops reading; the rest wait in the socket.
    for seq in 0..50 {
        let event = Event::new(format!("work;agent={agent_id}"))
            .with_resource("container", "1i9")
            .with_data(json!({"seq": seq}));
        server.admin.publish(&event).await.unwrap();
    }
    gate.add_permits(50);
    let mut seen = Vec::new();
    while seen.len() < 50 {
        seen.push(recv(&mut rx).await);
    }
    assert_eq!(seen, (0..50).collect::<Vec<_>>(), "all of them, in order");
    assert_eq!(
        *running.connections.borrow(),
        1,
        "backpressure did not cost the connection"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_with_reply_to_are_answered_even_while_every_worker_is_busy() {
    let server = TestServer::start().await;
    let (agent_id, agent) = agent(&server, "host-a").await;
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let gate = Arc::new(Semaphore::new(0));
    let mut running = Running::start(router(agent).workers(1).on("work", {
        let gate = gate.clone();
        move |_, _| {
            let tx = tx.clone();
            let gate = gate.clone();
            async move {
                tx.send(()).unwrap();
                gate.acquire().await.unwrap().forget();
                Ok(None)
            }
        }
    }));
    running.connected(1).await;
    server
        .admin
        .publish(&Event::new(format!("work;agent={agent_id}")))
        .await
        .unwrap();
    recv(&mut rx).await;

    let reply = call(
        &server,
        Event::new(format!("ping;agent={agent_id}")).with_resource("agent", "1ag1"),
    )
    .await
    .unwrap();
    assert_eq!(reply.data, Some(json!({})));
    assert_eq!(reply.previous_names, vec!["ping".to_owned()]);
    gate.add_permits(1);
    running.stop().await;
}

#[tokio::test]
async fn a_registered_ping_handler_answers_pings() {
    let server = TestServer::start().await;
    let (agent_id, agent) = agent(&server, "host-a").await;
    let pinged = Arc::new(AtomicUsize::new(0));
    let mut running = Running::start(router(agent).on("ping", {
        let pinged = pinged.clone();
        move |event, _| {
            pinged.fetch_add(1, Ordering::SeqCst);
            async move {
                assert!(
                    event.reply_to.is_some(),
                    "keep-alive pings are not handed over"
                );
                Ok(Some(json!({"resources": [{"type": "host", "name": "h1"}]})))
            }
        }
    }));
    running.connected(1).await;
    let reply = call(&server, Event::new(format!("ping;agent={agent_id}")))
        .await
        .unwrap();
    assert_eq!(
        reply.data,
        Some(json!({"resources": [{"type": "host", "name": "h1"}]}))
    );
    assert_eq!(pinged.load(Ordering::SeqCst), 1);
    running.stop().await;
}

#[tokio::test]
async fn resource_change_callbacks_get_the_resource() {
    #[derive(Debug, serde::Deserialize)]
    struct Container {
        id: String,
        state: String,
    }
    let server = TestServer::start().await;
    let project = server
        .admin
        .post("projects", &json!({"name": "p"}))
        .await
        .unwrap();
    let project_id = project["id"].as_str().unwrap().to_owned();
    let key = server
        .admin
        .post(&format!("projects/{project_id}/apikeys"), &json!({}))
        .await
        .unwrap();
    let project_client = Client::new(
        &server.url,
        key["publicValue"].as_str().unwrap(),
        key["secretValue"].as_str().unwrap(),
    )
    .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut running = Running::start(router(project_client).on_resource_change(move |change| {
        let tx = tx.clone();
        async move { tx.send(change).unwrap() }
    }));
    running.connected(1).await;

    let numeric = drover_proto::ids::parse("project", &project_id).unwrap();
    let resource = json!({"id": "1i77", "type": "container", "state": "running", "name": "web"});
    let event = Event::new(format!("resource.change;account={numeric}"))
        .with_resource("container", "1i77")
        .with_data(json!({ "resource": resource }));
    server.admin.publish(&event).await.unwrap();
    let change = recv(&mut rx).await;
    assert_eq!(change.resource_type, "container");
    assert_eq!(change.resource_id, "1i77");
    assert_eq!(change.resource, resource);
    let container: Container = change.parse().unwrap();
    assert_eq!(
        (container.id.as_str(), container.state.as_str()),
        ("1i77", "running")
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_resubscribes_after_the_server_restarts() {
    let first = TestServer::start().await;
    let addr: SocketAddr = first.server.addr;
    let (agent_id, agent) = agent(&first, "host-a").await;
    let handled = Arc::new(AtomicUsize::new(0));
    let mut running = Running::start(router(agent).on("config.update", {
        let handled = handled.clone();
        move |event, _| {
            handled.fetch_add(1, Ordering::SeqCst);
            async move { Ok(Some(json!({"seen": event.data}))) }
        }
    }));
    running.connected(1).await;
    let request = || Event::new(format!("config.update;agent={agent_id}"));
    let reply = call(&first, request().with_data(json!({"n": 1})))
        .await
        .unwrap();
    assert_eq!(reply.data, Some(json!({"seen": {"n": 1}})));

    // Stop the server, then start another on the same address and data directory.
    let second = first.restart().await;
    assert_eq!(second.server.addr, addr);
    running.connected(2).await;
    let reply = call(&second, request().with_data(json!({"n": 2})))
        .await
        .unwrap();
    assert_eq!(reply.data, Some(json!({"seen": {"n": 2}})));
    assert_eq!(handled.load(Ordering::SeqCst), 2);
    assert_eq!(second.metric("drover_connections"), 1.0);
    running.stop().await;
    // Shutdown closed the socket: the server sees it go.
    wait_for("the server to see the socket close", || async {
        (second.metric("drover_connections") == 0.0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_refused_subscription_is_retried() {
    let server = TestServer::start().await;
    let wrong = server.client(ADMIN_ACCESS, "not-the-secret");
    let running = Running::start(router(wrong).on("x", |_, _| async { Ok(None) }));
    wait_for("three refused attempts", || async {
        (server.metric("drover_auth_failures_total") >= 3.0).then_some(())
    })
    .await;
    assert_eq!(*running.connections.borrow(), 0);
    running.stop().await;
}

/// A fake server: completes the WebSocket handshake, sends one event, then neither reads nor
/// writes again (so it never answers a ping). Reports when it accepted each connection.
async fn silent_server() -> (String, mpsc::UnboundedReceiver<tokio::time::Instant>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            let mut socket = tokio_tungstenite::accept_async(tcp).await.unwrap();
            send_text(&mut socket, r#"{"name":"ping"}"#).await;
            held.push(socket);
            let _ = tx.send(tokio::time::Instant::now());
        }
    });
    (url, rx)
}

async fn send_text(
    socket: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    text: &str,
) {
    use futures_util::SinkExt;
    socket
        .send(tokio_tungstenite::tungstenite::Message::Text(text.into()))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_server_that_stops_answering_pings_is_left_and_reconnected() {
    let (url, mut accepted) = silent_server().await;
    let client = fake_client(&url);
    let mut running = Running::start(
        router(client)
            .ping_interval(Duration::from_millis(100))
            .pong_timeout(Duration::from_millis(300))
            .on("x", |_, _| async { Ok(None) }),
    );
    running.connected(1).await;
    let first = recv(&mut accepted).await;
    // No pong comes: the router gives up on the connection and makes a new one, once the pong
    // is overdue (not at once, which any reconnect loop would do).
    running.connected(2).await;
    let second = recv(&mut accepted).await;
    let kept = second - first;
    assert!(
        kept >= Duration::from_millis(200) && kept < Duration::from_secs(5),
        "the silent connection was left after {kept:?}; the pong timeout is 300 ms"
    );
    running.stop().await;
}

#[tokio::test]
async fn a_handshake_that_never_completes_times_out_and_is_retried() {
    // Accepts TCP connections and never answers the upgrade; reports, per connection, when it
    // was accepted and when the client closed it.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let accepted = tokio::time::Instant::now();
            let tx = tx.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buffer = [0u8; 4096];
                // The upgrade request, then nothing until the client gives up and closes.
                while let Ok(n) = tcp.read(&mut buffer).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = tx.send((accepted, tokio::time::Instant::now()));
            });
        }
    });
    let timeout = Duration::from_millis(200);
    let client = fake_client(&url);
    let running = Running::start(
        router(client)
            .handshake_timeout(timeout)
            .on("x", |_, _| async { Ok(None) }),
    );
    // Three attempts, each closed by the client once its handshake timed out: not at once
    // (the client waited for the answer), and not never (a hung handshake is left).
    let mut closed = Vec::new();
    for _ in 0..3 {
        closed.push(recv(&mut rx).await);
    }
    for (accepted, ended) in &closed {
        let waited = *ended - *accepted;
        assert!(
            waited >= timeout / 2 && waited < Duration::from_secs(5),
            "an attempt was closed after {waited:?}; the handshake timeout is {timeout:?}"
        );
    }
    assert_eq!(*running.connections.borrow(), 0);
    running.stop().await;
}

#[tokio::test]
async fn shutdown_is_prompt_even_with_a_handler_running() {
    let server = TestServer::start().await;
    let (agent_id, agent) = agent(&server, "host-a").await;
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut running = Running::start(router(agent).shutdown_grace(Duration::from_millis(200)).on(
        "stuck",
        move |_, _| {
            let tx = tx.clone();
            async move {
                tx.send(()).unwrap();
                std::future::pending::<()>().await;
                Ok::<_, HandlerError>(None::<Value>)
            }
        },
    ));
    running.connected(1).await;
    server
        .admin
        .publish(&Event::new(format!("stuck;agent={agent_id}")))
        .await
        .unwrap();
    recv(&mut rx).await;
    let started = tokio::time::Instant::now();
    running.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "run returned after {:?}",
        started.elapsed()
    );
}
