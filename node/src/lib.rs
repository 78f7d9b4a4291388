//! confroll node: live, hot-reloadable configuration for a Rust service.
//!
//! # Layout
//!
//! ```text
//!  config.rs      the reference service's config model (one ServiceConfig)
//!  diff.rs        field diff with secrets hidden, restart-only refusal
//!  pipeline.rs    the reload pipeline as a pure state machine (events in, commands out)
//!  node/          the runtime: ArcSwap of the live config, executes pipeline commands,
//!                 fencing-token check for pushes, state dir persistence;
//!                 builder.rs: NodeBuilder (options, components, boot)
//!  fencing.rs     the fencing rules as pure functions (cluster, token, sequence, deadline)
//!  components/    ready-made components: logger (tracing reload), database
//!                 (sqlx), redis (deadpool), llm (reqwest), metrics
//!  metrics.rs     Prometheus registry with reloadable labels
//!  state.rs       atomic persistence of the applied config and highest token
//!  journal.rs     applies.jsonl: one line per apply attempt, in the node's own words
//!  triggers.rs    SIGHUP and debounced file watch; SIGHUP-or-change reload of small files
//!  agent.rs       NodeAgent gRPC service (coordinator → node), reflection, health
//!  http.rs        the reference service: /work, /healthz, /readyz, /metrics, status
//!  pb_impl.rs     domain ↔ protobuf conversions (domain types never see prost)
//!  service.rs     the SDK: ServiceConfig (a service's own config type), Codec (how
//!                 documents are read, when only known at run time), Component
//!                 (its own reloadable parts), Slot (where handlers read them)
//!  wiring.rs      agent port, registration, SIGHUP and file watch in one call
//! ```
//!
//! What the coordinator shares with nodes (document formats and limits,
//! secrets, diffs, push signatures, transport helpers) lives in
//! `confroll-common` and is re-exported here as `limits`, `secrets`,
//! `trust` and `net`.
//!
//! # Embedding
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use confroll_node::{Node, NodeOptions};
//! let mut opts = NodeOptions::new("node-1");
//! opts.config_path = Some("config.yaml".into());
//! let node = Node::start(opts).await?;
//! let live = node.config();            // Arc<LiveConfig>: wait-free read
//! let ttl = live.config.cache.ttl.0;   // use it for the whole request
//! # let _ = ttl; Ok(()) }
//! ```

pub mod agent;
pub mod components;
pub mod config;
pub mod diff;
pub mod fencing;
pub mod http;
pub mod journal;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod pb_impl;
pub mod pipeline;
pub mod report;
pub mod service;
pub mod state;
pub mod triggers;
pub mod wiring;

pub use components::ComponentError;
pub use config::{Config, ConfigError};
pub use confroll_common::document::{Format, Violation};
pub use confroll_common::{limits, net, secrets, trust};
pub use node::{LiveConfig, Node, NodeBuilder, NodeOptions, Push, PushError, StartError};
pub use report::{ReloadReport, ReloadStatus, Trigger};
pub use service::{Codec, Component, ServiceConfig, Slot};
