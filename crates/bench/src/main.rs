//! `drover-bench`: load generator and benchmarks for drover's event bus.
//!
//! Every benchmark starts its own server as a child process on a free loopback port (drover
//! from `target/release`, or `nats-server` for the baseline), drives it from this process and
//! kills it at the end, also on error. Every loop is bounded in count and in time.
//!
//! ```text
//! cargo build --release -p drover -p drover-bench
//! target/release/drover-bench fanout --subscribers 10000
//! target/release/drover-bench idle-memory --connections 10000
//! target/release/drover-bench nats --subscribers 10000 --with-drover
//! target/release/drover-bench auth
//! target/release/drover-bench all
//! target/release/drover-bench fanout --subscribers 10000 --nodes 3   # a cluster (issue 14)
//! ```
//!
//! `fanout --nodes N` (N > 1, or `--cluster` with 1) starts N `drover server` nodes on a fresh
//! PostgreSQL database and the bench's own nats-server with JetStream, spreads the subscribers
//! over the nodes round-robin and publishes on the first node; the server's CPU is then the
//! nodes' and nats-server's together.

mod auth;
mod common;
mod drover;
mod fleet;
mod nats;

use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, Subcommand};
use drover_bench::harness;

use crate::fleet::{Mode, PhaseLimits, PhaseResult};

#[derive(Debug, Parser)]
#[command(
    name = "drover-bench",
    about = "Benchmarks of drover's event bus, on loopback"
)]
struct Cli {
    /// Before each measurement, wait up to this many seconds for the machine to be quiet
    /// (other processes under 15% of a core); 0 measures at once.
    #[arg(long, global = true, default_value_t = 120)]
    quiet_wait: u64,
    /// Worker threads of the server under test (TOKIO_WORKER_THREADS for drover, GOMAXPROCS
    /// for nats-server); default: one per core.
    #[arg(long, global = true)]
    server_threads: Option<usize>,
    /// Worker threads of this bench's runtime; default: one per core.
    #[arg(long, global = true)]
    bench_threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fan-out: one publisher, N subscriber WebSockets; deliveries/s and latency.
    Fanout(drover::FanoutArgs),
    /// Server memory per idle subscriber WebSocket.
    IdleMemory(drover::IdleArgs),
    /// The same fan-out against nats-server, for comparison.
    Nats(nats::NatsArgs),
    /// Authenticated requests per second (the key check).
    Auth(auth::AuthArgs),
    /// Everything: fan-out for each subscriber count on drover then NATS, idle memory, auth.
    All(AllArgs),
}

/// The load shape shared by `fanout`, `nats` and `all`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Seconds of publishing per phase.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Bytes of padding in each event's data (the frame is about 130 bytes more).
    #[arg(long, default_value_t = 256)]
    pub payload_bytes: usize,
    /// Only a paced phase at this many events per second (default: a max-rate phase, then
    /// a paced phase at half the max event rate).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Skip the half-rate latency phase.
    #[arg(long)]
    pub no_latency_run: bool,
    /// Most events published per phase.
    #[arg(long, default_value_t = 10_000_000)]
    pub max_events: u64,
    /// Concurrent publish requests (keep-alive HTTP connections) for drover.
    #[arg(long, default_value_t = 8)]
    pub publishers: usize,
    /// Concurrent publish tasks on the one NATS connection.
    #[arg(long, default_value_t = 1)]
    pub nats_publishers: usize,
    /// Max-rate flow control: events in flight per subscriber, on average (default:
    /// 20,000 / subscribers, at least 128, and for drover at most half its per-socket queue,
    /// past which it disconnects a subscriber as a slow consumer). Deeper backlogs let
    /// servers batch more writes per socket, at the price of latency (the max-rate latency
    /// is mostly this backlog).
    #[arg(long)]
    pub window: Option<u64>,
    /// Subscribers that parse events to measure latency (spread over the connection order);
    /// the rest only count frames.
    #[arg(long, default_value_t = 10)]
    pub latency_samples: usize,
    /// Handshakes in flight at once while connecting subscribers.
    #[arg(long, default_value_t = 128)]
    pub connect_concurrency: usize,
}

