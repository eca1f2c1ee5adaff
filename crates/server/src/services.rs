//! The service reconciler: the server keeps every service at its `scale`, as the original did.
//!
//! A service's containers live in numbered *slots*, `1..=scale`: the container of slot `n` is
//! named `<stack>-<service>-<n>` (`<service>-<n>` outside a stack), carries `serviceId`,
//! `serviceIndex` and the original's `io.rancher.stack_service.name` labels, and is made from
//! the service's `launchConfig`. For each service the reconciler compares the slots with what
//! the service's state asks for and schedules ordinary processes, as the API does, visible like
//! any other in the service's project:
//! - **active**: an empty slot gets a container (`instance.create`, then `instance.start`); a
//!   container in a slot above the scale is removed (the highest slots go first on a scale
//!   down); a container that stopped by itself, was stopped, or ended in `error` is started
//!   again (`instance.start`), with a backoff per service so a crashing command does not spin:
//!   the first restart is at once, each further restart in a row waits twice as long (from
//!   `service.restart.backoff.initial.millis` up to `…max.millis`), and the count starts afresh
//!   once all containers ran `…reset.seconds` after the last restart. A removed container's
//!   slot is filled again at once.
//! - **inactive**: running containers are stopped (`instance.stop`).
//! - **removed** (or purged): every container is removed (`instance.remove`).
//!
//! What the reconciler thinks is in the service's data: `currentScale` (running containers in
//! the service's slots), `reconcileMessage` (what it waits for, `null` at scale),
//! `consecutiveRestarts` and `lastRestartAt`, and `nextRetryAt` while a restart waits for its
//! backoff. The backoff lives there too, so a new leader carries on where the last stopped.
//!
//! **Never more than scale**: at most one live container holds a slot (a unique index in the
//! store), and slots run from 1 to the scale, so two passes that overlap (two nodes each
//! believing it leads, for a moment) cannot run more containers than the scale; the second
//! create of a slot fails and is ignored.
//!
//! It runs once per cluster, on the leader: woken by changes of services and of their
//! containers ([`Wakeups`], fed by `Changes::changed`; other nodes forward theirs as a cluster
//! hint), and every `service.reconcile.interval.millis` over all services as a safety net.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use drover_engine::defs;
use drover_proto::{event::now_millis, ids};
use drover_store::{
    NewCreate, NewProcess, NewResource, Resource, ResourceKind, ScheduleError, ServiceContainer,
};
use futures_util::StreamExt;
use serde_json::{Map, Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::api::schema;
use crate::settings::Settings;
use crate::state::AppState;

/// The largest scale a service may have.
pub const MAX_SCALE: i64 = 1000;
/// The scale of a service created without one (the original's default).
pub const DEFAULT_SCALE: i64 = 1;
/// Services marked for a pass at most; past it the next pass looks at every service.
const MAX_DIRTY: usize = 10_000;
/// Services per page of a full pass.
const PAGE: i64 = 200;
/// Processes one service's pass schedules at once.
const PARALLEL: usize = 16;
/// Longest sleep of a node that does not lead (it forwards its marks when woken).
const IDLE: Duration = Duration::from_secs(1);

/// The labels the original put on a service's containers.
pub const STACK_SERVICE_LABEL: &str = "io.rancher.stack_service.name";
/// The stack's name, on containers of a service in a stack.
pub const STACK_LABEL: &str = "io.rancher.stack.name";
/// Which launch config of the service the container runs (always the primary one).
pub const LAUNCH_CONFIG_LABEL: &str = "io.rancher.service.launch.config";

/// Services whose containers or state changed since the last pass: set by every change of a
/// service or of a container of one (O(1), never blocks on the reconciler), taken by the
/// reconciler. Bounded: past [`MAX_DIRTY`] services it remembers only "look at all".
#[derive(Debug, Default)]
pub struct Wakeups {
    dirty: Mutex<Dirty>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct Dirty {
    ids: HashSet<i64>,
    all: bool,
}

impl Wakeups {
    /// Marks the service a changed resource belongs to (a service, or a service's container).
    pub fn note(&self, resource: &Resource) {
        match resource.kind {
            ResourceKind::Service => self.mark(resource.id),
            ResourceKind::Instance => {
                if let Some(service) = resource.service_id {
                    self.mark(service);
                }
            }
            _ => {}
        }
    }

    /// Marks a service for the next pass.
    pub fn mark(&self, service_id: i64) {
        {
            let mut dirty = self.lock();
            if dirty.ids.len() < MAX_DIRTY {
                dirty.ids.insert(service_id);
            } else {
                dirty.all = true;
            }
        }
        self.notify.notify_one();
    }

    /// Asks for a pass over every service.
    pub fn mark_all(&self) {
        self.lock().all = true;
        self.notify.notify_one();
    }

    fn take(&self) -> (Vec<i64>, bool) {
        let mut dirty = self.lock();
        let ids = dirty.ids.drain().collect();
        (ids, std::mem::take(&mut dirty.all))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Dirty> {
        self.dirty
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The restart backoff, from the settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The wait after the first restart in a row.
    pub initial_ms: i64,
    /// The longest wait.
    pub max_ms: i64,
    /// How long all containers must run after the last restart for the count to start afresh.
    pub reset_ms: i64,
}

impl Backoff {
    /// The settings in effect.
    pub fn from_settings(settings: &Settings) -> Backoff {
        Backoff {
            initial_ms: settings
                .int("service.restart.backoff.initial.millis")
                .max(1),
            max_ms: settings.int("service.restart.backoff.max.millis").max(1),
            reset_ms: settings
                .int("service.restart.backoff.reset.seconds")
                .max(1)
                .saturating_mul(1000),
        }
    }

    /// The wait after `streak` restarts in a row before the next one: none after none, then
    /// `initial`, doubling, at most `max`.
    pub fn delay(&self, streak: i64) -> i64 {
        if streak <= 0 {
            return 0;
        }
        let doublings = (streak - 1).min(40) as u32;
        self.initial_ms
            .saturating_mul(2i64.saturating_pow(doublings))
            .min(self.max_ms)
    }
}

/// One process the reconciler schedules for a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A container for an empty slot.
    Create {
        /// The slot.
        index: i64,
    },
    /// `instance.start` of a stopped (or failed) container.
    Start {
        /// The container.
        id: i64,
    },
    /// `instance.stop` of a running container of an inactive service.
    Stop {
        /// The container.
        id: i64,
    },
    /// `instance.remove`: above the scale, or the service was removed.
    Remove {
        /// The container.
        id: i64,
    },
}

/// What one look at a service decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The processes to schedule, in order.
    pub actions: Vec<Action>,
    /// The reconciler's fields of the service's data, as they should now be.
    pub status: Map<String, Value>,
    /// When to look at the service again without a change (a backoff ends, a reset is due).
    pub wake_at: Option<i64>,
}

/// The scale a service asks for: its `scale`, [`DEFAULT_SCALE`] when unset, within
/// `0..=MAX_SCALE`.
pub fn scale_of(service: &Resource) -> i64 {
    match service.data.get("scale") {
        None | Some(Value::Null) => DEFAULT_SCALE,
        Some(value) => value.as_i64().unwrap_or(0).clamp(0, MAX_SCALE),
    }
}

/// The container fields a service's `launchConfig` may carry (a container's create fields,
/// except `startOnCreate`: a service's containers run).
fn launch_fields() -> impl Iterator<Item = &'static schema::Field> {
    schema::of_kind(ResourceKind::Instance)
        .fields
        .iter()
        .filter(|field| field.create && field.in_data && field.name != "startOnCreate")
}

/// Checks a `launchConfig` as the API takes it: an object whose container fields have their
/// types; `Err` names the first field that does not (`launchConfig.command`).
pub fn check_launch_config(config: &Value) -> Result<(), (String, String)> {
    let Value::Object(config) = config else {
        return Err((
            "launchConfig".into(),
            "launchConfig must be an object".into(),
        ));
    };
    for field in launch_fields() {
        if let Some(value) = config.get(field.name)
            && !value.is_null()
            && !crate::api::resources::type_ok(field, value)
        {
            return Err((
                format!("launchConfig.{}", field.name),
                format!("launchConfig.{} must be of type {}", field.name, field.kind),
            ));
        }
    }
    Ok(())
}

/// The data of the container a service runs in slot `index`, from its `launchConfig`, or why
/// there can be none.
pub fn container_data(
    service: &Resource,
    stack_name: Option<&str>,
    index: i64,
) -> Result<Map<String, Value>, String> {
    let Some(config) = service.data.get("launchConfig").filter(|v| !v.is_null()) else {
        return Err("the service has no launchConfig".into());
    };
    check_launch_config(config).map_err(|(_, message)| message)?;
    let config = config.as_object().expect("checked above");
    let mut data = Map::new();
    for field in launch_fields() {
        if let Some(value) = config.get(field.name).filter(|v| !v.is_null()) {
            data.insert(field.name.into(), value.clone());
        }
    }
    let runnable = data
        .get("command")
        .and_then(Value::as_array)
        .is_some_and(|command| !command.is_empty())
        || data.get("imageUuid").is_some_and(Value::is_string);
    if !runnable {
        return Err("launchConfig has no command (or imageUuid)".into());
    }
    let labels = data
        .entry("labels")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .expect("checked above");
    let service_name = service_name(service);
    let stack_service = match stack_name {
        Some(stack) => {
            labels.insert(STACK_LABEL.into(), json!(stack));
            format!("{stack}/{service_name}")
        }
        None => service_name,
    };
    labels.insert(STACK_SERVICE_LABEL.into(), json!(stack_service));
    labels.insert(
        LAUNCH_CONFIG_LABEL.into(),
        json!("io.rancher.service.primary.launch.config"),
    );
    data.insert("serviceIndex".into(), json!(index));
    Ok(data)
}

fn service_name(service: &Resource) -> String {
    service
        .name
        .clone()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| ids::format("service", service.id))
}

