//! User commands: thin wrappers over the client library.
//! Data goes to stdout, everything else to stderr.

use drover_client::{Client, Event, Subscribe};
use serde_json::{Value, json};

/// Where the server is and which key to use: the same variables as the original's agents.
#[derive(Debug, clap::Args)]
pub struct Connection {
    /// The server's URL.
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
    fn client(&self) -> anyhow::Result<Client> {
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
}

pub async fn events(args: EventsArgs) -> anyhow::Result<()> {
    let client = args.connection.client()?;
    let mut subscribe = Subscribe::names(args.names.iter().cloned());
    subscribe.project_id = args.project.clone();
    subscribe.agent_id = args.agent_id.clone();
    let mut stream = client.subscribe(subscribe).await?;
    eprintln!("subscribed to {}; Ctrl-C to stop", args.names.join(", "));
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
