//! More than one server: three real `drover server` nodes on one PostgreSQL database and one
//! nats-server (`DROVER_TEST_NATS_URL`; the tests skip with a line without it, and fail in CI).
//! Whatever node an agent, a subscriber or an API caller uses, it sees one system; periodic
//! duties run once in the cluster; a killed or paused node's work is taken over and completed
//! once, and a paused node that comes back writes nothing it no longer owns.
//!
//! The tests run one at a time (each starts three nodes; the machine is small and node TTLs
//! are short).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drover_client::{Client, Event, Subscribe};
use drover_test_support::agent::TestAgent;
use drover_test_support::cluster::Cluster;
use drover_test_support::{next_event, poll, wait_change, wait_for, within};
use serde_json::{Value, json};

/// One cluster at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Three nodes with `env` on top of the fixture's defaults; `None` when the suite is skipped.
async fn three_nodes(what: &str, env: &[(&str, &str)]) -> Option<Cluster> {
    let mut builder = Cluster::builder(env!("CARGO_BIN_EXE_drover"), 3);
    for (name, value) in env {
        builder = builder.env(name, value);
    }
    let cluster = builder.start(what).await?;
    // Every node sees the other two alive before the test starts.
    for node in &cluster.nodes {
        poll(&node.admin, "clusternodes", "three live nodes", |nodes| {
            alive(nodes).len() == 3
        })
        .await;
    }
    Some(cluster)
}

