//! Swarm information: the [`ServerInfo`] a server announces about itself
//! (a gossipsub heartbeat), and the request and answer of `/nomoat/info/1`.

use prost::Message as _;

use crate::codec::{
    bounded_text, decode_pb, ensure_at_most, ensure_repeated_at_most, field_error, for_each_field,
};
use crate::ids::peer_id;
use crate::pb::{self, field};
use crate::{BlockRange, Hash, MessageError, MAX_CONTROL_BYTES, MAX_TEXT_BYTES};

/// Protocol id of swarm information queries.
pub const INFO_PROTOCOL: &str = "/nomoat/info/1";
/// Most servers in one information answer.
pub const MAX_INFO_SERVERS: usize = 1024;
/// Largest information answer.
pub const MAX_INFO_BYTES: usize = 4 * 1024 * 1024;
/// Most addresses in one `ServerInfo`.
pub const MAX_ADDRS: usize = 32;
/// Most adapters a server announces.
pub const MAX_ANNOUNCED_ADAPTERS: usize = 32;

/// Whether a server can be dialled directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reachability {
    /// Not known yet.
    Unknown,
    /// Dialable directly.
    Public,
    /// Reachable only through a relay.
    Private,
}

/// What a server announces about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerInfo {
    /// libp2p peer id bytes.
    pub peer_id: Vec<u8>,
    /// The model served.
    pub model_id: String,
    /// The blocks held.
    pub blocks: BlockRange,
    /// Blocks in the model.
    pub num_blocks: u32,
    /// Hidden size of the model.
    pub hidden_size: u32,
    /// Measured decode throughput of the span, tokens per second.
    pub throughput: f32,
    /// KV positions still free.
    pub free_kv_tokens: u32,
    /// Sessions over the session cap, 0..=1.
    pub load: f32,
    /// Sessions open now.
    pub active_sessions: u32,
    /// Sessions one batched pass adds before the pass takes twice one
    /// session's step; 0 until measured.
    pub batch_capacity: f32,
    /// nomoat version.
    pub version: String,
    /// Addresses (multiaddr bytes).
    pub addrs: Vec<Vec<u8>>,
    /// Reachability.
    pub reachability: Reachability,
    /// Publisher's clock, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// LoRA adapters held for the span.
    pub adapters: Vec<Hash>,
}

impl ServerInfo {
    fn from_pb(s: pb::ServerInfo) -> Result<Self, MessageError> {
        let blocks = BlockRange::from_pb(s.blocks, "blocks")?;
        if blocks.end > s.num_blocks {
            return Err(field_error(
                "blocks",
                format!("{blocks} beyond {} blocks", s.num_blocks),
            ));
        }
        if s.addrs.len() > MAX_ADDRS {
            return Err(field_error("addrs", format!("{} addresses", s.addrs.len())));
        }
        if let Some(a) = s.addrs.iter().find(|a| a.len() > MAX_TEXT_BYTES) {
            return Err(field_error(
                "addrs",
                format!("address of {} bytes, limit {MAX_TEXT_BYTES}", a.len()),
            ));
        }
        if s.adapters.len() > MAX_ANNOUNCED_ADAPTERS {
            return Err(field_error(
                "adapters",
                format!(
                    "{} adapters, limit {MAX_ANNOUNCED_ADAPTERS}",
                    s.adapters.len()
                ),
            ));
        }
        let adapters = s
            .adapters
            .iter()
            .map(|h| Hash::from_bytes(h, "adapters"))
            .collect::<Result<Vec<_>, _>>()?;
        if !s.throughput.is_finite() || s.throughput < 0.0 {
            return Err(field_error("throughput", "negative or not finite"));
        }
        if !s.load.is_finite() || s.load < 0.0 {
            return Err(field_error("load", "negative or not finite"));
        }
        if !s.batch_capacity.is_finite() || s.batch_capacity < 0.0 {
            return Err(field_error("batch_capacity", "negative or not finite"));
        }
        Ok(Self {
            peer_id: peer_id(s.peer_id, "peer_id")?,
            model_id: bounded_text(s.model_id, "model_id")?,
            blocks,
            num_blocks: s.num_blocks,
            hidden_size: s.hidden_size,
            throughput: s.throughput,
            free_kv_tokens: s.free_kv_tokens,
            load: s.load,
            active_sessions: s.active_sessions,
            batch_capacity: s.batch_capacity,
            version: bounded_text(s.version, "version")?,
            addrs: s.addrs,
            reachability: match pb::Reachability::try_from(s.reachability) {
                Ok(pb::Reachability::Public) => Reachability::Public,
                Ok(pb::Reachability::Private) => Reachability::Private,
                _ => Reachability::Unknown,
            },
            timestamp_ms: s.timestamp_ms,
            adapters,
        })
    }

    fn to_pb(&self) -> pb::ServerInfo {
        pb::ServerInfo {
            peer_id: self.peer_id.clone(),
            model_id: self.model_id.clone(),
            blocks: Some(self.blocks.to_pb()),
            num_blocks: self.num_blocks,
            throughput: self.throughput,
            free_kv_tokens: self.free_kv_tokens,
            load: self.load,
            version: self.version.clone(),
            addrs: self.addrs.clone(),
            reachability: match self.reachability {
                Reachability::Unknown => pb::Reachability::Unknown,
                Reachability::Public => pb::Reachability::Public,
                Reachability::Private => pb::Reachability::Private,
            } as i32,
            timestamp_ms: self.timestamp_ms,
            active_sessions: self.active_sessions,
            batch_capacity: self.batch_capacity,
            hidden_size: self.hidden_size,
            adapters: self.adapters.iter().map(|h| h.0.to_vec()).collect(),
        }
    }

