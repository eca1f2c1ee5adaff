//! The process store through its writer: schedule, claim, finish, replay, cancel, batch
//! failure isolation and lease fencing, on SQLite and (when `DROVER_TEST_POSTGRES_URL` is set;
//! `.ci/run` sets it) on PostgreSQL, each test in a fresh database or schema.

use std::sync::atomic::Ordering;
use std::time::Duration;

use drover_store::{
    ClaimRequest, ExecutionRecord, Finish, FinishItem, NewCreate, NewProcess, NewResource,
    ProcessFilter, ProgressItem, Resource, ResourceKind, ScheduleError, Step, Store, StoreOptions,
    WriterOptions,
};
use drover_test_support::postgres::Schema;
use serde_json::{Map, json};

/// A store and what keeps its data alive.
struct Subject {
    store: Store,
    name: &'static str,
    _dir: Option<tempfile::TempDir>,
    _schema: Option<Schema>,
}

async fn subjects(writer: WriterOptions) -> Vec<Subject> {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        writer,
        ..StoreOptions::sqlite_file(&dir.path().join("drover.db"))
    };
    let mut out = vec![Subject {
        store: Store::connect(&options).await.unwrap(),
        name: "SQLite",
        _dir: Some(dir),
        _schema: None,
    }];
    if let Some(schema) = Schema::create("p", "a process store test").await {
        let options = StoreOptions {
            pg_schema: Some(schema.name.clone()),
            writer,
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

const NODE: &str = "node-a";

/// A project with an active host whose agent is active.
async fn project_with_host(store: &Store) -> (i64, Resource) {
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
    assert_eq!(registered.host.state, "active");
    (project, registered.host)
}

fn container(project: i64, name: &str) -> NewCreate {
    let mut data = Map::new();
    data.insert("command".into(), json!(["sleep", "1"]));
    NewCreate {
        kind: ResourceKind::Instance,
        resource: NewResource {
            name: Some(name.to_owned()),
            sub_kind: "container".into(),
            account_id: Some(project),
            data,
            ..NewResource::default()
        },
        steps: vec![
            Step::hop("instance.create", "creating", "stopped"),
            Step::pending("instance.start", "starting"),
        ],
        node: NODE.into(),
    }
}

fn claim_request(node: &str, lease_until: i64) -> ClaimRequest {
    ClaimRequest {
        node: node.into(),
        limit: 100,
        now: now(),
        lease_until,
        place: vec!["instance.start"],
        agent_key: vec!["instance.start"],
        await_agent: vec!["host.activate"],
        max_age_millis: 1_800_000,
        retry_max_wait_millis: 120_000,
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn done(process: drover_store::ProcessInstance, node: &str, state: &str) -> FinishItem {
    FinishItem {
        process,
        node: node.into(),
        record: ExecutionRecord {
            started: now(),
            ended: now(),
            exit_reason: "DONE".into(),
            message: None,
            log: json!({}),
        },
        finish: Finish::Done {
            done_state: state.into(),
            data: None,
            next: None,
        },
    }
}

async fn processes_of(store: &Store, resource: &Resource) -> Vec<drover_store::ProcessInstance> {
    store
        .list_processes(&ProcessFilter {
            kind: Some(resource.kind),
            resource_id: Some(resource.id),
            limit: 100,
            ..ProcessFilter::default()
        })
        .await
        .unwrap()
        .data
}

#[tokio::test]
async fn a_create_hops_to_its_first_agent_step_and_a_claim_places_it() {
    for subject in subjects(WriterOptions::default()).await {
        let store = &subject.store;
        let (project, host) = project_with_host(store).await;
        let created = store
            .create_and_schedule(container(project, "web"))
            .await
            .unwrap();
        let resource = created.resource;
        assert_eq!(
            (resource.state.as_str(), resource.transitioning.as_str()),
            ("starting", "yes"),
            "{}",
            subject.name
        );
        let stored = store
            .get_resource(ResourceKind::Instance, resource.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            stored, resource,
            "{}: the answer is what was stored",
            subject.name
        );
        let processes = processes_of(store, &resource).await;
        let summary: Vec<(&str, Option<&str>)> = processes
            .iter()
            .map(|p| (p.process_name.as_str(), p.result.as_deref()))
            .collect();
        assert_eq!(
            summary,
            [
                ("instance.create", Some("SUCCESS")),
                ("instance.start", None)
            ],
            "{}",
            subject.name
        );

        let claimed = store
            .claim(claim_request(NODE, now() + 10_000))
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1, "{}", subject.name);
        let item = &claimed[0];
        assert_eq!(item.process.process_name, "instance.start");
        assert_eq!(item.process.execution_count, 1);
        assert!(
            item.placement.is_none(),
            "{}: {:?}",
            subject.name,
            item.placement
        );
        let agent = item
            .agent
            .as_ref()
            .expect("placed on the host with its agent");
        assert_eq!(agent.host_id, host.id);
        assert_eq!(agent.agent_state, "active");
        assert_eq!(item.resource.as_ref().unwrap().host_id, Some(host.id));
        // The placement is stored in the claim's transaction.
        let stored = store
            .get_resource(ResourceKind::Instance, resource.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.host_id, Some(host.id), "{}", subject.name);
        // Only one process per resource at a time, and a claimed one is not claimed again.
        assert!(
            store
                .claim(claim_request(NODE, now() + 10_000))
                .await
                .unwrap()
                .is_empty()
        );

        let finished = store
            .finish(done(item.process.clone(), NODE, "running"))
            .await
            .unwrap()
            .expect("the owner's finish moves the resource");
        assert_eq!(
            (finished.state.as_str(), finished.transitioning.as_str()),
            ("running", "no")
        );
        let start = store.get_process(item.process.id).await.unwrap().unwrap();
        assert_eq!(start.result.as_deref(), Some("SUCCESS"));
        assert_eq!(store.list_executions(start.id).await.unwrap().len(), 1);
    }
}

/// One claimed process by name.
fn claimed_named<'a>(
    claimed: &'a [drover_store::Claimed],
    name: &str,
) -> &'a drover_store::Claimed {
    claimed
        .iter()
        .find(|item| item.process.process_name == name)
        .unwrap_or_else(|| panic!("{name} claimed"))
}

#[tokio::test]
async fn what_cannot_run_yet_waits_in_the_claim_without_using_attempts_and_is_woken_by_what_it_waits_for()
 {
    for subject in subjects(WriterOptions::default()).await {
        let store = &subject.store;
        let name = subject.name;
        let project = store.bootstrap(None).await.unwrap().default_project.id;
        // A registration as the server makes it: both activations are pending.
        let registered = store
            .register_agent(
                project,
                "host-key",
                "host-1",
                Map::new(),
                &[
                    Step::hop("agent.create", "registering", "inactive"),
                    Step::pending("agent.activate", "activating"),
                ],
                &[
                    Step::hop("host.create", "registering", "inactive"),
                    Step::pending("host.activate", "activating"),
                ],
                NODE,
            )
            .await
            .unwrap();
        let early = store
            .create_and_schedule(container(project, "early"))
            .await
            .unwrap()
            .resource;

        // The agent's activation runs; the host's waits for it; the start waits for a host.
        let claimed = store
            .claim(claim_request(NODE, now() + 60_000))
            .await
            .unwrap();
        assert_eq!(claimed.len(), 3, "{name}");
        let activate_agent = claimed_named(&claimed, "agent.activate");
        assert!(activate_agent.waiting.is_none(), "{name}");
        let host_wait = claimed_named(&claimed, "host.activate");
        let waiting = host_wait.waiting.as_ref().expect("the host waits");
        assert_eq!(waiting.reason, drover_store::AGENT_NOT_ACTIVE, "{name}");
        let start = claimed_named(&claimed, "instance.start");
        let waiting = start.waiting.as_ref().expect("the start waits");
        assert_eq!(waiting.reason, drover_store::NO_HOST, "{name}");
        assert!(
            start.placement.is_none() && start.agent_key.is_none(),
            "{name}"
        );
        let stored = store.get_process(start.process.id).await.unwrap().unwrap();
        assert_eq!(
            stored, start.process,
            "{name}: the answer is what was stored"
        );
        assert_eq!(
            (
                stored.execution_count,
                stored.wait_count,
                stored.lease_expires
            ),
            (0, 1, None),
            "{name}: a wait is no attempt"
        );
        assert_eq!(stored.phase.as_deref(), Some("WAITING"));
        assert_eq!(stored.exit_reason.as_deref(), Some("NO_HOST"));
        assert_eq!(
            stored.last_error.as_deref(),
            Some(drover_store::NO_HOST_MESSAGE)
        );
        let first_wait = stored.run_after.unwrap();
        assert!(first_wait >= now() + 1000, "{name}: backs off like a retry");
        let shown = store
            .get_resource(ResourceKind::Instance, early.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (shown.state.as_str(), shown.transitioning.as_str()),
            ("starting", "yes"),
            "{name}"
        );
        assert_eq!(
            shown.transitioning_message.as_deref(),
            Some(drover_store::NO_HOST_MESSAGE)
        );
        let host = store
            .get_resource(ResourceKind::Host, registered.host.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            host.state, "activating",
            "{name}: not active before its agent"
        );

        // Again and again past its backoff: still no attempt used.
        let mut later = ClaimRequest {
            now: first_wait,
            ..claim_request(NODE, first_wait + 60_000)
        };
        for waits in 2..=4 {
            let claimed = store.claim(later.clone()).await.unwrap();
            let start = claimed_named(&claimed, "instance.start");
            assert!(start.waiting.is_some(), "{name}");
            assert_eq!(
                (start.process.execution_count, start.process.wait_count),
                (0, waits),
                "{name}"
            );
            later.now = start.process.run_after.unwrap();
            later.lease_until = later.now + 60_000;
        }

        // The agent answers: its hosts' activations are ready at once.
        store
            .finish(done(activate_agent.process.clone(), NODE, "active"))
            .await
            .unwrap()
            .expect("the agent's activation ends");
        let host_activation = store
            .get_process(host_wait.process.id)
            .await
            .unwrap()
            .unwrap();
        assert!(
            host_activation.run_after.unwrap() <= now(),
            "{name}: woken by the agent's activation"
        );
        let claimed = store
            .claim(claim_request(NODE, now() + 60_000))
            .await
            .unwrap();
        let host_run = claimed_named(&claimed, "host.activate");
        assert!(host_run.waiting.is_none(), "{name}: its agent is active");
        assert_eq!(host_run.process.execution_count, 1, "{name}");
        // The start was woken too (its project's agent became active), and waits on: the
        // host is not active yet.
        assert!(claimed_named(&claimed, "instance.start").waiting.is_some());
        store
            .finish(done(host_run.process.clone(), NODE, "active"))
            .await
            .unwrap()
            .expect("the host's activation ends");

        // The host is active: the start is ready at once and placed on it.
        let claimed = store
            .claim(claim_request(NODE, now() + 60_000))
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1, "{name}");
        let start = &claimed[0];
        assert!(
            start.waiting.is_none() && start.placement.is_none(),
            "{name}"
        );
        assert_eq!(
            start.process.execution_count, 1,
            "{name}: its first attempt"
        );
        assert_eq!(
            start.agent.as_ref().map(|agent| agent.host_id),
            Some(registered.host.id)
        );
        store
            .finish(done(start.process.clone(), NODE, "running"))
            .await
            .unwrap()
            .unwrap();

        // A reconnecting agent's host takes nothing new; its coming back wakes the wait.
        for (kind, id) in [
            (ResourceKind::Agent, registered.agent.id),
            (ResourceKind::Host, registered.host.id),
        ] {
            store
                .set_state(kind, id, &["active"], "reconnecting")
                .await
                .unwrap()
                .unwrap();
        }
        let second = store
            .create_and_schedule(container(project, "second"))
            .await
            .unwrap()
            .resource;
        let claimed = store
            .claim(claim_request(NODE, now() + 60_000))
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1, "{name}");
        assert_eq!(
            claimed[0].waiting.as_ref().map(|w| w.reason),
            Some(drover_store::NO_HOST),
            "{name}: a reconnecting agent's host is no candidate"
        );
        for (kind, id) in [
            (ResourceKind::Agent, registered.agent.id),
            (ResourceKind::Host, registered.host.id),
        ] {
            store
                .set_state(kind, id, &["reconnecting"], "active")
                .await
                .unwrap()
                .unwrap();
        }
        let claimed = store
            .claim(claim_request(NODE, now() + 60_000))
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1, "{name}: woken by the host coming back");
        assert_eq!(claimed[0].process.resource_id, second.id);
        assert!(claimed[0].waiting.is_none(), "{name}");
        assert_eq!(
            claimed[0].resource.as_ref().unwrap().host_id,
            Some(registered.host.id)
        );
    }
}

