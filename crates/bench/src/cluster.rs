//! Cluster mode under test (issue 14): several `drover server` nodes on one PostgreSQL database
//! and one nats-server with JetStream, all child processes of the bench on loopback.
//!
//! - [`NatsServer`]: the bench's own `nats-server -a 127.0.0.1 -p <port> -js -sd <dir>` (never
//!   the shared one), which a fault run kills with SIGKILL and starts again on the same port and
//!   store directory.
//! - [`Nodes`]: N `drover server` children named `n1`…`nN` (`DROVER_NODE_NAME`), each on a
//!   fixed loopback port of its own (kept across restarts, so that clients and agents find it
//!   again), with its own data directory and log (`<root>/<name>.log`, appended across
//!   restarts), on one database URL and one NATS URL (`DROVER_NATS_URL`).
//! - [`cluster_nodes`], [`wait_alive`]: `GET /v1/clusternodes`.
//!
//! The node name and the NATS URL go through the environment, so that the same code also
//! starts a server built before cluster mode (which ignores them) as a single node.
//!
//! Everything started is killed when its handle is dropped, also on error.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;
use tokio::process::{Child, Command};

use crate::harness::{ACCESS_KEY, SECRET_KEY};

/// A free port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .context("bind a free port")?
        .local_addr()?
        .port())
}

// ---------------------------------------------------------------------------------------------
// nats-server.

/// The bench's own nats-server with JetStream, restartable on the same port and store.
#[derive(Debug)]
pub struct NatsServer {
    bin: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Its pid while it runs.
    pub pid: Option<u32>,
}

