//! drover's server: the REST API, the WebSocket event bus, authentication and metrics.
//!
//! # Layout
//! - [`Server::start`] / [`run`]: open the store, bootstrap the admin, serve until shut down.
//! - [`hub`]: exact-name routing of events to subscribers (the fan-out hot path) and calls
//!   that wait for replies.
//! - [`ws`]: the subscribe endpoint, one task per socket.
//! - `api`: the HTTP resources (`/v1`, publish, apikeys, projects, accounts, healthz, metrics).
//! - [`auth`]: Basic auth with cached key checks, and the access policy (who may subscribe to
//!   and publish what).
//! - [`settings`]: tunables with defaults, environment overrides and stored values.
//! - [`metrics`]: Prometheus counters and gauges.
//! - [`container_events`]: the worker that reconciles instances with what agents report.
//! - [`cleanup`]: the `table.cleanup` job (purge of old events, processes and resources).
//! - [`services`]: the service reconciler, which keeps every service at its scale.

pub mod api;
pub mod auth;
pub mod changes;
pub mod cleanup;
pub mod cluster;
pub mod container_events;
pub mod error;
pub mod hub;
pub mod logs;
pub mod metrics;
pub mod monitor;
pub mod services;
pub mod settings;
pub mod state;
pub mod ws;

/// Entry points for the fuzz targets (`crates/fuzz`): the API's query parsers, which are
/// otherwise private to their handlers. Not an API of this crate.
#[doc(hidden)]
pub mod fuzzing {
    use drover_store::{ListQuery, ProcessFilter};

    use crate::api::schema::TypeSchema;
    use crate::error::ApiError;

    /// The filters and paging of `GET /v1/<collection>` for a resource type.
    pub fn list_query(
        schema: &TypeSchema,
        project: i64,
        raw: Option<&str>,
    ) -> Result<ListQuery, ApiError> {
        crate::api::resources::list_query(schema, project, raw)
    }

    /// The filters and paging of `GET /v1/processinstances`.
    pub fn process_filter(raw: Option<&str>) -> Result<ProcessFilter, ApiError> {
        crate::api::processes::filter(raw)
    }

    /// A list's `pagination`, whose `next` link repeats the query with the next marker.
    pub fn pagination(
        path: &str,
        raw: Option<&str>,
        limit: i64,
        next_marker: Option<i64>,
    ) -> serde_json::Value {
        crate::api::resources::pagination(path, raw, limit, next_marker)
    }
}

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use drover_engine::Engine;
use drover_store::{Bootstrap, Store, StoreOptions};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::KeyCache;
use crate::changes::{Changes, EngineBus};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::state::AppState;

/// How to run a server.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the embedded database and generated files live.
    pub data_dir: PathBuf,
    /// `postgres://…` to use PostgreSQL instead of the embedded SQLite file.
    pub database_url: Option<String>,
    /// PostgreSQL only: the schema to work in (tests use one each).
    pub database_schema: Option<String>,
    /// The admin's access key, if set by the operator.
    pub admin_access_key: Option<String>,
    /// The admin's secret key, if set by the operator.
    pub admin_secret_key: Option<String>,
    /// Setting overrides, as from `DROVER_*` environment variables.
    pub settings: Vec<(String, String)>,
    /// The URL clients reach the server at, for links in events (`resource.change`);
    /// by default `http://<listen address>`.
    pub public_url: Option<String>,
    /// `nats://…`: run as a node of a cluster (several servers on one PostgreSQL).
    pub nats_url: Option<String>,
    /// The node's name; by default the one kept in the data directory (made on first start).
    pub node_name: Option<String>,
}

impl Config {
    /// A configuration with the embedded store in `data_dir` and nothing else set.
    pub fn new(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            data_dir: data_dir.into(),
            database_url: None,
            database_schema: None,
            admin_access_key: None,
            admin_secret_key: None,
            settings: Vec::new(),
            public_url: None,
            nats_url: None,
            node_name: None,
        }
    }

    fn store_options(&self) -> StoreOptions {
        match &self.database_url {
            Some(url) => StoreOptions {
                pg_schema: self.database_schema.clone(),
                ..StoreOptions::url(url.clone())
            },
            None => StoreOptions::sqlite_file(&self.data_dir.join("drover.db")),
        }
    }
}