/// The name of the container in slot `index`: `<stack>-<service>-<index>`.
pub fn container_name(service: &Resource, stack_name: Option<&str>, index: i64) -> String {
    match stack_name {
        Some(stack) => format!("{stack}-{}-{index}", service_name(service)),
        None => format!("{}-{index}", service_name(service)),
    }
}

/// What to do for `service` with these live containers of it, at `now`: a pure function of
/// what is stored, so any node (or two at once) decides the same.
pub fn plan(
    service: &Resource,
    containers: &[ServiceContainer],
    now: i64,
    backoff: &Backoff,
) -> Plan {
    let mut actions = Vec::new();
    let mut status = Map::new();
    let mut wake_at = None;
    let leaving = |c: &ServiceContainer| {
        c.state == "removing" || c.pending.as_deref() == Some("instance.remove")
    };
    let int = |key: &str| service.data.get(key).and_then(Value::as_i64);
    let streak = int("consecutiveRestarts").unwrap_or(0);
    let last_restart = int("lastRestartAtTS");
    let mut running = 0i64;
    let mut parts: Vec<String> = Vec::new();
    let mut next_retry: Option<i64> = None;
    let mut sorted: Vec<&ServiceContainer> = containers.iter().collect();
    sorted.sort_by_key(|c| (c.service_index, c.id));
    match service.state.as_str() {
        "active" | "updating-active" => {
            let scale = scale_of(service);
            let mut held = BTreeSet::new();
            let (mut removing, mut busy) = (0, 0);
            let mut extra: Vec<&ServiceContainer> = Vec::new();
            let mut stopped = Vec::new();
            for c in &sorted {
                if leaving(c) {
                    removing += 1;
                    continue;
                }
                let in_slot = c
                    .service_index
                    .is_some_and(|index| (1..=scale).contains(&index) && held.insert(index));
                if !in_slot {
                    extra.push(c);
                    continue;
                }
                if c.pending.is_some() {
                    busy += 1;
                    continue;
                }
                match c.state.as_str() {
                    "running" => running += 1,
                    "stopped" | "error" => stopped.push(c.id),
                    _ => busy += 1,
                }
            }
            // A scale down removes the highest slots first.
            extra.sort_by_key(|c| std::cmp::Reverse((c.service_index, c.id)));
            for c in &extra {
                actions.push(Action::Remove { id: c.id });
            }
            removing += extra.len();
            let missing: Vec<i64> = (1..=scale).filter(|i| !held.contains(i)).collect();
            if !missing.is_empty() {
                match container_data(service, None, 1) {
                    Ok(_) => {
                        actions.extend(missing.iter().map(|&index| Action::Create { index }));
                        parts.push(format!("creating {}", missing.len()));
                    }
                    Err(why) => parts.push(format!("cannot create {}: {why}", missing.len())),
                }
            }
            if busy > 0 {
                parts.push(format!("{busy} in progress"));
            }
            if removing > 0 {
                parts.push(format!("removing {removing}"));
            }
            if !stopped.is_empty() {
                let due = match last_restart {
                    Some(last) if streak > 0 => last.saturating_add(backoff.delay(streak)),
                    _ => now,
                };
                if now >= due {
                    actions.extend(stopped.iter().map(|&id| Action::Start { id }));
                    status.insert("consecutiveRestarts".into(), json!(streak + 1));
                    status.insert(
                        "lastRestartAt".into(),
                        json!(drover_engine::render::rfc3339(now)),
                    );
                    status.insert("lastRestartAtTS".into(), json!(now));
                    parts.push(format!(
                        "restarting {} (restart {} in a row)",
                        stopped.len(),
                        streak + 1
                    ));
                } else {
                    wake_at = Some(due);
                    next_retry = Some(due);
                    parts.push(format!(
                        "{} stopped; restarting at {} (backoff after {streak} restarts in a row)",
                        stopped.len(),
                        drover_engine::render::rfc3339(due)
                    ));
                }
            } else if streak > 0 && running == scale && parts.is_empty() {
                // All run: once they ran long enough after the last restart, the count is over.
                match last_restart {
                    Some(last) if now < last.saturating_add(backoff.reset_ms) => {
                        wake_at = Some(last.saturating_add(backoff.reset_ms));
                    }
                    _ => {
                        status.insert("consecutiveRestarts".into(), json!(0));
                    }
                }
            }
            if !parts.is_empty() || running != scale {
                parts.insert(0, format!("{running} of {scale} running"));
            }
        }
        "inactive" | "deactivating" | "updating-inactive" => {
            let (mut stopping, mut busy) = (0, 0);
            for c in &sorted {
                if leaving(c) {
                    continue;
                }
                if c.pending.is_some() {
                    busy += 1;
                } else if c.state == "running" {
                    actions.push(Action::Stop { id: c.id });
                    stopping += 1;
                }
            }
            if stopping + busy > 0 {
                parts.push(format!("inactive: stopping {}", stopping + busy));
            }
            if streak > 0 {
                status.insert("consecutiveRestarts".into(), json!(0));
            }
        }
        "removing" | "removed" | "purging" | "purged" => {
            let mut removing = 0;
            for c in &sorted {
                removing += 1;
                if !leaving(c) {
                    actions.push(Action::Remove { id: c.id });
                }
            }
            if removing > 0 {
                parts.push(format!("removed: removing {removing}"));
            }
        }
        _ => {
            running = sorted
                .iter()
                .filter(|c| c.state == "running" && !leaving(c))
                .count() as i64;
        }
    }
    status.insert("currentScale".into(), json!(running));
    status.insert(
        "reconcileMessage".into(),
        if parts.is_empty() {
            Value::Null
        } else {
            json!(parts.join("; "))
        },
    );
    status.insert(
        "nextRetryAt".into(),
        json!(next_retry.map(drover_engine::render::rfc3339)),
    );
    status.insert("nextRetryAtTS".into(), json!(next_retry));
    Plan {
        actions,
        status,
        wake_at,
    }
}

