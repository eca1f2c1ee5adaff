//! The router's `resource.change` helper resumes by itself: changes made while it could not
//! connect (a dropped socket, a restarted server) arrive when it is back, in order; when the
//! server no longer retains them it is told to re-list and goes on from the head. A gate in
//! front of the real server cuts the router off at will.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use drover_client::{Client, ResourceChange, RouterBuilder, Subscribe};
use drover_test_support::{ADMIN_ACCESS, ADMIN_SECRET, FAST, TestServer, wait_for, within};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// A TCP gate in front of the server: open, it forwards; closed, it cuts every connection it
/// carries and refuses new ones.
struct Gate {
    url: String,
    open: watch::Sender<bool>,
    carried: Arc<AtomicUsize>,
}

impl Gate {
    async fn start(upstream: SocketAddr) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (open, state) = watch::channel(true);
        let carried = Arc::new(AtomicUsize::new(0));
        let count = carried.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let mut state = state.clone();
                if !*state.borrow() {
                    continue;
                }
                let count = count.clone();
                count.fetch_add(1, Ordering::AcqRel);
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = state.wait_for(|open| !*open) => {}
                        }
                    }
                    count.fetch_sub(1, Ordering::AcqRel);
                });
            }
        });
        Gate { url, open, carried }
    }

    /// Closes the gate and waits until no connection goes through it any more.
    async fn close(&self) {
        self.open.send_replace(false);
        let carried = self.carried.clone();
        wait_for("the gate to cut its connections", || {
            let carried = carried.clone();
            async move { (carried.load(Ordering::Acquire) == 0).then_some(()) }
        })
        .await;
    }

    fn open(&self) {
        self.open.send_replace(true);
    }
}

async fn stack(client: &Client, name: &str) -> String {
    let created = client.post("stacks", &json!({"name": name})).await.unwrap();
    created["id"].as_str().unwrap().to_owned()
}

async fn stacks(client: &Client, prefix: &str, count: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for n in 0..count {
        ids.push(stack(client, &format!("{prefix}-{n}")).await);
    }
    ids
}

/// Receives changes until all of `ids` arrived; returns them in arrival order.
async fn receive(rx: &mut mpsc::Receiver<ResourceChange>, ids: &[String]) -> Vec<ResourceChange> {
    let mut got = Vec::new();
    within("the router to hand over the changes", async {
        while !ids
            .iter()
            .all(|id| got.iter().any(|c: &ResourceChange| c.resource_id == *id))
        {
            got.push(rx.recv().await.expect("the router runs"));
        }
    })
    .await;
    got
}

fn positions(changes: &[ResourceChange]) -> Vec<i64> {
    changes
        .iter()
        .map(|change| change.position.expect("a position"))
        .collect()
}

struct Watching {
    changes: mpsc::Receiver<ResourceChange>,
    relists: mpsc::Receiver<i64>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<drover_client::Result<()>>,
}

/// A router on `url` that hands every change and every re-list signal to the test.
async fn watch(url: &str) -> Watching {
    let client = Client::new(url, ADMIN_ACCESS, ADMIN_SECRET).unwrap();
    let (tx, changes) = mpsc::channel(1000);
    let (relist_tx, relists) = mpsc::channel(16);
    let router = RouterBuilder::new(client)
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(50))
        .on_resource_change(move |change| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(change).await;
            }
        })
        .on_relist(move |head| {
            let tx = relist_tx.clone();
            async move {
                let _ = tx.send(head).await;
            }
        })
        .build();
    let mut connections = router.connections();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(router.run(shutdown.clone()));
    within("the router to subscribe", connections.wait_for(|n| *n >= 1))
        .await
        .unwrap();
    Watching {
        changes,
        relists,
        shutdown,
        task,
    }
}

impl Watching {
    async fn stop(self) {
        self.shutdown.cancel();
        within("the router to stop", self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

#[tokio::test]
async fn the_change_helper_resumes_across_a_dropped_socket_and_a_server_restart() {
    let server = TestServer::start_with(FAST).await;
    let gate = Gate::start(server.server.addr).await;
    let mut watching = watch(&gate.url).await;
    let first = stack(&server.admin, "first").await;
    let seen = receive(&mut watching.changes, std::slice::from_ref(&first)).await;
    let mut last = *positions(&seen).last().unwrap();

    // A dropped socket: the changes made while it cannot reconnect arrive when it can.
    gate.close().await;
    let missed = stacks(&server.admin, "missed", 20).await;
    gate.open();
    let got = receive(&mut watching.changes, &missed).await;
    assert_eq!(got.len(), missed.len(), "each change once: {got:?}");
    let got_positions = positions(&got);
    assert!(got_positions[0] > last);
    assert!(
        got_positions.windows(2).all(|pair| pair[0] < pair[1]),
        "{got_positions:?}"
    );
    last = *got_positions.last().unwrap();

    // A server restart, with changes made before the router gets back.
    gate.close().await;
    let server = server.restart().await;
    let after = stacks(&server.admin, "after-restart", 20).await;
    gate.open();
    let got = receive(&mut watching.changes, &after).await;
    assert_eq!(got.len(), after.len(), "each change once: {got:?}");
    assert!(positions(&got).iter().all(|position| *position > last));
    assert!(
        watching.relists.try_recv().is_err(),
        "nothing had to be re-listed"
    );
    watching.stop().await;
}

#[tokio::test]
async fn the_change_helper_asks_to_relist_when_the_changes_are_gone() {
    let server = TestServer::builder()
        .settings(FAST)
        .setting("resource.change.retain.count", "5")
        .start()
        .await;
    let gate = Gate::start(server.server.addr).await;
    let mut watching = watch(&gate.url).await;
    let first = stack(&server.admin, "first").await;
    receive(&mut watching.changes, std::slice::from_ref(&first)).await;

    gate.close().await;
    let mut observer = server
        .admin
        .subscribe(Subscribe::names(["resource.change"]))
        .await
        .unwrap();
    let lost = stacks(&server.admin, "lost", 12).await;
    let mut head = 0;
    let mut waiting = lost.clone();
    while !waiting.is_empty() {
        let event = within("the observer", observer.next_non_ping())
            .await
            .unwrap()
            .unwrap();
        waiting.retain(|id| event.resource_id.as_deref() != Some(id.as_str()));
        head = head.max(event.data.unwrap()["position"].as_i64().unwrap());
    }
    gate.open();
    let relisted = within("the re-list signal", watching.relists.recv())
        .await
        .unwrap();
    assert_eq!(relisted, head, "it goes on from the head");
    // From the head on, nothing is lost again.
    let live = stack(&server.admin, "live").await;
    let got = receive(&mut watching.changes, std::slice::from_ref(&live)).await;
    assert!(
        got.iter().all(|change| !lost.contains(&change.resource_id)),
        "the trimmed changes are not replayed: {got:?}"
    );
    assert!(got.last().unwrap().position.unwrap() > head);
    watching.stop().await;
}
