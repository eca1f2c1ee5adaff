//! The chaos suite: faults injected at random (seeded) moments into a real `drover server` and a
//! real `drover agent` (both child processes) while workers drive containers through the REST
//! API, then a check that nothing acknowledged was lost, nothing is stuck and nothing ran twice.
//!
//! Used by `drover-bench-chaos` (long runs, `--faults 1000`) and by `.ci/chaos` (a bounded run on
//! each backend).
//!
//! - **System under test**: `drover server` on a fixed loopback port (so that clients and the
//!   agent reconnect after a restart) with its own data directory or a fresh PostgreSQL
//!   database; `drover agent` registered with a registration token, with its own state
//!   directory. Both are restarted on the same data after every kill.
//! - **Workload**: `--workers` tasks, each creating a container (command
//!   `sh -c 'sleep 3600; :' <marker>-<n>`, so that its host process is identifiable in
//!   `/proc/<pid>/cmdline`), waiting for it to run, stopping, starting and (mostly) removing it.
//!   Each call is retried on connection errors, timeouts and 5xx; only a 2xx answer counts as
//!   acknowledged. Creates carry an `Idempotency-Key`.
//! - **Faults**: kill -9 of the server, kill -9 of the agent, a PostgreSQL restart (on
//!   PostgreSQL), and agent restarts with `DROVER_AGENT_FAULT=<point>` (the agent exits by
//!   itself at that point; an agent without the point just runs normally).
//! - **Checks**: a sampler scans `/proc` every `--sample-ms` for this run's processes and maps
//!   each to its container through its stdout (`<state>/instances/<id>/stdout.log`): two live
//!   processes of one container at once is "run twice". After the faults and a bounded settle
//!   time: every acknowledged operation's effect must be there (else "lost"), no process
//!   instance may be unfinished and no container transitioning (else "stuck"), every `running`
//!   container has exactly one live process and every other container none (else "run twice" for
//!   extra processes, "lost" for a missing one).
//!
//! Everything started is killed when the [`Cluster`] is dropped (also on error, panic or
//! Ctrl-C): the agent, the instances' process groups, the server; then the database is dropped.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::task::JoinSet;

use crate::cluster::{NatsServer, NodeConfig, Nodes};
use crate::harness::{self, ACCESS_KEY, PgDatabase, SECRET_KEY};

/// The store the server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// Embedded SQLite in the data directory.
    Sqlite,
    /// A fresh database on the PostgreSQL server of `--database-url`.
    Postgres,
}

/// Server settings the chaos run starts with unless `--setting` overrides them: a shorter
/// reply timeout and retry cap than the defaults (45 s, 120 s), so that the run settles in a
/// bounded time.
pub const DEFAULT_SETTINGS: &[(&str, &str)] = &[
    ("eventing.timeout.millis", "10000"),
    ("process.retry_max_wait.millis", "5000"),
];

/// The chaos run's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// The store.
    #[arg(long, value_enum, default_value_t = Backend::Sqlite)]
    pub backend: Backend,
    /// Faults to inject (fewer if `--max-seconds` runs out first).
    #[arg(long, default_value_t = 20)]
    pub faults: u64,
    /// Seed of every random choice (default: from the clock; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Longest the fault phase may last, in seconds.
    #[arg(long, default_value_t = 600)]
    pub max_seconds: u64,
    /// Shortest pause between two faults, in ms.
    #[arg(long, default_value_t = 500)]
    pub min_gap_ms: u64,
    /// Longest pause between two faults, in ms.
    #[arg(long, default_value_t = 2500)]
    pub max_gap_ms: u64,
    /// Longest a killed server or agent stays down before it is restarted, in ms.
    #[arg(long, default_value_t = 1000)]
    pub max_down_ms: u64,
    /// Concurrent workers driving containers.
    #[arg(long, default_value_t = 6)]
    pub workers: usize,
    /// Longest a worker waits for a container to reach a state, in seconds.
    #[arg(long, default_value_t = 60)]
    pub wait_seconds: u64,
    /// Longest the system has after the last fault to settle, in seconds.
    #[arg(long, default_value_t = 120)]
    pub settle_seconds: u64,
    /// Interval of the `/proc` sampler, in ms.
    #[arg(long, default_value_t = 100)]
    pub sample_ms: u64,
    /// Share (0 to 1) of agent faults that restart the agent with `DROVER_AGENT_FAULT` set to
    /// one of `--agent-fault-points` (it then exits by itself at that point).
    #[arg(long, default_value_t = 0.25)]
    pub agent_fault_share: f64,
    /// The agent's fault points to arm (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "crash-after-spawn,exit-before-reply"
    )]
    pub agent_fault_points: Vec<String>,
    /// Containers left running or stopped at the end of their cycle, at most (the rest are
    /// removed).
    #[arg(long, default_value_t = 60)]
    pub keep_containers: u64,
    /// A server setting for the run, `NAME=VALUE` (as `DROVER_<NAME>`); repeatable. Overrides
    /// the chaos defaults (`eventing.timeout.millis=10000`, `process.retry_max_wait.millis=5000`).
    #[arg(long = "setting", value_parser = parse_setting)]
    pub settings: Vec<(String, String)>,
    /// The PostgreSQL server for `--backend postgres` (a database `drover_chaos_<pid>` is
    /// created on it and dropped afterwards).
    #[arg(
        long,
        env = "DROVER_TEST_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
    /// The drover binary (default: `drover` beside this binary, else target/release/drover).
    #[arg(long)]
    pub drover_bin: Option<PathBuf>,
    /// DROVER_LOG for the server.
    #[arg(long, default_value = "warn")]
    pub server_log: String,
    /// DROVER_LOG for the agent.
    #[arg(long, default_value = "info")]
    pub agent_log: String,
    /// Keep the run's directory (server data, agent state, logs) instead of deleting it.
    #[arg(long)]
    pub keep_dir: bool,
    /// Server nodes. More than 1 is cluster mode (needs `--backend postgres`): the nodes share
    /// the database and the bench's own nats-server with JetStream, the workers spread over
    /// the nodes (each moves to the next node after a failed try), and the faults add node
    /// kills (one node at a time, restarted after up to `--max-node-down-ms`) and nats-server
    /// restarts (kill -9, then the same port and store directory).
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// Longest a killed node stays down in cluster mode, in ms (past the node TTL, 3 s by
    /// default, the other nodes take its work over).
    #[arg(long, default_value_t = 6000)]
    pub max_node_down_ms: u64,
    /// Give the agent every node's URL, comma-separated (an agent that accepts several). By
    /// default it gets the first node's URL only, and node faults never kill that node.
    #[arg(long)]
    pub agent_all_urls: bool,
    /// The nats-server binary (cluster mode; the bench starts its own).
    #[arg(long, default_value = "/usr/sbin/nats-server")]
    pub nats_bin: PathBuf,
}

