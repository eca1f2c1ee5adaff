//! The `drover` binary: one command for the server and, in time, the agent and user commands.
//! It parses flags, sets up logging and calls into the library crates; nothing else lives here.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

mod commands;
mod logs;
use drover_server::settings::Settings;

#[derive(Debug, Parser)]
#[command(
    name = "drover",
    version,
    about = "A lightweight orchestration event engine"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "DROVER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server: REST API, event bus, process engine.
    Server(ServerArgs),
    /// Run the host agent: register, subscribe, run instances and volumes.
    Agent(drover_agent::AgentArgs),
    /// The server on the embedded store plus one local agent, for a first look.
    Up(ServerArgs),
    /// Create and start a container (`--wait` follows it until it runs).
    Run(commands::RunArgs),
    /// List containers.
    Ps(commands::PsArgs),
    /// Print a container's output: stdout to stdout, stderr to stderr (`-f` to follow).
    Logs(logs::LogsArgs),
    /// Stop a container.
    Stop(commands::TargetArgs),
    /// Start a stopped container.
    Start(commands::TargetArgs),
    /// Remove a container.
    Rm(commands::TargetArgs),
    /// List hosts and their agents.
    Hosts(commands::ListArgs),
    /// List processes: what runs, waits and failed, and why.
    Processes(commands::ProcessesArgs),
    /// Tail the live event stream the key may see.
    Events(commands::EventsArgs),
    /// Publish one event.
    Publish(commands::PublishArgs),
    /// Run the table.cleanup job now (purge old events, processes and removed resources).
    Purge(commands::ListArgs),
    /// Create and list API keys.
    #[command(subcommand)]
    Keys(commands::KeysCommand),
}

#[derive(Debug, clap::Args)]
struct ServerArgs {
    /// Address to listen on.
    #[arg(long, env = "DROVER_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Directory for the embedded database and generated files.
    #[arg(long, env = "DROVER_DATA_DIR", default_value = "./drover-data")]
    data_dir: PathBuf,
    /// Use PostgreSQL (postgres://…) instead of the embedded SQLite file.
    #[arg(long, env = "DROVER_DATABASE_URL")]
    database_url: Option<String>,
    /// The admin's access key (with --admin-secret-key); generated on first start if unset.
    #[arg(long, env = "DROVER_ADMIN_ACCESS_KEY", hide_env_values = true)]
    admin_access_key: Option<String>,
    /// The admin's secret key.
    #[arg(long, env = "DROVER_ADMIN_SECRET_KEY", hide_env_values = true)]
    admin_secret_key: Option<String>,
    /// The URL clients reach this server at, for links in events (default: http://<listen address>).
    #[arg(long, env = "DROVER_PUBLIC_URL")]
    public_url: Option<String>,
    /// Run as a node of a cluster: several servers on one PostgreSQL (--database-url), with
    /// deliveries between them over this NATS (nats://host:4222).
    #[arg(long, env = "DROVER_NATS_URL")]
    nats_url: Option<String>,
    /// This node's name in the cluster (default: one made on first start and kept in the data
    /// directory).
    #[arg(long, env = "DROVER_NODE_NAME")]
    node_name: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let log_file = match &cli.command {
        Command::Agent(args) => args.log_file.clone(),
        _ => None,
    };
    let _log_guard = init_logging(cli.log_format, log_file.as_deref());
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Server(args) => server(args).await,
            Command::Agent(args) => agent(args).await,
            Command::Up(args) => up(args).await,
            Command::Run(args) => commands::run(args).await,
            Command::Ps(args) => commands::ps(args).await,
            Command::Logs(args) => logs::logs(args).await,
            Command::Stop(args) => commands::act(args, "stop").await,
            Command::Start(args) => commands::act(args, "start").await,
            Command::Rm(args) => commands::act(args, "remove").await,
            Command::Hosts(args) => commands::hosts(args).await,
            Command::Processes(args) => commands::processes(args).await,
            Command::Purge(args) => commands::purge(args).await,
            Command::Events(args) => commands::events(args).await,
            Command::Publish(args) => commands::publish(args).await,
            Command::Keys(command) => commands::keys(command).await,
        }
    })
}

