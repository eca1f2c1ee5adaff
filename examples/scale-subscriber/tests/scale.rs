//! The example against the real server and a real agent (both in this process): the server
//! keeps a service at its scale, and the watcher's view follows what `resource.change` says,
//! changing nothing itself.

use std::time::Duration;

use drover_client::Client;
use scale_subscriber::{Drift, Watch};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Waits (at most 30 s, woken by the watcher's own changes) until its view of `service` holds.
async fn wait_view(watch: &Watch, service: &str, what: &str, done: impl Fn(&Drift) -> bool) {
    let mut changes = watch.changes();
    let wait = async {
        loop {
            if watch.drift(service).as_ref().is_some_and(&done) {
                return;
            }
            changes.changed().await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "timed out waiting for {what}; the watcher sees {:?}",
                watch.drift(service)
            )
        });
}

#[tokio::test]
async fn the_watcher_follows_a_service_the_server_keeps_at_its_scale() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let mut config = drover_server::Config::new(dir.path().join("server"));
    config.admin_access_key = Some("SCALETESTADMINKEY001".into());
    config.admin_secret_key = Some("scale-test-admin-secret-0123456789abcdef".into());
    config.settings = vec![
        ("resource.change.interval.millis".into(), "20".into()),
        ("agent.activate.ping.timeout.millis".into(), "300".into()),
    ];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = drover_server::Server::start(listener, config)
        .await
        .unwrap();
    let url = format!("http://{}", server.addr);
    let admin = Client::new(
        &url,
        "SCALETESTADMINKEY001",
        "scale-test-admin-secret-0123456789abcdef",
    )
    .unwrap();
    let token = admin.post("registrationtokens", &json!({})).await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let shutdown = CancellationToken::new();
    let agent_args = drover_agent::AgentArgs {
        url: Some(url.clone()),
        registration_token: Some(token),
        access_key: None,
        secret_key: None,
        state_dir: dir.path().join("agent"),
        name: Some("local".into()),
        health_port: None,
        log_file: None,
        workers: 8,
        ca_cert: None,
    };
    let agent = tokio::spawn(drover_agent::run(agent_args, shutdown.clone()));

    // A service that exists before the watcher starts is in its first view.
    let early = admin
        .post(
            "services",
            &json!({"name": "early", "scale": 0, "launchConfig": {"command": ["sleep", "600"]}}),
        )
        .await
        .unwrap();
    let (watch, _connections) = scale_subscriber::run(admin.clone(), shutdown.clone())
        .await
        .unwrap();
    let early = early["id"].as_str().unwrap();
    assert_eq!(watch.drift(early).map(|d| d.wanted), Some(0));

    let service = admin
        .post(
            "services",
            &json!({"name": "web", "scale": 2, "launchConfig": {"command": ["sleep", "600"]}}),
        )
        .await
        .unwrap();
    let id = service["id"].as_str().unwrap().to_owned();
    wait_view(&watch, &id, "2 of 2", |d| d.wanted == 2 && d.running == 2).await;
    admin
        .put(&format!("services/{id}"), &json!({"scale": 3}))
        .await
        .unwrap();
    wait_view(&watch, &id, "3 of 3", |d| d.wanted == 3 && d.running == 3).await;
    admin
        .post(&format!("services/{id}?action=deactivate"), &json!({}))
        .await
        .unwrap();
    wait_view(&watch, &id, "stopped", |d| {
        d.state == "inactive" && d.wanted == 0 && d.running == 0
    })
    .await;
    // The containers are the server's, three of them: the watcher made none.
    let containers = admin
        .get(&format!("containers?serviceId={id}&state_ne=removed"))
        .await
        .unwrap();
    assert_eq!(containers["data"].as_array().unwrap().len(), 3);
    assert_eq!(watch.all().len(), 2);
    shutdown.cancel();
    let _ = agent.await;
    server.stop().await;
}
