//! `nomoat import`: a GGUF file or a safetensors directory becomes a
//! manifest and verified chunks in the weight store.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use nomoat_protocol::{Hash, Manifest, ModelFormat, TensorEntry, TensorRole, CHUNK_SIZE};

use crate::engine::{EngineError, ModelFile};
use crate::store::{ChunkStore, StoreError};

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// The model could not be opened (not a GGUF file or model directory).
    #[error("{0}")]
    Model(#[from] EngineError),
    /// The store could not take the chunks.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// Reading the model failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The manifest would break a protocol limit.
    #[error("the model cannot be described by a manifest: {0}")]
    Manifest(#[from] nomoat_protocol::MessageError),
}

/// What an import did.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// The model id (BLAKE3 of the manifest).
    pub id: Hash,
    /// The manifest.
    pub manifest: Manifest,
    /// Distinct chunks of the model.
    pub chunks: usize,
    /// Chunks written now (0 when the model was imported before).
    pub new_chunks: usize,
    /// Bytes of tensor data.
    pub bytes: u64,
}

/// The role of a tensor, by its GGUF or Hugging Face name.
pub fn tensor_role(name: &str) -> TensorRole {
    let block = name
        .strip_prefix("blk.")
        .or_else(|| name.strip_prefix("model.layers."))
        .and_then(|r| r.split_once('.'))
        .and_then(|(i, _)| i.parse().ok());
    match (block, name) {
        (Some(b), _) => TensorRole::Block(b),
        (None, "token_embd.weight" | "model.embed_tokens.weight") => TensorRole::Embedding,
        (None, "output_norm.weight" | "model.norm.weight") => TensorRole::OutputNorm,
        (None, "output.weight" | "lm_head.weight") => TensorRole::Output,
        _ => TensorRole::Shared,
    }
}

fn read_at(path: &Path, offset: u64, buf: &mut [u8]) -> Result<(), ImportError> {
    let io = |source| ImportError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(io)?;
    f.seek(SeekFrom::Start(offset)).map_err(io)?;
    f.read_exact(buf).map_err(io)
}

fn read_optional(path: &Path) -> Result<Vec<u8>, ImportError> {
    match std::fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(ImportError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Imports a `.gguf` file or a safetensors directory into `store`: every
/// chunk hashed and stored (those already there are not written again),
/// then the manifest. Importing the same model twice gives the same id.
pub fn import(store: &ChunkStore, path: &Path) -> Result<ImportReport, ImportError> {
    let file = ModelFile::open(path)?;
    let cfg = file.config();
    let (sources, gguf_header) = file.tensor_sources();
    let (format, header, tokenizer, tokenizer_config) = match gguf_header {
        Some(len) => {
            let mut header = vec![0u8; len as usize];
            read_at(path, 0, &mut header)?;
            (ModelFormat::Gguf, header, Vec::new(), Vec::new())
        }
        None => (
            ModelFormat::Safetensors,
            read_optional(&path.join("config.json"))?,
            read_optional(&path.join("tokenizer.json"))?,
            read_optional(&path.join("tokenizer_config.json"))?,
        ),
    };
    let mut tensors = Vec::with_capacity(sources.len());
    let (mut chunks, mut new_chunks, mut bytes) = (0, 0, 0);
    let mut seen = std::collections::HashSet::new();
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    for src in sources {
        let mut hashes = Vec::new();
        let mut offset = 0u64;
        while offset < src.len {
            let n = (src.len - offset).min(u64::from(CHUNK_SIZE)) as usize;
            read_at(&src.path, src.offset + offset, &mut buf[..n])?;
            let h = Hash::of(&buf[..n]);
            if seen.insert(h) {
                chunks += 1;
                new_chunks += usize::from(store.put(&h, &buf[..n])?);
            }
            hashes.push(h);
            offset += n as u64;
        }
        bytes += src.len;
        tensors.push(TensorEntry {
            role: tensor_role(&src.name),
            name: src.name,
            dtype: src.dtype,
            shape: src.shape,
            byte_len: src.len,
            chunks: hashes,
        });
    }
    let manifest = Manifest {
        format,
        chunk_size: CHUNK_SIZE,
        architecture: cfg.arch.name().to_string(),
        num_blocks: cfg.num_blocks as u32,
        header,
        tokenizer,
        tokenizer_config,
        tensors,
    };
    manifest.validate()?;
    let id = store.put_manifest(&manifest)?;
    Ok(ImportReport {
        id,
        manifest,
        chunks,
        new_chunks,
        bytes,
    })
}
