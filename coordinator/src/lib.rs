//! confroll coordinator: versions configs and rolls them out to nodes in
//! canary stages, with cluster-wide rollback, on a pluggable consensus store.
//!
//! # Layout
//!
//! ```text
//!  store/        the Store trait (election, fenced txn, lock, watch, registrations)
//!    etcd/       … on etcd
//!    raft/       … on the replicas' own openraft group (state_machine.rs: its pure state machine)
//!    memory.rs   … in memory, for in-process tests (the same state machine, no raft)
//!  model.rs      what is stored where: versions, meta, rollout record, registrations,
//!                the schemas nodes publish
//!  schemas.rs    published schemas compiled once: a submit checked against every
//!                live one, restart-only paths, secret marks (no service's type here)
//!  engine/       the rollout state machine (pure: events in, actions out, including
//!                which record generation each push waits for)
//!  replica/      a replica, one concern per file (see its module doc): mod.rs the
//!                leadership loop, api.rs submit/rollback/abort, driver.rs the rollout
//!                driver, push.rs one push, reconcile.rs with plan.rs (its pure
//!                decisions), membership.rs, schemas.rs (kept and read back from
//!                the store), records.rs, tests.rs (in-process, on
//!                memory.rs); every decisive write fenced by term and lock
//!  retry.rs      the one backoff of store retries, cut short when the term is lost
//!  agents.rs     NodeAgent clients (one push stream per node, ordered pushes)
//!  service.rs    confroll.v1.Coordinator over gRPC: roles, redaction, forwarding to the leader
//!  auth.rs       operator / node / reader credentials (constant-time, reloadable)
//!  pb_impl.rs    domain ⇄ protobuf (the replica's API knows no protobuf type)
//!  metrics.rs    Prometheus
//!  http.rs       /metrics, /healthz, /readyz
//! ```
//!
//! ```text
//!  confroll CLI / grpcurl ──▶ any replica ──forward writes──▶ leader ──ApplyStream(signed, token)──▶ nodes
//!                                 │                              │
//!                                 └────── reads ──▶ store ◀──────┘ fenced txns
//! ```

pub mod agents;
pub mod auth;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod model;
pub mod pb_impl;
pub mod replica;
mod retry;
pub mod schemas;
pub mod service;
pub mod store;
