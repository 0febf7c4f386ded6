//! The model manifest of `/nomoat/weights/1`: every tensor of a model, its
//! role and the hashes of its chunks. A model's id is the hash of its
//! manifest's canonical bytes.

use std::collections::HashSet;
use std::ops::Range;

use prost::Message as _;

use crate::codec::{bounded_text, decode_pb, ensure_at_most, ensure_repeated_at_most, field_error};
use crate::pb::{self, field};
use crate::{Hash, MessageError, MAX_TEXT_BYTES};

/// Chunk size of manifests written by `nomoat import` (1 MiB).
pub const CHUNK_SIZE: u32 = 1 << 20;
/// Smallest chunk size a manifest may declare (4 KiB).
pub const MIN_CHUNK_BYTES: u32 = 4 << 10;
/// Largest chunk size a manifest may declare, and so the largest chunk (4 MiB).
pub const MAX_CHUNK_BYTES: u32 = 4 << 20;
/// Largest manifest, in canonical bytes (32 MiB; a GGUF header with a large
/// vocabulary is a few MiB).
pub const MAX_MANIFEST_BYTES: usize = 32 << 20;
/// Most tensors in one manifest.
pub const MAX_MANIFEST_TENSORS: usize = 65_536;
/// Most blocks a manifest may declare.
pub const MAX_MANIFEST_BLOCKS: u32 = 65_536;
/// Most axes of a tensor in a manifest.
pub const MAX_MANIFEST_DIMS: usize = 8;
/// Layout version of manifests described here.
pub const MANIFEST_VERSION: u32 = 1;
/// Longest dtype name in a manifest.
const MAX_DTYPE_BYTES: usize = 16;

/// How the model was stored before import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ModelFormat {
    /// One GGUF file; the manifest's header is its bytes before the tensor data.
    Gguf,
    /// A safetensors directory; the manifest's header is `config.json`.
    Safetensors,
    /// A LoRA adapter of a base model; the header is its description
    /// (JSON), the tensors its per-block A and B matrices.
    Lora,
}

/// What a tensor is for, which decides who needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TensorRole {
    /// Part of one transformer block.
    Block(u32),
    /// The token embedding (client side).
    Embedding,
    /// The final norm (client side).
    OutputNorm,
    /// The LM head (client side; absent when tied to the embedding).
    Output,
    /// Needed by every span and by the head (RoPE frequency factors).
    Shared,
}

impl TensorRole {
    /// Whether the head (client side) needs this tensor.
    pub fn is_head(self) -> bool {
        matches!(
            self,
            Self::Embedding | Self::OutputNorm | Self::Output | Self::Shared
        )
    }

    /// Whether a span of `blocks` needs this tensor (an empty range: none).
    pub fn in_span(self, blocks: &Range<u32>) -> bool {
        match self {
            Self::Block(b) => blocks.contains(&b),
            Self::Shared => !blocks.is_empty(),
            _ => false,
        }
    }
}

/// One tensor of a manifest: its name, role, type, shape and chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    /// Name in the original file.
    pub name: String,
    /// What it is for.
    pub role: TensorRole,
    /// Stored type: a ggml type name (`Q4_1`) or a safetensors dtype (`F16`).
    pub dtype: String,
    /// Dimensions, outermost first.
    pub shape: Vec<u64>,
    /// Bytes of data.
    pub byte_len: u64,
    /// Hashes of the data's chunks, in order.
    pub chunks: Vec<Hash>,
}

impl TensorEntry {
    /// Length of chunk `i` for a manifest of `chunk_size`.
    pub fn chunk_len(&self, i: usize, chunk_size: u32) -> u32 {
        let start = i as u64 * u64::from(chunk_size);
        self.byte_len
            .saturating_sub(start)
            .min(u64::from(chunk_size)) as u32
    }

    /// The chunks with their lengths.
    pub fn chunk_refs(&self, chunk_size: u32) -> impl Iterator<Item = ChunkRef> + '_ {
        self.chunks.iter().enumerate().map(move |(i, h)| ChunkRef {
            hash: *h,
            len: self.chunk_len(i, chunk_size),
        })
    }
}

/// A chunk to fetch: its hash and the length the manifest gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkRef {
    /// BLAKE3 of the data.
    pub hash: Hash,
    /// Bytes of data.
    pub len: u32,
}

