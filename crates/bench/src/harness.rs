//! What the process-engine, agents and soak benchmarks share: a bench binary's start (runtime,
//! open-files limit), the `drover server` under test as a child process (embedded SQLite in a
//! temporary data directory, or a fresh PostgreSQL database made for the run and dropped after
//! it), simulated agents that answer `compute.instance.*` requests and pings at once, readings
//! of CPU, memory and the machine from `/proc`, and `perf record` of the server. The event-bus
//! benchmarks (`drover-bench`) use its `/proc` readers.
//!
//! Every wait here is bounded; the server is killed when its handle is dropped, also on error.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use drover_client::{Client, Event, EventStream, Subscribe};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinSet;

/// The admin key given to the server under test.
pub const ACCESS_KEY: &str = "BENCHENGINEACCESS0001";
/// Its secret.
pub const SECRET_KEY: &str = "bench-engine-secret-0123456789abcdefghijklmnopqrs";

/// What a simulated agent subscribes to.
pub const AGENT_EVENTS: &[&str] = &[
    "compute.instance.activate",
    "compute.instance.deactivate",
    "compute.instance.remove",
    "ping",
];

// ---------------------------------------------------------------------------------------------
// A bench binary's start.

/// The flags for the server under test and this bench's runtime that every bench binary of
/// `src/bin/` has (`#[command(flatten)]` in its own).
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// The drover binary (default: `drover` beside this binary, else target/release/drover).
    #[arg(long)]
    pub drover_bin: Option<PathBuf>,
    /// TOKIO_WORKER_THREADS for the server (default: one per core).
    #[arg(long)]
    pub server_threads: Option<usize>,
    /// Worker threads of this bench (default: one per core).
    #[arg(long)]
    pub bench_threads: Option<usize>,
    /// DROVER_LOG for the server (e.g. `warn,sqlx::query=debug` to log every statement).
    #[arg(long, default_value = "warn")]
    pub server_log: String,
    /// Copy the server's log here when it stops.
    #[arg(long)]
    pub keep_log: Option<PathBuf>,
}

impl ServerArgs {
    /// Where `drover` is ([`drover_bin`]).
    pub fn drover_bin(&self) -> Result<PathBuf> {
        drover_bin(self.drover_bin.as_deref())
    }

    /// The server's options from these flags, its data directory named `dir_prefix…`.
    pub fn options(&self, dir_prefix: &str) -> ServerOptions {
        ServerOptions {
            log: self.server_log.clone(),
            threads: self.server_threads,
            dir_prefix: dir_prefix.into(),
            ..ServerOptions::default()
        }
    }
}

/// What a bench binary does first: installs rustls's ring provider (for the HTTP clients) and
/// raises the open-files soft limit ([`raise_nofile`]), which it returns.
pub fn init() -> u64 {
    let _ = rustls::crypto::ring::default_provider().install_default();
    raise_nofile()
}