fn parse_setting(text: &str) -> Result<(String, String), String> {
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

/// `api.sub.ping.interval.millis` → `DROVER_API_SUB_PING_INTERVAL_MILLIS`.
fn setting_env(name: &str) -> String {
    format!(
        "DROVER_{}",
        name.to_ascii_uppercase().replace(['.', '-'], "_")
    )
}

// ---------------------------------------------------------------------------------------------
// Seeded randomness.

/// SplitMix64: a small, seedable generator, so that a run's choices are reproducible.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[low, high]`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        if high <= low {
            return low;
        }
        low + self.next_u64() % (high - low + 1)
    }
}

// ---------------------------------------------------------------------------------------------
// The system under test.

/// The server nodes (one, or a cluster's), the bench's own nats-server (in cluster mode) and
/// the agent, each restartable on the same data.
#[derive(Debug)]
pub struct Cluster {
    bin: PathBuf,
    root: PathBuf,
    nodes: Nodes,
    /// The bench's own nats-server (cluster mode).
    pub nats: Option<NatsServer>,
    agent_log: String,
    agent: Option<Child>,
    /// The fault point the running agent was started with.
    pub agent_armed: Option<String>,
    token: String,
    marker: String,
    /// What the agent gets as `--url`: one node's URL, or every node's, comma-separated.
    agent_url: String,
    /// The nodes a node fault may kill (not the one the agent alone knows).
    killable: Vec<usize>,
    /// Dropped after the nodes (fields drop in order).
    _database: Option<PgDatabase>,
    _dir: Option<tempfile::TempDir>,
}

impl Cluster {
    /// Every node's `http://127.0.0.1:port`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.urls()
    }

    /// How many nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Starts every node (one after the other) and waits for each one's `/healthz`.
    pub async fn start_servers(&mut self) -> Result<()> {
        self.nodes.start_all().await
    }

    /// Starts node `i` (again) on the same port and data and waits (at most 60 s) for
    /// `/healthz`; a start that fails (the port still held, say) is tried again.
    pub async fn start_server(&mut self, i: usize) -> Result<Duration> {
        self.nodes.start(i).await
    }

    /// Kills node `i` with SIGKILL and waits (bounded) for it to be gone.
    pub async fn kill_server(&mut self, i: usize) {
        self.nodes.kill(i).await;
    }

    /// Starts the agent (again) with the same state directory; `fault` sets
    /// `DROVER_AGENT_FAULT`.
    pub fn start_agent(&mut self, fault: Option<&str>) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("agent.log"))?;
        let mut command = Command::new(&self.bin);
        command
            .args(["agent", "--url", &self.agent_url, "--registration-token"])
            .arg(&self.token)
            .arg("--state-dir")
            .arg(self.root.join("agent"))
            .args(["--name", "chaos"])
            .env_remove("CATTLE_ACCESS_KEY")
            .env_remove("CATTLE_SECRET_KEY")
            .env_remove("CATTLE_URL")
            .env_remove("DROVER_AGENT_FAULT")
            .env("DROVER_LOG", &self.agent_log)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        if let Some(fault) = fault {
            command.env("DROVER_AGENT_FAULT", fault);
        }
        self.agent = Some(command.spawn().context("spawn drover agent")?);
        self.agent_armed = fault.map(str::to_owned);
        Ok(())
    }

    /// Kills the agent with SIGKILL (its instances keep running: they are in process groups
    /// of their own) and waits (bounded) for it to be gone.
    pub async fn kill_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
        self.agent_armed = None;
    }

    /// What ended by itself: the nodes (index, exit status), the agent, the nats-server.
    pub fn exits(
        &mut self,
    ) -> (
        Vec<(usize, ExitStatus)>,
        Option<ExitStatus>,
        Option<ExitStatus>,
    ) {
        let servers = self.nodes.exited();
        let agent = self
            .agent
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        if agent.is_some() {
            self.agent = None;
        }
        let nats = self.nats.as_mut().and_then(NatsServer::exited);
        (servers, agent, nats)
    }

    /// Whether every node and the agent are up (not known to have exited).
    pub fn both_up(&self) -> bool {
        (0..self.nodes.len()).all(|i| self.nodes.is_up(i)) && self.agent.is_some()
    }

    /// The last 20 lines of a log in the run directory, each cut at 300 characters.
    fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.root.join(name)).unwrap_or_default();
        let lines: Vec<String> = text
            .lines()
            .map(|line| strip_ansi(line).chars().take(300).collect())
            .collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Kills every live process of this run by process group (the agent starts each instance
    /// in a group of its own), reaping those this process adopted; returns how many.
    pub fn kill_instances(&self) -> usize {
        let own_group = nix::unistd::getpgrp().as_raw();
        let mut groups = HashSet::new();
        for process in scan(&self.marker) {
            if process.pgid > 1 && process.pgid != own_group {
                groups.insert(process.pgid);
            }
        }
        for &group in &groups {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(-group),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(50));
        reap_adopted();
        groups.len()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The agent first, so that it starts nothing more; then what it started; the nodes,
        // nats-server and the database (fields) go after.
        if let Some(agent) = &mut self.agent {
            let _ = agent.start_kill();
        }
        let killed = self.kill_instances();
        if killed > 0 {
            eprintln!("  killed {killed} instance process groups of this run");
        }
    }
}

/// `text` without ANSI colour sequences (`ESC [ … m`).
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

// ---------------------------------------------------------------------------------------------
// Host processes.

/// A live process of this run.
#[derive(Debug, Clone)]
pub struct HostProcess {
    /// Its pid.
    pub pid: i32,
    /// Its parent.
    pub ppid: i32,
    /// Its process group.
    pub pgid: i32,
    /// The container whose stdout it writes to (`1i…`), if known.
    pub container: Option<String>,
    /// The marker argument (`<marker>-<n>`).
    pub tag: String,
}

impl HostProcess {
    /// The container's id, else the marker argument (what identifies "one container").
    pub fn key(&self) -> String {
        self.container
            .clone()
            .unwrap_or_else(|| format!("tag:{}", self.tag))
    }
}

/// Every live (not zombie) process whose command line holds `marker` as an argument.
pub fn scan(marker: &str) -> Vec<HostProcess> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    let prefix = format!("{marker}-");
    for entry in entries.flatten().take(1_000_000) {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let Some(tag) = cmdline
            .split(|b| *b == 0)
            .filter_map(|arg| std::str::from_utf8(arg).ok())
            .find(|arg| arg.starts_with(&prefix))
        else {
            continue;
        };
        let Some((state, ppid, pgid)) = stat_of(pid) else {
            continue;
        };
        if state == 'Z' || state == 'X' {
            continue;
        }
        let container = std::fs::read_link(format!("/proc/{pid}/fd/1"))
            .ok()
            .and_then(|path| container_of_log(&path));
        out.push(HostProcess {
            pid,
            ppid,
            pgid,
            container,
            tag: tag.to_owned(),
        });
    }
    out
}

/// This run's instance processes by container ([`HostProcess::key`]). A process whose parent
/// is a process of the same container is that instance's own child (the shell forks before it
/// runs `sleep`, and the fork carries the same command line for a moment), not a second run.
pub fn by_container(processes: Vec<HostProcess>) -> HashMap<String, Vec<HostProcess>> {
    let keys: HashMap<i32, String> = processes.iter().map(|p| (p.pid, p.key())).collect();
    let mut out: HashMap<String, Vec<HostProcess>> = HashMap::new();
    for process in processes {
        let key = process.key();
        if keys.get(&process.ppid) == Some(&key) {
            continue;
        }
        out.entry(key).or_default().push(process);
    }
    out
}

