//! kill -9 of the server with a few hundred processes in flight and creates still arriving:
//! after a restart on the same data directory nothing acknowledged is lost, and every process
//! resumes and completes, once.

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
            // Starts time out until the agent answers; none may run out of attempts.
            ("DROVER_PROCESS_MAX_ATTEMPTS", "1000"),
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

    // Creates are being acknowledged while the agent holds a few hundred starts unanswered;
    // the server dies in the middle of that.
    const CONTAINERS: usize = 300;
    let acknowledged = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut callers = tokio::task::JoinSet::new();
    let next = Arc::new(AtomicUsize::new(0));
    for _ in 0..16 {
        let admin = admin.clone();
        let acknowledged = acknowledged.clone();
        let next = next.clone();
        callers.spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::SeqCst);
                if index >= CONTAINERS {
                    return;
                }
                let body = json!({"name": format!("survivor-{index}"), "command": ["sleep", "1"]});
                match admin.post("containers", &body).await {
                    Ok(created) => acknowledged
                        .lock()
                        .unwrap()
                        .push(created["id"].as_str().unwrap().to_owned()),
                    // The server is gone: what was not acknowledged may or may not exist.
                    Err(_) => return,
                }
            }
        });
    }
    wait_for("the agent to hold 200 starts", || async {
        (seen.load(Ordering::SeqCst) >= 200).then_some(())
    })
    .await;
    first.kill().await;
    agent.abort();
    while callers.join_next().await.is_some() {}
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() >= 200,
        "{} acknowledged",
        acknowledged.len()
    );

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
    // Every container that exists (every acknowledged one, and any whose answer was lost
    // with the server) starts.
    let containers = drover_test_support::poll(
        &admin,
        "containers?limit=1000",
        "every container running",
        |page| {
            page["data"]
                .as_array()
                .is_some_and(|all| all.iter().all(|c| c["state"] == "running"))
        },
    )
    .await;
    let ids: Vec<&str> = containers["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    for id in &acknowledged {
        assert!(ids.contains(&id.as_str()), "acknowledged {id} was lost");
    }
    assert!(ids.len() <= CONTAINERS);
    for container in containers["data"].as_array().unwrap() {
        assert_eq!(container["externalId"], "survivor");
    }

    // One start process per container, ended once, with success.
    let starts = admin
        .get("processinstances?processName=instance.start&limit=1000")
        .await
        .unwrap();
    let starts = starts["data"].as_array().unwrap();
    assert_eq!(starts.len(), ids.len());
    for start in starts {
        assert_eq!(start["result"], "SUCCESS", "{start:#}");
        let executions = admin
            .get(&format!(
                "processexecutions?processInstanceId={}",
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
        assert_eq!(done, 1, "{executions:#}");
    }
    agent.abort();
}
