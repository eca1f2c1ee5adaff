//! The adversarial matrix: for each kind of key (admin, project, user, agent, and the
//! environment agent key of a `create_agent` container) × each endpoint and socket, what it may
//! read, write, publish, subscribe and reply to, with a second project's resources as the
//! targets an attacker would aim at. On SQLite and, when `DROVER_TEST_POSTGRES_URL` is set, on
//! PostgreSQL.
//!
//! The tables below are the policy. The test walks the API's own description of itself (the
//! links of `GET /v1` and every schema of `/v1/schemas`): an endpoint or a reference field that
//! the tables do not cover fails the test, so a new one cannot ship without a line here.
//! `/v2-beta` is the same routes under another path (`api::version`), so it has no rows of its
//! own: the test checks that it describes the same endpoints and answers every read of the
//! tables as `/v1` does, for every kind of key.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use drover_client::{Client, Error, Event, Subscribe};
use drover_test_support::agent::{Answer, TestAgent};
use drover_test_support::{TestServer, servers, wait_state};
use serde_json::{Value, json};

/// The kinds of key, in the order of every row's columns.
const KINDS: [&str; 5] = ["admin", "project", "user", "agent", "environment"];

/// `GET /v1/<path>` for each kind: the status it gets. A 200 to anyone but an admin must not
/// show project B's resources.
const READS: &[(&str, [u16; 5])] = &[
    ("containers", [200, 200, 200, 200, 200]),
    ("volumes", [200, 200, 200, 200, 200]),
    ("hosts", [200, 200, 200, 200, 200]),
    ("agents", [200, 200, 200, 200, 200]),
    ("stacks", [200, 200, 200, 200, 200]),
    ("services", [200, 200, 200, 200, 200]),
    ("externalhandlers", [200, 200, 200, 200, 200]),
    ("apikeys", [200, 200, 200, 200, 200]),
    ("projects", [200, 200, 200, 200, 200]),
    ("accounts", [200, 403, 403, 403, 403]),
    // Project and user keys read their project's processes (only replay and cancel are
    // admins'); agent keys none.
    ("processinstances", [200, 200, 200, 403, 403]),
    // Executions are listed per process: without `processInstanceId` the caller gets 422.
    ("processexecutions", [422, 422, 422, 403, 403]),
    ("processsummary", [200, 200, 200, 403, 403]),
    ("schemas", [200, 200, 200, 200, 200]),
    ("settings", [200, 403, 403, 403, 403]),
    ("clusternodes", [200, 403, 403, 403, 403]),
    ("registrationtokens", [200, 200, 403, 403, 403]),
    ("containerevents", [200, 200, 200, 200, 200]),
    ("serviceevents", [200, 200, 200, 200, 200]),
    ("cleanup", [200, 403, 403, 403, 403]),
    ("subscribe", [400, 400, 400, 400, 400]),
    ("publish", [405, 405, 405, 405, 405]),
];

