//! A `resource.change` subscriber built on the drover client library: the Rust counterpart of
//! the original's "scale-subscriber" walk-through, as an extension that watches.
//!
//! The server keeps every service at its `scale` itself. This extension only follows
//! `resource.change` for services and containers and keeps its own view: per service, the
//! scale it asks for (0 unless it is active) and the containers running in it (`serviceId`).
//! Where they disagree — a service scaling, a container restarting, a crash loop waiting out
//! its backoff — it logs the drift, and serves the whole view as JSON on its health port
//! (`GET /drift`), next to `GET /healthz` (200 while subscribed). It never changes anything:
//! the pattern for monitoring and alerting extensions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use drover_client::{Client, ResourceChange, RouterBuilder};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// One service as the watcher sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    /// The service's API id.
    pub service: String,
    /// Its name.
    pub name: String,
    /// Its state.
    pub state: String,
    /// How many containers it asks for: its scale while active, else 0.
    pub wanted: i64,
    /// How many of its containers run.
    pub running: i64,
}

impl Drift {
    /// Running minus wanted: negative while containers are missing, positive while extra ones
    /// are still being stopped or removed, 0 at scale.
    pub fn drift(&self) -> i64 {
        self.running - self.wanted
    }

    /// As JSON, for `GET /drift`.
    pub fn to_json(&self) -> Value {
        json!({
            "service": self.service,
            "name": self.name,
            "state": self.state,
            "wanted": self.wanted,
            "running": self.running,
            "drift": self.drift(),
        })
    }
}

#[derive(Debug, Default)]
struct View {
    /// Service id → (name, state, scale).
    services: HashMap<String, (String, String, i64)>,
    /// Container id → (service id, running).
    containers: HashMap<String, (String, bool)>,
    /// The drift last logged per service.
    logged: HashMap<String, i64>,
}

impl View {
    fn apply(&mut self, kind: &str, id: &str, resource: &Value, only_if_new: bool) {
        let state = resource["state"].as_str().unwrap_or("");
        let gone = matches!(state, "removed" | "purging" | "purged");
        match kind {
            "service" => {
                if only_if_new && self.services.contains_key(id) {
                    return;
                }
                if gone {
                    self.services.remove(id);
                    self.logged.remove(id);
                } else {
                    let name = resource["name"].as_str().unwrap_or(id).to_owned();
                    let scale = resource["scale"].as_i64().unwrap_or(0);
                    self.services
                        .insert(id.to_owned(), (name, state.to_owned(), scale));
                }
            }
            "container" => {
                if only_if_new && self.containers.contains_key(id) {
                    return;
                }
                match resource["serviceId"].as_str() {
                    Some(service) if !gone => {
                        self.containers
                            .insert(id.to_owned(), (service.to_owned(), state == "running"));
                    }
                    _ => {
                        self.containers.remove(id);
                    }
                }
            }
            _ => {}
        }
    }

    fn drift(&self, service: &str) -> Option<Drift> {
        let (name, state, scale) = self.services.get(service)?;
        let running = self
            .containers
            .values()
            .filter(|(of, running)| of == service && *running)
            .count() as i64;
        Some(Drift {
            service: service.to_owned(),
            name: name.clone(),
            state: state.clone(),
            wanted: if state == "active" { *scale } else { 0 },
            running,
        })
    }

    /// Logs a service's drift when it changed since last logged.
    fn log(&mut self, service: &str) {
        let Some(drift) = self.drift(service) else {
            return;
        };
        if self.logged.insert(service.to_owned(), drift.drift()) != Some(drift.drift()) {
            if drift.drift() == 0 {
                tracing::info!(service, name = %drift.name, running = drift.running, "at scale");
            } else {
                tracing::info!(
                    service,
                    name = %drift.name,
                    wanted = drift.wanted,
                    running = drift.running,
                    drift = drift.drift(),
                    "drifting"
                );
            }
        }
    }
}

/// The watcher's view, shared with the health port and tests. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Watch {
    view: Arc<Mutex<View>>,
    version: Arc<watch::Sender<u64>>,
}

impl Watch {
    fn new() -> Watch {
        Watch {
            view: Arc::default(),
            version: Arc::new(watch::Sender::new(0)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, View> {
        self.view
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn apply(&self, kind: &str, id: &str, resource: &Value, only_if_new: bool) {
        {
            let mut view = self.lock();
            view.apply(kind, id, resource, only_if_new);
            let service = match kind {
                "service" => Some(id.to_owned()),
                _ => resource["serviceId"].as_str().map(str::to_owned),
            };
            if let Some(service) = service {
                view.log(&service);
            }
        }
        self.version.send_modify(|version| *version += 1);
    }

    /// A service as seen now.
    pub fn drift(&self, service: &str) -> Option<Drift> {
        self.lock().drift(service)
    }

    /// Every service as seen now, by id.
    pub fn all(&self) -> Vec<Drift> {
        let view = self.lock();
        let mut ids: Vec<&String> = view.services.keys().collect();
        ids.sort();
        ids.into_iter().filter_map(|id| view.drift(id)).collect()
    }

    /// Changes of the view (a counter), to wait on.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}

/// Subscribes to `resource.change`, then reads the services and containers there already are
/// (what a change has already told it is kept), and keeps watching until `shutdown`. Returns
/// the view and the router's connection count (for the health check).
pub async fn run(
    client: Client,
    shutdown: CancellationToken,
) -> anyhow::Result<(Watch, watch::Receiver<u64>)> {
    let watch = Watch::new();
    let on_change = watch.clone();
    let router = RouterBuilder::new(client.clone())
        .on_resource_change(move |change: ResourceChange| {
            let watch = on_change.clone();
            async move {
                watch.apply(
                    &change.resource_type,
                    &change.resource_id,
                    &change.resource,
                    false,
                );
            }
        })
        .build();
    let mut connections = router.connections();
    tokio::spawn(async move {
        if let Err(error) = router.run(shutdown).await {
            tracing::error!(%error, "subscriber stopped");
        }
    });
    connections.wait_for(|n| *n > 0).await?;
    for (collection, kind) in [
        ("services?state_ne=removed&limit=1000", "service"),
        (
            "containers?serviceId_notnull=true&state_ne=removed&limit=1000",
            "container",
        ),
    ] {
        let list = client.get(collection).await?;
        for resource in list["data"].as_array().into_iter().flatten() {
            let id = resource["id"].as_str().unwrap_or_default();
            watch.apply(kind, id, resource, true);
        }
    }
    Ok((watch, connections))
}
