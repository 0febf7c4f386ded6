use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::{ggml_file, gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use nomoat_protocol::{Hash, Manifest, ModelFormat};

use crate::store::ChunkStore;

use super::config::ModelConfig;
use super::{EngineError, Result};

/// Largest safetensors header nomoat reads (the JSON index of tensors).
pub const MAX_SAFETENSORS_HEADER: u64 = 100 * 1024 * 1024;

/// How quantized weights are kept in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WeightMode {
    /// Keep formats that have a fast CPU kernel (Q4_0, Q4_1, Q5_0, Q8_0,
    /// Q2_K..Q4_K, Q6_K); repack the others (Q5_1, Q5_K, Q8_1) into Q8_0
    /// at load time.
    #[default]
    Fast,
    /// Load as `fast` does. Products run on the stored blocks alone in
    /// every mode now (no weight is ever held twice: see
    /// `engine/compact.rs`), so this is `fast` under the name
    /// `serve --max-memory` has always used.
    Compact,
    /// Keep every tensor in the format the file stores it in.
    Exact,
    /// Dequantize everything to f32 (4 bytes per weight; the slow baseline).
    F32,
}

impl std::str::FromStr for WeightMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fast" => Ok(Self::Fast),
            "compact" => Ok(Self::Compact),
            "exact" => Ok(Self::Exact),
            "f32" => Ok(Self::F32),
            other => Err(format!(
                "unknown weight mode `{other}`: use fast, compact, exact or f32"
            )),
        }
    }
}

/// A weight as read from the file, before it becomes a layer.
#[derive(Debug)]
pub(crate) enum RawWeight {
    /// A GGUF tensor (any ggml type).
    Quant(QTensor),
    /// A safetensors tensor, converted to f32.
    Dense(Tensor),
}

impl RawWeight {
    pub(crate) fn dims(&self) -> &[usize] {
        match self {
            Self::Quant(q) => q.shape().dims(),
            Self::Dense(t) => t.dims(),
        }
    }

    /// The weight as an f32 tensor.
    pub(crate) fn dequantize(&self) -> Result<Tensor> {
        Ok(match self {
            Self::Quant(q) => q.dequantize(&Device::Cpu)?,
            Self::Dense(t) => t.clone(),
        })
    }
}

#[derive(Debug)]
struct SafetensorEntry {
    file: usize,
    dtype: String,
    shape: Vec<usize>,
    start: u64,
    end: u64,
}

#[derive(Debug)]
enum Backing {
    Gguf {
        content: gguf_file::Content,
        file: Mutex<File>,
    },
    Safetensors {
        files: Vec<(PathBuf, Mutex<File>)>,
        entries: HashMap<String, SafetensorEntry>,
        dir: PathBuf,
    },
    /// A model in the weight store: tensors are rebuilt from its verified
    /// chunks (a span reads only its own).
    Store {
        store: ChunkStore,
        manifest: Arc<Manifest>,
        /// Manifest index of each tensor, by the manifest's (file's) name.
        index: HashMap<String, usize>,
        /// The parsed GGUF header, for a GGUF model.
        gguf: Option<gguf_file::Content>,
    },
}

/// Where an imported tensor's bytes are in the original files.
#[derive(Debug, Clone)]
pub(crate) struct TensorSource {
    pub(crate) name: String,
    pub(crate) dtype: String,
    pub(crate) shape: Vec<u64>,
    pub(crate) path: PathBuf,
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

/// Bytes of a GGUF tensor's data, `None` for an impossible shape.
fn gguf_tensor_bytes(info: &gguf_file::TensorInfo) -> Option<u64> {
    let elems = info
        .shape
        .dims()
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d as u64));
    let block = info.ggml_dtype.block_size().max(1) as u64;
    elems
        .filter(|e| e % block == 0)
        .and_then(|e| (e / block).checked_mul(info.ggml_dtype.type_size() as u64))
}

fn dense_from_bytes(name: &str, dtype: &str, shape: &[usize], buf: &[u8]) -> Result<RawWeight> {
    let dtype = match dtype {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        other => {
            return Err(EngineError::UnsupportedDType {
                tensor: name.to_string(),
                dtype: other.to_string(),
            })
        }
    };
    let t = Tensor::from_raw_buffer(buf, dtype, shape, &Device::Cpu)?.to_dtype(DType::F32)?;
    Ok(RawWeight::Dense(t))
}

