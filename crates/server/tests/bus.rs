//! The event bus end to end: a real server, real WebSocket and HTTP clients.

use std::time::Duration;

use drover_client::{Error, Event, Subscribe, Transitioning};
use drover_proto::ids;
use drover_test_support::next_event as next;
use drover_test_support::{ADMIN_ACCESS, ADMIN_SECRET, TestServer};
use serde_json::json;

#[tokio::test]
async fn subscribe_gets_an_immediate_ping_then_published_events() {
    let server = TestServer::start().await;
    let mut stream = server
        .admin
        .subscribe(Subscribe::names(["hello.world"]))
        .await
        .unwrap();
    let ping = tokio::time::timeout(Duration::from_secs(2), stream.next_event())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ping.name(), "ping");
    assert!(ping.reply_to.is_none());
    assert_eq!(ping.data, Some(json!({"options": {}, "resources": []})));

    let mut event = Event::new("hello.world").with_data(json!({"n": 1}));
    event.resource_type = Some("container".into());
    server.admin.publish(&event).await.unwrap();
    let got = next(&mut stream).await;
    assert_eq!(got.name(), "hello.world");
    assert_eq!(got.id, event.id);
    assert_eq!(got.data, Some(json!({"n": 1})));
    assert!(server.metric("drover_events_delivered_total") >= 1.0);
    assert_eq!(server.metric("drover_connections"), 1.0);
}

#[tokio::test]
async fn pings_repeat_at_the_configured_interval() {
    let server = TestServer::start_with(&[("api.sub.ping.interval.millis", "50")]).await;
    let mut stream = server
        .admin
        .subscribe(Subscribe::names(["x"]))
        .await
        .unwrap();
    assert_ping_interval(&mut stream, Duration::from_millis(50)).await;
}

/// Reads the immediate ping and three more: they must come about `interval` apart, far
/// sooner than the 5 s default (so a setting that is not applied fails) and not sooner than
/// the interval (so a timer that fires too often fails).
async fn assert_ping_interval(stream: &mut drover_client::EventStream, interval: Duration) {
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next_event())
        .await
        .expect("the immediate ping")
        .unwrap()
        .unwrap();
    assert_eq!(first.name(), "ping");
    let started = tokio::time::Instant::now();
    // Three intervals take 150 ms at 50 ms; 2 s is a wide margin for a loaded machine and
    // still well under one default interval.
    let limit = Duration::from_secs(2);
    for n in 1..=3 {
        let ping = tokio::time::timeout_at(started + limit, stream.next_event())
            .await
            .unwrap_or_else(|_| panic!("ping #{n} after the first did not come within {limit:?}"))
            .unwrap()
            .unwrap();
        assert_eq!(ping.name(), "ping");
    }
    let took = started.elapsed();
    assert!(
        took >= interval * 2,
        "three pings took {took:?}, less than two intervals of {interval:?}"
    );
}

#[tokio::test]
async fn subscription_closes_after_its_lifetime_of_pings() {
    let server = TestServer::start_with(&[
        ("api.sub.ping.interval.millis", "20"),
        ("api.sub.max.pings", "3"),
    ])
    .await;
    let mut stream = server
        .admin
        .subscribe(Subscribe::names(["x"]))
        .await
        .unwrap();
    // Three pings 20 ms apart: closed well within 2 s (the 5 s default interval would not be).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut pings = 0;
    let error = loop {
        match tokio::time::timeout_at(deadline, stream.next_event())
            .await
            .expect("closed within 2 s")
        {
            Ok(Some(_)) => pings += 1,
            Ok(None) => panic!("closed without a reason"),
            Err(error) => break error,
        }
    };
    assert_eq!(pings, 3, "its lifetime is api.sub.max.pings pings");
    match error {
        Error::Closed { code, reason } => {
            assert_eq!(code, 1000);
            assert!(reason.contains("api.sub.max.pings"), "{reason}");
        }
        other => panic!("unexpected {other}"),
    }
}

