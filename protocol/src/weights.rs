//! Messages of `/nomoat/weights/1`: the model manifest, chunk hashes, and the
//! requests and answers that move them between peers.

use std::collections::HashSet;
use std::fmt;
use std::ops::Range;

use bytes::Bytes;
use prost::Message as _;

use crate::messages::{field, pb, text, too_large, walk};
use crate::{
    check_message_len, ErrorCode, ErrorFrame, MessageError, MAX_CONTROL_BYTES, MAX_TEXT_BYTES,
};

/// Protocol id of weight transfers.
pub const WEIGHTS_PROTOCOL: &str = "/nomoat/weights/1";
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
/// Most chunk hashes in one `GetChunks` request.
pub const MAX_CHUNKS_PER_REQUEST: usize = 64;
/// Layout version of manifests described here.
pub const MANIFEST_VERSION: u32 = 1;
/// Bytes of a BLAKE3 hash.
pub const HASH_LEN: usize = 32;
/// Longest dtype name in a manifest.
const MAX_DTYPE_BYTES: usize = 16;

/// A BLAKE3 hash: a chunk's name, or a model id (the manifest's hash).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash(pub [u8; HASH_LEN]);

impl Hash {
    /// The BLAKE3 hash of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// All 64 hex digits.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(2 * HASH_LEN);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self, MessageError> {
        let bad = || field("hash", format!("`{s}` is not 64 hex digits"));
        if s.len() != 2 * HASH_LEN || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; HASH_LEN];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Self(out))
    }

    fn from_bytes(b: &[u8], name: &'static str) -> Result<Self, MessageError> {
        let arr: [u8; HASH_LEN] = b
            .try_into()
            .map_err(|_| field(name, format!("{} bytes, expected {HASH_LEN}", b.len())))?;
        Ok(Self(arr))
    }
}

/// The first 8 hex digits; `{:#}` gives all 64.
impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.alternate() {
            return f.write_str(&self.to_hex());
        }
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({self})")
    }
}

impl std::str::FromStr for Hash {
    type Err = MessageError;
    fn from_str(s: &str) -> Result<Self, MessageError> {
        Self::from_hex(s)
    }
}