/// The names of the live nodes in a `clusternodes` collection.
fn alive(nodes: &Value) -> BTreeSet<String> {
    nodes["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|node| node["state"] == "alive")
        .map(|node| node["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The `clusterNode` item named `name`.
fn cluster_node<'a>(nodes: &'a Value, name: &str) -> Option<&'a Value> {
    nodes["data"]
        .as_array()?
        .iter()
        .find(|node| node["name"] == name)
}

/// The store id of the node named `name` (its `cluster_node` row).
async fn node_id(cluster: &Cluster, name: &str) -> String {
    let rows: Vec<(String,)> = cluster
        .query(&format!(
            "SELECT id FROM cluster_node WHERE name = '{name}' ORDER BY started_at DESC LIMIT 1"
        ))
        .await;
    rows.into_iter()
        .next()
        .unwrap_or_else(|| panic!("no cluster_node row named {name}"))
        .0
}

/// A host in the default project for the agent `agent_id`, created through `admin` and active.
async fn host(admin: &Client, name: &str, agent_id: i64) -> String {
    let host = admin
        .post(
            "hosts",
            &json!({"name": name, "agentId": format!("1ag{agent_id}")}),
        )
        .await
        .unwrap();
    let id = host["id"].as_str().unwrap().to_owned();
    wait_change(admin, &format!("hosts/{id}"), "the host active", |h| {
        h["state"] == "active"
    })
    .await;
    id
}

/// A host `host-a` with its agent connected to node A, answering every request.
async fn agent_on_a(cluster: &Cluster) -> TestAgent {
    let (agent_id, access, secret) = cluster.agent_key("host-a").await;
    host(&cluster.node(A).admin, "host-a", agent_id).await;
    TestAgent::start(
        cluster.node(A).client(&access, &secret),
        agent_id,
        TestAgent::always_ok(),
    )
    .await
}

/// The resource in a `resource.change` (`Null` if there is none).
fn resource(event: &Event) -> Value {
    event
        .data
        .as_ref()
        .map_or(Value::Null, |data| data["resource"].clone())
}

/// A subscription to `names`, live (its first ping came) before it is returned.
async fn subscribed(client: &Client, names: &[&str]) -> drover_client::EventStream {
    let mut stream = client
        .subscribe(Subscribe::names(names.iter().copied()))
        .await
        .unwrap();
    let first = within("the subscription's first ping", stream.next_event())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.name(), "ping");
    stream
}

/// An agent that answers `compute.instance.activate` only once `answer` is set, with one
/// client of the library for a list of server URLs (as `drover agent --url A,B,C`): it
/// subscribes on the current server and, when that connection ends, subscribes again, which
/// moves to the next server when the current one is gone.
struct HeldAgent {
    answer: Arc<AtomicBool>,
    /// Requests received (resends included).
    seen: Arc<AtomicUsize>,
    /// 1 + the index in its URLs of the server it is subscribed on; 0 while it is not.
    on: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HeldAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HeldAgent {
    /// Starts it on `urls` (tried in this order); returns once it is subscribed.
    async fn start(urls: &[&str], access: &str, secret: &str) -> HeldAgent {
        let answer = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicUsize::new(0));
        let on = Arc::new(AtomicUsize::new(0));
        let client = Client::new(&urls.join(","), access, secret).unwrap();
        let bases: Vec<String> = client.base_urls().to_vec();
        let task = {
            let (answer, seen, on) = (answer.clone(), seen.clone(), on.clone());
            tokio::spawn(async move {
                loop {
                    let Ok(mut stream) = client
                        .subscribe(Subscribe::names(["compute.instance.activate"]))
                        .await
                    else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    if !matches!(stream.next_event().await, Ok(Some(ref e)) if e.name() == "ping") {
                        continue;
                    }
                    let index = bases.iter().position(|base| base == client.base_url());
                    on.store(index.map_or(0, |index| index + 1), Ordering::SeqCst);
                    while let Ok(Some(request)) = stream.next_non_ping().await {
                        seen.fetch_add(1, Ordering::SeqCst);
                        if answer.load(Ordering::SeqCst) {
                            // A lost reply is resent by the engine, to wherever the agent is.
                            let _ = client
                                .reply(&request, json!({"instance": {"externalId": "held"}}))
                                .await;
                        }
                    }
                    on.store(0, Ordering::SeqCst);
                }
            })
        };
        let agent = HeldAgent {
            answer,
            seen,
            on,
            task,
        };
        wait_for("the agent subscribed", || async {
            (agent.on.load(Ordering::SeqCst) > 0).then_some(())
        })
        .await;
        agent
    }
}

/// Creates `count` containers named `<prefix>-<i>` through the nodes `via`, in turn; returns
/// the ids of those acknowledged (a create through a node that dies may fail).
async fn create_containers(
    cluster: &Cluster,
    via: &[usize],
    prefix: &str,
    count: usize,
) -> Vec<String> {
    let mut creates = tokio::task::JoinSet::new();
    for i in 0..count {
        let admin = cluster.node(via[i % via.len()]).admin.clone();
        let body = json!({"name": format!("{prefix}-{i}"), "command": ["sleep", "1"]});
        creates.spawn(async move { admin.post("containers", &body).await });
    }
    let mut ids = Vec::new();
    while let Some(created) = creates.join_next().await {
        if let Ok(created) = created.unwrap() {
            ids.push(created["id"].as_str().unwrap().to_owned());
        }
    }
    ids
}

/// Awaits every container in the cluster running (read through `admin`); returns their ids.
async fn all_running(admin: &Client) -> Vec<String> {
    let page = poll(
        admin,
        "containers?limit=1000",
        "every container running",
        |page| {
            page["data"]
                .as_array()
                .is_some_and(|all| all.iter().all(|c| c["state"] == "running"))
        },
    )
    .await;
    page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Every `instance.start` process (one per container in `ids`, no more) ended with SUCCESS
/// and exactly one DONE execution; no process at all is left unfinished.
async fn started_exactly_once(admin: &Client, ids: &[String]) {
    let processes = poll(
        admin,
        "processinstances?limit=1000",
        "every process ended",
        |page| {
            page["data"]
                .as_array()
                .is_some_and(|all| all.iter().all(|p| !p["result"].is_null()))
        },
    )
    .await;
    let starts: Vec<&Value> = processes["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["processName"] == "instance.start")
        .collect();
    let per_container: BTreeMap<String, usize> =
        starts.iter().fold(BTreeMap::new(), |mut counts, start| {
            let resource = start["resourceId"].as_str().unwrap_or_default().to_owned();
            *counts.entry(resource).or_default() += 1;
            counts
        });
    assert_eq!(
        starts.len(),
        ids.len(),
        "one start per container: {per_container:?}"
    );
    for start in starts {
        assert_eq!(start["result"], "SUCCESS", "{start:#}");
        let executions = admin
            .get(&format!(
                "processexecutions?processInstanceId={}&limit=1000",
                start["id"].as_str().unwrap()
            ))
            .await
            .unwrap();
        let done = executions["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["exitReason"] == "DONE")
            .count();
        assert_eq!(done, 1, "{start:#}\n{executions:#}");
    }
}

/// a. An agent on node A runs a container created through node B's API, and a subscriber on
///    node C sees the container's `resource.change` to running.
#[tokio::test]
async fn a_container_created_on_b_runs_on_an_agent_on_a_and_c_sees_it() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = three_nodes("an agent, an API call and a subscriber on 3 nodes", &[]).await
    else {
        return;
    };
    let agent = agent_on_a(&cluster).await;
    // The cluster records the agent's session on A.
    poll(
        &cluster.node(C).admin,
        "clusternodes",
        "the agent's session on n0",
        |nodes| cluster_node(nodes, "n0").is_some_and(|n| n["agents"] == 1),
    )
    .await;

    let mut changes = subscribed(&cluster.node(C).admin, &["resource.change"]).await;
    let created = cluster
        .node(B)
        .admin
        .post(
            "containers",
            &json!({"name": "across", "command": ["sleep", "1"]}),
        )
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let mut seen = Vec::new();
    within("the container's resource.change to running on C", async {
        loop {
            let event = next_event(&mut changes).await;
            let resource = &resource(&event);
            let mine = event.resource_id.as_deref() == Some(&id);
            seen.push(format!(
                "{} {:?} {}",
                event.name(),
                event.resource_id,
                resource["state"]
            ));
            if mine && resource["state"] == "running" {
                let external = resource["externalId"].as_str().unwrap_or_default();
                assert!(external.starts_with("pid-"), "{resource:#}");
                return;
            }
        }
    })
    .await;
    assert!(agent.requests_named("compute.instance.activate").await >= 1);
    // The request reached the agent through A, the only node it is connected to: the node
    // that ran the start sent it there.
    let nodes = cluster.node(B).admin.get("clusternodes").await.unwrap();
    assert_eq!(
        cluster_node(&nodes, "n0").unwrap()["agents"],
        1,
        "{nodes:#}"
    );
    drop(agent);
    cluster.finish().await;
}

/// b. A project's subscriber on node C gets its project's changes and never another
///    project's, wherever they were made.
#[tokio::test]
async fn a_project_subscriber_on_c_never_sees_another_projects_changes() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = three_nodes("project isolation across nodes", &[]).await else {
        return;
    };
    let (p1, p1_access, p1_secret) = cluster.project_key(A, "p1").await;
    let (p2, p2_access, p2_secret) = cluster.project_key(B, "p2").await;
    let mut p1_events = subscribed(
        &cluster.node(C).client(&p1_access, &p1_secret),
        &["resource.change"],
    )
    .await;
    let mut p2_events = subscribed(
        &cluster.node(C).client(&p2_access, &p2_secret),
        &["resource.change"],
    )
    .await;

    // P2's changes, made through A and B, reach P2's subscriber on C.
    let mut p2_ids = HashSet::new();
    for (i, via) in [A, B].into_iter().enumerate() {
        let client = cluster.node(via).client(&p2_access, &p2_secret);
        let host = client
            .post("hosts", &json!({"name": format!("p2-host-{i}")}))
            .await
            .unwrap();
        p2_ids.insert(host["id"].as_str().unwrap().to_owned());
    }
    let mut active = HashSet::new();
    within("P2's hosts active on P2's subscriber on C", async {
        while active.len() < p2_ids.len() {
            let event = next_event(&mut p2_events).await;
            let id = event.resource_id.clone().unwrap_or_default();
            if p2_ids.contains(&id) && resource(&event)["state"] == "active" {
                active.insert(id);
            }
        }
    })
    .await;

    // Then P1's change, made through B: P1's subscriber on C gets it, and nothing before it
    // was P2's.
    let p1_host = cluster
        .node(B)
        .client(&p1_access, &p1_secret)
        .post("hosts", &json!({"name": "p1-host"}))
        .await
        .unwrap();
    let p1_host = p1_host["id"].as_str().unwrap().to_owned();
    let mut p1_seen: Vec<Event> = Vec::new();
    within("P1's host active on P1's subscriber on C", async {
        loop {
            let event = next_event(&mut p1_events).await;
            let done = event.resource_id.as_deref() == Some(&p1_host)
                && resource(&event)["state"] == "active";
            p1_seen.push(event);
            if done {
                return;
            }
        }
    })
    .await;
    for event in &p1_seen {
        let id = event.resource_id.clone().unwrap_or_default();
        assert!(!p2_ids.contains(&id), "P1's subscriber got P2's {event:?}");
        let text = serde_json::to_string(&event.data).unwrap();
        assert!(
            !p2_ids.iter().any(|p2_id| text.contains(p2_id.as_str())),
            "P1's subscriber got P2's data: {event:?}"
        );
        let account = &resource(event)["accountId"];
        assert!(account.is_null() || account == p1.as_str(), "{event:?}");
        assert_ne!(account, p2.as_str());
    }
    cluster.finish().await;
}

/// Changes made through every node at once get one gap-free sequence of positions, and a
/// subscriber that resumes on another node than it left gets all of them, in order.
#[tokio::test]
async fn a_subscriber_resumes_on_another_node_with_what_every_node_changed() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = three_nodes("resuming the change stream across nodes", &[]).await else {
        return;
    };
    let mut observer = subscribed(&cluster.node(B).admin, &["resource.change"]).await;
    let away = subscribed(&cluster.node(A).admin, &["resource.change"]).await;
    let from = away
        .stream_position()
        .expect("the handshake names the head");
    away.close().await.unwrap();
    let mut writers = Vec::new();
    for node in [A, B, C] {
        let admin = cluster.node(node).admin.clone();
        writers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..10 {
                let stack = admin
                    .post("stacks", &json!({"name": format!("n{node}-{n}")}))
                    .await
                    .unwrap();
                ids.push(stack["id"].as_str().unwrap().to_owned());
            }
            ids
        }));
    }
    let mut made = HashSet::new();
    for writer in writers {
        made.extend(writer.await.unwrap());
    }
    // Every change is committed (and published) before the resume.
    let mut waiting = made.clone();
    within("the observer on B to see every change", async {
        while !waiting.is_empty() {
            let event = next_event(&mut observer).await;
            waiting.remove(event.resource_id.as_deref().unwrap_or_default());
        }
    })
    .await;
    let mut back = cluster
        .node(C)
        .admin
        .subscribe(Subscribe::names(["resource.change"]).resume_from(from))
        .await
        .unwrap();
    let mut replayed = Vec::new();
    within("the replay on C", async {
        while replayed.len() < made.len() {
            let event = next_event(&mut back).await;
            let position = event.data.as_ref().unwrap()["position"].as_i64().unwrap();
            replayed.push((event.resource_id.unwrap(), position));
        }
    })
    .await;
    let positions: Vec<i64> = replayed.iter().map(|(_, position)| *position).collect();
    assert_eq!(
        positions,
        (from + 1..=from + made.len() as i64).collect::<Vec<_>>(),
        "one gap-free sequence across the nodes, in order"
    );
    let ids: HashSet<String> = replayed.into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, made);
    cluster.finish().await;
}

