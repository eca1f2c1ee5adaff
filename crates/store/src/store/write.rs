//! The engine's writes, as plain functions on a write transaction ([`Tx`]).
//!
//! The writer ([`crate::writer`]) runs a batch of these in one transaction: set-based for the
//! hot items (creates, claims, finishes: a fixed handful of statements per batch whatever its
//! size), one at a time for the rest. Each function returns `Err` only for a database error,
//! which aborts the whole transaction; a refusal that concerns one item alone (a state check,
//! a lock) is that item's own `Ok(Err(..))`, and the batch commits around it.
//!
//! **Invariant:** a process changes its resource only here, and only where its lease is checked
//! in the same statement or transaction: at schedule (the process is new), claim (the lease is
//! taken), placement, putting back what waits and key injection (in the claim's transaction),
//! progress and finish
//! (`running_process_server_id` and the attempt number `execution_count` must still be the
//! caller's, so a node whose lease was taken over, or an older attempt, changes nothing).

use std::collections::HashMap;

use serde_json::{Map, Value, json};
use sqlx::FromRow;

use super::process::{
    ExecutionRecord, Finish, PROCESS_COLUMNS, ProcessInstance, ProcessRow, ScheduleError, Scheduled,
};
use super::resource::{REFERENCE_COLUMNS, ResourceRow, select_list};
use super::{ACCOUNT_COLUMNS, AccountRow, Backend, CREDENTIAL_COLUMNS, CredentialRow, now_millis};
use crate::db::{Tx, args};
use crate::model::{Account, AccountKind, CredentialKind, NewKey, NewResource};
use crate::model::{Resource, ResourceKind};
use crate::{Error, Result, secret};

/// One process of a plan. A hop (`done` given) is applied at once, in the transaction that
/// schedules it, and recorded as a process that succeeded; the last step may stay pending
/// (`done: None`) for the engine to claim and run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// E.g. `instance.start`.
    pub process_name: String,
    /// The state the resource is in while it runs.
    pub transitioning: String,
    /// For a hop: the state it ends in.
    pub done: Option<String>,
}

impl Step {
    /// A process the engine claims and runs.
    pub fn pending(process_name: &str, transitioning: &str) -> Step {
        Step {
            process_name: process_name.to_owned(),
            transitioning: transitioning.to_owned(),
            done: None,
        }
    }

    /// A process applied in the transaction that schedules it.
    pub fn hop(process_name: &str, transitioning: &str, done: &str) -> Step {
        Step {
            process_name: process_name.to_owned(),
            transitioning: transitioning.to_owned(),
            done: Some(done.to_owned()),
        }
    }
}

/// A process to schedule on an existing resource.
#[derive(Debug, Clone)]
pub struct NewProcess {
    /// The resource's kind.
    pub kind: ResourceKind,
    /// The resource.
    pub resource_id: i64,
    /// States the resource must be in.
    pub start_states: Vec<String>,
    /// Cancel whatever is pending on the resource instead of refusing (remove).
    pub cancel_pending: bool,
    /// The processes to record: hops first, at most one pending step last.
    pub steps: Vec<Step>,
    /// Input data for the handlers.
    pub data: Map<String, Value>,
    /// The node scheduling it.
    pub node: String,
}

/// A resource to create with its plan.
#[derive(Debug, Clone)]
pub struct NewCreate {
    /// The kind.
    pub kind: ResourceKind,
    /// The row.
    pub resource: NewResource,
    /// Its processes, from `requested`: hops first, at most one pending step last.
    pub steps: Vec<Step>,
    /// The node scheduling it.
    pub node: String,
}

/// What a claim asks for.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    /// The claiming node.
    pub node: String,
    /// The most processes to claim.
    pub limit: i64,
    /// The claiming engine's now (milliseconds since the epoch): a process is ready when its
    /// `run_after` has come and its lease has run out by this time.
    pub now: i64,
    /// The lease's end.
    pub lease_until: i64,
    /// Processes that need their resource on a host before they run: an unplaced resource is
    /// placed in the claim's transaction.
    pub place: Vec<&'static str>,
    /// Processes that start a container: one labelled `io.rancher.container.create_agent=true`
    /// gets its agent key made or rotated in the claim's transaction.
    pub agent_key: Vec<&'static str>,
    /// Processes that run only once their resource's agent is active (a host's activation
    /// waits for its agent to answer its own): one whose agent is not is put back to wait.
    pub await_agent: Vec<&'static str>,
    /// `process.max_age.seconds` in milliseconds: a process older than this is never put back
    /// to wait but handed to the engine, which fails it.
    pub max_age_millis: i64,
    /// `process.retry_max_wait.millis`: the cap of a wait's backoff.
    pub retry_max_wait_millis: i64,
}

/// The agent of a resource's host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAgent {
    /// The host.
    pub host_id: i64,
    /// Its agent.
    pub agent_id: i64,
    /// The agent's state.
    pub agent_state: String,
}

/// Why a claimed process could not be placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementError {
    /// `NO_HOST` or `INVALID_HOST`.
    pub reason: &'static str,
    /// For people.
    pub message: String,
}

/// Why the claim put a process back instead of handing it to the engine: what it needs is not
/// there yet (no host it could be placed on, its agent not active). Such a wait is no attempt:
/// the process's `execution_count` is as before the claim, its `wait_count` grows, it is ready
/// again after the same backoff as a retry, or at once when what it waits for comes
/// ([`wakes_waiting`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// `NO_HOST` or `AGENT_NOT_ACTIVE`.
    pub reason: &'static str,
    /// For people; also the process's `last_error` and the resource's transitioning message.
    pub message: String,
    /// When it is ready again, unless woken earlier.
    pub run_after: i64,
}

/// A container's own agent and its fresh key (`io.rancher.container.create_agent`).
#[derive(Debug, Clone)]
pub struct InstanceAgentKey {
    /// The agent.
    pub agent_id: i64,
    /// Its new key; older ones are revoked.
    pub key: NewKey,
    /// The role it acts with (`environment`, `agent`), if any.
    pub role: Option<String>,
}

/// A claimed process and what its attempt needs, read in the claim's transaction.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The process, with its lease.
    pub process: ProcessInstance,
    /// Its resource (`None` if the row is gone).
    pub resource: Option<Resource>,
    /// The agent of the resource's host, if it is on one.
    pub agent: Option<HostAgent>,
    /// Set when the process needed placing and no host would do.
    pub placement: Option<PlacementError>,
    /// Set when the claim put the process back to wait: the engine runs nothing for it.
    pub waiting: Option<Waiting>,
    /// The container's own agent key, when it asked for one.
    pub agent_key: Option<InstanceAgentKey>,
}

/// An attempt's end, for [`crate::Store::finish`].
#[derive(Debug, Clone)]
pub struct FinishItem {
    /// The process as claimed (its `execution_count` is the attempt, the fencing token).
    pub process: ProcessInstance,
    /// The node that ran it.
    pub node: String,
    /// The attempt.
    pub record: ExecutionRecord,
    /// How it ended.
    pub finish: Finish,
}

