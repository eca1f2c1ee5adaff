//! Fan-out and idle memory against a `drover server` child process.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::StreamExt;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::LoadArgs;
use crate::common::{self, ACCESS_KEY, EVENT_NAME, SECRET_KEY};
use crate::fleet::{Fleet, Member, PhaseResult, Publish};
use drover_bench::cluster::{NatsServer, NodeConfig, Nodes, wait_alive};
use drover_bench::harness::PgDatabase;

/// Per-socket timeouts for the handshake and the first `ping`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// `fanout` options.
#[derive(Debug, Clone, clap::Args)]
pub struct FanoutArgs {
    /// Subscriber WebSockets.
    #[arg(long)]
    pub subscribers: usize,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Set the server's per-socket queue (DROVER_SUBSCRIBE_MAX_QUEUED_MESSAGES); server
    /// default (1000) when unset.
    #[arg(long)]
    pub server_queue: Option<u64>,
    /// The drover binary (default: `drover` beside this binary).
    #[arg(long)]
    pub drover_bin: Option<PathBuf>,
    /// Record a `perf` profile of the server during the max-rate phase into this file.
    #[arg(long)]
    pub perf_record: Option<PathBuf>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Cluster mode (issue 14) for `fanout`.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// Nodes: more than 1 starts a cluster (`drover server` nodes on a fresh PostgreSQL
    /// database and the bench's own nats-server); the subscribers are spread over the nodes
    /// round-robin and every event is published on the first node. 1: one server on SQLite,
    /// unless `--cluster`.
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// Cluster mode even with `--nodes 1` (PostgreSQL and NATS), to compare with the same
    /// node alone.
    #[arg(long)]
    pub cluster: bool,
    /// The PostgreSQL server of a cluster (a database `drover_fanout_<pid>` is created on it
    /// and dropped after the run).
    #[arg(
        long,
        env = "DROVER_TEST_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
    /// The nats-server binary of a cluster (the bench starts its own, with JetStream).
    #[arg(long = "cluster-nats-bin", default_value = "/usr/sbin/nats-server")]
    pub nats_bin: PathBuf,
}

impl Default for ClusterArgs {
    fn default() -> ClusterArgs {
        ClusterArgs {
            nodes: 1,
            cluster: false,
            database_url: "postgres://postgres@127.0.0.1:5432/postgres".into(),
            nats_bin: "/usr/sbin/nats-server".into(),
        }
    }
}

impl ClusterArgs {
    /// Whether the run starts a cluster.
    pub fn enabled(&self) -> bool {
        self.nodes > 1 || self.cluster
    }
}

/// `idle-memory` options.
#[derive(Debug, Clone, clap::Args)]
pub struct IdleArgs {
    /// Idle subscriber WebSockets to open.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Seconds to wait after the last first `ping` before reading the server's memory.
    #[arg(long, default_value_t = 3.0)]
    pub settle_seconds: f64,
    /// Subscribe handshakes in flight at once.
    #[arg(long, default_value_t = 128)]
    pub connect_concurrency: usize,
    /// The drover binary (default: `drover` beside this binary).
    #[arg(long)]
    pub drover_bin: Option<PathBuf>,
}

/// The fan-out figures of one drover run.
#[derive(Debug, Clone)]
pub struct FanoutResult {
    /// Subscribers.
    pub subscribers: usize,
    /// Nodes, when the server was a cluster.
    pub nodes: Option<usize>,
    /// Max-rate phase, then the paced phase.
    pub phases: Vec<PhaseResult>,
}

/// Publishes through `POST /v1/publish` on keep-alive HTTP/1.1 connections.
#[derive(Debug, Clone)]
struct HttpPublisher {
    http: reqwest::Client,
    url: Arc<str>,
    authorization: Arc<str>,
}

