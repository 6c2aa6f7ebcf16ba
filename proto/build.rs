//! Generate the mabe.v1 gRPC code with the vendored protoc (no system protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    println!("cargo:rerun-if-changed=proto/mabe/v1/authority.proto");
    println!("cargo:rerun-if-changed=proto/mabe/v1/proxy.proto");
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/mabe/v1/authority.proto", "proto/mabe/v1/proxy.proto"],
        &["proto"],
    )?;
    Ok(())
}