/// Looks at these services once: reads them and their containers, and schedules what they
/// need. Returns when to look at some of them again (`(service, epoch ms)`). Overlapping calls
/// (on one node or two) are safe: see the module's "Never more than scale".
pub async fn reconcile(state: &AppState, service_ids: &[i64]) -> Vec<(i64, i64)> {
    match state.store.services_by_id(service_ids).await {
        Ok(services) => reconcile_services(state, services).await,
        Err(error) => {
            tracing::warn!(%error, "services: reading services failed");
            Vec::new()
        }
    }
}

/// Looks at every service (and every removed one that still has containers), a page at a
/// time.
pub async fn reconcile_all(state: &AppState) -> Vec<(i64, i64)> {
    let mut wakes = Vec::new();
    let mut after = 0;
    loop {
        let services = match state.store.services_to_reconcile(after, PAGE).await {
            Ok(services) => services,
            Err(error) => {
                tracing::warn!(%error, "services: listing services failed");
                return wakes;
            }
        };
        let Some(last) = services.last().map(|service| service.id) else {
            return wakes;
        };
        let full = services.len() as i64 == PAGE;
        wakes.extend(reconcile_services(state, services).await);
        if !full || !state.cluster.is_leader() {
            return wakes;
        }
        after = last;
    }
}

