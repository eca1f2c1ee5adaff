//! `/metrics` end to end: the real server, a real WebSocket test agent, the real API, and the
//! text exposition fetched over HTTP and parsed. Each test runs on SQLite and, when
//! `DROVER_TEST_POSTGRES_URL` is set, on PostgreSQL.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use drover_test_support::agent::{Answer, Policy, TestAgent};
use drover_test_support::{TestServer, servers, wait_change, wait_for, wait_state};
use serde_json::{Value, json};

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A scrape, parsed.
#[derive(Debug)]
struct Scrape {
    samples: Vec<Sample>,
    types: BTreeMap<String, String>,
    text: String,
}

impl Scrape {
    /// The value of the one sample of `name` with exactly `labels`, if there is one.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let found: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.name == name && s.labels == wanted)
            .map(|s| s.value)
            .collect();
        assert!(found.len() <= 1, "{name} {labels:?} appears twice");
        found.first().copied()
    }

    /// [`Scrape::get`], failing the test when the sample is missing.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("{name} {labels:?} not in:\n{}", self.text))
    }

    /// Every sample of `name`.
    fn all(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }
}

/// Parses the Prometheus text format (the subset any exposition uses: comments, a name,
/// optional `{k="v",…}` with `\\`, `\"`, `\n` escapes, a value).
fn parse(text: &str) -> Scrape {
    let mut samples = Vec::new();
    let mut types = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE line");
            let previous = types.insert(name.to_owned(), kind.to_owned());
            assert!(previous.is_none(), "TYPE of {name} given twice");
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let name = line[..name_end].to_owned();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices().peekable();
            let end = loop {
                let (start, c) = chars.next().expect("unterminated labels");
                if c == '}' {
                    break start;
                }
                if c == ',' {
                    continue;
                }
                let eq = inner[start..].find('=').expect("label =") + start;
                let key = inner[start..eq].to_owned();
                while chars.peek().is_some_and(|(i, _)| *i <= eq + 1) {
                    chars.next();
                }
                let mut value = String::new();
                loop {
                    match chars.next().expect("unterminated value") {
                        (_, '"') => break,
                        (_, '\\') => match chars.next().expect("escape").1 {
                            'n' => value.push('\n'),
                            other => value.push(other),
                        },
                        (_, c) => value.push(c),
                    }
                }
                labels.insert(key, value);
            };
            rest = &inner[end + 1..];
        }
        let value = rest.trim();
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => other
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    Scrape {
        samples,
        types,
        text: text.to_owned(),
    }
}

async fn scrape(server: &TestServer) -> Scrape {
    let response = reqwest::get(format!("{}/metrics", server.url))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    parse(&response.text().await.unwrap())
}

/// Scrapes until `check` finds what it wants (the store's gauges are read at most once a
/// second, so they may lag the API by that much).
async fn scrape_until<T>(
    server: &TestServer,
    what: &str,
    check: impl Fn(&Scrape) -> Option<T>,
) -> T {
    wait_for(what, || async { check(&scrape(server).await) }).await
}

/// Checks one histogram series: cumulative buckets, `+Inf` = `_count`, `count` observations.
fn assert_histogram(scrape: &Scrape, name: &str, labels: &[(&str, &str)], count: f64) {
    assert_eq!(
        scrape.types.get(name).map(String::as_str),
        Some("histogram")
    );
    let wanted: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let buckets: Vec<(f64, f64)> = scrape
        .all(&format!("{name}_bucket"))
        .into_iter()
        .filter(|s| {
            let mut without_le = s.labels.clone();
            without_le.remove("le");
            without_le == wanted
        })
        .map(|s| {
            let le = &s.labels["le"];
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            (bound, s.value)
        })
        .collect();
    assert!(buckets.len() > 5, "{name} {labels:?}: buckets {buckets:?}");
    assert!(
        buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
        "{name} {labels:?}: buckets not cumulative: {buckets:?}"
    );
    let last = buckets.last().unwrap();
    assert_eq!(last.0, f64::INFINITY);
    assert_eq!(last.1, count, "{name} {labels:?}: +Inf bucket");
    assert_eq!(scrape.value(&format!("{name}_count"), labels), count);
    assert!(scrape.value(&format!("{name}_sum"), labels) >= 0.0);
}