/// The `cluster_task_run` rows after `after` (millis): `(task, node, epoch, at)`.
async fn task_runs(cluster: &Cluster, after: i64) -> Vec<(String, String, i64, i64)> {
    cluster
        .query(&format!(
            "SELECT task, node, epoch, at FROM cluster_task_run WHERE at > {after} ORDER BY at"
        ))
        .await
}

/// c. Each periodic task runs once in the cluster (about window / interval runs, from one
///    node), and when that node is killed another takes the duties over.
#[tokio::test]
async fn periodic_tasks_run_once_in_the_cluster_and_move_when_the_leader_dies() {
    const CLEANUP_MILLIS: i64 = 1000;
    const PING_MILLIS: i64 = 250;
    const WINDOW: i64 = 5000;
    let _serial = SERIAL.lock().await;
    let Some(mut cluster) = three_nodes(
        "periodic tasks once per cluster",
        &[
            ("DROVER_TASK_TABLE_CLEANUP_SCHEDULE", "1"),
            ("DROVER_AGENT_PING_INTERVAL_MILLIS", "250"),
        ],
    )
    .await
    else {
        return;
    };
    // An agent that answers pings, so the ping monitor has work.
    let (agent_id, access, secret) = cluster.agent_key("pinged").await;
    host(&cluster.node(B).admin, "pinged", agent_id).await;
    let agent = TestAgent::start(
        cluster.node(B).client(&access, &secret),
        agent_id,
        TestAgent::always_ok(),
    )
    .await;

    // A window of runs, once both tasks run.
    let start = wait_for("table.cleanup and agent.ping runs", || async {
        let runs = task_runs(&cluster, 0).await;
        let tasks: HashSet<&str> = runs.iter().map(|r| r.0.as_str()).collect();
        (tasks.contains("table.cleanup") && tasks.contains("agent.ping"))
            .then(|| runs.iter().map(|r| r.3).max().unwrap())
    })
    .await;
    wait_for("a window of task runs", || async {
        let newest = cluster
            .scalar("SELECT COALESCE(MAX(at), 0) FROM cluster_task_run")
            .await;
        (newest > start + WINDOW).then_some(())
    })
    .await;
    let window: Vec<_> = task_runs(&cluster, start)
        .await
        .into_iter()
        .filter(|run| run.3 <= start + WINDOW)
        .collect();
    let mut per_task: BTreeMap<&str, Vec<&(String, String, i64, i64)>> = BTreeMap::new();
    for run in &window {
        per_task.entry(run.0.as_str()).or_default().push(run);
    }
    let leaders: BTreeSet<&str> = window.iter().map(|run| run.1.as_str()).collect();
    assert_eq!(leaders.len(), 1, "runs from more than one node: {window:?}");
    let leader_id = leaders.into_iter().next().unwrap().to_owned();
    for (task, interval) in [
        ("table.cleanup", CLEANUP_MILLIS),
        ("agent.ping", PING_MILLIS),
    ] {
        let runs = per_task.get(task).map_or(0, Vec::len) as i64;
        let expected = WINDOW / interval;
        // About one run per interval; three nodes each running it would make about 3x.
        assert!(
            runs >= expected / 3 && runs <= expected * 3 / 2 + 1,
            "{task}: {runs} runs in {WINDOW} ms at one per {interval} ms: {window:?}"
        );
    }
    eprintln!(
        "runs in {WINDOW} ms: {:?}",
        per_task
            .iter()
            .map(|(task, runs)| (task, runs.len()))
            .collect::<Vec<_>>()
    );
    // The event worker records one run when a node takes the lead: none in a quiet window.
    assert!(
        !per_task.contains_key("event.worker"),
        "the event worker started again without a change of leader: {window:?}"
    );
    // The node that runs them is the one the cluster calls its leader.
    let leader_name: String = cluster
        .query::<(String,)>(&format!(
            "SELECT name FROM cluster_node WHERE id = '{leader_id}'"
        ))
        .await[0]
        .0
        .clone();
    let nodes = cluster.node(C).admin.get("clusternodes").await.unwrap();
    assert_eq!(
        cluster_node(&nodes, &leader_name).unwrap()["leader"],
        true,
        "{nodes:#}"
    );
    let leader = cluster
        .nodes
        .iter()
        .position(|node| node.name == leader_name)
        .unwrap();

    // kill -9 of the leader: the duties move to one other node.
    cluster.kill(leader).await;
    let killed_at = now_millis();
    let takeover = wait_for("every task run by another node", || async {
        let runs = task_runs(&cluster, killed_at).await;
        let tasks: HashSet<&str> = runs.iter().map(|r| r.0.as_str()).collect();
        (tasks.contains("table.cleanup")
            && tasks.contains("agent.ping")
            && tasks.contains("event.worker"))
        .then(|| runs.iter().map(|r| r.3).max().unwrap())
    })
    .await;
    wait_for("a window of the new leader's runs", || async {
        let newest = cluster
            .scalar("SELECT COALESCE(MAX(at), 0) FROM cluster_task_run")
            .await;
        (newest > takeover + 2000).then_some(())
    })
    .await;
    let after = task_runs(&cluster, killed_at).await;
    assert!(
        after.iter().all(|run| run.1 != leader_id),
        "the killed leader ran tasks after its death: {after:?}"
    );
    let since_takeover: BTreeSet<&str> = after
        .iter()
        .filter(|run| run.3 >= takeover)
        .map(|run| run.1.as_str())
        .collect();
    assert_eq!(
        since_takeover.len(),
        1,
        "after the takeover, runs from more than one node: {after:?}"
    );
    drop(agent);
    cluster.finish().await;
}

