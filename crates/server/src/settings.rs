//! Settings: named tunables with a default, an environment override and a stored value.
//!
//! A value comes from, in order of precedence: the `setting` table, the environment
//! (`DROVER_<NAME IN UPPER SNAKE CASE>`, e.g. `DROVER_API_SUB_PING_INTERVAL_MILLIS`), the
//! default. A stored change takes effect without a restart: hot paths read typed snapshots
//! ([`ServerTunables`] for the server, `drover_engine::Tunables` for the engine) that every
//! change rebuilds and swaps in, one atomic load per read and no parsing; cold paths (the
//! clean-up job, the monitor, the settings API) read a value by name with [`Settings::int`].

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};

/// One tunable.
#[derive(Debug, Clone, Copy)]
pub struct Definition {
    /// The setting's name, the original's where it had one.
    pub name: &'static str,
    /// The default value.
    pub default: &'static str,
    /// The smallest accepted value (all settings so far are integers).
    pub min: i64,
    /// What it does, for `docs/settings.md` and the API.
    pub description: &'static str,
}

/// Every setting the server knows.
pub const DEFINITIONS: &[Definition] = &[
    Definition {
        name: "cluster.node.ttl.millis",
        default: "3000",
        min: 300,
        description: "Lease of a cluster node: a node that has not renewed it for this long is dead, and live nodes take its processes, agent sessions and duties over at their next heartbeat.",
    },
    Definition {
        name: "cluster.heartbeat.millis",
        default: "1000",
        min: 50,
        description: "How often a node renews its lease, sweeps dead nodes and renews the leader duty; keep it well below cluster.node.ttl.millis.",
    },
    Definition {
        name: "api.sub.ping.interval.millis",
        default: "5000",
        min: 10,
        description: "Interval of the `ping` event sent on every subscription (the first is sent at once).",
    },
    Definition {
        name: "api.sub.max.pings",
        default: "8640",
        min: 0,
        description: "A subscription is closed (code 1000, reconnect) after this many pings, 12 h by default; 0 never closes it.",
    },
    Definition {
        name: "subscribe.max.queued.messages",
        default: "1000",
        min: 1,
        description: "Outgoing queue of one subscriber socket, in events; a subscriber that lets it fill is disconnected as a slow consumer (close code 1008).",
    },
    Definition {
        name: "api.sub.write.timeout.millis",
        default: "10000",
        min: 1,
        description: "A write to a subscriber socket that takes longer disconnects it as a slow consumer (close code 1008).",
    },
    Definition {
        name: "api.max.body.bytes",
        default: "1048576",
        min: 1024,
        description: "Largest accepted request body and WebSocket message, in bytes (read at start).",
    },
    Definition {
        name: "api.sub.max.connections",
        default: "10000",
        min: 0,
        description: "Most subscriber WebSockets one server holds; more upgrades are refused with 503 `TooManyConnections` before upgrading. Capped at start to the open-files limit minus a reserve for the API, `/healthz` and the store; 0 is no limit at all (not recommended).",
    },
    Definition {
        name: "api.http.header.timeout.millis",
        default: "10000",
        min: 100,
        description: "A connection whose request headers are not complete this long after it opened (or after its previous request) is closed (read at start).",
    },
    Definition {
        name: "api.http.body.timeout.millis",
        default: "30000",
        min: 100,
        description: "A request body that sends nothing for this long is answered 408 and its connection closed (read at start).",
    },
    Definition {
        name: "api.idempotency.ttl.seconds",
        default: "86400",
        min: 1,
        description: "How long an `Idempotency-Key` of a create is remembered: a retry with the same key within it answers the resource created first; `table.cleanup` deletes older keys.",
    },
    Definition {
        name: "api.auth.cache.millis",
        default: "30000",
        min: 0,
        description: "How long a verified key is trusted without asking the store again; a key removed through this server is dropped from the cache at once.",
    },
    Definition {
        name: "eventing.timeout.millis",
        default: "45000",
        min: 1,
        description: "Default timeout of a call from the server to an agent when the event carries none.",
    },
    Definition {
        name: "process.max_attempts",
        default: "10",
        min: 1,
        description: "Attempts of a process before it fails for good and its resource goes to `error`. Waiting for a host or an agent (see `waitCount`) is no attempt.",
    },
    Definition {
        name: "process.max_age.seconds",
        default: "1800",
        min: 1,
        description: "Age after which a process that has not succeeded fails for good, however few its attempts.",
    },
    Definition {
        name: "process.retry_max_wait.millis",
        default: "120000",
        min: 1,
        description: "Cap on the wait between attempts: min(this, 2 s + 2^(n-1) x 100 ms), plus up to 10% jitter.",
    },
    Definition {
        name: "process.lease.millis",
        default: "5000",
        min: 300,
        description: "Lease of a running process; renewed every third of it, so a dead node's work is taken over within this time.",
    },
    Definition {
        name: "process.poll.millis",
        default: "1000",
        min: 1,
        description: "Longest the engine sleeps before looking for ready processes when nothing woke it.",
    },
    Definition {
        name: "process.workers",
        default: "512",
        min: 1,
        description: "Processes one node runs at once (most of their time is spent waiting for agents).",
    },
    Definition {
        name: "process.claim.batch",
        default: "64",
        min: 1,
        description: "Ready processes claimed in one statement.",
    },
    Definition {
        name: "agent.ping.interval.millis",
        default: "5000",
        min: 10,
        description: "Interval of the ping monitor's `ping` to every agent (the reply reports host facts and instance states).",
    },
    Definition {
        name: "agent.ping.timeout.millis",
        default: "15000",
        min: 10,
        description: "How long an agent has to answer a ping (also the agent activation ping).",
    },
    Definition {
        name: "agent.activate.ping.timeout.millis",
        default: "2000",
        min: 10,
        description: "How long a newly registered agent has to answer its activation ping before the next attempt.",
    },
    Definition {
        name: "agent.ping.reconnect.after.failed.count",
        default: "6",
        min: 1,
        description: "Missed pings after which an active agent (and its hosts) become `reconnecting`.",
    },
    Definition {
        name: "agent.disconnect.after.seconds",
        default: "180",
        min: 1,
        description: "Seconds of missed pings after which a reconnecting agent (and its hosts) become `disconnected`.",
    },
    Definition {
        name: "container.event.max.size",
        default: "150",
        min: 1,
        description: "Container (and service) events a host may have waiting to be handled; more posts are refused with 409 `TooManyContainerEvents`.",
    },
    Definition {
        name: "task.table.cleanup.schedule",
        default: "3600",
        min: 1,
        description: "Seconds between runs of the `table.cleanup` job (the first run comes `min(15 s, this)` after start; a change reschedules the next run at once).",
    },
    Definition {
        name: "cleanup.query_limit.rows",
        default: "1000",
        min: 1,
        description: "Rows deleted per statement by `table.cleanup`.",
    },
    Definition {
        name: "events.purge.after.seconds",
        default: "43200",
        min: 0,
        description: "Age (by `created`) after which `table.cleanup` deletes container and service events.",
    },
    Definition {
        name: "process_instance.purge.after.seconds",
        default: "3600",
        min: 0,
        description: "Age (by end time) after which `table.cleanup` deletes finished processes and their executions; unfinished ones are never deleted (the engine's max age ends them).",
    },
    Definition {
        name: "main_tables.purge.after.seconds",
        default: "172800",
        min: 0,
        description: "Age (by `removed`) after which `table.cleanup` deletes purged containers, volumes, hosts, agents, stacks, services and removed keys; removed resources are purged through the engine first, and rows still referenced are kept.",
    },
    Definition {
        name: "service.reconcile.interval.millis",
        default: "10000",
        min: 100,
        description: "How often the service reconciler (on the leader) looks at every service, besides the passes that changes of services and their containers start at once.",
    },
    Definition {
        name: "service.restart.backoff.initial.millis",
        default: "1000",
        min: 1,
        description: "The wait before restarting a service's stopped containers the second time in a row; it doubles with each restart in a row (the first is at once).",
    },
    Definition {
        name: "service.restart.backoff.max.millis",
        default: "120000",
        min: 1,
        description: "Cap on the wait between restarts in a row of a service's containers.",
    },
    Definition {
        name: "service.restart.backoff.reset.seconds",
        default: "300",
        min: 1,
        description: "A service whose containers all ran this long after its last restart starts its restart backoff afresh.",
    },
    Definition {
        name: "resource.change.interval.millis",
        default: "1000",
        min: 1,
        description: "Changes are coalesced into at most one `resource.change` per resource per interval.",
    },
    Definition {
        name: "resource.change.retain.count",
        default: "10000",
        min: 1,
        description: "Stream positions of `resource.change` kept in the change log for subscribers that resume (`?resumeFrom=`); a resume from an older position gets 410 `ResumeTooOld` (re-list). Trimmed by each tick's insert.",
    },
];

