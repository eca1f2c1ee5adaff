//! [`Router`]: the event router agents and extensions build on, the counterpart of the
//! original's Go `event-subscriber`, with its weaknesses fixed.
//!
//! # How events flow
//! - One reader per connection reads the socket. Each event goes to the handler registered for
//!   its name (a `;…` qualifier is ignored when no handler has the full name).
//! - **Per-resource lanes.** Events of one resource (`resourceType` + `resourceId`) are handled
//!   one at a time, in arrival order; events of different resources, and events without a
//!   resource, run concurrently, at most [`workers`](RouterBuilder::workers) at once.
//! - **Backpressure, never drops.** Events waiting for a worker or for their resource's lane
//!   hold one of [`queue_capacity`](RouterBuilder::queue_capacity) slots. When all are taken
//!   the reader keeps the one event it holds and stops reading the socket until a slot frees:
//!   memory is bounded and nothing is dropped (the original dropped with "No workers
//!   available, dropping event"). A server whose own per-socket queue overflows meanwhile cuts
//!   the socket off as a slow consumer; the router then reconnects.
//! - **A separate ping lane.** `ping` requests with `replyTo` never wait for a worker or a
//!   lane: they are answered at once with `data: {}` (or by a registered `ping` handler).
//!   Keep-alive pings without `replyTo` are ignored.
//! - **Replies.** `Ok(Some(data))` is published as the reply; `Err(error)` and panics are
//!   published as error replies (`transitioning: error`), so the server never waits for its
//!   timeout on a failed handler. An error made with [`HandlerError::permanent`] is published
//!   with `data.permanent: true`: the server fails the process at once instead of retrying. Replies go through `POST /v1/publish`, retried briefly on
//!   network and 5xx errors.
//!
//! # Connection
//! - WebSocket control pings every [`ping_interval`](RouterBuilder::ping_interval); when no
//!   frame at all arrives within [`pong_timeout`](RouterBuilder::pong_timeout) of a ping the
//!   connection is dropped (time spent not reading because of backpressure does not count).
//! - The handshake is bounded by [`handshake_timeout`](RouterBuilder::handshake_timeout).
//! - Any lost or refused connection is retried forever with jittered exponential backoff,
//!   reset after a connection that stayed up for [`STABLE_CONNECTION`]; the same names are
//!   subscribed again. Queued events and running handlers survive a reconnect.
//! - `resource.change` resumes (with [`on_resource_change`](RouterBuilder::on_resource_change)):
//!   each reconnect sends `resumeFrom` with the last stream position read, so what happened
//!   while the router was away arrives first, in order; a position the server no longer
//!   retains calls [`on_relist`](RouterBuilder::on_relist) and the router resubscribes from
//!   the head.
//! - With a [`Client`] of several servers, the router stays on one while it works; a lost
//!   connection moves it to the next server, and a failed subscription tries each server once
//!   before backing off (see [several servers](Client#several-servers)).
//! - Shutdown closes the socket at once, drops queued events that have not started (the server
//!   retries what was never answered) and gives running handlers
//!   [`shutdown_grace`](RouterBuilder::shutdown_grace) to finish before they are cancelled.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use drover_proto::{Event, Transitioning, names};
use futures_util::FutureExt;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{Client, Error, EventStream, Frame, ResourceChange, Result, Subscribe};

/// What a handler returns: `Ok(Some(data))` publishes the reply with `data` (when the request
/// has `replyTo`), `Ok(None)` publishes nothing, `Err(error)` publishes an error reply
/// (`transitioning: error`, `transitioningMessage: <message>`, and `data.permanent: true` for
/// a [permanent](HandlerError::permanent) one). A `String` or `&str` error converts with `?`
/// or `.into()` into a retryable [`HandlerError`].
pub type HandlerResult = std::result::Result<Option<Value>, HandlerError>;

/// Why a handler failed: a message, and whether trying again could ever help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    message: String,
    permanent: bool,
}

impl HandlerError {
    /// A failure worth trying again (a busy disk, a full process table): the server retries
    /// the process with backoff.
    pub fn retryable(message: impl Into<String>) -> HandlerError {
        HandlerError {
            message: message.into(),
            permanent: false,
        }
    }

