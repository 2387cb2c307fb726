//! Compiles `proto/moeshard.proto` with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/moeshard.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".moeshard.v1")
        .compile_fds(fds)?;
    Ok(())
}
