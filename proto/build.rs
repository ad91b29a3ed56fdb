//! Generates the gRPC code from `habar/v1/*.proto` without a system `protoc`: `protox`
//! parses the files, `tonic-prost-build` generates from the descriptor set, and the
//! descriptor set is kept for gRPC reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["habar/v1/broker.proto", "habar/v1/raft.proto", "habar/v1/forward.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("habar_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().bytes(".habar").compile_fds(fds)?;
    Ok(())
}