    /// A failure no retry can cure (the executable does not exist, the request is invalid):
    /// the reply carries `data.permanent: true` and the server fails the process at once with
    /// this message.
    pub fn permanent(message: impl Into<String>) -> HandlerError {
        HandlerError {
            message: message.into(),
            permanent: true,
        }
    }

    /// The message, sent as the reply's `transitioningMessage`.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether it is permanent.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HandlerError {}

impl From<String> for HandlerError {
    fn from(message: String) -> Self {
        HandlerError::retryable(message)
    }
}

impl From<&str> for HandlerError {
    fn from(message: &str) -> Self {
        HandlerError::retryable(message)
    }
}

/// A connection that stayed up at least this long resets the reconnect backoff.
pub const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// How long a closing socket gets to send its close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// How many `ping` requests may be answered at once on the ping lane.
const PING_LANE: usize = 16;
/// How many times a reply is published before giving up (network and 5xx errors only).
const REPLY_ATTEMPTS: u32 = 3;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Handler = Arc<dyn Fn(Event, Context) -> BoxFuture<HandlerResult> + Send + Sync>;

/// What a handler gets besides the event: the request (for replies and progress) and the
/// router's [`Client`].
#[derive(Debug, Clone)]
pub struct Context {
    request: Arc<Event>,
    client: Client,
}

impl Context {
    /// The request being handled.
    pub fn request(&self) -> &Event {
        &self.request
    }

    /// The router's client, for API calls.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Publishes a progress reply (`transitioning: yes`, with `message` and `percent`), which
    /// also keeps the server's call alive. Does nothing when the request wants no reply.
    pub async fn progress(&self, message: &str, percent: Option<i64>) -> Result<()> {
        let Some(mut reply) = self.request.reply() else {
            return Ok(());
        };
        reply.transitioning = Some(Transitioning::Yes);
        reply.transitioning_message = Some(message.to_owned());
        reply.transitioning_progress = percent;
        self.client.publish(&reply).await
    }
}

#[derive(Debug, Clone)]
struct Config {
    workers: usize,
    queue_capacity: usize,
    ping_interval: Duration,
    pong_timeout: Duration,
    handshake_timeout: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
    shutdown_grace: Duration,
}

/// Builds a [`Router`]: handlers by event name, and how to connect.
pub struct RouterBuilder {
    client: Client,
    handlers: HashMap<String, Handler>,
    agent_id: Option<String>,
    project_id: Option<String>,
    config: Config,
    resume: Resume,
}

/// How the router resumes `resource.change` (set by
/// [`on_resource_change`](RouterBuilder::on_resource_change)).
#[derive(Clone, Default)]
struct Resume {
    enabled: bool,
    /// Where the first subscription starts ([`RouterBuilder::resume_from`]).
    from: Option<i64>,
    relist: Option<RelistHandler>,
}

type RelistHandler = Arc<dyn Fn(i64) -> BoxFuture<()> + Send + Sync>;

impl fmt::Debug for RouterBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&String> = self.handlers.keys().collect();
        names.sort();
        f.debug_struct("RouterBuilder")
            .field("client", &self.client)
            .field("handlers", &names)
            .field("agent_id", &self.agent_id)
            .field("project_id", &self.project_id)
            .field("config", &self.config)
            .field("resume", &self.resume.enabled)
            .finish()
    }
}

impl RouterBuilder {
    /// A router for `client`'s server and key, with no handlers yet.
    pub fn new(client: Client) -> Self {
        RouterBuilder {
            client,
            handlers: HashMap::new(),
            agent_id: None,
            project_id: None,
            config: Config {
                workers: 8,
                queue_capacity: 256,
                ping_interval: Duration::from_secs(5),
                pong_timeout: Duration::from_secs(10),
                handshake_timeout: Duration::from_secs(30),
                backoff_min: Duration::from_millis(100),
                backoff_max: Duration::from_secs(30),
                shutdown_grace: Duration::from_secs(5),
            },
            resume: Resume::default(),
        }
    }