/// Where a value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The built-in default.
    Default,
    /// The environment (or a start-up override).
    Environment,
    /// The `setting` table.
    Database,
}

/// The settings the server reads per request, per socket and per event, as one typed
/// snapshot: a change to a stored value swaps in a new one at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTunables {
    /// `api.sub.ping.interval.millis` (at least 1 ms).
    pub sub_ping_interval: Duration,
    /// `api.sub.max.pings`: pings before a subscription is closed; 0 = never.
    pub sub_max_pings: u64,
    /// `subscribe.max.queued.messages`: one subscriber socket's queue.
    pub sub_queue: usize,
    /// `api.sub.write.timeout.millis` (at least 1 ms).
    pub sub_write_timeout: Duration,
    /// `api.sub.max.connections` as configured; 0 = no limit (the cap is applied by the caller).
    pub sub_max_connections: u64,
    /// `api.max.body.bytes`, **read at start**: the value when the server started, kept by
    /// every later snapshot (the body limit layer and the socket limits are built with it).
    pub max_body_bytes: usize,
    /// `api.http.body.timeout.millis`, **read at start** like `max_body_bytes`.
    pub http_body_timeout: Duration,
    /// `api.idempotency.ttl.seconds`.
    pub idempotency_ttl: Duration,
    /// `api.auth.cache.millis`: how long a verified key is trusted.
    pub auth_cache: Duration,
    /// `resource.change.interval.millis` (at least 1 ms).
    pub resource_change_interval: Duration,
    /// `container.event.max.size`: events a host may have waiting.
    pub container_event_max: i64,
    /// `resource.change.retain.count`: positions kept in the change log (at least 1).
    pub change_retain: i64,
}

