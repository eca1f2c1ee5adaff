//! `inspect`, and the noun commands: `volumes`, `services`, `stacks`, `projects`, `settings`,
//! `keys` (`drover <noun> ls|create|rm|…`, the singular as an alias: `drover service scale`).

use drover_client::Client;
use serde_json::{Value, json};

use crate::commands::Connection;
use crate::lists::{self, ListOptions, ListSpec, Watch, computed, field, text, wide};
use crate::output::{self, Format, OutputArgs, Table};

/// The collection behind a typed id's prefix (`1i3` → containers), and the API type.
fn collection_of_id(id: &str) -> Option<(&'static str, &'static str)> {
    let rest = id.strip_prefix('1')?;
    let letters: String = rest.chars().take_while(char::is_ascii_lowercase).collect();
    let digits = &rest[letters.len()..];
    if letters.is_empty() || digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(match letters.as_str() {
        "i" => ("containers", "container"),
        "v" => ("volumes", "volume"),
        "h" => ("hosts", "host"),
        "ag" => ("agents", "agent"),
        "st" => ("stacks", "stack"),
        "s" => ("services", "service"),
        "a" => ("projects", "project"),
        "c" => ("apikeys", "apiKey"),
        "eh" => ("externalhandlers", "externalHandler"),
        "pi" => ("processinstances", "processInstance"),
        "ce" => ("containerevents", "containerEvent"),
        "se" => ("serviceevents", "serviceEvent"),
        _ => return None,
    })
}

/// The API type of a typed id (`1i3` → `container`).
pub fn type_of_id(id: &str) -> Option<&'static str> {
    collection_of_id(id).map(|(_, api_type)| api_type)
}

/// The types a name is looked up in, in this order.
const NAMED: &[(&str, &str)] = &[
    ("containers", "container"),
    ("services", "service"),
    ("stacks", "stack"),
    ("volumes", "volume"),
    ("hosts", "host"),
];

