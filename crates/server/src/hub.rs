//! The event hub: exact-name routing from a published event to every matching subscriber.
//!
//! # Design
//! - A routing table maps each full (qualified) name to the list of its targets. Publishing
//!   looks the name up once; it never scans connections.
//! - The list is an `Arc<Vec<_>>`: a publish clones the `Arc` under a short read lock and
//!   delivers without any lock held; subscribing changes the list in place (`Arc::make_mut`)
//!   unless a publish is iterating it at that moment, in which case it copies.
//! - An event is serialized at most twice per publish: once with its full name (for raw
//!   subscribers) and once with the scope suffix stripped (for qualified ones: `;agent=`/
//!   `;account=` go, a `;handler=<h>` part stays), never per socket.
//!   The resulting text is shared by reference count among all sockets.
//! - Each socket has a bounded queue. A publish never waits on a subscriber: when a queue is
//!   full the copy is dropped, the subscriber is disconnected as a slow consumer and counted.
//! - Server-side calls (`call`) wait for replies matched on `previousIds[0]`, through the
//!   node's own reply name. A reply completes a call only when its publisher is the principal
//!   the request was addressed to (read off the name's trailing scope: `;agent=<id>`: that
//!   agent; `;account=<id>`: a key that subscribes in that project's scope; a raw name such as
//!   `<process>;handler=<h>`: admin and service keys), or an admin/service key; any other reply is
//!   dropped and counted, and the call keeps waiting.
//! - What a client publishes is scoped like what it subscribes to ([`Origin`]): a non-privileged
//!   publisher's `;…` suffix is discarded, and the event reaches the subscribers of its own scope
//!   and the privileged (raw) subscribers of the plain name, never another scope.
//! - A request is sent again as soon as a new socket subscribes to its name (an agent that
//!   reconnects: the first copy reached nobody, or a socket that is gone), within the same
//!   deadline.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use drover_proto::event::{REPLY_PREFIX, Transitioning};
use drover_proto::names::Qualifier;
use drover_proto::{Event, names};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Why the hub closed a subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseReason {
    /// Still open.
    Open = 0,
    /// Its queue was full: it did not read fast enough.
    SlowConsumer = 1,
    /// A `disconnect;account=<id>` event logged its account out.
    Logout = 2,
    /// The server is shutting down.
    Shutdown = 3,
}

/// The hub's side of one subscriber socket.
#[derive(Debug)]
pub struct Subscriber {
    id: u64,
    /// The socket's queue of serialized events.
    tx: mpsc::Sender<Utf8Bytes>,
    /// Qualified subscribers get names without the `;…` suffix.
    strip: bool,
    /// Cancelled when the hub wants the socket closed; the reason says why.
    closer: CancellationToken,
    reason: AtomicU8,
}

impl Subscriber {
    /// Asks the socket to close, for the first reason given; returns whether this call was
    /// the one that closed it.
    pub fn close(&self, reason: CloseReason) -> bool {
        let first = self
            .reason
            .compare_exchange(
                CloseReason::Open as u8,
                reason as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if first {
            self.closer.cancel();
        }
        first
    }

    /// Why the hub closed the socket, if it did.
    pub fn close_reason(&self) -> CloseReason {
        match self.reason.load(Ordering::Acquire) {
            1 => CloseReason::SlowConsumer,
            2 => CloseReason::Logout,
            3 => CloseReason::Shutdown,
            _ => CloseReason::Open,
        }
    }

    /// Resolves when the hub asks the socket to close.
    pub fn closed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.closer.cancelled()
    }
}

#[derive(Debug, Clone)]
enum Target {
    /// A subscriber socket.
    Socket(Arc<Subscriber>),
    /// The socket's implicit `disconnect;account=<id>` subscription.
    Logout(Arc<Subscriber>),
    /// An in-process listener.
    Channel(mpsc::Sender<Arc<Event>>),
    /// This node's reply name: replies go to the waiting calls.
    Replies,
}

impl Target {
    fn is_subscriber(&self, id: u64) -> bool {
        match self {
            Target::Socket(sub) | Target::Logout(sub) => sub.id == id,
            _ => false,
        }
    }
}

type Table = HashMap<Box<str>, Arc<Vec<Target>>>;

