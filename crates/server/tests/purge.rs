//! Keeping the store small: container and service events, the `table.cleanup` job and its
//! settings, end to end through the API of a real server. Each test runs on SQLite and, when
//! `DROVER_TEST_POSTGRES_URL` is set, on PostgreSQL. Rows are aged by moving their times back
//! with SQL of the test's own; everything asserted goes through the server.

use std::sync::Arc;

use drover_client::{Client, Error};
use drover_test_support::agent::{Answer, TestAgent};
use drover_test_support::{TestServer, poll, servers, wait_change, wait_state};
use serde_json::{Value, json};

const HOUR_MS: i64 = 3_600_000;

/// A container running on the (only) host: its id.
async fn running_container(server: &TestServer, name: &str) -> String {
    let created = server
        .admin
        .post(
            "containers",
            &json!({"name": name, "command": ["sleep", "100"]}),
        )
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    wait_state(&server.admin, &format!("containers/{id}"), "running").await;
    id
}

async fn run_cleanup(server: &TestServer) -> Value {
    let report = server
        .admin
        .post("cleanup?action=run", &json!({}))
        .await
        .unwrap();
    assert_eq!(report["type"], "cleanupReport");
    assert!(report["error"].is_null(), "{report:#}");
    report
}

fn table<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == name)
        .unwrap_or_else(|| panic!("no {name} in {report:#}"))
}