impl NatsServer {
    /// Starts `bin -a 127.0.0.1 -p <free port> -js -sd <temporary dir>` and waits (at most
    /// 15 s) until it accepts connections.
    pub async fn start(bin: &Path) -> Result<NatsServer> {
        let dir = tempfile::Builder::new()
            .prefix("drover-bench-nats-")
            .tempdir()?;
        let mut server = NatsServer {
            bin: bin.to_owned(),
            port: free_port()?,
            dir,
            child: None,
            pid: None,
        };
        server.spawn().await?;
        Ok(server)
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on the same port and store directory and waits (at most 15 s, the
    /// port may still be held for a moment) until it accepts connections; how long that took.
    pub async fn spawn(&mut self) -> Result<Duration> {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(15);
        'spawn: loop {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.path().join("nats.log"))?;
            let mut child = Command::new(&self.bin)
                .args([
                    "-a",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-js",
                    "-sd",
                ])
                .arg(self.dir.path().join("store"))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("spawn {}", self.bin.display()))?;
            loop {
                if let Some(status) = child.try_wait()? {
                    if Instant::now() > deadline {
                        bail!(
                            "nats-server exited at start ({status}); log:\n{}",
                            tail(&self.dir.path().join("nats.log"), 20)
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue 'spawn;
                }
                if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                    .await
                    .is_ok()
                {
                    self.pid = child.id();
                    self.child = Some(child);
                    return Ok(started.elapsed());
                }
                if Instant::now() > deadline {
                    let _ = child.start_kill();
                    bail!("nats-server did not listen on {} within 15 s", self.port);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Kills it with SIGKILL and waits (bounded) for it to be gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
        self.pid = None;
    }

    /// Whether it ended by itself (its exit status; it is then forgotten).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        self.pid = None;
        Some(status)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.start_kill();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// drover server nodes.

/// How to start the nodes.
#[derive(Debug, Clone, Default)]
pub struct NodeConfig {
    /// The drover binary.
    pub bin: PathBuf,
    /// Where the nodes' data directories (`<root>/<name>/`) and logs (`<root>/<name>.log`) go.
    pub root: PathBuf,
    /// `--database-url` (none: each node has its own SQLite, which only makes sense for one).
    pub database_url: Option<String>,
    /// `DROVER_NATS_URL` (none: the variable is removed, the node runs alone).
    pub nats_url: Option<String>,
    /// More environment (settings as `DROVER_<SETTING>`).
    pub env: Vec<(String, String)>,
    /// `DROVER_LOG` (empty: `warn`).
    pub log: String,
    /// `TOKIO_WORKER_THREADS`.
    pub threads: Option<usize>,
}

/// One node's slot: its name and address stay, its process comes and goes.
#[derive(Debug)]
pub struct Slot {
    /// `n<i>`.
    pub name: String,
    /// `127.0.0.1:<port>`.
    pub addr: SocketAddr,
    child: Option<Child>,
    /// Its pid while it runs.
    pub pid: Option<u32>,
}

/// N `drover server` nodes; every one still running is SIGKILLed on drop.
#[derive(Debug)]
pub struct Nodes {
    /// How they start.
    pub config: NodeConfig,
    /// The nodes, `n1` first.
    pub slots: Vec<Slot>,
}

impl Nodes {
    /// `n` slots with free ports; nothing started yet.
    pub fn new(config: NodeConfig, n: usize) -> Result<Nodes> {
        std::fs::create_dir_all(&config.root)?;
        let slots = (1..=n.max(1))
            .map(|i| {
                Ok(Slot {
                    name: format!("n{i}"),
                    addr: ([127, 0, 0, 1], free_port()?).into(),
                    child: None,
                    pid: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Nodes { config, slots })
    }

    /// Starts every node, one after the other (the first one migrates the schema).
    pub async fn start_all(&mut self) -> Result<()> {
        for i in 0..self.slots.len() {
            self.start(i).await?;
        }
        Ok(())
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are none (never: [`Nodes::new`] makes at least one).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// `http://127.0.0.1:<port>` of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("http://{}", self.slots[i].addr)
    }

    /// Every node's URL.
    pub fn urls(&self) -> Vec<String> {
        (0..self.slots.len()).map(|i| self.url(i)).collect()
    }

    /// The pids of the nodes that run.
    pub fn pids(&self) -> Vec<u32> {
        self.slots.iter().filter_map(|slot| slot.pid).collect()
    }

    /// Whether node `i` runs (not known to have exited).
    pub fn is_up(&self, i: usize) -> bool {
        self.slots[i].child.is_some()
    }

    /// The log file of node `i`.
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.config.root.join(format!("{}.log", self.slots[i].name))
    }

    /// The last `lines` lines of node `i`'s log.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        tail(&self.log_path(i), lines)
    }

    fn command(&self, i: usize) -> Result<Command> {
        let slot = &self.slots[i];
        let config = &self.config;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))?;
        let mut command = Command::new(&config.bin);
        command
            .arg("server")
            .arg("--listen")
            .arg(slot.addr.to_string())
            .arg("--data-dir")
            .arg(config.root.join(&slot.name))
            .env("DROVER_ADMIN_ACCESS_KEY", ACCESS_KEY)
            .env("DROVER_ADMIN_SECRET_KEY", SECRET_KEY)
            .env(
                "DROVER_LOG",
                if config.log.is_empty() {
                    "warn"
                } else {
                    &config.log
                },
            )
            .env("DROVER_NODE_NAME", &slot.name)
            .env_remove("DROVER_DATABASE_URL")
            .envs(config.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        match &config.nats_url {
            Some(url) => command.env("DROVER_NATS_URL", url),
            None => command.env_remove("DROVER_NATS_URL"),
        };
        if let Some(url) = &config.database_url {
            command.arg("--database-url").arg(url);
        }
        if let Some(threads) = config.threads {
            command.env("TOKIO_WORKER_THREADS", threads.to_string());
        }
        Ok(command)
    }

    /// Starts node `i` (again) on its port and data and waits (at most 60 s) for `/healthz`
    /// to answer 200; a start that exits (the port still held, say) is tried again. How long
    /// it took.
    pub async fn start(&mut self, i: usize) -> Result<Duration> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let started = Instant::now();
        let deadline = started + Duration::from_secs(60);
        let mut exits = 0;
        'spawn: loop {
            let mut child = self.command(i)?.spawn().context("spawn drover server")?;
            loop {
                if let Some(status) = child.try_wait()? {
                    exits += 1;
                    if exits >= 20 || Instant::now() > deadline {
                        bail!(
                            "node {} exited at start {exits} times (last: {status}); log:\n{}",
                            self.slots[i].name,
                            self.log_tail(i, 20)
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue 'spawn;
                }
                if let Ok(response) = http.get(format!("{}/healthz", self.url(i))).send().await
                    && response.status().is_success()
                {
                    let slot = &mut self.slots[i];
                    slot.pid = child.id();
                    slot.child = Some(child);
                    return Ok(started.elapsed());
                }
                if Instant::now() > deadline {
                    let _ = child.start_kill();
                    bail!(
                        "node {} did not answer /healthz in 60 s; log:\n{}",
                        self.slots[i].name,
                        self.log_tail(i, 20)
                    );
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }

    /// Kills node `i` with SIGKILL and waits (bounded) for it to be gone.
    pub async fn kill(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        if let Some(mut child) = slot.child.take() {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
        slot.pid = None;
    }

    /// The nodes that ended by themselves since the last call, with their exit statuses.
    pub fn exited(&mut self) -> Vec<(usize, ExitStatus)> {
        let mut out = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Some(status) = slot
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten())
            {
                slot.child = None;
                slot.pid = None;
                out.push((i, status));
            }
        }
        out
    }

    /// Kills every node (SIGKILL) and waits (bounded) for each.
    pub async fn kill_all(&mut self) {
        for i in 0..self.slots.len() {
            self.kill(i).await;
        }
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for slot in &mut self.slots {
            if let Some(child) = &mut slot.child {
                let _ = child.start_kill();
            }
        }
    }
}

/// The last `lines` lines of a file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// /v1/clusternodes.

/// `GET <url>/v1/clusternodes` with the admin key: the items.
pub async fn cluster_nodes(http: &reqwest::Client, url: &str) -> Result<Vec<Value>> {
    let response = http
        .get(format!("{url}/v1/clusternodes"))
        .basic_auth(ACCESS_KEY, Some(SECRET_KEY))
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("GET /v1/clusternodes: {status} {body}");
    }
    Ok(body["data"].as_array().cloned().unwrap_or_default())
}

/// Waits (bounded by `timeout`) until `/v1/clusternodes` on `url` lists `names` all `alive`
/// with one leader among them; the items then.
pub async fn wait_alive(url: &str, names: &[String], timeout: Duration) -> Result<Vec<Value>> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let deadline = Instant::now() + timeout;
    let mut last: String;
    loop {
        match cluster_nodes(&http, url).await {
            Ok(items) => {
                let alive = |name: &String| {
                    items
                        .iter()
                        .any(|item| item["name"] == name.as_str() && item["state"] == "alive")
                };
                let leaders = items
                    .iter()
                    .filter(|item| item["state"] == "alive" && item["leader"] == true)
                    .count();
                if names.iter().all(alive) && leaders == 1 {
                    return Ok(items);
                }
                last = Value::Array(items).to_string();
            }
            Err(error) => last = format!("{error:#}"),
        }
        if Instant::now() > deadline {
            return Err(anyhow!(
                "the cluster did not list {names:?} alive with one leader within {} s; last: {last}",
                timeout.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `id` of the node named `name` in `/v1/clusternodes` items.
pub fn node_id(items: &[Value], name: &str) -> Option<String> {
    items
        .iter()
        .find(|item| item["name"] == name)
        .and_then(|item| item["id"].as_str())
        .map(str::to_owned)
}

/// `--setting NAME=VALUE` → `(DROVER_NAME, VALUE)`.
pub fn setting_env(name: &str, value: &str) -> (String, String) {
    (
        format!(
            "DROVER_{}",
            name.to_ascii_uppercase().replace(['.', '-'], "_")
        ),
        value.to_owned(),
    )
}

/// Parses `NAME=VALUE` (a setting name is letters, digits, `.` and `_`).
pub fn parse_setting(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: a setting is NAME=VALUE"))?;
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_')
    {
        return Err(format!("{name:?} is not a setting name"));
    }
    Ok((name.to_owned(), value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_node_id_by_name() {
        let items = vec![
            serde_json::json!({"id": "a1", "name": "n1"}),
            serde_json::json!({"id": "b2", "name": "n2"}),
        ];
        assert_eq!(node_id(&items, "n2").as_deref(), Some("b2"));
        assert_eq!(node_id(&items, "n3"), None);
    }

    #[test]
    fn settings_become_variables() {
        assert_eq!(
            setting_env("cluster.node.ttl.millis", "3000"),
            ("DROVER_CLUSTER_NODE_TTL_MILLIS".into(), "3000".into())
        );
        assert!(parse_setting("x").is_err());
        assert_eq!(parse_setting("a.b=1").unwrap(), ("a.b".into(), "1".into()));
    }
}
