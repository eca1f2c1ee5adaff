//! More than one server: nodes on one PostgreSQL, delivery across nodes on NATS.
//!
//! # Design
//! - PostgreSQL holds the truth. Every node has a `cluster_node` row with a lease it renews
//!   every `cluster.heartbeat.millis`; a node whose lease (`cluster.node.ttl.millis`) ran out is
//!   dead. Every heartbeat also *sweeps*: dead nodes' process leases, duties and agent sessions
//!   are released in one transaction, so live nodes claim their processes at once
//!   (`drover_store::Store::sweep_dead_nodes`).
//! - Fencing: process writes are fenced by node and attempt (`execution_count`) in the store;
//!   once-per-cluster tasks run under the `leader` duty, and each run is recorded only while the
//!   duty is held by this node at this epoch (`Store::begin_task_run`), checked again locally
//!   against a monotonic deadline ([`Cluster::is_leader`]) before the results are written. A
//!   node that finds its lease gone (paused, cut off) joins again with a new epoch.
//! - NATS only carries deliveries and hints, never the truth: a lost message may delay work
//!   but never loses it. Each node subscribes to the subject of every exact name its local
//!   targets want (first local target subscribes, last one unsubscribes), forwards what it
//!   routes to those subjects, and delivers what it receives to its local targets only
//!   (`no_echo`: a node never receives its own messages). Replies travel to the caller's reply
//!   name the same way; the publisher's [`Origin`] rides along in a header, so the caller's
//!   node checks who answered as for a local reply. When a socket subscribes, the other nodes
//!   are told, and calls waiting on those names send their request again; after NATS
//!   reconnects every pending call is sent again.
//! - Subjects are `drover.<cluster id>.e.<name>` (`.` in names becomes `:`, `*` becomes `%`),
//!   the cluster id being stored in the database, so clusters on other databases sharing a NATS
//!   never meet.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use drover_proto::Event;
use drover_proto::event::now_millis;
use drover_proto::names::Qualifier;
use drover_store::{Backend, LEADER_DUTY, NodeInfo, Store};
use futures_util::StreamExt;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::hub::{Hub, Origin, Remote};
use crate::settings::Settings;

/// Messages waiting to be handed to NATS; more are dropped and counted.
const OUTGOING_QUEUE: usize = 65_536;
/// Bytes of payload waiting to be handed to NATS; more are dropped and counted.
const OUTGOING_BYTES: usize = 64 << 20;
/// The header that carries the publisher's origin.
const ORIGIN_HEADER: &str = "Drover-Origin";

/// How a server takes part in a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// `nats://…`: cluster mode. `None`: the server runs alone.
    pub nats_url: Option<String>,
    /// The node's stable name (restarts of the same server reuse it).
    pub node_name: String,
    /// Where clients reach this node.
    pub address: String,
}

/// Counters of the cluster, rendered in `/metrics`.
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Live nodes at the last heartbeat.
    pub peers: AtomicI64,
    /// Dead nodes whose work this node released.
    pub takeovers: AtomicU64,
    /// Times this node found its lease gone and joined again.
    pub rejoins: AtomicU64,
    /// Events handed to NATS.
    pub published: AtomicU64,
    /// Events received from NATS and delivered here.
    pub received: AtomicU64,
    /// Events not forwarded because the outgoing queue was full.
    pub dropped: AtomicU64,
    /// Whether NATS is connected (always false without NATS).
    pub nats_connected: AtomicBool,
    /// Whether the last heartbeat reached the database.
    pub database_ok: AtomicBool,
}

/// This node's membership.
#[derive(Debug)]
pub struct Cluster {
    store: Store,
    info: NodeInfo,
    epoch: AtomicI64,
    origin: Instant,
    /// Monotonic milliseconds (since `origin`) until which the node and leader leases hold.
    node_until: AtomicU64,
    leader_until: AtomicU64,
    leader: watch::Sender<bool>,
    /// The NATS link, in cluster mode.
    link: Option<Arc<Link>>,
    /// Counters.
    pub stats: Arc<ClusterStats>,
    /// Cancelled when this node must stop (its name was taken by another process).
    fatal: CancellationToken,
    /// Where `cluster.change` goes.
    hub: Hub,
}

