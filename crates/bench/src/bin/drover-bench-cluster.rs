//! `drover-bench-cluster`: cluster mode (issue 14) — how long a node's work takes to run
//! elsewhere after the node is killed.
//!
//! `failover`, per run: a fresh PostgreSQL database (`drover_failover_<pid>`, dropped after the
//! run) and the bench's own nats-server with JetStream (a free port, a temporary store
//! directory); N `drover server` nodes `n1`…`nN` on both (`DROVER_NODE_NAME`,
//! `DROVER_NATS_URL`), started one after the other and awaited in `/v1/clusternodes` (all
//! alive, one leader). A simulated agent on the client library's event router, given every
//! node's URL (`n2` first by default, `--agent-node`), holds its replies to
//! `compute.instance.*` requests (pings are answered) and subscribes on the next node when its
//! connection is lost (with `--agent-node 1` it loses its node with the kill). Then M
//! containers are created through `n1` (`--concurrency` callers) and the bench waits until the
//! agent has received the start request of every one of them: the `instance.start` processes
//! are claimed by the nodes' engines and wait for the agent. The process rows say which node
//! holds each (`process_instance.running_process_server_id`, the node id of
//! `/v1/clusternodes`); `n1`'s are "its in-flight processes". Then **kill -9 of `n1`**, and at
//! the same moment (or `--release-after-ms` later) the agent sends every held reply (to the
//! node it is subscribed on, or to the next one when that was `n1`). The bench polls the
//! database every `--poll-ms` until every one of `n1`'s in-flight processes has ended
//! (`end_time` set) and every container is `running`.
//!
//! **Failover time** = kill → the last of `n1`'s in-flight processes ended. Also reported: kill
//! → `n1` listed `dead` by `n2`, kill → the agent subscribed again (when it lost its node),
//! kill → the first of them ended, kill → all containers running, the nodes that took them
//! over (seen in `running_process_server_id` while they ran), executions per process, and the
//! requests the agent received per container (more than one: the new owner sent the request
//! again).
//!
//! ```text
//! cargo build --release -p drover -p drover-bench
//! target/release/drover-bench-cluster failover --runs 5 --nodes 3 --containers 30
//! target/release/drover-bench-cluster failover --runs 5 --nodes 3 --containers 30 --agent-node 1
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use drover_bench::cluster::{
    self, NatsServer, NodeConfig, Nodes, cluster_nodes, node_id, wait_alive,
};
use drover_bench::harness::{
    self, ACCESS_KEY, AgentStats, Latency, PgDatabase, SECRET_KEY, metric, ms, print_machine,
    wait_active,
};
use drover_client::Client;
use serde_json::json;
use sqlx::Row;
use tokio::task::JoinSet;

#[derive(Debug, Parser)]
#[command(
    name = "drover-bench-cluster",
    about = "Cluster mode (issue 14): failover time after kill -9 of a node"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Kill -9 of a node holding in-flight processes: time until they ended elsewhere.
    Failover(FailoverArgs),
}

