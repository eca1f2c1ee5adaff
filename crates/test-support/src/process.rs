//! The real `drover` binary as a child process, killed (SIGKILL) and reaped when dropped, also
//! when a test fails halfway.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running child process; SIGKILLed and reaped on drop.
#[derive(Debug)]
pub struct DroverProcess {
    child: Option<Child>,
    /// `http://<address>` when it is a server that printed its address.
    pub url: String,
}

impl DroverProcess {
    /// Spawns `command` (stdin closed; its stdout/stderr as the command sets them).
    pub fn spawn(mut command: Command) -> DroverProcess {
        command.stdin(Stdio::null()).kill_on_drop(true);
        let child = command.spawn().expect("the drover binary starts");
        DroverProcess {
            child: Some(child),
            url: String::new(),
        }
    }

    /// Starts `<bin> server --listen 127.0.0.1:0 --data-dir <data_dir>` (and `--database-url`
    /// if given) with the admin key and `env` (`DROVER_*` settings), and waits (at most 30 s)
    /// until it prints the address it listens on. `bin` is `env!("CARGO_BIN_EXE_drover")`.
    pub async fn server(
        bin: &str,
        data_dir: &Path,
        database_url: Option<&str>,
        env: &[(&str, &str)],
    ) -> DroverProcess {
        let mut command = Command::new(bin);
        command
            .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir);
        if let Some(url) = database_url {
            command.args(["--database-url", url]);
        }
        command
            .env("DROVER_ADMIN_ACCESS_KEY", crate::ADMIN_ACCESS)
            .env("DROVER_ADMIN_SECRET_KEY", crate::ADMIN_SECRET)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut process = DroverProcess::spawn(command);
        let stderr = process.child_mut().stderr.take().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        // Reads stderr to its end (so the child never blocks on a full pipe).
        tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.split("drover listening on ").nth(1)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(rest.trim().trim_end_matches("/v1").to_owned());
                }
            }
        });
        process.url = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .expect("the server prints its address within 30 s")
            .expect("the server prints its address before it exits");
        process
    }

    /// Its pid, while it has not been reaped.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// The child, e.g. for its pid.
    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("a running child")
    }

    /// Kills it with SIGKILL and reaps it.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Waits (at most `limit`) for it to exit by itself, and returns how it ended.
    pub async fn exited(&mut self, limit: Duration) -> ExitStatus {
        let child = self.child_mut();
        let status = tokio::time::timeout(limit, child.wait())
            .await
            .unwrap_or_else(|_| panic!("the child did not exit within {limit:?}"))
            .unwrap();
        self.child = None;
        status
    }
}

impl Drop for DroverProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL now; tokio reaps the dropped child in the background.
            let _ = child.start_kill();
        }
    }
}
