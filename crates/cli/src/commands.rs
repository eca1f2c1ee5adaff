//! User commands: thin wrappers over the client library.
//! Data goes to stdout, everything else to stderr.

use drover_client::{Client, Event, Subscribe};
use serde_json::{Value, json};

/// Where the server is and which key to use: the same variables as the original's agents.
#[derive(Debug, clap::Args)]
pub struct Connection {
    /// The server's URL, or several comma-separated (`http://a:8080,http://b:8080`): the
    /// next is tried when one fails.
    #[arg(long, env = "CATTLE_URL", default_value = "http://localhost:8080")]
    url: String,
    /// The access key.
    #[arg(long, env = "CATTLE_ACCESS_KEY")]
    access_key: String,
    /// The secret key.
    #[arg(long, env = "CATTLE_SECRET_KEY", hide_env_values = true)]
    secret_key: String,
}

impl Connection {
    pub(crate) fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::new(&self.url, &self.access_key, &self.secret_key)?)
    }
}

#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    #[command(flatten)]
    connection: Connection,
    /// Event names to subscribe to (the server scopes them to the key).
    #[arg(required = true)]
    names: Vec<String>,
    /// Subscribe through a project's URL.
    #[arg(long)]
    project: Option<String>,
    /// Subscribe as (or on behalf of) an agent.
    #[arg(long)]
    agent_id: Option<String>,
    /// Print the keep-alive pings too.
    #[arg(long)]
    pings: bool,
    /// Print each event as one line of JSON.
    #[arg(long)]
    json: bool,
    /// First send the `resource.change` events after this stream position (their
    /// `data.position`), then the live ones; a position no longer retained is refused (410):
    /// re-list, then follow from the head it names.
    #[arg(long, value_name = "POSITION")]
    resume_from: Option<i64>,
}