    /// Handles events named `event_name`; a later registration of the same name replaces an
    /// earlier one. A `ping` handler answers `ping` requests (with `replyTo`) on the ping lane
    /// instead of the automatic `data: {}` reply.
    pub fn on<F, Fut>(mut self, event_name: &str, handler: F) -> Self
    where
        F: Fn(Event, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let handler: Handler =
            Arc::new(move |event, context| Box::pin(handler(event, context)) as BoxFuture<_>);
        self.handlers.insert(event_name.to_owned(), handler);
        self
    }

    /// Subscribes to `resource.change` and calls `handler` with each change's resource
    /// (events without `data.resource` are skipped). Changes of one resource arrive one at a
    /// time, in order. This is the `resource.change` handler: it replaces one given to
    /// [`on`](RouterBuilder::on), and the other way round.
    ///
    /// **Resuming.** The router remembers the last stream position it read
    /// ([`ResourceChange::position`]) and reconnects with `resumeFrom`, so a dropped socket, a
    /// server restart or a move to another server loses no change: what happened meanwhile
    /// arrives first, in order, then the live stream. When the server no longer retains that
    /// position (`410`), the router calls the [`on_relist`](RouterBuilder::on_relist) handler
    /// with the stream's head position and resubscribes from that head: re-list what you watch
    /// there.
    pub fn on_resource_change<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(ResourceChange) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.resume.enabled = true;
        let handler = Arc::new(handler);
        self.on("resource.change", move |event, _context| {
            let handler = handler.clone();
            async move {
                match ResourceChange::from_event(&event) {
                    Some(change) => handler(change).await,
                    None => tracing::debug!(
                        id = ?event.id,
                        "resource.change without data.resource skipped"
                    ),
                }
                Ok(None)
            }
        })
    }

    /// Called when the change stream cannot be resumed (the server answered `410`: the changes
    /// after the last position seen are no longer retained): changes were lost, so re-list
    /// what you watch. The argument is the head position the router resubscribes from; the
    /// handler runs beside the changes that follow it. Without one, the router logs a warning
    /// and resubscribes from the head.
    pub fn on_relist<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(i64) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.resume.relist = Some(Arc::new(move |head| {
            Box::pin(handler(head)) as BoxFuture<()>
        }));
        self
    }

    /// Starts the change stream after this position (e.g. the `X-Drover-Stream-Position` of
    /// the list the caller made before), instead of at the head when the router first
    /// subscribes. Implies resuming (see
    /// [`on_resource_change`](RouterBuilder::on_resource_change)).
    pub fn resume_from(mut self, position: i64) -> Self {
        self.resume.enabled = true;
        self.resume.from = Some(position);
        self
    }

    /// Passes `agentId` (agent keys, and admins subscribing on an agent's behalf).
    pub fn agent_id(mut self, id: impl Into<String>) -> Self {
        self.agent_id = Some(id.into());
        self
    }

    /// Subscribes through `/v1/projects/{id}/subscribe`.
    pub fn project(mut self, id: impl Into<String>) -> Self {
        self.project_id = Some(id.into());
        self
    }

    /// How many handlers run at once (default 8; at least 1).
    pub fn workers(mut self, n: usize) -> Self {
        self.config.workers = n.max(1);
        self
    }

    /// How many events may wait for a worker or for their resource's lane (default 256; at
    /// least 1). When they are all taken the socket is not read until one frees.
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.config.queue_capacity = n.max(1);
        self
    }

    /// How often a WebSocket control ping is sent (default 5 s).
    pub fn ping_interval(mut self, d: Duration) -> Self {
        self.config.ping_interval = d.max(Duration::from_millis(1));
        self
    }

    /// How long after a ping some frame must arrive before the connection is dropped and
    /// made again (default 10 s).
    pub fn pong_timeout(mut self, d: Duration) -> Self {
        self.config.pong_timeout = d.max(Duration::from_millis(1));
        self
    }

    /// How long the WebSocket handshake may take (default 30 s).
    pub fn handshake_timeout(mut self, d: Duration) -> Self {
        self.config.handshake_timeout = d;
        self
    }

    /// The reconnect delay: doubling from `min` up to `max`, each delay jittered to between
    /// half and all of it (default 100 ms .. 30 s).
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        self.config.backoff_min = min;
        self.config.backoff_max = max.max(min);
        self
    }

    /// How long running handlers may go on after shutdown before they are cancelled
    /// (default 5 s).
    pub fn shutdown_grace(mut self, d: Duration) -> Self {
        self.config.shutdown_grace = d;
        self
    }

    /// The router.
    pub fn build(self) -> Router {
        let mut handlers = self.handlers;
        let ping = handlers.remove("ping");
        let mut event_names: Vec<String> = handlers.keys().cloned().collect();
        event_names.push("ping".to_owned());
        event_names.sort();
        let subscribe = Subscribe {
            event_names,
            agent_id: self.agent_id,
            project_id: self.project_id,
            handshake_timeout: Some(self.config.handshake_timeout),
            resume_from: None,
        };
        Router {
            client: self.client,
            handlers,
            ping,
            subscribe,
            config: self.config,
            connections: watch::Sender::new(0),
            resume: self.resume,
        }
    }
}

