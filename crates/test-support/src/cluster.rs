//! A cluster of real `drover server` children: N nodes on one fresh PostgreSQL database and one
//! nats-server (`DROVER_TEST_NATS_URL`), each with `--node-name n<i>`, a data directory of its
//! own and short cluster TTLs, which a test can kill (`kill -9`), pause (SIGSTOP/SIGCONT) and
//! restart on the same address.
//!
//! When `DROVER_TEST_NATS_URL` (or `DROVER_TEST_POSTGRES_URL`) is unset a cluster test never
//! passes silently: with `CI` set it panics, otherwise it prints a `SKIP` line to stderr.
//!
//! Each node's stderr is kept (its last lines); when a test fails with a cluster alive, the
//! cluster prints every node's last lines, so the failure shows what the nodes said.

use std::collections::VecDeque;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_client::Client;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::postgres::Database;
use crate::process::DroverProcess;
use crate::{ADMIN_ACCESS, ADMIN_SECRET};

/// The variable that names the NATS server for cluster tests (`.ci/run` sets it).
pub const NATS_VAR: &str = "DROVER_TEST_NATS_URL";

/// Settings every node gets unless the test overrides them: nodes die 2 s after their last
/// heartbeat, leases are short, lost requests are resent quickly, starts never run out of
/// attempts while an agent holds its replies, and changes are not coalesced for long.
pub const CLUSTER_ENV: &[(&str, &str)] = &[
    ("DROVER_CLUSTER_NODE_TTL_MILLIS", "2000"),
    ("DROVER_CLUSTER_HEARTBEAT_MILLIS", "400"),
    ("DROVER_PROCESS_LEASE_MILLIS", "2000"),
    ("DROVER_EVENTING_TIMEOUT_MILLIS", "500"),
    ("DROVER_PROCESS_RETRY_MAX_WAIT_MILLIS", "200"),
    ("DROVER_PROCESS_POLL_MILLIS", "50"),
    ("DROVER_PROCESS_MAX_ATTEMPTS", "1000"),
    ("DROVER_RESOURCE_CHANGE_INTERVAL_MILLIS", "20"),
];

/// Lines of each node's stderr kept for failure reports and [`Node::log`].
const LOG_LINES: usize = 400;

/// The NATS URL to test against, or `None` (after a `SKIP` line; a panic in CI) when
/// `DROVER_TEST_NATS_URL` is unset. `what` names the test for that line.
pub fn nats_url(what: &str) -> Option<String> {
    match std::env::var(NATS_VAR) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            let ci = std::env::var("CI").unwrap_or_default();
            if !ci.is_empty() && ci != "false" && ci != "0" {
                panic!("the cluster suite is required in CI: {NATS_VAR} is not set ({what})");
            }
            use std::io::Write;
            let test = std::thread::current().name().unwrap_or("?").to_owned();
            let _ = writeln!(
                std::io::stderr(),
                "SKIP: {test} ({what}): {NATS_VAR} is not set (.ci/run sets it)"
            );
            None
        }
    }
}

/// The last lines a child wrote on stderr.
#[derive(Debug, Clone, Default)]
struct Log(Arc<Mutex<VecDeque<String>>>);

impl Log {
    fn push(&self, line: String) {
        let line = strip_ansi(&line);
        let mut lines = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if lines.len() == LOG_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    fn text(&self) -> String {
        let lines = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        lines.iter().map(|line| format!("{line}\n")).collect()
    }
}

/// `text` without ANSI colour sequences (`ESC [ … m`), which the server's log has.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// One `drover server` child of a [`Cluster`].
#[derive(Debug)]
pub struct Node {
    /// `n<i>`, its `--node-name`.
    pub name: String,
    /// `127.0.0.1:<port>`: kept across [`Cluster::restart`].
    pub addr: String,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// A client of this node with the admin key.
    pub admin: Client,
    process: Option<DroverProcess>,
    pid: Option<u32>,
    dir: tempfile::TempDir,
    log: Log,
}

impl Node {
    /// A client of this node with a key.
    pub fn client(&self, access: &str, secret: &str) -> Client {
        Client::new(&self.url, access, secret).unwrap()
    }

    /// The last lines (at most 400) it wrote on stderr, across its restarts.
    pub fn log(&self) -> String {
        self.log.text()
    }

