//! `drover-bench-soak`: store size under a steady load (issue 6).
//!
//! Starts `drover server` as a child process on a free loopback port (embedded SQLite in a
//! temporary data directory, or a fresh PostgreSQL database created for the run and dropped
//! after it) with short purge ages (`events.purge.after.seconds`,
//! `process_instance.purge.after.seconds`, `main_tables.purge.after.seconds`, 60 s by default)
//! and a short `task.table.cleanup.schedule` (15 s), registers N simulated agents (as the engine
//! bench does: each answers `compute.instance.*` and pings at once) and runs a steady workload
//! for `--duration-seconds`: every 1/`--rate` s a new container's lifecycle starts:
//!
//! 1. `POST /v1/containers` (admin, `requestedHostId` round-robin over the agents' hosts), then
//!    wait for its `state.change` to `running` (raw admin subscription);
//! 2. its agent posts the container event `start` (`POST /v1/containerevents` with the agent's
//!    own key), half its lifetime later a health report (`POST /v1/serviceevents`, `healthy`),
//!    and at the end of its lifetime (`--lifetime-seconds`, ±50%) the event `die`, which the
//!    server's event worker turns into `stopped`;
//! 3. `DELETE /v1/containers/<id>` (admin), wait for `removed`, and the agent posts `destroy`.
//!
//! So about `rate × lifetime` containers live at any time; each leaves 3 container events, 1
//! service event and 4 processes (create, start, remove, and the purge the clean-up job
//! schedules) behind, which `table.cleanup` deletes once they are old enough. Meanwhile a prober
//! sends `GET /v1/containers?limit=100` `--probe-rate` times a second.
//!
//! Every `--sample-seconds` it records: the row count of every table and the database's size,
//! read on a connection of its own (SQLite: the `.db` file opened read-only, `page_count`,
//! `freelist_count`, the `.db` and `-wal` file sizes; PostgreSQL: `pg_database_size`, the
//! tables' `pg_total_relation_size`, dead tuples), the server's `VmRSS`, the latencies of the
//! API calls made in that window, the clean-up runs and rows deleted (`/metrics`,
//! `GET /v1/cleanup`), and CPU (server, PostgreSQL, the rest of the machine). After the workload
//! it samples for `--drain-seconds` more with no new containers.
//!
//! At the end it compares, for every table and size, the largest value of the second half of
//! the workload with that of the first half: a series whose second-half maximum is more than
//! `--max-growth` times the first's (plus a small slack) is reported as growing and the bench
//! exits with status 2. Latencies are compared the same way, reported only.
//!
//! ```text
//! cargo build --release -p drover -p drover-bench
//! target/release/drover-bench-soak --duration-seconds 300
//! target/release/drover-bench-soak --duration-seconds 300 \
//!     --database-url postgres://postgres@127.0.0.1:5432/postgres
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use drover_bench::harness::{
    self, ACCESS_KEY, Agent, AgentStats, CpuMeter, CpuSplit, Latency, PgDatabase, SECRET_KEY,
    ServerArgs, ServerChild, ServerOptions, ms, print_machine, rss_kib, start_agents, wait_active,
    wait_quiet,
};
use drover_client::{Client, Subscribe};
use serde_json::json;
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "drover-bench-soak",
    about = "Store size under a steady load: containers started and removed, container events posted, short purge ages"
)]
struct Args {
    /// Seconds of steady workload.
    #[arg(long, default_value_t = 300)]
    duration_seconds: u64,
    /// Seconds of sampling after the workload (no new containers; the store should drain).
    #[arg(long, default_value_t = 120)]
    drain_seconds: u64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 10)]
    sample_seconds: u64,
    /// Simulated agents, one host each.
    #[arg(long, default_value_t = 10)]
    agents: usize,
    /// New containers per second.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Mean seconds a container runs before its agent reports it dead (each one 0.5× – 1.5×).
    #[arg(long, default_value_t = 20.0)]
    lifetime_seconds: f64,
    /// Most container lifecycles in flight; a new one is skipped (and counted) above it.
    #[arg(long, default_value_t = 2000)]
    max_in_flight: usize,
    /// `GET /v1/containers?limit=100` probes per second.
    #[arg(long, default_value_t = 10.0)]
    probe_rate: f64,
    /// `events.purge.after.seconds`.
    #[arg(long, default_value_t = 60)]
    events_age: u64,
    /// `process_instance.purge.after.seconds`.
    #[arg(long, default_value_t = 60)]
    processes_age: u64,
    /// `main_tables.purge.after.seconds`.
    #[arg(long, default_value_t = 60)]
    main_tables_age: u64,
    /// `task.table.cleanup.schedule` (seconds between clean-up runs).
    #[arg(long, default_value_t = 15)]
    cleanup_interval: u64,
    /// `cleanup.query_limit.rows` (default: the server's, 1000).
    #[arg(long)]
    cleanup_batch: Option<u64>,
    /// A table or size whose largest value in the second half of the workload is more than this
    /// many times its largest in the first half (plus 20 rows or 1 MiB) is reported as growing,
    /// and the bench exits with status 2.
    #[arg(long, default_value_t = 1.25)]
    max_growth: f64,
    /// PostgreSQL only: the bench runs `VACUUM` on its database every this many seconds, on a
    /// connection of its own, as autovacuum would (0: never). For servers where autovacuum is
    /// off: drover's table.cleanup vacuums only the tables it cleans, at its own interval.
    #[arg(long, default_value_t = 0)]
    vacuum_seconds: u64,
    /// PostgreSQL server to run on (a database `drover_bench_soak_<pid>` is created on it and
    /// dropped afterwards), e.g. postgres://postgres@127.0.0.1:5432/postgres. Default: the
    /// embedded SQLite.
    #[arg(long)]
    database_url: Option<String>,
    /// Registrations in flight at once.
    #[arg(long, default_value_t = 8)]
    register_concurrency: usize,
    #[command(flatten)]
    server: ServerArgs,
    /// Write the samples as CSV here.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Before the workload, wait up to this many seconds for the rest of the machine to be
    /// quiet (under 15% of one core); 0 starts at once.
    #[arg(long, default_value_t = 60)]
    quiet_wait: u64,
    /// Bound on the server start, the agents' activation and each wait for a container state.
    #[arg(long, default_value_t = 60)]
    timeout_seconds: u64,
}

/// Every table of the schema, in the order of the migration.
const TABLES: &[&str] = &[
    "account",
    "credential",
    "setting",
    "agent",
    "host",
    "stack",
    "service",
    "instance",
    "volume",
    "process_instance",
    "process_execution",
    "container_event",
    "service_event",
];

fn main() {
    let args = Args::parse();
    harness::init();
    match harness::block_on(args.server.bench_threads, run(&args)) {
        Ok(Verdict::Bounded) => {}
        Ok(Verdict::Growing) => std::process::exit(2),
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::exit(1);
        }
    }
}

/// What the run concluded about the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Bounded,
    Growing,
}

