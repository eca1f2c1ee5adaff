//! A test agent: a real WebSocket client with an agent key that answers the engine's requests
//! the way a test tells it to.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

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
}

pub type Policy = Arc<dyn Fn(&Event, usize) -> Answer + Send + Sync>;

pub const COMMANDS: &[&str] = &[
    "compute.instance.activate",
    "compute.instance.deactivate",
    "compute.instance.remove",
    "storage.volume.activate",
    "storage.volume.remove",
];

/// A running test agent.
pub struct TestAgent {
    pub agent_id: i64,
    /// What the agent reports in ping replies: container id → state.
    pub instances: Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>,
    pub seen: Arc<Mutex<Vec<Event>>>,
    pub count: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
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
        let task = {
            let seen = seen.clone();
            let count = count.clone();
            let instances = instances.clone();
            tokio::spawn(async move {
                while let Ok(Some(request)) = stream.next_non_ping().await {
                    if request.name() == "ping" {
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
            task,
        }
    }

    pub fn always_ok() -> Policy {
        Arc::new(|_, _| Answer::Ok)
    }

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