    /// Its pid while it runs (also while it is stopped).
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Whether its process runs (or is stopped); not after [`Cluster::kill`].
    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// `GET /metrics` of this node: the value of the sample named exactly `name` (no labels),
    /// `None` when the node does not export it (or does not answer).
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = reqwest::get(format!("{}/metrics", self.url))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines().find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|value| value.trim().parse().ok())
        })
    }

    /// `GET /healthz`: its status code and body (`None` when the node does not answer).
    pub async fn health(&self) -> Option<(u16, serde_json::Value)> {
        let response = reqwest::get(format!("{}/healthz", self.url)).await.ok()?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(serde_json::Value::Null);
        Some((status, body))
    }
}

/// How a child that was to fail ended: its exit status and what it said on stderr.
#[derive(Debug)]
pub struct Exited {
    /// How it ended.
    pub status: ExitStatus,
    /// Its stderr (the last 400 lines).
    pub log: String,
}

/// Builds a [`Cluster`]:
/// `Cluster::builder(env!("CARGO_BIN_EXE_drover"), 3).env("DROVER_…", "…").start("what").await`.
#[derive(Debug, Clone)]
pub struct Builder {
    bin: String,
    nodes: usize,
    env: Vec<(String, String)>,
}

impl Builder {
    /// Sets an environment variable on every node (a `DROVER_*` setting), in place of a
    /// [`CLUSTER_ENV`] default of the same name.
    pub fn env(mut self, name: &str, value: &str) -> Builder {
        self.env.retain(|(other, _)| other != name);
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Starts the nodes one after the other on a fresh database; `None` when PostgreSQL or
    /// NATS is not configured (after a `SKIP` line; in CI it panics). `what` names the test.
    pub async fn start(self, what: &str) -> Option<Cluster> {
        crate::init();
        let nats_url = nats_url(what)?;
        let database = Database::create("drover_cluster", what).await?;
        let mut cluster = Cluster {
            bin: self.bin,
            database_url: database.url.clone(),
            nats_url,
            nodes: Vec::new(),
            pool: tokio::sync::OnceCell::new(),
            env: self.env,
            database: Some(database),
        };
        for _ in 0..self.nodes {
            cluster.add_node().await;
        }
        Some(cluster)
    }
}

/// N `drover server` children on one database and one nats-server; every child is SIGKILLed
/// when the cluster is dropped, and [`Cluster::finish`] drops the database too.
#[derive(Debug)]
pub struct Cluster {
    /// The cluster's PostgreSQL database.
    pub database_url: String,
    /// The nats-server.
    pub nats_url: String,
    /// The nodes, `n0`, `n1`, … in start order.
    pub nodes: Vec<Node>,
    pool: tokio::sync::OnceCell<sqlx::PgPool>,
    bin: String,
    env: Vec<(String, String)>,
    database: Option<Database>,
}

impl Cluster {
    /// A builder for `nodes` nodes of the `drover` binary `bin` with [`CLUSTER_ENV`].
    pub fn builder(bin: &str, nodes: usize) -> Builder {
        Builder {
            bin: bin.to_owned(),
            nodes,
            env: CLUSTER_ENV
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                .collect(),
        }
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// Starts one more node, `n<len>`, on a free port; returns its index.
    pub async fn add_node(&mut self) -> usize {
        let i = self.nodes.len();
        let name = format!("n{i}");
        let dir = tempfile::tempdir().unwrap();
        let log = Log::default();
        let command = self.command(dir.path(), "127.0.0.1:0", Some(&name), true);
        let (process, addr) = match spawn_server(command, log.clone()).await {
            Ok(started) => started,
            Err(exited) => panic!(
                "node {name} did not start: {:?}\n{}",
                exited.status, exited.log
            ),
        };
        let url = format!("http://{addr}");
        let pid = process.id();
        self.nodes.push(Node {
            name,
            admin: Client::new(&url, ADMIN_ACCESS, ADMIN_SECRET).unwrap(),
            addr,
            url,
            process: Some(process),
            pid,
            dir,
            log,
        });
        i
    }

    /// `drover server` on this cluster's database (and NATS, when `nats`) with the admin key
    /// and the cluster's environment.
    fn command(
        &self,
        data_dir: &std::path::Path,
        listen: &str,
        name: Option<&str>,
        nats: bool,
    ) -> Command {
        let mut command = Command::new(&self.bin);
        command
            .args(["server", "--listen", listen, "--data-dir"])
            .arg(data_dir)
            .args(["--database-url", &self.database_url]);
        if nats {
            command.args(["--nats-url", &self.nats_url]);
        }
        if let Some(name) = name {
            command.args(["--node-name", name]);
        }
        command
            .env_remove("DROVER_NATS_URL")
            .env_remove("DROVER_NODE_NAME")
            .env("DROVER_ADMIN_ACCESS_KEY", ADMIN_ACCESS)
            .env("DROVER_ADMIN_SECRET_KEY", ADMIN_SECRET)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        command
    }

    /// `kill -9` of node `i` (also when it is stopped), reaped before this returns.
    pub async fn kill(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if let Some(mut process) = node.process.take() {
            process.kill().await;
        }
        node.pid = None;
    }

    /// SIGSTOP to node `i`: it keeps its sockets and state but does nothing (a long GC pause,
    /// a frozen VM).
    pub fn pause(&self, i: usize) {
        self.signal(i, nix::sys::signal::Signal::SIGSTOP);
    }

    /// SIGCONT to node `i` after [`Cluster::pause`].
    pub fn resume(&self, i: usize) {
        self.signal(i, nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, i: usize, signal: nix::sys::signal::Signal) {
        let pid = self.nodes[i].pid.expect("a running node");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
            .unwrap_or_else(|error| panic!("{signal} to node {i}: {error}"));
    }

    /// Restarts node `i` (killing it first if it runs) on the same address, data directory and
    /// name, retrying (bounded) while the address is not free yet.
    pub async fn restart(&mut self, i: usize) {
        self.kill(i).await;
        let deadline = tokio::time::Instant::now() + crate::WAIT;
        loop {
            let node = &self.nodes[i];
            let command = self.command(node.dir.path(), &node.addr, Some(&node.name), true);
            match spawn_server(command, node.log.clone()).await {
                Ok((process, _)) => {
                    let node = &mut self.nodes[i];
                    node.pid = process.id();
                    node.process = Some(process);
                    return;
                }
                Err(exited) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "node {i} did not restart on {}: {:?}\n{}",
                        node.addr,
                        exited.status,
                        exited.log
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Runs one more `drover server` on this database (with NATS only when `nats`) and waits
    /// (at most 30 s) for it to exit by itself, which a refused start does: how it ended and
    /// what it said. Panics with its log if it is still running after 30 s.
    pub async fn run_refused(&self, nats: bool) -> Exited {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::default();
        let mut command = self.command(dir.path(), "127.0.0.1:0", None, nats);
        command.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut process = DroverProcess::spawn(command);
        let stderr = process.child_mut().stderr.take().unwrap();
        let reader = tokio::spawn(read_lines(stderr, log.clone(), None));
        let status = tokio::time::timeout(crate::WAIT, process.child_mut().wait()).await;
        let Ok(status) = status else {
            panic!(
                "the server was not refused: still running after {:?}:\n{}",
                crate::WAIT,
                log.text()
            );
        };
        let _ = reader.await;
        Exited {
            status: status.unwrap(),
            log: log.text(),
        }
    }

    /// Rows of one query on the cluster's database (the test's own connections).
    pub async fn query<T>(&self, query: &str) -> Vec<T>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
    {
        let pool = self
            .pool
            .get_or_init(|| async {
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(2)
                    .connect(&self.database_url)
                    .await
                    .unwrap()
            })
            .await;
        sqlx::query_as::<_, T>(sqlx::AssertSqlSafe(query.to_owned()))
            .fetch_all(pool)
            .await
            .unwrap_or_else(|error| panic!("{query}: {error}"))
    }

    /// How many of node `i`'s PostgreSQL sessions are inside a transaction that has written
    /// rows (has a transaction id) and written to `table` (holds its `RowExclusiveLock`) right
    /// now. Linux: the node's sockets are found
    /// in `/proc` and matched to `pg_stat_activity.client_port`. With the node paused, such a
    /// transaction keeps the row locks of what it wrote until the node resumes, unless
    /// PostgreSQL ends it.
    pub async fn sessions_writing(&self, i: usize, table: &str) -> i64 {
        let pid = self.nodes[i].pid.expect("a running node");
        let server_port = reqwest::Url::parse(&self.database_url)
            .ok()
            .and_then(|url| url.port())
            .unwrap_or(5432);
        let ports = postgres_client_ports(pid, server_port);
        if ports.is_empty() {
            return 0;
        }
        let ports = ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",");
        self.scalar(&format!(
            "SELECT count(DISTINCT a.pid) FROM pg_stat_activity a \
             JOIN pg_locks l ON l.pid = a.pid JOIN pg_class c ON c.oid = l.relation \
             WHERE a.datname = current_database() AND a.client_port IN ({ports}) \
             AND a.backend_xid IS NOT NULL AND c.relname = '{table}' \
             AND l.mode = 'RowExclusiveLock' AND l.granted"
        ))
        .await
    }

    /// The `i64` in the first column of the first row of a query.
    pub async fn scalar(&self, query: &str) -> i64 {
        let rows: Vec<(i64,)> = self.query(query).await;
        rows.first().unwrap_or_else(|| panic!("{query}: no row")).0
    }

    /// A new agent in the default project: `(agent id, access key, secret key)`, made in the
    /// store (as an operator's registration would).
    pub async fn agent_key(&self, name: &str) -> (i64, String, String) {
        let store = drover_store::Store::connect(&drover_store::StoreOptions::url(
            self.database_url.clone(),
        ))
        .await
        .unwrap();
        let project = store
            .list_accounts(drover_store::AccountKind::Project)
            .await
            .unwrap()[0]
            .id;
        let (agent_id, _, key) = store.create_agent(project, name, None).await.unwrap();
        store.close().await;
        (agent_id, key.credential.public_value, key.secret_value)
    }

    /// A new project through node `i`: its API id, and the access and secret key of a key of
    /// it.
    pub async fn project_key(&self, i: usize, name: &str) -> (String, String, String) {
        let admin = &self.nodes[i].admin;
        let project = admin
            .post("projects", &serde_json::json!({"name": name}))
            .await
            .unwrap();
        let id = project["id"].as_str().unwrap().to_owned();
        let key = admin
            .post(&format!("projects/{id}/apikeys"), &serde_json::json!({}))
            .await
            .unwrap();
        (
            id,
            key["publicValue"].as_str().unwrap().to_owned(),
            key["secretValue"].as_str().unwrap().to_owned(),
        )
    }

    /// Every node's last stderr lines, headed by its name.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|node| format!("---- {} ({}):\n{}", node.name, node.url, node.log()))
            .collect()
    }

    /// Kills every node and drops the database.
    pub async fn finish(mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i).await;
        }
        if let Some(pool) = self.pool.get() {
            pool.close().await;
        }
        if let Some(database) = self.database.take() {
            database.drop_now().await;
        }
    }
}

impl Drop for Cluster {
    /// Every node is SIGKILLed (by its [`DroverProcess`]); a failing test gets their logs.
    /// The database of a failed test stays for inspection (`.ci/run` drops it next time).
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("cluster nodes' last log lines:\n{}", self.logs());
            if let Some(database) = &self.database {
                eprintln!("the cluster's database is kept: {}", database.url);
            }
        }
    }
}

