//! The subscribe endpoint: `GET /v1/subscribe` and `GET /v1/projects/{id}/subscribe`.
//!
//! One task per socket writes from the socket's queue (many queued events, one flush), sends
//! the keep-alive `ping` event, and reads only control frames: the socket is receive-only,
//! publishing goes through `POST /v1/publish`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use drover_proto::names::{self, Qualifier};
use drover_proto::{Event, ids};
use drover_store::{ChangeBounds, ChangeScope};
use futures_util::SinkExt;
use tokio::sync::mpsc;

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
    /// `resumeFrom`: the last stream position of `resource.change` the subscriber saw.
    resume_from: Option<i64>,
}

fn parse_query(raw: Option<&str>) -> Result<SubscribeQuery, ApiError> {
    let mut query = SubscribeQuery::default();
    for (key, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "eventNames" | "eventNames[]" => query.event_names.push(value.into_owned()),
            "agentId" => query.agent_id = Some(value.into_owned()),
            "resumeFrom" => {
                query.resume_from = Some(value.trim().parse().ok().filter(|p: &i64| *p >= 0).ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "InvalidResumeFrom",
                        format!("resumeFrom {value:?} is not a stream position (an integer >= 0)"),
                    )
                    .with_field("resumeFrom")
                    .with_detail("use the data.position of the last resource.change received, or the X-Drover-Stream-Position header of a list")
                })?);
            }
            _ => {}
        }
    }
    Ok(query)
}

/// The header that carries the change stream's head position (on collections and on a 410).
pub const STREAM_POSITION_HEADER: &str = "x-drover-stream-position";

/// Close code when rows a replay still had to send were trimmed meanwhile: reconnecting with
/// the same `resumeFrom` gets the 410 that says to re-list.
pub const CLOSE_RESUME_TOO_OLD: u16 = 4410;

/// Logged changes read and written per replay page.
const REPLAY_PAGE: i64 = MAX_BATCH as i64;

/// How long after a replay live `resource.change` events at or below its last position are
/// dropped as duplicates: events committed before the replay's last read reach this node within
/// it (from this node at once, from other nodes through NATS).
const DEDUPE_WINDOW: Duration = Duration::from_secs(10);

/// A subscription that resumes: what to replay before the live stream.
#[derive(Debug, Clone)]
struct Resume {
    /// Replay the changes after this position.
    from: i64,
    /// Whose changes.
    scope: ChangeScope,
    /// A raw `resource.change` name: every change, under that name.
    all: bool,
    /// `resource.change;account=<id>` names: that project's changes, under the name the
    /// subscriber sees (without the suffix when the subscription strips it).
    accounts: Vec<(i64, String)>,
}

/// What to replay for the qualified names: every change for a raw `resource.change`, one
/// project's for `resource.change;account=<id>`; `None` when no name is `resource.change`.
fn resume_plan(from: i64, qualified: &[String], strips: bool) -> Option<Resume> {
    let mut wanted = false;
    let mut all = false;
    let mut accounts = Vec::new();
    for name in qualified {
        if names::base(name) != "resource.change" {
            continue;
        }
        wanted = true;
        match names::scope(name) {
            Qualifier::Account(account) => {
                let shown = if strips {
                    names::base(name)
                } else {
                    name.as_str()
                };
                accounts.push((account, shown.to_owned()));
            }
            Qualifier::Raw => all |= name == "resource.change",
            // `;agent=` copies of resource.change are never published: nothing to replay.
            Qualifier::Agent(_) => {}
        }
    }
    wanted.then(|| Resume {
        from,
        scope: if all {
            ChangeScope::All
        } else {
            ChangeScope::Accounts(accounts.iter().map(|(account, _)| *account).collect())
        },
        all,
        accounts,
    })
}

