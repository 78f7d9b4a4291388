//! confroll-agent: a sidecar that makes any program a confroll node.
//!
//! The agent registers with the coordinators like an embedded node (same
//! NodeAgent API: signed pushes, fencing tokens, dry runs, status, the same
//! metrics) and runs the node's six-phase pipeline for a program it does
//! not link with: nginx, HAProxy, Envoy, a Python service.
//!
//! ```text
//!   coordinator ──signed push (version, token)──▶ confroll-agent ─┬─ files.rs: content → files
//!        ▲                                       (a confroll Node │  (text, schema'd YAML/JSON,
//!        └──── register + heartbeat ─────────────  of `Files`)    │   or a bundle of several)
//!                                                                 └─ program.rs: the component
//!                                         validate cmd on a staging copy ─▶ write atomically
//!                                         ─▶ reload (signal / command / HTTP) ─▶ health gate
//!                                         ─▶ on failure: previous files, reload, probe again
//! ```
//!
//! The fencing state, the applied version and its checksum persist in the
//! state dir, so a restarted agent neither re-applies a version nor takes
//! a stale push, and it writes the applied version back if a crash cut an
//! apply short.

pub mod files;
pub mod program;
