//! `drover-bench-agents`: many agents connected to one server, answering its pings.
//!
//! Starts `drover server` as a child process on a free loopback port (embedded SQLite in a
//! temporary data directory, or a fresh PostgreSQL database), registers N agents (a few
//! registrations in flight at once, `POST /v1/register` with a registration token) and connects
//! each, right after its registration, as a WebSocket subscriber to `ping` with its agent key.
//! Each agent answers every `ping` that has `replyTo` with `{"resources": []}` through
//! `POST /v1/publish` (shared keep-alive connections, its own key). The server's ping monitor
//! pings every agent every `agent.ping.interval.millis` (5 s by default).
//!
//! Once every agent is `active` (seen on a raw admin `state.change` subscription) and a settle
//! time has passed, it measures over `--seconds`: the server's CPU (utime + stime from
//! `/proc/<pid>/stat`, in % of one core), its `VmRSS` per agent (with the agents, minus before
//! them, divided by the agents), the pings answered per second, and that every agent and host
//! is still `active` (`GET /v1/agents`, `/v1/hosts`).
//!
//! A simulated agent is one small task: a WebSocket with a 4 KiB read buffer and no write
//! buffer, its `Authorization` header, and nothing else.
//!
//! ```text
//! cargo build --release -p drover -p drover-bench
//! target/release/drover-bench-agents --agents 10000 --seconds 60
//! ```

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use drover_client::{Client, Event, Subscribe};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// The admin key given to the server under test.
const ACCESS_KEY: &str = "BENCHAGENTSACCESS0001";
/// Its secret.
const SECRET_KEY: &str = "bench-agents-secret-0123456789abcdefghijklmnopqrs";