/// Spawns a server command, keeps its stderr in `log`, and waits (at most 30 s) for the
/// address it prints; `Err` with how it ended if it exits first.
async fn spawn_server(mut command: Command, log: Log) -> Result<(DroverProcess, String), Exited> {
    command.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut process = DroverProcess::spawn(command);
    let stderr = process.child_mut().stderr.take().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(read_lines(stderr, log.clone(), Some(tx)));
    match tokio::time::timeout(crate::WAIT, rx).await {
        Ok(Ok(addr)) => {
            process.url = format!("http://{addr}");
            Ok((process, addr))
        }
        Ok(Err(_)) => {
            let status = process.exited(Duration::from_secs(10)).await;
            Err(Exited {
                status,
                log: log.text(),
            })
        }
        Err(_) => panic!(
            "the server did not print its address within {:?}:\n{}",
            crate::WAIT,
            log.text()
        ),
    }
}

/// Reads a child's stderr to its end into `log`; sends the address once it says
/// `drover listening on http://ADDR/v1`.
async fn read_lines(
    stderr: tokio::process::ChildStderr,
    log: Log,
    mut listening: Option<tokio::sync::oneshot::Sender<String>>,
) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(rest) = line.split("drover listening on http://").nth(1)
            && let Some(tx) = listening.take()
        {
            let _ = tx.send(rest.trim().trim_end_matches("/v1").to_owned());
        }
        log.push(line);
    }
}

/// The local ports of `pid`'s TCP connections to `server_port`, from `/proc`.
fn postgres_client_ports(pid: u32, server_port: u16) -> Vec<u16> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            link.strip_prefix("socket:[")
                .and_then(|rest| rest.strip_suffix(']'))
                .map(str::to_owned)
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(remote), Some(inode)) =
                (fields.get(1), fields.get(2), fields.get(9))
            else {
                continue;
            };
            let port = |address: &str| {
                address
                    .rsplit(':')
                    .next()
                    .and_then(|hex| u16::from_str_radix(hex, 16).ok())
            };
            if port(remote) == Some(server_port)
                && inodes.contains(*inode)
                && let Some(local) = port(local)
            {
                ports.push(local);
            }
        }
    }
    ports
}
