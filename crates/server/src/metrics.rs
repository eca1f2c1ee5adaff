//! The server's metrics, rendered at `/metrics` in Prometheus text format.
//!
//! Each server owns its recorder (none is installed globally), so several servers in one test
//! process keep separate counts. Handles are registered once; the hot path only adds to atomics.

use metrics::{Counter, Gauge, Key, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

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
}

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
        ] {
            recorder.describe_gauge(name.into(), None, help.into());
        }
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

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