async fn server(args: ServerArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|error| anyhow::anyhow!("cannot listen on {}: {error}", args.listen))?;
    let config = drover_server::Config {
        database_url: args.database_url,
        admin_access_key: args.admin_access_key,
        admin_secret_key: args.admin_secret_key,
        settings: Settings::from_environment(),
        public_url: args.public_url.clone(),
        nats_url: args.nats_url.clone(),
        node_name: args.node_name.clone(),
        ..drover_server::Config::new(args.data_dir)
    };
    let server = drover_server::Server::start(listener, config).await?;
    if let Some(path) = &server.admin_key_file {
        eprintln!(
            "Generated an admin API key; it is in {} (shown once, keep it secret).",
            path.display()
        );
    }
    eprintln!("drover listening on http://{}/v1", server.addr);
    eprintln!("web UI at http://{}/", server.addr);
    let token = server.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        token.cancel();
    });
    server.wait().await;
    Ok(())
}

async fn agent(args: drover_agent::AgentArgs) -> anyhow::Result<()> {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("agent shutting down");
        token.cancel();
    });
    drover_agent::run(args, shutdown).await
}

/// Whether the local agent (its id is in the identity file it writes once registered) became
/// active and has an active host within `limit`: what placing a container needs. (A host is
/// active only once its agent answered its activation; both are checked all the same.)
async fn local_agent_ready(
    store: &drover_store::Store,
    identity: &std::path::Path,
    limit: std::time::Duration,
) -> bool {
    use drover_store::ResourceKind;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let agent_id = std::fs::read_to_string(identity)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|identity| {
                identity["agentId"]
                    .as_str()
                    .and_then(|id| id.strip_prefix("1ag"))
                    .and_then(|id| id.parse::<i64>().ok())
            });
        if let Some(agent_id) = agent_id
            && let Ok(Some(agent)) = store.get_resource(ResourceKind::Agent, agent_id).await
            && agent.state == "active"
        {
            for host_id in store.hosts_of_agent(agent_id).await.unwrap_or_default() {
                if let Ok(Some(host)) = store.get_resource(ResourceKind::Host, host_id).await
                    && host.state == "active"
                {
                    return true;
                }
            }
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// `drover up`: the server on the embedded store and one local agent in this process.
async fn up(args: ServerArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|error| anyhow::anyhow!("cannot listen on {}: {error}", args.listen))?;
    let data_dir = args.data_dir.clone();
    let given_keys = args
        .admin_access_key
        .clone()
        .zip(args.admin_secret_key.clone());
    let config = drover_server::Config {
        database_url: args.database_url,
        admin_access_key: args.admin_access_key,
        admin_secret_key: args.admin_secret_key,
        settings: Settings::from_environment(),
        public_url: args.public_url.clone(),
        nats_url: args.nats_url.clone(),
        node_name: args.node_name.clone(),
        ..drover_server::Config::new(&data_dir)
    };
    let server = drover_server::Server::start(listener, config).await?;
    let port = server.addr.port();
    let url = format!("http://127.0.0.1:{port}");
    let state_dir = data_dir.join("agent");
    let registration_token = if state_dir.join("identity.json").exists() {
        None
    } else {
        let project = server.state.default_project.id;
        let key = server
            .state
            .store
            .create_key(
                project,
                drover_store::CredentialKind::RegistrationToken,
                Some("drover up"),
                None,
            )
            .await?;
        Some(format!(
            "{}:{}",
            key.credential.public_value, key.secret_value
        ))
    };
    let keys = match (&server.bootstrap.generated_admin_key, given_keys) {
        (Some(key), _) => Some((
            key.credential.public_value.clone(),
            key.secret_value.clone(),
        )),
        (None, Some(keys)) => Some(keys),
        (None, None) => read_admin_key_file(&data_dir.join("admin-key.env")),
    };
    let shutdown = server.shutdown_token();
    let agent_shutdown = tokio_util::sync::CancellationToken::new();
    let agent_args = drover_agent::AgentArgs {
        url: Some(url.clone()),
        registration_token,
        access_key: None,
        secret_key: None,
        state_dir,
        name: None,
        health_port: None,
        log_file: None,
        workers: 16,
    };
    let agent_token = agent_shutdown.clone();
    let agent_task = tokio::spawn(async move {
        if let Err(error) = drover_agent::run(agent_args, agent_token).await {
            tracing::error!(%error, "the local agent stopped");
        }
    });
    // Ready means ready: wait (bounded) until the local agent answered its activation and its
    // host is active, so that a container created at once is placed at once.
    let identity = data_dir.join("agent").join("identity.json");
    let ready = local_agent_ready(
        &server.state.store,
        &identity,
        std::time::Duration::from_secs(60),
    )
    .await;
    eprintln!();
    if ready {
        eprintln!(
            "drover is up: server {url}/v1 with one local agent, ready (data in {})",
            data_dir.display()
        );
    } else {
        eprintln!(
            "drover is running (server {url}/v1, data in {}), but its local agent is not active yet: \
             containers wait until it is; see `drover hosts` and `drover processes`",
            data_dir.display()
        );
    }
    match &keys {
        Some((access, secret)) => {
            eprintln!();
            eprintln!(
                "Admin key (also in {}):",
                data_dir.join("admin-key.env").display()
            );
            println!(
                "export CATTLE_URL={url}/v1 CATTLE_ACCESS_KEY={access} CATTLE_SECRET_KEY={secret}"
            );
        }
        None => eprintln!(
            "Admin key: the one you set with DROVER_ADMIN_ACCESS_KEY / DROVER_ADMIN_SECRET_KEY"
        ),
    }
    eprintln!();
    eprintln!("Web UI: {url}/ (log in with the admin key above)");
    eprintln!();
    eprintln!("Try, in another terminal after the export above:");
    eprintln!("  drover run --name hello --wait -- sleep 600");
    eprintln!("  drover ps");
    eprintln!("  drover rm hello --wait");
    eprintln!();
    eprintln!(
        "Ctrl-C stops the server and the agent (started processes keep running; `drover rm` them first)."
    );
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        agent_shutdown.cancel();
        let _ = agent_task.await;
        shutdown.cancel();
    });
    server.wait().await;
    Ok(())
}

