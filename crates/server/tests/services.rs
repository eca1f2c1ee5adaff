//! The server keeps services at their scale (services.rs): containers made from the launch
//! config in numbered slots, scaled up and down, restarted when they die, refilled when
//! removed, stopped with the service and removed with it; overlapping passes never make more
//! containers than the scale. On SQLite and PostgreSQL, with the scripted test agent.

use drover_client::{Client, Error};
use drover_test_support::agent::TestAgent;
use drover_test_support::{TestServer, poll, servers, wait_change, wait_state};
use serde_json::{Value, json};

/// The live containers of a service (`state_ne=removed`), by slot.
fn by_slot(list: &Value) -> Vec<Value> {
    let mut containers: Vec<Value> = list["data"].as_array().cloned().unwrap_or_default();
    containers.sort_by_key(|c| c["serviceIndex"].as_i64());
    containers
}

/// Waits until the service has exactly `count` live containers, in slots 1 to `count`, all
/// running and settled, and the service says so (`currentScale`, no message); returns them
/// by slot.
async fn wait_running(admin: &Client, service: &str, count: usize) -> Vec<Value> {
    let path = format!("containers?serviceId={service}&state_ne=removed&limit=1000");
    let list = wait_change(admin, &path, &format!("{count} running"), |list| {
        let containers = by_slot(list);
        containers.len() == count
            && containers.iter().enumerate().all(|(n, c)| {
                c["state"] == "running"
                    && c["transitioning"] == "no"
                    && c["serviceIndex"] == n as i64 + 1
            })
    })
    .await;
    wait_change(
        admin,
        &format!("services/{service}"),
        &format!("currentScale {count}"),
        |s| s["currentScale"] == count as i64 && s["reconcileMessage"].is_null(),
    )
    .await;
    by_slot(&list)
}

async fn starts_of(admin: &Client, container: &str) -> usize {
    let list = admin
        .get(&format!(
            "processinstances?resourceType=container&resourceId={container}&processName=instance.start"
        ))
        .await
        .unwrap();
    list["data"].as_array().unwrap().len()
}