/// A progress reply of an agent, for [`crate::Store::set_progress`].
#[derive(Debug, Clone)]
pub struct ProgressItem {
    /// The running process.
    pub process: ProcessInstance,
    /// The node that runs it.
    pub node: String,
    /// The agent's message.
    pub message: Option<String>,
    /// Percent done.
    pub progress: Option<i64>,
}

fn with_meta(data: &Map<String, Value>, previous_state: &str, transitioning: &str) -> String {
    let mut data = data.clone();
    data.insert("previousState".into(), json!(previous_state));
    data.insert("transitioning".into(), json!(transitioning));
    Value::Object(data).to_string()
}

/// The rows of a plan's processes, and the state and `transitioning` flag the resource ends
/// the plan in.
struct PlanRows {
    rows: Vec<Value>,
    state: String,
    transitioning: &'static str,
}

#[allow(clippy::too_many_arguments)]
fn plan_rows(
    steps: &[Step],
    kind: ResourceKind,
    resource_id: i64,
    account_id: Option<i64>,
    from_state: &str,
    data: &Map<String, Value>,
    node: &str,
    now: i64,
) -> PlanRows {
    let mut rows = Vec::with_capacity(steps.len());
    let mut state = from_state.to_owned();
    let mut transitioning = "no";
    for step in steps {
        let meta = with_meta(data, &state, &step.transitioning);
        let (end, result, exit, phase, count, start) = match &step.done {
            Some(_) => (
                Some(now),
                Some("SUCCESS"),
                Some("DONE"),
                "DONE",
                1,
                Some(now),
            ),
            None => (None, None, None, "REQUESTED", 0, None),
        };
        rows.push(json!({
            "process_name": step.process_name,
            "resource_type": kind.table(),
            "resource_id": resource_id,
            "account_id": account_id,
            "data": meta,
            "run_after": if end.is_some() { None } else { Some(now) },
            "created": now,
            "node": node,
            "execution_count": count,
            "phase": phase,
            "start_time": start,
            "end_time": end,
            "result": result,
            "exit_reason": exit,
        }));
        match &step.done {
            Some(done) => state.clone_from(done),
            None => {
                state.clone_from(&step.transitioning);
                transitioning = "yes";
                break;
            }
        }
    }
    PlanRows {
        rows,
        state,
        transitioning,
    }
}

const PROCESS_ROW_COLUMNS: &[(&str, &str)] = &[
    ("process_name", "TEXT"),
    ("resource_type", "TEXT"),
    ("resource_id", "BIGINT"),
    ("account_id", "BIGINT"),
    ("data", "TEXT"),
    ("run_after", "BIGINT"),
    ("created", "BIGINT"),
    ("node", "TEXT"),
    ("execution_count", "BIGINT"),
    ("phase", "TEXT"),
    ("start_time", "BIGINT"),
    ("end_time", "BIGINT"),
    ("result", "TEXT"),
    ("exit_reason", "TEXT"),
];

/// Inserts process rows (as built by [`plan_rows`]) in one statement; yields them in order.
async fn insert_processes(tx: &mut Tx, rows: &[Value]) -> Result<Vec<ProcessInstance>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "INSERT INTO process_instance (process_name, resource_type, resource_id, account_id, data, run_after, \
         created, start_process_server_id, execution_count, phase, priority, start_time, end_time, result, exit_reason) \
         SELECT v.process_name, v.resource_type, v.resource_id, v.account_id, v.data, v.run_after, v.created, v.node, \
         v.execution_count, v.phase, 0, v.start_time, v.end_time, v.result, v.exit_reason FROM {} \
         RETURNING {PROCESS_COLUMNS}",
        tx.json_rows(1, PROCESS_ROW_COLUMNS)
    );
    let inserted: Vec<ProcessRow> = tx
        .fetch_all(&sql, args![Value::Array(rows.to_vec()).to_string()])
        .await?;
    let mut processes = inserted
        .into_iter()
        .map(ProcessInstance::try_from)
        .collect::<Result<Vec<_>>>()?;
    // RETURNING makes no promise of order: put the rows back in the order given.
    let order: HashMap<(&str, i64, &str), usize> = rows
        .iter()
        .enumerate()
        .map(|(index, row)| {
            let key = (
                row["resource_type"].as_str().unwrap_or(""),
                row["resource_id"].as_i64().unwrap_or(0),
                row["process_name"].as_str().unwrap_or(""),
            );
            (key, index)
        })
        .collect();
    processes.sort_by_key(|process| {
        order
            .get(&(
                process.kind.table(),
                process.resource_id,
                process.process_name.as_str(),
            ))
            .copied()
            .unwrap_or(usize::MAX)
    });
    if processes.len() != rows.len() {
        return Err(Error::Conflict(format!(
            "inserted {} of {} process rows",
            processes.len(),
            rows.len()
        )));
    }
    Ok(processes)
}

fn reference_of(new: &NewResource, column: &str) -> Option<i64> {
    match column {
        "host_id" => new.host_id,
        "agent_id" => new.agent_id,
        "stack_id" => new.stack_id,
        "service_id" => new.service_id,
        "instance_id" => new.instance_id,
        _ => None,
    }
}