/// Runs `bench` on a multi-threaded tokio runtime with `threads` workers (default: one per
/// core) until it ends or Ctrl-C interrupts it, then shuts the runtime down (waiting at most
/// 5 s for its tasks).
pub fn block_on<T>(threads: Option<usize>, bench: impl Future<Output = Result<T>>) -> Result<T> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = threads {
        builder.worker_threads(threads.max(1));
    }
    let runtime = builder.enable_all().build().context("tokio runtime")?;
    let result = runtime.block_on(async {
        tokio::select! {
            result = bench => result,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    result
}

// ---------------------------------------------------------------------------------------------
// Simulated agents.

/// A registered agent.
#[derive(Debug, Clone)]
pub struct Agent {
    /// `1a…`.
    pub agent_id: String,
    /// Its one host, `1h…`.
    pub host_id: String,
    /// A client with the agent's own key (for posting container events, say).
    pub client: Client,
    /// The containers (`1i…`) it reports as running in its ping replies: those it was asked
    /// to activate and not since to deactivate or remove. A bench that makes a container die
    /// behind the agent's back takes it out of here.
    pub running: Arc<Mutex<HashSet<String>>>,
}

/// The agents' tasks, aborted when dropped.
#[derive(Debug)]
pub struct AgentTasks(pub Vec<tokio::task::JoinHandle<()>>);

impl Drop for AgentTasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// What the simulated agents did, shared by all of them.
#[derive(Debug, Default)]
pub struct AgentStats {
    /// Requests answered (not pings).
    pub requests: AtomicU64,
    /// Pings answered.
    pub pings: AtomicU64,
    /// Replies that failed.
    pub reply_errors: AtomicU64,
    /// Agent sockets that closed.
    pub closed: AtomicUsize,
    /// The first error.
    pub first_error: Mutex<Option<String>>,
    /// While on, the agents hold their replies to requests (not to pings) until released.
    pub hold: Hold,
}

/// The agents' reply gate: while on, every request (not a ping) is answered only once it is
/// released (`drover-bench-cluster failover` holds the replies while a node has the requests'
/// processes claimed, then kills that node).
#[derive(Debug, Default)]
pub struct Hold {
    on: std::sync::atomic::AtomicBool,
    released: tokio::sync::Notify,
    /// Requests held so far.
    pub held: AtomicU64,
    /// Whether to count requests by resource in `received` (off by default: long runs).
    pub count: std::sync::atomic::AtomicBool,
    /// Requests received by resource id, held or not, while `count` is on.
    pub received: Mutex<HashMap<String, u32>>,
}

impl Hold {
    /// Holds the replies from now on.
    pub fn hold(&self) {
        self.on.store(true, Ordering::SeqCst);
    }

    /// Sends every held reply and stops holding.
    pub fn release(&self) {
        self.on.store(false, Ordering::SeqCst);
        self.released.notify_waiters();
    }

    /// Whether replies are held.
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::SeqCst)
    }

    /// Waits until the gate is open.
    pub async fn open(&self) {
        loop {
            let released = self.released.notified();
            if !self.is_on() {
                return;
            }
            released.await;
        }
    }
}

impl AgentStats {
    /// Counts a failed reply and keeps the first error.
    pub fn error(&self, error: impl std::fmt::Display) {
        self.reply_errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().expect("not poisoned");
        if first.is_none() {
            *first = Some(error.to_string());
        }
    }
}

/// Registers `count` agents (`concurrency` registrations in flight) with the registration
/// token `token` (`ACCESS:SECRET`) and starts each one's subscriber as soon as it is
/// registered, so that its activation ping finds it.
pub async fn start_agents(
    url: &str,
    token: &str,
    count: usize,
    concurrency: usize,
    stats: Arc<AgentStats>,
    timeout: Duration,
) -> Result<(Vec<Agent>, AgentTasks)> {
    start_agents_from(url, token, 0, count, concurrency, stats, timeout).await
}

