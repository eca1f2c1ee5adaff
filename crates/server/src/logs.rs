//! Container logs through the server, as the original's websocket proxy served them.
//!
//! - `POST …/containers/{id}?action=logs` with `{"follow": bool, "lines": int}` ([`action`])
//!   answers `{"type": "hostAccess", "url": "ws://<host>/<version>/logs/", "token": …}`. The
//!   token ([`LogTokens`]) is an HMAC-SHA256 over what it grants (the container, its project,
//!   the caller's account, `follow`, `lines`, an expiry [`TOKEN_TTL`] away), keyed by a secret
//!   every node of the database shares (`cluster_meta`), so any node checks what any node
//!   issued.
//! - `GET /v1/logs/?token=…` ([`socket`]) checks the token before the upgrade (401), then
//!   streams: it calls `instance.logs;agent=<id>` ([`drover_proto::logs`]) on the container's
//!   agent through the hub, wherever in the cluster the agent's socket is, and writes each
//!   progress reply's frames as text frames.
//!
//! Bounded on every hop: the agent sends at most [`WINDOW`] chunks (of at most
//! [`drover_proto::logs::MAX_CHUNK_BYTES`]) beyond the last one this socket acknowledged, and
//! acknowledges only what it wrote to the viewer, so a slow viewer slows the agent's reading
//! (the log files are the buffer) and a viewer that stops reading is closed after the
//! subscriber write timeout. The agent's follower ends when the viewer goes (a cancel event),
//! and on its own when no ack renewed its lease for [`LEASE`] (a node that died, a lost cancel).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use base64::Engine as _;
use drover_proto::event::now_millis;
use drover_proto::logs::{
    self as proto, DEFAULT_LINES, LogChunk, LogsAck, LogsCancel, LogsRequest, MAX_LINES,
};
use drover_proto::{Event, ids, names};
use drover_store::{Resource, ResourceKind, Store};
use futures_util::SinkExt;
use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use crate::api::Base;
use crate::auth::Principal;
use crate::error::ApiError;
use crate::hub::CallError;
use crate::state::AppState;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The container action that answers the socket's URL and token.
pub const ACTION: &str = "logs";

/// Whether a container may have a log to read (it was placed on a host and is not gone):
/// its `actions` offer `logs` then.
pub fn has_log(resource: &Resource) -> bool {
    resource.kind == ResourceKind::Instance
        && resource.host_id.is_some()
        && !matches!(
            resource.state.as_str(),
            "removing" | "removed" | "purging" | "purged"
        )
}

/// How long a token may be used to connect.
pub const TOKEN_TTL: Duration = Duration::from_secs(60);
/// Chunks an agent may send beyond the last one acknowledged.
pub const WINDOW: u64 = 8;
/// A stream the agent does not hear an ack for this long ends on the agent.
pub const LEASE: Duration = Duration::from_secs(60);
/// How often the socket renews the lease when it has nothing to acknowledge.
const RENEW_EVERY: Duration = Duration::from_secs(15);
/// No word from the agent for this long (it sends a heartbeat every 5 s) ends the stream.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The secret's name in `cluster_meta`.
const SECRET_NAME: &str = "logs.token.secret";
/// How long a closing socket gets to take its close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Issues and checks the log sockets' tokens.
#[derive(Clone)]
pub struct LogTokens {
    key: Arc<[u8]>,
}

impl std::fmt::Debug for LogTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogTokens")
    }
}

/// What a token grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The container.
    #[serde(rename = "c")]
    pub container: i64,
    /// Its project.
    #[serde(rename = "p")]
    pub project: i64,
    /// The caller's account.
    #[serde(rename = "a")]
    pub account: i64,
    /// Follow.
    #[serde(rename = "f")]
    pub follow: bool,
    /// Tail lines.
    #[serde(rename = "n")]
    pub lines: u32,
    /// Expiry, epoch milliseconds.
    #[serde(rename = "e")]
    pub expires: i64,
    /// Makes every token distinct.
    #[serde(rename = "r")]
    pub nonce: String,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token this cluster issued (malformed, or a bad signature).
    #[error("the token is not valid")]
    Invalid,
    /// Issued here, but expired.
    #[error("the token expired; ask for a new one with ?action=logs")]
    Expired,
}

