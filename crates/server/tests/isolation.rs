//! Tenants stay apart: the attacks a second project can try, each on SQLite and, when
//! `DROVER_TEST_POSTGRES_URL` is set, on PostgreSQL. Every test first shows the legitimate path
//! works, so a refusal is the isolation and not a broken setup.

use std::time::Duration;

use drover_client::{Client, Error, Event, Subscribe};
use drover_test_support::agent::{Answer, Policy, TestAgent};
use drover_test_support::{TestServer, poll, servers, wait_state};
use serde_json::{Value, json};

/// A host with an agent in `project`, both active, and the agent's test client started with
/// `policy`; returns the host's id, the running agent and its key's client.
async fn host_in(
    server: &TestServer,
    project: i64,
    name: &str,
    policy: Policy,
) -> (String, TestAgent, Client) {
    let (agent_id, agent_client) = server.agent(project, name).await;
    let host = server
        .admin
        .post(
            &format!("projects/1a{project}/hosts"),
            &json!({"name": name, "agentId": format!("1ag{agent_id}")}),
        )
        .await
        .unwrap();
    let host_id = host["id"].as_str().unwrap().to_owned();
    wait_state(&server.admin, &format!("hosts/{host_id}"), "active").await;
    let agent = TestAgent::start(agent_client.clone(), agent_id, policy).await;
    (host_id, agent, agent_client)
}

fn numeric(id: &str) -> i64 {
    id.trim_start_matches(|c: char| c.is_ascii_digit())
        .trim_start_matches(|c: char| c.is_ascii_alphabetic())
        .parse()
        .unwrap_or_else(|_| panic!("{id} is not an API id"))
}

fn expect_invalid_reference(result: Result<Value, Error>, field: &str) {
    match result {
        Err(Error::Api {
            status: 422,
            code,
            message,
            ..
        }) => {
            assert_eq!(code, "InvalidReference", "{message}");
        }
        other => panic!(
            "a reference to another project's resource in {field} was not refused: {other:?}"
        ),
    }
}

#[tokio::test]
async fn a_project_key_cannot_point_a_resource_at_another_projects_host_or_stack() {
    for server in servers(&[]).await {
        let a = server.default_project();
        let (host_a, agent_a, _) = host_in(&server, a, "host-a", TestAgent::always_ok()).await;
        let stack_a = server
            .admin
            .post("stacks", &json!({"name": "stack-a"}))
            .await
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let (project_b, b) = server.project("b").await;
        // The legitimate path: A's own container lands on A's host.
        let mine = server
            .admin
            .post(
                "containers",
                &json!({"name": "mine", "command": ["sleep", "1"], "requestedHostId": host_a}),
            )
            .await
            .unwrap();
        let mine_path = format!("containers/{}", mine["id"].as_str().unwrap());
        let mine = wait_state(&server.admin, &mine_path, "running").await;
        assert_eq!(mine["hostId"], host_a);

        let attacks = [
            (
                "containers",
                json!({"name": "x", "command": ["sh", "-c", "id"], "requestedHostId": host_a}),
                "requestedHostId",
            ),
            (
                "volumes",
                json!({"name": "x", "requestedHostId": host_a}),
                "requestedHostId",
            ),
            (
                "services",
                json!({"name": "x", "stackId": stack_a}),
                "stackId",
            ),
            (
                "services",
                json!({"name": "x", "launchConfig": {"command": ["id"], "requestedHostId": host_a}}),
                "launchConfig.requestedHostId",
            ),
        ];
        for (collection, body, field) in &attacks {
            expect_invalid_reference(b.post(collection, body).await, field);
            expect_invalid_reference(
                b.post(&format!("projects/{project_b}/{collection}"), body)
                    .await,
                field,
            );
        }
        // Nothing was created in B, and A's agent was asked to start only A's container.
        for collection in ["containers", "volumes", "services"] {
            let list = b.get(collection).await.unwrap();
            assert_eq!(list["data"].as_array().unwrap().len(), 0, "{collection}");
        }
        assert_eq!(agent_a.requests_named("compute.instance.activate").await, 1);
        // Updates and actions resolve references the same way.
        let own = b
            .post(
                "containers",
                &json!({"name": "own", "command": ["sleep", "1"]}),
            )
            .await
            .unwrap();
        let own_path = format!("containers/{}", own["id"].as_str().unwrap());
        expect_invalid_reference(
            b.put(&own_path, &json!({"requestedHostId": host_a})).await,
            "requestedHostId on update",
        );
        expect_invalid_reference(
            b.post(
                &format!("{own_path}?action=start"),
                &json!({"requestedHostId": host_a}),
            )
            .await,
            "requestedHostId in action input",
        );
        // A reference to a resource that does not exist at all reads the same way.
        expect_invalid_reference(
            b.post(
                "containers",
                &json!({"name": "y", "command": ["id"], "requestedHostId": "1h999999"}),
            )
            .await,
            "a missing host",
        );
    }
}