async fn reconcile_services(state: &AppState, services: Vec<Resource>) -> Vec<(i64, i64)> {
    let ids: Vec<i64> = services.iter().map(|service| service.id).collect();
    let containers = match state.store.service_containers(&ids).await {
        Ok(containers) => containers,
        Err(error) => {
            tracing::warn!(%error, "services: reading containers failed");
            return Vec::new();
        }
    };
    let mut by_service: HashMap<i64, Vec<ServiceContainer>> = HashMap::new();
    for container in containers {
        by_service
            .entry(container.service_id)
            .or_default()
            .push(container);
    }
    let backoff = Backoff::from_settings(&state.settings);
    let mut wakes = Vec::new();
    let mut scheduled = false;
    for service in services {
        // Fenced per service: a node whose duty ran out stops here.
        if !state.cluster.is_leader() {
            break;
        }
        let containers = by_service.remove(&service.id).unwrap_or_default();
        let plan = plan(&service, &containers, now_millis(), &backoff);
        if let Some(at) = plan.wake_at {
            wakes.push((service.id, at));
        }
        scheduled |= apply(state, &service, &containers, plan).await;
    }
    if scheduled {
        state.engine.wake();
    }
    wakes
}

/// Records the plan's status on the service (before its processes, so a restart's backoff is
/// stored before the restart happens) and schedules its processes. Whether any was scheduled.
async fn apply(
    state: &AppState,
    service: &Resource,
    containers: &[ServiceContainer],
    plan: Plan,
) -> bool {
    let service_api_id = ids::format("service", service.id);
    let unchanged = plan
        .status
        .iter()
        .all(|(key, value)| service.data.get(key).unwrap_or(&Value::Null) == value);
    if !unchanged {
        match state
            .store
            .merge_resource_data(ResourceKind::Service, service.id, &plan.status)
            .await
        {
            Ok(Some(updated)) => state.changes.touched(&updated),
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(%error, service = %service_api_id, "services: recording the status failed");
                return false;
            }
        }
    }
    if plan.actions.is_empty() {
        return false;
    }
    let stack_name = match service.stack_id {
        Some(stack)
            if plan
                .actions
                .iter()
                .any(|a| matches!(a, Action::Create { .. })) =>
        {
            state
                .store
                .get_resource(ResourceKind::Stack, stack)
                .await
                .ok()
                .flatten()
                .and_then(|stack| stack.name)
        }
        _ => None,
    };
    let states: HashMap<i64, &str> = containers
        .iter()
        .map(|c| (c.id, c.state.as_str()))
        .collect();
    // A restart's process says which restart in a row it is and when it was decided.
    let mut restart = Map::new();
    for (key, field) in [
        ("consecutiveRestarts", "consecutiveRestarts"),
        ("lastRestartAtTS", "restartAtTS"),
    ] {
        if let Some(value) = plan.status.get(key) {
            restart.insert(field.into(), value.clone());
        }
    }
    let restart = &restart;
    let done = futures_util::stream::iter(plan.actions)
        .map(|action| {
            let state_of = states.get(&action_target(action)).copied();
            run_action(
                state,
                service,
                stack_name.as_deref(),
                action,
                state_of,
                restart,
            )
        })
        .buffer_unordered(PARALLEL)
        .collect::<Vec<bool>>()
        .await;
    done.into_iter().any(|scheduled| scheduled)
}