#[tokio::test]
async fn a_wait_past_max_age_goes_to_the_engine_which_fails_it() {
    for subject in subjects(WriterOptions::default()).await {
        let store = &subject.store;
        let project = store.bootstrap(None).await.unwrap().default_project.id;
        let created = store
            .create_and_schedule(container(project, "never"))
            .await
            .unwrap();
        let request = ClaimRequest {
            now: created.process.created + 10,
            max_age_millis: 5,
            ..claim_request(NODE, now() + 60_000)
        };
        let claimed = store.claim(request).await.unwrap();
        assert_eq!(claimed.len(), 1, "{}", subject.name);
        assert!(claimed[0].waiting.is_none(), "{}", subject.name);
        assert_eq!(
            claimed[0].placement.as_ref().map(|error| error.reason),
            Some(drover_store::NO_HOST)
        );
        assert_eq!(claimed[0].process.execution_count, 1);
    }
}

#[tokio::test]
async fn schedule_refuses_a_locked_or_wrong_state_resource_and_remove_cancels() {
    for subject in subjects(WriterOptions::default()).await {
        let store = &subject.store;
        let (project, _) = project_with_host(store).await;
        let resource = store
            .create_and_schedule(container(project, "web"))
            .await
            .unwrap()
            .resource;
        let action = |name: &str, start: &[&str], steps: Vec<Step>, cancel: bool| NewProcess {
            kind: ResourceKind::Instance,
            resource_id: resource.id,
            start_states: start.iter().map(|s| (*s).to_owned()).collect(),
            cancel_pending: cancel,
            steps,
            data: Map::new(),
            node: format!("{NODE}-{name}"),
        };
        let busy = store
            .schedule(action(
                "stop",
                &["running"],
                vec![Step::pending("instance.stop", "stopping")],
                false,
            ))
            .await;
        assert!(
            matches!(&busy, Err(ScheduleError::Busy { process_name, .. }) if process_name == "instance.start"),
            "{}: {busy:?}",
            subject.name
        );
        let removed = store
            .schedule(action(
                "remove",
                &["starting", "running"],
                vec![Step::pending("instance.remove", "removing")],
                true,
            ))
            .await
            .unwrap();
        assert_eq!(removed.resource.state, "removing");
        assert_eq!(removed.previous_state, "starting");
        assert_eq!(removed.canceled.len(), 1, "{}", subject.name);
        let canceled = store
            .get_process(removed.canceled[0])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(canceled.result.as_deref(), Some("CANCELED"));
        // A plan of hops only ends at once: a purge of a removed resource.
        let stack = store
            .create_and_schedule(NewCreate {
                kind: ResourceKind::Stack,
                resource: NewResource {
                    name: Some("s".into()),
                    sub_kind: "stack".into(),
                    account_id: Some(project),
                    ..NewResource::default()
                },
                steps: vec![
                    Step::hop("stack.create", "registering", "inactive"),
                    Step::hop("stack.activate", "activating", "active"),
                ],
                node: NODE.into(),
            })
            .await
            .unwrap();
        assert_eq!(
            (
                stack.resource.state.as_str(),
                stack.resource.transitioning.as_str()
            ),
            ("active", "no"),
            "{}",
            subject.name
        );
        let wrong = store
            .schedule(NewProcess {
                kind: ResourceKind::Stack,
                resource_id: stack.resource.id,
                start_states: vec!["removed".into()],
                cancel_pending: false,
                steps: vec![Step::hop("stack.purge", "purging", "purged")],
                data: Map::new(),
                node: NODE.into(),
            })
            .await;
        assert!(
            matches!(&wrong, Err(ScheduleError::InvalidState { state }) if state == "active"),
            "{}: {wrong:?}",
            subject.name
        );
        let gone = store
            .schedule(NewProcess {
                kind: ResourceKind::Stack,
                resource_id: stack.resource.id,
                start_states: vec!["active".into()],
                cancel_pending: true,
                steps: vec![Step::hop("stack.remove", "removing", "removed")],
                data: Map::new(),
                node: NODE.into(),
            })
            .await
            .unwrap();
        assert_eq!(gone.resource.state, "removed");
        assert!(gone.resource.removed.is_some());
        assert!(
            store
                .get_resource(ResourceKind::Stack, stack.resource.id)
                .await
                .unwrap()
                .unwrap()
                .removed
                .is_some()
        );
    }
}