/// The other nodes of a cluster, as the hub sees them (`crate::cluster::Link` over NATS).
pub trait Remote: Send + Sync + std::fmt::Debug {
    /// An event this node routed under `name` (serialized with that name), for the other
    /// nodes' targets of `name`. Must not wait.
    fn forward(&self, name: &str, text: Utf8Bytes, origin: &Origin);
    /// `names` gained their first or lost their last local target.
    fn interest(&self, names: &[Box<str>]);
    /// A socket here subscribed to `names`: the other nodes' calls waiting on them resend.
    fn subscribed(&self, names: &[Box<str>]);
}

/// A call waiting for its reply.
#[derive(Debug)]
struct PendingCall {
    /// Who may answer it.
    addressee: Qualifier,
    /// The request's name.
    name: Box<str>,
    /// Where its replies go.
    tx: mpsc::Sender<Event>,
    /// Notified when the request must be sent again (a remote node's socket subscribed to
    /// its name, or NATS came back).
    resend: Arc<Notify>,
}

/// The hub: cheap to clone.
#[derive(Debug, Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    topics: RwLock<Table>,
    next_id: AtomicU64,
    metrics: Metrics,
    /// The name replies to this node's calls are sent to.
    reply_name: String,
    /// Calls waiting for replies, by request id.
    calls: Mutex<HashMap<String, PendingCall>>,
    /// The other nodes, in a cluster.
    remote: OnceLock<Arc<dyn Remote>>,
    /// Woken whenever names gain targets: a request that reached nobody is sent again.
    subscribed: Notify,
    /// The parent of every subscriber's closer: cancelled on shutdown.
    shutdown: CancellationToken,
}

/// A subscriber just added: the hub's handle and the socket's end of the queue.
#[derive(Debug)]
pub struct Subscription {
    /// The hub's handle, to close and to unsubscribe.
    pub subscriber: Arc<Subscriber>,
    /// The queue the socket writes from.
    pub rx: mpsc::Receiver<Utf8Bytes>,
    names: Vec<Box<str>>,
    logout_name: Option<Box<str>>,
}

/// How a call ended without a reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// No reply came in time.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The agent replied with `transitioning: error`: worth trying again.
    #[error("error reply: {0}")]
    ErrorReply(String),
    /// The agent replied with an error it marked permanent (`data.permanent: true`): the
    /// request can never succeed, so it must not be sent again.
    #[error("permanent error reply: {0}")]
    Permanent(String),
    /// The server is shutting down.
    #[error("server shutting down")]
    Shutdown,
}

/// Who published an event: the scope its names are qualified into and what it may answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// `Raw` for the server itself and for admin and service keys; otherwise the scope the
    /// key's subscriptions get (`;agent=<id>` or `;account=<project>`).
    pub scope: Qualifier,
    /// The agent the key is, for agent keys.
    pub agent: Option<i64>,
    /// The project the key acts in, if any.
    pub project: Option<i64>,
}

impl Origin {
    /// The server itself, and admin and service keys: names as given, any reply accepted.
    pub const PRIVILEGED: Origin = Origin {
        scope: Qualifier::Raw,
        agent: None,
        project: None,
    };

    /// Whether a reply from this origin may complete a call addressed to `addressee` (the
    /// request name's trailing scope, [`names::scope`]): a call to `;agent=<id>` is that
    /// agent's; a call to `;account=<p>` (a project's external handler,
    /// `<process>;handler=<h>;account=<p>`) belongs to the keys that subscribe in that scope
    /// (the project's project, user and environment agent keys, not its host agents); a raw
    /// call (`<process>;handler=<h>`) to admin and service keys only, who may answer any.
    pub fn may_answer(&self, addressee: Qualifier) -> bool {
        match (self.scope, addressee) {
            (Qualifier::Raw, _) => true,
            (_, Qualifier::Agent(agent)) => self.agent == Some(agent),
            (scope, Qualifier::Account(project)) => scope == Qualifier::Account(project),
            (_, Qualifier::Raw) => false,
        }
    }
}

impl Hub {
    /// A new hub whose subscribers close when `shutdown` is cancelled.
    pub fn new(metrics: Metrics, shutdown: CancellationToken) -> Hub {
        let hub = Hub {
            inner: Arc::new(Inner {
                topics: RwLock::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                metrics,
                reply_name: format!("{REPLY_PREFIX}{}", rand::random::<u64>() >> 1),
                calls: Mutex::new(HashMap::new()),
                remote: OnceLock::new(),
                subscribed: Notify::new(),
                shutdown,
            }),
        };
        let reply_name = hub.inner.reply_name.clone();
        hub.add_targets([(reply_name.into_boxed_str(), Target::Replies)]);
        hub
    }

