//! The fan-out harness shared by drover and the NATS baseline: a fleet of subscribers that
//! count frames (a few also measure latency), and publish phases paced or flow-controlled
//! against what the fleet has received so far.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::common::{self, CpuMeter, CpuSplit, EVENT_NAME, Latency};

/// The most latency samples one sampled subscriber keeps per phase.
const MAX_SAMPLES: usize = 2_000_000;
/// How long a drain after publishing may take.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// How long subscribers may take to connect and get their first `ping`, in all.
const CONNECT_LIMIT: Duration = Duration::from_secs(240);

/// One subscriber's delivery counter, on its own cache line (only its task writes it).
#[derive(Debug, Default)]
#[repr(align(64))]
struct Slot(AtomicU64);

/// What the subscriber tasks share.
#[derive(Debug)]
struct Shared {
    counts: Vec<Slot>,
    ready: AtomicUsize,
    failed: AtomicUsize,
    first_error: Mutex<Option<String>>,
    closed: AtomicUsize,
    close_reasons: Mutex<Vec<String>>,
}

/// A fleet of subscribers.
#[derive(Debug)]
pub struct Fleet {
    /// How many.
    pub n: usize,
    shared: Arc<Shared>,
    samples: Vec<Arc<Mutex<Vec<u64>>>>,
    /// The subscriber tasks; aborted when the fleet is dropped.
    pub tasks: JoinSet<()>,
    epoch: Instant,
}

/// One subscriber's end of the fleet.
#[derive(Debug)]
pub struct Member {
    shared: Arc<Shared>,
    index: usize,
    local: u64,
    sample: Option<Arc<Mutex<Vec<u64>>>>,
    epoch: Instant,
}

/// Whether a frame is a bench event (not a `ping`): the name sits at a fixed offset in the
/// event JSON (`{"id":"<36-char uuid>","name":"`), so this is one compare in the common case.
fn is_bench_event(frame: &[u8]) -> bool {
    const AT: usize = 52;
    if frame.get(AT..AT + EVENT_NAME.len()) == Some(EVENT_NAME.as_bytes()) {
        return true;
    }
    let head = &frame[..frame.len().min(128)];
    head.windows(EVENT_NAME.len())
        .any(|window| window == EVENT_NAME.as_bytes())
}

impl Member {
    /// Counts a received frame; a sampled subscriber also records its latency.
    #[inline]
    pub fn on_frame(&mut self, frame: &[u8]) {
        if !is_bench_event(frame) {
            return;
        }
        self.local += 1;
        self.shared.counts[self.index]
            .0
            .store(self.local, Ordering::Relaxed);
        if let Some(sample) = &self.sample {
            let now = common::nanos_since(self.epoch);
            if let Some(sent) = common::sent_at(frame) {
                let mut sample = sample.lock().unwrap_or_else(|p| p.into_inner());
                if sample.len() < MAX_SAMPLES {
                    sample.push(now.saturating_sub(sent));
                }
            }
        }
    }

    /// The subscriber is connected and subscribed.
    pub fn ready(&self) {
        self.shared.ready.fetch_add(1, Ordering::Relaxed);
    }

    /// The subscriber could not connect.
    pub fn failed(&self, error: impl std::fmt::Display) {
        self.shared
            .first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| error.to_string());
        self.shared.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// The server closed the subscription (or it failed) after it was ready.
    pub fn closed(&self, reason: impl std::fmt::Display) {
        let mut reasons = self
            .shared
            .close_reasons
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if reasons.len() < 5 {
            reasons.push(reason.to_string());
        }
        self.shared.closed.fetch_add(1, Ordering::Relaxed);
    }
}

impl Fleet {
    /// An empty fleet of `n` subscribers.
    pub fn new(n: usize, epoch: Instant) -> Fleet {
        Fleet {
            n,
            shared: Arc::new(Shared {
                counts: (0..n).map(|_| Slot::default()).collect(),
                ready: AtomicUsize::new(0),
                failed: AtomicUsize::new(0),
                first_error: Mutex::new(None),
                closed: AtomicUsize::new(0),
                close_reasons: Mutex::new(Vec::new()),
            }),
            samples: Vec::new(),
            tasks: JoinSet::new(),
            epoch,
        }
    }

