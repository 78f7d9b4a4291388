//! Generates the `confroll.v1` messages and services, plus a file descriptor
//! set for gRPC server reflection.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let protos =
        ["proto/confroll/v1/types.proto", "proto/confroll/v1/node_agent.proto", "proto/confroll/v1/coordinator.proto"];
    tonic_prost_build::configure()
        // Scripts want `-o json` from the CLI: derive Serialize on messages.
        .type_attribute(".confroll.v1", "#[derive(serde::Serialize)]")
        .file_descriptor_set_path(out.join("confroll_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    // The replicas' peer protocol: served on the raft port only, so it stays
    // out of the reflection descriptor set operators browse.
    let raft = "proto/confroll/raft/v1/raft.proto";
    tonic_prost_build::configure().compile_protos(&[raft], &["proto"])?;
    for p in protos.iter().chain([&raft]) {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
