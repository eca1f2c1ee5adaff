//! Process instances and executions: scheduling, claiming with leases, finishing.
//!
//! A process instance is pending while `end_time` is null. It is *ready* when `run_after` has
//! passed and no live lease holds it, and only the oldest pending process of a resource can be
//! claimed: that is the resource lock. Every state change of a resource that a process makes
//! happens in the same transaction as the process row's change, guarded by the node's lease, so
//! a node that lost its lease (or a canceled process) changes nothing.

use serde_json::{Map, Value};
use sqlx::{AssertSqlSafe, FromRow};

use super::resource::{bind_values, conditions};
use super::{Store, now_millis};
use crate::db::{Tx, args};
use crate::model::{Resource, ResourceKind};
use crate::store::resource::{Filter, Page};
use crate::{Error, Result};

/// A process instance row.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessInstance {
    /// Database id.
    pub id: i64,
    /// E.g. `instance.start`.
    pub process_name: String,
    /// The resource's kind.
    pub kind: ResourceKind,
    /// The resource's id.
    pub resource_id: i64,
    /// The project.
    pub account_id: Option<i64>,
    /// When the first attempt started.
    pub start_time: Option<i64>,
    /// When it ended; `None` while pending.
    pub end_time: Option<i64>,
    /// When it was scheduled.
    pub created: i64,
    /// The next time it may run.
    pub run_after: Option<i64>,
    /// Attempts so far (the claim's fencing token: every attempt has its own number).
    pub execution_count: i64,
    /// Times the claim put it back to wait for what it needs (a host to run on, its agent's
    /// activation) without running it: not attempts, so not counted against `max_attempts`.
    pub wait_count: i64,
    /// `SUCCESS`, `FAILURE` or `CANCELED` once ended.
    pub result: Option<String>,
    /// Why the last attempt or the process ended (`DONE`, `TIMEOUT`, `ERROR`, `CANCELED`, …).
    pub exit_reason: Option<String>,
    /// `REQUESTED`, `RUNNING`, `WAITING` or `DONE`.
    pub phase: Option<String>,
    /// The node holding the lease, while running.
    pub running_process_server_id: Option<String>,
    /// The node that scheduled it.
    pub start_process_server_id: Option<String>,
    /// When the lease runs out.
    pub lease_expires: Option<i64>,
    /// The last attempt's error.
    pub last_error: Option<String>,
    /// Input: `previousState`, `transitioning`, and the caller's data.
    pub data: Value,
    /// Priority (higher first).
    pub priority: i64,
}

impl ProcessInstance {
    /// The resource state the process moves the resource to while it runs.
    pub fn transitioning_state(&self) -> Option<&str> {
        self.data.get("transitioning").and_then(Value::as_str)
    }

    /// The state the resource had before the process.
    pub fn previous_state(&self) -> Option<&str> {
        self.data.get("previousState").and_then(Value::as_str)
    }

    /// Whether a live lease holds it at `now`.
    pub fn is_running(&self, now: i64) -> bool {
        self.end_time.is_none() && self.lease_expires.is_some_and(|until| until >= now)
    }
}

#[derive(FromRow)]
pub(super) struct ProcessRow {
    id: i64,
    process_name: String,
    resource_type: String,
    resource_id: i64,
    account_id: Option<i64>,
    start_time: Option<i64>,
    end_time: Option<i64>,
    created: i64,
    run_after: Option<i64>,
    execution_count: i64,
    wait_count: i64,
    result: Option<String>,
    exit_reason: Option<String>,
    phase: Option<String>,
    running_process_server_id: Option<String>,
    start_process_server_id: Option<String>,
    lease_expires: Option<i64>,
    last_error: Option<String>,
    data: Option<String>,
    priority: i32,
}

pub(super) const PROCESS_COLUMNS: &str = "id, process_name, resource_type, resource_id, account_id, start_time, end_time, created, \
    run_after, execution_count, wait_count, result, exit_reason, phase, running_process_server_id, start_process_server_id, \
    lease_expires, last_error, data, priority";

