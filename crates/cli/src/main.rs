//! The `drover` binary: one command for the server and, in time, the agent and user commands.
//! It parses flags, sets up logging and calls into the library crates; nothing else lives here.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

mod commands;
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
    /// Tail the live event stream the key may see.
    Events(commands::EventsArgs),
    /// Publish one event.
    Publish(commands::PublishArgs),
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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Server(args) => server(args).await,
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
    let token = server.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        token.cancel();
    });
    server.wait().await;
    Ok(())
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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DROVER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