fn read_admin_key_file(path: &std::path::Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string(path).ok()?;
    let value = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_owned)
    };
    Some((value("CATTLE_ACCESS_KEY")?, value("CATTLE_SECRET_KEY")?))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Logs to stderr, or to a daily-rotated file (seven kept) when `log_file` is given; the
/// returned guard flushes the file on exit.
fn init_logging(
    format: LogFormat,
    log_file: Option<&std::path::Path>,
) -> Option<tracing_appender::non_blocking::WorkerGuard> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DROVER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = match log_file {
        Some(path) => {
            let dir = path
                .parent()
                .filter(|dir| !dir.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            let prefix = path
                .file_name()
                .and_then(|name| name.to_str())
                .unwrap_or("drover.log");
            let appender = tracing_appender::rolling::Builder::new()
                .rotation(tracing_appender::rolling::Rotation::DAILY)
                .filename_prefix(prefix)
                .max_log_files(7)
                .build(dir)
                .unwrap_or_else(|error| panic!("cannot open log file {}: {error}", path.display()));
            let (writer, guard) = tracing_appender::non_blocking(appender);
            (
                tracing_subscriber::fmt::writer::BoxMakeWriter::new(writer),
                Some(guard),
            )
        }
        None => (
            tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
            None,
        ),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(log_file.is_none());
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    guard
}