#[tokio::test]
async fn a_finish_by_a_node_that_lost_its_lease_changes_nothing() {
    for subject in subjects(WriterOptions::default()).await {
        let store = &subject.store;
        let (project, _) = project_with_host(store).await;
        let resource = store
            .create_and_schedule(container(project, "web"))
            .await
            .unwrap()
            .resource;
        // Node A claims with a lease that has already run out; node B takes the process over.
        let a = store
            .claim(claim_request("node-a", now() - 1))
            .await
            .unwrap();
        assert_eq!(a.len(), 1);
        let b = store
            .claim(claim_request("node-b", now() + 10_000))
            .await
            .unwrap();
        assert_eq!(
            b.len(),
            1,
            "{}: an expired lease is taken over",
            subject.name
        );
        assert_eq!(b[0].process.execution_count, 2);
        // A's progress and finish change nothing.
        let progress = store
            .set_progress(ProgressItem {
                process: a[0].process.clone(),
                node: "node-a".into(),
                message: Some("from a".into()),
                progress: Some(50),
            })
            .await
            .unwrap();
        assert!(progress.is_none(), "{}", subject.name);
        let stale = store
            .finish(done(a[0].process.clone(), "node-a", "running"))
            .await
            .unwrap();
        assert!(
            stale.is_none(),
            "{}: the stale finish is fenced",
            subject.name
        );
        let stored = store
            .get_resource(ResourceKind::Instance, resource.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.state, "starting");
        assert_eq!(stored.transitioning_message, None);
        assert!(
            store
                .list_executions(a[0].process.id)
                .await
                .unwrap()
                .is_empty()
        );
        // The same node's older attempt is fenced too: B's lease runs out, B claims again.
        let b2_process = {
            let mut first = b[0].process.clone();
            first.execution_count = 1;
            first
        };
        let older = store
            .finish(done(b2_process, "node-b", "running"))
            .await
            .unwrap();
        assert!(
            older.is_none(),
            "{}: an older attempt is fenced",
            subject.name
        );
        let progress = store
            .set_progress(ProgressItem {
                process: b[0].process.clone(),
                node: "node-b".into(),
                message: Some("half way".into()),
                progress: Some(50),
            })
            .await
            .unwrap()
            .expect("the owner's progress is applied");
        assert_eq!(progress.transitioning_progress, Some(50));
        let finished = store
            .finish(done(b[0].process.clone(), "node-b", "running"))
            .await
            .unwrap()
            .expect("the owner's finish applies");
        assert_eq!(finished.state, "running");
        assert_eq!(
            store.list_executions(b[0].process.id).await.unwrap().len(),
            1
        );
    }
}