/// Inserts resource rows of one kind in one statement, each in the state given with it;
/// yields them as stored, in the order given.
async fn insert_resources(
    tx: &mut Tx,
    kind: ResourceKind,
    items: &[(&NewResource, &str, &str)],
) -> Result<Vec<Resource>> {
    let now = now_millis();
    let mut columns = vec![
        ("name", "TEXT"),
        ("kind", "TEXT"),
        ("uuid", "TEXT"),
        ("description", "TEXT"),
        ("state", "TEXT"),
        ("transitioning", "TEXT"),
        ("created", "BIGINT"),
        ("account_id", "BIGINT"),
        ("data", "TEXT"),
        ("external_id", "TEXT"),
    ];
    for column in REFERENCE_COLUMNS {
        if kind.has_column(column) {
            columns.push((column, "BIGINT"));
        }
    }
    if kind == ResourceKind::Instance {
        columns.push(("service_index", "BIGINT"));
    }
    let mut resources = Vec::with_capacity(items.len());
    let mut rows = Vec::with_capacity(items.len());
    for (new, state, transitioning) in items {
        let uuid = uuid::Uuid::new_v4().to_string();
        let mut row = json!({
            "name": new.name,
            "kind": new.sub_kind,
            "uuid": uuid,
            "description": new.description,
            "state": state,
            "transitioning": transitioning,
            "created": now,
            "account_id": new.account_id,
            "data": Value::Object(new.data.clone()).to_string(),
            "external_id": new.external_id,
        });
        for column in REFERENCE_COLUMNS {
            if kind.has_column(column) {
                row[column] = json!(reference_of(new, column));
            }
        }
        if kind == ResourceKind::Instance {
            row["service_index"] = json!(new.service_index);
        }
        rows.push(row);
        let has = |column| kind.has_column(column);
        resources.push(Resource {
            kind,
            id: 0,
            name: new.name.clone(),
            account_id: new.account_id,
            sub_kind: new.sub_kind.clone(),
            uuid,
            description: new.description.clone(),
            state: (*state).to_owned(),
            transitioning: (*transitioning).to_owned(),
            transitioning_message: None,
            transitioning_progress: None,
            created: now,
            removed: None,
            data: new.data.clone(),
            host_id: new.host_id.filter(|_| has("host_id")),
            agent_id: new.agent_id.filter(|_| has("agent_id")),
            stack_id: new.stack_id.filter(|_| has("stack_id")),
            service_id: new.service_id.filter(|_| has("service_id")),
            instance_id: new.instance_id.filter(|_| has("instance_id")),
            last_ping: None,
        });
    }
    let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
    let selected: Vec<String> = names.iter().map(|name| format!("v.{name}")).collect();
    let sql = format!(
        "INSERT INTO {} ({}) SELECT {} FROM {} RETURNING id, uuid",
        kind.table(),
        names.join(", "),
        selected.join(", "),
        tx.json_rows(1, &columns)
    );
    let ids: Vec<(i64, String)> = tx
        .fetch_all(&sql, args![Value::Array(rows).to_string()])
        .await?;
    let by_uuid: HashMap<String, i64> = ids.into_iter().map(|(id, uuid)| (uuid, id)).collect();
    for resource in &mut resources {
        resource.id = *by_uuid
            .get(&resource.uuid)
            .ok_or_else(|| Error::Conflict(format!("{} row not inserted", kind.table())))?;
    }
    Ok(resources)
}

/// Creates resources with their plans: per kind, one statement for the rows and one for all
/// their processes. A resource whose plan ends in a pending step is `transitioning`.
pub(crate) async fn create(tx: &mut Tx, items: &[&NewCreate]) -> Result<Vec<Scheduled>> {
    let now = now_millis();
    let mut out: Vec<Option<Scheduled>> = vec![None; items.len()];
    for kind in ResourceKind::ALL {
        let of_kind: Vec<usize> = (0..items.len())
            .filter(|&index| items[index].kind == kind)
            .collect();
        if of_kind.is_empty() {
            continue;
        }
        let plans: Vec<PlanRows> = of_kind
            .iter()
            .map(|&index| {
                let item = items[index];
                plan_rows(
                    &item.steps,
                    kind,
                    0,
                    item.resource.account_id,
                    "requested",
                    &Map::new(),
                    &item.node,
                    now,
                )
            })
            .collect();
        let rows: Vec<(&NewResource, &str, &str)> = of_kind
            .iter()
            .zip(&plans)
            .map(|(&index, plan)| {
                (
                    &items[index].resource,
                    plan.state.as_str(),
                    plan.transitioning,
                )
            })
            .collect();
        let resources = insert_resources(tx, kind, &rows).await?;
        let mut process_rows = Vec::new();
        for (plan, resource) in plans.iter().zip(&resources) {
            for row in &plan.rows {
                let mut row = row.clone();
                row["resource_id"] = json!(resource.id);
                process_rows.push(row);
            }
        }
        let processes = insert_processes(tx, &process_rows).await?;
        for resource in &resources {
            if wakes_waiting(kind, &resource.state) {
                wake_waiting(tx, kind, resource.id, resource.account_id, now).await?;
            }
        }
        // The last process of each plan is the one a caller is answered with.
        let mut last: HashMap<i64, ProcessInstance> = HashMap::with_capacity(resources.len());
        for process in processes {
            last.insert(process.resource_id, process);
        }
        for ((&index, resource), plan) in of_kind.iter().zip(resources).zip(&plans) {
            let process = last
                .remove(&resource.id)
                .ok_or_else(|| Error::Conflict("a create without a process".into()))?;
            debug_assert_eq!(resource.state, plan.state);
            out[index] = Some(Scheduled {
                process,
                resource,
                previous_state: "requested".into(),
                canceled: Vec::new(),
            });
        }
    }
    out.into_iter()
        .map(|item| item.ok_or_else(|| Error::Conflict("a create of no kind".into())))
        .collect()
}

/// Applies what a resource reaching `state` implies beyond its row: a removed agent's keys
/// stop working with it; an agent or host that became active wakes what waits for it
/// ([`wake_waiting`]).
async fn on_state(tx: &mut Tx, resource: &Resource, state: &str, now: i64) -> Result<()> {
    let (kind, id) = (resource.kind, resource.id);
    if wakes_waiting(kind, state) {
        wake_waiting(tx, kind, id, resource.account_id, now).await?;
    }
    if kind == ResourceKind::Agent && state == "removed" {
        tx.execute(
            "UPDATE credential SET state = 'removed', removed = $1 WHERE state = 'active' \
             AND account_id IN (SELECT id FROM account WHERE agent_id = $2 AND kind = 'agent')",
            args![now, id],
        )
        .await?;
    }
    Ok(())
}

/// Checks the resource's state, cancels or refuses what is pending on it, applies the plan's
/// hops and inserts its pending step.
pub(crate) async fn schedule(
    tx: &mut Tx,
    new: &NewProcess,
) -> Result<Result<Scheduled, ScheduleError>> {
    let kind = new.kind;
    let table = kind.table();
    let now = now_millis();
    // Lock the row first (PostgreSQL; SQLite holds the write lock already).
    let lock = match tx.backend() {
        Backend::Postgres => " FOR UPDATE",
        Backend::Sqlite => "",
    };
    let select = format!(
        "SELECT {} FROM {table} r WHERE r.id = $1{lock}",
        select_list(kind, "r")
    );
    let Some(row) = tx
        .fetch_optional::<ResourceRow>(&select, args![new.resource_id])
        .await?
    else {
        return Ok(Err(ScheduleError::NotFound));
    };
    let mut resource = row.into_resource(kind)?;
    let pending: Vec<(i64, String)> = tx
        .fetch_all(
            "SELECT id, process_name FROM process_instance WHERE resource_type = $1 AND resource_id = $2 \
             AND end_time IS NULL ORDER BY id",
            args![table, new.resource_id],
        )
        .await?;
    // A pending process is named first: it is why the state is what it is.
    if let Some((process_id, process_name)) = pending.first()
        && !new.cancel_pending
    {
        return Ok(Err(ScheduleError::Busy {
            process_id: *process_id,
            process_name: process_name.clone(),
        }));
    }
    if !new.start_states.contains(&resource.state) {
        return Ok(Err(ScheduleError::InvalidState {
            state: resource.state,
        }));
    }
    let first = new
        .steps
        .first()
        .map(|step| step.process_name.clone())
        .unwrap_or_default();
    let mut canceled = Vec::new();
    for (id, _) in &pending {
        let ended = tx
            .execute(
                "UPDATE process_instance SET end_time = $1, result = 'CANCELED', exit_reason = 'CANCELED', \
                 phase = 'DONE', running_process_server_id = NULL, lease_expires = NULL, \
                 last_error = COALESCE(last_error, $2) WHERE id = $3 AND end_time IS NULL",
                args![now, format!("canceled by {first}"), *id],
            )
            .await?;
        if ended == 1 {
            canceled.push(*id);
        }
    }
    let plan = plan_rows(
        &new.steps,
        kind,
        new.resource_id,
        resource.account_id,
        &resource.state,
        &new.data,
        &new.node,
        now,
    );
    let moved = tx
        .execute(
            &format!(
                "UPDATE {table} SET state = $1, transitioning = $2, transitioning_message = NULL, \
                 transitioning_progress = NULL, removed = CASE WHEN $1 = 'removed' THEN $3 ELSE removed END \
                 WHERE id = $4"
            ),
            args![plan.state.as_str(), plan.transitioning, now, new.resource_id],
        )
        .await?;
    if moved != 1 {
        return Err(Error::Conflict(format!(
            "{table} {} did not move",
            new.resource_id
        )));
    }
    on_state(tx, &resource, &plan.state, now).await?;
    let processes = insert_processes(tx, &plan.rows).await?;
    let process = processes
        .into_iter()
        .next_back()
        .ok_or_else(|| Error::Conflict("a schedule without a step".into()))?;
    let previous_state = std::mem::replace(&mut resource.state, plan.state);
    resource.transitioning = plan.transitioning.into();
    resource.transitioning_message = None;
    resource.transitioning_progress = None;
    if resource.state == "removed" {
        resource.removed = Some(now);
    }
    Ok(Ok(Scheduled {
        process,
        resource,
        previous_state,
        canceled,
    }))
}