impl LogTokens {
    /// The tokens of the cluster on `store` (its shared secret made on first use).
    pub async fn load(store: &Store) -> Result<LogTokens, drover_store::Error> {
        let secret = store.shared_secret(SECRET_NAME).await?;
        Ok(LogTokens::with_key(secret.as_bytes()))
    }

    /// Tokens under a given key.
    pub fn with_key(key: &[u8]) -> LogTokens {
        LogTokens { key: key.into() }
    }

    fn mac(&self, payload: &str) -> HmacSha256 {
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&self.key)
            .expect("HMAC takes a key of any length");
        mac.update(payload.as_bytes());
        mac
    }

    /// A token for `grant`: `<payload>.<signature>`, both URL-safe base64.
    pub fn issue(&self, grant: &Grant) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let payload = b64.encode(serde_json::to_vec(grant).unwrap_or_default());
        let signature = b64.encode(self.mac(&payload).finalize().into_bytes());
        format!("{payload}.{signature}")
    }

    /// What a token grants, if this cluster issued it and it has not expired at `now`.
    pub fn check(&self, token: &str, now: i64) -> Result<Grant, TokenError> {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let (payload, signature) = token.split_once('.').ok_or(TokenError::Invalid)?;
        let signature = b64.decode(signature).map_err(|_| TokenError::Invalid)?;
        self.mac(payload)
            .verify_slice(&signature)
            .map_err(|_| TokenError::Invalid)?;
        let grant: Grant = b64
            .decode(payload)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or(TokenError::Invalid)?;
        if grant.expires < now {
            return Err(TokenError::Expired);
        }
        Ok(grant)
    }
}

/// `?action=logs`'s input: `follow` (default true) and `lines` (default 100, at most 10000).
fn options(data: &Map<String, Value>) -> Result<(bool, u32), ApiError> {
    let follow = match data.get("follow") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(follow)) => *follow,
        Some(_) => {
            return Err(ApiError::invalid(
                "InvalidType",
                "follow",
                "follow must be true or false",
            ));
        }
    };
    let lines = match data.get("lines") {
        None | Some(Value::Null) => DEFAULT_LINES,
        Some(value) => value
            .as_u64()
            .filter(|lines| *lines <= u64::from(MAX_LINES))
            .map(|lines| lines as u32)
            .ok_or_else(|| {
                ApiError::invalid(
                    "InvalidOption",
                    "lines",
                    format!("lines must be a whole number from 0 to {MAX_LINES}"),
                )
            })?,
    };
    Ok((follow, lines))
}

/// The agent that has a container's log: its host's, which must be connected to a node.
async fn agent_of(state: &AppState, container: &Resource) -> Result<i64, ApiError> {
    let id = ids::format("container", container.id);
    if matches!(
        container.state.as_str(),
        "removing" | "removed" | "purging" | "purged"
    ) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "InvalidState",
            format!("{id} is {}: its log is gone with it", container.state),
        ));
    }
    let Some(host_id) = container.host_id else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "InvalidState",
            format!("{id} has no host yet: it never ran, so it has no log"),
        ));
    };
    let host = ids::format("host", host_id);
    let agent_id = state
        .store
        .get_resource(ResourceKind::Host, host_id)
        .await?
        .and_then(|host| host.agent_id)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "InvalidState",
                format!("{id}'s host {host} has no agent to read its log from"),
            )
        })?;
    if !state.store.agent_connected(agent_id).await? {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "AgentDisconnected",
            format!(
                "the agent {} of {id}'s host {host} is not connected; its log is on that host",
                ids::format("agent", agent_id)
            ),
        )
        .with_detail("try again once the agent is back (see GET /v1/agents)"));
    }
    Ok(agent_id)
}

