//! Messages of `/nomoat/weights/1`: the requests and answers that move
//! manifests and chunks between peers.

use bytes::Bytes;
use prost::Message as _;

use crate::codec::{
    decode_pb, encode_framed_pb, ensure_at_most, ensure_repeated_at_most, field_error,
    for_each_field,
};
use crate::pb::{self, field};
use crate::{
    check_message_len, ErrorCode, ErrorFrame, Hash, MessageError, MAX_CHUNK_BYTES,
    MAX_CONTROL_BYTES, MAX_MANIFEST_BLOCKS, MAX_MANIFEST_BYTES,
};

/// Protocol id of weight transfers.
pub const WEIGHTS_PROTOCOL: &str = "/nomoat/weights/1";
/// Most chunk hashes in one `GetChunks` request.
pub const MAX_CHUNKS_PER_REQUEST: usize = 64;

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
        ensure_at_most(bytes.len(), MAX_CONTROL_BYTES)?;
        for_each_field(bytes, |n, payload| match (n, payload) {
            (field::WEIGHTS_REQUEST_CHUNKS, Some(chunks)) => ensure_repeated_at_most(
                chunks,
                field::GET_CHUNKS_HASHES,
                MAX_CHUNKS_PER_REQUEST,
                "hashes",
                "hashes",
            ),
            _ => Ok(()),
        })?;
        let r: pb::WeightsRequest = decode_pb(bytes)?;
        use pb::weights_request::Kind;
        Ok(match r.kind.ok_or(MessageError::Empty)? {
            Kind::Manifest(m) => Self::Manifest {
                model_id: Hash::from_bytes(&m.model_id, "model_id")?,
            },
            Kind::Chunks(c) => {
                if c.hashes.is_empty() || c.hashes.len() > MAX_CHUNKS_PER_REQUEST {
                    return Err(field_error(
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
    /// [`Manifest::decode_verified`](crate::Manifest::decode_verified).
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
            // Weight answers are about no session: its fields stay empty.
            Self::Error(e) => Kind::Error(pb::Error {
                session_id: Vec::new(),
                seq: 0,
                hop_index: 0,
                ..e.to_pb()
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
        encode_framed_pb(&self.to_pb())
    }

    /// Decodes and validates an answer from a shared buffer (a chunk's data
    /// and a manifest are slices of it, not copies).
    pub fn decode_bytes(bytes: Bytes) -> Result<Self, MessageError> {
        check_message_len(bytes.len())?;
        // Only manifests and chunks may be large.
        let large = bytes.len() > MAX_CONTROL_BYTES;
        for_each_field(&bytes, |n, _| {
            let bulk = matches!(
                n,
                field::WEIGHTS_RESPONSE_MANIFEST | field::WEIGHTS_RESPONSE_CHUNK
            );
            if large && !bulk {
                return Err(MessageError::TooLarge {
                    len: bytes.len(),
                    max: MAX_CONTROL_BYTES,
                });
            }
            Ok(())
        })?;
        let r: pb::WeightsResponse = decode_pb(bytes.clone())?;
        use pb::weights_response::Kind;
        Ok(match r.kind.ok_or(MessageError::Empty)? {
            Kind::Manifest(m) => {
                ensure_at_most(m.manifest.len(), MAX_MANIFEST_BYTES)?;
                Self::Manifest(m.manifest)
            }
            Kind::Chunk(c) => {
                ensure_at_most(c.data.len(), MAX_CHUNK_BYTES as usize)?;
                Self::Chunk {
                    hash: Hash::from_bytes(&c.hash, "hash")?,
                    data: c.data,
                }
            }
            Kind::Have(h) => {
                if h.blocks.len() > MAX_MANIFEST_BLOCKS as usize {
                    return Err(field_error("blocks", "too many"));
                }
                Self::Have(Have {
                    blocks: h.blocks,
                    head: h.head,
                })
            }
            // The session fields mean nothing here and are ignored.
            Kind::Error(e) => Self::Error(ErrorFrame::from_pb(pb::Error {
                session_id: Vec::new(),
                seq: 0,
                hop_index: 0,
                ..e
            })?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk_frame_header;
    use crate::manifest::tests::manifest;

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
}