/// How the model was stored before import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ModelFormat {
    /// One GGUF file; the manifest's header is its bytes before the tensor data.
    Gguf,
    /// A safetensors directory; the manifest's header is `config.json`.
    Safetensors,
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
            return Err(field(
                "chunk_size",
                format!(
                    "{}, expected {MIN_CHUNK_BYTES}..={MAX_CHUNK_BYTES}",
                    self.chunk_size
                ),
            ));
        }
        if self.num_blocks == 0 || self.num_blocks > MAX_MANIFEST_BLOCKS {
            return Err(field(
                "num_blocks",
                format!("{}, expected 1..={MAX_MANIFEST_BLOCKS}", self.num_blocks),
            ));
        }
        if self.architecture.len() > MAX_TEXT_BYTES {
            return Err(field("architecture", "too long"));
        }
        if self.tensors.is_empty() || self.tensors.len() > MAX_MANIFEST_TENSORS {
            return Err(field(
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
                return Err(field(
                    "tensors.name",
                    format!("`{}` is empty, too long or repeated", t.name),
                ));
            }
            if let TensorRole::Block(b) = t.role {
                if b >= self.num_blocks {
                    return Err(field(
                        "tensors.block",
                        format!("`{}` in block {b} of {}", t.name, self.num_blocks),
                    ));
                }
            }
            if t.dtype.is_empty() || t.dtype.len() > MAX_DTYPE_BYTES {
                return Err(field("tensors.dtype", format!("`{}`", t.dtype)));
            }
            if t.shape.is_empty() || t.shape.len() > MAX_MANIFEST_DIMS || t.shape.contains(&0) {
                return Err(field(
                    "tensors.shape",
                    format!("`{}` has shape {:?}", t.name, t.shape),
                ));
            }
            let expected = t.byte_len.div_ceil(u64::from(self.chunk_size));
            if t.byte_len == 0 || t.chunks.len() as u64 != expected {
                return Err(field(
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
        too_large(bytes.len(), MAX_MANIFEST_BYTES)?;
        let mut tensors = 0;
        walk(bytes, |n, _| {
            if n == 9 {
                tensors += 1;
                if tensors > MAX_MANIFEST_TENSORS {
                    return Err(field(
                        "tensors",
                        format!("more than {MAX_MANIFEST_TENSORS}"),
                    ));
                }
            }
            Ok(())
        })?;
        let m = pb::Manifest::decode(bytes).map_err(|e| MessageError::Decode(e.to_string()))?;
        if m.version != MANIFEST_VERSION {
            return Err(field(
                "version",
                format!("{}, this nomoat reads {MANIFEST_VERSION}", m.version),
            ));
        }
        let format = match pb::ModelFormat::try_from(m.format) {
            Ok(pb::ModelFormat::Gguf) => ModelFormat::Gguf,
            Ok(pb::ModelFormat::Safetensors) => ModelFormat::Safetensors,
            _ => return Err(field("format", format!("unknown format {}", m.format))),
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
                    _ => return Err(field("tensors.role", format!("unknown role {}", t.role))),
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
            architecture: text(m.architecture, "architecture")?,
            num_blocks: m.num_blocks,
            header: m.header,
            tokenizer: m.tokenizer,
            tokenizer_config: m.tokenizer_config,
            tensors,
        };
        manifest.validate()?;
        if manifest.encode() != bytes {
            return Err(field("manifest", "not in canonical form"));
        }
        Ok(manifest)
    }

    /// Decodes a manifest fetched by `id`: bytes that do not hash to `id` are
    /// refused before anything is decoded.
    pub fn decode_verified(bytes: &[u8], id: &Hash) -> Result<Self, MessageError> {
        too_large(bytes.len(), MAX_MANIFEST_BYTES)?;
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

    /// Total bytes of data in the manifest's tensors.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.byte_len).sum()
    }
}

/// What a peer holds of a model, every chunk verified.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Have {
    /// Blocks it holds entirely (with the shared tensors), ascending.
    pub blocks: Vec<u32>,
    /// Whether it holds the head's tensors.
    pub head: bool,
}

/// A request of `/nomoat/weights/1`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WeightsRequest {
    /// The manifest of a model.
    Manifest {
        /// The model id.
        model_id: Hash,
    },
    /// Chunks by hash, answered one by one in this order.
    Chunks {
        /// The model they belong to.
        model_id: Hash,
        /// 1 to [`MAX_CHUNKS_PER_REQUEST`] hashes.
        hashes: Vec<Hash>,
    },
    /// Which blocks of a model the peer holds.
    Have {
        /// The model id.
        model_id: Hash,
    },
}

impl WeightsRequest {
    /// Encodes the request (without its length prefix).
    pub fn encode(&self) -> Vec<u8> {
        use pb::weights_request::Kind;
        let kind = match self {
            Self::Manifest { model_id } => Kind::Manifest(pb::GetManifest {
                model_id: model_id.0.to_vec(),
            }),
            Self::Chunks { model_id, hashes } => Kind::Chunks(pb::GetChunks {
                model_id: model_id.0.to_vec(),
                hashes: hashes.iter().map(|h| h.0.to_vec()).collect(),
            }),
            Self::Have { model_id } => Kind::Have(pb::GetHave {
                model_id: model_id.0.to_vec(),
            }),
        };
        pb::WeightsRequest { kind: Some(kind) }.encode_to_vec()
    }

    /// Decodes and validates a request.
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        too_large(bytes.len(), MAX_CONTROL_BYTES)?;
        walk(bytes, |n, payload| {
            if let (2, Some(chunks)) = (n, payload) {
                let mut count = 0;
                walk(chunks, |m, _| {
                    count += usize::from(m == 2);
                    if count > MAX_CHUNKS_PER_REQUEST {
                        return Err(field(
                            "hashes",
                            format!("more than {MAX_CHUNKS_PER_REQUEST}"),
                        ));
                    }
                    Ok(())
                })?;
            }
            Ok(())
        })?;
        let r =
            pb::WeightsRequest::decode(bytes).map_err(|e| MessageError::Decode(e.to_string()))?;
        use pb::weights_request::Kind;
        Ok(match r.kind.ok_or(MessageError::Empty)? {
            Kind::Manifest(m) => Self::Manifest {
                model_id: Hash::from_bytes(&m.model_id, "model_id")?,
            },
            Kind::Chunks(c) => {
                if c.hashes.is_empty() || c.hashes.len() > MAX_CHUNKS_PER_REQUEST {
                    return Err(field(
                        "hashes",
                        format!(
                            "{} hashes, expected 1..={MAX_CHUNKS_PER_REQUEST}",
                            c.hashes.len()
                        ),
                    ));
                }
                Self::Chunks {
                    model_id: Hash::from_bytes(&c.model_id, "model_id")?,
                    hashes: c
                        .hashes
                        .iter()
                        .map(|h| Hash::from_bytes(h, "hashes"))
                        .collect::<Result<_, _>>()?,
                }
            }
            Kind::Have(h) => Self::Have {
                model_id: Hash::from_bytes(&h.model_id, "model_id")?,
            },
        })
    }
}