impl Resume {
    /// The name a logged change is replayed under, if this subscription sees it.
    fn name_for(&self, account: Option<i64>) -> Option<&str> {
        if self.all {
            return Some("resource.change");
        }
        let account = account?;
        self.accounts
            .iter()
            .find(|(scope, _)| *scope == account)
            .map(|(_, name)| name.as_str())
    }
}

/// The 410 a resume from a position the log no longer covers gets.
fn resume_gone(from: i64, bounds: ChangeBounds) -> Response {
    let head = bounds.head;
    let (code, message) = if from > head {
        (
            "ResumeAhead",
            format!(
                "resumeFrom {from} is ahead of the change stream's head position {head} (a different or reset store): re-list, then subscribe again without resumeFrom or with resumeFrom={head}"
            ),
        )
    } else {
        (
            "ResumeTooOld",
            format!(
                "the changes after position {from} are no longer retained (resource.change.retain.count): re-list, then subscribe again without resumeFrom or with resumeFrom={head}"
            ),
        )
    };
    let oldest = bounds
        .oldest
        .map_or_else(|| "none".to_owned(), |oldest| oldest.to_string());
    let mut response = ApiError::new(StatusCode::GONE, code, message)
        .with_field("resumeFrom")
        .with_detail(format!(
            "oldest retained position: {oldest}; head position: {head}"
        ))
        .into_response();
    response
        .headers_mut()
        .insert(STREAM_POSITION_HEADER, HeaderValue::from(head));
    response
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
    // A subscription to resource.change starts at a position: the one it resumes from, else
    // the head now. The changes after it that were logged before the socket is registered
    // with the hub are replayed, so the stream has no gap from that position on.
    let mut head = None;
    let resume = match resume_plan(
        query.resume_from.unwrap_or(0),
        &qualified,
        qualifier.strips(),
    ) {
        Some(mut resume) => {
            let bounds = state.store.change_bounds().await?;
            match query.resume_from {
                Some(from) if !bounds.covers(from) => return Ok(resume_gone(from, bounds)),
                Some(_) => {}
                None => resume.from = bounds.head,
            }
            head = Some(bounds.head);
            Some(resume)
        }
        None => None,
    };
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
    let mut response = upgrade
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
                serve(socket, state, subscription, qualifier, resume).await;
                drop(_slot);
            }
        });
    if let Some(head) = head {
        response
            .headers_mut()
            .insert(STREAM_POSITION_HEADER, HeaderValue::from(head));
    }
    Ok(response)
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
    resume: Option<Resume>,
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
    // A resuming subscription replays the logged changes right after the greeting; live events
    // queue meanwhile and are written after it, without the ones it already sent.
    let mut replay = resume;
    let mut dedupe: Option<Dedupe> = None;
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
            () = std::future::ready(()), if replay.is_some() => {
                let resume = replay.take().expect("guarded by the branch condition");
                let mut held = VecDeque::new();
                let sent = replay_changes(&mut socket, &state, &subscriber, &mut subscription.rx, &resume, &mut held, write_timeout).await;
                match sent {
                    Ok(last) => {
                        let filter = Dedupe { last, until: tokio::time::Instant::now() + DEDUPE_WINDOW };
                        dedupe = Some(filter);
                        let held = write_held(&mut socket, held, filter.last);
                        bounded(&subscriber, write_timeout, held).await
                    }
                    Err(ReplayStop::Written(written)) => written,
                    Err(ReplayStop::Trimmed(at)) => break Some((CLOSE_RESUME_TOO_OLD, format!(
                        "ResumeTooOld: changes after position {at} were trimmed during the replay; re-list"))),
                    Err(ReplayStop::Store(error)) => {
                        tracing::warn!(%error, "reading the change log for a replay failed");
                        break Some((close_code::ERROR, "the change log could not be read; resume again".to_owned()));
                    }
                }
            }
            first = subscription.rx.recv() => {
                let Some(first) = first else { break None };
                let stale_up_to = dedupe.and_then(|filter| filter.active());
                if stale_up_to.is_none() {
                    dedupe = None;
                }
                let batch = write_batch(&mut socket, first, &mut subscription.rx, stale_up_to);
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
/// flushes once: under load many events share one system call. With `stale_up_to`, a
/// `resource.change` at or below that position is a duplicate of a replayed one and skipped.
async fn write_batch(
    socket: &mut WebSocket,
    first: Utf8Bytes,
    rx: &mut mpsc::Receiver<Utf8Bytes>,
    stale_up_to: Option<i64>,
) -> Result<(), axum::Error> {
    let mut next = Some(first);
    let mut count = 0;
    while let Some(text) = next.take() {
        if !stale_up_to.is_some_and(|last| replayed_already(&text, last)) {
            socket.feed(Message::Text(text)).await?;
        }
        count += 1;
        if count < MAX_BATCH {
            next = rx.try_recv().ok();
        }
    }
    socket.flush().await
}

/// Drops live duplicates of replayed changes for a while after a replay.
#[derive(Debug, Clone, Copy)]
struct Dedupe {
    /// The last position the replay read up to.
    last: i64,
    /// Until when live events are checked.
    until: tokio::time::Instant,
}

impl Dedupe {
    /// The position at or below which live changes are duplicates, while the window lasts.
    fn active(self) -> Option<i64> {
        (tokio::time::Instant::now() < self.until).then_some(self.last)
    }
}

/// Whether a serialized event is a `resource.change` whose position is at most `last`.
fn replayed_already(text: &str, last: i64) -> bool {
    #[derive(serde::Deserialize)]
    struct Peek<'a> {
        #[serde(borrow)]
        name: Option<std::borrow::Cow<'a, str>>,
        data: Option<PeekData>,
    }
    #[derive(serde::Deserialize)]
    struct PeekData {
        position: Option<i64>,
    }
    if !text.contains("\"resource.change") {
        return false;
    }
    match serde_json::from_str::<Peek<'_>>(text) {
        Ok(Peek {
            name: Some(name),
            data: Some(PeekData {
                position: Some(position),
            }),
        }) => names::base(&name) == "resource.change" && position <= last,
        _ => false,
    }
}

