//! The engine against a real store (SQLite, and PostgreSQL when `DROVER_TEST_POSTGRES_URL` is
//! set) and a fake [`Bus`] that records every request and answers from a per-test script:
//! backoff, max attempts, max age, permanent errors, delegation and cancel, on paused tokio
//! time.
//!
//! Time: each test runs with paused time and auto-advance held off (a blocking task is kept
//! running for the whole test), so virtual time moves only when the test advances it. Auto-advance
//! would otherwise jump the clock whenever the runtime waits for SQLite's worker thread and fire
//! timers (the pool's acquire timeout among them) at random. Tests await the fake bus's calls
//! and `changed` events; every wait is bounded in real time by a watchdog.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_engine::defs;
use drover_engine::{ArcSwap, Bus, CallFailure, Clock, Engine, Tunables};
use drover_proto::Event;
use drover_store::{
    NewCreate, NewProcess, NewResource, ProcessFilter, ProcessInstance, Resource, ResourceKind,
    Step, Store, StoreOptions,
};
use drover_test_support::postgres::Schema;
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The longest real time any one wait of a test may take.
const WATCHDOG: Duration = Duration::from_secs(60);
const NODE: &str = "node-test";

// ---------------------------------------------------------------------------------------------
// Time

/// Keeps tokio from auto-advancing paused time while it lives: a blocking task inhibits
/// auto-advance until it ends, and this one ends when the guard is dropped.
struct HoldTime {
    _stop: std::sync::mpsc::Sender<()>,
}

fn hold_time() -> HoldTime {
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    tokio::task::spawn_blocking(move || {
        let _ = stopped.recv();
    });
    HoldTime { _stop: stop }
}

/// Waits a little in real time without moving virtual time.
async fn real_pause(millis: u64) {
    tokio::task::spawn_blocking(move || std::thread::sleep(Duration::from_millis(millis)))
        .await
        .unwrap();
}

/// Awaits `future` while virtual time stands still, bounded by the watchdog in real time.
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    advancing(what, Duration::ZERO, future).await
}