/// An answer of `/nomoat/weights/1`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum WeightsResponse {
    /// A manifest's canonical bytes, unchecked: the asker checks them with
    /// [`Manifest::decode_verified`].
    Manifest(Bytes),
    /// A chunk, unchecked: the asker compares its length with the manifest's
    /// and hashes it before using or storing it.
    Chunk {
        /// The hash it is sent as.
        hash: Hash,
        /// The data.
        data: Bytes,
    },
    /// What the answerer holds.
    Have(Have),
    /// A refusal ([`ErrorCode::NotFound`] for what the answerer lacks).
    Error(ErrorFrame),
}

impl WeightsResponse {
    fn to_pb(&self) -> pb::WeightsResponse {
        use pb::weights_response::Kind;
        let kind = match self {
            Self::Manifest(b) => Kind::Manifest(pb::ManifestData {
                manifest: b.clone(),
            }),
            Self::Chunk { hash, data } => Kind::Chunk(pb::ChunkData {
                hash: hash.0.to_vec(),
                data: data.clone(),
            }),
            Self::Have(h) => Kind::Have(pb::Have {
                blocks: h.blocks.clone(),
                head: h.head,
            }),
            Self::Error(e) => Kind::Error(pb::Error {
                code: u32::from(e.raw_code),
                message: e.message.clone(),
                session_id: Vec::new(),
                seq: 0,
                hop_index: 0,
            }),
        };
        pb::WeightsResponse { kind: Some(kind) }
    }

    /// An error answer.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error(ErrorFrame::new(code, message, None, 0, 0))
    }

    /// Encodes the answer with its 4-byte little-endian length prefix.
    pub fn encode_framed(&self) -> Vec<u8> {
        let body = self.to_pb();
        let len = body.encoded_len();
        let mut out = Vec::with_capacity(4 + len);
        out.extend_from_slice(&(len as u32).to_le_bytes());
        body.encode(&mut out).expect("a Vec grows as needed");
        out
    }

    /// Decodes and validates an answer from a shared buffer (a chunk's data
    /// and a manifest are slices of it, not copies).
    pub fn decode_bytes(bytes: Bytes) -> Result<Self, MessageError> {
        check_message_len(bytes.len())?;
        // Only manifests and chunks may be large.
        let large = bytes.len() > MAX_CONTROL_BYTES;
        walk(&bytes, |n, _| {
            if large && !matches!(n, 1 | 2) {
                return Err(MessageError::TooLarge {
                    len: bytes.len(),
                    max: MAX_CONTROL_BYTES,
                });
            }
            Ok(())
        })?;
        let r = pb::WeightsResponse::decode(bytes.clone())
            .map_err(|e| MessageError::Decode(e.to_string()))?;
        use pb::weights_response::Kind;
        Ok(match r.kind.ok_or(MessageError::Empty)? {
            Kind::Manifest(m) => {
                too_large(m.manifest.len(), MAX_MANIFEST_BYTES)?;
                Self::Manifest(m.manifest)
            }
            Kind::Chunk(c) => {
                too_large(c.data.len(), MAX_CHUNK_BYTES as usize)?;
                Self::Chunk {
                    hash: Hash::from_bytes(&c.hash, "hash")?,
                    data: c.data,
                }
            }
            Kind::Have(h) => {
                if h.blocks.len() > MAX_MANIFEST_BLOCKS as usize {
                    return Err(field("blocks", "too many"));
                }
                Self::Have(Have {
                    blocks: h.blocks,
                    head: h.head,
                })
            }
            Kind::Error(e) => {
                let raw_code = u16::try_from(e.code).map_err(|_| field("code", "beyond u16"))?;
                Self::Error(ErrorFrame {
                    code: ErrorCode::from_u16(raw_code),
                    raw_code,
                    message: text(e.message, "message")?,
                    session_id: None,
                    seq: 0,
                    hop_index: 0,
                })
            }
        })
    }
}

