//! Streaming an instance's log to the server (`instance.logs`, see [`drover_proto::logs`]).
//!
//! A request starts a *follower*: a task (not the handler, so the instance's lane and the
//! router's workers stay free) that sends the last `lines` lines of the instance's stdout and
//! stderr files and, with `follow`, what is written to them afterwards, as progress replies of
//! at most [`MAX_CHUNK_BYTES`] each. Memory is bounded on the agent: one chunk at a time, and
//! no more than `window` chunks beyond the server's last ack (the files are the buffer).
//! A follower ends when the log ends (no `follow`), the instance's directory goes (removed),
//! the server cancels, its lease runs out without an ack, the server stops taking its replies,
//! or the agent shuts down; at most [`MAX_FOLLOWERS`] run at once.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_client::{Client, Event, HandlerError, HandlerResult, Transitioning};
use drover_proto::logs::{
    LogChunk, LogsAck, LogsCancel, LogsRequest, MAX_CHUNK_BYTES, MAX_FRAME_BYTES, MAX_LINES,
    STDERR, STDOUT,
};
use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Followers that may run at once on one agent.
pub const MAX_FOLLOWERS: usize = 64;
/// How often a follower looks for new output.
const POLL: Duration = Duration::from_millis(200);
/// A follower with nothing to send says it is alive this often (the server's call would time
/// out otherwise).
const HEARTBEAT: Duration = Duration::from_secs(5);
/// A partial last line (no newline yet) is sent once it has waited this long.
const PARTIAL_AFTER: Duration = Duration::from_secs(1);
/// The tail is looked for in at most this many bytes at the end of each file.
const TAIL_MAX_BYTES: u64 = 8 * 1024 * 1024;
/// The shortest and longest lease a request may ask for.
const LEASE_RANGE: (u64, u64) = (1_000, 600_000);

/// The running followers, by request id.
#[derive(Debug, Default)]
pub struct Followers {
    running: Mutex<HashMap<String, Arc<Follower>>>,
    started: AtomicU64,
    /// Cancelled when the agent shuts down.
    shutdown: CancellationToken,
}

#[derive(Debug)]
struct Follower {
    cancel: CancellationToken,
    /// The last acknowledged chunk, and when the lease was last renewed.
    acked: watch::Sender<(u64, Instant)>,
}

