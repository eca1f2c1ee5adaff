//! What the web UI needs from the server: its pages and assets at `/` without shadowing the
//! API, a WebSocket login a browser can send (the key as a subprotocol, never in the URL), and
//! the hint events of a live view (`process.change`, `agent.ping`).

use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine;
use drover_client::{Event, Subscribe};
use drover_test_support::agent::{Answer, Policy, TestAgent};
use drover_test_support::{
    ADMIN_ACCESS, ADMIN_SECRET, TestServer, next_event, wait_for, wait_state, within,
};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

fn protocol_credentials(access: &str, secret: &str) -> String {
    format!(
        "drover.basic.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{access}:{secret}"))
    )
}

/// A WebSocket handshake to `/v1/subscribe` with this `Sec-WebSocket-Protocol` header (if any)
/// and no `Authorization`, as a browser sends it.
async fn browser_socket(
    server: &TestServer,
    names: &[&str],
    protocols: Option<&str>,
) -> Result<
    (
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        tungstenite::handshake::client::Response,
    ),
    tungstenite::Error,
> {
    let query: Vec<String> = names.iter().map(|n| format!("eventNames={n}")).collect();
    let url = format!(
        "{}/v1/subscribe?{}",
        server.url.replacen("http", "ws", 1),
        query.join("&")
    );
    let mut request = url.into_client_request().unwrap();
    if let Some(protocols) = protocols {
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(protocols).unwrap(),
        );
    }
    tokio_tungstenite::connect_async(request).await
}