/// [`start_agents`] numbered from `first` (keys `bench-<pid>-<first + i>`), so that agents
/// registered through several servers of one cluster are all different.
pub async fn start_agents_from(
    url: &str,
    token: &str,
    first: usize,
    count: usize,
    concurrency: usize,
    stats: Arc<AgentStats>,
    timeout: Duration,
) -> Result<(Vec<Agent>, AgentTasks)> {
    let (access, secret) = token
        .split_once(':')
        .context("a registration token is ACCESS:SECRET")?;
    let registrar = Client::new(url, access, secret)?;
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut starting = JoinSet::new();
    let run_id = std::process::id();
    for i in first..first + count {
        let (registrar, permits, url, stats) = (
            registrar.clone(),
            permits.clone(),
            url.to_owned(),
            stats.clone(),
        );
        starting.spawn(async move {
            let _permit = permits.acquire_owned().await?;
            let registered = registrar
                .post(
                    "register",
                    &json!({"key": format!("bench-{run_id}-{i}"), "name": format!("bench-{i}")}),
                )
                .await
                .context("POST /v1/register")?;
            let field = |name: &str| {
                registered[name]
                    .as_str()
                    .map(str::to_owned)
                    .with_context(|| format!("the registration has no {name}: {registered}"))
            };
            let client = Client::new(&url, &field("accessKey")?, &field("secretKey")?)?;
            let agent = Agent {
                agent_id: field("agentId")?,
                host_id: field("hostId")?,
                client: client.clone(),
                running: Arc::default(),
            };
            let stream = client
                .subscribe(Subscribe::names(AGENT_EVENTS.iter().copied()))
                .await
                .context("agent subscription")?;
            let (ready_tx, ready_rx) = oneshot::channel();
            let task = tokio::spawn(run_agent(
                client,
                stream,
                agent.running.clone(),
                stats,
                ready_tx,
            ));
            // The first frame (the server's hello `ping`) means the subscription is live.
            match tokio::time::timeout(Duration::from_secs(30), ready_rx).await {
                Ok(Ok(())) => anyhow::Ok((agent, task)),
                _ => {
                    task.abort();
                    bail!("agent {} got no first event", agent.agent_id)
                }
            }
        });
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut agents = Vec::with_capacity(count);
    let mut tasks = AgentTasks(Vec::with_capacity(count));
    while let Some(joined) = tokio::time::timeout_at(deadline, starting.join_next())
        .await
        .map_err(|_| anyhow!("registering agents timed out after {} s", timeout.as_secs()))?
    {
        let (agent, task) = joined??;
        agents.push(agent);
        tasks.0.push(task);
    }
    Ok((agents, tasks))
}

/// One simulated agent: answers every request with `replyTo` at once. Ping replies report the
/// containers in `running` (those it was asked to start), as a real agent does (an agent that
/// reports none would have the ping monitor stop them all). `ready` is told at the first frame.
pub async fn run_agent(
    client: Client,
    mut stream: EventStream,
    running: Arc<Mutex<HashSet<String>>>,
    stats: Arc<AgentStats>,
    ready: oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    loop {
        let event = match stream.next_event().await {
            Ok(Some(event)) => event,
            Ok(None) => {
                stats.closed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(error) => {
                stats.closed.fetch_add(1, Ordering::Relaxed);
                stats.error(format!("agent socket: {error}"));
                return;
            }
        };
        if let Some(ready) = ready.take() {
            let _ = ready.send(());
        }
        if event.reply_to.is_none() {
            continue;
        }
        let data = match event.name() {
            "ping" => {
                stats.pings.fetch_add(1, Ordering::Relaxed);
                let resources: Vec<Value> = running
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .iter()
                    .map(|id| json!({"type": "instance", "id": id, "state": "running"}))
                    .collect();
                json!({ "resources": resources })
            }
            name => {
                stats.requests.fetch_add(1, Ordering::Relaxed);
                if stats.hold.count.load(Ordering::Relaxed)
                    && let Some(id) = &event.resource_id
                {
                    *stats
                        .hold
                        .received
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .entry(id.clone())
                        .or_default() += 1;
                }
                if let Some(id) = event.resource_id.clone() {
                    let mut running = running
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    if name == "compute.instance.activate" {
                        running.insert(id);
                    } else {
                        running.remove(&id);
                    }
                }
                json!({"instance": {"externalId": "x"}})
            }
        };
        let (client, stats) = (client.clone(), stats.clone());
        let held = event.name() != "ping" && stats.hold.is_on();
        if held {
            stats.hold.held.fetch_add(1, Ordering::Relaxed);
        }
        tokio::spawn(async move {
            if held {
                stats.hold.open().await;
            }
            reply(&client, &event, data, &stats).await
        });
    }
}

/// Publishes the reply to `request`, counting a failure.
pub async fn reply(client: &Client, request: &Event, data: Value, stats: &AgentStats) {
    if let Err(error) = client.reply(request, data).await {
        stats.error(format!("reply to {}: {error}", request.name()));
    }
}

/// Every item of a collection, following `pagination.next` (at most 1000 pages).
pub async fn list_all(admin: &Client, path: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    let mut next = Some(format!("{path}?limit=1000"));
    for _ in 0..1000 {
        let Some(page) = next.take() else { break };
        let body = admin.get(&page).await?;
        if let Some(data) = body["data"].as_array() {
            out.extend(data.iter().cloned());
        }
        next = body["pagination"]["next"].as_str().map(str::to_owned);
    }
    Ok(out)
}

/// Waits until every agent and its host are `active` (GET /v1/agents, /v1/hosts).
pub async fn wait_active(admin: &Client, agents: &[Agent], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let agent_ids: HashSet<&str> = agents.iter().map(|a| a.agent_id.as_str()).collect();
    let host_ids: HashSet<&str> = agents.iter().map(|a| a.host_id.as_str()).collect();
    let count = |items: &[Value], ids: &HashSet<&str>| {
        items
            .iter()
            .filter(|item| {
                item["state"] == "active"
                    && item["transitioning"] == "no"
                    && item["id"].as_str().is_some_and(|id| ids.contains(id))
            })
            .count()
    };
    loop {
        let active_agents = count(&list_all(admin, "agents").await?, &agent_ids);
        let active_hosts = count(&list_all(admin, "hosts").await?, &host_ids);
        if active_agents == agent_ids.len() && active_hosts == host_ids.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "after {} s only {active_agents} of {} agents and {active_hosts} of {} hosts are active",
                timeout.as_secs(),
                agent_ids.len(),
                host_ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The server child and its database.

/// A PostgreSQL database made for one run; dropped (`WITH (FORCE)`) when this is dropped.
#[derive(Debug)]
pub struct PgDatabase {
    /// The same server's `postgres` database, for creating and dropping.
    pub admin_url: String,
    /// The database's name.
    pub name: String,
    /// The URL the server connects to.
    pub url: String,
}

impl PgDatabase {
    /// Creates `<prefix>_<pid>` on the server of `url` (dropping a leftover of that name).
    pub fn create(url: &str, prefix: &str) -> Result<PgDatabase> {
        let name = format!("{prefix}_{}", std::process::id());
        let admin_url = with_database(url, "postgres")?;
        psql(
            &admin_url,
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        )?;
        psql(&admin_url, &format!("CREATE DATABASE {name}"))?;
        println!("  PostgreSQL database {name} created");
        Ok(PgDatabase {
            url: with_database(url, &name)?,
            admin_url,
            name,
        })
    }
}

/// PostgreSQL's counters: this database's commits, and the cluster's WAL syncs and bytes.
#[derive(Debug, Clone, Copy)]
pub struct PgStats {
    /// Commits in this database.
    pub commits: f64,
    /// WAL syncs of the cluster.
    pub wal_syncs: f64,
    /// WAL bytes of the cluster.
    pub wal_bytes: f64,
}

impl PgDatabase {
    /// The counters now (`None` if psql failed).
    pub fn stats(&self) -> Option<PgStats> {
        let sql = format!(
            "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = '{}'), wal_sync, wal_bytes FROM pg_stat_wal",
            self.name
        );
        let output = std::process::Command::new("psql")
            .arg(&self.admin_url)
            .args(["-Atq", "-F", " ", "-c", &sql])
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8(output.stdout).ok()?;
        let values: Vec<f64> = text
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        match values[..] {
            [commits, wal_syncs, wal_bytes] => Some(PgStats {
                commits,
                wal_syncs,
                wal_bytes,
            }),
            _ => None,
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        match psql(
            &self.admin_url,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        ) {
            Ok(()) => println!("  PostgreSQL database {} dropped", self.name),
            Err(error) => eprintln!("warning: dropping database {}: {error:#}", self.name),
        }
    }
}

/// Runs one SQL statement with `psql` (bounded by `statement_timeout` of 60 s).
pub fn psql(url: &str, sql: &str) -> Result<()> {
    let output = std::process::Command::new("psql")
        .arg(url)
        .args(["-v", "ON_ERROR_STOP=1", "-Atq", "-c", sql])
        .env("PGOPTIONS", "-c statement_timeout=60000")
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .output()
        .context("run psql (is the PostgreSQL client installed?)")?;
    if !output.status.success() {
        bail!(
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// `url` with its database (path) replaced by `database`, query kept.
pub fn with_database(url: &str, database: &str) -> Result<String> {
    let (scheme, rest) = url
        .split_once("://")
        .context("a database URL looks like postgres://user@host:port/db")?;
    let (before_query, query) = match rest.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (rest, None),
    };
    let authority = before_query.split('/').next().unwrap_or(before_query);
    Ok(match query {
        Some(query) => format!("{scheme}://{authority}/{database}?{query}"),
        None => format!("{scheme}://{authority}/{database}"),
    })
}

/// The server under test. Its process is killed when this is dropped (also on error), then
/// its database is dropped.
#[derive(Debug)]
pub struct ServerChild {
    child: Child,
    /// Its process id.
    pub pid: u32,
    /// Where it listens (loopback).
    pub addr: SocketAddr,
    /// Data directory and log; removed on drop.
    dir: tempfile::TempDir,
    /// Its PostgreSQL database, if it runs on one.
    pub database: Option<PgDatabase>,
}

/// How to start the server under test.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// `DROVER_LOG` (empty: `warn`).
    pub log: String,
    /// `TOKIO_WORKER_THREADS` (default: one per core).
    pub threads: Option<usize>,
    /// `DROVER_SUBSCRIBE_MAX_QUEUED_MESSAGES` (default: the server's).
    pub queue: Option<u64>,
    /// More environment, such as settings (`DROVER_<SETTING>`).
    pub env: Vec<(String, String)>,
    /// Prefix of the temporary data directory's name.
    pub dir_prefix: String,
    /// The server's open-files limit (soft and hard, set with `prlimit`); default: this
    /// process's.
    pub nofile: Option<u64>,
}

impl ServerChild {
    /// Starts `drover server` on a free loopback port with a fresh data directory (and
    /// `database`, if given) and the bench's admin key, and waits (bounded by `timeout`, at
    /// most 60 s) for `GET /healthz`.
    pub async fn start(
        bin: &Path,
        options: &ServerOptions,
        database: Option<PgDatabase>,
        timeout: Duration,
    ) -> Result<ServerChild> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let prefix = if options.dir_prefix.is_empty() {
            "drover-bench-"
        } else {
            options.dir_prefix.as_str()
        };
        let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let mut command = match options.nofile {
            // prlimit sets the limit and then executes the server: the pid is the server's.
            Some(nofile) => {
                let mut command = Command::new("prlimit");
                command
                    .arg(format!("--nofile={nofile}:{nofile}"))
                    .arg("--")
                    .arg(bin);
                command
            }
            None => Command::new(bin),
        };
        command
            .arg("server")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(dir.path())
            .env("DROVER_ADMIN_ACCESS_KEY", ACCESS_KEY)
            .env("DROVER_ADMIN_SECRET_KEY", SECRET_KEY)
            .env(
                "DROVER_LOG",
                if options.log.is_empty() {
                    "warn"
                } else {
                    options.log.as_str()
                },
            )
            .envs(options.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        if let Some(database) = &database {
            command.arg("--database-url").arg(&database.url);
        }
        if let Some(threads) = options.threads {
            command.env("TOKIO_WORKER_THREADS", threads.to_string());
        }
        if let Some(queue) = options.queue {
            command.env("DROVER_SUBSCRIBE_MAX_QUEUED_MESSAGES", queue.to_string());
        }
        let child = command.spawn().context("spawn drover server")?;
        let pid = child.id().context("child pid")?;
        let mut server = ServerChild {
            child,
            pid,
            addr,
            dir,
            database,
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let deadline = Instant::now() + timeout.min(Duration::from_secs(60));
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "drover server exited early ({status}); log:\n{}",
                    server.log_tail()
                );
            }
            if let Ok(response) = http
                .get(format!("{}/healthz", server.http_url()))
                .send()
                .await
                && response.status().is_success()
            {
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!(
                    "drover did not answer /healthz in time; log:\n{}",
                    server.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `http://127.0.0.1:port`.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The data directory (SQLite's `drover.db` is in it).
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The last 20 lines of the server's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Kills the server, waits for it (bounded), then drops its database.
    pub async fn stop(mut self, keep_log: Option<&Path>) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        if let Some(path) = keep_log
            && let Err(error) = std::fs::copy(self.dir.path().join("server.log"), path)
        {
            eprintln!(
                "warning: copying the server log to {}: {error}",
                path.display()
            );
        }
        drop(self.database.take());
    }
}

/// Where `drover` is: `given`, else beside this binary (both in `target/release`), else
/// `target/release/drover`.
pub fn drover_bin(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path.to_owned());
    }
    let beside = std::env::current_exe()?.with_file_name("drover");
    if beside.exists() {
        return Ok(beside);
    }
    let relative = PathBuf::from("target/release/drover");
    if relative.exists() {
        return Ok(relative);
    }
    bail!("no drover binary: run `cargo build --release -p drover` or pass --drover-bin")
}

/// Raises the open-files soft limit to the hard limit (children inherit it); the limit now.
pub fn raise_nofile() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(error) => {
            eprintln!("warning: could not raise the open-files limit: {error}");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |(soft, _)| soft)
        }
    }
}

/// A value on the server's `/metrics`.
pub async fn metric(url: &str, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Resident memory of a process in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS line")
}

/// utime + stime of a process in clock ticks. `who` is a pid or "self".
pub fn cpu_ticks(who: &str) -> Option<u64> {
    process_ticks(who, false)
}

/// utime + stime of a process and cutime + cstime of the children it waited for (such as
/// wrk), in clock ticks.
pub fn cpu_ticks_with_children(who: &str) -> Option<u64> {
    process_ticks(who, true)
}

fn process_ticks(who: &str, children: bool) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{who}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces: utime and
    // stime are fields 14 and 15 of the whole line, 11 and 12 after the state; cutime and
    // cstime follow.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    let own = field(11)? + field(12)?;
    Some(if children {
        own + field(13)? + field(14)?
    } else {
        own
    })
}

/// stime alone (kernel time) of a process, in clock ticks.
pub fn system_ticks(who: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{who}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(12)?.parse().ok()
}

/// `getconf CLK_TCK` (100 if it fails).
pub fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Busy and total jiffies of the whole machine.
pub fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|field| field.parse().ok())
        .collect();
    let [user, nice, system, idle, iowait, irq, softirq, steal] = fields[..] else {
        return None;
    };
    let busy = user + nice + system + irq + softirq + steal;
    Some((busy, busy + idle + iowait))
}