fn action_target(action: Action) -> i64 {
    match action {
        Action::Create { .. } => 0,
        Action::Start { id } | Action::Stop { id } | Action::Remove { id } => id,
    }
}

async fn run_action(
    state: &AppState,
    service: &Resource,
    stack_name: Option<&str>,
    action: Action,
    container_state: Option<&str>,
    restart: &Map<String, Value>,
) -> bool {
    let service_api_id = ids::format("service", service.id);
    let (id, process, reason) = match action {
        Action::Create { index } => return create(state, service, stack_name, index).await,
        Action::Start { id } => (id, "instance.start", "restart"),
        Action::Stop { id } => (id, "instance.stop", "service inactive"),
        Action::Remove { id } => (
            id,
            "instance.remove",
            if matches!(
                service.state.as_str(),
                "active" | "updating-active" | "inactive" | "updating-inactive"
            ) {
                "above scale"
            } else {
                "service removed"
            },
        ),
    };
    let def = defs::find(process).expect("instance processes are defined");
    let from = container_state.unwrap_or("stopped");
    let mut data = Map::new();
    data.insert("serviceId".into(), json!(service_api_id));
    data.insert("reason".into(), json!(reason));
    if matches!(action, Action::Start { .. }) {
        data.extend(restart.clone());
    }
    let new = NewProcess {
        kind: ResourceKind::Instance,
        resource_id: id,
        start_states: def.start.iter().map(|s| (*s).to_owned()).collect(),
        cancel_pending: def.cancels_pending,
        steps: defs::plan_with(def, from, &Map::new(), &state.external, service.account_id),
        data,
        node: state.engine.node().to_owned(),
    };
    let container = ids::format("container", id);
    match state.store.schedule(new).await {
        Ok(scheduled) => {
            state.engine.stats().scheduled(&scheduled.process);
            tracing::info!(service = %service_api_id, %container, process, reason, "services: scheduled");
            state
                .changes
                .changed(&scheduled.resource, Some(&scheduled.previous_state));
            true
        }
        // Another pass, or a user, got there first.
        Err(
            ScheduleError::Busy { .. }
            | ScheduleError::InvalidState { .. }
            | ScheduleError::NotFound,
        ) => false,
        Err(ScheduleError::Store(error)) => {
            tracing::warn!(%error, service = %service_api_id, %container, process, "services: scheduling failed");
            false
        }
    }
}

