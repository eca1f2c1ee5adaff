//! Process definitions as data.
//!
//! Each definition says which states a resource may start the process from, the state it is in
//! while the process runs, the state it ends in, what the handler does and which process
//! follows (the delegate). The API derives a resource's `actions` from the same table, so what
//! the API offers and what the engine accepts cannot disagree.

use drover_store::{ResourceKind, Step};

use crate::external::Registry;
use serde_json::{Map, Value};

/// What a process does besides moving states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handler {
    /// Nothing: the state change is the process.
    None,
    /// Calls the agent of the resource's host with this command.
    Agent(&'static str),
    /// Calls the agent with one command, then another (restart).
    AgentTwice(&'static str, &'static str),
    /// Pings the agent the resource is (agent activation): done when it answers.
    PingAgent,
}

/// One process definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessDef {
    /// `<type>.<verb>`, e.g. `instance.start`.
    pub name: &'static str,
    /// The resource kind it acts on.
    pub kind: ResourceKind,
    /// The API action that schedules it, if any (`start`); `create` and `remove` are reached
    /// through POST and DELETE as well.
    pub action: Option<&'static str>,
    /// States the resource may be in.
    pub start: &'static [&'static str],
    /// The state while it runs; `UPDATING` means `updating-<state>`.
    pub transitioning: &'static str,
    /// The state it ends in; `PREVIOUS` means the state before the process.
    pub done: &'static str,
    /// What it does.
    pub handler: Handler,
    /// The process scheduled when it succeeds.
    pub delegate: Option<&'static str>,
    /// Whether it cancels pending processes instead of being refused by them (remove).
    pub cancels_pending: bool,
    /// Whether it runs only once its resource's agent is active (answered its activation): a
    /// host's activation. Until then the claim puts it back to wait, using up no attempt, and
    /// the agent's activation wakes it. Such a process is never a hop.
    pub awaits_agent: bool,
}

/// A transitioning state computed from the state before (`updating-running`).
pub const UPDATING: &str = "updating-*";
/// A done state that is the state before the process.
pub const PREVIOUS: &str = "*previous*";

impl ProcessDef {
    /// The transitioning state when started from `state`.
    pub fn transitioning_from(&self, state: &str) -> String {
        if self.transitioning == UPDATING {
            format!("updating-{state}")
        } else {
            self.transitioning.to_owned()
        }
    }

    /// Whether the process may start from `state`.
    pub fn accepts(&self, state: &str) -> bool {
        self.start.contains(&state)
    }
}

const INSTANCE_LIVE: &[&str] = &[
    "requested",
    "creating",
    "stopped",
    "starting",
    "running",
    "stopping",
    "restarting",
    "error",
    "updating-running",
    "updating-stopped",
];
const GENERIC_LIVE: &[&str] = &[
    "requested",
    "registering",
    "inactive",
    "activating",
    "active",
    "deactivating",
    "error",
    "updating-active",
    "updating-inactive",
    "reconnecting",
    "disconnected",
];

macro_rules! def {
    ($name:literal, $kind:ident, $action:expr, $start:expr, $trans:expr, $done:expr, $handler:expr, $delegate:expr) => {
        ProcessDef {
            name: $name,
            kind: ResourceKind::$kind,
            action: $action,
            start: $start,
            transitioning: $trans,
            done: $done,
            handler: $handler,
            delegate: $delegate,
            cancels_pending: false,
            awaits_agent: false,
        }
    };
}

