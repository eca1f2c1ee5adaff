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
            .subscribe(Subscribe::names(COMMANDS.iter().copied()))
            .await
            .unwrap();
        let first = stream.next_event().await.unwrap().unwrap();
        assert_eq!(first.name(), "ping");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let task = {
            let seen = seen.clone();
            let count = count.clone();
            tokio::spawn(async move {
                while let Ok(Some(request)) = stream.next_non_ping().await {
                    let n = count.fetch_add(1, Ordering::SeqCst);
                    seen.lock().await.push(request.clone());
                    let answer = policy(&request, n);
                    let client = client.clone();
                    tokio::spawn(async move { answer_request(&client, &request, answer).await });
                }
            })
        };
        TestAgent {
            agent_id,
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
