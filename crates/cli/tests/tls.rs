//! TLS end to end, with a self-signed certificate made here: the server serves HTTPS and WSS;
//! the client library lists and subscribes over them; the real `drover agent` binary
//! registers and runs a container over them with `--ca-cert`; the CLI with and without it;
//! a client that does not trust the certificate is refused with an error that says what to
//! do; bad certificate or key files stop `drover server` at start; `drover up` over TLS.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use drover_client::{Client, Error, Subscribe, Tls};
use drover_test_support::process::DroverProcess;
use drover_test_support::{ADMIN_ACCESS, ADMIN_SECRET, TestServer, wait_change, wait_state};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_drover");

/// A self-signed certificate for `localhost` and its key, as PEM text and as files.
struct Pki {
    cert_pem: String,
    key_pem: String,
    cert: PathBuf,
    key: PathBuf,
    dir: tempfile::TempDir,
}

fn make_pki() -> Pki {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let cert_pem = certified.cert.pem();
    let key_pem = certified.signing_key.serialize_pem();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, &key_pem).unwrap();
    Pki {
        cert_pem,
        key_pem,
        cert,
        key,
        dir,
    }
}

/// Runs a `drover` user command with the admin key against `url`; its exit status, stdout
/// and stderr.
async fn cli(url: &str, args: &[&str], ca_cert: Option<&Path>) -> (bool, String, String) {
    let mut command = tokio::process::Command::new(BIN);
    command
        .args(args)
        .env("CATTLE_URL", url)
        .env("CATTLE_ACCESS_KEY", ADMIN_ACCESS)
        .env("CATTLE_SECRET_KEY", ADMIN_SECRET)
        .env_remove("DROVER_CA_CERT")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(path) = ca_cert {
        command.arg("--ca-cert").arg(path);
    }
    let output = drover_test_support::within("a drover command", command.output())
        .await
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn over_tls_the_client_the_agent_binary_and_the_cli_work_and_an_untrusting_client_is_refused()
{
    let pki = make_pki();
    let server = TestServer::builder()
        .settings(&[
            ("agent.ping.interval.millis", "100"),
            ("eventing.timeout.millis", "1000"),
            ("process.retry_max_wait.millis", "300"),
            ("process.poll.millis", "50"),
        ])
        .tls(&pki.cert_pem, &pki.key_pem)
        .start()
        .await;
    let url = server.url.clone();
    assert!(url.starts_with("https://localhost:"), "{url}");
    let admin = server.admin.clone();

    // The client library over https: links in answers say https, the subscribe link wss.
    let root = admin.get("").await.unwrap();
    assert_eq!(
        root["links"]["subscribe"].as_str().unwrap(),
        format!("{}/v1/subscribe", url.replacen("https", "wss", 1)),
        "{root:#}"
    );
    let list = admin.get("containers").await.unwrap();
    assert!(
        list["links"]["self"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{url}/v1/")),
        "{list:#}"
    );

    // ... and subscribes over wss.
    let mut changes = admin
        .subscribe(Subscribe::names(["resource.change"]))
        .await
        .unwrap();
    let first = drover_test_support::within("the first frame", changes.next_event())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.name(), "ping", "the server greets over wss");

    // The real agent registers over https and subscribes over wss, trusting the certificate
    // through --ca-cert.
    let token = admin.post("registrationtokens", &json!({})).await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let agent_dir = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(BIN);
    command
        .args(["agent", "--url", &url, "--registration-token", &token])
        .arg("--ca-cert")
        .arg(&pki.cert)
        .arg("--state-dir")
        .arg(agent_dir.path())
        .env_remove("CATTLE_ACCESS_KEY")
        .env_remove("CATTLE_SECRET_KEY")
        .env_remove("CATTLE_URL")
        .env_remove("DROVER_CA_CERT")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut agent = DroverProcess::spawn(command);
    wait_change(&admin, "hosts", "an active host", |hosts| {
        hosts["data"]
            .as_array()
            .is_some_and(|data| data.iter().any(|host| host["state"] == "active"))
    })
    .await;
    let work = tempfile::tempdir().unwrap();
    let created = admin
        .post(
            "containers",
            &json!({
                "name": "over-tls",
                "command": ["sh", "-c", "echo ran > ran.out; echo hello-over-tls; exec sleep 120"],
                "workingDir": work.path().display().to_string(),
            }),
        )
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let path = format!("containers/{id}");
    wait_state(&admin, &path, "running").await;
    assert_eq!(
        std::fs::read_to_string(work.path().join("ran.out"))
            .unwrap()
            .trim(),
        "ran"
    );
    // The subscription over wss saw it, with https links.
    let change = drover_test_support::within("the container's resource.change", async {
        loop {
            let event = changes.next_non_ping().await.unwrap().unwrap();
            if event.resource_id.as_deref() == Some(id.as_str()) {
                return event;
            }
        }
    })
    .await;
    let link = change.data.as_ref().unwrap()["resource"]["links"]["self"]
        .as_str()
        .unwrap()
        .to_owned();
    // (Events link under the public URL, by default the listen address.)
    assert_eq!(
        link,
        format!("https://{}/v1/containers/{id}", server.server.addr)
    );

    // A client that does not trust the certificate is refused, saying what to do, for REST
    // calls and subscriptions alike.
    let untrusting = Client::new(&url, ADMIN_ACCESS, ADMIN_SECRET).unwrap();
    for error in [
        untrusting.get("containers").await.unwrap_err(),
        untrusting
            .subscribe(Subscribe::names(["resource.change"]))
            .await
            .unwrap_err(),
    ] {
        assert!(
            matches!(&error, Error::Tls(message)
                if message.contains("not trusted") && message.contains("--ca-cert")),
            "{error}"
        );
        assert!(!error.is_server_failure(), "{error}");
    }
    // Plain http to the TLS port gets no answer it could take for one.
    let plain = Client::new(
        &url.replacen("https://", "http://", 1),
        ADMIN_ACCESS,
        ADMIN_SECRET,
    )
    .unwrap();
    assert!(plain.get("containers").await.is_err());
    // A client given the certificate as its CA file works.
    let trusting = Client::new(&url, ADMIN_ACCESS, ADMIN_SECRET)
        .unwrap()
        .with_tls(Tls::with_ca_file(&pki.cert).unwrap())
        .unwrap();
    assert_eq!(
        trusting.get(&path).await.unwrap()["state"],
        "running",
        "a client with the CA file"
    );

    // The CLI: with --ca-cert it lists the container; without, one line says what to do.
    let (ok, stdout, stderr) = cli(&url, &["ps"], Some(&pki.cert)).await;
    assert!(ok && stdout.contains("over-tls"), "{stdout}\n{stderr}");
    let (ok, stdout, stderr) = cli(&url, &["ps"], None).await;
    assert!(!ok, "{stdout}");
    assert!(
        stderr.contains("not trusted") && stderr.contains("--ca-cert"),
        "{stderr}"
    );

    // Its log streams over wss through the server, trusting the same CA file.
    let (ok, stdout, stderr) = cli(&url, &["logs", "over-tls"], Some(&pki.cert)).await;
    assert!(
        ok && stdout.contains("hello-over-tls"),
        "{stdout}\n{stderr}"
    );

    admin.delete(&path).await.unwrap();
    wait_state(&admin, &path, "removed").await;
    agent.kill().await;
    drop(pki.dir);
}

#[tokio::test]
async fn bad_tls_files_stop_drover_server_at_start_with_a_message_naming_the_file() {
    let pki = make_pki();
    let other = make_pki();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let not_pem = dir.path().join("not-pem.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let cases: [(&Path, &Path, &[&str]); 4] = [
        (&missing, &pki.key, &["TLS certificate", "missing.pem"]),
        (
            &not_pem,
            &pki.key,
            &["TLS certificate", "not-pem.pem", "no PEM"],
        ),
        (&pki.cert, &not_pem, &["TLS key", "not-pem.pem", "no PEM"]),
        // A key that is not the certificate's.
        (&pki.cert, &other.key, &["does not fit"]),
    ];
    for (cert, key, expected) in cases {
        let data = tempfile::tempdir().unwrap();
        let output = tokio::process::Command::new(BIN)
            .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data.path())
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .env_remove("DROVER_TLS_CERT")
            .env_remove("DROVER_TLS_KEY")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let output = drover_test_support::within("drover server to refuse", output)
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        for part in expected {
            assert!(stderr.contains(part), "{part:?} not in {stderr}");
        }
        assert!(
            !data.path().join("drover.db").exists(),
            "refused before the store was opened"
        );
    }
    // One of the two alone is refused by the flags.
    let output = tokio::process::Command::new(BIN)
        .args(["server", "--tls-cert"])
        .arg(&pki.cert)
        .env_remove("DROVER_TLS_KEY")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--tls-key"));
}

