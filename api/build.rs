//! Compiles `proto/*.proto` with protox (pure Rust): no system `protoc` needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["proto/replication.proto", "proto/control.proto"], ["proto"])?;
    // Chunk payloads as `Bytes`: decoding then takes a slice of the gRPC
    // message buffer instead of copying each MiB once more.
    tonic_prost_build::configure()
        .bytes(".vmreplica.replication.v1.SegmentChunk.data")
        .bytes(".vmreplica.replication.v1.CopyChunk.data")
        .bytes(".vmreplica.replication.v1.ResyncData.data")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
