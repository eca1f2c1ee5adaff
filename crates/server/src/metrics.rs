//! The server's metrics, rendered at `/metrics` in Prometheus text format.
//!
//! Each server owns its recorder (none is installed globally), so several servers in one test
//! process keep separate counts. Handles are registered once; the hot path only adds to atomics.
//!
//! Beside the recorder's series, `/metrics` renders (in the same text format):
//! - the engine's counters and duration histograms by process name
//!   ([`drover_engine::stats::ProcessStats`], atomics made per process definition), per node;
//! - gauges read from the store at scrape time, cluster-wide: unended processes by phase, the
//!   oldest one's age, agents and hosts by state (one read per second at most, whatever the
//!   scrape rate);
//! - HTTP request durations by route template and status class ([`HttpStats`], filled by
//!   [`HttpMetricsLayer`]), per node.
//!
//! Histograms are fixed buckets of atomics ([`Histogram`]) rather than the recorder's, which
//! keeps every sample until a scrape drains it: an observation is two atomic adds, and memory
//! does not grow between scrapes.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::extract::MatchedPath;
use drover_engine::stats::{Ended, Histogram, HistogramSnapshot, ProcessStats};
use drover_store::{EngineGauges, Store};
use metrics::{Counter, Gauge, Key, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::api::schema::RESOURCE_TYPES;

/// Counters and gauges of one server.
#[derive(Debug, Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
    /// Open subscriber sockets.
    pub connections: Gauge,
    /// Subscribed names over all sockets.
    pub subscriptions: Gauge,
    /// Events accepted for delivery (publish endpoint and server-originated).
    pub events_published: Counter,
    /// Event copies handed to a subscriber's queue.
    pub events_delivered: Counter,
    /// Event copies dropped because a subscriber's queue was full.
    pub events_dropped: Counter,
    /// Subscribers disconnected as slow consumers.
    pub slow_consumer_disconnects: Counter,
    /// Requests refused for a missing or wrong key.
    pub auth_failures: Counter,
    /// Requests and frames refused as malformed.
    pub bad_input: Counter,
    /// Container and service events refused (wrong host, too many pending).
    pub events_refused: Counter,
    /// Replies dropped because their publisher was not the principal the call was addressed to.
    pub replies_rejected: Counter,
    /// Requests sent again because they reached no subscriber and one has subscribed since.
    pub requests_resent: Counter,
    /// Subscribe upgrades refused at `api.sub.max.connections`.
    pub subscribe_refused: Counter,
    /// Subscriber sockets closed with 1009 for a frame or message over the limit.
    pub oversized_messages: Counter,
    /// Runs of `table.cleanup`.
    pub cleanup_runs: Counter,
    /// Purge processes `table.cleanup` scheduled for removed resources.
    pub cleanup_purges_scheduled: Counter,
    /// Unix time of the end of the last `table.cleanup` run.
    pub cleanup_last_run: Gauge,
    /// Seconds the last `table.cleanup` run took.
    pub cleanup_last_duration: Gauge,
    /// Per table: rows deleted by `table.cleanup`, and old rows kept (referenced) by its last run.
    pub cleanup_tables: Vec<(&'static str, Counter, Gauge)>,
    /// HTTP request durations by route template and status class.
    pub http: Arc<HttpStats>,
    /// The store's gauges as last read, and when (a scrape reuses them for [`STORE_GAUGES_TTL`]).
    store_gauges: Arc<tokio::sync::Mutex<Option<(Instant, EngineGauges)>>>,
}

/// How long one read of the store's gauges serves scrapes: `/metrics` needs no key, so its rate
/// must not set the store's load.
pub const STORE_GAUGES_TTL: Duration = Duration::from_secs(1);

impl Metrics {
    /// A fresh set of metrics with its own recorder.
    pub fn new() -> Metrics {
        let recorder: PrometheusRecorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let meta = Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));
        let counter =
            |name: &'static str| recorder.register_counter(&Key::from_static_name(name), &meta);
        let gauge =
            |name: &'static str| recorder.register_gauge(&Key::from_static_name(name), &meta);
        for (name, help) in [
            ("drover_connections", "Open subscriber sockets."),
            (
                "drover_subscriptions",
                "Subscribed event names over all sockets.",
            ),
            (
                "drover_events_published_total",
                "Events accepted for delivery.",
            ),
            (
                "drover_events_delivered_total",
                "Event copies queued to subscribers.",
            ),
            (
                "drover_events_dropped_total",
                "Event copies dropped on full subscriber queues.",
            ),
            (
                "drover_slow_consumer_disconnects_total",
                "Subscribers disconnected as slow consumers.",
            ),
            (
                "drover_auth_failures_total",
                "Requests refused for a missing or wrong key.",
            ),
            (
                "drover_bad_input_total",
                "Requests and frames refused as malformed.",
            ),
        ] {
            recorder.describe_counter(name.into(), None, help.into());
        }
        for (name, help) in [
            (
                "drover_events_refused_total",
                "Container and service events refused (not the agent's host, too many pending).",
            ),
            (
                "drover_replies_rejected_total",
                "Replies dropped: their publisher is not the principal the request was addressed to.",
            ),
            (
                "drover_requests_resent_total",
                "Requests that reached no subscriber, sent again when one subscribed.",
            ),
            (
                "drover_cleanup_runs_total",
                "Runs of the table.cleanup job.",
            ),
            (
                "drover_subscribe_refused_total",
                "Subscribe upgrades refused with 503 at api.sub.max.connections.",
            ),
            (
                "drover_oversized_messages_total",
                "Subscriber sockets closed with 1009 for a frame or message over api.max.body.bytes.",
            ),
            (
                "drover_cleanup_purges_scheduled_total",
                "Purge processes table.cleanup scheduled for removed resources.",
            ),
            (
                "drover_cleanup_deleted_rows_total",
                "Rows deleted by table.cleanup, per table.",
            ),
        ] {
            recorder.describe_counter(name.into(), None, help.into());
        }
        for (name, help) in [
            (
                "drover_cleanup_last_run_timestamp_seconds",
                "Unix time the last table.cleanup run ended.",
            ),
            (
                "drover_cleanup_last_duration_seconds",
                "Seconds the last table.cleanup run took.",
            ),
            (
                "drover_cleanup_kept_rows",
                "Old rows the last table.cleanup run kept because other rows reference them, per table.",
            ),
            (
                "drover_build_info",
                "1, labelled with the server's version and (when built with DROVER_COMMIT set) its commit.",
            ),
        ] {
            recorder.describe_gauge(name.into(), None, help.into());
        }
        let mut build = vec![metrics::Label::new("version", env!("CARGO_PKG_VERSION"))];
        if let Some(commit) = option_env!("DROVER_COMMIT").filter(|commit| !commit.is_empty()) {
            build.push(metrics::Label::new("commit", commit));
        }
        recorder
            .register_gauge(&Key::from_parts("drover_build_info", build), &meta)
            .set(1.0);
        let cleanup_tables = drover_store::CLEANUP_STEPS
            .iter()
            .map(|step| {
                let labels = vec![metrics::Label::new("table", step.table)];
                (
                    step.table,
                    recorder.register_counter(
                        &Key::from_parts("drover_cleanup_deleted_rows_total", labels.clone()),
                        &meta,
                    ),
                    recorder.register_gauge(
                        &Key::from_parts("drover_cleanup_kept_rows", labels),
                        &meta,
                    ),
                )
            })
            .collect::<Vec<_>>();
        let metrics = Metrics {
            connections: gauge("drover_connections"),
            subscriptions: gauge("drover_subscriptions"),
            events_published: counter("drover_events_published_total"),
            events_delivered: counter("drover_events_delivered_total"),
            events_dropped: counter("drover_events_dropped_total"),
            slow_consumer_disconnects: counter("drover_slow_consumer_disconnects_total"),
            auth_failures: counter("drover_auth_failures_total"),
            bad_input: counter("drover_bad_input_total"),
            events_refused: counter("drover_events_refused_total"),
            replies_rejected: counter("drover_replies_rejected_total"),
            requests_resent: counter("drover_requests_resent_total"),
            subscribe_refused: counter("drover_subscribe_refused_total"),
            oversized_messages: counter("drover_oversized_messages_total"),
            cleanup_runs: counter("drover_cleanup_runs_total"),
            cleanup_purges_scheduled: counter("drover_cleanup_purges_scheduled_total"),
            cleanup_last_run: gauge("drover_cleanup_last_run_timestamp_seconds"),
            cleanup_last_duration: gauge("drover_cleanup_last_duration_seconds"),
            cleanup_tables,
            http: Arc::new(HttpStats::new()),
            store_gauges: Arc::default(),
            handle,
        };
        // Registered series appear in the output only once touched.
        metrics.connections.increment(0.0);
        metrics.subscriptions.increment(0.0);
        for counter in [
            &metrics.events_published,
            &metrics.events_delivered,
            &metrics.events_dropped,
            &metrics.slow_consumer_disconnects,
            &metrics.auth_failures,
            &metrics.bad_input,
            &metrics.events_refused,
            &metrics.replies_rejected,
            &metrics.requests_resent,
            &metrics.subscribe_refused,
            &metrics.oversized_messages,
            &metrics.cleanup_runs,
            &metrics.cleanup_purges_scheduled,
        ] {
            counter.increment(0);
        }
        metrics.cleanup_last_run.increment(0.0);
        metrics.cleanup_last_duration.increment(0.0);
        for (_, deleted, kept) in &metrics.cleanup_tables {
            deleted.increment(0);
            kept.increment(0.0);
        }
        metrics
    }

    /// The Prometheus text exposition of the recorder's series.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// The store's gauges, read at most once per [`STORE_GAUGES_TTL`] (concurrent scrapes wait
    /// for one read).
    pub async fn store_gauges(&self, store: &Store) -> drover_store::Result<EngineGauges> {
        let mut cached = self.store_gauges.lock().await;
        if let Some((at, gauges)) = cached.as_ref()
            && at.elapsed() < STORE_GAUGES_TTL
        {
            return Ok(gauges.clone());
        }
        let gauges = store
            .engine_gauges(drover_proto::event::now_millis())
            .await?;
        *cached = Some((Instant::now(), gauges.clone()));
        Ok(gauges)
    }
}

