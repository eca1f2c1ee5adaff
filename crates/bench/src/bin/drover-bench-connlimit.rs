//! `drover-bench-connlimit`: the server at its open-files limit, with and without the
//! subscriber connection limit (`api.sub.max.connections`).
//!
//! Starts the release `drover server` as a child with a given open-files limit (`prlimit
//! --nofile=N:N`), opens subscriber WebSockets (`/v1/subscribe?eventNames=ping`, admin key)
//! beyond that limit, `--concurrency` handshakes at a time, each bounded by
//! `--connect-timeout-ms`, and counts the opened, refused (503) and failed ones. While they are
//! all held open it sends `--probes` probes, each on a new connection with a timeout of
//! `--probe-timeout-ms`, alternating `GET /healthz` and `GET /v1/containers`: success rates and
//! latency percentiles (a failed probe counts as its timeout). Each run is bounded; loopback
//! only; the server is killed at the end of each run.
//!
//! Modes: `on` runs the server with its default limit (10,000, capped at start below the
//! open-files limit), `off` with `api.sub.max.connections=0` (no limit of its own: the
//! open-files limit is what stops it), `both` runs one then the other.
//!
//! ```text
//! cargo build --release -p drover -p drover-bench
//! target/release/drover-bench-connlimit --nofile 4096 --subscribers 4600 --mode both
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use drover_bench::harness::{
    self, ACCESS_KEY, Latency, SECRET_KEY, ServerArgs, ServerChild, metric, ms, print_machine,
};
use drover_client::{Client, Error, EventStream, Subscribe};
use tokio::sync::{Mutex, Semaphore};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "drover-bench-connlimit",
    about = "API and /healthz while subscriber sockets fill the open-files limit, with and without the connection limit"
)]
struct Args {
    /// The server's open-files limit (soft and hard).
    #[arg(long, default_value_t = 4096)]
    nofile: u64,
    /// Subscriber connections to attempt (more than the open-files limit to reach it).
    #[arg(long, default_value_t = 4600)]
    subscribers: usize,
    /// Subscriber handshakes in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Bound on one subscriber handshake, in ms.
    #[arg(long, default_value_t = 2000)]
    connect_timeout_ms: u64,
    /// Probes (half /healthz, half GET /v1/containers) while the subscribers are open.
    #[arg(long, default_value_t = 400)]
    probes: usize,
    /// Bound on one probe, in ms (a failed probe counts as this long).
    #[arg(long, default_value_t = 2000)]
    probe_timeout_ms: u64,
    /// Probes in flight at once.
    #[arg(long, default_value_t = 4)]
    probe_concurrency: usize,
    /// `on` (the server's default limit), `off` (`api.sub.max.connections=0`) or `both`.
    #[arg(long, default_value = "both")]
    mode: String,
    #[command(flatten)]
    server: ServerArgs,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let nofile = harness::init();
    println!("this bench's open-files limit: {nofile}");
    harness::block_on(args.server.bench_threads, run(&args))
}

