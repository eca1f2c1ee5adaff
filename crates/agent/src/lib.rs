//! drover's host agent.
//!
//! # Layout
//! - [`identity`]: who this agent is — kept in its state directory, so a restart is the same
//!   host; obtained by registering with a registration token, or taken from `CATTLE_*` keys.
//! - [`driver`]: the [`driver::Driver`] trait and the default [`driver::LocalDriver`], which runs
//!   an instance as a supervised local process and a volume as a directory.
//! - [`handlers`]: the event handlers (`compute.instance.*`, `storage.volume.*`, `ping`,
//!   `config.update`), idempotent: check, lock, act, re-check.
//! - [`logs`]: log followers, which stream an instance's output to the server (`instance.logs`).
//! - [`run`]: wires them to the client library's event router, serves the health port.

pub mod driver;
pub mod handlers;
pub mod identity;
pub mod logs;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use drover_client::{Client, RouterBuilder};
use tokio_util::sync::CancellationToken;

/// How to run the agent.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// The server's URL, or the URLs of a cluster's nodes, comma-separated
    /// (`http://a:8080,http://b:8080`): the agent stays with one while it works and moves to
    /// the next when it fails. Default: the URL the identity in the state directory was
    /// registered with, else http://localhost:8080.
    #[arg(long, env = "CATTLE_URL")]
    pub url: Option<String>,
    /// A project's registration token (`ACCESSKEY:SECRET`), used when the agent has no keys yet.
    #[arg(long, env = "DROVER_REGISTRATION_TOKEN", hide_env_values = true)]
    pub registration_token: Option<String>,
    /// Existing agent keys (instead of registering).
    #[arg(long, env = "CATTLE_ACCESS_KEY")]
    pub access_key: Option<String>,
    /// The secret of `--access-key`.
    #[arg(long, env = "CATTLE_SECRET_KEY", hide_env_values = true)]
    pub secret_key: Option<String>,
    /// Where the agent keeps its identity, instances and volumes.
    #[arg(long, env = "DROVER_AGENT_STATE_DIR", default_value = "./drover-agent")]
    pub state_dir: PathBuf,
    /// The host's name (default: the machine's hostname).
    #[arg(long, env = "DROVER_AGENT_NAME")]
    pub name: Option<String>,
    /// Serve `GET /healthz` (200 while subscribed) and `GET /metrics` (log streams) on this
    /// port.
    #[arg(long, env = "DROVER_AGENT_HEALTH_PORT")]
    pub health_port: Option<u16>,
    /// Log to this file (rotated daily, seven kept) instead of stderr.
    #[arg(long, env = "DROVER_AGENT_LOG_FILE")]
    pub log_file: Option<PathBuf>,
    /// Handlers run at once.
    #[arg(long, env = "DROVER_AGENT_WORKERS", default_value_t = 16)]
    pub workers: usize,
}

/// The server URL when neither `--url` nor a stored identity gives one.
pub const DEFAULT_URL: &str = "http://localhost:8080";

/// Runs the agent until `shutdown` is cancelled: registers if it must, subscribes (and
/// resubscribes after any failure), handles events, serves its health port.
pub async fn run(args: AgentArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.state_dir)?;
    let identity = identity::establish(&args).await?;
    tracing::info!(agent = %identity.agent_id, url = %identity.url, "agent identity");
    let client = Client::new(&identity.url, &identity.access_key, &identity.secret_key)?;
    let (exits, exit_reports) = tokio::sync::mpsc::channel(EXIT_QUEUE);
    let driver = Arc::new(
        driver::LocalDriver::new(args.state_dir.clone(), identity.url.clone())?
            .with_exit_reports(exits),
    );
    driver.adopt().await;
    let reporter = tokio::spawn(report_exits(
        client.clone(),
        identity.host_key.clone(),
        exit_reports,
        shutdown.clone(),
    ));
    let agent = Arc::new(handlers::Agent::new(
        driver,
        client.clone(),
        shutdown.child_token(),
    ));
    let followers = agent.followers();
    let mut builder = RouterBuilder::new(client)
        .agent_id(identity.agent_id.clone())
        .workers(args.workers.max(1));
    builder = handlers::register(builder, agent);
    let router = builder.build();
    let connections = router.connections();
    let health = args.health_port.map(|port| {
        tokio::spawn(serve_health(
            SocketAddr::from(([0, 0, 0, 0], port)),
            connections,
            followers.clone(),
            shutdown.clone(),
        ))
    });
    let result = router.run(shutdown.clone()).await;
    if let Some(health) = health {
        health.abort();
    }
    reporter.abort();
    result.map_err(Into::into)
}