#[tokio::test]
async fn a_forged_scope_suffix_on_a_published_name_reaches_no_other_project() {
    for server in servers(&[]).await {
        let (project_a, a) = server.project("a").await;
        let (_project_b, b) = server.project("b").await;
        let mut a_stream = a
            .subscribe(Subscribe::names(["reply.x", "reply.marker"]))
            .await
            .unwrap();
        a_stream.next_event().await.unwrap().unwrap();
        let mut b_stream = b.subscribe(Subscribe::names(["reply.x"])).await.unwrap();
        b_stream.next_event().await.unwrap().unwrap();

        let forged = Event::new(format!("reply.x;account={}", numeric(&project_a)));
        b.publish(&forged).await.unwrap();
        // B's own subscriber gets it, without any suffix: B published in its own scope.
        let own = tokio::time::timeout(Duration::from_secs(10), b_stream.next_non_ping())
            .await
            .expect("B's subscriber receives B's event")
            .unwrap()
            .unwrap();
        assert_eq!(own.name(), "reply.x");
        // A gets its own marker next, not B's forged event.
        a.publish(&Event::new("reply.marker")).await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(10), a_stream.next_non_ping())
            .await
            .expect("A's marker arrives")
            .unwrap()
            .unwrap();
        assert_eq!(next.name(), "reply.marker", "B's event reached project A");
    }
}