    /// Encodes a heartbeat (gossipsub payload).
    pub fn encode(&self) -> Vec<u8> {
        self.to_pb().encode_to_vec()
    }

    /// Decodes and validates a heartbeat.
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        precheck_server_info(bytes)?;
        Self::from_pb(decode_pb(bytes)?)
    }
}

/// Encodes an information request for `model_id` (empty: every model).
pub fn encode_info_request(model_id: &str) -> Vec<u8> {
    pb::InfoRequest {
        model_id: model_id.to_string(),
    }
    .encode_to_vec()
}

/// Decodes an information request; returns the model id asked for.
pub fn decode_info_request(bytes: &[u8]) -> Result<String, MessageError> {
    ensure_at_most(bytes.len(), MAX_CONTROL_BYTES)?;
    let r = decode_pb::<pb::InfoRequest>(bytes)?;
    bounded_text(r.model_id, "model_id")
}

/// The prefix of what a server signs to vouch for its `ServerInfo`.
pub const SERVER_INFO_SIGNING_PREFIX: &[u8] = b"nomoat-server-info:";
/// Largest public key a signed entry may carry.
pub const MAX_PUBLIC_KEY_BYTES: usize = 1024;
/// Largest signature a signed entry may carry.
pub const MAX_SIGNATURE_BYTES: usize = 1024;

/// A `ServerInfo` with the signature of the server it describes (which
/// this crate does not check: it knows no key types; the node does).
#[derive(Debug, Clone, PartialEq)]
pub struct SignedInfo {
    /// The decoded, validated announcement.
    pub info: ServerInfo,
    /// Its encoding, as signed.
    pub info_bytes: Vec<u8>,
    /// The signer's public key (libp2p protobuf encoding).
    pub public_key: Vec<u8>,
    /// The signature over [`SignedInfo::signed_payload`].
    pub signature: Vec<u8>,
}

impl SignedInfo {
    /// What is signed for `info_bytes`: [`SERVER_INFO_SIGNING_PREFIX`]
    /// followed by them.
    pub fn signed_payload(info_bytes: &[u8]) -> Vec<u8> {
        [SERVER_INFO_SIGNING_PREFIX, info_bytes].concat()
    }

    fn to_pb(&self) -> pb::SignedServerInfo {
        pb::SignedServerInfo {
            info: self.info_bytes.clone(),
            public_key: self.public_key.clone(),
            signature: self.signature.clone(),
        }
    }

    fn from_pb(p: pb::SignedServerInfo) -> Result<Self, MessageError> {
        if p.public_key.len() > MAX_PUBLIC_KEY_BYTES {
            return Err(field_error(
                "public_key",
                format!("{} bytes", p.public_key.len()),
            ));
        }
        if p.signature.len() > MAX_SIGNATURE_BYTES {
            return Err(field_error(
                "signature",
                format!("{} bytes", p.signature.len()),
            ));
        }
        Ok(Self {
            info: ServerInfo::decode(&p.info)?,
            info_bytes: p.info,
            public_key: p.public_key,
            signature: p.signature,
        })
    }

    /// Encodes it (the gossipsub payload).
    pub fn encode(&self) -> Vec<u8> {
        self.to_pb().encode_to_vec()
    }

    /// Decodes it and validates the announcement inside.
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        ensure_at_most(
            bytes.len(),
            MAX_CONTROL_BYTES + MAX_PUBLIC_KEY_BYTES + MAX_SIGNATURE_BYTES,
        )?;
        Self::from_pb(decode_pb(bytes)?)
    }
}

/// Encodes an information answer.
pub fn encode_info_response(servers: &[SignedInfo]) -> Vec<u8> {
    pb::InfoResponse {
        signed: servers.iter().map(SignedInfo::to_pb).collect(),
    }
    .encode_to_vec()
}

/// Decodes an information answer; invalid entries are an error. The
/// signatures are the caller's to check.
pub fn decode_info_response(bytes: &[u8]) -> Result<Vec<SignedInfo>, MessageError> {
    ensure_at_most(bytes.len(), MAX_INFO_BYTES)?;
    let mut servers = 0;
    for_each_field(bytes, |n, payload| {
        if n == field::INFO_RESPONSE_SIGNED {
            servers += 1;
            if servers > MAX_INFO_SERVERS {
                return Err(field_error(
                    "signed",
                    format!("more than {MAX_INFO_SERVERS} entries"),
                ));
            }
            let entry = payload.unwrap_or_default();
            ensure_at_most(
                entry.len(),
                MAX_CONTROL_BYTES + MAX_PUBLIC_KEY_BYTES + MAX_SIGNATURE_BYTES,
            )?;
            for_each_field(entry, |n, info| {
                if n == field::SIGNED_SERVER_INFO_INFO {
                    precheck_server_info(info.unwrap_or_default())?;
                }
                Ok(())
            })?;
        }
        Ok(())
    })?;
    let r = decode_pb::<pb::InfoResponse>(bytes)?;
    r.signed.into_iter().map(SignedInfo::from_pb).collect()
}

/// Limits a `ServerInfo` before decoding: size and number of addresses.
fn precheck_server_info(bytes: &[u8]) -> Result<(), MessageError> {
    ensure_at_most(bytes.len(), MAX_CONTROL_BYTES)?;
    ensure_repeated_at_most(
        bytes,
        field::SERVER_INFO_ADDRS,
        MAX_ADDRS,
        "addrs",
        "addresses",
    )?;
    ensure_repeated_at_most(
        bytes,
        field::SERVER_INFO_ADAPTERS,
        MAX_ANNOUNCED_ADAPTERS,
        "adapters",
        "adapters",
    )
}
