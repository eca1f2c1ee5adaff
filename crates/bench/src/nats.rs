//! The NATS baseline: the same fan-out shape against a `nats-server` child process.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use tokio::sync::Semaphore;

use crate::LoadArgs;
use crate::common::{self, EVENT_NAME, NatsChild};
use crate::fleet::{Fleet, Member, PhaseResult, Publish};

/// `nats` options.
#[derive(Debug, Clone, clap::Args)]
pub struct NatsArgs {
    /// Subscriber connections.
    #[arg(long)]
    pub subscribers: usize,
    #[command(flatten)]
    pub load: LoadArgs,
    /// The nats-server binary.
    #[arg(long, default_value = "/usr/sbin/nats-server")]
    pub nats_bin: PathBuf,
    /// Run drover's fan-out with the same settings first and report the ratio.
    #[arg(long)]
    pub with_drover: bool,
    /// The drover binary, for --with-drover.
    #[arg(long)]
    pub drover_bin: Option<PathBuf>,
}

/// The fan-out figures of one NATS run.
#[derive(Debug, Clone)]
pub struct NatsResult {
    /// Subscribers.
    pub subscribers: usize,
    /// Max-rate phase, then the paced phase.
    pub phases: Vec<PhaseResult>,
}

/// Publishes on one NATS connection.
#[derive(Debug, Clone)]
struct NatsPublisher {
    client: async_nats::Client,
}

impl Publish for NatsPublisher {
    async fn publish(&self, body: String) -> Result<bool> {
        self.client
            .publish(EVENT_NAME, bytes::Bytes::from(body))
            .await?;
        Ok(true)
    }
}

fn options() -> async_nats::ConnectOptions {
    async_nats::ConnectOptions::new()
        .read_buffer_capacity(8 * 1024)
        .connection_timeout(Duration::from_secs(30))
}

async fn subscriber(url: String, permits: Arc<Semaphore>, mut member: Member) {
    let connected = async {
        let _permit = permits.acquire_owned().await?;
        let client = options().connect(url.as_str()).await?;
        let subscription = client.subscribe(EVENT_NAME).await?;
        // A flush is a PING/PONG round trip: the server has the SUB when it returns.
        tokio::time::timeout(Duration::from_secs(60), client.flush())
            .await
            .context("flush timed out")??;
        anyhow::Ok((client, subscription))
    }
    .await;
    let (_client, mut subscription) = match connected {
        Ok(pair) => pair,
        Err(error) => {
            member.failed(format!("{error:#}"));
            return;
        }
    };
    member.ready();
    while let Some(message) = subscription.next().await {
        member.on_frame(&message.payload);
    }
    member.closed("subscription ended");
}

/// `nats`: the max-rate and half-rate phases for `subscribers` NATS connections.
pub async fn nats(args: &NatsArgs) -> Result<NatsResult> {
    let load = &args.load;
    println!(
        "NATS fan-out: {} subscribers, {} B padding, {} s per phase, {} publish tasks on one connection",
        args.subscribers, load.payload_bytes, load.seconds, load.nats_publishers
    );
    let server = common::start_nats(&args.nats_bin).await?;
    println!("  nats-server pid {} on {}", server.pid, server.addr);
    let result = nats_on(&server, args).await;
    server.stop().await;
    result
}

async fn nats_on(server: &NatsChild, args: &NatsArgs) -> Result<NatsResult> {
    let load = &args.load;
    let epoch = Instant::now();
    let url = format!("nats://{}", server.addr);
    let mut fleet = Fleet::new(args.subscribers, epoch);
    let permits = Arc::new(Semaphore::new(load.connect_concurrency.max(1)));
    for member in fleet.members(load.latency_samples) {
        fleet
            .tasks
            .spawn(subscriber(url.clone(), permits.clone(), member));
    }
    let took = fleet.wait_ready("NATS").await?;
    println!(
        "  {} subscribers connected and subscribed in {:.1} s",
        args.subscribers,
        took.as_secs_f64()
    );
    let client = options().connect(url.as_str()).await?;
    let pad: Arc<str> = common::padding(load.payload_bytes).into();
    println!(
        "  message payload: {} bytes (the JSON drover delivers)",
        common::event_json(epoch, &pad).len()
    );
    let mut limits = load.limits(args.subscribers, None);
    limits.publishers = load.nats_publishers;
    let phases = crate::fleet::run_phases(
        &fleet,
        NatsPublisher {
            client: client.clone(),
        },
        limits,
        load.rate,
        !load.no_latency_run,
        pad,
        &[server.pid],
    )
    .await?;
    println!(
        "  nats-server RSS with {} subscribers: {} MiB",
        args.subscribers,
        common::rss_kib(server.pid).unwrap_or(0) / 1024
    );
    drop(fleet);
    drop(client);
    Ok(NatsResult {
        subscribers: args.subscribers,
        phases,
    })
}

/// The max-rate deliveries/s of a run, if it had a max-rate phase.
pub fn max_rate(phases: &[PhaseResult]) -> Option<f64> {
    phases
        .iter()
        .find(|phase| matches!(phase.mode, crate::fleet::Mode::Max))
        .map(|phase| phase.deliveries_per_sec)
}
