//! LoRA adapters as shared content: read from a PEFT directory or a GGUF
//! LoRA file, checked against the base model, and kept in the store as a
//! manifest (format `Lora`) whose tensors are per block, so a server
//! fetches only its span's part, verified like weights. An adapter's id is
//! its manifest's hash.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use nomoat_protocol::{Hash, Manifest, ModelFormat, TensorEntry, TensorRole, CHUNK_SIZE};

use crate::engine::adapter::{
    f32_tensor, lora_name, parse_lora_name, permute_rows_for_interleaved_rope, LORA_TARGETS,
    MAX_LORA_RANK,
};
use crate::engine::{AdapterMeta, AdapterWeights, Arch, EngineError, ModelConfig};
use crate::store::{ChunkStore, StoreError};

/// Largest adapter file read (a rank-1024 adapter of a 7B model is ~4 GB;
/// this is a bound on a stranger's file, not a target).
pub const MAX_ADAPTER_BYTES: u64 = 8 << 30;

/// Why an adapter could not be imported or opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdapterError {
    /// The adapter is malformed or does not fit the base.
    #[error("{path}: {source}")]
    Bad {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: EngineError,
    },
    /// Reading failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The path is neither a PEFT directory nor a GGUF file.
    #[error("{0} is neither a PEFT adapter directory (adapter_config.json and adapter_model.safetensors) nor a GGUF LoRA file")]
    Unknown(PathBuf),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The id names a model, not an adapter.
    #[error("{0} is a model, not an adapter: pass it as --model")]
    NotAdapter(Hash),
    /// A stored adapter is damaged.
    #[error("adapter {id}: {reason}; import it again or fetch it from peers")]
    Corrupt {
        /// The adapter.
        id: Hash,
        /// What is wrong.
        reason: String,
    },
    /// The manifest would break a protocol limit.
    #[error("the adapter cannot be described by a manifest: {0}")]
    Manifest(#[from] nomoat_protocol::MessageError),
}