fn ids(collection: &Value) -> Vec<String> {
    collection["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The database id in an API id (`1i42` → 42).
fn db_id(id: &str) -> i64 {
    id[1..]
        .trim_start_matches(|c: char| c.is_ascii_alphabetic())
        .parse()
        .unwrap_or_else(|_| panic!("not an id: {id}"))
}

async fn put_setting(server: &TestServer, name: &str, value: &str) {
    server
        .admin
        .put(&format!("settings/{name}"), &json!({"value": value}))
        .await
        .unwrap();
}

async fn post_event(client: &Client, body: Value) -> Result<Value, Error> {
    client.post("containerevents", &body).await
}

#[tokio::test]
async fn old_rows_are_deleted_young_ones_kept_and_removed_resources_purged_first() {
    for server in servers(&[]).await {
        let (host_id, agent_client, _agent) = server
            .host_with_agent("host-1", TestAgent::always_ok())
            .await;
        let old_container = running_container(&server, "old").await;
        let young_container = running_container(&server, "young").await;
        let gone = running_container(&server, "gone").await;
        server
            .admin
            .delete(&format!("containers/{gone}"))
            .await
            .unwrap();
        wait_state(&server.admin, &format!("containers/{gone}"), "removed").await;
        let kept_removed = running_container(&server, "removed-recently").await;
        server
            .admin
            .delete(&format!("containers/{kept_removed}"))
            .await
            .unwrap();
        wait_state(
            &server.admin,
            &format!("containers/{kept_removed}"),
            "removed",
        )
        .await;

        let mut events = Vec::new();
        for status in ["exec_start", "exec_die"] {
            let event = post_event(
                &agent_client,
                json!({"externalId": old_container, "externalStatus": status, "hostId": host_id}),
            )
            .await
            .unwrap();
            events.push(event["id"].as_str().unwrap().to_owned());
        }
        let events_path = format!("containerevents?hostId={host_id}");
        poll(&server.admin, &events_path, "events handled", |c| {
            c["data"]
                .as_array()
                .unwrap()
                .iter()
                .all(|e| e["state"] == "created")
        })
        .await;

        // Age: one event past 12 h, the old container's processes past 1 h, the removed
        // container past 2 days. Everything else is young.
        server
            .sql(&format!(
                "UPDATE container_event SET created = created - {} WHERE id = {}",
                13 * HOUR_MS,
                db_id(&events[0])
            ))
            .await;
        let aged = server
            .sql(&format!(
                "UPDATE process_instance SET end_time = end_time - {} WHERE resource_type = 'instance' AND resource_id = {}",
                2 * HOUR_MS,
                db_id(&old_container)
            ))
            .await;
        assert_eq!(aged, 2, "create and start of the old container");
        server
            .sql(&format!(
                "UPDATE instance SET removed = removed - {} WHERE id = {}",
                49 * HOUR_MS,
                db_id(&gone)
            ))
            .await;

        let report = run_cleanup(&server).await;
        assert_eq!(
            table(&report, "container_event")["deleted"],
            1,
            "{report:#}"
        );
        assert_eq!(
            table(&report, "process_instance")["deleted"],
            2,
            "{report:#}"
        );
        // The start's attempt; the create is a hop, recorded as a process without attempts.
        assert!(
            table(&report, "process_execution")["deleted"]
                .as_u64()
                .unwrap()
                >= 1,
            "{report:#}"
        );
        assert_eq!(table(&report, "instance")["deleted"], 1, "{report:#}");
        assert_eq!(
            report["purgesScheduled"], 2,
            "both removed containers: {report:#}"
        );

        // The old event is gone, the young one kept.
        assert_eq!(
            ids(&server.admin.get(&events_path).await.unwrap()),
            vec![events[1].clone()]
        );
        // The old container's processes are gone; the young container's are kept.
        let old_processes = server
            .admin
            .get(&format!(
                "processinstances?resourceType=instance&resourceId={old_container}"
            ))
            .await
            .unwrap();
        assert!(ids(&old_processes).is_empty(), "{old_processes:#}");
        let young_processes = server
            .admin
            .get(&format!(
                "processinstances?resourceType=instance&resourceId={young_container}"
            ))
            .await
            .unwrap();
        assert_eq!(ids(&young_processes).len(), 2);
        // Both removed containers went removed -> purging -> purged through the engine; the
        // one removed long ago is deleted, the recent one kept.
        for id in [&gone, &kept_removed] {
            let purges = server
                .admin
                .get(&format!(
                    "processinstances?processName=instance.purge&resourceId={id}"
                ))
                .await
                .unwrap();
            assert_eq!(purges["data"][0]["result"], "SUCCESS", "{purges:#}");
        }
        match server.admin.get(&format!("containers/{gone}")).await {
            Err(Error::Api { status: 404, .. }) => {}
            other => panic!("the old removed container should be deleted: {other:?}"),
        }
        wait_state(
            &server.admin,
            &format!("containers/{kept_removed}"),
            "purged",
        )
        .await;
        // What `drover ps` lists: neither removed nor purged ones.
        let live = server
            .admin
            .get("containers?state_ne=removed&state_ne=purging&state_ne=purged")
            .await
            .unwrap();
        let mut live = ids(&live);
        live.sort();
        let mut expected = vec![old_container.clone(), young_container.clone()];
        expected.sort();
        assert_eq!(live, expected);
        // The live containers are untouched.
        wait_state(
            &server.admin,
            &format!("containers/{old_container}"),
            "running",
        )
        .await;

        // Counts reach the metrics.
        let metrics = server.server.state.metrics.render();
        assert!(
            metrics.contains("drover_cleanup_deleted_rows_total{table=\"container_event\"} 1"),
            "{metrics}"
        );
        assert_eq!(server.metric("drover_cleanup_runs_total"), 1.0);

        // A second run finds nothing more to do.
        let again = run_cleanup(&server).await;
        assert_eq!(again["deleted"], 0, "{again:#}");
        assert_eq!(again["purgesScheduled"], 0, "{again:#}");
    }
}

#[tokio::test]
async fn a_referenced_row_is_kept_and_a_setting_change_applies_to_the_next_run() {
    for server in servers(&[]).await {
        let (host_id, agent_client, _agent) = server
            .host_with_agent("host-2", TestAgent::always_ok())
            .await;
        post_event(
            &agent_client,
            json!({"externalId": "not-a-container", "externalStatus": "start"}),
        )
        .await
        .unwrap();
        // The host is removed and, by the first run, purged.
        server
            .admin
            .delete(&format!("hosts/{host_id}"))
            .await
            .unwrap();
        wait_state(&server.admin, &format!("hosts/{host_id}"), "removed").await;
        run_cleanup(&server).await;
        wait_state(&server.admin, &format!("hosts/{host_id}"), "purged").await;
        server
            .sql(&format!(
                "UPDATE host SET removed = removed - {} WHERE id = {}",
                49 * HOUR_MS,
                db_id(&host_id)
            ))
            .await;

        // Old enough, but its container event (12 h to live) still references it.
        let report = run_cleanup(&server).await;
        assert_eq!(table(&report, "host")["deleted"], 0, "{report:#}");
        assert_eq!(table(&report, "host")["kept"], 1, "{report:#}");
        let metrics = server.server.state.metrics.render();
        assert!(
            metrics.contains("drover_cleanup_kept_rows{table=\"host\"} 1"),
            "{metrics}"
        );
        wait_state(&server.admin, &format!("hosts/{host_id}"), "purged").await;

        // Events now live 0 s: the next run deletes the event, then the host it freed.
        put_setting(&server, "events.purge.after.seconds", "0").await;
        let report = run_cleanup(&server).await;
        assert_eq!(
            table(&report, "container_event")["deleted"],
            1,
            "{report:#}"
        );
        assert_eq!(table(&report, "host")["deleted"], 1, "{report:#}");
        assert_eq!(table(&report, "host")["kept"], 0, "{report:#}");
        match server.admin.get(&format!("hosts/{host_id}")).await {
            Err(Error::Api { status: 404, .. }) => {}
            other => panic!("the host should be deleted: {other:?}"),
        }

        // Small batches: the same work, several statements.
        put_setting(&server, "cleanup.query_limit.rows", "1").await;
        put_setting(&server, "process_instance.purge.after.seconds", "0").await;
        let report = run_cleanup(&server).await;
        assert!(
            table(&report, "process_instance")["deleted"]
                .as_u64()
                .unwrap()
                >= 4,
            "host create/activate/remove/purge and the agent's: {report:#}"
        );
        let status = server.admin.get("cleanup").await.unwrap();
        assert_eq!(status["settings"]["cleanup.query_limit.rows"], 1);
        assert_eq!(status["lastRun"]["trigger"], "api");
    }
}

#[tokio::test]
async fn the_interval_setting_reschedules_the_job_without_a_restart() {
    for server in servers(&[]).await {
        let status = server.admin.get("cleanup").await.unwrap();
        assert!(
            status["lastRun"].is_null(),
            "the first run is 15 s after start"
        );
        put_setting(&server, "task.table.cleanup.schedule", "1").await;
        let status = poll(&server.admin, "cleanup", "a scheduled run", |s| {
            s["lastRun"]["trigger"] == "schedule"
        })
        .await;
        assert!(status["nextRun"].is_string());
        // Back to hourly: no further run is due for an hour from the last one's start (the
        // schedule counts from a run's start; `nextRun` is shown to the second).
        put_setting(&server, "task.table.cleanup.schedule", "3600").await;
        poll(&server.admin, "cleanup", "the next run an hour away", |s| {
            s["nextRun"].as_str().is_some_and(|next| {
                chrono_millis(next) - s["lastRun"]["started"].as_i64().unwrap_or(0) >= 3_599_000
            })
        })
        .await;
        assert!(server.metric("drover_cleanup_runs_total") >= 1.0);
    }
}

#[tokio::test]
async fn without_autovacuum_every_run_vacuums_the_tables_it_cleans() {
    for server in servers(&[]).await {
        // SQLite reuses the pages of deleted rows; PostgreSQL only after a VACUUM, which
        // drover leaves to autovacuum unless the cluster has it off (as this machine's has).
        let autovacuum_off = server.schema.is_some()
            && server.pg_text("SHOW autovacuum").await.as_deref() == Some("off");
        let report = run_cleanup(&server).await;
        for table in report["tables"].as_array().unwrap() {
            assert_eq!(table["vacuumed"], autovacuum_off, "{report:#}");
        }
        if autovacuum_off {
            for name in ["container_event", "process_instance", "instance", "agent"] {
                let last = server
                    .pg_text(&format!(
                        "SELECT last_vacuum::text FROM pg_stat_user_tables \
                         WHERE schemaname = current_schema() AND relname = '{name}'"
                    ))
                    .await;
                assert!(last.is_some(), "{name} was not vacuumed");
            }
        }
    }
}

fn chrono_millis(text: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(text)
        .unwrap()
        .timestamp_millis()
}

#[tokio::test]
async fn an_unfinished_process_past_max_age_is_ended_then_purged() {
    for server in servers(&[]).await {
        // The agent never answers: the start process retries until its max age.
        let (_host, _agent_client, _agent) = server
            .host_with_agent("host-3", Arc::new(|_, _| Answer::Ignore))
            .await;
        let created = server
            .admin
            .post(
                "containers",
                &json!({"name": "stuck", "command": ["sleep", "1"]}),
            )
            .await
            .unwrap();
        let id = created["id"].as_str().unwrap().to_owned();
        let pending = format!("processinstances?resourceId={id}&state=pending");
        poll(&server.admin, &pending, "a retrying start", |c| {
            c["data"][0]["executionCount"].as_i64().unwrap_or(0) >= 2
        })
        .await;
        // Its max age shrinks to 1 s; the next run ends it (a run makes overdue processes
        // ready, the engine fails them) — then it is as purgeable as any other.
        put_setting(&server, "process.max_age.seconds", "1").await;
        run_cleanup(&server).await;
        let container = wait_change(&server.admin, &format!("containers/{id}"), "error", |c| {
            c["state"] == "error"
        })
        .await;
        assert!(
            container["transitioningMessage"]
                .as_str()
                .unwrap_or("")
                .contains("process.max_age.seconds"),
            "{container:#}"
        );
        let ended = server
            .admin
            .get(&format!(
                "processinstances?resourceId={id}&processName=instance.start"
            ))
            .await
            .unwrap();
        assert_eq!(ended["data"][0]["result"], "FAILURE", "{ended:#}");
        assert_eq!(ended["data"][0]["exitReason"], "MAX_AGE", "{ended:#}");

        put_setting(&server, "process_instance.purge.after.seconds", "0").await;
        let report = run_cleanup(&server).await;
        assert!(
            table(&report, "process_instance")["deleted"]
                .as_u64()
                .unwrap()
                >= 2
        );
        let left = server
            .admin
            .get(&format!("processinstances?resourceId={id}"))
            .await
            .unwrap();
        assert!(ids(&left).is_empty(), "{left:#}");
    }
}

#[tokio::test]
async fn only_an_agent_may_post_events_and_only_for_its_own_host() {
    for server in servers(&[]).await {
        let (host_1, agent_1, _a1) = server
            .host_with_agent("host-a", TestAgent::always_ok())
            .await;
        let (_host_2, agent_2, _a2) = server
            .host_with_agent("host-b", TestAgent::always_ok())
            .await;
        let host_1_uuid = server.admin.get(&format!("hosts/{host_1}")).await.unwrap()["uuid"]
            .as_str()
            .unwrap()
            .to_owned();
        let body = |extra: Value| {
            let mut body = json!({"externalId": "c1", "externalStatus": "die"});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            body
        };
        let expect = |result: Result<Value, Error>, status: u16, code: &str| match result {
            Err(Error::Api {
                status: got,
                code: got_code,
                ..
            }) if got == status && got_code == code => {}
            other => panic!("expected {status} {code}, got {other:?}"),
        };
        // The second agent names the first agent's host, by uuid or by id.
        expect(
            post_event(&agent_2, body(json!({"reportedHostUuid": host_1_uuid}))).await,
            403,
            "CantVerifyHost",
        );
        expect(
            post_event(&agent_2, body(json!({"hostId": host_1}))).await,
            403,
            "CantVerifyHost",
        );
        // Keys that are not agents'.
        expect(
            post_event(&server.admin, body(json!({}))).await,
            403,
            "CantVerifyAgent",
        );
        let (_project, project_client) = server.project("other").await;
        expect(
            post_event(&project_client, body(json!({}))).await,
            403,
            "CantVerifyAgent",
        );
        // Bad input.
        expect(
            post_event(&agent_1, body(json!({"reportedHostUuid": "no-such-host"}))).await,
            422,
            "InvalidReference",
        );
        expect(
            post_event(&agent_1, json!({"externalStatus": "die"})).await,
            422,
            "MissingRequired",
        );
        expect(
            post_event(&agent_1, body(json!({"externalTimestamp": "yesterday"}))).await,
            422,
            "InvalidFormat",
        );
        assert_eq!(
            server
                .server
                .state
                .store
                .count_rows("container_event")
                .await
                .unwrap(),
            0,
            "refused posts store nothing"
        );
        // The four refusals (403); the bad input is counted as such.
        assert_eq!(server.metric("drover_events_refused_total"), 4.0);

        // The owner may, by uuid, by id or naming nothing (its only host).
        for extra in [
            json!({"reportedHostUuid": host_1_uuid}),
            json!({"hostId": host_1}),
            json!({}),
        ] {
            let event = post_event(&agent_1, body(extra)).await.unwrap();
            assert_eq!(event["hostId"], host_1.as_str());
            assert_eq!(event["type"], "containerEvent");
        }

        // The per-host cap: two events still being handled fill it.
        poll(
            &server.admin,
            &format!("containerevents?hostId={host_1}&state=created"),
            "the posted events handled",
            |c| c["data"].as_array().unwrap().len() == 3,
        )
        .await;
        put_setting(&server, "container.event.max.size", "2").await;
        server
            .sql(&format!(
                "INSERT INTO container_event (kind, state, created, external_id, external_status, host_id) \
                 VALUES ('containerEvent', 'creating', 0, 'x', 'die', {0}), ('containerEvent', 'creating', 0, 'y', 'die', {0})",
                db_id(&host_1)
            ))
            .await;
        expect(
            post_event(&agent_1, body(json!({}))).await,
            409,
            "TooManyContainerEvents",
        );
        // Another host is not affected.
        post_event(&agent_2, body(json!({}))).await.unwrap();
        put_setting(&server, "container.event.max.size", "3").await;
        post_event(&agent_1, body(json!({}))).await.unwrap();
    }
}

#[tokio::test]
async fn container_and_service_events_reconcile_the_instance() {
    for server in servers(&[]).await {
        let (host_id, agent_client, _agent) = server
            .host_with_agent("host-r", TestAgent::always_ok())
            .await;
        let id = running_container(&server, "web").await;
        let path = format!("containers/{id}");

        let died = post_event(
            &agent_client,
            json!({"externalId": id, "externalStatus": "die", "externalTimestamp": 1_700_000_000, "dockerInspect": {"State": {"ExitCode": 137}}}),
        )
        .await
        .unwrap();
        assert_eq!(died["state"], "requested");
        wait_state(&server.admin, &path, "stopped").await;
        let event = poll(
            &server.admin,
            &format!("containerevents/{}", died["id"].as_str().unwrap()),
            "handled",
            |e| e["state"] == "created",
        )
        .await;
        assert_eq!(event["data"]["result"]["action"], "stopped", "{event:#}");
        assert_eq!(event["dockerInspect"]["State"]["ExitCode"], 137);
        assert_eq!(event["instanceId"], id.as_str());

        // Started again outside drover: running again.
        post_event(
            &agent_client,
            json!({"externalId": id, "externalStatus": "start"}),
        )
        .await
        .unwrap();
        wait_state(&server.admin, &path, "running").await;

        // A report that matches the state changes nothing.
        server
            .admin
            .post(&format!("{path}?action=stop"), &json!({}))
            .await
            .unwrap();
        wait_state(&server.admin, &path, "stopped").await;
        let stale = post_event(
            &agent_client,
            json!({"externalId": id, "externalStatus": "die"}),
        )
        .await
        .unwrap();
        let stale = poll(
            &server.admin,
            &format!("containerevents/{}", stale["id"].as_str().unwrap()),
            "handled",
            |e| e["state"] == "created",
        )
        .await;
        assert_eq!(stale["data"]["result"]["action"], "none", "{stale:#}");
        wait_state(&server.admin, &path, "stopped").await;

        // Health reports.
        let report = agent_client
            .post(
                "serviceevents",
                &json!({"instanceId": id, "reportedHealth": "unhealthy", "healthcheckUuid": "hc-1"}),
            )
            .await
            .unwrap();
        assert_eq!(report["type"], "serviceEvent");
        wait_change(&server.admin, &path, "health", |c| {
            c["healthState"] == "unhealthy"
        })
        .await;
        match agent_client
            .post(
                "serviceevents",
                &json!({"instanceId": "1i999999", "reportedHealth": "healthy"}),
            )
            .await
        {
            Err(Error::Api { status: 422, .. }) => {}
            other => panic!("a container not on the host: {other:?}"),
        }

        // Listing and filters.
        let dies = server
            .admin
            .get(&format!(
                "containerevents?externalStatus=die&hostId={host_id}"
            ))
            .await
            .unwrap();
        assert_eq!(ids(&dies).len(), 2);
        assert_eq!(ids(&dies)[0], died["id"].as_str().unwrap());
        let unhealthy = server
            .admin
            .get("serviceevents?reportedHealth=unhealthy")
            .await
            .unwrap();
        assert_eq!(ids(&unhealthy).len(), 1);
        match server.admin.get("containerevents?nope=1").await {
            Err(Error::Api { status: 422, .. }) => {}
            other => panic!("unknown filter: {other:?}"),
        }
        // Another project's key sees none of them.
        let (_project, other) = server.project("elsewhere").await;
        assert!(ids(&other.get("containerevents").await.unwrap()).is_empty());
        assert!(ids(&other.get("serviceevents").await.unwrap()).is_empty());
        // The schemas describe both.
        let schema = server.admin.get("schemas/containerEvent").await.unwrap();
        assert!(
            schema["collectionMethods"]
                .as_array()
                .unwrap()
                .contains(&json!("POST"))
        );
    }
}

#[tokio::test]
async fn a_removed_agent_loses_its_keys_and_is_deleted_with_its_account() {
    for server in servers(&[("api.auth.cache.millis", "0")]).await {
        let (host_id, agent_client, agent) = server
            .host_with_agent("host-gone", TestAgent::always_ok())
            .await;
        let agent_path = format!("agents/1ag{}", agent.agent_id);
        agent_client.get("containerevents").await.unwrap();
        let credentials_before = server
            .server
            .state
            .store
            .count_rows("credential")
            .await
            .unwrap();

        server
            .admin
            .delete(&format!("hosts/{host_id}"))
            .await
            .unwrap();
        server.admin.delete(&agent_path).await.unwrap();
        wait_state(&server.admin, &agent_path, "removed").await;
        match agent_client.get("containerevents").await {
            Err(Error::Api { status: 401, .. }) => {}
            other => panic!("a removed agent's key must stop working: {other:?}"),
        }

        run_cleanup(&server).await;
        wait_state(&server.admin, &agent_path, "purged").await;
        for table in ["host", "agent"] {
            server
                .sql(&format!(
                    "UPDATE {table} SET removed = removed - {} WHERE removed IS NOT NULL",
                    49 * HOUR_MS
                ))
                .await;
        }
        let report = run_cleanup(&server).await;
        assert_eq!(table(&report, "host")["deleted"], 1, "{report:#}");
        assert_eq!(table(&report, "agent")["deleted"], 1, "{report:#}");
        match server.admin.get(&agent_path).await {
            Err(Error::Api { status: 404, .. }) => {}
            other => panic!("the agent should be deleted: {other:?}"),
        }
        let credentials_after = server
            .server
            .state
            .store
            .count_rows("credential")
            .await
            .unwrap();
        assert_eq!(
            credentials_after,
            credentials_before - 1,
            "the agent's key went with it"
        );
    }
}

#[tokio::test]
async fn a_removed_external_handler_is_purged_then_deleted() {
    for server in servers(&[]).await {
        let handler = server
            .admin
            .post(
                "externalhandlers",
                &json!({"name": "short-lived", "priority": 3000,
                        "processConfigs": [{"name": "instance.start"}]}),
            )
            .await
            .unwrap();
        let id = handler["id"].as_str().unwrap().to_owned();
        let path = format!("externalhandlers/{id}");
        server.admin.delete(&path).await.unwrap();
        wait_state(&server.admin, &path, "removed").await;
        run_cleanup(&server).await;
        wait_state(&server.admin, &path, "purged").await;
        server
            .sql(&format!(
                "UPDATE external_handler SET removed = removed - {} WHERE id = {}",
                49 * HOUR_MS,
                db_id(&id)
            ))
            .await;
        let report = run_cleanup(&server).await;
        assert_eq!(
            table(&report, "external_handler")["deleted"],
            1,
            "{report:#}"
        );
        match server.admin.get(&path).await {
            Err(Error::Api { status: 404, .. }) => {}
            other => panic!("the handler should be deleted: {other:?}"),
        }
    }
}