/// The machine's cores (1 if unknown).
pub fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
}

/// The whole machine's busy CPU between two [`machine_ticks`] readings, in percent of one core
/// (`None` if no time passed between them).
pub fn machine_busy(before: (u64, u64), after: (u64, u64)) -> Option<f64> {
    let ((busy0, total0), (busy1, total1)) = (before, after);
    (total1 > total0)
        .then(|| busy1.saturating_sub(busy0) as f64 / (total1 - total0) as f64 * cores() * 100.0)
}

/// CPU over an interval, in percent of one core.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSplit {
    /// The server process.
    pub server: f64,
    /// The server's kernel (system) time, part of `server`.
    pub server_system: f64,
    /// This bench process.
    pub bench: f64,
    /// PostgreSQL's processes (part of `other`).
    pub postgres: f64,
    /// Everything but the server and the bench.
    pub other: f64,
    /// 100% per core.
    pub capacity: f64,
}

impl std::fmt::Display for CpuSplit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "server {:.0}% (kernel {:.0}%) + bench {:.0}% + rest of machine {:.0}% of one core ({:.0}% = all cores)",
            self.server, self.server_system, self.bench, self.other, self.capacity
        )?;
        if self.postgres >= 0.5 {
            write!(f, "; PostgreSQL processes {:.0}% of it", self.postgres)?;
        }
        Ok(())
    }
}