#[tokio::test]
async fn retry_fail_replay_and_cancel() {
    for subject in subjects(WriterOptions::default()).await {
        let store = &subject.store;
        let (project, _) = project_with_host(store).await;
        let resource = store
            .create_and_schedule(container(project, "web"))
            .await
            .unwrap()
            .resource;
        let claimed = store
            .claim(claim_request(NODE, now() + 10_000))
            .await
            .unwrap()
            .remove(0);
        let mut retry = done(claimed.process.clone(), NODE, "running");
        retry.finish = Finish::Retry {
            run_after: now() + 60_000,
            message: "disk full".into(),
            reason: "ERROR".into(),
        };
        let after_retry = store.finish(retry).await.unwrap().unwrap();
        assert_eq!(after_retry.state, "starting");
        assert_eq!(after_retry.transitioning, "error");
        assert_eq!(
            after_retry.transitioning_message.as_deref(),
            Some("disk full")
        );
        assert!(
            store
                .claim(claim_request(NODE, now() + 10_000))
                .await
                .unwrap()
                .is_empty(),
            "{}: a delayed process waits",
            subject.name
        );
        // Replay runs it now.
        store.replay(claimed.process.id).await.unwrap();
        let again = store
            .claim(claim_request(NODE, now() + 10_000))
            .await
            .unwrap()
            .remove(0);
        assert_eq!(again.process.id, claimed.process.id);
        let mut failed = done(again.process.clone(), NODE, "running");
        failed.finish = Finish::Failed {
            message: "gave up".into(),
            reason: "PERMANENT".into(),
        };
        let after_fail = store.finish(failed).await.unwrap().unwrap();
        assert_eq!(after_fail.state, "error", "{}", subject.name);
        // A failed process is reopened by replay, and then can be canceled.
        store.replay(claimed.process.id).await.unwrap();
        let reopened = store
            .get_resource(ResourceKind::Instance, resource.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reopened.state, "starting");
        let (canceled, back) = store.cancel(claimed.process.id).await.unwrap();
        assert_eq!(canceled.result.as_deref(), Some("CANCELED"));
        assert_eq!(back.unwrap().state, "stopped", "{}", subject.name);
        assert!(matches!(
            store.cancel(claimed.process.id).await,
            Err(ScheduleError::InvalidState { .. })
        ));
    }
}

