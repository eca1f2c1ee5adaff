//! External handlers end to end: `externalHandler` resources, and extensions subscribed to
//! `<process>;handler=<name>` taking part in processes beside (or instead of) the agent. The
//! real server, a scripted WebSocket agent and extensions that are real WebSocket clients.
//! Each test runs on SQLite and, when `DROVER_TEST_POSTGRES_URL` is set, on PostgreSQL.

use std::sync::{Arc, Mutex};

use drover_client::{Client, Event, Subscribe, Transitioning};
use drover_test_support::agent::TestAgent;
use drover_test_support::{TestServer, next_event, servers, wait_change, wait_for, wait_state};
use serde_json::{Value, json};

/// How an extension answers one request.
#[derive(Debug, Clone)]
enum Reply {
    /// A progress reply, then success with this data.
    Ok(Value),
    /// `transitioning: error` with this message.
    Error(String),
}

/// An extension: a subscriber to `;handler=` names that answers every request as `answer`
/// says and keeps what it received.
struct Extension {
    seen: Arc<Mutex<Vec<Event>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Extension {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Extension {
    async fn start(
        client: Client,
        names: &[&str],
        answer: impl Fn(&Event) -> Reply + Send + Sync + 'static,
    ) -> Extension {
        let mut stream = client
            .subscribe(Subscribe::names(names.iter().copied()))
            .await
            .unwrap();
        let first = stream.next_event().await.unwrap().unwrap();
        assert_eq!(first.name(), "ping");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                while let Ok(Some(request)) = stream.next_non_ping().await {
                    seen.lock().unwrap().push(request.clone());
                    let reply = answer(&request);
                    let client = client.clone();
                    tokio::spawn(async move {
                        match reply {
                            Reply::Ok(data) => {
                                let mut progress = request.reply().unwrap();
                                progress.transitioning = Some(Transitioning::Yes);
                                progress.transitioning_message = Some("extension working".into());
                                client.publish(&progress).await.unwrap();
                                client.reply(&request, data).await.unwrap();
                            }
                            Reply::Error(message) => {
                                let mut reply = request.reply().unwrap();
                                reply.transitioning = Some(Transitioning::Error);
                                reply.transitioning_message = Some(message);
                                client.publish(&reply).await.unwrap();
                            }
                        }
                    });
                }
            })
        };
        Extension { seen, task }
    }

    fn names(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|event| event.name().to_owned())
            .collect()
    }
}

fn container(name: &str) -> Value {
    json!({"name": name, "command": ["sleep", "1000"]})
}

async fn create_container(server: &TestServer, name: &str) -> String {
    let created = server
        .admin
        .post("containers", &container(name))
        .await
        .unwrap();
    format!("containers/{}", created["id"].as_str().unwrap())
}

/// Every process of the container at `path`, oldest first.
async fn processes_of(server: &TestServer, path: &str) -> Value {
    let id = path.rsplit('/').next().unwrap();
    server
        .admin
        .get(&format!(
            "processinstances?resourceType=container&resourceId={id}"
        ))
        .await
        .unwrap()
}

