//! `state.change` and `resource.change`: how the world learns that resources changed.
//!
//! Every change publishes a raw `state.change` at once. Changes are also recorded per
//! resource and, every `resource.change.interval.millis`, each changed resource is published
//! once as `resource.change`, with the full resource as the API renders it in
//! `data.resource`: a raw copy for admin and service subscribers, and a
//! `resource.change;account=<project>` copy that only that project's subscribers receive.
//!
//! Each tick's events are first written to the store's change log in one statement, which
//! gives each its stream position (`data.position`, cluster-wide, committed in order); a
//! subscriber that reconnects with `?resumeFrom=<position>` is sent the logged events after it
//! (`crate::ws`). The same insert trims the log to `resource.change.retain.count` positions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_engine::{Bus, CallFailure, Registry};
use drover_proto::{Event, ids, names};
use drover_store::{NewChange, Resource, ResourceKind, Store};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::hub::{CallError, Hub};
use crate::settings::Settings;

/// The field of `resource.change`'s `data` that holds its stream position.
pub const POSITION: &str = "position";

/// The most distinct resources waiting to be published; past it the oldest interval's
/// changes are still published, new ones are dropped and counted.
const MAX_PENDING: usize = 100_000;

/// Changed resources waiting for the next `resource.change` tick. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Changes {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    hub: Hub,
    pending: Mutex<HashMap<(ResourceKind, i64), Option<i64>>>,
    /// The active external handlers, updated with every change of one.
    external: Registry,
    /// Signalled when the active external handlers changed (the cluster tells the others).
    external_changed: Notify,
    /// Services whose state or containers changed, for the service reconciler.
    services: crate::services::Wakeups,
}

impl Changes {
    /// A change queue publishing through `hub`, keeping `external` up to date.
    pub fn new(hub: Hub, external: Registry) -> Changes {
        Changes {
            inner: Arc::new(Inner {
                hub,
                pending: Mutex::new(HashMap::new()),
                external,
                external_changed: Notify::new(),
                services: crate::services::Wakeups::default(),
            }),
        }
    }

    /// Resolves at the next change of the active external handlers on this node.
    pub async fn external_changed(&self) {
        self.inner.external_changed.notified().await;
    }

    /// Records a change: `state.change` now, `resource.change` at the next tick. A change of
    /// an external handler takes effect in the engine at once (before the caller answers).
    pub fn changed(&self, resource: &Resource, previous_state: Option<&str>) {
        let api_type = resource.kind.api_type();
        let mut event =
            Event::new("state.change").with_resource(api_type, ids::format(api_type, resource.id));
        event.data = Some(json!({
            "previousState": previous_state,
            "state": resource.state,
            "accountId": resource.account_id.map(|id| ids::format("project", id)),
            "transitioning": resource.transitioning,
        }));
        self.inner.hub.publish(&event);
        self.touched(resource);
    }

    /// Records a change of a resource's fields that moved no state (an update's data, the
    /// service reconciler's status): `resource.change` at the next tick, no `state.change`.
    /// A change of an external handler takes effect in the engine at once.
    pub fn touched(&self, resource: &Resource) {
        if self.inner.external.apply(resource) {
            self.inner.external_changed.notify_one();
        }
        self.inner.services.note(resource);
        let mut pending = self
            .inner
            .pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if pending.len() < MAX_PENDING || pending.contains_key(&(resource.kind, resource.id)) {
            pending.insert((resource.kind, resource.id), resource.account_id);
        } else {
            tracing::warn!("resource.change queue full; a change was dropped");
        }
    }

    /// The services marked for the service reconciler.
    pub fn services(&self) -> &crate::services::Wakeups {
        &self.inner.services
    }

