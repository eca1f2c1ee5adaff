//! The event worker: handles the container and service events agents post.
//!
//! A posted event is stored `requested` and the worker is woken. It claims events in the
//! order posted (`creating`), reconciles the instance each one names and marks it `created`
//! with what it did in `data.result`:
//! - container event `start`: a `stopped` instance becomes `running`;
//! - `stop`, `die`, `kill`, `oom`, `destroy`: a `running` instance becomes `stopped`;
//! - service event: the instance's `healthState` becomes the reported health.
//!
//! A report never overrides a process: an instance a process holds, or whose last process
//! ended after the event arrived, is left as it is. Events left `creating` by a server that
//! stopped are handled again at start (every step is idempotent).

use std::sync::Arc;
use std::time::Duration;

use drover_proto::ids;
use drover_store::{EventKind, EventRecord};
use serde_json::{Map, Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::state::AppState;

/// Events claimed at once.
const BATCH: i64 = 100;
/// Longest sleep when nothing woke the worker (a post on another node, say).
const IDLE: Duration = Duration::from_secs(1);

/// Wakes the worker. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct EventWorker {
    wake: Arc<Notify>,
}

impl EventWorker {
    /// Tells the worker an event is waiting.
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

/// Runs the worker until shutdown.
pub async fn run(state: AppState, shutdown: CancellationToken) {
    let wake = state.events.wake.clone();
    let mut leadership = state.cluster.leadership();
    let mut leading = false;
    loop {
        // Once per cluster: only the leader handles events, in order. A node that becomes
        // leader first hands back what a previous leader left half-handled.
        if !state.cluster.is_leader() {
            leading = false;
            tokio::select! {
                _ = leadership.changed() => {}
                () = tokio::time::sleep(IDLE) => {}
                () = shutdown.cancelled() => return,
            }
            continue;
        }
        if !leading {
            if !state.cluster.begin_task("event.worker").await {
                tokio::select! {
                    () = tokio::time::sleep(IDLE) => {}
                    () = shutdown.cancelled() => return,
                }
                continue;
            }
            leading = true;
            for kind in [EventKind::Container, EventKind::Service] {
                match state.store.requeue_events(kind).await {
                    Ok(0) => {}
                    Ok(count) => tracing::info!(
                        count,
                        table = kind.table(),
                        "events left half-handled are handled again"
                    ),
                    Err(error) => tracing::warn!(%error, "requeueing events failed"),
                }
            }
        }
        let mut busy = false;
        for kind in [EventKind::Container, EventKind::Service] {
            match state.store.claim_events(kind, BATCH).await {
                Ok(events) => {
                    busy |= events.len() as i64 == BATCH;
                    for event in events {
                        // Fenced per event: a node whose duty ran out mid-batch stops; what it
                        // claimed and left is handed back by the next leader's requeue.
                        if !state.cluster.is_leader() {
                            break;
                        }
                        handle(&state, event).await;
                    }
                }
                Err(error) => tracing::warn!(%error, "claiming events failed"),
            }
        }
        if busy {
            continue;
        }
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(IDLE) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

async fn handle(state: &AppState, event: EventRecord) {
    let result = match event.kind {
        EventKind::Container => reconcile_container(state, &event).await,
        EventKind::Service => reconcile_health(state, &event).await,
    };
    let result = result.unwrap_or_else(|error| {
        tracing::warn!(%error, event = event.id, "handling an event failed; it is recorded as failed");
        json!({"action": "failed", "error": error.to_string()})
    });
    let mut data = event.data.clone();
    if !data.is_object() {
        data = json!({});
    }
    data["result"] = result;
    if let Err(error) = state.store.finish_event(event.kind, event.id, &data).await {
        tracing::warn!(%error, event = event.id, "marking an event handled failed; it is handled again at the next start");
    }
}

async fn reconcile_container(
    state: &AppState,
    event: &EventRecord,
) -> Result<Value, drover_store::Error> {
    let Some(host_id) = event.host_id else {
        return Ok(json!({"action": "none", "reason": "no host"}));
    };
    let external_id = event.external_id.as_deref().unwrap_or("");
    let named = ids::parse("container", external_id);
    let Some(instance) = state
        .store
        .instance_on_host(host_id, named, external_id)
        .await?
    else {
        return Ok(json!({"action": "none", "reason": "no container with that id on this host"}));
    };
    let container = ids::format("container", instance.id);
    let status = event.external_status.as_deref().unwrap_or("");
    let (from, to): (&[&str], &str) = match status {
        "start" => (&["stopped"], "running"),
        "stop" | "die" | "kill" | "oom" | "destroy" => (&["running"], "stopped"),
        _ => {
            return Ok(
                json!({"action": "none", "instanceId": container, "reason": format!("status {status:?} changes nothing")}),
            );
        }
    };
    let fields = exit_fields(event, status);
    match state
        .store
        .settle_instance(instance.id, from, to, event.created, &fields)
        .await?
    {
        Some(moved) => {
            tracing::info!(%container, status, state = to, "container event reconciled");
            state.changes.changed(&moved, Some(&instance.state));
            Ok(json!({"action": to, "instanceId": container, "previousState": instance.state}))
        }
        None => Ok(json!({
            "action": "none",
            "instanceId": container,
            "reason": format!("{container} is {} or a process holds it", instance.state),
        })),
    }
}

/// What a container keeps of a report (`agentState`, and how it ended: `exitCode`,
/// `finishedAt`, `agentMessage`), from the event's `data` where the agent put them, else from
/// the event itself. A start clears how it ended before.
fn exit_fields(event: &EventRecord, status: &str) -> Map<String, Value> {
    let data = event.data.as_object();
    let given = |key: &str| data.and_then(|data| data.get(key)).cloned();
    let from = event.external_from.as_deref().unwrap_or("the agent");
    let mut fields = Map::new();
    if status == "start" {
        fields.insert("agentState".into(), json!("running"));
        fields.insert("exitCode".into(), Value::Null);
        fields.insert("finishedAt".into(), Value::Null);
        fields.insert(
            "agentMessage".into(),
            given("agentMessage").unwrap_or_else(|| json!(format!("started ({from} reported it)"))),
        );
        return fields;
    }
    let agent_state = if status == "destroy" {
        "missing"
    } else {
        "stopped"
    };
    fields.insert("agentState".into(), json!(agent_state));
    fields.insert(
        "exitCode".into(),
        given("exitCode")
            .filter(Value::is_i64)
            .unwrap_or(Value::Null),
    );
    let at = event
        .external_timestamp
        .map(|seconds| seconds.saturating_mul(1000))
        .unwrap_or(event.created);
    fields.insert(
        "finishedAt".into(),
        given("finishedAt")
            .filter(Value::is_string)
            .unwrap_or_else(|| json!(drover_engine::render::rfc3339(at))),
    );
    fields.insert(
        "agentMessage".into(),
        given("agentMessage")
            .filter(Value::is_string)
            .unwrap_or_else(|| json!(format!("{status} ({from} reported it)"))),
    );
    fields
}

async fn reconcile_health(
    state: &AppState,
    event: &EventRecord,
) -> Result<Value, drover_store::Error> {
    let (Some(host_id), Some(instance_id)) = (event.host_id, event.instance_id) else {
        return Ok(json!({"action": "none", "reason": "no instance"}));
    };
    let Some(instance) = state
        .store
        .instance_on_host(host_id, Some(instance_id), "")
        .await?
    else {
        return Ok(json!({"action": "none", "reason": "no such container on this host"}));
    };
    let container = ids::format("container", instance.id);
    let health = event.reported_health.clone().unwrap_or_default();
    let mut fields = serde_json::Map::new();
    fields.insert("healthState".into(), json!(health));
    match state
        .store
        .merge_instance_data(instance.id, &fields)
        .await?
    {
        Some(changed) => {
            state.changes.changed(&changed, Some(&changed.state));
            Ok(json!({"action": "healthState", "instanceId": container, "healthState": health}))
        }
        None => {
            Ok(json!({"action": "none", "instanceId": container, "reason": "health unchanged"}))
        }
    }
}