macro_rules! generic {
    ($kind:ident, $create:literal, $activate:literal, $deactivate:literal, $update:literal, $remove:literal, $purge:literal) => {
        [
            def!(
                $create,
                $kind,
                None,
                &["requested"],
                "registering",
                "inactive",
                Handler::None,
                Some($activate)
            ),
            def!(
                $activate,
                $kind,
                Some("activate"),
                &["inactive", "registering", "error"],
                "activating",
                "active",
                Handler::None,
                None
            ),
            def!(
                $deactivate,
                $kind,
                Some("deactivate"),
                &["active", "activating", "error"],
                "deactivating",
                "inactive",
                Handler::None,
                None
            ),
            def!(
                $update,
                $kind,
                Some("update"),
                &["active", "inactive"],
                UPDATING,
                PREVIOUS,
                Handler::None,
                None
            ),
            ProcessDef {
                cancels_pending: true,
                ..def!(
                    $remove,
                    $kind,
                    Some("remove"),
                    GENERIC_LIVE,
                    "removing",
                    "removed",
                    Handler::None,
                    None
                )
            },
            def!(
                $purge,
                $kind,
                Some("purge"),
                &["removed"],
                "purging",
                "purged",
                Handler::None,
                None
            ),
        ]
    };
}

/// Every process definition.
pub static DEFINITIONS: std::sync::LazyLock<Vec<ProcessDef>> = std::sync::LazyLock::new(|| {
    let mut defs = vec![
        def!(
            "instance.create",
            Instance,
            None,
            &["requested"],
            "creating",
            "stopped",
            Handler::None,
            Some("instance.start")
        ),
        def!(
            "instance.start",
            Instance,
            Some("start"),
            &["stopped", "error"],
            "starting",
            "running",
            Handler::Agent("compute.instance.activate"),
            None
        ),
        def!(
            "instance.stop",
            Instance,
            Some("stop"),
            &["running", "error"],
            "stopping",
            "stopped",
            Handler::Agent("compute.instance.deactivate"),
            None
        ),
        def!(
            "instance.restart",
            Instance,
            Some("restart"),
            &["running"],
            "restarting",
            "running",
            Handler::AgentTwice("compute.instance.deactivate", "compute.instance.activate"),
            None
        ),
        def!(
            "instance.update",
            Instance,
            Some("update"),
            &["running", "stopped"],
            UPDATING,
            PREVIOUS,
            Handler::None,
            None
        ),
        ProcessDef {
            cancels_pending: true,
            ..def!(
                "instance.remove",
                Instance,
                Some("remove"),
                INSTANCE_LIVE,
                "removing",
                "removed",
                Handler::Agent("compute.instance.remove"),
                None
            )
        },
        def!(
            "instance.purge",
            Instance,
            Some("purge"),
            &["removed"],
            "purging",
            "purged",
            Handler::None,
            None
        ),
        def!(
            "volume.create",
            Volume,
            None,
            &["requested"],
            "registering",
            "inactive",
            Handler::None,
            Some("volume.activate")
        ),
        def!(
            "volume.activate",
            Volume,
            Some("activate"),
            &["inactive", "error"],
            "activating",
            "active",
            Handler::Agent("storage.volume.activate"),
            None
        ),
        def!(
            "volume.deactivate",
            Volume,
            Some("deactivate"),
            &["active", "error"],
            "deactivating",
            "inactive",
            Handler::None,
            None
        ),
        ProcessDef {
            cancels_pending: true,
            ..def!(
                "volume.remove",
                Volume,
                Some("remove"),
                GENERIC_LIVE,
                "removing",
                "removed",
                Handler::Agent("storage.volume.remove"),
                None
            )
        },
        def!(
            "volume.purge",
            Volume,
            Some("purge"),
            &["removed"],
            "purging",
            "purged",
            Handler::None,
            None
        ),
    ];
    let mut host = generic!(
        Host,
        "host.create",
        "host.activate",
        "host.deactivate",
        "host.update",
        "host.remove",
        "host.purge"
    );
    // A host is active only once its agent answered its own activation: placement picks only
    // active hosts, so an active host can take a container at once. (A host with no agent has
    // nothing to wait for.)
    host[1].awaits_agent = true;
    defs.extend(host);
    let mut agent = generic!(
        Agent,
        "agent.create",
        "agent.activate",
        "agent.deactivate",
        "agent.update",
        "agent.remove",
        "agent.purge"
    );
    // An agent is active once it answers a ping.
    agent[1].handler = Handler::PingAgent;
    agent[2].start = &[
        "active",
        "activating",
        "error",
        "reconnecting",
        "disconnected",
    ];
    defs.extend(agent);
    defs.extend(generic!(
        Stack,
        "stack.create",
        "stack.activate",
        "stack.deactivate",
        "stack.update",
        "stack.remove",
        "stack.purge"
    ));
    defs.extend(generic!(
        Service,
        "service.create",
        "service.activate",
        "service.deactivate",
        "service.update",
        "service.remove",
        "service.purge"
    ));
    defs.extend(generic!(
        ExternalHandler,
        "external_handler.create",
        "external_handler.activate",
        "external_handler.deactivate",
        "external_handler.update",
        "external_handler.remove",
        "external_handler.purge"
    ));
    defs
});