/// A label value with `\`, `"` and line feeds escaped, as the text format wants.
fn escape(value: &str) -> std::borrow::Cow<'_, str> {
    if value.contains(['\\', '"', '\n']) {
        value
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
            .into()
    } else {
        value.into()
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
}

/// One histogram's `_bucket`, `_sum` and `_count` lines; `labels` is `k="v",…` (no braces).
fn histogram_lines(out: &mut String, name: &str, labels: &str, snapshot: &HistogramSnapshot) {
    for (bound, count) in &snapshot.buckets {
        let _ = if bound.is_infinite() {
            writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}")
        } else {
            writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {count}")
        };
    }
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", snapshot.sum);
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", snapshot.count);
}

/// The engine's series: counters and the duration histogram of every process name that was
/// counted on this node (the others are left out, not shown as zero).
pub fn render_processes(out: &mut String, stats: &ProcessStats) {
    use std::sync::atomic::Ordering::Relaxed;
    let touched: Vec<_> = stats.all().iter().filter(|c| c.touched()).collect();
    for (name, help, value) in [
        (
            "drover_process_scheduled_total",
            "Processes this node scheduled for the engine (API creates and actions, registrations, delegates and onError chains, clean-up purges, the service reconciler), by process; processes with no handler, applied where they are scheduled, are not counted. Per node.",
            (|c: &drover_engine::stats::ProcessCounters| c.scheduled.load(Relaxed))
                as fn(&drover_engine::stats::ProcessCounters) -> u64,
        ),
        (
            "drover_process_attempts_total",
            "Attempts this node's engine started, by process. Per node.",
            |c| c.attempts.load(Relaxed),
        ),
        (
            "drover_process_retries_total",
            "Attempts this node's engine saw fail and scheduled again after a backoff, by process. Per node.",
            |c| c.retries.load(Relaxed),
        ),
        (
            "drover_process_waits_total",
            "Times this node's claim put a process back to wait for a host or its agent (no attempt used), by process. Per node.",
            |c| c.waits.load(Relaxed),
        ),
    ] {
        header(out, name, "counter", help);
        for counters in &touched {
            let _ = writeln!(
                out,
                "{name}{{process=\"{}\"}} {}",
                escape(counters.name),
                value(counters)
            );
        }
    }
    let name = "drover_process_completed_total";
    header(
        out,
        name,
        "counter",
        "Processes this node's engine ended, by process and result (success; failure: attempts or max age used up, or a permanent error; chain: failed into an external handler's onError process; canceled: its resource changed or went away). Per node.",
    );
    for counters in &touched {
        for ended in Ended::ALL {
            let _ = writeln!(
                out,
                "{name}{{process=\"{}\",result=\"{}\"}} {}",
                escape(counters.name),
                ended.label(),
                counters.ended[ended as usize].load(Relaxed)
            );
        }
    }
    let name = "drover_process_duration_seconds";
    header(
        out,
        name,
        "histogram",
        "Seconds from scheduled to ended (waits and retries included) of the processes this node's engine ended, by process. Per node.",
    );
    for counters in &touched {
        let labels = format!("process=\"{}\"", escape(counters.name));
        histogram_lines(out, name, &labels, &counters.duration.snapshot());
    }
}