/// An opened model: its config and a way to read any tensor by name,
/// without loading anything up front.
#[derive(Debug)]
pub struct ModelFile {
    path: PathBuf,
    config: ModelConfig,
    backing: Backing,
}

impl ModelFile {
    /// Opens a `.gguf` file, or a directory with `config.json` and
    /// `*.safetensors` files.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if path.is_dir() {
            Self::open_safetensors_dir(path)
        } else {
            Self::open_gguf(path)
        }
    }

    fn open_gguf(path: PathBuf) -> Result<Self> {
        let io = |source| EngineError::Io {
            path: path.clone(),
            source,
        };
        let mut file = File::open(&path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let (content, config) = gguf_header(&path, &mut file, file_len)?;
        Self {
            path,
            config,
            backing: Backing::Gguf {
                content,
                file: Mutex::new(file),
            },
        }
        .with_rope_factors()
    }

    /// Applies GGUF `rope_freqs.weight` to the config when the model has it.
    fn with_rope_factors(mut self) -> Result<Self> {
        if self.has_tensor("rope_freqs.weight") {
            let t = self.read("rope_freqs.weight")?.dequantize()?;
            let f = t.flatten_all()?.to_vec1::<f32>()?;
            self.config.rope_scaling = super::config::RopeScaling::Factors(f);
            self.config = self.config.clone().validate()?;
        }
        Ok(self)
    }

    /// Opens model `id` from the weight store. Nothing is read but the
    /// manifest: tensors are rebuilt from their chunks when read, so a span
    /// needs only its own chunks in the store.
    pub fn open_store(store: &ChunkStore, id: &Hash) -> Result<Self> {
        let manifest = Arc::new(store.manifest(id)?);
        Self::from_manifest(store.clone(), manifest, store.manifest_path(id))
    }

    fn from_manifest(store: ChunkStore, manifest: Arc<Manifest>, path: PathBuf) -> Result<Self> {
        let corrupt = |reason: String| EngineError::Corrupt {
            path: path.clone(),
            reason,
        };
        let index: HashMap<String, usize> = manifest
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        match manifest.format {
            ModelFormat::Gguf => {
                let content = read_gguf(&mut std::io::Cursor::new(&manifest.header))
                    .map_err(|e| corrupt(format!("GGUF header: {e}")))?;
                for (name, info) in &content.tensor_infos {
                    let entry = index.get(name).map(|&i| &manifest.tensors[i]);
                    let bytes = gguf_tensor_bytes(info);
                    let dtype = format!("{:?}", info.ggml_dtype);
                    if entry.map(|e| (Some(e.byte_len), &e.dtype)) != Some((bytes, &dtype)) {
                        return Err(corrupt(format!(
                            "tensor `{name}` of the GGUF header does not match the manifest's"
                        )));
                    }
                }
                let config = gguf_config(&content)?;
                Self {
                    path,
                    config,
                    backing: Backing::Store {
                        store,
                        manifest,
                        index,
                        gguf: Some(content),
                    },
                }
                .with_rope_factors()
            }
            ModelFormat::Safetensors => {
                for t in &manifest.tensors {
                    let elem = match t.dtype.as_str() {
                        "F32" => 4,
                        "F16" | "BF16" => 2,
                        _ => 1,
                    };
                    let bytes = t.shape.iter().try_fold(elem, |a: u64, &d| a.checked_mul(d));
                    if bytes != Some(t.byte_len) {
                        return Err(corrupt(format!(
                            "tensor `{}` has {} bytes for shape {:?} and dtype {}",
                            t.name, t.byte_len, t.shape, t.dtype
                        )));
                    }
                }
                let text = std::str::from_utf8(&manifest.header)
                    .map_err(|e| corrupt(format!("config.json: {e}")))?;
                let config = ModelConfig::from_hf_json(text)?;
                let config = ModelConfig {
                    tie_word_embeddings: config.tie_word_embeddings
                        || !index.contains_key("lm_head.weight"),
                    ..config
                };
                Ok(Self {
                    path,
                    config,
                    backing: Backing::Store {
                        store,
                        manifest,
                        index,
                        gguf: None,
                    },
                })
            }
            ModelFormat::Lora => Err(corrupt(
                "this id is a LoRA adapter, not a model: pass the base model as --model and this id as --adapter".into(),
            )),
            _ => Err(corrupt("unknown model format".into())),
        }
    }

    /// The manifest, for a model opened from the weight store.
    pub fn manifest(&self) -> Option<&Manifest> {
        match &self.backing {
            Backing::Store { manifest, .. } => Some(manifest),
            _ => None,
        }
    }

    /// `tokenizer.json` and `tokenizer_config.json` of a safetensors model
    /// opened from the weight store.
    pub fn tokenizer_json(&self) -> Option<(&[u8], &[u8])> {
        match &self.backing {
            Backing::Store {
                manifest,
                gguf: None,
                ..
            } => Some((&manifest.tokenizer, &manifest.tokenizer_config)),
            _ => None,
        }
    }

    /// Where each tensor's bytes are in the original files, in file order,
    /// and (GGUF) the length of the header before the tensor data.
    pub(crate) fn tensor_sources(&self) -> (Vec<TensorSource>, Option<u64>) {
        match &self.backing {
            Backing::Gguf { content, .. } => {
                let mut out: Vec<TensorSource> = content
                    .tensor_infos
                    .iter()
                    .map(|(name, info)| TensorSource {
                        name: name.clone(),
                        dtype: format!("{:?}", info.ggml_dtype),
                        shape: info.shape.dims().iter().map(|&d| d as u64).collect(),
                        path: self.path.clone(),
                        offset: content.tensor_data_offset + info.offset,
                        // Checked when the file was opened.
                        len: gguf_tensor_bytes(info).unwrap_or(0),
                    })
                    .collect();
                out.sort_by_key(|t| t.offset);
                (out, Some(content.tensor_data_offset))
            }
            Backing::Safetensors { files, entries, .. } => {
                let mut out: Vec<(usize, TensorSource)> = entries
                    .iter()
                    .map(|(name, e)| {
                        (
                            e.file,
                            TensorSource {
                                name: name.clone(),
                                dtype: e.dtype.clone(),
                                shape: e.shape.iter().map(|&d| d as u64).collect(),
                                path: files[e.file].0.clone(),
                                offset: e.start,
                                len: e.end - e.start,
                            },
                        )
                    })
                    .collect();
                out.sort_by_key(|(f, t)| (*f, t.offset));
                (out.into_iter().map(|(_, t)| t).collect(), None)
            }
            Backing::Store { .. } => (Vec::new(), None),
        }
    }

    /// Every tensor's role, stored type and shape, from the header alone.
    pub fn stored_tensors(&self) -> Vec<super::StoredTensor> {
        match &self.backing {
            Backing::Store { manifest, .. } => manifest
                .tensors
                .iter()
                .map(|t| super::StoredTensor {
                    role: t.role,
                    dtype: t.dtype.clone(),
                    shape: t.shape.clone(),
                })
                .collect(),
            _ => self
                .tensor_sources()
                .0
                .into_iter()
                .map(|t| super::StoredTensor {
                    role: crate::weights::import::tensor_role(&t.name),
                    dtype: t.dtype,
                    shape: t.shape,
                })
                .collect(),
        }
    }

    /// A tensor's bytes, rebuilt from its chunks in the store.
    fn store_bytes(&self, store: &ChunkStore, manifest: &Manifest, i: usize) -> Result<Vec<u8>> {
        let entry = &manifest.tensors[i];
        let mut buf = Vec::with_capacity(entry.byte_len as usize);
        for (c, hash) in entry.chunks.iter().enumerate() {
            let before = buf.len();
            if !store.read_into(hash, &mut buf)? {
                return Err(EngineError::MissingChunk {
                    tensor: entry.name.clone(),
                    chunk: hash.to_string(),
                });
            }
            if buf.len() - before != entry.chunk_len(c, manifest.chunk_size) as usize {
                return Err(EngineError::Corrupt {
                    path: store.chunk_path(hash),
                    reason: format!(
                        "stored chunk has {} bytes, the manifest says {}: run `nomoat verify`",
                        buf.len() - before,
                        entry.chunk_len(c, manifest.chunk_size)
                    ),
                });
            }
        }
        Ok(buf)
    }

    fn open_safetensors_dir(dir: PathBuf) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|source| EngineError::Io {
            path: cfg_path.clone(),
            source,
        })?;
        let config = ModelConfig::from_hf_json(&text)?;
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|source| EngineError::Io {
                path: dir.clone(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        names.sort();
        if names.is_empty() {
            return Err(EngineError::Corrupt {
                path: dir,
                reason: "no .safetensors files in the directory".into(),
            });
        }
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for (idx, p) in names.into_iter().enumerate() {
            let mut f = File::open(&p).map_err(|source| EngineError::Io {
                path: p.clone(),
                source,
            })?;
            let file_len = f
                .metadata()
                .map_err(|source| EngineError::Io {
                    path: p.clone(),
                    source,
                })?
                .len();
            for (name, entry) in read_safetensors_header(&p, &mut f, file_len, idx)? {
                entries.insert(name, entry);
            }
            files.push((p, Mutex::new(f)));
        }
        let config = ModelConfig {
            tie_word_embeddings: config.tie_word_embeddings
                || !entries.contains_key("lm_head.weight"),
            ..config
        };
        Ok(Self {
            path: dir.clone(),
            config,
            backing: Backing::Safetensors {
                files,
                entries,
                dir,
            },
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Where the model was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF metadata, when the model is a GGUF file.
    pub fn gguf_metadata(&self) -> Option<&HashMap<String, gguf_file::Value>> {
        match &self.backing {
            Backing::Gguf { content, .. }
            | Backing::Store {
                gguf: Some(content),
                ..
            } => Some(&content.metadata),
            Backing::Safetensors { .. } | Backing::Store { .. } => None,
        }
    }

    /// The directory of a safetensors model (where `tokenizer.json` lives).
    pub fn directory(&self) -> Option<&Path> {
        match &self.backing {
            Backing::Gguf { .. } | Backing::Store { .. } => None,
            Backing::Safetensors { dir, .. } => Some(dir),
        }
    }

    fn hf_name(name: &str) -> String {
        fn map_block(rest: &str) -> &str {
            match rest {
                "attn_norm.weight" => "input_layernorm.weight",
                "attn_q.weight" => "self_attn.q_proj.weight",
                "attn_q.bias" => "self_attn.q_proj.bias",
                "attn_k.weight" => "self_attn.k_proj.weight",
                "attn_k.bias" => "self_attn.k_proj.bias",
                "attn_v.weight" => "self_attn.v_proj.weight",
                "attn_v.bias" => "self_attn.v_proj.bias",
                "attn_output.weight" => "self_attn.o_proj.weight",
                "ffn_norm.weight" => "post_attention_layernorm.weight",
                "ffn_gate.weight" => "mlp.gate_proj.weight",
                "ffn_up.weight" => "mlp.up_proj.weight",
                "ffn_down.weight" => "mlp.down_proj.weight",
                other => other,
            }
        }
        match name {
            "token_embd.weight" => "model.embed_tokens.weight".into(),
            "output_norm.weight" => "model.norm.weight".into(),
            "output.weight" => "lm_head.weight".into(),
            _ => match name.strip_prefix("blk.").and_then(|r| r.split_once('.')) {
                Some((idx, rest)) => format!("model.layers.{idx}.{}", map_block(rest)),
                None => name.to_string(),
            },
        }
    }

    /// Whether the file holds a tensor (GGUF naming).
    pub(crate) fn has_tensor(&self, name: &str) -> bool {
        match &self.backing {
            Backing::Gguf { content, .. } => content.tensor_infos.contains_key(name),
            Backing::Safetensors { entries, .. } => entries.contains_key(&Self::hf_name(name)),
            Backing::Store {
                gguf: Some(content),
                ..
            } => content.tensor_infos.contains_key(name),
            Backing::Store { index, .. } => index.contains_key(&Self::hf_name(name)),
        }
    }

    /// Reads one tensor (GGUF naming; safetensors names are mapped).
    pub(crate) fn read(&self, name: &str) -> Result<RawWeight> {
        match &self.backing {
            Backing::Gguf { content, file } => {
                let info = content
                    .tensor_infos
                    .get(name)
                    .ok_or_else(|| EngineError::MissingTensor(name.to_string()))?;
                check_ggml_dtype(name, info.ggml_dtype)?;
                let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
                let q = info
                    .read(&mut *f, content.tensor_data_offset, &Device::Cpu)
                    .map_err(|e| EngineError::Corrupt {
                        path: self.path.clone(),
                        reason: format!("tensor `{name}`: {e}"),
                    })?;
                Ok(RawWeight::Quant(q))
            }
            Backing::Safetensors { files, entries, .. } => {
                let hf = Self::hf_name(name);
                let e = entries
                    .get(&hf)
                    .ok_or_else(|| EngineError::MissingTensor(hf.clone()))?;
                let (path, file) = &files[e.file];
                let mut buf = vec![0u8; (e.end - e.start) as usize];
                {
                    let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
                    f.seek(SeekFrom::Start(e.start))
                        .and_then(|_| f.read_exact(&mut buf))
                        .map_err(|source| EngineError::Io {
                            path: path.clone(),
                            source,
                        })?;
                }
                dense_from_bytes(&hf, &e.dtype, &e.shape, &buf)
            }
            Backing::Store {
                store,
                manifest,
                index,
                gguf: Some(content),
            } => {
                let info = content
                    .tensor_infos
                    .get(name)
                    .ok_or_else(|| EngineError::MissingTensor(name.to_string()))?;
                check_ggml_dtype(name, info.ggml_dtype)?;
                let i = *index
                    .get(name)
                    .ok_or_else(|| EngineError::MissingTensor(name.to_string()))?;
                let data = self.store_bytes(store, manifest, i)?;
                let q = ggml_file::qtensor_from_ggml(
                    info.ggml_dtype,
                    &data,
                    info.shape.dims().to_vec(),
                    &Device::Cpu,
                )
                .map_err(|e| EngineError::Corrupt {
                    path: self.path.clone(),
                    reason: format!("tensor `{name}`: {e}"),
                })?;
                Ok(RawWeight::Quant(q))
            }
            Backing::Store {
                store,
                manifest,
                index,
                gguf: None,
            } => {
                let hf = Self::hf_name(name);
                let i = *index
                    .get(&hf)
                    .ok_or_else(|| EngineError::MissingTensor(hf.clone()))?;
                let e = &manifest.tensors[i];
                let shape: Vec<usize> = e.shape.iter().map(|&d| d as usize).collect();
                let data = self.store_bytes(store, manifest, i)?;
                dense_from_bytes(&hf, &e.dtype, &shape, &data)
            }
        }
    }
}

fn check_ggml_dtype(name: &str, dtype: GgmlDType) -> Result<()> {
    use GgmlDType as G;
    match dtype {
        G::F32
        | G::F16
        | G::BF16
        | G::Q4_0
        | G::Q4_1
        | G::Q5_0
        | G::Q5_1
        | G::Q8_0
        | G::Q2K
        | G::Q3K
        | G::Q4K
        | G::Q5K
        | G::Q6K => Ok(()),
        other => Err(EngineError::UnsupportedDType {
            tensor: name.to_string(),
            dtype: format!("{other:?}"),
        }),
    }
}

fn read_safetensors_header<R: Read>(
    path: &Path,
    f: &mut R,
    file_len: u64,
    file_idx: usize,
) -> Result<Vec<(String, SafetensorEntry)>> {
    let corrupt = |reason: String| EngineError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let io = |source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut len_buf = [0u8; 8];
    f.read_exact(&mut len_buf)
        .map_err(|_| corrupt("shorter than a safetensors header".into()))?;
    let header_len = u64::from_le_bytes(len_buf);
    if header_len > MAX_SAFETENSORS_HEADER || 8 + header_len > file_len {
        return Err(corrupt(format!(
            "header length {header_len} does not fit the file of {file_len} bytes"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(io)?;
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| corrupt(format!("header JSON: {e}")))?;
    let data_start = 8 + header_len;
    let mut out = Vec::new();
    for (name, v) in json {
        if name == "__metadata__" {
            continue;
        }
        let dtype = v["dtype"]
            .as_str()
            .ok_or_else(|| corrupt(format!("`{name}` has no dtype")))?
            .to_string();
        let shape: Vec<usize> = v["shape"]
            .as_array()
            .ok_or_else(|| corrupt(format!("`{name}` has no shape")))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| corrupt(format!("`{name}` has a bad shape")))?;
        let offs = v["data_offsets"]
            .as_array()
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
            .ok_or_else(|| corrupt(format!("`{name}` has bad data_offsets")))?;
        let elem = match dtype.as_str() {
            "F32" => 4,
            "F16" | "BF16" => 2,
            _ => 1,
        };
        let expected = shape
            .iter()
            .try_fold(elem as u64, |a, &d| a.checked_mul(d as u64));
        let window = data_start
            .checked_add(offs.0)
            .zip(data_start.checked_add(offs.1));
        let Some((start, end)) = window.filter(|_| offs.1 >= offs.0) else {
            return Err(corrupt(format!(
                "`{name}` has data_offsets [{}, {}) past any file",
                offs.0, offs.1
            )));
        };
        if end > file_len || expected != Some(offs.1 - offs.0) {
            return Err(corrupt(format!(
                "`{name}` data [{}, {}) does not match its shape {shape:?} or the file size",
                offs.0, offs.1
            )));
        }
        out.push((
            name,
            SafetensorEntry {
                file: file_idx,
                dtype,
                shape,
                start,
                end,
            },
        ));
    }
    Ok(out)
}

/// The model's config from a GGUF header's metadata and tensor names.
fn gguf_config(content: &gguf_file::Content) -> Result<ModelConfig> {
    let vocab_hint = content
        .tensor_infos
        .get("token_embd.weight")
        .and_then(|t| t.shape.dims().first().copied());
    let mut config = ModelConfig::from_gguf(&content.metadata, vocab_hint)?;
    config.tie_word_embeddings = !content.tensor_infos.contains_key("output.weight");
    Ok(config)
}

/// Reads and checks a GGUF header: the model's config from its metadata,
/// and every tensor's shape and extent against a file of `file_len` bytes.
fn gguf_header<R: Read + Seek>(
    path: &Path,
    r: &mut R,
    file_len: u64,
) -> Result<(gguf_file::Content, ModelConfig)> {
    let corrupt = |reason: String| EngineError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let content = read_gguf(r).map_err(corrupt)?;
    let config = gguf_config(&content)?;
    for (name, info) in &content.tensor_infos {
        let Some(bytes) = gguf_tensor_bytes(info) else {
            return Err(corrupt(format!(
                "tensor `{name}` has an impossible shape {:?} for {:?}",
                info.shape.dims(),
                info.ggml_dtype
            )));
        };
        let end = content
            .tensor_data_offset
            .saturating_add(info.offset)
            .saturating_add(bytes);
        if end > file_len {
            return Err(corrupt(format!(
                "tensor `{name}` ends at byte {end} but the file has {file_len} bytes (truncated download?)"
            )));
        }
    }
    Ok((content, config))
}

/// What opening a GGUF file checks, on its bytes in memory: the model's
/// config, or the typed error a file or a peer's manifest would get.
/// Decoders of untrusted input are fuzzed through this.
pub fn check_gguf_bytes(bytes: &[u8]) -> Result<ModelConfig> {
    let path = Path::new("<gguf bytes>");
    let (_, config) = gguf_header(path, &mut std::io::Cursor::new(bytes), bytes.len() as u64)?;
    Ok(config)
}

/// What opening a safetensors file checks, on its bytes in memory: the
/// number of tensors its header indexes, or the typed error.
pub fn check_safetensors_bytes(bytes: &[u8]) -> Result<usize> {
    let path = Path::new("<safetensors bytes>");
    let entries = read_safetensors_header(
        path,
        &mut std::io::Cursor::new(bytes),
        bytes.len() as u64,
        0,
    )?;
    Ok(entries.len())
}

/// Reads a GGUF header with candle, which panics on some invalid headers
/// (`general.alignment = 0` divides by zero): a panic becomes an error,
/// since headers come from files and peers nobody vouches for.
fn read_gguf<R: std::io::Read + std::io::Seek>(
    r: &mut R,
) -> std::result::Result<gguf_file::Content, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| gguf_file::Content::read(r))) {
        Ok(Ok(content)) => Ok(content),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(format!(
                "invalid GGUF header (the parser failed: {what}; is general.alignment zero?)"
            ))
        }
    }
}