#[derive(Debug, Clone, clap::Args)]
struct FailoverArgs {
    /// Runs (each on a fresh database, nats-server and nodes).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Nodes (at least 2: `n1` is killed, the agent is on `n2`).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Containers created through `n1` and in flight when it is killed.
    #[arg(long, default_value_t = 30)]
    containers: usize,
    /// Concurrent create calls.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Send the held replies this long after the kill (0: at once).
    #[arg(long, default_value_t = 0)]
    release_after_ms: u64,
    /// The node the agent subscribes on first (1-based). It is given every node's URL, that
    /// one first, and moves to the next when its connection is lost: with 1, the agent loses
    /// its node with the kill and must subscribe again elsewhere before the new owners' requests
    /// reach it.
    #[arg(long, default_value_t = 2)]
    agent_node: usize,
    /// Database poll interval while waiting, in ms.
    #[arg(long, default_value_t = 20)]
    poll_ms: u64,
    /// Bound on each wait (nodes up, agent active, the takeover), in seconds.
    #[arg(long, default_value_t = 60)]
    timeout_seconds: u64,
    /// A server setting for every node, `NAME=VALUE` (as `DROVER_<NAME>`); repeatable.
    /// Default: the servers' own (`cluster.node.ttl.millis` 3000, `cluster.heartbeat.millis`
    /// 1000, `process.lease.millis` 5000).
    #[arg(long = "setting", value_parser = cluster::parse_setting)]
    settings: Vec<(String, String)>,
    /// The PostgreSQL server (a database `drover_failover_<pid>` is created on it per run and
    /// dropped after it).
    #[arg(
        long,
        env = "DROVER_TEST_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// The nats-server binary (the bench starts its own, with JetStream).
    #[arg(long, default_value = "/usr/sbin/nats-server")]
    nats_bin: PathBuf,
    /// The drover binary (default: `drover` beside this binary, else target/release/drover).
    #[arg(long)]
    drover_bin: Option<PathBuf>,
    /// DROVER_LOG for the nodes.
    #[arg(long, default_value = "warn")]
    server_log: String,
    /// Copy every node's log of each run into this directory (`run<k>-n<i>.log`).
    #[arg(long)]
    keep_logs: Option<PathBuf>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let nofile = harness::init();
    println!("open-files soft limit: {nofile}");
    harness::block_on(None, async move {
        match cli.command {
            Command::Failover(args) => failover(&args).await,
        }
    })
}

/// What one failover run measured.
#[derive(Debug, Default)]
struct RunResult {
    /// In-flight processes per node name at the kill.
    held: BTreeMap<String, usize>,
    /// `processes` of `/v1/clusternodes` per node name just before the kill.
    listed: BTreeMap<String, i64>,
    /// Kill → `n1` listed dead.
    dead: Option<Duration>,
    /// Kill → the first of `n1`'s processes ended.
    first: Option<Duration>,
    /// Kill → the last of `n1`'s processes ended: the failover time.
    all: Option<Duration>,
    /// Kill → every container running.
    running: Option<Duration>,
    /// Kill → the agent subscribed again (when it lost its node).
    resubscribed: Option<Duration>,
    /// Nodes seen holding `n1`'s processes after the kill: processes per node (a process
    /// that ended between two polls is not seen).
    new_owners: BTreeMap<String, usize>,
    /// Executions per process of `n1`'s (process_execution rows), as `count → processes`.
    executions: BTreeMap<i64, usize>,
    /// Exit reasons of `n1`'s processes.
    exit_reasons: BTreeMap<String, usize>,
    /// Containers whose start request the agent received more than once.
    resent: usize,
    /// `drover_cluster_takeovers_total` summed over the live nodes after the run.
    takeovers: f64,
}

async fn failover(args: &FailoverArgs) -> Result<()> {
    if args.nodes < 2 {
        bail!("--nodes must be at least 2");
    }
    if args.agent_node == 0 || args.agent_node > args.nodes {
        bail!("--agent-node must be between 1 and --nodes");
    }
    print_machine();
    let bin = harness::drover_bin(args.drover_bin.as_deref())?;
    println!(
        "failover: {} runs, {} nodes, agent on n{} first, {} containers through n1 ({} callers), replies released {} ms after the kill, settings {:?}, drover {}",
        args.runs,
        args.nodes,
        args.agent_node,
        args.containers,
        args.concurrency,
        args.release_after_ms,
        args.settings,
        bin.display()
    );
    let mut results = Vec::new();
    for run in 1..=args.runs {
        println!("run {run}/{}", args.runs);
        let result = failover_run(args, &bin, run).await?;
        print_run(&result);
        results.push(result);
    }
    println!();
    println!(
        "| run | n1 processes in flight (others) | n1 dead after | agent subscribed again | first ended | **all of n1's ended** | all containers running | new owners | executions per process | requests resent | takeovers |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---|---|---:|---:|");
    for (k, result) in results.iter().enumerate() {
        let others: Vec<String> = result
            .held
            .iter()
            .filter(|(name, _)| name.as_str() != "n1")
            .map(|(name, count)| format!("{name} {count}"))
            .collect();
        println!(
            "| {} | {} ({}) | {} | {} | {} | **{}** | {} | {:?} | {:?} | {} | {} |",
            k + 1,
            result.held.get("n1").copied().unwrap_or(0),
            others.join(", "),
            opt_ms(result.dead),
            opt_ms(result.resubscribed),
            opt_ms(result.first),
            opt_ms(result.all),
            opt_ms(result.running),
            result.new_owners,
            result.executions,
            result.resent,
            result.takeovers
        );
    }
    let measured: Vec<Duration> = results.iter().filter_map(|r| r.all).collect();
    let dead: Vec<Duration> = results.iter().filter_map(|r| r.dead).collect();
    let running: Vec<Duration> = results.iter().filter_map(|r| r.running).collect();
    println!();
    println!(
        "failover time (kill -9 → all of n1's in-flight processes ended elsewhere) over {} runs with a measurement: {}",
        measured.len(),
        Latency::of(measured.clone())
    );
    println!("kill -9 → n1 listed dead: {}", Latency::of(dead));
    println!("kill -9 → all containers running: {}", Latency::of(running));
    let unmeasured = results.len() - measured.len();
    if unmeasured > 0 {
        println!(
            "WARNING: {unmeasured} runs without a measurement (n1 held nothing, or the wait ran out)"
        );
    }
    Ok(())
}