pub async fn events(args: EventsArgs) -> anyhow::Result<()> {
    let client = args.connection.client()?;
    let mut subscribe = Subscribe::names(args.names.iter().cloned());
    subscribe.project_id = args.project.clone();
    subscribe.agent_id = args.agent_id.clone();
    subscribe.resume_from = args.resume_from;
    let mut stream = client.subscribe(subscribe).await?;
    let from = match (args.resume_from, stream.stream_position()) {
        (Some(resumed), _) => format!(" after position {resumed}"),
        (None, Some(head)) => format!(" after position {head} (the head)"),
        (None, None) => String::new(),
    };
    eprintln!(
        "subscribed to {}{from}; Ctrl-C to stop",
        args.names.join(", ")
    );
    loop {
        let event = tokio::select! {
            event = stream.next_event() => event?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(event) = event else { return Ok(()) };
        if event.name() == "ping" && event.reply_to.is_none() && !args.pings {
            continue;
        }
        if args.json {
            println!("{}", event.to_json());
        } else {
            let time = event
                .time
                .and_then(chrono::DateTime::from_timestamp_millis)
                .map(|time| time.format("%H:%M:%S%.3f").to_string())
                .unwrap_or_default();
            let resource = match (&event.resource_type, &event.resource_id) {
                (Some(kind), Some(id)) => format!(" {kind} {id}"),
                _ => String::new(),
            };
            let data = event
                .data
                .as_ref()
                .map(|data| format!(" {data}"))
                .unwrap_or_default();
            println!("{time} {}{resource}{data}", event.name());
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    #[command(flatten)]
    connection: Connection,
    /// The event name.
    name: String,
    /// The event's data, as JSON.
    #[arg(long)]
    data: Option<String>,
    /// Where replies should go.
    #[arg(long)]
    reply_to: Option<String>,
}

pub async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let client = args.connection.client()?;
    let mut event = Event::new(args.name);
    if let Some(data) = &args.data {
        event.data = Some(
            serde_json::from_str(data)
                .map_err(|error| anyhow::anyhow!("--data is not JSON: {error}"))?,
        );
    }
    event.reply_to = args.reply_to;
    client.publish(&event).await?;
    println!("{}", event.id.unwrap_or_default());
    Ok(())
}

#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Create an API key (shows the secret once).
    Create {
        #[command(flatten)]
        connection: Connection,
        /// The project (or account) the key acts as, e.g. 1a2; default: the caller's own account.
        #[arg(long)]
        account: Option<String>,
        /// A name for the key.
        #[arg(long)]
        name: Option<String>,
        /// Print the key as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List API keys.
    Ls {
        #[command(flatten)]
        connection: Connection,
        /// Print the collection as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub async fn keys(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create {
            connection,
            account,
            name,
            json,
        } => {
            let client = connection.client()?;
            let key = client
                .post("apikeys", &json!({"accountId": account, "name": name}))
                .await?;
            if json {
                println!("{key}");
            } else {
                println!(
                    "CATTLE_ACCESS_KEY={}",
                    key["publicValue"].as_str().unwrap_or_default()
                );
                println!(
                    "CATTLE_SECRET_KEY={}",
                    key["secretValue"].as_str().unwrap_or_default()
                );
                eprintln!(
                    "key {} for account {} (the secret is shown only now)",
                    key["id"].as_str().unwrap_or_default(),
                    key["accountId"].as_str().unwrap_or_default()
                );
            }
        }
        KeysCommand::Ls { connection, json } => {
            let client = connection.client()?;
            let keys = client.get("apikeys").await?;
            if json {
                println!("{keys}");
            } else {
                let mut table = comfy_table::Table::new();
                table.load_preset(comfy_table::presets::NOTHING);
                table.set_header(["ID", "ACCESS KEY", "ACCOUNT", "NAME", "STATE", "CREATED"]);
                for key in keys["data"].as_array().into_iter().flatten() {
                    let text = |field: &str| match &key[field] {
                        Value::String(text) => text.clone(),
                        Value::Null => String::new(),
                        other => other.to_string(),
                    };
                    table.add_row([
                        text("id"),
                        text("publicValue"),
                        text("accountId"),
                        text("name"),
                        text("state"),
                        text("created"),
                    ]);
                }
                println!("{table}");
            }
        }
    }
    Ok(())
}

/// Reads a collection's rows.
fn rows(collection: &Value) -> impl Iterator<Item = &Value> {
    collection["data"].as_array().into_iter().flatten()
}

/// A field as table text.
fn text(value: &Value, field: &str) -> String {
    match &value[field] {
        Value::String(text) => text.clone(),
        Value::Null => String::new(),
        Value::Array(items) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| item.to_string())
            })
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    }
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table.set_header(header.to_vec());
    for row in rows {
        table.add_row(row);
    }
    table
}

/// Follows a resource until it stops transitioning, printing its progress; fails when it
/// ends in `error`.
async fn follow(client: &Client, link: &str) -> anyhow::Result<Value> {
    let mut last_line = String::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let resource = client.get(link).await?;
        let line = format!(
            "{} {}{}",
            text(&resource, "state"),
            text(&resource, "transitioningMessage"),
            resource["transitioningProgress"]
                .as_i64()
                .map(|p| format!(" ({p}%)"))
                .unwrap_or_default()
        );
        if line != last_line {
            eprintln!("  {}", line.trim_end());
            last_line = line;
        }
        if resource["transitioning"] == "no" {
            return Ok(resource);
        }
        if resource["state"] == "error" {
            anyhow::bail!(
                "{} failed: {}",
                text(&resource, "id"),
                text(&resource, "transitioningMessage")
            );
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "gave up waiting after 10 minutes; the process goes on (see `drover processes`)"
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    connection: Connection,
    /// The container's name.
    #[arg(long)]
    name: Option<String>,
    /// Environment variables, KEY=VALUE.
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// Labels, KEY=VALUE.
    #[arg(short = 'l', long = "label")]
    labels: Vec<String>,
    /// Working directory.
    #[arg(short = 'w', long)]
    workdir: Option<String>,
    /// Run on this host (e.g. 1h1).
    #[arg(long)]
    host: Option<String>,
    /// Follow the container until it runs (`--wait`) or until it has ended too
    /// (`--wait=exited`), printing each failed attempt and when the next one is due; exits
    /// non-zero when it fails or its command exits with a code other than 0.
    #[arg(long, value_name = "UNTIL", num_args = 0..=1, require_equals = true,
          default_missing_value = "started", value_enum)]
    wait: Option<WaitFor>,
    /// Print the container as JSON.
    #[arg(long)]
    json: bool,
    /// The command and its arguments.
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