#[tokio::test]
async fn drover_up_over_tls_runs_a_container_through_its_local_agent() {
    drover_test_support::init();
    let pki = make_pki();
    let dir = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(BIN);
    command
        .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("DROVER_TLS_CERT", &pki.cert)
        .env("DROVER_TLS_KEY", &pki.key)
        .env("DROVER_ADMIN_ACCESS_KEY", ADMIN_ACCESS)
        .env("DROVER_ADMIN_SECRET_KEY", ADMIN_SECRET)
        .env_remove("CATTLE_ACCESS_KEY")
        .env_remove("CATTLE_SECRET_KEY")
        .env_remove("CATTLE_URL")
        .env_remove("DROVER_CA_CERT")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut up = DroverProcess::spawn(command);
    let stderr = up.child_mut().stderr.take().unwrap();
    let (ready, said) = tokio::sync::oneshot::channel();
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
        .expect("`drover up` says it is ready (its local agent is active) before it exits");
    assert!(url.starts_with("https://localhost:"), "{url}");
    let admin = Client::new(&url, ADMIN_ACCESS, ADMIN_SECRET)
        .unwrap()
        .with_tls(Tls::with_ca_file(&pki.cert).unwrap())
        .unwrap();
    let created = admin
        .post(
            "containers",
            &json!({"name": "up-tls", "command": ["sleep", "120"]}),
        )
        .await
        .unwrap();
    let path = format!("containers/{}", created["id"].as_str().unwrap());
    wait_state(&admin, &path, "running").await;
    admin.delete(&path).await.unwrap();
    wait_state(&admin, &path, "removed").await;
    up.kill().await;
}