/// Fault injection, for tests only: with `DROVER_AGENT_FAULT=<point>` the agent kills itself
/// with SIGKILL (no clean-up, nothing flushed, as `kill -9` would) when it reaches that point.
/// The points: `crash-after-spawn` (an instance's process started, not yet recorded) and
/// `exit-before-reply` (an instance started and recorded, the reply not yet sent). Off unless
/// the variable is set; never set it in production (`drover agent --help` does not list it).
pub(crate) fn fault_point(point: &str) {
    if std::env::var("DROVER_AGENT_FAULT").is_ok_and(|fault| fault == point) {
        tracing::warn!(point, "DROVER_AGENT_FAULT: killing the agent");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
        // SIGKILL cannot be caught; should it somehow not be delivered, still never go on.
        std::process::abort();
    }
}

/// Fault injection, for tests only: with `DROVER_AGENT_FAULT=pause-before-recheck` a start
/// waits half a second between spawning an instance's process and checking that it runs, so
/// that a command which exits by itself has ended by then (the case a test cannot otherwise
/// bring about on purpose).
pub(crate) async fn fault_pause(point: &str) {
    if std::env::var("DROVER_AGENT_FAULT").is_ok_and(|fault| fault == point) {
        tracing::warn!(point, "DROVER_AGENT_FAULT: pausing");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Exits waiting to be reported; past it they are left to the next ping.
const EXIT_QUEUE: usize = 256;

/// Posts each unexpected exit as a container event (`die`), so the server stops the container
/// at once. A report that cannot be delivered after a few tries is dropped: the next ping's
/// instance report tells the server the same.
async fn report_exits(
    client: Client,
    host_key: String,
    mut exits: tokio::sync::mpsc::Receiver<driver::Exit>,
    shutdown: CancellationToken,
) {
    loop {
        let exit = tokio::select! {
            exit = exits.recv() => match exit { Some(exit) => exit, None => return },
            () = shutdown.cancelled() => return,
        };
        // `data` carries what the container keeps of how it ended (`exitCode`,
        // `finishedAt`, `agentMessage`).
        let mut body = serde_json::json!({
            "externalId": exit.id,
            "externalStatus": "die",
            "externalFrom": "drover-agent",
            "externalTimestamp": exit.at / 1000,
            "data": handlers::report(exit.status),
        });
        if !host_key.is_empty() {
            body["reportedHostUuid"] = serde_json::json!(host_key);
        }
        for attempt in 1..=3u64 {
            match client.post("containerevents", &body).await {
                Ok(_) => break,
                // Refused (not our host, too many pending): trying again will not help.
                Err(drover_client::Error::Api {
                    status,
                    code,
                    message,
                }) if status < 500 => {
                    tracing::warn!(instance = %exit.id, status, %code, %message, "container event refused");
                    break;
                }
                Err(error) => {
                    tracing::warn!(instance = %exit.id, %error, attempt, "posting a container event failed");
                    tokio::time::sleep(std::time::Duration::from_secs(attempt)).await;
                }
            }
        }
    }
}

async fn serve_health(
    addr: SocketAddr,
    connections: tokio::sync::watch::Receiver<u64>,
    followers: Arc<logs::Followers>,
    shutdown: CancellationToken,
) {
    let metrics = axum::routing::get(move || {
        let followers = followers.clone();
        async move {
            format!(
                "# HELP drover_agent_log_followers Log streams this agent runs now.\n\
                 # TYPE drover_agent_log_followers gauge\n\
                 drover_agent_log_followers {}\n\
                 # HELP drover_agent_log_followers_started_total Log streams started.\n\
                 # TYPE drover_agent_log_followers_started_total counter\n\
                 drover_agent_log_followers_started_total {}\n",
                followers.running(),
                followers.started()
            )
        }
    });
    let app = axum::Router::new().route("/metrics", metrics).route(
        "/healthz",
        axum::routing::get(move || {
            let connections = connections.clone();
            async move {
                if *connections.borrow() > 0 {
                    (axum::http::StatusCode::OK, "ok\n")
                } else {
                    (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        "not subscribed yet\n",
                    )
                }
            }
        }),
    );
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => {
            tracing::info!(%addr, "agent health check listening");
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await;
        }
        Err(error) => tracing::error!(%addr, %error, "cannot serve the health port"),
    }
}