/// `cluster.change`: membership or leadership changed (published raw, for admins: the web
/// UI's Cluster page refetches on it).
pub const CLUSTER_CHANGE: &str = "cluster.change";

/// Why a node could not join.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// Joining would split the cluster, or the configuration cannot form one.
    #[error("{0}")]
    Refused(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] drover_store::Error),
}

impl Cluster {
    /// Joins the cluster of `store`'s database as `node_id`; in cluster mode connects to NATS
    /// (retrying in the background if it is down) and links it to `hub`.
    pub async fn join(
        store: Store,
        options: &ClusterOptions,
        node_id: &str,
        hub: &Hub,
        settings: &Settings,
    ) -> Result<Arc<Cluster>, JoinError> {
        if options.nats_url.is_some() && store.backend() == Backend::Sqlite {
            return Err(JoinError::Refused(
                "--nats-url needs --database-url postgres://…: every node of a cluster shares \
                 one PostgreSQL database (SQLite is for a single server)"
                    .into(),
            ));
        }
        let info = NodeInfo {
            id: node_id.to_owned(),
            name: options.node_name.clone(),
            address: options.address.clone(),
            nats: options.nats_url.is_some(),
        };
        let ttl = settings.int("cluster.node.ttl.millis");
        let origin = Instant::now();
        let epoch = match store.node_join(&info, now_millis(), ttl, false).await {
            Ok(epoch) => epoch,
            Err(drover_store::Error::Conflict(message)) => return Err(JoinError::Refused(message)),
            Err(error) => return Err(error.into()),
        };
        let stats = Arc::new(ClusterStats::default());
        stats.database_ok.store(true, Relaxed);
        let link = match &options.nats_url {
            Some(url) => {
                let cluster_id = store.cluster_id().await?;
                Some(Link::connect(url, &cluster_id, hub.clone(), stats.clone()).await?)
            }
            None => None,
        };
        let cluster = Arc::new(Cluster {
            store,
            info,
            epoch: AtomicI64::new(epoch),
            origin,
            node_until: AtomicU64::new(ttl.max(0) as u64),
            leader_until: AtomicU64::new(0),
            leader: watch::Sender::new(false),
            link,
            stats,
            fatal: CancellationToken::new(),
            hub: hub.clone(),
        });
        if let Some(link) = &cluster.link {
            hub.set_remote(link.clone());
        }
        tracing::info!(node = %cluster.info.name, id = %cluster.info.id, epoch, cluster = cluster.link.is_some(), "joined");
        cluster.announce("joined");
        Ok(cluster)
    }

    /// This node's id: the holder name of its process leases.
    pub fn node_id(&self) -> &str {
        &self.info.id
    }

    /// This node's name.
    pub fn node_name(&self) -> &str {
        &self.info.name
    }

    /// The epoch of its current membership.
    pub fn epoch(&self) -> i64 {
        self.epoch.load(Relaxed)
    }

    /// Publishes `cluster.change` (to every node's admins).
    fn announce(&self, what: &str) {
        self.hub
            .publish(&Event::new(CLUSTER_CHANGE).with_data(serde_json::json!({
                "node": self.info.name,
                "id": self.info.id,
                "epoch": self.epoch(),
                "change": what,
            })));
    }

    fn mono_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// Whether this node holds the leader duty right now: the duty was renewed, and neither it
    /// nor the node's own lease has run out since, by this node's monotonic clock (which keeps
    /// counting while the process is stopped).
    pub fn is_leader(&self) -> bool {
        let now = self.mono_ms();
        *self.leader.borrow()
            && now < self.leader_until.load(Relaxed)
            && now < self.node_until.load(Relaxed)
    }

