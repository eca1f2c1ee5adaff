//! How containers end and their logs, end to end: the real server (in this process, on SQLite
//! and on PostgreSQL), the real `drover agent` binary running real processes, the log socket
//! through the server, and the `drover logs` / `drover run --wait` commands of the real binary.

use std::path::Path;
use std::process::Stdio;

use drover_client::{Client, Error, LogLine, LogOptions, LogStream};
use drover_test_support::process::DroverProcess;
use drover_test_support::{
    ADMIN_ACCESS, ADMIN_SECRET, TestServer, wait_change, wait_for, wait_state,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SETTINGS: &[(&str, &str)] = &[
    ("agent.ping.interval.millis", "100"),
    ("agent.activate.ping.timeout.millis", "300"),
    ("eventing.timeout.millis", "1000"),
    ("process.retry_max_wait.millis", "300"),
    ("process.poll.millis", "50"),
];

/// A real server, and a `drover agent` child registered with it, whose health port serves
/// its `/metrics`.
struct Harness {
    server: TestServer,
    admin: Client,
    agent: Option<AgentProcess>,
    health_port: u16,
}

struct AgentProcess {
    process: DroverProcess,
    dir: tempfile::TempDir,
}

impl Drop for AgentProcess {
    /// Kills the agent, then every process it started (they carry its driver key).
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let _ = self.process.child_mut().start_kill();
        let Ok(key) = std::fs::read_to_string(self.dir.path().join("driver-key")) else {
            return;
        };
        let wanted = format!("DROVER_INSTANCE={}/", key.trim());
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in entries.flatten() {
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
            if environ
                .split(|byte| *byte == 0)
                .any(|var| var.starts_with(wanted.as_bytes()))
            {
                let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// The backends this machine can test: SQLite, and PostgreSQL when its URL is set.
async fn servers() -> Vec<TestServer> {
    let builder = TestServer::builder().settings(SETTINGS);
    let mut out = vec![builder.clone().start().await];
    if let Some(server) = builder.postgres().try_start().await {
        out.push(server);
    }
    out
}

impl Harness {
    async fn start(server: TestServer) -> Harness {
        let admin = server.admin.clone();
        let health_port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let mut harness = Harness {
            server,
            admin,
            agent: None,
            health_port,
        };
        harness.start_agent().await;
        harness
    }

    async fn start_agent(&mut self) {
        let token = self
            .admin
            .post("registrationtokens", &json!({}))
            .await
            .unwrap()["token"]
            .as_str()
            .unwrap()
            .to_owned();
        let dir = tempfile::tempdir().unwrap();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_drover"));
        command
            .args([
                "agent",
                "--url",
                &self.server.url,
                "--registration-token",
                &token,
            ])
            .arg("--state-dir")
            .arg(dir.path())
            .args(["--health-port", &self.health_port.to_string()])
            .env_remove("CATTLE_ACCESS_KEY")
            .env_remove("CATTLE_SECRET_KEY")
            .env_remove("CATTLE_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.agent = Some(AgentProcess {
            process: DroverProcess::spawn(command),
            dir,
        });
        wait_change(&self.admin, "hosts", "an active host", |hosts| {
            hosts["data"]
                .as_array()
                .is_some_and(|data| data.iter().any(|host| host["state"] == "active"))
        })
        .await;
    }

    /// A container running `script` under `sh -c` in `work`, once it runs.
    async fn run(&self, client: &Client, name: &str, script: &str, work: &Path) -> String {
        let created = client
            .post(
                "containers",
                &json!({"name": name, "command": ["sh", "-c", script],
                        "workingDir": work.display().to_string()}),
            )
            .await
            .unwrap();
        created["id"].as_str().unwrap().to_owned()
    }

    /// A value of the agent's `/metrics` (its health port).
    async fn agent_metric(&self, name: &str) -> Option<u64> {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.health_port))
            .await
            .ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n")
            .await
            .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await.ok()?;
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .and_then(|value| value.trim().parse().ok())
    }
}

/// Every line of a log stream until it ends; the close reason.
async fn read_all(mut stream: LogStream) -> (Vec<LogLine>, String) {
    let mut lines = Vec::new();
    loop {
        match stream.next_line().await {
            Ok(Some(line)) => lines.push(line),
            Ok(None) => return (lines, stream.end_reason().unwrap_or_default().to_owned()),
            Err(error) => panic!("the log stream failed: {error} after {lines:?}"),
        }
    }
}

fn out(line: &str) -> LogLine {
    LogLine::Stdout(line.to_owned())
}

fn err(line: &str) -> LogLine {
    LogLine::Stderr(line.to_owned())
}

#[tokio::test]
async fn a_command_that_exits_ends_stopped_with_its_exit_code_and_a_start_clears_it() {
    for server in servers().await {
        let backend = server.backend;
        let harness = Harness::start(server).await;
        let work = tempfile::tempdir().unwrap();
        // Exits 3 at once; runs on once the file `stay` exists.
        let id = harness
            .run(
                &harness.admin,
                "brief",
                "[ -f stay ] && exec sleep 600; echo hi; exit 3",
                work.path(),
            )
            .await;
        let path = format!("containers/{id}");
        let ended = wait_change(&harness.admin, &path, "stopped with an exit code", |c| {
            c["state"] == "stopped" && c["transitioning"] == "no" && !c["exitCode"].is_null()
        })
        .await;
        assert_eq!(ended["exitCode"], 3, "{backend:?}: {ended:#}");
        assert_eq!(ended["agentState"], "stopped", "{backend:?}: {ended:#}");
        assert_eq!(
            ended["agentMessage"], "exited with code 3",
            "{backend:?}: {ended:#}"
        );
        let finished = ended["finishedAt"].as_str().unwrap_or_default();
        assert!(
            chrono::DateTime::parse_from_rfc3339(finished).is_ok() && finished.ends_with('Z'),
            "{backend:?}: {ended:#}"
        );
        // The schema declares the fields.
        let schema = harness.admin.get("schemas/container").await.unwrap();
        for (field, kind) in [
            ("exitCode", "int"),
            ("finishedAt", "date"),
            ("agentMessage", "string"),
            ("agentState", "string"),
        ] {
            assert_eq!(schema["resourceFields"][field]["type"], kind, "{field}");
        }
        // Started again, it runs: how it ended before is cleared.
        std::fs::write(work.path().join("stay"), "").unwrap();
        harness
            .admin
            .post(&format!("{path}?action=start"), &json!({}))
            .await
            .unwrap();
        let running = wait_state(&harness.admin, &path, "running").await;
        assert_eq!(running["agentState"], "running", "{backend:?}: {running:#}");
        assert!(running["exitCode"].is_null(), "{backend:?}: {running:#}");
        assert!(running["finishedAt"].is_null(), "{backend:?}: {running:#}");
        // Stopped by drover: its end says so.
        harness
            .admin
            .post(&format!("{path}?action=stop"), &json!({}))
            .await
            .unwrap();
        let stopped = wait_state(&harness.admin, &path, "stopped").await;
        assert_eq!(stopped["agentState"], "stopped", "{backend:?}: {stopped:#}");
        assert_eq!(
            stopped["exitCode"], 143,
            "SIGTERM: {backend:?}: {stopped:#}"
        );
        assert_eq!(
            stopped["agentMessage"], "stopped by the agent: killed by signal 15 (SIGTERM)",
            "{backend:?}: {stopped:#}"
        );
    }
}

#[tokio::test]
async fn logs_stream_through_the_server_with_tail_and_follow_and_tokens_guard_them() {
    for server in servers().await {
        let backend = server.backend;
        let harness = Harness::start(server).await;
        let work = tempfile::tempdir().unwrap();
        let id = harness
            .run(
                &harness.admin,
                "chatty",
                "for i in 1 2 3 4 5; do echo out$i; done; echo err1 >&2; echo err2 >&2; \
                 while [ ! -f more ]; do sleep 0.05; done; echo late; echo late-err >&2; exec sleep 600",
                work.path(),
            )
            .await;
        let path = format!("containers/{id}");
        let running = wait_state(&harness.admin, &path, "running").await;
        assert!(running["actions"]["logs"].is_string(), "{running:#}");

        // Without follow: the last lines of stdout, then of stderr, then "end of log".
        let tail = LogOptions {
            follow: false,
            lines: 2,
        };
        let (lines, end) = wait_for("the whole tail", || async {
            let stream = harness.admin.logs(&path, tail).await.unwrap();
            let (lines, end) = read_all(stream).await;
            (lines.len() == 4).then_some((lines, end))
        })
        .await;
        assert_eq!(
            lines,
            [out("out4"), out("out5"), err("err1"), err("err2")],
            "{backend:?}"
        );
        assert_eq!(end, "end of log", "{backend:?}");

        // The action's answer, as a generic client (Rancher's UI) uses it.
        let access = harness
            .admin
            .post(
                &format!("{path}?action=logs"),
                &json!({"follow": false, "lines": 1}),
            )
            .await
            .unwrap();
        assert_eq!(access["type"], "hostAccess");
        let url = access["url"].as_str().unwrap();
        assert!(
            url.starts_with("ws://") && url.ends_with("/v1/logs/"),
            "{access}"
        );
        let (lines, _) = read_all(
            LogStream::connect(url, access["token"].as_str().unwrap())
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(lines, [out("out5"), err("err2")], "{backend:?}");
        let v2 = harness
            .admin
            .post(
                &format!("{}/v2-beta/containers/{id}?action=logs", harness.server.url),
                &json!({}),
            )
            .await
            .unwrap();
        assert!(
            v2["url"].as_str().unwrap().ends_with("/v2-beta/logs/"),
            "{v2}"
        );
        // Behind a TLS proxy the socket is wss.
        let proxied = reqwest::Client::new()
            .post(format!(
                "{}/v1/containers/{id}?action=logs",
                harness.server.url
            ))
            .basic_auth(ADMIN_ACCESS, Some(ADMIN_SECRET))
            .header("X-Forwarded-Proto", "https")
            .send()
            .await
            .unwrap();
        assert_eq!(proxied.status().as_u16(), 200);
        let proxied: Value = proxied.json().await.unwrap();
        assert!(
            proxied["url"].as_str().unwrap().starts_with("wss://"),
            "{proxied}"
        );

        // Bad input: 422, and nothing is issued.
        for body in [
            json!({"lines": -1}),
            json!({"lines": 10_001}),
            json!({"follow": "yes"}),
        ] {
            match harness
                .admin
                .post(&format!("{path}?action=logs"), &body)
                .await
            {
                Err(Error::Api { status: 422, .. }) => {}
                other => panic!("{body}: {other:?}"),
            }
        }

        // Follow: the tail, then what is written after connecting.
        let follow = LogOptions {
            follow: true,
            lines: 1,
        };
        let mut stream = harness.admin.logs(&path, follow).await.unwrap();
        assert_eq!(stream.next_line().await.unwrap(), Some(out("out5")));
        assert_eq!(stream.next_line().await.unwrap(), Some(err("err2")));
        wait_for("the agent's follower", || async {
            (harness.agent_metric("drover_agent_log_followers").await == Some(1)).then_some(())
        })
        .await;
        std::fs::write(work.path().join("more"), "").unwrap();
        assert_eq!(stream.next_line().await.unwrap(), Some(out("late")));
        assert_eq!(stream.next_line().await.unwrap(), Some(err("late-err")));
        // The viewer leaves: the follower on the agent stops.
        stream.close().await.unwrap();
        wait_for("no follower left on the agent", || async {
            (harness.agent_metric("drover_agent_log_followers").await == Some(0)).then_some(())
        })
        .await;

        // Tokens: a bad one and a forged one are refused before the upgrade, so is an expired
        // one signed with the cluster's own key.
        let socket = format!(
            "ws://{}/v1/logs/",
            harness.server.url.trim_start_matches("http://")
        );
        let state = &harness.server.server.state;
        let secret = state
            .store
            .shared_secret("logs.token.secret")
            .await
            .unwrap();
        let tokens = drover_server::logs::LogTokens::with_key(secret.as_bytes());
        let grant = drover_server::logs::Grant {
            container: id[2..].parse().unwrap(),
            project: state.default_project.id,
            account: 1,
            follow: false,
            lines: 5,
            expires: chrono::Utc::now().timestamp_millis() - 1,
            nonce: "test".into(),
        };
        let expired = tokens.issue(&grant);
        let forged = drover_server::logs::LogTokens::with_key(b"not the key").issue(&grant);
        for (what, token) in [
            ("garbage", "nonsense".to_owned()),
            ("forged", forged),
            ("expired", expired),
            ("empty", String::new()),
        ] {
            match LogStream::connect(&socket, &token).await {
                Err(Error::Refused { status: 401, body }) => {
                    assert!(body.contains("Token"), "{what}: {body}");
                }
                other => panic!("{what}: {other:?}"),
            }
        }
        // Another project's key does not see the container.
        let (project_b, key_b) = harness.server.project("logs-b").await;
        match key_b
            .post(&format!("containers/{id}?action=logs"), &json!({}))
            .await
        {
            Err(Error::Api { status: 404, .. }) => {}
            other => panic!("{other:?}"),
        }
        // A container that never reached a host has no log: 409.
        let unplaced = key_b
            .post(
                "containers",
                &json!({"name": "nowhere", "command": ["true"]}),
            )
            .await
            .unwrap();
        match key_b
            .post(
                &format!(
                    "containers/{}?action=logs",
                    unplaced["id"].as_str().unwrap()
                ),
                &json!({}),
            )
            .await
        {
            Err(Error::Api {
                status: 409,
                message,
                ..
            }) => {
                assert!(message.contains("no host"), "{message}");
            }
            other => panic!("{project_b}: {other:?}"),
        }
        // The agent gone: 503, and a token issued before no longer connects.
        let early = harness
            .admin
            .post(&format!("{path}?action=logs"), &json!({}))
            .await
            .unwrap();
        drop(harness.agent);
        wait_for("503 without the agent", || async {
            match harness
                .admin
                .post(&format!("{path}?action=logs"), &json!({}))
                .await
            {
                Err(Error::Api { status: 503, .. }) => Some(()),
                _ => None,
            }
        })
        .await;
        match LogStream::connect(
            early["url"].as_str().unwrap(),
            early["token"].as_str().unwrap(),
        )
        .await
        {
            Err(Error::Refused { status: 503, .. }) => {}
            other => panic!("{other:?}"),
        }
    }
}

/// `drover <args>` with the admin key against `url`: its exit status, stdout and stderr.
async fn drover(url: &str, args: &[&str]) -> (i32, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(args)
        .env("CATTLE_URL", url)
        .env("CATTLE_ACCESS_KEY", ADMIN_ACCESS)
        .env("CATTLE_SECRET_KEY", ADMIN_SECRET)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn drover_logs_and_run_wait_exit_as_the_container_did() {
    let server = TestServer::builder().settings(SETTINGS).start().await;
    let harness = Harness::start(server).await;
    let url = harness.server.url.clone();
    let work = tempfile::tempdir().unwrap();
    let workdir = work.path().display().to_string();

    // A command that exits 3: --wait=exited fails and says with which code.
    let (status, stdout, stderr) = drover(
        &url,
        &[
            "run",
            "--name",
            "fails",
            "-w",
            &workdir,
            "--wait=exited",
            "--",
            "sh",
            "-c",
            "echo to-out; echo to-err >&2; exit 3",
        ],
    )
    .await;
    assert_ne!(status, 0, "{stdout}\n{stderr}");
    assert!(stderr.contains("exited with code 3"), "{stderr}");
    // One that exits 0 succeeds; one that runs on succeeds with plain --wait.
    let (status, _, stderr) =
        drover(&url, &["run", "--wait=exited", "--", "sh", "-c", "exit 0"]).await;
    assert_eq!(status, 0, "{stderr}");
    let (status, stdout, stderr) = drover(
        &url,
        &["run", "--name", "stays", "--wait", "--", "sleep", "600"],
    )
    .await;
    assert_eq!(status, 0, "{stderr}");
    assert!(stdout.trim().starts_with("1i"), "{stdout}");
    // A command that cannot run fails.
    let (status, _, stderr) = drover(
        &url,
        &["run", "--wait", "--", "/nonexistent/drover-no-such"],
    )
    .await;
    assert_ne!(status, 0, "{stderr}");
    assert!(stderr.contains("failed"), "{stderr}");

    // drover logs: stdout lines to stdout, stderr lines to stderr.
    let (status, stdout, stderr) = drover(&url, &["logs", "--tail", "5", "fails"]).await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(stdout, "to-out\n");
    assert_eq!(stderr, "to-err\n");
    let (status, stdout, _) = drover(&url, &["logs", "--tail", "0", "fails"]).await;
    assert_eq!((status, stdout.as_str()), (0, ""));
    let (status, _, stderr) = drover(&url, &["logs", "no-such-container"]).await;
    assert_ne!(status, 0, "{stderr}");
    let (status, _, stderr) = drover(&url, &["logs", "--tail", "10001", "fails"]).await;
    assert_ne!(status, 0, "{stderr}");

    // Following, until the container is removed: its log ends normally.
    let mut follower = tokio::process::Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["logs", "-f", "stays"])
        .env("CATTLE_URL", &url)
        .env("CATTLE_ACCESS_KEY", ADMIN_ACCESS)
        .env("CATTLE_SECRET_KEY", ADMIN_SECRET)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for("the follower on the agent", || async {
        (harness.agent_metric("drover_agent_log_followers").await == Some(1)).then_some(())
    })
    .await;
    let (status, _, stderr) = drover(&url, &["rm", "--wait", "stays"]).await;
    assert_eq!(status, 0, "{stderr}");
    let status = tokio::time::timeout(std::time::Duration::from_secs(30), follower.wait())
        .await
        .expect("drover logs -f ends when the container is removed")
        .unwrap();
    let mut stderr = String::new();
    follower
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("container removed"), "{stderr}");
}