/// The store's gauges: the same on every node of a cluster (they count the shared store).
pub fn render_store_gauges(out: &mut String, gauges: &EngineGauges, now_millis: i64) {
    for (name, help, value) in [
        (
            "drover_process_running",
            "Unended processes held by a live lease (an attempt in flight on some node). Cluster-wide: every node reports the same store.",
            gauges.running,
        ),
        (
            "drover_process_ready",
            "Unended processes ready to run and not claimed yet. Cluster-wide: every node reports the same store.",
            gauges.ready,
        ),
        (
            "drover_process_delayed",
            "Unended processes waiting for their next run time (a retry's backoff, or a wait for a host or an agent). Cluster-wide: every node reports the same store.",
            gauges.delayed,
        ),
    ] {
        header(out, name, "gauge", help);
        let _ = writeln!(out, "{name} {value}");
    }
    let name = "drover_process_oldest_pending_age_seconds";
    header(
        out,
        name,
        "gauge",
        "Seconds since the oldest unended process (running, ready or delayed) was scheduled; 0 when none. Cluster-wide: every node reports the same store.",
    );
    let age = gauges
        .oldest_created
        .map_or(0.0, |created| (now_millis - created).max(0) as f64 / 1000.0);
    let _ = writeln!(out, "{name} {age}");
    for (name, help, rows) in [
        (
            "drover_agents",
            "Agents by state (removed and purged ones until table.cleanup deletes them). Cluster-wide: every node reports the same store.",
            &gauges.agents,
        ),
        (
            "drover_hosts",
            "Hosts by state (removed and purged ones until table.cleanup deletes them). Cluster-wide: every node reports the same store.",
            &gauges.hosts,
        ),
    ] {
        header(out, name, "gauge", help);
        for (state, count) in rows {
            let _ = writeln!(out, "{name}{{state=\"{}\"}} {count}", escape(state));
        }
    }
}