#[tokio::test]
async fn one_bad_item_in_a_batch_fails_alone() {
    // A window long enough that the concurrent jobs below share one transaction.
    let writer = WriterOptions {
        window: Duration::from_millis(200),
        ..WriterOptions::default()
    };
    for subject in subjects(writer).await {
        let store = &subject.store;
        let (project, _) = project_with_host(store).await;
        let busy = store
            .create_and_schedule(container(project, "busy"))
            .await
            .unwrap()
            .resource;
        let split_before = store.writer_stats().split.load(Ordering::Relaxed);
        let mut jobs = Vec::new();
        for index in 0..20 {
            let mut create = container(project, &format!("c{index}"));
            if index == 7 {
                // No such project: the row breaks a foreign key.
                create.resource.account_id = Some(987_654_321);
            }
            jobs.push(tokio::spawn({
                let store = store.clone();
                async move { store.create_and_schedule(create).await }
            }));
        }
        let refused = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .schedule(NewProcess {
                        kind: ResourceKind::Instance,
                        resource_id: busy.id,
                        start_states: vec!["running".into()],
                        cancel_pending: false,
                        steps: vec![Step::pending("instance.stop", "stopping")],
                        data: Map::new(),
                        node: NODE.into(),
                    })
                    .await
            }
        });
        let mut made = 0;
        for (index, job) in jobs.into_iter().enumerate() {
            match job.await.unwrap() {
                Ok(scheduled) => {
                    made += 1;
                    assert_eq!(scheduled.resource.state, "starting");
                    assert!(
                        store
                            .get_resource(ResourceKind::Instance, scheduled.resource.id)
                            .await
                            .unwrap()
                            .is_some()
                    );
                }
                Err(error) => {
                    assert_eq!(
                        index, 7,
                        "{}: only the bad item fails: {error}",
                        subject.name
                    );
                    assert!(error.to_string().contains("database error"), "{error}");
                }
            }
        }
        assert_eq!(made, 19, "{}", subject.name);
        assert!(matches!(
            refused.await.unwrap(),
            Err(ScheduleError::Busy { .. })
        ));
        assert!(
            store.writer_stats().split.load(Ordering::Relaxed) > split_before,
            "{}: the batch with the bad item was split",
            subject.name
        );
        let page = store
            .list_resources(
                ResourceKind::Instance,
                &drover_store::ListQuery {
                    account_id: Some(project),
                    filters: Vec::new(),
                    marker: None,
                    limit: 100,
                },
            )
            .await
            .unwrap();
        assert_eq!(
            page.data.len(),
            20,
            "{}: 19 made plus the busy one",
            subject.name
        );
    }
}