#[derive(FromRow)]
struct ClaimedResourceRow {
    #[sqlx(flatten)]
    row: ResourceRow,
    h_agent_id: Option<i64>,
    h_agent_state: Option<String>,
}

#[derive(FromRow)]
struct CandidateRow {
    id: i64,
    account_id: Option<i64>,
    agent_id: Option<i64>,
    agent_state: Option<String>,
    state: String,
    live: i64,
}

/// Claims up to `limit` ready processes with a lease, and in the same transaction reads their
/// resources and hosts' agents, places the unplaced ones and makes the agent keys asked for.
pub(crate) async fn claim(tx: &mut Tx, request: &ClaimRequest) -> Result<Vec<Claimed>> {
    let now = request.now;
    let lock = match tx.backend() {
        Backend::Sqlite => "",
        Backend::Postgres => " FOR UPDATE SKIP LOCKED",
    };
    let sql = format!(
        "UPDATE process_instance SET running_process_server_id = $1, lease_expires = $2, \
         execution_count = execution_count + 1, start_time = COALESCE(start_time, $3), phase = 'RUNNING' \
         WHERE id IN (SELECT p.id FROM process_instance p WHERE p.end_time IS NULL AND p.run_after <= $3 \
         AND (p.lease_expires IS NULL OR p.lease_expires < $3) \
         AND NOT EXISTS (SELECT 1 FROM process_instance q WHERE q.resource_type = p.resource_type \
         AND q.resource_id = p.resource_id AND q.end_time IS NULL AND q.id < p.id) \
         ORDER BY p.priority DESC, p.run_after, p.id LIMIT $4{lock}) \
         RETURNING {PROCESS_COLUMNS}"
    );
    let rows: Vec<ProcessRow> = tx
        .fetch_all(
            &sql,
            args![
                request.node.as_str(),
                request.lease_until,
                now,
                request.limit
            ],
        )
        .await?;
    let mut processes = rows
        .into_iter()
        .map(ProcessInstance::try_from)
        .collect::<Result<Vec<_>>>()?;
    processes.sort_by_key(|process| (-process.priority, process.run_after, process.id));
    let mut claimed: Vec<Claimed> = processes
        .into_iter()
        .map(|process| Claimed {
            process,
            resource: None,
            agent: None,
            placement: None,
            waiting: None,
            agent_key: None,
        })
        .collect();
    // The resources and their hosts' agents, one statement per kind.
    for kind in ResourceKind::ALL {
        let ids: Vec<i64> = claimed
            .iter()
            .filter(|item| item.process.kind == kind)
            .map(|item| item.process.resource_id)
            .collect();
        if ids.is_empty() {
            continue;
        }
        let join = if kind.has_column("host_id") {
            "h.agent_id AS h_agent_id, a.state AS h_agent_state FROM {table} r \
             LEFT JOIN host h ON h.id = r.host_id LEFT JOIN agent a ON a.id = h.agent_id"
        } else if kind == ResourceKind::Host {
            // A host's own agent.
            "r.agent_id AS h_agent_id, a.state AS h_agent_state FROM {table} r \
             LEFT JOIN agent a ON a.id = r.agent_id"
        } else {
            "CAST(NULL AS BIGINT) AS h_agent_id, CAST(NULL AS TEXT) AS h_agent_state FROM {table} r"
        };
        let sql = format!(
            "SELECT {}, {} WHERE r.id IN {}",
            select_list(kind, "r"),
            join.replace("{table}", kind.table()),
            tx.json_ids(1)
        );
        let rows: Vec<ClaimedResourceRow> =
            tx.fetch_all(&sql, args![json!(ids).to_string()]).await?;
        let mut by_id = HashMap::with_capacity(rows.len());
        for row in rows {
            let agent = row.h_agent_id.zip(row.h_agent_state);
            let resource = row.row.into_resource(kind)?;
            by_id.insert(resource.id, (resource, agent));
        }
        for item in claimed.iter_mut().filter(|item| item.process.kind == kind) {
            if let Some((resource, agent)) = by_id.get(&item.process.resource_id) {
                let host_id = match kind {
                    ResourceKind::Host => Some(resource.id),
                    _ => resource.host_id,
                };
                item.agent = match (host_id, agent) {
                    (Some(host_id), Some((agent_id, state))) => Some(HostAgent {
                        host_id,
                        agent_id: *agent_id,
                        agent_state: state.clone(),
                    }),
                    _ => None,
                };
                item.resource = Some(resource.clone());
            }
        }
    }
    place(tx, request, &mut claimed).await?;
    park(tx, request, &mut claimed).await?;
    for item in &mut claimed {
        if !request
            .agent_key
            .contains(&item.process.process_name.as_str())
        {
            continue;
        }
        let Some(resource) = &item.resource else {
            continue;
        };
        if resource.kind != ResourceKind::Instance
            || item.placement.is_some()
            || item.waiting.is_some()
        {
            continue;
        }
        let labels = resource.data.get("labels").and_then(Value::as_object);
        let wants_agent = labels
            .and_then(|labels| labels.get("io.rancher.container.create_agent"))
            .and_then(Value::as_str)
            .is_some_and(|value| value.eq_ignore_ascii_case("true"));
        if !wants_agent {
            continue;
        }
        let role = labels
            .and_then(|labels| labels.get("io.rancher.container.agent.role"))
            .and_then(Value::as_str)
            .and_then(|roles| {
                roles
                    .split(',')
                    .map(str::trim)
                    .find(|role| *role == "environment" || *role == "agent")
            })
            .map(str::to_owned);
        let (agent_id, key) = instance_agent_key(tx, resource, role.as_deref()).await?;
        if let Some(resource) = &mut item.resource {
            resource.agent_id = Some(agent_id);
        }
        item.agent_key = Some(InstanceAgentKey {
            agent_id,
            key,
            role,
        });
    }
    Ok(claimed)
}

