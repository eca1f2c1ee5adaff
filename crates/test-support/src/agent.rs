//! A test agent: a real WebSocket client with an agent key that answers the engine's requests
//! the way a test tells it to.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use drover_client::{Client, Event, Subscribe, Transitioning};
use serde_json::{Value, json};
use tokio::sync::Mutex;

/// How the agent answers one request.
#[derive(Debug, Clone)]
pub enum Answer {
    /// Reply with success (and progress first).
    Ok,
    /// Do not reply at all (a lost message).
    Ignore,
    /// Reply with `transitioning: error` and this message.
    Error(String),
    /// Reply with an error marked permanent (`data.permanent: true`) and this message.
    Permanent(String),
}

/// How a [`TestAgent`] answers each request: given the request and how many came before it.
pub type Policy = Arc<dyn Fn(&Event, usize) -> Answer + Send + Sync>;

/// The commands a [`TestAgent`] subscribes to (and `ping`).
pub const COMMANDS: &[&str] = &[
    "compute.instance.activate",
    "compute.instance.deactivate",
    "compute.instance.remove",
    "storage.volume.activate",
    "storage.volume.remove",
];

/// A running test agent; it disconnects when dropped.
pub struct TestAgent {
    /// Its agent's numeric id.
    pub agent_id: i64,
    /// What the agent reports in ping replies: container id → state.
    pub instances: Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>,
    /// Every request it got (pings apart), in order.
    pub seen: Arc<Mutex<Vec<Event>>>,
    /// How many requests it got (pings apart).
    pub count: Arc<AtomicUsize>,
    /// Whether it answers the ping monitor's pings (on by default); off, it stays connected
    /// and silent, like a hung agent.
    pub answer_pings: Arc<AtomicBool>,
    /// How many pings with a reply address it received (answered or not).
    pub pings: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for TestAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestAgent")
            .field("agent_id", &self.agent_id)
            .field("count", &self.count)
            .field("pings", &self.pings)
            .finish_non_exhaustive()
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestAgent {
    /// Subscribes with the agent's key and answers requests by `policy` (given the request and
    /// how many requests came before it).
    pub async fn start(client: Client, agent_id: i64, policy: Policy) -> TestAgent {
        let mut stream = client
            .subscribe(Subscribe::names(COMMANDS.iter().copied().chain(["ping"])))
            .await
            .unwrap();
        let first = stream.next_event().await.unwrap().unwrap();
        assert_eq!(first.name(), "ping");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let instances = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let answer_pings = Arc::new(AtomicBool::new(true));
        let pings = Arc::new(AtomicUsize::new(0));
        let task = {
            let seen = seen.clone();
            let count = count.clone();
            let instances = instances.clone();
            let answer_pings = answer_pings.clone();
            let pings = pings.clone();
            tokio::spawn(async move {
                while let Ok(Some(request)) = stream.next_non_ping().await {
                    if request.name() == "ping" {
                        pings.fetch_add(1, Ordering::SeqCst);
                        if !answer_pings.load(Ordering::SeqCst) {
                            continue;
                        }
                        let mut resources =
                            vec![json!({"type": "host", "hostname": "test-host", "cpus": 2})];
                        for (id, state) in instances.lock().unwrap().iter() {
                            resources.push(json!({"type": "instance", "id": id, "state": state}));
                        }
                        let client = client.clone();
                        tokio::spawn(async move {
                            let _ = client
                                .reply(&request, json!({"resources": resources}))
                                .await;
                        });
                        continue;
                    }
                    let n = count.fetch_add(1, Ordering::SeqCst);
                    seen.lock().await.push(request.clone());
                    let answer = policy(&request, n);
                    if matches!(answer, Answer::Ok) {
                        let id = request.resource_id.clone().unwrap_or_default();
                        let mut instances = instances.lock().unwrap();
                        match request.name() {
                            "compute.instance.activate" => {
                                instances.insert(id, "running".into());
                            }
                            "compute.instance.deactivate" => {
                                instances.insert(id, "stopped".into());
                            }
                            "compute.instance.remove" => {
                                instances.remove(&id);
                            }
                            _ => {}
                        }
                    }
                    let client = client.clone();
                    tokio::spawn(async move { answer_request(&client, &request, answer).await });
                }
            })
        };
        TestAgent {
            agent_id,
            instances,
            seen,
            count,
            answer_pings,
            pings,
            task,
        }
    }

    /// A policy that answers every request with success.
    pub fn always_ok() -> Policy {
        Arc::new(|_, _| Answer::Ok)
    }

    /// How many requests named `name` it got.
    pub async fn requests_named(&self, name: &str) -> usize {
        self.seen
            .lock()
            .await
            .iter()
            .filter(|event| event.name() == name)
            .count()
    }
}

async fn answer_request(client: &Client, request: &Event, answer: Answer) {
    match answer {
        Answer::Ignore => {}
        Answer::Error(message) => {
            let mut reply = request.reply().unwrap();
            reply.transitioning = Some(Transitioning::Error);
            reply.transitioning_message = Some(message);
            client.publish(&reply).await.unwrap();
        }
        Answer::Permanent(message) => {
            let reply = request.reply().unwrap().into_error(message, true);
            client.publish(&reply).await.unwrap();
        }
        Answer::Ok => {
            let mut progress = request.reply().unwrap();
            progress.transitioning = Some(Transitioning::Yes);
            progress.transitioning_message = Some("working".into());
            progress.transitioning_progress = Some(50);
            client.publish(&progress).await.unwrap();
            let data: Value = match request.name() {
                "compute.instance.activate" => {
                    json!({"instance": {"externalId": format!("pid-{}", request.resource_id.as_deref().unwrap_or(""))}})
                }
                "storage.volume.activate" => json!({"volume": {"path": "/var/lib/test/volume"}}),
                _ => json!({}),
            };
            client
                .publish(&request.reply().unwrap().with_data(data))
                .await
                .unwrap();
        }
    }
}

impl crate::TestServer {
    /// A host named `name` in the default project with its agent, the host active, and a
    /// [`TestAgent`] answering as `policy` says: `(host id, agent client, test agent)`.
    pub async fn host_with_agent(&self, name: &str, policy: Policy) -> (String, Client, TestAgent) {
        let (agent_id, agent_client) = self.agent(self.default_project(), name).await;
        let host = self
            .admin
            .post(
                "hosts",
                &json!({"name": name, "agentId": format!("1ag{agent_id}")}),
            )
            .await
            .unwrap();
        let host_id = host["id"].as_str().unwrap().to_owned();
        crate::wait_state(&self.admin, &format!("hosts/{host_id}"), "active").await;
        let agent = TestAgent::start(agent_client.clone(), agent_id, policy).await;
        (host_id, agent_client, agent)
    }
}
