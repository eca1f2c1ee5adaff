//! API bodies through the real router, against a real SQLite store in a temporary directory.
//!
//! An input is a request line and a body:
//!
//! ```text
//! <key> <METHOD> <path>
//! <body bytes>
//! ```
//!
//! `<key>` is `admin`, `project` (a project's key), `agent` (that project's agent), `anon` (no
//! credentials) or `wrong` (a wrong secret). `{project}`, `{container}`, `{volume}`, `{host}`,
//! `{stack}`, `{service}`, `{agent}`, `{process}` and `{apikey}` in the path or the body stand
//! for the ids of resources made when the harness starts. Inputs that do not have this shape are
//! skipped. The properties: no 5xx (a handler's panic answers 500 too), an answer within
//! [`DEADLINE`], and every 4xx carries a GDAPI error body with its own status.

use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Method, Request, StatusCode, header};
use base64::Engine as _;
use drover_proto::api::ApiErrorBody;
use drover_server::{Config, Server};
use serde_json::{Value, json};
use tower::ServiceExt as _;

/// The longest a request may take.
pub const DEADLINE: Duration = Duration::from_secs(10);
const ADMIN: (&str, &str) = (
    "FUZZADMINACCESSKEY01",
    "fuzz-admin-secret-key-0123456789abcdefgh",
);