/// A running event router: see the [module documentation](self).
pub struct Router {
    client: Client,
    handlers: HashMap<String, Handler>,
    ping: Option<Handler>,
    subscribe: Subscribe,
    config: Config,
    connections: watch::Sender<u64>,
    resume: Resume,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("client", &self.client)
            .field("subscribe", &self.subscribe)
            .field("custom_ping", &self.ping.is_some())
            .field("config", &self.config)
            .field("connections", &*self.connections.borrow())
            .finish()
    }
}

impl Router {
    /// The names it subscribes to (its handlers' names and `ping`).
    pub fn event_names(&self) -> &[String] {
        &self.subscribe.event_names
    }

    /// How many times it has subscribed so far (1 after the first connection, 2 after the
    /// first reconnect, …), for tests and health checks to wait on. A subscription counts once
    /// the server sent its first frame on it (drover, like Cattle, sends a `ping` event right
    /// after subscribing), so events published after the count moved are received.
    pub fn connections(&self) -> watch::Receiver<u64> {
        self.connections.subscribe()
    }

    /// Subscribes and handles events until `shutdown` is cancelled, reconnecting with backoff
    /// whenever the connection is lost or refused. Fails at once only when the subscription
    /// can never succeed (an invalid event name).
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        for name in &self.subscribe.event_names {
            names::validate(name).map_err(|error| Error::Invalid(format!("{error}: {name:?}")))?;
        }
        let Router {
            client,
            handlers,
            ping,
            subscribe,
            config,
            connections,
            resume,
        } = self;
        let shared = Arc::new(Shared {
            position: AtomicI64::new(resume.from.unwrap_or(NO_POSITION)),
            resume: resume.enabled,
            relist: resume.relist,
            client,
            handlers,
            ping,
            slots: Arc::new(Semaphore::new(config.queue_capacity)),
            workers: Arc::new(Semaphore::new(config.workers)),
            ping_slots: Arc::new(Semaphore::new(PING_LANE)),
            lanes: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            drop_queued: CancellationToken::new(),
            abort: CancellationToken::new(),
            config,
        });
        let mut failures: u32 = 0;
        let mut relisted = false;
        loop {
            let mut subscribe = subscribe.clone();
            subscribe.resume_from = shared.resume_position();
            let connected = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                connected = shared.client.subscribe(subscribe) => connected,
            };
            let delay;
            match connected {
                Ok(stream) => {
                    relisted = false;
                    if shared.resume {
                        // Where the server starts this stream when it did not resume one.
                        if let Some(head) = stream.stream_position() {
                            let _ = shared.position.compare_exchange(
                                NO_POSITION,
                                head,
                                Ordering::AcqRel,
                                Ordering::Acquire,
                            );
                        }
                    }
                    let since = Instant::now();
                    let server = stream.server_url().to_owned();
                    let index = stream.server_index();
                    tracing::debug!(%server, "event router connected");
                    let lost = match serve(&shared, stream, &shutdown, &connections).await {
                        Ended::Shutdown => break,
                        Ended::Lost(why) => why,
                    };
                    // The next subscription goes to the next server, if there are several.
                    shared.client.leave(index);
                    if since.elapsed() >= STABLE_CONNECTION {
                        failures = 0;
                    }
                    delay = backoff(&shared.config, failures);
                    tracing::warn!(%server, reason = %lost, retry_in = ?delay, next = shared.client.base_url(), "event router lost its connection; reconnecting");
                }
                Err(Error::Relist { head, body }) => {
                    shared.relist(head, &body).await;
                    // Resubscribe from the head at once: nothing failed (but never twice in a
                    // row without a pause).
                    relisted = !relisted;
                    if relisted {
                        continue;
                    }
                    delay = backoff(&shared.config, failures);
                }
                Err(Error::Refused { status, body }) if status == 401 || status == 403 => {
                    delay = backoff(&shared.config, failures);
                    tracing::warn!(
                        server = shared.client.base_url(), status, %body, retry_in = ?delay,
                        "event router: the server REFUSED the subscription ({status}); check the access key, \
                         the secret key and the agentId. Retrying with backoff"
                    );
                }
                Err(error) => {
                    delay = backoff(&shared.config, failures);
                    tracing::warn!(servers = ?shared.client.base_urls(), %error, retry_in = ?delay, "event router could not subscribe; retrying");
                }
            }
            failures = failures.saturating_add(1);
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        shared.shut_down().await;
        Ok(())
    }
}