impl Followers {
    /// Followers that stop when `shutdown` is cancelled.
    pub fn new(shutdown: CancellationToken) -> Followers {
        Followers {
            shutdown,
            ..Followers::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Follower>>> {
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How many run now.
    pub fn running(&self) -> usize {
        self.lock().len()
    }

    /// How many were started since the agent started.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// `instance.logs`: starts a follower over `paths` (the instance's stdout and stderr
    /// files; `None` when this host has no such instance). A request already followed (sent
    /// again after a reconnect) renews its lease.
    pub fn start(
        self: &Arc<Self>,
        event: &Event,
        client: &Client,
        paths: Option<(PathBuf, PathBuf)>,
    ) -> HandlerResult {
        let Some(reply) = event.reply() else {
            return Err(HandlerError::permanent("instance.logs needs a replyTo"));
        };
        let request_id = event
            .id
            .clone()
            .ok_or_else(|| HandlerError::permanent("instance.logs needs an id"))?;
        let request: LogsRequest = event
            .data
            .as_ref()
            .and_then(|data| data.get("logs"))
            .cloned()
            .and_then(|value| serde_json::from_value(value).ok())
            .ok_or_else(|| HandlerError::permanent("instance.logs needs data.logs"))?;
        let Some((stdout, stderr)) = paths else {
            return Err(HandlerError::permanent("this host has no such container"));
        };
        let follower = {
            let mut running = self.lock();
            if let Some(existing) = running.get(&request_id) {
                let acked = existing.acked.borrow().0;
                existing.acked.send_replace((acked, Instant::now()));
                return Ok(None);
            }
            if running.len() >= MAX_FOLLOWERS {
                return Err(HandlerError::retryable(format!(
                    "this host already streams {MAX_FOLLOWERS} logs; try again later"
                )));
            }
            let follower = Arc::new(Follower {
                cancel: self.shutdown.child_token(),
                acked: watch::channel((0, Instant::now())).0,
            });
            running.insert(request_id.clone(), follower.clone());
            follower
        };
        self.started.fetch_add(1, Ordering::Relaxed);
        let lease = Duration::from_millis(request.lease_millis.clamp(LEASE_RANGE.0, LEASE_RANGE.1));
        let stream = Stream {
            client: client.clone(),
            reply,
            request,
            lease,
            window: request.window.max(1),
            acked: follower.acked.subscribe(),
            cancel: follower.cancel.clone(),
            shutdown: self.shutdown.clone(),
            seq: 0,
        };
        let followers = self.clone();
        tokio::spawn(async move {
            let ended = stream.run(&stdout, &stderr).await;
            followers.lock().remove(&request_id);
            tracing::info!(request = %request_id, ended, "log follower ended");
        });
        Ok(None)
    }

    /// `instance.logs.ack`: the server took chunks up to `seq`; the lease is renewed.
    pub fn ack(&self, event: &Event) -> HandlerResult {
        if let Some(ack) = data_of::<LogsAck>(event)
            && let Some(follower) = self.lock().get(&ack.request_id)
        {
            let acked = follower.acked.borrow().0.max(ack.seq);
            follower.acked.send_replace((acked, Instant::now()));
        }
        Ok(None)
    }

    /// `instance.logs.cancel`: the viewer left.
    pub fn cancel(&self, event: &Event) -> HandlerResult {
        if let Some(cancel) = data_of::<LogsCancel>(event)
            && let Some(follower) = self.lock().get(&cancel.request_id)
        {
            follower.cancel.cancel();
        }
        Ok(None)
    }
}

fn data_of<T: serde::de::DeserializeOwned>(event: &Event) -> Option<T> {
    serde_json::from_value(event.data.clone()?).ok()
}

/// One follower's state.
struct Stream {
    client: Client,
    reply: Event,
    request: LogsRequest,
    lease: Duration,
    window: u64,
    acked: watch::Receiver<(u64, Instant)>,
    /// Cancelled by a cancel event, and by the agent's shutdown.
    cancel: CancellationToken,
    /// The agent's shutdown (the parent of `cancel`).
    shutdown: CancellationToken,
    seq: u64,
}

/// Why a follower stopped before its log ended.
#[derive(Debug)]
enum Stop {
    Canceled,
    LeaseExpired,
    /// The server did not take a reply.
    Unsent,
}

/// One log file being read.
struct Source {
    path: PathBuf,
    prefix: &'static str,
    /// The next byte to read.
    offset: u64,
    /// A line read without its newline yet, and since when.
    partial: Vec<u8>,
    partial_since: Option<Instant>,
}

impl Source {
    fn new(path: &Path, prefix: &'static str) -> Source {
        Source {
            path: path.to_owned(),
            prefix,
            offset: 0,
            partial: Vec::new(),
            partial_since: None,
        }
    }

    fn frame(&self, line: &[u8]) -> String {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        format!("{}{}", self.prefix, String::from_utf8_lossy(line))
    }

    /// Reads what was written since the last read, up to `end` (or the file's end) and at most
    /// [`MAX_CHUNK_BYTES`], into frames; at the end, `flush` also sends a partial last line
    /// (else it goes once it waited [`PARTIAL_AFTER`]). Returns
    /// whether it read anything. A file that shrank (truncated) is read again from its start.
    fn read(&mut self, end: Option<u64>, flush: bool, frames: &mut Vec<String>) -> bool {
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return false;
        };
        let len = file.metadata().map(|meta| meta.len()).unwrap_or(0);
        if len < self.offset {
            self.offset = 0;
            self.partial.clear();
            self.partial_since = None;
        }
        let end = end.unwrap_or(len).min(len);
        let want = end.saturating_sub(self.offset).min(MAX_CHUNK_BYTES as u64);
        let mut buf = vec![0u8; want as usize];
        let read = if want > 0 && file.seek(SeekFrom::Start(self.offset)).is_ok() {
            let mut filled = 0;
            while filled < buf.len() {
                match file.read(&mut buf[filled..]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => filled += n,
                }
            }
            buf.truncate(filled);
            filled
        } else {
            0
        };
        self.offset += read as u64;
        let mut rest: &[u8] = &buf;
        while let Some(newline) = rest.iter().position(|byte| *byte == b'\n') {
            self.partial.extend_from_slice(&rest[..newline]);
            let line = std::mem::take(&mut self.partial);
            self.partial_since = None;
            self.push_line(&line, frames);
            rest = &rest[newline + 1..];
        }
        if !rest.is_empty() {
            self.partial.extend_from_slice(rest);
            self.partial_since.get_or_insert_with(Instant::now);
        }
        // An endless line goes out in pieces; a partial one once it waited long enough.
        while self.partial.len() >= MAX_FRAME_BYTES {
            let piece: Vec<u8> = self.partial.drain(..MAX_FRAME_BYTES).collect();
            frames.push(self.frame(&piece));
        }
        let at_end = self.offset >= end;
        let waited = self
            .partial_since
            .is_some_and(|since| since.elapsed() >= PARTIAL_AFTER);
        if !self.partial.is_empty() && at_end && (flush || waited) {
            let line = std::mem::take(&mut self.partial);
            self.partial_since = None;
            frames.push(self.frame(&line));
        }
        read > 0
    }

    fn push_line(&self, line: &[u8], frames: &mut Vec<String>) {
        for piece in line.chunks(MAX_FRAME_BYTES) {
            frames.push(self.frame(piece));
        }
        if line.is_empty() {
            frames.push(self.frame(line));
        }
    }
}

/// Where the last `lines` lines of a file start (looking at most [`TAIL_MAX_BYTES`] back), and
/// the file's length now (the tail ends there).
fn tail_start(path: &Path, lines: u32) -> (u64, u64) {
    let Ok(mut file) = std::fs::File::open(path) else {
        return (0, 0);
    };
    let len = file.metadata().map(|meta| meta.len()).unwrap_or(0);
    if lines == 0 {
        return (len, len);
    }
    let floor = len.saturating_sub(TAIL_MAX_BYTES);
    let mut position = len;
    let mut newlines = 0u32;
    let mut block = vec![0u8; 64 * 1024];
    // A last line without its newline counts as a line.
    let mut skip_last = true;
    while position > floor {
        let size = (position - floor).min(block.len() as u64) as usize;
        position -= size as u64;
        if file.seek(SeekFrom::Start(position)).is_err()
            || file.read_exact(&mut block[..size]).is_err()
        {
            return (floor, len);
        }
        for index in (0..size).rev() {
            if block[index] != b'\n' {
                skip_last = false;
                continue;
            }
            if skip_last && position + index as u64 == len - 1 {
                skip_last = false;
                continue;
            }
            newlines += 1;
            if newlines == lines {
                return (position + index as u64 + 1, len);
            }
        }
    }
    (floor, len)
}

impl Stream {
    /// Runs the follower; returns why it ended.
    async fn run(mut self, stdout: &Path, stderr: &Path) -> String {
        let result = self.stream(stdout, stderr).await;
        let end = match result {
            Ok(end) => end,
            Err(Stop::Canceled) if !self.shutdown.is_cancelled() => {
                return "canceled by the server".to_owned();
            }
            Err(Stop::Canceled) => {
                // The agent shuts down: say so, so the viewer is not left waiting.
                let mut reply = self.reply.clone().with_data(Value::Null);
                reply.transitioning = Some(Transitioning::Error);
                reply.transitioning_message = Some("the agent is shutting down".to_owned());
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), self.client.publish(&reply)).await;
                return "agent shutting down".to_owned();
            }
            Err(Stop::LeaseExpired) => return "lease expired: no ack from the server".to_owned(),
            Err(Stop::Unsent) => return "the server did not take a reply".to_owned(),
        };
        let chunk = LogChunk {
            seq: self.seq,
            frames: Vec::new(),
            end: Some(end.clone()),
        };
        let mut reply = self.reply.clone();
        reply.data = serde_json::to_value(&chunk).ok();
        let _ = self.client.publish(&reply).await;
        end
    }

