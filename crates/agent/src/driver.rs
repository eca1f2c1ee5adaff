//! Drivers run instances and volumes. The default, [`LocalDriver`], runs an instance as a
//! supervised local process and a volume as a directory; a container runtime plugs in by
//! implementing [`Driver`].
//!
//! Instances outlive the agent: each has a directory under `<state>/instances/<id>` with its
//! spec, its pid (and the process's start time, so a reused pid is not mistaken for it), its
//! logs and its exit status. A restarted agent adopts the processes that still run.
//!
//! Exactly once: every process the driver starts carries [`MARKER_VAR`]
//! (`<driver key>/<instance id>/<start token>`) in its environment, which its descendants
//! inherit, and the start token is written to `start.json` before the process is spawned. The
//! driver key is made once per state directory, so two agents on one machine never take each
//! other's processes. A start, and a restarted agent, scan `/proc` for the instance's
//! processes: one that runs is adopted (even when the agent was killed before it wrote the pid
//! file), any other is stopped, and a new process is started only when none runs. A stop stops
//! every process that carries the instance's marker, in whatever process group, and waits
//! until they are gone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
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
        /// The exit code, when the agent saw it end (128 + the signal when a signal killed
        /// it, as shells and Docker report it).
        exit_code: Option<i32>,
        /// The signal that killed it, if one did.
        signal: Option<i32>,
        /// When it ended (epoch milliseconds), when known.
        finished_at: Option<i64>,
        /// Whether the driver stopped it (a stop or remove), rather than it ending by itself.
        stopped_by_driver: bool,
    },
    /// This host has no such instance.
    Missing,
}

impl InstanceStatus {
    /// Stopped, with nothing known of how it ended.
    pub const STOPPED_UNKNOWN: InstanceStatus = InstanceStatus::Stopped {
        exit_code: None,
        signal: None,
        finished_at: None,
        stopped_by_driver: false,
    };

    /// What the agent says about it, in a sentence (`agentMessage`).
    pub fn message(self) -> String {
        match self {
            InstanceStatus::Running { pid } => format!("running as process {pid}"),
            InstanceStatus::Missing => "this host has no such container".to_owned(),
            InstanceStatus::Stopped {
                exit_code,
                signal,
                stopped_by_driver,
                ..
            } => {
                let how = match (signal, exit_code) {
                    (Some(signal), _) => {
                        let name = Signal::try_from(signal)
                            .map(|signal| format!(" ({})", signal.as_str()))
                            .unwrap_or_default();
                        format!("killed by signal {signal}{name}")
                    }
                    (None, Some(code)) => format!("exited with code {code}"),
                    (None, None) => "ended; its exit status is not known (it ended while the agent was not running)".to_owned(),
                };
                if stopped_by_driver {
                    format!("stopped by the agent: {how}")
                } else {
                    how
                }
            }
        }
    }

    // `running`, `stopped` or `missing`.
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
    /// The spec cannot be run as it is (no command, a bad id, a missing working directory):
    /// permanent.
    #[error("invalid instance: {0}")]
    Invalid(String),
    /// The program cannot be executed (it does not exist, is not executable, is not a
    /// program): permanent.
    #[error("{0}")]
    CannotRun(String),
    /// The operating system refused, for now (no memory, too many processes, a busy file):
    /// worth trying again.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl DriverError {
    /// Whether trying the same request again can never help: the agent replies with a
    /// permanent error and the server fails the process at once.
    pub fn is_permanent(&self) -> bool {
        matches!(self, DriverError::Invalid(_) | DriverError::CannotRun(_))
    }
}

/// Classifies a failed spawn: what the spec asked for cannot be executed (permanent), or the
/// system could not do it now (transient: `EAGAIN`, `ENOMEM`, `EMFILE`, `ETXTBSY`, …).
pub fn spawn_error(program: &str, error: std::io::Error) -> DriverError {
    use nix::errno::Errno;
    let permanent = match error.raw_os_error().map(Errno::from_raw) {
        Some(
            Errno::ENOENT
            | Errno::EACCES
            | Errno::EPERM
            | Errno::ENOEXEC
            | Errno::ENOTDIR
            | Errno::EISDIR
            | Errno::ELOOP
            | Errno::ENAMETOOLONG
            | Errno::E2BIG
            | Errno::EINVAL
            | Errno::ELIBBAD,
        ) => true,
        Some(_) => false,
        // No OS error: the standard library refused the command itself (a NUL in it).
        None => error.kind() == std::io::ErrorKind::InvalidInput,
    };
    let message = format!("cannot run {program:?}: {error}");
    if permanent {
        DriverError::CannotRun(message)
    } else {
        DriverError::Io(std::io::Error::new(error.kind(), message))
    }
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
    /// Where an instance's output is kept: its stdout and stderr log files.
    fn log_paths(&self, id: &str) -> Result<(PathBuf, PathBuf), DriverError>;
}

