//! kill -9 of the server in the middle of a process: after a restart on the same data
//! directory the process resumes and completes, once.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use drover_client::{Client, Subscribe};
use serde_json::{Value, json};

const ACCESS: &str = "RESTARTTESTADMINKEY1";
const SECRET: &str = "restart-test-admin-secret-0123456789abcd";

/// Starts `drover server` on a free port; returns the child and its URL.
fn start_server(data_dir: &Path, database_url: Option<&str>) -> (Child, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_drover"));
    command
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir);
    if let Some(url) = database_url {
        command.args(["--database-url", url]);
    }
    let mut child = command
        .env("DROVER_ADMIN_ACCESS_KEY", ACCESS)
        .env("DROVER_ADMIN_SECRET_KEY", SECRET)
        .env("DROVER_EVENTING_TIMEOUT_MILLIS", "500")
        .env("DROVER_PROCESS_RETRY_MAX_WAIT_MILLIS", "200")
        .env("DROVER_PROCESS_LEASE_MILLIS", "1000")
        .env("DROVER_PROCESS_POLL_MILLIS", "50")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start drover server");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && let Some(rest) = line.split("drover listening on ").nth(1) {
                let _ = tx.send(rest.trim().trim_end_matches("/v1").to_owned());
                sent = true;
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the server prints its address");
    (child, url)
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

async fn wait_for(client: &Client, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(value) = client.get(path).await
            && done(&value)
        {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting on {path}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn a_process_survives_kill_9_of_the_server_on_sqlite() {
    survive_kill_9(None).await;
}

#[tokio::test]
async fn a_process_survives_kill_9_of_the_server_on_postgresql() {
    let Ok(base) = std::env::var("DROVER_TEST_POSTGRES_URL") else {
        eprintln!("DROVER_TEST_POSTGRES_URL is not set: PostgreSQL part skipped (.ci/run sets it)");
        return;
    };
    // A database of its own: the server under test is a separate process.
    let name = format!("drover_restart_{}", std::process::id());
    let pool = sqlx::PgPool::connect(&base)
        .await
        .expect("PostgreSQL must be reachable when configured");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name}"
    )))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&pool)
        .await
        .unwrap();
    let url = match base.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{name}"),
        None => panic!("DROVER_TEST_POSTGRES_URL has no database name"),
    };
    survive_kill_9(Some(&url)).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&pool)
    .await
    .unwrap();
}

/// A server child process that is killed when dropped, also when a test fails halfway.
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn survive_kill_9(database_url: Option<&str>) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let (first, url) = start_server(dir.path(), database_url);
    let mut first = ServerProcess(first);
    let admin = Client::new(&url, ACCESS, SECRET).unwrap();

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
    wait_for(
        &admin,
        &format!("hosts/{}", host["id"].as_str().unwrap()),
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent never got the request"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    agent.abort();

    // Restart on the same data directory; the agent reconnects and now answers.
    let (second, url) = start_server(dir.path(), database_url);
    let _second = ServerProcess(second);
    let admin = Client::new(&url, ACCESS, SECRET).unwrap();
    answer.store(true, Ordering::SeqCst);
    let agent = spawn_agent(
        Client::new(&url, &key.credential.public_value, &key.secret_value).unwrap(),
        answer,
        seen,
    )
    .await;
    let running = wait_for(&admin, &path, |c| {
        c["state"] == "running" && c["transitioning"] == "no"
    })
    .await;
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