/// No `resource.change` position known yet.
const NO_POSITION: i64 = -1;

/// The router's state shared by the reader and the handler tasks.
struct Shared {
    /// Whether it resumes `resource.change`.
    resume: bool,
    /// The highest `resource.change` position read, or [`NO_POSITION`].
    position: AtomicI64,
    /// Called on a `410`.
    relist: Option<RelistHandler>,
    client: Client,
    handlers: HashMap<String, Handler>,
    ping: Option<Handler>,
    config: Config,
    /// Queue slots: one per event read but not yet started.
    slots: Arc<Semaphore>,
    /// Worker slots: one per running handler.
    workers: Arc<Semaphore>,
    /// Ping-lane slots: one per `ping` being answered.
    ping_slots: Arc<Semaphore>,
    /// Per-resource lanes: present while a resource's event is running or waiting for a
    /// worker; holds that resource's later events.
    lanes: Mutex<HashMap<LaneKey, VecDeque<Job>>>,
    tasks: TaskTracker,
    /// Cancelled on shutdown: events that have not started are dropped.
    drop_queued: CancellationToken,
    /// Cancelled when the shutdown grace ran out: running handlers are cancelled.
    abort: CancellationToken,
}

type LaneKey = (String, String);

struct Job {
    event: Event,
    handler: Handler,
    /// The queue slot, given back when the handler starts.
    slot: OwnedSemaphorePermit,
}

/// Where an event read from the socket goes.
enum Lane {
    Queue(Handler),
    Ping,
}

/// An event read from the socket that waits for a slot; the socket is not read meanwhile.
struct Pending {
    event: Event,
    lane: Lane,
}

/// Why a connection ended.
enum Ended {
    Shutdown,
    Lost(String),
}

fn lane_key(event: &Event) -> Option<LaneKey> {
    let id = event.resource_id.as_deref().filter(|id| !id.is_empty())?;
    Some((
        event.resource_type.clone().unwrap_or_default(),
        id.to_owned(),
    ))
}

impl Shared {
    /// The `resumeFrom` of the next subscription.
    fn resume_position(&self) -> Option<i64> {
        let position = self.position.load(Ordering::Acquire);
        (self.resume && position >= 0).then_some(position)
    }

    /// Remembers the position of a `resource.change` read from the socket.
    fn saw(&self, event: &Event) {
        if self.resume
            && names::base(event.name()) == "resource.change"
            && let Some(position) = crate::change::position(event)
        {
            self.position.fetch_max(position, Ordering::AcqRel);
        }
    }

