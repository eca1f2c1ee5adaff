//! The host agent end to end: the real server (in this process) and the real `drover agent`
//! binary as a child process, running real local processes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use drover_client::{Client, Error, Subscribe};
use drover_test_support::process::DroverProcess;
use drover_test_support::{ADMIN_ACCESS, ADMIN_SECRET, TestServer, wait_for, wait_state};
use serde_json::{Value, json};

/// A real server with quick pings and retries, a registration token, and a state directory
/// for `drover agent`.
struct Harness {
    server: TestServer,
    admin: drover_client::Client,
    url: String,
    agent_dir: tempfile::TempDir,
    token: String,
}

impl Harness {
    async fn start() -> Harness {
        Harness::start_with(&[]).await
    }

    /// With `overrides` in place of the defaults of the same name.
    async fn start_with(overrides: &[(&str, &str)]) -> Harness {
        let mut settings = vec![
            ("agent.ping.interval.millis", "100"),
            ("agent.activate.ping.timeout.millis", "300"),
            ("eventing.timeout.millis", "1000"),
            ("process.retry_max_wait.millis", "300"),
            ("process.poll.millis", "50"),
        ];
        settings.retain(|(name, _)| overrides.iter().all(|(other, _)| other != name));
        settings.extend_from_slice(overrides);
        let server = TestServer::start_with(&settings).await;
        let token = server
            .admin
            .post("registrationtokens", &json!({}))
            .await
            .unwrap()["token"]
            .as_str()
            .unwrap()
            .to_owned();
        Harness {
            admin: server.admin.clone(),
            url: server.url.clone(),
            server,
            agent_dir: tempfile::tempdir().unwrap(),
            token,
        }
    }

    fn agent_dir(&self) -> PathBuf {
        self.agent_dir.path().to_owned()
    }

    /// Starts `drover agent` with the registration token; `fault` sets DROVER_AGENT_FAULT.
    fn start_agent(&self, fault: Option<&str>) -> DroverProcess {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_drover"));
        command
            .args([
                "agent",
                "--url",
                &self.url,
                "--registration-token",
                &self.token,
                "--state-dir",
            ])
            .arg(self.agent_dir())
            .env_remove("CATTLE_ACCESS_KEY")
            .env_remove("CATTLE_SECRET_KEY")
            .env_remove("CATTLE_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(fault) = fault {
            command.env("DROVER_AGENT_FAULT", fault);
        }
        DroverProcess::spawn(command)
    }

    async fn wait_agent_active(&self) {
        drover_test_support::wait_change(&self.admin, "agents", "an active agent", |agents| {
            agents["data"]
                .as_array()
                .is_some_and(|data| data.iter().any(|agent| agent["state"] == "active"))
        })
        .await;
        drover_test_support::wait_change(&self.admin, "hosts", "an active host", |hosts| {
            hosts["data"]
                .as_array()
                .is_some_and(|data| data.iter().any(|host| host["state"] == "active"))
        })
        .await;
    }
}

/// Waits until a file exists and returns its text.
async fn read_when_there(path: &Path) -> String {
    wait_for(&format!("{} to appear", path.display()), || async {
        std::fs::read_to_string(path)
            .ok()
            .filter(|text| !text.is_empty())
    })
    .await
}

fn pid_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            !stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn a_container_runs_as_a_real_process_and_stop_and_remove_clean_up() {
    let harness = Harness::start().await;
    let _agent = harness.start_agent(None);
    harness.wait_agent_active().await;
    let work = tempfile::tempdir().unwrap();
    let created = harness
        .admin
        .post(
            "containers",
            &json!({
                "name": "real",
                "command": ["sh", "-c", "echo $$ > pid.out; echo \"$GREETING\" > env.out; exec sleep 600"],
                "environment": {"GREETING": "hello from drover"},
                "workingDir": work.path().display().to_string(),
            }),
        )
        .await
        .unwrap();
    let path = format!("containers/{}", created["id"].as_str().unwrap());
    let running = wait_state(&harness.admin, &path, "running").await;
    assert!(
        running["externalId"].as_str().unwrap().starts_with("pid:"),
        "{running:#}"
    );
    let pid: i32 = read_when_there(&work.path().join("pid.out"))
        .await
        .trim()
        .parse()
        .unwrap();
    assert!(pid_alive(pid));
    assert_eq!(
        read_when_there(&work.path().join("env.out")).await.trim(),
        "hello from drover"
    );
    let logs = harness
        .agent_dir()
        .join("instances")
        .join(created["id"].as_str().unwrap());
    assert!(logs.join("stdout.log").exists());

    harness
        .admin
        .post(&format!("{path}?action=stop"), &json!({}))
        .await
        .unwrap();
    wait_state(&harness.admin, &path, "stopped").await;
    assert!(!pid_alive(pid), "stop ends the process");
    harness.admin.delete(&path).await.unwrap();
    wait_state(&harness.admin, &path, "removed").await;
    assert!(!logs.exists(), "remove cleans up the instance's files");

    // A volume is a directory.
    let volume = harness
        .admin
        .post("volumes", &json!({"name": "data"}))
        .await
        .unwrap();
    let volume_path = format!("volumes/{}", volume["id"].as_str().unwrap());
    let active = wait_state(&harness.admin, &volume_path, "active").await;
    let dir = PathBuf::from(active["path"].as_str().unwrap());
    assert!(dir.is_dir());
    harness.admin.delete(&volume_path).await.unwrap();
    wait_state(&harness.admin, &volume_path, "removed").await;
    assert!(!dir.exists());
    drop(harness.server);
}