/// Why a server did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory could not be created or written.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The store could not be opened, migrated or bootstrapped.
    #[error(transparent)]
    Store(#[from] drover_store::Error),
    /// A setting override is unknown or invalid.
    #[error(transparent)]
    Setting(#[from] settings::SettingError),
    /// Only one of the admin access key and secret key was given.
    #[error("set both DROVER_ADMIN_ACCESS_KEY and DROVER_ADMIN_SECRET_KEY, or neither")]
    HalfAdminKey,
    /// The listener has no local address.
    #[error("listener: {0}")]
    Listener(std::io::Error),
    /// The node could not join its cluster.
    #[error(transparent)]
    Cluster(#[from] cluster::JoinError),
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its shared state (store, hub, settings), for tests and embedding.
    pub state: AppState,
    /// What bootstrap found or made.
    pub bootstrap: Bootstrap,
    /// Where a generated admin key was written, if one was generated on this start.
    pub admin_key_file: Option<PathBuf>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Server {
    /// Opens the store, bootstraps the admin and starts serving on `listener`.
    pub async fn start(listener: TcpListener, config: Config) -> Result<Server, StartError> {
        let addr = listener.local_addr().map_err(StartError::Listener)?;
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let store = Store::connect(&config.store_options()).await?;
        if store.autovacuum_off().await? {
            tracing::warn!(
                "PostgreSQL autovacuum is off: table.cleanup vacuums the tables it cleans at \
                 every run; other tables grow until vacuumed"
            );
        }
        let admin_key = match (&config.admin_access_key, &config.admin_secret_key) {
            (Some(access), Some(secret)) => Some((access.as_str(), secret.as_str())),
            (None, None) => None,
            _ => return Err(StartError::HalfAdminKey),
        };
        let bootstrap = store.bootstrap(admin_key).await?;
        let admin_key_file = match &bootstrap.generated_admin_key {
            Some(key) => Some(
                write_admin_key(
                    &config.data_dir,
                    addr,
                    &key.credential.public_value,
                    &key.secret_value,
                )
                .map_err(|source| StartError::DataDir {
                    path: config.data_dir.clone(),
                    source,
                })?,
            ),
            None => None,
        };
        let settings = Settings::new(&config.settings, &store.list_settings().await?)?;
        let shutdown = CancellationToken::new();
        let metrics = Metrics::new();
        let hub = Hub::new(metrics.clone(), shutdown.child_token());
        let external = drover_engine::Registry::new();
        external.reload(&store).await?;
        let changes = Changes::new(hub.clone(), external.clone());
        let node = format!("node-{}", uuid::Uuid::new_v4().simple());
        let public_url = config.public_url.clone().unwrap_or_else(|| {
            let host = if addr.ip().is_unspecified() {
                format!("localhost:{}", addr.port())
            } else {
                addr.to_string()
            };
            format!("http://{host}")
        });
        let node_name = match &config.node_name {
            Some(name) => name.clone(),
            None => node_name(&config.data_dir).map_err(|source| StartError::DataDir {
                path: config.data_dir.clone(),
                source,
            })?,
        };
        // Membership has its own small pool on PostgreSQL, so a busy API or writer never holds
        // up a heartbeat past the node's TTL (SQLite has one server only).
        let membership = match store.backend() {
            drover_store::Backend::Postgres => {
                Store::connect(&StoreOptions {
                    max_connections: 2,
                    ..config.store_options()
                })
                .await?
            }
            drover_store::Backend::Sqlite => store.clone(),
        };
        let cluster = cluster::Cluster::join(
            membership.clone(),
            &cluster::ClusterOptions {
                nats_url: config.nats_url.clone(),
                node_name,
                address: public_url.clone(),
            },
            &node,
            &hub,
            &settings,
        )
        .await?;
        let engine = Arc::new(
            Engine::new(
                store.clone(),
                Arc::new(EngineBus {
                    hub: hub.clone(),
                    changes: changes.clone(),
                }),
                settings.engine(),
                node,
                shutdown.child_token(),
            )
            .with_external(external.clone()),
        );
        let log_tokens = logs::LogTokens::load(&store).await?;
        let (subscriber_slots, open_files) =
            ws::Slots::from_nofile(settings.uint("api.sub.max.connections"));
        let header_timeout = Duration::from_millis(settings.uint("api.http.header.timeout.millis"));
        let state = AppState::new(state::Shared {
            hub,
            store,
            settings,
            keys: KeyCache::default(),
            metrics,
            default_project: bootstrap.default_project.clone(),
            engine: engine.handle(),
            changes: changes.clone(),
            cleanup: cleanup::Cleanup::default(),
            events: container_events::EventWorker::default(),
            subscriber_slots,
            cluster: cluster.clone(),
            external,
            log_tokens,
        });
        {
            let state = state.clone();
            cluster.on_hints(Box::new(move |hint| on_hint(&state, hint)));
        }
        // The node leaves the cluster (releasing its leases) only after its engine stopped.
        let cluster_stop = CancellationToken::new();
        let cluster_task = tokio::spawn(cluster.clone().run(
            state.settings.clone(),
            state.engine.clone(),
            cluster_stop.clone(),
        ));
        {
            // A node whose name another process took over stops.
            let cluster = cluster;
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = cluster.fatal() => shutdown.cancel(),
                    () = shutdown.cancelled() => {}
                }
            });
        }
        {
            // The external handlers' reloader: after a change here (the other nodes are told,
            // and this node reads the store back, which settles two changes that raced), on
            // another node's hint, and every 30 s in case a hint was lost.
            let (changes, cluster, shutdown, state) = (
                changes.clone(),
                state.cluster.clone(),
                shutdown.clone(),
                state.clone(),
            );
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = changes.external_changed() => cluster.handlers_changed(),
                        () = state.external.reload_wanted() => {}
                        () = tokio::time::sleep(Duration::from_secs(30)) => {}
                        () = shutdown.cancelled() => return,
                    }
                    if let Err(error) = state.external.reload(&state.store).await {
                        tracing::warn!(%error, "reloading external handlers failed");
                    }
                }
            });
        }
        let engine_task = tokio::spawn(engine.run());
        let monitor_task = tokio::spawn(monitor::run(state.clone(), shutdown.child_token()));
        let events_task =
            tokio::spawn(container_events::run(state.clone(), shutdown.child_token()));
        let cleanup_task = tokio::spawn(cleanup::run(state.clone(), shutdown.child_token()));
        let services_task = tokio::spawn(services::run(state.clone(), shutdown.child_token()));
        let changes_task = tokio::spawn(changes.run(
            state.store.clone(),
            state.settings.clone(),
            public_url.trim_end_matches('/').to_owned(),
            shutdown.child_token(),
        ));
        let app = api::router(state.clone());
        let serve_shutdown = shutdown.clone();
        let serve_state = state.clone();
        let task = tokio::spawn(async move {
            serve(listener, app, header_timeout, serve_shutdown).await;
            serve_state.hub.close_all();
            let _ = engine_task.await;
            let _ = monitor_task.await;
            let _ = events_task.await;
            let _ = cleanup_task.await;
            let _ = services_task.await;
            let _ = changes_task.await;
            cluster_stop.cancel();
            let _ = cluster_task.await;
            if serve_state.store.backend() == drover_store::Backend::Postgres {
                membership.close().await;
            }
            // Sockets were told to close (going away); give them a moment to say so.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while serve_state.hub.topic_count() > 1 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            serve_state.store.close().await;
        });
        tracing::info!(
            %addr,
            backend = ?state.store.backend(),
            open_files,
            max_subscribers = ws::connection_limit(&state),
            "drover server listening"
        );
        Ok(Server {
            addr,
            state,
            bootstrap,
            admin_key_file,
            shutdown,
            task,
        })
    }

    /// A token that stops the server when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops the server: closes sockets with "going away", finishes requests, closes the store.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }

    /// Waits until the server has stopped.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Serves HTTP/1.1 on `listener` until `shutdown`, then lets open requests finish.
