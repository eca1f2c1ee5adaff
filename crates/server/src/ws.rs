//! The subscribe endpoint: `GET /v1/subscribe` and `GET /v1/projects/{id}/subscribe`.
//!
//! One task per socket writes from the socket's queue (many queued events, one flush), sends
//! the keep-alive `ping` event, and reads only control frames: the socket is receive-only,
//! publishing goes through `POST /v1/publish`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use drover_proto::names::{self, Qualifier};
use drover_proto::{Event, ids};
use futures_util::SinkExt;

use serde_json::json;

use crate::auth::{SocketAuth, WS_PROTOCOL};
use crate::error::ApiError;
use crate::hub::{CloseReason, Subscription};
use crate::state::AppState;

/// Close code for a slow consumer (policy violation); the reason says what happened.
pub const CLOSE_SLOW_CONSUMER: u16 = close_code::POLICY;
/// Close code when the subscription reached its lifetime (`api.sub.max.pings`).
pub const CLOSE_LIFETIME: u16 = close_code::NORMAL;
/// Close code for a frame the protocol does not have (text or binary from the client).
pub const CLOSE_UNSUPPORTED: u16 = close_code::UNSUPPORTED;
/// Close code for a frame or message over `api.max.body.bytes`.
pub const CLOSE_TOO_BIG: u16 = close_code::SIZE;

/// The most events written before one flush.
const MAX_BATCH: usize = 256;
/// Frames are gathered up to this many bytes before a write, so a batch of queued events goes
/// out in one system call (with 0, every frame was its own `send`).
const WRITE_BUFFER: usize = 64 * 1024;
/// Read buffer per socket: clients send only control frames, so it stays small.
const READ_BUFFER: usize = 4096;

/// Subscriber sockets open or being opened, against `api.sub.max.connections` and what the
/// open-files limit allows ([`Slots::from_nofile`]). A slot is taken before the upgrade and
/// given back when its socket ends (or its upgrade fails).
#[derive(Debug, Clone)]
pub struct Slots {
    open: Arc<AtomicUsize>,
    /// The most the open-files limit allows, whatever the setting says.
    pub cap: usize,
}

/// A subscriber's slot; given back when dropped.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// File descriptors kept for everything but subscriber sockets (API and `/healthz`
/// connections, the store, files): an eighth of the open-files limit, at least this many.
pub const FD_RESERVE_MIN: u64 = 256;

impl Default for Slots {
    fn default() -> Self {
        Slots::with_cap(usize::MAX)
    }
}

impl Slots {
    /// Slots capped at `cap` sockets whatever the setting says.
    pub fn with_cap(cap: usize) -> Slots {
        Slots {
            open: Arc::new(AtomicUsize::new(0)),
            cap,
        }
    }

    /// Raises the open-files soft limit to the hard limit and caps subscriber sockets below
    /// it, keeping [`FD_RESERVE_MIN`] (or an eighth of the limit) free; warns when
    /// `configured` is above that cap. Returns the slots and the open-files limit.
    pub fn from_nofile(configured: u64) -> (Slots, u64) {
        let limit = match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(limit) => limit,
            Err(error) => {
                tracing::warn!(%error, "could not read or raise the open-files limit");
                rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(u64::MAX, |(soft, _)| soft)
            }
        };
        let reserve = (limit / 8).max(FD_RESERVE_MIN);
        let cap = limit.saturating_sub(reserve).max(1);
        if configured > cap && configured != 0 {
            tracing::warn!(
                open_files_limit = limit,
                configured,
                cap,
                "api.sub.max.connections is above what the open-files limit allows: subscriber \
                 sockets are capped at {cap}, keeping {reserve} file descriptors for the API, \
                 /healthz and the store (raise the limit with `ulimit -n` or LimitNOFILE=)"
            );
        }
        (
            Slots::with_cap(usize::try_from(cap).unwrap_or(usize::MAX)),
            limit,
        )
    }

    /// Takes a slot if fewer than `limit` are taken.
    pub fn try_take(&self, limit: u64) -> Option<Slot> {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let mut open = self.open.load(Ordering::Acquire);
        loop {
            if open >= limit {
                return None;
            }
            match self.open.compare_exchange_weak(
                open,
                open + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(Slot(self.open.clone())),
                Err(now) => open = now,
            }
        }
    }

    /// Slots taken now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// The limit a new subscriber is checked against now: the setting, capped; 0 is no limit at
