//! The confroll wire protocol, generated from `proto/confroll/v1/*.proto`.
//!
//! This crate has one job: hold the `.proto` files and the code generated from
//! them. Conversions between these messages and domain types live in the
//! crates that own the domain types (`pb_impl` modules), so domain types never
//! depend on prost.
//!
//! ```text
//!   coordinator ──Apply/Validate/Status/Health──▶ NodeAgent (every node)
//!   operator ─────SubmitConfig/GetStatus/…──────▶ Coordinator (next issue)
//! ```

/// `confroll.v1`: messages and services.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod v1 {
    tonic::include_proto!("confroll.v1");
}

/// `confroll.raft.v1`: the peer protocol of the embedded raft store.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod raft_v1 {
    tonic::include_proto!("confroll.raft.v1");
}

/// Encoded `FileDescriptorSet` of every confroll proto, for gRPC server
/// reflection (`tonic-reflection`).
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("confroll_descriptor");
