//! The ping monitor: every `agent.ping.interval.millis` each agent gets a `ping` and has
//! `agent.ping.timeout.millis` to answer. Answers carry host facts and instance states, which are
//! reconciled: a container the server thinks is running but the agent reports stopped (its
//! process died) becomes `stopped`, recorded as a container event. After
//! `agent.ping.reconnect.after.failed.count` misses an agent becomes `reconnecting`, after
//! `agent.disconnect.after.seconds` `disconnected`; its hosts follow. An answer brings it back
//! (an `activating` host is not moved: its `host.activate` waits for the agent, and the agent
//! coming back wakes it). Placement takes only active hosts whose agent is active.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use drover_proto::{Event, event::now_millis, ids, names};
use drover_store::ResourceKind;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::state::AppState;

struct PingResult {
    agent_id: i64,
    sent_at: i64,
    reply: Option<Event>,
}

#[derive(Default)]
struct Misses {
    count: i64,
    since: i64,
}

/// What the monitor remembers of an agent between pings, so that a healthy agent's ping costs
/// no database write: its state as last seen, a digest of the host facts it last reported,
/// when `last_ping` was last written, and how many answers it gave.
#[derive(Default)]
struct Seen {
    state: String,
    facts_digest: u64,
    last_ping_written: i64,
    answers: u64,
}

/// `last_ping` is written at most this often for an agent whose facts did not change.
const LAST_PING_EVERY_MS: i64 = 60_000;
/// Instance states are reconciled on every third answer, and at once when an answer reports an
/// instance that is not running.
const RECONCILE_EVERY: u64 = 3;

/// Runs the monitor until shutdown.
pub async fn run(state: AppState, shutdown: CancellationToken) {
    let (tx, mut results) = mpsc::channel::<PingResult>(1024);
    let mut in_flight: HashSet<i64> = HashSet::new();
    let mut misses: HashMap<i64, Misses> = HashMap::new();
    let mut seen: HashMap<i64, Seen> = HashMap::new();
    loop {
        let interval =
            Duration::from_millis(state.settings.uint("agent.ping.interval.millis").max(10));
        let tick = tokio::time::sleep(interval);
        tokio::pin!(tick);
        loop {
            tokio::select! {
                () = &mut tick => break,
                () = shutdown.cancelled() => return,
                Some(result) = results.recv() => {
                    in_flight.remove(&result.agent_id);
                    // Only the leader writes what pings found (checked again here: the
                    // duty may have moved while the ping was out).
                    if state.cluster.is_leader() {
                        handle_result(&state, result, &mut misses, &mut seen).await;
                    }
                }
            }
        }
        // Once per cluster: only the node holding the leader duty pings. Another node's
        // counts start afresh when it takes the duty over.
        if !state.cluster.begin_task("agent.ping").await {
            misses.clear();
            seen.clear();
            continue;
        }
        let agents = match state.store.agents_to_ping().await {
            Ok(agents) => agents,
            Err(error) => {
                tracing::warn!(%error, "ping monitor: listing agents failed");
                continue;
            }
        };
        let live: HashSet<i64> = agents.iter().map(|(id, _, _)| *id).collect();
        misses.retain(|id, _| live.contains(id));
        seen.retain(|id, _| live.contains(id));
        for (agent_id, agent_state, _) in &agents {
            seen.entry(*agent_id)
                .or_default()
                .state
                .clone_from(agent_state);
        }
        for (agent_id, _, _) in agents {
            if !in_flight.insert(agent_id) {
                continue;
            }
            let hub = state.hub.clone();
            let tx = tx.clone();
            let timeout =
                Duration::from_millis(state.settings.uint("agent.ping.timeout.millis").max(10));
            tokio::spawn(async move {
                let sent_at = now_millis();
                let request = Event::new(names::for_agent("ping", agent_id))
                    .with_resource("agent", ids::format("agent", agent_id))
                    .with_data(
                        json!({"options": {"instances": true, "resources": true}, "resources": []}),
                    );
                let reply = hub.call(request, timeout, |_| {}).await.ok();
                let _ = tx
                    .send(PingResult {
                        agent_id,
                        sent_at,
                        reply,
                    })
                    .await;
            });
        }
    }
}

