//! What every benchmark shares: child servers, free ports, CPU and memory readings, percentiles.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

/// The admin key the bench gives the drover server it starts.
pub const ACCESS_KEY: &str = "BENCHACCESSKEY0000001";
/// Its secret.
pub const SECRET_KEY: &str = "bench-secret-key-0123456789abcdefghijklmnopqrstuv";

/// The event name every benchmark publishes and subscribes to.
pub const EVENT_NAME: &str = "bench.event";

/// A free port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Raises the open-files soft limit to the hard limit; child processes inherit it.
pub fn raise_nofile() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(error) => {
            eprintln!("warning: could not raise the open-files limit: {error}");
            rlimit::getrlimit(rlimit::Resource::NOFILE)
                .map(|(soft, _)| soft)
                .unwrap_or(0)
        }
    }
}

/// A server process started by the bench. Killed when dropped, so an error anywhere still
/// stops it.
#[derive(Debug)]
pub struct ServerChild {
    child: Child,
    /// Its process id.
    pub pid: u32,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its data directory and log (removed on drop).
    dir: tempfile::TempDir,
    /// What it is, for messages.
    pub what: &'static str,
}

impl ServerChild {
    /// `http://127.0.0.1:port`.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The last lines of the child's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Fails if the child has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited early ({status}); its log ends with:\n{}",
                self.what,
                self.log_tail()
            );
        }
        Ok(())
    }

    /// Kills the child and waits for it (bounded).
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

fn spawn_logged(mut command: Command, dir: &Path) -> Result<Child> {
    let log = std::fs::File::create(dir.join("server.log"))?;
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    command.spawn().context("spawn server")
}

/// Where `drover` is: next to this binary (both in `target/release`), else the given path.
pub fn drover_bin(given: Option<&Path>) -> Result<PathBuf> {
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

/// Starts `drover server` on a free loopback port with a fresh data directory and the bench's
/// admin key, and waits for `GET /healthz`.
pub async fn start_drover(bin: &Path, queue: Option<u64>) -> Result<ServerChild> {
    let port = free_port()?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let dir = tempfile::Builder::new().prefix("drover-bench-").tempdir()?;
    let mut command = Command::new(bin);
    command
        .arg("server")
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--data-dir")
        .arg(dir.path())
        .env("DROVER_ADMIN_ACCESS_KEY", ACCESS_KEY)
        .env("DROVER_ADMIN_SECRET_KEY", SECRET_KEY)
        .env("DROVER_LOG", "warn");
    if let Some(queue) = queue {
        command.env("DROVER_SUBSCRIBE_MAX_QUEUED_MESSAGES", queue.to_string());
    }
    if let Some(threads) = server_threads() {
        command.env("TOKIO_WORKER_THREADS", threads.to_string());
    }
    let child = spawn_logged(command, dir.path())?;
    let pid = child.id().context("child pid")?;
    let mut server = ServerChild {
        child,
        pid,
        addr,
        dir,
        what: "drover server",
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        server.check_alive()?;
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
                "drover did not answer /healthz within 30 s; log:\n{}",
                server.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts `nats-server -a 127.0.0.1 -p PORT` and waits until it accepts connections.
pub async fn start_nats(bin: &Path) -> Result<ServerChild> {
    let port = free_port()?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let dir = tempfile::Builder::new().prefix("nats-bench-").tempdir()?;
    let mut command = Command::new(bin);
    command
        .arg("-a")
        .arg("127.0.0.1")
        .arg("-p")
        .arg(port.to_string());
    if let Some(threads) = server_threads() {
        command.env("GOMAXPROCS", threads.to_string());
    }
    let child = spawn_logged(command, dir.path())?;
    let pid = child.id().context("child pid")?;
    let mut server = ServerChild {
        child,
        pid,
        addr,
        dir,
        what: "nats-server",
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        server.check_alive()?;
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(server);
        }
        if Instant::now() > deadline {
            bail!("nats-server did not listen within 15 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Resident memory of a process in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS line")
}

/// CPU time (user + system) of a process so far, in clock ticks. `who` is a pid or "self".
fn cpu_ticks(who: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{who}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the state;
    // cutime and cstime (children waited for, such as wrk) follow.
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    let own = field(11)? + field(12)?;
    Some(if who == "self" {
        own + field(13)? + field(14)?
    } else {
        own
    })
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

/// Busy and total jiffies of the whole machine (first line of `/proc/stat`).
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

fn server_threads() -> Option<usize> {
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
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
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
        let busy = (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64 * cores * 100.0;
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
    pid: String,
    start: Instant,
    server: u64,
    bench: u64,
    machine: Option<(u64, u64)>,
}

impl CpuMeter {
    /// Readings now.
    pub fn start(pid: u32) -> CpuMeter {
        let pid = pid.to_string();
        CpuMeter {
            server: cpu_ticks(&pid).unwrap_or(0),
            bench: cpu_ticks("self").unwrap_or(0),
            machine: machine_ticks(),
            start: Instant::now(),
            pid,
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
        let server = pct(cpu_ticks(&self.pid), self.server);
        let bench = pct(cpu_ticks("self"), self.bench);
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
            other: (machine - server - bench).max(0.0),
            capacity: cores * 100.0,
        }
    }
}

/// Starts `perf record` on a process for `seconds`, if asked to; the caller waits on it.
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

/// Waits (bounded) for a `perf record` started by [`start_perf`].
pub async fn finish_perf(child: Option<std::process::Child>, out: Option<&Path>) {
    let Some(mut child) = child else { return };
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
        let at = |q: f64| {
            let idx = ((samples.len() as f64 - 1.0) * q).round() as usize;
            samples[idx.min(samples.len() - 1)] as f64 / 1000.0
        };
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