/// The live settings: cheap to clone, cheap to read.
#[derive(Debug, Clone)]
pub struct Settings {
    inner: Arc<RwLock<Inner>>,
    version: Arc<tokio::sync::watch::Sender<u64>>,
    engine: drover_engine::SharedTunables,
    server: Arc<ArcSwap<ServerTunables>>,
}

#[derive(Debug)]
struct Inner {
    overrides: HashMap<&'static str, String>,
    stored: HashMap<String, String>,
}

/// A setting that is unknown or whose value is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingError {
    /// No setting has that name.
    #[error("unknown setting {0:?}")]
    Unknown(String),
    /// The value does not parse or is out of range.
    #[error("invalid value {value:?} for {name}: {reason}")]
    Invalid {
        /// The setting.
        name: String,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl Settings {
    /// Settings with start-up overrides (from the environment or a test) and stored values.
    /// Invalid overrides are refused, so a typo in the environment stops the start.
    pub fn new(
        overrides: &[(String, String)],
        stored: &[(String, String)],
    ) -> Result<Settings, SettingError> {
        let mut by_name = HashMap::new();
        for (name, value) in overrides {
            let definition = definition(name).ok_or_else(|| SettingError::Unknown(name.clone()))?;
            validate(definition, value)?;
            by_name.insert(definition.name, value.clone());
        }
        // A stored value that no longer validates (an older version's) is ignored, not fatal.
        let stored = stored
            .iter()
            .filter(|(name, value)| {
                definition(name).is_some_and(|def| validate(def, value).is_ok())
            })
            .cloned()
            .collect();
        let settings = Settings {
            inner: Arc::new(RwLock::new(Inner {
                overrides: by_name,
                stored,
            })),
            version: Arc::new(tokio::sync::watch::Sender::new(0)),
            engine: Arc::new(drover_engine::ArcSwap::from_pointee(
                drover_engine::Tunables::default(),
            )),
            server: Arc::new(ArcSwap::from_pointee(ServerTunables {
                sub_ping_interval: Duration::ZERO,
                sub_max_pings: 0,
                sub_queue: 0,
                sub_write_timeout: Duration::ZERO,
                sub_max_connections: 0,
                max_body_bytes: 0,
                http_body_timeout: Duration::ZERO,
                idempotency_ttl: Duration::ZERO,
                auth_cache: Duration::ZERO,
                resource_change_interval: Duration::ZERO,
                container_event_max: 0,
                change_retain: 1,
            })),
        };
        // The values read at start, once.
        let mut first = settings.server_tunables_now();
        first.max_body_bytes = settings.uint("api.max.body.bytes") as usize;
        first.http_body_timeout =
            Duration::from_millis(settings.uint("api.http.body.timeout.millis"));
        settings.server.store(Arc::new(first));
        settings.refresh();
        Ok(settings)
    }

    /// The server's typed snapshot in effect: one atomic load, no lock, no parsing. Hold it
    /// for one request or one decision, not across awaits that should see a change.
    pub fn server(&self) -> Guard<Arc<ServerTunables>> {
        self.server.load()
    }

    /// The server's snapshot from the values in effect now; the values read at start are
    /// carried over from the current snapshot.
    fn server_tunables_now(&self) -> ServerTunables {
        let current = self.server.load();
        let millis = |name: &str| Duration::from_millis(self.uint(name));
        ServerTunables {
            sub_ping_interval: millis("api.sub.ping.interval.millis").max(Duration::from_millis(1)),
            sub_max_pings: self.uint("api.sub.max.pings"),
            sub_queue: self.uint("subscribe.max.queued.messages").max(1) as usize,
            sub_write_timeout: millis("api.sub.write.timeout.millis").max(Duration::from_millis(1)),
            sub_max_connections: self.uint("api.sub.max.connections"),
            max_body_bytes: current.max_body_bytes,
            http_body_timeout: current.http_body_timeout,
            idempotency_ttl: Duration::from_secs(self.uint("api.idempotency.ttl.seconds")),
            auth_cache: millis("api.auth.cache.millis"),
            resource_change_interval: millis("resource.change.interval.millis")
                .max(Duration::from_millis(1)),
            container_event_max: self.int("container.event.max.size"),
            change_retain: self.int("resource.change.retain.count").max(1),
        }
    }

    /// The engine's typed snapshot, swapped whenever a stored value changes.
    pub fn engine(&self) -> drover_engine::SharedTunables {
        self.engine.clone()
    }

    /// Rebuilds the typed snapshots from the values in effect.
    fn refresh(&self) {
        self.engine.store(Arc::new(self.engine_tunables()));
        self.server.store(Arc::new(self.server_tunables_now()));
    }

    /// Start-up overrides from `DROVER_*` environment variables named after known settings.
    pub fn from_environment() -> Vec<(String, String)> {
        DEFINITIONS
            .iter()
            .filter_map(|def| {
                std::env::var(env_name(def.name))
                    .ok()
                    .map(|value| (def.name.to_owned(), value))
            })
            .collect()
    }

    /// The value in effect and where it came from.
    pub fn get(&self, name: &str) -> Option<(String, Source)> {
        let def = definition(name)?;
        let inner = self
            .inner
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Some(if let Some(value) = inner.stored.get(def.name) {
            (value.clone(), Source::Database)
        } else if let Some(value) = inner.overrides.get(def.name) {
            (value.clone(), Source::Environment)
        } else {
            (def.default.to_owned(), Source::Default)
        })
    }

    /// The value in effect of an integer setting.
    pub fn int(&self, name: &str) -> i64 {
        let def = definition(name).unwrap_or_else(|| panic!("{name} is not a defined setting"));
        self.get(name)
            .and_then(|(value, _)| value.parse().ok())
            .unwrap_or_else(|| def.default.parse().expect("defaults are valid"))
    }

    /// The value in effect of a non-negative integer setting, as `u64`.
    pub fn uint(&self, name: &str) -> u64 {
        self.int(name).max(0) as u64
    }

    /// Records a stored value (after the store has written it).
    pub fn set_stored(&self, name: &str, value: &str) -> Result<(), SettingError> {
        let def = definition(name).ok_or_else(|| SettingError::Unknown(name.to_owned()))?;
        validate(def, value)?;
        let mut inner = self
            .inner
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        inner.stored.insert(def.name.to_owned(), value.to_owned());
        drop(inner);
        self.refresh();
        self.version.send_modify(|version| *version += 1);
        Ok(())
    }

    /// A receiver that sees a new version whenever a stored value changes, for tasks that
    /// sleep on a setting (the clean-up job's interval).
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Replaces every stored value with `stored` (another node changed them); values that do
    /// not validate are ignored, as at start.
    pub fn reload_stored(&self, stored: &[(String, String)]) {
        let stored: HashMap<String, String> = stored
            .iter()
            .filter(|(name, value)| {
                definition(name).is_some_and(|def| validate(def, value).is_ok())
            })
            .cloned()
            .collect();
        let mut inner = self
            .inner
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if inner.stored == stored {
            return;
        }
        inner.stored = stored;
        drop(inner);
        self.refresh();
        self.version.send_modify(|version| *version += 1);
    }

    /// Forgets a stored value (after the store has deleted it).
    pub fn clear_stored(&self, name: &str) {
        let mut inner = self
            .inner
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        inner.stored.remove(name);
        drop(inner);
        self.refresh();
        self.version.send_modify(|version| *version += 1);
    }
}

/// The definition of a setting.
pub fn definition(name: &str) -> Option<&'static Definition> {
    DEFINITIONS.iter().find(|def| def.name == name)
}