/// Everything needed to rebuild a model from its chunks. Its id is the
/// BLAKE3 hash of [`Manifest::encode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The original format.
    pub format: ModelFormat,
    /// Bytes per chunk (the last chunk of a tensor may be shorter).
    pub chunk_size: u32,
    /// Architecture name, for people and placement.
    pub architecture: String,
    /// Transformer blocks in the model.
    pub num_blocks: u32,
    /// GGUF: the file's bytes before the tensor data; safetensors: config.json.
    pub header: Vec<u8>,
    /// Safetensors: tokenizer.json (GGUF: empty, the tokenizer is in the header).
    pub tokenizer: Vec<u8>,
    /// Safetensors: tokenizer_config.json, possibly empty.
    pub tokenizer_config: Vec<u8>,
    /// Every tensor, in file order.
    pub tensors: Vec<TensorEntry>,
}

impl Manifest {
    fn to_pb(&self) -> pb::Manifest {
        pb::Manifest {
            version: MANIFEST_VERSION,
            format: match self.format {
                ModelFormat::Gguf => pb::ModelFormat::Gguf,
                ModelFormat::Safetensors => pb::ModelFormat::Safetensors,
                ModelFormat::Lora => pb::ModelFormat::Lora,
            } as i32,
            chunk_size: self.chunk_size,
            architecture: self.architecture.clone(),
            num_blocks: self.num_blocks,
            header: self.header.clone(),
            tokenizer: self.tokenizer.clone(),
            tokenizer_config: self.tokenizer_config.clone(),
            tensors: self
                .tensors
                .iter()
                .map(|t| {
                    let (role, block) = match t.role {
                        TensorRole::Block(b) => (pb::TensorRole::Block, b),
                        TensorRole::Embedding => (pb::TensorRole::Embedding, 0),
                        TensorRole::OutputNorm => (pb::TensorRole::OutputNorm, 0),
                        TensorRole::Output => (pb::TensorRole::Output, 0),
                        TensorRole::Shared => (pb::TensorRole::Shared, 0),
                    };
                    pb::TensorEntry {
                        name: t.name.clone(),
                        role: role as i32,
                        block,
                        dtype: t.dtype.clone(),
                        shape: t.shape.clone(),
                        byte_len: t.byte_len,
                        chunks: t.chunks.iter().map(|h| h.0.to_vec()).collect(),
                    }
                })
                .collect(),
        }
    }

    /// The canonical bytes: the id is their hash, and only these bytes
    /// decode (a manifest has exactly one encoding).
    pub fn encode(&self) -> Vec<u8> {
        self.to_pb().encode_to_vec()
    }

    /// The model id: BLAKE3 of the canonical bytes.
    pub fn id(&self) -> Hash {
        Hash::of(&self.encode())
    }

