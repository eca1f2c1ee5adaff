//! The API at `/v2-beta`, as the original's Go libraries use it, and `;handler=` subscriptions.
//!
//! [`GoClient`] behaves as go-rancher v2 (`setupRancherBaseClient`, `doCreate`, `doAction`, …)
//! and event-subscriber (`NewEventRouter`, `StartHandler`, `subscribeToEvents`) do: a base URL
//! whose path is `/v1` is rewritten to `/v2-beta` before the first request; the base answers 200
//! with `X-API-Schemas`, whose schemas are fetched; every request after that follows a schema's
//! `links.collection` or a resource's `links.self` and `actions`; the subscribe URL is the
//! `subscribe` schema's collection link with `http` made `ws`; event names go in repeated
//! `eventNames` parameters, with `;handler=<name>` appended by `StartHandler`.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use drover_proto::names;
use drover_test_support::agent::TestAgent;
use drover_test_support::{ADMIN_ACCESS, ADMIN_SECRET, FAST, TestServer};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long one answer or event may take.
const WAIT: Duration = Duration::from_secs(20);

/// A client that does what go-rancher v2 and event-subscriber do, and nothing else.
struct GoClient {
    http: reqwest::Client,
    /// The base URL after go-rancher's rewrite.
    url: String,
    access: String,
    secret: String,
    /// The schemas by id, as `rancherClient.Types`.
    types: HashMap<String, Value>,
}