    /// The server no longer has the changes after our position: start again from `head`
    /// and tell the caller to re-list.
    async fn relist(self: &Arc<Self>, head: i64, body: &str) {
        self.position.store(head, Ordering::Release);
        match &self.relist {
            Some(handler) => {
                tracing::info!(
                    head,
                    "event router: the change stream cannot resume ({body}); re-listing and resubscribing from the head"
                );
                let handler = handler.clone();
                let abort = self.abort.clone();
                self.tasks.spawn(async move {
                    tokio::select! {
                        biased;
                        () = abort.cancelled() => {}
                        () = handler(head) => {}
                    }
                });
            }
            None => tracing::warn!(
                head,
                "event router: the change stream cannot resume ({body}); changes were lost and no on_relist handler is set; resubscribing from the head"
            ),
        }
    }

    fn handler_for(&self, name: &str) -> Option<Handler> {
        self.handlers
            .get(name)
            .or_else(|| self.handlers.get(names::base(name)))
            .cloned()
    }

    /// Routes an event; returns it when it must wait for a slot.
    fn route(self: &Arc<Self>, event: Event) -> Option<Pending> {
        let lane = if event.name() == "ping" {
            if event.reply_to.as_deref().is_none_or(str::is_empty) {
                return None;
            }
            Lane::Ping
        } else {
            match self.handler_for(event.name()) {
                Some(handler) => Lane::Queue(handler),
                None => {
                    if event.name() == "logout" {
                        tracing::info!("the server logged this subscription out");
                    } else {
                        tracing::debug!(name = event.name(), "no handler for event; ignored");
                    }
                    return None;
                }
            }
        };
        let semaphore = match lane {
            Lane::Ping => &self.ping_slots,
            Lane::Queue(_) => &self.slots,
        };
        match semaphore.clone().try_acquire_owned() {
            Ok(slot) => {
                self.start(Pending { event, lane }, slot);
                None
            }
            Err(_) => Some(Pending { event, lane }),
        }
    }

    /// Waits for the slot a pending event needs.
    async fn slot_for(&self, pending: Option<&Pending>) -> OwnedSemaphorePermit {
        let semaphore = match pending {
            Some(Pending {
                lane: Lane::Ping, ..
            }) => &self.ping_slots,
            _ => &self.slots,
        };
        semaphore
            .clone()
            .acquire_owned()
            .await
            .expect("the router's semaphores are never closed")
    }

    fn start(self: &Arc<Self>, pending: Pending, slot: OwnedSemaphorePermit) {
        match pending.lane {
            Lane::Ping => self.answer_ping(pending.event, slot),
            Lane::Queue(handler) => self.dispatch(Job {
                event: pending.event,
                handler,
                slot,
            }),
        }
    }

    fn answer_ping(self: &Arc<Self>, event: Event, slot: OwnedSemaphorePermit) {
        let shared = self.clone();
        self.tasks.spawn(async move {
            let _slot = slot;
            let answer = async {
                match &shared.ping {
                    Some(handler) => handle(&shared.client, handler.clone(), event).await,
                    None => finish(&shared.client, &event, Ok(Some(json!({})))).await,
                }
            };
            tokio::select! {
                biased;
                () = shared.abort.cancelled() => {}
                () = answer => {}
            }
        });
    }

    /// Puts a job in its resource's lane, or starts it when the lane is free.
    fn dispatch(self: &Arc<Self>, job: Job) {
        let key = lane_key(&job.event);
        if let Some(key) = &key {
            let mut lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
            match lanes.entry(key.clone()) {
                Entry::Occupied(mut waiting) => {
                    waiting.get_mut().push_back(job);
                    return;
                }
                Entry::Vacant(free) => {
                    free.insert(VecDeque::new());
                }
            }
        }
        self.run_lane(key, job);
    }