/// d. kill -9 of node A while processes wait on an agent connected to it: the agent moves to
///    B or C, and every acknowledged create's start completes exactly once.
#[tokio::test]
async fn processes_in_flight_survive_kill_9_of_a_node() {
    const CONTAINERS: usize = 60;
    let _serial = SERIAL.lock().await;
    let Some(mut cluster) = three_nodes("kill -9 of a node with processes in flight", &[]).await
    else {
        return;
    };
    let (agent_id, access, secret) = cluster.agent_key("held").await;
    host(&cluster.node(B).admin, "held", agent_id).await;
    let urls: Vec<&str> = cluster.nodes.iter().map(|n| n.url.as_str()).collect();
    let agent = HeldAgent::start(&urls, &access, &secret).await;
    assert_eq!(
        agent.on.load(Ordering::SeqCst),
        A + 1,
        "the agent starts on A"
    );

    // Starts held by the agent, owned by all three nodes.
    let mut acknowledged = create_containers(&cluster, &[A, B, C], "held", CONTAINERS).await;
    assert_eq!(acknowledged.len(), CONTAINERS);
    wait_for("the agent to hold every start", || async {
        (agent.seen.load(Ordering::SeqCst) >= CONTAINERS).then_some(())
    })
    .await;
    let a_id = node_id(&cluster, "n0").await;
    let owned_by_a = wait_for("A to own processes in flight", || async {
        let owned = cluster
            .scalar(&format!(
                "SELECT count(*) FROM process_instance \
                 WHERE running_process_server_id = '{a_id}' AND end_time IS NULL"
            ))
            .await;
        (owned > 0).then_some(owned)
    })
    .await;

    // kill -9 of A while more creates arrive through B and C.
    let more = {
        let b = cluster.node(B).admin.clone();
        let c = cluster.node(C).admin.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..20 {
                let admin = if i % 2 == 0 { &b } else { &c };
                let body = json!({"name": format!("later-{i}"), "command": ["sleep", "1"]});
                ids.push(
                    admin
                        .post("containers", &body)
                        .await
                        .map(|c| c["id"].as_str().unwrap().to_owned()),
                );
            }
            ids
        })
    };
    cluster.kill(A).await;
    agent.answer.store(true, Ordering::SeqCst);
    for created in more.await.unwrap() {
        acknowledged.push(created.expect("a create through a live node is acknowledged"));
    }
    wait_for("the agent on B or C", || async {
        (agent.on.load(Ordering::SeqCst) > A + 1).then_some(())
    })
    .await;

    let ids = all_running(&cluster.node(B).admin).await;
    for id in &acknowledged {
        assert!(ids.contains(id), "acknowledged {id} was lost");
    }
    assert_eq!(ids.len(), acknowledged.len());
    started_exactly_once(&cluster.node(C).admin, &ids).await;
    // A is dead to the others, with nothing left on it (its leases may run out before its
    // node lease does: the processes can be done first).
    poll(
        &cluster.node(B).admin,
        "clusternodes",
        "n0 dead, holding nothing",
        |nodes| {
            cluster_node(nodes, "n0")
                .is_some_and(|a| a["state"] == "dead" && a["processes"] == 0 && a["agents"] == 0)
        },
    )
    .await;
    eprintln!("A owned {owned_by_a} processes in flight when it was killed");

    // A restarted on its address and data directory joins again as a new member under its
    // name, and serves: a container created through it runs (on the agent, now on B or C).
    cluster.restart(A).await;
    poll(
        &cluster.node(B).admin,
        "clusternodes",
        "n0 alive again",
        |nodes| alive(nodes).len() == 3,
    )
    .await;
    let (status, health) = cluster.node(A).health().await.expect("A answers");
    assert_eq!(status, 200, "{health:#}");
    assert_eq!(health["cluster"]["node"], "n0", "{health:#}");
    let new_id = health["cluster"]["id"].as_str().unwrap_or_default();
    assert!(
        !new_id.is_empty() && new_id != a_id,
        "a restart is a new member: {health:#}"
    );
    let created = cluster
        .node(A)
        .admin
        .post(
            "containers",
            &json!({"name": "after-restart", "command": ["sleep", "1"]}),
        )
        .await
        .unwrap();
    wait_change(
        &cluster.node(A).admin,
        &format!("containers/{}", created["id"].as_str().unwrap()),
        "the container created through the restarted A running",
        |c| c["state"] == "running",
    )
    .await;
    drop(agent);
    cluster.finish().await;
}