impl CpuSplit {
    /// The rest of the machine without PostgreSQL's processes.
    pub fn rest_but_postgres(&self) -> f64 {
        (self.other - self.postgres).max(0.0)
    }
}

/// CPU readings at a start, for [`CpuMeter::stop`].
#[derive(Debug)]
pub struct CpuMeter {
    pids: Vec<String>,
    start: Instant,
    server: u64,
    server_system: u64,
    bench: u64,
    postgres: u64,
    machine: Option<(u64, u64)>,
}

impl CpuMeter {
    /// Readings of the server `pid`, this process, PostgreSQL and the machine now.
    pub fn start(pid: u32) -> CpuMeter {
        CpuMeter::start_all(&[pid])
    }

    /// [`CpuMeter::start`] for a server made of several processes (the nodes of a cluster
    /// and its nats-server): their CPU is summed as the server's.
    pub fn start_all(pids: &[u32]) -> CpuMeter {
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        CpuMeter {
            server: sum_ticks(&pids, cpu_ticks),
            server_system: sum_ticks(&pids, system_ticks),
            bench: cpu_ticks("self").unwrap_or(0),
            postgres: postgres_ticks(),
            machine: machine_ticks(),
            start: Instant::now(),
            pids,
        }
    }

    /// The time since [`CpuMeter::start`].
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// The split since [`CpuMeter::start`].
    pub fn stop(&self) -> CpuSplit {
        let wall = self.start.elapsed().as_secs_f64().max(1e-9);
        let hz = clock_ticks_per_second();
        let pct = |now: Option<u64>, then: u64| {
            now.map_or(0.0, |now| {
                now.saturating_sub(then) as f64 / hz / wall * 100.0
            })
        };
        let server = pct(Some(sum_ticks(&self.pids, cpu_ticks)), self.server);
        let bench = pct(cpu_ticks("self"), self.bench);
        let postgres = pct(Some(postgres_ticks()), self.postgres);
        let server_system = pct(
            Some(sum_ticks(&self.pids, system_ticks)),
            self.server_system,
        );
        let machine = self
            .machine
            .zip(machine_ticks())
            .and_then(|(before, after)| machine_busy(before, after))
            .unwrap_or(server + bench);
        CpuSplit {
            server,
            server_system,
            bench,
            postgres,
            other: (machine - server - bench).max(0.0),
            capacity: cores() * 100.0,
        }
    }
}