/// all (not even the cap: then the open-files limit is what stops new connections).
pub fn connection_limit(state: &AppState) -> u64 {
    match state.settings.server().sub_max_connections {
        0 => u64::MAX,
        configured => configured.min(state.subscriber_slots.cap as u64),
    }
}

/// What the subscribe query may say.
#[derive(Debug, Default)]
struct SubscribeQuery {
    event_names: Vec<String>,
    agent_id: Option<String>,
}

fn parse_query(raw: Option<&str>) -> Result<SubscribeQuery, ApiError> {
    let mut query = SubscribeQuery::default();
    for (key, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "eventNames" | "eventNames[]" => query.event_names.push(value.into_owned()),
            "agentId" => query.agent_id = Some(value.into_owned()),
            _ => {}
        }
    }
    Ok(query)
}

/// `GET /v1/subscribe`.
pub async fn subscribe(
    State(state): State<AppState>,
    auth: SocketAuth,
    RawQuery(query): RawQuery,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    start(state, auth, None, query, upgrade).await
}

/// `GET /v1/projects/{id}/subscribe`.
pub async fn subscribe_project(
    State(state): State<AppState>,
    auth: SocketAuth,
    Path(project): Path<String>,
    RawQuery(query): RawQuery,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let project_id = crate::api::project_id(&state, &project).await?;
    start(state, auth, Some(project_id), query, upgrade).await
}

async fn start(
    state: AppState,
    SocketAuth(principal): SocketAuth,
    project: Option<i64>,
    query: Option<String>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let upgrade = upgrade.map_err(|rejection| {
        state.metrics.bad_input.increment(1);
        let status = rejection.status();
        let status = if status == StatusCode::METHOD_NOT_ALLOWED { StatusCode::METHOD_NOT_ALLOWED } else { status };
        ApiError::new(
            status,
            if status == StatusCode::UPGRADE_REQUIRED { "UpgradeRequired" } else { "BadRequest" },
            format!("subscribe is a WebSocket endpoint: {}", rejection.body_text()),
        )
        .with_detail("send a WebSocket upgrade request (headers Connection: Upgrade, Upgrade: websocket, Sec-WebSocket-Key, Sec-WebSocket-Version: 13); a proxy in between must pass them on")
    })?;
    let query = parse_query(query.as_deref())?;
    let agent_id = match query.agent_id.as_deref().filter(|text| !text.is_empty()) {
        Some(text) => Some(ids::parse("agent", text).ok_or_else(|| {
            state.metrics.bad_input.increment(1);
            ApiError::invalid(
                "InvalidReference",
                "agentId",
                format!("agentId {text:?} is not an agent id"),
            )
        })?),
        None => None,
    };
    let qualifier = principal.subscription_scope(project, agent_id)?;
    let mut qualified = Vec::with_capacity(query.event_names.len());
    for name in &query.event_names {
        names::validate(name).map_err(|error| {
            state.metrics.bad_input.increment(1);
            ApiError::invalid(
                "InvalidCharacters",
                "eventNames",
                format!("{error}: {name:?}"),
            )
        })?;
        qualified.push(qualifier.qualify(name));
    }
    let limit = connection_limit(&state);
    let Some(slot) = state.subscriber_slots.try_take(limit) else {
        state.metrics.subscribe_refused.increment(1);
        let mut response = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "TooManyConnections",
            format!("this server holds its limit of {limit} subscriber connections; retry later or on another server"),
        )
        .with_detail("api.sub.max.connections, capped below the open-files limit so that the API and /healthz keep file descriptors")
        .into_response();
        let headers = response.headers_mut();
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        // The refused client's connection is not kept alive: it would hold a descriptor.
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Ok(response);
    };
    let max_body = state.settings.server().max_body_bytes;
    let logout_account = principal.account.id;
    Ok(upgrade
        // A browser that sent its key as a subprotocol offered this one too; echo it.
        .protocols([WS_PROTOCOL])
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(max_body.saturating_mul(4).max(1 << 20))
        .max_message_size(max_body)
        .max_frame_size(max_body)
        .on_upgrade(move |socket| {
            let _slot = slot;
            let queue = state.settings.server().sub_queue;
            let subscription =
                state
                    .hub
                    .subscribe(qualified, qualifier.strips(), queue, Some(logout_account));
            async move {
                serve(socket, state, subscription, qualifier).await;
                drop(_slot);
            }
        }))
}