/// Checks a value against a setting's definition.
pub fn validate(def: &Definition, value: &str) -> Result<(), SettingError> {
    let invalid = |reason: String| SettingError::Invalid {
        name: def.name.to_owned(),
        value: value.to_owned(),
        reason,
    };
    let number: i64 = value
        .trim()
        .parse()
        .map_err(|_| invalid("not an integer".to_owned()))?;
    if number < def.min {
        return Err(invalid(format!("must be at least {}", def.min)));
    }
    Ok(())
}

/// `api.sub.ping.interval.millis` → `DROVER_API_SUB_PING_INTERVAL_MILLIS`.
pub fn env_name(name: &str) -> String {
    let mut out = String::from("DROVER_");
    out.extend(name.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_is_documented_in_the_readme() {
        let readme = include_str!("../../../README.md");
        for def in DEFINITIONS {
            let row = format!("| `{}` | {} |", def.name, def.default);
            assert!(readme.contains(&row), "README.md has no row {row}");
        }
    }

    #[test]
    fn precedence_is_stored_then_environment_then_default() {
        let settings = Settings::new(
            &[("api.sub.ping.interval.millis".into(), "700".into())],
            &[],
        )
        .unwrap();
        assert_eq!(settings.int("api.sub.ping.interval.millis"), 700);
        assert_eq!(
            settings.get("api.sub.max.pings").unwrap().1,
            Source::Default
        );
        settings
            .set_stored("api.sub.ping.interval.millis", "900")
            .unwrap();
        assert_eq!(
            settings.get("api.sub.ping.interval.millis").unwrap(),
            ("900".into(), Source::Database)
        );
        settings.clear_stored("api.sub.ping.interval.millis");
        assert_eq!(settings.int("api.sub.ping.interval.millis"), 700);
    }

    #[test]
    fn a_stored_change_is_in_the_server_snapshot_at_once() {
        let settings = Settings::new(
            &[("api.sub.ping.interval.millis".into(), "700".into())],
            &[("api.auth.cache.millis".into(), "250".into())],
        )
        .unwrap();
        let before = settings.server();
        assert_eq!(before.sub_ping_interval, Duration::from_millis(700));
        assert_eq!(before.auth_cache, Duration::from_millis(250));
        assert_eq!(before.sub_queue, 1000);
        assert_eq!(before.max_body_bytes, 1_048_576);
        assert_eq!(before.idempotency_ttl, Duration::from_secs(86_400));
        settings
            .set_stored("subscribe.max.queued.messages", "7")
            .unwrap();
        settings.set_stored("api.sub.max.pings", "3").unwrap();
        settings
            .set_stored("resource.change.interval.millis", "20")
            .unwrap();
        settings
            .set_stored("container.event.max.size", "9")
            .unwrap();
        let after = settings.server();
        assert_eq!(after.sub_queue, 7);
        assert_eq!(after.sub_max_pings, 3);
        assert_eq!(after.resource_change_interval, Duration::from_millis(20));
        assert_eq!(after.container_event_max, 9);
        // A snapshot taken before is a snapshot: unchanged.
        assert_eq!(before.sub_queue, 1000);
        // Read at start: a stored change waits for the next start.
        settings.set_stored("api.max.body.bytes", "4096").unwrap();
        settings
            .set_stored("api.http.body.timeout.millis", "500")
            .unwrap();
        assert_eq!(settings.server().max_body_bytes, 1_048_576);
        assert_eq!(
            settings.server().http_body_timeout,
            Duration::from_millis(30_000)
        );
        settings.clear_stored("subscribe.max.queued.messages");
        assert_eq!(settings.server().sub_queue, 1000);
        // The engine's snapshot is swapped by the same change.
        settings.set_stored("process.max_attempts", "4").unwrap();
        assert_eq!(settings.engine().load().max_attempts, 4);
        let restarted =
            Settings::new(&[], &[("api.max.body.bytes".into(), "4096".into())]).unwrap();
        assert_eq!(restarted.server().max_body_bytes, 4096);
    }

    #[test]
    fn unknown_and_invalid_values_are_refused() {
        assert!(matches!(
            Settings::new(&[("nope".into(), "1".into())], &[]),
            Err(SettingError::Unknown(_))
        ));
        let settings = Settings::new(&[], &[]).unwrap();
        assert!(matches!(
            settings.set_stored("subscribe.max.queued.messages", "0"),
            Err(SettingError::Invalid { .. })
        ));
        assert!(matches!(
            settings.set_stored("subscribe.max.queued.messages", "x"),
            Err(SettingError::Invalid { .. })
        ));
        assert_eq!(
            env_name("api.sub.ping.interval.millis"),
            "DROVER_API_SUB_PING_INTERVAL_MILLIS"
        );
        for def in DEFINITIONS {
            validate(def, def.default).unwrap();
        }
    }
}