fn bad(path: &Path, msg: impl Into<String>) -> AdapterError {
    AdapterError::Bad {
        path: path.to_path_buf(),
        source: EngineError::Adapter(msg.into()),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, AdapterError> {
    let io = |source| AdapterError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_ADAPTER_BYTES {
        return Err(bad(
            path,
            format!("{len} bytes, more than the {MAX_ADAPTER_BYTES} an adapter may have"),
        ));
    }
    std::fs::read(path).map_err(io)
}

/// Reads an adapter (a PEFT directory or a GGUF LoRA file) for a base of
/// `cfg` served as `base_id`, in the base's layout, and checks it.
pub fn read_adapter(
    path: &Path,
    cfg: &ModelConfig,
    base_id: &str,
) -> Result<AdapterWeights, AdapterError> {
    let w = if path.join("adapter_config.json").is_file() {
        read_peft(path, cfg, base_id)?
    } else if path.is_file() {
        read_gguf_lora(path, cfg, base_id)?
    } else {
        return Err(AdapterError::Unknown(path.to_path_buf()));
    };
    w.validate(cfg).map_err(|source| AdapterError::Bad {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(w)
}

/// The GGUF target name of a PEFT module name.
fn peft_target(module: &str) -> Option<&'static str> {
    LORA_TARGETS
        .iter()
        .find(|(_, hf)| *hf == module)
        .map(|(g, _)| *g)
}

fn read_peft(dir: &Path, cfg: &ModelConfig, base_id: &str) -> Result<AdapterWeights, AdapterError> {
    let config_path = dir.join("adapter_config.json");
    let text = read(&config_path)?;
    let c: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| bad(&config_path, format!("not JSON: {e}")))?;
    if c["peft_type"].as_str().is_some_and(|t| t != "LORA") {
        return Err(bad(
            &config_path,
            format!("peft_type is {}, only LORA is supported", c["peft_type"]),
        ));
    }
    let flag = |k: &str| c[k].as_bool().unwrap_or(false);
    for (k, why) in [
        ("use_dora", "DoRA adapters"),
        ("fan_in_fan_out", "fan_in_fan_out layouts"),
    ] {
        if flag(k) {
            return Err(bad(&config_path, format!("{why} ({k}) are not supported")));
        }
    }
    if c["bias"].as_str().is_some_and(|b| b != "none") {
        return Err(bad(
            &config_path,
            format!("bias = {} is not supported: only `none`", c["bias"]),
        ));
    }
    if c["modules_to_save"]
        .as_array()
        .is_some_and(|m| !m.is_empty())
    {
        return Err(bad(
            &config_path,
            "modules_to_save (fully trained modules) is not supported",
        ));
    }
    let rank = c["r"]
        .as_u64()
        .filter(|&r| r >= 1 && r as usize <= MAX_LORA_RANK)
        .ok_or_else(|| {
            bad(
                &config_path,
                format!("r = {} is not a rank 1..={MAX_LORA_RANK}", c["r"]),
            )
        })?;
    let alpha = c["lora_alpha"].as_f64().unwrap_or(rank as f64);
    let scale = if flag("use_rslora") {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    };
    if c["rank_pattern"].as_object().is_some_and(|m| !m.is_empty())
        || c["alpha_pattern"]
            .as_object()
            .is_some_and(|m| !m.is_empty())
    {
        return Err(bad(
            &config_path,
            "rank_pattern and alpha_pattern (per-module ranks) are not supported",
        ));
    }
    let st_path = dir.join("adapter_model.safetensors");
    if !st_path.is_file() {
        return Err(bad(
            dir,
            "no adapter_model.safetensors (adapter_model.bin, a pickle, is not read: convert it with PEFT's save_pretrained(safe_serialization=True))",
        ));
    }
    let bytes = read(&st_path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(&st_path, format!("not a safetensors file: {e}")))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        // base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}[.default].weight
        let unsupported = || {
            bad(
                &st_path,
                format!("`{name}` is not a LoRA update of a block's projection"),
            )
        };
        let rest = name
            .split_once("layers.")
            .map(|(_, r)| r)
            .ok_or_else(unsupported)?;
        let (block, rest) = rest.split_once('.').ok_or_else(unsupported)?;
        let block: usize = block.parse().map_err(|_| unsupported())?;
        let parts: Vec<&str> = rest.split('.').collect();
        let ab = parts
            .iter()
            .position(|p| *p == "lora_A" || *p == "lora_B")
            .ok_or_else(unsupported)?;
        let module = ab
            .checked_sub(1)
            .map(|i| parts[i])
            .ok_or_else(unsupported)?;
        let target = peft_target(module).ok_or_else(|| {
            bad(
                &st_path,
                format!("`{name}`: module `{module}` is not a projection nomoat adapts (q/k/v/o_proj, gate/up/down_proj)"),
            )
        })?;
        let is_b = parts[ab] == "lora_B";
        let dtype = format!("{:?}", view.dtype());
        let t = f32_tensor(&name, &dtype, view.shape(), view.data()).map_err(|source| {
            AdapterError::Bad {
                path: st_path.clone(),
                source,
            }
        })?;
        let t = if is_b && cfg.rope_interleaved && (target == "attn_q" || target == "attn_k") {
            let heads = if target == "attn_q" {
                cfg.num_heads
            } else {
                cfg.num_kv_heads
            };
            permute_rows_for_interleaved_rope(&t, heads).map_err(|source| AdapterError::Bad {
                path: st_path.clone(),
                source,
            })?
        } else {
            t
        };
        if tensors.insert(lora_name(block, target, is_b), t).is_some() {
            return Err(bad(&st_path, format!("`{name}` is given twice")));
        }
    }
    Ok(AdapterWeights {
        meta: meta(cfg, base_id, rank as u32, scale as f32, &tensors, "peft"),
        tensors,
    })
}

fn meta(
    cfg: &ModelConfig,
    base_id: &str,
    rank: u32,
    scale: f32,
    tensors: &BTreeMap<String, Tensor>,
    source: &str,
) -> AdapterMeta {
    let mut targets: Vec<String> = LORA_TARGETS
        .iter()
        .filter(|(g, _)| {
            tensors
                .keys()
                .any(|n| parse_lora_name(n).is_some_and(|(_, t, _)| LORA_TARGETS[t].0 == *g))
        })
        .map(|(g, _)| g.to_string())
        .collect();
    targets.dedup();
    AdapterMeta {
        base: base_id.to_string(),
        architecture: cfg.arch.name().to_string(),
        num_blocks: cfg.num_blocks as u32,
        hidden_size: cfg.hidden_size as u32,
        rank,
        scale,
        targets,
        source: source.to_string(),
    }
}

fn read_gguf_lora(
    path: &Path,
    cfg: &ModelConfig,
    base_id: &str,
) -> Result<AdapterWeights, AdapterError> {
    let bytes = read(path)?;
    let mut cur = std::io::Cursor::new(&bytes);
    let content = gguf_file::Content::read(&mut cur)
        .map_err(|e| bad(path, format!("not a GGUF file: {e}")))?;
    let text = |k: &str| {
        content
            .metadata
            .get(k)
            .and_then(|v| v.to_string().ok())
            .cloned()
    };
    if text("general.type").as_deref() != Some("adapter")
        || text("adapter.type").as_deref() != Some("lora")
    {
        return Err(bad(
            path,
            "this GGUF file is not a LoRA adapter (general.type = adapter, adapter.type = lora): a model goes in --model",
        ));
    }
    let arch = text("general.architecture").unwrap_or_default();
    if Arch::parse(&arch).ok() != Some(cfg.arch) {
        return Err(AdapterError::Bad {
            path: path.to_path_buf(),
            source: EngineError::Adapter(format!(
                "this adapter is for a {arch} model, and the base is a {} model; it cannot run on this model",
                cfg.arch.name()
            )),
        });
    }
    let alpha = content
        .metadata
        .get("adapter.lora.alpha")
        .and_then(|v| v.to_f32().ok())
        .unwrap_or(0.0);
    let mut tensors = BTreeMap::new();
    let mut rank = None;
    for (name, info) in &content.tensor_infos {
        let (stem, ab) = name
            .rsplit_once(".lora_")
            .ok_or_else(|| bad(path, format!("`{name}` is not a LoRA tensor")))?;
        let stem = stem.strip_suffix(".weight").unwrap_or(stem);
        let is_b = match ab {
            "a" => false,
            "b" => true,
            _ => return Err(bad(path, format!("`{name}` is not a LoRA tensor"))),
        };
        let key = format!("{stem}.lora_{ab}");
        let (block, target, _) = parse_lora_name(&key).ok_or_else(|| {
            bad(
                path,
                format!("`{name}` is not a LoRA update of a block's projection"),
            )
        })?;
        let q = info
            .read(&mut cur, content.tensor_data_offset, &Device::Cpu)
            .map_err(|e| bad(path, format!("tensor `{name}`: {e}")))?;
        let t = q
            .dequantize(&Device::Cpu)
            .map_err(|e| bad(path, format!("tensor `{name}`: {e}")))?;
        if !is_b {
            rank.get_or_insert(t.dims().first().copied().unwrap_or(0));
        }
        let target_name = LORA_TARGETS[target].0;
        // A GGUF LoRA has the rows of Q and K in GGUF order; a llama base
        // from safetensors keeps Hugging Face's, so they are put back.
        let t = if is_b
            && cfg.arch == Arch::Llama
            && !cfg.rope_interleaved
            && (target_name == "attn_q" || target_name == "attn_k")
        {
            let heads = if target_name == "attn_q" {
                cfg.num_heads
            } else {
                cfg.num_kv_heads
            };
            unpermute_rows(&t, heads).map_err(|source| AdapterError::Bad {
                path: path.to_path_buf(),
                source,
            })?
        } else {
            t
        };
        tensors.insert(lora_name(block, target_name, is_b), t);
    }
    let rank = rank.unwrap_or(0);
    let scale = if alpha == 0.0 {
        1.0
    } else {
        alpha / rank.max(1) as f32
    };
    Ok(AdapterWeights {
        meta: meta(cfg, base_id, rank as u32, scale, &tensors, "gguf"),
        tensors,
    })
}

/// The inverse of [`permute_rows_for_interleaved_rope`].
fn unpermute_rows(b: &Tensor, heads: usize) -> Result<Tensor, EngineError> {
    let (out, r) = b.dims2()?;
    if heads == 0 || out % (heads * 2) != 0 {
        return Err(EngineError::Adapter(format!(
            "cannot split {out} rows into {heads} rotary heads"
        )));
    }
    Ok(b.reshape((heads, out / heads / 2, 2, r))?
        .transpose(1, 2)?
        .reshape((out, r))?
        .contiguous()?)
}

/// What an adapter import did.
#[derive(Debug, Clone)]
pub struct AdapterImport {
    /// The adapter id.
    pub id: Hash,
    /// Its description.
    pub meta: AdapterMeta,
    /// Bytes of its tensors.
    pub bytes: u64,
    /// Chunks written now (0 when it was imported before).
    pub new_chunks: usize,
}

/// The manifest of an adapter, storing each tensor's chunks in `store`.
fn adapter_manifest(
    w: &AdapterWeights,
    store: &ChunkStore,
) -> Result<(Manifest, usize), AdapterError> {
    let mut tensors = Vec::with_capacity(w.tensors.len());
    let mut new_chunks = 0;
    for (name, t) in &w.tensors {
        let Some((block, _, _)) = parse_lora_name(name) else {
            continue;
        };
        let values = t
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| AdapterError::Bad {
                path: PathBuf::from(name),
                source: e.into(),
            })?;
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut chunks = Vec::new();
        for piece in data.chunks(CHUNK_SIZE as usize) {
            let h = Hash::of(piece);
            new_chunks += usize::from(store.put(&h, piece)?);
            chunks.push(h);
        }
        tensors.push(TensorEntry {
            name: name.clone(),
            role: TensorRole::Block(block as u32),
            dtype: "F32".into(),
            shape: t.dims().iter().map(|&d| d as u64).collect(),
            byte_len: data.len() as u64,
            chunks,
        });
    }
    let manifest = Manifest {
        format: ModelFormat::Lora,
        chunk_size: CHUNK_SIZE,
        architecture: w.meta.architecture.clone(),
        num_blocks: w.meta.num_blocks,
        header: serde_json::to_vec(&w.meta).unwrap_or_default(),
        tokenizer: Vec::new(),
        tokenizer_config: Vec::new(),
        tensors,
    };
    manifest.validate()?;
    Ok((manifest, new_chunks))
}