impl TryFrom<ProcessRow> for ProcessInstance {
    type Error = Error;
    fn try_from(row: ProcessRow) -> Result<Self> {
        Ok(ProcessInstance {
            id: row.id,
            kind: ResourceKind::parse(&row.resource_type).ok_or_else(|| {
                Error::Corrupt(format!(
                    "process {} has resource type {:?}",
                    row.id, row.resource_type
                ))
            })?,
            process_name: row.process_name,
            resource_id: row.resource_id,
            account_id: row.account_id,
            start_time: row.start_time,
            end_time: row.end_time,
            created: row.created,
            run_after: row.run_after,
            execution_count: row.execution_count,
            wait_count: row.wait_count,
            result: row.result,
            exit_reason: row.exit_reason,
            phase: row.phase,
            running_process_server_id: row.running_process_server_id,
            start_process_server_id: row.start_process_server_id,
            lease_expires: row.lease_expires,
            last_error: row.last_error,
            data: row
                .data
                .as_deref()
                .and_then(|text| serde_json::from_str(text).ok())
                .unwrap_or(Value::Null),
            priority: i64::from(row.priority),
        })
    }
}

/// A process scheduled, and the resource as it now is.
#[derive(Debug, Clone)]
pub struct Scheduled {
    /// The new process.
    pub process: ProcessInstance,
    /// The resource, in its transitioning state.
    pub resource: Resource,
    /// The state it left.
    pub previous_state: String,
    /// Processes canceled to make way (remove).
    pub canceled: Vec<i64>,
}

/// Why a process could not be scheduled.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// No such resource.
    #[error("resource not found")]
    NotFound,
    /// The resource is not in a start state of the process.
    #[error("resource is in state {state}")]
    InvalidState {
        /// Its state.
        state: String,
    },
    /// Another process holds the resource.
    #[error("resource is locked by process {process_id} ({process_name})")]
    Busy {
        /// That process.
        process_id: i64,
        /// Its name.
        process_name: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] Error),
}

impl From<sqlx::Error> for ScheduleError {
    fn from(error: sqlx::Error) -> Self {
        ScheduleError::Store(Error::Database(error))
    }
}

/// One attempt, as recorded in `process_execution`.
#[derive(Debug, Clone)]
pub struct ExecutionRecord {
    /// When it started.
    pub started: i64,
    /// When it ended.
    pub ended: i64,
    /// `DONE`, `TIMEOUT`, `ERROR`, …
    pub exit_reason: String,
    /// The agent's message or the error.
    pub message: Option<String>,
    /// Structured detail (handler, agent, progress seen).
    pub log: Value,
}

/// How an attempt ends.
#[derive(Debug, Clone)]
pub enum Finish {
    /// Success: the resource moves to `done_state`, `data` replaces its data when given, and
    /// `next` (a delegate) is scheduled in the same transaction.
    Done {
        /// The done state.
        done_state: String,
        /// The resource's new data.
        data: Option<Map<String, Value>>,
        /// A process to run next: name, transitioning state, data.
        next: Option<(String, String, Map<String, Value>)>,
    },
    /// The attempt failed; try again after `run_after`.
    Retry {
        /// The next run.
        run_after: i64,
        /// What failed.
        message: String,
        /// `TIMEOUT` or `ERROR`.
        reason: String,
    },
    /// The process failed for good: the resource goes to `error`.
    Failed {
        /// Why, for people.
        message: String,
        /// The last attempt's reason.
        reason: String,
    },
    /// A handler failed and named the process to run instead (an external handler's
    /// `onError`): the process ends `FAILURE` with exit reason `CHAIN`, and `next` is scheduled
    /// in the same transaction, from the state the resource is in (`previous_state`).
    Chained {
        /// Why, for people.
        message: String,
        /// The failed handler's reason.
        reason: String,
        /// The state the next process starts from (the failed process's transitioning state).
        previous_state: String,
        /// The process to run: name, transitioning state, data.
        next: (String, String, Map<String, Value>),
    },
    /// The process no longer applies (the resource changed state under it).
    Canceled {
        /// Why.
        reason: String,
    },
}

impl Finish {
    /// Why the attempt ended (`DONE`, or the failure's reason) and its message, if any: what
    /// the attempt's record and the process row keep.
    pub fn reason_and_message(&self) -> (&str, Option<&str>) {
        match self {
            Finish::Done { .. } => ("DONE", None),
            Finish::Retry {
                reason, message, ..
            }
            | Finish::Failed { reason, message } => (reason, Some(message)),
            Finish::Chained { message, .. } => ("CHAIN", Some(message)),
            Finish::Canceled { reason } => (reason, Some(reason)),
        }
    }
}

