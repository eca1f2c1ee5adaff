//! External handlers: extensions that take part in processes (the original's extension point).
//!
//! An `externalHandler` resource names the processes it handles in `processConfigs`
//! (`[{name: "instance.start", onError: "instance.stop"}]`), a `priority`, `retries` and
//! `timeoutMillis`. While it is `active`, every attempt of those processes sends it
//! `<process>;handler=<name>` and waits for its reply:
//! - a config named `pre.<process>` is a pre-listener and `post.<process>` a post-listener: each
//!   is called, in priority order, before (after) the handler phase;
//! - a config named `<process>` takes part in the handler phase with the built-in handler
//!   (priority [`BUILT_IN_PRIORITY`]): the phase runs in priority order and ends with the first
//!   that answers, so an external handler below 2000 replaces the built-in one.
//!
//! A handler created by an admin or service key outside a project (`/v1/externalhandlers`)
//! is global: it is called by its raw name for every project's processes, and only admin and
//! service subscribers receive it. One created in a project (a project key, or any key under
//! `/v1/projects/{id}/…`) is called as `<process>;handler=<name>;account=<project>` for that
//! project's processes only, which only that project's subscribers receive.
//!
//! The [`Registry`] is the engine's view of the active handlers: a snapshot swapped whole
//! ([`ArcSwap`]), replaced as soon as a handler changes (`Registry::apply`, called with every
//! changed resource before the API answers) and reloaded from the store at start and when
//! another node says handlers changed.

use std::collections::HashMap;
use std::sync::Arc;

use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use drover_store::{Filter, FilterOp, FilterValue, ListQuery, Resource, ResourceKind, Store};
use serde_json::Value;
use tokio::sync::Notify;

/// The priority of the built-in handler of a process (agent calls, pings).
pub const BUILT_IN_PRIORITY: i64 = 2000;
/// The priority of a handler that gives none.
pub const DEFAULT_PRIORITY: i64 = 1000;
/// The most retries of one call a handler may ask for.
pub const MAX_RETRIES: i64 = 10;
/// The longest call timeout a handler may ask for.
pub const MAX_TIMEOUT_MILLIS: i64 = 15 * 60 * 1000;

/// Where a handler attaches to a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// `pre.<process>`: before the handler phase.
    Pre,
    /// `<process>`: the handler phase, beside the built-in handler.
    Handler,
    /// `post.<process>`: after the handler phase.
    Post,
}

impl Phase {
    /// The phase and process a config name means.
    pub fn parse(config: &str) -> (Phase, &str) {
        if let Some(process) = config.strip_prefix("pre.") {
            (Phase::Pre, process)
        } else if let Some(process) = config.strip_prefix("post.") {
            (Phase::Post, process)
        } else {
            (Phase::Handler, config)
        }
    }
}

/// One active handler's part in one process.
#[derive(Debug, Clone, PartialEq)]
pub struct HandlerCall {
    /// The handler's resource id.
    pub id: i64,
    /// Its name (the `;handler=` suffix).
    pub name: String,
    /// The event name it receives: `pre.instance.start`, `instance.start`, …
    pub event: String,
    /// The project it is confined to; `None` for a global handler.
    pub project: Option<i64>,
    /// Lower runs first.
    pub priority: i64,
    /// Calls sent again after a timeout before the attempt fails.
    pub retries: u32,
    /// The call's timeout, when the handler set one.
    pub timeout_millis: Option<i64>,
    /// The process scheduled when the handler answers with an error.
    pub on_error: Option<String>,
}

/// The handlers of one process for one resource, in the order they run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessHandlers {
    /// Pre-listeners.
    pub pre: Vec<Arc<HandlerCall>>,
    /// Handler-phase handlers (the built-in one is not listed).
    pub handlers: Vec<Arc<HandlerCall>>,
    /// Post-listeners.
    pub post: Vec<Arc<HandlerCall>>,
}

impl ProcessHandlers {
    /// Whether no external handler takes part.
    pub fn is_empty(&self) -> bool {
        self.pre.is_empty() && self.handlers.is_empty() && self.post.is_empty()
    }
}

/// By process name: its handlers in each phase, in priority order (looked up by `&str`, so
/// an attempt's lookup allocates nothing).
type Table = HashMap<String, ProcessHandlers>;

#[derive(Debug, Default)]
struct Snapshot {
    /// The active handlers' resources, by id (to apply one change without a reload).
    active: HashMap<i64, Resource>,
    /// By process and phase, in priority order.
    table: Table,
}

