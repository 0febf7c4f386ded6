//! `nomoat import`, `nomoat verify` and the fetch flags of `serve`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use nomoat_node::store::ChunkStore;
use nomoat_node::weights::fetch::{self, FetchConfig};
use nomoat_node::weights::serve::Fault;
use nomoat_protocol::Hash;

/// `nomoat import`.
#[derive(Debug, Args)]
pub(crate) struct ImportArgs {
    /// A .gguf file, or a directory with config.json, tokenizer.json and
    /// *.safetensors.
    path: PathBuf,
}

pub(crate) fn import(args: ImportArgs) -> Result<()> {
    let store = ChunkStore::open(&nomoat_node::catalog::home())?;
    let t = Instant::now();
    let r = nomoat_node::weights::import(&store, &args.path)?;
    eprintln!(
        "imported {}: {} blocks, {} tensors, {} chunks ({} new), {:.1} MB in {:.1} s",
        args.path.display(),
        r.manifest.num_blocks,
        r.manifest.tensors.len(),
        r.chunks,
        r.new_chunks,
        r.bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    println!("{}", r.id.to_hex());
    Ok(())
}

/// `nomoat import-adapter`.
#[derive(Debug, Args)]
pub(crate) struct ImportAdapterArgs {
    /// A PEFT directory (adapter_config.json and adapter_model.safetensors)
    /// or a GGUF LoRA file (as llama.cpp's convert_lora_to_gguf.py writes).
    path: PathBuf,
    /// The base model: a catalog name, a model file or directory, or a
    /// model id from `nomoat import` (stored here).
    #[arg(long, env = "NOMOAT_MODEL")]
    model: String,
    /// Print one JSON object instead of the id alone.
    #[arg(long)]
    json: bool,
}

pub(crate) fn import_adapter(args: ImportAdapterArgs) -> Result<()> {
    let store = ChunkStore::open(&nomoat_node::catalog::home())?;
    let t = Instant::now();
    let (file, base_id) = nomoat_node::weights::adapter::open_base(&store, &args.model)?;
    let r = nomoat_node::weights::import_adapter(&store, &args.path, file.config(), &base_id)?;
    eprintln!(
        "imported {}: rank {}, scale {}, targets {}, {:.1} MB ({} new chunks) in {:.2} s, for model {base_id}",
        args.path.display(),
        r.meta.rank,
        r.meta.scale,
        r.meta.targets.join(","),
        r.bytes as f64 / 1e6,
        r.new_chunks,
        t.elapsed().as_secs_f64()
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "id": r.id.to_hex(),
                "base": base_id,
                "rank": r.meta.rank,
                "scale": r.meta.scale,
                "targets": r.meta.targets,
                "bytes": r.bytes,
            })
        );
    } else {
        println!("{}", r.id.to_hex());
    }
    Ok(())
}

pub(crate) fn verify(model_id: &str) -> Result<()> {
    let id = Hash::from_hex(model_id).context("a model id is 64 hex digits")?;
    let store = ChunkStore::open(&nomoat_node::catalog::home())?;
    let r = store.verify(&id)?;
    println!(
        "model {}: {} chunks, {} verified, {} corrupt (deleted), {} not stored",
        id.to_hex(),
        r.total,
        r.good,
        r.bad.len(),
        r.missing
    );
    if !r.bad.is_empty() {
        bail!(
            "{} stored chunk(s) were corrupt and have been deleted; run `nomoat serve --model {} ... --bootstrap PEER` to fetch them again",
            r.bad.len(),
            id.to_hex()
        );
    }
    Ok(())
}

/// Fetch flags of `serve`.
#[derive(Debug, Args)]
pub(crate) struct FetchArgs {
    /// Cap on the download rate of weights, in MB/s (default: none).
    #[arg(long)]
    fetch_rate: Option<f64>,
    /// Seconds a peer may go without sending the next chunk before it counts
    /// as stalled (a fault; its chunks are fetched elsewhere).
    #[arg(long, default_value_t = fetch::DEFAULT_STALL_TIMEOUT.as_secs_f64())]
    fetch_stall_timeout: f64,
    /// Test-only fault injection: make this node's weight server misbehave
    /// (flip-chunks, tamper-manifest, stall).
    #[arg(long, hide = true, default_value = "none")]
    fault: Fault,
}

impl FetchArgs {
    /// The weight server's (test-only) misbehaviour.
    pub(crate) fn fault(&self) -> Fault {
        self.fault
    }

    /// The fetcher's settings.
    pub(crate) fn config(&self) -> FetchConfig {
        FetchConfig {
            stall_timeout: Duration::from_secs_f64(self.fetch_stall_timeout.max(0.1)),
            ..FetchConfig::default().with_max_rate(self.fetch_rate.map(|r| r * 1e6))
        }
    }
}