/// Which processes to list.
#[derive(Debug, Clone, Default)]
pub struct ProcessFilter {
    /// Exact process name.
    pub name: Option<String>,
    /// Resource kind.
    pub kind: Option<ResourceKind>,
    /// Resource id.
    pub resource_id: Option<i64>,
    /// `running`, `delayed`, `ready`, `pending` (any of those) or `done`.
    pub status: Option<String>,
    /// `SUCCESS`, `FAILURE`, `CANCELED`.
    pub result: Option<String>,
    /// The project.
    pub account_id: Option<i64>,
    /// Rows after this id (or before it, with `newest_first`).
    pub marker: Option<i64>,
    /// The most rows.
    pub limit: i64,
    /// Newest first (for done processes).
    pub newest_first: bool,
}

/// Counts of pending processes of one name.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct ProcessSummary {
    /// The process name.
    pub process_name: String,
    /// Held by a live lease.
    pub running: i64,
    /// Waiting for a worker.
    pub ready: i64,
    /// Waiting for `run_after` (backing off).
    pub delayed: i64,
    /// Ended and not yet purged (`process_instance.purge.after.seconds`).
    pub done: i64,
}

/// What `/metrics` reads from the store at a scrape: the unended processes of the whole
/// cluster as [`ProcessSummary`] counts them, the oldest one's creation time, and agents and
/// hosts by state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineGauges {
    /// Held by a live lease.
    pub running: i64,
    /// Waiting for a worker.
    pub ready: i64,
    /// Waiting for `run_after` (backing off, or waiting for a host or an agent).
    pub delayed: i64,
    /// When the oldest unended process was scheduled (epoch milliseconds).
    pub oldest_created: Option<i64>,
    /// `(state, agents in it)`, by state.
    pub agents: Vec<(String, i64)>,
    /// `(state, hosts in it)`, by state.
    pub hosts: Vec<(String, i64)>,
}

/// A create's `Idempotency-Key`, as the store keeps it.
#[derive(Debug, Clone, Copy)]
pub struct IdempotencyKey<'a> {
    /// The account of the key that made the request.
    pub account_id: i64,
    /// The client's key.
    pub key: &'a str,
    /// A digest of what was asked (collection, project, body): the same key with another
    /// request is refused.
    pub fingerprint: &'a str,
    /// How long a key is remembered, in milliseconds.
    pub ttl_ms: i64,
}

/// What a create with an idempotency key came to.
#[derive(Debug)]
pub enum Idempotent {
    /// This request created the resource.
    Created(Box<Scheduled>),
    /// An earlier request with the key created this resource (`None`: it has since been
    /// deleted).
    Existing(Option<Box<Resource>>),
    /// The key was used before for a different request.
    Mismatch,
}

impl Store {
    /// The resource a create with `key` made before (within the key's time to live), or
    /// [`Idempotent::Mismatch`] if the key was used for a different request; `None` if the key
    /// is new.
    pub async fn idempotent_create(
        &self,
        kind: ResourceKind,
        key: &IdempotencyKey<'_>,
    ) -> Result<Option<Idempotent>> {
        let since = now_millis() - key.ttl_ms;
        let row: Option<(String, String, i64)> = dispatch!(self, pool => sqlx::query_as(
            "SELECT request_hash, resource_type, resource_id FROM idempotency_key \
             WHERE account_id = $1 AND idem_key = $2 AND created >= $3")
            .bind(key.account_id).bind(key.key).bind(since).fetch_optional(pool).await?);
        Ok(match row {
            None => None,
            Some((hash, table, id)) if hash == key.fingerprint && table == kind.table() => Some(
                Idempotent::Existing(self.get_resource(kind, id).await?.map(Box::new)),
            ),
            Some(_) => Some(Idempotent::Mismatch),
        })
    }

    /// The earliest `run_after` of pending processes not held by a lease: when to look next.
    pub async fn next_run_after(&self) -> Result<Option<i64>> {
        Ok(dispatch!(self, pool => sqlx::query_scalar(
            "SELECT MIN(COALESCE(lease_expires, run_after)) FROM process_instance WHERE end_time IS NULL")
            .fetch_one(pool).await?))
    }

    /// A process by id.
    pub async fn get_process(&self, id: i64) -> Result<Option<ProcessInstance>> {
        let sql = format!("SELECT {PROCESS_COLUMNS} FROM process_instance WHERE id = $1");
        let row: Option<ProcessRow> = dispatch!(self, pool => sqlx::query_as(AssertSqlSafe(sql.as_str())).bind(id).fetch_optional(pool).await?);
        row.map(ProcessInstance::try_from).transpose()
    }