    /// Subscribes a socket to already-qualified names. `logout_account` adds the implicit
    /// `disconnect;account=<id>` subscription.
    pub fn subscribe(
        &self,
        names: Vec<String>,
        strip: bool,
        queue: usize,
        logout_account: Option<i64>,
    ) -> Subscription {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let subscriber = Arc::new(Subscriber {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            tx,
            strip,
            closer: self.inner.shutdown.child_token(),
            reason: AtomicU8::new(CloseReason::Open as u8),
        });
        let mut unique: Vec<Box<str>> = names.into_iter().map(String::into_boxed_str).collect();
        unique.sort_unstable();
        unique.dedup();
        let logout_name =
            logout_account.map(|id| names::for_account("disconnect", id).into_boxed_str());
        let targets = unique
            .iter()
            .map(|name| (name.clone(), Target::Socket(subscriber.clone())))
            .chain(
                logout_name
                    .iter()
                    .map(|name| (name.clone(), Target::Logout(subscriber.clone()))),
            );
        self.add_targets(targets);
        if let Some(remote) = self.inner.remote.get() {
            remote.subscribed(&unique);
        }
        self.inner.metrics.connections.increment(1.0);
        self.inner
            .metrics
            .subscriptions
            .increment(unique.len() as f64);
        Subscription {
            subscriber,
            rx,
            names: unique,
            logout_name,
        }
    }

    /// Removes a socket's subscriptions.
    pub fn unsubscribe(&self, subscription: &Subscription) {
        let id = subscription.subscriber.id;
        let mut gone = Vec::new();
        {
            let mut topics = self
                .inner
                .topics
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for name in subscription
                .names
                .iter()
                .chain(subscription.logout_name.iter())
            {
                if let Some(targets) = topics.get_mut(name) {
                    let list = Arc::make_mut(targets);
                    if let Some(idx) = list.iter().position(|target| target.is_subscriber(id)) {
                        list.swap_remove(idx);
                    }
                    if list.is_empty() {
                        topics.remove(name);
                        gone.push(name.clone());
                    }
                }
            }
        }
        if let Some(remote) = self.inner.remote.get() {
            remote.interest(&gone);
        }
        self.inner.metrics.connections.decrement(1.0);
        self.inner
            .metrics
            .subscriptions
            .decrement(subscription.names.len() as f64);
    }

    /// An in-process listener on exact names: what the engine and monitors use.
    /// Events that find its queue full are dropped and counted, as for sockets.
    pub fn listen(&self, names: &[&str], queue: usize) -> mpsc::Receiver<Arc<Event>> {
        let (tx, rx) = mpsc::channel(queue.max(1));
        self.add_targets(
            names
                .iter()
                .map(|name| (Box::from(*name), Target::Channel(tx.clone()))),
        );
        rx
    }

    fn add_targets(&self, targets: impl IntoIterator<Item = (Box<str>, Target)>) {
        let mut topics = self
            .inner
            .topics
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut fresh = Vec::new();
        for (name, target) in targets {
            let list = match topics.entry(name) {
                std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::hash_map::Entry::Vacant(entry) => {
                    fresh.push(entry.key().clone());
                    entry.insert(Arc::default())
                }
            };
            Arc::make_mut(list).push(target);
        }
        drop(topics);
        if let Some(remote) = self.inner.remote.get() {
            remote.interest(&fresh);
        }
        self.inner.subscribed.notify_waiters();
    }

    /// Delivers an event from the server itself to every subscriber of its exact name; returns
    /// how many copies were queued. Never waits on a subscriber.
    pub fn publish(&self, event: &Event) -> usize {
        self.publish_from(event, &Origin::PRIVILEGED)
    }

    /// Delivers an event a client published. A privileged origin's name is routed as given;
    /// any other origin's `;…` suffix is discarded and the event goes to the subscribers of its
    /// own scope (`<name>;agent=<id>` or `<name>;account=<project>`) and to the raw (privileged)
    /// subscribers of the plain name, where the server's own reply name is too.
    pub fn publish_from(&self, event: &Event, origin: &Origin) -> usize {
        self.inner.metrics.events_published.increment(1);
        match origin.scope {
            Qualifier::Raw => self.route(event, event.name(), origin, true),
            scope => {
                let base = names::base(event.name());
                self.route(event, base, origin, true)
                    + self.route(event, &scope.qualify(base), origin, true)
            }
        }
    }