/// `…/instances/<id>/stdout.log` (possibly ` (deleted)`) → `<id>`.
fn container_of_log(path: &Path) -> Option<String> {
    let text = path.to_str()?;
    let rest = &text[text.rfind("/instances/")? + "/instances/".len()..];
    let (id, file) = rest.split_once('/')?;
    (file.starts_with("stdout.log") && !id.is_empty()).then(|| id.to_owned())
}

/// State, parent and process group of a process.
fn stat_of(pid: i32) -> Option<(char, i32, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgid = fields.next()?.parse().ok()?;
    Some((state, ppid, pgid))
}

/// Reaps the zombies this process adopted as a child subreaper: orphans in another process
/// group than its own (the agent's instances and their children; a restarted PostgreSQL's
/// postmaster). Its own children (server, agent, psql) share its group and are left to whoever
/// waits for them.
pub fn reap_adopted() -> usize {
    let me = std::process::id() as i32;
    let own_group = nix::unistd::getpgrp().as_raw();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut reaped = 0;
    for entry in entries.flatten().take(1_000_000) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some((state, ppid, pgid)) = stat_of(pid)
            && ppid == me
            && pgid != own_group
            && state == 'Z'
        {
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(pid),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
            reaped += 1;
        }
    }
    reaped
}

/// What the sampler saw.
#[derive(Debug, Default)]
pub struct Sightings {
    /// Samples taken.
    pub samples: AtomicU64,
    /// The most live processes of this run in one sample.
    pub max_live: AtomicU64,
    /// Containers seen with more than one live process at once, with the pids.
    pub doubles: Mutex<BTreeMap<String, BTreeSet<i32>>>,
}

