//! The local driver against real processes: it never runs an instance twice, whatever the
//! agent left behind, and a stop ends every process of an instance.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use drover_agent::driver::{Driver, InstanceSpec, InstanceStatus, LocalDriver, MARKER_VAR};

/// A marker of this test's processes (in their environment), unique on the machine.
fn unique_marker() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Live (non-zombie) processes whose environment holds `TEST_MARK=<marker>`.
fn marked(marker: &str) -> Vec<u32> {
    let wanted = format!("TEST_MARK={marker}");
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if !environ
            .split(|b| *b == 0)
            .any(|entry| entry == wanted.as_bytes())
        {
            continue;
        }
        let live = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            !matches!(
                stat.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .chars()
                    .next(),
                Some('Z' | 'X')
            )
        });
        if live {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}

/// Waits until `count` processes carry the marker (a process just spawned shows its
/// environment only once its exec is through) and returns them.
async fn wait_marked(marker: &str, count: usize) -> Vec<u32> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let found = marked(marker);
        if found.len() >= count {
            return found;
        }
        assert!(tokio::time::Instant::now() < deadline, "{found:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn pgid_of(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit(')')
                .next()?
                .split_whitespace()
                .nth(2)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Kills every process carrying the marker when the test ends, passed or failed.
struct Reaper(String);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in marked(&self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn spec(id: &str, marker: &str, command: &[&str]) -> InstanceSpec {
    InstanceSpec {
        id: id.to_owned(),
        name: None,
        command: command.iter().map(|s| s.to_string()).collect(),
        environment: BTreeMap::from([("TEST_MARK".to_owned(), marker.to_owned())]),
        working_dir: None,
    }
}

fn driver(dir: &Path) -> LocalDriver {
    LocalDriver::new(dir.to_path_buf(), "http://127.0.0.1:9".into()).unwrap()
}

fn running_pid(status: InstanceStatus) -> u32 {
    match status {
        InstanceStatus::Running { pid } => pid,
        other => panic!("expected running, got {other:?}"),
    }
}

#[tokio::test]
async fn a_process_started_but_not_recorded_is_adopted_not_started_again() {
    let marker = unique_marker();
    let _reaper = Reaper(marker.clone());
    let state = tempfile::tempdir().unwrap();
    let first = driver(state.path());
    let spec = spec("1i7", &marker, &["sleep", "600"]);
    let pid = running_pid(first.start(&spec).await.unwrap());
    wait_marked(&marker, 1).await;
    // As if the agent was killed after spawning, before writing the pid file.
    std::fs::remove_file(state.path().join("instances/1i7/pid")).unwrap();
    drop(first);

    let restarted = driver(state.path());
    restarted.adopt().await;
    assert_eq!(restarted.inspect("1i7"), InstanceStatus::Running { pid });
    assert_eq!(
        restarted.start(&spec).await.unwrap(),
        InstanceStatus::Running { pid }
    );
    assert_eq!(marked(&marker), vec![pid], "one process, the adopted one");

    // Also when the request comes before any scan at start-up.
    std::fs::remove_file(state.path().join("instances/1i7/pid")).unwrap();
    let again = driver(state.path());
    assert_eq!(
        again.start(&spec).await.unwrap(),
        InstanceStatus::Running { pid }
    );
    assert_eq!(marked(&marker), vec![pid]);

    again.remove("1i7").await.unwrap();
    assert_eq!(marked(&marker), Vec::<u32>::new(), "none left after remove");
}

#[tokio::test]
async fn another_agents_processes_are_neither_adopted_nor_stopped() {
    let marker = unique_marker();
    let _reaper = Reaper(marker.clone());
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (first, second) = (driver(one.path()), driver(two.path()));
    assert_ne!(first.key(), second.key());
    // The same instance id on two agents of one machine (two servers' ids can collide).
    let spec = spec("1i1", &marker, &["sleep", "600"]);
    let a = running_pid(first.start(&spec).await.unwrap());
    let b = running_pid(second.start(&spec).await.unwrap());
    assert_ne!(a, b, "the second agent started its own process");
    wait_marked(&marker, 2).await;
    driver(two.path()).adopt().await;
    assert_eq!(marked(&marker), {
        let mut both = vec![a, b];
        both.sort_unstable();
        both
    });
    second.remove("1i1").await.unwrap();
    assert_eq!(
        marked(&marker),
        vec![a],
        "the other agent's process still runs"
    );
    first.remove("1i1").await.unwrap();
    assert!(marked(&marker).is_empty());
}

#[tokio::test]
async fn a_restarted_agent_stops_a_second_process_of_an_instance() {
    let marker = unique_marker();
    let _reaper = Reaper(marker.clone());
    let state = tempfile::tempdir().unwrap();
    let first = driver(state.path());
    let spec = spec("1i3", &marker, &["sleep", "600"]);
    let pid = running_pid(first.start(&spec).await.unwrap());
    // A second process of the instance, as an older agent could have left.
    let mut extra = std::process::Command::new("sleep")
        .arg("600")
        .env("TEST_MARK", &marker)
        .env(MARKER_VAR, format!("{}/1i3/othertoken", first.key()))
        .process_group(0)
        .spawn()
        .unwrap();
    wait_marked(&marker, 2).await;
    driver(state.path()).adopt().await;
    assert_eq!(marked(&marker), vec![pid], "the recorded one is kept");
    let _ = extra.wait();
    first.remove("1i3").await.unwrap();
    assert!(marked(&marker).is_empty());
}

#[tokio::test]
async fn a_stop_ends_every_process_of_the_instance_even_outside_its_group() {
    let marker = unique_marker();
    let _reaper = Reaper(marker.clone());
    let state = tempfile::tempdir().unwrap();
    let driver = driver(state.path());
    // Both ignore SIGTERM; one leaves the process group (its own session).
    let spec = spec(
        "1i9",
        &marker,
        &[
            "sh",
            "-c",
            "trap '' TERM; setsid sleep 600 & exec sleep 600",
        ],
    );
    let leader = running_pid(driver.start(&spec).await.unwrap());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // Until the shell has exec'd: the leader and the one in its own session.
    while marked(&marker).len() != 2 || marked(&marker).iter().all(|pid| pgid_of(*pid) == leader) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            marked(&marker)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = driver
        .stop("1i9", Duration::from_millis(200))
        .await
        .unwrap();
    assert!(
        matches!(status, InstanceStatus::Stopped { .. }),
        "{status:?}"
    );
    assert!(marked(&marker).is_empty(), "{:?}", marked(&marker));
    driver.remove("1i9").await.unwrap();
}

#[tokio::test]
async fn a_restarted_agent_stops_processes_of_an_instance_it_no_longer_has() {
    let marker = unique_marker();
    let _reaper = Reaper(marker.clone());
    let state = tempfile::tempdir().unwrap();
    let key = driver(state.path()).key().to_owned();
    // A process of instance 1i5, whose directory is gone (as after a remove).
    let mut orphan = std::process::Command::new("sleep")
        .arg("600")
        .env("TEST_MARK", &marker)
        .env(MARKER_VAR, format!("{key}/1i5/sometoken"))
        .process_group(0)
        .spawn()
        .unwrap();
    wait_marked(&marker, 1).await;
    let restarted = driver(state.path());
    restarted.adopt().await;
    assert!(marked(&marker).is_empty(), "{:?}", marked(&marker));
    let _ = orphan.wait();
    // Now a first start of it needs no scan: no process of it can exist.
    let pid = running_pid(
        restarted
            .start(&spec("1i5", &marker, &["sleep", "600"]))
            .await
            .unwrap(),
    );
    assert_eq!(wait_marked(&marker, 1).await, vec![pid]);
    restarted.remove("1i5").await.unwrap();
    assert!(marked(&marker).is_empty());
}

#[tokio::test]
async fn what_can_never_run_is_a_permanent_error_and_starts_nothing() {
    let state = tempfile::tempdir().unwrap();
    let driver = driver(state.path());
    driver.adopt().await;
    let marker = unique_marker();
    let _reaper = Reaper(marker.clone());
    let missing = driver
        .start(&spec(
            "1i1",
            &marker,
            &["/nonexistent/drover-no-such-program"],
        ))
        .await
        .unwrap_err();
    assert!(missing.is_permanent(), "{missing}");
    assert!(
        missing
            .to_string()
            .contains("/nonexistent/drover-no-such-program"),
        "{missing}"
    );
    // A file that is not executable.
    let script = state.path().join("not-executable.sh");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    let denied = driver
        .start(&spec("1i2", &marker, &[script.to_str().unwrap()]))
        .await
        .unwrap_err();
    assert!(denied.is_permanent(), "{denied}");
    let mut nowhere = spec("1i3", &marker, &["true"]);
    nowhere.working_dir = Some("/nonexistent/drover-no-such-dir".into());
    let error = driver.start(&nowhere).await.unwrap_err();
    assert!(error.is_permanent(), "{error}");
    assert!(error.to_string().contains("working directory"), "{error}");
    assert!(marked(&marker).is_empty());
    for id in ["1i1", "1i2", "1i3"] {
        assert!(
            !matches!(driver.inspect(id), InstanceStatus::Running { .. }),
            "{id}"
        );
    }
}