/// The active external handlers. Cheap to clone; clones share the snapshot.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    snapshot: Arc<ArcSwap<Snapshot>>,
    /// Serializes writers (a change and a reload); readers never wait.
    write: Arc<std::sync::Mutex<()>>,
    /// Bumped by every change [`Registry::apply`] makes, so a reload that read the store
    /// before it does not swap an older view in over it.
    generation: Arc<AtomicU64>,
    /// Asks the node's reloader for a reload (another node's hint).
    reload_wanted: Arc<Notify>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Reads every active handler from the store and swaps them in.
    ///
    /// A change applied while the store was read makes the read stale: it is read again (a
    /// few times; then the newest read is kept, and the next reload corrects it).
    pub async fn reload(&self, store: &Store) -> drover_store::Result<()> {
        for _ in 0..3 {
            let before = self.generation.load(Ordering::SeqCst);
            let found = read_active(store).await?;
            let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
            if self.generation.load(Ordering::SeqCst) == before {
                self.snapshot.store(Arc::new(build(found)));
                return Ok(());
            }
        }
        let found = read_active(store).await?;
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        self.snapshot.store(Arc::new(build(found)));
        Ok(())
    }

    /// Asks for a reload (served by [`Registry::reload_wanted`]'s waiter).
    pub fn want_reload(&self) {
        self.reload_wanted.notify_one();
    }

    /// Resolves when a reload was asked for.
    pub async fn reload_wanted(&self) {
        self.reload_wanted.notified().await;
    }
}

/// Every active handler in the store.
async fn read_active(store: &Store) -> drover_store::Result<HashMap<i64, Resource>> {
    let mut found = HashMap::new();
    let mut marker = None;
    loop {
        let page = store
            .list_resources(
                ResourceKind::ExternalHandler,
                &ListQuery {
                    account_id: None,
                    filters: vec![Filter {
                        column: "state",
                        op: FilterOp::Eq,
                        value: FilterValue::Text("active".into()),
                    }],
                    marker,
                    limit: 1000,
                },
            )
            .await?;
        for resource in page.data {
            found.insert(resource.id, resource);
        }
        match page.next_marker {
            Some(next) => marker = Some(next),
            None => break,
        }
    }
    Ok(found)
}

impl Registry {
    /// Applies one changed resource: an external handler that became active joins, one that
    /// left `active` leaves. Anything else is ignored. Returns whether the registry changed.
    pub fn apply(&self, resource: &Resource) -> bool {
        if resource.kind != ResourceKind::ExternalHandler {
            return false;
        }
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.snapshot.load();
        let active = resource.state == "active";
        if !active && !current.active.contains_key(&resource.id) {
            return false;
        }
        if active && current.active.get(&resource.id) == Some(resource) {
            return false;
        }
        let mut handlers = current.active.clone();
        if active {
            handlers.insert(resource.id, resource.clone());
        } else {
            handlers.remove(&resource.id);
        }
        self.snapshot.store(Arc::new(build(handlers)));
        self.generation.fetch_add(1, Ordering::SeqCst);
        true
    }

    /// Whether an active handler takes part in `process` for a resource of `project` (a global
    /// one, or one of that project's): such a process is not a hop but a step the engine runs.
    pub fn handles(&self, process: &str, project: Option<i64>) -> bool {
        let snapshot = self.snapshot.load();
        let Some(all) = snapshot.table.get(process) else {
            return false;
        };
        [&all.pre, &all.handlers, &all.post]
            .into_iter()
            .flatten()
            .any(|call| call.project.is_none() || call.project == project)
    }

    /// The handlers of `process` for a resource of `project`, in the order they run.
    pub fn for_process(&self, process: &str, project: Option<i64>) -> ProcessHandlers {
        let snapshot = self.snapshot.load();
        let Some(all) = snapshot.table.get(process) else {
            return ProcessHandlers::default();
        };
        let pick = |calls: &[Arc<HandlerCall>]| -> Vec<Arc<HandlerCall>> {
            calls
                .iter()
                .filter(|call| call.project.is_none() || call.project == project)
                .cloned()
                .collect()
        };
        ProcessHandlers {
            pre: pick(&all.pre),
            handlers: pick(&all.handlers),
            post: pick(&all.post),
        }
    }

    /// How many handlers are active.
    pub fn len(&self) -> usize {
        self.snapshot.load().active.len()
    }