async fn run(args: &Args) -> Result<Verdict> {
    if args.rate <= 0.0 || args.lifetime_seconds < 0.0 || args.sample_seconds == 0 {
        bail!("--rate and --sample-seconds must be positive, --lifetime-seconds not negative");
    }
    let bin = args.server.drover_bin()?;
    print_machine();
    let database = match &args.database_url {
        Some(url) => Some(PgDatabase::create(url, "drover_bench_soak")?),
        None => None,
    };
    let backend = if database.is_some() {
        Backend::Postgres
    } else {
        Backend::Sqlite
    };
    let mut env = vec![
        setting("task.table.cleanup.schedule", args.cleanup_interval),
        setting("events.purge.after.seconds", args.events_age),
        setting("process_instance.purge.after.seconds", args.processes_age),
        setting("main_tables.purge.after.seconds", args.main_tables_age),
    ];
    if let Some(batch) = args.cleanup_batch {
        env.push(setting("cleanup.query_limit.rows", batch));
    }
    let options = ServerOptions {
        env,
        ..args.server.options("drover-bench-soak-")
    };
    let timeout = Duration::from_secs(args.timeout_seconds.max(1));
    println!(
        "drover soak: {}, {} agents, {} containers/s living {} s (±50%), {} s of load then {} s of drain, a sample every {} s",
        backend.name(),
        args.agents,
        args.rate,
        args.lifetime_seconds,
        args.duration_seconds,
        args.drain_seconds,
        args.sample_seconds
    );
    let server = ServerChild::start(&bin, &options, database, timeout).await?;
    println!("  server pid {} on {}", server.pid, server.addr);
    let result = soak(&server, args, backend, timeout).await;
    let warnings = server
        .log()
        .lines()
        .filter(|line| line.contains("WARN") || line.contains("ERROR"))
        .count();
    if warnings > 0 {
        println!(
            "  the server logged {warnings} warnings or errors; the last lines:\n{}",
            server.log_tail()
        );
    } else {
        println!("  the server logged no warning or error");
    }
    if result.is_err() {
        eprintln!("server log tail:\n{}", server.log_tail());
    }
    server.stop(args.server.keep_log.as_deref()).await;
    result
}

