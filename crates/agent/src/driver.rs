//! Drivers run instances and volumes. The default, [`LocalDriver`], runs an instance as a
//! supervised local process and a volume as a directory; a container runtime plugs in by
//! implementing [`Driver`].
//!
//! Instances outlive the agent: each has a directory under `<state>/instances/<id>` with its
//! spec, its pid (and the process's start time, so a reused pid is not mistaken for it), its
//! logs and its exit status. A restarted agent adopts the processes that still run.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// The instance's API id (`1i5`).
    pub id: String,
    /// Its name.
    pub name: Option<String>,
    /// `command[0]` is the executable.
    pub command: Vec<String>,
    /// Environment variables.
    pub environment: BTreeMap<String, String>,
    /// Working directory.
    pub working_dir: Option<String>,
}

/// The state of an instance on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum InstanceStatus {
    /// Its process runs.
    Running {
        /// The process id.
        pid: u32,
    },
    /// It ran and ended (or was stopped).
    Stopped {
        /// The exit code, when it exited by itself.
        exit_code: Option<i32>,
    },
    /// This host has no such instance.
    Missing,
}

impl InstanceStatus {
    /// `running`, `stopped` or `missing`.
    pub fn name(self) -> &'static str {
        match self {
            InstanceStatus::Running { .. } => "running",
            InstanceStatus::Stopped { .. } => "stopped",
            InstanceStatus::Missing => "missing",
        }
    }
}

/// Why a driver operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The spec cannot be run.
    #[error("invalid instance: {0}")]
    Invalid(String),
    /// The operating system refused.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What runs instances and volumes.
pub trait Driver: Send + Sync + 'static {
    /// Starts the instance unless it runs already; returns its status.
    fn start(
        &self,
        spec: &InstanceSpec,
    ) -> impl Future<Output = Result<InstanceStatus, DriverError>> + Send;
    /// Stops it (gracefully, then by force after `grace`); a stopped instance stays as it is.
    fn stop(
        &self,
        id: &str,
        grace: Duration,
    ) -> impl Future<Output = Result<InstanceStatus, DriverError>> + Send;
    /// Stops and forgets it.
    fn remove(&self, id: &str) -> impl Future<Output = Result<(), DriverError>> + Send;
    /// Its status.
    fn inspect(&self, id: &str) -> InstanceStatus;
    /// Every instance this host has, with its status.
    fn list(&self) -> Vec<(String, InstanceStatus)>;
    /// Creates a volume unless it exists; returns where it is.
    fn volume_activate(&self, id: &str) -> Result<PathBuf, DriverError>;
    /// Deletes a volume.
    fn volume_remove(&self, id: &str) -> Result<(), DriverError>;
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct PidRecord {
    pid: u32,
    start_time: u64,
}

/// Runs instances as local processes.
#[derive(Debug)]
pub struct LocalDriver {
    root: PathBuf,
    /// The server's URL, injected as `CATTLE_URL` into instances that were given agent keys.
    server_url: String,
    /// Per-instance locks: one operation on an instance at a time.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Where exits the driver did not cause are reported (the agent posts them as container
    /// events, so the server learns of a death at once rather than at the next ping).
    exits: Option<tokio::sync::mpsc::Sender<Exit>>,
    /// Instances being stopped by the driver: their exit is expected, not reported.
    stopping: Arc<Mutex<HashSet<String>>>,
}

/// An instance's process ended on its own (or was killed by someone other than the driver).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// The instance's API id.
    pub id: String,
    /// Its exit code (-1 when killed by a signal).
    pub code: i32,
    /// When (epoch seconds).
    pub at: i64,
}

impl LocalDriver {
    /// A driver keeping its files under `state_dir`.
    pub fn new(state_dir: PathBuf, server_url: String) -> std::io::Result<LocalDriver> {
        std::fs::create_dir_all(state_dir.join("instances"))?;
        std::fs::create_dir_all(state_dir.join("volumes"))?;
        Ok(LocalDriver {
            root: state_dir,
            server_url,
            locks: Mutex::new(HashMap::new()),
            exits: None,
            stopping: Arc::new(Mutex::new(HashSet::new())),
        })
    }

    /// Reports exits the driver did not cause on `exits` (dropped, and logged, when it is
    /// full: the ping's instance report catches them anyway).
    pub fn with_exit_reports(mut self, exits: tokio::sync::mpsc::Sender<Exit>) -> LocalDriver {
        self.exits = Some(exits);
        self
    }