#[derive(Debug, Clone, Parser)]
#[command(
    name = "drover-bench-agents",
    about = "Many agents on one server answering its pings: server CPU and memory per agent"
)]
struct Args {
    /// Agents to register and connect.
    #[arg(long, default_value_t = 10_000)]
    agents: usize,
    /// Seconds of steady state to measure.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Seconds to wait after the last agent became active before measuring.
    #[arg(long, default_value_t = 15)]
    settle_seconds: u64,
    /// Registrations in flight at once.
    #[arg(long, default_value_t = 8)]
    register_concurrency: usize,
    /// Stop registering after this many seconds and measure with the agents registered so far.
    #[arg(long, default_value_t = 1200)]
    register_seconds: u64,
    /// Ping replies in flight at once (keep-alive HTTP connections for replies).
    #[arg(long, default_value_t = 32)]
    reply_concurrency: usize,
    /// WebSocket read buffer per agent, bytes.
    #[arg(long, default_value_t = 4096)]
    read_buffer: usize,
    /// PostgreSQL server to run on (a database `drover_bench_agents_<pid>` is created on it
    /// and dropped afterwards). Default: the embedded SQLite.
    #[arg(long)]
    database_url: Option<String>,
    /// The drover binary (default: `drover` beside this binary, else target/release/drover).
    #[arg(long)]
    drover_bin: Option<PathBuf>,
    /// TOKIO_WORKER_THREADS for the server (default: one per core).
    #[arg(long)]
    server_threads: Option<usize>,
    /// Worker threads of this bench (default: one per core).
    #[arg(long)]
    bench_threads: Option<usize>,
    /// Record a flat `perf record -e cpu-clock` profile of the server during the measurement.
    #[arg(long)]
    perf_record: Option<PathBuf>,
    /// Before each measurement, wait up to this many seconds for the rest of the machine to
    /// be quiet (under 15% of one core); 0 measures at once.
    #[arg(long, default_value_t = 120)]
    quiet_wait: u64,
    /// DROVER_LOG for the server (e.g. `warn,sqlx::query=debug` to log every statement).
    #[arg(long, default_value = "warn")]
    server_log: String,
    /// Copy the server's log here when it stops.
    #[arg(long)]
    keep_log: Option<PathBuf>,
    /// Bound on the other waits (server start, agents active), in seconds.
    #[arg(long, default_value_t = 600)]
    timeout_seconds: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let nofile = raise_nofile();
    println!("open-files soft limit: {nofile} (the server inherits it)");
    if (nofile as usize) < args.agents + 200 {
        eprintln!(
            "warning: {} agents need about {} open files in this process and in the server",
            args.agents,
            args.agents + 200
        );
    }
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
        "drover agents bench: {backend}, {} agents, {} s measured after {} s settling",
        args.agents, args.seconds, args.settle_seconds
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

/// Counters shared by every simulated agent.
#[derive(Debug, Default)]
struct Stats {
    connected: AtomicUsize,
    connect_failures: AtomicUsize,
    closed: AtomicUsize,
    pings_answered: AtomicU64,
    keepalive_pings: AtomicU64,
    reply_errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Stats {
    fn error(&self, error: impl std::fmt::Display) {
        let mut first = self.first_error.lock().expect("not poisoned");
        if first.is_none() {
            *first = Some(error.to_string());
        }
    }
}

/// What every agent task shares: where to connect and reply, and the counters.
#[derive(Debug)]
struct Shared {
    subscribe_url: String,
    publish_url: String,
    http: reqwest::Client,
    replies: Semaphore,
    read_buffer: usize,
    stats: Stats,
}

async fn bench(server: &ServerChild, args: &Args, backend: &str, timeout: Duration) -> Result<()> {
    let url = server.http_url();
    let admin = Client::new(&url, ACCESS_KEY, SECRET_KEY)?;
    // Warm the key cache and the HTTP stack, then read the server's memory without agents.
    admin.get("").await?;
    let token = admin.post("registrationtokens", &json!({})).await?["token"]
        .as_str()
        .context("the registration token has no `token`")?
        .to_owned();
    let mut states = States::subscribe(&admin, timeout).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = rss_kib(server.pid)?;
    println!("  server VmRSS without agents: {rss_before} KiB");

    let shared = Arc::new(Shared {
        subscribe_url: admin.subscribe_url(&Subscribe::names(["ping"])),
        publish_url: format!("{}/publish", admin.base_url()),
        http: reqwest::Client::builder()
            .http1_only()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(args.reply_concurrency.max(1))
            .timeout(Duration::from_secs(30))
            .build()?,
        replies: Semaphore::new(args.reply_concurrency.max(1)),
        read_buffer: args.read_buffer.max(256),
        stats: Stats::default(),
    });
    let bench_rss_before = rss_kib(std::process::id()).unwrap_or(0);

    // Register and connect.
    let started = Instant::now();
    let register_deadline = started + Duration::from_secs(args.register_seconds);
    let registered = register_all(&url, &token, args, shared.clone(), register_deadline).await?;
    let agents = registered.agents.len();
    let register_took = started.elapsed();
    println!(
        "  {agents} agents registered in {:.1} s ({:.0}/s){}",
        register_took.as_secs_f64(),
        agents as f64 / register_took.as_secs_f64().max(1e-9),
        if agents < args.agents {
            format!(
                " — stopped at the {} s registration limit, short of {}",
                args.register_seconds, args.agents
            )
        } else {
            String::new()
        }
    );
    if let Some(error) = registered.first_error.as_ref() {
        println!(
            "  {} registrations failed; the first: {error}",
            registered.failures
        );
    }
    if agents == 0 {
        bail!("no agent registered");
    }

    // Wait until every registered agent and host is active: by the `state.change` events, or,
    // every 10 s, by the API (state.change events of one resource can arrive out of order, so
    // the last one seen may be stale).
    let deadline = tokio::time::Instant::now() + timeout;
    let mut progress = tokio::time::interval(Duration::from_secs(10));
    progress.tick().await;
    loop {
        let (active_agents, active_hosts) = (states.active_agents, states.active_hosts);
        if active_agents >= agents && active_hosts >= agents {
            break;
        }
        tokio::select! {
            event = states.next() => event?,
            _ = progress.tick() => {
                let (api_agents, api_hosts) = count_active(&admin).await?;
                println!(
                    "    {:.0} s: {active_agents} agents and {active_hosts} hosts active by state.change, {api_agents} and {api_hosts} by the API; {} sockets connected",
                    started.elapsed().as_secs_f64(),
                    shared.stats.connected.load(Ordering::Relaxed)
                );
                if api_agents >= agents && api_hosts >= agents {
                    break;
                }
            }
            () = tokio::time::sleep_until(deadline) => bail!(
                "after {} s only {active_agents} of {agents} agents and {active_hosts} hosts are active",
                timeout.as_secs()
            ),
        }
    }
    println!(
        "  all {agents} agents and hosts active {:.1} s after the first registration; {} sockets connected, {} connect failures",
        started.elapsed().as_secs_f64(),
        shared.stats.connected.load(Ordering::Relaxed),
        shared.stats.connect_failures.load(Ordering::Relaxed)
    );

    let rss_active = rss_kib(server.pid)?;

    // Settle, then measure.
    let settle_until = tokio::time::Instant::now() + Duration::from_secs(args.settle_seconds);
    while tokio::time::Instant::now() < settle_until {
        tokio::select! {
            event = states.next() => event?,
            () = tokio::time::sleep_until(settle_until) => {}
        }
    }
    wait_quiet(server.pid, Duration::from_secs(args.quiet_wait)).await;
    let load_before = loadavg();
    states.left_active = 0;
    let pings0 = shared.stats.pings_answered.load(Ordering::Relaxed);
    let errors0 = shared.stats.reply_errors.load(Ordering::Relaxed);
    let keepalive0 = shared.stats.keepalive_pings.load(Ordering::Relaxed);
    let perf = start_perf(args.perf_record.as_deref(), server.pid);
    let meter = CpuMeter::start(server.pid);
    let threads = ThreadMeter::start(server.pid);
    let measure_until = tokio::time::Instant::now() + Duration::from_secs(args.seconds.max(1));
    println!("  measuring for {} s …", args.seconds.max(1));
    let mut rss_samples = vec![rss_kib(server.pid)?];
    let mut sample = tokio::time::interval(Duration::from_secs(10));
    sample.tick().await;
    while tokio::time::Instant::now() < measure_until {
        tokio::select! {
            event = states.next() => event?,
            _ = sample.tick() => rss_samples.push(rss_kib(server.pid)?),
            () = tokio::time::sleep_until(measure_until) => {}
        }
    }
    let cpu = meter.stop();
    let thread_split = threads.stop();
    let wall = meter.start.elapsed().as_secs_f64();
    let pings = shared.stats.pings_answered.load(Ordering::Relaxed) - pings0;
    let reply_errors = shared.stats.reply_errors.load(Ordering::Relaxed) - errors0;
    let keepalive = shared.stats.keepalive_pings.load(Ordering::Relaxed) - keepalive0;
    let rss_after = rss_kib(server.pid)?;
    let bench_rss_after = rss_kib(std::process::id()).unwrap_or(0);
    let load_after = loadavg();
    finish_perf(perf, args.perf_record.as_deref()).await;

    // Everyone still active, by the API.
    let (api_agents, api_hosts) = count_active(&admin).await?;
    let not_active_agents = agents.saturating_sub(api_agents);
    let not_active_hosts = agents.saturating_sub(api_hosts);

    let per_agent_kib = rss_after.saturating_sub(rss_before) as f64 / agents as f64;
    let bench_per_agent_kib =
        bench_rss_after.saturating_sub(bench_rss_before) as f64 / agents as f64;
    println!(
        "    server CPU {:.1}% of one core ({cpu}); server threads: {thread_split}",
        cpu.server
    );
    println!(
        "    server VmRSS {rss_before} KiB → {rss_active} KiB when all were active → {rss_after} KiB after the measurement: {per_agent_kib:.1} KiB per agent (bench: {bench_per_agent_kib:.1} KiB per agent)"
    );
    println!(
        "    {pings} pings answered in {wall:.1} s: {:.0}/s (expected {:.0}/s at one per agent per 5 s); {reply_errors} reply errors; {} agent state changes away from active; {} keep-alive pings (no replyTo) received",
        pings as f64 / wall,
        agents as f64 / 5.0,
        states.left_active,
        keepalive
    );
    println!(
        "    after the measurement: {not_active_agents} agents and {not_active_hosts} hosts not active (GET /v1/agents, /v1/hosts); {} agent sockets closed",
        shared.stats.closed.load(Ordering::Relaxed)
    );
    println!(
        "    server VmRSS every 10 s of the measurement, MiB: {}",
        rss_samples
            .iter()
            .map(|kib| format!("{:.0}", *kib as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(" ")
    );
    if let Some(error) = shared
        .stats
        .first_error
        .lock()
        .expect("not poisoned")
        .as_ref()
    {
        println!("    first agent error: {error}");
    }
    println!();
    println!(
        "| backend | agents | registration | measured | server CPU (% of one core) | server RSS per agent | pings answered/s | not active after | bench CPU | PostgreSQL CPU | other CPU | load avg (1 min) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {backend} | {agents} | {:.0} s ({:.0}/s) | {wall:.0} s | {:.1}% | {per_agent_kib:.1} KiB | {:.0} | {} | {:.0}% | {:.0}% | {:.0}% | {load_before} → {load_after} |",
        register_took.as_secs_f64(),
        agents as f64 / register_took.as_secs_f64().max(1e-9),
        cpu.server,
        pings as f64 / wall,
        not_active_agents + not_active_hosts,
        cpu.bench,
        cpu.postgres,
        cpu.other,
    );
    drop(registered);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Registration and the simulated agents.

/// The agents registered, and their tasks (aborted when this is dropped).
#[derive(Debug, Default)]
struct Registered {
    agents: Vec<(String, String)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    failures: usize,
    first_error: Option<String>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Registers up to `args.agents` agents, `register_concurrency` at a time, until `deadline`;
/// each agent's connection starts as soon as it is registered.
async fn register_all(
    url: &str,
    token: &str,
    args: &Args,
    shared: Arc<Shared>,
    deadline: Instant,
) -> Result<Registered> {
    let (access, secret) = token
        .split_once(':')
        .context("a registration token is ACCESS:SECRET")?;
    let registrar = Client::new(url, access, secret)?;
    let next = Arc::new(AtomicUsize::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<(String, String, String)>>();
    let mut workers = tokio::task::JoinSet::new();
    let run_id = std::process::id();
    let total = args.agents;
    for _ in 0..args.register_concurrency.max(1) {
        let (registrar, next, tx) = (registrar.clone(), next.clone(), tx.clone());
        workers.spawn(async move {
            let mut failures = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total || Instant::now() >= deadline || failures >= 10 {
                    return;
                }
                let body =
                    json!({"key": format!("bench-{run_id}-{i}"), "name": format!("bench-{i}")});
                let result = registrar
                    .post("register", &body)
                    .await
                    .map_err(anyhow::Error::from)
                    .and_then(|registered| {
                        let field = |name: &str| {
                            registered[name]
                                .as_str()
                                .map(str::to_owned)
                                .with_context(|| {
                                    format!("the registration has no {name}: {registered}")
                                })
                        };
                        let authorization = basic_auth(&field("accessKey")?, &field("secretKey")?);
                        Ok((field("agentId")?, field("hostId")?, authorization))
                    });
                if result.is_err() {
                    failures += 1;
                }
                if tx.send(result).is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let mut registered = Registered::default();
    let mut progress = Instant::now();
    // Ends when every worker has ended (each is bounded by `total` and `deadline`).
    while let Some(result) = rx.recv().await {
        match result {
            Ok((agent_id, host_id, authorization)) => {
                registered
                    .tasks
                    .push(tokio::spawn(agent(shared.clone(), authorization)));
                registered.agents.push((agent_id, host_id));
            }
            Err(error) => {
                registered.failures += 1;
                registered
                    .first_error
                    .get_or_insert_with(|| format!("{error:#}"));
            }
        }
        if progress.elapsed() >= Duration::from_secs(10) {
            progress = Instant::now();
            println!(
                "    {} agents registered, {} sockets connected",
                registered.agents.len(),
                shared.stats.connected.load(Ordering::Relaxed)
            );
        }
    }
    while workers.join_next().await.is_some() {}
    Ok(registered)
}

/// `Basic base64(access:secret)`.
fn basic_auth(access: &str, secret: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let input = format!("{access}:{secret}");
    let bytes = input.as_bytes();
    let mut out = String::with_capacity(6 + bytes.len().div_ceil(3) * 4);
    out.push_str("Basic ");
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// One simulated agent: connects (3 tries), then answers every `ping` with `replyTo`.
async fn agent(shared: Arc<Shared>, authorization: String) {
    let stats = &shared.stats;
    let mut socket = None;
    for attempt in 0..3 {
        match connect(&shared, &authorization).await {
            Ok(connected) => {
                socket = Some(connected);
                break;
            }
            Err(error) => {
                stats.error(format!("connect (attempt {}): {error:#}", attempt + 1));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    let Some(mut socket) = socket else {
        stats.connect_failures.fetch_add(1, Ordering::Relaxed);
        return;
    };
    stats.connected.fetch_add(1, Ordering::Relaxed);
    let authorization: Arc<str> = authorization.into();
    // Bounded by the socket: the server closes it when it stops (or the task is aborted).
    while let Some(message) = socket.next().await {
        let text = match message {
            Ok(Message::Text(text)) => text,
            Ok(Message::Close(frame)) => {
                stats.error(format!("closed by the server: {frame:?}"));
                break;
            }
            Ok(_) => continue,
            Err(error) => {
                stats.error(format!("socket: {error}"));
                break;
            }
        };
        let Ok(request) = serde_json::from_str::<Event>(text.as_str()) else {
            continue;
        };
        if request.name() != "ping" {
            continue;
        }
        let Some(reply) = request.reply() else {
            stats.keepalive_pings.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let body = reply.with_data(json!({"resources": []})).to_json();
        let (shared, authorization) = (shared.clone(), authorization.clone());
        tokio::spawn(async move {
            let Ok(_permit) = shared.replies.acquire().await else {
                return;
            };
            let sent = shared
                .http
                .post(&shared.publish_url)
                .header(reqwest::header::AUTHORIZATION, &*authorization)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body)
                .send()
                .await;
            match sent {
                Ok(response) if response.status().as_u16() == 201 => {
                    let _ = response.bytes().await;
                    shared.stats.pings_answered.fetch_add(1, Ordering::Relaxed);
                }
                Ok(response) => {
                    shared.stats.reply_errors.fetch_add(1, Ordering::Relaxed);
                    shared
                        .stats
                        .error(format!("reply answered {}", response.status()));
                }
                Err(error) => {
                    shared.stats.reply_errors.fetch_add(1, Ordering::Relaxed);
                    shared.stats.error(format!("reply: {error}"));
                }
            }
        });
    }
    stats.closed.fetch_add(1, Ordering::Relaxed);
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(shared: &Shared, authorization: &str) -> Result<Socket> {
    let mut request = shared.subscribe_url.as_str().into_client_request()?;
    request
        .headers_mut()
        .insert(AUTHORIZATION, HeaderValue::from_str(authorization)?);
    let config = WebSocketConfig::default()
        .read_buffer_size(shared.read_buffer)
        .write_buffer_size(0)
        .max_write_buffer_size(64 * 1024);
    let connect = tokio_tungstenite::connect_async_with_config(request, Some(config), true);
    let (socket, _) = tokio::time::timeout(Duration::from_secs(30), connect)
        .await
        .context("handshake timed out")??;
    Ok(socket)
}

// ---------------------------------------------------------------------------------------------
// Agent and host states, from a raw admin subscription to `state.change`.

/// One `state.change` of an agent or host: kind, id, state, transitioning.
type StateChange = (String, String, String, String);

struct States {
    rx: mpsc::UnboundedReceiver<std::result::Result<StateChange, String>>,
    /// Whether each agent and host (by API id) is `active` with `transitioning: no`.
    current: HashMap<String, bool>,
    /// Agents and hosts active now.
    active_agents: usize,
    active_hosts: usize,
    /// State changes of agents away from `active` since this was last reset.
    left_active: usize,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for States {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl States {
    async fn subscribe(admin: &Client, timeout: Duration) -> Result<States> {
        let mut stream = admin
            .subscribe(Subscribe::names(["state.change"]))
            .await
            .context("admin subscription to state.change")?;
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
                        let _ = tx.send(Err("closed by the server".into()));
                        return;
                    }
                    Err(error) => {
                        let _ = tx.send(Err(error.to_string()));
                        return;
                    }
                };
                if event.name() != "state.change" {
                    continue;
                }
                let (Some(kind), Some(id), Some(data)) =
                    (event.resource_type, event.resource_id, event.data)
                else {
                    continue;
                };
                if kind != "agent" && kind != "host" {
                    continue;
                }
                let field = |name: &str| data[name].as_str().unwrap_or_default().to_owned();
                if tx
                    .send(Ok((kind, id, field("state"), field("transitioning"))))
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(States {
            rx,
            current: HashMap::new(),
            active_agents: 0,
            active_hosts: 0,
            left_active: 0,
            task,
        })
    }

    /// Applies the next state change.
    async fn next(&mut self) -> Result<()> {
        match self.rx.recv().await {
            Some(Ok((kind, id, state, transitioning))) => {
                let active = state == "active" && transitioning == "no";
                let was = self.current.insert(id, active).unwrap_or(false);
                let count = if kind == "agent" {
                    &mut self.active_agents
                } else {
                    &mut self.active_hosts
                };
                match (was, active) {
                    (false, true) => *count += 1,
                    (true, false) => {
                        *count -= 1;
                        if kind == "agent" && state != "active" {
                            self.left_active += 1;
                        }
                    }
                    _ => {}
                }
                Ok(())
            }
            Some(Err(reason)) => bail!("the admin state.change subscription ended: {reason}"),
            None => bail!("the state.change reader ended"),
        }
    }
}

/// Agents and hosts `active` (transitioning `no`), by the API.
async fn count_active(admin: &Client) -> Result<(usize, usize)> {
    let active = |items: Vec<Value>| {
        items
            .iter()
            .filter(|item| item["state"] == "active" && item["transitioning"] == "no")
            .count()
    };
    Ok((
        active(list_all(admin, "agents").await?),
        active(list_all(admin, "hosts").await?),
    ))
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
        let name = format!("drover_bench_agents_{}", std::process::id());
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
            .prefix("drover-bench-agents-")
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
                println!("  perf profile of the server: {}", out.display());
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
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

/// utime + stime of a process in clock ticks.
fn cpu_ticks(who: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{who}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    Some(field(11)? + field(12)?)
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
    bench: f64,
    /// PostgreSQL's processes (not in `other`).
    postgres: f64,
    /// Everything else on the machine.
    other: f64,
    capacity: f64,
}

impl std::fmt::Display for CpuSplit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "server {:.1}% + bench {:.1}% + PostgreSQL {:.1}% + rest of machine {:.1}% of one core ({:.0}% = all cores)",
            self.server, self.bench, self.postgres, self.other, self.capacity
        )
    }
}

#[derive(Debug)]
struct CpuMeter {
    pid: String,
    start: Instant,
    server: u64,
    bench: u64,
    postgres: u64,
    machine: Option<(u64, u64)>,
}

impl CpuMeter {
    fn start(pid: u32) -> CpuMeter {
        let pid = pid.to_string();
        CpuMeter {
            server: cpu_ticks(&pid).unwrap_or(0),
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
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let machine = match (self.machine, machine_ticks()) {
            (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => {
                (busy1 - busy0) as f64 / (total1 - total0) as f64 * cores * 100.0
            }
            _ => server + bench,
        };
        CpuSplit {
            server,
            bench,
            postgres,
            other: (machine - server - bench - postgres).max(0.0),
            capacity: cores * 100.0,
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

    /// `name ×threads: CPU % of one core, context switches/s`, busiest first.
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
                    "{name} ×{threads}: {cpu:.1}% CPU, {:.0} context switches/s",
                    *switches as f64 / wall
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Waits (at most `limit`) until the rest of the machine — everything but the server, this
/// bench and PostgreSQL — uses under 15% of one core over a second; warns and goes on if it never does.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_is_base64_of_access_colon_secret() {
        // echo -n 'Aladdin:open sesame' | base64
        assert_eq!(
            basic_auth("Aladdin", "open sesame"),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        assert_eq!(basic_auth("a", "b"), "Basic YTpi");
        assert_eq!(basic_auth("ab", "c"), "Basic YWI6Yw==");
    }

    #[test]
    fn replaces_the_database_of_a_url() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432", "x").unwrap(),
            "postgres://postgres@127.0.0.1:5432/x"
        );
    }
}
