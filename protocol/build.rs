//! Compiles `proto/nomoat/v1/*.proto` with protox (no system protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let files = [
        "nomoat/v1/infer.proto",
        "nomoat/v1/info.proto",
        "nomoat/v1/weights.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(files, [&root])?;
    prost_build::Config::new()
        // Hidden states are sliced out of the received buffer, not copied.
        .bytes([
            ".nomoat.v1.Step.hidden",
            ".nomoat.v1.StepResult.hidden",
            ".nomoat.v1.SpanOutput.hidden",
            // Chunks too: verified and stored straight from the buffer.
            ".nomoat.v1.ChunkData.data",
            ".nomoat.v1.ManifestData.manifest",
        ])
        .compile_fds(fds)?;
    Ok(())
}
