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
        let metrics = Metrics {
            connections: gauge("drover_connections"),
            subscriptions: gauge("drover_subscriptions"),
            events_published: counter("drover_events_published_total"),
            events_delivered: counter("drover_events_delivered_total"),
            events_dropped: counter("drover_events_dropped_total"),
            slow_consumer_disconnects: counter("drover_slow_consumer_disconnects_total"),
            auth_failures: counter("drover_auth_failures_total"),
            bad_input: counter("drover_bad_input_total"),
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
        ] {
            counter.increment(0);
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
