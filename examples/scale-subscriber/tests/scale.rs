//! The example against the real server and a real agent (both in this process): a service's
//! containers follow its scale.

use std::time::Duration;

use drover_client::Client;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

async fn live_containers(client: &Client, service: &str) -> Vec<Value> {
    let containers = client
        .get("containers?state_ne=removed&limit=1000")
        .await
        .unwrap();
    containers["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| {
            c["labels"][scale_subscriber::SERVICE_LABEL] == service && c["state"] != "removing"
        })
        .cloned()
        .collect()
}

async fn wait_count(client: &Client, service: &str, running: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let live = live_containers(client, service).await;
        if live.len() == running && live.iter().all(|c| c["state"] == "running") {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "wanted {running} running, have {live:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_service_is_kept_at_its_scale() {
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
    };
    let agent = tokio::spawn(drover_agent::run(agent_args, shutdown.clone()));
    let mut connections = scale_subscriber::run(admin.clone(), shutdown.clone())
        .await
        .unwrap();
    connections.wait_for(|n| *n > 0).await.unwrap();

    let service = admin
        .post(
            "services",
            &json!({"name": "web", "scale": 2, "launchConfig": {"command": ["sleep", "600"]}}),
        )
        .await
        .unwrap();
    let id = service["id"].as_str().unwrap().to_owned();
    wait_count(&admin, &id, 2).await;
    admin
        .put(&format!("services/{id}"), &json!({"scale": 1}))
        .await
        .unwrap();
    wait_count(&admin, &id, 1).await;
    admin
        .put(&format!("services/{id}"), &json!({"scale": 0}))
        .await
        .unwrap();
    wait_count(&admin, &id, 0).await;
    shutdown.cancel();
    let _ = agent.await;
    server.stop().await;
}