#[tokio::test]
async fn a_service_keeps_its_scale_through_scaling_deaths_removals_and_its_own_states() {
    for server in servers(&[]).await {
        let backend = format!("{:?}", server.backend);
        let admin = &server.admin;
        let (host, agent_client, _agent) = server
            .host_with_agent("svc-host", TestAgent::always_ok())
            .await;
        let stack = admin
            .post("stacks", &json!({"name": "shop"}))
            .await
            .unwrap();
        let created = admin
            .post(
                "services",
                &json!({"name": "web", "scale": 3, "stackId": stack["id"],
                        "launchConfig": {"command": ["sleep", "600"], "labels": {"team": "a"}}}),
            )
            .await
            .unwrap();
        let id = created["id"].as_str().unwrap().to_owned();
        let path = format!("services/{id}");

        // Activating (at create) makes the containers, from the launch config, in the project.
        let three = wait_running(admin, &id, 3).await;
        for (n, c) in three.iter().enumerate() {
            assert_eq!(c["name"], format!("shop-web-{}", n + 1), "{backend}: {c:#}");
            assert_eq!(c["serviceId"], id.as_str());
            assert_eq!(c["accountId"], created["accountId"]);
            assert_eq!(c["command"], json!(["sleep", "600"]));
            assert_eq!(c["labels"]["team"], "a");
            assert_eq!(c["labels"]["io.rancher.stack_service.name"], "shop/web");
            assert_eq!(c["hostId"], host.as_str());
        }

        // Scale up, then down: the highest slots go, the lowest stay as they were.
        admin.put(&path, &json!({"scale": 5})).await.unwrap();
        let five = wait_running(admin, &id, 5).await;
        assert_eq!(
            five[..3].iter().map(|c| &c["id"]).collect::<Vec<_>>(),
            three.iter().map(|c| &c["id"]).collect::<Vec<_>>(),
            "{backend}"
        );
        admin.put(&path, &json!({"scale": 2})).await.unwrap();
        let two = wait_running(admin, &id, 2).await;
        assert_eq!(two[0]["id"], three[0]["id"], "{backend}");
        assert_eq!(two[1]["id"], three[1]["id"], "{backend}");
        for gone in &five[2..] {
            let gone = admin
                .get(&format!("containers/{}", gone["id"].as_str().unwrap()))
                .await
                .unwrap();
            assert_eq!(gone["state"], "removed", "{backend}: {gone:#}");
        }

        // A container that dies (its agent says so) is started again.
        let first = two[0]["id"].as_str().unwrap().to_owned();
        assert_eq!(starts_of(admin, &first).await, 1);
        agent_client
            .post(
                "containerevents",
                &json!({"externalId": first, "externalStatus": "die", "hostId": host}),
            )
            .await
            .unwrap();
        poll(
            admin,
            &format!("processinstances?resourceType=container&resourceId={first}&processName=instance.start"),
            "a second start",
            |list| list["data"].as_array().is_some_and(|d| d.len() == 2),
        )
        .await;
        let again = wait_running(admin, &id, 2).await;
        assert_eq!(
            again[0]["id"],
            first.as_str(),
            "{backend}: restarted in place"
        );
        let service = admin.get(&path).await.unwrap();
        assert_eq!(service["consecutiveRestarts"], 1, "{backend}: {service:#}");

        // A container removed by hand is replaced by a new one in its slot.
        let second = again[1]["id"].as_str().unwrap().to_owned();
        admin.delete(&format!("containers/{second}")).await.unwrap();
        let refilled = wait_running(admin, &id, 2).await;
        assert_ne!(refilled[1]["id"], second.as_str(), "{backend}");
        assert_eq!(refilled[1]["name"], "shop-web-2");

        // Deactivating stops them; activating starts the same ones again.
        admin
            .post(&format!("{path}?action=deactivate"), &json!({}))
            .await
            .unwrap();
        let containers = format!("containers?serviceId={id}&state_ne=removed");
        wait_change(admin, &containers, "all stopped", |list| {
            let all = by_slot(list);
            all.len() == 2
                && all
                    .iter()
                    .all(|c| c["state"] == "stopped" && c["transitioning"] == "no")
        })
        .await;
        wait_change(admin, &path, "currentScale 0", |s| {
            s["state"] == "inactive" && s["currentScale"] == 0 && s["reconcileMessage"].is_null()
        })
        .await;
        admin
            .post(&format!("{path}?action=activate"), &json!({}))
            .await
            .unwrap();
        let back = wait_running(admin, &id, 2).await;
        assert_eq!(back[0]["id"], refilled[0]["id"], "{backend}");

        // Removing the service removes them.
        admin.delete(&path).await.unwrap();
        wait_state(admin, &path, "removed").await;
        wait_change(admin, &containers, "none left", |list| {
            list["data"].as_array().is_some_and(Vec::is_empty)
        })
        .await;
        for c in &back {
            let c = admin
                .get(&format!("containers/{}", c["id"].as_str().unwrap()))
                .await
                .unwrap();
            assert_eq!(c["state"], "removed", "{backend}: {c:#}");
        }
    }
}

