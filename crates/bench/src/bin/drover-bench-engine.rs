//! `drover-bench-engine`: end-to-end throughput and latency of drover's process engine.
//!
//! Starts `drover server` as a child process on a free loopback port (embedded SQLite in a
//! temporary data directory, or a fresh PostgreSQL database created for the run and dropped
//! after it), registers N simulated agents (registration token, `POST /v1/register`), each a
//! WebSocket subscriber with its agent key to `compute.instance.activate`, `…deactivate`,
//! `…remove` and `ping` that answers every request at once through `POST /v1/publish`. Then:
//!
//! - **throughput**: M containers created through `POST /v1/containers` by C concurrent
//!   callers; done when every one of them had its `state.change` to `running` with
//!   `transitioning: no` on a raw admin subscription (no polling). Container starts per second
//!   are M / (last such event − first API call); each container's latency is its API call to
//!   its event.
//! - **idle**: K containers one at a time (C = 1): latency from the API call to the event.
//!
//! Each container is two processes (`instance.create`, then `instance.start`, which calls the
//! agent). The server's and this process's CPU time (from `/proc`) are reported per phase.
//! Every wait is bounded by `--timeout-seconds`; the server is killed at the end, also on error.
//!
//! ```text
//! cargo build --release -p drover -p drover-bench
//! target/release/drover-bench-engine --agents 1 --containers 2000 --concurrency 32
//! target/release/drover-bench-engine --agents 100 --containers 2000 \
//!     --database-url postgres://postgres@127.0.0.1:5432/postgres
//! ```

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use drover_client::{Client, Event, EventStream, Subscribe};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;

/// The admin key given to the server under test.
const ACCESS_KEY: &str = "BENCHENGINEACCESS0001";
/// Its secret.
const SECRET_KEY: &str = "bench-engine-secret-0123456789abcdefghijklmnopqrs";

/// What a simulated agent subscribes to.
const AGENT_EVENTS: &[&str] = &[
    "compute.instance.activate",
    "compute.instance.deactivate",
    "compute.instance.remove",
    "ping",
];

