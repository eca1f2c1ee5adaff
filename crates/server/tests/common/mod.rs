//! Test support: a real server on `127.0.0.1:0` with a temporary data directory, and clients.
#![allow(dead_code)]

pub mod agent;

use std::sync::Once;

use drover_client::Client;
use drover_server::{Config, Server};
use serde_json::Value;
use std::time::Duration;

pub const ADMIN_ACCESS: &str = "TESTADMINACCESSKEY01";
pub const ADMIN_SECRET: &str = "test-admin-secret-key-0123456789abcdefgh";

/// A server under test; stopped when dropped with its runtime.
pub struct TestServer {
    pub server: Server,
    pub admin: Client,
    pub url: String,
    /// PostgreSQL URL and schema, when on PostgreSQL.
    pub postgres: Option<(String, String)>,
    _dir: tempfile::TempDir,
}

fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl TestServer {
    /// A server on a fresh SQLite data directory.
    pub async fn start() -> TestServer {
        TestServer::start_with(&[]).await
    }

    /// A server with setting overrides.
    pub async fn start_with(settings: &[(&str, &str)]) -> TestServer {
        TestServer::start_config(settings, None).await
    }

    /// A server on PostgreSQL (in a schema of its own), when `DROVER_TEST_POSTGRES_URL` is set.
    pub async fn start_postgres() -> Option<TestServer> {
        TestServer::start_postgres_with(&[]).await
    }

    /// A server on PostgreSQL with setting overrides, when `DROVER_TEST_POSTGRES_URL` is set.
    pub async fn start_postgres_with(settings: &[(&str, &str)]) -> Option<TestServer> {
        let url = std::env::var("DROVER_TEST_POSTGRES_URL").ok()?;
        let schema = format!("srv_{}", uuid::Uuid::new_v4().simple());
        let pool = sqlx::PgPool::connect(&url)
            .await
            .expect("PostgreSQL must be reachable when configured");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
        Some(TestServer::start_config(settings, Some((url, schema))).await)
    }

    async fn start_config(
        settings: &[(&str, &str)],
        postgres: Option<(String, String)>,
    ) -> TestServer {
        init();
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut config = Config::new(dir.path());
        config.admin_access_key = Some(ADMIN_ACCESS.into());
        config.admin_secret_key = Some(ADMIN_SECRET.into());
        config.settings = settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Some((url, schema)) = &postgres {
            config.database_url = Some(url.clone());
            config.database_schema = Some(schema.clone());
        }
        let server = Server::start(listener, config)
            .await
            .expect("server starts");
        let url = format!("http://{}", server.addr);
        let admin = Client::new(&url, ADMIN_ACCESS, ADMIN_SECRET).unwrap();
        TestServer {
            server,
            admin,
            url,
            postgres,
            _dir: dir,
        }
    }

    /// Runs one SQL statement on the server's database through a connection of its own
    /// (tests use it to age rows; nothing in the server is bypassed for what is asserted).
    pub async fn sql(&self, statement: &str) -> u64 {
        use sqlx::Connection;
        let statement = sqlx::AssertSqlSafe(statement.to_owned());
        if self.postgres.is_some() {
            let mut conn = self.pg_connection().await;
            return sqlx::query(statement)
                .execute(&mut conn)
                .await
                .unwrap()
                .rows_affected();
        }
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(self._dir.path().join("drover.db"))
            .busy_timeout(std::time::Duration::from_secs(10));
        let mut conn = sqlx::SqliteConnection::connect_with(&options)
            .await
            .unwrap();
        sqlx::query(statement)
            .execute(&mut conn)
            .await
            .unwrap()
            .rows_affected()
    }

    /// The first column of the first row of a query, as text (`NULL` → `None`): PostgreSQL
    /// only (tests use it to read PostgreSQL's own statistics).
    pub async fn pg_text(&self, query: &str) -> Option<String> {
        use sqlx::Row;
        let mut conn = self.pg_connection().await;
        let row = sqlx::query(sqlx::AssertSqlSafe(query.to_owned()))
            .fetch_one(&mut conn)
            .await
            .unwrap();
        row.try_get::<Option<String>, _>(0).unwrap()
    }

    /// A connection of the test's own to the server's PostgreSQL schema.
    async fn pg_connection(&self) -> sqlx::PgConnection {
        use sqlx::Connection;
        let (url, schema) = self.postgres.as_ref().expect("a server on PostgreSQL");
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("SET search_path TO {schema}")))
            .execute(&mut conn)
            .await
            .unwrap();
        conn
    }

    pub fn client(&self, access: &str, secret: &str) -> Client {
        Client::new(&self.url, access, secret).unwrap()
    }

    /// A new agent in a project, and a client with its agent key.
    pub async fn agent(&self, project_id: i64, name: &str) -> (i64, Client) {
        let (agent_id, _account, key) = self
            .server
            .state
            .store
            .create_agent(project_id, name, None)
            .await
            .unwrap();
        (
            agent_id,
            self.client(&key.credential.public_value, &key.secret_value),
        )
    }

    /// A new project and a client with a key of it.
    pub async fn project(&self, name: &str) -> (String, Client) {
        let project = self
            .admin
            .post("projects", &serde_json::json!({"name": name}))
            .await
            .unwrap();
        let id = project["id"].as_str().unwrap().to_owned();
        let key = self
            .admin
            .post(&format!("projects/{id}/apikeys"), &serde_json::json!({}))
            .await
            .unwrap();
        let client = self.client(
            key["publicValue"].as_str().unwrap(),
            key["secretValue"].as_str().unwrap(),
        );
        (id, client)
    }

    pub fn default_project(&self) -> i64 {
        self.server.state.default_project.id
    }

    /// The value of a counter or gauge on `/metrics`.
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.server.state.metrics.render();
        text.lines()
            .find_map(|line| {
                line.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .map(|value| value.trim().parse().unwrap())
            .unwrap_or_else(|| panic!("metric {name} not found in:\n{text}"))
    }
}

/// Fast retries for tests: a lost request is resent after about 300 ms.
pub const FAST: &[(&str, &str)] = &[
    ("eventing.timeout.millis", "300"),
    ("process.retry_max_wait.millis", "100"),
    ("process.poll.millis", "50"),
    ("resource.change.interval.millis", "20"),
];

/// A server on SQLite and, when `DROVER_TEST_POSTGRES_URL` is set, one on PostgreSQL, with
/// [`FAST`] and `extra` settings.
pub async fn servers(extra: &[(&str, &str)]) -> Vec<TestServer> {
    let settings: Vec<(&str, &str)> = FAST.iter().chain(extra.iter()).copied().collect();
    let mut out = vec![TestServer::start_with(&settings).await];
    if let Some(server) = TestServer::start_postgres_with(&settings).await {
        out.push(server);
    }
    out
}

/// Polls a resource until `done` holds (at most 20 s), returning it.
pub async fn wait_for(
    client: &Client,
    path: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let resource = client.get(path).await.unwrap();
        if done(&resource) {
            return resource;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; last: {resource:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls a resource until it is in `state` and not transitioning.
pub async fn wait_state(client: &Client, path: &str, state: &str) -> Value {
    wait_for(client, path, state, |r| {
        r["state"] == state && r["transitioning"] == "no"
    })
    .await
}