#[tokio::test]
async fn an_agent_replies_and_the_servers_call_is_correlated() {
    let server = TestServer::start().await;
    let (agent_id, agent) = server.agent(server.default_project(), "host-a").await;
    let mut agent_stream = agent
        .subscribe(Subscribe::names(["compute.instance.activate"]))
        .await
        .unwrap();
    // Wait until the subscription is live: the ping comes after the upgrade completed.
    assert_eq!(
        agent_stream.next_event().await.unwrap().unwrap().name(),
        "ping"
    );

    let hub = server.server.state.hub.clone();
    let call = tokio::spawn(async move {
        let request = Event::new(format!("compute.instance.activate;agent={agent_id}"))
            .with_resource("container", "1i7")
            .with_data(json!({"instance": {"name": "web"}}));
        let mut progress = Vec::new();
        let reply = hub
            .call(request, Duration::from_secs(10), |event| {
                progress.push(event.transitioning_progress)
            })
            .await;
        (reply, progress)
    });

    let request = next(&mut agent_stream).await;
    assert_eq!(
        request.name(),
        "compute.instance.activate",
        "the ;agent= suffix is stripped on delivery"
    );
    assert!(request.reply_to.as_deref().unwrap().starts_with("reply."));
    assert_eq!(request.timeout_millis, Some(10_000));
    let mut progress = request.reply().unwrap();
    progress.transitioning = Some(Transitioning::Yes);
    progress.transitioning_progress = Some(40);
    agent.publish(&progress).await.unwrap();
    agent
        .reply(&request, json!({"instance": {"externalId": "pid-1"}}))
        .await
        .unwrap();

    let (reply, progress) = call.await.unwrap();
    let reply = reply.unwrap();
    assert_eq!(reply.previous_ids.first(), request.id.as_ref());
    assert_eq!(
        reply.data,
        Some(json!({"instance": {"externalId": "pid-1"}}))
    );
    assert_eq!(progress, vec![Some(40)]);
}

#[tokio::test]
async fn replies_travel_the_bus_to_a_raw_subscriber_of_the_reply_name() {
    let server = TestServer::start().await;
    let (agent_id, agent) = server.agent(server.default_project(), "host-a").await;
    let mut agent_stream = agent
        .subscribe(Subscribe::names(["config.update"]))
        .await
        .unwrap();
    agent_stream.next_event().await.unwrap().unwrap();
    let mut replies = server
        .admin
        .subscribe(Subscribe::names(["reply.4242"]))
        .await
        .unwrap();
    replies.next_event().await.unwrap().unwrap();

    let mut request = Event::new(format!("config.update;agent={agent_id}"));
    request.reply_to = Some("reply.4242".into());
    server.admin.publish(&request).await.unwrap();
    let got = next(&mut agent_stream).await;
    agent.reply(&got, json!({"ok": true})).await.unwrap();
    let reply = next(&mut replies).await;
    assert_eq!(reply.reply_key(), request.id.as_deref());
    assert_eq!(reply.previous_names, vec!["config.update".to_owned()]);
}

#[tokio::test]
async fn an_agent_key_never_receives_another_agents_events() {
    let server = TestServer::start().await;
    let (agent_a, client_a) = server.agent(server.default_project(), "host-a").await;
    let (agent_b, client_b) = server.agent(server.default_project(), "host-b").await;

    // Asking for the other agent's id is refused outright.
    match client_a
        .subscribe(Subscribe::names(["ping"]).agent(ids::format("agent", agent_b)))
        .await
    {
        Err(Error::Refused { status, body }) => {
            assert_eq!(status, 403);
            assert!(body.contains("agentId"), "{body}");
        }
        other => panic!("expected a 403, got {other:?}"),
    }
    // Its own id is fine.
    client_a
        .subscribe(Subscribe::names(["ping"]).agent(agent_a.to_string()))
        .await
        .unwrap();

    // A forged suffix is discarded: the socket is still agent A's.
    let forged = format!("compute.instance.activate;agent={agent_b}");
    let mut stream_a = client_a
        .subscribe(Subscribe::names([forged.as_str(), "marker"]))
        .await
        .unwrap();
    let mut stream_b = client_b
        .subscribe(Subscribe::names(["compute.instance.activate"]))
        .await
        .unwrap();
    stream_a.next_event().await.unwrap().unwrap();
    stream_b.next_event().await.unwrap().unwrap();

    let secret = Event::new(format!("compute.instance.activate;agent={agent_b}"))
        .with_data(json!({"for": "b"}));
    server.admin.publish(&secret).await.unwrap();
    assert_eq!(next(&mut stream_b).await.id, secret.id);
    // Then a marker for A: if A had been given B's event, it would come first.
    let marker = Event::new(format!("marker;agent={agent_a}"));
    server.admin.publish(&marker).await.unwrap();
    let first = next(&mut stream_a).await;
    assert_eq!(first.name(), "marker");
    assert_eq!(first.id, marker.id);

    // Nor can an agent key publish anything but replies.
    match client_a
        .publish(&Event::new(format!(
            "compute.instance.activate;agent={agent_b}"
        )))
        .await
    {
        Err(Error::Api { status: 403, .. }) => {}
        other => panic!("expected a 403, got {other:?}"),
    }
}