impl GoClient {
    /// `NewRancherClient`: rewrites a `/v1` base to `/v2-beta`, GETs it (200 and an
    /// `X-API-Schemas` header required), and GETs the schemas there unless they are the base.
    async fn new(url: &str, access: &str, secret: &str) -> GoClient {
        let mut parsed = reqwest::Url::parse(url).unwrap();
        let path = parsed.path().to_owned();
        if path == "/v1" || path.starts_with("/v1/") {
            parsed.set_path(&path.replacen("/v1", "/v2-beta", 1));
        }
        let url = parsed.to_string();
        let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
        let response = http
            .get(&url)
            .basic_auth(access, Some(secret))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "GET {url}");
        let schemas_url = response
            .headers()
            .get("x-api-schemas")
            .unwrap_or_else(|| panic!("Failed to find schema at [{url}]"))
            .to_str()
            .unwrap()
            .to_owned();
        let schemas: Value = if schemas_url == url {
            response.json().await.unwrap()
        } else {
            let response = http
                .get(&schemas_url)
                .basic_auth(access, Some(secret))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "GET {schemas_url}");
            response.json().await.unwrap()
        };
        let types = schemas["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|schema| (schema["id"].as_str().unwrap().to_owned(), schema.clone()))
            .collect();
        GoClient {
            http,
            url,
            access: access.to_owned(),
            secret: secret.to_owned(),
            types,
        }
    }

    async fn send(&self, method: reqwest::Method, url: &str, body: Option<&Value>) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, url)
            .basic_auth(&self.access, Some(&self.secret));
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// `doGet`: anything but 200 is an error.
    async fn get(&self, url: &str) -> Value {
        let (status, body) = self.send(reqwest::Method::GET, url, None).await;
        assert_eq!(status, 200, "GET {url}: {body}");
        body
    }

    /// `doModify`: 300 and above is an error.
    async fn modify(&self, method: reqwest::Method, url: &str, body: Option<&Value>) -> Value {
        let (status, answer) = self.send(method.clone(), url, body).await;
        assert!(status < 300, "{method} {url}: {status} {answer}");
        answer
    }

    /// A schema's `links.collection` (`Failed to find collection URL` without one).
    fn collection(&self, schema_type: &str) -> String {
        let schema = self
            .types
            .get(schema_type)
            .unwrap_or_else(|| panic!("Unknown schema type [{schema_type}]"));
        schema["links"]["collection"]
            .as_str()
            .unwrap_or_else(|| panic!("Failed to find collection URL for [{schema_type}]"))
            .to_owned()
    }

    /// `doCreate`: POST to the schema's collection link.
    async fn create(&self, schema_type: &str, body: &Value) -> Value {
        let url = self.collection(schema_type);
        self.modify(reqwest::Method::POST, &url, Some(body)).await
    }

    /// `doList`: GET the schema's collection link with filters.
    async fn list(&self, schema_type: &str, filters: &[(&str, &str)]) -> Value {
        let mut url = reqwest::Url::parse(&self.collection(schema_type)).unwrap();
        url.query_pairs_mut().extend_pairs(filters);
        self.get(url.as_str()).await
    }

    /// `doById`: the collection link, a slash, the id.
    async fn by_id(&self, schema_type: &str, id: &str) -> Value {
        self.get(&format!("{}/{id}", self.collection(schema_type)))
            .await
    }

    /// `doAction`: POST to the resource's `actions[name]`, no input.
    async fn action(&self, resource: &Value, name: &str) -> Value {
        let url = resource["actions"][name]
            .as_str()
            .unwrap_or_else(|| panic!("Action [{name}] not available on [{resource}]"));
        self.modify(reqwest::Method::POST, url, None).await
    }

    /// `Reload`: GET `links.self`.
    async fn reload(&self, resource: &Value) -> Value {
        self.get(resource["links"]["self"].as_str().unwrap()).await
    }

    /// `doResourceDelete`: DELETE `links.self`.
    async fn delete(&self, resource: &Value) -> Value {
        let url = resource["links"]["self"].as_str().unwrap();
        self.modify(reqwest::Method::DELETE, url, None).await
    }

    /// `Publish.Create`.
    async fn publish(&self, event: &Value) -> Value {
        self.create("publish", event).await
    }

    /// `NewEventRouter`: the `subscribe` schema's collection link, `http` made `ws`; and, as
    /// `subscribeToEvents` does, a path that starts with `//` collapsed.
    fn subscribe_url(&self) -> String {
        let mut url = self.collection("subscribe");
        if url.starts_with("http") {
            url = url.replacen("http", "ws", 1);
        }
        let mut parsed = reqwest::Url::parse(&url).unwrap();
        if parsed.path().starts_with("//") {
            let mut path = parsed.path().to_owned();
            while path.contains("//") {
                path = path.replace("//", "/");
            }
            parsed.set_path(&path);
        }
        parsed.to_string()
    }

    /// `StartHandler(handler)` (or `Start` without one): subscribes to every name with
    /// `;handler=<handler>` appended, in repeated `eventNames` (sorted, as `url.Values.Encode`),
    /// with Basic auth; waits for the server's first `ping`, after which the names are routed.
    async fn subscribe(&self, names: &[&str], handler: Option<&str>) -> Socket {
        let suffix = handler.map(|h| format!(";handler={h}")).unwrap_or_default();
        let mut query = form_urlencoded::Serializer::new(String::new());
        for name in names {
            query.append_pair("eventNames", &format!("{name}{suffix}"));
        }
        let url = format!("{}?{}", self.subscribe_url(), query.finish());
        let mut request = url.as_str().into_client_request().unwrap();
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", self.access, self.secret));
        request
            .headers_mut()
            .insert("authorization", format!("Basic {token}").parse().unwrap());
        let (mut socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .unwrap_or_else(|error| panic!("subscribing at {url}: {error}"));
        let first = next_event_or_ping(&mut socket).await;
        assert_eq!(first["name"], "ping", "{first}");
        socket
    }
}

/// The next event (control frames skipped), within [`WAIT`].
async fn next_event_or_ping(socket: &mut Socket) -> Value {
    next_text(socket, |_| true).await
}

/// The next event that is not the server's keep-alive `ping`, within [`WAIT`].
async fn next_event(socket: &mut Socket) -> Value {
    next_text(socket, |event| event["name"] != "ping").await
}