    /// Links the hub to the other nodes of a cluster; they learn every name wanted here.
    pub fn set_remote(&self, remote: Arc<dyn Remote>) {
        if self.inner.remote.set(remote.clone()).is_ok() {
            let names: Vec<Box<str>> = self
                .inner
                .topics
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .keys()
                .cloned()
                .collect();
            remote.interest(&names);
        }
    }

    /// Whether any local target wants `name`.
    pub fn has_targets(&self, name: &str) -> bool {
        self.inner
            .topics
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains_key(name)
    }

    /// Delivers an event another node routed under `name` to this node's targets of `name`
    /// only (it is not forwarded again).
    pub fn deliver_remote(&self, event: &Event, name: &str, origin: &Origin) -> usize {
        self.route(event, name, origin, false)
    }

    /// Sends every pending call's request again (NATS came back: copies may have been lost).
    pub fn resend_all(&self) {
        let calls = self
            .inner
            .calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for call in calls.values() {
            call.resend.notify_one();
        }
    }

    /// Sockets on another node subscribed to `names`: calls waiting on them send again.
    pub fn remote_subscribed(&self, names: &[String]) {
        let calls = self
            .inner
            .calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for call in calls.values() {
            if names.iter().any(|name| **name == *call.name) {
                call.resend.notify_one();
            }
        }
    }

    /// Delivers `event` to the targets of `name`, under which raw subscribers receive it.
    /// With `forward`, the event also goes to the other nodes' targets of `name`.
    fn route(&self, event: &Event, name: &str, origin: &Origin, forward: bool) -> usize {
        let targets = {
            let topics = self
                .inner
                .topics
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            topics.get(name).cloned()
        };
        let mut full_text: Option<Utf8Bytes> = None;
        let delivered = match targets {
            Some(targets) => self.deliver(event, name, origin, &targets, &mut full_text),
            None => 0,
        };
        if forward
            && let Some(remote) = self.inner.remote.get()
            && name != self.inner.reply_name
        {
            let text = full_text.unwrap_or_else(|| event.to_json_with_name(name).into());
            remote.forward(name, text, origin);
        }
        delivered
    }

    fn deliver(
        &self,
        event: &Event,
        name: &str,
        origin: &Origin,
        targets: &[Target],
        full_text: &mut Option<Utf8Bytes>,
    ) -> usize {
        let mut stripped_text: Option<Utf8Bytes> = None;
        let mut shared: Option<Arc<Event>> = None;
        let (mut delivered, mut dropped) = (0usize, 0u64);
        for target in targets.iter() {
            match target {
                Target::Socket(subscriber) => {
                    let text = if subscriber.strip {
                        stripped_text.get_or_insert_with(|| {
                            event.to_json_with_name(names::strip_scope(name)).into()
                        })
                    } else {
                        &*full_text.get_or_insert_with(|| event.to_json_with_name(name).into())
                    };
                    match subscriber.tx.try_send(text.clone()) {
                        Ok(()) => delivered += 1,
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            dropped += 1;
                            if subscriber.close(CloseReason::SlowConsumer) {
                                self.inner.metrics.slow_consumer_disconnects.increment(1);
                            }
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => {}
                    }
                }
                Target::Logout(subscriber) => {
                    subscriber.close(CloseReason::Logout);
                }
                Target::Channel(tx) => {
                    let event = shared.get_or_insert_with(|| Arc::new(event.clone()));
                    match tx.try_send(event.clone()) {
                        Ok(()) => delivered += 1,
                        Err(mpsc::error::TrySendError::Full(_)) => dropped += 1,
                        Err(mpsc::error::TrySendError::Closed(_)) => {}
                    }
                }
                Target::Replies => {
                    if self.deliver_reply(event, origin) {
                        delivered += 1;
                    }
                }
            }
        }
        self.inner
            .metrics
            .events_delivered
            .increment(delivered as u64);
        if dropped > 0 {
            self.inner.metrics.events_dropped.increment(dropped);
        }
        delivered
    }