    fn stopping(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.stopping
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn dir(&self, id: &str) -> Result<PathBuf, DriverError> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(DriverError::Invalid(format!("instance id {id:?}")));
        }
        Ok(self.root.join("instances").join(id))
    }

    fn lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(id.to_owned())
            .or_default()
            .clone()
    }

    /// Reports what survived a restart of the agent (processes keep running without it).
    pub async fn adopt(&self) {
        for (id, status) in self.list() {
            tracing::info!(instance = %id, state = status.name(), "found instance from an earlier run");
        }
    }

    fn pid_record(&self, id: &str) -> Option<PidRecord> {
        let text = std::fs::read_to_string(self.dir(id).ok()?.join("pid")).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn exit_code(&self, id: &str) -> Option<i32> {
        std::fs::read_to_string(self.dir(id).ok()?.join("exit"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

/// The start time of a live, non-zombie process (field 22 of `/proc/<pid>/stat`).
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

impl Driver for LocalDriver {
    async fn start(&self, spec: &InstanceSpec) -> Result<InstanceStatus, DriverError> {
        let lock = self.lock(&spec.id);
        let _guard = lock.lock().await;
        // Check: a resent request finds the instance running and changes nothing.
        if let status @ InstanceStatus::Running { .. } = self.inspect(&spec.id) {
            return Ok(status);
        }
        let program = spec
            .command
            .first()
            .ok_or_else(|| DriverError::Invalid("no command".into()))?;
        let dir = self.dir(&spec.id)?;
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("spec.json"),
            serde_json::to_vec_pretty(spec).unwrap_or_default(),
        )?;
        let _ = std::fs::remove_file(dir.join("exit"));
        self.stopping().remove(&spec.id);
        let stdout = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("stdout.log"))?;
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("stderr.log"))?;
        let mut command = tokio::process::Command::new(program);
        command
            .args(&spec.command[1..])
            .envs(&spec.environment)
            .stdin(std::process::Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            // Its own process group: a Ctrl-C meant for the agent does not reach instances.
            .process_group(0)
            .kill_on_drop(false);
        if spec.environment.contains_key("CATTLE_ACCESS_KEY")
            && !spec.environment.contains_key("CATTLE_URL")
        {
            command.env("CATTLE_URL", &self.server_url);
        }
        if let Some(working_dir) = &spec.working_dir {
            command.current_dir(working_dir);
        }
        let mut child = command
            .spawn()
            .map_err(|error| DriverError::Invalid(format!("cannot run {program:?}: {error}")))?;
        let pid = child
            .id()
            .ok_or_else(|| DriverError::Invalid("the process exited at once".into()))?;
        let start_time = process_start_time(pid).unwrap_or(0);
        std::fs::write(
            dir.join("pid"),
            serde_json::to_vec(&PidRecord { pid, start_time }).unwrap_or_default(),
        )?;
        // Supervise: record the exit status when it ends.
        let exit_path = dir.join("exit");
        let id = spec.id.clone();
        let exits = self.exits.clone();
        let stopping = self.stopping.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let code = status.ok().and_then(|status| status.code()).unwrap_or(-1);
            let _ = std::fs::write(exit_path, code.to_string());
            // Consumed here: the driver's own stop marks the instance before it signals.
            let expected = stopping
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .remove(&id);
            tracing::info!(instance = %id, code, expected, "instance process exited");
            if !expected && let Some(exits) = exits {
                let at = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0);
                if exits
                    .try_send(Exit {
                        id: id.clone(),
                        code,
                        at,
                    })
                    .is_err()
                {
                    tracing::warn!(instance = %id, "exit report queue full; the next ping reports it");
                }
            }
        });
        // Re-check.
        match self.inspect(&spec.id) {
            InstanceStatus::Running { pid } => Ok(InstanceStatus::Running { pid }),
            other => Err(DriverError::Invalid(format!(
                "the process did not stay up ({})",
                other.name()
            ))),
        }
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<InstanceStatus, DriverError> {
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        let InstanceStatus::Running { pid } = self.inspect(id) else {
            return Ok(self.inspect(id));
        };
        let target = Pid::from_raw(-(pid as i32));
        self.stopping().insert(id.to_owned());
        // The whole process group: the instance and whatever it started.
        let _ = kill(target, Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline {
            if !matches!(self.inspect(id), InstanceStatus::Running { .. }) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if matches!(self.inspect(id), InstanceStatus::Running { .. }) {
            let _ = kill(target, Signal::SIGKILL);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while matches!(self.inspect(id), InstanceStatus::Running { .. })
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let _ = std::fs::remove_file(self.dir(id)?.join("pid"));
        Ok(match self.inspect(id) {
            InstanceStatus::Missing => InstanceStatus::Stopped { exit_code: None },
            other => other,
        })
    }

    async fn remove(&self, id: &str) -> Result<(), DriverError> {
        self.stop(id, Duration::from_secs(10)).await?;
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        match std::fs::remove_dir_all(self.dir(id)?) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error.into()),
            _ => Ok(()),
        }
    }

    fn inspect(&self, id: &str) -> InstanceStatus {
        let Ok(dir) = self.dir(id) else {
            return InstanceStatus::Missing;
        };
        if !dir.exists() {
            return InstanceStatus::Missing;
        }
        if let Some(record) = self.pid_record(id)
            && process_start_time(record.pid)
                .is_some_and(|start| record.start_time == 0 || start == record.start_time)
        {
            return InstanceStatus::Running { pid: record.pid };
        }
        InstanceStatus::Stopped {
            exit_code: self.exit_code(id),
        }
    }

    fn list(&self) -> Vec<(String, InstanceStatus)> {
        let Ok(entries) = std::fs::read_dir(self.root.join("instances")) else {
            return Vec::new();
        };
        let mut out: Vec<_> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| entry.file_name().into_string().ok())
            .map(|id| {
                let status = self.inspect(&id);
                (id, status)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn volume_activate(&self, id: &str) -> Result<PathBuf, DriverError> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(DriverError::Invalid(format!("volume id {id:?}")));
        }
        let path = self.root.join("volumes").join(id);
        std::fs::create_dir_all(&path)?;
        Ok(std::fs::canonicalize(&path).unwrap_or(path))
    }

    fn volume_remove(&self, id: &str) -> Result<(), DriverError> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(DriverError::Invalid(format!("volume id {id:?}")));
        }
        match std::fs::remove_dir_all(self.root.join("volumes").join(id)) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error.into()),
            _ => Ok(()),
        }
    }
}