    /// The pending process of a resource, if any.
    pub async fn pending_process(
        &self,
        kind: ResourceKind,
        resource_id: i64,
    ) -> Result<Option<ProcessInstance>> {
        let sql = format!(
            "SELECT {PROCESS_COLUMNS} FROM process_instance WHERE resource_type = $1 AND resource_id = $2 \
             AND end_time IS NULL ORDER BY id LIMIT 1"
        );
        let row: Option<ProcessRow> = dispatch!(self, pool => sqlx::query_as(AssertSqlSafe(sql.as_str()))
            .bind(kind.table()).bind(resource_id).fetch_optional(pool).await?);
        row.map(ProcessInstance::try_from).transpose()
    }

    /// Processes, filtered and paged.
    pub async fn list_processes(&self, filter: &ProcessFilter) -> Result<Page<ProcessInstance>> {
        let now = now_millis();
        let mut filters: Vec<Filter> = Vec::new();
        use crate::store::resource::{FilterOp, FilterValue};
        if let Some(name) = &filter.name {
            filters.push(Filter {
                column: "process_name",
                op: FilterOp::Eq,
                value: FilterValue::Text(name.clone()),
            });
        }
        if let Some(kind) = filter.kind {
            filters.push(Filter {
                column: "resource_type",
                op: FilterOp::Eq,
                value: FilterValue::Text(kind.table().into()),
            });
        }
        if let Some(id) = filter.resource_id {
            filters.push(Filter {
                column: "resource_id",
                op: FilterOp::Eq,
                value: FilterValue::Int(id),
            });
        }
        if let Some(result) = &filter.result {
            filters.push(Filter {
                column: "result",
                op: FilterOp::Eq,
                value: FilterValue::Text(result.clone()),
            });
        }
        if let Some(account) = filter.account_id {
            filters.push(Filter {
                column: "account_id",
                op: FilterOp::Eq,
                value: FilterValue::Int(account),
            });
        }
        let (mut clause, values) = conditions(&filters, 4);
        match filter.status.as_deref() {
            Some("running") => clause.push_str(" AND end_time IS NULL AND lease_expires >= $3"),
            Some("delayed") => clause.push_str(
                " AND end_time IS NULL AND (lease_expires IS NULL OR lease_expires < $3) AND run_after > $3",
            ),
            Some("ready") => clause.push_str(
                " AND end_time IS NULL AND (lease_expires IS NULL OR lease_expires < $3) AND run_after <= $3",
            ),
            Some("pending") => clause.push_str(" AND end_time IS NULL AND $3 = $3"),
            Some("done") => clause.push_str(" AND end_time IS NOT NULL AND $3 = $3"),
            _ => clause.push_str(" AND $3 = $3"),
        }
        let (marker_clause, order) = if filter.newest_first {
            ("($1 = 0 OR id < $1)", "id DESC")
        } else {
            ("id > $1", "id")
        };
        let sql = format!(
            "SELECT {PROCESS_COLUMNS} FROM process_instance WHERE {marker_clause}{clause} ORDER BY {order} LIMIT $2"
        );
        let limit = filter.limit.clamp(1, 1000);
        let rows: Vec<ProcessRow> = dispatch!(self, pool => {
            let base = sqlx::query_as(AssertSqlSafe(sql.as_str())).bind(filter.marker.unwrap_or(0)).bind(limit + 1).bind(now);
            bind_values!(base, &values).fetch_all(pool).await?
        });
        let mut data = rows
            .into_iter()
            .map(ProcessInstance::try_from)
            .collect::<Result<Vec<_>>>()?;
        let next_marker = if data.len() as i64 > limit {
            data.truncate(limit as usize);
            data.last().map(|process| process.id)
        } else {
            None
        };
        Ok(Page { data, next_marker })
    }

    /// Running / ready / delayed counts of pending processes, and ended ones, per process name.
    pub async fn process_summary(&self, account: Option<i64>) -> Result<Vec<ProcessSummary>> {
        let now = now_millis();
        // One statement for both: a project's summary filters on its account, everyone's on
        // the account being itself (`account_id = account_id` is false for NULL, hence the OR).
        let scoped = account.is_some();
        Ok(dispatch!(self, pool => sqlx::query_as(
            "SELECT process_name, \
             SUM(CASE WHEN end_time IS NULL AND lease_expires >= $1 THEN 1 ELSE 0 END) AS running, \
             SUM(CASE WHEN end_time IS NULL AND (lease_expires IS NULL OR lease_expires < $1) AND run_after <= $1 THEN 1 ELSE 0 END) AS ready, \
             SUM(CASE WHEN end_time IS NULL AND (lease_expires IS NULL OR lease_expires < $1) AND run_after > $1 THEN 1 ELSE 0 END) AS delayed, \
             SUM(CASE WHEN end_time IS NOT NULL THEN 1 ELSE 0 END) AS done \
             FROM process_instance WHERE (NOT $2 OR account_id = $3) \
             GROUP BY process_name ORDER BY process_name")
            .bind(now).bind(scoped).bind(account.unwrap_or(0)).fetch_all(pool).await?))
    }