/// A `requestedHostId` as stored: `1h42`, `"42"` or `42`.
fn requested_host(resource: &Resource) -> Option<Option<i64>> {
    let value = resource.data.get("requestedHostId")?;
    Some(match value {
        Value::Number(number) => number.as_i64(),
        Value::String(text) => text.strip_prefix("1h").unwrap_or(text).parse::<i64>().ok(),
        _ => None,
    })
}

/// Places the claimed processes' unplaced resources: on their requested host (which must be
/// a host of the resource's project), else on the active host whose agent is active (it
/// answered activation, and has not missed pings since) that has the fewest live instances.
/// One read of the candidates and one write of the placements per batch.
async fn place(tx: &mut Tx, request: &ClaimRequest, claimed: &mut [Claimed]) -> Result<()> {
    let needs: Vec<usize> = (0..claimed.len())
        .filter(|&index| {
            let item = &claimed[index];
            request.place.contains(&item.process.process_name.as_str())
                && item.resource.as_ref().is_some_and(|resource| {
                    resource.kind.has_column("host_id") && resource.host_id.is_none()
                })
        })
        .collect();
    if needs.is_empty() {
        return Ok(());
    }
    let mut accounts: Vec<i64> = Vec::new();
    let mut requested: Vec<i64> = Vec::new();
    for &index in &needs {
        let resource = claimed[index].resource.as_ref().expect("filtered");
        match requested_host(resource) {
            Some(Some(host)) => requested.push(host),
            Some(None) => {}
            None => accounts.extend(resource.account_id),
        }
    }
    accounts.sort_unstable();
    accounts.dedup();
    let sql = format!(
        "SELECT h.id, h.account_id, h.agent_id, a.state AS agent_state, h.state, \
         (SELECT COUNT(*) FROM instance i WHERE i.host_id = h.id AND i.removed IS NULL) AS live \
         FROM host h LEFT JOIN agent a ON a.id = h.agent_id WHERE h.removed IS NULL \
         AND (h.id IN {} OR (h.account_id IN {} AND h.state = 'active' AND a.state = 'active')) \
         ORDER BY h.id",
        tx.json_ids(1),
        tx.json_ids(2)
    );
    let mut candidates: Vec<CandidateRow> = tx
        .fetch_all(
            &sql,
            args![json!(requested).to_string(), json!(accounts).to_string()],
        )
        .await?;
    let mut placements: Vec<Value> = Vec::new();
    for &index in &needs {
        let item = &mut claimed[index];
        let resource = item.resource.as_mut().expect("filtered");
        let chosen = match requested_host(resource) {
            Some(host) => {
                // The API resolved the reference in the resource's project; a host that moved
                // or a row written around the API is refused here too.
                let found = host.and_then(|host| {
                    candidates
                        .iter()
                        .position(|c| c.id == host && c.account_id == resource.account_id)
                });
                if found.is_none() {
                    item.placement = Some(PlacementError {
                        reason: "INVALID_HOST",
                        message: format!(
                            "requested host {} is not a host of this project",
                            resource
                                .data
                                .get("requestedHostId")
                                .map(Value::to_string)
                                .unwrap_or_default()
                        ),
                    });
                }
                found
            }
            None => {
                let best = candidates
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| {
                        c.account_id == resource.account_id
                            && c.state == "active"
                            && c.agent_state.as_deref() == Some("active")
                    })
                    .min_by_key(|(_, c)| (c.live, c.id))
                    .map(|(position, _)| position);
                if best.is_none() {
                    item.placement = Some(PlacementError {
                        reason: NO_HOST,
                        message: "no active host with an active agent to run on".into(),
                    });
                }
                best
            }
        };
        let Some(position) = chosen else { continue };
        let candidate = &mut candidates[position];
        candidate.live += 1;
        resource.host_id = Some(candidate.id);
        item.agent = candidate.agent_id.map(|agent_id| HostAgent {
            host_id: candidate.id,
            agent_id,
            agent_state: candidate.agent_state.clone().unwrap_or_default(),
        });
        placements.push(
            json!({"kind": resource.kind.table(), "id": resource.id, "host_id": candidate.id}),
        );
    }
    for kind in [ResourceKind::Instance, ResourceKind::Volume] {
        let rows: Vec<&Value> = placements
            .iter()
            .filter(|row| row["kind"] == json!(kind.table()))
            .collect();
        if rows.is_empty() {
            continue;
        }
        let table = kind.table();
        let sql = format!(
            "UPDATE {table} SET host_id = v.host_id FROM {} WHERE {table}.id = v.id AND {table}.host_id IS NULL",
            tx.json_rows(1, &[("id", "BIGINT"), ("host_id", "BIGINT")])
        );
        let placed = tx.execute(&sql, args![json!(rows).to_string()]).await?;
        if placed != rows.len() as u64 {
            return Err(Error::Conflict(format!(
                "placed {placed} of {} {table} rows",
                rows.len()
            )));
        }
    }
    Ok(())
}

/// [`Waiting::reason`] (and [`PlacementError::reason`]) of a process with no host it could be
/// placed on.
pub const NO_HOST: &str = "NO_HOST";
/// [`Waiting::reason`] of a process whose resource's agent has not answered its activation.
pub const AGENT_NOT_ACTIVE: &str = "AGENT_NOT_ACTIVE";
/// What a process waiting for a host says (its `last_error`, its resource's message).
pub const NO_HOST_MESSAGE: &str = "waiting for an active host with an active agent";

/// The wait before attempt (or wait) `attempts + 1`: min(max, 2 s + 2^(n−1)·100 ms), plus up
/// to 10 % jitter so that many failures at once do not retry in lockstep.
pub fn backoff_millis(attempts: i64, max_wait: i64) -> i64 {
    let exponent = attempts.clamp(1, 30) - 1;
    let base = 2000i64
        .saturating_add(100i64.saturating_mul(1i64 << exponent))
        .min(max_wait.max(1));
    base + rand::random_range(0..=base / 10)
}