    /// Runs a job, then the later jobs of its resource one after the other.
    fn run_lane(self: &Arc<Self>, key: Option<LaneKey>, first: Job) {
        let shared = self.clone();
        self.tasks.spawn(async move {
            let mut job = first;
            loop {
                let worker = tokio::select! {
                    biased;
                    () = shared.drop_queued.cancelled() => return,
                    worker = shared.workers.clone().acquire_owned() => {
                        worker.expect("the router's semaphores are never closed")
                    }
                };
                let Job {
                    event,
                    handler,
                    slot,
                } = job;
                drop(slot);
                tokio::select! {
                    biased;
                    () = shared.abort.cancelled() => return,
                    () = handle(&shared.client, handler, event) => {}
                }
                drop(worker);
                let Some(key) = &key else { return };
                match shared.next_in_lane(key) {
                    Some(next) => job = next,
                    None => return,
                }
            }
        });
    }

    fn next_in_lane(&self, key: &LaneKey) -> Option<Job> {
        let mut lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
        let waiting = lanes.get_mut(key)?;
        match waiting.pop_front() {
            Some(job) if !self.drop_queued.is_cancelled() => Some(job),
            _ => {
                lanes.remove(key);
                None
            }
        }
    }

    async fn shut_down(&self) {
        self.drop_queued.cancel();
        let dropped: usize = {
            let mut lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
            let dropped = lanes.values().map(VecDeque::len).sum();
            lanes.clear();
            dropped
        };
        if dropped > 0 {
            tracing::info!(
                dropped,
                "event router stopping: queued events that never started were left for the server to retry"
            );
        }
        self.tasks.close();
        if tokio::time::timeout(self.config.shutdown_grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace = ?self.config.shutdown_grace,
                "event router stopping: cancelling handlers still running after the grace period"
            );
            self.abort.cancel();
            self.tasks.wait().await;
        }
    }
}

/// Reads one connection until it is lost or shutdown is asked for.
async fn serve(
    shared: &Arc<Shared>,
    mut stream: EventStream,
    shutdown: &CancellationToken,
    connections: &watch::Sender<u64>,
) -> Ended {
    let config = &shared.config;
    let mut live = false;
    let mut ticker =
        tokio::time::interval_at(Instant::now() + config.ping_interval, config.ping_interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // When the first control ping not yet followed by any frame was sent.
    let mut awaiting_since: Option<Instant> = None;
    let mut pending: Option<Pending> = None;
    loop {
        let deadline = awaiting_since
            .map(|since| since + config.pong_timeout)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                let _ = tokio::time::timeout(CLOSE_GRACE, stream.close()).await;
                return Ended::Shutdown;
            }
            slot = shared.slot_for(pending.as_ref()), if pending.is_some() => {
                let waited = pending.take().expect("guarded by the branch condition");
                shared.start(waited, slot);
                // The socket was not read meanwhile: liveness is measured afresh.
                awaiting_since = None;
            }
            frame = stream.next_frame(), if pending.is_none() => {
                awaiting_since = None;
                if !live && matches!(frame, Ok(Some(_))) {
                    // The server subscribed us before it sent this first frame (drover and
                    // Cattle send a `ping` event at once): the subscription is live.
                    live = true;
                    connections.send_modify(|count| *count += 1);
                    tracing::info!("event router subscribed");
                }
                match frame {
                    Ok(Some(Frame::Event(event))) => {
                        shared.saw(&event);
                        pending = shared.route(*event);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return Ended::Lost("the server closed the connection".to_owned()),
                    Err(Error::Invalid(message)) => {
                        tracing::warn!(%message, "event router ignored a frame that is not an event");
                    }
                    Err(error) => return Ended::Lost(error.to_string()),
                }
            }
            () = tokio::time::sleep_until(deadline), if awaiting_since.is_some() && pending.is_none() => {
                return Ended::Lost(format!(
                    "no pong or other frame within {:?} of a ping",
                    config.pong_timeout
                ));
            }
            _ = ticker.tick() => {
                match tokio::time::timeout(config.pong_timeout, stream.ping()).await {
                    Ok(Ok(())) => {
                        awaiting_since.get_or_insert_with(Instant::now);
                    }
                    Ok(Err(error)) => return Ended::Lost(format!("sending a ping failed: {error}")),
                    Err(_) => return Ended::Lost("sending a ping timed out".to_owned()),
                }
            }
        }
    }
}