/// Reads the adapter at `path`, checks it against the base (`cfg`, served
/// as `base_id`) and stores it. Importing the same adapter twice gives the
/// same id.
pub fn import_adapter(
    store: &ChunkStore,
    path: &Path,
    cfg: &ModelConfig,
    base_id: &str,
) -> Result<AdapterImport, AdapterError> {
    let w = read_adapter(path, cfg, base_id)?;
    store_adapter(store, w)
}

/// Stores an adapter (already checked) and gives its id.
pub fn store_adapter(store: &ChunkStore, w: AdapterWeights) -> Result<AdapterImport, AdapterError> {
    let (manifest, new_chunks) = adapter_manifest(&w, store)?;
    let id = store.put_manifest(&manifest)?;
    Ok(AdapterImport {
        id,
        bytes: manifest.tensors.iter().map(|t| t.byte_len).sum(),
        meta: w.meta,
        new_chunks,
    })
}

/// A random adapter of `rank` on every target of every block of a base
/// of `cfg` served as `base_id` (for benchmarks: real adapters come from
/// `import-adapter`).
pub fn random_adapter(
    cfg: &ModelConfig,
    base_id: &str,
    rank: usize,
    seed: u64,
) -> Result<AdapterWeights, EngineError> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tensors = BTreeMap::new();
    for block in 0..cfg.num_blocks {
        for (t, (target, _)) in LORA_TARGETS.iter().enumerate() {
            let (out, inp) = crate::engine::adapter::target_shape(cfg, t);
            let mut draw = |rows: usize, cols: usize, scale: f32| {
                let v: Vec<f32> = (0..rows * cols)
                    .map(|_| scale * (rng.random::<f32>() * 2.0 - 1.0))
                    .collect();
                Tensor::from_vec(v, (rows, cols), &Device::Cpu)
            };
            tensors.insert(
                lora_name(block, target, false),
                draw(rank, inp, 1.0 / (inp as f32).sqrt())?,
            );
            tensors.insert(
                lora_name(block, target, true),
                draw(out, rank, 0.01 / (rank as f32).sqrt())?,
            );
        }
    }
    let w = AdapterWeights {
        meta: meta(cfg, base_id, rank as u32, 2.0, &tensors, "random"),
        tensors,
    };
    w.validate(cfg)?;
    Ok(w)
}