/// The sum of `read` over `pids` (a process that is gone counts 0).
fn sum_ticks(pids: &[String], read: fn(&str) -> Option<u64>) -> u64 {
    pids.iter().filter_map(|pid| read(pid)).sum()
}

/// CPU ticks of every process named `postgres` (those that exit meanwhile are missed).
pub fn postgres_ticks() -> u64 {
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut total = 0;
    for process in processes.flatten().take(100_000) {
        let name = process.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if stat.contains("(postgres)") {
            total += cpu_ticks(pid).unwrap_or(0);
        }
    }
    total
}

/// Waits (at most `limit`) until the rest of the machine — everything but the server and this
/// bench — uses under 15% of one core over a second; warns and goes on if it never does.
pub async fn wait_quiet(pid: u32, limit: Duration) {
    wait_quiet_by(&[pid], limit, |cpu| cpu.other).await;
}

/// [`wait_quiet`] for a server made of several processes.
pub async fn wait_quiet_all(pids: &[u32], limit: Duration) {
    wait_quiet_by(pids, limit, |cpu| cpu.other).await;
}

/// [`wait_quiet`], with PostgreSQL's processes not counted as the rest of the machine either.
pub async fn wait_quiet_but_postgres(pid: u32, limit: Duration) {
    wait_quiet_by(&[pid], limit, CpuSplit::rest_but_postgres).await;
}