    /// Changes of leadership, for tasks that wait to become leader.
    pub fn leadership(&self) -> watch::Receiver<bool> {
        self.leader.subscribe()
    }

    /// Starts one run of a once-per-cluster task: `true` (and the run recorded in
    /// `cluster_task_run`) only when this node holds the leader duty, checked in the database.
    pub async fn begin_task(&self, task: &str) -> bool {
        if !self.is_leader() {
            return false;
        }
        match self
            .store
            .begin_task_run(task, LEADER_DUTY, &self.info.id, self.epoch(), now_millis())
            .await
        {
            Ok(true) => true,
            Ok(false) => {
                self.leader.send_replace(false);
                false
            }
            Err(error) => {
                tracing::warn!(%error, task, "recording a task run failed; the run is skipped");
                false
            }
        }
    }

    /// Sets what this node does with the other nodes' hints (once).
    pub fn on_hints(&self, hook: HintHook) {
        if let Some(link) = &self.link {
            let _ = link.hook.set(hook);
        }
    }

    /// Tells the other nodes that stored settings changed.
    pub fn settings_changed(&self) {
        if let Some(link) = &self.link {
            link.hint(Hint::Settings);
        }
    }

    /// Tells the other nodes that external handlers changed.
    pub fn handlers_changed(&self) {
        if let Some(link) = &self.link {
            link.hint(Hint::Handlers);
        }
    }

    /// Tells the other nodes that an API key was removed or changed.
    pub fn key_changed(&self, access_key: &str) {
        if let Some(link) = &self.link {
            link.hint(Hint::Forget(access_key.to_owned()));
        }
    }

    /// Tells the leader that services changed here (all of them, when `ids` is empty).
    pub fn services_changed(&self, ids: Vec<i64>) {
        if let Some(link) = &self.link {
            link.hint(Hint::Services(ids));
        }
    }

    /// Resolves when the node must stop: another server took over its name.
    pub fn fatal(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.fatal.cancelled()
    }

    /// The node's health: `(healthy, body)` for `/healthz`.
    pub fn health(&self) -> (bool, serde_json::Value) {
        let database =
            self.stats.database_ok.load(Relaxed) && self.mono_ms() < self.node_until.load(Relaxed);
        let nats = match &self.link {
            None => "none",
            Some(_) if self.stats.nats_connected.load(Relaxed) => "connected",
            Some(_) => "disconnected",
        };
        let healthy = database && nats != "disconnected";
        (
            healthy,
            serde_json::json!({
                "node": self.info.name,
                "id": self.info.id,
                "epoch": self.epoch(),
                "database": if database { "ok" } else { "unreachable" },
                "nats": nats,
                "leader": self.is_leader(),
                "peers": self.stats.peers.load(Relaxed),
            }),
        )
    }

