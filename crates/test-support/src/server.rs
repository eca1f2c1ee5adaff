//! A real server in the test's process: `127.0.0.1:0`, a temporary data directory, SQLite or a
//! fresh PostgreSQL schema, the admin key set.

use std::net::SocketAddr;

use drover_client::{Client, Tls};
use drover_server::{Config, Server, TlsFiles};

use crate::postgres::Schema;

/// The admin's access key on every test server.
pub const ADMIN_ACCESS: &str = "TESTADMINACCESSKEY01";
/// The admin's secret key on every test server.
pub const ADMIN_SECRET: &str = "test-admin-secret-key-0123456789abcdefgh";

/// Fast retries for tests: a lost request is resent after about 300 ms.
pub const FAST: &[(&str, &str)] = &[
    ("eventing.timeout.millis", "300"),
    ("process.retry_max_wait.millis", "100"),
    ("process.poll.millis", "50"),
    ("resource.change.interval.millis", "20"),
];

/// Which store a server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `drover.db` in the server's temporary data directory.
    Sqlite,
    /// A fresh schema in `DROVER_TEST_POSTGRES_URL`.
    Postgres,
}

/// Builds a [`TestServer`]: `TestServer::builder().setting(k, v).postgres().start().await`.
#[derive(Debug, Clone)]
pub struct Builder {
    settings: Vec<(String, String)>,
    backend: Backend,
    tls: Option<(String, String)>,
}

impl Builder {
    /// Overrides one setting (as a `DROVER_*` environment variable would).
    pub fn setting(mut self, name: &str, value: &str) -> Builder {
        self.settings.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Overrides several settings.
    pub fn settings(mut self, settings: &[(&str, &str)]) -> Builder {
        for (name, value) in settings {
            self = self.setting(name, value);
        }
        self
    }

    /// Runs on `backend` (SQLite by default).
    pub fn backend(mut self, backend: Backend) -> Builder {
        self.backend = backend;
        self
    }

    /// Runs on PostgreSQL, in a schema of its own.
    pub fn postgres(self) -> Builder {
        self.backend(Backend::Postgres)
    }

    /// Serves HTTPS and WSS with this certificate and key (PEM, written to the data directory
    /// as `tls-cert.pem` and `tls-key.pem`); the server's URL is then
    /// `https://localhost:<port>` (the certificate must name `localhost`) and its clients
    /// trust the certificate as a CA.
    pub fn tls(mut self, cert_pem: &str, key_pem: &str) -> Builder {
        self.tls = Some((cert_pem.to_owned(), key_pem.to_owned()));
        self
    }

    /// Starts the server. On PostgreSQL this panics when `DROVER_TEST_POSTGRES_URL` is unset;
    /// use [`Builder::try_start`] (or [`crate::servers`]) to skip instead.
    pub async fn start(self) -> TestServer {
        let backend = self.backend;
        self.try_start()
            .await
            .unwrap_or_else(|| panic!("a {backend:?} server needs DROVER_TEST_POSTGRES_URL"))
    }

    /// Starts the server; `None` on PostgreSQL when `DROVER_TEST_POSTGRES_URL` is unset (after
    /// a `SKIP` line on stderr; in CI it panics instead).
    pub async fn try_start(self) -> Option<TestServer> {
        crate::init();
        let schema = match self.backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(Schema::create("srv", "a server test").await?),
        };
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::new(dir.path());
        config.admin_access_key = Some(ADMIN_ACCESS.into());
        config.admin_secret_key = Some(ADMIN_SECRET.into());
        config.settings = self.settings;
        if let Some(schema) = &schema {
            config.database_url = Some(schema.url.clone());
            config.database_schema = Some(schema.name.clone());
        }
        if let Some((cert, key)) = &self.tls {
            let files = TlsFiles {
                cert: dir.path().join("tls-cert.pem"),
                key: dir.path().join("tls-key.pem"),
            };
            std::fs::write(&files.cert, cert).unwrap();
            std::fs::write(&files.key, key).unwrap();
            config.tls = Some(files);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Some(TestServer::serve(listener, config, schema, dir).await)
    }
}

/// A server under test; it stops when dropped with its runtime.
#[derive(Debug)]
pub struct TestServer {
    /// The server itself: its address and its state (store, hub, settings, metrics).
    pub server: Server,
    /// A client with the admin key.
    pub admin: Client,
    /// `http://127.0.0.1:<port>`, or `https://localhost:<port>` over TLS.
    pub url: String,
    /// What its clients trust: over TLS, its certificate.
    pub tls: Tls,
    /// Which store it runs on.
    pub backend: Backend,
    /// The PostgreSQL schema, when on PostgreSQL.
    pub schema: Option<Schema>,
    config: Config,
    dir: tempfile::TempDir,
}

impl TestServer {
    /// A builder: SQLite, no setting overrides.
    pub fn builder() -> Builder {
        Builder {
            settings: Vec::new(),
            backend: Backend::Sqlite,
            tls: None,
        }
    }

