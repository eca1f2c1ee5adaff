//! The host agent end to end: the real server (in this process) and the real `drover agent`
//! binary as a child process, running real local processes; and `drover up` (server and agent
//! in one child process).

use std::os::unix::process::ExitStatusExt;
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
    fn start_agent(&self, fault: Option<&str>) -> AgentProcess {
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
        AgentProcess {
            process: DroverProcess::spawn(command),
            dir: self.agent_dir(),
        }
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

/// The agent child and its state directory.
struct AgentProcess {
    process: DroverProcess,
    dir: PathBuf,
}

impl Drop for AgentProcess {
    /// Kills the agent, then every process it started (they carry its driver key in
    /// `DROVER_INSTANCE`), by pid and by the process group each leads: instances outlive
    /// their agent by design, and a test leaves nothing running, passed or failed.
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let _ = self.process.child_mut().start_kill();
        let Ok(key) = std::fs::read_to_string(self.dir.join("driver-key")) else {
            return;
        };
        let wanted = format!("DROVER_INSTANCE={}/", key.trim());
        for (pid, pgid) in processes_with(|entry| entry.starts_with(wanted.as_bytes())) {
            if pgid == pid {
                let _ = kill(Pid::from_raw(-pgid), Signal::SIGKILL);
            }
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
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
        event["data"]["exitCode"], 137,
        "killed by a signal (128 + SIGKILL): {events:#}"
    );
    assert_eq!(
        event["data"]["agentMessage"], "killed by signal 9 (SIGKILL)",
        "{events:#}"
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

/// The `instance.start` processes of a container.
async fn start_processes(harness: &Harness, container: &str) -> Vec<Value> {
    harness
        .admin
        .get(&format!(
            "processinstances?processName=instance.start&resourceId={container}"
        ))
        .await
        .unwrap()["data"]
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn a_command_that_does_not_exist_fails_at_once_with_the_agents_message() {
    // Backoff as by default: a retry would wait at least 2 s.
    let harness = Harness::start_with(&[("process.retry_max_wait.millis", "120000")]).await;
    let _agent = harness.start_agent(None);
    harness.wait_agent_active().await;
    let created = harness
        .admin
        .post(
            "containers",
            &json!({"name": "typo", "command": ["/nonexistent/drover-no-such-program", "x"]}),
        )
        .await
        .unwrap();
    let began = std::time::Instant::now();
    let id = created["id"].as_str().unwrap();
    let path = format!("containers/{id}");
    let failed =
        drover_test_support::wait_change(&harness.admin, &path, "error", |r| r["state"] == "error")
            .await;
    let took = began.elapsed();
    assert!(took < Duration::from_millis(1500), "failed after {took:?}");
    let message = failed["transitioningMessage"].as_str().unwrap();
    assert!(
        message.contains("failed permanently")
            && message.contains("/nonexistent/drover-no-such-program")
            && message.contains("No such file"),
        "{message}"
    );
    let processes = start_processes(&harness, id).await;
    assert_eq!(processes.len(), 1, "{processes:#?}");
    assert_eq!(processes[0]["result"], "FAILURE", "{processes:#?}");
    assert_eq!(processes[0]["executionCount"], 1, "{processes:#?}");
}

#[tokio::test]
async fn a_command_that_exits_by_itself_is_started_once_and_ends_stopped() {
    let harness = Harness::start().await;
    // The agent checks whether the process runs only after it has ended, as it would when
    // the machine is busy: a start, not a failed one.
    let _agent = harness.start_agent(Some("pause-before-recheck"));
    harness.wait_agent_active().await;
    let work = tempfile::tempdir().unwrap();
    let created = harness
        .admin
        .post(
            "containers",
            &json!({"name": "brief", "command": ["sh", "-c", "echo ran >> runs.log; exit 3"],
                    "workingDir": work.path().display().to_string()}),
        )
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap();
    let path = format!("containers/{id}");
    let stopped = wait_state(&harness.admin, &path, "stopped").await;
    // The start's reply said it had ended, with its code.
    assert_eq!(stopped["exitCode"], 3, "{stopped:#}");
    assert_eq!(stopped["agentState"], "stopped", "{stopped:#}");
    // Its start succeeded at the first attempt: nothing will start it again.
    let processes = start_processes(&harness, id).await;
    assert_eq!(processes.len(), 1, "{processes:#?}");
    assert_eq!(processes[0]["result"], "SUCCESS", "{processes:#?}");
    assert_eq!(processes[0]["executionCount"], 1, "{processes:#?}");
    let runs = std::fs::read_to_string(work.path().join("runs.log")).unwrap();
    assert_eq!(runs.lines().count(), 1, "it ran once: {runs:?}");
    // Its end is on record with its exit code (the agent's report, or the ping's).
    wait_for("a die event with exit code 3", || async {
        let events = harness
            .admin
            .get(&format!(
                "containerevents?externalId={id}&externalStatus=die"
            ))
            .await
            .unwrap();
        events["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|event| event["data"]["exitCode"] == 3)
            .then_some(())
    })
    .await;
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
    // The agent exits at its fault point; what it started stays for the restarted agent.
    let status = agent.process.exited(Duration::from_secs(30)).await;
    std::mem::forget(agent);
    assert_eq!(status.signal(), Some(9), "killed: {status:?}");
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

/// A marker for one test's processes (in their environment), unique on the machine.
fn unique_marker(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

/// Live (non-zombie) processes on the host with an environment entry that `matches`, with
/// their process groups.
fn processes_with(matches: impl Fn(&[u8]) -> bool) -> Vec<(i32, i32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if !environ.split(|b| *b == 0).any(&matches) || !pid_alive(pid) {
            continue;
        }
        let pgid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit(')')
                    .next()?
                    .split_whitespace()
                    .nth(2)?
                    .parse()
                    .ok()
            })
            .unwrap_or(pid);
        out.push((pid, pgid));
    }
    out.sort_unstable();
    out
}

/// Live processes whose environment holds `TEST_MARK=<marker>`, with their process groups.
fn marked_processes(marker: &str) -> Vec<(i32, i32)> {
    let wanted = format!("TEST_MARK={marker}");
    processes_with(|entry| entry == wanted.as_bytes())
}

fn marked_pids(marker: &str) -> Vec<i32> {
    marked_processes(marker)
        .into_iter()
        .map(|(pid, _)| pid)
        .collect()
}

/// Kills, when the test ends (passed or failed), every process carrying the test's marker,
/// and the process group each leads.
struct Reaper(String);

impl Drop for Reaper {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        for (pid, pgid) in marked_processes(&self.0) {
            if pgid == pid {
                let _ = kill(Pid::from_raw(-pgid), Signal::SIGKILL);
            }
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

#[tokio::test]
async fn an_agent_killed_between_starting_and_recording_a_process_never_runs_it_twice() {
    let harness = Harness::start().await;
    let marker = unique_marker("once");
    let _reaper = Reaper(marker.clone());
    let mut agent = harness.start_agent(Some("crash-after-spawn"));
    harness.wait_agent_active().await;
    let created = harness
        .admin
        .post(
            "containers",
            &json!({"name": "exactly-once", "command": ["sleep", "600"],
                    "environment": {"TEST_MARK": marker}}),
        )
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let path = format!("containers/{id}");
    // The agent starts the process, then kills itself before it records it.
    let status = agent.process.exited(Duration::from_secs(30)).await;
    std::mem::forget(agent);
    assert_eq!(status.signal(), Some(9), "killed: {status:?}");
    // (A process shows its environment once its exec is through.)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while marked_pids(&marker).is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let orphan = marked_pids(&marker);
    assert_eq!(orphan.len(), 1, "the process was started: {orphan:?}");
    let instance_dir = harness.agent_dir().join("instances").join(&id);
    assert!(
        instance_dir.join("start.json").exists() && !instance_dir.join("pid").exists(),
        "killed after recording the intent, before recording the pid"
    );

    // Restarted without the fault, the agent finds the process instead of starting another.
    let _agent = harness.start_agent(None);
    let running = wait_state(&harness.admin, &path, "running").await;
    assert_eq!(
        marked_pids(&marker),
        orphan,
        "exactly one process of the container, the one started before the kill"
    );
    assert_eq!(running["externalId"], format!("pid:{}", orphan[0]));

    harness.admin.delete(&path).await.unwrap();
    wait_state(&harness.admin, &path, "removed").await;
    assert_eq!(
        marked_pids(&marker),
        Vec::<i32>::new(),
        "none left after remove"
    );
}

#[tokio::test]
async fn a_stop_ends_every_process_of_a_container_even_one_that_left_its_group() {
    let harness = Harness::start().await;
    let marker = unique_marker("group");
    let _reaper = Reaper(marker.clone());
    let _agent = harness.start_agent(None);
    harness.wait_agent_active().await;
    let created = harness
        .admin
        .post(
            "containers",
            &json!({"name": "escaper",
                    "command": ["sh", "-c", "setsid sleep 600 & exec sleep 600"],
                    "environment": {"TEST_MARK": marker}}),
        )
        .await
        .unwrap();
    let path = format!("containers/{}", created["id"].as_str().unwrap());
    wait_state(&harness.admin, &path, "running").await;
    // The background child is forked into the container's group and moves to its own once
    // its `setsid` runs: wait until both processes exist in two groups.
    let groups = || -> std::collections::BTreeSet<i32> {
        marked_processes(&marker)
            .into_iter()
            .map(|(_, pgid)| pgid)
            .collect()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while marked_processes(&marker).len() < 2 || groups().len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "one process should leave the container's group: {:?}",
            marked_processes(&marker)
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(groups().len(), 2, "one process left the container's group");
    harness
        .admin
        .post(&format!("{path}?action=stop"), &json!({}))
        .await
        .unwrap();
    wait_state(&harness.admin, &path, "stopped").await;
    assert_eq!(marked_processes(&marker), Vec::new(), "stop ends them all");
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

#[tokio::test]
async fn an_agent_and_the_cli_given_several_urls_skip_a_dead_server() {
    let mut harness = Harness::start().await;
    let dead = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let live = harness.url.clone();
    // `--url dead,live`: registration, subscription and replies all go to the live server.
    harness.url = format!("{dead},{live}");
    let _agent = harness.start_agent(None);
    harness.wait_agent_active().await;
    let identity: Value =
        serde_json::from_str(&read_when_there(&harness.agent_dir().join("identity.json")).await)
            .unwrap();
    assert_eq!(identity["url"], harness.url);
    let created = harness
        .admin
        .post(
            "containers",
            &json!({"name": "listed", "command": ["sleep", "600"]}),
        )
        .await
        .unwrap();
    let path = format!("containers/{}", created["id"].as_str().unwrap());
    wait_state(&harness.admin, &path, "running").await;

    // The CLI takes the same list, from CATTLE_URL and from --url.
    let urls = harness.url.clone();
    let output = tokio::task::spawn_blocking(move || {
        let by_env = Command::new(env!("CARGO_BIN_EXE_drover"))
            .args(["ps", "--json"])
            .env("CATTLE_URL", &urls)
            .env("CATTLE_ACCESS_KEY", ADMIN_ACCESS)
            .env("CATTLE_SECRET_KEY", ADMIN_SECRET)
            .output()
            .unwrap();
        let by_flag = Command::new(env!("CARGO_BIN_EXE_drover"))
            .args(["ps", "--json", "--url", &urls])
            .env_remove("CATTLE_URL")
            .env("CATTLE_ACCESS_KEY", ADMIN_ACCESS)
            .env("CATTLE_SECRET_KEY", ADMIN_SECRET)
            .output()
            .unwrap();
        [by_env, by_flag]
    })
    .await
    .unwrap();
    for output in output {
        assert!(output.status.success(), "{output:?}");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains("\"listed\""), "{stdout}");
    }
    harness.admin.delete(&path).await.unwrap();
    wait_state(&harness.admin, &path, "removed").await;
}

/// `drover up` as a child on a free port with its own data directory, up to the moment it says
/// it is ready; dropped, it is killed with every process its agent started.
struct Up {
    agent: AgentProcess,
    url: String,
    _dir: tempfile::TempDir,
}

impl Up {
    async fn start() -> Up {
        drover_test_support::init();
        let dir = tempfile::tempdir().unwrap();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_drover"));
        command
            .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .env("DROVER_ADMIN_ACCESS_KEY", ADMIN_ACCESS)
            .env("DROVER_ADMIN_SECRET_KEY", ADMIN_SECRET)
            .env_remove("CATTLE_ACCESS_KEY")
            .env_remove("CATTLE_SECRET_KEY")
            .env_remove("CATTLE_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut agent = AgentProcess {
            process: DroverProcess::spawn(command),
            dir: dir.path().join("agent"),
        };
        let stderr = agent.process.child_mut().stderr.take().unwrap();
        let (ready, said) = tokio::sync::oneshot::channel();
        // Reads stderr to its end, so the child never blocks on a full pipe.
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut ready = Some(ready);
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.strip_prefix("drover is up: server ")
                    && let Some(ready) = ready.take()
                {
                    let url = rest.split_whitespace().next().unwrap_or_default();
                    let _ = ready.send(url.trim_end_matches("/v1").to_owned());
                }
            }
        });
        let url = drover_test_support::within("`drover up` to say it is ready", said)
            .await
            .expect("`drover up` says it is ready before it exits");
        Up {
            agent,
            url,
            _dir: dir,
        }
    }
}

#[tokio::test]
async fn right_after_drover_up_says_it_is_ready_a_container_runs_at_its_first_try() {
    for round in 0..10 {
        let up = Up::start().await;
        let admin = Client::new(&up.url, ADMIN_ACCESS, ADMIN_SECRET).unwrap();
        // At once, as a user would after reading the line.
        let created = admin
            .post(
                "containers",
                &json!({"name": format!("at-once-{round}"), "command": ["sleep", "600"]}),
            )
            .await
            .unwrap();
        let id = created["id"].as_str().unwrap().to_owned();
        let running = wait_state(&admin, &format!("containers/{id}"), "running").await;
        assert!(running["hostId"].is_string(), "round {round}: {running:#}");
        // It was placed on its first claim: it never waited for a host.
        let processes = admin
            .get(&format!(
                "processinstances?resourceType=instance&resourceId={id}&processName=instance.start"
            ))
            .await
            .unwrap();
        let start = &processes["data"][0];
        assert_eq!(start["result"], "SUCCESS", "round {round}: {start:#}");
        assert_eq!(
            (
                start["waitCount"].as_i64(),
                start["executionCount"].as_i64()
            ),
            (Some(0), Some(1)),
            "round {round}: the create had to wait for the host: {start:#}"
        );
        drop(up.agent);
    }
}