/// A definition by process name.
pub fn find(name: &str) -> Option<&'static ProcessDef> {
    DEFINITIONS.iter().find(|def| def.name == name)
}

/// The process that follows `def` when it succeeds, if any. A container created with
/// `startOnCreate: false` stays stopped.
pub fn delegate_of(def: &ProcessDef, data: &Map<String, Value>) -> Option<&'static ProcessDef> {
    let next = find(def.delegate?)?;
    if def.name == "instance.create" && data.get("startOnCreate") == Some(&Value::Bool(false)) {
        return None;
    }
    Some(next)
}

/// What scheduling `def` on a resource in `state` records: a process with no handler is a hop,
/// applied in the scheduling transaction, and so is each delegate after it that has none; the
/// first process that calls an agent (or awaits one) stays pending, for the engine to claim.
pub fn plan(def: &'static ProcessDef, state: &str, data: &Map<String, Value>) -> Vec<Step> {
    plan_with(def, state, data, &Registry::new(), None)
}

/// [`plan`], where a process that an active external handler takes part in for a resource of
/// `project` (a global handler, or one of that project's) is never a hop: it stays pending,
/// for the engine to run its handlers.
pub fn plan_with(
    def: &'static ProcessDef,
    state: &str,
    data: &Map<String, Value>,
    external: &Registry,
    project: Option<i64>,
) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut current = def;
    let mut state = state.to_owned();
    loop {
        let transitioning = current.transitioning_from(&state);
        if current.handler != Handler::None
            || current.awaits_agent
            || external.handles(current.name, project)
        {
            steps.push(Step::pending(current.name, &transitioning));
            return steps;
        }
        let done = if current.done == PREVIOUS {
            state.clone()
        } else {
            current.done.to_owned()
        };
        steps.push(Step::hop(current.name, &transitioning, &done));
        match delegate_of(current, data) {
            Some(next) => {
                state = done;
                current = next;
            }
            None => return steps,
        }
    }
}

/// The plan of creating a resource of `kind` (from `requested`).
pub fn create_plan(kind: ResourceKind, data: &Map<String, Value>) -> Vec<Step> {
    plan(create_of(kind), "requested", data)
}

/// [`create_plan`] with the active external handlers (see [`plan_with`]).
pub fn create_plan_with(
    kind: ResourceKind,
    data: &Map<String, Value>,
    external: &Registry,
    project: Option<i64>,
) -> Vec<Step> {
    plan_with(create_of(kind), "requested", data, external, project)
}

/// The create process of a kind.
pub fn create_of(kind: ResourceKind) -> &'static ProcessDef {
    DEFINITIONS
        .iter()
        .find(|def| def.kind == kind && def.name.ends_with(".create"))
        .expect("every kind has a create process")
}

/// The definition behind an API action on a kind.
pub fn action(kind: ResourceKind, action: &str) -> Option<&'static ProcessDef> {
    DEFINITIONS
        .iter()
        .find(|def| def.kind == kind && def.action == Some(action))
}