/// Samples `/proc` every `every` until `stop`, recording containers with more than one live
/// process at once; reaps adopted zombies as it goes.
pub async fn sample(marker: String, every: Duration, seen: Arc<Sightings>, stop: Arc<AtomicBool>) {
    let mut last_reap = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let marker2 = marker.clone();
        let Ok(processes) = tokio::task::spawn_blocking(move || scan(&marker2)).await else {
            return;
        };
        seen.samples.fetch_add(1, Ordering::Relaxed);
        seen.max_live
            .fetch_max(processes.len() as u64, Ordering::Relaxed);
        for (key, processes) in by_container(processes) {
            if processes.len() > 1 {
                let mut doubles = seen.doubles.lock().unwrap_or_else(|p| p.into_inner());
                doubles
                    .entry(key)
                    .or_default()
                    .extend(processes.iter().map(|p| p.pid));
            }
        }
        if last_reap.elapsed() > Duration::from_secs(1) {
            let _ = tokio::task::spawn_blocking(reap_adopted).await;
            last_reap = Instant::now();
        }
        tokio::time::sleep(every).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The API, with retries.

/// An API call's outcome after its retries.
#[derive(Debug)]
pub enum Outcome {
    /// A 2xx: acknowledged.
    Acked(Value),
    /// A 4xx on the first try: refused, nothing done.
    Refused(u16, Value),
    /// A 4xx after an earlier try failed without an answer: that try may have done it.
    RefusedAfterFailure(u16, Value),
    /// No 2xx or 4xx within the retries: may or may not have been done.
    Unanswered(String),
}

/// A REST client that retries connection errors, timeouts and 5xx; with several servers (the
/// nodes of a cluster) it moves to the next one after each failed try, as a client behind a
/// load balancer would.
#[derive(Debug, Clone)]
pub struct Api {
    http: reqwest::Client,
    bases: Arc<Vec<String>>,
    current: Arc<std::sync::atomic::AtomicUsize>,
    /// Writes that were tried again.
    pub retries: Arc<AtomicU64>,
    /// Reads (`GET`) that were tried again.
    pub read_retries: Arc<AtomicU64>,
}

impl Api {
    /// A client of the servers at `bases` (at least one), starting with the first.
    pub fn new(bases: &[String]) -> Result<Api> {
        if bases.is_empty() {
            bail!("no server URL");
        }
        Ok(Api {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .connect_timeout(Duration::from_secs(2))
                .pool_idle_timeout(Duration::from_secs(5))
                .build()?,
            bases: Arc::new(bases.to_vec()),
            current: Arc::default(),
            retries: Arc::default(),
            read_retries: Arc::default(),
        })
    }

    /// The same client (its counters shared) with a server cursor of its own, starting at
    /// server `i` (mod their number).
    pub fn starting_at(&self, i: usize) -> Api {
        Api {
            current: Arc::new(std::sync::atomic::AtomicUsize::new(i % self.bases.len())),
            ..self.clone()
        }
    }

    fn base(&self) -> &str {
        &self.bases[self.current.load(Ordering::Relaxed) % self.bases.len()]
    }

    /// After a failed try: the next server.
    fn next_server(&self) {
        if self.bases.len() > 1 {
            self.current.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One try: the status and body, or the transport error.
    pub async fn once(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        idempotency_key: Option<&str>,
    ) -> Result<(u16, Value), String> {
        let mut request = self
            .http
            .request(method, format!("{}/v1/{path}", self.base()))
            .basic_auth(ACCESS_KEY, Some(SECRET_KEY));
        if let Some(body) = body {
            request = request.json(body);
        }
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        let response = request.send().await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(|e| e.to_string())?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    /// `GET` with retries; `None` when it never answered 2xx (404 gives `Some((404, …))`).
    pub async fn get(&self, path: &str, patience: Duration) -> Option<(u16, Value)> {
        let deadline = Instant::now() + patience;
        let mut delay = Duration::from_millis(100);
        loop {
            match self.once(reqwest::Method::GET, path, None, None).await {
                Ok((status, body)) if status < 500 && status != 429 => {
                    return Some((status, body));
                }
                _ if Instant::now() + delay > deadline => return None,
                _ => {
                    self.next_server();
                    self.read_retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// A write with retries (at most 60 tries within `patience`): retried on transport errors,
    /// 5xx, 429 and `409 Conflict` (the resource is locked by a process that is ending).
    pub async fn write(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        idempotency_key: Option<&str>,
        patience: Duration,
    ) -> Outcome {
        let deadline = Instant::now() + patience;
        let mut delay = Duration::from_millis(100);
        let mut failed_once = false;
        let mut last = String::new();
        for attempt in 0..60 {
            if attempt > 0 {
                self.retries.fetch_add(1, Ordering::Relaxed);
            }
            match self.once(method.clone(), path, body, idempotency_key).await {
                Ok((status, body)) if (200..300).contains(&status) => {
                    return Outcome::Acked(body);
                }
                Ok((409, body)) if body["code"] == "Conflict" => {
                    last = format!("409 {body}");
                }
                Ok((status, body)) if (400..500).contains(&status) && status != 429 => {
                    return if failed_once {
                        Outcome::RefusedAfterFailure(status, body)
                    } else {
                        Outcome::Refused(status, body)
                    };
                }
                Ok((status, body)) => {
                    failed_once = true;
                    last = format!("{status} {body}");
                    self.next_server();
                }
                Err(error) => {
                    failed_once = true;
                    last = error;
                    self.next_server();
                }
            }
            if Instant::now() + delay > deadline {
                break;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
        Outcome::Unanswered(last)
    }
}

// ---------------------------------------------------------------------------------------------
// The workload and its ledger.

/// The operations the workload acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    /// `POST /v1/containers`.
    Create,
    /// `?action=stop`.
    Stop,
    /// `?action=start`.
    Start,
    /// `DELETE`.
    Remove,
}

impl Op {
    const ALL: [Op; 4] = [Op::Create, Op::Stop, Op::Start, Op::Remove];

    fn name(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Stop => "stop",
            Op::Start => "start",
            Op::Remove => "remove",
        }
    }

    /// The state the container ends in once the operation is done.
    fn target(self) -> &'static str {
        match self {
            Op::Create | Op::Start => "running",
            Op::Stop => "stopped",
            Op::Remove => "removed",
        }
    }
}

/// One container the workload created (acknowledged).
#[derive(Debug, Clone)]
pub struct Tracked {
    /// `1i…`.
    pub id: String,
    /// The states it may end in: the last acknowledged operation's, plus those of later
    /// operations that got no answer (they may have happened).
    pub expect: Vec<&'static str>,
    /// What was done to it, for the report.
    pub history: Vec<String>,
}

/// Counts of the workload.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Containers by id.
    pub containers: Mutex<BTreeMap<String, Tracked>>,
    /// Acknowledged, by operation.
    pub acked: Mutex<BTreeMap<Op, u64>>,
    /// Not acknowledged (no answer, or refused after a try without one), by operation.
    pub unacked: Mutex<BTreeMap<Op, u64>>,
    /// Refused at once (4xx), by operation.
    pub refused: Mutex<BTreeMap<Op, u64>>,
    /// Waits for a state that ran out.
    pub wait_timeouts: AtomicU64,
    /// Containers seen in `error` by a worker.
    pub errors_seen: AtomicU64,
    /// Containers left running or stopped at the end of their cycle.
    pub kept: AtomicU64,
    /// Cycles started.
    pub cycles: AtomicU64,
}

fn bump(map: &Mutex<BTreeMap<Op, u64>>, op: Op) {
    *map.lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(op)
        .or_default() += 1;
}

fn total(map: &Mutex<BTreeMap<Op, u64>>) -> u64 {
    map.lock().unwrap_or_else(|p| p.into_inner()).values().sum()
}

fn by_op(map: &Mutex<BTreeMap<Op, u64>>) -> String {
    let map = map.lock().unwrap_or_else(|p| p.into_inner());
    Op::ALL
        .iter()
        .map(|op| format!("{} {}", op.name(), map.get(op).copied().unwrap_or(0)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What every worker shares.
#[derive(Debug)]
struct Work {
    api: Api,
    ledger: Arc<Ledger>,
    marker: String,
    next: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    wait: Duration,
    keep: u64,
}

impl Work {
    fn record(&self, id: &str, op: Op, outcome: &Outcome) {
        let mut containers = self
            .ledger
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(tracked) = containers.get_mut(id) else {
            return;
        };
        match outcome {
            Outcome::Acked(_) => {
                bump(&self.ledger.acked, op);
                tracked.expect = vec![op.target()];
                tracked.history.push(op.name().into());
            }
            Outcome::Refused(status, body) => {
                bump(&self.ledger.refused, op);
                tracked
                    .history
                    .push(format!("{} refused {status} {}", op.name(), body["code"]));
            }
            Outcome::RefusedAfterFailure(..) | Outcome::Unanswered(_) => {
                bump(&self.ledger.unacked, op);
                if !tracked.expect.contains(&op.target()) {
                    tracked.expect.push(op.target());
                }
                tracked
                    .history
                    .push(format!("{} unacknowledged", op.name()));
            }
        }
    }

    /// Waits (bounded) until the container is in `state` and not transitioning; returns the
    /// last state seen (`gone` for 404).
    async fn wait_state(&self, id: &str, state: &str) -> String {
        let deadline = Instant::now() + self.wait;
        let mut last = String::from("unknown");
        loop {
            if let Some((status, body)) = self.api.get(&format!("containers/{id}"), self.wait).await
            {
                if status == 404 {
                    return "gone".into();
                }
                let current = body["state"].as_str().unwrap_or("?").to_owned();
                let settled = body["transitioning"] != "yes";
                if settled && (current == state || (state == "removed" && current == "purged")) {
                    return current;
                }
                if settled && current == "error" {
                    self.ledger.errors_seen.fetch_add(1, Ordering::Relaxed);
                    return current;
                }
                last = current;
            }
            if Instant::now() > deadline {
                self.ledger.wait_timeouts.fetch_add(1, Ordering::Relaxed);
                return last;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// An action (stop, start) or remove, recorded; whether it was acknowledged.
    async fn act(&self, id: &str, op: Op) -> bool {
        let (method, path) = match op {
            Op::Stop => (
                reqwest::Method::POST,
                format!("containers/{id}?action=stop"),
            ),
            Op::Start => (
                reqwest::Method::POST,
                format!("containers/{id}?action=start"),
            ),
            Op::Remove => (reqwest::Method::DELETE, format!("containers/{id}")),
            Op::Create => unreachable!("creates go through create()"),
        };
        let body = (op != Op::Remove).then(|| json!({}));
        let outcome = self
            .api
            .write(method, &path, body.as_ref(), None, self.wait)
            .await;
        self.record(id, op, &outcome);
        matches!(outcome, Outcome::Acked(_))
    }

    /// Creates a container; its id when acknowledged.
    async fn create(&self, n: u64) -> Option<String> {
        let tag = format!("{}-{n}", self.marker);
        let body = json!({
            "name": tag,
            "command": ["sh", "-c", "sleep 3600; :", tag],
        });
        let outcome = self
            .api
            .write(
                reqwest::Method::POST,
                "containers",
                Some(&body),
                Some(&tag),
                self.wait,
            )
            .await;
        match outcome {
            Outcome::Acked(body) => {
                let id = body["id"].as_str()?.to_owned();
                bump(&self.ledger.acked, Op::Create);
                self.ledger
                    .containers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(
                        id.clone(),
                        Tracked {
                            id: id.clone(),
                            expect: vec![Op::Create.target()],
                            history: vec![format!("create {tag}")],
                        },
                    );
                Some(id)
            }
            Outcome::Refused(..) => {
                bump(&self.ledger.refused, Op::Create);
                None
            }
            Outcome::RefusedAfterFailure(..) | Outcome::Unanswered(_) => {
                bump(&self.ledger.unacked, Op::Create);
                None
            }
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// One container's cycle: create, running, stop, stopped, start, running, then remove it
    /// (or, for a few, leave it running or stopped).
    async fn cycle(&self, rng: &mut Rng) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.ledger.cycles.fetch_add(1, Ordering::Relaxed);
        let Some(id) = self.create(n).await else {
            return;
        };
        let mut ok = self.wait_state(&id, "running").await == "running";
        for op in [Op::Stop, Op::Start] {
            if !ok || self.stopping() {
                break;
            }
            ok = self.act(&id, op).await && self.wait_state(&id, op.target()).await == op.target();
        }
        if self.stopping() {
            return;
        }
        if ok && self.ledger.kept.load(Ordering::Relaxed) < self.keep && rng.unit() < 0.2 {
            self.ledger.kept.fetch_add(1, Ordering::Relaxed);
            if rng.unit() < 0.5 && self.act(&id, Op::Stop).await {
                self.wait_state(&id, "stopped").await;
            }
            return;
        }
        if self.act(&id, Op::Remove).await {
            self.wait_state(&id, "removed").await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Faults.

/// The faults injected, by kind.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// kill -9 of the server.
    pub server_kills: u64,
    /// kill -9 of the agent.
    pub agent_kills: u64,
    /// PostgreSQL restarts.
    pub postgres_restarts: u64,
    /// nats-server restarts (kill -9, then the same port and store).
    pub nats_restarts: u64,
    /// Node kills by node name (cluster mode; `server_kills` counts them all).
    pub node_kills: BTreeMap<String, u64>,
    /// Agent restarts with `DROVER_AGENT_FAULT=<point>`, by point.
    pub armed: BTreeMap<String, u64>,
    /// Agent exits at an armed point (it exited by itself), by point.
    pub fired: BTreeMap<String, u64>,
    /// Server or agent exits nobody caused.
    pub unexpected_exits: Vec<String>,
    /// Time to restart the server after a kill (healthz answered), for the report.
    pub server_restart: Vec<Duration>,
}

impl Faults {
    /// Faults injected.
    pub fn total(&self) -> u64 {
        self.server_kills
            + self.agent_kills
            + self.postgres_restarts
            + self.nats_restarts
            + self.armed.values().sum::<u64>()
    }
}

async fn restart_postgres() -> Result<Duration> {
    let started = Instant::now();
    let output = tokio::time::timeout(
        Duration::from_secs(90),
        Command::new("sh")
            .args([
                "-c",
                "pg_ctlcluster --skip-systemctl-redirect \"$(ls /etc/postgresql | head -n1)\" main restart",
            ])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| anyhow!("pg_ctlcluster restart took over 90 s"))??;
    if !output.status.success() {
        bail!(
            "pg_ctlcluster restart failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    for _ in 0..300 {
        let ready = Command::new("pg_isready")
            .args(["-h", "127.0.0.1", "-p", "5432", "-q"])
            .status()
            .await
            .is_ok_and(|s| s.success());
        if ready {
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("PostgreSQL is not ready 30 s after its restart")
}

/// Restarts the server or the agent if it ended by itself (recorded), up to `for_how_long`.
async fn supervise(
    cluster: &mut Cluster,
    faults: &mut Faults,
    rng: &mut Rng,
    max_down: u64,
    for_how_long: Duration,
) -> Result<()> {
    let until = Instant::now() + for_how_long;
    loop {
        let (servers, agent, nats) = cluster.exits();
        if let Some(status) = nats {
            faults
                .unexpected_exits
                .push(format!("nats-server exited by itself: {status}"));
            if let Some(nats) = &mut cluster.nats {
                nats.spawn().await?;
            }
        }
        for (i, status) in servers {
            faults
                .unexpected_exits
                .push(format!("server n{} exited by itself: {status}", i + 1));
            cluster.start_server(i).await?;
        }
        if let Some(status) = agent {
            match cluster.agent_armed.take() {
                // The fault points end the agent with SIGKILL on itself (137 from older agents).
                Some(point)
                    if status.code() == Some(137)
                        || std::os::unix::process::ExitStatusExt::signal(&status) == Some(9) =>
                {
                    *faults.fired.entry(point).or_default() += 1;
                }
                armed => faults.unexpected_exits.push(format!(
                    "agent exited by itself: {status} (armed: {armed:?})"
                )),
            }
            tokio::time::sleep(Duration::from_millis(rng.between(0, max_down))).await;
            cluster.start_agent(None)?;
        }
        let now = Instant::now();
        if now >= until {
            return Ok(());
        }
        tokio::time::sleep((until - now).min(Duration::from_millis(50))).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The verdict.

/// What the run found.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Acknowledged operations whose effect is missing.
    pub lost: Vec<String>,
    /// Unfinished processes and transitioning containers after the settle time.
    pub stuck: Vec<String>,
    /// Containers with two live processes at once, or processes of containers that are not
    /// running.
    pub run_twice: Vec<String>,
    /// Containers of this run the workload never got an acknowledgement for (a retried create
    /// that the server had done).
    pub unacknowledged_creates_done: Vec<String>,
}

impl Verdict {
    /// The containers (or untracked processes) among [`Verdict::run_twice`]'s findings: each
    /// finding starts with the container's id.
    pub fn run_twice_containers(&self) -> usize {
        self.run_twice
            .iter()
            .filter_map(|finding| finding.split_whitespace().next())
            .collect::<HashSet<_>>()
            .len()
    }

    /// Whether nothing was lost, stuck or run twice.
    pub fn passed(&self) -> bool {
        self.lost.is_empty() && self.stuck.is_empty() && self.run_twice.is_empty()
    }
}

async fn all_items(api: &Api, path: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    let sep = if path.contains('?') { '&' } else { '?' };
    let mut next = format!("{path}{sep}limit=1000");
    for _ in 0..1000 {
        let (status, body) = api
            .get(&next, Duration::from_secs(30))
            .await
            .ok_or_else(|| anyhow!("GET {next} got no answer"))?;
        if status != 200 {
            bail!("GET {next}: {status} {body}");
        }
        out.extend(body["data"].as_array().into_iter().flatten().cloned());
        match body["pagination"]["next"].as_str() {
            Some(url) => {
                next = url
                    .split_once("/v1/")
                    .map(|(_, rest)| rest.to_owned())
                    .context("a next link under /v1/")?;
            }
            None => break,
        }
    }
    Ok(out)
}

/// Compares the API and the host with the ledger.
async fn judge(api: &Api, ledger: &Ledger, marker: &str) -> Result<Verdict> {
    let mut verdict = Verdict::default();
    for process in all_items(api, "processinstances?state=pending").await? {
        verdict.stuck.push(format!(
            "process {} {} of {} unfinished ({} attempts, exit reason {})",
            process["id"].as_str().unwrap_or("?"),
            process["processName"].as_str().unwrap_or("?"),
            process["resourceId"].as_str().unwrap_or("?"),
            process["executionCount"],
            process["exitReason"]
        ));
    }
    let listed: HashMap<String, Value> = all_items(api, "containers")
        .await?
        .into_iter()
        .filter_map(|c| Some((c["id"].as_str()?.to_owned(), c)))
        .collect();
    let tracked: Vec<Tracked> = ledger
        .containers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .cloned()
        .collect();
    let known: HashSet<&str> = tracked.iter().map(|t| t.id.as_str()).collect();
    // Final states: running, stopped, removed… or gone (404).
    let mut states: HashMap<String, String> = HashMap::new();
    for container in &tracked {
        let (state, transitioning) = match listed.get(&container.id) {
            Some(body) => (
                body["state"].as_str().unwrap_or("?").to_owned(),
                body["transitioning"] == "yes",
            ),
            None => match api
                .get(
                    &format!("containers/{}", container.id),
                    Duration::from_secs(30),
                )
                .await
            {
                Some((404, _)) => ("gone".to_owned(), false),
                Some((_, body)) => (
                    body["state"].as_str().unwrap_or("?").to_owned(),
                    body["transitioning"] == "yes",
                ),
                None => bail!("GET containers/{} got no answer", container.id),
            },
        };
        states.insert(container.id.clone(), state.clone());
        if transitioning {
            verdict.stuck.push(format!(
                "container {} still {state} (transitioning); history: {}",
                container.id,
                container.history.join(", ")
            ));
            continue;
        }
        let removed_like = matches!(state.as_str(), "removed" | "purged" | "gone");
        let fits = container
            .expect
            .iter()
            .any(|&expect| expect == state || (expect == "removed" && removed_like));
        if !fits {
            verdict.lost.push(format!(
                "container {} is {state}, expected {}; history: {}",
                container.id,
                container.expect.join(" or "),
                container.history.join(", ")
            ));
        }
    }
    // Containers of this run nobody was told about: retried creates the server did.
    for (id, body) in &listed {
        if !known.contains(id.as_str())
            && body["name"]
                .as_str()
                .is_some_and(|name| name.starts_with(&format!("{marker}-")))
        {
            verdict
                .unacknowledged_creates_done
                .push(format!("{id} ({})", body["name"].as_str().unwrap_or("?")));
            states.insert(id.clone(), body["state"].as_str().unwrap_or("?").to_owned());
        }
    }
    // The host: one live process per running container, none for any other.
    let live = by_container(scan(marker));
    for (key, processes) in &live {
        let state = states
            .get(key)
            .map_or("not a container of this run", String::as_str);
        let pids: Vec<i32> = processes.iter().map(|p| p.pid).collect();
        if state != "running" {
            verdict
                .run_twice
                .push(format!("{key} is {state} but processes {pids:?} run"));
        } else if processes.len() > 1 {
            verdict
                .run_twice
                .push(format!("{key} has {} live processes: {pids:?}", pids.len()));
        }
    }
    for (id, state) in &states {
        if state == "running" && !live.contains_key(id) {
            let history = tracked.iter().find(|t| &t.id == id).map_or_else(
                || "unacknowledged create".to_owned(),
                |t| t.history.join(", "),
            );
            verdict.lost.push(format!(
                "container {id} is running but no process of it runs; history: {history}"
            ));
        }
    }
    Ok(verdict)
}

// ---------------------------------------------------------------------------------------------
// The run.

/// A run's figures.
#[derive(Debug)]
pub struct Report {
    /// The faults injected.
    pub faults: Faults,
    /// The verdict after the settle time.
    pub verdict: Verdict,
    /// Acknowledged operations.
    pub acknowledged: u64,
    /// Acknowledged creates.
    pub acknowledged_creates: u64,
    /// The whole run.
    pub duration: Duration,
}

impl Report {
    /// Whether the run proved something (creates were acknowledged and faults injected) and
    /// found nothing lost, stuck or run twice.
    pub fn passed(&self) -> bool {
        self.verdict.passed() && self.acknowledged_creates > 0 && self.faults.total() > 0
    }
}

/// Runs the chaos suite: start, workload under faults, settle, verdict (printed).
pub async fn run(args: &ChaosArgs) -> Result<Report> {
    let run_started = Instant::now();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let mut rng = Rng::new(seed);
    let marker = format!(
        "drover-chaos-{}-{:x}",
        std::process::id(),
        rng.next_u64() & 0xffff_ffff
    );
    if let Err(error) = nix::sys::prctl::set_child_subreaper(true) {
        eprintln!("warning: cannot become a child subreaper ({error}); orphans stay zombies");
    }
    harness::print_machine();
    let bin = harness::drover_bin(args.drover_bin.as_deref())?;
    let dir = tempfile::Builder::new().prefix("drover-chaos-").tempdir()?;
    let root = dir.path().to_owned();
    let dir = if args.keep_dir {
        let _ = dir.keep();
        None
    } else {
        Some(dir)
    };
    let clustered = args.nodes > 1;
    if clustered && args.backend != Backend::Postgres {
        bail!("--nodes above 1 needs --backend postgres");
    }
    let database = match args.backend {
        Backend::Sqlite => None,
        Backend::Postgres => Some(PgDatabase::create(&args.database_url, "drover_chaos")?),
    };
    let nats = if clustered {
        Some(NatsServer::start(&args.nats_bin).await?)
    } else {
        None
    };
    let mut settings: BTreeMap<String, String> = DEFAULT_SETTINGS
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    settings.extend(args.settings.iter().cloned());
    let config = NodeConfig {
        bin: bin.clone(),
        root: root.clone(),
        database_url: database.as_ref().map(|d| d.url.clone()),
        nats_url: nats.as_ref().map(NatsServer::url),
        env: settings
            .iter()
            .map(|(k, v)| (setting_env(k), v.clone()))
            .collect(),
        log: args.server_log.clone(),
        threads: None,
    };
    let nodes = Nodes::new(config, args.nodes)?;
    let (agent_url, killable) = if args.agent_all_urls {
        (nodes.urls().join(","), (0..nodes.len()).collect())
    } else if clustered {
        (nodes.url(0), (1..nodes.len()).collect())
    } else {
        (nodes.url(0), vec![0])
    };
    let mut cluster = Cluster {
        bin: bin.clone(),
        root: root.clone(),
        nodes,
        nats,
        agent_log: args.agent_log.clone(),
        agent: None,
        agent_armed: None,
        token: String::new(),
        marker: marker.clone(),
        agent_url,
        killable,
        _database: database,
        _dir: dir,
    };
    println!(
        "chaos: {:?} backend, {} node(s){}, {} faults (at most {} s), seed {seed}, {} workers, drover {}, run directory {}",
        args.backend,
        args.nodes,
        cluster
            .nats
            .as_ref()
            .map(|nats| format!(" on nats-server {}", nats.url()))
            .unwrap_or_default(),
        args.faults,
        args.max_seconds,
        args.workers,
        bin.display(),
        root.display()
    );
    if clustered {
        println!(
            "  agent --url {}; node faults kill {}",
            cluster.agent_url,
            cluster
                .killable
                .iter()
                .map(|i| format!("n{}", i + 1))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!(
        "  server settings: {}",
        settings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    cluster.start_servers().await?;
    if clustered {
        let names: Vec<String> = (1..=cluster.node_count())
            .map(|i| format!("n{i}"))
            .collect();
        crate::cluster::wait_alive(&cluster.urls()[0], &names, Duration::from_secs(60)).await?;
    }
    let api = Api::new(&cluster.urls())?;
    let token = match api
        .write(
            reqwest::Method::POST,
            "registrationtokens",
            Some(&json!({})),
            None,
            Duration::from_secs(30),
        )
        .await
    {
        Outcome::Acked(body) => body["token"]
            .as_str()
            .context("a registration token has a token")?
            .to_owned(),
        other => bail!("creating a registration token: {other:?}"),
    };
    cluster.token = token;
    cluster.start_agent(None)?;
    wait_host_active(&api, Duration::from_secs(60)).await?;
    println!(
        "  server and agent up in {:.1} s",
        run_started.elapsed().as_secs_f64()
    );

    // Workload and sampler.
    let ledger = Arc::new(Ledger::default());
    let stop_workers = Arc::new(AtomicBool::new(false));
    let stop_sampler = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Sightings::default());
    let sampler = tokio::spawn(sample(
        marker.clone(),
        Duration::from_millis(args.sample_ms.max(10)),
        seen.clone(),
        stop_sampler.clone(),
    ));
    let next = Arc::new(AtomicU64::new(0));
    let wait = Duration::from_secs(args.wait_seconds.max(1));
    let mut workers = JoinSet::new();
    for i in 0..args.workers.max(1) {
        // Each worker starts on a node of its own (i mod N).
        let work = Arc::new(Work {
            api: api.starting_at(i),
            ledger: ledger.clone(),
            marker: marker.clone(),
            next: next.clone(),
            stop: stop_workers.clone(),
            wait,
            keep: args.keep_containers,
        });
        let mut rng = Rng::new(seed ^ (i as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
        workers.spawn(async move {
            for _ in 0..1_000_000 {
                if work.stopping() {
                    break;
                }
                work.cycle(&mut rng).await;
            }
        });
    }

    // Faults.
    let mut faults = Faults::default();
    let fault_phase = Instant::now();
    let fault_deadline = fault_phase + Duration::from_secs(args.max_seconds);
    let points: Vec<String> = args
        .agent_fault_points
        .iter()
        .filter(|p| !p.is_empty())
        .cloned()
        .collect();
    let mut fault_error = None;
    for i in 0..args.faults {
        let gap = Duration::from_millis(rng.between(args.min_gap_ms, args.max_gap_ms));
        if let Err(error) =
            supervise(&mut cluster, &mut faults, &mut rng, args.max_down_ms, gap).await
        {
            fault_error = Some(error);
            break;
        }
        if Instant::now() >= fault_deadline {
            println!("  --max-seconds reached after {i} faults");
            break;
        }
        let down = Duration::from_millis(rng.between(0, args.max_down_ms));
        let roll = rng.unit();
        // One node: PostgreSQL 20%, server 40%, agent 40%. A cluster: PostgreSQL 15%,
        // nats-server 15%, a node 35%, agent 35%.
        let (pg_share, nats_share, server_share) = if clustered {
            (0.15, 0.30, 0.65)
        } else {
            (0.2, 0.2, 0.6)
        };
        let result = match args.backend {
            Backend::Postgres if roll < pg_share => {
                faults.postgres_restarts += 1;
                restart_postgres().await.map(|_| ())
            }
            _ if roll < nats_share && cluster.nats.is_some() => {
                faults.nats_restarts += 1;
                let nats = cluster.nats.as_mut().expect("cluster mode");
                nats.kill().await;
                tokio::time::sleep(down).await;
                nats.spawn().await.map(|_| ())
            }
            _ if roll < server_share => {
                faults.server_kills += 1;
                let victim =
                    cluster.killable[rng.between(0, cluster.killable.len() as u64 - 1) as usize];
                *faults
                    .node_kills
                    .entry(format!("n{}", victim + 1))
                    .or_default() += 1;
                let down = if clustered {
                    Duration::from_millis(rng.between(0, args.max_node_down_ms))
                } else {
                    down
                };
                cluster.kill_server(victim).await;
                tokio::time::sleep(down).await;
                let started = Instant::now();
                let result = cluster.start_server(victim).await;
                faults.server_restart.push(started.elapsed());
                result.map(|_| ())
            }
            _ => {
                let point = (!points.is_empty() && rng.unit() < args.agent_fault_share)
                    .then(|| points[rng.between(0, points.len() as u64 - 1) as usize].clone());
                match &point {
                    Some(point) => *faults.armed.entry(point.clone()).or_default() += 1,
                    None => faults.agent_kills += 1,
                }
                cluster.kill_agent().await;
                tokio::time::sleep(down).await;
                cluster.start_agent(point.as_deref())
            }
        };
        if let Err(error) = result {
            fault_error = Some(error);
            break;
        }
        if (i + 1) % 50 == 0 || i + 1 == args.faults {
            println!(
                "  {} faults at {:.0} s: {} acknowledged operations, {} containers, {} live processes at most",
                i + 1,
                fault_phase.elapsed().as_secs_f64(),
                total(&ledger.acked),
                ledger.cycles.load(Ordering::Relaxed),
                seen.max_live.load(Ordering::Relaxed),
            );
        }
    }
    let fault_seconds = fault_phase.elapsed();

    // Let the workers finish their step, then make sure both run un-armed.
    stop_workers.store(true, Ordering::Relaxed);
    let worker_deadline = Instant::now() + wait * 3 + Duration::from_secs(30);
    while !workers.is_empty() {
        if let Err(error) = supervise(
            &mut cluster,
            &mut faults,
            &mut rng,
            0,
            Duration::from_millis(200),
        )
        .await
        {
            fault_error.get_or_insert(error);
            break;
        }
        while workers.try_join_next().is_some() {}
        if Instant::now() > worker_deadline {
            println!(
                "  workers still busy after {} s: aborted",
                wait.as_secs() * 3 + 30
            );
            workers.abort_all();
            break;
        }
    }
    if let Some(error) = fault_error {
        return Err(error.context("injecting faults"));
    }
    if cluster.agent_armed.is_some() {
        // Disarm: the settle phase runs without injected exits.
        faults.agent_kills += 1;
        cluster.kill_agent().await;
        cluster.start_agent(None)?;
    }
    let (servers, agent, nats) = cluster.exits();
    if nats.is_some()
        && let Some(nats) = &mut cluster.nats
    {
        nats.spawn().await?;
    }
    for (i, _) in servers {
        cluster.start_server(i).await?;
    }
    if agent.is_some() {
        cluster.start_agent(None)?;
    }

    // Settle: until nothing is pending or transitioning and the host matches, at most
    // --settle-seconds.
    let settle_started = Instant::now();
    let settle_deadline = settle_started + Duration::from_secs(args.settle_seconds);
    let mut verdict;
    loop {
        supervise(
            &mut cluster,
            &mut faults,
            &mut rng,
            0,
            Duration::from_millis(10),
        )
        .await?;
        verdict = judge(&api, &ledger, &marker).await?;
        if (verdict.passed() && settle_started.elapsed() > Duration::from_secs(2))
            || Instant::now() > settle_deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let settle_seconds = settle_started.elapsed();
    stop_sampler.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(10), sampler).await;
    for (key, pids) in seen
        .doubles
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        verdict.run_twice.push(format!(
            "{key} had live processes {pids:?} at the same time during the run"
        ));
    }
    verdict.run_twice.sort();
    verdict.run_twice.dedup();

    let acknowledged = total(&ledger.acked);
    let acknowledged_creates = ledger
        .acked
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&Op::Create)
        .copied()
        .unwrap_or(0);
    let report = Report {
        faults,
        verdict,
        acknowledged,
        acknowledged_creates,
        duration: run_started.elapsed(),
    };
    print_report(&report, &ledger, &seen, &api, fault_seconds, settle_seconds);
    if args.keep_dir {
        let all: Vec<String> = [
            ("lost", &report.verdict.lost),
            ("stuck", &report.verdict.stuck),
            ("run twice", &report.verdict.run_twice),
        ]
        .iter()
        .flat_map(|(kind, items)| items.iter().map(move |item| format!("{kind}: {item}")))
        .collect();
        let path = root.join("verdict.txt");
        if std::fs::write(&path, all.join("\n") + "\n").is_ok() {
            println!("  every finding: {}", path.display());
        }
    }
    if !report.passed() {
        for i in 0..cluster.node_count() {
            println!(
                "  server n{} log (tail):\n{}",
                i + 1,
                cluster.log_tail(&format!("n{}.log", i + 1))
            );
        }
        println!("  agent log (tail):\n{}", cluster.log_tail("agent.log"));
    }
    // Stop in order: agent, instances, server (Drop does the same on every other path).
    cluster.kill_agent().await;
    cluster.kill_instances();
    for i in 0..cluster.node_count() {
        cluster.kill_server(i).await;
    }
    drop(cluster);
    Ok(report)
}

async fn wait_host_active(api: &Api, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let active = |items: &[Value]| {
            items
                .iter()
                .any(|item| item["state"] == "active" && item["transitioning"] != "yes")
        };
        if let (Ok(agents), Ok(hosts)) = (
            all_items(api, "agents").await,
            all_items(api, "hosts").await,
        ) && active(&agents)
            && active(&hosts)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the agent and its host are not active after {} s",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn print_report(
    report: &Report,
    ledger: &Ledger,
    seen: &Sightings,
    api: &Api,
    fault_phase: Duration,
    settle: Duration,
) {
    let faults = &report.faults;
    let verdict = &report.verdict;
    let mut out = String::new();
    let restarts = harness::Latency::of(faults.server_restart.clone());
    let _ = writeln!(out, "\nchaos result");
    let _ = writeln!(
        out,
        "  faults injected: {} in {:.0} s — server kill -9 {} {:?}, agent kill -9 {}, PostgreSQL restart {}, nats-server restart {}, agent fault points armed {:?} (fired {:?})",
        faults.total(),
        fault_phase.as_secs_f64(),
        faults.server_kills,
        faults.node_kills,
        faults.agent_kills,
        faults.postgres_restarts,
        faults.nats_restarts,
        faults.armed,
        faults.fired
    );
    let _ = writeln!(out, "  server restart to /healthz: {restarts}");
    if !faults.unexpected_exits.is_empty() {
        let _ = writeln!(
            out,
            "  exits nobody caused: {} ({})",
            faults.unexpected_exits.len(),
            faults.unexpected_exits.join("; ")
        );
    }
    let _ = writeln!(
        out,
        "  acknowledged operations: {} ({})",
        report.acknowledged,
        by_op(&ledger.acked)
    );
    let _ = writeln!(
        out,
        "  unacknowledged (no answer within the retries, or refused after a try without one): {} ({}); refused at once: {} ({}); retried writes {}, retried reads {}; waits that ran out {}; containers seen in error {}",
        total(&ledger.unacked),
        by_op(&ledger.unacked),
        total(&ledger.refused),
        by_op(&ledger.refused),
        api.retries.load(Ordering::Relaxed),
        api.read_retries.load(Ordering::Relaxed),
        ledger.wait_timeouts.load(Ordering::Relaxed),
        ledger.errors_seen.load(Ordering::Relaxed),
    );
    let _ = writeln!(
        out,
        "  duplicates: containers made by a create try that the client saw fail (then retried): {}",
        verdict.unacknowledged_creates_done.len()
    );
    let _ = writeln!(
        out,
        "  host processes: {} /proc samples, at most {} live at once",
        seen.samples.load(Ordering::Relaxed),
        seen.max_live.load(Ordering::Relaxed)
    );
    let mut section = |name: &str, items: &[String]| {
        let _ = writeln!(out, "  {name}: {}", items.len());
        for item in items.iter().take(20) {
            let _ = writeln!(out, "    - {item}");
        }
        if items.len() > 20 {
            let _ = writeln!(out, "    … and {} more", items.len() - 20);
        }
    };
    section("lost", &verdict.lost);
    section("stuck", &verdict.stuck);
    section(
        &format!(
            "run twice (containers: {}; findings)",
            verdict.run_twice_containers()
        ),
        &verdict.run_twice,
    );
    let _ = writeln!(
        out,
        "  settled in {:.0} s; whole run {:.0} s; {}",
        settle.as_secs_f64(),
        report.duration.as_secs_f64(),
        if report.passed() {
            "PASS"
        } else if verdict.passed() {
            "FAIL (nothing acknowledged or no fault injected: the run proves nothing)"
        } else {
            "FAIL"
        }
    );
    println!("{out}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_container_of_a_log_path() {
        assert_eq!(
            container_of_log(Path::new("/tmp/x/agent/instances/1i42/stdout.log")).as_deref(),
            Some("1i42")
        );
        assert_eq!(
            container_of_log(Path::new(
                "/tmp/x/agent/instances/1i42/stdout.log (deleted)"
            ))
            .as_deref(),
            Some("1i42")
        );
        assert_eq!(container_of_log(Path::new("/dev/null")), None);
    }

    #[test]
    fn a_fork_of_an_instance_is_not_a_second_run() {
        let process = |pid, ppid, container: &str| HostProcess {
            pid,
            ppid,
            pgid: 10,
            container: Some(container.into()),
            tag: "m-1".into(),
        };
        // 11 is 10's fork (same container): one run. 12 has another parent: a second run.
        let grouped = by_container(vec![process(10, 1, "1i5"), process(11, 10, "1i5")]);
        assert_eq!(grouped["1i5"].len(), 1);
        let grouped = by_container(vec![
            process(10, 1, "1i5"),
            process(11, 10, "1i5"),
            process(12, 1, "1i5"),
            process(13, 10, "1i6"),
        ]);
        assert_eq!(grouped["1i5"].len(), 2);
        assert_eq!(grouped["1i6"].len(), 1);
    }

    #[test]
    fn strips_colours() {
        assert_eq!(strip_ansi("\u{1b}[2mtime\u{1b}[0m INFO x"), "time INFO x");
    }

    #[test]
    fn seeded_choices_repeat() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..100 {
            let x = a.between(10, 20);
            assert_eq!(x, b.between(10, 20));
            assert!((10..=20).contains(&x));
        }
        assert!(Rng::new(8).next_u64() != Rng::new(7).next_u64());
    }

    #[test]
    fn settings_are_name_value() {
        assert_eq!(
            parse_setting("eventing.timeout.millis=5000").unwrap(),
            ("eventing.timeout.millis".into(), "5000".into())
        );
        assert!(parse_setting("nonsense").is_err());
        assert_eq!(
            setting_env("process.retry_max_wait.millis"),
            "DROVER_PROCESS_RETRY_MAX_WAIT_MILLIS"
        );
    }
}