fn container(name: &str) -> Value {
    json!({"name": name, "command": ["sleep", "1000"]})
}

#[tokio::test]
async fn a_container_start_and_a_failing_process_are_counted_by_process_and_result() {
    for server in servers(&[("process.max_attempts", "2")]).await {
        let policy: Policy = Arc::new(|request, _| {
            let broken = request
                .data
                .as_ref()
                .and_then(|d| d["instance"]["name"].as_str())
                == Some("broken");
            if request.name() == "compute.instance.activate" && broken {
                Answer::Error("image not found: nope".into())
            } else {
                Answer::Ok
            }
        });
        let (_, _, _agent) = server.host_with_agent("host-1", policy).await;
        let good = server
            .admin
            .post("containers", &container("good"))
            .await
            .unwrap();
        wait_state(
            &server.admin,
            &format!("containers/{}", good["id"].as_str().unwrap()),
            "running",
        )
        .await;
        let broken = server
            .admin
            .post("containers", &container("broken"))
            .await
            .unwrap();
        wait_change(
            &server.admin,
            &format!("containers/{}", broken["id"].as_str().unwrap()),
            "error",
            |c| c["state"] == "error",
        )
        .await;

        let scrape = scrape(&server).await;
        let start = [("process", "instance.start")];
        // Two containers created: each create's pending step is its start (the create itself
        // is applied at once and not run by the engine).
        assert_eq!(scrape.value("drover_process_scheduled_total", &start), 2.0);
        assert_eq!(
            scrape.get(
                "drover_process_scheduled_total",
                &[("process", "instance.create")]
            ),
            None
        );
        assert_eq!(
            scrape.value(
                "drover_process_scheduled_total",
                &[("process", "host.activate")]
            ),
            1.0
        );
        // The good start took one attempt; the broken one two (max_attempts), one a retry.
        assert_eq!(scrape.value("drover_process_attempts_total", &start), 3.0);
        assert_eq!(scrape.value("drover_process_retries_total", &start), 1.0);
        for (result, count) in [
            ("success", 1.0),
            ("failure", 1.0),
            ("chain", 0.0),
            ("canceled", 0.0),
        ] {
            assert_eq!(
                scrape.value(
                    "drover_process_completed_total",
                    &[("process", "instance.start"), ("result", result)]
                ),
                count,
                "{result}"
            );
        }
        assert_eq!(
            scrape
                .types
                .get("drover_process_completed_total")
                .map(String::as_str),
            Some("counter")
        );
        assert_histogram(&scrape, "drover_process_duration_seconds", &start, 2.0);
        assert_histogram(
            &scrape,
            "drover_process_duration_seconds",
            &[("process", "host.activate")],
            1.0,
        );
        // Process names come from the definition table only.
        let names: BTreeSet<&str> = scrape
            .all("drover_process_attempts_total")
            .iter()
            .map(|s| s.labels["process"].as_str())
            .collect();
        assert!(
            names.iter().all(|n| drover_engine::defs::find(n).is_some()),
            "{names:?}"
        );

        // Nothing is left pending.
        let idle = scrape_until(&server, "no unended process", |s| {
            (s.value("drover_process_running", &[]) == 0.0
                && s.value("drover_process_ready", &[]) == 0.0
                && s.value("drover_process_delayed", &[]) == 0.0)
                .then_some(s.value("drover_process_oldest_pending_age_seconds", &[]))
        })
        .await;
        assert_eq!(idle, 0.0);
    }
}