#[derive(Debug, Clone, Parser)]
#[command(
    name = "drover-bench-engine",
    about = "Process engine throughput and latency: container starts through the API, on loopback"
)]
struct Args {
    /// Simulated agents (each with one host).
    #[arg(long, default_value_t = 1)]
    agents: usize,
    /// Containers created in the throughput phase (0 skips it).
    #[arg(long, default_value_t = 2000)]
    containers: usize,
    /// Concurrent API callers in the throughput phase.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Containers created one at a time in the idle-latency phase (0 skips it).
    #[arg(long, default_value_t = 200)]
    idle_containers: usize,
    /// PostgreSQL server to run on (a database `drover_bench_<pid>` is created on it and
    /// dropped afterwards), e.g. postgres://postgres@127.0.0.1:5432/postgres. Default: the
    /// embedded SQLite.
    #[arg(long)]
    database_url: Option<String>,
    /// Place containers with `requestedHostId`, round-robin over the hosts (default: the
    /// engine picks the least-loaded host).
    #[arg(long)]
    round_robin: bool,
    /// Registrations in flight at once.
    #[arg(long, default_value_t = 8)]
    register_concurrency: usize,
    /// The drover binary (default: `drover` beside this binary, else target/release/drover).
    #[arg(long)]
    drover_bin: Option<PathBuf>,
    /// TOKIO_WORKER_THREADS for the server (default: one per core).
    #[arg(long)]
    server_threads: Option<usize>,
    /// Worker threads of this bench (default: one per core).
    #[arg(long)]
    bench_threads: Option<usize>,
    /// DROVER_SUBSCRIBE_MAX_QUEUED_MESSAGES for the server (default: its own, 1000).
    #[arg(long)]
    server_queue: Option<u64>,
    /// Record a flat `perf record -e cpu-clock` profile of the server during the throughput
    /// phase into this file.
    #[arg(long)]
    perf_record: Option<PathBuf>,
    /// Before each measurement, wait up to this many seconds for the rest of the machine to
    /// be quiet (under 15% of one core); 0 measures at once.
    #[arg(long, default_value_t = 120)]
    quiet_wait: u64,
    /// Bound on every wait (server start, agents active, each phase), in seconds.
    #[arg(long, default_value_t = 300)]
    timeout_seconds: u64,
    /// Count the server's context switches and its sleep, futex, fcntl (SQLite locks) and
    /// write/sync system calls per container start in each phase, with `perf stat`
    /// tracepoints.
    #[arg(long)]
    perf_stat: bool,
    /// DROVER_LOG for the server (e.g. `warn,sqlx::query=debug` to log every statement).
    #[arg(long, default_value = "warn")]
    server_log: String,
    /// Copy the server's log here when it stops.
    #[arg(long)]
    keep_log: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let nofile = raise_nofile();
    println!("open-files soft limit: {nofile}");
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = args.bench_threads {
        builder.worker_threads(threads.max(1));
    }
    let runtime = builder.enable_all().build()?;
    let result = runtime.block_on(async {
        tokio::select! {
            result = run(&args) => result,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    result
}

async fn run(args: &Args) -> Result<()> {
    let bin = drover_bin(args.drover_bin.as_deref())?;
    print_machine();
    let database = match &args.database_url {
        Some(url) => Some(PgDatabase::create(url)?),
        None => None,
    };
    let backend = if database.is_some() {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    println!(
        "drover engine bench: {backend}, {} agents, {} containers with {} callers ({}), {} idle containers",
        args.agents,
        args.containers,
        args.concurrency,
        if args.round_robin {
            "requestedHostId round-robin"
        } else {
            "engine places"
        },
        args.idle_containers
    );
    let timeout = Duration::from_secs(args.timeout_seconds.max(1));
    let server = ServerChild::start(&bin, args, database, timeout).await?;
    println!("  server pid {} on {}", server.pid, server.addr);
    let result = bench(&server, args, backend, timeout).await;
    if result.is_err() {
        eprintln!("server log tail:\n{}", server.log_tail());
    }
    server.stop(args.keep_log.as_deref()).await;
    result
}

async fn bench(server: &ServerChild, args: &Args, backend: &str, timeout: Duration) -> Result<()> {
    let url = server.http_url();
    let admin = Client::new(&url, ACCESS_KEY, SECRET_KEY)?;
    let mut seen = Seen::subscribe(&admin, timeout).await?;

    let registered_at = Instant::now();
    let token = admin.post("registrationtokens", &json!({})).await?["token"]
        .as_str()
        .context("the registration token has no `token`")?
        .to_owned();
    let stats = Arc::new(AgentStats::default());
    let (agents, agent_tasks) = start_agents(&url, &token, args, stats.clone(), timeout).await?;
    wait_active(&admin, &agents, timeout).await?;
    println!(
        "  {} agents registered, subscribed and active (hosts active) in {:.1} s",
        agents.len(),
        registered_at.elapsed().as_secs_f64()
    );
    let hosts: Option<Arc<Vec<String>>> = args
        .round_robin
        .then(|| Arc::new(agents.iter().map(|agent| agent.host_id.clone()).collect()));

    let mut rows = Vec::new();
    if args.containers > 0 {
        wait_quiet(server.pid, Duration::from_secs(args.quiet_wait)).await;
        let perf = start_perf(args.perf_record.as_deref(), server.pid);
        let stat = args
            .perf_stat
            .then(|| PerfStat::start(server.pid))
            .flatten();
        let pg_before = server.database.as_ref().and_then(PgDatabase::stats);
        let phase = throughput(
            server,
            &admin,
            &mut seen,
            args.containers,
            args.concurrency.max(1),
            hosts.clone(),
            timeout,
        )
        .await;
        finish_perf(perf, args.perf_record.as_deref()).await;
        if let Some(stat) = stat {
            stat.stop(args.containers).await;
        }
        pg_report(server, pg_before, args.containers).await;
        rows.push(phase?);
    }
    if args.idle_containers > 0 {
        // Let the throughput phase's coalesced resource.change publishing and the agents'
        // replies drain, so the idle phase starts idle.
        tokio::time::sleep(Duration::from_secs(2)).await;
        wait_quiet(server.pid, Duration::from_secs(args.quiet_wait)).await;
        let stat = args
            .perf_stat
            .then(|| PerfStat::start(server.pid))
            .flatten();
        let pg_before = server.database.as_ref().and_then(PgDatabase::stats);
        let phase = idle(
            server,
            &admin,
            &mut seen,
            args.idle_containers,
            hosts,
            timeout,
        )
        .await;
        if let Some(stat) = stat {
            stat.stop(args.idle_containers).await;
        }
        pg_report(server, pg_before, args.idle_containers).await;
        rows.push(phase?);
    }

    println!(
        "  agents answered {} requests and {} pings; {} reply errors; {} agent sockets closed",
        stats.requests.load(Ordering::Relaxed),
        stats.pings.load(Ordering::Relaxed),
        stats.reply_errors.load(Ordering::Relaxed),
        stats.closed.load(Ordering::Relaxed)
    );
    if let Some(error) = stats.first_error.lock().expect("not poisoned").as_ref() {
        println!("  first agent error: {error}");
    }
    println!(
        "  server VmRSS at the end: {} MiB; slow-consumer disconnects: {}",
        rss_kib(server.pid).unwrap_or(0) / 1024,
        metric(&url, "drover_slow_consumer_disconnects_total")
            .await
            .map_or_else(|| "?".to_owned(), |v| v.to_string())
    );
    println!();
    println!(
        "| backend | agents | phase | callers | containers | starts/s | processes/s | API p50 | p50 | p99 | max | server CPU | bench CPU | other CPU (PostgreSQL) | server CPU per start | load avg (1 min) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for row in &rows {
        println!(
            "| {backend} | {} | {} | {} | {}{} | {:.0} | {:.0} | {} | {} | {} | {} | {:.0}% | {:.0}% | {:.0}% ({:.0}%) | {:.2} ms | {} → {} |",
            agents.len(),
            row.phase,
            row.callers,
            row.containers,
            if row.errors > 0 {
                format!(" ({} errors)", row.errors)
            } else {
                String::new()
            },
            row.starts_per_second(),
            row.starts_per_second() * 2.0,
            ms(row.api.p50),
            ms(row.latency.p50),
            ms(row.latency.p99),
            ms(row.latency.max),
            row.cpu.server,
            row.cpu.bench,
            row.cpu.other,
            row.cpu.postgres,
            row.server_cpu_ms_per_start(),
            row.load_before,
            row.load_after,
        );
    }
    drop(agent_tasks);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The phases.

/// The figures of one phase.
#[derive(Debug)]
struct PhaseRow {
    phase: &'static str,
    callers: usize,
    containers: usize,
    errors: usize,
    /// First API call to the last container running.
    wall: Duration,
    /// API call → `state.change` running/no.
    latency: Latency,
    /// API call → its answer.
    api: Latency,
    cpu: CpuSplit,
    load_before: String,
    load_after: String,
}

impl PhaseRow {
    fn starts_per_second(&self) -> f64 {
        self.containers as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    fn server_cpu_ms_per_start(&self) -> f64 {
        self.cpu.server / 100.0 * self.wall.as_secs_f64() * 1000.0 / self.containers.max(1) as f64
    }
}

/// What each API caller reports: the container's id, when the call started and when it was
/// answered; or the error.
type Created = std::result::Result<(String, Instant, Instant), String>;

fn container_body(prefix: &str, i: usize, hosts: Option<&[String]>) -> Value {
    let mut body = json!({"name": format!("{prefix}-{i}"), "command": ["true"]});
    if let Some(hosts) = hosts
        && !hosts.is_empty()
    {
        body["requestedHostId"] = json!(hosts[i % hosts.len()]);
    }
    body
}

async fn create(admin: &Client, body: &Value) -> Created {
    let started = Instant::now();
    let result = admin.post("containers", body).await;
    let answered = Instant::now();
    match result {
        Ok(resource) => match resource["id"].as_str() {
            Some(id) => Ok((id.to_owned(), started, answered)),
            None => Err(format!("the created container has no id: {resource}")),
        },
        Err(error) => Err(error.to_string()),
    }
}

async fn throughput(
    server: &ServerChild,
    admin: &Client,
    seen: &mut Seen,
    containers: usize,
    callers: usize,
    hosts: Option<Arc<Vec<String>>>,
    timeout: Duration,
) -> Result<PhaseRow> {
    println!("  throughput: {containers} containers, {callers} concurrent API callers …");
    let load_before = loadavg();
    let (tx, mut created_rx) = mpsc::unbounded_channel::<Created>();
    let next = Arc::new(AtomicUsize::new(0));
    let meter = CpuMeter::start(server.pid);
    let threads = ThreadMeter::start(server.pid);
    let t0 = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..callers {
        let (admin, next, tx, hosts) = (admin.clone(), next.clone(), tx.clone(), hosts.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= containers {
                    break;
                }
                let body = container_body("tput", i, hosts.as_deref().map(Vec::as_slice));
                if tx.send(create(&admin, &body).await).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut sent: HashMap<String, (Instant, Instant)> = HashMap::with_capacity(containers);
    let mut errors: Vec<String> = Vec::new();
    let mut callers_done = false;
    let mut done = 0usize;
    let mut progress = tokio::time::interval(Duration::from_secs(5));
    progress.tick().await;
    while !(callers_done && done == sent.len()) {
        tokio::select! {
            created = created_rx.recv(), if !callers_done => match created {
                Some(Ok((id, started, answered))) => {
                    if seen.running.contains_key(&id) {
                        done += 1;
                    }
                    sent.insert(id, (started, answered));
                }
                Some(Err(error)) => errors.push(error),
                None => callers_done = true,
            },
            id = seen.next_running() => {
                if sent.contains_key(&id?) {
                    done += 1;
                }
            }
            _ = progress.tick() => println!(
                "    {:.0} s: {} created, {} running, {} API errors",
                t0.elapsed().as_secs_f64(), sent.len(), done, errors.len()
            ),
            () = tokio::time::sleep_until(deadline) => bail!(
                "throughput phase timed out after {} s: {} created, {} running",
                timeout.as_secs(), sent.len(), done
            ),
        }
    }
    let cpu = meter.stop();
    let threads = threads.stop();
    let load_after = loadavg();
    while tasks.join_next().await.is_some() {}
    if let Some(error) = errors.first() {
        println!(
            "    WARNING: {} API calls failed; the first: {error}",
            errors.len()
        );
    }
    if sent.is_empty() {
        bail!("no container was created");
    }
    let mut last = t0;
    let mut latencies = Vec::with_capacity(sent.len());
    let mut api = Vec::with_capacity(sent.len());
    for (id, (started, answered)) in &sent {
        let running = seen.running[id];
        last = last.max(running);
        latencies.push(running.saturating_duration_since(*started));
        api.push(answered.saturating_duration_since(*started));
    }
    let row = PhaseRow {
        phase: "throughput",
        callers,
        containers: sent.len(),
        errors: errors.len(),
        wall: last.saturating_duration_since(t0),
        latency: Latency::of(latencies),
        api: Latency::of(api),
        cpu,
        load_before,
        load_after,
    };
    println!(
        "    {} containers running in {:.2} s: {:.0} container starts/s ({:.0} processes/s); API→running {}; API call {}",
        row.containers,
        row.wall.as_secs_f64(),
        row.starts_per_second(),
        row.starts_per_second() * 2.0,
        row.latency,
        row.api
    );
    println!(
        "    CPU: {} — {:.2} ms of server CPU per container start",
        row.cpu,
        row.server_cpu_ms_per_start()
    );
    println!("    server threads: {threads}");
    Ok(row)
}

async fn idle(
    server: &ServerChild,
    admin: &Client,
    seen: &mut Seen,
    containers: usize,
    hosts: Option<Arc<Vec<String>>>,
    timeout: Duration,
) -> Result<PhaseRow> {
    println!("  idle latency: {containers} containers, one at a time …");
    let load_before = loadavg();
    let meter = CpuMeter::start(server.pid);
    let threads = ThreadMeter::start(server.pid);
    let t0 = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut latencies = Vec::with_capacity(containers);
    let mut api = Vec::with_capacity(containers);
    for i in 0..containers {
        let body = container_body("idle", i, hosts.as_deref().map(Vec::as_slice));
        let (id, started, answered) =
            match tokio::time::timeout_at(deadline, create(admin, &body)).await {
                Ok(created) => created.map_err(|error| anyhow!("creating a container: {error}"))?,
                Err(_) => bail!("idle phase timed out after {} s", timeout.as_secs()),
            };
        let running = loop {
            if let Some(at) = seen.running.get(&id) {
                break *at;
            }
            match tokio::time::timeout_at(deadline, seen.next_running()).await {
                Ok(next) => {
                    next?;
                }
                Err(_) => bail!(
                    "idle phase timed out after {} s waiting for {id}",
                    timeout.as_secs()
                ),
            }
        };
        latencies.push(running.saturating_duration_since(started));
        api.push(answered.saturating_duration_since(started));
    }
    let wall = t0.elapsed();
    let row = PhaseRow {
        phase: "idle (C=1)",
        callers: 1,
        containers,
        errors: 0,
        wall,
        latency: Latency::of(latencies),
        api: Latency::of(api),
        cpu: meter.stop(),
        load_before,
        load_after: loadavg(),
    };
    println!(
        "    API→running {}; API call {}; {:.0} starts/s one at a time",
        row.latency,
        row.api,
        row.starts_per_second()
    );
    println!(
        "    CPU: {} — {:.2} ms of server CPU per container start",
        row.cpu,
        row.server_cpu_ms_per_start()
    );
    println!("    server threads: {}", threads.stop());
    Ok(row)
}

// ---------------------------------------------------------------------------------------------
// The admin's raw `state.change` subscription.

enum SeenEvent {
    /// A container's `state.change` to `running`, `transitioning: no`, and when it arrived.
    Running(String, Instant),
    /// The subscription ended.
    Closed(String),
}

/// Containers seen running, from a raw admin subscription to `state.change`.
struct Seen {
    rx: mpsc::UnboundedReceiver<SeenEvent>,
    /// First arrival of each container's running/no `state.change`.
    running: HashMap<String, Instant>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Seen {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Seen {
    async fn subscribe(admin: &Client, timeout: Duration) -> Result<Seen> {
        let mut stream = admin
            .subscribe(Subscribe::names(["state.change"]))
            .await
            .context("admin subscription to state.change")?;
        // The server sends a `ping` once the subscription is in its hub.
        match tokio::time::timeout(timeout, stream.next_event()).await {
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => bail!("the state.change subscription closed at once"),
            Ok(Err(error)) => bail!("the state.change subscription failed: {error}"),
            Err(_) => bail!("no first ping on the state.change subscription"),
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let event = match stream.next_event().await {
                    Ok(Some(event)) => event,
                    Ok(None) => {
                        let _ = tx.send(SeenEvent::Closed("closed by the server".into()));
                        return;
                    }
                    Err(error) => {
                        let _ = tx.send(SeenEvent::Closed(error.to_string()));
                        return;
                    }
                };
                let arrived = Instant::now();
                if event.name() != "state.change"
                    || event.resource_type.as_deref() != Some("container")
                {
                    continue;
                }
                let Some(data) = event.data.as_ref() else {
                    continue;
                };
                if data["state"] == "running"
                    && data["transitioning"] == "no"
                    && let Some(id) = event.resource_id
                    && tx.send(SeenEvent::Running(id, arrived)).is_err()
                {
                    return;
                }
            }
        });
        Ok(Seen {
            rx,
            running: HashMap::new(),
            task,
        })
    }

    /// Waits for the next container to be seen running the first time; its id.
    async fn next_running(&mut self) -> Result<String> {
        loop {
            match self.rx.recv().await {
                Some(SeenEvent::Running(id, at)) => {
                    if let std::collections::hash_map::Entry::Vacant(entry) =
                        self.running.entry(id.clone())
                    {
                        entry.insert(at);
                        return Ok(id);
                    }
                }
                Some(SeenEvent::Closed(reason)) => bail!(
                    "the admin state.change subscription ended: {reason} (a slow consumer? try --server-queue)"
                ),
                None => bail!("the state.change reader ended"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Simulated agents.

/// A registered agent.
#[derive(Debug, Clone)]
struct Agent {
    agent_id: String,
    host_id: String,
}

/// The agents' tasks, aborted when dropped.
#[derive(Debug)]
struct AgentTasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AgentTasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

#[derive(Debug, Default)]
struct AgentStats {
    requests: AtomicU64,
    pings: AtomicU64,
    reply_errors: AtomicU64,
    closed: AtomicUsize,
    first_error: Mutex<Option<String>>,
}

impl AgentStats {
    fn error(&self, error: impl std::fmt::Display) {
        self.reply_errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().expect("not poisoned");
        if first.is_none() {
            *first = Some(error.to_string());
        }
    }
}

/// Registers `args.agents` agents (a few at a time) and starts each one's subscriber as soon
/// as it is registered, so that its activation ping finds it.
async fn start_agents(
    url: &str,
    token: &str,
    args: &Args,
    stats: Arc<AgentStats>,
    timeout: Duration,
) -> Result<(Vec<Agent>, AgentTasks)> {
    let (access, secret) = token
        .split_once(':')
        .context("a registration token is ACCESS:SECRET")?;
    let registrar = Client::new(url, access, secret)?;
    let permits = Arc::new(Semaphore::new(args.register_concurrency.max(1)));
    let mut starting = JoinSet::new();
    let run_id = std::process::id();
    for i in 0..args.agents {
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
            let agent = Agent {
                agent_id: field("agentId")?,
                host_id: field("hostId")?,
            };
            let client = Client::new(&url, &field("accessKey")?, &field("secretKey")?)?;
            let stream = client
                .subscribe(Subscribe::names(AGENT_EVENTS.iter().copied()))
                .await
                .context("agent subscription")?;
            let (ready_tx, ready_rx) = oneshot::channel();
            let task = tokio::spawn(run_agent(client, stream, stats, ready_tx));
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
    let mut agents = Vec::with_capacity(args.agents);
    let mut tasks = AgentTasks(Vec::with_capacity(args.agents));
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
/// containers it was asked to start as running, as a real agent does (an agent that reports
/// none would have the ping monitor stop them all).
async fn run_agent(
    client: Client,
    mut stream: EventStream,
    stats: Arc<AgentStats>,
    ready: oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut instances: HashSet<String> = HashSet::new();
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
                let resources: Vec<Value> = instances
                    .iter()
                    .map(|id| json!({"type": "instance", "id": id, "state": "running"}))
                    .collect();
                json!({ "resources": resources })
            }
            name => {
                stats.requests.fetch_add(1, Ordering::Relaxed);
                if let Some(id) = event.resource_id.clone() {
                    if name == "compute.instance.activate" {
                        instances.insert(id);
                    } else {
                        instances.remove(&id);
                    }
                }
                json!({"instance": {"externalId": "x"}})
            }
        };
        let (client, stats) = (client.clone(), stats.clone());
        tokio::spawn(async move { reply(&client, &event, data, &stats).await });
    }
}

async fn reply(client: &Client, request: &Event, data: Value, stats: &AgentStats) {
    if let Err(error) = client.reply(request, data).await {
        stats.error(format!("reply to {}: {error}", request.name()));
    }
}

/// Every item of a collection, following `pagination.next` (at most 1000 pages).
async fn list_all(admin: &Client, path: &str) -> Result<Vec<Value>> {
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
async fn wait_active(admin: &Client, agents: &[Agent], timeout: Duration) -> Result<()> {
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
struct PgDatabase {
    admin_url: String,
    name: String,
    /// The URL the server connects to.
    url: String,
}

impl PgDatabase {
    fn create(url: &str) -> Result<PgDatabase> {
        let name = format!("drover_bench_{}", std::process::id());
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
struct PgStats {
    commits: f64,
    wal_syncs: f64,
    wal_bytes: f64,
}

impl PgDatabase {
    fn stats(&self) -> Option<PgStats> {
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

/// Prints PostgreSQL's commits and WAL syncs per container start over a phase (after waiting
/// for the server's idle connections to flush their statistics).
async fn pg_report(server: &ServerChild, before: Option<PgStats>, containers: usize) {
    let (Some(database), Some(before)) = (server.database.as_ref(), before) else {
        return;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let Some(after) = database.stats() else {
        return;
    };
    let n = containers.max(1) as f64;
    println!(
        "    PostgreSQL per container start: {:.1} commits, {:.1} WAL syncs (fdatasync, whole cluster), {:.1} KiB of WAL",
        (after.commits - before.commits) / n,
        (after.wal_syncs - before.wal_syncs) / n,
        (after.wal_bytes - before.wal_bytes) / n / 1024.0
    );
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
fn psql(url: &str, sql: &str) -> Result<()> {
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
fn with_database(url: &str, database: &str) -> Result<String> {
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
struct ServerChild {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    /// Data directory and log; removed on drop.
    dir: tempfile::TempDir,
    database: Option<PgDatabase>,
}

impl ServerChild {
    async fn start(
        bin: &Path,
        args: &Args,
        database: Option<PgDatabase>,
        timeout: Duration,
    ) -> Result<ServerChild> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let dir = tempfile::Builder::new()
            .prefix("drover-bench-engine-")
            .tempdir()?;
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let mut command = Command::new(bin);
        command
            .arg("server")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(dir.path())
            .env("DROVER_ADMIN_ACCESS_KEY", ACCESS_KEY)
            .env("DROVER_ADMIN_SECRET_KEY", SECRET_KEY)
            .env("DROVER_LOG", &args.server_log)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        if let Some(database) = &database {
            command.arg("--database-url").arg(&database.url);
        }
        if let Some(threads) = args.server_threads {
            command.env("TOKIO_WORKER_THREADS", threads.to_string());
        }
        if let Some(queue) = args.server_queue {
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

    fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Kills the server, waits for it (bounded), then drops its database.
    async fn stop(mut self, keep_log: Option<&Path>) {
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

fn drover_bin(given: Option<&Path>) -> Result<PathBuf> {
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

fn raise_nofile() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(error) => {
            eprintln!("warning: could not raise the open-files limit: {error}");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |(soft, _)| soft)
        }
    }
}

/// A value on the server's `/metrics`.
async fn metric(url: &str, name: &str) -> Option<f64> {
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

// ---------------------------------------------------------------------------------------------
// perf, CPU, memory, machine.

fn start_perf(out: Option<&Path>, pid: u32) -> Option<std::process::Child> {
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

/// Stops `perf record` with SIGINT (so it writes its file) and waits for it (bounded).
async fn finish_perf(child: Option<std::process::Child>, out: Option<&Path>) {
    let Some(mut child) = child else { return };
    let _ = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            if let Some(out) = out {
                println!(
                    "  perf profile of the server during the throughput phase: {}",
                    out.display()
                );
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// System calls and context switches of the server, counted by `perf stat` tracepoints.
#[derive(Debug)]
struct PerfStat {
    child: std::process::Child,
    out: tempfile::NamedTempFile,
}

/// What `--perf-stat` counts.
const PERF_STAT_EVENTS: &[&str] = &[
    "sched:sched_switch",
    "syscalls:sys_enter_futex",
    "syscalls:sys_enter_epoll_wait",
    "syscalls:sys_enter_clock_nanosleep",
    "syscalls:sys_enter_nanosleep",
    "syscalls:sys_enter_fcntl",
    "syscalls:sys_enter_pwrite64",
    "syscalls:sys_enter_write",
    "syscalls:sys_enter_fdatasync",
    "syscalls:sys_enter_fsync",
];

impl PerfStat {
    fn start(pid: u32) -> Option<PerfStat> {
        let out = tempfile::NamedTempFile::new().ok()?;
        let child = std::process::Command::new("perf")
            .args(["stat", "-x", ",", "-e", &PERF_STAT_EVENTS.join(","), "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(out.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match child {
            Ok(child) => Some(PerfStat { child, out }),
            Err(error) => {
                eprintln!("warning: perf stat did not start: {error}");
                None
            }
        }
    }

    /// Stops `perf stat` (SIGINT) and prints each count per container start.
    async fn stop(mut self, containers: usize) {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let text = std::fs::read_to_string(self.out.path()).unwrap_or_default();
        let counts: Vec<String> = text
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split(',').collect();
                let count: f64 = fields.first()?.trim().parse().ok()?;
                let event = fields.get(2)?.trim();
                let event = event.rsplit(':').next().unwrap_or(event);
                Some(format!(
                    "{} {:.1}",
                    event.trim_start_matches("sys_enter_"),
                    count / containers.max(1) as f64
                ))
            })
            .collect();
        if counts.is_empty() {
            println!("    perf stat gave no counts (tracepoints unavailable?)");
        } else {
            println!("    per container start (perf stat): {}", counts.join(", "));
        }
    }
}

/// Resident memory of a process in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS line")
}

/// utime + stime of a process in clock ticks ("self" adds the children it waited for).
fn cpu_ticks(who: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{who}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    Some(field(11)? + field(12)?)
}

/// stime alone (kernel time) of a process, in clock ticks.
fn system_ticks(who: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{who}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(12)?.parse().ok()
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Busy and total jiffies of the whole machine.
fn machine_ticks() -> Option<(u64, u64)> {
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

/// CPU over an interval, in percent of one core.
#[derive(Debug, Clone, Copy, Default)]
struct CpuSplit {
    server: f64,
    /// The server's kernel (system) time, part of `server`.
    server_system: f64,
    bench: f64,
    /// PostgreSQL's processes (part of `other`).
    postgres: f64,
    other: f64,
    capacity: f64,
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

#[derive(Debug)]
struct CpuMeter {
    pid: String,
    start: Instant,
    server: u64,
    server_system: u64,
    bench: u64,
    postgres: u64,
    machine: Option<(u64, u64)>,
}

impl CpuMeter {
    fn start(pid: u32) -> CpuMeter {
        let pid = pid.to_string();
        CpuMeter {
            server: cpu_ticks(&pid).unwrap_or(0),
            server_system: system_ticks(&pid).unwrap_or(0),
            bench: cpu_ticks("self").unwrap_or(0),
            postgres: postgres_ticks(),
            machine: machine_ticks(),
            start: Instant::now(),
            pid,
        }
    }

    fn stop(&self) -> CpuSplit {
        let wall = self.start.elapsed().as_secs_f64().max(1e-9);
        let hz = clock_ticks_per_second();
        let pct = |now: Option<u64>, then: u64| {
            now.map_or(0.0, |now| {
                now.saturating_sub(then) as f64 / hz / wall * 100.0
            })
        };
        let server = pct(cpu_ticks(&self.pid), self.server);
        let bench = pct(cpu_ticks("self"), self.bench);
        let postgres = pct(Some(postgres_ticks()), self.postgres);
        let server_system = pct(system_ticks(&self.pid), self.server_system);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let machine = match (self.machine, machine_ticks()) {
            (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => {
                (busy1 - busy0) as f64 / (total1 - total0) as f64 * cores * 100.0
            }
            _ => server + bench,
        };
        CpuSplit {
            server,
            server_system,
            bench,
            postgres,
            other: (machine - server - bench).max(0.0),
            capacity: cores * 100.0,
        }
    }
}

/// CPU ticks of every process named `postgres` (those that exit meanwhile are missed).
fn postgres_ticks() -> u64 {
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
struct ThreadMeter {
    pid: u32,
    start: Instant,
    before: HashMap<u64, (String, u64, u64)>,
}

impl ThreadMeter {
    fn start(pid: u32) -> ThreadMeter {
        ThreadMeter {
            pid,
            start: Instant::now(),
            before: thread_readings(pid),
        }
    }

    /// `name: CPU % of one core (threads), context switches/s`, busiest first.
    fn stop(&self) -> String {
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
                    "{name} ×{threads}: {cpu:.0}% CPU, {:.0} context switches/s",
                    *switches as f64 / wall
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Waits (at most `limit`) until the rest of the machine — everything but the server and this
/// bench — uses under 15% of one core over a second; warns and goes on if it never does.
async fn wait_quiet(pid: u32, limit: Duration) {
    if limit.is_zero() {
        return;
    }
    let started = Instant::now();
    let mut told = false;
    loop {
        let meter = CpuMeter::start(pid);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let other = meter.stop().other;
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

/// `/proc/loadavg`'s 1-minute figure.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn print_machine() {
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
struct Latency {
    count: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Latency {
    fn of(mut samples: Vec<Duration>) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let idx = ((samples.len() as f64 - 1.0) * q).round() as usize;
            samples[idx.min(samples.len() - 1)]
        };
        Latency {
            count: samples.len(),
            p50: at(0.50),
            p99: at(0.99),
            max: at(1.0),
        }
    }
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

fn ms(duration: Duration) -> String {
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