impl Publish for HttpPublisher {
    async fn publish(&self, body: String) -> Result<bool> {
        let response = self
            .http
            .post(&*self.url)
            .header(reqwest::header::AUTHORIZATION, &*self.authorization)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await?;
        let status = response.status();
        let body = response.bytes().await?;
        if status.as_u16() != 201 {
            return Err(anyhow!(
                "publish answered {status}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        Ok(true)
    }
}

fn api_client(url: &str) -> Result<drover_client::Client> {
    Ok(drover_client::Client::new(url, ACCESS_KEY, SECRET_KEY)?)
}

/// Opens `n` subscriber WebSockets on `bench.event`, spread round-robin over the servers at
/// `urls`, and waits until each got its first `ping`.
pub async fn open_fleet(
    urls: &[String],
    n: usize,
    samples: usize,
    concurrency: usize,
    epoch: Instant,
) -> Result<Fleet> {
    let mut subscribe_urls = Vec::with_capacity(urls.len());
    let mut authorization = None;
    for url in urls {
        let client = api_client(url)?;
        subscribe_urls.push(client.subscribe_url(&drover_client::Subscribe::names([EVENT_NAME])));
        authorization = Some(HeaderValue::from_str(client.authorization())?);
    }
    let authorization = authorization.context("no server URL")?;
    let mut fleet = Fleet::new(n, epoch);
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    for (i, member) in fleet.members(samples).into_iter().enumerate() {
        let url = subscribe_urls[i % subscribe_urls.len()].clone();
        let (authorization, permits) = (authorization.clone(), permits.clone());
        fleet
            .tasks
            .spawn(subscriber(url, authorization, permits, member));
    }
    let took = fleet.wait_ready("drover").await?;
    println!(
        "  {n} subscribers connected and pinged in {:.1} s",
        took.as_secs_f64()
    );
    Ok(fleet)
}

async fn subscriber(
    url: String,
    authorization: HeaderValue,
    permits: Arc<Semaphore>,
    mut member: Member,
) {
    let connected = async {
        let _permit = permits.acquire_owned().await?;
        let mut request = url.into_client_request()?;
        request.headers_mut().insert(AUTHORIZATION, authorization);
        let config = WebSocketConfig::default().read_buffer_size(8 * 1024);
        let connect = tokio_tungstenite::connect_async_with_config(request, Some(config), true);
        let (mut socket, _) = tokio::time::timeout(HANDSHAKE_TIMEOUT, connect)
            .await
            .context("handshake timed out")??;
        // The server sends the first `ping` at once, after the subscription is in the hub.
        loop {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, socket.next())
                .await
                .context("no first ping")?
            {
                Some(Ok(Message::Text(_))) => break,
                Some(Ok(Message::Close(frame))) => bail!("closed before the first ping: {frame:?}"),
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error.into()),
                None => bail!("closed before the first ping"),
            }
        }
        anyhow::Ok(socket)
    }
    .await;
    let mut socket = match connected {
        Ok(socket) => socket,
        Err(error) => {
            member.failed(format!("{error:#}"));
            return;
        }
    };
    member.ready();
    while let Some(message) = socket.next().await {
        match message {
            Ok(Message::Text(text)) => member.on_frame(text.as_str().as_bytes()),
            Ok(Message::Close(frame)) => {
                member.closed(format!("close frame {frame:?}"));
                return;
            }
            Ok(_) => {}
            Err(error) => {
                member.closed(error);
                return;
            }
        }
    }
    member.closed("socket ended");
}

/// `fanout`: the max-rate and half-rate phases for `subscribers` WebSockets.
pub async fn fanout(args: &FanoutArgs) -> Result<FanoutResult> {
    let bin = common::drover_bin(args.drover_bin.as_deref())?;
    let load = &args.load;
    println!(
        "drover fan-out: {} subscribers, {} B padding, {} s per phase, {} publish connections",
        args.subscribers, load.payload_bytes, load.seconds, load.publishers
    );
    match args.server_queue {
        Some(queue) => println!(
            "  server queue per socket raised: DROVER_SUBSCRIBE_MAX_QUEUED_MESSAGES={queue}"
        ),
        None => println!("  server queue per socket: the default (1000 events)"),
    }
    if args.cluster.enabled() {
        return fanout_cluster(&bin, args).await;
    }
    let server = common::start_drover(&bin, args.server_queue).await?;
    println!("  server pid {} on {}", server.pid, server.addr);
    let result = fanout_on(&[server.http_url()], &[server.pid], args).await;
    server.stop(None).await;
    result
}

/// `fanout` against a cluster: `--nodes` nodes on a fresh database and the bench's own
/// nats-server; the server's CPU is the nodes' and nats-server's together.
async fn fanout_cluster(bin: &std::path::Path, args: &FanoutArgs) -> Result<FanoutResult> {
    let cluster = &args.cluster;
    let database = PgDatabase::create(&cluster.database_url, "drover_fanout")?;
    let nats = NatsServer::start(&cluster.nats_bin).await?;
    let root = tempfile::Builder::new()
        .prefix("drover-bench-cluster-")
        .tempdir()?;
    let mut env = Vec::new();
    if let Some(queue) = args.server_queue {
        env.push((
            "DROVER_SUBSCRIBE_MAX_QUEUED_MESSAGES".to_owned(),
            queue.to_string(),
        ));
    }
    let config = NodeConfig {
        bin: bin.to_owned(),
        root: root.path().to_owned(),
        database_url: Some(database.url.clone()),
        nats_url: Some(nats.url()),
        env,
        log: "warn".into(),
        threads: common::server_threads(),
    };
    let mut nodes = Nodes::new(config, cluster.nodes)?;
    let result = async {
        nodes.start_all().await?;
        let names: Vec<String> = nodes.slots.iter().map(|s| s.name.clone()).collect();
        wait_alive(&nodes.url(0), &names, Duration::from_secs(60)).await?;
        println!(
            "  cluster: {} nodes (pids {:?}) on {}, nats-server pid {:?} on {}; subscribers round-robin over the nodes, publishing on {}",
            nodes.len(),
            nodes.pids(),
            database.name,
            nats.pid,
            nats.url(),
            nodes.url(0)
        );
        let mut pids = nodes.pids();
        pids.extend(nats.pid);
        let mut result = fanout_on(&nodes.urls(), &pids, args).await?;
        for slot in &nodes.slots {
            if let Some(pid) = slot.pid {
                println!(
                    "  {} RSS: {} MiB",
                    slot.name,
                    common::rss_kib(pid).unwrap_or(0) / 1024
                );
            }
        }
        if let Some(pid) = nats.pid {
            println!(
                "  nats-server RSS: {} MiB",
                common::rss_kib(pid).unwrap_or(0) / 1024
            );
        }
        for i in 0..nodes.len() {
            let url = nodes.url(i);
            println!(
                "  {}: drover_cluster_remote_published_total {}, drover_cluster_remote_received_total {}",
                nodes.slots[i].name,
                common::metric(&url, "drover_cluster_remote_published_total")
                    .await
                    .map_or_else(|| "?".into(), |v| v.to_string()),
                common::metric(&url, "drover_cluster_remote_received_total")
                    .await
                    .map_or_else(|| "?".into(), |v| v.to_string()),
            );
        }
        result.nodes = Some(nodes.len());
        anyhow::Ok(result)
    }
    .await;
    if result.is_err() {
        for i in 0..nodes.len() {
            eprintln!(
                "{} log tail:\n{}",
                nodes.slots[i].name,
                nodes.log_tail(i, 15)
            );
        }
    }
    nodes.kill_all().await;
    drop(nats);
    drop(database);
    result
}

async fn fanout_on(urls: &[String], pids: &[u32], args: &FanoutArgs) -> Result<FanoutResult> {
    let load = &args.load;
    let epoch = Instant::now();
    let fleet = open_fleet(
        urls,
        args.subscribers,
        load.latency_samples,
        load.connect_concurrency,
        epoch,
    )
    .await?;
    let client = api_client(&urls[0])?;
    let http = reqwest::Client::builder()
        .http1_only()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(load.publishers)
        .timeout(Duration::from_secs(30))
        .build()?;
    let publisher = HttpPublisher {
        http,
        url: format!("{}/publish", client.base_url()).into(),
        authorization: client.authorization().into(),
    };
    let pad: Arc<str> = common::padding(load.payload_bytes).into();
    let sample = common::event_json(epoch, &pad);
    println!("  event frame: {} bytes", sample.len());
    let perf = common::start_perf(args.perf_record.as_deref(), pids[0], load.seconds);
    let phases = crate::fleet::run_phases(
        &fleet,
        publisher,
        load.limits(
            args.subscribers,
            Some(args.server_queue.unwrap_or(1000) / 2),
        ),
        load.rate,
        !load.no_latency_run,
        pad,
        pids,
    )
    .await;
    common::wait_perf(perf, args.perf_record.as_deref(), "").await;
    let phases = phases?;
    println!(
        "  server RSS with {} subscribers: {} MiB",
        args.subscribers,
        pids.iter()
            .map(|pid| common::rss_kib(*pid).unwrap_or(0))
            .sum::<u64>()
            / 1024
    );
    drop(fleet);
    Ok(FanoutResult {
        subscribers: args.subscribers,
        nodes: None,
        phases,
    })
}

/// The idle-memory figures.
#[derive(Debug, Clone, Copy)]
pub struct IdleResult {
    /// Connections opened.
    pub connections: usize,
    /// Server RSS before, KiB.
    pub before_kib: u64,
    /// Server RSS after, KiB.
    pub after_kib: u64,
}

impl IdleResult {
    /// KiB per connection.
    pub fn per_connection_kib(&self) -> f64 {
        self.after_kib.saturating_sub(self.before_kib) as f64 / self.connections.max(1) as f64
    }
}

/// `idle-memory`: server RSS before and after `connections` idle subscribers.
pub async fn idle_memory(args: &IdleArgs) -> Result<IdleResult> {
    let bin = common::drover_bin(args.drover_bin.as_deref())?;
    println!("drover idle memory: {} connections", args.connections);
    let server = common::start_drover(&bin, None).await?;
    let result = async {
        // One authenticated request first, so the key cache and the HTTP stack are warm in
        // both readings.
        api_client(&server.http_url())?.get("").await?;
        common::wait_quiet().await;
        let before_kib = common::rss_kib(server.pid)?;
        let fleet = open_fleet(
            &[server.http_url()],
            args.connections,
            0,
            args.connect_concurrency,
            Instant::now(),
        )
        .await?;
        tokio::time::sleep(Duration::from_secs_f64(args.settle_seconds)).await;
        let after_kib = common::rss_kib(server.pid)?;
        let (closed, _) = fleet.closed();
        if closed > 0 {
            bail!("{closed} idle subscriptions closed before the reading");
        }
        drop(fleet);
        let result = IdleResult {
            connections: args.connections,
            before_kib,
            after_kib,
        };
        println!(
            "  server VmRSS {} KiB before, {} KiB after: {:.1} KiB per idle subscriber",
            before_kib,
            after_kib,
            result.per_connection_kib()
        );
        Ok(result)
    }
    .await;
    server.stop(None).await;
    result
}