async fn create(
    state: &AppState,
    service: &Resource,
    stack_name: Option<&str>,
    index: i64,
) -> bool {
    let service_api_id = ids::format("service", service.id);
    let data = match container_data(service, stack_name, index) {
        Ok(data) => data,
        Err(_) => return false,
    };
    let create = NewCreate {
        kind: ResourceKind::Instance,
        steps: defs::create_plan_with(
            ResourceKind::Instance,
            &data,
            &state.external,
            service.account_id,
        ),
        resource: NewResource {
            name: Some(container_name(service, stack_name, index)),
            sub_kind: "container".into(),
            account_id: service.account_id,
            data,
            service_id: Some(service.id),
            service_index: Some(index),
            ..NewResource::default()
        },
        node: state.engine.node().to_owned(),
    };
    match state.store.create_and_schedule(create).await {
        Ok(scheduled) => {
            state.engine.stats().scheduled(&scheduled.process);
            tracing::info!(
                service = %service_api_id,
                container = %ids::format("container", scheduled.resource.id),
                index,
                "services: container created"
            );
            state.changes.changed(&scheduled.resource, None);
            true
        }
        // The slot is taken: an overlapping pass created it first.
        Err(error) if error.is_unique_violation() => false,
        Err(error) => {
            tracing::warn!(%error, service = %service_api_id, index, "services: creating a container failed");
            false
        }
    }
}