/// Awaits `future`, moving virtual time on by `step` about every real millisecond.
async fn advancing<T>(what: &str, step: Duration, future: impl Future<Output = T>) -> T {
    let started = std::time::Instant::now();
    let mut future = std::pin::pin!(future);
    loop {
        tokio::select! {
            biased;
            value = &mut future => return value,
            () = real_pause(1) => {}
        }
        assert!(
            started.elapsed() < WATCHDOG,
            "timed out (real time) waiting for {what}"
        );
        if !step.is_zero() {
            tokio::time::advance(step).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The fake bus

/// How the fake agent answers one call.
enum Reply {
    /// A final reply with this data.
    Ok(Value),
    /// An error reply (retried).
    Error(&'static str),
    /// An error reply marked permanent.
    Permanent(&'static str),
    /// No reply: the call fails with a timeout once its timeout has passed (virtual time).
    Timeout,
    /// The answer comes when the test sends it.
    Held(oneshot::Receiver<Reply>),
}

/// One request the engine sent.
#[derive(Debug, Clone)]
struct Call {
    name: String,
    data: Value,
    timeout: Duration,
    at: Instant,
}

struct FakeBus {
    /// Answers in order; when it runs out, calls succeed with no data.
    script: Mutex<VecDeque<Reply>>,
    calls: Mutex<Vec<Call>>,
    called: mpsc::UnboundedSender<Call>,
    changed: mpsc::UnboundedSender<Resource>,
}

impl FakeBus {
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

impl Bus for FakeBus {
    fn call(
        &self,
        request: Event,
        timeout: Duration,
        _on_progress: Box<dyn FnMut(&Event) + Send>,
    ) -> impl Future<Output = Result<Event, CallFailure>> + Send {
        let call = Call {
            name: request.name.clone().unwrap_or_default(),
            data: request.data.unwrap_or(Value::Null),
            timeout,
            at: Instant::now(),
        };
        self.calls.lock().unwrap().push(call.clone());
        let _ = self.called.send(call);
        let reply = self.script.lock().unwrap().pop_front();
        async move {
            let mut reply = reply.unwrap_or(Reply::Ok(json!({})));
            loop {
                return match reply {
                    Reply::Ok(data) => Ok(Event::new("reply").with_data(data)),
                    Reply::Error(message) => Err(CallFailure::ErrorReply(message.into())),
                    Reply::Permanent(message) => Err(CallFailure::Permanent(message.into())),
                    Reply::Timeout => {
                        tokio::time::sleep(timeout).await;
                        Err(CallFailure::Timeout(timeout))
                    }
                    Reply::Held(answer) => {
                        reply = answer.await.unwrap_or(Reply::Error("the test dropped it"));
                        continue;
                    }
                };
            }
        }
    }

    fn changed(&self, resource: &Resource, _previous_state: Option<&str>) {
        let _ = self.changed.send(resource.clone());
    }
}

// ---------------------------------------------------------------------------------------------
// The harness

/// A store and what keeps its data alive.
struct Subject {
    store: Store,
    name: &'static str,
    _dir: Option<tempfile::TempDir>,
    _schema: Option<Schema>,
}

async fn subjects() -> Vec<Subject> {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions::sqlite_file(&dir.path().join("drover.db"));
    let mut out = vec![Subject {
        store: Store::connect(&options).await.unwrap(),
        name: "SQLite",
        _dir: Some(dir),
        _schema: None,
    }];
    if let Some(schema) = Schema::create("e", "an engine test").await {
        let options = StoreOptions {
            pg_schema: Some(schema.name.clone()),
            ..StoreOptions::url(schema.url.clone())
        };
        out.push(Subject {
            store: Store::connect(&options).await.unwrap(),
            name: "PostgreSQL",
            _dir: None,
            _schema: Some(schema),
        });
    }
    out
}

/// Settings for the tests: a lease far longer than any jump of virtual time.
fn tunables() -> Tunables {
    Tunables {
        lease_millis: 600_000,
        poll_millis: 1000,
        max_attempts: 10,
        retry_max_wait_millis: 120_000,
        call_timeout_millis: 1000,
        ..Tunables::default()
    }
}

struct Harness {
    store: Store,
    name: &'static str,
    bus: Arc<FakeBus>,
    calls: mpsc::UnboundedReceiver<Call>,
    changed: mpsc::UnboundedReceiver<Resource>,
    tunables: Tunables,
    running: Option<Running>,
}

struct Running {
    clock: Clock,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Harness {
    fn new(subject: &Subject, tunables: Tunables, script: Vec<Reply>) -> Harness {
        let (called, calls) = mpsc::unbounded_channel();
        let (changed_tx, changed) = mpsc::unbounded_channel();
        Harness {
            store: subject.store.clone(),
            name: subject.name,
            bus: Arc::new(FakeBus {
                script: Mutex::new(script.into()),
                calls: Mutex::new(Vec::new()),
                called,
                changed: changed_tx,
            }),
            calls,
            changed,
            tunables,
            running: None,
        }
    }

    /// Starts an engine; what was scheduled before is ready on its clock.
    fn start(&mut self) {
        assert!(self.running.is_none());
        let shutdown = CancellationToken::new();
        let engine = Arc::new(Engine::new(
            self.store.clone(),
            self.bus.clone(),
            Arc::new(ArcSwap::from_pointee(self.tunables.clone())),
            NODE.into(),
            shutdown.clone(),
        ));
        let clock = engine.clock();
        let task = tokio::spawn(engine.run());
        self.running = Some(Running {
            clock,
            shutdown,
            task,
        });
    }

    /// Stops the engine and waits until its running attempts have recorded their ends.
    async fn stop(&mut self) {
        let running = self.running.take().expect("running");
        running.shutdown.cancel();
        within("the engine to stop", running.task).await.unwrap();
    }

    fn clock(&self) -> Clock {
        self.running.as_ref().expect("running").clock
    }

    /// The time of a call on the engine's clock.
    fn at(&self, call: &Call) -> i64 {
        self.clock().millis_at(call.at)
    }

    async fn next_call(&mut self) -> Call {
        within("an agent call", self.calls.recv()).await.unwrap()
    }

    async fn next_changed(&mut self) -> Resource {
        within("a changed resource", self.changed.recv())
            .await
            .unwrap()
    }

    /// Moves virtual time to 1 ms before `run_after`, then on in 1 ms steps until the next
    /// call; returns it.
    async fn call_at(&mut self, run_after: i64) -> Call {
        let ahead = run_after - 1 - self.clock().now_millis();
        if ahead > 0 {
            tokio::time::advance(Duration::from_millis(ahead as u64)).await;
        }
        advancing(
            "the next attempt's call",
            Duration::from_millis(1),
            self.calls.recv(),
        )
        .await
        .unwrap()
    }

    /// Moves the engine's clock up to the wall clock, so that what the store scheduled on its
    /// own clock meanwhile is ready.
    async fn catch_up(&self) {
        let behind = drover_proto::event::now_millis() - self.clock().now_millis();
        if behind >= 0 {
            tokio::time::advance(Duration::from_millis(behind as u64 + 1)).await;
        }
    }

    async fn process(&self, id: i64) -> ProcessInstance {
        self.store.get_process(id).await.unwrap().unwrap()
    }

    async fn processes_of(&self, resource: &Resource) -> Vec<ProcessInstance> {
        let mut processes = self
            .store
            .list_processes(&ProcessFilter {
                kind: Some(resource.kind),
                resource_id: Some(resource.id),
                limit: 100,
                ..ProcessFilter::default()
            })
            .await
            .unwrap()
            .data;
        processes.sort_by_key(|process| process.id);
        processes
    }

    async fn resource(&self, resource: &Resource) -> Resource {
        self.store
            .get_resource(resource.kind, resource.id)
            .await
            .unwrap()
            .unwrap()
    }
}

/// A project with an active host whose agent is active; returns the project.
async fn project_with_host(store: &Store) -> i64 {
    let boot = store.bootstrap(None).await.unwrap();
    let project = boot.default_project.id;
    let registered = store
        .register_agent(
            project,
            "host-key",
            "host-1",
            Map::new(),
            &[
                Step::hop("agent.create", "registering", "inactive"),
                Step::hop("agent.activate", "activating", "active"),
            ],
            &[
                Step::hop("host.create", "registering", "inactive"),
                Step::hop("host.activate", "activating", "active"),
            ],
            NODE,
        )
        .await
        .unwrap();
    assert_eq!(registered.agent.state, "active");
    project
}

/// A container created as the API creates it: `instance.create` hops, `instance.start` waits
/// for the engine. Returns it and its start process.
async fn container(h: &Harness, project: i64) -> (Resource, ProcessInstance) {
    let mut data = Map::new();
    data.insert("command".into(), json!(["sleep", "1"]));
    let steps = defs::create_plan(ResourceKind::Instance, &data);
    let created = h
        .store
        .create_and_schedule(NewCreate {
            kind: ResourceKind::Instance,
            resource: NewResource {
                name: Some("web".into()),
                sub_kind: "container".into(),
                account_id: Some(project),
                data,
                ..NewResource::default()
            },
            steps,
            node: NODE.into(),
        })
        .await
        .unwrap();
    assert_eq!(created.resource.state, "starting", "{}", h.name);
    let start = h
        .processes_of(&created.resource)
        .await
        .into_iter()
        .find(|process| process.process_name == "instance.start")
        .expect("instance.start is pending");
    assert_eq!(start.end_time, None);
    (created.resource, start)
}

/// The wait before attempt n + 1 without jitter: 2 s + 100 ms·2^(n−1).
fn backoff_base(attempts: u32) -> i64 {
    2000 + 100 * (1i64 << (attempts - 1))
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(start_paused = true)]
async fn an_error_reply_is_retried_after_the_backoff_on_the_engines_clock() {
    let _time = hold_time();
    for subject in subjects().await {
        let script = vec![
            Reply::Error("disk full"),
            Reply::Error("disk full"),
            Reply::Error("disk still full"),
            Reply::Ok(json!({"instance": {"dockerContainerId": "c0ffee"}})),
        ];
        let mut h = Harness::new(&subject, tunables(), script);
        let project = project_with_host(&h.store).await;
        let (resource, start) = container(&h, project).await;
        h.start();

        let mut call = h.next_call().await;
        for attempt in 1..=3u32 {
            assert!(
                call.name.starts_with("compute.instance.activate"),
                "{}: {}",
                h.name,
                call.name
            );
            assert_eq!(call.data["processName"], "instance.start");
            assert_eq!(
                call.data["instance"]["id"],
                json!(drover_proto::ids::format("instance", resource.id))
            );
            assert_eq!(call.timeout, Duration::from_millis(1000));
            let retrying = h.next_changed().await;
            assert_eq!(
                (retrying.state.as_str(), retrying.transitioning.as_str()),
                ("starting", "error"),
                "{}: attempt {attempt}",
                h.name
            );
            let process = h.process(start.id).await;
            assert_eq!(process.execution_count, i64::from(attempt));
            assert_eq!(process.end_time, None);
            // The engine scheduled the next attempt 2 s + 100 ms·2^(n−1) after this one's call,
            // plus at most 10 % jitter, on its (virtual) clock (±2 ms: two readings of the
            // paused clock can differ by a millisecond).
            let called = h.at(&call);
            let run_after = process.run_after.expect("a retry has a run_after");
            let base = backoff_base(attempt);
            assert!(
                (base - 2..=base + base / 10 + 2).contains(&(run_after - called)),
                "{}: attempt {attempt}: the next one waits {} ms, base {base} ms",
                h.name,
                run_after - called
            );
            // And it runs then: not before, and without waiting for a poll.
            call = h.call_at(run_after).await;
            let next = h.at(&call);
            assert!(
                next >= run_after,
                "{}: attempt {} ran {} ms early",
                h.name,
                attempt + 1,
                run_after - next
            );
            assert!(
                next - run_after <= 250,
                "{}: attempt {} ran {} ms after its run_after",
                h.name,
                attempt + 1,
                next - run_after
            );
        }
        let running = h.next_changed().await;
        assert_eq!(
            (running.state.as_str(), running.transitioning.as_str()),
            ("running", "no"),
            "{}",
            h.name
        );
        assert_eq!(running.data["dockerContainerId"], "c0ffee");
        h.stop().await;
        assert_eq!(h.bus.calls().len(), 4, "{}", h.name);
        let process = h.process(start.id).await;
        assert_eq!(process.result.as_deref(), Some("SUCCESS"));
        let executions = h.store.list_executions(start.id).await.unwrap();
        let reasons: Vec<&str> = executions
            .iter()
            .map(|e| e.exit_reason.as_deref().unwrap_or(""))
            .collect();
        assert_eq!(reasons, ["ERROR", "ERROR", "ERROR", "DONE"], "{}", h.name);
    }
}

#[tokio::test(start_paused = true)]
async fn a_process_fails_after_max_attempts() {
    let _time = hold_time();
    for subject in subjects().await {
        let script = vec![
            Reply::Error("boom one"),
            Reply::Timeout,
            Reply::Error("boom three"),
            Reply::Ok(json!({})),
        ];
        let settings = Tunables {
            max_attempts: 3,
            ..tunables()
        };
        let mut h = Harness::new(&subject, settings, script);
        let project = project_with_host(&h.store).await;
        let (resource, start) = container(&h, project).await;
        h.start();

        h.next_call().await;
        let changed = h.next_changed().await;
        assert_eq!(changed.transitioning_message.as_deref(), Some("boom one"));
        let run_after = h.process(start.id).await.run_after.unwrap();
        let second = h.call_at(run_after).await;
        // The second call gets no reply: it times out after the call timeout (virtual).
        tokio::time::advance(second.timeout).await;
        let changed = h.next_changed().await;
        assert_eq!(changed.transitioning, "error", "{}", h.name);
        assert!(
            changed
                .transitioning_message
                .as_deref()
                .is_some_and(|message| message.contains("did not reply within 1000 ms")),
            "{}: {:?}",
            h.name,
            changed.transitioning_message
        );
        let run_after = h.process(start.id).await.run_after.unwrap();
        h.call_at(run_after).await;
        let failed = h.next_changed().await;
        assert_eq!(
            (failed.state.as_str(), failed.transitioning.as_str()),
            ("error", "error"),
            "{}",
            h.name
        );
        let message = failed.transitioning_message.clone().unwrap_or_default();
        assert!(
            message.contains("failed 3 of 3 attempts") && message.contains("boom three"),
            "{}: {message}",
            h.name
        );
        // Give a fourth attempt every chance to happen: a minute of virtual time, then stop.
        let minute = tokio::time::sleep(Duration::from_secs(60));
        advancing("a minute", Duration::from_millis(100), minute).await;
        h.stop().await;
        assert_eq!(h.bus.calls().len(), 3, "{}: exactly 3 calls", h.name);
        let process = h.process(start.id).await;
        assert_eq!(process.result.as_deref(), Some("FAILURE"));
        assert_eq!(process.execution_count, 3);
        assert_eq!(h.resource(&resource).await.state, "error");
    }
}

#[tokio::test(start_paused = true)]
async fn a_process_older_than_max_age_fails_without_calling_again() {
    let _time = hold_time();
    for subject in subjects().await {
        let settings = Tunables {
            max_age_millis: 1500,
            ..tunables()
        };
        let mut h = Harness::new(&subject, settings, vec![Reply::Error("flaky")]);
        let project = project_with_host(&h.store).await;
        let (resource, start) = container(&h, project).await;
        h.start();

        h.next_call().await;
        let retrying = h.next_changed().await;
        assert_eq!(retrying.transitioning, "error", "{}", h.name);
        // The retry comes after the 2.1 s backoff, when the process is older than 1.5 s.
        let run_after = h.process(start.id).await.run_after.unwrap();
        let ahead = run_after - h.clock().now_millis();
        tokio::time::advance(Duration::from_millis(ahead as u64)).await;
        let failed = advancing(
            "the max-age failure",
            Duration::from_millis(1),
            h.changed.recv(),
        )
        .await
        .unwrap();
        assert_eq!(
            (failed.state.as_str(), failed.transitioning.as_str()),
            ("error", "error"),
            "{}",
            h.name
        );
        let message = failed.transitioning_message.clone().unwrap_or_default();
        assert!(
            message.contains("process.max_age.seconds") && message.contains("last error: flaky"),
            "{}: {message}",
            h.name
        );
        h.stop().await;
        assert_eq!(h.bus.calls().len(), 1, "{}: no second call", h.name);
        let process = h.process(start.id).await;
        assert_eq!(process.result.as_deref(), Some("FAILURE"));
        assert_eq!(
            process.exit_reason.as_deref(),
            Some("MAX_AGE"),
            "{}",
            h.name
        );
        assert_eq!(h.resource(&resource).await.state, "error");
    }
}

#[tokio::test(start_paused = true)]
async fn a_create_with_no_host_waits_without_using_attempts_and_runs_once_an_agent_activates() {
    let _time = hold_time();
    for subject in subjects().await {
        // One attempt allowed: the waits must not count as attempts.
        let settings = Tunables {
            max_attempts: 1,
            ..tunables()
        };
        let mut h = Harness::new(&subject, settings, Vec::new());
        let project = h.store.bootstrap(None).await.unwrap().default_project.id;
        let (resource, start) = container(&h, project).await;
        h.start();

        // No host at all: the start waits in its process, with its reason, backing off like a
        // retry. Eight waits, so that the last backoff (2 s + 12.8 s) leaves room to tell a wake
        // from a retry below.
        let mut parked = 0;
        for waits in 1..=8 {
            let changed = h.next_changed().await;
            assert_eq!(
                (changed.state.as_str(), changed.transitioning.as_str()),
                ("starting", "yes"),
                "{}",
                h.name
            );
            assert_eq!(
                changed.transitioning_message.as_deref(),
                Some(drover_store::NO_HOST_MESSAGE)
            );
            let process = h.process(start.id).await;
            assert_eq!(
                (
                    process.execution_count,
                    process.wait_count,
                    process.end_time
                ),
                (0, waits, None),
                "{}: a wait is no attempt",
                h.name
            );
            parked = process.run_after.unwrap();
            let base = backoff_base(waits as u32);
            let waited = parked - h.clock().now_millis();
            // (+2 ms: two readings of the paused clock can differ by a millisecond, as each
            // combines the wall clock's millisecond with the real time elapsed.)
            assert!(
                waited >= base - 250 && waited <= base + base / 10 + 2,
                "{}: wait {waits} backs off {waited} ms, base {base} ms",
                h.name
            );
            if waits < 8 {
                let ahead = parked - 1 - h.clock().now_millis();
                tokio::time::advance(Duration::from_millis(ahead.max(0) as u64)).await;
                let next = advancing("the next wait", Duration::from_millis(1), h.changed.recv())
                    .await
                    .unwrap();
                assert_eq!(next.id, resource.id);
                // Put it back for the loop's own check.
                h.bus.changed(&next, None);
            }
        }
        assert!(h.bus.calls().is_empty(), "{}: nothing called", h.name);

        // An agent registers as the server registers one: its activation pings it, its host's
        // waits for that, and the start runs as soon as the host is active, long before its
        // backoff is over: the activations wake it.
        h.store
            .register_agent(
                project,
                "late-host",
                "late-host",
                Map::new(),
                &defs::create_plan(ResourceKind::Agent, &Map::new()),
                &defs::create_plan(ResourceKind::Host, &Map::new()),
                NODE,
            )
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let mut calls = Vec::new();
        while calls.len() < 2 {
            // The engine notices the registration at its next poll (the server's registration
            // wakes it; this one does not); what follows wakes it. The engine's clock is ahead
            // of the wall clock the store writes with (the waits moved it on), so what the store
            // makes ready now is ready for the engine too.
            tokio::time::advance(Duration::from_millis(20)).await;
            tokio::select! {
                biased;
                call = h.calls.recv() => calls.push(call.unwrap()),
                () = real_pause(5) => {}
            }
            assert!(
                started.elapsed() < WATCHDOG,
                "{}: timed out waiting for the agent's ping and the start",
                h.name
            );
        }
        assert!(
            calls[0].name.starts_with("ping;"),
            "{}: {}",
            h.name,
            calls[0].name
        );
        assert!(
            calls[1].name.starts_with("compute.instance.activate"),
            "{}: {}",
            h.name,
            calls[1].name
        );
        let called = h.at(&calls[1]);
        assert!(
            called < parked,
            "{}: the start ran {} ms after its backoff: not woken",
            h.name,
            called - parked
        );
        let running = loop {
            let changed = h.next_changed().await;
            if changed.kind == ResourceKind::Instance && changed.state == "running" {
                break changed;
            }
        };
        assert_eq!(running.transitioning, "no", "{}", h.name);
        h.stop().await;
        let process = h.process(start.id).await;
        assert_eq!(process.result.as_deref(), Some("SUCCESS"), "{}", h.name);
        // One attempt; the waits (the 8, and one more if the agent's activation woke it
        // before its host's was done) used up none.
        assert_eq!(process.execution_count, 1, "{}", h.name);
        assert!(process.wait_count >= 8, "{}", h.name);
        let host_processes = h
            .store
            .list_processes(&ProcessFilter {
                kind: Some(ResourceKind::Host),
                limit: 10,
                ..ProcessFilter::default()
            })
            .await
            .unwrap()
            .data;
        assert!(
            host_processes
                .iter()
                .all(|process| process.result.as_deref() == Some("SUCCESS")),
            "{}: {host_processes:?}",
            h.name
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_permanent_error_fails_at_once() {
    let _time = hold_time();
    for subject in subjects().await {
        let script = vec![Reply::Permanent(
            "exec: \"nope\": executable file not found",
        )];
        let mut h = Harness::new(&subject, tunables(), script);
        let project = project_with_host(&h.store).await;
        let (resource, start) = container(&h, project).await;
        h.start();

        h.next_call().await;
        let failed = h.next_changed().await;
        assert_eq!(
            (failed.state.as_str(), failed.transitioning.as_str()),
            ("error", "error"),
            "{}",
            h.name
        );
        let message = failed.transitioning_message.clone().unwrap_or_default();
        assert!(
            message.contains("failed permanently") && message.contains("executable file not found"),
            "{}: {message}",
            h.name
        );
        // A retry would come within 2.2 s; give it a minute.
        advancing("nothing", Duration::from_millis(100), async {
            tokio::time::sleep(Duration::from_secs(60)).await
        })
        .await;
        h.stop().await;
        assert_eq!(h.bus.calls().len(), 1, "{}: exactly one call", h.name);
        let process = h.process(start.id).await;
        assert_eq!(process.result.as_deref(), Some("FAILURE"));
        assert_eq!(process.exit_reason.as_deref(), Some("PERMANENT"));
        assert!(
            process
                .last_error
                .as_deref()
                .is_some_and(|error| error.contains("executable file not found")),
            "{:?}",
            process.last_error
        );
        assert_eq!(h.resource(&resource).await.state, "error");
    }
}

#[tokio::test(start_paused = true)]
async fn a_delegate_runs_after_its_process() {
    let _time = hold_time();
    for subject in subjects().await {
        let mut h = Harness::new(&subject, tunables(), Vec::new());
        let project = project_with_host(&h.store).await;

        // An agent whose create the engine runs: its delegate, agent.activate, pings it.
        let agent = h
            .store
            .create_and_schedule(NewCreate {
                kind: ResourceKind::Agent,
                resource: NewResource {
                    sub_kind: "agent".into(),
                    account_id: Some(project),
                    ..NewResource::default()
                },
                steps: vec![Step::pending("agent.create", "registering")],
                node: NODE.into(),
            })
            .await
            .unwrap()
            .resource;
        assert_eq!(agent.state, "registering");

        // A volume as the API creates it: volume.create hops, volume.activate waits.
        let plan = defs::create_plan(ResourceKind::Volume, &Map::new());
        let summary: Vec<(&str, &str, Option<&str>)> = plan
            .iter()
            .map(|step| {
                (
                    step.process_name.as_str(),
                    step.transitioning.as_str(),
                    step.done.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("volume.create", "registering", Some("inactive")),
                ("volume.activate", "activating", None)
            ]
        );
        let volume = h
            .store
            .create_and_schedule(NewCreate {
                kind: ResourceKind::Volume,
                resource: NewResource {
                    name: Some("data".into()),
                    sub_kind: "volume".into(),
                    account_id: Some(project),
                    ..NewResource::default()
                },
                steps: plan,
                node: NODE.into(),
            })
            .await
            .unwrap()
            .resource;
        assert_eq!(volume.state, "activating");
        h.start();

        let mut agent_states = Vec::new();
        let mut volume_states = Vec::new();
        while agent_states.last().map(String::as_str) != Some("active")
            || volume_states.last().map(String::as_str) != Some("active")
        {
            // agent.activate is scheduled by agent.create's finish on the store's clock.
            h.catch_up().await;
            let changed = advancing(
                "the delegate to run",
                Duration::from_millis(10),
                h.changed.recv(),
            )
            .await
            .unwrap();
            match changed.kind {
                ResourceKind::Agent => agent_states.push(changed.state),
                ResourceKind::Volume => volume_states.push(changed.state),
                other => panic!("{}: unexpected change of a {other:?}", h.name),
            }
        }
        assert_eq!(agent_states, ["activating", "active"], "{}", h.name);
        assert_eq!(volume_states, ["active"], "{}", h.name);
        h.stop().await;

        let calls = h.bus.calls();
        let mut names: Vec<&str> = calls
            .iter()
            .map(|call| call.name.split(';').next().unwrap())
            .collect();
        names.sort_unstable();
        assert_eq!(names, ["ping", "storage.volume.activate"], "{}", h.name);
        let ping = calls
            .iter()
            .find(|call| call.name.starts_with("ping"))
            .unwrap();
        assert_eq!(ping.name, drover_proto::names::for_agent("ping", agent.id));
        assert_eq!(ping.timeout, Duration::from_millis(2000));
        let processes: Vec<(String, Option<String>)> = h
            .processes_of(&agent)
            .await
            .into_iter()
            .map(|process| (process.process_name, process.result))
            .collect();
        assert_eq!(
            processes,
            [
                ("agent.create".to_owned(), Some("SUCCESS".to_owned())),
                ("agent.activate".to_owned(), Some("SUCCESS".to_owned()))
            ],
            "{}",
            h.name
        );
        let volume = h.resource(&volume).await;
        assert_eq!(volume.state, "active");
        assert!(volume.host_id.is_some(), "the claim placed it on the host");
    }
}

#[tokio::test(start_paused = true)]
async fn a_cancel_during_the_agent_call_wins_over_its_reply() {
    let _time = hold_time();
    for subject in subjects().await {
        let (answer, held) = oneshot::channel();
        let mut h = Harness::new(&subject, tunables(), vec![Reply::Held(held)]);
        let project = project_with_host(&h.store).await;
        let (resource, start) = container(&h, project).await;
        h.start();

        h.next_call().await;
        let (canceled, back) = h.store.cancel(start.id).await.unwrap();
        assert_eq!(canceled.result.as_deref(), Some("CANCELED"));
        assert_eq!(back.unwrap().state, "stopped", "{}", h.name);
        // The agent's late success reaches the engine, whose finish is fenced.
        let _ = answer.send(Reply::Ok(
            json!({"instance": {"dockerContainerId": "late"}}),
        ));
        h.stop().await;
        let stored = h.resource(&resource).await;
        assert_eq!(
            (stored.state.as_str(), stored.transitioning.as_str()),
            ("stopped", "no"),
            "{}",
            h.name
        );
        assert!(stored.data.get("dockerContainerId").is_none(), "{}", h.name);
        assert!(h.changed.try_recv().is_err(), "{}: nothing changed", h.name);
        assert!(h.store.list_executions(start.id).await.unwrap().is_empty());
        assert_eq!(
            h.process(start.id).await.result.as_deref(),
            Some("CANCELED")
        );
        assert_eq!(h.bus.calls().len(), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn a_remove_during_the_agent_call_wins_over_its_reply() {
    let _time = hold_time();
    for subject in subjects().await {
        let (answer, held) = oneshot::channel();
        let mut h = Harness::new(&subject, tunables(), vec![Reply::Held(held)]);
        let project = project_with_host(&h.store).await;
        let (resource, start) = container(&h, project).await;
        h.start();

        h.next_call().await;
        let remove = defs::action(ResourceKind::Instance, "remove").unwrap();
        let removing = h
            .store
            .schedule(NewProcess {
                kind: ResourceKind::Instance,
                resource_id: resource.id,
                start_states: remove.start.iter().map(|s| (*s).to_owned()).collect(),
                cancel_pending: true,
                steps: defs::plan(remove, "starting", &resource.data),
                data: Map::new(),
                node: NODE.into(),
            })
            .await
            .unwrap();
        assert_eq!(removing.resource.state, "removing", "{}", h.name);
        assert_eq!(removing.canceled, [start.id]);
        // The start's late success changes nothing; the engine stops before the remove (ready
        // on the store's clock, not yet on the paused engine's) is claimed.
        let _ = answer.send(Reply::Ok(
            json!({"instance": {"dockerContainerId": "late"}}),
        ));
        h.stop().await;
        let stored = h.resource(&resource).await;
        assert_eq!(stored.state, "removing", "{}", h.name);
        assert!(stored.data.get("dockerContainerId").is_none());
        assert!(h.changed.try_recv().is_err(), "{}: nothing changed", h.name);
        assert!(h.store.list_executions(start.id).await.unwrap().is_empty());
        assert_eq!(h.bus.calls().len(), 1);

        // A new engine runs the remove.
        h.start();
        let call = h.next_call().await;
        assert!(
            call.name.starts_with("compute.instance.remove"),
            "{}: {}",
            h.name,
            call.name
        );
        let removed = h.next_changed().await;
        assert_eq!(removed.state, "removed", "{}", h.name);
        h.stop().await;
        let processes: Vec<(String, Option<String>)> = h
            .processes_of(&resource)
            .await
            .into_iter()
            .map(|process| (process.process_name, process.result))
            .collect();
        assert_eq!(
            processes,
            [
                ("instance.create".to_owned(), Some("SUCCESS".to_owned())),
                ("instance.start".to_owned(), Some("CANCELED".to_owned())),
                ("instance.remove".to_owned(), Some("SUCCESS".to_owned()))
            ],
            "{}",
            h.name
        );
    }
}