    fn deliver_reply(&self, event: &Event, origin: &Origin) -> bool {
        let Some(key) = event.reply_key() else {
            return false;
        };
        let calls = self
            .inner
            .calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match calls.get(key) {
            Some(call) if origin.may_answer(call.addressee) => {
                call.tx.try_send(event.clone()).is_ok()
            }
            Some(_) => {
                self.inner.metrics.replies_rejected.increment(1);
                false
            }
            None => false,
        }
    }

    /// The id of the newest socket subscribed to `name` (ids grow), 0 when there is none.
    fn newest_socket(&self, name: &str) -> u64 {
        let topics = self
            .inner
            .topics
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        topics
            .get(name)
            .into_iter()
            .flat_map(|targets| targets.iter())
            .filter_map(|target| match target {
                Target::Socket(subscriber) => Some(subscriber.id),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// The name this node's calls ask replies to be sent to.
    pub fn reply_name(&self) -> &str {
        &self.inner.reply_name
    }

    /// Sends a request and waits for its reply: the event gets a fresh id, `replyTo` and
    /// `timeoutMillis`. A progress reply (`transitioning: yes`) is passed to `on_progress` and
    /// extends the deadline by another `timeout`; an error reply fails the call
    /// ([`CallError::Permanent`] when the reply marks it permanent).
    pub async fn call(
        &self,
        request: Event,
        timeout: Duration,
        on_progress: impl FnMut(&Event),
    ) -> Result<Event, CallError> {
        self.call_with_id(
            uuid::Uuid::new_v4().to_string(),
            request,
            timeout,
            on_progress,
        )
        .await
    }

    /// [`Hub::call`] with the request id the caller chose (a fresh, unguessable one), for a
    /// caller that sends the addressee more events about the call (a log stream's acks).
    pub async fn call_with_id(
        &self,
        request_id: String,
        mut request: Event,
        timeout: Duration,
        mut on_progress: impl FnMut(&Event),
    ) -> Result<Event, CallError> {
        request.id = Some(request_id.clone());
        request.reply_to = Some(self.inner.reply_name.clone());
        request.timeout_millis = Some(timeout.as_millis() as i64);
        request
            .time
            .get_or_insert_with(drover_proto::event::now_millis);
        let (tx, mut rx) = mpsc::channel(16);
        let resend = Arc::new(Notify::new());
        self.inner
            .calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(
                request_id.clone(),
                PendingCall {
                    addressee: names::scope(request.name()),
                    name: request.name().into(),
                    tx,
                    resend: resend.clone(),
                },
            );
        let _guard = CallGuard {
            hub: self,
            request_id: &request_id,
        };
        // Armed before the first send, so a subscription racing it is not missed.
        let mut subscribed = std::pin::pin!(self.inner.subscribed.notified());
        subscribed.as_mut().enable();
        let mut newest = self.newest_socket(request.name());
        self.publish(&request);
        let mut deadline = tokio::time::Instant::now() + timeout;
        loop {
            tokio::select! {
                () = &mut subscribed => {
                    subscribed.set(self.inner.subscribed.notified());
                    subscribed.as_mut().enable();
                    // A socket that subscribed to the name since the last send (the agent came
                    // back) gets the request again; the first copy may be in a dead socket or
                    // nowhere. Agents' handlers are idempotent, so a second copy is harmless.
                    let now = self.newest_socket(request.name());
                    if now > newest {
                        newest = now;
                        self.publish(&request);
                        self.inner.metrics.requests_resent.increment(1);
                    }
                }
                () = resend.notified() => {
                    self.publish(&request);
                    self.inner.metrics.requests_resent.increment(1);
                }
                reply = rx.recv() => {
                    let Some(reply) = reply else { return Err(CallError::Shutdown) };
                    match reply.transitioning {
                        Some(Transitioning::Yes) => {
                            on_progress(&reply);
                            deadline = tokio::time::Instant::now() + timeout;
                        }
                        Some(Transitioning::Error) => {
                            let message = reply.transitioning_message.clone()
                                .or_else(|| reply.transitioning_internal_message.clone())
                                .unwrap_or_else(|| "the agent reported an error".to_owned());
                            return Err(if reply.is_permanent_error() {
                                CallError::Permanent(message)
                            } else {
                                CallError::ErrorReply(message)
                            });
                        }
                        Some(Transitioning::No) | None => return Ok(reply),
                    }
                }
                () = tokio::time::sleep_until(deadline) => return Err(CallError::Timeout(timeout)),
                () = self.inner.shutdown.cancelled() => return Err(CallError::Shutdown),
            }
        }
    }

    /// Closes every subscriber (server shutdown).
    pub fn close_all(&self) {
        let topics = self
            .inner
            .topics
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for target in topics.values().flat_map(|targets| targets.iter()) {
            if let Target::Socket(subscriber) | Target::Logout(subscriber) = target {
                subscriber.close(CloseReason::Shutdown);
            }
        }
    }

    /// The number of distinct subscribed names, for tests and diagnostics.
    pub fn topic_count(&self) -> usize {
        self.inner
            .topics
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }
}

struct CallGuard<'a> {
    hub: &'a Hub,
    request_id: &'a str,
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        self.hub
            .inner
            .calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(self.request_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> Hub {
        Hub::new(Metrics::new(), CancellationToken::new())
    }

    #[tokio::test]
    async fn routes_by_exact_name_and_strips_for_qualified_subscribers() {
        let hub = hub();
        let mut agent = hub.subscribe(
            vec!["compute.instance.activate;agent=5".into()],
            true,
            8,
            None,
        );
        let mut other = hub.subscribe(
            vec!["compute.instance.activate;agent=6".into()],
            true,
            8,
            None,
        );
        let mut raw = hub.subscribe(
            vec!["compute.instance.activate;agent=5".into()],
            false,
            8,
            None,
        );
        let event = Event::new("compute.instance.activate;agent=5");
        assert_eq!(hub.publish(&event), 2);
        let got: Event = serde_json::from_str(agent.rx.recv().await.unwrap().as_str()).unwrap();
        assert_eq!(got.name(), "compute.instance.activate");
        let got: Event = serde_json::from_str(raw.rx.recv().await.unwrap().as_str()).unwrap();
        assert_eq!(got.name(), "compute.instance.activate;agent=5");
        assert!(other.rx.try_recv().is_err());
        hub.unsubscribe(&agent);
        hub.unsubscribe(&raw);
        hub.unsubscribe(&other);
        assert_eq!(hub.topic_count(), 1, "only the node's reply name is left");
    }

    #[tokio::test]
    async fn a_full_queue_disconnects_the_slow_subscriber_only() {
        let hub = hub();
        let slow = hub.subscribe(vec!["x".into()], false, 2, None);
        let mut fast = hub.subscribe(vec!["x".into()], false, 16, None);
        for _ in 0..3 {
            hub.publish(&Event::new("x"));
            fast.rx.recv().await.unwrap();
        }
        assert_eq!(slow.subscriber.close_reason(), CloseReason::SlowConsumer);
        assert_eq!(fast.subscriber.close_reason(), CloseReason::Open);
        assert!(
            hub.inner
                .metrics
                .render()
                .contains("drover_slow_consumer_disconnects_total 1")
        );
    }

    #[tokio::test]
    async fn logout_closes_the_accounts_sockets() {
        let hub = hub();
        let sub = hub.subscribe(vec!["resource.change;account=3".into()], true, 4, Some(3));
        hub.publish(&Event::new("disconnect;account=3"));
        sub.subscriber.closed().await;
        assert_eq!(sub.subscriber.close_reason(), CloseReason::Logout);
    }

    #[tokio::test]
    async fn calls_complete_on_previous_ids_and_fail_on_error_replies() {
        let hub = hub();
        let mut agent_in = hub.listen(&["ping;agent=1"], 8);
        let responder = {
            let hub = hub.clone();
            tokio::spawn(async move {
                let request = agent_in.recv().await.unwrap();
                let mut progress = request.reply().unwrap();
                progress.transitioning = Some(Transitioning::Yes);
                progress.transitioning_progress = Some(50);
                hub.publish(&progress);
                // A reply to some other request is not this call's.
                let mut stray = request.reply().unwrap();
                stray.previous_ids = vec!["someone-else".into()];
                hub.publish(&stray);
                hub.publish(&request.reply().unwrap());
                let second = agent_in.recv().await.unwrap();
                let mut error = second.reply().unwrap();
                error.transitioning = Some(Transitioning::Error);
                error.transitioning_message = Some("disk full".into());
                hub.publish(&error);
                let third = agent_in.recv().await.unwrap();
                hub.publish(
                    &third
                        .reply()
                        .unwrap()
                        .into_error("no such executable", true),
                );
            })
        };
        let mut progress_seen = 0;
        let reply = hub
            .call(Event::new("ping;agent=1"), Duration::from_secs(5), |_| {
                progress_seen += 1
            })
            .await
            .unwrap();
        assert_eq!(progress_seen, 1);
        assert_eq!(reply.transitioning, None);
        let error = hub
            .call(Event::new("ping;agent=1"), Duration::from_secs(5), |_| {})
            .await
            .unwrap_err();
        assert_eq!(error, CallError::ErrorReply("disk full".into()));
        let permanent = hub
            .call(Event::new("ping;agent=1"), Duration::from_secs(5), |_| {})
            .await
            .unwrap_err();
        assert_eq!(permanent, CallError::Permanent("no such executable".into()));
        responder.await.unwrap();
        let timeout = hub
            .call(Event::new("nobody"), Duration::from_millis(20), |_| {})
            .await
            .unwrap_err();
        assert_eq!(timeout, CallError::Timeout(Duration::from_millis(20)));
        assert!(hub.inner.calls.lock().unwrap().is_empty());
    }

    fn agent_origin(agent: i64, project: i64) -> Origin {
        Origin {
            scope: Qualifier::Agent(agent),
            agent: Some(agent),
            project: Some(project),
        }
    }

    #[tokio::test]
    async fn only_the_addressee_or_a_privileged_key_completes_a_call() {
        let hub = hub();
        let mut agent_in = hub.listen(&["compute.instance.activate;agent=1"], 8);
        let responder = {
            let hub = hub.clone();
            tokio::spawn(async move {
                let request = agent_in.recv().await.unwrap();
                let mut forged = request.reply().unwrap();
                forged.data = Some(serde_json::json!({"externalId": "stolen"}));
                // Another agent of the same project, a project key, another project's agent.
                assert_eq!(hub.publish_from(&forged, &agent_origin(2, 1)), 0);
                let project = Origin {
                    scope: Qualifier::Account(1),
                    agent: None,
                    project: Some(1),
                };
                assert_eq!(hub.publish_from(&forged, &project), 0);
                assert_eq!(hub.publish_from(&forged, &agent_origin(7, 9)), 0);
                // A forged suffix on the reply name changes nothing.
                let mut suffixed = forged.clone();
                suffixed.name = Some(format!("{};agent=1", forged.name()));
                assert_eq!(hub.publish_from(&suffixed, &agent_origin(2, 1)), 0);
                let mut genuine = request.reply().unwrap();
                genuine.data = Some(serde_json::json!({"externalId": "mine"}));
                assert_eq!(hub.publish_from(&genuine, &agent_origin(1, 1)), 1);
                request
            })
        };
        let reply = hub
            .call(
                Event::new("compute.instance.activate;agent=1"),
                Duration::from_secs(5),
                |_| {},
            )
            .await
            .unwrap();
        responder.await.unwrap();
        assert_eq!(reply.data, Some(serde_json::json!({"externalId": "mine"})));
        assert!(
            hub.inner
                .metrics
                .render()
                .contains("drover_replies_rejected_total 4"),
            "{}",
            hub.inner.metrics.render()
        );
        // An admin or service key may answer any call.
        let mut agent_in = hub.listen(&["ping;agent=3"], 8);
        let admin = {
            let hub = hub.clone();
            tokio::spawn(async move {
                let request = agent_in.recv().await.unwrap();
                hub.publish_from(&request.reply().unwrap(), &Origin::PRIVILEGED)
            })
        };
        hub.call(Event::new("ping;agent=3"), Duration::from_secs(5), |_| {})
            .await
            .unwrap();
        assert_eq!(admin.await.unwrap(), 1);
    }

    fn project_origin(project: i64) -> Origin {
        Origin {
            scope: Qualifier::Account(project),
            agent: None,
            project: Some(project),
        }
    }

    #[tokio::test]
    async fn handler_calls_are_delivered_with_the_handler_and_answered_in_scope() {
        let hub = hub();
        let scoped = names::for_handler("instance.start", "x", Some(1));
        // A project key's subscription, as ws.rs makes it, and another project's.
        let mut mine = hub.subscribe(
            vec![Qualifier::Account(1).qualify("instance.start;handler=x")],
            true,
            8,
            None,
        );
        let mut theirs = hub.subscribe(
            vec![Qualifier::Account(2).qualify("instance.start;handler=x")],
            true,
            8,
            None,
        );
        let responder = {
            let hub = hub.clone();
            tokio::spawn(async move {
                let text = mine.rx.recv().await.unwrap();
                let request: Event = serde_json::from_str(text.as_str()).unwrap();
                assert_eq!(request.name(), "instance.start;handler=x");
                // Project 1's host agent, project 2's key: not the addressee.
                let reply = request.reply().unwrap();
                assert_eq!(hub.publish_from(&reply, &agent_origin(5, 1)), 0);
                assert_eq!(hub.publish_from(&reply, &project_origin(2)), 0);
                assert_eq!(hub.publish_from(&reply, &project_origin(1)), 1);
                mine
            })
        };
        hub.call(Event::new(&scoped), Duration::from_secs(5), |_| {})
            .await
            .unwrap();
        let _mine = responder.await.unwrap();
        assert!(
            theirs.rx.try_recv().is_err(),
            "project 2 saw project 1's call"
        );
        // A raw handler call: only admin and service keys answer it.
        let mut admin = hub.subscribe(vec!["instance.stop;handler=x".into()], false, 8, None);
        let responder = {
            let hub = hub.clone();
            tokio::spawn(async move {
                let text = admin.rx.recv().await.unwrap();
                let request: Event = serde_json::from_str(text.as_str()).unwrap();
                assert_eq!(request.name(), "instance.stop;handler=x");
                let reply = request.reply().unwrap();
                assert_eq!(hub.publish_from(&reply, &project_origin(1)), 0);
                assert_eq!(hub.publish_from(&reply, &Origin::PRIVILEGED), 1);
            })
        };
        hub.call(
            Event::new(names::for_handler("instance.stop", "x", None)),
            Duration::from_secs(5),
            |_| {},
        )
        .await
        .unwrap();
        responder.await.unwrap();
        assert!(
            hub.inner
                .metrics
                .render()
                .contains("drover_replies_rejected_total 3")
        );
    }

    #[tokio::test]
    async fn a_client_publishes_in_its_own_scope_only() {
        let hub = hub();
        let mut own = hub.subscribe(vec!["reply.x;account=1".into()], true, 8, None);
        let mut other = hub.subscribe(vec!["reply.x;account=9".into()], true, 8, None);
        let mut raw = hub.subscribe(vec!["reply.x".into()], false, 8, None);
        let project = Origin {
            scope: Qualifier::Account(1),
            agent: None,
            project: Some(1),
        };
        let event = Event::new("reply.x;account=9");
        assert_eq!(hub.publish_from(&event, &project), 2);
        let got: Event = serde_json::from_str(own.rx.recv().await.unwrap().as_str()).unwrap();
        assert_eq!(got.name(), "reply.x");
        let got: Event = serde_json::from_str(raw.rx.recv().await.unwrap().as_str()).unwrap();
        assert_eq!(got.name(), "reply.x", "the forged suffix is not delivered");
        assert!(other.rx.try_recv().is_err());
        // A privileged publisher addresses any scope.
        assert_eq!(hub.publish(&event), 1);
        other.rx.recv().await.unwrap();
    }

    #[tokio::test]
    async fn a_request_is_sent_again_when_its_agent_subscribes() {
        let hub = hub();
        let call = {
            let hub = hub.clone();
            tokio::spawn(async move {
                hub.call(Event::new("ping;agent=4"), Duration::from_secs(30), |_| {})
                    .await
            })
        };
        // Wait until the call is waiting (it reached nobody), then the agent subscribes.
        while hub.inner.calls.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        let mut agent = hub.subscribe(vec!["ping;agent=4".into()], true, 8, None);
        let text = tokio::time::timeout(Duration::from_secs(5), agent.rx.recv())
            .await
            .expect("the request is sent again at once, not after the reply timeout")
            .unwrap();
        let request: Event = serde_json::from_str(text.as_str()).unwrap();
        hub.publish_from(&request.reply().unwrap(), &agent_origin(4, 1));
        call.await.unwrap().unwrap();
        assert!(
            hub.inner
                .metrics
                .render()
                .contains("drover_requests_resent_total 1")
        );
    }
}
