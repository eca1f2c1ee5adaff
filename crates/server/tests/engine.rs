//! The process engine end to end: the real server, a real WebSocket test agent, the real API.
//! Each test runs on SQLite and, when `DROVER_TEST_POSTGRES_URL` is set, on PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use drover_client::{Client, Error, Subscribe};
use drover_test_support::agent::{Answer, Policy, TestAgent};
use drover_test_support::{FAST, TestServer, poll, servers, wait_change, wait_for, wait_state};
use serde_json::{Value, json};

fn container_body(name: &str) -> Value {
    json!({"name": name, "command": ["sleep", "1000"], "environment": {"A": "1"}, "labels": {"l": "v"}})
}

#[tokio::test]
async fn container_and_volume_go_through_their_lifecycle() {
    for server in servers(&[]).await {
        let (host_id, _, agent) = server
            .host_with_agent("host-1", TestAgent::always_ok())
            .await;
        let created = server
            .admin
            .post("containers", &container_body("web"))
            .await
            .unwrap();
        assert_eq!(created["type"], "container");
        assert_eq!(created["transitioning"], "yes");
        let path = format!("containers/{}", created["id"].as_str().unwrap());
        let running = wait_state(&server.admin, &path, "running").await;
        assert_eq!(running["hostId"], host_id.as_str());
        assert!(
            running["externalId"].as_str().unwrap().starts_with("pid-"),
            "reply data merged: {running:#}"
        );
        let actions: Vec<_> = running["actions"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert!(
            actions.contains(&"stop".to_owned()) && !actions.contains(&"start".to_owned()),
            "{actions:?}"
        );

        let stopping = server
            .admin
            .post(&format!("{path}?action=stop"), &json!({}))
            .await
            .unwrap();
        assert_eq!(stopping["state"], "stopping");
        wait_state(&server.admin, &path, "stopped").await;
        server
            .admin
            .post(&format!("{path}?action=start"), &json!({}))
            .await
            .unwrap();
        wait_state(&server.admin, &path, "running").await;
        let removing = server.admin.delete(&path).await.unwrap();
        assert_eq!(removing["state"], "removing");
        let removed = wait_state(&server.admin, &path, "removed").await;
        assert!(removed["removed"].is_string());
        assert_eq!(agent.requests_named("compute.instance.activate").await, 2);
        assert_eq!(agent.requests_named("compute.instance.deactivate").await, 1);
        assert_eq!(agent.requests_named("compute.instance.remove").await, 1);

        let volume = server
            .admin
            .post("volumes", &json!({"name": "data", "driver": "local"}))
            .await
            .unwrap();
        let volume_path = format!("volumes/{}", volume["id"].as_str().unwrap());
        let active = wait_state(&server.admin, &volume_path, "active").await;
        assert_eq!(active["path"], "/var/lib/test/volume");
        server
            .admin
            .post(&format!("{volume_path}?action=deactivate"), &json!({}))
            .await
            .unwrap();
        wait_state(&server.admin, &volume_path, "inactive").await;
        server.admin.delete(&volume_path).await.unwrap();
        wait_state(&server.admin, &volume_path, "removed").await;
        assert_eq!(agent.requests_named("storage.volume.remove").await, 1);

        // Every attempt is on record.
        let processes = server
            .admin
            .get(&format!(
                "processinstances?resourceType=container&resourceId={}",
                created["id"].as_str().unwrap()
            ))
            .await
            .unwrap();
        let names: Vec<_> = processes["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["processName"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "instance.create",
                "instance.start",
                "instance.stop",
                "instance.start",
                "instance.remove"
            ]
        );
        assert!(
            processes["data"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["result"] == "SUCCESS")
        );
    }
}