#[tokio::test]
async fn a_project_key_sees_only_its_projects_events() {
    let server = TestServer::start().await;
    let (project_one, client_one) = server.project("one").await;
    let (project_two, client_two) = server.project("two").await;
    let one_id = ids::parse("project", &project_one).unwrap();
    let two_id = ids::parse("project", &project_two).unwrap();

    match client_one
        .subscribe(Subscribe::names(["resource.change"]).project(project_two.clone()))
        .await
    {
        Err(Error::Refused { status: 403, .. }) => {}
        other => panic!("expected a 403, got {other:?}"),
    }
    let mut stream_one = client_one
        .subscribe(Subscribe::names(["resource.change"]).project(project_one.clone()))
        .await
        .unwrap();
    let mut stream_two = client_two
        .subscribe(Subscribe::names(["resource.change;account=1"]))
        .await
        .unwrap();
    stream_one.next_event().await.unwrap().unwrap();
    stream_two.next_event().await.unwrap().unwrap();

    let for_one = Event::new(format!("resource.change;account={one_id}"));
    server.admin.publish(&for_one).await.unwrap();
    let for_two = Event::new(format!("resource.change;account={two_id}"));
    server.admin.publish(&for_two).await.unwrap();
    assert_eq!(next(&mut stream_one).await.id, for_one.id);
    assert_eq!(
        next(&mut stream_two).await.id,
        for_two.id,
        "project two saw project one's event first"
    );
    // The raw name reaches neither.
    let raw = Event::new("resource.change");
    server.admin.publish(&raw).await.unwrap();
    let again = Event::new(format!("resource.change;account={one_id}"));
    server.admin.publish(&again).await.unwrap();
    assert_eq!(next(&mut stream_one).await.id, again.id);
}

#[tokio::test]
async fn wrong_keys_get_401_on_every_endpoint() {
    let server = TestServer::start().await;
    let wrong_secret = server.client(ADMIN_ACCESS, "not-the-secret");
    let unknown = server.client("NOSUCHKEY", ADMIN_SECRET);
    for client in [&wrong_secret, &unknown] {
        match client.get("").await {
            Err(Error::Api {
                status: 401, code, ..
            }) => assert_eq!(code, "Unauthorized"),
            other => panic!("expected a 401, got {other:?}"),
        }
        match client.publish(&Event::new("reply.1")).await {
            Err(Error::Api { status: 401, .. }) => {}
            other => panic!("expected a 401, got {other:?}"),
        }
        match client.subscribe(Subscribe::names(["ping"])).await {
            Err(Error::Refused { status: 401, body }) => {
                assert!(body.contains("\"type\":\"error\""), "{body}")
            }
            other => panic!("expected a 401, got {other:?}"),
        }
    }
    let response = reqwest::get(format!("{}/v1", server.url)).await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()["www-authenticate"],
        "Basic realm=\"drover\""
    );
    // Six refused requests with a key, one without.
    assert_eq!(server.metric("drover_auth_failures_total"), 7.0);
}

