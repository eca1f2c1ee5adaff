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
//! **Peer** (on PostgreSQL, unless `--no-peer`): after drover's phases and with its server
//! stopped, the same run puts `--peer-jobs` no-op jobs through graphile-worker on the same
//! PostgreSQL, each time in a fresh database `graphile_bench_<pid>` created and dropped by the
//! bench: once batched with its documented settings (`localQueue.size` 500,
//! `completeJobBatchDelay` 0, `failJobBatchDelay` 0) and once unbatched (its defaults), one
//! worker with 24 concurrent jobs and a pool of 25 each time. The Node side is the committed
//! package `crates/bench/peers/graphile-worker/` (`bench.js`; `package-lock.json` pins
//! graphile-worker); the bench runs `npm ci` there when `node_modules` is missing, then
//! `node bench.js <url> <jobs> <batched|unbatched>` (killed after `--timeout-seconds`), which
//! enqueues the jobs with `addJobs` and times the worker from its start until the jobs table
//! is empty. The summary gives graphile-worker's batched and unbatched jobs/s, drover's
//! processes/s of the throughput phase (2 × container starts/s) and their ratio, drover
//! processes/s ÷ graphile-worker batched jobs/s. It needs `node` and `npm` on the `PATH`.
//!
//! **Cluster** (`--nodes N`, N > 1, or `--cluster` with 1; needs `--database-url`): N
//! `drover server` nodes on the fresh database and the bench's own nats-server with JetStream.
//! The agents are spread over the nodes (agent j registers and subscribes on node j mod N), the
//! API callers too (caller k calls node k mod N), the `state.change` watch is on the first
//! node (so it also sees the other nodes' changes through NATS), and the server's CPU is the
//! nodes' and nats-server's together.
//!
//! ```text
//! cargo build --release -p drover -p drover-bench
//! target/release/drover-bench-engine --agents 1 --containers 2000 --concurrency 32
//! target/release/drover-bench-engine --agents 1 --containers 2000 --concurrency 32 \
//!     --database-url postgres://postgres@127.0.0.1:5432/postgres
//! target/release/drover-bench-engine --agents 3 --containers 2000 --concurrency 32 --nodes 3 \
//!     --database-url postgres://postgres@127.0.0.1:5432/postgres --no-peer
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use drover_bench::cluster::{NatsServer, NodeConfig, Nodes, wait_alive};
use drover_bench::harness::{
    self, ACCESS_KEY, AgentStats, CpuMeter, CpuSplit, Latency, PgDatabase, PgStats, SECRET_KEY,
    ServerArgs, ServerChild, ServerOptions, ThreadMeter, finish_perf, loadavg, metric, ms,
    print_machine, rss_kib, start_agents_from, start_perf, wait_active, wait_quiet_all,
};
use drover_bench::peer::{self, Mode, PeerResult};
use drover_client::{Client, Subscribe};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

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
    #[command(flatten)]
    server: ServerArgs,
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
    /// With `--database-url`: skip the graphile-worker peer.
    #[arg(long)]
    no_peer: bool,
    /// No-op jobs of each graphile-worker run (batched, then unbatched).
    #[arg(long, default_value_t = 20_000)]
    peer_jobs: usize,
    /// The graphile-worker peer's Node package (default: `peers/graphile-worker` in this
    /// crate's source directory).
    #[arg(long)]
    peer_dir: Option<PathBuf>,
    /// Nodes (needs `--database-url`): more than 1 starts a cluster on the database and the
    /// bench's own nats-server with JetStream; the API callers and the agents are spread over
    /// the nodes round-robin, the bench watches `state.change` on the first node, and the
    /// server's CPU is the nodes' and nats-server's together.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Cluster mode even with `--nodes 1` (PostgreSQL and NATS).
    #[arg(long)]
    cluster: bool,
    /// The nats-server binary of a cluster.
    #[arg(long, default_value = "/usr/sbin/nats-server")]
    nats_bin: PathBuf,
}

/// The server under test: one `drover server`, or the nodes of a cluster.
struct Target<'a> {
    /// Each node's `http://127.0.0.1:<port>`.
    urls: Vec<String>,
    /// The processes whose CPU is the server's (the nodes, and a cluster's nats-server).
    pids: Vec<u32>,
    /// The PostgreSQL database, if on one.
    database: Option<&'a PgDatabase>,
}

