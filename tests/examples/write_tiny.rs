//! Writes the tiny random llama (f32) used by the tests to a GGUF file:
//! `cargo run -p nomoat-tests --example write_tiny -- PATH [BLOCKS]`.
//! Useful to measure network overhead without compute (`nomoat bench swarm`).

use candle_core::quantized::GgmlDType;
use nomoat_tests::{TinyArch, TinyModel, TinySpec};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "tiny.gguf".into());
    let mut spec = TinySpec::new(TinyArch::Llama);
    if let Some(b) = args.next() {
        spec.blocks = b.parse()?;
    }
    spec.context = 4096;
    TinyModel::generate(spec)?.write_gguf(std::path::Path::new(&path), GgmlDType::F32)?;
    println!("{path}");
    Ok(())
}