/// What `drover run --wait` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WaitFor {
    /// The container runs (or it ended already, or failed).
    Started,
    /// Its command has ended (or it failed).
    Exited,
}

/// How a container ended, if it did: `Err` when it failed or exited with a code other than 0.
fn ended(container: &Value) -> Option<anyhow::Result<()>> {
    let id = text(container, "id");
    match container["state"].as_str().unwrap_or_default() {
        "error" => Some(Err(anyhow::anyhow!(
            "{id} failed: {}",
            text(container, "transitioningMessage")
        ))),
        "stopped" => Some(match container["exitCode"].as_i64() {
            Some(0) | None => {
                eprintln!("  {id} {}", text(container, "agentMessage"));
                Ok(())
            }
            Some(code) => {
                let message = text(container, "agentMessage");
                Err(if message.starts_with("exited") || message.is_empty() {
                    anyhow::anyhow!("{id} exited with code {code}")
                } else {
                    anyhow::anyhow!("{id} exited with code {code}: {message}")
                })
            }
        }),
        "removed" | "removing" | "purged" => {
            Some(Err(anyhow::anyhow!("{id} was removed before it ended")))
        }
        _ => None,
    }
}

/// Follows a container that was just created until `until`, printing its progress, each failed
/// attempt (from its processes, when the key may read them) and when the next one is due.
async fn wait_run(client: &Client, link: &str, until: WaitFor) -> anyhow::Result<Value> {
    let mut last_line = String::new();
    let mut last_failure = String::new();
    let mut pause = std::time::Duration::from_millis(100);
    loop {
        let container = client.get(link).await?;
        let line = format!(
            "{} {}",
            text(&container, "state"),
            text(&container, "transitioningMessage")
        );
        let failing = container["transitioning"] == "error" && container["state"] != "error";
        if failing {
            let message = text(&container, "transitioningMessage");
            if message != last_failure {
                eprintln!("  attempt failed: {message}");
                if let Some(next) = next_attempt(client, &container).await {
                    eprintln!("  {next}");
                }
                last_failure = message;
            }
        } else if line != last_line {
            eprintln!("  {}", line.trim_end());
        }
        last_line = line;
        if container["transitioning"] != "yes" && !failing {
            if let Some(result) = ended(&container) {
                result?;
                return Ok(container);
            }
            if until == WaitFor::Started && container["state"] == "running" {
                return Ok(container);
            }
        }
        tokio::time::sleep(pause).await;
        // A long-running command (--wait=exited) is looked at less often.
        if container["state"] == "running" && container["transitioning"] == "no" {
            pause = (pause * 2).min(std::time::Duration::from_secs(1));
        }
    }
}

/// `attempt N of <process> failed …; next attempt at <time>`, from the container's pending
/// process (processes are visible to admins only: `None` for other keys).
async fn next_attempt(client: &Client, container: &Value) -> Option<String> {
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("resourceType", "container")
        .append_pair("resourceId", &text(container, "id"))
        .finish();
    let processes = client
        .get(&format!("processinstances?{query}"))
        .await
        .ok()?;
    let pending = rows(&processes).find(|process| process["state"] != "done")?;
    let next = pending["runAfterTS"].as_i64().map(|at| {
        let seconds = (at - chrono::Utc::now().timestamp_millis()).max(0) as f64 / 1000.0;
        format!(
            "next attempt at {} (in {seconds:.1} s)",
            text(pending, "runAfter")
        )
    });
    Some(format!(
        "{} {}: attempt {} failed ({}); {}",
        text(pending, "processName"),
        text(pending, "id"),
        pending["executionCount"].as_i64().unwrap_or(0),
        text(pending, "exitReason"),
        next.unwrap_or_else(|| "it is tried again".to_owned())
    ))
}

