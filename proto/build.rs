//! Generates the `confroll.v1` messages and services, plus a file descriptor
//! set for gRPC server reflection.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let protos =
        ["proto/confroll/v1/types.proto", "proto/confroll/v1/node_agent.proto", "proto/confroll/v1/coordinator.proto"];
    let descriptors = out.join("confroll_descriptor.bin");
    tonic_prost_build::configure().file_descriptor_set_path(&descriptors).compile_protos(&protos, &["proto"])?;
    // `confroll -o json` prints the proto3 JSON mapping (lowerCamelCase
    // names, 64-bit integers as strings, enums by name, default values
    // left out), exactly what grpcurl prints, so scripts read either.
    pbjson_build::Builder::new().register_descriptors(&std::fs::read(&descriptors)?)?.build(&[".confroll.v1"])?;
    // The replicas' peer protocol: served on the raft port only, so it stays
    // out of the reflection descriptor set operators browse.
    let raft = "proto/confroll/raft/v1/raft.proto";
    tonic_prost_build::configure().compile_protos(&[raft], &["proto"])?;
    for p in protos.iter().chain([&raft]) {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