#[tokio::test]
async fn overlapping_passes_never_make_more_containers_than_the_scale() {
    for server in servers(&[("service.reconcile.interval.millis", "600000")]).await {
        let backend = format!("{:?}", server.backend);
        let admin = &server.admin;
        let (_host, _agent_client, _agent) = server
            .host_with_agent("race-host", TestAgent::always_ok())
            .await;
        let created = admin
            .post(
                "services",
                &json!({"name": "race", "scale": 0, "launchConfig": {"command": ["sleep", "600"]}}),
            )
            .await
            .unwrap();
        let id = created["id"].as_str().unwrap().to_owned();
        wait_change(admin, &format!("services/{id}"), "looked at", |s| {
            s["currentScale"] == 0
        })
        .await;
        // The scale changes behind the reconciler's back (nothing wakes it), then eight passes
        // start at once: each reads four empty slots before any create commits.
        let numeric: i64 = id.trim_start_matches("1s").parse().unwrap();
        server
            .sql(&format!(
                "UPDATE service SET data = '{{\"scale\": 4, \"launchConfig\": {{\"command\": [\"sleep\", \"600\"]}}}}' WHERE id = {numeric}"
            ))
            .await;
        let state = server.server.state.clone();
        let passes: Vec<_> = (0..8)
            .map(|_| {
                let state = state.clone();
                tokio::spawn(
                    async move { drover_server::services::reconcile(&state, &[numeric]).await },
                )
            })
            .collect();
        for pass in passes {
            pass.await.unwrap();
        }
        wait_running(admin, &id, 4).await;
        let ever = server
            .server
            .state
            .store
            .count_rows("instance")
            .await
            .unwrap();
        assert_eq!(
            ever, 4,
            "{backend}: no container beyond the scale was ever made"
        );
    }
}

fn api_error(error: Error) -> (u16, String, String) {
    match error {
        Error::Api {
            status,
            code,
            message,
        } => (status, code, message),
        other => panic!("not an API error: {other}"),
    }
}

#[tokio::test]
async fn bad_scales_and_launch_configs_are_refused_and_a_service_with_nothing_to_run_says_so() {
    let server = TestServer::start_with(drover_test_support::FAST).await;
    let admin = &server.admin;
    for (body, code, field) in [
        (
            json!({"name": "a", "scale": -1}),
            "MinLimitExceeded",
            "scale",
        ),
        (
            json!({"name": "a", "scale": 1001}),
            "MaxLimitExceeded",
            "scale",
        ),
        (
            json!({"name": "a", "launchConfig": "sleep"}),
            "InvalidType",
            "launchConfig",
        ),
        (
            json!({"name": "a", "launchConfig": {"command": "sleep 600"}}),
            "InvalidType",
            "launchConfig.command",
        ),
        (
            json!({"name": "a", "launchConfig": {"command": ["x"], "labels": {"a": 1}}}),
            "InvalidType",
            "launchConfig.labels",
        ),
    ] {
        let (status, got, message) = api_error(admin.post("services", &body).await.unwrap_err());
        assert_eq!((status, got.as_str()), (422, code), "{body}: {message}");
        assert!(message.contains(field), "{body}: {message}");
    }
    assert_eq!(
        admin.get("services").await.unwrap()["data"]
            .as_array()
            .unwrap()
            .len(),
        0,
        "nothing was created"
    );

    // Without a scale a service runs one container; without a command it cannot, and says so.
    let idle = admin
        .post("services", &json!({"name": "idle"}))
        .await
        .unwrap();
    assert_eq!(idle["scale"], 1);
    let path = format!("services/{}", idle["id"].as_str().unwrap());
    let seen = wait_change(admin, &path, "a reconcile message", |s| {
        s["reconcileMessage"].is_string()
    })
    .await;
    assert_eq!(
        seen["reconcileMessage"],
        "0 of 1 running; cannot create 1: the service has no launchConfig"
    );
    assert_eq!(seen["currentScale"], 0);
    let (status, code, _) = api_error(admin.put(&path, &json!({"scale": 5000})).await.unwrap_err());
    assert_eq!((status, code.as_str()), (422, "MaxLimitExceeded"));
    assert_eq!(admin.get(&path).await.unwrap()["scale"], 1, "unchanged");
    // `_notnull` takes no value, on a reference field too.
    let none = admin
        .get("containers?serviceId_notnull=true")
        .await
        .unwrap();
    assert_eq!(none["data"].as_array().unwrap().len(), 0);
    let schema = admin.get("schemas/service").await.unwrap();
    assert_eq!(schema["resourceFields"]["scale"]["default"], 1);
    assert_eq!(schema["resourceFields"]["currentScale"]["create"], false);
}