/// Why a replay stopped before the live stream.
enum ReplayStop {
    /// A write failed, timed out, or the hub closed the socket.
    Written(Written),
    /// Changes it still had to send were trimmed: the subscriber must re-list.
    Trimmed(i64),
    /// The store failed.
    Store(drover_store::Error),
}

impl From<drover_store::Error> for ReplayStop {
    fn from(error: drover_store::Error) -> Self {
        ReplayStop::Store(error)
    }
}

/// Sends the logged changes after `resume.from` that the subscriber may see, in position
/// order, a page at a time: each page is written and flushed before the next is read, so the
/// socket's own backpressure paces the replay and a reader that keeps up is never cut off.
/// Live events that arrive meanwhile move from the hub's queue to `held` (up to the same
/// bound), so a long replay does not fill the queue. Returns the last position it read up to.
async fn replay_changes(
    socket: &mut WebSocket,
    state: &AppState,
    subscriber: &crate::hub::Subscriber,
    rx: &mut mpsc::Receiver<Utf8Bytes>,
    resume: &Resume,
    held: &mut VecDeque<Utf8Bytes>,
    write_timeout: Duration,
) -> Result<i64, ReplayStop> {
    let hold = state.settings.server().sub_queue;
    let mut cursor = resume.from;
    loop {
        let rows = state
            .store
            .changes_after(cursor, &resume.scope, REPLAY_PAGE)
            .await?;
        // Trimmed past the cursor before the page was read: what lay between is gone.
        let bounds = state.store.change_bounds().await?;
        if bounds.oldest.is_some_and(|oldest| oldest > cursor + 1)
            && rows.first().is_none_or(|row| row.position > cursor + 1)
        {
            return Err(ReplayStop::Trimmed(cursor));
        }
        let full = rows.len() as i64 >= REPLAY_PAGE;
        let page = async {
            for row in &rows {
                cursor = row.position;
                let Some(name) = resume.name_for(row.account_id) else {
                    continue;
                };
                let mut event: Event = match serde_json::from_str(&row.data) {
                    Ok(event) => event,
                    Err(error) => {
                        tracing::warn!(%error, position = row.position, "a logged change does not parse; skipped");
                        continue;
                    }
                };
                if let Some(serde_json::Value::Object(data)) = event.data.as_mut() {
                    data.insert(crate::changes::POSITION.to_owned(), row.position.into());
                }
                socket
                    .feed(Message::Text(event.to_json_with_name(name).into()))
                    .await?;
            }
            socket.flush().await
        };
        match bounded(subscriber, write_timeout, page).await {
            Written::Ok => {}
            written => return Err(ReplayStop::Written(written)),
        }
        while held.len() < hold {
            match rx.try_recv() {
                Ok(text) => held.push_back(text),
                Err(_) => break,
            }
        }
        if !full {
            return Ok(cursor);
        }
    }
}

