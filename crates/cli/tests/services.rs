//! Services with real processes: the real server (in this process) keeps a service at its
//! scale on the real `drover agent` binary (a child process). A container whose process is
//! killed is started again; a command that keeps crashing is restarted with a growing backoff.

use std::process::Stdio;

use drover_client::Client;
use drover_test_support::process::DroverProcess;
use drover_test_support::{TestServer, poll, wait_change};
use serde_json::{Value, json};

/// The server, its admin, and `drover agent` registered with it and active.
struct Harness {
    _server: TestServer,
    admin: Client,
    agent: Option<DroverProcess>,
    agent_dir: tempfile::TempDir,
}

impl Harness {
    async fn start(extra: &[(&str, &str)]) -> Harness {
        let mut settings = vec![
            ("agent.ping.interval.millis", "200"),
            ("agent.activate.ping.timeout.millis", "300"),
            ("eventing.timeout.millis", "2000"),
            ("process.retry_max_wait.millis", "300"),
            ("process.poll.millis", "50"),
            ("resource.change.interval.millis", "20"),
        ];
        settings.extend_from_slice(extra);
        let server = TestServer::start_with(&settings).await;
        let admin = server.admin.clone();
        let token = admin.post("registrationtokens", &json!({})).await.unwrap()["token"]
            .as_str()
            .unwrap()
            .to_owned();
        let agent_dir = tempfile::tempdir().unwrap();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_drover"));
        command
            .args([
                "agent",
                "--url",
                &server.url,
                "--registration-token",
                &token,
            ])
            .arg("--state-dir")
            .arg(agent_dir.path())
            .env_remove("CATTLE_ACCESS_KEY")
            .env_remove("CATTLE_SECRET_KEY")
            .env_remove("CATTLE_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let agent = DroverProcess::spawn(command);
        wait_change(&admin, "hosts", "an active host", |hosts| {
            hosts["data"]
                .as_array()
                .is_some_and(|data| data.iter().any(|host| host["state"] == "active"))
        })
        .await;
        Harness {
            _server: server,
            admin,
            agent: Some(agent),
            agent_dir,
        }
    }

    /// The service's live containers, by slot, once `done` holds for them.
    async fn containers(
        &self,
        service: &str,
        what: &str,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let path = format!("containers?serviceId={service}&state_ne=removed");
        let sorted = |list: &Value| {
            let mut all: Vec<Value> = list["data"].as_array().cloned().unwrap_or_default();
            all.sort_by_key(|c| c["serviceIndex"].as_i64());
            all
        };
        let list = wait_change(&self.admin, &path, what, |list| done(&sorted(list))).await;
        sorted(&list)
    }
}

impl Drop for Harness {
    /// Kills the agent, then every process it started (they carry its driver key in
    /// `DROVER_INSTANCE` and lead their own process groups): a test leaves nothing running.
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.child_mut().start_kill();
        }
        let Ok(key) = std::fs::read_to_string(self.agent_dir.path().join("driver-key")) else {
            return;
        };
        let wanted = format!("DROVER_INSTANCE={}/", key.trim());
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
                continue;
            };
            if !environ
                .split(|byte| *byte == 0)
                .any(|var| var.starts_with(wanted.as_bytes()))
            {
                continue;
            }
            // Each instance leads its own process group: end the group with its leader.
            let group = std::fs::read_to_string(entry.path().join("stat"))
                .ok()
                .and_then(|stat| {
                    stat.rsplit(')')
                        .next()?
                        .split_whitespace()
                        .nth(2)?
                        .parse::<i32>()
                        .ok()
                });
            if group == Some(pid) {
                let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
            }
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

fn all_running(containers: &[Value], count: usize) -> bool {
    containers.len() == count
        && containers
            .iter()
            .all(|c| c["state"] == "running" && c["transitioning"] == "no")
}