async fn handle_result(
    state: &AppState,
    result: PingResult,
    misses: &mut HashMap<i64, Misses>,
    seen: &mut HashMap<i64, Seen>,
) {
    let agent_id = result.agent_id;
    let seen = seen.entry(agent_id).or_default();
    let Some(reply) = result.reply else {
        let entry = misses.entry(agent_id).or_default();
        if entry.count == 0 {
            entry.since = result.sent_at;
        }
        entry.count += 1;
        let (count, since) = (entry.count, entry.since);
        let reconnect_after = state
            .settings
            .int("agent.ping.reconnect.after.failed.count");
        let disconnect_after_ms = state
            .settings
            .int("agent.disconnect.after.seconds")
            .saturating_mul(1000);
        if count >= reconnect_after && seen.state == "active" {
            move_agent(state, agent_id, &["active"], "reconnecting").await;
            seen.state = "reconnecting".into();
        }
        if now_millis() - since >= disconnect_after_ms && seen.state == "reconnecting" {
            move_agent(state, agent_id, &["reconnecting"], "disconnected").await;
            seen.state = "disconnected".into();
        }
        return;
    };
    misses.remove(&agent_id);
    announce_ping(state, agent_id);
    let resources: Vec<Value> = reply
        .data
        .as_ref()
        .and_then(|data| data.get("resources"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let host_facts: Option<Map<String, Value>> = resources
        .iter()
        .find(|resource| resource["type"] == "host")
        .and_then(Value::as_object)
        .map(|facts| {
            facts
                .iter()
                .filter(|(key, _)| key.as_str() != "type")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        });
    let digest = {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        host_facts
            .as_ref()
            .map(|facts| Value::Object(facts.clone()).to_string())
            .hash(&mut hasher);
        hasher.finish()
    };
    let now = now_millis();
    let facts_changed = host_facts.is_some() && digest != seen.facts_digest;
    if facts_changed || now - seen.last_ping_written >= LAST_PING_EVERY_MS {
        let facts = if facts_changed {
            host_facts.as_ref()
        } else {
            None
        };
        match state.store.record_ping(agent_id, facts).await {
            Ok(()) => {
                seen.last_ping_written = now;
                if facts_changed {
                    seen.facts_digest = digest;
                }
            }
            Err(error) => tracing::warn!(%error, agent_id, "recording a ping failed"),
        }
    }
    if seen.state != "active" {
        move_agent(state, agent_id, &["reconnecting", "disconnected"], "active").await;
        seen.state = "active".into();
    }
    seen.answers += 1;
    let reports_instances = reply
        .data
        .as_ref()
        .is_some_and(|data| data.get("resources").is_some());
    let reports_trouble = resources
        .iter()
        .any(|resource| resource["type"] == "instance" && resource["state"] != "running");
    if reports_instances && (reports_trouble || seen.answers % RECONCILE_EVERY == 1) {
        reconcile(state, agent_id, result.sent_at, &resources).await;
    }
}

/// `agent.ping`: an agent answered a ping, published raw (for admins) with the time in
/// `data.lastPing`, so a live view shows each agent's last answer. The stored `last_ping` is
/// written at most every minute (a healthy agent's ping costs no database write); this costs a
/// lookup in the hub when no one listens.
pub const AGENT_PING: &str = "agent.ping";

fn announce_ping(state: &AppState, agent_id: i64) {
    let event = Event::new(AGENT_PING)
        .with_resource("agent", ids::format("agent", agent_id))
        .with_data(json!({ "lastPing": now_millis() }));
    state.hub.publish(&event);
}

/// Moves an agent and its hosts between ping states, announcing the change.
async fn move_agent(state: &AppState, agent_id: i64, from: &[&str], to: &str) {
    match state
        .store
        .set_state(ResourceKind::Agent, agent_id, from, to)
        .await
    {
        Ok(Some(agent)) => {
            tracing::info!(agent = %ids::format("agent", agent_id), state = to, "agent state changed by the ping monitor");
            state.changes.changed(&agent, None);
            for host_id in state
                .store
                .hosts_of_agent(agent_id)
                .await
                .unwrap_or_default()
            {
                let host_from: &[&str] = &["active", "reconnecting", "disconnected"];
                if let Ok(Some(host)) = state
                    .store
                    .set_state(ResourceKind::Host, host_id, host_from, to)
                    .await
                {
                    state.changes.changed(&host, None);
                }
            }
            // Back to active: the store woke what waited for the agent or its hosts.
            if drover_store::wakes_waiting(ResourceKind::Agent, to) {
                state.engine.wake();
            }
        }
        Ok(None) => {}
        Err(error) => tracing::warn!(%error, agent_id, "ping monitor: changing agent state failed"),
    }
}

/// Stops the containers the agent no longer runs.
async fn reconcile(state: &AppState, agent_id: i64, sent_at: i64, resources: &[Value]) {
    let reported: HashMap<String, (String, &Value)> = resources
        .iter()
        .filter(|resource| resource["type"] == "instance")
        .filter_map(|resource| {
            Some((
                resource["id"].as_str()?.to_owned(),
                (resource["state"].as_str()?.to_owned(), resource),
            ))
        })
        .collect();
    let instances = match state
        .store
        .settled_instances_of_agent(agent_id, sent_at)
        .await
    {
        Ok(instances) => instances,
        Err(error) => {
            tracing::warn!(%error, "ping monitor: listing instances failed");
            return;
        }
    };
    for instance in instances {
        let id = ids::format("container", instance.id);
        let (reported_state, report) = reported
            .get(&id)
            .map(|(state, report)| (state.as_str(), Some(*report)))
            .unwrap_or(("missing", None));
        if reported_state == "running" {
            continue;
        }
        let exit_code = report.and_then(|report| report["exitCode"].as_i64());
        // What the container keeps of how it ended: the agent's report, else what the
        // monitor knows.
        let mut fields = Map::new();
        fields.insert("agentState".into(), json!(reported_state));
        fields.insert("exitCode".into(), json!(exit_code));
        fields.insert(
            "finishedAt".into(),
            report
                .map(|report| report["finishedAt"].clone())
                .filter(Value::is_string)
                .unwrap_or_else(|| json!(drover_engine::render::rfc3339(sent_at))),
        );
        fields.insert(
            "agentMessage".into(),
            report
                .map(|report| report["agentMessage"].clone())
                .filter(Value::is_string)
                .unwrap_or_else(|| {
                    json!(format!(
                        "found {reported_state} by the ping monitor (the agent reports no such process)"
                    ))
                }),
        );
        match state
            .store
            .settle_instance(instance.id, &["running"], "stopped", sent_at, &fields)
            .await
        {
            Ok(Some(stopped)) => {
                tracing::info!(container = %id, reported = reported_state, "container found not running; now stopped");
                let mut data = json!({"reportedState": reported_state, "agentId": ids::format("agent", agent_id)});
                if let Some(code) = exit_code {
                    data["exitCode"] = json!(code);
                }
                let status = if reported_state == "missing" {
                    "destroy"
                } else {
                    "die"
                };
                if let Err(error) = state
                    .store
                    .insert_container_event(stopped.account_id, stopped.host_id, &id, status, &data)
                    .await
                {
                    tracing::warn!(%error, "recording a container event failed");
                }
                state.changes.changed(&stopped, Some("running"));
            }
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, "stopping a dead container failed"),
        }
    }
}
