//! Compiles `proto/nomoat/v1/*.proto` with protox (no system protoc), and
//! writes the field numbers of every message to `OUT_DIR/field_numbers.txt`
//! (one `Message.field number` a line), against which the crate's named
//! field numbers are tested.

use std::fmt::Write as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time: a build script compiled for one checkout may be reused
    // by another in the same target directory.
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let files = [
        "nomoat/v1/infer.proto",
        "nomoat/v1/info.proto",
        "nomoat/v1/weights.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(files, [&root])?;
    let mut numbers = String::new();
    for file in &fds.file {
        for message in &file.message_type {
            for field in &message.field {
                writeln!(
                    numbers,
                    "{}.{} {}",
                    message.name(),
                    field.name(),
                    field.number()
                )?;
            }
        }
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("field_numbers.txt"), numbers)?;
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
