//! The `table.cleanup` job: keeps the store small for years of operation.
//!
//! Every `task.table.cleanup.schedule` seconds (and when an admin asks: `POST
//! /v1/cleanup?action=run`, `drover purge`) one run:
//! 1. makes processes older than `process.max_age.seconds` ready, so the engine ends them now
//!    (a process can never stay unfinished forever, so every row is eventually purgeable);
//! 2. schedules `<type>.purge` for every resource left `removed` (removed → purging → purged
//!    through the engine) and waits, boundedly, for those purges to end;
//! 3. deletes, in batches of `cleanup.query_limit.rows`, events older than
//!    `events.purge.after.seconds`, finished processes older than
//!    `process_instance.purge.after.seconds` and purged resources removed longer than
//!    `main_tables.purge.after.seconds`, keeping (and counting) rows still referenced; on
//!    PostgreSQL with autovacuum off it `VACUUM (ANALYZE)`s each table after its deletes, or
//!    the files would grow without bound (the space of deleted rows is reused only after a
//!    vacuum; see BENCHMARKS.md, "Store size under load").
//!
//! Settings are read at the start of each run, so a change applies to the next run; a change
//! of the interval reschedules the next run at once. Runs never overlap.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_engine::defs;
use drover_store::{CLEANUP_STEPS, CleanupAge, NewProcess, ResourceKind, ScheduleError};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::state::AppState;

/// How long a run waits for the purge processes it scheduled before it deletes.
const PURGE_WAIT: Duration = Duration::from_secs(10);
/// Delay of the first run after start, unless the interval is shorter.
const INITIAL_DELAY_MS: i64 = 15_000;

/// What one run did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// `schedule` or `api`.
    pub trigger: &'static str,
    /// When it started (epoch ms).
    pub started: i64,
    /// When it ended (epoch ms).
    pub ended: i64,
    /// Overdue processes made ready so the engine ends them.
    pub overdue_processes_woken: u64,
    /// Purge processes scheduled for removed resources.
    pub purges_scheduled: u64,
    /// Purge processes still running when the run stopped waiting for them.
    pub purges_unfinished: i64,
    /// Per table, in the order cleaned.
    pub tables: Vec<TableReport>,
    /// Rows deleted, all tables.
    pub deleted: u64,
    /// Old rows kept because they are referenced, all tables.
    pub kept: u64,
    /// Why the run stopped early, if it did.
    pub error: Option<String>,
}

/// What one run did to one table.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TableReport {
    /// The table.
    pub table: &'static str,
    /// The setting that set its age.
    pub setting: &'static str,
    /// Rows older than this (epoch ms) were eligible.
    pub cutoff: i64,
    /// Rows deleted.
    pub deleted: u64,
    /// Old rows kept because they are referenced.
    pub kept: u64,
    /// Whether the run vacuumed the table (PostgreSQL with autovacuum off).
    pub vacuumed: bool,
}

/// The job's shared handle: serializes runs and remembers the last one.
#[derive(Debug, Clone, Default)]
pub struct Cleanup {
    running: Arc<tokio::sync::Mutex<()>>,
    status: Arc<Mutex<Status>>,
}

#[derive(Debug, Default)]
struct Status {
    last: Option<Report>,
    next_run: Option<i64>,
}

fn age_setting(age: CleanupAge) -> &'static str {
    match age {
        CleanupAge::Events => "events.purge.after.seconds",
        CleanupAge::Processes => "process_instance.purge.after.seconds",
        CleanupAge::MainTables => "main_tables.purge.after.seconds",
        CleanupAge::IdempotencyKeys => "api.idempotency.ttl.seconds",
    }
}

impl Cleanup {
    /// The last run's report, if any ran since start.
    pub fn last(&self) -> Option<Report> {
        self.lock().last.clone()
    }