/// The environment variable that marks every process the driver starts (and, by
/// inheritance, its descendants): `<driver key>/<instance id>/<start token>`.
pub const MARKER_VAR: &str = "DROVER_INSTANCE";

/// How long processes left by another start of an instance get to end after SIGTERM.
const EXTRA_GRACE: Duration = Duration::from_secs(5);
/// How long processes get to disappear after SIGKILL before a stop fails.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How often a stop looks again whether the processes are gone.
const STOP_POLL: Duration = Duration::from_millis(25);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PidRecord {
    pid: u32,
    start_time: u64,
    /// The start token in the process's marker (absent in records of older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token: Option<String>,
}

/// What the driver is about to start, written before it spawns the process.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StartRecord {
    token: String,
    /// Epoch milliseconds.
    at: u64,
}

/// A live process that carries this driver's marker for an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Marked {
    pid: u32,
    pgid: u32,
    start_time: u64,
    token: String,
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
    /// Instances whose process is this agent's child, until its exit is recorded.
    supervised: Arc<Mutex<HashSet<String>>>,
    /// This driver's key in the marker of every process it starts (kept in the state directory).
    key: String,
    /// Set once [`LocalDriver::adopt`] has left no process of an instance without a directory:
    /// from then on an instance without a directory has no process, and its first start
    /// needs no scan.
    adopted: AtomicBool,
}

/// An instance's process ended on its own (or was killed by someone other than the driver).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// The instance's API id.
    pub id: String,
    /// How it ended: [`InstanceStatus::Stopped`].
    pub status: InstanceStatus,
    /// When (epoch milliseconds).
    pub at: i64,
}

/// How an instance's process ended, kept in its directory as `exit` (JSON; older agents wrote
/// the bare exit code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct ExitRecord {
    code: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signal: Option<i32>,
    /// Epoch milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    at: Option<i64>,
    #[serde(default)]
    stopped: bool,
}

impl ExitRecord {
    fn parse(text: &str) -> Option<ExitRecord> {
        let text = text.trim();
        serde_json::from_str(text).ok().or_else(|| {
            text.parse().ok().map(|code| ExitRecord {
                code,
                signal: None,
                at: None,
                stopped: false,
            })
        })
    }

