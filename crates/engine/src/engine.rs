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
//! - A process that cannot run yet (no host to place it on, a host whose agent is not active) is
//!   put back by the claim itself with the same backoff, using up no attempt, and woken when
//!   what it waits for becomes active (`drover_store::wakes_waiting`); the engine runs nothing
//!   for it.

use std::sync::Arc;
use std::time::Duration;

use drover_proto::{Event, ids, names};
use drover_store::{
    ClaimRequest, Claimed, ExecutionRecord, Finish, FinishItem, HostAgent, InstanceAgentKey,
    ProcessInstance, ProgressItem, Resource, ResourceKind, Store,
};
use serde_json::{Map, Value, json};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::defs::{self, Handler, PREVIOUS, ProcessDef};
use crate::external::{BUILT_IN_PRIORITY, HandlerCall, ProcessHandlers, Registry};
use crate::render::resource_json;
use crate::stats::{Ended, ProcessStats};
use crate::{Bus, CallFailure, Clock, SharedTunables, Tunables};

/// The engine of one node.
#[derive(Debug)]
pub struct Engine<B> {
    store: Store,
    bus: Arc<B>,
    tunables: SharedTunables,
    node: String,
    wake: Arc<Notify>,
    /// Finishes the store refused: the attempt had been canceled or taken over.
    fenced: Arc<std::sync::atomic::AtomicU64>,
    shutdown: CancellationToken,
    /// Processes whose resource must be on a host before they run (placed in the claim).
    place: Vec<&'static str>,
    /// Processes that start a container (its `create_agent` key is made in the claim).
    agent_key: Vec<&'static str>,
    /// Processes that wait in the claim until their resource's agent is active.
    await_agent: Vec<&'static str>,
    /// Every time the engine computes (attempt times, `run_after`, max age, leases, the
    /// claim's now) is on this clock.
    clock: Clock,
    /// The active external handlers.
    external: Registry,
    /// Counters and histograms by process name, for `/metrics`.
    stats: Arc<ProcessStats>,
}

/// A handle to wake the engine when work was scheduled.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    wake: Arc<Notify>,
    node: Arc<str>,
    fenced: Arc<std::sync::atomic::AtomicU64>,
    stats: Arc<ProcessStats>,
}

impl EngineHandle {
    /// Tells the engine there may be ready work.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// How many attempts' finishes the store refused because the attempt no longer held its
    /// process (canceled, or taken over by another node or a later attempt).
    pub fn fenced(&self) -> u64 {
        self.fenced.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// This node's id (recorded on the processes it schedules and runs).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// This node's process counters (what it scheduled and ran).
    pub fn stats(&self) -> &ProcessStats {
        &self.stats
    }
}

/// The most `onError` processes that may follow each other before the chain is failed.
const MAX_CHAIN: i64 = 3;

/// Why an attempt failed.
struct AttemptError {
    reason: &'static str,
    message: String,
    /// Trying again cannot help: the process fails at once.
    permanent: bool,
    /// The process an external handler's `onError` names: the attempt ends by running it.
    on_error: Option<String>,
    /// The steps that ran before the failure.
    log: Vec<Value>,
}

impl AttemptError {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        AttemptError {
            reason,
            message: message.into(),
            permanent: false,
            on_error: None,
            log: Vec::new(),
        }
    }