    async fn stream(&mut self, stdout: &Path, stderr: &Path) -> Result<String, Stop> {
        let dir = stdout.parent().map(Path::to_owned);
        let mut sources = [Source::new(stdout, STDOUT), Source::new(stderr, STDERR)];
        // The tail: each stream's last lines, stdout first (the files carry no times, so
        // their order between streams is not known).
        for source in &mut sources {
            let (start, end) = tail_start(&source.path, self.request.lines.min(MAX_LINES));
            source.offset = start;
            loop {
                let mut frames = Vec::new();
                // Following, a last line without its newline may yet get the rest of it.
                let read = source.read(Some(end), !self.request.follow, &mut frames);
                self.send(frames).await?;
                if !read || source.offset >= end {
                    break;
                }
            }
        }
        if !self.request.follow {
            return Ok("end of log".to_owned());
        }
        let mut last_sent = Instant::now();
        loop {
            if let Some(dir) = &dir
                && !dir.exists()
            {
                return Ok("container removed".to_owned());
            }
            let mut busy = false;
            for source in &mut sources {
                let mut frames = Vec::new();
                busy |= source.read(None, false, &mut frames);
                if !frames.is_empty() {
                    self.send(frames).await?;
                    last_sent = Instant::now();
                }
            }
            if last_sent.elapsed() >= HEARTBEAT {
                self.heartbeat().await?;
                last_sent = Instant::now();
            }
            self.check_lease()?;
            if !busy {
                tokio::select! {
                    () = tokio::time::sleep(POLL) => {}
                    () = self.cancel.cancelled() => return Err(Stop::Canceled),
                }
            }
        }
    }

