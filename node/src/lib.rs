//! confroll node: live, hot-reloadable configuration for a Rust service.
//!
//! # Layout
//!
//! ```text
//!  config.rs      the config model: parse (YAML/JSON), validate, redact, JSON Schema
//!  limits.rs      size, nesting and YAML alias-expansion bounds, checked
//!                 before a document is deserialized
//!  diff.rs        field diff → affected components, restart-only refusal
//!  pipeline.rs    the reload pipeline as a pure state machine (events in, commands out)
//!  node.rs        the runtime: ArcSwap of the live config, executes pipeline commands,
//!                 fencing-token check for pushes, state dir persistence
//!  components/    logger (tracing reload), database (sqlx), redis (deadpool),
//!                 llm (reqwest), plus Components: prepare / swap / retire / health
//!  metrics.rs     Prometheus registry with reloadable labels
//!  secrets.rs     secret fields from the JSON Schema: redact documents, list secret values
//!  state.rs       atomic persistence of the applied config and highest token
//!  journal.rs     applies.jsonl: one line per apply attempt, in the node's own words
//!  triggers.rs    SIGHUP and debounced file watch; SIGHUP-or-change reload of small files
//!  trust.rs       Ed25519 signatures: only the coordinator group may push
//!  agent.rs       NodeAgent gRPC service (coordinator → node), reflection, health
//!  http.rs        the reference service: /work, /healthz, /readyz, /metrics, status
//!  pb_impl.rs     domain ↔ protobuf conversions (domain types never see prost)
//! ```
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
pub mod http;
pub mod journal;
pub mod limits;
pub mod membership;
pub mod metrics;
pub mod net;
pub mod node;
pub mod pb_impl;
pub mod pipeline;
pub mod report;
pub mod secrets;
pub mod state;
pub mod triggers;
pub mod trust;

pub use config::{Config, ConfigError};
pub use node::{LiveConfig, Node, NodeOptions, Push, PushError, StartError};
pub use report::{ReloadReport, ReloadStatus, Trigger};
