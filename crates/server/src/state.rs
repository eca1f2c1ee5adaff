//! [`AppState`]: what every handler and background task shares.

use drover_store::{Account, Store};

use drover_engine::EngineHandle;

use crate::auth::KeyCache;
use crate::changes::Changes;
use crate::cleanup::Cleanup;
use crate::container_events::EventWorker;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::settings::Settings;

/// The server's shared state, behind one reference count: a handler's clone is one atomic
/// increment, not one per handle.
#[derive(Debug, Clone)]
pub struct AppState(std::sync::Arc<Shared>);

impl AppState {
    /// Shares `shared`.
    pub fn new(shared: Shared) -> AppState {
        AppState(std::sync::Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] shares: cheap-clone handles only.
#[derive(Debug)]
pub struct Shared {
    /// The active external handlers (the engine's and the planner's view).
    pub external: drover_engine::Registry,
    /// The database.
    pub store: Store,
    /// The event hub.
    pub hub: Hub,
    /// The live settings.
    pub settings: Settings,
    /// Verified keys.
    pub keys: KeyCache,
    /// Counters and gauges.
    pub metrics: Metrics,
    /// The `Default` project, where unscoped requests of the admin act.
    pub default_project: Account,
    /// Wakes the process engine when work is scheduled.
    pub engine: EngineHandle,
    /// `state.change` / `resource.change` publication.
    pub changes: Changes,
    /// The `table.cleanup` job (runs on demand too).
    pub cleanup: Cleanup,
    /// Wakes the worker that handles posted container and service events.
    pub events: EventWorker,
    /// Subscriber sockets against `api.sub.max.connections`.
    pub subscriber_slots: crate::ws::Slots,
    /// This node's membership of its cluster (a single server is a cluster of one).
    pub cluster: std::sync::Arc<crate::cluster::Cluster>,
    /// Issues and checks the log sockets' tokens (`?action=logs`).
    pub log_tokens: crate::logs::LogTokens,
}