/// One process row as the store has it, for before/after comparisons: id, result, exit
/// reason, owner, end time, attempts, executions.
type ProcessRow = (
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    i64,
    i64,
);

/// Every process row with its executions' count.
async fn process_rows(cluster: &Cluster) -> Vec<ProcessRow> {
    cluster
        .query(
            "SELECT p.id, p.result, p.exit_reason, p.running_process_server_id, p.end_time, \
                    p.execution_count, \
                    (SELECT count(*) FROM process_execution e WHERE e.process_instance_id = p.id) \
             FROM process_instance p ORDER BY p.id",
        )
        .await
}

/// e. A node paused (SIGSTOP) past its TTL is presumed dead: its processes are completed by
///    the others, and after SIGCONT it writes nothing under its old epoch.
#[tokio::test]
async fn a_paused_node_that_comes_back_changes_nothing_it_lost() {
    const CONTAINERS: usize = 60;
    let _serial = SERIAL.lock().await;
    let Some(cluster) = three_nodes("a paused node's fencing", &[]).await else {
        return;
    };
    let (agent_id, access, secret) = cluster.agent_key("held").await;
    host(&cluster.node(B).admin, "held", agent_id).await;
    // The agent is on B and C only: the pause does not touch it.
    let urls = [cluster.node(B).url.as_str(), cluster.node(C).url.as_str()];
    let agent = HeldAgent::start(&urls, &access, &secret).await;
    create_containers(&cluster, &[A, B, C], "paused", CONTAINERS).await;
    wait_for("the agent to hold every start", || async {
        (agent.seen.load(Ordering::SeqCst) >= CONTAINERS).then_some(())
    })
    .await;
    let a_id = node_id(&cluster, "n0").await;
    let a_epoch = cluster
        .scalar(&format!(
            "SELECT epoch FROM cluster_node WHERE id = '{a_id}'"
        ))
        .await;
    // Pause A while it owns processes in flight and is inside a transaction that has written
    // process rows (their row locks stay until PostgreSQL ends it): what the store says A
    // holds once it is stopped is what A has in flight. Its attempts and transactions come
    // and go: try again until both hold.
    let owned_by_a = format!(
        "SELECT id FROM process_instance \
         WHERE running_process_server_id = '{a_id}' AND end_time IS NULL"
    );
    let fenced_before = cluster
        .node(A)
        .metric("drover_engine_fenced_total")
        .await
        .expect("A exports drover_engine_fenced_total");
    let others_epochs = "SELECT name, epoch FROM cluster_node \
                         WHERE name IN ('n1', 'n2') AND state = 'alive' ORDER BY name";
    let others_before: Vec<(String, i64)> = cluster.query(others_epochs).await;
    let mut held_by_a: Vec<(i64,)> = Vec::new();
    let mut tries = 0;
    for _ in 0..300 {
        tries += 1;
        wait_for("A to own processes in flight", || async {
            let owned: Vec<(i64,)> = cluster.query(&owned_by_a).await;
            (!owned.is_empty()).then_some(())
        })
        .await;
        cluster.pause(A);
        if cluster.sessions_writing(A, "process_instance").await > 0 {
            held_by_a = cluster.query(&owned_by_a).await;
            if !held_by_a.is_empty() {
                break;
            }
        }
        cluster.resume(A);
    }
    assert!(
        !held_by_a.is_empty(),
        "A was never paused inside a write transaction while owning processes ({tries} tries)"
    );
    let paused_at = now_millis();

    // B sees A dead; nothing stays leased by A; the starts complete elsewhere.
    poll(&cluster.node(B).admin, "clusternodes", "n0 dead", |nodes| {
        cluster_node(nodes, "n0").is_some_and(|n| n["state"] == "dead")
    })
    .await;
    agent.answer.store(true, Ordering::SeqCst);
    let ids = all_running(&cluster.node(B).admin).await;
    assert_eq!(ids.len(), CONTAINERS);
    started_exactly_once(&cluster.node(C).admin, &ids).await;
    let leased_by_a = cluster
        .scalar(&format!(
            "SELECT count(*) FROM process_instance \
             WHERE running_process_server_id = '{a_id}' AND end_time IS NULL"
        ))
        .await;
    assert_eq!(leased_by_a, 0, "A still holds leases while presumed dead");
    let before = process_rows(&cluster).await;
    for (id,) in &held_by_a {
        let row = before.iter().find(|row| row.0 == *id).unwrap();
        assert_eq!(row.1.as_deref(), Some("SUCCESS"), "A's process {row:?}");
        assert_eq!(row.3, None, "A's process {row:?}");
    }
    // Completed by the others: each execution's log names the node that wrote it.
    let held_ids = held_by_a
        .iter()
        .map(|(id,)| id.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let done_by: Vec<(Option<String>,)> = cluster
        .query(&format!(
            "SELECT log::jsonb->>'node' FROM process_execution \
             WHERE process_instance_id IN ({held_ids}) AND exit_reason = 'DONE'"
        ))
        .await;
    assert_eq!(done_by.len(), held_by_a.len(), "{done_by:?}");
    assert!(
        done_by
            .iter()
            .all(|(node,)| node.is_some() && node.as_deref() != Some(&a_id)),
        "A's processes were finished by {done_by:?} (A is {a_id})"
    );
    let a_runs = format!(
        "SELECT count(*) FROM cluster_task_run WHERE node = '{a_id}' AND epoch = {a_epoch}"
    );
    let a_runs_before = cluster.scalar(&a_runs).await;

    // SIGCONT: A's timers fire, its stale finishes are refused; it comes back under a new
    // epoch (or not at all) and runs new work.
    cluster.resume(A);
    let resumed_at = now_millis();
    // Each of its attempts in flight ends: the store refuses what it would write, or its
    // transaction fails (PostgreSQL ended the session it left open).
    let fenced = wait_for("A's stale finishes refused or failed", || async {
        let fenced = cluster
            .node(A)
            .metric("drover_engine_fenced_total")
            .await
            .expect("A exports drover_engine_fenced_total")
            - fenced_before;
        let failed = cluster
            .node(A)
            .log()
            .matches("recording a process attempt failed")
            .count();
        (fenced as usize + failed >= held_by_a.len()).then_some(fenced)
    })
    .await;
    poll(
        &cluster.node(B).admin,
        "clusternodes",
        "n0 alive again",
        |nodes| {
            cluster_node(nodes, "n0")
                .is_some_and(|n| n["state"] == "alive" && n["epoch"].as_i64() > Some(a_epoch))
        },
    )
    .await;
    let again = cluster
        .node(A)
        .admin
        .post(
            "containers",
            &json!({"name": "after-resume", "command": ["sleep", "1"]}),
        )
        .await
        .unwrap();
    let again = again["id"].as_str().unwrap().to_owned();
    wait_change(
        &cluster.node(A).admin,
        &format!("containers/{again}"),
        "the container created through A after its pause running",
        |c| c["state"] == "running",
    )
    .await;

    // Nothing A lost changed: the same process rows and executions, no task run under the
    // old epoch.
    let after = process_rows(&cluster).await;
    for row in &before {
        let now = after.iter().find(|other| other.0 == row.0);
        assert_eq!(
            now,
            Some(row),
            "process {} changed after A came back",
            row.0
        );
    }
    assert_eq!(
        cluster.scalar(&a_runs).await,
        a_runs_before,
        "A ran periodic tasks under its old epoch after it came back"
    );
    let stale_runs = cluster
        .scalar(&format!(
            "SELECT count(*) FROM cluster_task_run WHERE node = '{a_id}' \
             AND epoch <= {a_epoch} AND at >= {paused_at}"
        ))
        .await;
    assert_eq!(stale_runs, 0);
    // The paused node's open transaction did not take the others down: they kept their
    // leases (and epochs) throughout.
    let others_after: Vec<(String, i64)> = cluster.query(others_epochs).await;
    assert_eq!(
        others_after, others_before,
        "B or C lost its lease while A was paused"
    );
    let fenced_at_end = cluster
        .node(A)
        .metric("drover_engine_fenced_total")
        .await
        .unwrap();
    eprintln!(
        "A held {} processes when paused in a transaction (try {tries}); {fenced} stale finishes \
         refused ({} at the end); back {} ms after the pause",
        held_by_a.len(),
        fenced_at_end - fenced_before,
        resumed_at - paused_at
    );
    drop(agent);
    cluster.finish().await;
}

/// f. A second node on the same database without NATS is refused while a node runs.
#[tokio::test]
async fn a_node_without_nats_is_refused_beside_a_running_node() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = Cluster::builder(env!("CARGO_BIN_EXE_drover"), 1)
        .start("a node without NATS beside a cluster")
        .await
    else {
        return;
    };
    let refused = cluster.run_refused(false).await;
    assert!(
        !refused.status.success(),
        "{:?}\n{}",
        refused.status,
        refused.log
    );
    assert!(
        refused.log.to_lowercase().contains("nats"),
        "the refusal does not say why:\n{}",
        refused.log
    );
    // The running node is untouched.
    let (status, health) = cluster.node(0).health().await.expect("n0 answers");
    assert_eq!(status, 200, "{health:#}");
    cluster.finish().await;
}