    /// A server on a fresh SQLite data directory.
    pub async fn start() -> TestServer {
        TestServer::builder().start().await
    }

    /// A server on SQLite with setting overrides.
    pub async fn start_with(settings: &[(&str, &str)]) -> TestServer {
        TestServer::builder().settings(settings).start().await
    }

    async fn serve(
        listener: tokio::net::TcpListener,
        config: Config,
        schema: Option<Schema>,
        dir: tempfile::TempDir,
    ) -> TestServer {
        let server = Server::start(listener, config.clone())
            .await
            .expect("server starts");
        let (url, tls) = match &config.tls {
            Some(files) => (
                format!("https://localhost:{}", server.addr.port()),
                Tls::with_ca_file(&files.cert).unwrap(),
            ),
            None => (format!("http://{}", server.addr), Tls::system()),
        };
        let admin = Client::new(&url, ADMIN_ACCESS, ADMIN_SECRET)
            .unwrap()
            .with_tls(tls.clone())
            .unwrap();
        TestServer {
            server,
            admin,
            url,
            tls,
            backend: if schema.is_some() {
                Backend::Postgres
            } else {
                Backend::Sqlite
            },
            schema,
            config,
            dir,
        }
    }

    /// Stops the server and starts another on the same address, data directory, store and
    /// settings (waiting, bounded, until the address is free again).
    pub async fn restart(self) -> TestServer {
        let addr: SocketAddr = self.server.addr;
        let TestServer {
            server,
            config,
            schema,
            dir,
            ..
        } = self;
        crate::within("the server to stop", server.stop()).await;
        let listener = crate::wait_for("the address to be free again", || async {
            tokio::net::TcpListener::bind(addr).await.ok()
        })
        .await;
        TestServer::serve(listener, config, schema, dir).await
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Runs one SQL statement on the server's database through a connection of its own
    /// (tests use it to age rows; nothing in the server is bypassed for what is asserted).
    pub async fn sql(&self, statement: &str) -> u64 {
        use sqlx::Connection;
        let statement = sqlx::AssertSqlSafe(statement.to_owned());
        if let Some(schema) = &self.schema {
            let mut conn = schema.connect().await;
            return sqlx::query(statement)
                .execute(&mut conn)
                .await
                .unwrap()
                .rows_affected();
        }
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(self.dir.path().join("drover.db"))
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
        let schema = self.schema.as_ref().expect("a server on PostgreSQL");
        let mut conn = schema.connect().await;
        let row = sqlx::query(sqlx::AssertSqlSafe(query.to_owned()))
            .fetch_one(&mut conn)
            .await
            .unwrap();
        row.try_get::<Option<String>, _>(0).unwrap()
    }

    /// A client of this server with a key.
    pub fn client(&self, access: &str, secret: &str) -> Client {
        Client::new(&self.url, access, secret)
            .unwrap()
            .with_tls(self.tls.clone())
            .unwrap()
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

    /// A new project (its API id) and a client with a key of it.
    pub async fn project(&self, name: &str) -> (String, Client) {
        let (id, access, secret) = self.project_key(name).await;
        (id, self.client(&access, &secret))
    }

    /// A new project: its API id and the access and secret key of a key of it.
    pub async fn project_key(&self, name: &str) -> (String, String, String) {
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
        (
            id,
            key["publicValue"].as_str().unwrap().to_owned(),
            key["secretValue"].as_str().unwrap().to_owned(),
        )
    }

    /// The default project's numeric id.
    pub fn default_project(&self) -> i64 {
        self.server.state.default_project.id
    }

    /// The value of a counter or gauge on `/metrics` (panics if it is not there).
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

/// A server on SQLite and one on PostgreSQL (when `DROVER_TEST_POSTGRES_URL` is set; else a
/// `SKIP` line, or a panic in CI), each with [`FAST`] and `extra` settings.
pub async fn servers(extra: &[(&str, &str)]) -> Vec<TestServer> {
    let builder = TestServer::builder().settings(FAST).settings(extra);
    let mut out = vec![builder.clone().start().await];
    if let Some(server) = builder.postgres().try_start().await {
        out.push(server);
    }
    out
}