/// Upper bounds, in seconds, of the HTTP request duration buckets.
pub const HTTP_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Status classes: `1xx` … `5xx`.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The label of requests no route matched.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// The histograms of one route template: by status class, and for templates with a
/// `{collection}` segment also by collection (the resource types of the schema table).
#[derive(Debug)]
struct RouteStats {
    /// By status class; a template with `{collection}` uses it for unknown collections.
    by_status: [Histogram; 5],
    /// By collection (as in [`RESOURCE_TYPES`]), then status class.
    by_collection: Box<[[Histogram; 5]]>,
}

impl RouteStats {
    fn new(template: &str) -> RouteStats {
        let classes = || std::array::from_fn(|_| Histogram::new(HTTP_SECONDS));
        RouteStats {
            by_status: classes(),
            by_collection: if template.contains("{collection}") {
                RESOURCE_TYPES.iter().map(|_| classes()).collect()
            } else {
                Box::new([])
            },
        }
    }
}

/// The resource type (its position in [`RESOURCE_TYPES`]) a path names where its route
/// template has `{collection}`; none for other templates and unknown collections.
pub fn collection_of(template: &str, path: &str) -> Option<usize> {
    let segment = template.split('/').position(|s| s == "{collection}")?;
    let plural = path.split('/').nth(segment)?;
    let plural = if plural == "instances" {
        "containers"
    } else {
        plural
    };
    RESOURCE_TYPES
        .iter()
        .position(|schema| schema.plural == plural)
}

/// HTTP request durations by route template (`/v1/{collection}/{id}` with the collection
/// filled in for the schema's resource types: `/v1/containers/{id}`) and status class.
///
/// The label set is bounded by the router's templates × the schema's collections × 5 classes:
/// ids, project ids and unknown paths never become labels. A template's histograms are made
/// the first time it is requested (a copy of the map, swapped in once); after that a request
/// is a lookup in the current map and two atomic adds, with no lock and no allocation.
pub struct HttpStats {
    routes: ArcSwap<HashMap<Box<str>, Arc<RouteStats>>>,
    unmatched: [Histogram; 5],
}

impl std::fmt::Debug for HttpStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpStats")
            .field("routes", &self.routes.load().len())
            .finish_non_exhaustive()
    }
}

impl Default for HttpStats {
    fn default() -> Self {
        HttpStats::new()
    }
}