fn pid_of(container: &Value) -> i32 {
    container["externalId"]
        .as_str()
        .and_then(|id| id.strip_prefix("pid:"))
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {container:#}"))
}

fn pid_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

#[tokio::test]
async fn a_killed_container_process_of_a_service_is_started_again() {
    let harness = Harness::start(&[]).await;
    let service = harness
        .admin
        .post(
            "services",
            &json!({"name": "sleepers", "scale": 2, "launchConfig": {"command": ["sleep", "600"]}}),
        )
        .await
        .unwrap();
    let id = service["id"].as_str().unwrap().to_owned();
    let before = harness
        .containers(&id, "2 running", |all| all_running(all, 2))
        .await;
    let victim = before[0]["id"].as_str().unwrap().to_owned();
    let pid = pid_of(&before[0]);
    assert!(pid_alive(pid));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The agent reports the death, the container stops, and the server starts it again: a
    // second start of the same container, running a new process.
    poll(
        &harness.admin,
        &format!(
            "processinstances?resourceType=container&resourceId={victim}&processName=instance.start"
        ),
        "a second start",
        |list| list["data"].as_array().is_some_and(|d| d.len() == 2),
    )
    .await;
    let after = harness
        .containers(&id, "2 running again", |all| {
            all_running(all, 2) && all[0]["externalId"] != before[0]["externalId"]
        })
        .await;
    assert_eq!(after[0]["id"], victim.as_str());
    assert_eq!(
        after[1]["id"], before[1]["id"],
        "the other one was left alone"
    );
    assert!(!pid_alive(pid));
    assert!(pid_alive(pid_of(&after[0])));
    let service = wait_change(
        &harness.admin,
        &format!("services/{id}"),
        "back at scale",
        |s| s["currentScale"] == 2 && s["reconcileMessage"].is_null(),
    )
    .await;
    assert_eq!(service["consecutiveRestarts"], 1, "{service:#}");
}

#[tokio::test]
async fn a_crashing_command_is_restarted_with_a_growing_backoff() {
    let (initial, max) = (400i64, 1600i64);
    let harness = Harness::start(&[
        ("service.restart.backoff.initial.millis", "400"),
        ("service.restart.backoff.max.millis", "1600"),
    ])
    .await;
    let service = harness
        .admin
        .post(
            "services",
            &json!({"name": "crasher", "scale": 1, "launchConfig": {"command": ["sh", "-c", "exit 3"]}}),
        )
        .await
        .unwrap();
    let id = service["id"].as_str().unwrap().to_owned();
    // The service shows it is waiting out a backoff after a few restarts in a row.
    let waiting = wait_change(
        &harness.admin,
        &format!("services/{id}"),
        "a backoff after 4 restarts",
        |s| s["consecutiveRestarts"].as_i64() >= Some(4) && s["nextRetryAt"].is_string(),
    )
    .await;
    assert!(
        waiting["reconcileMessage"]
            .as_str()
            .is_some_and(|m| m.contains("backoff")),
        "{waiting:#}"
    );
    assert_eq!(waiting["currentScale"], 0);
    let containers = harness
        .containers(&id, "the one container", |all| all.len() == 1)
        .await;
    let container = &containers[0];
    // Each restart is a process of the container that says which restart in a row it is and
    // when it was decided: never sooner after the one before than the backoff allows.
    let starts = harness
        .admin
        .get(&format!(
            "processinstances?resourceType=container&resourceId={}&processName=instance.start&limit=1000",
            container["id"].as_str().unwrap()
        ))
        .await
        .unwrap();
    let mut restarts: Vec<(i64, i64)> = starts["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["data"]["reason"] == "restart")
        .map(|p| {
            (
                p["data"]["consecutiveRestarts"].as_i64().unwrap(),
                p["data"]["restartAtTS"].as_i64().unwrap(),
            )
        })
        .collect();
    restarts.sort_unstable();
    assert!(restarts.len() >= 4, "{restarts:?}");
    for (n, window) in restarts.windows(2).enumerate() {
        let ((k0, t0), (k1, t1)) = (window[0], window[1]);
        assert_eq!((k0, k1), (n as i64 + 1, n as i64 + 2), "{restarts:?}");
        let backoff = (initial << (k0 - 1)).min(max);
        assert!(
            t1 - t0 >= backoff,
            "restart {k1} came {} ms after restart {k0}, before its backoff of {backoff} ms: {restarts:?}",
            t1 - t0
        );
    }
}