fn opt_ms(duration: Option<Duration>) -> String {
    duration.map_or_else(|| "–".to_owned(), ms)
}

fn print_run(result: &RunResult) {
    println!(
        "  in flight at the kill: {:?} (listed by /v1/clusternodes: {:?}); n1 dead after {}, agent subscribed again after {}, first ended {}, all ended {}, all running {}; new owners {:?}; executions {:?}; exit reasons {:?}; resent {}; takeovers {}",
        result.held,
        result.listed,
        opt_ms(result.dead),
        opt_ms(result.resubscribed),
        opt_ms(result.first),
        opt_ms(result.all),
        opt_ms(result.running),
        result.new_owners,
        result.executions,
        result.exit_reasons,
        result.resent,
        result.takeovers
    );
}

/// `1i42` → 42.
fn numeric_id(id: &str) -> Option<i64> {
    id.trim_start_matches(|c: char| c.is_ascii_digit())
        .get(1..)?
        .parse()
        .ok()
}

async fn failover_run(args: &FailoverArgs, bin: &std::path::Path, run: usize) -> Result<RunResult> {
    let timeout = Duration::from_secs(args.timeout_seconds.max(1));
    let database = PgDatabase::create(&args.database_url, "drover_failover")?;
    let nats = NatsServer::start(&args.nats_bin).await?;
    let root = tempfile::Builder::new()
        .prefix("drover-failover-")
        .tempdir()?;
    let config = NodeConfig {
        bin: bin.to_owned(),
        root: root.path().to_owned(),
        database_url: Some(database.url.clone()),
        nats_url: Some(nats.url()),
        env: args
            .settings
            .iter()
            .map(|(name, value)| cluster::setting_env(name, value))
            .collect(),
        log: args.server_log.clone(),
        threads: None,
    };
    let mut nodes = Nodes::new(config, args.nodes)?;
    let result = async {
        nodes.start_all().await?;
        let names: Vec<String> = nodes.slots.iter().map(|s| s.name.clone()).collect();
        let items = wait_alive(&nodes.url(1), &names, timeout).await?;
        let ids: HashMap<String, String> = names
            .iter()
            .filter_map(|name| Some((node_id(&items, name)?, name.clone())))
            .collect();
        let a_id = node_id(&items, "n1").context("n1 has no id in /v1/clusternodes")?;
        println!(
            "  {} nodes alive on nats {} and database {}: {:?}",
            names.len(),
            nats.url(),
            database.name,
            ids
        );
        measure(args, &nodes, &database, &ids, &a_id, timeout).await
    }
    .await;
    // Keep the logs (also of a failed run).
    if let Some(dir) = &args.keep_logs {
        std::fs::create_dir_all(dir)?;
        for i in 0..nodes.len() {
            let _ = std::fs::copy(
                nodes.log_path(i),
                dir.join(format!("run{run}-{}.log", nodes.slots[i].name)),
            );
        }
    }
    if result.is_err() {
        for i in 0..nodes.len() {
            eprintln!(
                "{} log tail:\n{}",
                nodes.slots[i].name,
                nodes.log_tail(i, 15)
            );
        }
    }
    nodes.kill_all().await;
    drop(nats);
    drop(database);
    result
}