fn pairs(items: &[String], what: &str) -> anyhow::Result<serde_json::Map<String, Value>> {
    items
        .iter()
        .map(|item| {
            item.split_once('=')
                .map(|(key, value)| (key.to_owned(), json!(value)))
                .ok_or_else(|| anyhow::anyhow!("{what} {item:?} is not KEY=VALUE"))
        })
        .collect()
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = args.connection.client()?;
    let mut body = json!({
        "command": args.command,
        "environment": pairs(&args.env, "--env")?,
        "labels": pairs(&args.labels, "--label")?,
    });
    if let Some(name) = &args.name {
        body["name"] = json!(name);
    }
    if let Some(workdir) = &args.workdir {
        body["workingDir"] = json!(workdir);
    }
    if let Some(host) = &args.host {
        body["requestedHostId"] = json!(host);
    }
    let created = client.create("containers", &body).await?;
    let id = text(&created, "id");
    eprintln!("{id} created");
    let result = match args.wait {
        Some(until) => {
            wait_run(
                &client,
                created["links"]["self"].as_str().unwrap_or_default(),
                until,
            )
            .await?
        }
        None => created,
    };
    if args.json {
        println!("{result}");
    } else {
        println!("{id}");
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct PsArgs {
    #[command(flatten)]
    connection: Connection,
    /// Show removed containers too.
    #[arg(short, long)]
    all: bool,
    /// Print the collection as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn ps(args: PsArgs) -> anyhow::Result<()> {
    let client = args.connection.client()?;
    let path = if args.all {
        "containers?limit=1000"
    } else {
        "containers?state_ne=removed&state_ne=purging&state_ne=purged&limit=1000"
    };
    let containers = client.get(path).await?;
    if args.json {
        println!("{containers}");
        return Ok(());
    }
    let data = rows(&containers)
        .map(|c| {
            let state = if c["transitioning"] == "yes" {
                format!("{}…", text(c, "state"))
            } else {
                text(c, "state")
            };
            vec![
                text(c, "id"),
                text(c, "name"),
                state,
                text(c, "hostId"),
                text(c, "command"),
                text(c, "created"),
            ]
        })
        .collect();
    println!(
        "{}",
        table(&["ID", "NAME", "STATE", "HOST", "COMMAND", "CREATED"], data)
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct TargetArgs {
    #[command(flatten)]
    connection: Connection,
    /// The container's id (1i5) or name.
    container: String,
    /// Follow it until the operation is done.
    #[arg(long)]
    wait: bool,
}

/// The container a user named, by id or by (unique, live) name.
pub(crate) async fn resolve(client: &Client, target: &str) -> anyhow::Result<Value> {
    if let Ok(container) = client.get(&format!("containers/{target}")).await {
        return Ok(container);
    }
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("name", target)
        .finish();
    let found = client
        .get(&format!(
            "containers?{query}&state_ne=removed&state_ne=purging&state_ne=purged"
        ))
        .await?;
    let matches: Vec<&Value> = rows(&found).collect();
    match matches.as_slice() {
        [one] => Ok((*one).clone()),
        [] => anyhow::bail!("no container {target:?}"),
        _ => anyhow::bail!(
            "{} containers are named {target:?}; use an id",
            matches.len()
        ),
    }
}

pub async fn act(args: TargetArgs, action: &str) -> anyhow::Result<()> {
    let client = args.connection.client()?;
    let container = resolve(&client, &args.container).await?;
    let link = container["links"]["self"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let after = if action == "remove" {
        client.delete(&link).await?
    } else {
        client
            .post(&format!("{link}?action={action}"), &json!({}))
            .await?
    };
    eprintln!("{} {}", text(&after, "id"), text(&after, "state"));
    if args.wait {
        let done = follow(&client, &link).await?;
        eprintln!("{} {}", text(&done, "id"), text(&done, "state"));
    }
    println!("{}", text(&after, "id"));
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    connection: Connection,
    /// Print the collection as JSON.
    #[arg(long)]
    json: bool,
}

/// `drover purge`: runs `table.cleanup` now and prints what it deleted and kept.
pub async fn purge(args: ListArgs) -> anyhow::Result<()> {
    let client = args.connection.client()?;
    let report = client.post("cleanup?action=run", &json!({})).await?;
    if args.json {
        println!("{report}");
        return Ok(());
    }
    let data = report["tables"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            vec![
                text(t, "table"),
                text(t, "deleted"),
                text(t, "kept"),
                text(t, "setting"),
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &["TABLE", "DELETED", "KEPT (REFERENCED)", "AGE SETTING"],
            data
        )
    );
    eprintln!(
        "{} rows deleted, {} kept; {} purge processes scheduled, {} overdue processes ended, in {} ms",
        report["deleted"],
        report["kept"],
        report["purgesScheduled"],
        report["overdueProcessesWoken"],
        report["ended"].as_i64().unwrap_or(0) - report["started"].as_i64().unwrap_or(0)
    );
    if let Some(error) = report["error"].as_str() {
        anyhow::bail!("the run stopped early: {error}");
    }
    Ok(())
}

pub async fn hosts(args: ListArgs) -> anyhow::Result<()> {
    let client = args.connection.client()?;
    let hosts = client
        .get("hosts?state_ne=removed&state_ne=purging&state_ne=purged")
        .await?;
    if args.json {
        println!("{hosts}");
        return Ok(());
    }
    let containers = client.get("containers?state=running&limit=1000").await?;
    let data = rows(&hosts)
        .map(|h| {
            let id = text(h, "id");
            let running = rows(&containers)
                .filter(|c| c["hostId"] == id.as_str())
                .count();
            vec![
                id,
                text(h, "name"),
                text(h, "state"),
                text(h, "agentId"),
                text(h, "hostname"),
                text(h, "cpus"),
                h["memoryMb"]
                    .as_i64()
                    .map(|mb| format!("{mb} MiB"))
                    .unwrap_or_default(),
                text(h, "os"),
                running.to_string(),
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &[
                "ID", "NAME", "STATE", "AGENT", "HOSTNAME", "CPUS", "MEMORY", "OS", "RUNNING"
            ],
            data
        )
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct ProcessesArgs {
    #[command(flatten)]
    connection: Connection,
    /// running, delayed, ready, pending (the three together) or done.
    #[arg(long, default_value = "pending")]
    state: String,
    /// Only processes of this resource (e.g. 1i5).
    #[arg(long)]
    resource: Option<String>,
    /// Only processes of this name (e.g. instance.start).
    #[arg(long)]
    name: Option<String>,
    /// Print the collection as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn processes(args: ProcessesArgs) -> anyhow::Result<()> {
    let client = args.connection.client()?;
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("state", &args.state);
    if let Some(resource) = &args.resource {
        query.append_pair("resourceId", resource);
    }
    if let Some(name) = &args.name {
        query.append_pair("processName", name);
    }
    let processes = client
        .get(&format!("processinstances?{}", query.finish()))
        .await?;
    if args.json {
        println!("{processes}");
        return Ok(());
    }
    if args.state == "pending" {
        let summary = client.get("processsummary").await?;
        for row in rows(&summary) {
            eprintln!(
                "{}: {} running, {} ready, {} delayed",
                text(row, "processName"),
                row["running"],
                row["ready"],
                row["delay"]
            );
        }
    }
    let data = rows(&processes)
        .map(|p| {
            vec![
                text(p, "id"),
                text(p, "processName"),
                format!("{} {}", text(p, "resourceType"), text(p, "resourceId")),
                if p["result"].is_null() {
                    text(p, "state")
                } else {
                    text(p, "result")
                },
                text(p, "executionCount"),
                text(p, "startTime"),
                text(p, "runAfter"),
                text(p, "lastError"),
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &[
                "ID",
                "PROCESS",
                "RESOURCE",
                "STATE",
                "ATTEMPTS",
                "STARTED",
                "NEXT RUN",
                "LAST ERROR"
            ],
            data
        )
    );
    Ok(())
}
