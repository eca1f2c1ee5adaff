//! The writer: one task per store that commits the engine's writes in batches (group commit).
//!
//! Callers (API creates and actions, the engine's claims, finishes, progress and lease
//! renewals) put a job on a bounded queue and wait for its answer. The writer takes the first
//! job, then everything else already queued (up to `max_batch`), waiting at most `window` for
//! more when the batch is not full, and runs them in one transaction: set-based statements
//! for creates, claims and finishes, one item at a time for the rest. Each caller is answered
//! only after the transaction that holds its change has committed, so an answer means durable.
//!
//! A refusal that concerns one item (a state check, a lock) is that item's answer and the
//! batch commits around it. A database error aborts the transaction; the writer then runs each
//! job of the batch alone, so the one that fails fails alone with its own error.
//!
//! A full queue makes callers wait (backpressure): memory is bounded by `queue` jobs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::db::{Tx, args};
use crate::model::{Resource, ResourceKind};
use crate::store::write::{
    self, ClaimRequest, Claimed, FinishItem, NewCreate, NewProcess, ProgressItem,
};
use crate::store::{IdempotencyKey, Idempotent, Pool, ScheduleError, Scheduled, now_millis};
use crate::{Error, Result};

/// How the writer batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterOptions {
    /// The most jobs waiting; callers wait when it is full.
    pub queue: usize,
    /// The most jobs in one transaction.
    pub max_batch: usize,
    /// How long to wait for more jobs when a batch is not full (zero: take what is queued).
    pub window: Duration,
    /// Transactions in flight at once. On PostgreSQL the next batch is written while the
    /// previous one waits for its commit (row locks order what they share); SQLite has one
    /// writer anyway, so it always uses one.
    pub pipeline: usize,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            queue: 8192,
            max_batch: 512,
            window: Duration::ZERO,
            pipeline: 4,
        }
    }
}

/// Counters of the writer, for `/metrics` and the benchmarks.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Transactions committed.
    pub batches: AtomicU64,
    /// Jobs answered.
    pub jobs: AtomicU64,
    /// Batches that failed and were run again one job at a time.
    pub split: AtomicU64,
    /// Jobs answered with a database error.
    pub failed: AtomicU64,
}

/// An owned [`IdempotencyKey`].
#[derive(Debug, Clone)]
pub(crate) struct OwnedKey {
    pub account_id: i64,
    pub key: String,
    pub fingerprint: String,
    pub ttl_ms: i64,
}

impl From<&IdempotencyKey<'_>> for OwnedKey {
    fn from(key: &IdempotencyKey<'_>) -> Self {
        OwnedKey {
            account_id: key.account_id,
            key: key.key.to_owned(),
            fingerprint: key.fingerprint.to_owned(),
            ttl_ms: key.ttl_ms,
        }
    }
}

type Answer<T> = oneshot::Sender<Result<T>>;

pub(crate) enum Job {
    Create(NewCreate, Answer<Scheduled>),
    CreateOnce(NewCreate, OwnedKey, Answer<Idempotent>),
    Schedule(
        NewProcess,
        oneshot::Sender<Result<Scheduled, ScheduleError>>,
    ),
    Claim(ClaimRequest, Answer<Vec<Claimed>>),
    Finish(Box<FinishItem>, Answer<Option<Resource>>),
    Progress(ProgressItem, Answer<Option<Resource>>),
    Renew(String, i64, Answer<u64>),
}

enum Output {
    Created(Scheduled),
    Once(Idempotent),
    Scheduled(Result<Scheduled, ScheduleError>),
    Claimed(Vec<Claimed>),
    Resource(Option<Resource>),
    Count(u64),
}

/// The handle callers queue jobs on.
#[derive(Debug, Clone)]
pub(crate) struct Writer {
    queue: mpsc::Sender<Job>,
    stats: Arc<WriterStats>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Job::Create(..) => "Create",
            Job::CreateOnce(..) => "CreateOnce",
            Job::Schedule(..) => "Schedule",
            Job::Claim(..) => "Claim",
            Job::Finish(..) => "Finish",
            Job::Progress(..) => "Progress",
            Job::Renew(..) => "Renew",
        })
    }
}

impl Writer {
    /// Starts the writer task on `pool`; it ends when every handle is dropped.
    pub(crate) fn start(pool: Pool, options: WriterOptions) -> Writer {
        let (queue, jobs) = mpsc::channel(options.queue.max(1));
        let stats = Arc::new(WriterStats::default());
        tokio::spawn(run(pool, jobs, options, stats.clone()));
        Writer { queue, stats }
    }

    pub(crate) fn stats(&self) -> &Arc<WriterStats> {
        &self.stats
    }

