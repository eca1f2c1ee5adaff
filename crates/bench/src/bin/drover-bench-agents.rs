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
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use drover_bench::harness::{
    self, ACCESS_KEY, CpuMeter, PgDatabase, SECRET_KEY, ServerArgs, ServerChild, ThreadMeter,
    finish_perf, list_all, loadavg, print_machine, rss_kib, start_perf, wait_quiet_but_postgres,
};
use drover_client::{Client, Event, Subscribe};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

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
    #[command(flatten)]
    server: ServerArgs,
    /// Record a flat `perf record -e cpu-clock` profile of the server during the measurement.
    #[arg(long)]
    perf_record: Option<PathBuf>,
    /// Before each measurement, wait up to this many seconds for the rest of the machine to
    /// be quiet (under 15% of one core); 0 measures at once.
    #[arg(long, default_value_t = 120)]
    quiet_wait: u64,
    /// Bound on the other waits (server start, agents active), in seconds.
    #[arg(long, default_value_t = 600)]
    timeout_seconds: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let nofile = harness::init();
    println!("open-files soft limit: {nofile} (the server inherits it)");
    if (nofile as usize) < args.agents + 200 {
        eprintln!(
            "warning: {} agents need about {} open files in this process and in the server",
            args.agents,
            args.agents + 200
        );
    }
    harness::block_on(args.server.bench_threads, run(&args))
}

async fn run(args: &Args) -> Result<()> {
    let bin = args.server.drover_bin()?;
    print_machine();
    let database = match &args.database_url {
        Some(url) => Some(PgDatabase::create(url, "drover_bench_agents")?),
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
    let options = args.server.options("drover-bench-agents-");
    let server = ServerChild::start(&bin, &options, database, timeout).await?;
    println!("  server pid {} on {}", server.pid, server.addr);
    let result = bench(&server, args, backend, timeout).await;
    if result.is_err() {
        eprintln!("server log tail:\n{}", server.log_tail());
    }
    server.stop(args.server.keep_log.as_deref()).await;
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
    wait_quiet_but_postgres(server.pid, Duration::from_secs(args.quiet_wait)).await;
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
    let thread_split = threads.stop(1);
    let wall = meter.elapsed().as_secs_f64();
    let pings = shared.stats.pings_answered.load(Ordering::Relaxed) - pings0;
    let reply_errors = shared.stats.reply_errors.load(Ordering::Relaxed) - errors0;
    let keepalive = shared.stats.keepalive_pings.load(Ordering::Relaxed) - keepalive0;
    let rss_after = rss_kib(server.pid)?;
    let bench_rss_after = rss_kib(std::process::id()).unwrap_or(0);
    let load_after = loadavg();
    finish_perf(perf, args.perf_record.as_deref(), "").await;

    // Everyone still active, by the API.
    let (api_agents, api_hosts) = count_active(&admin).await?;
    let not_active_agents = agents.saturating_sub(api_agents);
    let not_active_hosts = agents.saturating_sub(api_hosts);

    let per_agent_kib = rss_after.saturating_sub(rss_before) as f64 / agents as f64;
    let bench_per_agent_kib =
        bench_rss_after.saturating_sub(bench_rss_before) as f64 / agents as f64;
    println!(
        "    server CPU {:.1}% of one core (server {:.1}% + bench {:.1}% + PostgreSQL {:.1}% + rest of machine {:.1}% of one core ({:.0}% = all cores)); server threads: {thread_split}",
        cpu.server,
        cpu.server,
        cpu.bench,
        cpu.postgres,
        cpu.rest_but_postgres(),
        cpu.capacity
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
        cpu.rest_but_postgres(),
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
}