fn node(id: &str, name: &str, nats: bool) -> drover_store::NodeInfo {
    drover_store::NodeInfo {
        id: id.into(),
        name: name.into(),
        address: format!("http://{name}"),
        nats,
    }
}

#[tokio::test]
async fn a_dead_nodes_processes_are_released_at_once_and_its_late_writes_change_nothing() {
    for subject in subjects(WriterOptions::default()).await {
        let store = &subject.store;
        let (project, _host) = project_with_host(store).await;
        let t = now();
        let epoch = store
            .node_join(&node("node-a", "a", false), t, 1_000, false)
            .await
            .unwrap();
        store
            .create_and_schedule(container(project, "c1"))
            .await
            .unwrap();
        // Node A claims with a long process lease, then stops renewing its node lease.
        let claimed = store
            .claim(claim_request("node-a", now() + 600_000))
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1, "{}", subject.name);
        let held = claimed.into_iter().next().unwrap().process;
        assert!(
            store.sweep_dead_nodes(t + 500).await.unwrap().is_empty(),
            "{}: A's lease still holds",
            subject.name
        );
        assert!(
            store
                .claim(claim_request("node-b", now() + 600_000))
                .await
                .unwrap()
                .is_empty(),
            "{}: the process is A's while A lives",
            subject.name
        );
        assert_eq!(
            store.sweep_dead_nodes(t + 1_001).await.unwrap(),
            vec!["node-a".to_owned()],
            "{}",
            subject.name
        );
        // A's process lease (ten minutes) is released with A: B claims it now.
        let taken = store
            .claim(claim_request("node-b", now() + 600_000))
            .await
            .unwrap();
        assert_eq!(taken.len(), 1, "{}: B takes A's process over", subject.name);
        let taken = taken.into_iter().next().unwrap().process;
        assert_eq!(taken.execution_count, held.execution_count + 1);
        // A comes back: its heartbeat fails, its finish and renewals change nothing.
        assert!(
            !store
                .node_heartbeat("node-a", epoch, t + 1_200, 1_000)
                .await
                .unwrap(),
            "{}",
            subject.name
        );
        assert_eq!(
            store.renew_leases("node-a", now() + 600_000).await.unwrap(),
            0,
            "{}",
            subject.name
        );
        assert!(
            store
                .finish(done(held, "node-a", "running"))
                .await
                .unwrap()
                .is_none(),
            "{}: the dead node's finish is fenced",
            subject.name
        );
        let finished = store
            .finish(done(taken, "node-b", "running"))
            .await
            .unwrap()
            .expect("the live owner's finish applies");
        assert_eq!(finished.state, "running");
        let again = store
            .node_join(&node("node-a", "a", false), t + 1_300, 1_000, false)
            .await
            .unwrap();
        assert!(
            again > epoch,
            "{}: a node joins again with a new epoch",
            subject.name
        );
    }
}