    fn permanent(message: impl Into<String>) -> Self {
        AttemptError {
            permanent: true,
            ..AttemptError::new("PERMANENT", message)
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
    /// The state the agent reported instead of the process's done state: a command that
    /// exited right after it started ends `stopped`, recorded once, never started again.
    ended_as: Option<&'static str>,
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
        let calls_agent =
            |def: &&ProcessDef| matches!(def.handler, Handler::Agent(_) | Handler::AgentTwice(..));
        let place = defs::DEFINITIONS
            .iter()
            .filter(calls_agent)
            .filter(|def| !def.cancels_pending)
            .map(|def| def.name)
            .collect();
        let agent_key = defs::DEFINITIONS
            .iter()
            .filter(|def| {
                matches!(
                    def.handler,
                    Handler::Agent("compute.instance.activate")
                        | Handler::AgentTwice(_, "compute.instance.activate")
                )
            })
            .map(|def| def.name)
            .collect();
        let await_agent = defs::DEFINITIONS
            .iter()
            .filter(|def| def.awaits_agent)
            .map(|def| def.name)
            .collect();
        Engine {
            store,
            bus,
            tunables,
            node,
            wake: Arc::new(Notify::new()),
            fenced: Arc::default(),
            shutdown,
            place,
            agent_key,
            await_agent,
            clock: Clock::new(),
            external: Registry::new(),
            stats: Arc::default(),
        }
    }

    /// The engine with these external handlers (shared with whoever updates them).
    pub fn with_external(mut self, registry: Registry) -> Self {
        self.external = registry;
        self
    }

    /// The engine's clock.
    pub fn clock(&self) -> Clock {
        self.clock
    }

    fn now_millis(&self) -> i64 {
        self.clock.now_millis()
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
            fenced: self.fenced.clone(),
            stats: self.stats.clone(),
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
                let now = self.now_millis();
                let request = ClaimRequest {
                    node: self.node.clone(),
                    limit: batch,
                    now,
                    lease_until: now + tunables.lease_millis,
                    place: self.place.clone(),
                    agent_key: self.agent_key.clone(),
                    await_agent: self.await_agent.clone(),
                    max_age_millis: tunables.max_age_millis,
                    retry_max_wait_millis: tunables.retry_max_wait_millis,
                };
                match self.store.claim(request).await {
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
            // Short of workers: a finished attempt's permit lets the next claim take more.
            let starved = Arc::new(std::sync::atomic::AtomicBool::new(
                (batch as usize) < tunables.claim_batch && full_batch || batch == 0,
            ));
            for claimed in claimed {
                // Put back by the claim to wait (for a host, for its agent), using up no
                // attempt: nothing to run; its resource shows why.
                if claimed.waiting.is_some() {
                    self.stats
                        .of(&claimed.process.process_name)
                        .waits
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Some(resource) = &claimed.resource {
                        self.bus.changed(resource, None);
                    }
                    continue;
                }
                let permit = workers
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed");
                let engine = self.clone();
                let starved = starved.clone();
                tasks.spawn(async move {
                    let scheduled_more = engine.run_attempt(claimed).await;
                    drop(permit);
                    // Nothing new is ready otherwise: an idle engine does not claim in vain.
                    if scheduled_more || starved.load(std::sync::atomic::Ordering::Relaxed) {
                        engine.wake.notify_one();
                    }
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
            Ok(Some(next)) => (next - self.now_millis() + 1).clamp(1, poll),
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
                .renew_leases(&self.node, self.now_millis() + lease)
                .await
            {
                tracing::warn!(%error, "renewing leases failed");
            }
        }
    }

    /// One attempt of one process, from claim to the transaction that records its end.
    /// Returns whether the attempt scheduled another process (a delegate or a retry).
    async fn run_attempt(&self, claimed: Claimed) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let started = self.now_millis();
        let counters = self.stats.of(&claimed.process.process_name);
        counters.attempts.fetch_add(1, Relaxed);
        let (finish, log) = self.attempt(&claimed, started).await;
        let process = claimed.process;
        let (exit_reason, message) = finish.reason_and_message();
        let (exit_reason, message) = (exit_reason.to_owned(), message.map(str::to_owned));
        let record = ExecutionRecord {
            started,
            ended: self.now_millis(),
            exit_reason,
            message,
            log: json!({"process": process.process_name, "attempt": process.execution_count, "node": self.node, "steps": log}),
        };
        let canceled = matches!(finish, Finish::Canceled { .. });
        let next = matches!(
            finish,
            Finish::Done { next: Some(_), .. } | Finish::Retry { .. } | Finish::Chained { .. }
        );
        let (id, transitioning) = (process.id, process.transitioning_state().map(str::to_owned));
        let (ended, next_counters) = match &finish {
            Finish::Done { next, .. } => (
                Some(Ended::Success),
                next.as_ref().map(|(name, ..)| self.stats.of(name)),
            ),
            Finish::Retry { .. } => (None, None),
            Finish::Failed { .. } => (Some(Ended::Failure), None),
            Finish::Chained { next, .. } => (Some(Ended::Chain), Some(self.stats.of(&next.0))),
            Finish::Canceled { .. } => (Some(Ended::Canceled), None),
        };
        let took = record.ended - process.created;
        let item = FinishItem {
            process,
            node: self.node.clone(),
            record,
            finish,
        };
        let result = self.store.finish(item).await;
        // What the store recorded: an end (and the delegate it scheduled) or a retry. A
        // cancel moves no resource, so its answer is `None` whether or not the attempt still
        // held the process; either way the process ended canceled.
        if matches!(result, Ok(Some(_))) || (canceled && result.is_ok()) {
            match ended {
                Some(ended) => counters.ended(ended, took),
                None => {
                    counters.retries.fetch_add(1, Relaxed);
                }
            }
            if let Some(next) = next_counters {
                next.scheduled.fetch_add(1, Relaxed);
            }
        }
        match result {
            Ok(Some(resource)) => {
                if !canceled {
                    self.bus.changed(&resource, transitioning.as_deref());
                }
                // An agent or host that became active woke what waited for it (in the finish).
                return next || drover_store::wakes_waiting(resource.kind, &resource.state);
            }
            Ok(None) => {
                self.fenced
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(
                    process = id,
                    "the attempt changed nothing: the process was canceled or taken over, or its resource moved"
                )
            }
            Err(error) => {
                tracing::warn!(process = id, %error, "recording a process attempt failed; it will be retried when its lease runs out")
            }
        }
        false
    }

    async fn attempt(&self, claimed: &Claimed, started: i64) -> (Finish, Vec<Value>) {
        let process = &claimed.process;
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
        let Some(resource) = &claimed.resource else {
            return (
                Finish::Canceled {
                    reason: "RESOURCE_GONE".into(),
                },
                Vec::new(),
            );
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
        let external = if resource.kind == ResourceKind::ExternalHandler {
            ProcessHandlers::default()
        } else {
            self.external.for_process(def.name, resource.account_id)
        };
        let result = if external.is_empty() {
            self.run_handler(def, claimed, resource).await
        } else {
            self.run_phases(def, claimed, resource, &external).await
        };
        match result {
            Err(AttemptError {
                on_error: Some(next),
                message,
                reason,
                log,
                ..
            }) => {
                let mut steps = log;
                steps.push(json!({"error": message, "reason": reason, "onError": next}));
                let transitioning = process.transitioning_state().unwrap_or("").to_owned();
                let depth = process
                    .data
                    .get("chainDepth")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                let mut chained = Map::new();
                chained.insert("chainedFrom".into(), json!(def.name));
                chained.insert("chainDepth".into(), json!(depth + 1));
                let finish = match defs::find(&next).filter(|next| next.kind == def.kind) {
                    // Handlers whose errors chain into each other (start → stop → start …)
                    // end after a few links instead of running forever.
                    Some(_) if depth >= MAX_CHAIN => Finish::Failed {
                        message: format!(
                            "{} failed: {message}; not running {next}: {MAX_CHAIN} onError processes ran in a row",
                            def.name
                        ),
                        reason: reason.to_owned(),
                    },
                    Some(next_def) => Finish::Chained {
                        message: format!("{} failed: {message}; running {next}", def.name),
                        reason: reason.to_owned(),
                        next: (
                            next_def.name.to_owned(),
                            next_def.transitioning_from(&transitioning),
                            chained,
                        ),
                        previous_state: transitioning,
                    },
                    None => Finish::Failed {
                        message: format!(
                            "{} failed: {message} (onError names no process {next:?} of a {})",
                            def.name,
                            def.kind.api_type()
                        ),
                        reason: reason.to_owned(),
                    },
                };
                (finish, steps)
            }
            Ok(outcome) => {
                let done_state = if let Some(state) = outcome.ended_as {
                    state.to_owned()
                } else if def.done == PREVIOUS {
                    process.previous_state().unwrap_or("inactive").to_owned()
                } else {
                    def.done.to_owned()
                };
                let next = defs::delegate_of(def, &resource.data).map(|next| {
                    (
                        next.name.to_owned(),
                        next.transitioning_from(&done_state),
                        Map::new(),
                    )
                });
                let finish = Finish::Done {
                    done_state,
                    data: outcome.data,
                    next,
                };
                (finish, outcome.log)
            }
            Err(mut error) => {
                let mut log = std::mem::take(&mut error.log);
                log.push(json!({"error": error.message, "reason": error.reason}));
                (self.retry_or_fail(process, def, error), log)
            }
        }
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
            run_after: self.now_millis() + delay,
            message: error.message,
            reason: error.reason.to_owned(),
        }
    }

    async fn run_handler(
        &self,
        def: &ProcessDef,
        claimed: &Claimed,
        resource: &Resource,
    ) -> Result<Outcome, AttemptError> {
        match def.handler {
            Handler::None => Ok(Outcome::default()),
            Handler::Agent(command) => self.call_agent(def, claimed, resource, &[command]).await,
            Handler::PingAgent => self.ping_agent(resource).await,
            Handler::AgentTwice(first, second) => {
                self.call_agent(def, claimed, resource, &[first, second])
                    .await
            }
        }
    }

    /// An attempt with external handlers: the pre-listeners, the handler phase (external
    /// handlers and the built-in one in priority order, the first that answers ends it), the
    /// post-listeners. Each reply's data is merged into the resource the next step sees.
    async fn run_phases(
        &self,
        def: &ProcessDef,
        claimed: &Claimed,
        resource: &Resource,
        external: &ProcessHandlers,
    ) -> Result<Outcome, AttemptError> {
        let mut current = resource.clone();
        let mut log = Vec::new();
        let mut ended_as = None;
        for call in &external.pre {
            self.external_step(def, claimed, &mut current, call, "pre", &mut log)
                .await?;
        }
        let first = external
            .handlers
            .first()
            .filter(|call| call.priority < BUILT_IN_PRIORITY || def.handler == Handler::None);
        let answered = match first {
            Some(call) => {
                self.external_step(def, claimed, &mut current, call, "handler", &mut log)
                    .await?
            }
            None => false,
        };
        if !answered && (first.is_none() || def.handler != Handler::None) {
            let outcome = match self.run_handler(def, claimed, &current).await {
                Ok(outcome) => outcome,
                Err(mut error) => {
                    error.log = log;
                    return Err(error);
                }
            };
            log.extend(outcome.log);
            if let Some(data) = outcome.data {
                current.data = data;
            }
            ended_as = outcome.ended_as;
        }
        for call in &external.post {
            self.external_step(def, claimed, &mut current, call, "post", &mut log)
                .await?;
        }
        Ok(Outcome {
            data: (current.data != resource.data).then_some(current.data),
            ended_as,
            log,
        })
    }

    /// One external handler's step: whether it answered. A remove always goes through (a stuck
    /// resource can always be removed): there a handler that fails or does not answer is
    /// recorded and passed over, and the built-in handler runs in its place.
    async fn external_step(
        &self,
        def: &ProcessDef,
        claimed: &Claimed,
        current: &mut Resource,
        call: &HandlerCall,
        phase: &'static str,
        log: &mut Vec<Value>,
    ) -> Result<bool, AttemptError> {
        match self
            .call_external(def, claimed, current, call, phase, log)
            .await
        {
            Ok(()) => Ok(true),
            Err(mut error) if def.cancels_pending && error.reason != "SHUTDOWN" => {
                *log = std::mem::take(&mut error.log);
                log.push(json!({"passedOver": call.name, "reason": error.reason,
                                "message": "a remove goes through whatever its external handlers answer"}));
                Ok(false)
            }
            Err(error) => Err(error),
        }
    }

    /// Calls one external handler (`<event>;handler=<name>`, in its project's scope when it has
    /// one) with the resource as it is now, sends the call again after a timeout up to its
    /// `retries`, and merges its reply's data into `current`. An error reply fails the attempt
    /// and carries the handler's `onError` process.
    async fn call_external(
        &self,
        def: &ProcessDef,
        claimed: &Claimed,
        current: &mut Resource,
        call: &HandlerCall,
        phase: &'static str,
        log: &mut Vec<Value>,
    ) -> Result<(), AttemptError> {
        let name = names::for_handler(&call.event, &call.name, call.project);
        let data_key = data_key_of(current.kind);
        let timeout_millis = call
            .timeout_millis
            .unwrap_or(self.tunables().call_timeout_millis);
        let timeout = Duration::from_millis(timeout_millis.max(1) as u64);
        let api_type = current.kind.api_type();
        let started = self.now_millis();
        let mut sent = 0u32;
        loop {
            sent += 1;
            let request = Event::new(name.clone())
                .with_resource(api_type, ids::format(api_type, current.id))
                .with_data(json!({
                    data_key: resource_json(current),
                    "processName": def.name,
                    "processId": ids::format("processInstance", claimed.process.id),
                    "phase": phase,
                }));
            let on_progress = self.progress_sink(&claimed.process);
            let step = |result: &str, reply: Option<&str>, ms: i64| {
                json!({"phase": phase, "handler": call.name, "event": name, "priority": call.priority,
                       "result": result, "reply": reply, "sent": sent, "ms": ms})
            };
            match self.bus.call(request, timeout, on_progress).await {
                Ok(reply) => {
                    merge_reply(&mut current.data, reply.data.as_ref(), data_key);
                    log.push(step("ok", reply.id.as_deref(), self.now_millis() - started));
                    return Ok(());
                }
                Err(CallFailure::Timeout(_)) if sent <= call.retries => continue,
                Err(failure) => {
                    let (result, mut error) = match failure {
                        CallFailure::Timeout(_) => (
                            "timeout",
                            AttemptError::new(
                                "TIMEOUT",
                                format!(
                                    "external handler {} did not answer {name} within {timeout_millis} ms ({sent} sent)",
                                    call.name
                                ),
                            ),
                        ),
                        CallFailure::ErrorReply(message) | CallFailure::Permanent(message) => {
                            let mut error = AttemptError::new(
                                "ERROR",
                                format!("external handler {}: {message}", call.name),
                            );
                            error.on_error.clone_from(&call.on_error);
                            ("error", error)
                        }
                        CallFailure::Shutdown => (
                            "shutdown",
                            AttemptError::new("SHUTDOWN", "server shutting down"),
                        ),
                    };
                    log.push(step(result, None, self.now_millis() - started));
                    error.log = std::mem::take(log);
                    return Err(error);
                }
            }
        }
    }

    /// Calls the agent of the resource's host (placed in the claim if it was not) with each
    /// command in turn, merging each reply's data into the resource.
    async fn call_agent(
        &self,
        def: &ProcessDef,
        claimed: &Claimed,
        resource: &Resource,
        commands: &[&str],
    ) -> Result<Outcome, AttemptError> {
        let mut outcome = Outcome::default();
        if let Some(error) = &claimed.placement {
            return Err(AttemptError::new(error.reason, error.message.clone()));
        }
        let agent = match (&claimed.agent, resource.host_id) {
            (Some(agent), _) => agent,
            // Removing what never reached a host needs no agent.
            (None, None) if def.cancels_pending => return Ok(outcome),
            (None, Some(host)) => {
                return Err(AttemptError::new(
                    "NO_AGENT",
                    format!("host {} has no agent", ids::format("host", host)),
                ));
            }
            (None, None) => {
                return Err(AttemptError::new(
                    "NO_HOST",
                    "no active host with an active agent to run on",
                ));
            }
        };
        let HostAgent {
            agent_id,
            agent_state,
            ..
        } = agent;
        let agent_id = *agent_id;
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
        let data_key = data_key_of(resource.kind);
        let mut data = resource.data.clone();
        let injected = claimed.agent_key.as_ref().map(agent_environment);
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
            let request = Event::new(names::for_agent(command, agent_id))
                .with_resource(
                    resource.kind.api_type(),
                    ids::format(resource.kind.api_type(), resource.id),
                )
                .with_data(json!({ data_key: resource_json(&current), "processName": def.name }));
            let on_progress = self.progress_sink(&claimed.process);
            let reply = self.bus.call(request, timeout, on_progress).await?;
            outcome.log.push(json!({"command": command, "agent": ids::format("agent", agent_id), "reply": reply.id}));
            if let Some(Value::Object(reply_data)) =
                reply.data.as_ref().and_then(|data| data.get(data_key))
            {
                outcome.ended_as = (*command == "compute.instance.activate"
                    && reply_data.get("agentState").and_then(Value::as_str) == Some("stopped"))
                .then_some("stopped");
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

    /// Where an agent's progress replies go: one queue per attempt, applied in order by one
    /// task (started at the first progress reply), each write guarded by the attempt's lease.
    /// A progress reply that finds the queue full is skipped; the next one, or the finish,
    /// carries on.
    fn progress_sink(&self, process: &ProcessInstance) -> Box<dyn FnMut(&Event) + Send> {
        let store = self.store.clone();
        let bus = self.bus.clone();
        let process = process.clone();
        let node = self.node.clone();
        let mut queue: Option<tokio::sync::mpsc::Sender<ProgressItem>> = None;
        Box::new(move |reply: &Event| {
            let sender = queue.get_or_insert_with(|| {
                let (sender, mut updates) = tokio::sync::mpsc::channel::<ProgressItem>(16);
                let store = store.clone();
                let bus = bus.clone();
                tokio::spawn(async move {
                    while let Some(item) = updates.recv().await {
                        if let Ok(Some(resource)) = store.set_progress(item).await {
                            bus.changed(&resource, None);
                        }
                    }
                });
                sender
            });
            let item = ProgressItem {
                process: process.clone(),
                node: node.clone(),
                message: reply.transitioning_message.clone(),
                progress: reply.transitioning_progress,
            };
            if sender.try_send(item).is_err() {
                tracing::debug!(
                    process = process.id,
                    "progress reply skipped: its queue is full"
                );
            }
        })
    }
}

/// The key a request's `data` carries the resource under (`instance` for containers).
fn data_key_of(kind: ResourceKind) -> &'static str {
    match kind {
        ResourceKind::Instance => "instance",
        ResourceKind::ExternalHandler => "externalHandler",
        other => other.table(),
    }
}

/// Merges an external handler's reply into the resource's data: the fields under the
/// resource's key (`data.instance`) when the reply has them, else the reply's top-level
/// fields, as the original merged a handler's result. Fields the server owns are skipped.
fn merge_reply(data: &mut Map<String, Value>, reply: Option<&Value>, data_key: &str) {
    let Some(Value::Object(reply)) = reply else {
        return;
    };
    let fields = match reply.get(data_key) {
        Some(Value::Object(fields)) => fields,
        _ => reply,
    };
    for (key, value) in fields {
        if !crate::render::RESERVED.contains(&key.as_str()) && key != data_key {
            data.insert(key.clone(), value.clone());
        }
    }
}

/// The environment variables the original injects into a container with its own agent key.
fn agent_environment(key: &InstanceAgentKey) -> Map<String, Value> {
    let access = &key.key.credential.public_value;
    let secret = &key.key.secret_value;
    let mut env = Map::new();
    env.insert("CATTLE_ACCESS_KEY".into(), json!(access));
    env.insert("CATTLE_SECRET_KEY".into(), json!(secret));
    env.insert(
        "CATTLE_AGENT_ID".into(),
        json!(ids::format("agent", key.agent_id)),
    );
    if key.role.as_deref() == Some("environment") {
        env.insert("CATTLE_ENVIRONMENT_ACCESS_KEY".into(), json!(access));
        env.insert("CATTLE_ENVIRONMENT_SECRET_KEY".into(), json!(secret));
    }
    env
}

impl<B: Bus> Engine<B> {
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

/// The wait before attempt `attempts + 1` (the store's, which backs off waits alike).
pub use drover_store::backoff_millis;

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