#[tokio::test]
async fn a_killed_process_is_noticed_and_its_container_stops() {
    // The ping monitor's first round is 10 minutes away: only the agent's container event can
    // tell the server. (Lengthened mid-test, a round already due could still see the death
    // first.)
    let harness = Harness::start_with(&[("agent.ping.interval.millis", "600000")]).await;
    let _agent = harness.start_agent(None);
    harness.wait_agent_active().await;
    let work = tempfile::tempdir().unwrap();
    let created = harness
        .admin
        .post(
            "containers",
            &json!({"name": "victim", "command": ["sh", "-c", "echo $$ > pid.out; exec sleep 600"],
                                    "workingDir": work.path().display().to_string()}),
        )
        .await
        .unwrap();
    let path = format!("containers/{}", created["id"].as_str().unwrap());
    wait_state(&harness.admin, &path, "running").await;
    let pid: i32 = read_when_there(&work.path().join("pid.out"))
        .await
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_state(&harness.admin, &path, "stopped").await;
    let events = harness
        .admin
        .get(&format!(
            "containerevents?externalId={}&externalStatus=die",
            created["id"].as_str().unwrap()
        ))
        .await
        .unwrap();
    let event = &events["data"][0];
    assert_eq!(event["externalFrom"], "drover-agent", "{events:#}");
    assert_eq!(
        event["data"]["exitCode"], -1,
        "killed by a signal: {events:#}"
    );
    assert_eq!(event["data"]["result"]["action"], "stopped", "{events:#}");

    // A stop by drover is not reported as a death.
    harness
        .admin
        .post(&format!("{path}?action=start"), &json!({}))
        .await
        .unwrap();
    wait_state(&harness.admin, &path, "running").await;
    harness
        .admin
        .post(&format!("{path}?action=stop"), &json!({}))
        .await
        .unwrap();
    wait_state(&harness.admin, &path, "stopped").await;
    harness
        .admin
        .post(&format!("{path}?action=start"), &json!({}))
        .await
        .unwrap();
    wait_state(&harness.admin, &path, "running").await;
    let all = harness.admin.get("containerevents").await.unwrap();
    assert_eq!(
        all["data"].as_array().unwrap().len(),
        1,
        "only the kill was reported: {all:#}"
    );
}

#[tokio::test]
async fn an_agent_killed_mid_process_finishes_it_after_restart_without_running_it_twice() {
    let harness = Harness::start().await;
    let mut agent = harness.start_agent(Some("exit-before-reply"));
    harness.wait_agent_active().await;
    let work = tempfile::tempdir().unwrap();
    let created = harness
        .admin
        .post("containers", &json!({"name": "once", "command": ["sh", "-c", "echo started >> runs.log; exec sleep 600"],
                                    "workingDir": work.path().display().to_string()}))
        .await
        .unwrap();
    let path = format!("containers/{}", created["id"].as_str().unwrap());
    // The agent starts the process, then dies before it can reply.
    read_when_there(&work.path().join("runs.log")).await;
    // The agent exits at its fault point.
    let status = agent.exited(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(137));
    assert_eq!(harness.admin.get(&path).await.unwrap()["state"], "starting");
    // Restarted, the same agent adopts the process and answers the resent request.
    let _agent = harness.start_agent(None);
    let running = wait_state(&harness.admin, &path, "running").await;
    assert!(running["externalId"].as_str().unwrap().starts_with("pid:"));
    let runs = std::fs::read_to_string(work.path().join("runs.log")).unwrap();
    assert_eq!(runs.lines().count(), 1, "the work ran once: {runs:?}");
    let agents = harness.admin.get("agents").await.unwrap();
    assert_eq!(
        agents["data"].as_array().unwrap().len(),
        1,
        "a restart is the same agent"
    );
    harness.admin.delete(&path).await.unwrap();
    wait_state(&harness.admin, &path, "removed").await;
}