async fn next_text(socket: &mut Socket, wanted: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let message = tokio::time::timeout_at(deadline, socket.next())
            .await
            .expect("an event in time")
            .expect("an open socket")
            .expect("a readable socket");
        if let Message::Text(text) = message {
            let event: Value = serde_json::from_str(&text).unwrap();
            if wanted(&event) {
                return event;
            }
        }
    }
}

/// Reloads `resource` until it is in `state` and not transitioning, reading the `resource.change`
/// stream between reloads (no polling).
async fn await_state(go: &GoClient, changes: &mut Socket, resource: &Value, state: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = go.reload(resource).await;
        if now["state"] == state && now["transitioning"] == "no" {
            return now;
        }
        tokio::time::timeout_at(deadline, next_event(changes))
            .await
            .unwrap_or_else(|_| panic!("never {state}; last seen {now:#}"));
    }
}

/// Every absolute link in `value`: strings that start with `http://` or `ws://` and this
/// server's address, and have a path (a node's bare `address` is no link).
fn links<'a>(value: &'a Value, server: &TestServer, out: &mut Vec<&'a str>) {
    let address = server.server.addr.to_string();
    match value {
        Value::String(text)
            if ["http://", "ws://"].iter().any(|scheme| {
                text.strip_prefix(&format!("{scheme}{address}"))
                    .is_some_and(|rest| !rest.is_empty())
            }) =>
        {
            out.push(text)
        }
        Value::Object(map) => map.values().for_each(|v| links(v, server, out)),
        Value::Array(items) => items.iter().for_each(|v| links(v, server, out)),
        _ => {}
    }
}

