//! User commands: thin wrappers over the client library.
//! Data goes to stdout, everything else to stderr.

use drover_client::{Client, Event, Subscribe};
use serde_json::{Value, json};

use crate::lists::{self, ListOptions};
use crate::output::{self, Format, OutputArgs};
use crate::resources;

/// Where the server is and which key to use: the same variables as the original's agents.
/// The keys are optional to clap (so that usage lines do not show them as required when the
/// environment has them); [`Connection::client`] says what to set when one is missing.
#[derive(Debug, Clone, clap::Args)]
pub struct Connection {
    /// The server's URL, or several comma-separated (`http://a:8080,http://b:8080`): the
    /// next is tried when one fails.
    #[arg(long, env = "CATTLE_URL", default_value = "http://localhost:8080")]
    url: String,
    /// The access key.
    #[arg(long, env = "CATTLE_ACCESS_KEY")]
    access_key: Option<String>,
    /// The secret key.
    #[arg(long, env = "CATTLE_SECRET_KEY", hide_env_values = true)]
    secret_key: Option<String>,
    /// A PEM file of CA certificates to trust (besides the system's) for an https:// server:
    /// its self-signed certificate, or the private CA that signed it.
    #[arg(long, env = "DROVER_CA_CERT")]
    ca_cert: Option<std::path::PathBuf>,
}

impl Connection {
    /// The client for these flags: the one place a command's client is built.
    pub(crate) fn client(&self) -> anyhow::Result<Client> {
        let (Some(access), Some(secret)) = (
            self.access_key.as_deref().filter(|key| !key.is_empty()),
            self.secret_key.as_deref().filter(|key| !key.is_empty()),
        ) else {
            anyhow::bail!(
                "no API key: set CATTLE_ACCESS_KEY and CATTLE_SECRET_KEY (or pass --access-key \
                 and --secret-key); `drover up` prints an export line with the admin key"
            );
        };
        let tls = match &self.ca_cert {
            Some(path) => drover_client::Tls::with_ca_file(path)?,
            None => drover_client::Tls::system(),
        };
        Client::new(&self.url, access, secret)
            .map_err(|error| anyhow::anyhow!("CATTLE_URL/--url {:?}: {error}", self.url))?
            .with_tls(tls)
            .map_err(Into::into)
    }
}

#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    #[command(flatten)]
    connection: Connection,
    /// Event names to subscribe to (the server scopes them to the key); default
    /// `resource.change`.
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
    /// `table`: one readable line per event (time, name, resource, summary); `wide`: the
    /// summary longer; `json`: each event as the raw JSON line it came as; `yaml`: a document
    /// per event.
    #[command(flatten)]
    output: OutputArgs,
    /// First send the `resource.change` events after this stream position (their
    /// `data.position`), then the live ones; a position no longer retained is refused (410):
    /// re-list, then follow from the head it names.
    #[arg(long, value_name = "POSITION")]
    resume_from: Option<i64>,
}

