//! Container logs over the bus: how a server asks an agent for a container's output and how the
//! agent streams it back.
//!
//! - The server calls `instance.logs;agent=<id>` ([`REQUEST`]) with [`LogsRequest`] in
//!   `data.logs` and the container in `data.instance.id`, and a `replyTo` of its own node.
//! - The agent answers with progress replies (`transitioning: yes`) whose `data` is a
//!   [`LogChunk`]: `seq` counts chunks that carry frames (1, 2, …; a heartbeat repeats the last
//!   `seq` with no frames), `frames` are the socket's text frames (`"01 "` + a stdout line,
//!   `"02 "` + a stderr line). The last reply (`transitioning: no`) is a chunk with `end`: why
//!   the stream ended (`"end of log"`, `"container removed"`).
//! - Flow control: the agent never has more than `window` chunks beyond the last one the server
//!   acknowledged with `instance.logs.ack;agent=<id>` ([`ACK`], [`LogsAck`]); each ack also
//!   renews the stream's lease (`leaseMillis`): a stream not acknowledged for that long ends on
//!   the agent, so no follower outlives its viewer. `instance.logs.cancel;agent=<id>`
//!   ([`CANCEL`]) ends it at once.

use serde::{Deserialize, Serialize};

/// The request: stream a container's log.
pub const REQUEST: &str = "instance.logs";
/// The server read chunks up to `seq` (and the viewer is still there).
pub const ACK: &str = "instance.logs.ack";
/// The viewer left: stop.
pub const CANCEL: &str = "instance.logs.cancel";

/// The prefix of a stdout line's frame.
pub const STDOUT: &str = "01 ";
/// The prefix of a stderr line's frame.
pub const STDERR: &str = "02 ";

/// `lines` when a request gives none.
pub const DEFAULT_LINES: u32 = 100;
/// The most `lines` a request may ask for.
pub const MAX_LINES: u32 = 10_000;
/// A line longer than this many bytes is sent as several frames.
pub const MAX_FRAME_BYTES: usize = 16 * 1024;
/// The most frame bytes in one chunk.
pub const MAX_CHUNK_BYTES: usize = 32 * 1024;

/// What the server asks of the agent (`data.logs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogsRequest {
    /// Keep streaming what is written after the tail.
    pub follow: bool,
    /// How many of the last lines of each stream to send first.
    pub lines: u32,
    /// Chunks the agent may send beyond the last acknowledged one.
    pub window: u64,
    /// How long the stream lives without an ack (milliseconds).
    pub lease_millis: u64,
}

/// One reply's `data`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogChunk {
    /// The chunk's number (see the module's description).
    pub seq: u64,
    /// Text frames, each `"01 "` or `"02 "` and a line without its newline.
    #[serde(default)]
    pub frames: Vec<String>,
    /// In the last reply: why the stream ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
}

/// `data` of [`ACK`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogsAck {
    /// The request's id.
    pub request_id: String,
    /// The last chunk the server has taken.
    pub seq: u64,
}

/// `data` of [`CANCEL`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogsCancel {
    /// The request's id.
    pub request_id: String,
}