async fn next_text<S>(socket: &mut S) -> Value
where
    S: futures_util::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a message within 10 s")
            .expect("an open socket")
            .expect("a readable socket");
        if let Message::Text(text) = message {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

fn refused_status(error: tungstenite::Error) -> (u16, Value) {
    match error {
        tungstenite::Error::Http(response) => {
            let body = response
                .body()
                .as_ref()
                .map(|bytes| serde_json::from_slice(bytes).unwrap_or(Value::Null))
                .unwrap_or(Value::Null);
            (response.status().as_u16(), body)
        }
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn the_ui_is_served_at_the_root_without_shadowing_the_api() {
    let server = TestServer::start().await;
    let client = http();

    for path in [
        "/",
        "/processes",
        "/processes/1pi7",
        "/containers",
        "/login",
    ] {
        let response = client
            .get(format!("{}{path}", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers().clone();
        assert_eq!(
            headers["content-type"], "text/html; charset=utf-8",
            "{path}"
        );
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"));
        let body = response.text().await.unwrap();
        assert!(
            body.contains(r#"src="/assets/js/main.js""#),
            "{path}: {body}"
        );
    }

    let css = client
        .get(format!("{}/assets/app.css", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(css.status(), 200);
    assert_eq!(css.headers()["content-type"], "text/css; charset=utf-8");
    assert_eq!(css.headers()["cache-control"], "no-cache");
    let etag = css.headers()["etag"].to_str().unwrap().to_owned();
    let again = client
        .get(format!("{}/assets/app.css", server.url))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    let module = client
        .get(format!("{}/assets/js/main.js", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        module.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );

    // The new pages, a detail page's deep link included, are the UI too.
    for path in [
        "/stacks",
        "/stacks/1st1",
        "/settings",
        "/apikeys",
        "/containers/1i1",
        "/services/1s1",
    ] {
        let response = client
            .get(format!("{}{path}", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert!(
            response
                .text()
                .await
                .unwrap()
                .contains("/assets/js/main.js")
        );
    }

    // Unknown assets and unknown paths are 404s with the API's error body, not the page.
    for path in ["/assets/nope.js", "/nope", "/processesx", "/v1/nope"] {
        let response = client
            .get(format!("{}{path}", server.url))
            .basic_auth(ADMIN_ACCESS, Some(ADMIN_SECRET))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["type"], "error", "{path}");
    }
    // A browser asking for an unknown page gets the UI with a 404 (it shows its own "not
    // found" page); the API, the assets and other methods keep the error body.
    for path in ["/nope", "/processesx", "/a/b/c"] {
        let response = client
            .get(format!("{}{path}", server.url))
            .header("accept", "text/html,application/xhtml+xml,*/*;q=0.8")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{path}");
        assert_eq!(
            response.headers()["content-type"],
            "text/html; charset=utf-8",
            "{path}"
        );
        assert!(response.headers().contains_key("content-security-policy"));
        assert!(
            response
                .text()
                .await
                .unwrap()
                .contains("/assets/js/main.js"),
            "{path}"
        );
    }
    for (method, path) in [
        (reqwest::Method::GET, "/v1/nope"),
        (reqwest::Method::GET, "/v2-beta/nope"),
        (reqwest::Method::GET, "/assets/nope.js"),
        (reqwest::Method::POST, "/nope"),
    ] {
        let response = client
            .request(method.clone(), format!("{}{path}", server.url))
            .header("accept", "text/html")
            .basic_auth(ADMIN_ACCESS, Some(ADMIN_SECRET))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{method} {path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["type"], "error", "{method} {path}");
    }

    // The API, health and metrics keep their own answers.
    let api = client
        .get(format!("{}/v1/containers", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 401);
    let root = client
        .get(format!("{}/v1", server.url))
        .basic_auth(ADMIN_ACCESS, Some(ADMIN_SECRET))
        .send()
        .await
        .unwrap();
    assert_eq!(root.json::<Value>().await.unwrap()["type"], "apiVersion");
    let health = client
        .get(format!("{}/healthz", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.json::<Value>().await.unwrap()["status"], "ok");
    let metrics = client
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("drover_"), "{metrics}");
}

#[tokio::test]
async fn a_browser_subscribes_with_its_key_in_a_subprotocol() {
    let server = TestServer::start().await;
    let protocols = format!(
        "drover.v1, {}",
        protocol_credentials(ADMIN_ACCESS, ADMIN_SECRET)
    );
    let (mut socket, response) = browser_socket(&server, &["hello.ui"], Some(&protocols))
        .await
        .expect("the handshake succeeds");
    // The server selects the real protocol, never echoes the credentials.
    assert_eq!(response.headers()["sec-websocket-protocol"], "drover.v1");
    assert_eq!(next_text(&mut socket).await["name"], "ping");
    server
        .admin
        .publish(&Event::new("hello.ui").with_data(json!({"n": 1})))
        .await
        .unwrap();
    let event = next_text(&mut socket).await;
    assert_eq!(event["name"], "hello.ui");
    assert_eq!(event["data"], json!({"n": 1}));

    // A project key subscribes in its own project's scope, as over Basic auth: it does not
    // receive the raw name an admin publishes.
    let (project, access, secret) = server.project_key("ui-project").await;
    let protocols = format!("drover.v1, {}", protocol_credentials(&access, &secret));
    let (mut project_socket, _) = browser_socket(&server, &["hello.ui"], Some(&protocols))
        .await
        .expect("a project key subscribes");
    assert_eq!(next_text(&mut project_socket).await["name"], "ping");
    server.admin.publish(&Event::new("hello.ui")).await.unwrap();
    // Then one for its project: the first event it gets must be that one (a raw event
    // delivered to it would come first).
    let numeric = drover_proto::ids::parse("project", &project).unwrap();
    server
        .admin
        .publish(
            &Event::new(format!("hello.ui;account={numeric}")).with_data(json!({"mine": true})),
        )
        .await
        .unwrap();
    let event = loop {
        let event = next_text(&mut project_socket).await;
        if event["name"] != "ping" {
            break event;
        }
    };
    assert_eq!(
        event["data"],
        json!({"mine": true}),
        "a project key received a raw event: {event}"
    );
}

#[tokio::test]
async fn subprotocol_credentials_are_checked_like_basic_auth() {
    let server = TestServer::start().await;
    let failures_before = server.metric("drover_auth_failures_total");

    let wrong = format!(
        "drover.v1, {}",
        protocol_credentials(ADMIN_ACCESS, "not-the-secret")
    );
    let (status, body) = refused_status(
        browser_socket(&server, &["x"], Some(&wrong))
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 401);
    assert_eq!(body["message"], "invalid API key");

    let malformed = "drover.v1, drover.basic.!!!";
    let (status, _) = refused_status(
        browser_socket(&server, &["x"], Some(malformed))
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 401);

    // Credentials without the protocol the server can select would fail in the browser
    // after the fact; the server says so instead.
    let alone = protocol_credentials(ADMIN_ACCESS, ADMIN_SECRET);
    let (status, body) = refused_status(
        browser_socket(&server, &["x"], Some(&alone))
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 400);
    assert!(body["message"].as_str().unwrap().contains("drover.v1"));

    // No credentials at all: the usual 401.
    let (status, _) = refused_status(
        browser_socket(&server, &["x"], Some("drover.v1"))
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 401);
    assert_eq!(
        server.metric("drover_auth_failures_total"),
        failures_before + 3.0
    );

    // The subprotocol is for the WebSocket only: REST still wants Basic auth.
    let rest = http()
        .get(format!("{}/v1/containers", server.url))
        .header(
            "sec-websocket-protocol",
            format!(
                "drover.v1, {}",
                protocol_credentials(ADMIN_ACCESS, ADMIN_SECRET)
            ),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(rest.status(), 401);

    // Basic-auth clients are unchanged: no subprotocol is selected for them.
    let mut stream = server
        .admin
        .subscribe(Subscribe::names(["x"]))
        .await
        .unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), stream.next_event())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .name(),
        "ping"
    );
}

/// A host with an active agent answering as `policy` says.
async fn host_with_agent(server: &TestServer, policy: Policy) -> TestAgent {
    server.host_with_agent("ui-host", policy).await.2
}

#[tokio::test]
async fn every_attempt_that_calls_an_agent_announces_process_change() {
    let server = TestServer::start_with(&[
        ("eventing.timeout.millis", "2000"),
        ("process.retry_max_wait.millis", "50"),
        ("process.poll.millis", "50"),
    ])
    .await;
    // The first start fails, the second succeeds: two attempts, two announcements.
    let _agent = host_with_agent(
        &server,
        std::sync::Arc::new(|request: &Event, n| {
            if request.name() == "compute.instance.activate" && n == 0 {
                Answer::Error("first start fails".into())
            } else {
                Answer::Ok
            }
        }),
    )
    .await;
    let mut stream = server
        .admin
        .subscribe(Subscribe::names(["process.change"]))
        .await
        .unwrap();
    let container = server
        .admin
        .post(
            "containers",
            &json!({"name": "ui-c", "command": ["sleep", "1"]}),
        )
        .await
        .unwrap();
    let id = container["id"].as_str().unwrap();
    for attempt in 1..=2 {
        let event = next_event(&mut stream).await;
        assert_eq!(event.name(), "process.change", "attempt {attempt}");
        assert_eq!(event.resource_type.as_deref(), Some("container"));
        assert_eq!(event.resource_id.as_deref(), Some(id));
        let data = event.data.unwrap();
        assert_eq!(data["processName"], "instance.start");
        assert_eq!(data["command"], "compute.instance.activate");
        assert_eq!(data["phase"], "calling");
    }
    // A project key never sees it: processes are for admins.
    let (project, project_client) = server.project("ui-other").await;
    let mut project_stream = project_client
        .subscribe(Subscribe::names(["process.change"]))
        .await
        .unwrap();
    assert_eq!(
        within("the first ping", project_stream.next_event())
            .await
            .unwrap()
            .unwrap()
            .name(),
        "ping"
    );
    let path = format!("containers/{id}");
    wait_state(&server.admin, &path, "running").await;
    let stopping = server
        .admin
        .post(&format!("{path}?action=stop"), &json!({}))
        .await
        .expect("the stop is accepted");
    assert_eq!(stopping["state"], "stopping");
    // The stop's attempt is announced (to the admin) ...
    let event = next_event(&mut stream).await;
    assert_eq!(event.resource_id.as_deref(), Some(id));
    let data = event.data.unwrap();
    assert_eq!(data["processName"], "instance.stop");
    assert_eq!(data["command"], "compute.instance.deactivate");
    wait_state(&server.admin, &path, "stopped").await;
    // ... and not to the project: the first event its stream gets is one published to its
    // project after the announcement.
    let numeric = drover_proto::ids::parse("project", &project).unwrap();
    let marker = Event::new(format!("process.change;account={numeric}"));
    server.admin.publish(&marker).await.unwrap();
    let got = next_event(&mut project_stream).await;
    assert_eq!(
        got.id, marker.id,
        "a project key received a process.change: {got:?}"
    );
}

#[tokio::test]
async fn agent_ping_tells_when_an_agent_last_answered() {
    let server = TestServer::start_with(&[
        ("agent.ping.interval.millis", "50"),
        ("agent.ping.timeout.millis", "100"),
        ("agent.ping.reconnect.after.failed.count", "2"),
    ])
    .await;
    let agent = host_with_agent(&server, TestAgent::always_ok()).await;
    let agent_ref = format!("1ag{}", agent.agent_id);
    let mut stream = server
        .admin
        .subscribe(Subscribe::names([
            "agent.ping",
            "state.change",
            "test.marker",
        ]))
        .await
        .unwrap();
    let before = drover_proto::event::now_millis();
    let next_ping = async |stream: &mut drover_client::EventStream| loop {
        let event = next_event(stream).await;
        if event.name() == "agent.ping" {
            break event;
        }
    };
    let first = next_ping(&mut stream).await;
    assert_eq!(first.resource_type.as_deref(), Some("agent"));
    assert_eq!(first.resource_id.as_deref(), Some(agent_ref.as_str()));
    let second = next_ping(&mut stream).await;
    let (t1, t2) = (
        first.data.unwrap()["lastPing"].as_i64().unwrap(),
        second.data.unwrap()["lastPing"].as_i64().unwrap(),
    );
    assert!(t1 >= before - 1000 && t2 >= t1, "{t1} {t2}");

    // A silent agent (connected and pinged, answering nothing) is not announced. Misses move
    // it to reconnecting; any announcement of an answer from before the silence comes before
    // that change on this stream.
    agent.answer_pings.store(false, Ordering::SeqCst);
    loop {
        let event = next_event(&mut stream).await;
        if event.name() == "state.change"
            && event.resource_id.as_deref() == Some(agent_ref.as_str())
            && event.data.as_ref().unwrap()["state"] == "reconnecting"
        {
            break;
        }
    }
    // Three more pings reach it and go unanswered (the monitor pings an agent again only once
    // it has handled the previous ping's result), then a marker: nothing but the marker may come.
    let pinged = agent.pings.load(Ordering::SeqCst);
    wait_for("three more unanswered pings", || async {
        (agent.pings.load(Ordering::SeqCst) >= pinged + 3).then_some(())
    })
    .await;
    let marker = Event::new("test.marker");
    server.admin.publish(&marker).await.unwrap();
    loop {
        let event = next_event(&mut stream).await;
        assert_ne!(
            event.name(),
            "agent.ping",
            "agent.ping without an answer: {event:?}"
        );
        if event.id == marker.id {
            break;
        }
    }
}

#[tokio::test]
async fn setting_and_api_key_changes_are_announced_for_live_pages() {
    let server = TestServer::start().await;
    let mut stream = server
        .admin
        .subscribe(Subscribe::names(["setting.change", "apikey.change"]))
        .await
        .unwrap();
    assert_eq!(
        within("the first ping", stream.next_event())
            .await
            .unwrap()
            .unwrap()
            .name(),
        "ping"
    );

    server
        .admin
        .put(
            "settings/events.purge.after.seconds",
            &json!({"value": "43201"}),
        )
        .await
        .unwrap();
    let event = next_event(&mut stream).await;
    assert_eq!(event.name(), "setting.change");
    let data = event.data.unwrap();
    assert_eq!(data["name"], "events.purge.after.seconds");
    assert_eq!(data["value"], "43201");
    assert_eq!(data["source"], "Database");
    server
        .admin
        .delete("settings/events.purge.after.seconds")
        .await
        .unwrap();
    let event = next_event(&mut stream).await;
    assert_eq!(event.name(), "setting.change");
    assert_eq!(event.data.unwrap()["source"], "Default");
    // A refused value changes nothing and announces nothing.
    assert!(
        server
            .admin
            .put(
                "settings/events.purge.after.seconds",
                &json!({"value": "soon"}),
            )
            .await
            .is_err()
    );

    // A project key hears of its own keys only, and never gets a secret in the event.
    let (_project, project_client) = server.project("keys-live").await;
    let mut project_stream = project_client
        .subscribe(Subscribe::names(["apikey.change"]))
        .await
        .unwrap();
    assert_eq!(
        within("the first ping", project_stream.next_event())
            .await
            .unwrap()
            .unwrap()
            .name(),
        "ping"
    );
    let mine = project_client
        .post("apikeys", &json!({"name": "ci"}))
        .await
        .unwrap();
    // The first event after the refused setting is the project's key's creation.
    let event = next_event(&mut stream).await;
    assert_eq!(
        event.name(),
        "apikey.change",
        "the refused setting was announced: {event:?}"
    );
    assert_eq!(event.data.unwrap()["change"], "created");
    let event = next_event(&mut stream).await;
    let data = event.data.unwrap();
    assert_eq!(data["id"], mine["id"]);
    assert_eq!(data["change"], "created");
    assert!(data.get("secretValue").is_none(), "{data}");
    let event = next_event(&mut project_stream).await;
    assert_eq!(event.name(), "apikey.change");
    assert_eq!(event.data.unwrap()["id"], mine["id"]);

    // An admin's own key is announced to admins, not to the project.
    let other = server
        .admin
        .post("apikeys", &json!({"name": "admin-2"}))
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut stream).await.data.unwrap()["id"],
        other["id"]
    );
    project_client
        .delete(&format!("apikeys/{}", mine["id"].as_str().unwrap()))
        .await
        .unwrap();
    let event = next_event(&mut project_stream).await;
    assert_eq!(
        event.data.unwrap(),
        json!({"id": mine["id"], "change": "removed"}),
        "the project heard of another account's key"
    );
    let event = next_event(&mut stream).await;
    assert_eq!(event.data.unwrap()["change"], "removed");
}