/// Runs the reconciler until shutdown: on the leader, a pass over the services marked since
/// the last one, over those whose backoff ended, and every `service.reconcile.interval.millis`
/// over all; on another node, forwards what was marked here to the leader.
pub async fn run(state: AppState, shutdown: CancellationToken) {
    let mut leadership = state.cluster.leadership();
    let mut leading = false;
    let mut retries: HashMap<i64, i64> = HashMap::new();
    let mut next_full = tokio::time::Instant::now();
    loop {
        let wakeups = state.changes.services();
        if !state.cluster.is_leader() {
            leading = false;
            retries.clear();
            let (ids, all) = wakeups.take();
            if all || !ids.is_empty() {
                state
                    .cluster
                    .services_changed(if all { Vec::new() } else { ids });
            }
            tokio::select! {
                _ = leadership.changed() => {}
                () = wakeups.notify.notified() => {}
                () = tokio::time::sleep(IDLE) => {}
                () = shutdown.cancelled() => return,
            }
            continue;
        }
        if !leading {
            leading = true;
            next_full = tokio::time::Instant::now();
        }
        let (mut ids, all) = wakeups.take();
        if all || tokio::time::Instant::now() >= next_full {
            let interval = Duration::from_millis(
                state
                    .settings
                    .uint("service.reconcile.interval.millis")
                    .max(100),
            );
            next_full = tokio::time::Instant::now() + interval;
            if state.cluster.begin_task("service.reconcile").await {
                retries.clear();
                retries.extend(reconcile_all(&state).await);
            } else {
                // The duty is not this node's after all (or the store failed): look again
                // in a while, not at once.
                leading = false;
                tokio::select! {
                    () = tokio::time::sleep(IDLE) => {}
                    () = shutdown.cancelled() => return,
                }
                continue;
            }
        } else {
            let now = now_millis();
            retries.retain(|id, at| {
                if *at <= now {
                    ids.push(*id);
                    false
                } else {
                    true
                }
            });
            if !ids.is_empty() {
                ids.sort_unstable();
                ids.dedup();
                retries.extend(reconcile(&state, &ids).await);
            }
        }
        let now = now_millis();
        let until_retry = retries
            .values()
            .min()
            .map(|at| Duration::from_millis((*at - now).max(0) as u64));
        let sleep = tokio::time::sleep_until(match until_retry {
            Some(wait) => next_full.min(tokio::time::Instant::now() + wait),
            None => next_full,
        });
        tokio::select! {
            () = sleep => {}
            () = wakeups.notify.notified() => {}
            _ = leadership.changed() => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BACKOFF: Backoff = Backoff {
        initial_ms: 1000,
        max_ms: 8000,
        reset_ms: 60_000,
    };

    fn service(state: &str, data: Value) -> Resource {
        Resource {
            kind: ResourceKind::Service,
            id: 5,
            name: Some("web".into()),
            account_id: Some(1),
            sub_kind: "service".into(),
            uuid: "u".into(),
            description: None,
            state: state.into(),
            transitioning: "no".into(),
            transitioning_message: None,
            transitioning_progress: None,
            created: 0,
            removed: None,
            data: data.as_object().unwrap().clone(),
            host_id: None,
            agent_id: None,
            stack_id: None,
            service_id: None,
            instance_id: None,
            last_ping: None,
        }
    }

    fn web(scale: i64) -> Value {
        json!({"scale": scale, "launchConfig": {"command": ["sleep", "600"]}})
    }

    fn container(id: i64, index: i64, state: &str, pending: Option<&str>) -> ServiceContainer {
        ServiceContainer {
            id,
            service_id: 5,
            service_index: Some(index),
            state: state.into(),
            pending: pending.map(str::to_owned),
        }
    }

    #[test]
    fn an_active_service_fills_its_empty_slots_and_counts_what_is_on_its_way() {
        let plan = plan(
            &service("active", web(3)),
            &[container(10, 2, "creating", Some("instance.start"))],
            0,
            &BACKOFF,
        );
        assert_eq!(
            plan.actions,
            [Action::Create { index: 1 }, Action::Create { index: 3 }]
        );
        assert_eq!(plan.status["currentScale"], 0);
        assert_eq!(
            plan.status["reconcileMessage"],
            "0 of 3 running; creating 2; 1 in progress"
        );
        let at_scale = plan_of("active", web(2), &[(1, "running"), (2, "running")]);
        assert!(at_scale.actions.is_empty());
        assert_eq!(at_scale.status["currentScale"], 2);
        assert_eq!(at_scale.status["reconcileMessage"], Value::Null);
    }

    fn plan_of(state: &str, data: Value, slots: &[(i64, &str)]) -> Plan {
        let containers: Vec<_> = slots
            .iter()
            .map(|(index, state)| container(100 + index, *index, state, None))
            .collect();
        plan(&service(state, data), &containers, 0, &BACKOFF)
    }

    #[test]
    fn a_scale_down_removes_the_highest_slots_first_and_never_keeps_more_than_scale() {
        let slots = [
            (1, "running"),
            (2, "running"),
            (3, "running"),
            (4, "running"),
            (5, "running"),
        ];
        let down = plan_of("active", web(2), &slots);
        assert_eq!(
            down.actions,
            [
                Action::Remove { id: 105 },
                Action::Remove { id: 104 },
                Action::Remove { id: 103 }
            ]
        );
        assert_eq!(down.status["currentScale"], 2);
        // What is already being removed is not removed again, and does not count.
        let leaving = plan(
            &service("active", web(1)),
            &[
                container(1, 1, "running", None),
                container(2, 2, "removing", Some("instance.remove")),
            ],
            0,
            &BACKOFF,
        );
        assert!(leaving.actions.is_empty());
        assert_eq!(
            leaving.status["reconcileMessage"],
            "1 of 1 running; removing 1"
        );
        // Scale 0 removes everything; a scale above the maximum is the maximum.
        assert_eq!(plan_of("active", web(0), &slots).actions.len(), 5);
        assert_eq!(scale_of(&service("active", web(5000))), MAX_SCALE);
        assert_eq!(scale_of(&service("active", json!({}))), DEFAULT_SCALE);
    }

    #[test]
    fn stopped_containers_are_restarted_with_a_growing_backoff_that_resets() {
        // The first restart is at once and is recorded.
        let first = plan_of("active", web(2), &[(1, "running"), (2, "stopped")]);
        assert_eq!(first.actions, [Action::Start { id: 102 }]);
        assert_eq!(first.status["consecutiveRestarts"], 1);
        assert_eq!(first.status["lastRestartAtTS"], 0);
        // The next ones wait 1 s, 2 s, 4 s, then 8 s at most.
        for (streak, wait) in [(1, 1000), (2, 2000), (3, 4000), (4, 8000), (9, 8000)] {
            let mut data = web(1);
            data["consecutiveRestarts"] = json!(streak);
            data["lastRestartAtTS"] = json!(50_000);
            let stopped = [container(7, 1, "stopped", None)];
            let early = plan(
                &service("active", data.clone()),
                &stopped,
                50_000 + wait - 1,
                &BACKOFF,
            );
            assert!(early.actions.is_empty(), "streak {streak}");
            assert_eq!(early.wake_at, Some(50_000 + wait));
            assert_eq!(early.status["nextRetryAtTS"], 50_000 + wait);
            assert!(
                early.status["reconcileMessage"]
                    .as_str()
                    .unwrap()
                    .contains("backoff"),
                "{:?}",
                early.status
            );
            let due = plan(&service("active", data), &stopped, 50_000 + wait, &BACKOFF);
            assert_eq!(due.actions, [Action::Start { id: 7 }]);
            assert_eq!(due.status["consecutiveRestarts"], streak + 1);
            assert_eq!(due.status["nextRetryAtTS"], Value::Null);
        }
        // Running long enough after the last restart ends the streak; before that, the
        // reconciler comes back when it would.
        let mut data = web(1);
        data["consecutiveRestarts"] = json!(4);
        data["lastRestartAtTS"] = json!(10_000);
        let running = [container(7, 1, "running", None)];
        let soon = plan(&service("active", data.clone()), &running, 20_000, &BACKOFF);
        assert_eq!(soon.wake_at, Some(70_000));
        assert!(!soon.status.contains_key("consecutiveRestarts"));
        let later = plan(&service("active", data), &running, 70_000, &BACKOFF);
        assert_eq!(later.status["consecutiveRestarts"], 0);
    }

    #[test]
    fn inactive_services_stop_and_removed_ones_remove_their_containers() {
        let slots = [(1, "running"), (2, "stopped")];
        let inactive = plan_of("inactive", web(2), &slots);
        assert_eq!(inactive.actions, [Action::Stop { id: 101 }]);
        assert_eq!(inactive.status["currentScale"], 0);
        let removed = plan_of("removed", web(2), &slots);
        assert_eq!(
            removed.actions,
            [Action::Remove { id: 101 }, Action::Remove { id: 102 }]
        );
    }

    #[test]
    fn a_service_without_a_command_says_so_and_creates_nothing() {
        let nothing = plan_of("active", json!({"scale": 2}), &[]);
        assert!(nothing.actions.is_empty());
        assert_eq!(
            nothing.status["reconcileMessage"],
            "0 of 2 running; cannot create 2: the service has no launchConfig"
        );
        let bad = service(
            "active",
            json!({"launchConfig": {"command": "sleep 600", "labels": {"a": "b"}}}),
        );
        assert_eq!(
            container_data(&bad, None, 1).unwrap_err(),
            "launchConfig.command must be of type array[string]"
        );
    }

    #[test]
    fn containers_are_named_and_labelled_after_their_stack_and_service() {
        let service = service(
            "active",
            json!({"launchConfig": {"command": ["sleep", "1"], "labels": {"team": "a"}, "startOnCreate": false}}),
        );
        let data = container_data(&service, Some("shop"), 3).unwrap();
        assert_eq!(container_name(&service, Some("shop"), 3), "shop-web-3");
        assert_eq!(container_name(&service, None, 3), "web-3");
        assert_eq!(data["serviceIndex"], 3);
        assert_eq!(data["labels"]["team"], "a");
        assert_eq!(data["labels"][STACK_SERVICE_LABEL], "shop/web");
        assert_eq!(data["labels"][STACK_LABEL], "shop");
        assert!(data.get("startOnCreate").is_none());
    }

    #[test]
    fn wakeups_are_bounded_and_remember_everything_past_the_bound() {
        let wakeups = Wakeups::default();
        for id in 0..(MAX_DIRTY as i64 + 5) {
            wakeups.mark(id);
        }
        let (ids, all) = wakeups.take();
        assert_eq!(ids.len(), MAX_DIRTY);
        assert!(all);
        assert_eq!(wakeups.take(), (Vec::new(), false));
    }
}