/// `POST …/containers/{id}?action=logs`: a URL and token for the log socket.
pub async fn action(
    state: &AppState,
    principal: &Principal,
    container: &Resource,
    base: &Base,
    data: &Map<String, Value>,
) -> Result<Value, ApiError> {
    let (follow, lines) = options(data).inspect_err(|_| state.metrics.bad_input.increment(1))?;
    agent_of(state, container).await?;
    let grant = Grant {
        container: container.id,
        project: container.account_id.unwrap_or(state.default_project.id),
        account: principal.account.id,
        follow,
        lines,
        expires: now_millis() + TOKEN_TTL.as_millis() as i64,
        nonce: uuid::Uuid::new_v4().simple().to_string(),
    };
    let url = match base.as_str().strip_prefix("https://") {
        Some(rest) => format!("wss://{rest}/logs/"),
        None => format!(
            "ws://{}/logs/",
            base.as_str()
                .strip_prefix("http://")
                .unwrap_or(base.as_str())
        ),
    };
    Ok(json!({
        "type": "hostAccess",
        "url": url,
        "token": state.log_tokens.issue(&grant),
    }))
}

/// `GET /v1/logs/?token=…`: the log socket.
pub async fn socket(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let token = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(key, _)| key == "token")
        .map(|(_, value)| value.into_owned())
        .filter(|token| !token.is_empty());
    let refused = |code: &'static str, message: String| {
        state.metrics.bad_input.increment(1);
        ApiError::new(StatusCode::UNAUTHORIZED, code, message)
    };
    let Some(token) = token else {
        return Err(refused(
            "MissingToken",
            "the log socket needs ?token=<token> from POST …/containers/<id>?action=logs".into(),
        ));
    };
    let grant = state
        .log_tokens
        .check(&token, now_millis())
        .map_err(|error| refused("InvalidToken", error.to_string()))?;
    match state.store.get_account(grant.account).await? {
        Some(account) if account.state == "active" => {}
        _ => {
            return Err(refused(
                "InvalidToken",
                "the account the token was issued to is no longer active".into(),
            ));
        }
    }
    let id = ids::format("container", grant.container);
    let container = state
        .store
        .get_resource(ResourceKind::Instance, grant.container)
        .await?
        .filter(|container| {
            container.account_id.unwrap_or(state.default_project.id) == grant.project
        })
        .ok_or_else(|| ApiError::not_found(format!("no container {id}")))?;
    let agent_id = agent_of(&state, &container).await?;
    let upgrade = upgrade.map_err(|rejection| {
        state.metrics.bad_input.increment(1);
        let status = rejection.status();
        ApiError::new(
            status,
            if status == StatusCode::UPGRADE_REQUIRED {
                "UpgradeRequired"
            } else {
                "BadRequest"
            },
            format!(
                "the log socket is a WebSocket endpoint: {}",
                rejection.body_text()
            ),
        )
    })?;
    let limit = crate::ws::connection_limit(&state);
    let Some(slot) = state.subscriber_slots.try_take(limit) else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "TooManyConnections",
            format!(
                "this server holds its limit of {limit} sockets; retry later or on another server"
            ),
        ));
    };
    Ok(upgrade
        .read_buffer_size(4096)
        .write_buffer_size(64 * 1024)
        .max_write_buffer_size(4 * 1024 * 1024)
        .max_message_size(64 * 1024)
        .on_upgrade(move |socket| async move {
            let _slot = slot;
            serve(socket, state, grant, id, agent_id).await;
        }))
}

/// How one write to the viewer ended.
enum Wrote {
    Ok,
    Gone,
    TimedOut,
}

async fn write_frames(socket: &mut WebSocket, frames: Vec<String>, timeout: Duration) -> Wrote {
    let write = async {
        for frame in frames {
            socket.feed(Message::Text(frame.into())).await?;
        }
        socket.flush().await
    };
    match tokio::time::timeout(timeout, write).await {
        Ok(Ok(())) => Wrote::Ok,
        Ok(Err(_)) => Wrote::Gone,
        Err(_) => Wrote::TimedOut,
    }
}