#[tokio::test]
async fn a_plain_request_to_subscribe_gets_a_clear_4xx_never_200() {
    let server = TestServer::start().await;
    let http = reqwest::Client::new();
    for path in [
        "/v1/subscribe?eventNames=ping",
        &format!("/v1/projects/1a{}/subscribe", server.default_project()),
    ] {
        let response = http
            .get(format!("{}{path}", server.url))
            .basic_auth(ADMIN_ACCESS, Some(ADMIN_SECRET))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        assert!(status == 400 || status == 426, "{path}: {status}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["type"], "error");
        assert!(
            body["message"].as_str().unwrap().contains("WebSocket"),
            "{body}"
        );
        assert!(
            body["detail"].as_str().unwrap().contains("Upgrade"),
            "{body}"
        );
    }
}

#[tokio::test]
async fn malformed_events_get_clear_errors_and_change_nothing() {
    let server = TestServer::start().await;
    let mut stream = server
        .admin
        .subscribe(Subscribe::names(["reply.1", "marker"]))
        .await
        .unwrap();
    stream.next_event().await.unwrap().unwrap();
    let published_before = server.metric("drover_events_published_total");
    let http = reqwest::Client::new();
    let cases: &[(&str, u16, &str)] = &[
        ("{not json", 400, "BadRequest"),
        ("[1,2,3]", 422, "InvalidFormat"),
        (
            r#"{"name":"reply.1","transitioning":"perhaps"}"#,
            422,
            "InvalidFormat",
        ),
        (
            r#"{"name":"reply.1","time":"yesterday"}"#,
            422,
            "InvalidFormat",
        ),
        (r#"{"data":{}}"#, 422, "MissingRequired"),
        (r#"{"name":"reply 1"}"#, 422, "InvalidCharacters"),
    ];
    for (body, status, code) in cases {
        let response = http
            .post(format!("{}/v1/publish", server.url))
            .basic_auth(ADMIN_ACCESS, Some(ADMIN_SECRET))
            .body(*body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), *status, "{body}");
        let error: serde_json::Value = response.json().await.unwrap();
        assert_eq!(error["type"], "error", "{body}");
        assert_eq!(error["code"], *code, "{body}");
        assert_eq!(error["status"], *status, "{body}");
    }
    let oversized = format!(r#"{{"name":"reply.1","data":"{}"}}"#, "x".repeat(2 << 20));
    let response = http
        .post(format!("{}/v1/publish", server.url))
        .basic_auth(ADMIN_ACCESS, Some(ADMIN_SECRET))
        .body(oversized)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 413);
    assert_eq!(
        server.metric("drover_events_published_total"),
        published_before,
        "nothing was published"
    );
    // The subscriber saw none of it: the next event is the marker.
    let marker = Event::new("marker");
    server.admin.publish(&marker).await.unwrap();
    assert_eq!(next(&mut stream).await.id, marker.id);
    assert_eq!(
        server.metric("drover_bad_input_total"),
        7.0,
        "every case is counted"
    );
}

#[tokio::test]
async fn text_frames_from_a_subscriber_close_it_with_a_reason() {
    let server = TestServer::start().await;
    let mut stream = server
        .admin
        .subscribe(Subscribe::names(["x"]))
        .await
        .unwrap();
    stream.next_event().await.unwrap().unwrap();
    stream
        .send_text(r#"{"name":"publish.through.the.socket"}"#)
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(5), stream.next_non_ping())
        .await
        .unwrap()
    {
        Err(Error::Closed { code, reason }) => {
            assert_eq!(code, 1003);
            assert!(reason.contains("POST /v1/publish"), "{reason}");
        }
        other => panic!("expected a close, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_subscribe_parameters_are_refused() {
    let server = TestServer::start().await;
    for (subscribe, status) in [
        (Subscribe::names(["bad name"]), 422),
        (Subscribe::names(["ping"]).agent("not-an-id"), 422),
        (Subscribe::names(["ping"]).project("1a999999"), 404),
    ] {
        match server.admin.subscribe(subscribe).await {
            Err(Error::Refused { status: got, body }) => {
                assert_eq!(got, status, "{body}");
                assert!(body.contains("\"type\":\"error\""));
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_slow_consumer_is_cut_off_while_others_keep_receiving() {
    let server = TestServer::start_with(&[("subscribe.max.queued.messages", "4")]).await;
    // The slow one never reads until it has been cut off.
    let mut slow = server
        .admin
        .subscribe(Subscribe::names(["big"]))
        .await
        .unwrap();
    let mut fast = server
        .admin
        .subscribe(Subscribe::names(["big"]))
        .await
        .unwrap();
    fast.next_event().await.unwrap().unwrap();
    let hub = server.server.state.hub.clone();
    let payload = json!({"blob": "y".repeat(64 * 1024)});
    let mut published = 0;
    // Kernel buffers on loopback hold a few MiB; 64 KiB events fill them within a few hundred.
    while server.metric("drover_slow_consumer_disconnects_total") < 1.0 {
        assert!(published < 5_000, "the slow consumer was never cut off");
        let event = Event::new("big").with_data(payload.clone());
        hub.publish(&event);
        published += 1;
        assert_eq!(next(&mut fast).await.id, event.id);
    }
    // The others keep receiving.
    let after = Event::new("big");
    hub.publish(&after);
    assert_eq!(next(&mut fast).await.id, after.id);
    // The slow one finds the documented close code once it reads.
    let error = loop {
        match tokio::time::timeout(Duration::from_secs(10), slow.next_event())
            .await
            .unwrap()
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("closed without a reason"),
            Err(error) => break error,
        }
    };
    match error {
        Error::Closed { code, reason } => {
            assert_eq!(code, 1008);
            assert!(reason.contains("slow consumer"), "{reason}");
        }
        other => panic!("unexpected {other}"),
    }
    assert!(server.metric("drover_events_dropped_total") >= 1.0);
}

#[tokio::test]
async fn disconnect_event_logs_the_account_out() {
    let server = TestServer::start().await;
    let (project, client) = server.project("p").await;
    let mut stream = client
        .subscribe(Subscribe::names(["resource.change"]))
        .await
        .unwrap();
    stream.next_event().await.unwrap().unwrap();
    let project_id = ids::parse("project", &project).unwrap();
    server
        .admin
        .publish(&Event::new(format!("disconnect;account={project_id}")))
        .await
        .unwrap();
    assert_eq!(next(&mut stream).await.name(), "logout");
}

#[tokio::test]
async fn shutdown_closes_sockets_with_going_away() {
    let server = TestServer::start().await;
    let mut stream = server
        .admin
        .subscribe(Subscribe::names(["x"]))
        .await
        .unwrap();
    stream.next_event().await.unwrap().unwrap();
    let TestServer { server, .. } = server;
    let stopping = tokio::spawn(server.stop());
    match tokio::time::timeout(Duration::from_secs(10), stream.next_non_ping())
        .await
        .unwrap()
    {
        Err(Error::Closed { code, .. }) => assert_eq!(code, 1001),
        other => panic!("expected going away, got {other:?}"),
    }
    stopping.await.unwrap();
}

#[tokio::test]
async fn api_keys_are_created_listed_and_removed() {
    let server = TestServer::start().await;
    let (project, project_client) = server.project("keys").await;
    // A project key creates keys for its own project only.
    let own = project_client
        .post("apikeys", &json!({"name": "ci"}))
        .await
        .unwrap();
    assert_eq!(own["accountId"], project.as_str());
    assert_eq!(own["type"], "apiKey");
    let secret = own["secretValue"].as_str().unwrap();
    assert!(secret.len() >= 32);
    match project_client
        .post(
            "apikeys",
            &json!({"accountId": format!("1a{}", server.default_project())}),
        )
        .await
    {
        Err(Error::Api { status: 403, .. }) => {}
        other => panic!("expected a 403, got {other:?}"),
    }
    let ci = server.client(own["publicValue"].as_str().unwrap(), secret);
    ci.get("").await.unwrap();
    // Listing never shows secrets.
    let listed = project_client.get("apikeys").await.unwrap();
    assert_eq!(listed["type"], "collection");
    assert!(
        listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|key| key.get("secretValue").is_none())
    );
    assert!(
        listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|key| key["accountId"] == project.as_str())
    );
    // Removing it takes effect at once.
    let removed = project_client
        .delete(&format!("apikeys/{}", own["id"].as_str().unwrap()))
        .await
        .unwrap();
    assert_eq!(removed["state"], "removed");
    match ci.get("").await {
        Err(Error::Api { status: 401, .. }) => {}
        other => panic!("expected a 401, got {other:?}"),
    }
    // A user account's key acts within its project.
    let user = server
        .admin
        .post(
            "accounts",
            &json!({"kind": "user", "name": "ann", "projectId": project}),
        )
        .await
        .unwrap();
    let key = server
        .admin
        .post("apikeys", &json!({"accountId": user["id"]}))
        .await
        .unwrap();
    let ann = server.client(
        key["publicValue"].as_str().unwrap(),
        key["secretValue"].as_str().unwrap(),
    );
    ann.subscribe(Subscribe::names(["resource.change"]).project(project.clone()))
        .await
        .unwrap();
}

#[tokio::test]
async fn health_and_metrics_are_served() {
    let server = TestServer::start().await;
    let health = reqwest::get(format!("{}/healthz", server.url))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let metrics = reqwest::get(format!("{}/metrics", server.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "drover_connections",
        "drover_subscriptions",
        "drover_events_published_total",
        "drover_events_delivered_total",
        "drover_events_dropped_total",
        "drover_slow_consumer_disconnects_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    match server.admin.get("nothing-here").await {
        Err(Error::Api {
            status: 404, code, ..
        }) => assert_eq!(code, "NotFound"),
        other => panic!("expected a 404, got {other:?}"),
    }
    let missing = reqwest::get(format!("{}/nothing-here", server.url))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn the_bus_works_on_postgresql() {
    let Some(server) = TestServer::builder().postgres().try_start().await else {
        return;
    };
    assert_eq!(
        server.server.state.store.backend(),
        drover_store::Backend::Postgres
    );
    let (agent_id, agent) = server.agent(server.default_project(), "pg-host").await;
    let mut stream = agent
        .subscribe(Subscribe::names(["ping.test"]))
        .await
        .unwrap();
    stream.next_event().await.unwrap().unwrap();
    let event = Event::new(format!("ping.test;agent={agent_id}"));
    server.admin.publish(&event).await.unwrap();
    assert_eq!(next(&mut stream).await.id, event.id);
    let (_, project_client) = server.project("pg").await;
    project_client.get("").await.unwrap();
}

#[tokio::test]
async fn settings_change_without_a_restart_and_bad_values_are_refused() {
    let server = TestServer::start_with(&[("api.sub.max.pings", "100")]).await;
    let all = server.admin.get("settings").await.unwrap();
    let row = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "api.sub.ping.interval.millis")
        .unwrap()
        .clone();
    assert_eq!(row["value"], "5000");
    assert_eq!(row["source"], "Default");
    assert_eq!(row["inDb"], false);
    let env = server
        .admin
        .get("settings/api.sub.max.pings")
        .await
        .unwrap();
    assert_eq!(env["source"], "Environment");
    // A new interval applies to the next subscription at once.
    let changed = server
        .admin
        .put(
            "settings/api.sub.ping.interval.millis",
            &json!({"value": "40"}),
        )
        .await
        .unwrap();
    assert_eq!(changed["activeValue"], "40");
    assert_eq!(changed["inDb"], true);
    let mut stream = server
        .admin
        .subscribe(Subscribe::names(["x"]))
        .await
        .unwrap();
    assert_ping_interval(&mut stream, Duration::from_millis(40)).await;
    for (body, code) in [
        (json!({"value": "0"}), "InvalidOption"),
        (json!({"value": "soon"}), "InvalidOption"),
        (json!({}), "MissingRequired"),
    ] {
        match server
            .admin
            .put("settings/api.sub.ping.interval.millis", &body)
            .await
        {
            Err(Error::Api {
                status: 422,
                code: got,
                ..
            }) => assert_eq!(got, code),
            other => panic!("expected a 422, got {other:?}"),
        }
    }
    assert_eq!(
        server
            .admin
            .get("settings/api.sub.ping.interval.millis")
            .await
            .unwrap()["value"],
        "40"
    );
    match server
        .admin
        .put("settings/no.such.setting", &json!({"value": "1"}))
        .await
    {
        Err(Error::Api { status: 404, .. }) => {}
        other => panic!("expected a 404, got {other:?}"),
    }
    let (_, project) = server.project("p").await;
    match project
        .put(
            "settings/api.sub.ping.interval.millis",
            &json!({"value": "100"}),
        )
        .await
    {
        Err(Error::Api { status: 403, .. }) => {}
        other => panic!("expected a 403, got {other:?}"),
    }
    let restored = server
        .admin
        .delete("settings/api.sub.ping.interval.millis")
        .await
        .unwrap();
    assert_eq!(restored["value"], "5000");
    assert_eq!(restored["inDb"], false);
    assert_eq!(
        server
            .server
            .state
            .store
            .list_settings()
            .await
            .unwrap()
            .len(),
        0
    );
}