fn setting(name: &str, value: u64) -> (String, String) {
    let mut env = String::from("DROVER_");
    env.extend(name.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    (env, value.to_string())
}

async fn soak(
    server: &ServerChild,
    args: &Args,
    backend: Backend,
    timeout: Duration,
) -> Result<Verdict> {
    let url = server.http_url();
    let admin = Client::new(&url, ACCESS_KEY, SECRET_KEY)?;
    let cleanup = admin.get("cleanup").await.context("GET /v1/cleanup")?;
    println!("  clean-up settings: {}", cleanup["settings"]);
    let db = Db::connect(server, backend).await?;
    let autovacuum = db.autovacuum().await;
    if let Some(autovacuum) = &autovacuum {
        println!("  PostgreSQL autovacuum: {autovacuum}");
        if autovacuum != "on" && args.vacuum_seconds == 0 {
            println!(
                "  NOTE: autovacuum is off on this PostgreSQL server: drover's table.cleanup vacuums the tables it cleans at every run (--vacuum-seconds 60 has the bench vacuum the whole database as autovacuum would)"
            );
        }
    }
    if args.vacuum_seconds > 0 {
        match backend {
            Backend::Postgres => println!(
                "  the bench runs VACUUM on its database every {} s",
                args.vacuum_seconds
            ),
            Backend::Sqlite => println!("  --vacuum-seconds applies to PostgreSQL only; ignored"),
        }
    }

    let tracker = Arc::new(Tracker::default());
    let follower = Follower(tokio::spawn(follow_states(
        admin.clone(),
        tracker.clone(),
        timeout,
    )));
    tracker.wait_ready(timeout).await?;

    let registered_at = Instant::now();
    let token = admin.post("registrationtokens", &json!({})).await?["token"]
        .as_str()
        .context("the registration token has no `token`")?
        .to_owned();
    let stats = Arc::new(AgentStats::default());
    let (agents, agent_tasks) = start_agents(
        &url,
        &token,
        args.agents.max(1),
        args.register_concurrency,
        stats.clone(),
        timeout,
    )
    .await?;
    wait_active(&admin, &agents, timeout).await?;
    println!(
        "  {} agents registered, subscribed and active in {:.1} s",
        agents.len(),
        registered_at.elapsed().as_secs_f64()
    );
    let baseline = db.read().await?;
    println!(
        "  before the workload: {} rows in all ({}), {} in use",
        baseline.total_rows(),
        TABLES
            .iter()
            .zip(&baseline.rows)
            .filter(|(_, n)| **n > 0)
            .map(|(table, n)| format!("{table} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        mib(baseline.size.in_use)
    );
    wait_quiet(server.pid, Duration::from_secs(args.quiet_wait)).await;

    let ctx = Arc::new(Ctx {
        admin,
        agents,
        tracker,
        lifetime: args.lifetime_seconds,
        timeout,
        window: Mutex::default(),
        counts: Counts::default(),
        errors: Mutex::default(),
        stop_probe: AtomicBool::new(false),
    });
    let samples = workload(server, args, backend, &ctx, &db).await?;
    drop(follower);

    println!(
        "  agents answered {} requests and {} pings; {} reply errors; {} agent sockets closed",
        stats.requests.load(Ordering::Relaxed),
        stats.pings.load(Ordering::Relaxed),
        stats.reply_errors.load(Ordering::Relaxed),
        stats.closed.load(Ordering::Relaxed)
    );
    drop(agent_tasks);
    if let Some(path) = &args.csv {
        std::fs::write(path, csv(&samples, backend))
            .with_context(|| format!("writing {}", path.display()))?;
        println!("  samples written to {}", path.display());
    }
    Ok(report(args, backend, &ctx, &samples, autovacuum.as_deref()))
}

// ---------------------------------------------------------------------------------------------
// The workload.

/// What the lifecycles, the prober and the sampler share.
struct Ctx {
    admin: Client,
    agents: Vec<Agent>,
    tracker: Arc<Tracker>,
    lifetime: f64,
    timeout: Duration,
    /// API latencies of the current sample window.
    window: Mutex<Window>,
    counts: Counts,
    /// The first few errors, by what failed.
    errors: Mutex<HashMap<&'static str, (u64, String)>>,
    stop_probe: AtomicBool,
}

/// API latencies (and failures) in one sample window.
#[derive(Debug, Default, Clone)]
struct Window {
    list: Vec<Duration>,
    container_event: Vec<Duration>,
    service_event: Vec<Duration>,
    create: Vec<Duration>,
    delete: Vec<Duration>,
    /// The bench's own `VACUUM`s (PostgreSQL, `--vacuum-seconds`).
    vacuum: Vec<Duration>,
    failures: u64,
}

#[derive(Debug, Clone, Copy)]
enum Call {
    List,
    ContainerEvent,
    ServiceEvent,
    Create,
    Delete,
    Vacuum,
}

/// Totals over the run.
#[derive(Debug, Default)]
struct Counts {
    started: AtomicU64,
    skipped: AtomicU64,
    in_flight: AtomicUsize,
    completed: AtomicU64,
    failed: AtomicU64,
    not_running: AtomicU64,
    not_stopped: AtomicU64,
    not_removed: AtomicU64,
    events_posted: AtomicU64,
    events_refused: AtomicU64,
}

impl Ctx {
    fn record(&self, call: Call, took: Duration) {
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let list = match call {
            Call::List => &mut window.list,
            Call::ContainerEvent => &mut window.container_event,
            Call::ServiceEvent => &mut window.service_event,
            Call::Create => &mut window.create,
            Call::Delete => &mut window.delete,
            Call::Vacuum => &mut window.vacuum,
        };
        list.push(took);
    }

    fn failed(&self, what: &'static str, error: impl std::fmt::Display) {
        self.window
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .failures += 1;
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        let entry = errors.entry(what).or_insert_with(|| (0, error.to_string()));
        entry.0 += 1;
    }

    fn take_window(&self) -> Window {
        std::mem::take(&mut *self.window.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A number in [0, 1) from `i` (a multiplicative hash: lifetimes vary without a random crate).
fn spread(i: u64) -> f64 {
    (i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64
}

/// Runs the workload and the samplers; returns the samples.
async fn workload(
    server: &ServerChild,
    args: &Args,
    backend: Backend,
    ctx: &Arc<Ctx>,
    db: &Db,
) -> Result<Vec<Sample>> {
    let load = Duration::from_secs(args.duration_seconds);
    let total = load + Duration::from_secs(args.drain_seconds);
    let period = Duration::from_secs(args.sample_seconds);
    let t0 = Instant::now();
    let end_load = t0 + load;
    let end = t0 + total;
    // Lifecycles still in flight at the end are given this long, then aborted.
    let hard_end = end + ctx.timeout * 4;
    println!(
        "  workload started: about {:.0} containers alive at a time",
        args.rate * args.lifetime_seconds
    );

    let prober = tokio::spawn(probe(ctx.clone(), args.probe_rate));
    let vacuum = match (db, args.vacuum_seconds) {
        (Db::Postgres { pool }, seconds) if seconds > 0 => Some(Follower(tokio::spawn(
            vacuum_loop(ctx.clone(), pool.clone(), Duration::from_secs(seconds)),
        ))),
        _ => None,
    };
    let mut sampler = Sampler::new(server, backend, db, ctx.clone()).await;
    let mut samples = Vec::new();
    let mut next_sample = t0 + period;

    let mut lifecycles = JoinSet::new();
    let mut spawn = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    let mut i: u64 = 0;
    let mut header_printed = false;
    loop {
        let now = Instant::now();
        if now >= end && (lifecycles.is_empty() || now >= hard_end) {
            break;
        }
        let wake_at = if next_sample <= end {
            next_sample
        } else if now < end {
            end
        } else {
            hard_end
        };
        tokio::select! {
            _ = spawn.tick(), if now < end_load => {
                if ctx.counts.in_flight.load(Ordering::Relaxed) >= args.max_in_flight {
                    ctx.counts.skipped.fetch_add(1, Ordering::Relaxed);
                } else {
                    ctx.counts.in_flight.fetch_add(1, Ordering::Relaxed);
                    ctx.counts.started.fetch_add(1, Ordering::Relaxed);
                    lifecycles.spawn(lifecycle(ctx.clone(), i));
                    i += 1;
                }
            }
            Some(done) = lifecycles.join_next(), if !lifecycles.is_empty() => {
                ctx.counts.in_flight.fetch_sub(1, Ordering::Relaxed);
                match done {
                    Ok(true) => ctx.counts.completed.fetch_add(1, Ordering::Relaxed),
                    Ok(false) | Err(_) => ctx.counts.failed.fetch_add(1, Ordering::Relaxed),
                };
            }
            () = tokio::time::sleep_until(wake_at.into()) => {
                if next_sample > end {
                    continue;
                }
                let t = next_sample.duration_since(t0).as_secs_f64();
                let phase = if next_sample <= end_load { Phase::Load } else { Phase::Drain };
                let sample = sampler.take(t, phase).await?;
                if !header_printed {
                    println!("  {}", Sample::line_header(backend));
                    header_printed = true;
                }
                println!("  {}", sample.line(backend));
                samples.push(sample);
                next_sample += period;
            }
        }
    }
    ctx.stop_probe.store(true, Ordering::Relaxed);
    drop(vacuum);
    let _ = tokio::time::timeout(Duration::from_secs(10), prober).await;
    if !lifecycles.is_empty() {
        println!(
            "  WARNING: {} container lifecycles still in flight at the end; aborted",
            lifecycles.len()
        );
        lifecycles.abort_all();
    }
    Ok(samples)
}

/// One container's life; `true` when every step went as expected.
async fn lifecycle(ctx: Arc<Ctx>, i: u64) -> bool {
    let agent = &ctx.agents[(i % ctx.agents.len() as u64) as usize];
    let body = json!({
        "name": format!("soak-{i}"),
        "command": ["true"],
        "requestedHostId": agent.host_id,
    });
    let started = Instant::now();
    let created = ctx.admin.post("containers", &body).await;
    ctx.record(Call::Create, started.elapsed());
    let id = match created {
        Ok(created) => match created["id"].as_str() {
            Some(id) => id.to_owned(),
            None => {
                ctx.failed("POST /v1/containers", format!("no id in {created}"));
                return false;
            }
        },
        Err(error) => {
            ctx.failed("POST /v1/containers", error);
            return false;
        }
    };
    ctx.tracker.track(&id);
    let ok = live(&ctx, agent, &id, i).await;
    ctx.tracker.forget(&id);
    ok
}

/// Running → events → die → remove → destroy. Goes on to the removal whatever happens, so
/// that every container ends removed (and so purgeable).
async fn live(ctx: &Ctx, agent: &Agent, id: &str, i: u64) -> bool {
    let mut ok = true;
    if !ctx.tracker.wait(id, "running", ctx.timeout).await {
        ctx.counts.not_running.fetch_add(1, Ordering::Relaxed);
        ctx.failed(
            "running in time",
            format!("{id} not running within the timeout"),
        );
        ok = false;
    }
    ok &= post_container_event(ctx, agent, id, "start").await;
    let lifetime = Duration::from_secs_f64(ctx.lifetime * (0.5 + spread(i)));
    tokio::time::sleep(lifetime / 2).await;
    ok &= post_service_event(ctx, agent, id).await;
    tokio::time::sleep(lifetime / 2).await;
    ok &= post_container_event(ctx, agent, id, "die").await;
    if !ctx.tracker.wait(id, "stopped", ctx.timeout).await {
        ctx.counts.not_stopped.fetch_add(1, Ordering::Relaxed);
        ctx.failed(
            "stopped after `die`",
            format!("{id} not stopped within the timeout after its `die` event"),
        );
        ok = false;
    }
    // The container is gone from the agent's host: its pings no longer report it.
    agent
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(id);
    let started = Instant::now();
    let deleted = ctx.admin.delete(&format!("containers/{id}")).await;
    ctx.record(Call::Delete, started.elapsed());
    if let Err(error) = deleted {
        ctx.failed("DELETE /v1/containers/<id>", error);
        return false;
    }
    if !ctx.tracker.wait(id, "removed", ctx.timeout).await {
        ctx.counts.not_removed.fetch_add(1, Ordering::Relaxed);
        ctx.failed(
            "removed in time",
            format!("{id} not removed within the timeout"),
        );
        ok = false;
    }
    ok &= post_container_event(ctx, agent, id, "destroy").await;
    ok
}

fn epoch_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Whether an API error is the per-host cap on pending events (409 TooManyContainerEvents).
fn is_refusal(error: &drover_client::Error) -> bool {
    matches!(error, drover_client::Error::Api { status: 409, .. })
}

async fn post_container_event(ctx: &Ctx, agent: &Agent, id: &str, status: &str) -> bool {
    let body = json!({
        "externalId": id,
        "externalStatus": status,
        "hostId": agent.host_id,
        "externalTimestamp": epoch_seconds(),
    });
    let started = Instant::now();
    let result = agent.client.post("containerevents", &body).await;
    ctx.record(Call::ContainerEvent, started.elapsed());
    match result {
        Ok(_) => {
            ctx.counts.events_posted.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(error) => {
            if is_refusal(&error) {
                ctx.counts.events_refused.fetch_add(1, Ordering::Relaxed);
            }
            ctx.failed("POST /v1/containerevents", error);
            false
        }
    }
}

async fn post_service_event(ctx: &Ctx, agent: &Agent, id: &str) -> bool {
    let body = json!({
        "instanceId": id,
        "reportedHealth": "healthy",
        "hostId": agent.host_id,
        "externalTimestamp": epoch_seconds(),
    });
    let started = Instant::now();
    let result = agent.client.post("serviceevents", &body).await;
    ctx.record(Call::ServiceEvent, started.elapsed());
    match result {
        Ok(_) => {
            ctx.counts.events_posted.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(error) => {
            if is_refusal(&error) {
                ctx.counts.events_refused.fetch_add(1, Ordering::Relaxed);
            }
            ctx.failed("POST /v1/serviceevents", error);
            false
        }
    }
}

/// `GET /v1/containers?limit=100` at `rate` per second (one at a time) until told to stop.
async fn probe(ctx: Arc<Ctx>, rate: f64) {
    if rate <= 0.0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !ctx.stop_probe.load(Ordering::Relaxed) {
        tick.tick().await;
        let started = Instant::now();
        match ctx.admin.get("containers?limit=100").await {
            Ok(_) => ctx.record(Call::List, started.elapsed()),
            Err(error) => ctx.failed("GET /v1/containers", error),
        }
    }
}

/// `VACUUM` of the bench's PostgreSQL database every `every`, as autovacuum would.
async fn vacuum_loop(ctx: Arc<Ctx>, pool: sqlx::PgPool, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let started = Instant::now();
        match sqlx::raw_sql("VACUUM").execute(&pool).await {
            Ok(_) => ctx.record(Call::Vacuum, started.elapsed()),
            Err(error) => ctx.failed("VACUUM (the bench's)", error),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Container states, from a raw admin `state.change` subscription.

/// The settled states each container was seen in, and who waits for which.
#[derive(Debug, Default)]
struct Tracker {
    inner: Mutex<TrackerInner>,
    ready: tokio::sync::Notify,
    is_ready: AtomicBool,
    reconnects: AtomicU64,
}

#[derive(Debug, Default)]
struct TrackerInner {
    containers: HashMap<String, Seen>,
    /// Why the subscription gave up, if it did.
    closed: Option<String>,
}

#[derive(Debug)]
struct Seen {
    states: Vec<String>,
    /// A lifecycle follows it (else it is an event that came before the create call's answer,
    /// or after the lifecycle ended, and is pruned after a while).
    tracked: bool,
    since: Instant,
    waiters: Vec<(String, oneshot::Sender<()>)>,
}

impl Seen {
    fn new() -> Seen {
        Seen {
            states: Vec::new(),
            tracked: false,
            since: Instant::now(),
            waiters: Vec::new(),
        }
    }
}

/// Untracked entries older than this are dropped.
const UNTRACKED_KEEP: Duration = Duration::from_secs(120);

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, TrackerInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn on_state(&self, id: String, state: &str) {
        let mut inner = self.lock();
        let seen = inner.containers.entry(id).or_insert_with(Seen::new);
        if !seen.states.iter().any(|s| s == state) {
            seen.states.push(state.to_owned());
        }
        let waiters = std::mem::take(&mut seen.waiters);
        for (wanted, tx) in waiters {
            if wanted == state {
                let _ = tx.send(());
            } else {
                seen.waiters.push((wanted, tx));
            }
        }
    }

    fn track(&self, id: &str) {
        self.lock()
            .containers
            .entry(id.to_owned())
            .or_insert_with(Seen::new)
            .tracked = true;
    }

    fn forget(&self, id: &str) {
        let mut inner = self.lock();
        inner.containers.remove(id);
        inner
            .containers
            .retain(|_, seen| seen.tracked || seen.since.elapsed() < UNTRACKED_KEEP);
    }

    /// Waits (bounded) until `id` was seen in `state`; whether it was.
    async fn wait(&self, id: &str, state: &str, timeout: Duration) -> bool {
        let rx = {
            let mut inner = self.lock();
            if inner.closed.is_some() {
                return false;
            }
            let seen = inner
                .containers
                .entry(id.to_owned())
                .or_insert_with(Seen::new);
            if seen.states.iter().any(|s| s == state) {
                return true;
            }
            let (tx, rx) = oneshot::channel();
            seen.waiters.push((state.to_owned(), tx));
            rx
        };
        matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(())))
    }

    async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.ready.notified();
            if self.is_ready.load(Ordering::Relaxed) {
                return Ok(());
            }
            if let Some(reason) = &self.lock().closed {
                bail!("the state.change subscription failed: {reason}");
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                bail!("the state.change subscription got no first ping in time");
            }
        }
    }

    fn len(&self) -> usize {
        self.lock().containers.len()
    }
}

/// A background task, aborted when dropped.
struct Follower(tokio::task::JoinHandle<()>);

impl Drop for Follower {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Follows `state.change` (raw, as admin) into the tracker, resubscribing (at most 20 times)
/// when the subscription ends.
async fn follow_states(admin: Client, tracker: Arc<Tracker>, timeout: Duration) {
    let mut failures = 0;
    loop {
        let error = match admin.subscribe(Subscribe::names(["state.change"])).await {
            Ok(mut stream) => loop {
                match tokio::time::timeout(timeout, stream.next_event()).await {
                    Ok(Ok(Some(event))) => {
                        if !tracker.is_ready.swap(true, Ordering::Relaxed) {
                            tracker.ready.notify_waiters();
                        }
                        if event.name() != "state.change"
                            || event.resource_type.as_deref() != Some("container")
                        {
                            continue;
                        }
                        let Some(data) = event.data.as_ref() else {
                            continue;
                        };
                        if data["transitioning"] == "no"
                            && let (Some(state), Some(id)) =
                                (data["state"].as_str(), event.resource_id.clone())
                        {
                            tracker.on_state(id, state);
                        }
                    }
                    Ok(Ok(None)) => break "closed by the server".to_owned(),
                    Ok(Err(error)) => break error.to_string(),
                    // The server pings every 5 s.
                    Err(_) => break "no frame (not even a ping) within the timeout".to_owned(),
                }
            },
            Err(error) => error.to_string(),
        };
        failures += 1;
        tracker.reconnects.fetch_add(1, Ordering::Relaxed);
        eprintln!("  warning: the state.change subscription ended ({error}); resubscribing");
        if failures >= 20 {
            tracker.lock().closed = Some(error);
            tracker.ready.notify_waiters();
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The database, read on a connection of the bench's own.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        }
    }
}

enum Db {
    Sqlite {
        pool: sqlx::SqlitePool,
        path: PathBuf,
    },
    Postgres {
        pool: sqlx::PgPool,
    },
}

/// The database's size, in bytes.
#[derive(Debug, Clone, Copy, Default)]
struct DbSize {
    /// SQLite: (page_count − freelist_count) × page_size; PostgreSQL: the tables with their
    /// indexes and TOAST (`pg_total_relation_size`).
    in_use: i64,
    /// SQLite: the `.db` file; PostgreSQL: `pg_database_size` (catalogs included).
    file: i64,
    /// SQLite: the `-wal` file.
    wal: i64,
    /// SQLite: free pages in the file.
    free_pages: i64,
    /// PostgreSQL: dead tuples (`pg_stat_user_tables`, updated with a delay).
    dead_tuples: i64,
    /// PostgreSQL: autovacuum runs so far on the tables.
    autovacuums: i64,
}

/// One reading of the database.
#[derive(Debug, Clone, Default)]
struct DbReading {
    /// Rows per table, in the order of [`TABLES`].
    rows: Vec<i64>,
    /// Instances neither removed nor purged.
    live_instances: i64,
    /// Processes not ended.
    open_processes: i64,
    size: DbSize,
}

impl DbReading {
    fn table(&self, table: &str) -> i64 {
        TABLES
            .iter()
            .position(|t| *t == table)
            .and_then(|i| self.rows.get(i).copied())
            .unwrap_or(0)
    }

    fn total_rows(&self) -> i64 {
        self.rows.iter().sum()
    }
}

fn counts_sql() -> String {
    let mut sql = String::from("SELECT ");
    for table in TABLES {
        let _ = write!(sql, "(SELECT COUNT(*) FROM {table}), ");
    }
    sql.push_str(
        "(SELECT COUNT(*) FROM instance WHERE state NOT IN ('removed', 'purging', 'purged')), \
         (SELECT COUNT(*) FROM process_instance WHERE end_time IS NULL)",
    );
    sql
}

impl Db {
    async fn connect(server: &ServerChild, backend: Backend) -> Result<Db> {
        match backend {
            Backend::Sqlite => {
                let path = server.data_dir().join("drover.db");
                let options = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(&path)
                    .read_only(true);
                let pool = sqlx::sqlite::SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(options)
                    .await
                    .with_context(|| format!("opening {} read-only", path.display()))?;
                Ok(Db::Sqlite { pool, path })
            }
            Backend::Postgres => {
                let url = &server
                    .database
                    .as_ref()
                    .context("a PostgreSQL run without a database")?
                    .url;
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(2)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect(url)
                    .await
                    .context("connecting to the bench database")?;
                Ok(Db::Postgres { pool })
            }
        }
    }

    /// PostgreSQL's `autovacuum` setting.
    async fn autovacuum(&self) -> Option<String> {
        match self {
            Db::Sqlite { .. } => None,
            Db::Postgres { pool } => sqlx::query_scalar("SELECT current_setting('autovacuum')")
                .fetch_one(pool)
                .await
                .ok(),
        }
    }

    async fn read(&self) -> Result<DbReading> {
        let sql = counts_sql();
        let columns = TABLES.len() + 2;
        let values: Vec<i64> = match self {
            Db::Sqlite { pool, .. } => {
                let row = sqlx::query(AssertSqlSafe(sql)).fetch_one(pool).await?;
                (0..columns)
                    .map(|i| row.try_get::<i64, _>(i))
                    .collect::<Result<_, _>>()?
            }
            Db::Postgres { pool } => {
                let row = sqlx::query(AssertSqlSafe(sql)).fetch_one(pool).await?;
                (0..columns)
                    .map(|i| row.try_get::<i64, _>(i))
                    .collect::<Result<_, _>>()?
            }
        };
        let size = match self {
            Db::Sqlite { pool, path } => {
                let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
                    .fetch_one(pool)
                    .await?;
                let free: i64 = sqlx::query_scalar("PRAGMA freelist_count")
                    .fetch_one(pool)
                    .await?;
                let page: i64 = sqlx::query_scalar("PRAGMA page_size")
                    .fetch_one(pool)
                    .await?;
                let file_len = |suffix: &str| {
                    let mut name = path.as_os_str().to_owned();
                    name.push(suffix);
                    std::fs::metadata(PathBuf::from(name)).map_or(0, |m| m.len() as i64)
                };
                DbSize {
                    in_use: (pages - free) * page,
                    file: file_len(""),
                    wal: file_len("-wal"),
                    free_pages: free,
                    ..DbSize::default()
                }
            }
            Db::Postgres { pool } => {
                let row = sqlx::query(
                    "SELECT pg_database_size(current_database())::BIGINT, \
                     (SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0)::BIGINT FROM pg_class c \
                      JOIN pg_namespace n ON n.oid = c.relnamespace \
                      WHERE n.nspname = current_schema() AND c.relkind = 'r'), \
                     (SELECT COALESCE(SUM(n_dead_tup), 0)::BIGINT FROM pg_stat_user_tables), \
                     (SELECT COALESCE(SUM(autovacuum_count), 0)::BIGINT FROM pg_stat_user_tables)",
                )
                .fetch_one(pool)
                .await?;
                DbSize {
                    file: row.try_get(0)?,
                    in_use: row.try_get(1)?,
                    dead_tuples: row.try_get(2)?,
                    autovacuums: row.try_get(3)?,
                    ..DbSize::default()
                }
            }
        };
        Ok(DbReading {
            rows: values[..TABLES.len()].to_vec(),
            live_instances: values[TABLES.len()],
            open_processes: values[TABLES.len() + 1],
            size,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Samples.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Load,
    Drain,
}

/// What the clean-up job reported.
#[derive(Debug, Clone, Default)]
struct CleanupReading {
    /// Runs so far (`drover_cleanup_runs_total`).
    runs: f64,
    /// Rows deleted so far, all tables (`drover_cleanup_deleted_rows_total`).
    deleted: f64,
    /// The last run: how long it took (ms), purges it left unfinished, its error.
    last_millis: i64,
    last_unfinished: i64,
    /// Old rows the last run kept because other rows reference them.
    last_kept: i64,
    last_error: Option<String>,
}

#[derive(Debug, Clone)]
struct Sample {
    t: f64,
    phase: Phase,
    in_flight: usize,
    started: u64,
    db: DbReading,
    rss_kib: u64,
    cpu: CpuSplit,
    window: Window,
    cleanup: CleanupReading,
    /// Runs and rows deleted in this window.
    cleanup_runs: f64,
    cleanup_deleted: f64,
    tracked: usize,
}

impl Sample {
    fn line_header(backend: Backend) -> String {
        format!(
            "{:>5} {:>5} | {:>6} {:>6} {:>7} {:>7} {:>6} {:>5} | {:>7} | {} | {:>6} | {:>15} {:>15} | {:>12} | {:>11}",
            "t s",
            "live",
            "c_evt",
            "s_evt",
            "proc",
            "p_exec",
            "inst",
            "host",
            "rows",
            match backend {
                Backend::Sqlite => "in use / file / WAL MiB ",
                Backend::Postgres => "tables / database MiB, dead",
            },
            "RSS",
            "list p50/p99 ms",
            "event p50/p99",
            "cleanup r/del",
            "CPU srv/pg/oth"
        )
    }

    fn line(&self, backend: Backend) -> String {
        let size = match backend {
            Backend::Sqlite => format!(
                "{:>7.2} / {:>6.2} / {:>5.2}",
                mib_f(self.db.size.in_use),
                mib_f(self.db.size.file),
                mib_f(self.db.size.wal)
            ),
            Backend::Postgres => format!(
                "{:>6.2} / {:>6.2}, {:>7}",
                mib_f(self.db.size.in_use),
                mib_f(self.db.size.file),
                self.db.size.dead_tuples
            ),
        };
        let list = Latency::of(self.window.list.clone());
        let event = Latency::of(self.window.container_event.clone());
        format!(
            "{:>5.0} {:>5} | {:>6} {:>6} {:>7} {:>7} {:>6} {:>5} | {:>7} | {} | {:>6.1} | {:>7.2} {:>7.2} | {:>7.2} {:>7.2} | {:>3.0} {:>8.0} | {:>4.0}% {:>3.0}% {:>3.0}%{}",
            self.t,
            self.in_flight,
            self.db.table("container_event"),
            self.db.table("service_event"),
            self.db.table("process_instance"),
            self.db.table("process_execution"),
            self.db.table("instance"),
            self.db.table("host"),
            self.db.total_rows(),
            size,
            self.rss_kib as f64 / 1024.0,
            millis(list.p50),
            millis(list.p99),
            millis(event.p50),
            millis(event.p99),
            self.cleanup_runs,
            self.cleanup_deleted,
            self.cpu.server,
            self.cpu.postgres,
            (self.cpu.other - self.cpu.postgres).max(0.0),
            if self.phase == Phase::Drain {
                " (drain)"
            } else {
                ""
            }
        )
    }
}

struct Sampler<'a> {
    server: &'a ServerChild,
    backend: Backend,
    db: &'a Db,
    ctx: Arc<Ctx>,
    cpu: CpuMeter,
    cleanup: CleanupReading,
}

impl<'a> Sampler<'a> {
    async fn new(server: &'a ServerChild, backend: Backend, db: &'a Db, ctx: Arc<Ctx>) -> Self {
        let cleanup = read_cleanup(server, &ctx.admin).await;
        Sampler {
            server,
            backend,
            db,
            cpu: CpuMeter::start(server.pid),
            cleanup,
            ctx,
        }
    }

    async fn take(&mut self, t: f64, phase: Phase) -> Result<Sample> {
        let cpu = self.cpu.stop();
        self.cpu = CpuMeter::start(self.server.pid);
        let window = self.ctx.take_window();
        let db = self
            .db
            .read()
            .await
            .with_context(|| format!("reading the {} database", self.backend.name()))?;
        let cleanup = read_cleanup(self.server, &self.ctx.admin).await;
        let sample = Sample {
            t,
            phase,
            in_flight: self.ctx.counts.in_flight.load(Ordering::Relaxed),
            started: self.ctx.counts.started.load(Ordering::Relaxed),
            db,
            rss_kib: rss_kib(self.server.pid).unwrap_or(0),
            cpu,
            window,
            cleanup_runs: cleanup.runs - self.cleanup.runs,
            cleanup_deleted: cleanup.deleted - self.cleanup.deleted,
            cleanup: cleanup.clone(),
            tracked: self.ctx.tracker.len(),
        };
        self.cleanup = cleanup;
        Ok(sample)
    }
}

/// The clean-up counters on `/metrics` and the last run of `GET /v1/cleanup`.
async fn read_cleanup(server: &ServerChild, admin: &Client) -> CleanupReading {
    let mut reading = CleanupReading::default();
    if let Ok(response) = reqwest::get(format!("{}/metrics", server.http_url())).await
        && let Ok(text) = response.text().await
    {
        reading.runs = metric_sum(&text, "drover_cleanup_runs_total");
        reading.deleted = metric_sum(&text, "drover_cleanup_deleted_rows_total");
    }
    if let Ok(status) = admin.get("cleanup").await {
        let last = &status["lastRun"];
        reading.last_millis =
            last["ended"].as_i64().unwrap_or(0) - last["started"].as_i64().unwrap_or(0);
        reading.last_unfinished = last["purgesUnfinished"].as_i64().unwrap_or(0);
        reading.last_kept = last["kept"].as_i64().unwrap_or(0);
        reading.last_error = last["error"].as_str().map(str::to_owned);
    }
    reading
}

/// The sum of a metric's series (every label set) in Prometheus text.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let value = if rest.starts_with('{') {
                rest.rsplit_once(' ')?.1
            } else {
                rest.strip_prefix(' ')?
            };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

fn mib_f(bytes: i64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn mib(bytes: i64) -> String {
    format!("{:.2} MiB", mib_f(bytes))
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------------
// The report.

/// One series compared between the halves of the workload.
struct Series {
    name: String,
    /// Slack added to the allowed growth (rows or bytes).
    slack: f64,
    unit: Unit,
    /// Judged (a growing one fails the run), or only reported.
    judged: bool,
    value: Box<dyn Fn(&Sample) -> f64>,
}

#[derive(Clone, Copy)]
enum Unit {
    Rows,
    Bytes,
    KiB,
}

impl Unit {
    fn show(self, value: f64) -> String {
        match self {
            Unit::Rows => format!("{value:.0}"),
            Unit::Bytes => format!("{:.2} MiB", value / (1024.0 * 1024.0)),
            Unit::KiB => format!("{:.1} MiB", value / 1024.0),
        }
    }
}

fn series(backend: Backend) -> Vec<Series> {
    let mut out: Vec<Series> = TABLES
        .iter()
        .map(|table| Series {
            name: (*table).to_owned(),
            slack: 20.0,
            unit: Unit::Rows,
            judged: true,
            value: Box::new(move |s: &Sample| s.db.table(table) as f64),
        })
        .collect();
    out.push(Series {
        name: "all rows".into(),
        slack: 20.0,
        unit: Unit::Rows,
        judged: true,
        value: Box::new(|s| s.db.total_rows() as f64),
    });
    let (in_use, file) = match backend {
        Backend::Sqlite => ("pages in use × page size", "drover.db file (without -wal)"),
        Backend::Postgres => (
            "tables + indexes (pg_total_relation_size)",
            "pg_database_size",
        ),
    };
    out.push(Series {
        name: in_use.into(),
        slack: 1024.0 * 1024.0,
        unit: Unit::Bytes,
        judged: true,
        value: Box::new(|s| s.db.size.in_use as f64),
    });
    out.push(Series {
        name: file.into(),
        slack: 1024.0 * 1024.0,
        unit: Unit::Bytes,
        judged: true,
        value: Box::new(|s| s.db.size.file as f64),
    });
    if backend == Backend::Sqlite {
        out.push(Series {
            name: "drover.db-wal file".into(),
            slack: 1024.0 * 1024.0,
            unit: Unit::Bytes,
            judged: false,
            value: Box::new(|s| s.db.size.wal as f64),
        });
    } else {
        out.push(Series {
            name: "dead tuples (pg_stat_user_tables)".into(),
            slack: 1000.0,
            unit: Unit::Rows,
            judged: false,
            value: Box::new(|s| s.db.size.dead_tuples as f64),
        });
    }
    out.push(Series {
        name: "server VmRSS".into(),
        slack: 4096.0,
        unit: Unit::KiB,
        judged: false,
        value: Box::new(|s| s.rss_kib as f64),
    });
    out
}

/// Least-squares slope of `(t, v)` in units per minute.
fn slope_per_minute(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mean_t = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_v = points.iter().map(|p| p.1).sum::<f64>() / n;
    let cov: f64 = points.iter().map(|p| (p.0 - mean_t) * (p.1 - mean_v)).sum();
    let var: f64 = points.iter().map(|p| (p.0 - mean_t).powi(2)).sum();
    if var == 0.0 { 0.0 } else { cov / var * 60.0 }
}

fn report(
    args: &Args,
    backend: Backend,
    ctx: &Ctx,
    samples: &[Sample],
    autovacuum: Option<&str>,
) -> Verdict {
    let half = args.duration_seconds as f64 / 2.0;
    let load: Vec<&Sample> = samples.iter().filter(|s| s.phase == Phase::Load).collect();
    let first: Vec<&Sample> = load.iter().copied().filter(|s| s.t <= half).collect();
    let second: Vec<&Sample> = load.iter().copied().filter(|s| s.t > half).collect();
    let drain: Vec<&Sample> = samples.iter().filter(|s| s.phase == Phase::Drain).collect();

    println!();
    println!("## Samples ({})", backend.name());
    println!();
    print_table(backend, samples);

    let counts = &ctx.counts;
    let started = counts.started.load(Ordering::Relaxed);
    println!();
    println!("## Workload");
    println!();
    println!(
        "- containers started {started} ({:.2}/s over {} s), completed {}, with a failed step {}, skipped at the in-flight cap {}",
        started as f64 / args.duration_seconds.max(1) as f64,
        args.duration_seconds,
        counts.completed.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed),
        counts.skipped.load(Ordering::Relaxed)
    );
    println!(
        "- not running / not stopped after `die` / not removed within {} s: {} / {} / {}",
        ctx.timeout.as_secs(),
        counts.not_running.load(Ordering::Relaxed),
        counts.not_stopped.load(Ordering::Relaxed),
        counts.not_removed.load(Ordering::Relaxed)
    );
    println!(
        "- events posted {} (container and service), refused with 409 {}; state.change resubscriptions {}",
        counts.events_posted.load(Ordering::Relaxed),
        counts.events_refused.load(Ordering::Relaxed),
        ctx.tracker.reconnects.load(Ordering::Relaxed)
    );
    for (what, (count, first)) in ctx.errors.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        println!("- {count} × {what} failed; the first: {first}");
    }
    let runs: f64 = samples.iter().map(|s| s.cleanup_runs).sum();
    let deleted: f64 = samples.iter().map(|s| s.cleanup_deleted).sum();
    let longest = samples
        .iter()
        .map(|s| s.cleanup.last_millis)
        .max()
        .unwrap_or(0);
    let unfinished = samples
        .iter()
        .map(|s| s.cleanup.last_unfinished)
        .max()
        .unwrap_or(0);
    let kept = samples
        .iter()
        .map(|s| s.cleanup.last_kept)
        .max()
        .unwrap_or(0);
    println!(
        "- table.cleanup: {runs:.0} runs in the samples, {deleted:.0} rows deleted, the longest run seen {longest} ms, purges left unfinished at most {unfinished}, old rows kept as still referenced at most {kept}"
    );
    if let Some(autovacuum) = autovacuum {
        let vacuums = Latency::of(
            samples
                .iter()
                .flat_map(|s| s.window.vacuum.iter().copied())
                .collect(),
        );
        println!(
            "- PostgreSQL autovacuum {autovacuum}; the bench's own VACUUM of the database: {}",
            if vacuums.count == 0 {
                "none".to_owned()
            } else {
                format!(
                    "{} runs (every {} s), p50 {} max {}",
                    vacuums.count,
                    args.vacuum_seconds,
                    ms(vacuums.p50),
                    ms(vacuums.max)
                )
            }
        );
    }
    if let Some(error) = samples.iter().find_map(|s| s.cleanup.last_error.clone()) {
        println!("- WARNING: a clean-up run stopped early: {error}");
    }
    let cpu = |list: &[&Sample], f: fn(&CpuSplit) -> f64| {
        let values: Vec<f64> = list.iter().map(|s| f(&s.cpu)).collect();
        let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
        let max = values.iter().copied().fold(0.0, f64::max);
        (mean, max)
    };
    let (server_mean, server_max) = cpu(&load, |c| c.server);
    let (pg_mean, _) = cpu(&load, |c| c.postgres);
    let (other_mean, other_max) = cpu(&load, |c| (c.other - c.postgres).max(0.0));
    println!(
        "- CPU under load (% of one core, 200% = the machine): server {server_mean:.0}% mean ({server_max:.0}% max), PostgreSQL {pg_mean:.0}%, other processes {other_mean:.0}% mean ({other_max:.0}% max)"
    );
    if other_max > 15.0 {
        println!(
            "- NOTE: other processes used up to {other_max:.0}% of a core in some windows: the latencies of those windows are disturbed"
        );
    }

    if first.is_empty() || second.is_empty() {
        println!();
        println!(
            "Too few samples to compare the halves of the workload (run longer than 2 × --sample-seconds)."
        );
        return Verdict::Bounded;
    }
    let warmup = args.lifetime_seconds * 1.5
        + args
            .events_age
            .max(args.processes_age)
            .max(args.main_tables_age) as f64
        + args.cleanup_interval as f64;
    if half < warmup {
        println!();
        println!(
            "WARNING: the first half ({half:.0} s) is shorter than the time the store takes to fill up (about {warmup:.0} s: lifetime, purge ages, clean-up interval): the comparison below says little; run longer"
        );
    }

    println!();
    println!(
        "## Bounded? (largest value in the first half of the load, t ≤ {half:.0} s, vs the second half; growing if second > {} × first + slack)",
        args.max_growth
    );
    println!();
    println!(
        "| series | first half max | second half max | trend in the second half (per min) | end of load | end of drain | verdict |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|");
    let mut verdict = Verdict::Bounded;
    for series in series(backend) {
        let max = |list: &[&Sample]| {
            list.iter()
                .map(|s| (series.value)(s))
                .fold(f64::MIN, f64::max)
        };
        let (a, b) = (max(&first), max(&second));
        let trend = slope_per_minute(
            &second
                .iter()
                .map(|s| (s.t, (series.value)(s)))
                .collect::<Vec<_>>(),
        );
        let growing = b > a * args.max_growth + series.slack;
        let label = match (growing, series.judged) {
            (false, _) => "bounded",
            (true, true) => "GROWING",
            (true, false) => "grew (reported only)",
        };
        if growing && series.judged {
            verdict = Verdict::Growing;
        }
        let end_load = load.last().map_or(0.0, |s| (series.value)(s));
        let end_drain = drain
            .last()
            .map_or_else(|| "–".to_owned(), |s| series.unit.show((series.value)(s)));
        let trend = match series.unit {
            Unit::Rows => format!("{trend:+.0}"),
            Unit::Bytes => format!("{:+.3} MiB", trend / (1024.0 * 1024.0)),
            Unit::KiB => format!("{:+.2} MiB", trend / 1024.0),
        };
        println!(
            "| {} | {} | {} | {trend} | {} | {end_drain} | {label} |",
            series.name,
            series.unit.show(a),
            series.unit.show(b),
            series.unit.show(end_load)
        );
    }

    println!();
    println!("## API latency (first half vs second half of the load)");
    println!();
    println!(
        "| call | first half p50 / p99 / max (n) | second half p50 / p99 / max (n) | drain p50 / p99 (n) | p99 flat? |"
    );
    println!("|---|---:|---:|---:|---|");
    let calls: [(&str, Pick); 5] = [
        ("GET /v1/containers?limit=100", |w| &w.list),
        ("POST /v1/containerevents (agent)", |w| &w.container_event),
        ("POST /v1/serviceevents (agent)", |w| &w.service_event),
        ("POST /v1/containers", |w| &w.create),
        ("DELETE /v1/containers/<id>", |w| &w.delete),
    ];
    for (name, pick) in calls {
        let of = |list: &[&Sample]| {
            Latency::of(
                list.iter()
                    .flat_map(|s| pick(&s.window).iter().copied())
                    .collect(),
            )
        };
        let (a, b, d) = (of(&first), of(&second), of(&drain));
        let flat = if b.p99 <= a.p99 * 2 + Duration::from_millis(2) {
            "yes"
        } else {
            "NO (second-half p99 more than twice the first's + 2 ms)"
        };
        println!(
            "| {name} | {} | {} | {} | {flat} |",
            three(&a),
            three(&b),
            two(&d)
        );
    }
    println!();
    match verdict {
        Verdict::Bounded => println!(
            "VERDICT: every table and the database size stayed bounded (second-half max ≤ {} × first-half max + slack)",
            args.max_growth
        ),
        Verdict::Growing => {
            println!("VERDICT: something grew without bound (see GROWING above); exit status 2")
        }
    }
    verdict
}

/// `p50 / p99 / max (n)`, or `–` without samples.
fn three(latency: &Latency) -> String {
    if latency.count == 0 {
        return "–".into();
    }
    format!(
        "{} / {} / {} ({})",
        ms(latency.p50),
        ms(latency.p99),
        ms(latency.max),
        latency.count
    )
}

/// `p50 / p99 (n)`, or `–` without samples.
fn two(latency: &Latency) -> String {
    if latency.count == 0 {
        return "–".into();
    }
    format!(
        "{} / {} ({})",
        ms(latency.p50),
        ms(latency.p99),
        latency.count
    )
}

/// `p50 / p99` in ms with two decimals, or `–` without samples.
fn p50_p99(latency: &Latency) -> String {
    if latency.count == 0 {
        return "–".into();
    }
    format!("{:.2} / {:.2}", millis(latency.p50), millis(latency.p99))
}

/// Which latencies of a window.
type Pick = fn(&Window) -> &Vec<Duration>;

fn print_table(backend: Backend, samples: &[Sample]) {
    let size_head = match backend {
        Backend::Sqlite => "DB in use / .db file / -wal (MiB)",
        Backend::Postgres => "tables / pg_database_size (MiB), dead tuples",
    };
    println!(
        "| t (s) | live containers | container_event | service_event | process_instance (open) | process_execution | instance (live) | host | all rows | {size_head} | server RSS (MiB) | GET /v1/containers p50 / p99 (ms) | POST /v1/containerevents p50 / p99 (ms) | clean-up runs / rows deleted | CPU server / PostgreSQL / other (%) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in samples {
        let size = match backend {
            Backend::Sqlite => format!(
                "{:.2} / {:.2} / {:.2}",
                mib_f(s.db.size.in_use),
                mib_f(s.db.size.file),
                mib_f(s.db.size.wal)
            ),
            Backend::Postgres => format!(
                "{:.2} / {:.2}, {}",
                mib_f(s.db.size.in_use),
                mib_f(s.db.size.file),
                s.db.size.dead_tuples
            ),
        };
        let list = Latency::of(s.window.list.clone());
        let event = Latency::of(s.window.container_event.clone());
        println!(
            "| {:.0}{} | {} | {} | {} | {} ({}) | {} | {} ({}) | {} | {} | {size} | {:.1} | {} | {} | {:.0} / {:.0} | {:.0} / {:.0} / {:.0} |",
            s.t,
            if s.phase == Phase::Drain {
                " drain"
            } else {
                ""
            },
            s.in_flight,
            s.db.table("container_event"),
            s.db.table("service_event"),
            s.db.table("process_instance"),
            s.db.open_processes,
            s.db.table("process_execution"),
            s.db.table("instance"),
            s.db.live_instances,
            s.db.table("host"),
            s.db.total_rows(),
            s.rss_kib as f64 / 1024.0,
            p50_p99(&list),
            p50_p99(&event),
            s.cleanup_runs,
            s.cleanup_deleted,
            s.cpu.server,
            s.cpu.postgres,
            (s.cpu.other - s.cpu.postgres).max(0.0),
        );
    }
}

fn csv(samples: &[Sample], backend: Backend) -> String {
    let mut out = String::from("t,phase,in_flight,started");
    for table in TABLES {
        let _ = write!(out, ",{table}");
    }
    out.push_str(
        ",live_instances,open_processes,all_rows,in_use_bytes,file_bytes,wal_bytes,free_pages,dead_tuples,autovacuums,rss_kib,\
         list_p50_ms,list_p99_ms,list_n,container_event_p50_ms,container_event_p99_ms,container_event_n,\
         service_event_p50_ms,service_event_p99_ms,create_p50_ms,create_p99_ms,delete_p50_ms,delete_p99_ms,failures,\
         cleanup_runs,cleanup_deleted,cleanup_last_ms,vacuum_n,vacuum_max_ms,server_cpu,postgres_cpu,other_cpu,bench_cpu,tracked,backend\n",
    );
    for s in samples {
        let _ = write!(
            out,
            "{:.0},{},{},{}",
            s.t,
            if s.phase == Phase::Load {
                "load"
            } else {
                "drain"
            },
            s.in_flight,
            s.started
        );
        for n in &s.db.rows {
            let _ = write!(out, ",{n}");
        }
        let l = |list: &Vec<Duration>| Latency::of(list.clone());
        let (list, event, service, create, delete, vacuum) = (
            l(&s.window.list),
            l(&s.window.container_event),
            l(&s.window.service_event),
            l(&s.window.create),
            l(&s.window.delete),
            l(&s.window.vacuum),
        );
        let _ = writeln!(
            out,
            ",{},{},{},{},{},{},{},{},{},{},{:.3},{:.3},{},{:.3},{:.3},{},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{},{:.0},{:.0},{},{},{:.3},{:.1},{:.1},{:.1},{:.1},{},{}",
            s.db.live_instances,
            s.db.open_processes,
            s.db.total_rows(),
            s.db.size.in_use,
            s.db.size.file,
            s.db.size.wal,
            s.db.size.free_pages,
            s.db.size.dead_tuples,
            s.db.size.autovacuums,
            s.rss_kib,
            millis(list.p50),
            millis(list.p99),
            list.count,
            millis(event.p50),
            millis(event.p99),
            event.count,
            millis(service.p50),
            millis(service.p99),
            millis(create.p50),
            millis(create.p99),
            millis(delete.p50),
            millis(delete.p99),
            s.window.failures,
            s.cleanup_runs,
            s.cleanup_deleted,
            s.cleanup.last_millis,
            vacuum.count,
            millis(vacuum.max),
            s.cpu.server,
            s.cpu.postgres,
            (s.cpu.other - s.cpu.postgres).max(0.0),
            s.cpu.bench,
            s.tracked,
            backend.name()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_a_metric_over_its_labels() {
        let text = "# HELP drover_cleanup_deleted_rows_total x\n\
                    drover_cleanup_deleted_rows_total{table=\"container_event\"} 5\n\
                    drover_cleanup_deleted_rows_total{table=\"instance\"} 7\n\
                    drover_cleanup_runs_total 3\n\
                    drover_cleanup_runs_total_other 9\n";
        assert_eq!(metric_sum(text, "drover_cleanup_deleted_rows_total"), 12.0);
        assert_eq!(metric_sum(text, "drover_cleanup_runs_total"), 3.0);
    }

    #[test]
    fn setting_names_become_environment_names() {
        assert_eq!(
            setting("events.purge.after.seconds", 60),
            ("DROVER_EVENTS_PURGE_AFTER_SECONDS".into(), "60".into())
        );
    }

    #[test]
    fn spread_stays_in_the_unit_interval() {
        for i in 0..10_000 {
            let x = spread(i);
            assert!((0.0..1.0).contains(&x));
        }
        let mean = (0..10_000).map(spread).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.05, "{mean}");
    }

    #[test]
    fn slope() {
        let points: Vec<(f64, f64)> = (0..10).map(|i| (i as f64 * 10.0, i as f64)).collect();
        assert!((slope_per_minute(&points) - 6.0).abs() < 1e-9);
    }

    #[tokio::test]
    async fn tracker_answers_waits_before_and_after_the_event() {
        let tracker = Tracker::default();
        tracker.on_state("1i1".into(), "running");
        assert!(
            tracker
                .wait("1i1", "running", Duration::from_millis(10))
                .await
        );
        assert!(
            !tracker
                .wait("1i1", "stopped", Duration::from_millis(10))
                .await
        );
        let tracker = Arc::new(tracker);
        let waiting = {
            let tracker = tracker.clone();
            tokio::spawn(
                async move { tracker.wait("1i1", "stopped", Duration::from_secs(5)).await },
            )
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        tracker.on_state("1i1".into(), "stopped");
        assert!(waiting.await.unwrap());
        tracker.forget("1i1");
        assert_eq!(tracker.len(), 0);
    }
}