    /// Heartbeats, sweeps and leader duty until shutdown; then leaves the cluster.
    pub async fn run(
        self: Arc<Self>,
        settings: Settings,
        engine: drover_engine::EngineHandle,
        shutdown: CancellationToken,
    ) {
        // Ticks on a fixed period (not sleep + work), each bounded in time: a heartbeat that
        // cannot reach the database is given up and the next one tries again.
        let mut every = settings.uint("cluster.heartbeat.millis").max(10);
        let mut ticker = tokio::time::interval(Duration::from_millis(every));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = shutdown.cancelled() => break,
            }
            let ttl = settings.uint("cluster.node.ttl.millis");
            let bound = Duration::from_millis(ttl.saturating_sub(every).max(every));
            if tokio::time::timeout(bound, self.tick(&settings, &engine))
                .await
                .is_err()
            {
                self.stats.database_ok.store(false, Relaxed);
                tracing::warn!(?bound, "a cluster heartbeat took too long; trying again");
            }
            let now_every = settings.uint("cluster.heartbeat.millis").max(10);
            if now_every != every {
                every = now_every;
                ticker = tokio::time::interval(Duration::from_millis(every));
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                ticker.tick().await;
            }
        }
        self.leader.send_replace(false);
        match self.store.node_leave(&self.info.id, self.epoch()).await {
            Ok(()) => {
                // The others claim what this node released at once rather than at their poll.
                if let Some(link) = &self.link {
                    link.hint(Hint::Work);
                }
            }
            Err(error) => {
                tracing::warn!(%error, "leaving the cluster failed; the node's lease runs out instead")
            }
        }
    }

    async fn tick(&self, settings: &Settings, engine: &drover_engine::EngineHandle) {
        let ttl = settings.int("cluster.node.ttl.millis");
        let sent = self.mono_ms();
        let now = now_millis();
        match self
            .store
            .node_heartbeat(&self.info.id, self.epoch(), now, ttl)
            .await
        {
            Ok(true) => {
                self.node_until.store(sent + ttl as u64, Relaxed);
                self.stats.database_ok.store(true, Relaxed);
            }
            Ok(false) => {
                self.leader.send_replace(false);
                tracing::warn!(
                    node = %self.info.name,
                    epoch = self.epoch(),
                    "this node's lease ran out (paused or cut off): its work was taken over; joining again"
                );
                match self.store.node_join(&self.info, now, ttl, true).await {
                    Ok(epoch) => {
                        self.epoch.store(epoch, Relaxed);
                        self.node_until.store(sent + ttl as u64, Relaxed);
                        self.stats.rejoins.fetch_add(1, Relaxed);
                        self.stats.database_ok.store(true, Relaxed);
                        tracing::info!(epoch, "joined again");
                        self.announce("joined again");
                    }
                    Err(drover_store::Error::Conflict(message)) => {
                        tracing::error!(%message, "cannot join again; stopping");
                        self.fatal.cancel();
                        return;
                    }
                    Err(error) => {
                        self.stats.database_ok.store(false, Relaxed);
                        tracing::warn!(%error, "joining again failed");
                        return;
                    }
                }
            }
            Err(error) => {
                self.stats.database_ok.store(false, Relaxed);
                tracing::warn!(%error, "cluster heartbeat failed");
                if !self.is_leader() {
                    self.leader.send_replace(false);
                }
                return;
            }
        }
        match self
            .store
            .duty_acquire(LEADER_DUTY, &self.info.id, self.epoch(), now, ttl)
            .await
        {
            Ok(held) => {
                if held {
                    self.leader_until.store(sent + ttl as u64, Relaxed);
                }
                let was = *self.leader.borrow();
                if held != was {
                    tracing::info!(node = %self.info.name, leader = held, "leadership changed");
                    self.leader.send_replace(held);
                    self.announce(if held {
                        "became leader"
                    } else {
                        "left leadership"
                    });
                }
            }
            Err(error) => tracing::warn!(%error, "renewing the leader duty failed"),
        }
        match self.store.sweep_dead_nodes(now_millis()).await {
            Ok(dead) if !dead.is_empty() => {
                self.stats.takeovers.fetch_add(dead.len() as u64, Relaxed);
                tracing::warn!(nodes = ?dead, "nodes whose lease ran out are dead; their work is released");
                engine.wake();
                if let Some(link) = &self.link {
                    link.hint(Hint::Work);
                }
                self.announce("took over dead nodes");
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "sweeping dead nodes failed"),
        }
        if let Ok(peers) = self.store.live_nodes(now).await {
            self.stats.peers.store(peers, Relaxed);
        }
    }
}

/// A hint from another node.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "camelCase")]
pub enum Hint {
    /// Stored settings changed: reload them.
    Settings,
    /// An API key changed: drop it from the cache.
    Forget(String),
    /// Work was released or scheduled: look for ready processes.
    Work,
    /// External handlers changed: reload the active ones.
    Handlers,
    /// Sockets subscribed to these names: calls waiting on them send their request again.
    Subscribed(Vec<String>),
    /// These services (all, when empty) or their containers changed: the leader's service
    /// reconciler looks at them.
    Services(Vec<i64>),
}