/// Writes the live events held during a replay, without the ones it sent.
async fn write_held(
    socket: &mut WebSocket,
    held: VecDeque<Utf8Bytes>,
    last: i64,
) -> Result<(), axum::Error> {
    for text in held {
        if !replayed_already(&text, last) {
            socket.feed(Message::Text(text)).await?;
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
    fn resume_from_must_be_a_position() {
        assert_eq!(
            parse_query(Some("resumeFrom=42")).unwrap().resume_from,
            Some(42)
        );
        assert_eq!(parse_query(Some("eventNames=x")).unwrap().resume_from, None);
        for bad in [
            "resumeFrom=-1",
            "resumeFrom=x",
            "resumeFrom=",
            "resumeFrom=1.5",
        ] {
            let error = parse_query(Some(bad)).unwrap_err();
            assert_eq!(error.status(), StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn a_resume_replays_what_the_names_see_under_the_names_they_see() {
        let raw = resume_plan(3, &["resource.change".into(), "ping".into()], false).unwrap();
        assert_eq!((raw.from, &raw.scope), (3, &ChangeScope::All));
        assert_eq!(raw.name_for(None), Some("resource.change"));
        assert_eq!(raw.name_for(Some(7)), Some("resource.change"));
        let project = resume_plan(0, &["resource.change;account=7".into()], true).unwrap();
        assert_eq!(project.scope, ChangeScope::Accounts(vec![7]));
        assert_eq!(project.name_for(Some(7)), Some("resource.change"));
        assert_eq!(project.name_for(Some(8)), None);
        assert_eq!(project.name_for(None), None);
        let admin = resume_plan(0, &["resource.change;account=7".into()], false).unwrap();
        assert_eq!(admin.name_for(Some(7)), Some("resource.change;account=7"));
        let agent = resume_plan(0, &["resource.change;agent=2".into()], true).unwrap();
        assert_eq!(agent.scope, ChangeScope::Accounts(vec![]));
        assert!(resume_plan(0, &["state.change".into(), "ping".into()], false).is_none());
    }

    #[test]
    fn live_duplicates_of_a_replay_are_recognised() {
        let change = |name: &str, position: i64| {
            Event::new(name)
                .with_data(json!({"resource": {"position": 1, "name": "resource.change"}, "position": position}))
                .to_json()
        };
        assert!(replayed_already(&change("resource.change", 5), 5));
        assert!(replayed_already(&change("resource.change;account=3", 4), 5));
        assert!(!replayed_already(&change("resource.change", 6), 5));
        assert!(
            !replayed_already(&change("other", 1), 5),
            "only resource.change"
        );
        let no_position = Event::new("resource.change")
            .with_data(json!({"resource": {}}))
            .to_json();
        assert!(!replayed_already(&no_position, 5));
        let odd = Event::new("resource.change")
            .with_data(json!([1, 2]))
            .to_json();
        assert!(!replayed_already(&odd, 5));
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