#[tokio::test]
async fn a_process_backing_off_shows_as_delayed_with_the_oldest_pending_age() {
    // A retry waits at least 2 s by default: long enough to see it delayed.
    for server in servers(&[("process.retry_max_wait.millis", "120000")]).await {
        let policy: Policy = Arc::new(|request, _| {
            if request.name() == "compute.instance.activate" {
                Answer::Error("registry unreachable".into())
            } else {
                Answer::Ok
            }
        });
        let (_, _, agent) = server.host_with_agent("host-1", policy).await;
        let stuck = server
            .admin
            .post("containers", &container("stuck"))
            .await
            .unwrap();
        wait_for("the first attempt", || async {
            (agent.requests_named("compute.instance.activate").await >= 1).then_some(())
        })
        .await;
        let age = scrape_until(&server, "one delayed process", |s| {
            (s.value("drover_process_delayed", &[]) == 1.0
                && s.value("drover_process_running", &[]) == 0.0)
                .then(|| s.value("drover_process_oldest_pending_age_seconds", &[]))
        })
        .await;
        assert!(age > 0.0 && age < 600.0, "{age}");
        let scrape = scrape(&server).await;
        assert_eq!(
            scrape.value(
                "drover_process_retries_total",
                &[("process", "instance.start")]
            ),
            1.0
        );
        assert_eq!(
            scrape.value(
                "drover_process_completed_total",
                &[("process", "instance.start"), ("result", "failure")]
            ),
            0.0
        );
        for name in [
            "drover_process_delayed",
            "drover_process_oldest_pending_age_seconds",
            "drover_agents",
            "drover_hosts",
        ] {
            assert_eq!(
                scrape.types.get(name).map(String::as_str),
                Some("gauge"),
                "{name}"
            );
            assert!(
                scrape.text.contains(&format!("# HELP {name} "))
                    && scrape.text.contains("Cluster-wide"),
                "{name}"
            );
        }
        // Removing it cancels the pending start: one canceled, nothing pending.
        server
            .admin
            .delete(&format!("containers/{}", stuck["id"].as_str().unwrap()))
            .await
            .unwrap();
        scrape_until(&server, "the start canceled and nothing pending", |s| {
            (s.value("drover_process_delayed", &[]) == 0.0
                && s.value("drover_process_oldest_pending_age_seconds", &[]) == 0.0)
                .then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn agents_and_hosts_are_counted_by_state_after_an_agent_registers() {
    for server in servers(&[]).await {
        let before = scrape(&server).await;
        assert_eq!(
            before.types.get("drover_agents").map(String::as_str),
            Some("gauge")
        );
        assert_eq!(before.get("drover_agents", &[("state", "active")]), None);
        assert_eq!(before.get("drover_hosts", &[("state", "active")]), None);

        let token = server
            .admin
            .post("registrationtokens", &json!({}))
            .await
            .unwrap();
        let (access, secret) = token["token"].as_str().unwrap().split_once(':').unwrap();
        let registered = server
            .client(access, secret)
            .post("register", &json!({"key": "host-key-1", "name": "box"}))
            .await
            .unwrap();
        let agent_id: i64 = registered["agentId"].as_str().unwrap()[3..]
            .parse()
            .unwrap();
        let agent_client = server.client(
            registered["accessKey"].as_str().unwrap(),
            registered["secretKey"].as_str().unwrap(),
        );
        let _agent = TestAgent::start(agent_client, agent_id, TestAgent::always_ok()).await;
        wait_state(
            &server.admin,
            &format!("hosts/{}", registered["hostId"].as_str().unwrap()),
            "active",
        )
        .await;
        let scrape = scrape_until(&server, "one active agent and host", |s| {
            (s.get("drover_agents", &[("state", "active")]) == Some(1.0)
                && s.get("drover_hosts", &[("state", "active")]) == Some(1.0))
            .then_some(())
        })
        .await;
        let _ = scrape;
        let scrape = self::scrape(&server).await;
        // Every agent and host is in exactly one state.
        let total = |name| scrape.all(name).iter().map(|s| s.value).sum::<f64>();
        assert_eq!(total("drover_agents"), 1.0);
        assert_eq!(total("drover_hosts"), 1.0);
        // The registration scheduled the agent's activation and its host's.
        for process in ["agent.activate", "host.activate"] {
            assert_eq!(
                scrape.value("drover_process_scheduled_total", &[("process", process)]),
                1.0,
                "{process}"
            );
            assert_eq!(
                scrape.value(
                    "drover_process_completed_total",
                    &[("process", process), ("result", "success")]
                ),
                1.0,
                "{process}"
            );
        }
    }
}

#[tokio::test]
async fn http_durations_are_labelled_by_route_template_and_status_class() {
    let server = TestServer::start().await;
    let client = reqwest::Client::new();
    let admin = |request: reqwest::RequestBuilder| {
        request.basic_auth(
            drover_test_support::ADMIN_ACCESS,
            Some(drover_test_support::ADMIN_SECRET),
        )
    };
    // 40 distinct container ids (none exists): one route label.
    for id in 0..40 {
        let response = admin(client.get(format!("{}/v1/containers/1i{}", server.url, 1000 + id)))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404);
    }
    // Distinct projects, and the original's plural: still one label each.
    let project = server.default_project();
    for path in [
        format!("/v1/projects/1a{project}/containers"),
        format!("/v1/projects/1a{project}/containers"),
        "/v1/instances".to_owned(),
        "/v2-beta/containers".to_owned(),
    ] {
        let response = admin(client.get(format!("{}{path}", server.url)))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    // Unknown collections and paths, distinct each time.
    for n in 0..10 {
        let response = admin(client.get(format!("{}/v1/nothing{n}", server.url)))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404);
        let response = admin(client.get(format!("{}/no/such/path/{n}", server.url)))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404);
    }
    let unauthorized = client
        .get(format!("{}/v1/containers", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);

    let scrape = scrape(&server).await;
    let name = "drover_http_request_duration_seconds";
    assert_histogram(
        &scrape,
        name,
        &[("route", "/v1/containers/{id}"), ("status", "4xx")],
        40.0,
    );
    assert_histogram(
        &scrape,
        name,
        &[
            ("route", "/v1/projects/{project}/containers"),
            ("status", "2xx"),
        ],
        2.0,
    );
    // `instances` and `/v2-beta` are the same collection, the same route.
    assert_histogram(
        &scrape,
        name,
        &[("route", "/v1/containers"), ("status", "2xx")],
        2.0,
    );
    assert_histogram(
        &scrape,
        name,
        &[("route", "/v1/containers"), ("status", "4xx")],
        1.0,
    );
    assert_histogram(
        &scrape,
        name,
        &[("route", "/v1/{collection}"), ("status", "4xx")],
        10.0,
    );
    assert_histogram(
        &scrape,
        name,
        &[("route", "unmatched"), ("status", "4xx")],
        10.0,
    );
    // Bounded: no id, project id or unknown path became a label.
    let routes: BTreeSet<&str> = scrape
        .all(&format!("{name}_count"))
        .iter()
        .map(|s| s.labels["route"].as_str())
        .collect();
    assert!(
        routes.iter().all(|r| !r.contains("1i")
            && !r.contains("1a")
            && !r.contains("nothing")
            && !r.contains("no/such")),
        "{routes:?}"
    );
    assert!(routes.len() <= 6, "{routes:?}");
    for sample in scrape.all(&format!("{name}_count")) {
        assert!(
            ["1xx", "2xx", "3xx", "4xx", "5xx"].contains(&sample.labels["status"].as_str()),
            "{sample:?}"
        );
    }

    // The build.
    let build = scrape.all("drover_build_info");
    assert_eq!(build.len(), 1, "{build:?}");
    assert_eq!(build[0].value, 1.0);
    assert_eq!(build[0].labels["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        scrape.types.get("drover_build_info").map(String::as_str),
        Some("gauge")
    );
}