    fn check_lease(&self) -> Result<(), Stop> {
        if self.acked.borrow().1.elapsed() > self.lease {
            return Err(Stop::LeaseExpired);
        }
        Ok(())
    }

    /// Sends frames as one chunk, once the window allows it.
    async fn send(&mut self, frames: Vec<String>) -> Result<(), Stop> {
        if frames.is_empty() {
            return Ok(());
        }
        // Wait for the server to take earlier chunks (heartbeats meanwhile keep its call alive).
        loop {
            self.check_lease()?;
            if self.cancel.is_cancelled() {
                return Err(Stop::Canceled);
            }
            if self.seq < self.acked.borrow().0 + self.window {
                break;
            }
            tokio::select! {
                changed = self.acked.changed() => if changed.is_err() { return Err(Stop::Canceled) },
                () = tokio::time::sleep(HEARTBEAT) => self.heartbeat().await?,
                () = self.cancel.cancelled() => return Err(Stop::Canceled),
            }
        }
        self.seq += 1;
        let chunk = LogChunk {
            seq: self.seq,
            frames,
            end: None,
        };
        self.publish(&chunk).await
    }

    async fn heartbeat(&mut self) -> Result<(), Stop> {
        let chunk = LogChunk {
            seq: self.seq,
            ..LogChunk::default()
        };
        self.publish(&chunk).await
    }

    async fn publish(&self, chunk: &LogChunk) -> Result<(), Stop> {
        let mut reply = self.reply.clone();
        reply.transitioning = Some(Transitioning::Yes);
        reply.data = serde_json::to_value(chunk).ok();
        tokio::select! {
            sent = self.client.publish(&reply) => sent.map_err(|error| {
                tracing::warn!(%error, "sending a log chunk failed; the follower stops");
                Stop::Unsent
            }),
            () = self.cancel.cancelled() => Err(Stop::Canceled),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames_of(path: &Path, lines: u32) -> Vec<String> {
        let (start, end) = tail_start(path, lines);
        let mut source = Source::new(path, STDOUT);
        source.offset = start;
        let mut frames = Vec::new();
        while source.read(Some(end), true, &mut frames) && source.offset < end {}
        frames
    }

    #[test]
    fn the_tail_is_the_last_lines_with_or_without_a_final_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout.log");
        std::fs::write(&path, "a\nb\nc\nd\n").unwrap();
        assert_eq!(frames_of(&path, 2), ["01 c", "01 d"]);
        assert_eq!(frames_of(&path, 10), ["01 a", "01 b", "01 c", "01 d"]);
        assert!(frames_of(&path, 0).is_empty());
        std::fs::write(&path, "a\nb\r\n\nc").unwrap();
        assert_eq!(frames_of(&path, 3), ["01 b", "01 ", "01 c"]);
        assert!(frames_of(&dir.path().join("none"), 5).is_empty());
    }

    #[test]
    fn long_lines_are_split_and_big_tails_come_in_bounded_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout.log");
        let long = "x".repeat(MAX_FRAME_BYTES * 2 + 10);
        let many: String = (0..5000).map(|n| format!("line {n}\n")).collect();
        std::fs::write(&path, format!("{long}\n{many}")).unwrap();
        let frames = frames_of(&path, 6000);
        assert_eq!(frames.len(), 3 + 5000);
        assert_eq!(frames[0].len(), 3 + MAX_FRAME_BYTES);
        assert_eq!(frames[2], format!("01 {}", "x".repeat(10)));
        assert_eq!(frames.last().unwrap(), "01 line 4999");
    }
}