    /// The members to hand to the subscriber tasks, in connection order; `samples` of them,
    /// spread evenly across that order, measure latency (the hub delivers in subscription
    /// order, so the first few would be the luckiest).
    pub fn members(&mut self, samples: usize) -> Vec<Member> {
        let samples = samples.min(self.n);
        let stride = self.n.checked_div(samples).map_or(usize::MAX, |s| s.max(1));
        (0..self.n)
            .map(|index| {
                let sample = (index % stride == 0 && index / stride < samples).then(|| {
                    let sample = Arc::new(Mutex::new(Vec::new()));
                    self.samples.push(sample.clone());
                    sample
                });
                Member {
                    shared: self.shared.clone(),
                    index,
                    local: 0,
                    sample,
                    epoch: self.epoch,
                }
            })
            .collect()
    }

    /// Waits until every subscriber is ready (or fails on the first that could not connect).
    pub async fn wait_ready(&self, what: &str) -> Result<Duration> {
        let start = Instant::now();
        let mut last_print = Instant::now();
        loop {
            let ready = self.shared.ready.load(Ordering::Relaxed);
            let failed = self.shared.failed.load(Ordering::Relaxed);
            if failed > 0 {
                let error = self
                    .shared
                    .first_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .unwrap_or_default();
                bail!("{failed} of {} {what} subscribers failed: {error}", self.n);
            }
            if ready >= self.n {
                return Ok(start.elapsed());
            }
            if start.elapsed() > CONNECT_LIMIT {
                bail!(
                    "only {ready} of {} {what} subscribers ready after {CONNECT_LIMIT:?}",
                    self.n
                );
            }
            if last_print.elapsed() > Duration::from_secs(5) {
                println!("  … {ready}/{} subscribers ready", self.n);
                last_print = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Bench events received by all subscribers so far.
    pub fn delivered(&self) -> u64 {
        sum(&self.shared.counts)
    }

    /// Subscriptions the server closed after they were ready, with a few reasons.
    pub fn closed(&self) -> (usize, Vec<String>) {
        (
            self.shared.closed.load(Ordering::Relaxed),
            self.shared
                .close_reasons
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }

    /// Takes the latency samples gathered since the last call.
    fn take_samples(&self) -> Vec<u64> {
        let mut all = Vec::new();
        for sample in &self.samples {
            all.append(&mut sample.lock().unwrap_or_else(|p| p.into_inner()));
        }
        all
    }
}

fn sum(counts: &[Slot]) -> u64 {
    counts
        .iter()
        .map(|slot| slot.0.load(Ordering::Relaxed))
        .sum()
}

/// How a phase publishes.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// As fast as the fleet takes events, keeping at most `window` events per subscriber
    /// in flight.
    Max,
    /// At a fixed rate of events per second (open loop, with a safety cap on the backlog).
    Paced(f64),
}

/// The limits of one phase.
#[derive(Debug, Clone, Copy)]
pub struct PhaseLimits {
    /// Publishing stops after this long.
    pub seconds: f64,
    /// … or after this many events.
    pub max_events: u64,
    /// Events in flight per subscriber (on average) in [`Mode::Max`].
    pub window: u64,
    /// Concurrent publish requests.
    pub publishers: usize,
}

/// Sends one event; `Ok(false)` when the server refused it.
pub trait Publish: Clone + Send + Sync + 'static {
    /// Publishes one event whose JSON is `body`.
    fn publish(&self, body: String) -> impl Future<Output = Result<bool>> + Send;
}

/// What a phase measured.
#[derive(Debug, Clone)]
pub struct PhaseResult {
    /// The mode.
    pub mode: Mode,
    /// Events the server accepted.
    pub published: u64,
    /// Events refused or failed.
    pub publish_errors: u64,
    /// Events per second published.
    pub publish_rate: f64,
    /// Bench events received by all subscribers.
    pub delivered: u64,
    /// `published × subscribers`.
    pub expected: u64,
    /// `delivered / (last delivery − first publish)`.
    pub deliveries_per_sec: f64,
    /// Publish → deliver latency at the sampled subscribers.
    pub latency: Latency,
    /// CPU of server and bench over the phase.
    pub cpu: CpuSplit,
    /// Publishes held back by the backlog cap in paced mode.
    pub throttled: u64,
    /// Subscriptions closed during the phase (slow consumers, errors).
    pub closed: usize,
    /// The flow-control window of the phase.
    pub window: u64,
}

impl PhaseResult {
    /// Prints the result, indented.
    pub fn print(&self, n: usize) {
        let mode = match self.mode {
            Mode::Max => format!("max rate, {} events in flight per subscriber", self.window),
            Mode::Paced(rate) => format!("paced at {} events/s", common::rate(rate)),
        };
        println!("  [{mode}]");
        println!(
            "    published {} events ({} errors), {} events/s",
            self.published,
            self.publish_errors,
            common::rate(self.publish_rate)
        );
        println!(
            "    delivered {} of {} ({} subscribers): {} deliveries/s",
            self.delivered,
            self.expected,
            n,
            common::rate(self.deliveries_per_sec)
        );
        println!("    publish→deliver latency: {}", self.latency);
        println!("    CPU: {}", self.cpu);
        common::warn_if_disturbed(&self.cpu);
        if self.throttled > 0 {
            println!(
                "    note: {} publishes waited for the backlog cap (the rate was more than the fleet took)",
                self.throttled
            );
        }
        if self.closed > 0 {
            println!(
                "    WARNING: {} subscriptions were closed during the phase",
                self.closed
            );
        }
    }
}

/// Runs one publish phase against a ready fleet.
pub async fn run_phase<P: Publish>(
    fleet: &Fleet,
    publisher: P,
    mode: Mode,
    limits: PhaseLimits,
    pad: Arc<str>,
    server_pids: &[u32],
) -> Result<PhaseResult> {
    common::wait_quiet().await;
    let n = fleet.n as u64;
    let closed_before = fleet.closed().0;
    let _ = fleet.take_samples();
    let before = fleet.delivered();

    // The monitor sums the counters and wakes publishers waiting for room in the window.
    let delivered_total = Arc::new(AtomicU64::new(before));
    let notify = Arc::new(Notify::new());
    let interval = Duration::from_millis((fleet.n as u64 / 2000).clamp(1, 10));
    let monitor = {
        let shared = fleet.shared.clone();
        let delivered_total = delivered_total.clone();
        let notify = notify.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                delivered_total.store(sum(&shared.counts), Ordering::Relaxed);
                notify.notify_waiters();
            }
        })
    };

    let issued = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let throttled = Arc::new(AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let stop = Arc::new(AtomicBool::new(false));
    let window = match mode {
        Mode::Max => limits.window,
        Mode::Paced(_) => limits.window.saturating_mul(4),
    };
    let cpu = CpuMeter::start(server_pids);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(limits.seconds);
    let mut publishers = JoinSet::new();
    for _ in 0..limits.publishers.max(1) {
        let publisher = publisher.clone();
        let (issued, ok, errors, throttled, first_error, stop) = (
            issued.clone(),
            ok.clone(),
            errors.clone(),
            throttled.clone(),
            first_error.clone(),
            stop.clone(),
        );
        let (delivered_total, notify, pad) = (delivered_total.clone(), notify.clone(), pad.clone());
        let epoch = fleet.epoch;
        publishers.spawn(async move {
            loop {
                if stop.load(Ordering::Relaxed) || Instant::now() >= end {
                    break;
                }
                let ticket = issued.fetch_add(1, Ordering::Relaxed);
                if ticket >= limits.max_events {
                    break;
                }
                if let Mode::Paced(rate) = mode {
                    let at = start + Duration::from_secs_f64(ticket as f64 / rate);
                    if at >= end {
                        break;
                    }
                    tokio::time::sleep_until(at.into()).await;
                }
                // Room in the window: events sent (less failures) minus what the average
                // subscriber has received.
                let mut waited = false;
                loop {
                    let notified = notify.notified();
                    let sent = ticket + 1 - errors.load(Ordering::Relaxed).min(ticket + 1);
                    let done = delivered_total
                        .load(Ordering::Relaxed)
                        .saturating_sub(before)
                        / n;
                    if sent.saturating_sub(done) <= window || Instant::now() >= end {
                        break;
                    }
                    waited = true;
                    tokio::select! {
                        () = notified => {}
                        () = tokio::time::sleep(Duration::from_millis(5)) => {}
                    }
                }
                if waited && matches!(mode, Mode::Paced(_)) {
                    throttled.fetch_add(1, Ordering::Relaxed);
                }
                let body = common::event_json(epoch, &pad);
                match publisher.publish(body).await {
                    Ok(true) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(false) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert_with(|| format!("{error:#}"));
                        if errors.load(Ordering::Relaxed) > 1000 {
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                }
            }
        });
    }
    // Publishers stop by themselves at `end`; a publish request may still be in flight.
    let publish_deadline = end + Duration::from_secs(30);
    while !publishers.is_empty() {
        match tokio::time::timeout_at(publish_deadline.into(), publishers.join_next()).await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                publishers.abort_all();
                break;
            }
        }
    }
    let publish_secs = start.elapsed().as_secs_f64();
    let published = ok.load(Ordering::Relaxed);
    let expected = published * n;

    // Drain: wait until every accepted event reached every subscriber (bounded).
    let mut last = fleet.delivered();
    let mut last_progress = Instant::now();
    let drain_start = Instant::now();
    while last - before < expected && drain_start.elapsed() < DRAIN_LIMIT {
        tokio::time::sleep(Duration::from_millis(1)).await;
        let now = fleet.delivered();
        if now != last {
            last = now;
            last_progress = Instant::now();
        } else if last_progress.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    let total_secs = start.elapsed().as_secs_f64();
    let cpu = cpu.stop();
    monitor.abort();
    let delivered = last - before;
    if let Some(error) = first_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        println!("    first publish error: {error}");
    }
    let (closed, reasons) = fleet.closed();
    for reason in reasons {
        println!("    a subscription closed: {reason}");
    }
    Ok(PhaseResult {
        mode,
        published,
        publish_errors: errors.load(Ordering::Relaxed),
        publish_rate: published as f64 / publish_secs,
        delivered,
        expected,
        deliveries_per_sec: delivered as f64 / total_secs,
        latency: Latency::from_nanos(fleet.take_samples()),
        cpu,
        throttled: throttled.load(Ordering::Relaxed),
        closed: closed - closed_before,
        window,
    })
}

/// The max-rate phase, then (unless told not to) a paced phase at half the max event rate;
/// or only a paced phase at `rate` when one is given.
pub async fn run_phases<P: Publish>(
    fleet: &Fleet,
    publisher: P,
    limits: PhaseLimits,
    rate: Option<f64>,
    latency_run: bool,
    pad: Arc<str>,
    server_pids: &[u32],
) -> Result<Vec<PhaseResult>> {
    let mut results = Vec::new();
    let paced = match rate {
        Some(rate) => Some(rate),
        None => {
            let max = run_phase(
                fleet,
                publisher.clone(),
                Mode::Max,
                limits,
                pad.clone(),
                server_pids,
            )
            .await?;
            max.print(fleet.n);
            let half = max.publish_rate / 2.0;
            results.push(max);
            (latency_run && half > 0.0).then_some(half)
        }
    };
    if let Some(rate) = paced {
        let result = run_phase(
            fleet,
            publisher,
            Mode::Paced(rate),
            limits,
            pad,
            server_pids,
        )
        .await?;
        result.print(fleet.n);
        results.push(result);
    }
    Ok(results)
}
