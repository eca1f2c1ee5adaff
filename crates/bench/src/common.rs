//! What the event-bus benchmarks share: the servers under test (drover through [`harness`], or
//! nats-server), free ports, CPU readings, percentiles.
//!
//! [`harness`]: drover_bench::harness

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use drover_bench::harness::{
    ServerOptions, clock_ticks_per_second, cores, cpu_ticks, cpu_ticks_with_children, machine_busy,
    machine_ticks, quantile,
};
use tokio::process::{Child, Command};

/// The drover server the bench starts, its admin key, and the readings the benches use.
pub use drover_bench::harness::{
    ACCESS_KEY, SECRET_KEY, ServerChild, drover_bin, metric, rss_kib, wait_perf,
};

/// The event name every benchmark publishes and subscribes to.
pub const EVENT_NAME: &str = "bench.event";

/// A free port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind a free port")?;
    Ok(listener.local_addr()?.port())
}

/// `nats-server` started by the bench. Killed when dropped, so an error anywhere still stops
/// it.
#[derive(Debug)]
pub struct NatsChild {
    child: Child,
    /// Its process id.
    pub pid: u32,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its log (removed on drop).
    dir: tempfile::TempDir,
}

impl NatsChild {
    /// Kills the child and waits for it (bounded).
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// Starts `drover server` on a free loopback port with a fresh data directory and the bench's
/// admin key (with `--server-threads`, and `queue` as its subscriber queue), and waits (at most
/// 30 s) for `GET /healthz`.
pub async fn start_drover(bin: &Path, queue: Option<u64>) -> Result<ServerChild> {
    let options = ServerOptions {
        threads: server_threads(),
        queue,
        ..ServerOptions::default()
    };
    ServerChild::start(bin, &options, None, Duration::from_secs(30)).await
}

/// Starts `nats-server -a 127.0.0.1 -p PORT` and waits until it accepts connections.
pub async fn start_nats(bin: &Path) -> Result<NatsChild> {
    let port = free_port()?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let dir = tempfile::Builder::new().prefix("nats-bench-").tempdir()?;
    let log = std::fs::File::create(dir.path().join("server.log"))?;
    let mut command = Command::new(bin);
    command
        .arg("-a")
        .arg("127.0.0.1")
        .arg("-p")
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    if let Some(threads) = server_threads() {
        command.env("GOMAXPROCS", threads.to_string());
    }
    let child = command.spawn().context("spawn server")?;
    let pid = child.id().context("child pid")?;
    let mut server = NatsChild {
        child,
        pid,
        addr,
        dir,
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = server.child.try_wait()? {
            let log =
                std::fs::read_to_string(server.dir.path().join("server.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            bail!(
                "nats-server exited early ({status}); its log ends with:\n{}",
                lines[lines.len().saturating_sub(20)..].join("\n")
            );
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(server);
        }
        if Instant::now() > deadline {
            bail!("nats-server did not listen within 15 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// CPU used over an interval, in percent of one core (100% = one core busy).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSplit {
    /// The server process.
    pub server: f64,
    /// This bench process (publisher and subscribers) and the children it waited for
    /// (wrk).
    pub bench: f64,
    /// Everything else on the machine (other processes, unattributed kernel work).
    pub other: f64,
    /// What the machine has: 100% per core.
    pub capacity: f64,
}

impl std::fmt::Display for CpuSplit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "server {:.0}% + bench {:.0}% + rest of machine {:.0}% of one core ({:.0}% = all cores)",
            self.server, self.bench, self.other, self.capacity
        )
    }
}

impl CpuSplit {
    /// Whether something else on the machine took enough CPU to disturb the figures.
    pub fn disturbed(&self) -> bool {
        self.other > 15.0
    }
}

/// Worker threads for the servers the bench starts (0: their default, one per core):
/// `TOKIO_WORKER_THREADS` for drover, `GOMAXPROCS` for nats-server.
pub static SERVER_THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// [`SERVER_THREADS`], if set.
pub fn server_threads() -> Option<usize> {
    match SERVER_THREADS.load(std::sync::atomic::Ordering::Relaxed) {
        0 => None,
        n => Some(n),
    }
}

/// How long to wait for a quiet machine before a measurement, in seconds (0: don't).
pub static QUIET_WAIT_SECS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Waits (bounded by [`QUIET_WAIT_SECS`]) until the whole machine (the idle server and subscribers
/// included) uses less than 15% of one core over a second: other processes' CPU would disturb
/// the figures. Goes on with a warning when the machine stays busy.
pub async fn wait_quiet() {
    let limit = QUIET_WAIT_SECS.load(std::sync::atomic::Ordering::Relaxed);
    if limit == 0 {
        return;
    }
    let start = Instant::now();
    let mut told = false;
    loop {
        let Some((busy0, total0)) = machine_ticks() else {
            return;
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some((busy1, total1)) = machine_ticks() else {
            return;
        };
        let busy = machine_busy((busy0, total0), (busy1, total1)).unwrap_or(0.0);
        if busy < 15.0 {
            if told {
                println!(
                    "  machine quiet after {:.0} s",
                    start.elapsed().as_secs_f64()
                );
            }
            return;
        }
        if start.elapsed().as_secs() >= limit {
            println!(
                "  WARNING: the machine is still busy ({busy:.0}% of a core) after {limit} s; measuring anyway"
            );
            return;
        }
        if !told {
            println!("  waiting for a quiet machine ({busy:.0}% of a core busy elsewhere) …");
            told = true;
        }
    }
}

/// Warns when other processes were busy during a measurement.
pub fn warn_if_disturbed(cpu: &CpuSplit) {
    if cpu.disturbed() {
        println!(
            "    WARNING: other processes used {:.0}% of a core during this measurement; the figures are disturbed, run again on a quiet machine",
            cpu.other
        );
    }
}

/// Starts measuring CPU of the server and of this process.
#[derive(Debug)]
pub struct CpuMeter {
    pids: Vec<String>,
    start: Instant,
    server: u64,
    bench: u64,
    machine: Option<(u64, u64)>,
}

/// utime + stime summed over processes (one that is gone counts 0).
fn server_ticks(pids: &[String]) -> u64 {
    pids.iter().filter_map(|pid| cpu_ticks(pid)).sum()
}

impl CpuMeter {
    /// Readings now; the server is the processes `pids` (a cluster's nodes and its
    /// nats-server: their CPU is summed).
    pub fn start(pids: &[u32]) -> CpuMeter {
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        CpuMeter {
            server: server_ticks(&pids),
            bench: cpu_ticks_with_children("self").unwrap_or(0),
            machine: machine_ticks(),
            start: Instant::now(),
            pids,
        }
    }

    /// The split since `start`.
    pub fn stop(&self) -> CpuSplit {
        let wall = self.start.elapsed().as_secs_f64().max(1e-9);
        let hz = clock_ticks_per_second();
        let pct = |now: Option<u64>, then: u64| {
            now.map_or(0.0, |now| {
                (now.saturating_sub(then)) as f64 / hz / wall * 100.0
            })
        };
        let server = pct(Some(server_ticks(&self.pids)), self.server);
        let bench = pct(cpu_ticks_with_children("self"), self.bench);
        let machine = self
            .machine
            .zip(machine_ticks())
            .and_then(|(before, after)| machine_busy(before, after))
            .unwrap_or(server + bench);
        CpuSplit {
            server,
            bench,
            other: (machine - server - bench).max(0.0),
            capacity: cores() * 100.0,
        }
    }
}

/// Starts `perf record` on a process for `seconds`, if asked to; the caller waits on it with
/// [`wait_perf`].
pub fn start_perf(out: Option<&Path>, pid: u32, seconds: f64) -> Option<std::process::Child> {
    let out = out?;
    let child = std::process::Command::new("perf")
        .args(["record", "-F", "999", "-p", &pid.to_string(), "-o"])
        .arg(out)
        .args(["--", "sleep", &format!("{seconds:.0}")])
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

/// Latency percentiles of a sample, in microseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    /// How many samples.
    pub count: usize,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
}

impl Latency {
    /// Percentiles of nanosecond samples.
    pub fn from_nanos(mut samples: Vec<u64>) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_unstable();
        let at = |q: f64| quantile(&samples, q) as f64 / 1000.0;
        Latency {
            count: samples.len(),
            p50_us: at(0.50),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: at(1.0),
        }
    }
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.count == 0 {
            return write!(f, "no samples");
        }
        write!(
            f,
            "p50 {} p99 {} p99.9 {} max {} ({} samples)",
            us(self.p50_us),
            us(self.p99_us),
            us(self.p999_us),
            us(self.max_us),
            self.count
        )
    }
}

/// A duration in microseconds, printed in µs or ms.
pub fn us(value: f64) -> String {
    if value >= 1000.0 {
        format!("{:.2} ms", value / 1000.0)
    } else {
        format!("{value:.0} µs")
    }
}

/// A rate with thousands separators.
pub fn rate(value: f64) -> String {
    let whole = value.round() as u64;
    let text = whole.to_string();
    let mut out = String::new();
    for (i, ch) in text.chars().enumerate() {
        if i > 0 && (text.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Nanoseconds since the bench's shared start instant.
pub fn nanos_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}

/// The `data` a bench event carries: the send time and padding up to `payload_bytes`.
pub fn padding(payload_bytes: usize) -> String {
    "x".repeat(payload_bytes)
}

/// The JSON of one bench event, as drover delivers it (and as the NATS baseline sends it).
pub fn event_json(epoch: Instant, pad: &str) -> String {
    let t = nanos_since(epoch);
    drover_proto::Event::new(EVENT_NAME)
        .with_data(serde_json::json!({ "t": t, "pad": pad }))
        .to_json()
}

/// The send time in an event's data, for the sampled subscribers.
pub fn sent_at(text: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Probe {
        data: ProbeData,
    }
    #[derive(serde::Deserialize)]
    struct ProbeData {
        t: u64,
    }
    serde_json::from_slice::<Probe>(text)
        .ok()
        .map(|probe| probe.data.t)
}