impl LoadArgs {
    fn limits(&self, subscribers: usize, cap: Option<u64>) -> PhaseLimits {
        let default = (20_000 / subscribers.max(1) as u64)
            .max(128)
            .min(cap.unwrap_or(u64::MAX));
        PhaseLimits {
            seconds: self.seconds,
            max_events: self.max_events,
            window: self.window.unwrap_or(default).max(1),
            publishers: self.publishers.max(1),
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
struct AllArgs {
    /// Subscriber counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,100,10000")]
    subscribers: Vec<usize>,
    #[command(flatten)]
    load: LoadArgs,
    /// Idle connections for the memory figure (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    /// Seconds of the auth run (0 skips it).
    #[arg(long, default_value_t = 10.0)]
    auth_seconds: f64,
    /// Skip the NATS baseline.
    #[arg(long)]
    skip_nats: bool,
    /// Set the drover server's per-socket queue (DROVER_SUBSCRIBE_MAX_QUEUED_MESSAGES).
    #[arg(long)]
    server_queue: Option<u64>,
    /// The drover binary (default: `drover` beside this binary).
    #[arg(long)]
    drover_bin: Option<PathBuf>,
    /// The nats-server binary.
    #[arg(long, default_value = "/usr/sbin/nats-server")]
    nats_bin: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    common::QUIET_WAIT_SECS.store(cli.quiet_wait, std::sync::atomic::Ordering::Relaxed);
    let nofile = harness::init();
    println!("open-files soft limit: {nofile} (servers started by the bench inherit it)");
    if let Some(threads) = cli.server_threads {
        common::SERVER_THREADS.store(threads, std::sync::atomic::Ordering::Relaxed);
        println!("server worker threads: {threads}");
    }
    if let Some(threads) = cli.bench_threads {
        println!("bench worker threads: {threads}");
    }
    harness::block_on(cli.bench_threads, run(cli.command))
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Fanout(args) => {
            let result = drover::fanout(&args).await?;
            print_fanout_table(&[Row::drover(&result)]);
        }
        Command::IdleMemory(args) => {
            drover::idle_memory(&args).await?;
        }
        Command::Nats(args) => {
            let mut rows = Vec::new();
            if args.with_drover {
                let fanout = drover::FanoutArgs {
                    subscribers: args.subscribers,
                    load: args.load.clone(),
                    server_queue: None,
                    drover_bin: args.drover_bin.clone(),
                    perf_record: None,
                    cluster: drover::ClusterArgs::default(),
                };
                rows.push(Row::drover(&drover::fanout(&fanout).await?));
            }
            rows.push(Row::nats(&nats::nats(&args).await?));
            print_fanout_table(&rows);
            if let [drover, nats] = &rows[..] {
                println!();
                println!(
                    "| subscribers | drover deliveries/s | NATS deliveries/s | drover / NATS |"
                );
                println!("|---:|---:|---:|---:|");
                print_ratio(drover, nats);
            }
        }
        Command::Auth(args) => {
            auth::auth(&args).await?;
        }
        Command::All(args) => all(args).await?,
    }
    Ok(())
}

async fn all(args: AllArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut rows = Vec::new();
    for &n in &args.subscribers {
        let fanout = drover::FanoutArgs {
            subscribers: n,
            load: args.load.clone(),
            server_queue: args.server_queue,
            drover_bin: args.drover_bin.clone(),
            perf_record: None,
            cluster: drover::ClusterArgs::default(),
        };
        rows.push(Row::drover(&drover::fanout(&fanout).await?));
        if !args.skip_nats {
            let nats_args = nats::NatsArgs {
                subscribers: n,
                load: args.load.clone(),
                nats_bin: args.nats_bin.clone(),
                with_drover: false,
                drover_bin: None,
            };
            rows.push(Row::nats(&nats::nats(&nats_args).await?));
        }
    }
    let idle = if args.idle_connections > 0 {
        Some(
            drover::idle_memory(&drover::IdleArgs {
                connections: args.idle_connections,
                settle_seconds: 3.0,
                connect_concurrency: args.load.connect_concurrency,
                drover_bin: args.drover_bin.clone(),
            })
            .await?,
        )
    } else {
        None
    };
    let auth = if args.auth_seconds > 0.0 {
        Some(
            auth::auth(&auth::AuthArgs {
                seconds: args.auth_seconds,
                connections: 64,
                threads: 1,
                tool: auth::Tool::Auto,
                max_requests: 20_000_000,
                drover_bin: args.drover_bin.clone(),
            })
            .await?,
        )
    } else {
        None
    };
    println!();
    println!(
        "== summary ({:.0} s in all) ==",
        started.elapsed().as_secs_f64()
    );
    print_fanout_table(&rows);
    if !args.skip_nats {
        println!();
        println!("| subscribers | drover deliveries/s | NATS deliveries/s | drover / NATS |");
        println!("|---:|---:|---:|---:|");
        for pair in rows.chunks(2) {
            if let [drover, nats] = pair {
                print_ratio(drover, nats);
            }
        }
    }
    if let Some(idle) = idle {
        println!();
        println!(
            "idle memory: {} connections, server VmRSS {} → {} KiB: {:.1} KiB per idle subscriber",
            idle.connections,
            idle.before_kib,
            idle.after_kib,
            idle.per_connection_kib()
        );
    }
    if let Some(auth) = auth {
        println!(
            "auth: {} authenticated GET /v1 per second via {} ({} non-2xx); CPU {}",
            common::rate(auth.requests_per_sec),
            auth.tool,
            auth.non_2xx,
            auth.cpu
        );
    }
    Ok(())
}

/// One line of the fan-out table.
#[derive(Debug)]
struct Row {
    server: String,
    subscribers: usize,
    max_rate: Option<f64>,
    phases: Vec<PhaseResult>,
}

impl Row {
    fn drover(result: &drover::FanoutResult) -> Row {
        Row {
            server: match result.nodes {
                Some(1) => "drover, 1 node (cluster mode)".to_owned(),
                Some(n) => format!("drover, {n} nodes"),
                None => "drover".to_owned(),
            },
            subscribers: result.subscribers,
            max_rate: nats::max_rate(&result.phases),
            phases: result.phases.clone(),
        }
    }

    fn nats(result: &nats::NatsResult) -> Row {
        Row {
            server: "nats-server".to_owned(),
            subscribers: result.subscribers,
            max_rate: nats::max_rate(&result.phases),
            phases: result.phases.clone(),
        }
    }
}

/// One line of the drover / NATS comparison (max-rate phases).
fn print_ratio(drover: &Row, nats: &Row) {
    let (d, n) = (drover.max_rate.unwrap_or(0.0), nats.max_rate.unwrap_or(0.0));
    println!(
        "| {} | {} | {} | {:.2} |",
        drover.subscribers,
        common::rate(d),
        common::rate(n),
        if n > 0.0 { d / n } else { 0.0 }
    );
}

fn print_fanout_table(rows: &[Row]) {
    println!();
    println!(
        "| server | subscribers | phase | events/s published | deliveries/s | delivered/expected | p50 | p99 | CPU server / bench / other |"
    );
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        for phase in &row.phases {
            let mode = match phase.mode {
                Mode::Max => "max".to_owned(),
                Mode::Paced(rate) => format!("paced {}/s", common::rate(rate)),
            };
            println!(
                "| {} | {} | {} | {} | {} | {}/{} | {} | {} | {:.0}% / {:.0}% / {:.0}% |",
                row.server,
                row.subscribers,
                mode,
                common::rate(phase.publish_rate),
                common::rate(phase.deliveries_per_sec),
                phase.delivered,
                phase.expected,
                common::us(phase.latency.p50_us),
                common::us(phase.latency.p99_us),
                phase.cpu.server,
                phase.cpu.bench,
                phase.cpu.other
            );
        }
    }
}