/// `POST /v1/<path>` with a minimal valid body, for each kind: the status it gets.
const CREATES: &[(&str, &str, [u16; 5])] = &[
    (
        "containers",
        r#"{"name":"m","command":["true"]}"#,
        [201, 201, 201, 201, 201],
    ),
    ("volumes", r#"{"name":"m"}"#, [201, 201, 201, 201, 201]),
    ("hosts", r#"{"name":"m"}"#, [201, 201, 201, 403, 403]),
    ("stacks", r#"{"name":"m"}"#, [201, 201, 201, 403, 403]),
    ("services", r#"{"name":"m"}"#, [201, 201, 201, 403, 403]),
    (
        "externalhandlers",
        r#"{"name":"m","processConfigs":[{"name":"instance.start"}],"priority":3000}"#,
        [201, 201, 201, 403, 403],
    ),
    ("agents", r#"{"name":"m"}"#, [405, 405, 405, 405, 405]),
    ("apikeys", r#"{}"#, [201, 201, 201, 403, 403]),
    ("projects", r#"{"name":"m"}"#, [201, 403, 403, 403, 403]),
    (
        "accounts",
        r#"{"name":"m","kind":"service"}"#,
        [201, 403, 403, 403, 403],
    ),
    ("registrationtokens", r#"{}"#, [201, 201, 403, 403, 403]),
];

/// Published names, for each kind: the status of `POST /v1/publish`.
const PUBLISHES: &[(&str, [u16; 5])] = &[
    ("reply.matrix", [201, 201, 201, 201, 201]),
    ("resource.change", [201, 403, 403, 403, 403]),
    ("compute.instance.activate", [201, 403, 403, 403, 403]),
    ("disconnect", [201, 403, 403, 403, 403]),
];

/// Replies to a call to an external handler (`names::for_handler`), for each kind: whether its
/// reply completes the call. A project's handler (`<process>;handler=<h>;account=<A>`) is
/// answered by the keys that subscribe in project A's scope (its project, user and environment
/// agent keys; not its host agents), a handler of the whole system (`<process>;handler=<h>`)
/// by admin and service keys only.
const HANDLER_REPLIES: &[(&str, bool, [bool; 5])] = &[
    ("project A's handler", true, [true, true, true, false, true]),
    ("a raw handler", false, [true, false, false, false, false]),
];

/// Types whose references an admin may point anywhere: admins make keys and accounts for every
/// project. Everywhere else the admin, too, acts inside one project.
const ADMIN_GLOBAL: &[&str] = &["apiKey", "account", "registrationToken"];

/// Endpoints that are not collections of the API's own description, and why they are covered.
const OTHER_LINKS: &[&str] = &["self"];

struct Keys {
    clients: [Client; 5],
    agent_id: i64,
}

fn numeric(id: &str) -> i64 {
    id.trim_start_matches(|c: char| c.is_ascii_digit())
        .trim_start_matches(|c: char| c.is_ascii_alphabetic())
        .parse()
        .unwrap_or_else(|_| panic!("{id} is not an API id"))
}

fn status(result: &Result<Value, Error>) -> u16 {
    match result {
        Ok(_) => 200,
        Err(Error::Api { status, .. }) => *status,
        Err(other) => panic!("not an API answer: {other:?}"),
    }
}

/// Finds a string field anywhere in a JSON document.
fn find_str<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    match value {
        Value::Object(map) => map
            .get(key)
            .and_then(Value::as_str)
            .or_else(|| map.values().find_map(|v| find_str(v, key))),
        Value::Array(items) => items.iter().find_map(|v| find_str(v, key)),
        _ => None,
    }
}

async fn wait_seen(agent: &TestAgent, resource: &str) -> Event {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(event) = agent.seen.lock().await.iter().find(|event| {
            event.name() == "compute.instance.activate"
                && event.resource_id.as_deref() == Some(resource)
        }) {
            return event.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent never saw {resource}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Project A's keys of every kind, with a host whose agent answers, and the environment agent
/// key the engine made for a `create_agent` container.
async fn keys_of(server: &TestServer, project: &str, project_key: Client) -> (Keys, TestAgent) {
    let project_id = numeric(project);
    let user = server
        .admin
        .post(
            "accounts",
            &json!({"name": "user-a", "kind": "user", "projectId": project}),
        )
        .await
        .unwrap();
    let user_key = server
        .admin
        .post(
            "apikeys",
            &json!({"accountId": user["id"].as_str().unwrap()}),
        )
        .await
        .unwrap();
    let user = server.client(
        user_key["publicValue"].as_str().unwrap(),
        user_key["secretValue"].as_str().unwrap(),
    );
    let (agent_id, agent_key) = server.agent(project_id, "host-a").await;
    let host = server
        .admin
        .post(
            &format!("projects/{project}/hosts"),
            &json!({"name": "host-a", "agentId": format!("1ag{agent_id}")}),
        )
        .await
        .unwrap();
    let host_id = host["id"].as_str().unwrap().to_owned();
    wait_state(&project_key, &format!("hosts/{host_id}"), "active").await;
    let agent = TestAgent::start(agent_key.clone(), agent_id, TestAgent::always_ok()).await;
    let env_container = project_key
        .post(
            "containers",
            &json!({
                "name": "env-agent",
                "command": ["sleep", "100"],
                "requestedHostId": host_id,
                "labels": {
                    "io.rancher.container.create_agent": "true",
                    "io.rancher.container.agent.role": "environment",
                },
            }),
        )
        .await
        .unwrap();
    let request = wait_seen(&agent, env_container["id"].as_str().unwrap()).await;
    let data = request.data.unwrap_or_default();
    let environment = server.client(
        find_str(&data, "CATTLE_ACCESS_KEY").expect("the environment key is injected"),
        find_str(&data, "CATTLE_SECRET_KEY").unwrap(),
    );
    (
        Keys {
            clients: [
                server.admin.clone(),
                project_key,
                user,
                agent_key,
                environment,
            ],
            agent_id,
        },
        agent,
    )
}

/// Project B's resources, one of each type a reference can name: what an attacker aims at.
async fn samples_of(server: &TestServer, project: &str) -> Vec<(&'static str, String)> {
    let admin = &server.admin;
    let (agent_id, _key) = server.agent(numeric(project), "host-b").await;
    let post = |path: String, body: Value| async move {
        admin.post(&path, &body).await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let host = post(
        format!("projects/{project}/hosts"),
        json!({"name": "host-b", "agentId": format!("1ag{agent_id}")}),
    )
    .await;
    let container = post(
        format!("projects/{project}/containers"),
        json!({"name": "c-b", "command": ["sleep", "1"], "requestedHostId": host}),
    )
    .await;
    let volume = post(
        format!("projects/{project}/volumes"),
        json!({"name": "v-b"}),
    )
    .await;
    let stack = post(format!("projects/{project}/stacks"), json!({"name": "s-b"})).await;
    let service = post(
        format!("projects/{project}/services"),
        json!({"name": "svc-b", "stackId": stack}),
    )
    .await;
    let account = post(
        "accounts".to_owned(),
        json!({"name": "user-b", "kind": "user", "projectId": project}),
    )
    .await;
    vec![
        ("host", host),
        ("agent", format!("1ag{agent_id}")),
        ("container", container),
        ("volume", volume),
        ("stack", stack),
        ("service", service),
        ("project", project.to_owned()),
        ("account", account),
    ]
}

#[tokio::test]
async fn every_key_kind_reaches_only_what_the_policy_table_allows() {
    for server in servers(&[("eventing.timeout.millis", "60000")]).await {
        let (project_a, a_key) = server.project("a").await;
        let (project_b, b_key) = server.project("b").await;
        let (keys, _agent) = keys_of(&server, &project_a, a_key).await;
        let samples = samples_of(&server, &project_b).await;
        let b_ids: Vec<&str> = samples
            .iter()
            .filter(|(kind, _)| *kind != "project" && *kind != "account")
            .map(|(_, id)| id.as_str())
            .collect();
        let mut wrong = Vec::new();

        // 1. Every collection the API describes is in the tables.
        let root = server.admin.get("").await.unwrap();
        let schemas = server.admin.get("schemas").await.unwrap();
        let mut described = BTreeSet::new();
        for (name, link) in root["links"].as_object().unwrap() {
            if OTHER_LINKS.contains(&name.as_str()) {
                continue;
            }
            let path = link
                .as_str()
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap()
                .to_owned();
            described.insert(path);
        }
        for schema in schemas["data"].as_array().unwrap() {
            if let Some(link) = schema["links"]["collection"].as_str() {
                described.insert(link.rsplit('/').next().unwrap().to_owned());
            }
        }
        for path in &described {
            if !READS.iter().any(|(p, _)| p == path) {
                wrong.push(format!("{path}: an endpoint the matrix does not cover"));
            }
        }
        // `/v2-beta` describes the same endpoints, every link under `/v2-beta`.
        let v2_base = format!("{}/v2-beta", server.url);
        let v2_admin = server.admin.with_key_at(&v2_base).unwrap();
        let v2_root = v2_admin.get("").await.unwrap();
        let v2_schemas = v2_admin.get("schemas").await.unwrap();
        let mut v2_described = BTreeSet::new();
        let v2_links = v2_root["links"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(name, _)| !OTHER_LINKS.contains(&name.as_str()))
            .map(|(_, link)| link)
            .chain(
                v2_schemas["data"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|schema| schema["links"].get("collection")),
            );
        for link in v2_links {
            let link = link.as_str().unwrap();
            let (_, path) = link.rsplit_once('/').unwrap();
            let under = link.strip_prefix(v2_base.as_str()).is_some()
                || link
                    .strip_prefix(v2_base.replacen("http", "ws", 1).as_str())
                    .is_some();
            if !under {
                wrong.push(format!("/v2-beta describes {link}, not under /v2-beta"));
            }
            v2_described.insert(path.to_owned());
        }
        if v2_described != described {
            wrong.push(format!(
                "/v2-beta describes {v2_described:?}, /v1 {described:?}"
            ));
        }

        // 2. Reads, and what a 200 shows; under `/v2-beta` as under `/v1`.
        let v2_clients: Vec<Client> = keys
            .clients
            .iter()
            .map(|client| client.with_key_at(&v2_base).unwrap())
            .collect();
        for (path, expected) in READS {
            for (k, client) in keys.clients.iter().enumerate() {
                let result = client.get(path).await;
                let got = match &result {
                    Err(Error::Refused { status, .. }) => *status,
                    other => status(other),
                };
                if got != expected[k] {
                    wrong.push(format!(
                        "GET {path} as {}: {got}, expected {}",
                        KINDS[k], expected[k]
                    ));
                }
                let v2_got = match v2_clients[k].get(path).await {
                    Err(Error::Refused { status, .. }) => status,
                    other => status(&other),
                };
                if v2_got != expected[k] {
                    wrong.push(format!(
                        "GET /v2-beta/{path} as {}: {v2_got}, expected {}",
                        KINDS[k], expected[k]
                    ));
                }
                if let (Ok(body), true) = (&result, k > 0) {
                    let text = body.to_string();
                    for id in &b_ids {
                        if text.contains(&format!("\"{id}\"")) {
                            wrong
                                .push(format!("GET {path} as {} shows project B's {id}", KINDS[k]));
                        }
                    }
                }
            }
        }

        // 3. Creates.
        for (path, body, expected) in CREATES {
            let body: Value = serde_json::from_str(body).unwrap();
            for (k, client) in keys.clients.iter().enumerate() {
                let got = status(&client.post(path, &body).await);
                let got = if got == 200 { 201 } else { got };
                if got != expected[k] {
                    wrong.push(format!(
                        "POST {path} as {}: {got}, expected {}",
                        KINDS[k], expected[k]
                    ));
                }
            }
        }

        // 4. Project B, through its URLs and its resources' ids: nobody but the admin.
        for (kind, id) in &samples {
            let Some(plural) = plural_of(kind) else {
                continue;
            };
            for (k, client) in keys.clients.iter().enumerate().skip(1) {
                let attempts = [
                    ("GET", client.get(&format!("{plural}/{id}")).await),
                    (
                        "PUT",
                        client
                            .put(&format!("{plural}/{id}"), &json!({"name": "x"}))
                            .await,
                    ),
                    (
                        "POST",
                        client
                            .post(&format!("{plural}/{id}?action=deactivate"), &json!({}))
                            .await,
                    ),
                    ("DELETE", client.delete(&format!("{plural}/{id}")).await),
                    (
                        "GET",
                        client.get(&format!("projects/{project_b}/{plural}")).await,
                    ),
                    (
                        "POST",
                        client
                            .post(
                                &format!("projects/{project_b}/{plural}"),
                                &json!({"name": "x"}),
                            )
                            .await,
                    ),
                ];
                for (method, result) in attempts {
                    let got = status(&result);
                    // 405: the method does not exist on that type for anyone, whatever the id.
                    if !matches!(got, 403..=405) {
                        wrong.push(format!(
                            "{method} on project B's {kind} {id} as {}: {got}",
                            KINDS[k]
                        ));
                    }
                }
            }
        }
        for (k, client) in keys.clients.iter().enumerate().skip(1) {
            let got = status(&client.get(&format!("projects/{project_b}")).await);
            if !matches!(got, 403 | 404) {
                wrong.push(format!("GET project B as {}: {got}", KINDS[k]));
            }
        }

        // 5. References to project B's resources, in every field that names a resource.
        for schema in schemas["data"].as_array().unwrap() {
            let id = schema["id"].as_str().unwrap();
            let Some(plural) = schema["links"]["collection"]
                .as_str()
                .map(|link| link.rsplit('/').next().unwrap().to_owned())
            else {
                continue;
            };
            for (field, spec) in schema["resourceFields"].as_object().unwrap() {
                let kind = spec["type"].as_str().unwrap_or("");
                let Some(target) = kind
                    .strip_prefix("reference[")
                    .and_then(|rest| rest.strip_suffix(']'))
                else {
                    continue;
                };
                let creatable = spec["create"] == true;
                let updatable = spec["update"] == true;
                if !creatable && !updatable {
                    continue;
                }
                let Some((_, victim)) = samples.iter().find(|(kind, _)| *kind == target) else {
                    wrong.push(format!(
                        "{id}.{field}: no sample {target} in project B; add one"
                    ));
                    continue;
                };
                let base = CREATES
                    .iter()
                    .find(|(path, _, _)| *path == plural)
                    .map(|(_, body, _)| serde_json::from_str::<Value>(body).unwrap());
                let body = match (creatable, base) {
                    (true, Some(mut body)) => {
                        body[field.as_str()] = json!(victim);
                        body
                    }
                    (true, None) => {
                        // Created elsewhere (agents post events for their own hosts only).
                        json!({field.as_str(): victim})
                    }
                    (false, _) => continue,
                };
                for (k, client) in keys.clients.iter().enumerate() {
                    if k == 0 && ADMIN_GLOBAL.contains(&id) {
                        continue;
                    }
                    let got = status(&client.post(&plural, &body).await);
                    if !(400..500).contains(&got) {
                        wrong.push(format!(
                            "POST {plural} with {field}={victim} (project B) as {}: {got}",
                            KINDS[k]
                        ));
                    }
                }
            }
        }

        // 6. Publishing.
        for (name, expected) in PUBLISHES {
            for (k, client) in keys.clients.iter().enumerate() {
                let got = match client.publish(&Event::new(*name)).await {
                    Ok(()) => 201,
                    Err(Error::Api { status, .. }) => status,
                    Err(other) => panic!("{other:?}"),
                };
                if got != expected[k] {
                    wrong.push(format!(
                        "publish {name} as {}: {got}, expected {}",
                        KINDS[k], expected[k]
                    ));
                }
            }
        }

        // 7. Subscribing: project B's scope and another agent's are refused to all but the admin.
        let (other_agent, _) = server.agent(numeric(&project_a), "host-a2").await;
        for (k, client) in keys.clients.iter().enumerate() {
            let scoped = client
                .subscribe(Subscribe::names(["resource.change"]).project(project_b.as_str()))
                .await;
            let agent = client
                .subscribe(Subscribe::names(["ping"]).agent(format!("1ag{other_agent}")))
                .await;
            for (what, result) in [("project B's", scoped), ("another agent's", agent)] {
                let allowed = result.is_ok();
                if allowed != (k == 0) {
                    wrong.push(format!(
                        "subscribe in {what} scope as {}: allowed={allowed}",
                        KINDS[k]
                    ));
                }
            }
        }
        let _ = keys.agent_id;

        assert!(wrong.is_empty(), "policy violations:\n{}", wrong.join("\n"));
        drop(b_key);
    }
}

fn plural_of(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "host" => "hosts",
        "agent" => "agents",
        "container" => "containers",
        "volume" => "volumes",
        "stack" => "stacks",
        "service" => "services",
        "account" => "accounts",
        _ => return None,
    })
}

/// What each kind's `resource.change` stream shows after changes in both projects: its own
/// project's changes (an agent key: none, it listens as its agent), never project B's.
#[tokio::test]
async fn event_streams_and_replies_stay_inside_the_project() {
    for server in servers(&[("eventing.timeout.millis", "60000")]).await {
        let (project_a, a_key) = server.project("a").await;
        let (project_b, b_key) = server.project("b").await;
        let (keys, _agent) = keys_of(&server, &project_a, a_key).await;
        let (b_agent_id, b_agent) = server.agent(numeric(&project_b), "host-b").await;
        let _ = b_agent_id;

        let mut streams = Vec::new();
        for client in &keys.clients {
            let mut stream = client
                .subscribe(Subscribe::names(["resource.change", "matrix.marker"]))
                .await
                .unwrap();
            stream.next_event().await.unwrap().unwrap();
            streams.push(stream);
        }
        let theirs = server
            .admin
            .post(
                &format!("projects/{project_b}/stacks"),
                &json!({"name": "theirs"}),
            )
            .await
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let ours = keys.clients[1]
            .post("stacks", &json!({"name": "ours"}))
            .await
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        // Those that see project A's changes wait for ours; then a marker in every scope ends
        // each stream's record.
        let mut seen: Vec<Vec<Event>> = vec![Vec::new(); streams.len()];
        for k in [0usize, 1, 2, 4] {
            if k == 0 {
                continue; // the admin's raw stream: checked by the marker below
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let event = tokio::time::timeout_at(deadline, streams[k].next_non_ping())
                    .await
                    .unwrap_or_else(|_| panic!("{} never saw its own project's change", KINDS[k]))
                    .unwrap()
                    .unwrap();
                let mine = event.resource_id.as_deref() == Some(ours.as_str());
                seen[k].push(event);
                if mine {
                    break;
                }
            }
        }
        let a = numeric(&project_a);
        for name in [
            "matrix.marker".to_owned(),
            format!("matrix.marker;account={a}"),
            format!("matrix.marker;agent={}", keys.agent_id),
        ] {
            server.admin.publish(&Event::new(name)).await.unwrap();
        }
        for (k, stream) in streams.iter_mut().enumerate() {
            loop {
                let event = tokio::time::timeout(Duration::from_secs(20), stream.next_non_ping())
                    .await
                    .unwrap_or_else(|_| panic!("{} never got its marker", KINDS[k]))
                    .unwrap()
                    .unwrap();
                if event.name() == "matrix.marker" {
                    break;
                }
                seen[k].push(event);
            }
            if k == 0 {
                continue;
            }
            for event in &seen[k] {
                assert_ne!(
                    event.resource_id.as_deref(),
                    Some(theirs.as_str()),
                    "{} saw project B's change: {event:?}",
                    KINDS[k]
                );
            }
        }
        assert!(
            !seen[3].iter().any(|e| e.name() == "resource.change"),
            "an agent key listens as its agent, not its project: {:?}",
            seen[3]
        );

        // Replies: a call addressed to a silent agent of project A is answered only by it.
        let (silent_id, silent_key) = server.agent(a, "silent").await;
        let host = server
            .admin
            .post(
                &format!("projects/{project_a}/hosts"),
                &json!({"name": "silent", "agentId": format!("1ag{silent_id}")}),
            )
            .await
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        wait_state(&keys.clients[1], &format!("hosts/{host}"), "active").await;
        let silent = TestAgent::start(
            silent_key.clone(),
            silent_id,
            Arc::new(|_, _| Answer::Ignore),
        )
        .await;
        let container = keys.clients[1]
            .post(
                "containers",
                &json!({"name": "target", "command": ["sleep", "100"], "requestedHostId": host}),
            )
            .await
            .unwrap();
        let id = container["id"].as_str().unwrap().to_owned();
        let request = wait_seen(&silent, &id).await;
        let before = server.metric("drover_replies_rejected_total");
        let forgers = [
            &keys.clients[1],
            &keys.clients[2],
            &keys.clients[3],
            &keys.clients[4],
            &b_key,
            &b_agent,
        ];
        for forger in forgers {
            forger
                .publish(
                    &request
                        .reply()
                        .unwrap()
                        .with_data(json!({"instance": {"externalId": "forged"}})),
                )
                .await
                .unwrap();
        }
        assert_eq!(
            server.metric("drover_replies_rejected_total") - before,
            forgers.len() as f64
        );
        let path = format!("containers/{id}");
        let still = keys.clients[1].get(&path).await.unwrap();
        assert_eq!(still["transitioning"], "yes", "{still:#}");
        silent_key
            .reply(&request, json!({"instance": {"externalId": "real"}}))
            .await
            .unwrap();
        let done = wait_state(&keys.clients[1], &path, "running").await;
        assert_eq!(done["externalId"], "real");

        // Calls to external handlers: who completes them.
        let mut wrong = Vec::new();
        for (what, scoped, expected) in HANDLER_REPLIES {
            let name = drover_proto::names::for_handler("matrix.handler", "m", scoped.then_some(a));
            let mut watch = server
                .admin
                .subscribe(Subscribe::names([name.as_str()]))
                .await
                .unwrap();
            tokio::time::timeout(Duration::from_secs(20), watch.next_event())
                .await
                .expect("the first ping")
                .unwrap()
                .unwrap();
            for (k, client) in keys.clients.iter().enumerate() {
                let hub = server.server.state.hub.clone();
                let call = tokio::spawn({
                    let name = name.clone();
                    async move {
                        hub.call(Event::new(name), Duration::from_secs(60), |_| {})
                            .await
                    }
                });
                let request = tokio::time::timeout(Duration::from_secs(20), watch.next_non_ping())
                    .await
                    .expect("the call is sent")
                    .unwrap()
                    .unwrap();
                client
                    .reply(&request, json!({"by": KINDS[k]}))
                    .await
                    .unwrap();
                // Whoever was refused, the admin's reply ends the call.
                server
                    .admin
                    .reply(&request, json!({"by": "fallback"}))
                    .await
                    .unwrap();
                let reply = call.await.unwrap().unwrap();
                let answered = reply.data == Some(json!({"by": KINDS[k]}));
                if answered != expected[k] {
                    wrong.push(format!(
                        "reply to {what} ({name}) as {}: completed={answered}",
                        KINDS[k]
                    ));
                }
            }
        }
        assert!(wrong.is_empty(), "policy violations:\n{}", wrong.join("\n"));
    }
}