/// An external handler registered through A takes part in processes that B runs, its calls
/// reaching an extension connected to C and its replies coming back through NATS.
#[tokio::test]
async fn an_external_handler_registered_on_one_node_takes_part_on_every_node() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = three_nodes("an external handler across 3 nodes", &[]).await else {
        return;
    };
    let agent = agent_on_a(&cluster).await;
    let mut extension = subscribed(
        &cluster.node(C).admin,
        &["instance.start;handler=cluster-gate"],
    )
    .await;
    cluster
        .node(A)
        .admin
        .post(
            "externalhandlers",
            &json!({"name": "cluster-gate", "priority": 100,
                    "processConfigs": [{"name": "instance.start"}]}),
        )
        .await
        .unwrap();
    // Every node's engine has it (A at once, the others by the hint).
    for i in [A, B, C] {
        wait_for("the handler in every node's registry", || async {
            (cluster
                .node(i)
                .metric("drover_external_handlers_active")
                .await
                == Some(1.0))
            .then_some(())
        })
        .await;
    }
    let created = cluster
        .node(B)
        .admin
        .post(
            "containers",
            &json!({"name": "gated", "command": ["sleep", "600"]}),
        )
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let request = within("the handler's call on C", async {
        loop {
            let event = next_event(&mut extension).await;
            if event.resource_id.as_deref() == Some(id.as_str()) {
                return event;
            }
        }
    })
    .await;
    assert_eq!(request.name(), "instance.start;handler=cluster-gate");
    cluster
        .node(C)
        .admin
        .reply(&request, json!({"instance": {"gatedBy": "cluster-gate"}}))
        .await
        .unwrap();
    let running = wait_change(
        &cluster.node(B).admin,
        &format!("containers/{id}"),
        "the gated container running",
        |c| c["state"] == "running",
    )
    .await;
    assert_eq!(running["gatedBy"], "cluster-gate", "{running:#}");
    assert_eq!(agent.requests_named("compute.instance.activate").await, 0);
    drop(agent);
    cluster.finish().await;
}