/// A close reason fits in a close frame (123 bytes).
fn reason(text: &str) -> String {
    let mut end = text.len().min(123);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

async fn serve(mut socket: WebSocket, state: AppState, grant: Grant, id: String, agent_id: i64) {
    let request_id = uuid::Uuid::new_v4().to_string();
    let write_timeout = state.settings.server().sub_write_timeout;
    let (tx, mut rx) = mpsc::channel::<LogChunk>(WINDOW as usize + 8);
    let overflow = Arc::new(AtomicBool::new(false));
    let request = Event::new(names::for_agent(proto::REQUEST, agent_id)).with_data(json!({
        "instance": {"id": id},
        "logs": LogsRequest {
            follow: grant.follow,
            lines: grant.lines,
            window: WINDOW,
            lease_millis: LEASE.as_millis() as u64,
        },
    }));
    let call = {
        let overflow = overflow.clone();
        state.hub.call_with_id(
            request_id.clone(),
            request,
            CALL_TIMEOUT,
            move |reply: &Event| {
                let chunk = reply
                    .data
                    .clone()
                    .and_then(|data| serde_json::from_value::<LogChunk>(data).ok());
                if let Some(chunk) = chunk
                    && tx.try_send(chunk).is_err()
                {
                    overflow.store(true, Ordering::Release);
                }
            },
        )
    };
    tokio::pin!(call);
    let send_to_agent = |name: &str, data: Value| {
        state
            .hub
            .publish(&Event::new(names::for_agent(name, agent_id)).with_data(data));
    };
    let ack = |seq: u64| {
        send_to_agent(
            proto::ACK,
            serde_json::to_value(LogsAck {
                request_id: request_id.clone(),
                seq,
            })
            .unwrap_or_default(),
        );
    };
    let mut renew =
        tokio::time::interval_at(tokio::time::Instant::now() + RENEW_EVERY, RENEW_EVERY);
    let (mut written, mut acked) = (0u64, 0u64);
    let mut call_ended = false;
    tracing::debug!(container = %id, agent = agent_id, follow = grant.follow, "log socket open");
    // Writes one chunk; `Some(close)` ends the stream.
    macro_rules! take {
        ($chunk:expr) => {{
            let chunk: LogChunk = $chunk;
            if chunk.frames.is_empty() || chunk.seq <= written {
                None
            } else if chunk.seq != written + 1 {
                Some(Some((
                    close_code::ERROR,
                    "log lines were lost on the way; connect again".to_owned(),
                )))
            } else {
                match write_frames(&mut socket, chunk.frames, write_timeout).await {
                    Wrote::Ok => {
                        written = chunk.seq;
                        if written - acked >= WINDOW / 2 {
                            ack(written);
                            acked = written;
                        }
                        None
                    }
                    Wrote::Gone => Some(None),
                    Wrote::TimedOut => Some(Some((
                        close_code::POLICY,
                        format!(
                            "slow viewer: a write took over {} ms",
                            write_timeout.as_millis()
                        ),
                    ))),
                }
            }
        }};
    }
    let close: Option<(u16, String)> = loop {
        tokio::select! {
            biased;
            result = &mut call => {
                call_ended = true;
                // What came before the last reply, then the last reply's own frames.
                let mut stop = None;
                while let Ok(chunk) = rx.try_recv() {
                    if let Some(close) = take!(chunk) {
                        stop = Some(close);
                        break;
                    }
                }
                if let Some(close) = stop {
                    break close;
                }
                break match result {
                    Ok(reply) => {
                        let last: LogChunk = reply
                            .data
                            .and_then(|data| serde_json::from_value(data).ok())
                            .unwrap_or_default();
                        let end = last.end.clone().unwrap_or_else(|| "end of log".to_owned());
                        if !last.frames.is_empty() {
                            let frames = LogChunk { seq: written + 1, ..last };
                            if let Some(close) = take!(frames) {
                                break close;
                            }
                        }
                        Some((close_code::NORMAL, end))
                    }
                    Err(CallError::Timeout(after)) => Some((close_code::ERROR, format!(
                        "the agent stopped answering (no word for {} s)", after.as_secs()))),
                    Err(CallError::ErrorReply(message) | CallError::Permanent(message)) => {
                        Some((close_code::ERROR, format!("the agent: {message}")))
                    }
                    Err(CallError::Shutdown) => Some((close_code::AWAY, "server shutting down".to_owned())),
                };
            }
            chunk = rx.recv() => {
                if overflow.load(Ordering::Acquire) {
                    break Some((close_code::POLICY, "slow viewer: too many chunks waiting".to_owned()));
                }
                let Some(chunk) = chunk else { continue };
                if let Some(close) = take!(chunk) {
                    break close;
                }
            }
            _ = renew.tick() => {
                ack(written);
                acked = written;
            }
            incoming = socket.recv() => match incoming {
                None | Some(Ok(Message::Close(_)) | Err(_)) => break None,
                // The socket is receive-only; whatever the viewer sends is ignored.
                Some(Ok(_)) => {}
            },
        }
    };
    if !call_ended {
        send_to_agent(
            proto::CANCEL,
            serde_json::to_value(LogsCancel {
                request_id: request_id.clone(),
            })
            .unwrap_or_default(),
        );
    }
    tracing::debug!(container = %id, ?close, written, acked, "log socket closed");
    if let Some((code, text)) = close {
        let frame = CloseFrame {
            code,
            reason: reason(&text).into(),
        };
        let _ = tokio::time::timeout(CLOSE_GRACE, socket.send(Message::Close(Some(frame)))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(expires: i64) -> Grant {
        Grant {
            container: 5,
            project: 1,
            account: 2,
            follow: true,
            lines: 100,
            expires,
            nonce: "n".into(),
        }
    }

    #[test]
    fn a_token_is_checked_by_its_signature_and_expiry() {
        let tokens = LogTokens::with_key(b"secret");
        let token = tokens.issue(&grant(1_000));
        assert_eq!(tokens.check(&token, 999), Ok(grant(1_000)));
        assert_eq!(tokens.check(&token, 1_001), Err(TokenError::Expired));
        // Another cluster's key, a changed payload, garbage.
        assert_eq!(
            LogTokens::with_key(b"other").check(&token, 0),
            Err(TokenError::Invalid)
        );
        let (_, signature) = token.split_once('.').unwrap();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut forged = grant(1_000);
        forged.container = 6;
        let forged = format!(
            "{}.{signature}",
            b64.encode(serde_json::to_vec(&forged).unwrap())
        );
        assert_eq!(tokens.check(&forged, 0), Err(TokenError::Invalid));
        for bad in ["", ".", "abc", "a.b", &format!("{token}x")] {
            assert_eq!(tokens.check(bad, 0), Err(TokenError::Invalid), "{bad}");
        }
    }

    #[test]
    fn options_have_defaults_and_bounds() {
        let map = |value: Value| value.as_object().unwrap().clone();
        assert_eq!(options(&Map::new()).unwrap(), (true, DEFAULT_LINES));
        assert_eq!(
            options(&map(json!({"follow": false, "lines": 0}))).unwrap(),
            (false, 0)
        );
        for bad in [
            json!({"lines": -1}),
            json!({"lines": MAX_LINES + 1}),
            json!({"lines": "5"}),
            json!({"lines": 1.5}),
            json!({"follow": "yes"}),
        ] {
            assert!(options(&map(bad.clone())).is_err(), "{bad}");
        }
    }

    #[test]
    fn close_reasons_fit_a_close_frame() {
        assert_eq!(reason("short"), "short");
        let long = "é".repeat(100);
        let cut = reason(&long);
        assert!(cut.len() <= 123 && long.starts_with(&cut));
    }
}