/// The keep-alive `ping` event, as the original's agents expect it.
fn ping_message() -> Message {
    let ping = Event::new("ping").with_data(json!({"options": {}, "resources": []}));
    Message::Text(ping.to_json().into())
}

async fn serve(
    mut socket: WebSocket,
    state: AppState,
    mut subscription: Subscription,
    qualifier: Qualifier,
) {
    let (ping_every, max_pings, write_timeout) = {
        let tunables = state.settings.server();
        (
            tunables.sub_ping_interval,
            tunables.sub_max_pings,
            tunables.sub_write_timeout,
        )
    };
    let mut ticker = tokio::time::interval(ping_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pings_sent: u64 = 0;
    let subscriber = subscription.subscriber.clone();
    tracing::debug!(?qualifier, "subscriber connected");
    // Where each agent's socket is, for the cluster's view (`/v1/clusternodes`).
    let agent = match qualifier {
        Qualifier::Agent(agent) => Some(agent),
        _ => None,
    };
    if let Some(agent) = agent {
        let (store, node) = (state.store.clone(), state.cluster.node_id().to_owned());
        tokio::spawn(async move {
            if let Err(error) = store
                .agent_session_open(agent, &node, drover_proto::event::now_millis())
                .await
            {
                tracing::debug!(%error, agent, "recording an agent session failed");
            }
        });
    }
    // The protocol's first frame is a `ping`, at once, before anything the hub queued the moment
    // the socket subscribed (a request resent to an agent that came back): the ticker's first
    // tick is not ready until the timer driver turns, so it is not left to the race below.
    let mut greeted = false;
    let close: Option<(u16, String)> = loop {
        // Every write is raced against the hub's close request and bounded in time, so a peer
        // that stops reading can never hold this task (or its queue) forever.
        let written = tokio::select! {
            biased;
            () = subscriber.closed() => break close_frame(&mut socket, &state, &subscriber).await,
            () = std::future::ready(()), if !greeted => {
                greeted = true;
                ticker.reset();
                pings_sent += 1;
                bounded(&subscriber, write_timeout, socket.send(ping_message())).await
            }
            first = subscription.rx.recv() => {
                let Some(first) = first else { break None };
                let batch = write_batch(&mut socket, first, &mut subscription.rx);
                bounded(&subscriber, write_timeout, batch).await
            }
            _ = ticker.tick() => {
                if max_pings > 0 && pings_sent >= max_pings {
                    break Some((CLOSE_LIFETIME, format!(
                        "subscription reached its lifetime of {max_pings} pings (api.sub.max.pings); reconnect")));
                }
                pings_sent += 1;
                bounded(&subscriber, write_timeout, socket.send(ping_message())).await
            }
            incoming = socket.recv() => match incoming {
                None | Some(Ok(Message::Close(_))) => break None,
                Some(Err(error)) => match too_big(error) {
                    Some((size, max_size)) => {
                        state.metrics.bad_input.increment(1);
                        state.metrics.oversized_messages.increment(1);
                        break Some((CLOSE_TOO_BIG, format!(
                            "message too big: {size} bytes, the limit is {max_size} (api.max.body.bytes)")));
                    }
                    None => break None,
                },
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => Written::Ok,
                Some(Ok(Message::Text(_) | Message::Binary(_))) => {
                    state.metrics.bad_input.increment(1);
                    break Some((CLOSE_UNSUPPORTED, "the subscribe socket is receive-only: publish with POST /v1/publish".to_owned()));
                }
            },
        };
        match written {
            Written::Ok => {}
            Written::Failed => break None,
            Written::Closed => break close_frame(&mut socket, &state, &subscriber).await,
            Written::TimedOut => {
                if subscriber.close(CloseReason::SlowConsumer) {
                    state.metrics.slow_consumer_disconnects.increment(1);
                }
                break close_frame(&mut socket, &state, &subscriber).await;
            }
        }
    };
    state.hub.unsubscribe(&subscription);
    if let Some(agent) = agent {
        let (store, node) = (state.store.clone(), state.cluster.node_id().to_owned());
        tokio::spawn(async move {
            let _ = store.agent_session_close(agent, &node).await;
        });
    }
    if let Some((code, reason)) = close {
        tracing::debug!(code, %reason, "closing subscriber");
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let _ = tokio::time::timeout(CLOSE_GRACE, socket.send(Message::Close(Some(frame)))).await;
    }
}

/// The size and limit of a frame or message that was over `max_frame_size` /
/// `max_message_size`, if that is why reading failed.
fn too_big(error: axum::Error) -> Option<(usize, usize)> {
    use tokio_tungstenite::tungstenite::error::{CapacityError, Error};
    match error
        .into_inner()
        .downcast::<Error>()
        .ok()
        .map(|error| *error)
    {
        Some(Error::Capacity(CapacityError::MessageTooLong { size, max_size })) => {
            Some((size, max_size))
        }
        _ => None,
    }
}

/// How long a closing socket gets to take its close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How a bounded write ended.
enum Written {
    Ok,
    Failed,
    Closed,
    TimedOut,
}

async fn bounded<E>(
    subscriber: &crate::hub::Subscriber,
    timeout: Duration,
    write: impl std::future::Future<Output = Result<(), E>>,
) -> Written {
    tokio::select! {
        biased;
        () = subscriber.closed() => Written::Closed,
        result = tokio::time::timeout(timeout, write) => match result {
            Ok(Ok(())) => Written::Ok,
            Ok(Err(_)) => Written::Failed,
            Err(_) => Written::TimedOut,
        },
    }
}

/// Writes the first queued event and whatever else is queued (up to [`MAX_BATCH`]), then
/// flushes once: under load many events share one system call.
async fn write_batch(
    socket: &mut WebSocket,
    first: axum::extract::ws::Utf8Bytes,
    rx: &mut tokio::sync::mpsc::Receiver<axum::extract::ws::Utf8Bytes>,
) -> Result<(), axum::Error> {
    socket.feed(Message::Text(first)).await?;
    for _ in 1..MAX_BATCH {
        match rx.try_recv() {
            Ok(text) => socket.feed(Message::Text(text)).await?,
            Err(_) => break,
        }
    }
    socket.flush().await
}

/// The close code and reason for a socket the hub closed.
async fn close_frame(
    socket: &mut WebSocket,
    state: &AppState,
    subscriber: &crate::hub::Subscriber,
) -> Option<(u16, String)> {
    Some(match subscriber.close_reason() {
        CloseReason::SlowConsumer => (CLOSE_SLOW_CONSUMER, {
            let tunables = state.settings.server();
            format!(
                "slow consumer: more than {} events queued or a write took over {} ms",
                tunables.sub_queue,
                tunables.sub_write_timeout.as_millis()
            )
        }),
        CloseReason::Logout => {
            let _ = tokio::time::timeout(
                CLOSE_GRACE,
                socket.send(Message::Text(r#"{"name":"logout"}"#.into())),
            )
            .await;
            (close_code::NORMAL, "logout".to_owned())
        }
        CloseReason::Shutdown | CloseReason::Open => {
            (close_code::AWAY, "server shutting down".to_owned())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_stop_at_the_limit_and_come_back_when_dropped() {
        let slots = Slots::with_cap(10);
        let taken: Vec<Slot> = (0..3).map(|_| slots.try_take(3).unwrap()).collect();
        assert!(slots.try_take(3).is_none());
        assert_eq!(slots.open(), 3);
        drop(taken);
        assert_eq!(slots.open(), 0);
        assert!(slots.try_take(3).is_some());
    }

    #[test]
    fn the_cap_keeps_a_reserve_below_the_open_files_limit() {
        let (slots, limit) = Slots::from_nofile(10_000);
        let reserve = (limit / 8).max(FD_RESERVE_MIN);
        assert_eq!(slots.cap as u64, limit.saturating_sub(reserve).max(1));
        assert!((slots.cap as u64) < limit);
    }

    #[test]
    fn query_keeps_repeated_names_and_decodes() {
        let query = parse_query(Some(
            "eventNames=ping&eventNames=compute.instance.activate%3Bagent%3D5&agentId=1ag5&x=1",
        ))
        .unwrap();
        assert_eq!(
            query.event_names,
            vec![
                "ping".to_owned(),
                "compute.instance.activate;agent=5".to_owned()
            ]
        );
        assert_eq!(query.agent_id.as_deref(), Some("1ag5"));
    }
}