/// Runs a handler and publishes what it returned.
async fn handle(client: &Client, handler: Handler, event: Event) {
    let request = Arc::new(event.clone());
    let context = Context {
        request: request.clone(),
        client: client.clone(),
    };
    let outcome = AssertUnwindSafe(async move { handler(event, context).await })
        .catch_unwind()
        .await;
    let result = outcome.unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|text| (*text).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a non-text panic".to_owned());
        Err(HandlerError::retryable(format!(
            "handler panicked: {message}"
        )))
    });
    finish(client, &request, result).await;
}

/// Publishes the reply a handler's result calls for.
async fn finish(client: &Client, request: &Event, result: HandlerResult) {
    let reply = match result {
        Ok(None) => return,
        Ok(Some(data)) => match request.reply() {
            Some(reply) => reply.with_data(data),
            None => return,
        },
        Err(error) => {
            tracing::warn!(
                name = request.name(),
                id = ?request.id,
                resource_type = ?request.resource_type,
                resource_id = ?request.resource_id,
                message = %error.message,
                permanent = error.permanent,
                "event handler failed"
            );
            match request.reply() {
                Some(reply) => reply.into_error(error.message, error.permanent),
                None => return,
            }
        }
    };
    for attempt in 1..=REPLY_ATTEMPTS {
        match client.publish(&reply).await {
            Ok(()) => return,
            Err(error) if attempt < REPLY_ATTEMPTS && retryable(&error) => {
                tracing::debug!(%error, attempt, "publishing a reply failed; retrying");
                tokio::time::sleep(Duration::from_millis(200) * attempt).await;
            }
            Err(error) => {
                tracing::warn!(
                    %error,
                    reply = reply.name(),
                    request = ?request.id,
                    "could not publish a reply"
                );
                return;
            }
        }
    }
}

fn retryable(error: &Error) -> bool {
    match error {
        Error::Http(_) => true,
        Error::Api { status, .. } => *status >= 500 || *status == 429,
        _ => false,
    }
}

/// The delay before reconnect attempt `failures` (0-based): `min · 2^failures` capped at `max`,
/// jittered to between half and all of it.
fn backoff(config: &Config, failures: u32) -> Duration {
    crate::backoff::jittered(config.backoff_min, config.backoff_max, failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Client::new("http://localhost:1", "a", "b").unwrap()
    }

    fn config(min: u64, max: u64) -> Config {
        let builder = RouterBuilder::new(client())
            .reconnect_backoff(Duration::from_millis(min), Duration::from_millis(max));
        builder.config
    }

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        let config = config(100, 1_000);
        for (failures, ceiling) in [
            (0, 100),
            (1, 200),
            (2, 400),
            (3, 800),
            (4, 1000),
            (40, 1000),
        ] {
            for _ in 0..50 {
                let delay = backoff(&config, failures).as_millis() as u64;
                assert!(
                    delay >= ceiling / 2 && delay <= ceiling,
                    "{failures}: {delay}"
                );
            }
        }
        let spread: std::collections::HashSet<_> = (0..50).map(|_| backoff(&config, 3)).collect();
        assert!(spread.len() > 10, "jitter varies the delay");
    }

    #[test]
    fn builder_subscribes_to_handler_names_and_ping() {
        let router = RouterBuilder::new(client())
            .on("compute.instance.activate", |_, _| async { Ok(None) })
            .on("ping", |_, _| async { Ok(Some(json!({}))) })
            .on_resource_change(|_| async {})
            .agent_id("5")
            .build();
        assert_eq!(
            router.event_names(),
            ["compute.instance.activate", "ping", "resource.change"]
        );
        assert!(router.ping.is_some());
        assert_eq!(router.subscribe.agent_id.as_deref(), Some("5"));
        assert_eq!(*router.connections().borrow(), 0);
    }

    #[test]
    fn lanes_are_per_resource() {
        let a = Event::new("x").with_resource("container", "1i1");
        assert_eq!(
            lane_key(&a),
            Some(("container".to_owned(), "1i1".to_owned()))
        );
        assert_eq!(lane_key(&Event::new("x")), None);
    }
}
