//! Coordinator metrics (Prometheus), in a registry per replica.

use confroll_node::metrics::{labelled_registry, registered};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric a coordinator replica exports.
pub struct CoordinatorMetrics {
    registry: Registry,
    /// `confroll_coordinator_is_leader`.
    pub is_leader: IntGauge,
    /// `confroll_stable_version{service}`.
    pub stable_version: IntGaugeVec,
    /// `confroll_desired_version{service}`.
    pub desired_version: IntGaugeVec,
    /// `confroll_rollout_stage{service}`.
    pub rollout_stage: IntGaugeVec,
    /// `confroll_rollouts_total{service,outcome}`.
    pub rollouts_total: IntCounterVec,
    /// `confroll_rollout_duration_seconds`.
    pub rollout_duration: Histogram,
    /// `confroll_nodes{service,state}`.
    pub nodes: IntGaugeVec,
    /// `confroll_push_streams`: push streams this replica holds open (one
    /// per node while it leads, none after): a value above the registered
    /// node count means streams to departed nodes are not being closed.
    pub push_streams: IntGauge,
}

impl CoordinatorMetrics {
    /// A registry whose series carry `replica="<id>"`.
    pub fn new(replica: &str) -> Self {
        let registry = labelled_registry("replica", replica);
        Self {
            is_leader: registered(
                &registry,
                IntGauge::new("confroll_coordinator_is_leader", "1 while this replica leads").unwrap(),
            ),
            push_streams: registered(
                &registry,
                IntGauge::new("confroll_push_streams", "ApplyStream push streams open to node agents").unwrap(),
            ),
            stable_version: registered(
                &registry,
                IntGaugeVec::new(Opts::new("confroll_stable_version", "Stable version"), &["service"]).unwrap(),
            ),
            desired_version: registered(
                &registry,
                IntGaugeVec::new(Opts::new("confroll_desired_version", "Desired version"), &["service"]).unwrap(),
            ),
            rollout_stage: registered(
                &registry,
                IntGaugeVec::new(
                    Opts::new("confroll_rollout_stage", "Stage of the running rollout (-1: none)"),
                    &["service"],
                )
                .unwrap(),
            ),
            rollouts_total: registered(
                &registry,
                IntCounterVec::new(
                    Opts::new("confroll_rollouts_total", "Finished rollouts by outcome"),
                    &["service", "outcome"],
                )
                .unwrap(),
            ),
            rollout_duration: registered(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new("confroll_rollout_duration_seconds", "Rollout start to finish")
                        .buckets(vec![0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0]),
                )
                .unwrap(),
            ),
            nodes: registered(
                &registry,
                IntGaugeVec::new(Opts::new("confroll_nodes", "Registered nodes by state"), &["service", "state"])
                    .unwrap(),
            ),
            registry,
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