async fn measure(
    args: &FailoverArgs,
    nodes: &Nodes,
    database: &PgDatabase,
    ids: &HashMap<String, String>,
    a_id: &str,
    timeout: Duration,
) -> Result<RunResult> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&database.url)
        .await
        .context("connect to the run's database")?;
    let b_url = nodes.url(1);
    let admin_b = Client::new(&b_url, ACCESS_KEY, SECRET_KEY)?;
    let admin_a = Client::new(&nodes.url(0), ACCESS_KEY, SECRET_KEY)?;
    let token = admin_b.post("registrationtokens", &json!({})).await?["token"]
        .as_str()
        .context("the registration token has no `token`")?
        .to_owned();
    // The agent's URL list: its first node, then the others in order.
    let first = args.agent_node - 1;
    let agent_urls: Vec<String> = (0..nodes.len())
        .map(|k| nodes.url((first + k) % nodes.len()))
        .collect();
    let stats = Arc::new(AgentStats::default());
    let agent = RouterAgent::start(&agent_urls, &token, stats.clone()).await?;
    wait_active(&admin_b, std::slice::from_ref(&agent.agent), timeout).await?;
    stats.hold.count.store(true, Ordering::Relaxed);
    stats.hold.hold();

    // M containers through n1, their start requests held by the agent.
    let mut creating = JoinSet::new();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..args.concurrency.max(1) {
        let (admin, next) = (admin_a.clone(), next.clone());
        let m = args.containers;
        creating.spawn(async move {
            let mut ids = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= m {
                    return anyhow::Ok(ids);
                }
                let created = admin
                    .post(
                        "containers",
                        &json!({"name": format!("failover-{i}"), "command": ["true"]}),
                    )
                    .await?;
                ids.push(
                    created["id"]
                        .as_str()
                        .context("a created container has an id")?
                        .to_owned(),
                );
            }
        });
    }
    let mut containers = Vec::new();
    while let Some(joined) = creating.join_next().await {
        containers.extend(joined??);
    }
    let wanted: HashSet<&str> = containers.iter().map(String::as_str).collect();
    let deadline = Instant::now() + timeout;
    loop {
        let received = stats
            .hold
            .received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .filter(|id| wanted.contains(id.as_str()))
            .count();
        if received == wanted.len() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the agent received the start requests of only {received} of {} containers",
                wanted.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let instance_ids: Vec<i64> = containers.iter().filter_map(|id| numeric_id(id)).collect();

    // Who holds what.
    let rows = sqlx::query(
        "SELECT id, running_process_server_id FROM process_instance WHERE end_time IS NULL",
    )
    .fetch_all(&pool)
    .await?;
    let mut result = RunResult::default();
    let mut a_processes = Vec::new();
    for row in &rows {
        let id: i64 = row.try_get(0)?;
        let owner: Option<String> = row.try_get(1)?;
        let name = owner.as_deref().map_or_else(
            || "none".to_owned(),
            |o| ids.get(o).cloned().unwrap_or(o.to_owned()),
        );
        *result.held.entry(name).or_default() += 1;
        if owner.as_deref() == Some(a_id) {
            a_processes.push(id);
        }
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    for item in cluster_nodes(&http, &b_url).await.unwrap_or_default() {
        if let Some(name) = item["name"].as_str() {
            result
                .listed
                .insert(name.to_owned(), item["processes"].as_i64().unwrap_or(-1));
        }
    }

    // kill -9 of n1; the held replies go out.
    let subscriptions = *agent.connections.borrow();
    let killed = Instant::now();
    let pid = nodes.slots[0].pid.context("n1 runs")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    if args.release_after_ms == 0 {
        stats.hold.release();
    } else {
        let stats = stats.clone();
        let after = Duration::from_millis(args.release_after_ms);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            stats.hold.release();
        });
    }
    let poll = Duration::from_millis(args.poll_ms.max(1));
    let deadline = killed + timeout;
    let mut last_node_poll = Instant::now() - Duration::from_secs(1);
    // n1's processes seen claimed by another node, by process id: the last owner seen.
    let mut taken: HashMap<i64, String> = HashMap::new();
    loop {
        let remaining: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM process_instance WHERE id = ANY($1) AND end_time IS NULL",
        )
        .bind(&a_processes)
        .fetch_one(&pool)
        .await?;
        // An upper bound: the state read is at most this old.
        let now_at = killed.elapsed();
        if remaining < a_processes.len() as i64 && result.first.is_none() {
            result.first = Some(now_at);
        }
        if remaining == 0 && result.all.is_none() && !a_processes.is_empty() {
            result.all = Some(now_at);
        }
        let owners = sqlx::query(
            "SELECT id, running_process_server_id FROM process_instance WHERE id = ANY($1) AND end_time IS NULL AND running_process_server_id IS NOT NULL",
        )
        .bind(&a_processes)
        .fetch_all(&pool)
        .await?;
        for row in &owners {
            let (id, owner): (i64, String) = (row.try_get(0)?, row.try_get(1)?);
            if owner != a_id {
                taken.insert(id, ids.get(&owner).cloned().unwrap_or(owner));
            }
        }
        if result.resubscribed.is_none() && *agent.connections.borrow() > subscriptions {
            result.resubscribed = Some(killed.elapsed());
        }
        if result.running.is_none() {
            let running: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM instance WHERE id = ANY($1) AND state = 'running'",
            )
            .bind(&instance_ids)
            .fetch_one(&pool)
            .await?;
            if running == instance_ids.len() as i64 {
                result.running = Some(killed.elapsed());
            }
        }
        if result.dead.is_none() && last_node_poll.elapsed() >= Duration::from_millis(100) {
            last_node_poll = Instant::now();
            if let Ok(items) = cluster_nodes(&http, &b_url).await
                && items
                    .iter()
                    .any(|item| item["name"] == "n1" && item["state"] == "dead")
            {
                result.dead = Some(killed.elapsed());
            }
        }
        let done = (result.all.is_some() || a_processes.is_empty()) && result.running.is_some();
        if done && (result.dead.is_some() || Instant::now() > deadline) {
            break;
        }
        if Instant::now() > deadline {
            println!(
                "  WARNING: after {} s, {remaining} of n1's {} processes have not ended",
                timeout.as_secs(),
                a_processes.len()
            );
            break;
        }
        tokio::time::sleep(poll).await;
    }
    if a_processes.is_empty() {
        println!("  WARNING: n1 held no in-flight process at the kill: nothing to measure");
    }
    for owner in taken.into_values() {
        *result.new_owners.entry(owner).or_default() += 1;
    }

    // What happened to n1's processes.
    let rows = sqlx::query(
        "SELECT p.id, coalesce(p.exit_reason, '(none)'), (SELECT count(*) FROM process_execution e WHERE e.process_instance_id = p.id) FROM process_instance p WHERE p.id = ANY($1)",
    )
    .bind(&a_processes)
    .fetch_all(&pool)
    .await?;
    for row in &rows {
        let reason: String = row.try_get(1)?;
        let executions: i64 = row.try_get(2)?;
        *result.exit_reasons.entry(reason).or_default() += 1;
        *result.executions.entry(executions).or_default() += 1;
    }
    result.resent = stats
        .hold
        .received
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(id, count)| wanted.contains(id.as_str()) && **count > 1)
        .count();
    for i in 1..nodes.len() {
        result.takeovers += metric(&nodes.url(i), "drover_cluster_takeovers_total")
            .await
            .unwrap_or(0.0);
    }
    if stats.reply_errors.load(Ordering::Relaxed) > 0 {
        println!(
            "  agent reply errors: {} (first: {:?})",
            stats.reply_errors.load(Ordering::Relaxed),
            stats.first_error.lock().unwrap_or_else(|p| p.into_inner())
        );
    }
    agent.stop().await;
    pool.close().await;
    Ok(result)
}