async fn wait_quiet_by(pids: &[u32], limit: Duration, rest: fn(&CpuSplit) -> f64) {
    if limit.is_zero() {
        return;
    }
    let started = Instant::now();
    let mut told = false;
    loop {
        let meter = CpuMeter::start_all(pids);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let other = rest(&meter.stop());
        if other < 15.0 {
            if told {
                println!("    quiet after {:.0} s", started.elapsed().as_secs_f64());
            }
            return;
        }
        if started.elapsed() >= limit {
            println!(
                "    WARNING: other processes still use {other:.0}% of a core after {} s; measuring anyway",
                limit.as_secs()
            );
            return;
        }
        if !told {
            println!(
                "    waiting for a quiet machine (other processes use {other:.0}% of a core) …"
            );
            told = true;
        }
    }
}

/// CPU ticks and context switches of each thread of a process, by thread id.
fn thread_readings(pid: u32) -> HashMap<u64, (String, u64, u64)> {
    let mut out = HashMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten().take(10_000) {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<u64>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_owned();
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        let ticks = field(11).unwrap_or(0) + field(12).unwrap_or(0);
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let switches: u64 = status
            .lines()
            .filter(|line| line.contains("ctxt_switches:"))
            .filter_map(|line| line.split(':').nth(1)?.trim().parse::<u64>().ok())
            .sum();
        out.insert(tid, (name, ticks, switches));
    }
    out
}

/// The server's CPU and context switches over an interval, per thread name.
#[derive(Debug)]
pub struct ThreadMeter {
    pid: u32,
    start: Instant,
    before: HashMap<u64, (String, u64, u64)>,
}

impl ThreadMeter {
    /// Readings of every thread of `pid` now.
    pub fn start(pid: u32) -> ThreadMeter {
        ThreadMeter {
            pid,
            start: Instant::now(),
            before: thread_readings(pid),
        }
    }

