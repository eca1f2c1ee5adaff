//! The engine's counters and histograms, for the server's `/metrics`.
//!
//! Every series is an atomic made when the engine is built: one slot per process definition
//! (the fixed table of [`crate::defs::DEFINITIONS`]) and one for names outside it, so the label
//! set is bounded whatever the store holds. Counting an attempt or a finish is a lookup in a map
//! that never changes after construction and a few relaxed atomic adds: no lock, no allocation.
//! The counts are this node's (its API and jobs scheduled, its engine ran); the server renders
//! them in the Prometheus text format.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use drover_store::ProcessInstance;

use crate::defs::DEFINITIONS;

/// The label of process names outside the definition table.
pub const OTHER_PROCESS: &str = "other";

/// How a process ended, as the engine recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Its handler succeeded: the resource is in its done state.
    Success = 0,
    /// It failed for good (attempts or age used up, a permanent error, an unknown process).
    Failure = 1,
    /// A handler failed and named the process to run instead (`onError`).
    Chain = 2,
    /// It no longer applied (its resource changed state or is gone).
    Canceled = 3,
}

impl Ended {
    /// Every result, in label order.
    pub const ALL: [Ended; 4] = [
        Ended::Success,
        Ended::Failure,
        Ended::Chain,
        Ended::Canceled,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Ended::Success => "success",
            Ended::Failure => "failure",
            Ended::Chain => "chain",
            Ended::Canceled => "canceled",
        }
    }
}

/// Upper bounds, in seconds, of the process duration buckets: from a reply at once to
/// `process.max_age.seconds` (30 minutes by default).
pub const PROCESS_SECONDS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

/// A histogram with fixed buckets: one atomic count per bucket (and one past the last bound)
/// and the sum in microseconds. Observing is a search of the bounds and two atomic adds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Box<[AtomicU64]>,
    sum_micros: AtomicU64,
}

/// What a [`Histogram`] holds at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound, observations ≤ bound)`, cumulative, the last bound `+Inf`.
    pub buckets: Vec<(f64, u64)>,
    /// Observations (the `+Inf` bucket).
    pub count: u64,
    /// Their sum, in seconds.
    pub sum: f64,
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending).
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Records one observation of `seconds` (negative counts as 0).
    pub fn observe(&self, seconds: f64) {
        let seconds = seconds.max(0.0);
        let bucket = self.bounds.partition_point(|bound| *bound < seconds);
        self.counts[bucket].fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add((seconds * 1_000_000.0) as u64, Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|count| count.load(Relaxed)).sum()
    }

    /// The cumulative buckets, count and sum (count and the `+Inf` bucket always agree).
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0;
        let mut buckets = Vec::with_capacity(self.counts.len());
        for (index, count) in self.counts.iter().enumerate() {
            total += count.load(Relaxed);
            let bound = self.bounds.get(index).copied().unwrap_or(f64::INFINITY);
            buckets.push((bound, total));
        }
        HistogramSnapshot {
            buckets,
            count: total,
            sum: self.sum_micros.load(Relaxed) as f64 / 1_000_000.0,
        }
    }
}

/// The counters of one process name.
#[derive(Debug)]
pub struct ProcessCounters {
    /// The process name (or [`OTHER_PROCESS`]).
    pub name: &'static str,
    /// Processes scheduled for the engine (pending steps; hops, applied at once, are not).
    pub scheduled: AtomicU64,
    /// Attempts started.
    pub attempts: AtomicU64,
    /// Attempts that failed and were scheduled again after a backoff.
    pub retries: AtomicU64,
    /// Times the claim put the process back to wait (for a host, for its agent).
    pub waits: AtomicU64,
    /// Processes ended, by [`Ended`].
    pub ended: [AtomicU64; 4],
    /// Scheduled → ended, in seconds, of the processes ended.
    pub duration: Histogram,
}

impl ProcessCounters {
    fn new(name: &'static str) -> ProcessCounters {
        ProcessCounters {
            name,
            scheduled: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            waits: AtomicU64::new(0),
            ended: Default::default(),
            duration: Histogram::new(PROCESS_SECONDS),
        }
    }

    /// Counts a process that ended, `millis` after it was scheduled.
    pub fn ended(&self, ended: Ended, millis: i64) {
        self.ended[ended as usize].fetch_add(1, Relaxed);
        self.duration.observe(millis as f64 / 1000.0);
    }

    /// Whether anything was counted for this name.
    pub fn touched(&self) -> bool {
        self.scheduled.load(Relaxed) > 0
            || self.attempts.load(Relaxed) > 0
            || self.waits.load(Relaxed) > 0
            || self.duration.count() > 0
    }
}

/// The engine's counters: one [`ProcessCounters`] per process definition and one for other
/// names.
#[derive(Debug)]
pub struct ProcessStats {
    index: HashMap<&'static str, usize>,
    processes: Box<[ProcessCounters]>,
}

impl Default for ProcessStats {
    fn default() -> Self {
        ProcessStats::new()
    }
}

impl ProcessStats {
    /// Zeroed counters for every process definition.
    pub fn new() -> ProcessStats {
        let processes: Box<[ProcessCounters]> = DEFINITIONS
            .iter()
            .map(|def| def.name)
            .chain([OTHER_PROCESS])
            .map(ProcessCounters::new)
            .collect();
        let index = DEFINITIONS
            .iter()
            .enumerate()
            .map(|(index, def)| (def.name, index))
            .collect();
        ProcessStats { index, processes }
    }

    /// The counters of a process name (a name outside the table counts as [`OTHER_PROCESS`]).
    pub fn of(&self, name: &str) -> &ProcessCounters {
        let slot = self
            .index
            .get(name)
            .copied()
            .unwrap_or(self.processes.len() - 1);
        &self.processes[slot]
    }

    /// Every name's counters, in the definition table's order, [`OTHER_PROCESS`] last.
    pub fn all(&self) -> &[ProcessCounters] {
        &self.processes
    }

    /// Counts a process a scheduling transaction recorded, if it is pending (a hop, applied
    /// in that transaction, is not run by the engine and not counted).
    pub fn scheduled(&self, process: &ProcessInstance) {
        if process.end_time.is_none() {
            self.of(&process.process_name)
                .scheduled
                .fetch_add(1, Relaxed);
        }
    }

    /// Counts one process by name as scheduled.
    pub fn scheduled_named(&self, name: &str) {
        self.of(name).scheduled.fetch_add(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_bounds_inclusive() {
        static BOUNDS: &[f64] = &[0.1, 1.0];
        let histogram = Histogram::new(BOUNDS);
        for seconds in [0.05, 0.1, 0.5, 1.0, 7.0, -3.0] {
            histogram.observe(seconds);
        }
        let snapshot = histogram.snapshot();
        assert_eq!(
            snapshot.buckets,
            vec![(0.1, 3), (1.0, 5), (f64::INFINITY, 6)]
        );
        assert_eq!(snapshot.count, 6);
        assert!((snapshot.sum - 8.65).abs() < 1e-6, "{}", snapshot.sum);
    }

    #[test]
    fn names_outside_the_table_share_one_slot() {
        let stats = ProcessStats::new();
        stats.scheduled_named("instance.start");
        stats.scheduled_named("no.such.process");
        stats.scheduled_named("another.unknown");
        assert_eq!(stats.of("instance.start").scheduled.load(Relaxed), 1);
        assert_eq!(stats.of(OTHER_PROCESS).scheduled.load(Relaxed), 2);
        assert_eq!(stats.all().len(), DEFINITIONS.len() + 1);
        assert_eq!(stats.all().last().unwrap().name, OTHER_PROCESS);
    }
}