/// The resource a user named: a typed id (`1i3`, `1s2`) or the name of a live resource of the
/// given collections; more than one match is an error that lists them.
pub async fn resolve(
    client: &Client,
    target: &str,
    among: &[(&'static str, &'static str)],
) -> anyhow::Result<Value> {
    if let Some((collection, api_type)) = collection_of_id(target)
        && among.iter().any(|(_, t)| *t == api_type)
    {
        return client
            .get(&format!("{collection}/{target}"))
            .await
            .map_err(|error| match error {
                drover_client::Error::Api { status: 404, .. } => {
                    anyhow::anyhow!("no {api_type} {target}")
                }
                other => other.into(),
            });
    }
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("name", target)
        .finish();
    let mut found = Vec::new();
    for (collection, _) in among {
        let page = client
            .get(&format!(
                "{collection}?{query}&state_ne=removed&state_ne=purging&state_ne=purged"
            ))
            .await?;
        found.extend(page["data"].as_array().cloned().unwrap_or_default());
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => {
            let kinds: Vec<&str> = among.iter().map(|(_, t)| *t).collect();
            anyhow::bail!(
                "no {} named {:?} (give a name or an id such as 1i3)",
                kinds.join(" or "),
                output::cell(target, output::WIDE_CELL)
            )
        }
        many => anyhow::bail!(
            "{} resources are named {:?} ({}); use an id",
            many.len(),
            output::cell(target, output::WIDE_CELL),
            many.iter()
                .map(|r| format!("{} {}", text(r, "type"), text(r, "id")))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// A live container, service, stack, volume or host of this name.
pub async fn resolve_named(client: &Client, name: &str) -> anyhow::Result<Value> {
    resolve(client, name, NAMED).await
}

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    #[command(flatten)]
    connection: Connection,
    /// Ids (1i3, 1s2, 1st1, 1v1, 1h1, 1a5 …) or names of containers, services, stacks,
    /// volumes or hosts.
    #[arg(required = true)]
    targets: Vec<String>,
    /// How many of its latest processes to show (admin keys only; 0: none).
    #[arg(long, default_value_t = 10)]
    processes: usize,
    /// `table` (the default) and `wide` print the resource as YAML and its processes as a
    /// table; `json`/`yaml` print `{"resource": …, "processes": […]}`.
    #[command(flatten)]
    output: OutputArgs,
}

/// `drover inspect`: the whole resource and its latest processes.
pub async fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let client = args.connection.client()?;
    let format = args.output.format();
    let mut documents = Vec::new();
    for target in &args.targets {
        let resource = match collection_of_id(target) {
            Some((collection, api_type)) => {
                resolve(&client, target, &[(collection, api_type)]).await?
            }
            None => resolve(&client, target, NAMED).await?,
        };
        let (processes, note) = if args.processes == 0 {
            (Vec::new(), None)
        } else {
            latest_processes(&client, &resource, args.processes).await?
        };
        documents.push((resource, processes, note));
    }
    let many = documents.len() > 1;
    if format == Format::Json && many {
        let all: Vec<Value> = documents
            .iter()
            .map(|(r, p, _)| json!({"resource": r, "processes": p}))
            .collect();
        return output::print(Value::Array(all));
    }
    for (index, (resource, processes, note)) in documents.iter().enumerate() {
        match format {
            Format::Json | Format::Yaml => {
                if format == Format::Yaml && many {
                    output::print("---")?;
                }
                output::document(
                    &json!({"resource": resource, "processes": processes}),
                    format,
                )?;
            }
            Format::Table | Format::Wide => {
                if index > 0 {
                    output::print("")?;
                }
                output::print(output::yaml(resource)?.trim_end())?;
                output::print("")?;
                if let Some(note) = note {
                    output::print(format!("processes: {note}"))?;
                    continue;
                }
                output::print(format!("latest processes ({}):", processes.len()))?;
                let spec = processes_spec(String::new());
                let columns: Vec<&lists::Column> = spec
                    .columns
                    .iter()
                    .filter(|c| format == Format::Wide || !c.wide)
                    .collect();
                let mut table = Table::new(
                    &columns.iter().map(|c| c.header).collect::<Vec<_>>(),
                    if format == Format::Wide {
                        output::WIDE_CELL
                    } else {
                        output::TABLE_CELL
                    },
                );
                for process in processes {
                    table.row(columns.iter().map(|c| (c.value)(process)).collect());
                }
                table.print()?;
            }
        }
    }
    Ok(())
}

/// A resource's processes, pending first then the latest done, at most `count`; or why none.
async fn latest_processes(
    client: &Client,
    resource: &Value,
    count: usize,
) -> anyhow::Result<(Vec<Value>, Option<String>)> {
    let api_type = text(resource, "type");
    if !matches!(
        api_type.as_str(),
        "container" | "volume" | "host" | "agent" | "stack" | "service" | "externalHandler"
    ) {
        return Ok((Vec::new(), Some(format!("a {api_type} has none"))));
    }
    let mut all = Vec::new();
    for state in ["pending", "done"] {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("resourceType", &api_type)
            .append_pair("resourceId", &text(resource, "id"))
            .append_pair("state", state)
            .append_pair("limit", &count.clamp(1, 1000).to_string())
            .finish();
        match client.get(&format!("processinstances?{query}")).await {
            Ok(page) => all.extend(page["data"].as_array().cloned().unwrap_or_default()),
            Err(drover_client::Error::Api { status: 403, .. }) => {
                return Ok((
                    Vec::new(),
                    Some("only an admin key sees processes".to_owned()),
                ));
            }
            Err(error) => return Err(error.into()),
        }
    }
    all.truncate(count);
    Ok((all, None))
}

/// Containers: `drover ps`.
pub fn containers_spec(all: bool) -> ListSpec {
    ListSpec {
        path: "containers".into(),
        query: if all { Vec::new() } else { lists::live() },
        server_filters: true,
        columns: vec![
            field("ID", "id"),
            field("NAME", "name"),
            computed("STATE", |c| {
                if c["transitioning"] == "yes" {
                    format!("{}…", text(c, "state"))
                } else {
                    text(c, "state")
                }
            }),
            field("HOST", "hostId"),
            field("COMMAND", "command"),
            field("CREATED", "created"),
            wide(field("SERVICE", "serviceId")),
            wide(field("EXIT", "exitCode")),
            wide(field("LABELS", "labels")),
            wide(field("MESSAGE", "transitioningMessage")),
        ],
        watch: Watch::Changes("container"),
        key: lists::state_key,
    }
}

/// Hosts, with how many containers run on each (table formats).
pub fn hosts_spec(running: std::collections::HashMap<String, usize>) -> ListSpec {
    ListSpec {
        path: "hosts".into(),
        query: lists::live(),
        server_filters: true,
        columns: vec![
            field("ID", "id"),
            field("NAME", "name"),
            field("STATE", "state"),
            field("AGENT", "agentId"),
            field("HOSTNAME", "hostname"),
            field("CPUS", "cpus"),
            computed("MEMORY", |h| {
                h["memoryMb"]
                    .as_i64()
                    .map(|mb| format!("{mb} MiB"))
                    .unwrap_or_default()
            }),
            field("OS", "os"),
            computed("RUNNING", move |h| {
                running
                    .get(&text(h, "id"))
                    .copied()
                    .unwrap_or(0)
                    .to_string()
            }),
            wide(field("MESSAGE", "transitioningMessage")),
            wide(field("CREATED", "created")),
        ],
        watch: Watch::Changes("host"),
        key: lists::state_key,
    }
}

/// Processes.
pub fn processes_spec(path: String) -> ListSpec {
    ListSpec {
        path,
        query: Vec::new(),
        server_filters: true,
        columns: vec![
            field("ID", "id"),
            field("PROCESS", "processName"),
            computed("RESOURCE", |p| {
                format!("{} {}", text(p, "resourceType"), text(p, "resourceId"))
            }),
            computed("STATE", |p| {
                if p["result"].is_null() {
                    text(p, "state")
                } else {
                    text(p, "result")
                }
            }),
            field("ATTEMPTS", "executionCount"),
            field("STARTED", "startTime"),
            field("NEXT RUN", "runAfter"),
            wide(field("ENDED", "endTime")),
            wide(field("WAITS", "waitCount")),
            wide(field("EXIT REASON", "exitReason")),
            field("LAST ERROR", "lastError"),
        ],
        watch: Watch::Refetch(&["resource.change", "process.change", "state.change"]),
        key: |p| {
            format!(
                "{} {} {} {} {}",
                text(p, "state"),
                text(p, "result"),
                text(p, "executionCount"),
                text(p, "waitCount"),
                text(p, "lastError")
            )
        },
    }
}

fn volumes_spec() -> ListSpec {
    ListSpec {
        path: "volumes".into(),
        query: lists::live(),
        server_filters: true,
        columns: vec![
            field("ID", "id"),
            field("NAME", "name"),
            field("STATE", "state"),
            field("HOST", "hostId"),
            field("DRIVER", "driver"),
            field("CREATED", "created"),
            wide(field("CONTAINER", "instanceId")),
            wide(field("OPTIONS", "driverOpts")),
            wide(field("MESSAGE", "transitioningMessage")),
        ],
        watch: Watch::Changes("volume"),
        key: lists::state_key,
    }
}

fn services_spec() -> ListSpec {
    ListSpec {
        path: "services".into(),
        query: lists::live(),
        server_filters: true,
        columns: vec![
            field("ID", "id"),
            field("NAME", "name"),
            field("STATE", "state"),
            field("SCALE", "scale"),
            field("RUNNING", "currentScale"),
            field("STACK", "stackId"),
            field("CREATED", "created"),
            wide(computed("COMMAND", |s| {
                lists::plain(&s["launchConfig"]["command"])
            })),
            wide(field("RESTARTS", "consecutiveRestarts")),
            wide(field("MESSAGE", "reconcileMessage")),
        ],
        watch: Watch::Changes("service"),
        key: lists::state_key,
    }
}

fn stacks_spec() -> ListSpec {
    ListSpec {
        path: "stacks".into(),
        query: lists::live(),
        server_filters: true,
        columns: vec![
            field("ID", "id"),
            field("NAME", "name"),
            field("STATE", "state"),
            field("CREATED", "created"),
            wide(field("DESCRIPTION", "description")),
            wide(field("MESSAGE", "transitioningMessage")),
        ],
        watch: Watch::Changes("stack"),
        key: lists::state_key,
    }
}

fn projects_spec() -> ListSpec {
    ListSpec {
        path: "projects".into(),
        query: Vec::new(),
        server_filters: false,
        columns: vec![
            field("ID", "id"),
            field("NAME", "name"),
            field("STATE", "state"),
            field("CREATED", "created"),
            wide(field("UUID", "uuid")),
        ],
        watch: Watch::Unsupported,
        key: lists::state_key,
    }
}

fn settings_spec() -> ListSpec {
    ListSpec {
        path: "settings".into(),
        query: Vec::new(),
        server_filters: false,
        columns: vec![
            field("NAME", "name"),
            field("VALUE", "value"),
            field("SOURCE", "source"),
            wide(field("DEFAULT", "defaultValue")),
            wide(field("ENVIRONMENT", "environmentVariable")),
            wide(field("DESCRIPTION", "description")),
        ],
        watch: Watch::Unsupported,
        key: lists::state_key,
    }
}

fn keys_spec() -> ListSpec {
    ListSpec {
        path: "apikeys".into(),
        query: Vec::new(),
        server_filters: false,
        columns: vec![
            field("ID", "id"),
            field("ACCESS KEY", "publicValue"),
            field("ACCOUNT", "accountId"),
            field("NAME", "name"),
            field("STATE", "state"),
            field("CREATED", "created"),
            wide(field("DESCRIPTION", "description")),
        ],
        watch: Watch::Unsupported,
        key: lists::state_key,
    }
}

/// Prints the resource an operation answered with: its id, or the whole in `-o json|yaml`.
async fn show(resource: &Value, output: &OutputArgs) -> anyhow::Result<()> {
    if output.structured() {
        output::document(resource, output.format())
    } else {
        output::print(output::cell(&text(resource, "id"), output::WIDE_CELL))
    }
}

/// The flags of a list subcommand.
#[derive(Debug, clap::Args)]
pub struct Ls {
    #[command(flatten)]
    connection: Connection,
    #[command(flatten)]
    options: ListOptions,
}

/// The flags of a subcommand on one or more resources.
#[derive(Debug, clap::Args)]
pub struct On {
    #[command(flatten)]
    connection: Connection,
    /// Ids or names.
    #[arg(required = true)]
    targets: Vec<String>,
    #[command(flatten)]
    output: OutputArgs,
}

/// Runs `action` (`remove` is a DELETE) on each target of a collection.
async fn act_on(
    on: On,
    collection: &'static str,
    api_type: &'static str,
    action: &str,
) -> anyhow::Result<()> {
    let client = on.connection.client()?;
    for target in &on.targets {
        let resource = resolve(&client, target, &[(collection, api_type)]).await?;
        let link = text(&resource["links"], "self");
        let after = if action == "remove" {
            client.delete(&link).await?
        } else {
            client
                .post(&format!("{link}?action={action}"), &json!({}))
                .await?
        };
        eprintln!("{} {}", text(&after, "id"), text(&after, "state"));
        show(&after, &on.output).await?;
    }
    Ok(())
}

#[derive(Debug, clap::Subcommand)]
pub enum VolumesCommand {
    /// List volumes.
    #[command(visible_alias = "list")]
    Ls(Ls),
    /// Create a volume (the agent of its host makes it).
    Create {
        #[command(flatten)]
        connection: Connection,
        /// Its name.
        name: String,
        /// The driver (default: the agent's local directories).
        #[arg(long)]
        driver: Option<String>,
        /// Driver options, KEY=VALUE.
        #[arg(long = "opt")]
        opts: Vec<String>,
        /// Make it on this host (e.g. 1h1).
        #[arg(long)]
        host: Option<String>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Remove volumes.
    #[command(visible_alias = "remove")]
    Rm(On),
    /// Activate volumes.
    Activate(On),
    /// Deactivate volumes.
    Deactivate(On),
}

pub async fn volumes(command: VolumesCommand) -> anyhow::Result<()> {
    const V: (&str, &str) = ("volumes", "volume");
    match command {
        VolumesCommand::Ls(ls) => {
            lists::list(&ls.connection.client()?, volumes_spec(), &ls.options).await
        }
        VolumesCommand::Create {
            connection,
            name,
            driver,
            opts,
            host,
            output,
        } => {
            let client = connection.client()?;
            let mut body =
                json!({"name": name, "driverOpts": crate::commands::pairs(&opts, "--opt")?});
            if let Some(driver) = driver {
                body["driver"] = json!(driver);
            }
            if let Some(host) = host {
                body["requestedHostId"] = json!(host);
            }
            let created = client.create("volumes", &body).await?;
            eprintln!("{} {}", text(&created, "id"), text(&created, "state"));
            show(&created, &output).await
        }
        VolumesCommand::Rm(on) => act_on(on, V.0, V.1, "remove").await,
        VolumesCommand::Activate(on) => act_on(on, V.0, V.1, "activate").await,
        VolumesCommand::Deactivate(on) => act_on(on, V.0, V.1, "deactivate").await,
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum ServicesCommand {
    /// List services.
    #[command(visible_alias = "list")]
    Ls(Ls),
    /// Create a service: `scale` containers of the command, kept running by the server.
    Create {
        #[command(flatten)]
        connection: Connection,
        /// Its name.
        name: String,
        /// How many containers.
        #[arg(long, default_value_t = 1)]
        scale: i64,
        /// In this stack (id or name).
        #[arg(long)]
        stack: Option<String>,
        /// Environment variables, KEY=VALUE.
        #[arg(short = 'e', long = "env")]
        env: Vec<String>,
        /// Labels of its containers, KEY=VALUE.
        #[arg(short = 'l', long = "label")]
        labels: Vec<String>,
        /// Working directory.
        #[arg(short = 'w', long)]
        workdir: Option<String>,
        #[command(flatten)]
        output: OutputArgs,
        /// The command and its arguments.
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
    /// Set how many containers a service keeps.
    Scale {
        #[command(flatten)]
        connection: Connection,
        /// The service's id or name.
        service: String,
        /// The new scale (0 to 1000).
        scale: i64,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Remove services (and their containers).
    #[command(visible_alias = "remove")]
    Rm(On),
    /// Activate services (start their containers).
    Activate(On),
    /// Deactivate services (stop their containers).
    Deactivate(On),
}

pub async fn services(command: ServicesCommand) -> anyhow::Result<()> {
    const S: (&str, &str) = ("services", "service");
    match command {
        ServicesCommand::Ls(ls) => {
            lists::list(&ls.connection.client()?, services_spec(), &ls.options).await
        }
        ServicesCommand::Create {
            connection,
            name,
            scale,
            stack,
            env,
            labels,
            workdir,
            output,
            command,
        } => {
            let client = connection.client()?;
            let mut launch = json!({
                "command": command,
                "environment": crate::commands::pairs(&env, "--env")?,
                "labels": crate::commands::pairs(&labels, "--label")?,
            });
            if let Some(workdir) = workdir {
                launch["workingDir"] = json!(workdir);
            }
            let mut body = json!({"name": name, "scale": scale, "launchConfig": launch});
            if let Some(stack) = stack {
                let stack = resolve(&client, &stack, &[("stacks", "stack")]).await?;
                body["stackId"] = stack["id"].clone();
            }
            let created = client.create("services", &body).await?;
            eprintln!("{} {}", text(&created, "id"), text(&created, "state"));
            show(&created, &output).await
        }
        ServicesCommand::Scale {
            connection,
            service,
            scale,
            output,
        } => {
            let client = connection.client()?;
            let found = resolve(&client, &service, &[S]).await?;
            let updated = client
                .put(&text(&found["links"], "self"), &json!({"scale": scale}))
                .await?;
            eprintln!(
                "{} scale {} (was {}; {} running)",
                text(&updated, "id"),
                text(&updated, "scale"),
                text(&found, "scale"),
                text(&updated, "currentScale")
            );
            show(&updated, &output).await
        }
        ServicesCommand::Rm(on) => act_on(on, S.0, S.1, "remove").await,
        ServicesCommand::Activate(on) => act_on(on, S.0, S.1, "activate").await,
        ServicesCommand::Deactivate(on) => act_on(on, S.0, S.1, "deactivate").await,
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum StacksCommand {
    /// List stacks.
    #[command(visible_alias = "list")]
    Ls(Ls),
    /// Create a stack (services join it with `drover services create --stack`).
    Create {
        #[command(flatten)]
        connection: Connection,
        /// Its name.
        name: String,
        /// A description.
        #[arg(long)]
        description: Option<String>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Remove stacks.
    #[command(visible_alias = "remove")]
    Rm(On),
    /// Activate stacks.
    Activate(On),
    /// Deactivate stacks.
    Deactivate(On),
}

pub async fn stacks(command: StacksCommand) -> anyhow::Result<()> {
    const ST: (&str, &str) = ("stacks", "stack");
    match command {
        StacksCommand::Ls(ls) => {
            lists::list(&ls.connection.client()?, stacks_spec(), &ls.options).await
        }
        StacksCommand::Create {
            connection,
            name,
            description,
            output,
        } => {
            let client = connection.client()?;
            let created = client
                .create("stacks", &json!({"name": name, "description": description}))
                .await?;
            eprintln!("{} {}", text(&created, "id"), text(&created, "state"));
            show(&created, &output).await
        }
        StacksCommand::Rm(on) => act_on(on, ST.0, ST.1, "remove").await,
        StacksCommand::Activate(on) => act_on(on, ST.0, ST.1, "activate").await,
        StacksCommand::Deactivate(on) => act_on(on, ST.0, ST.1, "deactivate").await,
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum ProjectsCommand {
    /// List the projects the key may see.
    #[command(visible_alias = "list")]
    Ls(Ls),
    /// Create a project (admins).
    Create {
        #[command(flatten)]
        connection: Connection,
        /// Its name.
        name: String,
        #[command(flatten)]
        output: OutputArgs,
    },
}

pub async fn projects(command: ProjectsCommand) -> anyhow::Result<()> {
    match command {
        ProjectsCommand::Ls(ls) => {
            lists::list(&ls.connection.client()?, projects_spec(), &ls.options).await
        }
        ProjectsCommand::Create {
            connection,
            name,
            output,
        } => {
            let client = connection.client()?;
            let created = client.post("projects", &json!({"name": name})).await?;
            eprintln!("{} {}", text(&created, "id"), text(&created, "state"));
            show(&created, &output).await
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum SettingsCommand {
    /// List every setting with its value and where it comes from (admins).
    #[command(visible_alias = "list")]
    Ls(Ls),
    /// Print a setting's value (the whole setting with -o json|yaml|wide).
    Get {
        #[command(flatten)]
        connection: Connection,
        /// The setting's name, e.g. process.max_attempts.
        name: String,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Store a value; it takes effect at once, on every node.
    Set {
        #[command(flatten)]
        connection: Connection,
        /// The setting's name.
        name: String,
        /// Its new value.
        value: String,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Remove the stored value: the environment's or the default applies again.
    #[command(visible_alias = "reset")]
    Unset {
        #[command(flatten)]
        connection: Connection,
        /// The setting's name.
        name: String,
        #[command(flatten)]
        output: OutputArgs,
    },
}

async fn show_setting(setting: &Value, output: &OutputArgs) -> anyhow::Result<()> {
    match output.format() {
        Format::Table => output::print(output::cell(&text(setting, "value"), usize::MAX)),
        Format::Wide => {
            let spec = settings_spec();
            let mut table = Table::new(
                &spec.columns.iter().map(|c| c.header).collect::<Vec<_>>(),
                output::WIDE_CELL,
            );
            table.row(spec.columns.iter().map(|c| (c.value)(setting)).collect());
            table.print().map(drop)
        }
        format => output::document(setting, format),
    }
}

fn setting_path(name: &str) -> String {
    let name: String = form_urlencoded::byte_serialize(name.as_bytes()).collect();
    format!("settings/{name}")
}

pub async fn settings(command: SettingsCommand) -> anyhow::Result<()> {
    match command {
        SettingsCommand::Ls(ls) => {
            lists::list(&ls.connection.client()?, settings_spec(), &ls.options).await
        }
        SettingsCommand::Get {
            connection,
            name,
            output,
        } => {
            let setting = connection.client()?.get(&setting_path(&name)).await?;
            show_setting(&setting, &output).await
        }
        SettingsCommand::Set {
            connection,
            name,
            value,
            output,
        } => {
            let setting = connection
                .client()?
                .put(&setting_path(&name), &json!({"value": value}))
                .await?;
            eprintln!(
                "{} = {} ({})",
                text(&setting, "name"),
                output::cell(&text(&setting, "value"), output::WIDE_CELL),
                text(&setting, "source")
            );
            show_setting(&setting, &output).await
        }
        SettingsCommand::Unset {
            connection,
            name,
            output,
        } => {
            let setting = connection.client()?.delete(&setting_path(&name)).await?;
            eprintln!(
                "{} = {} ({})",
                text(&setting, "name"),
                output::cell(&text(&setting, "value"), output::WIDE_CELL),
                text(&setting, "source")
            );
            show_setting(&setting, &output).await
        }
    }
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
        /// A description.
        #[arg(long)]
        description: Option<String>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// List API keys.
    #[command(visible_alias = "list")]
    Ls(Ls),
    /// Remove API keys (by id, access key or name): they stop working at once.
    #[command(visible_alias = "remove")]
    Rm(On),
}

pub async fn keys(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create {
            connection,
            account,
            name,
            description,
            output,
        } => {
            let client = connection.client()?;
            let key = client
                .post(
                    "apikeys",
                    &json!({"accountId": account, "name": name, "description": description}),
                )
                .await?;
            if output.structured() {
                output::document(&key, output.format())?;
            } else {
                output::print(format!("CATTLE_ACCESS_KEY={}", text(&key, "publicValue")))?;
                output::print(format!("CATTLE_SECRET_KEY={}", text(&key, "secretValue")))?;
                eprintln!(
                    "key {} for account {} (the secret is shown only now)",
                    text(&key, "id"),
                    text(&key, "accountId")
                );
            }
            Ok(())
        }
        KeysCommand::Ls(ls) => {
            lists::list(&ls.connection.client()?, keys_spec(), &ls.options).await
        }
        KeysCommand::Rm(on) => {
            let client = on.connection.client()?;
            for target in &on.targets {
                let key = if collection_of_id(target).is_some_and(|(c, _)| c == "apikeys") {
                    client.get(&format!("apikeys/{target}")).await?
                } else {
                    let keys = client.get("apikeys").await?;
                    let matches: Vec<&Value> = keys["data"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|k| text(k, "publicValue") == *target || text(k, "name") == *target)
                        .collect();
                    match matches.as_slice() {
                        [one] => (*one).clone(),
                        [] => anyhow::bail!(
                            "no API key {:?} (give its id, access key or name; see `drover keys ls`)",
                            output::cell(target, output::WIDE_CELL)
                        ),
                        many => anyhow::bail!(
                            "{} keys are named {:?}; use an id",
                            many.len(),
                            output::cell(target, output::WIDE_CELL)
                        ),
                    }
                };
                let removed = client.delete(&text(&key["links"], "self")).await?;
                eprintln!("{} {}", text(&removed, "id"), text(&removed, "state"));
                show(&removed, &on.output).await?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_ids_name_their_collection() {
        assert_eq!(collection_of_id("1i3").unwrap().0, "containers");
        assert_eq!(collection_of_id("1s2").unwrap().0, "services");
        assert_eq!(collection_of_id("1st1").unwrap().0, "stacks");
        assert_eq!(collection_of_id("1v1").unwrap().0, "volumes");
        assert_eq!(collection_of_id("1h1").unwrap().0, "hosts");
        assert!(collection_of_id("web").is_none());
        assert!(collection_of_id("1i").is_none());
        assert!(collection_of_id("1x5").is_none());
        assert!(collection_of_id("12").is_none());
    }
}