    /// `name ×threads: CPU % of one core, context switches/s`, busiest first, the CPU with
    /// `decimals` decimals.
    pub fn stop(&self, decimals: usize) -> String {
        let wall = self.start.elapsed().as_secs_f64().max(1e-9);
        let hz = clock_ticks_per_second();
        let mut by_name: HashMap<String, (f64, u64, usize)> = HashMap::new();
        for (tid, (name, ticks, switches)) in thread_readings(self.pid) {
            let (ticks0, switches0) = self.before.get(&tid).map_or((0, 0), |(_, t, s)| (*t, *s));
            let entry = by_name.entry(name).or_default();
            entry.0 += ticks.saturating_sub(ticks0) as f64 / hz / wall * 100.0;
            entry.1 += switches.saturating_sub(switches0);
            entry.2 += 1;
        }
        let mut rows: Vec<_> = by_name.into_iter().collect();
        rows.sort_by(|a, b| b.1.0.total_cmp(&a.1.0));
        rows.iter()
            .map(|(name, (cpu, switches, threads))| {
                format!(
                    "{name} ×{threads}: {cpu:.decimals$}% CPU, {:.0} context switches/s",
                    *switches as f64 / wall
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Starts a flat `perf record -e cpu-clock` of process `pid` into `out`, if given; stop it with
/// [`finish_perf`].
pub fn start_perf(out: Option<&Path>, pid: u32) -> Option<std::process::Child> {
    let out = out?;
    let child = std::process::Command::new("perf")
        .args([
            "record",
            "-e",
            "cpu-clock",
            "-F",
            "999",
            "-p",
            &pid.to_string(),
            "-o",
        ])
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match child {
        Ok(child) => Some(child),
        Err(error) => {
            eprintln!("warning: perf record did not start: {error}");
            None
        }
    }
}

/// Stops `perf record` with SIGINT (so it writes its file) and waits for it ([`wait_perf`]).
pub async fn finish_perf(child: Option<std::process::Child>, out: Option<&Path>, during: &str) {
    if let Some(child) = &child {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
    }
    wait_perf(child, out, during).await;
}

/// Waits (at most 30 s, then kills it) for `perf record` to end; then says where the profile
/// is, `during` what (such as " during the throughput phase").
pub async fn wait_perf(child: Option<std::process::Child>, out: Option<&Path>, during: &str) {
    let Some(mut child) = child else { return };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            if let Some(out) = out {
                println!("  perf profile of the server{during}: {}", out.display());
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `/proc/loadavg`'s 1-minute figure.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// Prints the cores, CPU model, memory, kernel and load average.
pub fn print_machine() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map_or("?", |(_, model)| model.trim());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .map_or("?", str::trim);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "machine: {} cores, {model}, {memory} memory, kernel {}; load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}

/// Percentiles of a sample.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Largest.
    pub max: Duration,
}

impl Latency {
    /// Percentiles of `samples` (all zero when empty).
    pub fn of(mut samples: Vec<Duration>) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_unstable();
        let at = |q: f64| quantile(&samples, q);
        Latency {
            count: samples.len(),
            p50: at(0.50),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

/// The `q` quantile (0 to 1) of sorted, non-empty `samples`, by nearest rank.
pub fn quantile<T: Copy>(sorted: &[T], q: f64) -> T {
    let idx = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {} p99 {} max {} ({} samples)",
            ms(self.p50),
            ms(self.p99),
            ms(self.max),
            self.count
        )
    }
}

/// A duration in milliseconds with two decimals.
pub fn ms(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_database_of_a_url() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432", "x").unwrap(),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u:p@h:1/db?sslmode=disable", "x").unwrap(),
            "postgres://u:p@h:1/x?sslmode=disable"
        );
        assert!(with_database("nonsense", "x").is_err());
    }

    #[test]
    fn percentiles() {
        let samples = (1..=100).map(Duration::from_millis).collect();
        let latency = Latency::of(samples);
        assert_eq!(latency.p50, Duration::from_millis(51));
        assert_eq!(latency.p99, Duration::from_millis(99));
        assert_eq!(latency.max, Duration::from_millis(100));
    }
}
