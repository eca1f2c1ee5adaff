//! The example external handler against the real server: registered the way the original's
//! Go library did, it approves containers with an owner label and stops the others.

use drover_test_support::agent::TestAgent;
use drover_test_support::{TestServer, wait_state};
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn the_gate_approves_owned_containers_and_stops_the_others() {
    let server = TestServer::builder()
        .settings(drover_test_support::FAST)
        .start()
        .await;
    let (_, _, agent) = server.host_with_agent("h", TestAgent::always_ok()).await;
    // Registering twice leaves one active handler of the name.
    label_gate::register(&server.admin, "owner-gate")
        .await
        .unwrap();
    let handler = label_gate::register(&server.admin, "owner-gate")
        .await
        .unwrap();
    assert_eq!(handler["state"], "active");
    let active = server
        .admin
        .get("externalhandlers?name=owner-gate&state=active")
        .await
        .unwrap();
    assert_eq!(active["data"].as_array().unwrap().len(), 1);
    let shutdown = CancellationToken::new();
    let gate = tokio::spawn(label_gate::run(
        server.admin.clone(),
        "owner-gate",
        shutdown.clone(),
    ));

    let owned = server
        .admin
        .post(
            "containers",
            &json!({"name": "owned", "command": ["sleep", "600"], "labels": {"owner": "ops"}}),
        )
        .await
        .unwrap();
    let running = wait_state(
        &server.admin,
        &format!("containers/{}", owned["id"].as_str().unwrap()),
        "running",
    )
    .await;
    assert_eq!(running["approvedBy"], "owner-gate");
    assert_eq!(running["owner"], "ops");

    let stray = server
        .admin
        .post(
            "containers",
            &json!({"name": "stray", "command": ["sleep", "600"]}),
        )
        .await
        .unwrap();
    let stray_id = stray["id"].as_str().unwrap();
    wait_state(&server.admin, &format!("containers/{stray_id}"), "stopped").await;
    let start = server
        .admin
        .get(&format!(
            "processinstances?resourceType=container&resourceId={stray_id}&processName=instance.start"
        ))
        .await
        .unwrap();
    assert_eq!(start["data"][0]["exitReason"], "CHAIN", "{start:#}");
    assert!(
        start["data"][0]["lastError"]
            .as_str()
            .unwrap()
            .contains("stray has no owner label: refused by owner-gate"),
        "{start:#}"
    );
    // Only the owned container reached the agent.
    assert_eq!(agent.requests_named("compute.instance.activate").await, 1);
    shutdown.cancel();
    gate.await.unwrap().unwrap();
}