    /// Queues a job and waits for its answer.
    pub(crate) async fn submit<T>(&self, job: impl FnOnce(oneshot::Sender<T>) -> Job) -> Result<T> {
        let (answer, answered) = oneshot::channel();
        self.queue
            .send(job(answer))
            .await
            .map_err(|_| Error::Conflict("the store's writer has stopped".into()))?;
        answered
            .await
            .map_err(|_| Error::Conflict("the store's writer dropped a job".into()))
    }
}

async fn run(
    pool: Pool,
    mut jobs: mpsc::Receiver<Job>,
    options: WriterOptions,
    stats: Arc<WriterStats>,
) {
    let max = options.max_batch.max(1);
    let depth = match pool {
        Pool::Sqlite(_) => 1,
        Pool::Postgres(_) => options.pipeline.max(1),
    };
    let in_flight = Arc::new(tokio::sync::Semaphore::new(depth));
    let mut batch: Vec<Job> = Vec::with_capacity(max);
    while let Some(first) = jobs.recv().await {
        batch.push(first);
        while batch.len() < max {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if !options.window.is_zero() && batch.len() < max {
            let deadline = tokio::time::Instant::now() + options.window;
            while batch.len() < max {
                tokio::select! {
                    job = jobs.recv() => match job {
                        Some(job) => batch.push(job),
                        None => break,
                    },
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
        let batch = std::mem::take(&mut batch);
        if depth == 1 {
            commit(&pool, batch, &stats).await;
            continue;
        }
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (pool, stats) = (pool.clone(), stats.clone());
        tokio::spawn(async move {
            commit(&pool, batch, &stats).await;
            drop(permit);
        });
    }
}

/// Runs a batch in one transaction and answers its jobs; on a database error, runs each job
/// alone.
async fn commit(pool: &Pool, batch: Vec<Job>, stats: &WriterStats) {
    match apply(pool, &batch).await {
        Ok(outputs) => {
            stats.batches.fetch_add(1, Ordering::Relaxed);
            stats.jobs.fetch_add(batch.len() as u64, Ordering::Relaxed);
            for (job, output) in batch.into_iter().zip(outputs) {
                answer(job, Ok(output));
            }
        }
        Err(error) if batch.len() == 1 => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%error, "a store write failed");
            if let Some(job) = batch.into_iter().next() {
                answer(job, Err(error));
            }
        }
        Err(error) => {
            stats.split.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%error, jobs = batch.len(), "a batch failed; running its jobs one by one");
            for job in batch {
                Box::pin(commit(pool, vec![job], stats)).await;
            }
        }
    }
}

fn answer(job: Job, output: Result<Output>) {
    fn send<T>(
        to: oneshot::Sender<Result<T>>,
        output: Result<Output>,
        pick: impl FnOnce(Output) -> Option<T>,
    ) {
        let value = output.and_then(|output| {
            pick(output).ok_or_else(|| Error::Conflict("the writer mixed up answers".into()))
        });
        let _ = to.send(value);
    }
    match job {
        Job::Create(_, to) => send(to, output, |o| match o {
            Output::Created(scheduled) => Some(scheduled),
            _ => None,
        }),
        Job::CreateOnce(_, _, to) => send(to, output, |o| match o {
            Output::Once(found) => Some(found),
            _ => None,
        }),
        Job::Schedule(_, to) => {
            let _ = to.send(match output {
                Ok(Output::Scheduled(result)) => result,
                Ok(_) => Err(ScheduleError::Store(Error::Conflict(
                    "the writer mixed up answers".into(),
                ))),
                Err(error) => Err(ScheduleError::Store(error)),
            });
        }
        Job::Claim(_, to) => send(to, output, |o| match o {
            Output::Claimed(claimed) => Some(claimed),
            _ => None,
        }),
        Job::Finish(_, to) | Job::Progress(_, to) => send(to, output, |o| match o {
            Output::Resource(resource) => Some(resource),
            _ => None,
        }),
        Job::Renew(_, _, to) => send(to, output, |o| match o {
            Output::Count(count) => Some(count),
            _ => None,
        }),
    }
}

/// The batch's transaction: schedules first (in arrival order), then creates, finishes,
/// progress, renewals and last the claims, which then see what the batch made ready. Any
/// order is a valid one: every statement checks the state and lease it relies on.
async fn apply(pool: &Pool, batch: &[Job]) -> Result<Vec<Output>> {
    let mut tx = pool.begin_write().await?;
    let mut out: Vec<Option<Output>> = (0..batch.len()).map(|_| None).collect();
    for (index, job) in batch.iter().enumerate() {
        if let Job::Schedule(new, _) = job {
            out[index] = Some(Output::Scheduled(write::schedule(&mut tx, new).await?));
        }
    }
    let creates: Vec<(usize, &NewCreate)> = batch
        .iter()
        .enumerate()
        .filter_map(|(index, job)| match job {
            Job::Create(new, _) => Some((index, new)),
            _ => None,
        })
        .collect();
    if !creates.is_empty() {
        let items: Vec<&NewCreate> = creates.iter().map(|(_, new)| *new).collect();
        let made = write::create(&mut tx, &items).await?;
        for ((index, _), scheduled) in creates.iter().zip(made) {
            out[*index] = Some(Output::Created(scheduled));
        }
    }
    for (index, job) in batch.iter().enumerate() {
        if let Job::CreateOnce(new, key, _) = job {
            out[index] = Some(Output::Once(create_once(&mut tx, new, key).await?));
        }
    }
    let finishes: Vec<(usize, &FinishItem)> = batch
        .iter()
        .enumerate()
        .filter_map(|(index, job)| match job {
            Job::Finish(item, _) => Some((index, &**item)),
            _ => None,
        })
        .collect();
    if !finishes.is_empty() {
        let items: Vec<&FinishItem> = finishes.iter().map(|(_, item)| *item).collect();
        let done = write::finish(&mut tx, &items).await?;
        for ((index, _), resource) in finishes.iter().zip(done) {
            out[*index] = Some(Output::Resource(resource));
        }
    }
    for (index, job) in batch.iter().enumerate() {
        match job {
            Job::Progress(item, _) => {
                out[index] = Some(Output::Resource(write::progress(&mut tx, item).await?));
            }
            Job::Renew(node, until, _) => {
                out[index] = Some(Output::Count(write::renew(&mut tx, node, *until).await?));
            }
            _ => {}
        }
    }
    for (index, job) in batch.iter().enumerate() {
        if let Job::Claim(request, _) = job {
            out[index] = Some(Output::Claimed(write::claim(&mut tx, request).await?));
        }
    }
    tx.commit().await?;
    out.into_iter()
        .map(|output| output.ok_or_else(|| Error::Conflict("a job without an answer".into())))
        .collect()
}

/// A create once per idempotency key: the key is recorded in the create's transaction, so a
/// create is committed with its key or not at all; a retry (or a concurrent twin) with the
/// same key gets what the first one made.
async fn create_once(tx: &mut Tx, new: &NewCreate, key: &OwnedKey) -> Result<Idempotent> {
    let now = now_millis();
    if let Some(found) = existing(tx, new.kind, key, now).await? {
        return Ok(found);
    }
    // An expired key is forgotten, so that it can be used again.
    tx.execute(
        "DELETE FROM idempotency_key WHERE account_id = $1 AND idem_key = $2 AND created < $3",
        args![key.account_id, key.key.as_str(), now - key.ttl_ms],
    )
    .await?;
    // On PostgreSQL a concurrent twin's insert (another node's) waits here for the first to end.
    let recorded: Option<(i64,)> = tx
        .fetch_optional(
            "INSERT INTO idempotency_key (account_id, idem_key, request_hash, resource_type, resource_id, created) \
             VALUES ($1, $2, $3, $4, 0, $5) ON CONFLICT (account_id, idem_key) DO NOTHING RETURNING id",
            args![key.account_id, key.key.as_str(), key.fingerprint.as_str(), new.kind.table(), now],
        )
        .await?;
    let Some((key_id,)) = recorded else {
        return existing(tx, new.kind, key, now)
            .await?
            .ok_or_else(|| Error::Conflict("idempotency key taken and released at once".into()));
    };
    let scheduled = write::create(tx, &[new])
        .await?
        .pop()
        .ok_or_else(|| Error::Conflict("create made nothing".into()))?;
    let linked = tx
        .execute(
            "UPDATE idempotency_key SET resource_id = $1 WHERE id = $2",
            args![scheduled.resource.id, key_id],
        )
        .await?;
    if linked != 1 {
        return Err(Error::Conflict("idempotency key vanished".into()));
    }
    Ok(Idempotent::Created(Box::new(scheduled)))
}

async fn existing(
    tx: &mut Tx,
    kind: ResourceKind,
    key: &OwnedKey,
    now: i64,
) -> Result<Option<Idempotent>> {
    let row: Option<(String, String, i64)> = tx
        .fetch_optional(
            "SELECT request_hash, resource_type, resource_id FROM idempotency_key \
             WHERE account_id = $1 AND idem_key = $2 AND created >= $3",
            args![key.account_id, key.key.as_str(), now - key.ttl_ms],
        )
        .await?;
    Ok(match row {
        None => None,
        Some((hash, table, id)) if hash == key.fingerprint && table == kind.table() => {
            let sql = format!(
                "SELECT {} FROM {} r WHERE r.id = $1",
                crate::store::resource::select_list(kind, "r"),
                kind.table()
            );
            let row: Option<crate::store::resource::ResourceRow> =
                tx.fetch_optional(&sql, args![id]).await?;
            let resource = row.map(|row| row.into_resource(kind)).transpose()?;
            Some(Idempotent::Existing(resource.map(Box::new)))
        }
        Some(_) => Some(Idempotent::Mismatch),
    })
}