    fn status(self) -> InstanceStatus {
        InstanceStatus::Stopped {
            exit_code: Some(self.code),
            signal: self.signal,
            finished_at: self.at,
            stopped_by_driver: self.stopped,
        }
    }
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl LocalDriver {
    /// A driver keeping its files under `state_dir`.
    pub fn new(state_dir: PathBuf, server_url: String) -> std::io::Result<LocalDriver> {
        std::fs::create_dir_all(state_dir.join("instances"))?;
        std::fs::create_dir_all(state_dir.join("volumes"))?;
        let key = driver_key(&state_dir)?;
        Ok(LocalDriver {
            key,
            adopted: AtomicBool::new(false),
            root: state_dir,
            server_url,
            locks: Mutex::new(HashMap::new()),
            exits: None,
            stopping: Arc::new(Mutex::new(HashSet::new())),
            supervised: Arc::new(Mutex::new(HashSet::new())),
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

    /// This driver's key (the first part of [`MARKER_VAR`] in its processes).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Takes over what survived a restart of the agent (processes keep running without it):
    /// scans the host for this driver's processes, adopts one per instance (also one the
    /// agent was killed before recording), stops the others, and stops every process of an
    /// instance that no longer exists here.
    pub async fn adopt(&self) {
        let mut found: BTreeMap<String, Vec<Marked>> = BTreeMap::new();
        let mut clean = true;
        for (id, process) in scan_blocking(&self.key, None).await {
            found.entry(id).or_default().push(process);
        }
        for (id, _) in self.list() {
            found.entry(id).or_default();
        }
        for (id, processes) in found {
            let lock = self.lock(&id);
            let _guard = lock.lock().await;
            let known = self.dir(&id).is_ok_and(|dir| dir.exists());
            if !known {
                if processes.is_empty() {
                    continue;
                }
                tracing::warn!(instance = %id, processes = processes.len(), "stopping processes of an instance this host no longer has");
                if let Err(error) = self.terminate(&id, None, EXTRA_GRACE).await {
                    tracing::error!(instance = %id, %error, "cannot stop them");
                    clean = false;
                }
                continue;
            }
            match self.settle(&id, processes).await {
                Ok(_) => {
                    let status = self.inspect(&id);
                    tracing::info!(instance = %id, state = status.name(), "found instance from an earlier run");
                }
                Err(error) => {
                    tracing::error!(instance = %id, %error, "cannot settle an instance from an earlier run")
                }
            }
        }
        self.adopted.store(clean, Ordering::Release);
    }

    /// Given the instance's marked processes on the host, keeps one started process (the one
    /// on record, else the latest start's, else the oldest) and stops every other; records
    /// the one kept and returns it. Called with the instance's lock held.
    async fn settle(&self, id: &str, found: Vec<Marked>) -> Result<Option<PidRecord>, DriverError> {
        let recorded = self.live_pid_record(id);
        let keep = match &recorded {
            Some(record) => Some(record.clone()),
            None => {
                let intended = self.start_record(id).map(|start| start.token);
                let leaders: Vec<&Marked> = found.iter().filter(|m| m.pid == m.pgid).collect();
                leaders
                    .iter()
                    .find(|m| intended.as_deref() == Some(m.token.as_str()))
                    .or_else(|| leaders.iter().min_by_key(|m| m.start_time))
                    .map(|m| PidRecord {
                        pid: m.pid,
                        start_time: m.start_time,
                        token: Some(m.token.clone()),
                    })
            }
        };
        if found.iter().any(|m| !spared(m, keep.as_ref())) {
            tracing::warn!(instance = %id, kept = ?keep.as_ref().map(|k| k.pid), "stopping processes another start of this instance left");
            self.terminate(id, keep.as_ref(), EXTRA_GRACE).await?;
        }
        if let Some(keep) = &keep
            && recorded.as_ref() != Some(keep)
        {
            tracing::warn!(instance = %id, pid = keep.pid, "adopting a process that was started but not recorded");
            std::fs::write(
                self.dir(id)?.join("pid"),
                serde_json::to_vec(keep).unwrap_or_default(),
            )?;
        }
        Ok(keep)
    }

    /// The instance's live processes, but those of `spare` (the adopted start); without
    /// `spare`, also the recorded process (an older agent's, unmarked).
    async fn targets(&self, id: &str, spare: Option<&PidRecord>) -> Vec<Marked> {
        let mut out: Vec<Marked> = scan_blocking(&self.key, Some(id))
            .await
            .into_iter()
            .map(|(_, m)| m)
            .filter(|m| !spared(m, spare))
            .collect();
        if spare.is_none()
            && let Some(record) = self.live_pid_record(id)
            && !out.iter().any(|m| m.pid == record.pid)
            && let Some(stat) = proc_stat(record.pid)
        {
            out.push(Marked {
                pid: record.pid,
                pgid: stat.pgid,
                start_time: stat.start_time,
                token: record.token.unwrap_or_default(),
            });
        }
        out
    }

    /// Ends the instance's processes (but `spare`'s): SIGTERM, up to `grace` to end, then
    /// SIGKILL, and waits until they are gone; fails if some outlive that.
    async fn terminate(
        &self,
        id: &str,
        spare: Option<&PidRecord>,
        grace: Duration,
    ) -> Result<(), DriverError> {
        let recorded_leader = self.pid_record(id).map(|record| record.pid);
        let mut current = self.targets(id, spare).await;
        if current.is_empty() {
            return Ok(());
        }
        signal_all(&current, recorded_leader, Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            current = self.targets(id, spare).await;
            if current.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(STOP_POLL).await;
        }
        let deadline = tokio::time::Instant::now() + KILL_WAIT;
        loop {
            // Again each time: what they forked meanwhile goes too.
            signal_all(&current, recorded_leader, Signal::SIGKILL);
            tokio::time::sleep(STOP_POLL).await;
            current = self.targets(id, spare).await;
            if current.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let pids: Vec<u32> = current.iter().map(|m| m.pid).collect();
                return Err(DriverError::Io(std::io::Error::other(format!(
                    "processes {pids:?} of instance {id} are still alive after SIGKILL"
                ))));
            }
        }
    }

    /// The pid record, if its process still runs.
    fn live_pid_record(&self, id: &str) -> Option<PidRecord> {
        self.pid_record(id).filter(|record| {
            process_start_time(record.pid)
                .is_some_and(|start| record.start_time == 0 || start == record.start_time)
        })
    }

    fn start_record(&self, id: &str) -> Option<StartRecord> {
        let text = std::fs::read_to_string(self.dir(id).ok()?.join("start.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    async fn stop_locked(&self, id: &str, grace: Duration) -> Result<InstanceStatus, DriverError> {
        self.dir(id)?;
        if self.targets(id, None).await.is_empty() {
            return Ok(self.inspect(id));
        }
        self.stopping().insert(id.to_owned());
        // Every process of the instance, in whatever process group: what it started too.
        self.terminate(id, None, grace).await?;
        // A child's exit is recorded (its `exit` file written) before the stop answers.
        let deadline = tokio::time::Instant::now() + KILL_WAIT;
        while lock_set(&self.supervised).contains(id) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if !lock_set(&self.supervised).contains(id) {
            self.stopping().remove(id);
        }
        let _ = std::fs::remove_file(self.dir(id)?.join("pid"));
        Ok(match self.inspect(id) {
            InstanceStatus::Missing => InstanceStatus::STOPPED_UNKNOWN,
            // Not the agent's child (adopted after a restart): its exit was not seen, but the
            // agent stopped it.
            InstanceStatus::Stopped {
                exit_code: None, ..
            } => InstanceStatus::Stopped {
                exit_code: None,
                signal: None,
                finished_at: Some(now_millis()),
                stopped_by_driver: true,
            },
            other => other,
        })
    }

    fn pid_record(&self, id: &str) -> Option<PidRecord> {
        let text = std::fs::read_to_string(self.dir(id).ok()?.join("pid")).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn exit_record(&self, id: &str) -> Option<ExitRecord> {
        ExitRecord::parse(&std::fs::read_to_string(self.dir(id).ok()?.join("exit")).ok()?)
    }
}

fn lock_set(set: &Mutex<HashSet<String>>) -> std::sync::MutexGuard<'_, HashSet<String>> {
    set.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// This driver's key, made once per state directory.
fn driver_key(state_dir: &Path) -> std::io::Result<String> {
    let path = state_dir.join("driver-key");
    if let Ok(key) = std::fs::read_to_string(&path)
        && !key.trim().is_empty()
    {
        return Ok(key.trim().to_owned());
    }
    let key = uuid::Uuid::new_v4().simple().to_string();
    let partial = state_dir.join("driver-key.partial");
    std::fs::write(&partial, &key)?;
    std::fs::rename(&partial, &path)?;
    Ok(key)
}

/// What the driver reads of `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy)]
struct ProcStat {
    pgid: u32,
    start_time: u64,
}

/// A live, non-zombie process's group and start time (fields 5 and 22 of `/proc/<pid>/stat`).
fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    Some(ProcStat {
        pgid: fields.get(2)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// The start time of a live, non-zombie process.
fn process_start_time(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|stat| stat.start_time)
}

/// The value of [`MARKER_VAR`] in a process's environment (readable for the agent's own
/// user's processes).
fn marker_of(pid: u32) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{MARKER_VAR}=");
    environ
        .split(|byte| *byte == 0)
        .find_map(|entry| entry.strip_prefix(prefix.as_bytes()))
        .and_then(|value| String::from_utf8(value.to_vec()).ok())
}

/// Every live process on the host that carries `key`'s marker (for instance `only`, or any),
/// with its instance id. Never the agent itself.
fn scan(key: &str, only: Option<&str>) -> Vec<(String, Marked)> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Some(marker) = marker_of(pid) else {
            continue;
        };
        let Some((id, token)) = marker
            .strip_prefix(key)
            .and_then(|rest| rest.strip_prefix('/'))
            .and_then(|rest| rest.split_once('/'))
        else {
            continue;
        };
        if only.is_some_and(|only| only != id) {
            continue;
        }
        let Some(stat) = proc_stat(pid) else {
            continue;
        };
        out.push((
            id.to_owned(),
            Marked {
                pid,
                pgid: stat.pgid,
                start_time: stat.start_time,
                token: token.to_owned(),
            },
        ));
    }
    out
}

/// [`scan`] off the async threads (it reads a file of every process on the host).
async fn scan_blocking(key: &str, only: Option<&str>) -> Vec<(String, Marked)> {
    let (owned_key, owned_only) = (key.to_owned(), only.map(str::to_owned));
    match tokio::task::spawn_blocking(move || scan(&owned_key, owned_only.as_deref())).await {
        Ok(found) => found,
        // No blocking thread (the runtime shuts down): never answer "none" unlooked.
        Err(_) => scan(key, only),
    }
}

/// Whether a process belongs to the start that is kept.
fn spared(process: &Marked, spare: Option<&PidRecord>) -> bool {
    spare.is_some_and(|spare| {
        process.pid == spare.pid
            || process.pgid == spare.pid
            || spare.token.as_deref() == Some(process.token.as_str())
    })
}

/// Signals each process, and each process group that is the instance's: one led by one of the
/// processes, or, once its leader has gone, the recorded process's. Never the agent's own group.
fn signal_all(processes: &[Marked], recorded_leader: Option<u32>, signal: Signal) {
    let own_group = nix::unistd::getpgrp().as_raw() as u32;
    let mut groups = HashSet::new();
    for process in processes {
        // (The leader checked again: its pid, and so the group id, may have gone to another.)
        let leads = processes
            .iter()
            .any(|m| m.pid == process.pgid && process_start_time(m.pid) == Some(m.start_time));
        let recorded = recorded_leader == Some(process.pgid) && proc_stat(process.pgid).is_none();
        if (leads || recorded) && process.pgid > 1 && process.pgid != own_group {
            groups.insert(process.pgid);
        }
    }
    for group in groups {
        let _ = kill(Pid::from_raw(-(group as i32)), signal);
    }
    for process in processes {
        // Not if the pid has meanwhile gone to another process.
        if process_start_time(process.pid) == Some(process.start_time) {
            let _ = kill(Pid::from_raw(process.pid as i32), signal);
        }
    }
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
            .filter(|program| !program.is_empty())
            .ok_or_else(|| DriverError::Invalid("no command".into()))?;
        let dir = self.dir(&spec.id)?;
        let first_start = self.adopted.load(Ordering::Acquire) && !dir.exists();
        std::fs::create_dir_all(&dir)?;
        // A process of this instance may run unrecorded (the agent was killed after starting
        // it): adopt it rather than start a second one; stop what another start left.
        if !first_start {
            let found = scan_blocking(&self.key, Some(&spec.id))
                .await
                .into_iter()
                .map(|(_, process)| process)
                .collect();
            if let Some(adopted) = self.settle(&spec.id, found).await? {
                return Ok(InstanceStatus::Running { pid: adopted.pid });
            }
        }
        if let Some(working_dir) = &spec.working_dir
            && !Path::new(working_dir).is_dir()
        {
            return Err(DriverError::Invalid(format!(
                "the working directory {working_dir:?} does not exist"
            )));
        }
        std::fs::write(
            dir.join("spec.json"),
            serde_json::to_vec_pretty(spec).unwrap_or_default(),
        )?;
        let _ = std::fs::remove_file(dir.join("exit"));
        let _ = std::fs::remove_file(dir.join("pid"));
        self.stopping().remove(&spec.id);
        // What is about to start, before it starts.
        let token = uuid::Uuid::new_v4().simple().to_string();
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        std::fs::write(
            dir.join("start.json"),
            serde_json::to_vec(&StartRecord {
                token: token.clone(),
                at,
            })
            .unwrap_or_default(),
        )?;
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
        // The marker, set last so that the spec's environment cannot replace it.
        command.env(MARKER_VAR, format!("{}/{}/{token}", self.key, spec.id));
        let mut child = command
            .spawn()
            .map_err(|error| spawn_error(program, error))?;
        let pid = child
            .id()
            .ok_or_else(|| DriverError::Io(std::io::Error::other("the process exited at once")))?;
        crate::fault_point("crash-after-spawn");
        let start_time = process_start_time(pid).unwrap_or(0);
        std::fs::write(
            dir.join("pid"),
            serde_json::to_vec(&PidRecord {
                pid,
                start_time,
                token: Some(token),
            })
            .unwrap_or_default(),
        )?;
        // Supervise: record the exit status when it ends.
        let exit_path = dir.join("exit");
        let id = spec.id.clone();
        let exits = self.exits.clone();
        let stopping = self.stopping.clone();
        let supervised = self.supervised.clone();
        let (recorded, exited) = tokio::sync::oneshot::channel();
        lock_set(&supervised).insert(id.clone());
        tokio::spawn(async move {
            use std::os::unix::process::ExitStatusExt;
            let status = child.wait().await.ok();
            let signal = status.and_then(|status| status.signal());
            let code = status
                .and_then(|status| status.code())
                .or(signal.map(|signal| 128 + signal))
                .unwrap_or(-1);
            // Consumed here: the driver's own stop marks the instance before it signals.
            let expected = stopping
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .remove(&id);
            let at = now_millis();
            let record = ExitRecord {
                code,
                signal,
                at: Some(at),
                stopped: expected,
            };
            let _ = std::fs::write(exit_path, serde_json::to_vec(&record).unwrap_or_default());
            let _ = recorded.send(record);
            lock_set(&supervised).remove(&id);
            tracing::info!(instance = %id, code, ?signal, expected, "instance process exited");
            if !expected
                && let Some(exits) = exits
                && exits
                    .try_send(Exit {
                        id: id.clone(),
                        status: record.status(),
                        at,
                    })
                    .is_err()
            {
                tracing::warn!(instance = %id, "exit report queue full; the next ping reports it");
            }
        });
        // Re-check.
        crate::fault_pause("pause-before-recheck").await;
        match self.inspect(&spec.id) {
            InstanceStatus::Running { pid } => Ok(InstanceStatus::Running { pid }),
            // It started and has ended already (a command that exits by itself): a start
            // that happened, never a failed one to try again. Its exit is recorded first, so
            // the answer carries the exit code.
            _ => {
                let record = tokio::time::timeout(KILL_WAIT, exited)
                    .await
                    .ok()
                    .and_then(Result::ok);
                Ok(record
                    .or_else(|| self.exit_record(&spec.id))
                    .map_or(InstanceStatus::STOPPED_UNKNOWN, ExitRecord::status))
            }
        }
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<InstanceStatus, DriverError> {
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        self.stop_locked(id, grace).await
    }

    async fn remove(&self, id: &str) -> Result<(), DriverError> {
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        self.stop_locked(id, Duration::from_secs(10)).await?;
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
        if let Some(record) = self.live_pid_record(id) {
            return InstanceStatus::Running { pid: record.pid };
        }
        self.exit_record(id)
            .map_or(InstanceStatus::STOPPED_UNKNOWN, ExitRecord::status)
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

    fn log_paths(&self, id: &str) -> Result<(PathBuf, PathBuf), DriverError> {
        let dir = self.dir(id)?;
        Ok((dir.join("stdout.log"), dir.join("stderr.log")))
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

#[cfg(test)]
mod tests {
    use nix::errno::Errno;

    use super::*;

    fn os(errno: Errno) -> std::io::Error {
        std::io::Error::from_raw_os_error(errno as i32)
    }

    #[test]
    fn a_program_that_cannot_be_executed_is_permanent_and_a_busy_system_is_not() {
        for errno in [Errno::ENOENT, Errno::EACCES, Errno::ENOEXEC, Errno::ENOTDIR] {
            let error = spawn_error("/no/such", os(errno));
            assert!(error.is_permanent(), "{errno}: {error}");
            assert!(error.to_string().contains("/no/such"), "{error}");
        }
        for errno in [Errno::EAGAIN, Errno::ENOMEM, Errno::EMFILE, Errno::ETXTBSY] {
            let error = spawn_error("sh", os(errno));
            assert!(!error.is_permanent(), "{errno}: {error}");
        }
        let nul = std::io::Error::new(std::io::ErrorKind::InvalidInput, "nul byte found");
        assert!(spawn_error("a\0b", nul).is_permanent());
    }
}