#[tokio::test]
async fn joins_that_would_split_the_cluster_are_refused_and_duties_are_held_once() {
    let Some(schema) = Schema::create("c", "a cluster store test").await else {
        return;
    };
    let store = Store::connect(&StoreOptions {
        pg_schema: Some(schema.name.clone()),
        ..StoreOptions::url(schema.url.clone())
    })
    .await
    .unwrap();
    let t = now();
    let alone = store
        .node_join(&node("n-alone", "alone", false), t, 3_000, false)
        .await
        .unwrap();
    for (id, nats) in [("n-b", false), ("n-c", true)] {
        match store
            .node_join(&node(id, id, nats), t + 10, 3_000, false)
            .await
        {
            Err(drover_store::Error::Conflict(message)) => {
                assert!(message.contains("alone"), "{message}")
            }
            other => panic!("a second node beside a lone one must be refused: {other:?}"),
        }
    }
    // The same name with another id is the lone server restarted: it takes over at once.
    store
        .node_join(&node("n-alone-2", "alone", false), t + 20, 3_000, false)
        .await
        .unwrap();
    assert!(
        !store
            .node_heartbeat("n-alone", alone, t + 30, 3_000)
            .await
            .unwrap()
    );
    // The old process comes back and joins again: the name is taken, it must stop (not take
    // the new one's work in turn).
    match store
        .node_join(&node("n-alone", "alone", false), t + 40, 3_000, true)
        .await
    {
        Err(drover_store::Error::Conflict(message)) => {
            assert!(message.contains("took over"), "{message}")
        }
        other => panic!("a rejoin under a taken name must be refused: {other:?}"),
    }
    store.node_leave("n-alone-2", alone + 1).await.unwrap();
    // Cluster nodes join beside each other; one holds the leader duty at a time.
    let ea = store
        .node_join(&node("n-a", "a", true), t + 40, 1_000, false)
        .await
        .unwrap();
    let eb = store
        .node_join(&node("n-b", "b", true), t + 40, 1_000, false)
        .await
        .unwrap();
    match store
        .node_join(&node("n-x", "x", false), t + 50, 1_000, false)
        .await
    {
        Err(drover_store::Error::Conflict(message)) => assert!(message.contains("--nats-url")),
        other => panic!("a lone node beside a cluster must be refused: {other:?}"),
    }
    let leader = drover_store::LEADER_DUTY;
    assert!(
        store
            .duty_acquire(leader, "n-a", ea, t + 60, 1_000)
            .await
            .unwrap()
    );
    assert!(
        !store
            .duty_acquire(leader, "n-b", eb, t + 70, 1_000)
            .await
            .unwrap()
    );
    assert!(
        store
            .begin_task_run("tick", leader, "n-a", ea, t + 80)
            .await
            .unwrap()
    );
    assert!(
        !store
            .begin_task_run("tick", leader, "n-b", eb, t + 80)
            .await
            .unwrap()
    );
    // A stops renewing; B keeps its node lease, sweeps A and takes the duty over.
    assert!(
        store
            .node_heartbeat("n-b", eb, t + 900, 1_000)
            .await
            .unwrap()
    );
    assert_eq!(
        store.sweep_dead_nodes(t + 1_100).await.unwrap(),
        vec!["n-a".to_owned()]
    );
    assert!(
        store
            .duty_acquire(leader, "n-b", eb, t + 1_100, 1_000)
            .await
            .unwrap()
    );
    assert!(
        !store
            .begin_task_run("tick", leader, "n-a", ea, t + 1_200)
            .await
            .unwrap(),
        "the old leader's run is refused"
    );
    assert!(
        store
            .begin_task_run("tick", leader, "n-b", eb, t + 1_200)
            .await
            .unwrap()
    );
    let runs = store.task_runs_since("tick", t).await.unwrap();
    assert_eq!(runs, vec![("n-a".to_owned(), 1), ("n-b".to_owned(), 1)]);
    let nodes = store.cluster_nodes().await.unwrap();
    let b = nodes.iter().find(|row| row.id == "n-b").unwrap();
    assert_eq!((b.state.as_str(), b.leader), ("alive", 1));
}