async fn run(args: &Args) -> Result<()> {
    print_machine();
    let modes: &[&str] = match args.mode.as_str() {
        "on" => &["on"],
        "off" => &["off"],
        _ => &["on", "off"],
    };
    let mut rows = Vec::new();
    for mode in modes {
        rows.push(run_mode(args, mode).await?);
    }
    println!();
    println!(
        "| limit | subscribers open | refused (503) | failed | /healthz ok | API ok | API p50 | API p99 | /healthz p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    Ok(())
}

/// What one probe kind saw.
#[derive(Debug, Default)]
struct Probes {
    ok: usize,
    total: usize,
    latencies: Vec<Duration>,
}

async fn run_mode(args: &Args, mode: &str) -> Result<String> {
    let bin = args.server.drover_bin()?;
    let mut options = args.server.options("drover-bench-connlimit-");
    options.nofile = Some(args.nofile);
    if mode == "off" {
        options
            .env
            .push(("DROVER_API_SUB_MAX_CONNECTIONS".into(), "0".into()));
    }
    let server = ServerChild::start(&bin, &options, None, Duration::from_secs(60)).await?;
    let url = server.http_url();
    println!();
    println!(
        "== limit {mode}: server pid {} with open-files limit {} ==",
        server.pid, args.nofile
    );
    for line in server
        .log()
        .lines()
        .filter(|line| line.contains("open-files"))
    {
        println!("server: {line}");
    }

    // Open subscribers until the attempts are spent; keep the open ones.
    let client = Client::new(&url, ACCESS_KEY, SECRET_KEY)?;
    let open: Arc<Mutex<Vec<EventStream>>> = Arc::default();
    let (refused, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let gate = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.subscribers {
        let permit = gate.clone().acquire_owned().await?;
        let (client, open, refused, failed) = (
            client.clone(),
            open.clone(),
            refused.clone(),
            failed.clone(),
        );
        let timeout = Duration::from_millis(args.connect_timeout_ms);
        tasks.spawn(async move {
            let subscribed =
                tokio::time::timeout(timeout, client.subscribe(Subscribe::names(["ping"]))).await;
            match subscribed {
                Ok(Ok(stream)) => open.lock().await.push(stream),
                Ok(Err(Error::Refused { status: 503, .. })) => {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(permit);
        });
    }
    while tasks.join_next().await.is_some() {}
    let opened = open.lock().await.len();
    let (refused, failed) = (
        refused.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    println!(
        "subscribers: {opened} open, {refused} refused with 503, {failed} failed or timed out, in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Probe while they are all open: a new connection per probe, as health checkers do.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_millis(args.probe_timeout_ms))
        .build()?;
    let health = Arc::new(Mutex::new(Probes::default()));
    let api = Arc::new(Mutex::new(Probes::default()));
    let gate = Arc::new(Semaphore::new(args.probe_concurrency.max(1)));
    let timeout = Duration::from_millis(args.probe_timeout_ms);
    let mut tasks = tokio::task::JoinSet::new();
    for probe in 0..args.probes {
        let permit = gate.clone().acquire_owned().await?;
        let (http, url) = (http.clone(), url.clone());
        let (health, api) = (health.clone(), api.clone());
        tasks.spawn(async move {
            let (request, into) = if probe % 2 == 0 {
                (http.get(format!("{url}/healthz")), health)
            } else {
                (
                    http.get(format!("{url}/v1/containers"))
                        .basic_auth(ACCESS_KEY, Some(SECRET_KEY)),
                    api,
                )
            };
            let begun = Instant::now();
            let ok = match request.send().await {
                Ok(response) => response.status().is_success() && response.bytes().await.is_ok(),
                Err(_) => false,
            };
            let took = if ok {
                begun.elapsed()
            } else {
                timeout.max(begun.elapsed())
            };
            let mut into = into.lock().await;
            into.total += 1;
            into.ok += usize::from(ok);
            into.latencies.push(took);
            drop(permit);
        });
    }
    while tasks.join_next().await.is_some() {}
    let health = std::mem::take(&mut *health.lock().await);
    let api = std::mem::take(&mut *api.lock().await);
    let health_latency = Latency::of(health.latencies.clone());
    let api_latency = Latency::of(api.latencies.clone());
    println!(
        "/healthz: {}/{} ok, p50 {}, p99 {}; GET /v1/containers: {}/{} ok, p50 {}, p99 {}",
        health.ok,
        health.total,
        ms(health_latency.p50),
        ms(health_latency.p99),
        api.ok,
        api.total,
        ms(api_latency.p50),
        ms(api_latency.p99)
    );
    if let Ok(Some(refused_metric)) = tokio::time::timeout(
        Duration::from_secs(5),
        metric(&url, "drover_subscribe_refused_total"),
    )
    .await
    {
        println!("server: drover_subscribe_refused_total {refused_metric}");
    }
    let fds = std::fs::read_dir(format!("/proc/{}/fd", server.pid))
        .map(|dir| dir.count())
        .unwrap_or(0);
    println!("server: {fds} open file descriptors");

    open.lock().await.clear();
    server.stop(args.server.keep_log.as_deref()).await;
    let percent = |probes: &Probes| 100.0 * probes.ok as f64 / probes.total.max(1) as f64;
    let limit = if mode == "on" {
        "on (default 10000, capped)"
    } else {
        "off (0)"
    };
    Ok(format!(
        "| {limit} | {opened} | {refused} | {failed} | {:.1} % ({}/{}) | {:.1} % ({}/{}) | {} | {} | {} |",
        percent(&health),
        health.ok,
        health.total,
        percent(&api),
        api.ok,
        api.total,
        ms(api_latency.p50),
        ms(api_latency.p99),
        ms(health_latency.p99),
    ))
}
