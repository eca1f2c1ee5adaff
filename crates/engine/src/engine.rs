//! The engine: claims ready processes with a lease and runs them.
//!
//! - The claim loop takes up to a batch of ready processes in one statement; only the oldest
//!   pending process of a resource is ever ready, which serializes work per resource.
//! - Each claimed process runs as its own task (bounded by a semaphore); most of its time is
//!   spent waiting for an agent's reply.
//! - A heartbeat renews this node's leases; when a node dies its leases run out within
//!   `process.lease.millis` and another node (or this one, restarted) takes the work over.
//! - An attempt that fails is retried after min(`process.retry_max_wait.millis`,
//!   2 s + 2^(n−1)·100 ms) plus jitter; after `process.max_attempts` attempts or
//!   `process.max_age.seconds` the process fails for good and the resource goes to `error`.

use std::sync::Arc;
use std::time::Duration;

use drover_proto::{Event, event::now_millis, ids, names};
use drover_store::{ExecutionRecord, Finish, ProcessInstance, Resource, ResourceKind, Store};
use serde_json::{Map, Value, json};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::defs::{self, Handler, PREVIOUS, ProcessDef};
use crate::render::resource_json;
use crate::{Bus, CallFailure, SharedTunables, Tunables};

/// The engine of one node.
#[derive(Debug)]
pub struct Engine<B> {
    store: Store,
    bus: Arc<B>,
    tunables: SharedTunables,
    node: String,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
}

/// A handle to wake the engine when work was scheduled.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    wake: Arc<Notify>,
    node: Arc<str>,
}

impl EngineHandle {
    /// Tells the engine there may be ready work.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// This node's id (recorded on the processes it schedules and runs).
    pub fn node(&self) -> &str {
        &self.node
    }
}

/// Why an attempt failed.
struct AttemptError {
    reason: &'static str,
    message: String,
    /// Trying again cannot help: the process fails at once.
    permanent: bool,
}

impl AttemptError {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        AttemptError {
            reason,
            message: message.into(),
            permanent: false,
        }
    }

    fn permanent(message: impl Into<String>) -> Self {
        AttemptError {
            reason: "PERMANENT",
            message: message.into(),
            permanent: true,
        }
    }
}

impl From<drover_store::Error> for AttemptError {
    fn from(error: drover_store::Error) -> Self {
        AttemptError::new("ERROR", format!("store: {error}"))
    }
}

impl From<CallFailure> for AttemptError {
    fn from(failure: CallFailure) -> Self {
        match failure {
            CallFailure::Timeout(timeout) => AttemptError::new(
                "TIMEOUT",
                format!("the agent did not reply within {} ms", timeout.as_millis()),
            ),
            CallFailure::ErrorReply(message) => AttemptError::new("ERROR", message),
            CallFailure::Permanent(message) => AttemptError::permanent(message),
            CallFailure::Shutdown => AttemptError::new("SHUTDOWN", "server shutting down"),
        }
    }
}

/// What a successful handler leaves behind.
#[derive(Default)]
struct Outcome {
    data: Option<Map<String, Value>>,
    host_id: Option<i64>,
    log: Vec<Value>,
}

impl<B: Bus> Engine<B> {
    /// An engine for `node` that stops when `shutdown` is cancelled.
    pub fn new(
        store: Store,
        bus: Arc<B>,
        tunables: SharedTunables,
        node: String,
        shutdown: CancellationToken,
    ) -> Self {
        Engine {
            store,
            bus,
            tunables,
            node,
            wake: Arc::new(Notify::new()),
            shutdown,
        }
    }

    /// The settings in effect now.
    fn tunables(&self) -> Arc<Tunables> {
        self.tunables.load_full()
    }

    /// A handle that wakes this engine.
    pub fn handle(&self) -> EngineHandle {
        EngineHandle {
            wake: self.wake.clone(),
            node: self.node.clone().into(),
        }
    }