/// Asserts that `value` has links and all are under `http://host/<version>` (or `ws://`).
fn all_under(value: &Value, server: &TestServer, version: &str, what: &str) {
    let mut found = Vec::new();
    links(value, server, &mut found);
    assert!(!found.is_empty(), "{what} has no links: {value:#}");
    let http = format!("{}/{version}", server.url);
    let ws = http.replacen("http", "ws", 1);
    for link in found {
        let under = [&http, &ws].iter().any(|base| {
            link.strip_prefix(base.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', '?']))
        });
        assert!(under, "{what}: {link} is not under /{version}");
    }
}

#[tokio::test]
async fn a_go_client_configured_with_v1_drives_a_container_through_v2_beta() {
    let server = TestServer::start_with(FAST).await;
    let (_, _, _agent) = server
        .host_with_agent("host-1", TestAgent::always_ok())
        .await;
    let go = GoClient::new(&format!("{}/v1", server.url), ADMIN_ACCESS, ADMIN_SECRET).await;
    assert_eq!(go.url, format!("{}/v2-beta", server.url));
    for schema in go.types.values() {
        all_under(schema, &server, "v2-beta", "a schema");
    }
    assert_eq!(
        go.subscribe_url(),
        format!("{}/v2-beta/subscribe", server.url.replacen("http", "ws", 1))
    );
    let mut changes = go.subscribe(&["resource.change"], None).await;

    let created = go
        .create(
            "container",
            &json!({"name": "go", "command": ["sleep", "1000"]}),
        )
        .await;
    all_under(&created, &server, "v2-beta", "the create's answer");
    let running = await_state(&go, &mut changes, &created, "running").await;
    all_under(&running, &server, "v2-beta", "a container");
    let stopping = go.action(&running, "stop").await;
    all_under(&stopping, &server, "v2-beta", "an action's answer");
    let stopped = await_state(&go, &mut changes, &stopping, "stopped").await;
    let starting = go.action(&stopped, "start").await;
    let running = await_state(&go, &mut changes, &starting, "running").await;
    let id = running["id"].as_str().unwrap();
    assert_eq!(go.by_id("container", id).await["state"], "running");
    let listed = go.list("container", &[("name", "go")]).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{listed:#}");
    all_under(&listed, &server, "v2-beta", "a collection");
    // The project-scoped form, under /v2-beta too.
    let project = format!("1a{}", server.default_project());
    let scoped = go
        .get(&format!("{}/projects/{project}/containers?name=go", go.url))
        .await;
    assert_eq!(scoped["data"][0]["id"], id);
    all_under(&scoped, &server, "v2-beta", "a project-scoped collection");
    let removing = go.delete(&running).await;
    all_under(&removing, &server, "v2-beta", "a delete's answer");
    await_state(&go, &mut changes, &removing, "removed").await;
}

#[tokio::test]
async fn every_response_links_under_the_path_the_request_used() {
    let server = TestServer::start_with(FAST).await;
    let (host, _, _agent) = server
        .host_with_agent("host-1", TestAgent::always_ok())
        .await;
    let container = server
        .admin
        .post(
            "containers",
            &json!({"name": "c", "command": ["sleep", "1000"], "requestedHostId": host}),
        )
        .await
        .unwrap();
    let id = container["id"].as_str().unwrap().to_owned();
    drover_test_support::wait_state(&server.admin, &format!("containers/{id}"), "running").await;
    let project = format!("1a{}", server.default_project());
    let process = server.admin.get("processinstances?limit=1").await.unwrap()["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    server
        .admin
        .post("registrationtokens", &json!({}))
        .await
        .unwrap();
    let key = server.admin.post("apikeys", &json!({})).await.unwrap();
    // Every kind of answer: the root, schemas, collections (plain, project-scoped, paged),
    // resources of every family, processes, settings, keys, tokens, the cluster, clean-up.
    let paths = [
        "".to_owned(),
        "/".to_owned(),
        "/schemas".to_owned(),
        "/schemas/container".to_owned(),
        "/containers".to_owned(),
        "/containers?limit=1".to_owned(),
        format!("/containers/{id}"),
        format!("/projects/{project}/containers"),
        format!("/projects/{project}/containers/{id}"),
        "/hosts".to_owned(),
        format!("/hosts/{host}"),
        "/agents".to_owned(),
        "/projects".to_owned(),
        format!("/projects/{project}"),
        "/accounts".to_owned(),
        "/apikeys".to_owned(),
        format!("/apikeys/{}", key["id"].as_str().unwrap()),
        format!("/projects/{project}/apikeys"),
        "/registrationtokens".to_owned(),
        "/processinstances?limit=3".to_owned(),
        format!("/processinstances/{process}"),
        format!("/processexecutions?processInstanceId={process}"),
        "/processsummary".to_owned(),
        "/settings".to_owned(),
        "/settings/process.workers".to_owned(),
        "/clusternodes".to_owned(),
        "/cleanup".to_owned(),
        "/serviceevents?limit=1".to_owned(),
    ];
    let http = reqwest::Client::new();
    let get = |version: &'static str, path: String| {
        let http = http.clone();
        let base = server.url.clone();
        let url = format!("{}/{version}{path}", server.url);
        async move {
            let response = http
                .get(&url)
                .basic_auth(ADMIN_ACCESS, Some(ADMIN_SECRET))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "GET {url}");
            let schemas = response.headers()["x-api-schemas"]
                .to_str()
                .unwrap()
                .to_owned();
            assert_eq!(schemas, format!("{base}/{version}/schemas"));
            (response.json::<Value>().await.unwrap(), url)
        }
    };
    for path in &paths {
        let (v1, url) = get("v1", path.clone()).await;
        all_under(&v1, &server, "v1", &url);
        let (v2, url) = get("v2-beta", path.clone()).await;
        all_under(&v2, &server, "v2-beta", &url);
        // The same system: the same answer but for the version in its links, where nothing
        // moves between two reads.
        let moving = [
            "/process",
            "/clusternodes",
            "/cleanup",
            "/settings",
            "/hosts",
            "/agents",
        ]
        .iter()
        .any(|prefix| path.starts_with(prefix));
        if !moving {
            let v1_text = v1.to_string().replace(
                &format!("{}/v1", server.url.trim_start_matches("http")),
                &format!("{}/v2-beta", server.url.trim_start_matches("http")),
            );
            let mut expected: Value = serde_json::from_str(&v1_text).unwrap();
            if path.is_empty() || path == "/" {
                expected["id"] = json!("v2-beta");
            }
            assert_eq!(v2, expected, "GET {path} under /v1 and /v2-beta");
        }
    }
    // Publishing works under /v2-beta; errors name the path the request used.
    let publish = http
        .post(format!("{}/v2-beta/publish", server.url))
        .basic_auth(ADMIN_ACCESS, Some(ADMIN_SECRET))
        .json(&json!({"name": "v2beta.test"}))
        .send()
        .await
        .unwrap();
    assert_eq!(publish.status(), 201);
    let missing = http
        .get(format!("{}/v2-beta/no/such/path/here", server.url))
        .basic_auth(ADMIN_ACCESS, Some(ADMIN_SECRET))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let error: Value = missing.json().await.unwrap();
    assert_eq!(error["type"], "error");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("/v2-beta/no/such/path/here"),
        "{error}"
    );
    // Not an API path: `/v2-betax` is no alias.
    let near = http
        .get(format!("{}/v2-betax/containers", server.url))
        .basic_auth(ADMIN_ACCESS, Some(ADMIN_SECRET))
        .send()
        .await
        .unwrap();
    assert_eq!(near.status(), 404);
}