#[tokio::test]
async fn only_the_addressed_agent_or_an_admin_completes_a_call() {
    // Replies wait 30 s, so only the replies this test publishes can end the attempt.
    for server in servers(&[("eventing.timeout.millis", "30000")]).await {
        let a = server.default_project();
        let (host_a, victim, victim_client) = host_in(
            &server,
            a,
            "host-a",
            std::sync::Arc::new(|_, _| Answer::Ignore),
        )
        .await;
        let (_, _neighbour, neighbour_client) =
            host_in(&server, a, "host-a2", TestAgent::always_ok()).await;
        let (project_b, b) = server.project("b").await;
        let (_, b_agent) = server.agent(numeric(&project_b), "host-b").await;

        let container = server
            .admin
            .post(
                "containers",
                &json!({"name": "victim", "command": ["sleep", "100"], "requestedHostId": host_a}),
            )
            .await
            .unwrap();
        let path = format!("containers/{}", container["id"].as_str().unwrap());
        let request = loop {
            let seen = victim.seen.lock().await.clone();
            if let Some(request) = seen
                .into_iter()
                .find(|event| event.name() == "compute.instance.activate")
            {
                break request;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let rejected_before = server.metric("drover_replies_rejected_total");
        let stolen = json!({"instance": {"externalId": "stolen"}});
        for attacker in [&b, &b_agent, &neighbour_client] {
            attacker
                .publish(&request.reply().unwrap().with_data(stolen.clone()))
                .await
                .unwrap();
        }
        assert_eq!(
            server.metric("drover_replies_rejected_total") - rejected_before,
            3.0,
            "each forged reply is dropped and counted"
        );
        let still = server.admin.get(&path).await.unwrap();
        assert_eq!(still["state"], "starting", "{still:#}");
        assert_eq!(still["transitioning"], "yes");

        // The agent the request was addressed to completes it.
        victim_client
            .reply(&request, json!({"instance": {"externalId": "genuine"}}))
            .await
            .unwrap();
        let done = wait_state(&server.admin, &path, "running").await;
        assert_eq!(done["externalId"], "genuine", "{done:#}");

        // An admin key may answer any call too (operators unsticking an agent by hand).
        let second = server
            .admin
            .post(
                "containers",
                &json!({"name": "second", "command": ["sleep", "100"], "requestedHostId": host_a}),
            )
            .await
            .unwrap();
        let second_path = format!("containers/{}", second["id"].as_str().unwrap());
        let second_id = second["id"].as_str().unwrap().to_owned();
        let request = loop {
            let seen = victim.seen.lock().await.clone();
            if let Some(request) = seen.into_iter().find(|event| {
                event.name() == "compute.instance.activate"
                    && event.resource_id.as_deref() == Some(second_id.as_str())
            }) {
                break request;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        server.admin.reply(&request, json!({})).await.unwrap();
        wait_state(&server.admin, &second_path, "running").await;
    }
}

#[tokio::test]
async fn a_request_is_resent_as_soon_as_its_agent_subscribes_again() {
    // With a 60 s reply timeout, only a resend can finish these within the deadlines below.
    for server in servers(&[("eventing.timeout.millis", "60000")]).await {
        let a = server.default_project();
        let (agent_id, agent_client) = server.agent(a, "host-late").await;
        let host = server
            .admin
            .post(
                "hosts",
                &json!({"name": "host-late", "agentId": format!("1ag{agent_id}")}),
            )
            .await
            .unwrap();
        let host_id = host["id"].as_str().unwrap().to_owned();
        wait_state(&server.admin, &format!("hosts/{host_id}"), "active").await;
        let mut calls = server
            .admin
            .subscribe(Subscribe::names(["process.change"]))
            .await
            .unwrap();
        calls.next_event().await.unwrap().unwrap();

        // 1. The request is sent while no socket of the agent is subscribed.
        let first = server
            .admin
            .post(
                "containers",
                &json!({"name": "first", "command": ["sleep", "100"], "requestedHostId": host_id}),
            )
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), calls.next_non_ping())
            .await
            .expect("the engine calls the agent")
            .unwrap()
            .unwrap();
        let resent_before = server.metric("drover_requests_resent_total");
        let started = tokio::time::Instant::now();
        let agent = TestAgent::start(agent_client.clone(), agent_id, TestAgent::always_ok()).await;
        let path = format!("containers/{}", first["id"].as_str().unwrap());
        poll(&server.admin, &path, "running", |c| c["state"] == "running").await;
        eprintln!(
            "resent on subscribe: running {:?} after the agent came",
            started.elapsed()
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the request waited {:?}, not a resend on subscribe",
            started.elapsed()
        );
        assert!(server.metric("drover_requests_resent_total") > resent_before);

        // 2. The agent's socket dies with a request in it; the agent comes back.
        drop(agent);
        let silent = TestAgent::start(
            agent_client.clone(),
            agent_id,
            std::sync::Arc::new(|_, _| Answer::Ignore),
        )
        .await;
        let second = server
            .admin
            .post(
                "containers",
                &json!({"name": "second", "command": ["sleep", "100"], "requestedHostId": host_id}),
            )
            .await
            .unwrap();
        loop {
            if silent.requests_named("compute.instance.activate").await > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(silent);
        let started = tokio::time::Instant::now();
        let _agent = TestAgent::start(agent_client, agent_id, TestAgent::always_ok()).await;
        let path = format!("containers/{}", second["id"].as_str().unwrap());
        poll(&server.admin, &path, "running", |c| c["state"] == "running").await;
        eprintln!(
            "resent on resubscribe: running {:?} after the agent came back",
            started.elapsed()
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the request waited {:?} after the agent came back",
            started.elapsed()
        );
    }
}