#[tokio::test]
async fn a_dropped_request_is_resent_and_completes() {
    for server in servers(&[]).await {
        let policy: Policy = Arc::new(|request, n| {
            if request.name() == "compute.instance.activate" && n < 2 {
                Answer::Ignore
            } else {
                Answer::Ok
            }
        });
        let (_, _, agent) = server.host_with_agent("host-1", policy).await;
        let created = server
            .admin
            .post("containers", &container_body("lossy"))
            .await
            .unwrap();
        let path = format!("containers/{}", created["id"].as_str().unwrap());
        wait_state(&server.admin, &path, "running").await;
        assert_eq!(
            agent.requests_named("compute.instance.activate").await,
            3,
            "sent three times"
        );
        let process = server
            .admin
            .get(&format!(
                "processinstances?processName=instance.start&resourceId={}",
                created["id"].as_str().unwrap()
            ))
            .await
            .unwrap();
        let process = &process["data"][0];
        assert_eq!(process["executionCount"], 3);
        assert_eq!(process["result"], "SUCCESS");
        let executions = server
            .admin
            .get(&format!(
                "processexecutions?processInstanceId={}",
                process["id"].as_str().unwrap()
            ))
            .await
            .unwrap();
        let reasons: Vec<_> = executions["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["exitReason"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(reasons, ["TIMEOUT", "TIMEOUT", "DONE"]);
    }
}

#[tokio::test]
async fn error_replies_are_retried_then_the_container_goes_to_error() {
    for server in servers(&[("process.max_attempts", "3")]).await {
        let policy: Policy = Arc::new(|request, _| {
            if request.name() == "compute.instance.activate" {
                Answer::Error("image not found: nope".into())
            } else {
                Answer::Ok
            }
        });
        let (_, _, agent) = server.host_with_agent("host-1", policy).await;
        let created = server
            .admin
            .post("containers", &container_body("broken"))
            .await
            .unwrap();
        let path = format!("containers/{}", created["id"].as_str().unwrap());
        let failed = wait_change(&server.admin, &path, "error", |r| r["state"] == "error").await;
        assert_eq!(failed["transitioning"], "error");
        let message = failed["transitioningMessage"].as_str().unwrap();
        assert!(
            message.contains("image not found: nope") && message.contains("3 of 3"),
            "{message}"
        );
        assert_eq!(agent.requests_named("compute.instance.activate").await, 3);
        let failed_process = server
            .admin
            .get(&format!(
                "processinstances?processName=instance.start&result=FAILURE&resourceId={}",
                created["id"].as_str().unwrap()
            ))
            .await
            .unwrap();
        assert_eq!(failed_process["data"].as_array().unwrap().len(), 1);
        // The error state offers start again and remove.
        assert!(
            failed["actions"].get("remove").is_some() && failed["actions"].get("start").is_some()
        );
    }
}

#[tokio::test]
async fn a_permanent_error_reply_fails_the_process_at_once() {
    // Backoff as by default: a retry would wait at least 2 s.
    for server in servers(&[("process.retry_max_wait.millis", "120000")]).await {
        let policy: Policy = Arc::new(|request, _| {
            if request.name() == "compute.instance.activate" {
                Answer::Permanent("no such executable: /bin/nope".into())
            } else {
                Answer::Ok
            }
        });
        let (_, _, agent) = server.host_with_agent("host-1", policy).await;
        let created = server
            .admin
            .post("containers", &container_body("hopeless"))
            .await
            .unwrap();
        let began = std::time::Instant::now();
        let path = format!("containers/{}", created["id"].as_str().unwrap());
        let failed = wait_change(&server.admin, &path, "error", |r| r["state"] == "error").await;
        let took = began.elapsed();
        assert!(took < Duration::from_millis(1500), "failed after {took:?}");
        assert_eq!(failed["transitioning"], "error");
        let message = failed["transitioningMessage"].as_str().unwrap();
        assert!(
            message.contains("no such executable: /bin/nope") && message.contains("permanently"),
            "{message}"
        );
        assert_eq!(agent.requests_named("compute.instance.activate").await, 1);
        let process = server
            .admin
            .get(&format!(
                "processinstances?processName=instance.start&result=FAILURE&resourceId={}",
                created["id"].as_str().unwrap()
            ))
            .await
            .unwrap();
        let process = &process["data"][0];
        assert_eq!(process["executionCount"], 1, "{process:#}");
    }
}

#[tokio::test]
async fn a_second_action_on_a_locked_resource_gets_409_and_remove_always_works() {
    for server in servers(&[]).await {
        // The agent never answers starts: the container is stuck in starting.
        let policy: Policy = Arc::new(|request, _| {
            if request.name() == "compute.instance.activate" {
                Answer::Ignore
            } else {
                Answer::Ok
            }
        });
        let (_, _, agent) = server.host_with_agent("host-1", policy).await;
        let created = server
            .admin
            .post("containers", &container_body("stuck"))
            .await
            .unwrap();
        let path = format!("containers/{}", created["id"].as_str().unwrap());
        wait_change(&server.admin, &path, "starting", |r| {
            r["state"] == "starting"
        })
        .await;
        // The start is on the host: the agent has the request (and ignores it).
        wait_for("the agent to get the start", || async {
            (agent.requests_named("compute.instance.activate").await > 0).then_some(())
        })
        .await;
        match server
            .admin
            .post(&format!("{path}?action=stop"), &json!({}))
            .await
        {
            Err(Error::Api {
                status: 409,
                message,
                ..
            }) => {
                assert!(
                    message.contains("instance.start") && message.contains("1pi"),
                    "{message}"
                )
            }
            other => panic!("expected a 409, got {other:?}"),
        }
        let current = server.admin.get(&path).await.unwrap();
        assert_eq!(
            current["actions"]
                .as_object()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            // While a process holds it, only remove (and reading its log, which is no
            // process: it has a host) is offered.
            ["logs", "remove"]
        );
        // Remove cancels the stuck start and completes.
        server.admin.delete(&path).await.unwrap();
        wait_state(&server.admin, &path, "removed").await;
        assert_eq!(agent.requests_named("compute.instance.remove").await, 1);
        let start = server
            .admin
            .get(&format!(
                "processinstances?processName=instance.start&resourceId={}",
                created["id"].as_str().unwrap()
            ))
            .await
            .unwrap();
        assert_eq!(start["data"][0]["result"], "CANCELED");
        // Nothing is left pending; what ended is counted as done.
        let summary = server.admin.get("processsummary").await.unwrap();
        let rows = summary["data"].as_array().unwrap();
        assert!(
            rows.iter()
                .all(|r| r["running"] == 0 && r["ready"] == 0 && r["delay"] == 0),
            "{summary:#}"
        );
        let start_row = rows
            .iter()
            .find(|r| r["processName"] == "instance.start")
            .unwrap();
        assert_eq!(start_row["done"], 1, "{summary:#}");
    }
}

#[tokio::test]
async fn process_summary_and_filters_show_what_waits_and_why() {
    for server in servers(&[
        ("eventing.timeout.millis", "200"),
        ("process.retry_max_wait.millis", "60000"),
    ])
    .await
    {
        let policy: Policy = Arc::new(|request, _| {
            if request.name() == "compute.instance.activate" {
                Answer::Ignore
            } else {
                Answer::Ok
            }
        });
        let (_, _, _agent) = server.host_with_agent("host-1", policy).await;
        let created = server
            .admin
            .post("containers", &container_body("waits"))
            .await
            .unwrap();
        let id = created["id"].as_str().unwrap();
        // After a timed-out attempt the start is delayed, with its reason on record.
        let delayed = poll(
            &server.admin,
            "processinstances?state=delayed",
            "a delayed process",
            |c| c["data"].as_array().is_some_and(|d| !d.is_empty()),
        )
        .await;
        let process = &delayed["data"][0];
        assert_eq!(process["processName"], "instance.start");
        assert_eq!(process["resourceId"], id);
        assert!(
            process["lastError"]
                .as_str()
                .unwrap()
                .contains("did not reply"),
            "{process:#}"
        );
        let summary = server.admin.get("processsummary").await.unwrap();
        let row = summary["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["processName"] == "instance.start")
            .unwrap();
        assert_eq!(row["delay"], 1);
        assert_eq!(row["running"], 0);
        let container = server.admin.get(&format!("containers/{id}")).await.unwrap();
        assert_eq!(container["transitioning"], "error");
        // An admin replays it now, then cancels it.
        let replay = server
            .admin
            .post(
                &format!(
                    "processinstances/{}?action=replay",
                    process["id"].as_str().unwrap()
                ),
                &json!({}),
            )
            .await
            .unwrap();
        assert_eq!(replay["executionCount"], 0);
        let canceled = server
            .admin
            .post(
                &format!(
                    "processinstances/{}?action=cancel",
                    process["id"].as_str().unwrap()
                ),
                &json!({}),
            )
            .await
            .unwrap();
        assert_eq!(canceled["result"], "CANCELED");
        let container = wait_change(
            &server.admin,
            &format!("containers/{id}"),
            "back to stopped",
            |r| r["state"] == "stopped",
        )
        .await;
        assert_eq!(container["transitioning"], "no");
        // Another project's key sees none of this project's processes, and may not replay.
        let (_, project_client) = server.project("p").await;
        let theirs = project_client.get("processinstances").await.unwrap();
        assert_eq!(theirs["data"], json!([]), "{theirs:#}");
        match project_client
            .get(&format!(
                "processinstances/{}",
                process["id"].as_str().unwrap()
            ))
            .await
        {
            Err(Error::Api { status: 404, .. }) => {}
            other => panic!("expected a 404, got {other:?}"),
        }
        match project_client
            .post(
                &format!(
                    "processinstances/{}?action=replay",
                    process["id"].as_str().unwrap()
                ),
                &json!({}),
            )
            .await
        {
            Err(Error::Api { status: 403, .. }) => {}
            other => panic!("expected a 403, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn resource_change_reaches_the_projects_subscribers_only() {
    for server in servers(&[]).await {
        let (_, _, _agent) = server
            .host_with_agent("host-1", TestAgent::always_ok())
            .await;
        let (_, other_project) = server.project("other").await;
        let project_key = server
            .admin
            .post(
                "apikeys",
                &json!({"accountId": format!("1a{}", server.default_project())}),
            )
            .await
            .unwrap();
        let project_client = server.client(
            project_key["publicValue"].as_str().unwrap(),
            project_key["secretValue"].as_str().unwrap(),
        );
        let mut mine = project_client
            .subscribe(Subscribe::names(["resource.change"]))
            .await
            .unwrap();
        let mut theirs = other_project
            .subscribe(Subscribe::names(["resource.change", "marker"]))
            .await
            .unwrap();
        mine.next_event().await.unwrap().unwrap();
        theirs.next_event().await.unwrap().unwrap();

        let created = project_client
            .post("containers", &container_body("watched"))
            .await
            .unwrap();
        let id = created["id"].as_str().unwrap().to_owned();
        let running = loop {
            let event = tokio::time::timeout(Duration::from_secs(20), mine.next_non_ping())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(event.name(), "resource.change");
            let resource = &event.data.as_ref().unwrap()["resource"];
            if event.resource_id.as_deref() == Some(id.as_str())
                && resource["state"] == "running"
                && resource["transitioning"] == "no"
            {
                break resource.clone();
            }
        };
        assert_eq!(running["type"], "container");
        assert_eq!(running["environment"], json!({"A": "1"}));
        assert!(
            running["links"]["self"]
                .as_str()
                .unwrap()
                .ends_with(&format!("/v1/containers/{id}"))
        );
        assert!(running["actions"].get("stop").is_some());
        // The other project's subscriber saw none of it: its next event is the marker.
        let other_id = theirs_marker(&server, &other_project).await;
        let next = tokio::time::timeout(Duration::from_secs(10), theirs.next_non_ping())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            next.name(),
            "resource.change",
            "the other project's own change"
        );
        assert_eq!(next.resource_id.as_deref(), Some(other_id.as_str()));
    }
}

/// Makes a change in the other project, so its subscriber has something of its own to see.
async fn theirs_marker(_server: &TestServer, other: &Client) -> String {
    let created = other
        .post("stacks", &json!({"name": "theirs"}))
        .await
        .unwrap();
    created["id"].as_str().unwrap().to_owned()
}

/// The API's own description drives a container, under each path the API is served at: a
/// client configured with `…/v1` and one configured with `…/v2-beta` (the original's Go
/// client's) see the same system, every link under the path they used.
#[tokio::test]
async fn schemas_let_a_generic_client_drive_a_container() {
    for version in ["v1", "v2-beta"] {
        generic_client_drives_a_container(version).await;
    }
}

async fn generic_client_drives_a_container(version: &str) {
    let server = TestServer::start_with(FAST).await;
    let (_, _, _agent) = server
        .host_with_agent("host-1", TestAgent::always_ok())
        .await;
    let base = format!("{}/{version}", server.url);
    let client = server.admin.with_key_at(&base).unwrap();
    assert_eq!(client.base_url(), base);
    let under = |link: &Value| {
        let link = link.as_str().unwrap_or_else(|| panic!("no link: {link}"));
        assert!(
            link.starts_with(&format!("{base}/")) || link.starts_with(&format!("{base}?")),
            "{link} is not under {base}"
        );
        link.to_owned()
    };
    let root = client.get("").await.unwrap();
    assert_eq!(root["id"], version);
    let schemas = client.get(&under(&root["links"]["schemas"])).await.unwrap();
    let container = schemas["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "container")
        .unwrap()
        .clone();
    assert!(
        container["collectionMethods"]
            .as_array()
            .unwrap()
            .contains(&json!("POST"))
    );
    assert_eq!(
        container["resourceFields"]["command"]["type"],
        "array[string]"
    );
    assert!(container["resourceActions"].get("start").is_some());
    assert!(container["collectionFilters"].get("state").is_some());
    // Create through the advertised collection link, poll, act through advertised action links.
    let created = client
        .post(
            &under(&container["links"]["collection"]),
            &container_body("generic"),
        )
        .await
        .unwrap();
    let self_link = under(&created["links"]["self"]);
    let running = wait_change(&client, &self_link, "running", |r| {
        r["transitioning"] == "no"
    })
    .await;
    let stop = under(&running["actions"]["stop"]);
    client.post(&stop, &json!({})).await.unwrap();
    let stopped = wait_change(&client, &self_link, "stopped", |r| {
        r["transitioning"] == "no"
    })
    .await;
    assert_eq!(stopped["state"], "stopped");
    client.delete(&self_link).await.unwrap();
    wait_change(&client, &self_link, "removed", |r| r["state"] == "removed").await;
    // Filters and pagination.
    for n in 0..3 {
        server
            .admin
            .post(
                "containers",
                &json!({"name": format!("page-{n}"), "command": ["true"], "startOnCreate": false}),
            )
            .await
            .unwrap();
    }
    let page = client
        .get("containers?name_like=page-%25&limit=2")
        .await
        .unwrap();
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    assert_eq!(page["pagination"]["partial"], true);
    let next = client
        .get(&under(&page["pagination"]["next"]))
        .await
        .unwrap();
    assert_eq!(next["data"].as_array().unwrap().len(), 1);
    let not_removed = client.get("containers?state_ne=removed").await.unwrap();
    assert!(
        not_removed["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["state"] != "removed")
    );
    // Project-scoped URLs see the same project's resources.
    let scoped = client
        .get(&format!(
            "projects/1a{}/containers?name=generic",
            server.default_project()
        ))
        .await
        .unwrap();
    assert_eq!(scoped["data"].as_array().unwrap().len(), 1);
    under(&scoped["links"]["self"]);
    under(&scoped["data"][0]["links"]["self"]);
    let response = reqwest::Client::new()
        .get(format!("{base}/containers"))
        .basic_auth(
            drover_test_support::ADMIN_ACCESS,
            Some(drover_test_support::ADMIN_SECRET),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["x-api-schemas"],
        format!("{base}/schemas").as_str()
    );
    match client.get("containers?color=blue").await {
        Err(Error::Api { status: 422, .. }) => {}
        other => panic!("expected a 422, got {other:?}"),
    }
    match client
        .post(
            "containers",
            &json!({"name": "x", "command": "not-an-array"}),
        )
        .await
    {
        Err(Error::Api {
            status: 422, code, ..
        }) => assert_eq!(code, "InvalidType"),
        other => panic!("expected a 422, got {other:?}"),
    }
}

#[tokio::test]
async fn registration_activation_and_the_ping_monitor() {
    let monitor: &[(&str, &str)] = &[
        ("agent.ping.interval.millis", "50"),
        ("agent.ping.timeout.millis", "200"),
        ("agent.activate.ping.timeout.millis", "200"),
        ("agent.ping.reconnect.after.failed.count", "3"),
        ("agent.disconnect.after.seconds", "1"),
    ];
    for server in servers(monitor).await {
        let token = server
            .admin
            .post("registrationtokens", &json!({}))
            .await
            .unwrap();
        let token = token["token"].as_str().unwrap().to_owned();
        let (access, secret) = token.split_once(':').unwrap();
        let registrar = server.client(access, secret);
        // A registration token is no API key.
        match registrar.get("containers").await {
            Err(Error::Api { status: 401, .. }) => {}
            other => panic!("expected a 401, got {other:?}"),
        }
        let registered = registrar
            .post("register", &json!({"key": "host-uuid-1", "name": "box"}))
            .await
            .unwrap();
        let agent_path = format!("agents/{}", registered["agentId"].as_str().unwrap());
        let host_path = format!("hosts/{}", registered["hostId"].as_str().unwrap());
        let agent_client = server.client(
            registered["accessKey"].as_str().unwrap(),
            registered["secretKey"].as_str().unwrap(),
        );
        let agent_id: i64 = registered["agentId"]
            .as_str()
            .unwrap()
            .trim_start_matches("1ag")
            .parse()
            .unwrap();
        let agent = TestAgent::start(agent_client.clone(), agent_id, TestAgent::always_ok()).await;
        // agent.create → agent.activate pings the agent until it answers.
        wait_state(&server.admin, &agent_path, "active").await;
        let host = poll(&server.admin, &host_path, "host facts", |h| {
            h["state"] == "active" && h["hostname"] == "test-host"
        })
        .await;
        assert_eq!(host["cpus"], 2);
        // The monitor records when the agent answered.
        poll(&server.admin, &agent_path, "lastPing", |a| {
            a["lastPing"].is_string() && a["lastPingTS"].as_i64().unwrap_or(0) > 0
        })
        .await;
        // Registering the same host again is the same agent, with a new key.
        let again = registrar
            .post("register", &json!({"key": "host-uuid-1", "name": "box"}))
            .await
            .unwrap();
        assert_eq!(again["agentId"], registered["agentId"]);
        assert_ne!(again["accessKey"], registered["accessKey"]);

        // A container whose process dies is noticed through the ping reply.
        let created = server
            .admin
            .post("containers", &container_body("mortal"))
            .await
            .unwrap();
        let id = created["id"].as_str().unwrap().to_owned();
        wait_state(&server.admin, &format!("containers/{id}"), "running").await;
        agent
            .instances
            .lock()
            .unwrap()
            .insert(id.clone(), "stopped".into());
        wait_state(&server.admin, &format!("containers/{id}"), "stopped").await;
        // The monitor records a `die` event for it (a statement after the state change, so the
        // state may be visible first).
        poll(
            &server.admin,
            &format!("containerevents?externalId={id}&externalStatus=die"),
            "the monitor's die event",
            |events| {
                events["data"]
                    .as_array()
                    .is_some_and(|data| data.len() == 1)
            },
        )
        .await;

        // Silence: reconnecting, then disconnected; the host follows. An answer brings it back.
        drop(agent);
        wait_change(&server.admin, &agent_path, "reconnecting", |a| {
            a["state"] == "reconnecting"
        })
        .await;
        wait_change(&server.admin, &host_path, "host reconnecting", |h| {
            h["state"] == "reconnecting" || h["state"] == "disconnected"
        })
        .await;
        wait_change(&server.admin, &agent_path, "disconnected", |a| {
            a["state"] == "disconnected"
        })
        .await;
        let new_client = server.client(
            again["accessKey"].as_str().unwrap(),
            again["secretKey"].as_str().unwrap(),
        );
        let _agent = TestAgent::start(new_client, agent_id, TestAgent::always_ok()).await;
        wait_change(&server.admin, &agent_path, "active again", |a| {
            a["state"] == "active"
        })
        .await;
        wait_change(&server.admin, &host_path, "host active again", |h| {
            h["state"] == "active"
        })
        .await;
    }
}

/// The `instance.start` of container `id` as the process list shows it.
async fn start_process(
    admin: &Client,
    id: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let list = poll(
        admin,
        &format!(
            "processinstances?resourceType=instance&resourceId={id}&processName=instance.start"
        ),
        what,
        |list| {
            list["data"]
                .as_array()
                .is_some_and(|data| data.len() == 1 && done(&data[0]))
        },
    )
    .await;
    list["data"][0].clone()
}

#[tokio::test]
async fn a_create_with_no_host_waits_delayed_with_its_reason_and_runs_when_an_agent_comes() {
    // One attempt allowed: waiting for a host must not use it up.
    for server in servers(&[
        ("process.max_attempts", "1"),
        ("process.retry_max_wait.millis", "100"),
        // The agent's ping waits for the test agent to subscribe (then it is sent again).
        ("agent.activate.ping.timeout.millis", "10000"),
    ])
    .await
    {
        let created = server
            .admin
            .post("containers", &container_body("early"))
            .await
            .unwrap();
        let id = created["id"].as_str().unwrap().to_owned();
        // No host at all: the start waits, Delayed, with its reason, again and again.
        let waiting = start_process(&server.admin, &id, "a start that waited 10 times", |p| {
            p["state"] == "delayed" && p["waitCount"].as_i64().unwrap_or(0) >= 10
        })
        .await;
        assert_eq!(
            waiting["lastError"],
            "waiting for an active host with an active agent"
        );
        assert_eq!(waiting["exitReason"], "NO_HOST");
        assert_eq!(waiting["phase"], "WAITING");
        assert_eq!(waiting["executionCount"], 0, "a wait is no attempt");
        assert!(waiting["endTime"].is_null());
        let container = server.admin.get(&format!("containers/{id}")).await.unwrap();
        assert_eq!(container["state"], "starting");
        assert_eq!(container["transitioning"], "yes");
        assert_eq!(
            container["transitioningMessage"],
            "waiting for an active host with an active agent"
        );
        poll(
            &server.admin,
            "processsummary",
            "the wait counted as delayed",
            |summary| {
                summary["data"].as_array().is_some_and(|rows| {
                    rows.iter()
                        .any(|row| row["processName"] == "instance.start" && row["delay"] == 1)
                })
            },
        )
        .await;

        // Backoffs from now on are long (2 s + 102.4 s for the 11th wait): what runs the start
        // within the test's waits below is the agent's coming, not its backoff.
        server
            .admin
            .put(
                "settings/process.retry_max_wait.millis",
                &json!({"value": "600000"}),
            )
            .await
            .unwrap();
        start_process(
            &server.admin,
            &id,
            "a start parked for a minute or more",
            |p| p["runAfterTS"].as_i64().unwrap_or(0) - drover_proto::event::now_millis() > 60_000,
        )
        .await;

        // An agent registers: its host stays activating until the agent answers.
        let token = server
            .admin
            .post("registrationtokens", &json!({}))
            .await
            .unwrap();
        let (access, secret) = token["token"].as_str().unwrap().split_once(':').unwrap();
        let registered = server
            .client(access, secret)
            .post("register", &json!({"key": "late-host", "name": "late"}))
            .await
            .unwrap();
        let host_path = format!("hosts/{}", registered["hostId"].as_str().unwrap());
        let host = server.admin.get(&host_path).await.unwrap();
        assert_eq!(
            host["state"], "activating",
            "not active before its agent answered"
        );
        let agent_id: i64 = registered["agentId"]
            .as_str()
            .unwrap()
            .trim_start_matches("1ag")
            .parse()
            .unwrap();
        let agent_client = server.client(
            registered["accessKey"].as_str().unwrap(),
            registered["secretKey"].as_str().unwrap(),
        );
        let _agent = TestAgent::start(agent_client, agent_id, TestAgent::always_ok()).await;
        let running = wait_state(&server.admin, &format!("containers/{id}"), "running").await;
        assert_eq!(running["hostId"], registered["hostId"]);
        let host = server.admin.get(&host_path).await.unwrap();
        assert_eq!(host["state"], "active");
        let done = start_process(&server.admin, &id, "the start done", |p| {
            p["state"] == "done"
        })
        .await;
        assert_eq!(done["result"], "SUCCESS");
        assert_eq!(done["executionCount"], 1, "its one attempt");
        assert!(done["waitCount"].as_i64().unwrap() >= 10);
    }
}