    /// When the next scheduled run is due (epoch ms).
    pub fn next_run(&self) -> Option<i64> {
        self.lock().next_run
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs now (after a run in progress ends) and returns its report.
    pub async fn run_now(&self, state: &AppState, trigger: &'static str) -> Report {
        let _running = self.running.lock().await;
        let report = run_once(state, trigger).await;
        let metrics = &state.metrics;
        metrics.cleanup_runs.increment(1);
        metrics
            .cleanup_purges_scheduled
            .increment(report.purges_scheduled);
        metrics.cleanup_last_run.set(report.ended as f64 / 1000.0);
        metrics
            .cleanup_last_duration
            .set((report.ended - report.started) as f64 / 1000.0);
        for table in &report.tables {
            if let Some((_, deleted, kept)) = metrics
                .cleanup_tables
                .iter()
                .find(|(name, _, _)| *name == table.table)
            {
                deleted.increment(table.deleted);
                kept.set(table.kept as f64);
            }
        }
        let per_table: Vec<String> = report
            .tables
            .iter()
            .filter(|table| table.deleted > 0 || table.kept > 0)
            .map(|table| {
                format!(
                    "{}: {} deleted, {} kept",
                    table.table, table.deleted, table.kept
                )
            })
            .collect();
        match &report.error {
            None => tracing::info!(
                trigger,
                deleted = report.deleted,
                kept = report.kept,
                purges_scheduled = report.purges_scheduled,
                overdue_processes_woken = report.overdue_processes_woken,
                millis = report.ended - report.started,
                tables = %per_table.join("; "),
                "table.cleanup done"
            ),
            Some(error) => tracing::warn!(
                trigger,
                deleted = report.deleted,
                kept = report.kept,
                %error,
                tables = %per_table.join("; "),
                "table.cleanup stopped early; the next run goes on"
            ),
        }
        self.lock().last = Some(report.clone());
        report
    }
}

/// The task's name in `cluster_task_run`.
const TASK: &str = "table.cleanup";

/// The periodic job: runs until shutdown.
pub async fn run(state: AppState, shutdown: CancellationToken) {
    let cleanup = state.cleanup.clone();
    let mut changed = state.settings.watch();
    let mut leadership = state.cluster.leadership();
    let started = now_millis();
    loop {
        let interval = state
            .settings
            .int("task.table.cleanup.schedule")
            .saturating_mul(1000)
            .max(1);
        // Once per cluster: only the leader runs it, due after the cluster's last run (a
        // node that takes the duty over keeps the schedule).
        let leader = state.cluster.is_leader();
        let last = if leader {
            state.store.last_task_run(TASK).await.ok().flatten()
        } else {
            None
        };
        let due = match last.or_else(|| cleanup.last().map(|last| last.ended)) {
            Some(last) => last.saturating_add(interval),
            None => started.saturating_add(interval.min(INITIAL_DELAY_MS)),
        };
        cleanup.lock().next_run = leader.then_some(due);
        let wait = Duration::from_millis((due - now_millis()).max(0) as u64);
        tokio::select! {
            () = tokio::time::sleep(wait), if leader => {
                if state.cluster.begin_task(TASK).await {
                    cleanup.run_now(&state, "schedule").await;
                }
            }
            // Leadership came or went: compute the due time again.
            result = leadership.changed() => {
                if result.is_err() {
                    return;
                }
            }
            // A setting changed: compute the due time again.
            result = changed.changed() => {
                if result.is_err() {
                    return;
                }
            }
            () = shutdown.cancelled() => return,
        }
    }
}

async fn run_once(state: &AppState, trigger: &'static str) -> Report {
    let started = now_millis();
    let mut report = Report {
        trigger,
        started,
        ended: started,
        overdue_processes_woken: 0,
        purges_scheduled: 0,
        purges_unfinished: 0,
        tables: Vec::new(),
        deleted: 0,
        kept: 0,
        error: None,
    };
    if let Err(error) = clean(state, &mut report).await {
        report.error = Some(error.to_string());
    }
    report.ended = now_millis();
    report
}

async fn clean(state: &AppState, report: &mut Report) -> Result<(), drover_store::Error> {
    let settings = &state.settings;
    let store = &state.store;
    let batch = settings.int("cleanup.query_limit.rows").max(1);

    // 1. Nothing stays unfinished past its max age (plus a lease, so a running attempt
    //    is not disturbed).
    let max_age = settings
        .int("process.max_age.seconds")
        .saturating_mul(1000)
        .saturating_add(settings.int("process.lease.millis"));
    report.overdue_processes_woken = store.wake_overdue_processes(max_age).await?;
    if report.overdue_processes_woken > 0 {
        state.engine.wake();
    }

    // 2. Removed resources are purged through the engine before they can be deleted.
    let mut last_purge = 0;
    for kind in ResourceKind::ALL {
        let Some(def) = defs::action(kind, "purge") else {
            continue;
        };
        let mut after = 0;
        loop {
            let removed = store.removed_resources(kind, after, batch).await?;
            for &id in &removed {
                let new = NewProcess {
                    kind,
                    resource_id: id,
                    start_states: def.start.iter().map(|state| (*state).to_owned()).collect(),
                    cancel_pending: false,
                    steps: defs::plan_with(
                        def,
                        "removed",
                        &serde_json::Map::new(),
                        &state.external,
                        None,
                    ),
                    data: serde_json::Map::new(),
                    node: state.engine.node().to_owned(),
                };
                match store.schedule(new).await {
                    Ok(scheduled) => {
                        state.engine.stats().scheduled(&scheduled.process);
                        report.purges_scheduled += 1;
                        last_purge = last_purge.max(scheduled.process.id);
                        state
                            .changes
                            .changed(&scheduled.resource, Some(&scheduled.previous_state));
                    }
                    // Something else holds it or moved it: a later run sees it again.
                    Err(
                        ScheduleError::Busy { .. }
                        | ScheduleError::InvalidState { .. }
                        | ScheduleError::NotFound,
                    ) => {}
                    Err(ScheduleError::Store(error)) => return Err(error),
                }
            }
            state.engine.wake();
            match removed.last() {
                Some(&last) if removed.len() as i64 == batch => after = last,
                _ => break,
            }
        }
    }
    if last_purge > 0 {
        let deadline = Instant::now() + PURGE_WAIT;
        loop {
            let pending = store.pending_purges(last_purge).await?;
            report.purges_unfinished = pending;
            if pending == 0 || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // 3. Delete what is old enough, children before parents. Without autovacuum, PostgreSQL
    //    reuses the space of deleted and updated rows only after a VACUUM, so each table is
    //    vacuumed after its deletes (all of them: processes and resources are updated between
    //    clean-ups too, agents and hosts at every ping change).
    let vacuum = store.autovacuum_off().await?;
    for step in CLEANUP_STEPS {
        let setting = age_setting(step.age);
        let cutoff = now_millis() - settings.int(setting).saturating_mul(1000);
        let mut deleted = 0;
        loop {
            let count = store.cleanup_batch(step, cutoff, batch).await?;
            deleted += count;
            report.deleted += count;
            if (count as i64) < batch {
                break;
            }
            // Let the engine and the API in between batches.
            tokio::task::yield_now().await;
        }
        let kept = store.cleanup_kept(step, cutoff).await?;
        report.kept += kept;
        if vacuum {
            store.vacuum(step).await?;
        }
        report.tables.push(TableReport {
            table: step.table,
            setting,
            cutoff,
            deleted,
            kept,
            vacuumed: vacuum,
        });
    }
    Ok(())
}

/// The report as the API shows it.
pub fn render(base: &str, report: &Report) -> serde_json::Value {
    let mut value = serde_json::to_value(report).unwrap_or_default();
    value["type"] = "cleanupReport".into();
    value["startedAt"] = rfc3339(report.started).into();
    value["endedAt"] = rfc3339(report.ended).into();
    value["links"] = serde_json::json!({"cleanup": format!("{base}/cleanup")});
    value
}

fn rfc3339(millis: i64) -> String {
    chrono::DateTime::from_timestamp_millis(millis)
        .map(|time| time.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_default()
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