/// A running server and the keys and ids inputs refer to.
#[derive(Debug)]
pub struct Api {
    runtime: tokio::runtime::Runtime,
    server: Option<Server>,
    router: Router,
    keys: Vec<(&'static str, Option<String>)>,
    ids: Vec<(&'static str, String)>,
    _dir: tempfile::TempDir,
}

/// What a request was answered with.
#[derive(Debug)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// The body.
    pub body: Bytes,
    /// The `Allow` header, if any.
    pub allow: Option<String>,
}

fn basic(access: &str, secret: &str) -> String {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{access}:{secret}"));
    format!("Basic {token}")
}

impl Api {
    /// Starts a server on a fresh SQLite store and makes a project with a key, an agent, and one
    /// resource of each type.
    pub fn start() -> Api {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut config = Config::new(dir.path());
        config.admin_access_key = Some(ADMIN.0.into());
        config.admin_secret_key = Some(ADMIN.1.into());
        let server = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("a loopback port");
            Server::start(listener, config)
                .await
                .expect("the server starts")
        });
        let router = drover_server::api::router(server.state.clone());
        let mut api = Api {
            runtime,
            router,
            keys: vec![
                ("admin", Some(basic(ADMIN.0, ADMIN.1))),
                ("wrong", Some(basic(ADMIN.0, "not-the-secret"))),
                ("anon", None),
            ],
            ids: Vec::new(),
            server: Some(server),
            _dir: dir,
        };
        api.seed();
        api
    }

    /// Makes what inputs refer to, through the API itself.
    fn seed(&mut self) {
        let created = |api: &Api, path: &str, body: Value| -> Value {
            let answer = api.request("admin", Method::POST, path, body.to_string().into_bytes());
            assert!(
                answer.status.is_success(),
                "seeding {path}: {} {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            );
            serde_json::from_slice(&answer.body).expect("a JSON answer")
        };
        let id = |value: &Value| value["id"].as_str().expect("an id").to_owned();
        let project = created(self, "/v1/projects", json!({"name": "fuzz"}));
        let project_id = id(&project);
        let key = created(
            self,
            &format!("/v1/projects/{project_id}/apikeys"),
            json!({}),
        );
        self.keys.push((
            "project",
            Some(basic(
                key["publicValue"].as_str().expect("an access key"),
                key["secretValue"].as_str().expect("a secret key"),
            )),
        ));
        self.ids.push(("{apikey}", id(&key)));
        let numeric = drover_proto::ids::parse("project", &project_id).expect("a project id");
        let store = self.server.as_ref().expect("running").state.store.clone();
        let (agent_id, _account, agent_key) = self
            .runtime
            .block_on(store.create_agent(numeric, "fuzz-agent", None))
            .expect("an agent");
        self.keys.push((
            "agent",
            Some(basic(
                &agent_key.credential.public_value,
                &agent_key.secret_value,
            )),
        ));
        let agent = drover_proto::ids::format("agent", agent_id);
        let base = format!("/v1/projects/{project_id}");
        let host = created(
            self,
            &format!("{base}/hosts"),
            json!({"name": "fuzz-host", "hostname": "fuzz", "agentId": agent}),
        );
        let container = created(
            self,
            &format!("{base}/containers"),
            json!({"name": "c", "command": ["sleep", "1"], "requestedHostId": id(&host)}),
        );
        let volume = created(self, &format!("{base}/volumes"), json!({"name": "v"}));
        let stack = created(self, &format!("{base}/stacks"), json!({"name": "s"}));
        let service = created(
            self,
            &format!("{base}/services"),
            json!({"name": "svc", "stackId": id(&stack), "scale": 1}),
        );
        let processes = self.request(
            "admin",
            Method::GET,
            "/v1/processinstances?limit=1",
            Vec::new(),
        );
        let processes: Value = serde_json::from_slice(&processes.body).expect("a JSON answer");
        self.ids.extend([
            ("{project}", project_id),
            ("{agent}", agent),
            ("{host}", id(&host)),
            ("{container}", id(&container)),
            ("{volume}", id(&volume)),
            ("{stack}", id(&stack)),
            ("{service}", id(&service)),
            ("{process}", id(&processes["data"][0])),
        ]);
    }

    fn substitute(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for (placeholder, id) in &self.ids {
            text = text.replace(placeholder, id);
        }
        text
    }

    /// Runs one input; panics when a property does not hold. Returns whether `data` was a
    /// request (and not skipped).
    pub fn run(&self, data: &[u8]) -> bool {
        let Some((key, method, path, body)) = self.parse(data) else {
            return false;
        };
        let answer = self.request(key, method.clone(), &path, body);
        check(&method, &path, &answer);
        true
    }

    /// The request an input stands for, if it has the input's shape.
    fn parse(&self, data: &[u8]) -> Option<(&'static str, Method, String, Vec<u8>)> {
        let (line, body) = match data.iter().position(|b| *b == b'\n') {
            Some(at) => (&data[..at], &data[at + 1..]),
            None => (data, &[][..]),
        };
        let mut words = std::str::from_utf8(line).ok()?.split(' ');
        let key = words.next()?;
        let key = self.keys.iter().find(|(name, _)| *name == key)?.0;
        let method = match words.next()? {
            "GET" => Method::GET,
            "POST" => Method::POST,
            "PUT" => Method::PUT,
            "DELETE" => Method::DELETE,
            "PATCH" => Method::PATCH,
            _ => return None,
        };
        let path = self.substitute(words.next()?);
        if words.next().is_some() || !(path.starts_with("/v1") || path.starts_with("/v2-beta")) {
            return None;
        }
        path.parse::<axum::http::Uri>().ok()?;
        let body = match std::str::from_utf8(body) {
            Ok(text) => self.substitute(text).into_bytes(),
            Err(_) => body.to_vec(),
        };
        Some((key, method, path, body))
    }

    /// Sends one request through the router and reads the whole answer.
    pub fn request(&self, key: &str, method: Method, path: &str, body: Vec<u8>) -> Answer {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "fuzz.test")
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(Some(value)) = self
            .keys
            .iter()
            .find(|(name, _)| *name == key)
            .map(|k| &k.1)
        {
            request = request.header(header::AUTHORIZATION, value);
        }
        let request = request.body(Body::from(body)).expect("a valid request");
        let router = self.router.clone();
        self.runtime.block_on(async move {
            let answer = tokio::time::timeout(DEADLINE, async {
                let response = router
                    .oneshot(request)
                    .await
                    .expect("the router is infallible");
                let status = response.status();
                let allow = response
                    .headers()
                    .get(header::ALLOW)
                    .and_then(|value| value.to_str().ok())
                    .map(str::to_owned);
                let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                    .await
                    .expect("the body reads");
                Answer {
                    status,
                    body,
                    allow,
                }
            })
            .await;
            answer.unwrap_or_else(|_| panic!("no answer within {DEADLINE:?}"))
        })
    }
}

/// The properties of one answer.
pub fn check(method: &Method, path: &str, answer: &Answer) {
    let text = String::from_utf8_lossy(&answer.body);
    assert!(
        !answer.status.is_server_error(),
        "{method} {path} answered {}: {text}",
        answer.status
    );
    if answer.status.is_client_error() {
        let error: ApiErrorBody = serde_json::from_slice(&answer.body).unwrap_or_else(|error| {
            panic!(
                "{method} {path} answered {} without a GDAPI error body ({error}): {text:?}",
                answer.status
            )
        });
        assert_eq!(error.kind, "error", "{method} {path}: {text}");
        assert_eq!(
            error.status,
            answer.status.as_u16(),
            "{method} {path}: {text}"
        );
        assert!(
            !error.code.is_empty() && !error.message.is_empty(),
            "{method} {path}: {text}"
        );
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            self.runtime.block_on(server.stop());
        }
    }
}