/// Puts back, in the claim's transaction, the claimed processes that cannot run yet: those
/// that found no host to be placed on, and those that wait for their resource's agent to be
/// active ([`ClaimRequest::await_agent`]). Each is left as if it had not been claimed (lease
/// released, `execution_count` and `start_time` as before), with `wait_count` one more, its
/// reason in `exit_reason`/`last_error` and on its resource's transitioning message, and
/// `run_after` the retry backoff of its waits away: the engine runs nothing for it, and it
/// uses up no attempt. [`wake_waiting`] makes it ready at once when what it waits for comes.
/// One past `max_age` is not put back: the engine fails it. Costs nothing when nothing
/// waits; else one statement for the processes and one per kind for the resources.
async fn park(tx: &mut Tx, request: &ClaimRequest, claimed: &mut [Claimed]) -> Result<()> {
    let mut rows = Vec::new();
    for item in claimed.iter_mut() {
        let process = &item.process;
        if request.now - process.created > request.max_age_millis {
            continue;
        }
        let (reason, message) = match (&item.placement, &item.agent) {
            (Some(error), _) if error.reason == NO_HOST => (NO_HOST, NO_HOST_MESSAGE.to_owned()),
            (None, Some(agent))
                if agent.agent_state != "active"
                    && request.await_agent.contains(&process.process_name.as_str()) =>
            {
                (
                    AGENT_NOT_ACTIVE,
                    format!(
                        "waiting for its agent to answer activation (the agent is {})",
                        agent.agent_state
                    ),
                )
            }
            _ => continue,
        };
        let run_after =
            request.now + backoff_millis(process.wait_count + 1, request.retry_max_wait_millis);
        rows.push(json!({
            "id": process.id,
            "node": request.node,
            "run_after": run_after,
            "reason": reason,
            "message": message,
            "kind": process.kind.table(),
            "resource_id": process.resource_id,
        }));
        let process = &mut item.process;
        process.execution_count -= 1;
        process.wait_count += 1;
        process.run_after = Some(run_after);
        process.running_process_server_id = None;
        process.lease_expires = None;
        process.phase = Some("WAITING".into());
        process.exit_reason = Some(reason.into());
        process.last_error = Some(message.clone());
        if process.execution_count == 0 {
            process.start_time = None;
        }
        if let Some(resource) = &mut item.resource {
            resource.transitioning_message = Some(message.clone());
        }
        item.placement = None;
        item.waiting = Some(Waiting {
            reason,
            message,
            run_after,
        });
    }
    if rows.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "UPDATE process_instance SET running_process_server_id = NULL, lease_expires = NULL, \
         execution_count = execution_count - 1, \
         start_time = CASE WHEN execution_count <= 1 THEN NULL ELSE start_time END, \
         wait_count = wait_count + 1, phase = 'WAITING', run_after = v.run_after, \
         exit_reason = v.reason, last_error = v.message \
         FROM {} WHERE process_instance.id = v.id AND process_instance.running_process_server_id = v.node \
         AND process_instance.end_time IS NULL",
        tx.json_rows(
            1,
            &[
                ("id", "BIGINT"),
                ("node", "TEXT"),
                ("run_after", "BIGINT"),
                ("reason", "TEXT"),
                ("message", "TEXT"),
            ]
        )
    );
    let parked = tx
        .execute(&sql, args![Value::Array(rows.clone()).to_string()])
        .await?;
    if parked != rows.len() as u64 {
        return Err(Error::Conflict(format!(
            "put back {parked} of {} waiting processes",
            rows.len()
        )));
    }
    for kind in ResourceKind::ALL {
        let of_kind: Vec<&Value> = rows
            .iter()
            .filter(|row| row["kind"] == json!(kind.table()))
            .collect();
        if of_kind.is_empty() {
            continue;
        }
        let table = kind.table();
        let sql = format!(
            "UPDATE {table} SET transitioning_message = v.message FROM {} WHERE {table}.id = v.resource_id",
            tx.json_rows(1, &[("resource_id", "BIGINT"), ("message", "TEXT")])
        );
        tx.execute(&sql, args![json!(of_kind).to_string()]).await?;
    }
    Ok(())
}

/// Whether a resource of `kind` reaching `state` may let waiting processes run: an agent or a
/// host that became active. The store wakes them in the transaction that moves the resource
/// ([`wake_waiting`]); the caller then wakes its engine.
pub fn wakes_waiting(kind: ResourceKind, state: &str) -> bool {
    matches!(kind, ResourceKind::Agent | ResourceKind::Host) && state == "active"
}

/// Wakes what an agent or host that became active may let run: the pending processes of the
/// agent's hosts (a host's activation waits for its agent), and in its project every pending
/// process of an instance or volume that is on no host yet (waiting to be placed). Their
/// `run_after` becomes `now` (never later than it was).
///
/// The condition reads nothing that [`park`] changes on a process, so on PostgreSQL a wake that
/// meets a claim in flight waits for the claim's row lock and then wakes what the claim put
/// back: a claim either sees what the wake's transaction made active, or its parked processes
/// are woken after it. No wake is lost (on SQLite, transactions do not overlap at all).
pub(crate) async fn wake_waiting(
    tx: &mut Tx,
    kind: ResourceKind,
    id: i64,
    account_id: Option<i64>,
    now: i64,
) -> Result<u64> {
    const WAKE: &str = "UPDATE process_instance SET run_after = CASE WHEN run_after > $1 THEN $1 ELSE run_after END \
         WHERE end_time IS NULL AND ";
    let mut woken = 0;
    if kind == ResourceKind::Agent {
        woken += tx
            .execute(
                &format!(
                    "{WAKE}resource_type = 'host' AND resource_id IN (SELECT id FROM host WHERE agent_id = $2)"
                ),
                args![now, id],
            )
            .await?;
    }
    if let Some(account) = account_id {
        woken += tx
            .execute(
                &format!(
                    "{WAKE}account_id = $2 AND ((resource_type = 'instance' AND resource_id IN \
                     (SELECT id FROM instance WHERE account_id = $2 AND host_id IS NULL)) \
                     OR (resource_type = 'volume' AND resource_id IN \
                     (SELECT id FROM volume WHERE account_id = $2 AND host_id IS NULL)))"
                ),
                args![now, account],
            )
            .await?;
    }
    Ok(woken)
}