    /// The gauges `/metrics` shows, at `now`: one statement over the unended processes (the
    /// partial index `idx_process_instance_pending` holds exactly those) and one per agent and
    /// host table.
    pub async fn engine_gauges(&self, now: i64) -> Result<EngineGauges> {
        let (running, ready, delayed, oldest_created): (i64, i64, i64, Option<i64>) = dispatch!(self, pool => sqlx::query_as(
            "SELECT \
             COALESCE(SUM(CASE WHEN lease_expires >= $1 THEN 1 ELSE 0 END), 0), \
             COALESCE(SUM(CASE WHEN (lease_expires IS NULL OR lease_expires < $1) AND run_after <= $1 THEN 1 ELSE 0 END), 0), \
             COALESCE(SUM(CASE WHEN (lease_expires IS NULL OR lease_expires < $1) AND run_after > $1 THEN 1 ELSE 0 END), 0), \
             MIN(created) \
             FROM process_instance WHERE end_time IS NULL")
            .bind(now).fetch_one(pool).await?);
        let agents = dispatch!(self, pool => sqlx::query_as(
            "SELECT state, COUNT(*) FROM agent GROUP BY state ORDER BY state")
            .fetch_all(pool).await?);
        let hosts = dispatch!(self, pool => sqlx::query_as(
            "SELECT state, COUNT(*) FROM host GROUP BY state ORDER BY state")
            .fetch_all(pool).await?);
        Ok(EngineGauges {
            running,
            ready,
            delayed,
            oldest_created,
            agents,
            hosts,
        })
    }

    /// The attempts of a process, oldest first: `(id, created, started, ended, exit_reason, message, log)`.
    pub async fn list_executions(&self, process_id: i64) -> Result<Vec<ExecutionRow>> {
        Ok(dispatch!(self, pool => sqlx::query_as(
            "SELECT id, process_instance_id, created, started, ended, exit_reason, message, log \
             FROM process_execution WHERE process_instance_id = $1 ORDER BY id")
            .bind(process_id).fetch_all(pool).await?))
    }

    /// An execution by id.
    pub async fn get_execution(&self, id: i64) -> Result<Option<ExecutionRow>> {
        Ok(dispatch!(self, pool => sqlx::query_as(
            "SELECT id, process_instance_id, created, started, ended, exit_reason, message, log \
             FROM process_execution WHERE id = $1")
            .bind(id).fetch_optional(pool).await?))
    }

    /// Admin: run a process again now. A pending process gets its attempts reset; a failed or
    /// canceled one is reopened (its resource back in the transitioning state) if nothing else
    /// is pending on the resource. Refused for a running or succeeded process.
    pub async fn replay(&self, id: i64) -> Result<ProcessInstance, ScheduleError> {
        let mut tx = self.pool.begin_write().await?;
        replay_in(&mut tx, id).await??;
        tx.commit().await?;
        self.get_process(id).await?.ok_or(ScheduleError::NotFound)
    }

    /// Admin: cancel a pending process; its resource goes back to the state it had before.
    pub async fn cancel(
        &self,
        id: i64,
    ) -> Result<(ProcessInstance, Option<Resource>), ScheduleError> {
        let mut tx = self.pool.begin_write().await?;
        cancel_in(&mut tx, id).await??;
        tx.commit().await?;
        let process = self.get_process(id).await?.ok_or(ScheduleError::NotFound)?;
        let resource = self.get_resource(process.kind, process.resource_id).await?;
        Ok((process, resource))
    }
}

async fn process_in(tx: &mut Tx, id: i64) -> Result<Option<ProcessInstance>> {
    let sql = format!("SELECT {PROCESS_COLUMNS} FROM process_instance WHERE id = $1");
    let row: Option<ProcessRow> = tx.fetch_optional(&sql, args![id]).await?;
    row.map(ProcessInstance::try_from).transpose()
}

