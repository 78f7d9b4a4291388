//! Coordinator metrics (Prometheus), in a registry per replica.
//!
//! Two kinds: this replica's own (`is_leader`, `elections_won_total`,
//! `push_streams`, the counters), and the cluster's view per service
//! (versions, rollout state and stage, nodes), which only the leader
//! exports: a replica that steps down drops those series, so a query
//! `max by (service) (…)` sees one current value, never a follower's stale
//! one.

use confroll_common::metrics::{labelled_registry, registered, sort_labels};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every state `confroll_rollout_state` has a series for.
pub const ROLLOUT_STATES: [&str; 5] = ["running", "rolling_back", "succeeded", "rolled_back", "aborted"];

/// Every metric a coordinator replica exports.
pub struct CoordinatorMetrics {
    registry: Registry,
    /// `confroll_coordinator_is_leader`.
    pub is_leader: IntGauge,
    /// `confroll_coordinator_elections_won_total`: the sum of its increase
    /// over the replicas is the number of leader changes.
    pub elections_won: IntCounter,
    /// `confroll_stable_version{service}`.
    pub stable_version: IntGaugeVec,
    /// `confroll_desired_version{service}`.
    pub desired_version: IntGaugeVec,
    /// `confroll_rollout_stage{service}`.
    pub rollout_stage: IntGaugeVec,
    /// `confroll_rollout_state{service,state}`: 1 for the state of the
    /// service's latest rollout, 0 for the others (one series per state, so
    /// a dashboard can show each instead of one folded number).
    pub rollout_state: IntGaugeVec,
    /// `confroll_node_version{service,node}`: the version each registered
    /// node last reported (a node stuck on an old one stands out).
    pub node_version: IntGaugeVec,
    /// `confroll_nodes_lost_total{service}`: registrations that expired
    /// (the node stopped heartbeating), as seen by the leader.
    pub nodes_lost: IntCounterVec,
    /// `confroll_push_errors_total{service,reason}`: pushes to node agents
    /// that failed (`unreachable`: no connection or no answer in time;
    /// `refused`: the agent said no; `failed`: the node's reload failed).
    pub push_errors: IntCounterVec,
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
            elections_won: registered(
                &registry,
                IntCounter::new("confroll_coordinator_elections_won_total", "Times this replica became the leader")
                    .unwrap(),
            ),
            rollout_state: registered(
                &registry,
                IntGaugeVec::new(
                    Opts::new("confroll_rollout_state", "1 for the state of the latest rollout, 0 for the others"),
                    &["service", "state"],
                )
                .unwrap(),
            ),
            node_version: registered(
                &registry,
                IntGaugeVec::new(
                    Opts::new("confroll_node_version", "Config version each registered node reports"),
                    &["service", "node"],
                )
                .unwrap(),
            ),
            nodes_lost: registered(
                &registry,
                IntCounterVec::new(
                    Opts::new("confroll_nodes_lost_total", "Node registrations that expired (no heartbeat)"),
                    &["service"],
                )
                .unwrap(),
            ),
            push_errors: registered(
                &registry,
                IntCounterVec::new(
                    Opts::new("confroll_push_errors_total", "Pushes to node agents that failed, by reason"),
                    &["service", "reason"],
                )
                .unwrap(),
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

    /// Sets `confroll_rollout_state` of `service` to `state` (one of
    /// [`ROLLOUT_STATES`]).
    pub fn set_rollout_state(&self, service: &str, state: &str) {
        for s in ROLLOUT_STATES {
            self.rollout_state.with_label_values(&[service, s]).set(i64::from(s == state));
        }
    }

    /// Creates every counter series of `service` at 0 (outcomes, push
    /// error reasons, lost nodes): a labelled counter that first appears at
    /// 1 shows no `increase()` or `rate()`, so a dashboard and an alert
    /// would miss a service's first rollback or push error.
    pub fn init_service(&self, service: &str) {
        for outcome in ["succeeded", "rolled_back", "aborted"] {
            self.rollouts_total.with_label_values(&[service, outcome]);
        }
        for reason in ["unreachable", "refused", "expired", "failed"] {
            self.push_errors.with_label_values(&[service, reason]);
        }
        self.nodes_lost.with_label_values(&[service]);
    }

    /// Drops the leader-only series (the cluster's view per service): called
    /// when this replica stops leading.
    pub fn forget_cluster_view(&self) {
        for v in [
            &self.stable_version,
            &self.desired_version,
            &self.rollout_stage,
            &self.rollout_state,
            &self.nodes,
            &self.node_version,
        ] {
            v.reset();
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let mut families = self.registry.gather();
        sort_labels(&mut families);
        let _ = TextEncoder::new().encode(&families, &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