#[tokio::test]
async fn handler_subscriptions_keep_their_suffix_and_stay_in_their_project() {
    let server = TestServer::start_with(FAST).await;
    let (a, a_access, a_secret) = server.project_key("a").await;
    let (b, b_access, b_secret) = server.project_key("b").await;
    let a_num = drover_proto::ids::parse("project", &a).unwrap();
    let b_num = drover_proto::ids::parse("project", &b).unwrap();
    let v1 = format!("{}/v1", server.url);
    let admin = GoClient::new(&v1, ADMIN_ACCESS, ADMIN_SECRET).await;
    let ext_a = GoClient::new(&v1, &a_access, &a_secret).await;
    let ext_b = GoClient::new(&v1, &b_access, &b_secret).await;
    // The Go router's `StartHandler("x")` with a handler for `instance.start`.
    let mut raw = admin.subscribe(&["instance.start"], Some("x")).await;
    let mut in_a = ext_a.subscribe(&["instance.start"], Some("x")).await;
    let mut in_b = ext_b.subscribe(&["instance.start"], Some("x")).await;
    // A scope forged after the handler changes nothing.
    let mut forged = ext_a
        .subscribe(
            &[&format!("instance.start;handler=x;account={b_num}")],
            None,
        )
        .await;

    let raw_name = names::for_handler("instance.start", "x", None);
    let a_name = names::for_handler("instance.start", "x", Some(a_num));
    let b_name = names::for_handler("instance.start", "x", Some(b_num));
    for (name, tag) in [
        (&raw_name, "raw1"),
        (&a_name, "a1"),
        (&b_name, "b1"),
        (&a_name, "a2"),
        (&b_name, "b2"),
        (&raw_name, "raw2"),
    ] {
        admin
            .publish(&json!({"name": name, "resourceType": "instance", "data": {"tag": tag}}))
            .await;
    }
    for (socket, who, expected) in [
        (&mut raw, "the admin", ["raw1", "raw2"]),
        (&mut in_a, "project A", ["a1", "a2"]),
        (&mut forged, "project A (forged scope)", ["a1", "a2"]),
        (&mut in_b, "project B", ["b1", "b2"]),
    ] {
        for tag in expected {
            let event = next_event(socket).await;
            assert_eq!(
                event["name"], "instance.start;handler=x",
                "{who}: delivered with the handler kept, the scope stripped: {event}"
            );
            assert_eq!(event["data"]["tag"], tag, "{who} got {event}");
        }
    }

    // A call to project A's handler: only project A's key (or an admin) completes it.
    let hub = server.server.state.hub.clone();
    let call = tokio::spawn(async move {
        hub.call(
            drover_proto::Event::new(a_name),
            Duration::from_secs(30),
            |_| {},
        )
        .await
    });
    let request = next_event(&mut in_a).await;
    assert_eq!(request["name"], "instance.start;handler=x");
    let reply = |data: Value| {
        json!({
            "name": request["replyTo"],
            "previousIds": [request["id"]],
            "data": data,
        })
    };
    let rejected = server.metric("drover_replies_rejected_total");
    ext_b.publish(&reply(json!({"by": "b"}))).await;
    let (_, agent_key) = server.agent(a_num, "host-a").await;
    agent_key
        .publish(&serde_json::from_value(reply(json!({"by": "a's host agent"}))).unwrap())
        .await
        .unwrap();
    ext_a.publish(&reply(json!({"by": "a"}))).await;
    let answered = tokio::time::timeout(WAIT, call)
        .await
        .expect("the call ends")
        .unwrap()
        .expect("project A's reply completes it");
    assert_eq!(answered.data, Some(json!({"by": "a"})));
    assert_eq!(
        server.metric("drover_replies_rejected_total") - rejected,
        2.0,
        "project B's and the host agent's replies were refused"
    );
    // Project B's socket saw nothing between its own events: the call did not reach it.
    admin
        .publish(&json!({"name": b_name, "data": {"tag": "b3"}}))
        .await;
    assert_eq!(next_event(&mut in_b).await["data"]["tag"], "b3");
}

