//! kill -9 of the server in the middle of a process: after a restart on the same data
//! directory the process resumes and completes, once.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use drover_client::{Client, Subscribe};
use drover_test_support::process::DroverProcess;
use drover_test_support::{ADMIN_ACCESS, ADMIN_SECRET, postgres, wait_change, wait_for};
use serde_json::json;

/// Starts `drover server` on a free port with fast retries and short leases.
async fn start_server(data_dir: &Path, database_url: Option<&str>) -> DroverProcess {
    DroverProcess::server(
        env!("CARGO_BIN_EXE_drover"),
        data_dir,
        database_url,
        &[
            ("DROVER_EVENTING_TIMEOUT_MILLIS", "500"),
            ("DROVER_PROCESS_RETRY_MAX_WAIT_MILLIS", "200"),
            ("DROVER_PROCESS_LEASE_MILLIS", "1000"),
            ("DROVER_PROCESS_POLL_MILLIS", "50"),
        ],
    )
    .await
}

/// A minimal agent: answers activate requests only once `answer` is set. Returns once its
/// subscription is live (it got the first ping).
async fn spawn_agent(
    client: Client,
    answer: Arc<AtomicBool>,
    seen: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    let mut stream = client
        .subscribe(Subscribe::names(["compute.instance.activate"]))
        .await
        .unwrap();
    assert_eq!(stream.next_event().await.unwrap().unwrap().name(), "ping");
    tokio::spawn(async move {
        while let Ok(Some(request)) = stream.next_non_ping().await {
            seen.fetch_add(1, Ordering::SeqCst);
            if answer.load(Ordering::SeqCst) {
                client
                    .reply(&request, json!({"instance": {"externalId": "survivor"}}))
                    .await
                    .unwrap();
            }
        }
    })
}

#[tokio::test]
async fn a_process_survives_kill_9_of_the_server_on_sqlite() {
    survive_kill_9(None).await;
}

#[tokio::test]
async fn a_process_survives_kill_9_of_the_server_on_postgresql() {
    // A database of its own: the server under test is a separate process.
    let Some(database) =
        postgres::Database::create("drover_restart", "kill -9 of the server").await
    else {
        return;
    };
    survive_kill_9(Some(&database.url)).await;
    database.drop_now().await;
}

async fn survive_kill_9(database_url: Option<&str>) {
    drover_test_support::init();
    let dir = tempfile::tempdir().unwrap();
    let mut first = start_server(dir.path(), database_url).await;
    let url = first.url.clone();
    let admin = Client::new(&url, ADMIN_ACCESS, ADMIN_SECRET).unwrap();

    // An agent and its host (the agent's key is made in the same database).
    let options = match database_url {
        Some(url) => drover_store::StoreOptions::url(url),
        None => drover_store::StoreOptions::sqlite_file(&dir.path().join("drover.db")),
    };
    let store = drover_store::Store::connect(&options).await.unwrap();
    let project = store
        .list_accounts(drover_store::AccountKind::Project)
        .await
        .unwrap()[0]
        .id;
    let (agent_id, _, key) = store.create_agent(project, "host-1", None).await.unwrap();
    store.close().await;
    let host = admin
        .post(
            "hosts",
            &json!({"name": "host-1", "agentId": format!("1ag{agent_id}")}),
        )
        .await
        .unwrap();
    wait_change(
        &admin,
        &format!("hosts/{}", host["id"].as_str().unwrap()),
        "the host active",
        |h| h["state"] == "active",
    )
    .await;

    let answer = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicUsize::new(0));
    let agent = spawn_agent(
        Client::new(&url, &key.credential.public_value, &key.secret_value).unwrap(),
        answer.clone(),
        seen.clone(),
    )
    .await;

    // The start is in flight: the agent has the request and has not answered.
    let created = admin
        .post(
            "containers",
            &json!({"name": "survivor", "command": ["sleep", "1"]}),
        )
        .await
        .unwrap();
    let path = format!("containers/{}", created["id"].as_str().unwrap());
    wait_for("the agent to get the request", || async {
        (seen.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    first.kill().await;
    agent.abort();

    // Restart on the same data directory; the agent reconnects and now answers.
    let second = start_server(dir.path(), database_url).await;
    let url = second.url.clone();
    let admin = Client::new(&url, ADMIN_ACCESS, ADMIN_SECRET).unwrap();
    answer.store(true, Ordering::SeqCst);
    let agent = spawn_agent(
        Client::new(&url, &key.credential.public_value, &key.secret_value).unwrap(),
        answer,
        seen,
    )
    .await;
    let running = drover_test_support::wait_state(&admin, &path, "running").await;
    assert_eq!(running["externalId"], "survivor");

    // One start process, ended once, with success.
    let starts = admin
        .get(&format!(
            "processinstances?processName=instance.start&resourceId={}",
            created["id"].as_str().unwrap()
        ))
        .await
        .unwrap();
    let starts = starts["data"].as_array().unwrap();
    assert_eq!(starts.len(), 1);
    assert_eq!(starts[0]["result"], "SUCCESS");
    let executions = admin
        .get(&format!(
            "processexecutions?processInstanceId={}",
            starts[0]["id"].as_str().unwrap()
        ))
        .await
        .unwrap();
    let done: Vec<_> = executions["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["exitReason"] == "DONE")
        .collect();
    assert_eq!(done.len(), 1, "{executions:#}");
    agent.abort();
}