    /// Runs the claim loop and the lease heartbeat until shutdown; waits for running
    /// processes to end their current call or be abandoned (their leases then run out).
    pub async fn run(self: Arc<Self>) {
        let heartbeat = tokio::spawn(self.clone().heartbeat());
        let workers = Arc::new(Semaphore::new(self.tunables().workers));
        let tasks = tokio_util::task::TaskTracker::new();
        loop {
            if self.shutdown.is_cancelled() {
                break;
            }
            let free = workers.available_permits();
            let tunables = self.tunables();
            let batch = tunables.claim_batch.min(free) as i64;
            let claimed = if batch > 0 {
                let lease_until = now_millis() + tunables.lease_millis;
                match self.store.claim(&self.node, batch, lease_until).await {
                    Ok(claimed) => claimed,
                    Err(error) => {
                        tracing::warn!(%error, "claiming processes failed");
                        Vec::new()
                    }
                }
            } else {
                Vec::new()
            };
            let full_batch = batch > 0 && claimed.len() as i64 == batch;
            for process in claimed {
                let permit = workers
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed");
                let engine = self.clone();
                tasks.spawn(async move {
                    engine.run_attempt(process).await;
                    drop(permit);
                    engine.wake.notify_one();
                });
            }
            if full_batch {
                continue;
            }
            let idle = self.idle_wait().await;
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(idle) => {}
                () = self.shutdown.cancelled() => break,
            }
        }
        tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
        heartbeat.abort();
    }

    /// How long to sleep when nothing is ready: until the earliest delayed process or lease
    /// expiry, at most `process.poll.millis`.
    async fn idle_wait(&self) -> Duration {
        let poll = self.tunables().poll_millis;
        let wait = match self.store.next_run_after().await {
            Ok(Some(next)) => (next - now_millis() + 1).clamp(1, poll),
            _ => poll,
        };
        Duration::from_millis(wait as u64)
    }

    async fn heartbeat(self: Arc<Self>) {
        loop {
            let lease = self.tunables().lease_millis;
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis((lease / 3) as u64)) => {}
                () = self.shutdown.cancelled() => return,
            }
            if let Err(error) = self
                .store
                .renew_leases(&self.node, now_millis() + lease)
                .await
            {
                tracing::warn!(%error, "renewing leases failed");
            }
        }
    }

    /// One attempt of one process, from claim to the transaction that records its end.
    async fn run_attempt(&self, process: ProcessInstance) {
        let started = now_millis();
        let (finish, log) = self.attempt(&process, started).await;
        let (exit_reason, message) = match &finish {
            Finish::Done { .. } => ("DONE".to_owned(), None),
            Finish::Retry {
                reason, message, ..
            }
            | Finish::Failed { reason, message } => (reason.clone(), Some(message.clone())),
            Finish::Canceled { reason } => (reason.clone(), Some(reason.clone())),
        };
        let record = ExecutionRecord {
            started,
            ended: now_millis(),
            exit_reason,
            message,
            log: json!({"process": process.process_name, "attempt": process.execution_count, "node": self.node, "steps": log}),
        };
        match self
            .store
            .finish(&process, &self.node, &record, &finish)
            .await
        {
            Ok(Some(resource)) => {
                let previous = process.transitioning_state();
                if !matches!(finish, Finish::Canceled { .. }) {
                    self.bus.changed(&resource, previous);
                }
            }
            Ok(None) => tracing::info!(
                process = process.id,
                "process was canceled or taken over; result dropped"
            ),
            Err(error) => {
                tracing::warn!(process = process.id, %error, "recording a process attempt failed; it will be retried when its lease runs out")
            }
        }
    }

    async fn attempt(&self, process: &ProcessInstance, started: i64) -> (Finish, Vec<Value>) {
        let Some(def) = defs::find(&process.process_name) else {
            let message = format!("no process definition named {}", process.process_name);
            return (
                Finish::Failed {
                    message,
                    reason: "UNKNOWN_PROCESS".into(),
                },
                Vec::new(),
            );
        };
        let resource = match self
            .store
            .get_resource(process.kind, process.resource_id)
            .await
        {
            Ok(Some(resource)) => resource,
            Ok(None) => {
                return (
                    Finish::Canceled {
                        reason: "RESOURCE_GONE".into(),
                    },
                    Vec::new(),
                );
            }
            Err(error) => {
                return (
                    self.retry_or_fail(process, def, AttemptError::from(error)),
                    Vec::new(),
                );
            }
        };
        if Some(resource.state.as_str()) != process.transitioning_state() {
            return (
                Finish::Canceled {
                    reason: "STATE_CHANGED".into(),
                },
                Vec::new(),
            );
        }
        let max_age_ms = self.tunables().max_age_millis;
        if started - process.created > max_age_ms {
            let message = format!(
                "{} gave up after {} s (process.max_age.seconds) and {} attempts; last error: {}",
                def.name,
                (started - process.created) / 1000,
                process.execution_count.saturating_sub(1),
                process.last_error.as_deref().unwrap_or("none")
            );
            return (
                Finish::Failed {
                    message,
                    reason: "MAX_AGE".into(),
                },
                Vec::new(),
            );
        }
        match self.run_handler(def, &resource).await {
            Ok(outcome) => {
                let done_state = if def.done == PREVIOUS {
                    process.previous_state().unwrap_or("inactive").to_owned()
                } else {
                    def.done.to_owned()
                };
                let next = self.delegate(def, &resource).map(|next| {
                    (
                        next.name.to_owned(),
                        next.transitioning_from(&done_state),
                        Map::new(),
                    )
                });
                let finish = Finish::Done {
                    done_state,
                    data: outcome.data,
                    host_id: outcome.host_id,
                    next,
                };
                (finish, outcome.log)
            }
            Err(error) => {
                let log = vec![json!({"error": error.message, "reason": error.reason})];
                (self.retry_or_fail(process, def, error), log)
            }
        }
    }

    fn delegate(&self, def: &ProcessDef, resource: &Resource) -> Option<&'static ProcessDef> {
        let next = defs::find(def.delegate?)?;
        // A container created with startOnCreate=false stays stopped.
        if def.name == "instance.create"
            && resource.data.get("startOnCreate") == Some(&Value::Bool(false))
        {
            return None;
        }
        Some(next)
    }

    fn retry_or_fail(
        &self,
        process: &ProcessInstance,
        def: &ProcessDef,
        error: AttemptError,
    ) -> Finish {
        let attempts = process.execution_count;
        let max_attempts = self.tunables().max_attempts;
        if error.permanent {
            return Finish::Failed {
                message: format!("{} failed permanently: {}", def.name, error.message),
                reason: error.reason.to_owned(),
            };
        }
        if attempts >= max_attempts {
            let message = format!(
                "{} failed {attempts} of {max_attempts} attempts; last error: {}",
                def.name, error.message
            );
            return Finish::Failed {
                message,
                reason: error.reason.to_owned(),
            };
        }
        let delay = backoff_millis(attempts, self.tunables().retry_max_wait_millis);
        Finish::Retry {
            run_after: now_millis() + delay,
            message: error.message,
            reason: error.reason.to_owned(),
        }
    }

    async fn run_handler(
        &self,
        def: &ProcessDef,
        resource: &Resource,
    ) -> Result<Outcome, AttemptError> {
        match def.handler {
            Handler::None => Ok(Outcome::default()),
            Handler::Agent(command) => self.call_agent(def, resource, &[command]).await,
            Handler::PingAgent => self.ping_agent(resource).await,
            Handler::AgentTwice(first, second) => {
                self.call_agent(def, resource, &[first, second]).await
            }
        }
    }

    /// Calls the agent of the resource's host with each command in turn, merging each
    /// reply's data into the resource.
    async fn call_agent(
        &self,
        def: &ProcessDef,
        resource: &Resource,
        commands: &[&str],
    ) -> Result<Outcome, AttemptError> {
        let mut outcome = Outcome::default();
        let host_id = match resource.host_id {
            Some(host) => host,
            // Removing what never reached a host needs no agent.
            None if def.cancels_pending => return Ok(outcome),
            None => {
                let requested = resource
                    .data
                    .get("requestedHostId")
                    .and_then(Value::as_str)
                    .and_then(|text| ids::parse("host", text));
                let host = match requested {
                    // The API resolved the reference in the resource's project; a host that
                    // moved or a row written around the API is refused here too.
                    Some(host) => {
                        let owner = self
                            .store
                            .get_resource(ResourceKind::Host, host)
                            .await?
                            .map(|row| row.account_id);
                        if owner != Some(resource.account_id) {
                            return Err(AttemptError::new(
                                "INVALID_HOST",
                                format!(
                                    "requested host {} is not a host of this project",
                                    ids::format("host", host)
                                ),
                            ));
                        }
                        Some(host)
                    }
                    None => self
                        .store
                        .pick_host(resource.account_id)
                        .await?
                        .map(|(host, _)| host),
                };
                let host = host.ok_or_else(|| {
                    AttemptError::new("NO_HOST", "no active host with an active agent to run on")
                })?;
                let host = self
                    .store
                    .assign_host(resource.kind, resource.id, host)
                    .await?
                    .unwrap_or(host);
                outcome.host_id = Some(host);
                host
            }
        };
        let (agent_id, agent_state) = self.store.host_agent(host_id).await?.ok_or_else(|| {
            AttemptError::new(
                "NO_AGENT",
                format!("host {} has no agent", ids::format("host", host_id)),
            )
        })?;
        if !matches!(
            agent_state.as_str(),
            "active" | "activating" | "reconnecting"
        ) {
            return Err(AttemptError::new(
                "AGENT_UNAVAILABLE",
                format!("agent {} is {agent_state}", ids::format("agent", agent_id)),
            ));
        }
        let timeout = Duration::from_millis(self.tunables().call_timeout_millis as u64);
        let data_key = match resource.kind {
            ResourceKind::Instance => "instance",
            other => other.table(),
        };
        let mut data = resource.data.clone();
        let injected = self.agent_keys_for(def, resource).await?;
        for command in commands {
            let mut current = resource.clone();
            current.data = data.clone();
            if let Some(environment) = &injected
                && *command == "compute.instance.activate"
            {
                // The keys travel in the request only; the resource never stores them.
                let env = current
                    .data
                    .entry("environment")
                    .or_insert_with(|| json!({}));
                if let Value::Object(env) = env {
                    env.extend(environment.clone());
                }
            }
            if outcome.host_id.is_some() {
                current.host_id = outcome.host_id;
            }
            let request = Event::new(names::for_agent(command, agent_id))
                .with_resource(
                    resource.kind.api_type(),
                    ids::format(resource.kind.api_type(), resource.id),
                )
                .with_data(json!({ data_key: resource_json(&current), "processName": def.name }));
            let store = self.store.clone();
            let bus = self.bus.clone();
            let progress_resource = current.clone();
            let on_progress = Box::new(move |reply: &Event| {
                let store = store.clone();
                let bus = bus.clone();
                let mut resource = progress_resource.clone();
                let message = reply.transitioning_message.clone();
                let progress = reply.transitioning_progress;
                tokio::spawn(async move {
                    if store
                        .set_progress(resource.kind, resource.id, message.as_deref(), progress)
                        .await
                        .is_ok()
                    {
                        resource.transitioning_message = message;
                        resource.transitioning_progress = progress;
                        bus.changed(&resource, None);
                    }
                });
            });
            let reply = self.bus.call(request, timeout, on_progress).await?;
            outcome.log.push(json!({"command": command, "agent": ids::format("agent", agent_id), "reply": reply.id}));
            if let Some(Value::Object(reply_data)) =
                reply.data.as_ref().and_then(|data| data.get(data_key))
            {
                for (key, value) in reply_data {
                    if !crate::render::RESERVED.contains(&key.as_str()) {
                        data.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        if data != resource.data {
            outcome.data = Some(data);
        }
        Ok(outcome)
    }
}

impl<B: Bus> Engine<B> {
    /// For a container labelled `io.rancher.container.create_agent=true`, its own agent key as
    /// the environment variables the original injects.
    async fn agent_keys_for(
        &self,
        def: &ProcessDef,
        resource: &Resource,
    ) -> Result<Option<Map<String, Value>>, AttemptError> {
        let labels = resource.data.get("labels").and_then(Value::as_object);
        let wants_agent = labels
            .and_then(|labels| labels.get("io.rancher.container.create_agent"))
            .and_then(Value::as_str)
            .is_some_and(|value| value.eq_ignore_ascii_case("true"));
        let starts = matches!(
            def.handler,
            Handler::Agent("compute.instance.activate")
                | Handler::AgentTwice(_, "compute.instance.activate")
        );
        if resource.kind != ResourceKind::Instance || !wants_agent || !starts {
            return Ok(None);
        }
        let role = labels
            .and_then(|labels| labels.get("io.rancher.container.agent.role"))
            .and_then(Value::as_str)
            .and_then(|roles| {
                roles
                    .split(',')
                    .map(str::trim)
                    .find(|role| *role == "environment" || *role == "agent")
            });
        let (agent_id, key) = self.store.instance_agent_key(resource, role).await?;
        let access = key.credential.public_value;
        let secret = key.secret_value;
        let mut env = Map::new();
        env.insert("CATTLE_ACCESS_KEY".into(), json!(access));
        env.insert("CATTLE_SECRET_KEY".into(), json!(secret));
        env.insert(
            "CATTLE_AGENT_ID".into(),
            json!(ids::format("agent", agent_id)),
        );
        if role == Some("environment") {
            env.insert("CATTLE_ENVIRONMENT_ACCESS_KEY".into(), json!(access));
            env.insert("CATTLE_ENVIRONMENT_SECRET_KEY".into(), json!(secret));
        }
        Ok(Some(env))
    }

    /// Pings the agent a resource is; succeeds when it answers.
    async fn ping_agent(&self, resource: &Resource) -> Result<Outcome, AttemptError> {
        let timeout = Duration::from_millis(self.tunables().activate_ping_timeout_millis as u64);
        let request = Event::new(names::for_agent("ping", resource.id))
            .with_resource("agent", ids::format("agent", resource.id))
            .with_data(json!({"options": {"instances": true}, "resources": []}));
        let reply = self.bus.call(request, timeout, Box::new(|_| {})).await?;
        Ok(Outcome {
            log: vec![json!({"command": "ping", "reply": reply.id})],
            ..Outcome::default()
        })
    }
}

/// The wait before attempt `attempts + 1`: min(max, 2 s + 2^(n−1)·100 ms), plus up to 10 %
/// jitter so that many failures at once do not retry in lockstep.
pub fn backoff_millis(attempts: i64, max_wait: i64) -> i64 {
    let exponent = attempts.clamp(1, 30) - 1;
    let base = 2000i64
        .saturating_add(100i64.saturating_mul(1i64 << exponent))
        .min(max_wait.max(1));
    base + rand::random_range(0..=base / 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_bounded_jitter() {
        for (attempts, base) in [
            (1, 2100),
            (2, 2200),
            (3, 2400),
            (10, 53_200),
            (11, 104_400),
            (12, 120_000),
            (40, 120_000),
        ] {
            let wait = backoff_millis(attempts, 120_000);
            assert!(
                wait >= base && wait <= base + base / 10,
                "attempt {attempts}: {wait}"
            );
        }
        assert!(backoff_millis(3, 500) <= 550);
    }
}