/// What event-subscriber's `EventRouter.Start` does for an extension, at `/v2-beta`: remove an
/// older handler of its name, create the `externalHandler` (the schema must list it), subscribe
/// with `;handler=<name>` appended, and answer each request with a reply published through the
/// API; the server's process takes the reply's data and goes on.
#[tokio::test]
async fn the_go_event_router_registers_an_external_handler_and_answers_its_processes() {
    let server = TestServer::start_with(FAST).await;
    let (_, _, agent) = server
        .host_with_agent("host-1", TestAgent::always_ok())
        .await;
    let go = GoClient::new(&format!("{}/v1", server.url), ADMIN_ACCESS, ADMIN_SECRET).await;
    assert!(go.types.contains_key("externalHandler"));
    // removeOldHandler, twice over: a handler left by an earlier run is removed first.
    for _ in 0..2 {
        let old = go.list("externalHandler", &[("name", "go-machine")]).await;
        for handler in old["data"].as_array().unwrap() {
            if handler["state"] != "removed" {
                go.delete(handler).await;
            }
        }
        let created = go
            .create(
                "externalHandler",
                &json!({"name": "go-machine", "uuid": "go-machine", "priority": 100,
                        "processConfigs": [{"name": "instance.start"}]}),
            )
            .await;
        all_under(&created, &server, "v2-beta", "an external handler");
        assert_eq!(created["state"], "active", "{created:#}");
    }
    let active = go
        .list(
            "externalHandler",
            &[("name", "go-machine"), ("state", "active")],
        )
        .await;
    assert_eq!(active["data"].as_array().unwrap().len(), 1, "{active:#}");
    let mut handler = go.subscribe(&["instance.start"], Some("go-machine")).await;
    let mut changes = go.subscribe(&["resource.change"], None).await;

    let created = go
        .create(
            "container",
            &json!({"name": "machine-made", "command": ["sleep", "1000"]}),
        )
        .await;
    let request = next_event(&mut handler).await;
    // The Go router looks its handler up by the full name.
    assert_eq!(request["name"], "instance.start;handler=go-machine");
    assert_eq!(request["resourceId"], created["id"]);
    assert_eq!(request["data"]["instance"]["name"], "machine-made");
    // NewReplyEvent + Publish.Create, as a handler does.
    go.publish(&json!({
        "name": request["replyTo"],
        "previousIds": [request["id"]],
        "resourceId": request["resourceId"],
        "resourceType": request["resourceType"],
        "transitioning": "no",
        "data": {"instance": {"machineId": "m-1"}},
    }))
    .await;
    let running = await_state(&go, &mut changes, &created, "running").await;
    assert_eq!(running["machineId"], "m-1", "{running:#}");
    assert_eq!(agent.requests_named("compute.instance.activate").await, 0);
}
