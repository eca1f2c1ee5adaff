//! The user commands as a user runs them: the real `drover` binary as a child process against
//! a real server (in this process, on SQLite): output formats, inspect, the noun commands,
//! selectors, paging, `--watch`, `events`, completions, help and errors.

use std::process::{Output, Stdio};
use std::time::Duration;

use drover_test_support::{ADMIN_ACCESS, ADMIN_SECRET, TestServer, within};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_drover");

/// `drover` with the server's URL and the admin key in the environment.
fn drover(server: &TestServer, args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env("CATTLE_URL", &server.url)
        .env("CATTLE_ACCESS_KEY", ADMIN_ACCESS)
        .env("CATTLE_SECRET_KEY", ADMIN_SECRET)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Runs it to its end (bounded) and returns its output.
async fn output(mut command: Command) -> Output {
    within("a drover command", command.output()).await.unwrap()
}

/// Runs it, asserts it succeeded, returns its stdout.
async fn ok(server: &TestServer, args: &[&str]) -> String {
    let out = output(drover(server, args)).await;
    assert!(
        out.status.success(),
        "drover {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs it with `-o json` (before a `--`) and parses stdout.
async fn json_of(server: &TestServer, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    let at = args
        .iter()
        .position(|arg| *arg == "--")
        .unwrap_or(args.len());
    args.splice(at..at, ["-o", "json"]);
    let stdout = ok(server, &args).await;
    serde_json::from_str(&stdout).unwrap_or_else(|error| panic!("{error}: {stdout}"))
}

fn ids(collection: &Value) -> Vec<String> {
    let mut ids: Vec<String> = collection["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

async fn container(server: &TestServer, name: &str, labels: Value) -> String {
    let created = server
        .admin
        .post(
            "containers",
            &json!({"name": name, "command": ["sleep", "600"], "labels": labels}),
        )
        .await
        .unwrap();
    created["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn lists_print_table_wide_json_and_yaml_with_long_cells_cut_and_no_raw_control_characters() {
    let server = TestServer::start().await;
    let long_name = format!("a-very-long-name-{}", "x".repeat(60));
    let evil = format!("line1\nline2\t\u{1b}[31mred{}", "y".repeat(200));
    let first = container(&server, &long_name, json!({"note": evil})).await;
    let second = container(&server, "short", json!({})).await;

    let table = ok(&server, &["ps"]).await;
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["ID", "NAME", "STATE", "HOST", "COMMAND", "CREATED"]
    );
    assert!(!table.contains(&long_name), "the long name is cut: {table}");
    assert!(table.contains("a-very-long-name-xxxx"), "{table}");
    assert!(table.contains('…'), "{table}");
    assert_eq!(table.lines().count(), 3, "{table}");

    let wide = ok(&server, &["ps", "-o", "wide"]).await;
    let wide_header = wide.lines().next().unwrap();
    assert!(
        wide_header.contains("LABELS") && wide_header.contains("MESSAGE"),
        "{wide_header}"
    );
    assert!(wide_header.split_whitespace().count() > header.len());
    // The label's newline, tab and escape are shown escaped, on the container's own line.
    assert_eq!(wide.lines().count(), 3, "{wide}");
    assert!(!wide.contains('\u{1b}') && !wide.contains('\t'), "{wide:?}");
    assert!(wide.contains("line1\\nline2\\t\\u{1b}[31mred"), "{wide}");

    let json: Value = serde_json::from_str(&ok(&server, &["ps", "-o", "json"]).await).unwrap();
    assert_eq!(ids(&json), {
        let mut both = vec![first.clone(), second.clone()];
        both.sort();
        both
    });
    // `--json` is `-o json`, the whole resource, the long name whole.
    let same: Value = serde_json::from_str(&ok(&server, &["ps", "--json"]).await).unwrap();
    assert_eq!(ids(&same), ids(&json));
    assert!(json.to_string().contains(&long_name));

    let yaml = ok(&server, &["ps", "-o", "yaml"]).await;
    let parsed: Value = serde_saphyr::from_str(&yaml).unwrap_or_else(|e| panic!("{e}: {yaml}"));
    assert_eq!(ids(&parsed), ids(&json));
    let row = parsed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["id"] == first.as_str())
        .unwrap();
    assert_eq!(
        row["labels"]["note"],
        evil.as_str(),
        "YAML keeps the value exact"
    );

    // publish, stop/start/rm take --json like every command.
    let published: Value = serde_json::from_str(
        &ok(
            &server,
            &["publish", "hello.world", "--data", "{\"a\":1}", "--json"],
        )
        .await,
    )
    .unwrap();
    assert_eq!(published["name"], "hello.world");
    assert_eq!(published["data"]["a"], 1);
    let stopped: Value =
        serde_json::from_str(&ok(&server, &["rm", "short", "--json"]).await).unwrap();
    assert_eq!(stopped["id"], second.as_str());
    assert_eq!(stopped["type"], "container");
}

#[tokio::test]
async fn inspect_shows_a_resource_by_name_or_typed_id_with_its_processes() {
    let server = TestServer::start().await;
    let id = container(&server, "inspected", json!({})).await;

    let by_name = json_of(&server, &["inspect", "inspected"]).await;
    assert_eq!(by_name["resource"]["id"], id.as_str());
    assert_eq!(by_name["resource"]["type"], "container");
    let processes = by_name["processes"].as_array().unwrap();
    assert!(
        processes
            .iter()
            .any(|p| p["processName"] == "instance.create" && p["resourceId"] == id.as_str()),
        "{by_name:#}"
    );
    assert!(processes.iter().all(|p| p["resourceId"] == id.as_str()));

    let yaml = ok(&server, &["inspect", &id, "-o", "yaml"]).await;
    let by_id: Value = serde_saphyr::from_str(&yaml).unwrap();
    assert_eq!(by_id["resource"]["name"], "inspected");

    let stack = server
        .admin
        .post("stacks", &json!({"name": "shop"}))
        .await
        .unwrap();
    let stack_id = stack["id"].as_str().unwrap();
    let human = ok(&server, &["inspect", stack_id]).await;
    assert!(human.contains("name: shop"), "{human}");
    assert!(human.contains("latest processes"), "{human}");
    assert!(human.contains("stack.create"), "{human}");
    let by_stack_name = json_of(&server, &["inspect", "shop"]).await;
    assert_eq!(by_stack_name["resource"]["id"], stack_id);

    let missing = output(drover(&server, &["inspect", "nothing-named-so"])).await;
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no container or service"), "{stderr}");
}

#[tokio::test]
async fn volumes_stacks_services_projects_settings_and_keys_have_their_commands() {
    let server = TestServer::start().await;

    // Volumes.
    let volume = json_of(&server, &["volumes", "create", "data"]).await;
    let volume_id = volume["id"].as_str().unwrap().to_owned();
    assert_eq!(volume["name"], "data");
    assert_eq!(
        ids(&json_of(&server, &["volumes", "ls"]).await),
        [volume_id.as_str()]
    );
    let removed = json_of(&server, &["volume", "rm", "data"]).await;
    assert_eq!(removed["id"], volume_id.as_str());
    assert!(
        ["removing", "removed"].contains(&removed["state"].as_str().unwrap()),
        "{removed}"
    );

    // Stacks and services.
    let stack = json_of(&server, &["stacks", "create", "shop"]).await;
    let stack_id = stack["id"].as_str().unwrap().to_owned();
    let service = json_of(
        &server,
        &[
            "services", "create", "web", "--stack", "shop", "--scale", "2", "-l", "tier=web", "--",
            "sleep", "600",
        ],
    )
    .await;
    let service_id = service["id"].as_str().unwrap().to_owned();
    assert_eq!(service["stackId"], stack_id.as_str());
    assert_eq!(service["scale"], 2);
    let scaled = json_of(&server, &["service", "scale", "web", "3"]).await;
    assert_eq!(scaled["scale"], 3);
    let stored = server
        .admin
        .get(&format!("services/{service_id}"))
        .await
        .unwrap();
    assert_eq!(stored["scale"], 3);
    let table = ok(&server, &["services", "ls"]).await;
    assert!(table.starts_with("ID"), "{table}");
    assert!(
        table.contains("web") && table.contains(&stack_id),
        "{table}"
    );
    let refused = output(drover(&server, &["services", "scale", "web", "5000"])).await;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("MaxLimitExceeded"),
        "{refused:?}"
    );
    let deactivated = json_of(&server, &["services", "deactivate", &service_id]).await;
    assert_eq!(deactivated["id"], service_id.as_str());
    assert_eq!(
        ids(&json_of(&server, &["stacks", "ls"]).await),
        [stack_id.as_str()]
    );
    ok(&server, &["services", "rm", "web"]).await;
    ok(&server, &["stacks", "rm", "shop"]).await;

    // Projects.
    let project = json_of(&server, &["projects", "create", "team-b"]).await;
    let listed = json_of(&server, &["projects", "ls"]).await;
    assert!(ids(&listed).contains(&project["id"].as_str().unwrap().to_owned()));

    // Settings.
    assert_eq!(
        ok(&server, &["settings", "set", "process.max_attempts", "7"])
            .await
            .trim(),
        "7"
    );
    assert_eq!(
        ok(&server, &["settings", "get", "process.max_attempts"])
            .await
            .trim(),
        "7"
    );
    let setting = json_of(&server, &["setting", "get", "process.max_attempts"]).await;
    assert_eq!(setting["source"], "Database");
    let listed = json_of(&server, &["settings", "ls", "--field", "source=Database"]).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{listed:#}");
    let unset = json_of(&server, &["settings", "unset", "process.max_attempts"]).await;
    assert_ne!(unset["source"], "Database");

    // Keys: made, listed, removed; a removed key no longer works.
    let key = json_of(&server, &["keys", "create", "--name", "ci-key"]).await;
    let access = key["publicValue"].as_str().unwrap().to_owned();
    let secret = key["secretValue"].as_str().unwrap().to_owned();
    let listed = ok(&server, &["keys", "ls"]).await;
    assert!(
        listed.contains("ci-key") && listed.contains(&access),
        "{listed}"
    );
    let mut with_key = drover(&server, &["ps"]);
    with_key
        .env("CATTLE_ACCESS_KEY", &access)
        .env("CATTLE_SECRET_KEY", &secret);
    assert!(output(with_key).await.status.success());
    ok(&server, &["keys", "rm", "ci-key"]).await;
    let mut with_key = drover(&server, &["ps"]);
    with_key
        .env("CATTLE_ACCESS_KEY", &access)
        .env("CATTLE_SECRET_KEY", &secret);
    let refused = output(with_key).await;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("refused the key"), "{stderr}");
}

#[tokio::test]
async fn selectors_map_onto_filters_and_labels() {
    let server = TestServer::start().await;
    let web_1 = container(&server, "web-1", json!({"tier": "web"})).await;
    let web_2 = container(&server, "web-2", json!({"tier": "web"})).await;
    let db = container(&server, "db-1", json!({"tier": "db", "disk": "ssd"})).await;

    let web = json_of(&server, &["ps", "-l", "tier=web"]).await;
    assert_eq!(ids(&web), {
        let mut both = vec![web_1.clone(), web_2.clone()];
        both.sort();
        both
    });
    assert_eq!(
        ids(&json_of(&server, &["ps", "-l", "disk"]).await),
        [db.as_str()]
    );
    assert_eq!(
        ids(&json_of(&server, &["ps", "-l", "tier!=web"]).await),
        [db.as_str()]
    );
    assert_eq!(
        ids(&json_of(&server, &["ps", "--field", "name=web-2"]).await),
        [web_2.as_str()]
    );
    assert_eq!(
        ids(&json_of(
            &server,
            &["ps", "--field-selector", "name!=web-2", "-l", "tier=web"]
        )
        .await),
        [web_1.as_str()]
    );
    let none = json_of(&server, &["ps", "--field", "state=running"]).await;
    assert_eq!(ids(&none), Vec::<String>::new());

    let by_name = json_of(
        &server,
        &[
            "processes",
            "--state",
            "done",
            "--field",
            "processName=instance.create",
        ],
    )
    .await;
    assert_eq!(by_name["data"].as_array().unwrap().len(), 3, "{by_name:#}");
    let of_one = json_of(
        &server,
        &["processes", "--state", "done", "--resource", &db],
    )
    .await;
    assert!(
        of_one["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["resourceId"] == db.as_str() && p["resourceType"] == "container"),
        "{of_one:#}"
    );

    let by_resource_name = json_of(
        &server,
        &["processes", "--state", "done", "--resource", "db-1"],
    )
    .await;
    assert_eq!(by_resource_name["data"], of_one["data"]);
    assert!(!of_one["data"].as_array().unwrap().is_empty());

    let bad = output(drover(&server, &["ps", "--field", "color=red"])).await;
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("not a filter of container"), "{stderr}");
}

#[tokio::test]
async fn limit_pages_past_the_apis_hundred_and_says_when_there_are_more() {
    let server = TestServer::start().await;
    for index in 0..130 {
        container(&server, &format!("c-{index}"), json!({})).await;
    }
    // Each create made a done instance.create process: 130 of them, more than a page.
    let all = json_of(
        &server,
        &[
            "processes",
            "--state",
            "done",
            "--name",
            "instance.create",
            "--limit",
            "0",
        ],
    )
    .await;
    assert_eq!(all["data"].as_array().unwrap().len(), 130);
    // The same in pages of 50, through the API's `pagination.next` links.
    let paged = json_of(
        &server,
        &[
            "processes",
            "--state",
            "done",
            "--name",
            "instance.create",
            "--limit",
            "0",
            "--chunk-size",
            "50",
        ],
    )
    .await;
    assert_eq!(ids(&paged), ids(&all));
    let paged_ps = json_of(&server, &["ps", "--chunk-size", "40", "--limit", "100"]).await;
    assert_eq!(paged_ps["data"].as_array().unwrap().len(), 100);
    assert_eq!(paged_ps["pagination"]["partial"], true);
    let out = output(drover(
        &server,
        &[
            "processes",
            "--state",
            "done",
            "--name",
            "instance.create",
            "--limit",
            "120",
        ],
    ))
    .await;
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().count(),
        121,
        "a header and 120 rows: {stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("there are more"), "{stderr}");
    let few = json_of(&server, &["ps", "--limit", "7"]).await;
    assert_eq!(few["data"].as_array().unwrap().len(), 7);
    assert_eq!(few["pagination"]["partial"], true);
    let whole = json_of(&server, &["ps"]).await;
    assert_eq!(whole["data"].as_array().unwrap().len(), 130);
    assert_eq!(whole["pagination"]["partial"], false);
}

/// Reads lines of a child's stdout until one satisfies `done` (bounded).
async fn line_until(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> String {
    within(what, async {
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("stdout ended before {what}"));
            if done(&line) {
                return line;
            }
        }
    })
    .await
}

#[tokio::test]
async fn watch_prints_a_change_that_happens_after_it_started() {
    let server = TestServer::start_with(&[("resource.change.interval.millis", "20")]).await;
    container(&server, "before", json!({})).await;
    let mut watch = drover(&server, &["ps", "--watch"]);
    watch.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = watch.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // The header comes after the subscription, and the list with it.
    line_until(&mut lines, "the header", |line| line.starts_with("ID")).await;
    line_until(&mut lines, "the listed container", |line| {
        line.contains("before")
    })
    .await;
    let late = container(&server, "late", json!({})).await;
    let line = line_until(&mut lines, "the new container's line", |line| {
        line.contains("late")
    })
    .await;
    assert!(line.starts_with(&late), "{line}");

    // JSON: one line per change.
    let mut watch = drover(&server, &["services", "ls", "-w", "-o", "json"]);
    watch.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child_json = watch.spawn().unwrap();
    let mut lines = BufReader::new(child_json.stdout.take().unwrap()).lines();
    let first = line_until(&mut lines, "the list", |_| true).await;
    assert_eq!(
        serde_json::from_str::<Value>(&first).unwrap()["data"],
        json!([])
    );
    server
        .admin
        .post(
            "services",
            &json!({"name": "watched", "scale": 0, "launchConfig": {"command": ["sleep", "1"]}}),
        )
        .await
        .unwrap();
    let line = line_until(&mut lines, "the service's change", |line| {
        line.contains("watched")
    })
    .await;
    let change: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(change["type"], "service");
    let _ = child.kill().await;
    let _ = child_json.kill().await;
}

#[tokio::test]
async fn events_prints_one_readable_line_per_event_and_raw_json_on_request() {
    let server = TestServer::start_with(&[("resource.change.interval.millis", "20")]).await;
    for (format, raw) in [(None, false), (Some("json"), true)] {
        let mut args = vec!["events", "resource.change"];
        if let Some(format) = format {
            args.extend(["-o", format]);
        }
        let mut events = drover(&server, &args);
        events.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = events.spawn().unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        within("the subscription", async {
            while let Some(line) = stderr.next_line().await.unwrap() {
                if line.starts_with("subscribed to") {
                    return;
                }
            }
            panic!("events ended before it subscribed");
        })
        .await;
        let name = format!("evented-{raw}");
        let id = container(&server, &name, json!({"big": "z".repeat(2000)})).await;
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = line_until(&mut lines, "the container's change", |line| {
            line.contains(&id)
        })
        .await;
        if raw {
            let event: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(event["resourceId"], id.as_str());
            assert!(event["data"]["resource"]["labels"]["big"].is_string());
        } else {
            assert!(!line.starts_with('{'), "{line}");
            assert!(line.len() < 300, "one short line: {line}");
            assert!(
                line.contains(&format!("resource.change container {id} {name}: ")),
                "{line}"
            );
            // HH:MM:SS.mmm first.
            assert_eq!(line.as_bytes()[2], b':', "{line}");
        }
        let _ = child.kill().await;
    }
}

#[tokio::test]
async fn completions_help_and_errors_are_for_people() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef drover"),
        ("fish", "complete -c drover"),
    ] {
        let out = output({
            let mut command = Command::new(BIN);
            command.args(["completions", shell]);
            command
        })
        .await;
        assert!(out.status.success(), "{out:?}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(
            script.contains("services") && script.contains("inspect"),
            "{shell}"
        );
    }

    // With the keys in the environment, usage does not ask for them.
    let out = output({
        let mut command = Command::new(BIN);
        command
            .args(["ps", "--help"])
            .env("CATTLE_URL", "http://127.0.0.1:9")
            .env("CATTLE_ACCESS_KEY", "from-the-environment")
            .env("CATTLE_SECRET_KEY", "secret-from-the-environment");
        command
    })
    .await;
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let usage = help.lines().find(|l| l.starts_with("Usage:")).unwrap();
    assert!(!usage.contains("--access-key"), "{usage}");
    assert!(
        help.contains("CATTLE_ACCESS_KEY=from-the-environment"),
        "{help}"
    );
    assert!(!help.contains("secret-from-the-environment"), "{help}");

    // Without keys: one line that says what to set.
    let out = output({
        let mut command = Command::new(BIN);
        command
            .args(["ps"])
            .env("CATTLE_URL", "http://127.0.0.1:9")
            .env_remove("CATTLE_ACCESS_KEY")
            .env_remove("CATTLE_SECRET_KEY");
        command
    })
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("set CATTLE_ACCESS_KEY"), "{stderr}");

    // An unreachable server: one line, with what to do, and a failing exit code.
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let out = output({
        let mut command = Command::new(BIN);
        command
            .args(["ps", "--url", &format!("http://{dead}")])
            .env("CATTLE_ACCESS_KEY", "a")
            .env("CATTLE_SECRET_KEY", "b");
        command
    })
    .await;
    assert_ne!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!("drover: cannot reach http://{dead}/"))
            && stderr.contains("connection refused")
            && stderr.contains("set CATTLE_URL or pass --url"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_closed_stdout_ends_a_list_quietly() {
    let server = TestServer::start().await;
    for index in 0..5 {
        container(&server, &format!("piped-{index}"), json!({})).await;
    }
    // `drover ps | head -0`: the reader is gone before the first line is written.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut ps = drover(&server, &["ps"]);
    // (`output()` would replace the stdout given here with its own pipe.)
    ps.stdout(writer).stderr(Stdio::piped());
    let out = within(
        "ps into a closed pipe",
        ps.spawn().unwrap().wait_with_output(),
    )
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{out:?}");

    // And with a real shell pipe, a reader that stops after one line.
    let out = within(
        "ps | head",
        tokio::process::Command::new("sh")
            .arg("-c")
            .arg(format!("'{BIN}' ps -o wide | head -n 1; exit 0"))
            .env("CATTLE_URL", &server.url)
            .env("CATTLE_ACCESS_KEY", ADMIN_ACCESS)
            .env("CATTLE_SECRET_KEY", ADMIN_SECRET)
            .output(),
    )
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

#[tokio::test]
async fn up_says_truthfully_where_the_admin_key_is() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = Command::new(BIN);
    up.args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("DROVER_ADMIN_ACCESS_KEY", ADMIN_ACCESS)
        .env("DROVER_ADMIN_SECRET_KEY", ADMIN_SECRET)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = up.spawn().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = within("the admin key line", async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            if line.starts_with("Admin key") {
                return line;
            }
        }
        panic!("up ended before it named the admin key");
    })
    .await;
    let file = dir.path().join("admin-key.env");
    if line.contains(&file.display().to_string()) {
        let text = std::fs::read_to_string(&file).expect("the file the banner names exists");
        assert!(text.contains(ADMIN_SECRET), "{text}");
    } else {
        assert!(line.contains("DROVER_ADMIN_ACCESS_KEY"), "{line}");
    }
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let export = within("the export line", stdout.next_line())
        .await
        .unwrap()
        .unwrap();
    assert!(
        export.contains(&format!("CATTLE_ACCESS_KEY={ADMIN_ACCESS}")),
        "{export}"
    );
    let _ = child.kill().await;
    let _ = Duration::ZERO;
}