    /// Whether none is active.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether a handler resource is global (called by its raw name for every project).
pub fn is_global(resource: &Resource) -> bool {
    resource.data.get("global").and_then(Value::as_bool) == Some(true)
}

fn build(active: HashMap<i64, Resource>) -> Snapshot {
    let mut table: Table = HashMap::new();
    for resource in active.values() {
        let Some(name) = resource.name.clone().filter(|name| !name.is_empty()) else {
            continue;
        };
        let int = |key: &str| resource.data.get(key).and_then(Value::as_i64);
        let priority = int("priority").unwrap_or(DEFAULT_PRIORITY);
        let retries = int("retries").unwrap_or(0).clamp(0, MAX_RETRIES) as u32;
        let timeout_millis = int("timeoutMillis").map(|t| t.clamp(1, MAX_TIMEOUT_MILLIS));
        let project = if is_global(resource) {
            None
        } else {
            resource.account_id
        };
        let configs = resource
            .data
            .get("processConfigs")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for config in configs {
            let Some(event) = config.get("name").and_then(Value::as_str) else {
                continue;
            };
            let (phase, process) = Phase::parse(event);
            let call = HandlerCall {
                id: resource.id,
                name: name.clone(),
                event: event.to_owned(),
                project,
                priority,
                retries,
                timeout_millis,
                on_error: config
                    .get("onError")
                    .and_then(Value::as_str)
                    .filter(|next| !next.is_empty())
                    .map(str::to_owned),
            };
            let entry = table.entry(process.to_owned()).or_default();
            match phase {
                Phase::Pre => entry.pre.push(Arc::new(call)),
                Phase::Handler => entry.handlers.push(Arc::new(call)),
                Phase::Post => entry.post.push(Arc::new(call)),
            }
        }
    }
    for calls in table.values_mut() {
        for list in [&mut calls.pre, &mut calls.handlers, &mut calls.post] {
            list.sort_by_key(|call| (call.priority, call.id));
        }
    }
    Snapshot { active, table }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn handler(id: i64, name: &str, project: Option<i64>, state: &str, data: Value) -> Resource {
        let Value::Object(data) = data else {
            panic!("data is an object")
        };
        Resource {
            kind: ResourceKind::ExternalHandler,
            id,
            name: Some(name.into()),
            account_id: project.or(Some(1)),
            sub_kind: "externalHandler".into(),
            uuid: format!("u{id}"),
            description: None,
            state: state.into(),
            transitioning: "no".into(),
            transitioning_message: None,
            transitioning_progress: None,
            created: 0,
            removed: None,
            data,
            host_id: None,
            agent_id: None,
            stack_id: None,
            service_id: None,
            instance_id: None,
            last_ping: None,
        }
    }

    #[test]
    fn phases_run_in_priority_order_and_project_handlers_stay_in_their_project() {
        let registry = Registry::new();
        let configs = json!([{"name": "pre.instance.start"}, {"name": "instance.start", "onError": "instance.stop"}]);
        assert!(registry.apply(&handler(
            1,
            "late",
            None,
            "active",
            json!({"global": true, "priority": 50, "processConfigs": configs})
        )));
        assert!(registry.apply(&handler(
            2,
            "early",
            None,
            "active",
            json!({"global": true, "priority": 5, "processConfigs": configs})
        )));
        assert!(registry.apply(&handler(3, "mine", Some(7), "active",
            json!({"priority": 1, "retries": 99, "processConfigs": [{"name": "post.instance.start"}]}))));
        let names =
            |calls: &[Arc<HandlerCall>]| calls.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
        let in_7 = registry.for_process("instance.start", Some(7));
        assert_eq!(names(&in_7.pre), ["early", "late"]);
        assert_eq!(names(&in_7.handlers), ["early", "late"]);
        assert_eq!(in_7.handlers[0].on_error.as_deref(), Some("instance.stop"));
        assert_eq!(names(&in_7.post), ["mine"]);
        assert_eq!(in_7.post[0].project, Some(7));
        assert_eq!(in_7.post[0].retries, MAX_RETRIES as u32);
        let in_8 = registry.for_process("instance.start", Some(8));
        assert!(in_8.post.is_empty());
        assert_eq!(names(&in_8.pre), ["early", "late"]);
        assert!(registry.handles("instance.start", Some(8)));
        assert!(!registry.handles("instance.stop", Some(7)));
        assert!(registry.handles("instance.start", Some(7)));
        // Leaving `active` takes a handler out at once; the same state again changes nothing.
        assert!(registry.apply(&handler(
            2,
            "early",
            None,
            "inactive",
            json!({"global": true})
        )));
        assert!(!registry.apply(&handler(
            2,
            "early",
            None,
            "removed",
            json!({"global": true})
        )));
        assert_eq!(
            names(&registry.for_process("instance.start", None).pre),
            ["late"]
        );
        assert_eq!(registry.len(), 2);
    }
}
