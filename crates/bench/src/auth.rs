//! Key-check throughput: authenticated `GET /v1` requests per second.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::task::JoinSet;

use crate::common::{self, ACCESS_KEY, CpuMeter, CpuSplit, SECRET_KEY};

/// `auth` options.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthArgs {
    /// Seconds of load.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// wrk threads (wrk shares the two cores with the server).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Which load generator: wrk when installed, else a bounded reqwest loop.
    #[arg(long, value_enum, default_value_t = Tool::Auto)]
    pub tool: Tool,
    /// Most requests the reqwest loop sends.
    #[arg(long, default_value_t = 20_000_000)]
    pub max_requests: u64,
    /// The drover binary (default: `drover` beside this binary).
    #[arg(long)]
    pub drover_bin: Option<PathBuf>,
}

/// The load generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Tool {
    /// wrk if it is on the PATH, else reqwest.
    Auto,
    /// wrk.
    Wrk,
    /// A bounded concurrent reqwest loop in this process.
    Reqwest,
}

/// What the auth run measured.
#[derive(Debug, Clone)]
pub struct AuthResult {
    /// Requests per second answered 200.
    pub requests_per_sec: f64,
    /// Which tool.
    pub tool: &'static str,
    /// Answers other than 2xx/3xx (must be 0).
    pub non_2xx: u64,
    /// CPU split over the run (the bench's share includes wrk).
    pub cpu: CpuSplit,
}

fn wrk_available() -> bool {
    std::process::Command::new("wrk")
        .arg("--version")
        .output()
        .is_ok()
}

/// `auth`: authenticated `GET /v1` requests per second.
pub async fn auth(args: &AuthArgs) -> Result<AuthResult> {
    let bin = common::drover_bin(args.drover_bin.as_deref())?;
    let use_wrk = match args.tool {
        Tool::Auto => wrk_available(),
        Tool::Wrk => true,
        Tool::Reqwest => false,
    };
    println!(
        "drover auth: GET /v1 with Basic auth, {} connections, {} s, via {}",
        args.connections,
        args.seconds,
        if use_wrk {
            format!("wrk ({} threads)", args.threads)
        } else {
            "a reqwest loop".into()
        }
    );
    let server = common::start_drover(&bin, None).await?;
    let result = async {
        let client = drover_client::Client::new(&server.http_url(), ACCESS_KEY, SECRET_KEY)?;
        // Check the key works (and warm the cache) before measuring.
        client.get("").await.context("GET /v1 with the admin key")?;
        let url = client.base_url().to_owned();
        let authorization = client.authorization().to_owned();
        common::wait_quiet().await;
        let cpu = CpuMeter::start(&[server.pid]);
        let (requests_per_sec, non_2xx, tool) = if use_wrk {
            let (rps, bad) = run_wrk(args, &url, &authorization).await?;
            (rps, bad, "wrk")
        } else {
            let (rps, bad) = run_reqwest(args, &url, &authorization).await?;
            (rps, bad, "reqwest")
        };
        let cpu = cpu.stop();
        println!(
            "  {} authenticated requests/s ({} non-2xx)",
            common::rate(requests_per_sec),
            non_2xx
        );
        println!("  CPU: {cpu} (the bench's share includes wrk)");
        common::warn_if_disturbed(&cpu);
        Ok(AuthResult {
            requests_per_sec,
            tool,
            non_2xx,
            cpu,
        })
    }
    .await;
    server.stop(None).await;
    result
}

async fn run_wrk(args: &AuthArgs, url: &str, authorization: &str) -> Result<(f64, u64)> {
    let mut command = tokio::process::Command::new("wrk");
    command
        .arg(format!("-t{}", args.threads.max(1)))
        .arg(format!("-c{}", args.connections.max(args.threads.max(1))))
        .arg(format!("-d{}s", args.seconds.ceil() as u64))
        .arg("-H")
        .arg(format!("Authorization: {authorization}"))
        .arg(url)
        .kill_on_drop(true);
    let limit = Duration::from_secs_f64(args.seconds + 30.0);
    let output = tokio::time::timeout(limit, command.output())
        .await
        .context("wrk did not finish")?
        .context("run wrk")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let rps = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("Requests/sec:"))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))?;
    let non_2xx = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(|value| value.trim().parse::<u64>().ok())
        .unwrap_or(0);
    for line in text.lines() {
        println!("  wrk: {line}");
    }
    Ok((rps, non_2xx))
}

async fn run_reqwest(args: &AuthArgs, url: &str, authorization: &str) -> Result<(f64, u64)> {
    let http = reqwest::Client::builder()
        .http1_only()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(args.connections)
        .timeout(Duration::from_secs(30))
        .build()?;
    let ok = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(args.seconds);
    let mut tasks = JoinSet::new();
    for _ in 0..args.connections.max(1) {
        let (http, url, authorization) = (http.clone(), url.to_owned(), authorization.to_owned());
        let (ok, bad, issued) = (ok.clone(), bad.clone(), issued.clone());
        let max = args.max_requests;
        tasks.spawn(async move {
            while Instant::now() < end && issued.fetch_add(1, Ordering::Relaxed) < max {
                let response = http
                    .get(&url)
                    .header(reqwest::header::AUTHORIZATION, &authorization)
                    .send()
                    .await;
                match response {
                    Ok(response) if response.status().is_success() => {
                        let _ = response.bytes().await;
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    let deadline = end + Duration::from_secs(30);
    while !tasks.is_empty() {
        match tokio::time::timeout_at(deadline.into(), tasks.join_next()).await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                tasks.abort_all();
                break;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok((
        ok.load(Ordering::Relaxed) as f64 / secs,
        bad.load(Ordering::Relaxed),
    ))
}