/// The API actions valid for a resource of `kind` in `state`, in definition order.
pub fn actions_for(kind: ResourceKind, state: &str) -> impl Iterator<Item = &'static str> {
    DEFINITIONS
        .iter()
        .filter(move |def| def.kind == kind && def.accepts(state))
        .filter_map(|def| def.action)
}

/// Every action a kind has.
pub fn all_actions(kind: ResourceKind) -> impl Iterator<Item = &'static str> {
    DEFINITIONS
        .iter()
        .filter(move |def| def.kind == kind)
        .filter_map(|def| def.action)
}

/// The states in which a resource of `kind` shows `transitioning: yes`.
pub fn is_transitioning_state(kind: ResourceKind, state: &str) -> bool {
    state.starts_with("updating-")
        || DEFINITIONS
            .iter()
            .any(|def| def.kind == kind && def.transitioning == state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_delegate_exists_and_every_kind_has_create_and_remove() {
        for def in DEFINITIONS.iter() {
            if let Some(delegate) = def.delegate {
                let next = find(delegate)
                    .unwrap_or_else(|| panic!("{} delegates to missing {delegate}", def.name));
                assert_eq!(next.kind, def.kind);
                assert!(
                    next.accepts(def.done),
                    "{delegate} cannot start from {}",
                    def.done
                );
            }
            assert!(def.name.starts_with(def.kind.table()), "{}", def.name);
        }
        for kind in ResourceKind::ALL {
            create_of(kind);
            assert!(action(kind, "remove").is_some_and(|def| def.cancels_pending));
        }
    }

    #[test]
    fn plans_hop_over_processes_without_a_handler() {
        let container = create_plan(ResourceKind::Instance, &Map::new());
        assert_eq!(
            container,
            [
                Step::hop("instance.create", "creating", "stopped"),
                Step::pending("instance.start", "starting")
            ]
        );
        let mut stay = Map::new();
        stay.insert("startOnCreate".into(), Value::Bool(false));
        assert_eq!(
            create_plan(ResourceKind::Instance, &stay),
            [Step::hop("instance.create", "creating", "stopped")]
        );
        assert_eq!(
            create_plan(ResourceKind::Stack, &Map::new()),
            [
                Step::hop("stack.create", "registering", "inactive"),
                Step::hop("stack.activate", "activating", "active")
            ]
        );
        assert_eq!(
            create_plan(ResourceKind::Agent, &Map::new()),
            [
                Step::hop("agent.create", "registering", "inactive"),
                Step::pending("agent.activate", "activating")
            ]
        );
        // A host's activation waits for its agent's, in the engine.
        assert_eq!(
            create_plan(ResourceKind::Host, &Map::new()),
            [
                Step::hop("host.create", "registering", "inactive"),
                Step::pending("host.activate", "activating")
            ]
        );
        let update = find("stack.update").unwrap();
        assert_eq!(
            plan(update, "active", &Map::new()),
            [Step::hop("stack.update", "updating-active", "active")]
        );
        assert_eq!(
            plan(find("instance.stop").unwrap(), "running", &Map::new()),
            [Step::pending("instance.stop", "stopping")]
        );
    }

    #[test]
    fn actions_follow_state() {
        let running: Vec<_> = actions_for(ResourceKind::Instance, "running").collect();
        assert_eq!(running, ["stop", "restart", "update", "remove"]);
        let stopped: Vec<_> = actions_for(ResourceKind::Instance, "stopped").collect();
        assert_eq!(stopped, ["start", "update", "remove"]);
        // A stuck resource can always be removed.
        assert!(actions_for(ResourceKind::Instance, "starting").eq(["remove"]));
        assert!(actions_for(ResourceKind::Instance, "removed").eq(["purge"]));
        assert_eq!(
            find("instance.update")
                .unwrap()
                .transitioning_from("running"),
            "updating-running"
        );
        assert!(is_transitioning_state(ResourceKind::Instance, "starting"));
        assert!(!is_transitioning_state(ResourceKind::Instance, "running"));
    }
}