///
/// Like `axum::serve`, plus what it cannot set: a connection whose request headers are not
/// complete within `header_timeout` (from its start, or from its previous response) is closed,
/// so slow or idle clients do not keep descriptors.
async fn serve(
    listener: TcpListener,
    app: axum::Router,
    header_timeout: Duration,
    shutdown: CancellationToken,
) {
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let tcp = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => tcp,
                Err(error) if is_connection_error(&error) => continue,
                Err(error) => {
                    // Out of descriptors (EMFILE) and the like: wait for some to be freed.
                    tracing::error!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Batches are formed in the application (ws.rs); Nagle's delay on top only adds
        // latency.
        let _ = tcp.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout);
            let connection = builder
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .with_upgrades();
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Accept errors that concern one connection only (the next accept is fine).
fn is_connection_error(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// Runs a server on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let server = Server::start(listener, config).await?;
    let token = server.shutdown_token();
    tokio::select! {
        () = shutdown => token.cancel(),
        () = token.cancelled() => {}
    }
    server.stop().await;
    Ok(())
}

/// What this node does with another node's hint.
fn on_hint(state: &AppState, hint: cluster::Hint) {
    match hint {
        cluster::Hint::Settings => {
            let state = state.clone();
            tokio::spawn(async move {
                match state.store.list_settings().await {
                    Ok(stored) => state.settings.reload_stored(&stored),
                    Err(error) => tracing::warn!(%error, "reloading settings failed"),
                }
            });
        }
        cluster::Hint::Forget(access_key) => state.keys.forget(&access_key),
        cluster::Hint::Work => state.engine.wake(),
        cluster::Hint::Handlers => state.external.want_reload(),
        // Only the leader reconciles services; a node that does not lead forwards nothing
        // it was told, so hints never go round.
        cluster::Hint::Services(ids) if state.cluster.is_leader() => {
            let wakeups = state.changes.services();
            if ids.is_empty() {
                wakeups.mark_all();
            }
            for id in ids {
                wakeups.mark(id);
            }
        }
        cluster::Hint::Services(_) => {}
        cluster::Hint::Subscribed(_) => {}
    }
}

/// The node's name kept in `data_dir/node-name`: made on first start from the host name and
/// a random suffix, so restarts of the same server are the same node and two servers with
/// their own data directories never share a name.
fn node_name(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join("node-name");
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => Ok(text.trim().to_owned()),
        Ok(_) => make_node_name(&path),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => make_node_name(&path),
        Err(error) => Err(error),
    }
}

fn make_node_name(path: &Path) -> std::io::Result<String> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|text| text.trim().to_owned())
        .filter(|text| !text.is_empty())
        .unwrap_or_else(|| "drover".to_owned());
    let name = format!("{host}-{:04x}", rand::random::<u16>());
    std::fs::write(path, format!("{name}\n"))?;
    Ok(name)
}

/// Writes a generated admin key where the operator can find it (mode 0600).
fn write_admin_key(
    data_dir: &Path,
    addr: SocketAddr,
    access_key: &str,
    secret_key: &str,
) -> std::io::Result<PathBuf> {
    let path = data_dir.join("admin-key.env");
    let host = if addr.ip().is_unspecified() {
        format!("localhost:{}", addr.port())
    } else {
        addr.to_string()
    };
    let text = format!(
        "# The drover admin key, generated on first start. Keep it secret.\n\
         # Use it with: set -a; . {}; set +a\n\
         CATTLE_URL=http://{host}/v1\nCATTLE_ACCESS_KEY={access_key}\nCATTLE_SECRET_KEY={secret_key}\n",
        path.display()
    );
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    std::io::Write::write_all(&mut options.open(&path)?, text.as_bytes())?;
    Ok(path)
}