impl Target<'_> {
    fn of(server: &ServerChild) -> Target<'_> {
        Target {
            urls: vec![server.http_url()],
            pids: vec![server.pid],
            database: server.database.as_ref(),
        }
    }

    /// A metric summed over the nodes.
    async fn metric(&self, name: &str) -> Option<f64> {
        let mut sum = None;
        for url in &self.urls {
            if let Some(value) = metric(url, name).await {
                *sum.get_or_insert(0.0) += value;
            }
        }
        sum
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let nofile = harness::init();
    println!("open-files soft limit: {nofile}");
    harness::block_on(args.server.bench_threads, run(&args))
}

async fn run(args: &Args) -> Result<()> {
    let bin = args.server.drover_bin()?;
    print_machine();
    let database = match &args.database_url {
        Some(url) => Some(PgDatabase::create(url, "drover_bench")?),
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
    let processes_per_second = if args.nodes > 1 || args.cluster {
        let database = database.context("--nodes and --cluster need --database-url")?;
        run_cluster(&bin, args, database, timeout).await?
    } else {
        let options = ServerOptions {
            queue: args.server_queue,
            ..args.server.options("drover-bench-engine-")
        };
        let server = ServerChild::start(&bin, &options, database, timeout).await?;
        println!("  server pid {} on {}", server.pid, server.addr);
        let result = bench(&Target::of(&server), args, backend, timeout).await;
        if result.is_err() {
            eprintln!("server log tail:\n{}", server.log_tail());
        }
        server.stop(args.server.keep_log.as_deref()).await;
        result?
    };
    if let Some(url) = &args.database_url
        && !args.no_peer
        && args.peer_jobs > 0
    {
        let peers = run_peer(url, args, timeout).await?;
        print_peer_summary(&peers, processes_per_second);
    }
    Ok(())
}

/// The phases against `--nodes` nodes on `database` and the bench's own nats-server.
async fn run_cluster(
    bin: &std::path::Path,
    args: &Args,
    database: PgDatabase,
    timeout: Duration,
) -> Result<Option<f64>> {
    let nats = NatsServer::start(&args.nats_bin).await?;
    let root = tempfile::Builder::new()
        .prefix("drover-bench-engine-cluster-")
        .tempdir()?;
    let mut env = Vec::new();
    if let Some(queue) = args.server_queue {
        env.push((
            "DROVER_SUBSCRIBE_MAX_QUEUED_MESSAGES".to_owned(),
            queue.to_string(),
        ));
    }
    let config = NodeConfig {
        bin: bin.to_owned(),
        root: root.path().to_owned(),
        database_url: Some(database.url.clone()),
        nats_url: Some(nats.url()),
        env,
        log: args.server.server_log.clone(),
        threads: args.server.server_threads,
    };
    let mut nodes = Nodes::new(config, args.nodes)?;
    let result = async {
        nodes.start_all().await?;
        let names: Vec<String> = nodes.slots.iter().map(|s| s.name.clone()).collect();
        wait_alive(&nodes.url(0), &names, timeout).await?;
        println!(
            "  cluster: {} nodes (pids {:?}), nats-server pid {:?} on {}",
            nodes.len(),
            nodes.pids(),
            nats.pid,
            nats.url()
        );
        let mut pids = nodes.pids();
        pids.extend(nats.pid);
        let target = Target {
            urls: nodes.urls(),
            pids,
            database: Some(&database),
        };
        let backend = format!("PostgreSQL, {} nodes", nodes.len());
        bench(&target, args, &backend, timeout).await
    }
    .await;
    if result.is_err() {
        for i in 0..nodes.len() {
            eprintln!(
                "{} log tail:\n{}",
                nodes.slots[i].name,
                nodes.log_tail(i, 15)
            );
        }
    }
    if let Some(keep) = &args.server.keep_log {
        for i in 0..nodes.len() {
            let mut path = keep.clone().into_os_string();
            path.push(format!(".{}", nodes.slots[i].name));
            let _ = std::fs::copy(nodes.log_path(i), path);
        }
    }
    nodes.kill_all().await;
    drop(nats);
    drop(database);
    result
}

/// graphile-worker batched, then unbatched, on the PostgreSQL server of `url`.
async fn run_peer(url: &str, args: &Args, timeout: Duration) -> Result<Vec<PeerResult>> {
    println!();
    println!(
        "graphile-worker peer on the same PostgreSQL: {} no-op jobs, batched then unbatched",
        args.peer_jobs
    );
    let dir = args.peer_dir.clone().unwrap_or_else(peer::default_dir);
    peer::install(&dir, timeout).await?;
    let mut peers = Vec::new();
    for mode in [Mode::Batched, Mode::Unbatched] {
        peers.push(
            peer::run(
                &dir,
                url,
                args.peer_jobs,
                mode,
                Duration::from_secs(args.quiet_wait),
                timeout,
            )
            .await
            .with_context(|| format!("graphile-worker {} (--no-peer skips it)", mode.name()))?,
        );
    }
    Ok(peers)
}

fn print_peer_summary(peers: &[PeerResult], processes_per_second: Option<f64>) {
    println!();
    println!(
        "| peer on PostgreSQL | mode | jobs | jobs/s | Node CPU per job | PostgreSQL CPU per job | rest of machine | load avg (1 min) at start |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for peer in peers {
        println!(
            "| graphile-worker {} (Node {}) | {} | {} | {:.0} | {:.3} ms | {:.3} ms | {:.0}% | {} |",
            peer.version,
            peer.node,
            peer.mode,
            peer.jobs,
            peer.jobs_per_second,
            peer.node_cpu_ms_per_job(),
            peer.postgres_cpu_ms_per_job(),
            peer.cpu.rest_but_postgres(),
            peer.load_before,
        );
    }
    let batched = peers.iter().find(|peer| peer.mode == "batched");
    let unbatched = peers.iter().find(|peer| peer.mode == "unbatched");
    let jobs = |peer: Option<&PeerResult>| {
        peer.map_or_else(
            || "?".to_owned(),
            |peer| format!("{:.0}", peer.jobs_per_second),
        )
    };
    println!();
    println!(
        "graphile-worker jobs/s: batched {}, unbatched {}; drover processes/s (throughput phase): {}",
        jobs(batched),
        jobs(unbatched),
        processes_per_second.map_or_else(
            || "? (no throughput phase)".to_owned(),
            |p| format!("{p:.0}")
        )
    );
    if let (Some(processes), Some(batched)) = (processes_per_second, batched) {
        println!(
            "ratio drover processes/s ÷ graphile-worker batched jobs/s: {:.3} (target ≥ 0.2)",
            processes / batched.jobs_per_second.max(1e-9)
        );
    }
}

/// Runs the phases and prints their table; the throughput phase's processes/s.
async fn bench(
    target: &Target<'_>,
    args: &Args,
    backend: &str,
    timeout: Duration,
) -> Result<Option<f64>> {
    let url = target.urls[0].clone();
    let admin = Client::new(&url, ACCESS_KEY, SECRET_KEY)?;
    let admins = target
        .urls
        .iter()
        .map(|url| Client::new(url, ACCESS_KEY, SECRET_KEY))
        .collect::<Result<Vec<_>, _>>()?;
    let mut seen = Seen::subscribe(&admin, timeout).await?;

    let registered_at = Instant::now();
    let token = admin.post("registrationtokens", &json!({})).await?["token"]
        .as_str()
        .context("the registration token has no `token`")?
        .to_owned();
    let stats = Arc::new(AgentStats::default());
    // The agents spread over the nodes: agent j on node j mod N.
    let mut agents = Vec::new();
    let mut agent_tasks = harness::AgentTasks(Vec::new());
    let n = target.urls.len();
    for (i, node_url) in target.urls.iter().enumerate() {
        let count = args.agents / n + usize::from(i < args.agents % n);
        if count == 0 {
            continue;
        }
        let (mut some, mut tasks) = start_agents_from(
            node_url,
            &token,
            agents.len(),
            count,
            args.register_concurrency,
            stats.clone(),
            timeout,
        )
        .await?;
        agents.append(&mut some);
        agent_tasks.0.append(&mut tasks.0);
    }
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
        wait_quiet_all(&target.pids, Duration::from_secs(args.quiet_wait)).await;
        let perf = start_perf(args.perf_record.as_deref(), target.pids[0]);
        let stat = args
            .perf_stat
            .then(|| PerfStat::start(target.pids[0]))
            .flatten();
        let pg_before = target.database.and_then(PgDatabase::stats);
        let phase = throughput(
            target,
            &admins,
            &mut seen,
            args.containers,
            args.concurrency.max(1),
            hosts.clone(),
            timeout,
        )
        .await;
        finish_perf(
            perf,
            args.perf_record.as_deref(),
            " during the throughput phase",
        )
        .await;
        if let Some(stat) = stat {
            stat.stop(args.containers).await;
        }
        pg_report(target, pg_before, args.containers).await;
        rows.push(phase?);
    }
    if args.idle_containers > 0 {
        // Let the throughput phase's coalesced resource.change publishing and the agents'
        // replies drain, so the idle phase starts idle.
        tokio::time::sleep(Duration::from_secs(2)).await;
        wait_quiet_all(&target.pids, Duration::from_secs(args.quiet_wait)).await;
        let stat = args
            .perf_stat
            .then(|| PerfStat::start(target.pids[0]))
            .flatten();
        let pg_before = target.database.and_then(PgDatabase::stats);
        let phase = idle(
            target,
            &admins,
            &mut seen,
            args.idle_containers,
            hosts,
            timeout,
        )
        .await;
        if let Some(stat) = stat {
            stat.stop(args.idle_containers).await;
        }
        pg_report(target, pg_before, args.idle_containers).await;
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
        target
            .pids
            .iter()
            .map(|pid| rss_kib(*pid).unwrap_or(0))
            .sum::<u64>()
            / 1024,
        target
            .metric("drover_slow_consumer_disconnects_total")
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
    Ok(rows
        .iter()
        .find(|row| row.phase == "throughput")
        .map(|row| row.starts_per_second() * 2.0))
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
    target: &Target<'_>,
    admins: &[Client],
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
    let meter = CpuMeter::start_all(&target.pids);
    let threads = ThreadMeter::start(target.pids[0]);
    let writer_before = writer_counts(target).await;
    let t0 = Instant::now();
    let mut tasks = JoinSet::new();
    for caller in 0..callers {
        let admin = admins[caller % admins.len()].clone();
        let (next, tx, hosts) = (next.clone(), tx.clone(), hosts.clone());
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
    let threads = threads.stop(0);
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
    println!(
        "    server threads{}: {threads}",
        if target.urls.len() > 1 {
            " (first node)"
        } else {
            ""
        }
    );
    let writer_after = writer_counts(target).await;
    let batches = writer_after.0 - writer_before.0;
    let jobs = writer_after.1 - writer_before.1;
    if batches > 0.0 {
        println!(
            "    store writer: {batches} transactions for {jobs} writes ({:.1} writes per transaction, {:.2} transactions per container start)",
            jobs / batches,
            batches / containers as f64
        );
    }
    Ok(row)
}

/// The store writers' (transactions, writes) so far, summed over the nodes.
async fn writer_counts(target: &Target<'_>) -> (f64, f64) {
    (
        target
            .metric("drover_store_writer_batches_total")
            .await
            .unwrap_or(0.0),
        target
            .metric("drover_store_writer_jobs_total")
            .await
            .unwrap_or(0.0),
    )
}

async fn idle(
    target: &Target<'_>,
    admins: &[Client],
    seen: &mut Seen,
    containers: usize,
    hosts: Option<Arc<Vec<String>>>,
    timeout: Duration,
) -> Result<PhaseRow> {
    println!("  idle latency: {containers} containers, one at a time …");
    let load_before = loadavg();
    let meter = CpuMeter::start_all(&target.pids);
    let threads = ThreadMeter::start(target.pids[0]);
    let t0 = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut latencies = Vec::with_capacity(containers);
    let mut api = Vec::with_capacity(containers);
    for i in 0..containers {
        let body = container_body("idle", i, hosts.as_deref().map(Vec::as_slice));
        let (id, started, answered) =
            match tokio::time::timeout_at(deadline, create(&admins[i % admins.len()], &body)).await
            {
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
    println!("    server threads: {}", threads.stop(0));
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

/// Prints PostgreSQL's commits and WAL syncs per container start over a phase (after waiting
/// for the server's idle connections to flush their statistics).
async fn pg_report(target: &Target<'_>, before: Option<PgStats>, containers: usize) {
    let (Some(database), Some(before)) = (target.database, before) else {
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

// ---------------------------------------------------------------------------------------------
// perf stat.

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