pub async fn events(args: EventsArgs) -> anyhow::Result<()> {
    let client = args.connection.client()?;
    let names = if args.names.is_empty() {
        vec!["resource.change".to_owned()]
    } else {
        args.names.clone()
    };
    let mut subscribe = Subscribe::names(names.iter().cloned());
    subscribe.project_id = args.project.clone();
    subscribe.agent_id = args.agent_id.clone();
    subscribe.resume_from = args.resume_from;
    let mut stream = client.subscribe(subscribe).await?;
    let from = match (args.resume_from, stream.stream_position()) {
        (Some(resumed), _) => format!(" after position {resumed}"),
        (None, Some(head)) => format!(" after position {head} (the head)"),
        (None, None) => String::new(),
    };
    eprintln!("subscribed to {}{from}; Ctrl-C to stop", names.join(", "));
    let format = args.output.format();
    loop {
        let event = tokio::select! {
            event = stream.next_event() => event?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(event) = event else {
            anyhow::bail!("the server closed the event stream")
        };
        if event.name() == "ping" && event.reply_to.is_none() && !args.pings {
            continue;
        }
        match format {
            Format::Json => output::print(event.to_json())?,
            Format::Yaml => {
                let value: Value = serde_json::from_str(&event.to_json())?;
                output::print(format!("---\n{}", output::yaml(&value)?.trim_end()))?;
            }
            Format::Table | Format::Wide => output::print(event_line(&event, format))?,
        }
    }
}

/// One readable line for an event: time, name, resource, and a short summary.
pub fn event_line(event: &Event, format: Format) -> String {
    let max = if format == Format::Wide {
        output::WIDE_CELL * 2
    } else {
        output::TABLE_CELL * 2
    };
    let time = event
        .time
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map(|time| {
            time.with_timezone(&chrono::Local)
                .format("%H:%M:%S%.3f")
                .to_string()
        })
        .unwrap_or_else(|| "--:--:--.---".to_owned());
    let resource = match (&event.resource_type, &event.resource_id) {
        (Some(kind), Some(id)) => format!(" {kind} {id}"),
        (None, Some(id)) => format!(" {id}"),
        _ => String::new(),
    };
    let null = Value::Null;
    let data = event.data.as_ref().unwrap_or(&null);
    let base = drover_proto::names::base(event.name());
    let summary = match base {
        "resource.change" => {
            let r = &data["resource"];
            let mut text = format!("{}: {}", lists::text(r, "name"), lists::text(r, "state"));
            let message = lists::text(r, "transitioningMessage");
            if !message.is_empty() {
                text.push_str(&format!(" ({message})"));
            }
            if let Some(position) = data["position"].as_i64() {
                text.push_str(&format!(" #{position}"));
            }
            text
        }
        "state.change" => format!(
            "{} -> {}",
            lists::text(data, "previousState"),
            lists::text(data, "state")
        ),
        "process.change" => format!(
            "{} {}",
            lists::text(data, "processName"),
            lists::text(data, "phase")
        ),
        _ => {
            let mut parts = Vec::new();
            if let Some(message) = event.transitioning_message.as_deref() {
                parts.push(message.to_owned());
            }
            if let Some(error) = event.transitioning.as_ref() {
                parts.push(format!("{error:?}").to_lowercase());
            }
            if !data.is_null() {
                parts.push(data.to_string());
            }
            parts.join(" ")
        }
    };
    let reply = if event.previous_names.is_empty() {
        ""
    } else {
        " (reply)"
    };
    format!(
        "{time} {}{}{reply} {}",
        output::cell(event.name(), output::TABLE_CELL * 2),
        output::cell(&resource, output::TABLE_CELL),
        output::cell(&summary, max)
    )
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
    /// `-o json|yaml`: the event as published (default: its id).
    #[command(flatten)]
    output: OutputArgs,
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
    if args.output.structured() {
        let value: Value = serde_json::from_str(&event.to_json())?;
        output::document(&value, args.output.format())
    } else {
        output::print(event.id.unwrap_or_default())
    }
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
    #[command(flatten)]
    output: OutputArgs,
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
/// process (`None` for keys that may not read processes: agent keys).
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

pub(crate) fn pairs(
    items: &[String],
    what: &str,
) -> anyhow::Result<serde_json::Map<String, Value>> {
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
    if args.output.structured() {
        output::document(&result, args.output.format())
    } else {
        output::print(id)
    }
}

#[derive(Debug, clap::Args)]
pub struct PsArgs {
    #[command(flatten)]
    connection: Connection,
    /// Show removed containers too.
    #[arg(short, long)]
    all: bool,
    #[command(flatten)]
    options: ListOptions,
}

pub async fn ps(args: PsArgs) -> anyhow::Result<()> {
    let client = args.connection.client()?;
    lists::list(&client, resources::containers_spec(args.all), &args.options).await
}

#[derive(Debug, clap::Args)]
pub struct TargetArgs {
    #[command(flatten)]
    connection: Connection,
    /// The containers' ids (1i5) or names.
    #[arg(required = true)]
    containers: Vec<String>,
    /// Follow each until the operation is done.
    #[arg(long)]
    wait: bool,
    /// `-o json|yaml`: the container as the operation left it (after `--wait`: as it ended).
    #[command(flatten)]
    output: OutputArgs,
}

pub async fn act(args: TargetArgs, action: &str) -> anyhow::Result<()> {
    let client = args.connection.client()?;
    for target in &args.containers {
        let container = resources::resolve(&client, target, &[("containers", "container")]).await?;
        let link = container["links"]["self"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let mut after = if action == "remove" {
            client.delete(&link).await?
        } else {
            client
                .post(&format!("{link}?action={action}"), &json!({}))
                .await?
        };
        eprintln!("{} {}", text(&after, "id"), text(&after, "state"));
        if args.wait {
            after = follow(&client, &link).await?;
            eprintln!("{} {}", text(&after, "id"), text(&after, "state"));
        }
        if args.output.structured() {
            output::document(&after, args.output.format())?;
        } else {
            output::print(text(&after, "id"))?;
        }
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(flatten)]
    output: OutputArgs,
}

/// `drover purge`: runs `table.cleanup` now and prints what it deleted and kept.
pub async fn purge(args: PurgeArgs) -> anyhow::Result<()> {
    let client = args.connection.client()?;
    let report = client.post("cleanup?action=run", &json!({})).await?;
    if args.output.structured() {
        return output::document(&report, args.output.format());
    }
    let mut table = output::Table::new(
        &["TABLE", "DELETED", "KEPT (REFERENCED)", "AGE SETTING"],
        output::TABLE_CELL,
    );
    for t in report["tables"].as_array().into_iter().flatten() {
        table.row(vec![
            text(t, "table"),
            text(t, "deleted"),
            text(t, "kept"),
            text(t, "setting"),
        ]);
    }
    table.print()?;
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

#[derive(Debug, clap::Args)]
pub struct HostsArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(flatten)]
    options: ListOptions,
}

pub async fn hosts(args: HostsArgs) -> anyhow::Result<()> {
    let client = args.connection.client()?;
    let mut running = std::collections::HashMap::new();
    if !args.options.output.structured() {
        // How many containers run on each host: every page of the running ones.
        let mut link = Some("containers?state=running&limit=1000".to_owned());
        while let Some(path) = link.take() {
            let page = client.get(&path).await?;
            for container in rows(&page) {
                *running.entry(text(container, "hostId")).or_insert(0) += 1;
            }
            link = page["pagination"]["next"].as_str().map(str::to_owned);
        }
    }
    lists::list(&client, resources::hosts_spec(running), &args.options).await
}

#[derive(Debug, clap::Args)]
pub struct ProcessesArgs {
    #[command(flatten)]
    connection: Connection,
    /// running, delayed, ready, pending (the three together) or done.
    #[arg(long, default_value = "pending")]
    state: String,
    /// Only processes of this resource: a typed id (1i5, 1h1, 1s2 …) or a name.
    #[arg(long)]
    resource: Option<String>,
    /// Only processes of this name (e.g. instance.start).
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    options: ListOptions,
}

pub async fn processes(args: ProcessesArgs) -> anyhow::Result<()> {
    let client = args.connection.client()?;
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("state", &args.state);
    if let Some(resource) = &args.resource {
        // A typed id says its type; a name is looked up (containers first).
        let (api_type, id) = match resources::type_of_id(resource) {
            Some(api_type) => (api_type.to_owned(), resource.clone()),
            None => {
                let found = resources::resolve_named(&client, resource).await?;
                (text(&found, "type"), text(&found, "id"))
            }
        };
        query.append_pair("resourceType", &api_type);
        query.append_pair("resourceId", &id);
    }
    if let Some(name) = &args.name {
        query.append_pair("processName", name);
    }
    if args.state == "pending" && !args.options.output.structured() && !args.options.watch {
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
    let spec = resources::processes_spec(format!("processinstances?{}", query.finish()));
    lists::list(&client, spec, &args.options).await
}