#[tokio::test]
async fn a_create_agent_container_gets_keys_that_work_in_its_project_only() {
    let harness = Harness::start().await;
    let _agent = harness.start_agent(None);
    harness.wait_agent_active().await;
    let work = tempfile::tempdir().unwrap();
    let created = harness
        .admin
        .post(
            "containers",
            &json!({
                "name": "extension",
                "command": ["sh", "-c", "env > env.out; exec sleep 600"],
                "workingDir": work.path().display().to_string(),
                "labels": {"io.rancher.container.create_agent": "true", "io.rancher.container.agent.role": "environment"},
            }),
        )
        .await
        .unwrap();
    let path = format!("containers/{}", created["id"].as_str().unwrap());
    let running = wait_state(&harness.admin, &path, "running").await;
    assert!(
        running["environment"].get("CATTLE_SECRET_KEY").is_none(),
        "keys are never stored on the resource"
    );
    let env = read_when_there(&work.path().join("env.out")).await;
    let var = |name: &str| {
        env.lines()
            .find_map(|line| line.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} missing"))
            .to_owned()
    };
    let client = Client::new(
        &var("CATTLE_URL"),
        &var("CATTLE_ACCESS_KEY"),
        &var("CATTLE_SECRET_KEY"),
    )
    .unwrap();
    // It works for the API and for subscribing within its project ...
    let containers = client.get("containers").await.unwrap();
    assert!(
        containers["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == created["id"])
    );
    let mut stream = client
        .subscribe(Subscribe::names(["resource.change"]))
        .await
        .unwrap();
    assert_eq!(stream.next_event().await.unwrap().unwrap().name(), "ping");
    harness
        .admin
        .post(&format!("{path}?action=stop"), &json!({}))
        .await
        .unwrap();
    let change = loop {
        let event = tokio::time::timeout(Duration::from_secs(20), stream.next_non_ping())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if event.resource_id == created["id"].as_str().map(str::to_owned) {
            break event;
        }
    };
    assert_eq!(change.data.unwrap()["resource"]["type"], "container");
    // ... and nowhere else.
    let other = harness
        .admin
        .post("projects", &json!({"name": "other"}))
        .await
        .unwrap();
    let other_id = other["id"].as_str().unwrap();
    match client.get(&format!("projects/{other_id}/containers")).await {
        Err(Error::Api { status: 403, .. }) => {}
        other => panic!("expected a 403, got {other:?}"),
    }
    harness.admin.delete(&path).await.unwrap();
    wait_state(&harness.admin, &path, "removed").await;
}

#[tokio::test]
async fn an_agent_key_is_refused_another_projects_resources() {
    let harness = Harness::start().await;
    let _agent = harness.start_agent(None);
    harness.wait_agent_active().await;
    let identity: Value = serde_json::from_str(
        &std::fs::read_to_string(harness.agent_dir().join("identity.json")).unwrap(),
    )
    .unwrap();
    let agent_client = Client::new(
        &harness.url,
        identity["accessKey"].as_str().unwrap(),
        identity["secretKey"].as_str().unwrap(),
    )
    .unwrap();
    let other = harness
        .admin
        .post("projects", &json!({"name": "other"}))
        .await
        .unwrap();
    let other_id = other["id"].as_str().unwrap();
    let theirs = harness
        .admin
        .post(
            &format!("projects/{other_id}/containers"),
            &json!({"name": "theirs", "command": ["true"], "startOnCreate": false}),
        )
        .await
        .unwrap();
    match agent_client
        .get(&format!("projects/{other_id}/containers"))
        .await
    {
        Err(Error::Api { status: 403, .. }) => {}
        other => panic!("expected a 403, got {other:?}"),
    }
    match agent_client
        .get(&format!("containers/{}", theirs["id"].as_str().unwrap()))
        .await
    {
        Err(Error::Api { status: 404, .. }) => {}
        other => panic!("expected a 404, got {other:?}"),
    }
    match agent_client
        .subscribe(Subscribe::names(["resource.change"]).project(other_id.to_owned()))
        .await
    {
        Err(Error::Refused { status: 403, .. }) => {}
        other => panic!("expected a 403, got {other:?}"),
    }
}

#[tokio::test]
async fn drover_purge_runs_the_cleanup_now_and_prints_its_report() {
    let harness = Harness::start().await;
    let host = harness
        .admin
        .post("hosts", &json!({"name": "to-remove"}))
        .await
        .unwrap();
    let path = format!("hosts/{}", host["id"].as_str().unwrap());
    wait_state(&harness.admin, &path, "active").await;
    harness.admin.delete(&path).await.unwrap();
    wait_state(&harness.admin, &path, "removed").await;

    let run = |args: &'static [&'static str], secret: &'static str| {
        let url = harness.url.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_drover"))
                .args(args)
                .env("CATTLE_URL", url)
                .env("CATTLE_ACCESS_KEY", ADMIN_ACCESS)
                .env("CATTLE_SECRET_KEY", secret)
                .output()
                .unwrap()
        })
    };
    let output = run(&["purge", "--json"], ADMIN_SECRET).await.unwrap();
    assert!(output.status.success(), "{output:?}");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["type"], "cleanupReport");
    assert_eq!(report["purgesScheduled"], 1, "{report:#}");
    wait_state(&harness.admin, &path, "purged").await;

    let table = run(&["purge"], ADMIN_SECRET).await.unwrap();
    assert!(table.status.success(), "{table:?}");
    let stdout = String::from_utf8_lossy(&table.stdout);
    assert!(
        stdout.contains("TABLE") && stdout.contains("container_event") && stdout.contains("host"),
        "{stdout}"
    );
    let refused = run(&["purge"], "wrong-secret-wrong-secret-wrong-secret-00")
        .await
        .unwrap();
    assert!(!refused.status.success(), "a wrong key fails: {refused:?}");
}