/// A simulated agent on the client library's event router, given every node's URL: it
/// answers `compute.instance.*` requests (held while `stats.hold` is on) and pings (with the
/// containers it runs), and subscribes again on the next node when its connection is lost.
struct RouterAgent {
    agent: harness::Agent,
    /// Subscriptions so far (the router's count).
    connections: tokio::sync::watch::Receiver<u64>,
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RouterAgent {
    async fn start(urls: &[String], token: &str, stats: Arc<AgentStats>) -> Result<RouterAgent> {
        let list = urls.join(",");
        let (access, secret) = token
            .split_once(':')
            .context("a registration token is ACCESS:SECRET")?;
        let registered = Client::new(&list, access, secret)?
            .post(
                "register",
                &json!({"key": format!("failover-{}", std::process::id()), "name": "failover"}),
            )
            .await
            .context("POST /v1/register")?;
        let field = |name: &str| {
            registered[name]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("the registration has no {name}: {registered}"))
        };
        let client = Client::new(&list, &field("accessKey")?, &field("secretKey")?)?;
        let agent = harness::Agent {
            agent_id: field("agentId")?,
            host_id: field("hostId")?,
            client: client.clone(),
            running: Arc::default(),
        };
        let mut builder = drover_client::RouterBuilder::new(client)
            .agent_id(agent.agent_id.clone())
            .workers(1024)
            .queue_capacity(4096)
            .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500));
        for name in [
            "compute.instance.activate",
            "compute.instance.deactivate",
            "compute.instance.remove",
        ] {
            let (stats, running) = (stats.clone(), agent.running.clone());
            builder = builder.on(name, move |event, _context| {
                let (stats, running) = (stats.clone(), running.clone());
                async move {
                    stats.requests.fetch_add(1, Ordering::Relaxed);
                    if let Some(id) = &event.resource_id {
                        if stats.hold.count.load(Ordering::Relaxed) {
                            *stats
                                .hold
                                .received
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .entry(id.clone())
                                .or_default() += 1;
                        }
                        let mut running = running.lock().unwrap_or_else(|p| p.into_inner());
                        if event.name() == "compute.instance.activate" {
                            running.insert(id.clone());
                        } else {
                            running.remove(id);
                        }
                    }
                    if stats.hold.is_on() {
                        stats.hold.held.fetch_add(1, Ordering::Relaxed);
                        stats.hold.open().await;
                    }
                    Ok(Some(json!({"instance": {"externalId": "x"}})))
                }
            });
        }
        let (ping_stats, running) = (stats.clone(), agent.running.clone());
        builder = builder.on("ping", move |_event, _context| {
            let resources: Vec<serde_json::Value> = running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|id| json!({"type": "instance", "id": id, "state": "running"}))
                .collect();
            ping_stats.pings.fetch_add(1, Ordering::Relaxed);
            async move { Ok(Some(json!({ "resources": resources }))) }
        });
        let router = builder.build();
        let mut connections = router.connections();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                if let Err(error) = router.run(shutdown).await {
                    eprintln!("agent router: {error}");
                }
            })
        };
        // Subscribed once the router counts a connection.
        tokio::time::timeout(Duration::from_secs(30), async {
            while *connections.borrow_and_update() == 0 {
                if connections.changed().await.is_err() {
                    break;
                }
            }
        })
        .await
        .context("the agent did not subscribe within 30 s")?;
        Ok(RouterAgent {
            agent,
            connections,
            shutdown,
            task,
        })
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

#[cfg(test)]
mod tests {
    use super::numeric_id;

    #[test]
    fn numeric_ids() {
        assert_eq!(numeric_id("1i42"), Some(42));
        assert_eq!(numeric_id("1i"), None);
        assert_eq!(numeric_id("x"), None);
    }
}
