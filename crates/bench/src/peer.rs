//! The graphile-worker peer of `drover-bench-engine`: the job queue PostgreSQL users pick for
//! durable work, run with Node on the same PostgreSQL in the same bench run.
//!
//! The Node side is `crates/bench/peers/graphile-worker/` (`package.json` and
//! `package-lock.json` pin graphile-worker; `node_modules` is not committed and is installed
//! with `npm ci` when missing). Its `bench.js` installs graphile-worker's schema in a database
//! created here for the run (and dropped after it), enqueues N no-op jobs with `addJobs`, and
//! times one worker (24 concurrent jobs, a pool of 25) from its start until the jobs table is
//! empty: [`Mode::Batched`] with graphile-worker's documented batching options
//! (`localQueue.size` 500, `completeJobBatchDelay` 0, `failJobBatchDelay` 0), and
//! [`Mode::Unbatched`] with its defaults. The CPU of Node, PostgreSQL and the rest of the
//! machine is read from `/proc` between the script's `phase start` and `phase end` lines.
//!
//! graphile-worker is pinned at 0.17.3, the newest release that runs on Node 20 (0.18 needs
//! Node ≥ 22.18); its batching options are the same.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::harness::{CpuMeter, CpuSplit, PgDatabase, loadavg, wait_quiet};

/// How graphile-worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `localQueue.size` 500, `completeJobBatchDelay` 0, `failJobBatchDelay` 0.
    Batched,
    /// graphile-worker's defaults (no local queue, no completion batching).
    Unbatched,
}

impl Mode {
    /// The script's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Batched => "batched",
            Mode::Unbatched => "unbatched",
        }
    }
}

/// The figures `bench.js` prints on its `result` line.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerResult {
    /// graphile-worker's version.
    pub version: String,
    /// Node's version.
    pub node: String,
    /// `batched` or `unbatched`.
    pub mode: String,
    /// Jobs run.
    pub jobs: u64,
    /// Seconds to enqueue them (before the worker started).
    pub add_seconds: f64,
    /// Worker start → its first job done (its start-up).
    pub first_seconds: f64,
    /// Worker start → the jobs table empty.
    pub seconds: f64,
    /// `jobs / seconds`.
    pub jobs_per_second: f64,
    /// Jobs that failed (expected 0).
    pub failed: u64,
    /// Node's CPU over the timed part, by its own count.
    pub node_cpu_ms: f64,
    /// Node (as `server`), PostgreSQL and the rest of the machine over the timed part.
    #[serde(skip)]
    pub cpu: CpuSplit,
    /// The load average (1 min) when the script started.
    #[serde(skip)]
    pub load_before: String,
}

impl PeerResult {
    /// Node's CPU per job, in milliseconds.
    pub fn node_cpu_ms_per_job(&self) -> f64 {
        self.node_cpu_ms / self.jobs.max(1) as f64
    }

    /// PostgreSQL's CPU per job, in milliseconds.
    pub fn postgres_cpu_ms_per_job(&self) -> f64 {
        self.cpu.postgres / 100.0 * self.seconds * 1000.0 / self.jobs.max(1) as f64
    }
}

/// The committed Node package of the peer (from this crate's source directory).
pub fn default_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/graphile-worker")
}

/// Runs `npm ci` in `dir` if its `node_modules` is missing (bounded by `timeout`).
pub async fn install(dir: &Path, timeout: Duration) -> Result<()> {
    if dir
        .join("node_modules/graphile-worker/package.json")
        .exists()
    {
        return Ok(());
    }
    println!("  graphile-worker: npm ci in {} …", dir.display());
    let mut child = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("run npm (is Node.js installed? --no-peer skips the peer)")?;
    let status = tokio::time::timeout(timeout, child.wait())
        .await
        .with_context(|| format!("npm ci took over {} s", timeout.as_secs()))??;
    if !status.success() {
        bail!("npm ci in {} failed: {status}", dir.display());
    }
    Ok(())
}

/// Runs `jobs` no-op jobs through graphile-worker in `mode`, on a fresh database
/// `graphile_bench_<pid>` on the PostgreSQL server of `url` (dropped afterwards). Waits up to
/// `quiet_wait` for a quiet machine first; the script is killed after `timeout`.
pub async fn run(
    dir: &Path,
    url: &str,
    jobs: usize,
    mode: Mode,
    quiet_wait: Duration,
    timeout: Duration,
) -> Result<PeerResult> {
    let database = PgDatabase::create(url, "graphile_bench")?;
    wait_quiet(std::process::id(), quiet_wait).await;
    println!("  graphile-worker {}: {jobs} no-op jobs …", mode.name());
    let load_before = loadavg();
    let mut child = Command::new("node")
        .arg("bench.js")
        .arg(&database.url)
        .arg(jobs.to_string())
        .arg(mode.name())
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("run node (is Node.js installed? --no-peer skips the peer)")?;
    let pid = child.id().context("node exited at once")?;
    let mut lines = BufReader::new(child.stdout.take().context("node's stdout")?).lines();
    let read = async {
        let mut meter = None;
        let mut cpu = None;
        let mut result = None;
        while let Some(line) = lines.next_line().await? {
            match line.as_str() {
                "phase start" => meter = Some(CpuMeter::start(pid)),
                "phase end" => cpu = meter.take().map(|meter| meter.stop()),
                _ => match line.strip_prefix("result ") {
                    Some(json) => {
                        result = Some(
                            serde_json::from_str::<PeerResult>(json)
                                .with_context(|| format!("bench.js printed {json}"))?,
                        );
                    }
                    None => println!("    node: {line}"),
                },
            }
        }
        let status = child.wait().await?;
        if !status.success() {
            bail!("node bench.js {} failed: {status}", mode.name());
        }
        let mut result = result.context("bench.js printed no result")?;
        result.cpu = cpu.unwrap_or_default();
        result.load_before = load_before;
        anyhow::Ok(result)
    };
    let result = tokio::time::timeout(timeout, read)
        .await
        .with_context(|| {
            format!(
                "graphile-worker {} took over {} s",
                mode.name(),
                timeout.as_secs()
            )
        })??;
    drop(database);
    println!(
        "    {} jobs in {:.2} s (the first after {:.0} ms): {:.0} jobs/s ({} failed; enqueued in {:.2} s); Node CPU {:.3} ms per job, PostgreSQL CPU {:.3} ms per job; CPU: {}",
        result.jobs,
        result.seconds,
        result.first_seconds * 1000.0,
        result.jobs_per_second,
        result.failed,
        result.add_seconds,
        result.node_cpu_ms_per_job(),
        result.postgres_cpu_ms_per_job(),
        result.cpu
    );
    if result.failed > 0 {
        bail!("{} graphile-worker jobs failed", result.failed);
    }
    Ok(result)
}