async fn replay_in(tx: &mut Tx, id: i64) -> Result<Result<(), ScheduleError>> {
    let now = now_millis();
    let Some(process) = process_in(tx, id).await? else {
        return Ok(Err(ScheduleError::NotFound));
    };
    if process.is_running(now) {
        return Ok(Err(ScheduleError::Busy {
            process_id: id,
            process_name: process.process_name,
        }));
    }
    match (process.end_time, process.result.as_deref()) {
        (None, _) => {
            tx.execute(
                "UPDATE process_instance SET run_after = $1, execution_count = 0, wait_count = 0, lease_expires = NULL, \
                 running_process_server_id = NULL WHERE id = $2 AND end_time IS NULL",
                args![now, id],
            )
            .await?;
        }
        (Some(_), Some("SUCCESS")) => {
            return Ok(Err(ScheduleError::InvalidState {
                state: "SUCCESS".into(),
            }));
        }
        (Some(_), _) => {
            let other: Option<(i64, String)> = tx
                .fetch_optional(
                    "SELECT id, process_name FROM process_instance WHERE resource_type = $1 AND resource_id = $2 \
                     AND end_time IS NULL LIMIT 1",
                    args![process.kind.table(), process.resource_id],
                )
                .await?;
            if let Some((process_id, process_name)) = other {
                return Ok(Err(ScheduleError::Busy {
                    process_id,
                    process_name,
                }));
            }
            let move_sql = format!(
                "UPDATE {} SET state = $1, transitioning = 'yes', transitioning_message = NULL, \
                 transitioning_progress = NULL WHERE id = $2 AND removed IS NULL",
                process.kind.table()
            );
            let transitioning = process.transitioning_state().unwrap_or("").to_owned();
            let moved = tx
                .execute(&move_sql, args![transitioning, process.resource_id])
                .await?;
            if moved == 0 {
                return Ok(Err(ScheduleError::InvalidState {
                    state: "removed".into(),
                }));
            }
            let reopened = tx
                .execute(
                    "UPDATE process_instance SET end_time = NULL, result = NULL, exit_reason = NULL, \
                     run_after = $1, execution_count = 0, phase = 'REQUESTED', lease_expires = NULL, \
                     running_process_server_id = NULL WHERE id = $2 AND end_time IS NOT NULL",
                    args![now, id],
                )
                .await?;
            if reopened != 1 {
                return Err(Error::Conflict(format!(
                    "process {id} changed under replay"
                )));
            }
        }
    }
    Ok(Ok(()))
}

async fn cancel_in(tx: &mut Tx, id: i64) -> Result<Result<(), ScheduleError>> {
    let now = now_millis();
    let Some(process) = process_in(tx, id).await? else {
        return Ok(Err(ScheduleError::NotFound));
    };
    if process.end_time.is_some() {
        return Ok(Err(ScheduleError::InvalidState {
            state: process.result.unwrap_or_else(|| "ended".into()),
        }));
    }
    let ended = tx
        .execute(
            "UPDATE process_instance SET end_time = $1, result = 'CANCELED', exit_reason = 'CANCELED', \
             phase = 'DONE', running_process_server_id = NULL, lease_expires = NULL, \
             last_error = 'canceled by an admin' WHERE id = $2 AND end_time IS NULL",
            args![now, id],
        )
        .await?;
    if ended == 0 {
        return Ok(Err(ScheduleError::InvalidState {
            state: "ended".into(),
        }));
    }
    let back_sql = format!(
        "UPDATE {} SET state = $1, transitioning = 'no', transitioning_message = $2, transitioning_progress = NULL \
         WHERE id = $3 AND state = $4",
        process.kind.table()
    );
    let previous = process.previous_state().unwrap_or("error").to_owned();
    let transitioning = process.transitioning_state().unwrap_or("").to_owned();
    tx.execute(
        &back_sql,
        args![
            previous,
            format!("{} canceled by an admin", process.process_name),
            process.resource_id,
            transitioning
        ],
    )
    .await?;
    Ok(Ok(()))
}

/// A `process_execution` row.
#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct ExecutionRow {
    /// Database id.
    pub id: i64,
    /// The process.
    pub process_instance_id: i64,
    /// When it was recorded.
    pub created: i64,
    /// When the attempt started.
    pub started: Option<i64>,
    /// When it ended.
    pub ended: Option<i64>,
    /// Why it ended.
    pub exit_reason: Option<String>,
    /// The agent's message or the error.
    pub message: Option<String>,
    /// Structured detail, JSON.
    pub log: Option<String>,
}