/// The length prefix and envelope of a chunk answer, up to its data: a
/// sender writes these bytes and then the data itself, without copying the
/// data into a message. Identical to [`WeightsResponse::encode_framed`].
pub fn chunk_frame_header(hash: &Hash, data_len: usize) -> Vec<u8> {
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn varint_len(v: u64) -> usize {
        (64 - (v | 1).leading_zeros()).div_ceil(7) as usize
    }
    // ChunkData { 1: hash, 2: data } (an empty data field is omitted).
    let data_field = if data_len == 0 {
        0
    } else {
        1 + varint_len(data_len as u64) + data_len
    };
    let inner = 2 + HASH_LEN + data_field;
    let body = 1 + varint_len(inner as u64) + inner;
    let mut out = Vec::with_capacity(4 + 16 + HASH_LEN);
    out.extend_from_slice(&(body as u32).to_le_bytes());
    out.push(2 << 3 | 2);
    varint(&mut out, inner as u64);
    out.push(1 << 3 | 2);
    out.push(HASH_LEN as u8);
    out.extend_from_slice(&hash.0);
    if data_len > 0 {
        out.push(2 << 3 | 2);
        varint(&mut out, data_len as u64);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
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
        bytes.extend_from_slice(&[3 << 3, 0x80, 0x20]); // chunk_size 4096 again
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

    #[test]
    fn requests_round_trip_and_are_bounded() {
        let id = Hash::of(b"model");
        for r in [
            WeightsRequest::Manifest { model_id: id },
            WeightsRequest::Have { model_id: id },
            WeightsRequest::Chunks {
                model_id: id,
                hashes: vec![Hash::of(b"a"), Hash::of(b"b")],
            },
        ] {
            assert_eq!(WeightsRequest::decode(&r.encode()).unwrap(), r);
        }
        let too_many = WeightsRequest::Chunks {
            model_id: id,
            hashes: vec![id; MAX_CHUNKS_PER_REQUEST + 1],
        };
        assert!(WeightsRequest::decode(&too_many.encode()).is_err());
        let none = WeightsRequest::Chunks {
            model_id: id,
            hashes: vec![],
        };
        assert!(WeightsRequest::decode(&none.encode()).is_err());
    }

    #[test]
    fn responses_round_trip_and_chunk_headers_match_prost() {
        for len in [0usize, 1, 127, 128, 16_383, 16_384, 1 << 20] {
            let data = Bytes::from(vec![7u8; len]);
            let r = WeightsResponse::Chunk {
                hash: Hash::of(&data),
                data: data.clone(),
            };
            let framed = r.encode_framed();
            let mut direct = chunk_frame_header(&Hash::of(&data), len);
            direct.extend_from_slice(&data);
            assert_eq!(direct, framed, "len {len}");
            let back = WeightsResponse::decode_bytes(Bytes::from(framed[4..].to_vec())).unwrap();
            assert_eq!(back, r);
        }
        for r in [
            WeightsResponse::Have(Have {
                blocks: vec![0, 1, 5],
                head: true,
            }),
            WeightsResponse::error(ErrorCode::NotFound, "no such chunk"),
            WeightsResponse::Manifest(Bytes::from(manifest().encode())),
        ] {
            let framed = r.encode_framed();
            assert_eq!(
                WeightsResponse::decode_bytes(Bytes::from(framed[4..].to_vec())).unwrap(),
                r
            );
        }
    }

    #[test]
    fn hashes_print_short_and_parse_from_hex() {
        let h = Hash::of(b"x");
        assert_eq!(h.to_string().len(), 8);
        assert_eq!(format!("{h:#}"), h.to_hex());
        assert_eq!(h.to_hex().parse::<Hash>().unwrap(), h);
        assert!("zz".parse::<Hash>().is_err());
    }
}