/// The agent of a container labelled `io.rancher.container.create_agent=true`: made the
/// first time (an agent with its own account, acting in the container's project with
/// `role`), and every time a fresh `agentApiKey` with the older ones revoked. The key travels
/// to the container in its start request and is stored nowhere in plain text.
async fn instance_agent_key(
    tx: &mut Tx,
    instance: &Resource,
    role: Option<&str>,
) -> Result<(i64, NewKey)> {
    let project = instance
        .account_id
        .ok_or(Error::NotFound("project of the instance"))?;
    let name = format!("{}-agent", instance.name.as_deref().unwrap_or("container"));
    let now = now_millis();
    let agent_id = match instance.agent_id {
        Some(agent_id) => agent_id,
        None => {
            let uri = format!("instance://{}", instance.id);
            let (agent_id,): (i64,) = tx
                .fetch_one(
                    "INSERT INTO agent (name, kind, uuid, state, transitioning, created, account_id, external_id, uri, data) \
                     VALUES ($1, 'agent', $2, 'active', 'no', $3, $4, $5, $5, '{}') RETURNING id",
                    args![name.as_str(), uuid::Uuid::new_v4().to_string(), now, project, uri.as_str()],
                )
                .await?;
            let account = insert_account(
                tx,
                AccountKind::Agent,
                &name,
                Some(project),
                Some(agent_id),
                role.map(|role| format!("role:{role}")),
            )
            .await?;
            let linked = tx
                .execute(
                    "UPDATE instance SET agent_id = $1 WHERE id = $2 AND agent_id IS NULL",
                    args![agent_id, instance.id],
                )
                .await?;
            if linked != 1 {
                return Err(Error::Conflict(format!(
                    "instance {} got an agent meanwhile",
                    instance.id
                )));
            }
            let _ = account;
            agent_id
        }
    };
    let (account_id,): (i64,) = tx
        .fetch_one(
            "SELECT id FROM account WHERE agent_id = $1 AND kind = 'agent' ORDER BY id LIMIT 1",
            args![agent_id],
        )
        .await?;
    let key = rotate_key(tx, account_id, CredentialKind::AgentApiKey, &name).await?;
    Ok((agent_id, key))
}

/// Inserts an account.
pub(crate) async fn insert_account(
    tx: &mut Tx,
    kind: AccountKind,
    name: &str,
    project_id: Option<i64>,
    agent_id: Option<i64>,
    external_id: Option<String>,
) -> Result<Account> {
    let sql = format!(
        "INSERT INTO account (name, kind, uuid, state, created, project_id, agent_id, external_id) \
         VALUES ($1, $2, $3, 'active', $4, $5, $6, $7) RETURNING {ACCOUNT_COLUMNS}"
    );
    let row: AccountRow = tx
        .fetch_one(
            &sql,
            args![
                name,
                kind.as_str(),
                uuid::Uuid::new_v4().to_string(),
                now_millis(),
                project_id,
                agent_id,
                external_id
            ],
        )
        .await?;
    row.try_into()
}

/// Revokes an account's active keys and issues a fresh one of `kind`.
pub(crate) async fn rotate_key(
    tx: &mut Tx,
    account_id: i64,
    kind: CredentialKind,
    name: &str,
) -> Result<NewKey> {
    let now = now_millis();
    tx.execute(
        "UPDATE credential SET state = 'removed', removed = $1 WHERE account_id = $2 AND state = 'active'",
        args![now, account_id],
    )
    .await?;
    let access_key = secret::new_access_key();
    let secret_value = secret::new_secret_key();
    let sql = format!(
        "INSERT INTO credential (name, description, kind, uuid, state, created, account_id, public_value, secret_value) \
         VALUES ($1, NULL, $2, $3, 'active', $4, $5, $6, $7) RETURNING {CREDENTIAL_COLUMNS}"
    );
    let row: CredentialRow = tx
        .fetch_one(
            &sql,
            args![
                name,
                kind.as_str(),
                uuid::Uuid::new_v4().to_string(),
                now,
                account_id,
                access_key.as_str(),
                secret::hash_hex(&secret_value)
            ],
        )
        .await?;
    Ok(NewKey {
        credential: row.try_into()?,
        secret_value,
    })
}

