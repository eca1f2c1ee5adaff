//! The agent's event handlers. Each is idempotent: it checks whether the work is done already
//! (a resent request then only reports), takes the instance's lock, acts, and re-checks.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use drover_client::{Client, Context, Event, HandlerError, HandlerResult, RouterBuilder};
use serde_json::{Map, Value, json};

use crate::driver::{Driver, DriverError, InstanceSpec, InstanceStatus};
use crate::logs::Followers;
use tokio_util::sync::CancellationToken;

/// The agent's state shared by its handlers.
#[derive(Debug)]
pub struct Agent<D> {
    driver: Arc<D>,
    client: Client,
    /// The log streams running (`instance.logs`).
    followers: Arc<Followers>,
}

impl<D: Driver> Agent<D> {
    /// An agent over a driver; its log followers stop when `shutdown` is cancelled.
    pub fn new(driver: Arc<D>, client: Client, shutdown: CancellationToken) -> Agent<D> {
        Agent {
            driver,
            client,
            followers: Arc::new(Followers::new(shutdown)),
        }
    }

    /// The log followers (for the health port's `/metrics`).
    pub fn followers(&self) -> Arc<Followers> {
        self.followers.clone()
    }
}

/// Registers every handler on a router.
pub fn register<D: Driver>(builder: RouterBuilder, agent: Arc<Agent<D>>) -> RouterBuilder {
    macro_rules! on {
        ($builder:expr, $name:literal, $method:ident) => {{
            let agent = agent.clone();
            $builder.on($name, move |event: Event, context: Context| {
                let agent = agent.clone();
                async move { agent.$method(event, context).await }
            })
        }};
    }
    let builder = on!(builder, "compute.instance.activate", activate);
    let builder = on!(builder, "compute.instance.deactivate", deactivate);
    let builder = on!(builder, "compute.instance.force.stop", force_stop);
    let builder = on!(builder, "compute.instance.remove", remove);
    let builder = on!(builder, "compute.instance.inspect", inspect);
    let builder = on!(builder, "storage.volume.activate", volume_activate);
    let builder = on!(builder, "storage.volume.remove", volume_remove);
    let builder = on!(builder, "config.update", config_update);
    let builder = on!(builder, "instance.logs", logs);
    let builder = on!(builder, "instance.logs.ack", logs_ack);
    let builder = on!(builder, "instance.logs.cancel", logs_cancel);
    on!(builder, "ping", ping)
}

/// The instance in a request (`data.instance`).
fn instance_of(event: &Event) -> Result<&Map<String, Value>, HandlerError> {
    event
        .data
        .as_ref()
        .and_then(|data| data.get("instance"))
        .and_then(Value::as_object)
        .ok_or_else(|| HandlerError::permanent("the request has no data.instance"))
}

fn instance_id(event: &Event) -> Result<String, HandlerError> {
    match instance_of(event)
        .ok()
        .and_then(|instance| instance.get("id"))
        .and_then(Value::as_str)
    {
        Some(id) => Ok(id.to_owned()),
        None => event
            .resource_id
            .clone()
            .ok_or_else(|| HandlerError::permanent("the request names no instance")),
    }
}

/// What to run, from the request; a spec this driver can never run is a permanent error.
fn spec_of(event: &Event) -> Result<InstanceSpec, HandlerError> {
    let instance = instance_of(event)?;
    let id = instance_id(event)?;
    let invalid = |message: String| HandlerError::permanent(format!("invalid instance: {message}"));
    let command: Vec<String> = match instance.get("command") {
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(index, item)| match item {
                Value::String(text) => Ok(text.clone()),
                other => Err(invalid(format!(
                    "command[{index}] is not a string: {other}"
                ))),
            })
            .collect::<Result<_, _>>()?,
        Some(Value::String(line)) => line.split_whitespace().map(str::to_owned).collect(),
        None | Some(Value::Null) => Vec::new(),
        Some(other) => return Err(invalid(format!("command is not a list: {other}"))),
    };
    if command.first().is_none_or(String::is_empty) {
        return Err(invalid(
            "this driver runs a local process and needs a command (command[0] is the executable)"
                .into(),
        ));
    }
    let mut environment = BTreeMap::new();
    match instance.get("environment") {
        None | Some(Value::Null) => {}
        Some(Value::Object(env)) => {
            for (name, value) in env {
                if name.is_empty() || name.contains('=') {
                    return Err(invalid(format!(
                        "environment variable name {name:?} is empty or contains '='"
                    )));
                }
                let value = match value {
                    Value::String(text) => text.clone(),
                    Value::Number(number) => number.to_string(),
                    Value::Bool(flag) => flag.to_string(),
                    other => {
                        return Err(invalid(format!(
                            "environment.{name} is not a string: {other}"
                        )));
                    }
                };
                environment.insert(name.clone(), value);
            }
        }
        Some(other) => return Err(invalid(format!("environment is not a map: {other}"))),
    }
    let working_dir = match instance.get("workingDir") {
        None | Some(Value::Null) => None,
        Some(Value::String(dir)) if dir.is_empty() => None,
        Some(Value::String(dir)) => Some(dir.clone()),
        Some(other) => return Err(invalid(format!("workingDir is not a string: {other}"))),
    };
    Ok(InstanceSpec {
        id,
        name: instance
            .get("name")
            .and_then(Value::as_str)
            .map(str::to_owned),
        command,
        environment,
        working_dir,
    })
}