impl HttpStats {
    /// No requests yet.
    pub fn new() -> HttpStats {
        HttpStats {
            routes: ArcSwap::default(),
            unmatched: std::array::from_fn(|_| Histogram::new(HTTP_SECONDS)),
        }
    }

    /// Records one request: its matched route template (`None`: no route matched), the
    /// collection it named (see [`collection_of`]), its status and how long it took.
    pub fn observe(
        &self,
        template: Option<&str>,
        collection: Option<usize>,
        status: u16,
        took: Duration,
    ) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        let seconds = took.as_secs_f64();
        let Some(template) = template else {
            self.unmatched[class].observe(seconds);
            return;
        };
        let observe = |route: &RouteStats| match collection
            .and_then(|index| route.by_collection.get(index))
        {
            Some(classes) => classes[class].observe(seconds),
            None => route.by_status[class].observe(seconds),
        };
        if let Some(route) = self.routes.load().get(template) {
            return observe(route);
        }
        // The first request of this template: add it (bounded by the router's templates).
        self.routes.rcu(|routes| {
            let mut routes = HashMap::clone(routes);
            routes
                .entry(template.into())
                .or_insert_with(|| Arc::new(RouteStats::new(template)));
            routes
        });
        if let Some(route) = self.routes.load().get(template) {
            observe(route);
        }
    }

    /// The `drover_http_request_duration_seconds` series of every route and class requested.
    pub fn render(&self, out: &mut String) {
        let name = "drover_http_request_duration_seconds";
        header(
            out,
            name,
            "histogram",
            "Seconds from a request's arrival to its response's head, by route template (ids left as {id}; resource collections filled in; unmatched for no route) and status class. Per node.",
        );
        let series = |out: &mut String, route: &str, classes: &[Histogram; 5]| {
            for (class, histogram) in STATUS_CLASSES.iter().zip(classes) {
                if histogram.count() > 0 {
                    let labels = format!("route=\"{}\",status=\"{class}\"", escape(route));
                    histogram_lines(out, name, &labels, &histogram.snapshot());
                }
            }
        };
        let routes = self.routes.load();
        let mut templates: Vec<_> = routes.iter().collect();
        templates.sort_by(|a, b| a.0.cmp(b.0));
        for (template, route) in templates {
            series(out, template, &route.by_status);
            for (schema, classes) in RESOURCE_TYPES.iter().zip(route.by_collection.iter()) {
                let label = template.replacen("{collection}", schema.plural, 1);
                series(out, &label, classes);
            }
        }
        series(out, UNMATCHED_ROUTE, &self.unmatched);
    }
}

/// A tower layer that times every request into [`HttpStats`] by its matched route (added with
/// `Router::layer`, so it runs after routing and sees [`MatchedPath`]).
#[derive(Debug, Clone)]
pub struct HttpMetricsLayer {
    stats: Arc<HttpStats>,
}

impl HttpMetricsLayer {
    /// Records into `stats`.
    pub fn new(stats: Arc<HttpStats>) -> HttpMetricsLayer {
        HttpMetricsLayer { stats }
    }
}

impl<S> tower::Layer<S> for HttpMetricsLayer {
    type Service = HttpMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        HttpMetricsService {
            inner,
            stats: self.stats.clone(),
        }
    }
}

/// The service of [`HttpMetricsLayer`].
#[derive(Debug, Clone)]
pub struct HttpMetricsService<S> {
    inner: S,
    stats: Arc<HttpStats>,
}

impl<S, B, R> tower::Service<axum::http::Request<B>> for HttpMetricsService<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<R>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Timed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        let route = request.extensions().get::<MatchedPath>().cloned();
        let collection = route
            .as_ref()
            .and_then(|route| collection_of(route.as_str(), request.uri().path()));
        let start = Instant::now();
        Timed {
            inner: self.inner.call(request),
            start,
            route,
            collection,
            stats: self.stats.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    /// A request's response future, which records its duration when the response is ready.
    pub struct Timed<F> {
        #[pin]
        inner: F,
        start: Instant,
        route: Option<MatchedPath>,
        collection: Option<usize>,
        stats: Arc<HttpStats>,
    }
}

impl<F, R, E> Future for Timed<F>
where
    F: Future<Output = Result<axum::http::Response<R>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        if let Ok(response) = &result {
            this.stats.observe(
                this.route.as_ref().map(MatchedPath::as_str),
                *this.collection,
                response.status().as_u16(),
                this.start.elapsed(),
            );
        }
        Poll::Ready(result)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