enum Outgoing {
    Event {
        subject: String,
        origin: String,
        payload: Bytes,
    },
    Hint(Bytes),
}

/// The link to NATS: forwards what this node routes, subscribes to what its targets want.
pub struct Link {
    prefix: String,
    out: mpsc::Sender<Outgoing>,
    /// Payload bytes in `out`, bounded by [`OUTGOING_BYTES`].
    queued_bytes: Arc<std::sync::atomic::AtomicUsize>,
    interest: Mutex<HashSet<Box<str>>>,
    /// Names sockets here subscribed to, announced by the interest loop once their NATS
    /// subscriptions are on the wire (so a resent request finds them).
    announce: Mutex<HashSet<Box<str>>>,
    interest_changed: Notify,
    stats: Arc<ClusterStats>,
    hook: std::sync::OnceLock<HintHook>,
}

/// What a node does with the other nodes' hints.
pub type HintHook = Box<dyn Fn(Hint) + Send + Sync>;

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Outgoing")
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Link {
    async fn connect(
        url: &str,
        cluster_id: &str,
        hub: Hub,
        stats: Arc<ClusterStats>,
    ) -> Result<Arc<Link>, JoinError> {
        let (connection_tx, mut connection_rx) = mpsc::channel::<async_nats::Event>(64);
        let client = async_nats::ConnectOptions::new()
            .no_echo()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .name("drover")
            .event_callback(move |event| {
                let tx = connection_tx.clone();
                async move {
                    let _ = tx.try_send(event);
                }
            })
            .connect(url)
            .await
            .map_err(|error| JoinError::Refused(format!("NATS at {url}: {error}")))?;
        let (out_tx, out_rx) = mpsc::channel(OUTGOING_QUEUE);
        let link = Arc::new(Link {
            prefix: format!("drover.{cluster_id}."),
            out: out_tx,
            queued_bytes: Arc::default(),
            interest: Mutex::new(HashSet::new()),
            announce: Mutex::new(HashSet::new()),
            interest_changed: Notify::new(),
            stats: stats.clone(),
            hook: std::sync::OnceLock::new(),
        });
        stats.nats_connected.store(
            client.connection_state() == async_nats::connection::State::Connected,
            Relaxed,
        );
        tokio::spawn(publisher(
            client.clone(),
            out_rx,
            format!("drover.{cluster_id}.hint"),
            link.queued_bytes.clone(),
        ));
        tokio::spawn(interest_loop(link.clone(), client.clone(), hub.clone()));
        tokio::spawn(hint_loop(link.clone(), client.clone(), hub.clone()));
        {
            let stats = stats.clone();
            let hub = hub.clone();
            let client = client;
            tokio::spawn(async move {
                while let Some(event) = connection_rx.recv().await {
                    match event {
                        async_nats::Event::Connected => {
                            stats.nats_connected.store(true, Relaxed);
                            tracing::info!("NATS connected");
                            // Whatever was in flight while NATS was away may be lost: the
                            // pending calls send their requests again.
                            hub.resend_all();
                        }
                        async_nats::Event::Disconnected => {
                            stats.nats_connected.store(false, Relaxed);
                            tracing::warn!(
                                "NATS disconnected; deliveries to other nodes wait until it is back"
                            );
                        }
                        other => tracing::debug!(event = %other, "NATS"),
                    }
                }
                drop(client);
            });
        }
        Ok(link)
    }

    fn subject(&self, name: &str) -> String {
        let mut subject = String::with_capacity(self.prefix.len() + 2 + name.len());
        subject.push_str(&self.prefix);
        subject.push_str("e.");
        for c in name.chars() {
            subject.push(match c {
                '.' => ':',
                '*' => '%',
                c => c,
            });
        }
        subject
    }

    fn hint(&self, hint: Hint) {
        let payload = serde_json::to_vec(&hint).unwrap_or_default();
        if self.out.try_send(Outgoing::Hint(payload.into())).is_err() {
            self.stats.dropped.fetch_add(1, Relaxed);
        }
    }
}