/// A driver error as the reply's: permanent when trying again can never help.
fn failed(error: DriverError) -> HandlerError {
    if error.is_permanent() {
        HandlerError::permanent(error.to_string())
    } else {
        HandlerError::retryable(error.to_string())
    }
}

/// What the agent reports of an instance (merged into the container): `agentState`,
/// `exitCode`, `finishedAt` (RFC 3339) and `agentMessage`; a running one clears how it ended
/// before.
pub fn report(status: InstanceStatus) -> Value {
    let mut out = json!({"agentState": status.name(), "agentMessage": status.message()});
    match status {
        InstanceStatus::Running { pid } => {
            out["externalId"] = json!(format!("pid:{pid}"));
            out["exitCode"] = Value::Null;
            out["finishedAt"] = Value::Null;
        }
        InstanceStatus::Stopped {
            exit_code,
            finished_at,
            ..
        } => {
            out["exitCode"] = json!(exit_code);
            out["finishedAt"] = json!(finished_at.map(rfc3339));
        }
        InstanceStatus::Missing => {}
    }
    out
}

/// Epoch milliseconds as RFC 3339 (UTC, seconds), as the server renders its times.
pub fn rfc3339(millis: i64) -> String {
    chrono::DateTime::from_timestamp_millis(millis)
        .map(|time| time.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

impl<D: Driver> Agent<D> {
    async fn activate(&self, event: Event, context: Context) -> HandlerResult {
        let spec = spec_of(&event)?;
        if let status @ InstanceStatus::Running { .. } = self.driver.inspect(&spec.id) {
            return Ok(Some(json!({"instance": report(status)})));
        }
        let _ = context.progress("starting process", Some(10)).await;
        let status = self.driver.start(&spec).await.map_err(failed)?;
        crate::fault_point("exit-before-reply");
        tracing::info!(instance = %spec.id, state = status.name(), "activated");
        Ok(Some(json!({"instance": report(status)})))
    }

    async fn deactivate(&self, event: Event, _context: Context) -> HandlerResult {
        let id = instance_id(&event)?;
        let grace = event
            .data
            .as_ref()
            .and_then(|data| data.get("processData"))
            .and_then(|data| data.get("timeout"))
            .and_then(Value::as_u64)
            .unwrap_or(10);
        let status = self
            .driver
            .stop(&id, Duration::from_secs(grace))
            .await
            .map_err(failed)?;
        tracing::info!(instance = %id, "deactivated");
        Ok(Some(json!({"instance": report(status)})))
    }

    async fn force_stop(&self, event: Event, _context: Context) -> HandlerResult {
        let id = instance_id(&event)?;
        let status = self
            .driver
            .stop(&id, Duration::ZERO)
            .await
            .map_err(failed)?;
        Ok(Some(json!({"instance": report(status)})))
    }

    async fn remove(&self, event: Event, _context: Context) -> HandlerResult {
        let id = instance_id(&event)?;
        self.driver.remove(&id).await.map_err(failed)?;
        tracing::info!(instance = %id, "removed");
        Ok(Some(json!({"instance": {"agentState": "removed"}})))
    }

    async fn inspect(&self, event: Event, _context: Context) -> HandlerResult {
        let id = instance_id(&event)?;
        Ok(Some(json!({"instance": report(self.driver.inspect(&id))})))
    }

    async fn volume_activate(&self, event: Event, _context: Context) -> HandlerResult {
        let id = event
            .data
            .as_ref()
            .and_then(|data| data.get("volume"))
            .and_then(|volume| volume.get("id"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or(event.resource_id)
            .ok_or_else(|| HandlerError::permanent("the request names no volume"))?;
        let path = self.driver.volume_activate(&id).map_err(failed)?;
        Ok(Some(
            json!({"volume": {"path": path.display().to_string()}}),
        ))
    }

    async fn volume_remove(&self, event: Event, _context: Context) -> HandlerResult {
        let id = event
            .resource_id
            .ok_or_else(|| HandlerError::permanent("the request names no volume"))?;
        self.driver.volume_remove(&id).map_err(failed)?;
        Ok(Some(json!({"volume": {}})))
    }

    async fn logs(&self, event: Event, _context: Context) -> HandlerResult {
        let id = instance_id(&event)?;
        let paths = match self.driver.inspect(&id) {
            InstanceStatus::Missing => None,
            _ => Some(self.driver.log_paths(&id).map_err(failed)?),
        };
        self.followers.start(&event, &self.client, paths)
    }

    async fn logs_ack(&self, event: Event, _context: Context) -> HandlerResult {
        self.followers.ack(&event)
    }

    async fn logs_cancel(&self, event: Event, _context: Context) -> HandlerResult {
        self.followers.cancel(&event)
    }

    async fn config_update(&self, event: Event, _context: Context) -> HandlerResult {
        // No configuration items are managed yet: acknowledge each as applied.
        let items = event
            .data
            .as_ref()
            .and_then(|data| data.get("items"))
            .cloned()
            .unwrap_or(json!([]));
        Ok(Some(json!({"items": items})))
    }

    async fn ping(&self, event: Event, _context: Context) -> HandlerResult {
        if event.reply_to.is_none() {
            return Ok(None);
        }
        let mut host = host_facts();
        host.insert("type".into(), json!("host"));
        let mut resources = vec![Value::Object(host)];
        for (id, status) in self.driver.list() {
            let mut instance = json!({"type": "instance", "id": id, "state": status.name()});
            if let InstanceStatus::Stopped { .. } = status
                && let Value::Object(fields) = report(status)
                && let Value::Object(out) = &mut instance
            {
                for (key, value) in fields {
                    if key != "agentState" {
                        out.insert(key, value);
                    }
                }
            }
            resources.push(instance);
        }
        Ok(Some(json!({"resources": resources})))
    }
}

/// The machine's hostname.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Facts about this host: hostname, CPUs, memory, OS, kernel.
pub fn host_facts() -> Map<String, Value> {
    let memory_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        });
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("PRETTY_NAME="))
                .map(|name| name.trim_matches('"').to_owned())
        });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|text| text.trim().to_owned());
    let mut facts = Map::new();
    facts.insert("hostname".into(), json!(hostname()));
    facts.insert(
        "cpus".into(),
        json!(
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        ),
    );
    facts.insert("memoryMb".into(), json!(memory_kib.map(|kib| kib / 1024)));
    facts.insert(
        "os".into(),
        json!(os.unwrap_or_else(|| std::env::consts::OS.to_owned())),
    );
    facts.insert("kernel".into(), json!(kernel));
    facts.insert("arch".into(), json!(std::env::consts::ARCH));
    facts.insert("agentVersion".into(), json!(env!("CARGO_PKG_VERSION")));
    facts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn activate(instance: Value) -> Event {
        Event::new("compute.instance.activate")
            .with_resource("container", "1i5")
            .with_data(json!({ "instance": instance }))
    }

    #[test]
    fn a_valid_spec_is_read() {
        let spec = spec_of(&activate(json!({
            "id": "1i5",
            "name": "web",
            "command": ["sh", "-c", "exit 3"],
            "environment": {"A": "1", "N": 2, "B": true},
            "workingDir": "/tmp",
        })))
        .unwrap();
        assert_eq!(spec.command, ["sh", "-c", "exit 3"]);
        assert_eq!(spec.environment["A"], "1");
        assert_eq!(spec.environment["N"], "2");
        assert_eq!(spec.environment["B"], "true");
        assert_eq!(spec.working_dir.as_deref(), Some("/tmp"));
        let line = spec_of(&activate(json!({"command": "sleep 5"}))).unwrap();
        assert_eq!(line.command, ["sleep", "5"]);
        assert_eq!(line.id, "1i5");
    }

    #[test]
    fn a_spec_that_can_never_run_is_a_permanent_error() {
        for instance in [
            json!({}),
            json!({"command": []}),
            json!({"command": [""]}),
            json!({"command": ["sh", 5]}),
            json!({"command": {"sh": 1}}),
            json!({"command": ["sh"], "environment": ["A=1"]}),
            json!({"command": ["sh"], "environment": {"A": {"nested": 1}}}),
            json!({"command": ["sh"], "environment": {"A=B": "1"}}),
            json!({"command": ["sh"], "workingDir": 7}),
        ] {
            let error = spec_of(&activate(instance.clone())).unwrap_err();
            assert!(error.is_permanent(), "{instance}: {error}");
            assert!(error.message().starts_with("invalid instance"), "{error}");
        }
        let no_instance = spec_of(&Event::new("compute.instance.activate")).unwrap_err();
        assert!(no_instance.is_permanent());
    }

    #[test]
    fn driver_errors_keep_their_kind() {
        assert!(failed(DriverError::Invalid("no command".into())).is_permanent());
        assert!(failed(DriverError::CannotRun("cannot run".into())).is_permanent());
        assert!(!failed(DriverError::Io(std::io::Error::other("busy"))).is_permanent());
    }
}