    /// Checks every rule of a manifest (the ones [`decode`](Self::decode)
    /// applies), for a manifest built in memory.
    pub fn validate(&self) -> Result<(), MessageError> {
        if !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&self.chunk_size) {
            return Err(field_error(
                "chunk_size",
                format!(
                    "{}, expected {MIN_CHUNK_BYTES}..={MAX_CHUNK_BYTES}",
                    self.chunk_size
                ),
            ));
        }
        if self.num_blocks == 0 || self.num_blocks > MAX_MANIFEST_BLOCKS {
            return Err(field_error(
                "num_blocks",
                format!("{}, expected 1..={MAX_MANIFEST_BLOCKS}", self.num_blocks),
            ));
        }
        if self.architecture.len() > MAX_TEXT_BYTES {
            return Err(field_error("architecture", "too long"));
        }
        if self.tensors.is_empty() || self.tensors.len() > MAX_MANIFEST_TENSORS {
            return Err(field_error(
                "tensors",
                format!(
                    "{} tensors, expected 1..={MAX_MANIFEST_TENSORS}",
                    self.tensors.len()
                ),
            ));
        }
        let mut names = HashSet::new();
        for t in &self.tensors {
            if t.name.is_empty() || t.name.len() > MAX_TEXT_BYTES || !names.insert(&t.name) {
                return Err(field_error(
                    "tensors.name",
                    format!("`{}` is empty, too long or repeated", t.name),
                ));
            }
            if let TensorRole::Block(b) = t.role {
                if b >= self.num_blocks {
                    return Err(field_error(
                        "tensors.block",
                        format!("`{}` in block {b} of {}", t.name, self.num_blocks),
                    ));
                }
            }
            if t.dtype.is_empty() || t.dtype.len() > MAX_DTYPE_BYTES {
                return Err(field_error("tensors.dtype", format!("`{}`", t.dtype)));
            }
            if t.shape.is_empty() || t.shape.len() > MAX_MANIFEST_DIMS || t.shape.contains(&0) {
                return Err(field_error(
                    "tensors.shape",
                    format!("`{}` has shape {:?}", t.name, t.shape),
                ));
            }
            let expected = t.byte_len.div_ceil(u64::from(self.chunk_size));
            if t.byte_len == 0 || t.chunks.len() as u64 != expected {
                return Err(field_error(
                    "tensors.chunks",
                    format!(
                        "`{}` has {} bytes in {} chunks, expected {expected} chunks",
                        t.name,
                        t.byte_len,
                        t.chunks.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Decodes and validates a manifest; only its canonical bytes decode.
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        ensure_at_most(bytes.len(), MAX_MANIFEST_BYTES)?;
        ensure_repeated_at_most(
            bytes,
            field::MANIFEST_TENSORS,
            MAX_MANIFEST_TENSORS,
            "tensors",
            "tensors",
        )?;
        let m: pb::Manifest = decode_pb(bytes)?;
        if m.version != MANIFEST_VERSION {
            return Err(field_error(
                "version",
                format!("{}, this nomoat reads {MANIFEST_VERSION}", m.version),
            ));
        }
        let format = match pb::ModelFormat::try_from(m.format) {
            Ok(pb::ModelFormat::Gguf) => ModelFormat::Gguf,
            Ok(pb::ModelFormat::Safetensors) => ModelFormat::Safetensors,
            Ok(pb::ModelFormat::Lora) => ModelFormat::Lora,
            _ => {
                return Err(field_error(
                    "format",
                    format!("unknown format {}", m.format),
                ))
            }
        };
        let tensors = m
            .tensors
            .into_iter()
            .map(|t| {
                let role = match pb::TensorRole::try_from(t.role) {
                    Ok(pb::TensorRole::Block) => TensorRole::Block(t.block),
                    Ok(pb::TensorRole::Embedding) => TensorRole::Embedding,
                    Ok(pb::TensorRole::OutputNorm) => TensorRole::OutputNorm,
                    Ok(pb::TensorRole::Output) => TensorRole::Output,
                    Ok(pb::TensorRole::Shared) => TensorRole::Shared,
                    _ => {
                        return Err(field_error(
                            "tensors.role",
                            format!("unknown role {}", t.role),
                        ))
                    }
                };
                Ok(TensorEntry {
                    name: t.name,
                    role,
                    dtype: t.dtype,
                    shape: t.shape,
                    byte_len: t.byte_len,
                    chunks: t
                        .chunks
                        .iter()
                        .map(|h| Hash::from_bytes(h, "tensors.chunks"))
                        .collect::<Result<_, _>>()?,
                })
            })
            .collect::<Result<Vec<_>, MessageError>>()?;
        let manifest = Self {
            format,
            chunk_size: m.chunk_size,
            architecture: bounded_text(m.architecture, "architecture")?,
            num_blocks: m.num_blocks,
            header: m.header,
            tokenizer: m.tokenizer,
            tokenizer_config: m.tokenizer_config,
            tensors,
        };
        manifest.validate()?;
        if manifest.encode() != bytes {
            return Err(field_error("manifest", "not in canonical form"));
        }
        Ok(manifest)
    }

    /// Decodes a manifest fetched by `id`: bytes that do not hash to `id` are
    /// refused before anything is decoded.
    pub fn decode_verified(bytes: &[u8], id: &Hash) -> Result<Self, MessageError> {
        ensure_at_most(bytes.len(), MAX_MANIFEST_BYTES)?;
        let got = Hash::of(bytes);
        if got != *id {
            return Err(MessageError::WrongHash {
                what: "manifest",
                expected: id.to_hex(),
                got: got.to_hex(),
            });
        }
        Self::decode(bytes)
    }

    /// The tensors a span of `blocks` needs, plus the head's when `head`.
    pub fn tensors_for<'a>(
        &'a self,
        blocks: &'a Range<u32>,
        head: bool,
    ) -> impl Iterator<Item = &'a TensorEntry> + 'a {
        self.tensors
            .iter()
            .filter(move |t| t.role.in_span(blocks) || (head && t.role.is_head()))
    }

    /// The distinct chunks a span of `blocks` (and the head, when `head`)
    /// needs, in manifest order.
    pub fn chunks_for(&self, blocks: &Range<u32>, head: bool) -> Vec<ChunkRef> {
        let mut seen = HashSet::new();
        self.tensors_for(blocks, head)
            .flat_map(|t| t.chunk_refs(self.chunk_size))
            .filter(|c| seen.insert(c.hash))
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A manifest of two blocks, an embedding and a shared tensor.
    pub(crate) fn manifest() -> Manifest {
        let data = [vec![1u8; 10], vec![2u8; 5000], vec![3u8; 4096]];
        let cs = MIN_CHUNK_BYTES;
        let entry = |name: &str, role, d: &Vec<u8>| TensorEntry {
            name: name.into(),
            role,
            dtype: "F32".into(),
            shape: vec![d.len() as u64],
            byte_len: d.len() as u64,
            chunks: d.chunks(cs as usize).map(Hash::of).collect(),
        };
        Manifest {
            format: ModelFormat::Gguf,
            chunk_size: cs,
            architecture: "llama".into(),
            num_blocks: 2,
            header: b"GGUF header".to_vec(),
            tokenizer: Vec::new(),
            tokenizer_config: Vec::new(),
            tensors: vec![
                entry("token_embd.weight", TensorRole::Embedding, &data[0]),
                entry("blk.0.w", TensorRole::Block(0), &data[1]),
                entry("blk.1.w", TensorRole::Block(1), &data[2]),
                entry("rope_freqs.weight", TensorRole::Shared, &data[0]),
            ],
        }
    }

    #[test]
    fn manifests_round_trip_and_hash_to_their_id() {
        let m = manifest();
        m.validate().unwrap();
        let bytes = m.encode();
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        assert_eq!(Manifest::decode_verified(&bytes, &m.id()).unwrap(), m);
        assert_eq!(m.id(), Hash::of(&bytes));
    }

    #[test]
    fn a_tampered_manifest_is_refused() {
        let m = manifest();
        let id = m.id();
        let mut bytes = m.encode();
        let i = bytes.len() / 2;
        bytes[i] ^= 1;
        assert!(matches!(
            Manifest::decode_verified(&bytes, &id),
            Err(MessageError::WrongHash { .. })
        ));
    }

    #[test]
    fn only_canonical_bytes_decode() {
        let mut bytes = manifest().encode();
        // The same fields again (protobuf merges repeated fields; a second
        // scalar wins): valid protobuf, but not the canonical encoding.
        let chunk_size = (field::MANIFEST_CHUNK_SIZE << 3) as u8;
        bytes.extend_from_slice(&[chunk_size, 0x80, 0x20]); // chunk_size 4096 again
        assert!(Manifest::decode(&bytes).is_err());
    }

    #[test]
    fn chunk_counts_and_blocks_are_checked() {
        let mut m = manifest();
        m.tensors[1].chunks.pop();
        assert!(m.validate().is_err());
        let mut m = manifest();
        m.tensors[2].role = TensorRole::Block(2);
        assert!(m.validate().is_err());
        let mut m = manifest();
        m.chunk_size = MAX_CHUNK_BYTES + 1;
        assert!(m.validate().is_err());
        let mut m = manifest();
        m.tensors[3].name = m.tensors[0].name.clone();
        assert!(m.validate().is_err());
    }

    #[test]
    fn chunks_for_a_span_and_the_head() {
        let m = manifest();
        let blk0 = m.chunks_for(&(0..1), false);
        // blk.0 (2 chunks: 4096 + 904) and the shared tensor.
        assert_eq!(
            blk0.iter().map(|c| c.len).collect::<Vec<_>>(),
            [4096, 904, 10]
        );
        let head = m.chunks_for(&(0..0), true);
        // The embedding and the shared tensor have equal data: one chunk.
        assert_eq!(head.len(), 1);
        assert_eq!(m.chunks_for(&(0..2), true).len(), 4);
    }
}