impl Remote for Link {
    fn forward(&self, name: &str, text: Utf8Bytes, origin: &Origin) {
        // While NATS is away nothing piles up: pending calls are resent when it is back, and
        // events (like NATS's own) are not kept.
        let size = text.len();
        if !self.stats.nats_connected.load(Relaxed)
            || self.queued_bytes.load(Relaxed) + size > OUTGOING_BYTES
        {
            self.stats.dropped.fetch_add(1, Relaxed);
            return;
        }
        let outgoing = Outgoing::Event {
            subject: self.subject(name),
            origin: encode_origin(origin),
            payload: Bytes::from_owner(SharedText(text)),
        };
        self.queued_bytes.fetch_add(size, Relaxed);
        match self.out.try_send(outgoing) {
            Ok(()) => {
                self.stats.published.fetch_add(1, Relaxed);
            }
            Err(_) => {
                self.queued_bytes.fetch_sub(size, Relaxed);
                self.stats.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    fn interest(&self, names: &[Box<str>]) {
        if names.is_empty() {
            return;
        }
        self.interest
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .extend(names.iter().cloned());
        self.interest_changed.notify_one();
    }

    fn subscribed(&self, names: &[Box<str>]) {
        self.announce
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .extend(names.iter().cloned());
        self.interest_changed.notify_one();
    }
}

/// The serialized event, shared with the local sockets' queues (no copy for NATS).
struct SharedText(Utf8Bytes);

impl AsRef<[u8]> for SharedText {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// Hands queued messages to NATS.
async fn publisher(
    client: async_nats::Client,
    mut rx: mpsc::Receiver<Outgoing>,
    hint_subject: String,
    queued_bytes: Arc<std::sync::atomic::AtomicUsize>,
) {
    let mut batch = Vec::with_capacity(256);
    while rx.recv_many(&mut batch, 256).await > 0 {
        for outgoing in batch.drain(..) {
            let result = match outgoing {
                Outgoing::Event {
                    subject,
                    origin,
                    payload,
                } => {
                    queued_bytes.fetch_sub(payload.len(), Relaxed);
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert(ORIGIN_HEADER, origin.as_str());
                    client.publish_with_headers(subject, headers, payload).await
                }
                Outgoing::Hint(payload) => client.publish(hint_subject.clone(), payload).await,
            };
            if let Err(error) = result {
                tracing::debug!(%error, "publishing to NATS failed");
            }
        }
    }
}

/// Keeps one NATS subscription per name that local targets want.
async fn interest_loop(link: Arc<Link>, client: async_nats::Client, hub: Hub) {
    let mut subscribed: HashMap<Box<str>, CancellationToken> = HashMap::new();
    loop {
        link.interest_changed.notified().await;
        let changed: Vec<Box<str>> = link
            .interest
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .drain()
            .collect();
        for name in changed {
            let wanted = hub.has_targets(&name);
            match (wanted, subscribed.contains_key(&name)) {
                (true, false) => {
                    let subject = link.subject(&name);
                    match client.subscribe(subject).await {
                        Ok(subscriber) => {
                            let token = CancellationToken::new();
                            tokio::spawn(receive(
                                subscriber,
                                name.clone(),
                                hub.clone(),
                                link.stats.clone(),
                                token.clone(),
                            ));
                            subscribed.insert(name, token);
                        }
                        Err(error) => {
                            tracing::warn!(%error, %name, "subscribing on NATS failed; retrying");
                            link.interest(&[name]);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                (false, true) => {
                    if let Some(token) = subscribed.remove(&name) {
                        token.cancel();
                    }
                }
                _ => {}
            }
        }
        // The names sockets subscribed to, now that their subscriptions are sent (on the same
        // connection, so before this): calls waiting on them elsewhere send their requests again.
        let announce: Vec<String> = link
            .announce
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .drain()
            .map(String::from)
            .collect();
        if !announce.is_empty() {
            let payload = serde_json::to_vec(&Hint::Subscribed(announce)).unwrap_or_default();
            if let Err(error) = client
                .publish(format!("{}hint", link.prefix), payload.into())
                .await
            {
                tracing::debug!(%error, "announcing subscriptions failed");
            }
        }
    }
}

/// Delivers what NATS brings for `name` to this node's targets.
async fn receive(
    mut subscriber: async_nats::Subscriber,
    name: Box<str>,
    hub: Hub,
    stats: Arc<ClusterStats>,
    stop: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            biased;
            () = stop.cancelled() => {
                let _ = subscriber.unsubscribe().await;
                return;
            }
            message = subscriber.next() => message,
        };
        let Some(message) = message else { return };
        let origin = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(ORIGIN_HEADER))
            .and_then(|value| decode_origin(value.as_str()));
        let Some(origin) = origin else {
            tracing::debug!(%name, "a NATS message without a valid origin is ignored");
            continue;
        };
        match serde_json::from_slice::<Event>(&message.payload) {
            Ok(event) => {
                stats.received.fetch_add(1, Relaxed);
                hub.deliver_remote(&event, &name, &origin);
            }
            Err(error) => {
                tracing::debug!(%error, %name, "an unreadable event from NATS is ignored")
            }
        }
    }
}

/// Receives the other nodes' hints.
async fn hint_loop(link: Arc<Link>, client: async_nats::Client, hub: Hub) {
    let subject = format!("{}hint", link.prefix);
    let mut subscriber = loop {
        match client.subscribe(subject.clone()).await {
            Ok(subscriber) => break subscriber,
            Err(error) => {
                tracing::warn!(%error, "subscribing to cluster hints failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    while let Some(message) = subscriber.next().await {
        let Ok(hint) = serde_json::from_slice::<Hint>(&message.payload) else {
            continue;
        };
        match hint {
            Hint::Subscribed(names) => hub.remote_subscribed(&names),
            other => {
                if let Some(hook) = link.hook.get() {
                    hook(other);
                }
            }
        }
    }
}

/// `<scope>/<agent>/<project>`: scope `r` (raw), `a<id>` or `p<id>`; empty ids are none.
fn encode_origin(origin: &Origin) -> String {
    let id = |value: Option<i64>| value.map(|id| id.to_string()).unwrap_or_default();
    let scope = match origin.scope {
        Qualifier::Raw => "r".to_owned(),
        Qualifier::Agent(agent) => format!("a{agent}"),
        Qualifier::Account(account) => format!("p{account}"),
    };
    format!("{scope}/{}/{}", id(origin.agent), id(origin.project))
}

fn decode_origin(text: &str) -> Option<Origin> {
    let mut parts = text.split('/');
    let (scope, agent, project) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let id = |text: &str| -> Option<Option<i64>> {
        if text.is_empty() {
            Some(None)
        } else {
            text.parse().ok().map(Some)
        }
    };
    let scope = match scope.split_at_checked(1)? {
        ("r", "") => Qualifier::Raw,
        ("a", id) => Qualifier::Agent(id.parse().ok()?),
        ("p", id) => Qualifier::Account(id.parse().ok()?),
        _ => return None,
    };
    Some(Origin {
        scope,
        agent: id(agent)?,
        project: id(project)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_survive_the_header() {
        for origin in [
            Origin::PRIVILEGED,
            Origin {
                scope: Qualifier::Agent(7),
                agent: Some(7),
                project: Some(3),
            },
            Origin {
                scope: Qualifier::Account(3),
                agent: None,
                project: Some(3),
            },
        ] {
            assert_eq!(decode_origin(&encode_origin(&origin)), Some(origin));
        }
        assert_eq!(decode_origin("x1//2"), None);
        assert_eq!(decode_origin("a//"), None);
        assert_eq!(decode_origin("r/1"), None);
    }
}