/// The steps the last execution of `process` on `resource` recorded.
async fn steps_of(server: &TestServer, resource: &str, process: &str) -> Vec<Value> {
    let id = resource.rsplit('/').next().unwrap();
    let list = server
        .admin
        .get(&format!(
            "processinstances?resourceType=container&resourceId={id}&processName={process}"
        ))
        .await
        .unwrap();
    let instance = list["data"].as_array().unwrap().last().unwrap().clone();
    let executions = server
        .admin
        .get(&format!(
            "processexecutions?processInstanceId={}",
            instance["id"].as_str().unwrap()
        ))
        .await
        .unwrap();
    let last = executions["data"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    last["log"]["steps"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn schemas_list_external_handlers_and_bad_bodies_change_nothing() {
    for server in servers(&[]).await {
        let schemas = server.admin.get("schemas").await.unwrap();
        let ids: Vec<&str> = schemas["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|schema| schema["id"].as_str())
            .collect();
        assert!(ids.contains(&"externalHandler"), "{ids:?}");
        assert!(ids.contains(&"externalHandlerProcessConfig"), "{ids:?}");
        let schema = server.admin.get("schemas/externalhandler").await.unwrap();
        for field in ["processConfigs", "priority", "retries", "timeoutMillis"] {
            assert_eq!(schema["resourceFields"][field]["create"], true, "{field}");
        }
        for bad in [
            json!({"name": "h", "processConfigs": [{"name": "instance.nothing"}]}),
            json!({"name": "h", "processConfigs": [{"name": "instance.start", "onError": "host.remove"}]}),
            json!({"name": "h", "processConfigs": [{"name": "external_handler.activate"}]}),
            json!({"name": "h"}),
            json!({"name": "h", "processConfigs": []}),
            json!({"name": "", "processConfigs": [{"name": "instance.start"}]}),
            json!({"name": "a;account=2", "processConfigs": [{"name": "instance.start"}]}),
            json!({"name": "h", "processConfigs": [{"name": "instance.start"}], "retries": 99}),
            json!({"name": "h", "processConfigs": [{"name": "instance.start"}], "timeoutMillis": 0}),
            json!({"name": "h", "processConfigs": "instance.start"}),
            json!({"name": "h", "processConfigs": [{"name": "instance.start", "onError": "instance.start"}]}),
            json!({"name": "h", "processConfigs": [{"name": "instance.remove", "onError": "instance.stop"}]}),
            json!({"name": "h", "processConfigs": [{"name": "instance.stop", "onError": "instance.purge"}]}),
        ] {
            let error = server
                .admin
                .post("externalhandlers", &bad)
                .await
                .expect_err(&bad.to_string());
            let drover_client::Error::Api {
                status, message, ..
            } = error
            else {
                panic!("{bad}: {error:?}");
            };
            assert_eq!(status, 422, "{bad}: {message}");
        }
        let list = server.admin.get("externalhandlers").await.unwrap();
        assert_eq!(list["data"].as_array().unwrap().len(), 0, "{list:#}");
        // The older clients' `processNames` are taken as configs without onError.
        let created = server
            .admin
            .post(
                "externalhandlers",
                &json!({"name": "old-style", "processNames": ["instance.start", "post.instance.stop"], "priority": 3000}),
            )
            .await
            .unwrap();
        assert_eq!(created["state"], "active", "{created:#}");
        assert_eq!(
            created["processConfigs"],
            json!([{"name": "instance.start", "onError": null}, {"name": "post.instance.stop", "onError": null}])
        );
        assert_eq!(created["global"], true);
        let found = server
            .admin
            .get("externalhandlers?name=old-style&state=active")
            .await
            .unwrap();
        assert_eq!(found["data"].as_array().unwrap().len(), 1);
        // A global handler belongs to no project: a key of the Default project (where the
        // admin's unscoped requests act) neither sees nor changes it.
        let key = server
            .admin
            .post(
                &format!("projects/1a{}/apikeys", server.default_project()),
                &json!({}),
            )
            .await
            .unwrap();
        let default_key = server.client(
            key["publicValue"].as_str().unwrap(),
            key["secretValue"].as_str().unwrap(),
        );
        let theirs = default_key.get("externalhandlers").await.unwrap();
        assert_eq!(theirs["data"].as_array().unwrap().len(), 0, "{theirs:#}");
        let id = created["id"].as_str().unwrap();
        for attempt in [
            default_key.get(&format!("externalhandlers/{id}")).await,
            default_key
                .post(
                    &format!("externalhandlers/{id}?action=deactivate"),
                    &json!({}),
                )
                .await,
            default_key
                .put(&format!("externalhandlers/{id}"), &json!({"priority": 1}))
                .await,
        ] {
            let error = attempt.expect_err("a project key reaches no global handler");
            assert!(
                matches!(error, drover_client::Error::Api { status: 404, .. }),
                "{error:?}"
            );
        }
        let still = server
            .admin
            .get(&format!("externalhandlers/{id}"))
            .await
            .unwrap();
        assert_eq!(still["state"], "active");
        assert_eq!(still["priority"], 3000);
    }
}

#[tokio::test]
async fn a_handler_below_2000_replaces_the_agent_and_deactivating_it_restores_the_agent_at_once() {
    for server in servers(&[]).await {
        let (_, _, agent) = server.host_with_agent("h", TestAgent::always_ok()).await;
        let extension = Extension::start(
            server.admin.clone(),
            &["instance.start;handler=machine"],
            |request| {
                let name = request.data.as_ref().unwrap()["instance"]["name"].clone();
                Reply::Ok(json!({"instance": {"handledBy": "machine", "sawName": name}}))
            },
        )
        .await;
        let handler = server
            .admin
            .post(
                "externalhandlers",
                &json!({"name": "machine", "priority": 100,
                        "processConfigs": [{"name": "instance.start"}]}),
            )
            .await
            .unwrap();
        assert_eq!(handler["type"], "externalHandler");
        assert_eq!(handler["state"], "active");
        let handler_path = format!("externalhandlers/{}", handler["id"].as_str().unwrap());

        let path = create_container(&server, "replaced").await;
        let running = wait_state(&server.admin, &path, "running").await;
        assert_eq!(running["handledBy"], "machine", "{running:#}");
        assert_eq!(running["sawName"], "replaced", "{running:#}");
        assert_eq!(agent.requests_named("compute.instance.activate").await, 0);
        assert_eq!(extension.names(), ["instance.start;handler=machine"]);
        let steps = steps_of(&server, &path, "instance.start").await;
        assert_eq!(steps.len(), 1, "{steps:#?}");
        assert_eq!(steps[0]["phase"], "handler");
        assert_eq!(steps[0]["handler"], "machine");
        assert_eq!(steps[0]["result"], "ok");

        // Deactivated, the handler is out of the next process at once: no wait, no cache.
        let inactive = server
            .admin
            .post(&format!("{handler_path}?action=deactivate"), &json!({}))
            .await
            .unwrap();
        assert_eq!(inactive["state"], "inactive");
        let path = create_container(&server, "built-in").await;
        let running = wait_state(&server.admin, &path, "running").await;
        assert!(running.get("handledBy").is_none(), "{running:#}");
        assert_eq!(agent.requests_named("compute.instance.activate").await, 1);
        assert_eq!(extension.names().len(), 1);

        // Active again, it takes over again; removed, it is gone for good.
        server
            .admin
            .post(&format!("{handler_path}?action=activate"), &json!({}))
            .await
            .unwrap();
        let path = create_container(&server, "again").await;
        let running = wait_state(&server.admin, &path, "running").await;
        assert_eq!(running["handledBy"], "machine");
        server.admin.delete(&handler_path).await.unwrap();
        wait_state(&server.admin, &handler_path, "removed").await;
        let path = create_container(&server, "after-remove").await;
        wait_state(&server.admin, &path, "running").await;
        assert_eq!(agent.requests_named("compute.instance.activate").await, 2);
        assert_eq!(extension.names().len(), 2);
    }
}

#[tokio::test]
async fn a_pre_listener_runs_before_the_agent_and_a_post_listener_after() {
    for server in servers(&[]).await {
        let (_, _, agent) = server.host_with_agent("h", TestAgent::always_ok()).await;
        let agent = Arc::new(agent);
        let (pre_saw, post_saw) = (Arc::new(Mutex::new(None)), Arc::new(Mutex::new(None)));
        let seen = agent.seen.clone();
        let count = |seen: &Arc<tokio::sync::Mutex<Vec<Event>>>| {
            seen.try_lock()
                .map(|seen| {
                    seen.iter()
                        .filter(|e| e.name() == "compute.instance.activate")
                        .count()
                })
                .unwrap_or(usize::MAX)
        };
        let listener = {
            let (pre_saw, post_saw) = (pre_saw.clone(), post_saw.clone());
            Extension::start(
                server.admin.clone(),
                &[
                    "pre.instance.start;handler=audit",
                    "post.instance.start;handler=audit",
                ],
                move |request| {
                    let activations = count(&seen);
                    if request.name().starts_with("pre.") {
                        *pre_saw.lock().unwrap() = Some(activations);
                        Reply::Ok(json!({"approvedBy": "audit"}))
                    } else {
                        *post_saw.lock().unwrap() =
                            Some((activations, request.data.clone().unwrap()));
                        Reply::Ok(json!({"audited": true}))
                    }
                },
            )
            .await
        };
        server
            .admin
            .post(
                "externalhandlers",
                &json!({"name": "audit", "priority": 10,
                        "processConfigs": [{"name": "pre.instance.start"}, {"name": "post.instance.start"}]}),
            )
            .await
            .unwrap();
        let path = create_container(&server, "audited").await;
        let running = wait_state(&server.admin, &path, "running").await;
        assert_eq!(running["approvedBy"], "audit");
        assert_eq!(running["audited"], true);
        // The pre-listener ran before the agent was called, and what it answered reached the
        // agent's request; the post-listener ran after the agent answered and saw its data.
        assert_eq!(*pre_saw.lock().unwrap(), Some(0));
        let requests = agent.seen.lock().await.clone();
        let activate = requests
            .iter()
            .find(|e| e.name() == "compute.instance.activate")
            .unwrap();
        assert_eq!(
            activate.data.as_ref().unwrap()["instance"]["approvedBy"],
            "audit"
        );
        let (activations, post_data) = post_saw.lock().unwrap().clone().unwrap();
        assert_eq!(activations, 1);
        assert_eq!(post_data["instance"]["approvedBy"], "audit");
        assert!(
            post_data["instance"]["externalId"]
                .as_str()
                .unwrap()
                .starts_with("pid-"),
            "{post_data:#}"
        );
        assert_eq!(
            listener.names(),
            [
                "pre.instance.start;handler=audit",
                "post.instance.start;handler=audit"
            ]
        );
        let steps = steps_of(&server, &path, "instance.start").await;
        let phases: Vec<&str> = steps
            .iter()
            .map(|step| step["phase"].as_str().unwrap_or("handler"))
            .collect();
        assert_eq!(phases, ["pre", "handler", "post"], "{steps:#?}");
    }
}

#[tokio::test]
async fn an_error_reply_with_on_error_leaves_the_container_stopped() {
    for server in servers(&[]).await {
        let (_, _, agent) = server.host_with_agent("h", TestAgent::always_ok()).await;
        let _extension = Extension::start(
            server.admin.clone(),
            &["instance.start;handler=gate"],
            |_| Reply::Error("quota exceeded".into()),
        )
        .await;
        server
            .admin
            .post(
                "externalhandlers",
                &json!({"name": "gate", "priority": 50,
                        "processConfigs": [{"name": "instance.start", "onError": "instance.stop"}]}),
            )
            .await
            .unwrap();
        let path = create_container(&server, "refused").await;
        let stopped = wait_state(&server.admin, &path, "stopped").await;
        assert_eq!(stopped["transitioning"], "no", "{stopped:#}");
        assert_eq!(agent.requests_named("compute.instance.activate").await, 0);
        let processes = processes_of(&server, &path).await;
        let rows: Vec<(String, String, String)> = processes["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["processName"].as_str().unwrap().to_owned(),
                    p["result"].as_str().unwrap_or("").to_owned(),
                    p["exitReason"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                ("instance.create".into(), "SUCCESS".into(), "DONE".into()),
                ("instance.start".into(), "FAILURE".into(), "CHAIN".into()),
                ("instance.stop".into(), "SUCCESS".into(), "DONE".into()),
            ],
            "{processes:#}"
        );
        let steps = steps_of(&server, &path, "instance.start").await;
        assert!(
            steps
                .iter()
                .any(|s| s["result"] == "error" && s["handler"] == "gate"),
            "{steps:#?}"
        );
        // Without onError, an error reply is a failed attempt, retried like an agent's.
        server
            .admin
            .put(
                &format!(
                    "externalhandlers/{}",
                    server
                        .admin
                        .get("externalhandlers?name=gate")
                        .await
                        .unwrap()["data"][0]["id"]
                        .as_str()
                        .unwrap()
                ),
                &json!({"processConfigs": [{"name": "instance.start"}]}),
            )
            .await
            .unwrap();
        let path = create_container(&server, "retried").await;
        let retried = wait_for("a failed attempt of instance.start", || {
            let admin = server.admin.clone();
            let path = path.clone();
            async move {
                let resource = admin.get(&path).await.ok()?;
                (resource["transitioning"] == "error").then_some(resource)
            }
        })
        .await;
        assert_eq!(retried["state"], "starting");
        assert!(
            retried["transitioningMessage"]
                .as_str()
                .unwrap()
                .contains("quota exceeded"),
            "{retried:#}"
        );
    }
}

#[tokio::test]
async fn a_projects_extension_never_receives_another_projects_handler_events() {
    for server in servers(&[]).await {
        let (a, key_a) = server.project("a").await;
        let (b, key_b) = server.project("b").await;
        // Each project registers a handler of the same name for container creation, and its
        // extension subscribes with its own key.
        let mut streams = Vec::new();
        for key in [&key_a, &key_b] {
            key.post(
                "externalhandlers",
                &json!({"name": "namer", "processConfigs": [{"name": "instance.create"}]}),
            )
            .await
            .unwrap();
            let mut stream = key
                .subscribe(Subscribe::names(["instance.create;handler=namer"]))
                .await
                .unwrap();
            let first = stream.next_event().await.unwrap().unwrap();
            assert_eq!(first.name(), "ping");
            streams.push(stream);
        }
        // An admin's raw subscription to the same name receives project handlers' calls too
        // never: they are addressed to the project.
        let mut admin_stream = server
            .admin
            .subscribe(Subscribe::names(["instance.create;handler=namer"]))
            .await
            .unwrap();
        let first = admin_stream.next_event().await.unwrap().unwrap();
        assert_eq!(first.name(), "ping");
        let in_a = key_a
            .post(
                "containers",
                &json!({"name": "in-a", "command": ["true"], "startOnCreate": false}),
            )
            .await
            .unwrap();
        let request = next_event(&mut streams[0]).await;
        assert_eq!(request.name(), "instance.create;handler=namer");
        assert_eq!(request.resource_id.as_deref(), in_a["id"].as_str());
        key_a
            .reply(&request, json!({"instance": {"namedBy": "a"}}))
            .await
            .unwrap();
        let path = format!("projects/{a}/containers/{}", in_a["id"].as_str().unwrap());
        let stopped = wait_state(&server.admin, &path, "stopped").await;
        assert_eq!(stopped["namedBy"], "a");
        // B's extension cannot answer A's call either.
        let in_b = key_b
            .post(
                "containers",
                &json!({"name": "in-b", "command": ["true"], "startOnCreate": false}),
            )
            .await
            .unwrap();
        let request = next_event(&mut streams[1]).await;
        assert_eq!(request.resource_id.as_deref(), in_b["id"].as_str());
        key_b.reply(&request, json!({})).await.unwrap();
        wait_state(
            &server.admin,
            &format!("projects/{b}/containers/{}", in_b["id"].as_str().unwrap()),
            "stopped",
        )
        .await;
        // Neither extension nor the admin saw anything else.
        for stream in streams.iter_mut().chain([&mut admin_stream]) {
            let extra = tokio::time::timeout(
                std::time::Duration::from_millis(300),
                stream.next_non_ping(),
            )
            .await;
            assert!(extra.is_err(), "unexpected event: {extra:?}");
        }
    }
}

#[tokio::test]
async fn on_error_chains_end_and_a_remove_always_goes_through() {
    for server in servers(&[]).await {
        let (_, _, agent) = server.host_with_agent("h", TestAgent::always_ok()).await;
        // Two handlers whose errors chain into each other: start → stop → start → stop.
        let _extension = Extension::start(
            server.admin.clone(),
            &[
                "instance.start;handler=flip",
                "instance.stop;handler=flop",
                "instance.remove;handler=keeper",
            ],
            |request| Reply::Error(format!("{} says no", request.name())),
        )
        .await;
        for (name, process, on_error) in [
            ("flip", "instance.start", json!("instance.stop")),
            ("flop", "instance.stop", json!("instance.start")),
            ("keeper", "instance.remove", json!(null)),
        ] {
            server
                .admin
                .post(
                    "externalhandlers",
                    &json!({"name": name, "priority": 10,
                            "processConfigs": [{"name": process, "onError": on_error}]}),
                )
                .await
                .unwrap();
        }
        let path = create_container(&server, "ping-pong").await;
        let errored = wait_change(&server.admin, &path, "the chain failed", |c| {
            c["state"] == "error"
        })
        .await;
        assert!(
            errored["transitioningMessage"]
                .as_str()
                .unwrap()
                .contains("onError processes ran in a row"),
            "{errored:#}"
        );
        let processes = processes_of(&server, &path).await;
        let names: Vec<&str> = processes["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["processName"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "instance.create",
                "instance.start",
                "instance.stop",
                "instance.start",
                "instance.stop"
            ],
            "{processes:#}"
        );
        // The remove's handler refuses too, yet the container is removed: it is passed over
        // and the agent is asked.
        server.admin.delete(&path).await.unwrap();
        wait_state(&server.admin, &path, "removed").await;
        assert_eq!(agent.requests_named("compute.instance.remove").await, 1);
        let steps = steps_of(&server, &path, "instance.remove").await;
        assert!(
            steps.iter().any(|step| step["passedOver"] == "keeper"),
            "{steps:#?}"
        );
    }
}