/// Ends attempts, set-based: one statement fences and ends the processes (only those the
/// caller's node still holds in the same attempt), one records the attempts, one per kind
/// moves the resources and returns them as stored, one schedules delegates. Yields, per item,
/// the resource as it now is, or `None` when the process was canceled or taken over meanwhile
/// (then nothing changed) or the resource no longer was in the process's state.
pub(crate) async fn finish(tx: &mut Tx, items: &[&FinishItem]) -> Result<Vec<Option<Resource>>> {
    let now = now_millis();
    let mut process_rows = Vec::with_capacity(items.len());
    for item in items {
        let (end_time, result, phase, run_after) = match &item.finish {
            Finish::Done { .. } => (Some(now), Some("SUCCESS"), "DONE", None),
            Finish::Retry { run_after, .. } => (None, None, "WAITING", Some(*run_after)),
            Finish::Failed { .. } | Finish::Chained { .. } => {
                (Some(now), Some("FAILURE"), "DONE", None)
            }
            Finish::Canceled { .. } => (Some(now), Some("CANCELED"), "DONE", None),
        };
        let (exit_reason, last_error) = item.finish.reason_and_message();
        process_rows.push(json!({
            "id": item.process.id,
            "node": item.node,
            "attempt": item.process.execution_count,
            "end_time": end_time,
            "result": result,
            "exit_reason": exit_reason,
            "phase": phase,
            "run_after": run_after,
            "last_error": last_error,
        }));
    }
    let sql = format!(
        "UPDATE process_instance SET end_time = v.end_time, result = v.result, exit_reason = v.exit_reason, \
         phase = v.phase, running_process_server_id = NULL, lease_expires = NULL, run_after = v.run_after, \
         last_error = v.last_error FROM {} WHERE process_instance.id = v.id AND process_instance.end_time IS NULL \
         AND process_instance.running_process_server_id = v.node AND process_instance.execution_count = v.attempt \
         RETURNING process_instance.id",
        tx.json_rows(
            1,
            &[
                ("id", "BIGINT"),
                ("node", "TEXT"),
                ("attempt", "BIGINT"),
                ("end_time", "BIGINT"),
                ("result", "TEXT"),
                ("exit_reason", "TEXT"),
                ("phase", "TEXT"),
                ("run_after", "BIGINT"),
                ("last_error", "TEXT"),
            ]
        )
    );
    let owned: Vec<(i64,)> = tx
        .fetch_all(&sql, args![Value::Array(process_rows).to_string()])
        .await?;
    let owned: std::collections::HashSet<i64> = owned.into_iter().map(|(id,)| id).collect();
    let mine: Vec<&FinishItem> = items
        .iter()
        .copied()
        .filter(|item| owned.contains(&item.process.id))
        .collect();
    if mine.is_empty() {
        return Ok(vec![None; items.len()]);
    }
    let executions: Vec<Value> = mine
        .iter()
        .map(|item| {
            json!({
                "id": item.process.id,
                "uuid": uuid::Uuid::new_v4().to_string(),
                "log": item.record.log.to_string(),
                "created": now,
                "started": item.record.started,
                "ended": item.record.ended,
                "exit_reason": item.record.exit_reason,
                "message": item.record.message,
            })
        })
        .collect();
    let sql = format!(
        "INSERT INTO process_execution (process_instance_id, uuid, log, created, started, ended, exit_reason, message) \
         SELECT v.id, v.uuid, v.log, v.created, v.started, v.ended, v.exit_reason, v.message FROM {}",
        tx.json_rows(
            1,
            &[
                ("id", "BIGINT"),
                ("uuid", "TEXT"),
                ("log", "TEXT"),
                ("created", "BIGINT"),
                ("started", "BIGINT"),
                ("ended", "BIGINT"),
                ("exit_reason", "TEXT"),
                ("message", "TEXT"),
            ]
        )
    );
    let recorded = tx
        .execute(&sql, args![Value::Array(executions).to_string()])
        .await?;
    if recorded != mine.len() as u64 {
        return Err(Error::Conflict(format!(
            "recorded {recorded} of {} attempts",
            mine.len()
        )));
    }
    // The resources: one statement per kind, fenced on the state the process put them in.
    let mut moved: HashMap<(ResourceKind, i64), Resource> = HashMap::new();
    for kind in ResourceKind::ALL {
        let mut rows = Vec::new();
        for item in mine.iter().filter(|item| item.process.kind == kind) {
            let expect = item.process.transitioning_state().unwrap_or("");
            let row = match &item.finish {
                Finish::Done {
                    done_state,
                    data,
                    next,
                } => {
                    let (state, flag) = match next {
                        Some((_, next_transitioning, _)) => (next_transitioning.as_str(), "yes"),
                        None => (done_state.as_str(), "no"),
                    };
                    json!({"id": item.process.resource_id, "expect": expect, "state": state, "flag": flag,
                           "message": null, "keep": 0,
                           "data": data.as_ref().map(|data| Value::Object(data.clone()).to_string()),
                           "now": now})
                }
                Finish::Retry { message, .. } => {
                    json!({"id": item.process.resource_id, "expect": expect, "state": expect, "flag": "error",
                           "message": message, "keep": 1, "data": null, "now": now})
                }
                Finish::Failed { message, .. } => {
                    json!({"id": item.process.resource_id, "expect": expect, "state": "error", "flag": "error",
                           "message": message, "keep": 0, "data": null, "now": now})
                }
                Finish::Chained { message, next, .. } => {
                    json!({"id": item.process.resource_id, "expect": expect, "state": next.1, "flag": "yes",
                           "message": message, "keep": 0, "data": null, "now": now})
                }
                Finish::Canceled { .. } => continue,
            };
            rows.push(row);
        }
        if rows.is_empty() {
            continue;
        }
        let table = kind.table();
        let sql = format!(
            "UPDATE {table} SET state = v.state, transitioning = v.flag, transitioning_message = v.message, \
             transitioning_progress = CASE WHEN v.keep = 1 THEN {table}.transitioning_progress ELSE NULL END, \
             data = COALESCE(v.data, {table}.data), \
             removed = CASE WHEN v.state = 'removed' THEN v.now ELSE {table}.removed END \
             FROM {} WHERE {table}.id = v.id AND {table}.state = v.expect RETURNING {}",
            tx.json_rows(
                1,
                &[
                    ("id", "BIGINT"),
                    ("expect", "TEXT"),
                    ("state", "TEXT"),
                    ("flag", "TEXT"),
                    ("message", "TEXT"),
                    ("keep", "BIGINT"),
                    ("data", "TEXT"),
                    ("now", "BIGINT"),
                ]
            ),
            select_list(kind, table)
        );
        let updated: Vec<ResourceRow> = tx
            .fetch_all(&sql, args![Value::Array(rows).to_string()])
            .await?;
        for row in updated {
            let resource = row.into_resource(kind)?;
            moved.insert((kind, resource.id), resource);
        }
    }
    let mut next_rows = Vec::new();
    for item in &mine {
        let Some(resource) = moved.get(&(item.process.kind, item.process.resource_id)) else {
            continue;
        };
        let (from_state, next) = match &item.finish {
            Finish::Done {
                done_state, next, ..
            } => {
                on_state(tx, resource, &resource.state, now).await?;
                (done_state, next.as_ref())
            }
            Finish::Chained {
                previous_state,
                next,
                ..
            } => (previous_state, Some(next)),
            _ => continue,
        };
        if let Some((name, transitioning, data)) = next {
            let plan = plan_rows(
                &[Step::pending(name, transitioning)],
                resource.kind,
                resource.id,
                item.process.account_id,
                from_state,
                data,
                &item.node,
                now,
            );
            next_rows.extend(plan.rows);
        }
    }
    insert_processes(tx, &next_rows).await?;
    Ok(items
        .iter()
        .map(|item| {
            if owned.contains(&item.process.id) {
                moved
                    .get(&(item.process.kind, item.process.resource_id))
                    .cloned()
            } else {
                None
            }
        })
        .collect())
}

/// Applies an agent's progress reply to the resource, if the attempt still holds its lease.
pub(crate) async fn progress(tx: &mut Tx, item: &ProgressItem) -> Result<Option<Resource>> {
    let kind = item.process.kind;
    let table = kind.table();
    let sql = format!(
        "UPDATE {table} SET transitioning_message = COALESCE($1, transitioning_message), \
         transitioning_progress = COALESCE($2, transitioning_progress) WHERE id = $3 AND transitioning <> 'no' \
         AND EXISTS (SELECT 1 FROM process_instance p WHERE p.id = $4 AND p.end_time IS NULL \
         AND p.running_process_server_id = $5 AND p.execution_count = $6) RETURNING {}",
        select_list(kind, table)
    );
    let row: Option<ResourceRow> = tx
        .fetch_optional(
            &sql,
            args![
                item.message.as_deref(),
                item.progress.map(|p| p.clamp(0, 100)),
                item.process.resource_id,
                item.process.id,
                item.node.as_str(),
                item.process.execution_count
            ],
        )
        .await?;
    row.map(|row| row.into_resource(kind)).transpose()
}

/// Extends the leases of everything `node` is running. On PostgreSQL a row that another
/// transaction of the writer holds (a finish, in flight) is skipped rather than waited for, so
/// the renewal never deadlocks with a finish; it is ending anyway, and the next renewal
/// (a third of a lease later) takes it if that finish fails.
pub(crate) async fn renew(tx: &mut Tx, node: &str, lease_until: i64) -> Result<u64> {
    let sql = match tx.backend() {
        Backend::Sqlite => {
            "UPDATE process_instance SET lease_expires = $1 WHERE running_process_server_id = $2 \
             AND end_time IS NULL"
        }
        Backend::Postgres => {
            "UPDATE process_instance SET lease_expires = $1 WHERE id IN (SELECT id FROM process_instance \
             WHERE running_process_server_id = $2 AND end_time IS NULL FOR UPDATE SKIP LOCKED)"
        }
    };
    tx.execute(sql, args![lease_until, node]).await
}

/// Inserts a resource in a given state with no process (registration's rows, tests).
pub(crate) async fn insert_resource(
    tx: &mut Tx,
    kind: ResourceKind,
    new: &NewResource,
    state: &str,
) -> Result<Resource> {
    let mut rows = insert_resources(tx, kind, &[(new, state, "no")]).await?;
    let resource = rows
        .pop()
        .ok_or_else(|| Error::Conflict("resource not inserted".into()))?;
    if wakes_waiting(kind, state) {
        wake_waiting(tx, kind, resource.id, resource.account_id, now_millis()).await?;
    }
    Ok(resource)
}