/// An adapter's description from its manifest.
pub fn adapter_meta(id: &Hash, manifest: &Manifest) -> Result<AdapterMeta, AdapterError> {
    if manifest.format != ModelFormat::Lora {
        return Err(AdapterError::NotAdapter(*id));
    }
    serde_json::from_slice(&manifest.header).map_err(|e| AdapterError::Corrupt {
        id: *id,
        reason: format!("its description is not valid: {e}"),
    })
}

/// Opens the stored adapter `id`: the tensors of `blocks` (every block
/// when `None`), checked against the base (`cfg`, served as `base_id`).
pub fn open_adapter(
    store: &ChunkStore,
    id: &Hash,
    cfg: &ModelConfig,
    base_id: &str,
    blocks: Option<Range<u32>>,
) -> Result<AdapterWeights, AdapterError> {
    let manifest = store.manifest(id)?;
    let meta = adapter_meta(id, &manifest)?;
    let corrupt = |reason: String| AdapterError::Corrupt { id: *id, reason };
    meta.check_base(base_id, cfg)
        .map_err(|source| AdapterError::Bad {
            path: store.manifest_path(id),
            source,
        })?;
    let mut tensors = BTreeMap::new();
    for t in &manifest.tensors {
        let TensorRole::Block(b) = t.role else {
            return Err(corrupt(format!("`{}` is not a block's tensor", t.name)));
        };
        if blocks.as_ref().is_some_and(|r| !r.contains(&b)) {
            continue;
        }
        let mut data = Vec::with_capacity(t.byte_len as usize);
        for (i, h) in t.chunks.iter().enumerate() {
            let before = data.len();
            if !store.read_into(h, &mut data)? {
                return Err(corrupt(format!("chunk {h} of `{}` is missing", t.name)));
            }
            if data.len() - before != t.chunk_len(i, manifest.chunk_size) as usize {
                return Err(corrupt(format!(
                    "chunk {h} of `{}` has the wrong size",
                    t.name
                )));
            }
        }
        let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
        let tensor =
            f32_tensor(&t.name, &t.dtype, &shape, &data).map_err(|e| corrupt(e.to_string()))?;
        tensors.insert(t.name.clone(), tensor);
    }
    let w = AdapterWeights { meta, tensors };
    if blocks.is_none() || !w.tensors.is_empty() {
        w.validate(cfg).map_err(|e| corrupt(e.to_string()))?;
    }
    Ok(w)
}

/// Opens a base model named as `--model` takes it (a catalog name, a file
/// or directory, or a stored model id) and gives its id as the swarm knows
/// it: the model id, or the BLAKE3 hash of the file.
pub fn open_base(
    store: &ChunkStore,
    spec: &str,
) -> Result<(crate::engine::ModelFile, String), BaseError> {
    if let Some(id) = super::parse_model_id(spec) {
        let file = crate::engine::ModelFile::open_store(store, &id)?;
        return Ok((file, id.to_hex()));
    }
    let path = crate::catalog::resolve(spec, true)?;
    let file = crate::engine::ModelFile::open(&path)?;
    let id = super::model_file_id(&path).map_err(|source| BaseError::Io { path, source })?;
    Ok((file, id))
}

/// Why a base model could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BaseError {
    /// Not in the catalog, or not fetched.
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    /// Not a model.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// It could not be hashed.
    #[error("hashing {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}