    /// Publishes the coalesced changes every interval until shutdown. `public_url` is the
    /// server's `http://host:port`; the resources' links are under its `/v1` (no request says
    /// which path a subscriber uses).
    pub async fn run(
        self,
        store: Store,
        settings: Settings,
        public_url: String,
        shutdown: CancellationToken,
    ) {
        let base = format!("{public_url}{}", crate::api::ApiVersion::V1.path());
        loop {
            let interval = settings.server().resource_change_interval;
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = shutdown.cancelled() => return,
            }
            let batch: Vec<_> = {
                let mut pending = self
                    .inner
                    .pending
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                pending.drain().collect()
            };
            if !batch.is_empty() {
                let retain = settings.server().change_retain;
                self.publish_batch(&store, &base, retain, batch).await;
            }
        }
    }

    /// One tick: loads the changed resources (one query per kind), logs their events in one
    /// statement, which gives them their stream positions, then publishes them with
    /// `data.position`. What could not be loaded or logged waits for the next tick.
    async fn publish_batch(
        &self,
        store: &Store,
        base: &str,
        retain: i64,
        batch: Vec<((ResourceKind, i64), Option<i64>)>,
    ) {
        let accounts: HashMap<(ResourceKind, i64), Option<i64>> = batch.into_iter().collect();
        let mut by_kind: HashMap<ResourceKind, Vec<i64>> = HashMap::new();
        for (kind, id) in accounts.keys() {
            by_kind.entry(*kind).or_default().push(*id);
        }
        let mut events = Vec::with_capacity(accounts.len());
        let mut rows = Vec::with_capacity(accounts.len());
        for (kind, mut ids) in by_kind {
            ids.sort_unstable();
            let resources = match store.get_resources(kind, &ids).await {
                Ok(resources) => resources,
                Err(error) => {
                    tracing::warn!(%error, "loading changed resources failed; retrying next tick");
                    self.requeue(ids.iter().map(|id| ((kind, *id), accounts[&(kind, *id)])));
                    continue;
                }
            };
            for resource in resources {
                let account = accounts
                    .get(&(kind, resource.id))
                    .copied()
                    .flatten()
                    .or(resource.account_id);
                let api_type = kind.api_type();
                let rendered = crate::api::resources::render(base, &resource);
                let mut event = Event::new("resource.change")
                    .with_resource(api_type, ids::format(api_type, resource.id));
                event.data = Some(json!({ "resource": rendered }));
                rows.push(NewChange {
                    time: event.time.unwrap_or_default(),
                    resource_type: api_type.to_owned(),
                    resource_id: resource.id,
                    account_id: account,
                    data: event.to_json(),
                });
                events.push(((kind, resource.id), account, event));
            }
        }
        let first = match store.append_changes(&rows, retain).await {
            Ok(Some(first)) => first,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(%error, "logging resource changes failed; retrying next tick");
                self.requeue(events.iter().map(|(key, account, _)| (*key, *account)));
                return;
            }
        };
        for (offset, (_, account, mut event)) in events.into_iter().enumerate() {
            if let Some(Value::Object(data)) = event.data.as_mut() {
                data.insert(POSITION.to_owned(), Value::from(first + offset as i64));
            }
            self.inner.hub.publish(&event);
            if let Some(account) = account {
                event.name = Some(names::for_account("resource.change", account));
                self.inner.hub.publish(&event);
            }
        }
    }

    /// Puts changes back for the next tick, unless a newer change of the resource is there.
    fn requeue(&self, keys: impl Iterator<Item = ((ResourceKind, i64), Option<i64>)>) {
        let mut pending = self
            .inner
            .pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (key, account) in keys {
            if pending.len() < MAX_PENDING {
                pending.entry(key).or_insert(account);
            }
        }
    }
}

/// The engine's view of the bus: calls through the hub, changes through [`Changes`].
#[derive(Debug, Clone)]
pub struct EngineBus {
    /// The hub.
    pub hub: Hub,
    /// The change queue.
    pub changes: Changes,
}

impl Bus for EngineBus {
    async fn call(
        &self,
        request: Event,
        timeout: Duration,
        on_progress: Box<dyn FnMut(&Event) + Send>,
    ) -> Result<Event, CallFailure> {
        self.hub.publish(&process_call_hint(&request));
        self.hub
            .call(request, timeout, on_progress)
            .await
            .map_err(|error| match error {
                CallError::Timeout(timeout) => CallFailure::Timeout(timeout),
                CallError::ErrorReply(message) => CallFailure::ErrorReply(message),
                CallError::Permanent(message) => CallFailure::Permanent(message),
                CallError::Shutdown => CallFailure::Shutdown,
            })
    }

    fn changed(&self, resource: &Resource, previous_state: Option<&str>) {
        self.changes.changed(resource, previous_state);
    }
}

/// `process.change`: a process attempt is calling an agent, published raw (processes are for
/// admins) just before the call. `state.change` tells when an attempt ends, but nothing else
/// tells when a claimed process starts its work, which is what a live Running view needs.
/// Carries the resource, the process name and the command; no reply.
pub const PROCESS_CHANGE: &str = "process.change";

fn process_call_hint(request: &Event) -> Event {
    let mut hint = Event::new(PROCESS_CHANGE);
    hint.resource_type.clone_from(&request.resource_type);
    hint.resource_id.clone_from(&request.resource_id);
    hint.data = Some(json!({
        "phase": "calling",
        "processName": request.data.as_ref().and_then(|data| data.get("processName")),
        "command": names::base(request.name()),
    }));
    hint
}

impl Settings {
    /// The engine's settings as a typed snapshot, read from the values in effect now.
    pub fn engine_tunables(&self) -> drover_engine::Tunables {
        drover_engine::Tunables {
            workers: self.int("process.workers").max(1) as usize,
            claim_batch: self.int("process.claim.batch").max(1) as usize,
            lease_millis: self.int("process.lease.millis").max(300),
            poll_millis: self.int("process.poll.millis").max(1),
            max_attempts: self.int("process.max_attempts").max(1),
            max_age_millis: self.int("process.max_age.seconds").saturating_mul(1000),
            retry_max_wait_millis: self.int("process.retry_max_wait.millis").max(1),
            call_timeout_millis: self.int("eventing.timeout.millis").max(1),
            activate_ping_timeout_millis: self.int("agent.activate.ping.timeout.millis").max(1),
        }
    }
}
