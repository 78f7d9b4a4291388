//! Prometheus metrics of one node, in a registry of its own (several nodes
//! can share a process in tests), with reloadable settings: collection on or
//! off, and extra labels stamped on every exported series at scrape time.

use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
    proto::LabelPair,
};

use crate::config::MetricsConfig;

pub use confroll_common::metrics::{labelled_registry, labels_registry, registered, sort_labels};

const RELOAD_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Every metric a node exports.
pub struct NodeMetrics {
    registry: Registry,
    /// `metrics` section in force.
    settings: ArcSwap<MetricsConfig>,
    /// `confroll_config_version`: applied version.
    pub config_version: IntGauge,
    /// `confroll_config_reload_total{status}`.
    pub reload_total: IntCounterVec,
    /// `confroll_config_reload_duration_seconds`.
    pub reload_duration: Histogram,
    /// `confroll_config_reload_phase_duration_seconds{phase}`.
    pub phase_duration: HistogramVec,
    /// `confroll_config_reload_component_duration_seconds{component}`.
    pub component_duration: HistogramVec,
    /// `confroll_config_reload_errors_total{type}`.
    pub errors_total: IntCounterVec,
    /// `confroll_config_reload_last_success_timestamp_seconds`.
    pub last_success: Gauge,
    /// `confroll_config_reload_rollbacks_total{reason}`.
    pub rollbacks_total: IntCounterVec,
    /// `confroll_http_requests_total{route,code}` (only while enabled).
    pub http_requests: IntCounterVec,
}

impl NodeMetrics {
    /// A registry whose series all carry `node="<id>"` and
    /// `service="<service>"` (dashboards and alerts select by service).
    pub fn new(node_id: &str, service: &str) -> Arc<Self> {
        let registry = labels_registry(&[("node", node_id), ("service", service)]);
        let hist = |name: &str, help: &str| HistogramOpts::new(name, help).buckets(RELOAD_BUCKETS.to_vec());
        let m = Self {
            settings: ArcSwap::from_pointee(MetricsConfig::default()),
            config_version: registered(
                &registry,
                IntGauge::new("confroll_config_version", "Config version this node runs").unwrap(),
            ),
            reload_total: registered(
                &registry,
                IntCounterVec::new(Opts::new("confroll_config_reload_total", "Reloads by outcome"), &["status"])
                    .unwrap(),
            ),
            reload_duration: registered(
                &registry,
                Histogram::with_opts(hist("confroll_config_reload_duration_seconds", "Whole reload")).unwrap(),
            ),
            phase_duration: registered(
                &registry,
                HistogramVec::new(
                    hist("confroll_config_reload_phase_duration_seconds", "Reload time per phase"),
                    &["phase"],
                )
                .unwrap(),
            ),
            component_duration: registered(
                &registry,
                HistogramVec::new(
                    hist("confroll_config_reload_component_duration_seconds", "Component build and check time"),
                    &["component"],
                )
                .unwrap(),
            ),
            errors_total: registered(
                &registry,
                IntCounterVec::new(
                    Opts::new("confroll_config_reload_errors_total", "Reload errors by type"),
                    &["type"],
                )
                .unwrap(),
            ),
            last_success: registered(
                &registry,
                Gauge::new(
                    "confroll_config_reload_last_success_timestamp_seconds",
                    "Unix time of the last successful reload",
                )
                .unwrap(),
            ),
            rollbacks_total: registered(
                &registry,
                IntCounterVec::new(
                    Opts::new("confroll_config_reload_rollbacks_total", "Automatic rollbacks by reason"),
                    &["reason"],
                )
                .unwrap(),
            ),
            http_requests: registered(
                &registry,
                IntCounterVec::new(
                    Opts::new("confroll_http_requests_total", "HTTP requests served"),
                    &["route", "code"],
                )
                .unwrap(),
            ),
            registry,
        };
        // Every series a dashboard or an alert reads exists at 0 from the
        // start: a labelled counter that first appears at 1 shows no
        // `increase()`, so the first failed reload would go unseen.
        for status in ["applied", "degraded", "unchanged", "rejected", "rolled_back"] {
            m.reload_total.with_label_values(&[status]);
        }
        for kind in ["load", "validate", "diff", "apply", "reload", "health", "component"] {
            m.errors_total.with_label_values(&[kind]);
        }
        for reason in ["component", "health"] {
            m.rollbacks_total.with_label_values(&[reason]);
        }
        Arc::new(m)
    }

    pub(crate) fn swap_settings(&self, s: Arc<MetricsConfig>) -> Arc<MetricsConfig> {
        self.settings.swap(s)
    }

    /// Whether collection is on.
    pub fn enabled(&self) -> bool {
        self.settings.load().enabled
    }

    /// Counts one HTTP request (when collection is on).
    pub fn record_request(&self, route: &str, code: u16) {
        if self.enabled() {
            self.http_requests.with_label_values(&[route, &code.to_string()]).inc();
        }
    }

    /// Prometheus text exposition, or `None` while collection is off.
    pub fn render(&self) -> Option<String> {
        let settings = self.settings.load_full();
        if !settings.enabled {
            return None;
        }
        let mut families = self.registry.gather();
        for family in &mut families {
            for metric in family.mut_metric() {
                let mut pairs: Vec<LabelPair> = metric.get_label().to_vec();
                for (k, v) in &settings.labels {
                    let mut p = LabelPair::default();
                    p.set_name(k.clone());
                    p.set_value(v.clone());
                    pairs.push(p);
                }
                metric.set_label(pairs);
            }
        }
        sort_labels(&mut families);
        let mut out = Vec::new();
        TextEncoder::new().encode(&families, &mut out).ok()?;
        String::from_utf8(out).ok()
    }
}
