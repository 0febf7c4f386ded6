//! Messages of `/nomoat/infer/1` and `/nomoat/info/1`: checked domain types
//! over the private prost types generated from `proto/nomoat/v1`.

use std::fmt;

use bytes::Bytes;
use prost::Message as _;

use crate::{ErrorCode, TensorError, TensorFrame, MAX_TENSOR_BYTES};

#[allow(
    clippy::all,
    missing_docs,
    unreachable_pub,
    missing_debug_implementations
)]
pub(crate) mod pb {
    include!(concat!(env!("OUT_DIR"), "/nomoat.v1.rs"));
}

/// Protocol id of inference sessions.
pub const INFER_PROTOCOL: &str = "/nomoat/infer/1";
/// Protocol id of swarm information queries.
pub const INFO_PROTOCOL: &str = "/nomoat/info/1";
/// Largest message on any nomoat stream, length prefix excluded: one tensor
/// frame plus room for the envelope.
pub const MAX_MESSAGE_BYTES: usize = MAX_TENSOR_BYTES + 64 * 1024;
/// Most hops in a route.
pub const MAX_ROUTE_HOPS: usize = 64;
/// Most servers in one information answer.
pub const MAX_INFO_SERVERS: usize = 1024;
/// Largest message that carries no hidden state (everything but `Step`,
/// `Result` and `Copy`; a `ServerInfo`; an info request).
pub const MAX_CONTROL_BYTES: usize = 256 * 1024;
/// Largest information answer.
pub const MAX_INFO_BYTES: usize = 4 * 1024 * 1024;
/// Longest model id, error message, version or address accepted.
pub const MAX_TEXT_BYTES: usize = 4096;
/// Most addresses in one `ServerInfo`.
pub const MAX_ADDRS: usize = 32;
/// Length of a session id.
pub const SESSION_ID_LEN: usize = 16;
/// Longest peer id accepted (a libp2p peer id is a multihash of at most a few
/// dozen bytes).
const MAX_PEER_ID_BYTES: usize = 128;

/// Why a message could not be decoded or is not valid.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// The bytes are not a protobuf message of the expected type.
    #[error("malformed message: {0}")]
    Decode(String),
    /// The message is longer than [`MAX_MESSAGE_BYTES`].
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Declared or actual length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The envelope carries no message.
    #[error("empty frame")]
    Empty,
    /// A field is missing or out of range.
    #[error("invalid field `{field}`: {reason}")]
    Field {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor inside the message is invalid.
    #[error("tensor: {0}")]
    Tensor(#[from] TensorError),
    /// Content does not hash to the name it was asked for by (a manifest
    /// and its model id, a chunk and its hash): corrupt or forged in transit.
    #[error("{what} hashes to {got}, not to the {expected} it was asked for: corrupt or forged; fetch it from another peer")]
    WrongHash {
        /// What was checked.
        what: &'static str,
        /// The hash asked for (hex).
        expected: String,
        /// The hash of what arrived (hex).
        got: String,
    },
}

impl From<&MessageError> for ErrorCode {
    fn from(e: &MessageError) -> Self {
        match e {
            MessageError::TooLarge { .. } => ErrorCode::TooLarge,
            MessageError::Tensor(t) => ErrorCode::from(t),
            _ => ErrorCode::Malformed,
        }
    }
}

fn peer_id(id: Vec<u8>, name: &'static str) -> Result<Vec<u8>, MessageError> {
    if id.is_empty() || id.len() > MAX_PEER_ID_BYTES {
        return Err(field(
            name,
            format!("{} bytes, expected 1..={MAX_PEER_ID_BYTES}", id.len()),
        ));
    }
    Ok(id)
}

pub(crate) fn field(field: &'static str, reason: impl Into<String>) -> MessageError {
    MessageError::Field {
        field,
        reason: reason.into(),
    }
}

/// Checks the length prefix of a message before reading it.
pub fn check_message_len(len: usize) -> Result<(), MessageError> {
    if len > MAX_MESSAGE_BYTES {
        return Err(MessageError::TooLarge {
            len,
            max: MAX_MESSAGE_BYTES,
        });
    }
    Ok(())
}

/// Walks the top-level fields of protobuf bytes, calling `f` with each
/// field number and, for length-delimited fields, the payload. Lets limits
/// on repeated fields be checked before prost allocates anything.
pub(crate) fn walk(
    bytes: &[u8],
    mut f: impl FnMut(u32, Option<&[u8]>) -> Result<(), MessageError>,
) -> Result<(), MessageError> {
    fn varint(b: &[u8], i: &mut usize) -> Result<u64, MessageError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b
                .get(*i)
                .ok_or_else(|| MessageError::Decode("truncated varint".into()))?;
            *i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(MessageError::Decode("varint too long".into()))
    }
    let mut i = 0;
    while i < bytes.len() {
        let key = varint(bytes, &mut i)?;
        let number = (key >> 3) as u32;
        let payload = match key & 7 {
            0 => {
                varint(bytes, &mut i)?;
                None
            }
            1 => {
                i = i
                    .checked_add(8)
                    .filter(|&e| e <= bytes.len())
                    .ok_or_else(|| MessageError::Decode("truncated field".into()))?;
                None
            }
            5 => {
                i = i
                    .checked_add(4)
                    .filter(|&e| e <= bytes.len())
                    .ok_or_else(|| MessageError::Decode("truncated field".into()))?;
                None
            }
            2 => {
                let len = varint(bytes, &mut i)?;
                let end = usize::try_from(len)
                    .ok()
                    .and_then(|l| i.checked_add(l))
                    .filter(|&e| e <= bytes.len())
                    .ok_or_else(|| MessageError::Decode("truncated field".into()))?;
                let p = &bytes[i..end];
                i = end;
                Some(p)
            }
            other => {
                return Err(MessageError::Decode(format!(
                    "unsupported wire type {other}"
                )))
            }
        };
        f(number, payload)?;
    }
    Ok(())
}

pub(crate) fn too_large(len: usize, max: usize) -> Result<(), MessageError> {
    if len > max {
        return Err(MessageError::TooLarge { len, max });
    }
    Ok(())
}

/// Limits a `ServerInfo` before decoding: size and number of addresses.
fn precheck_server_info(bytes: &[u8]) -> Result<(), MessageError> {
    too_large(bytes.len(), MAX_CONTROL_BYTES)?;
    let mut addrs = 0;
    walk(bytes, |n, _| {
        if n == 9 {
            addrs += 1;
            if addrs > MAX_ADDRS {
                return Err(field("addrs", format!("more than {MAX_ADDRS} addresses")));
            }
        }
        Ok(())
    })
}

/// A session's id: 16 random bytes chosen by the client.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub [u8; SESSION_ID_LEN]);

impl SessionId {
    fn from_bytes(b: &[u8]) -> Result<Self, MessageError> {
        let arr: [u8; SESSION_ID_LEN] = b
            .try_into()
            .map_err(|_| field("session_id", format!("{} bytes, expected 16", b.len())))?;
        Ok(Self(arr))
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

/// Blocks `[start, end)` of a model, checked non-empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Blocks {
    /// First block.
    pub start: u32,
    /// One past the last block.
    pub end: u32,
}

impl Blocks {
    fn from_pb(b: Option<pb::BlockRange>, name: &'static str) -> Result<Self, MessageError> {
        let b = b.ok_or_else(|| field(name, "missing"))?;
        if b.start >= b.end {
            return Err(field(name, format!("empty range {}..{}", b.start, b.end)));
        }
        Ok(Self {
            start: b.start,
            end: b.end,
        })
    }

    fn to_pb(self) -> pb::BlockRange {
        pb::BlockRange {
            start: self.start,
            end: self.end,
        }
    }
}

impl fmt::Display for Blocks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

/// One server of a route: its peer id (binary) and the blocks it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// libp2p peer id bytes.
    pub peer_id: Vec<u8>,
    /// Blocks this hop runs for the session.
    pub blocks: Blocks,
}

/// Opens a session on one hop of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenSession {
    /// The session.
    pub session_id: SessionId,
    /// The model every hop serves.
    pub model_id: String,
    /// The route, in order; consecutive hops' blocks chain.
    pub route: Vec<Hop>,
    /// The receiver's index in `route`.
    pub hop_index: u32,
    /// Most positions the session holds.
    pub max_length: u32,
}

impl OpenSession {
    /// The receiver's hop.
    ///
    /// # Panics
    ///
    /// If `hop_index` is out of `route`, which a decoded `OpenSession` never is.
    pub fn hop(&self) -> &Hop {
        &self.route[self.hop_index as usize]
    }

    /// The hop after the receiver, if any.
    pub fn next_hop(&self) -> Option<&Hop> {
        self.route.get(self.hop_index as usize + 1)
    }
}

/// Hidden states for positions `start_pos..start_pos + t`.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The session.
    pub session_id: SessionId,
    /// Sequence number, increasing within a session.
    pub seq: u64,
    /// First position.
    pub start_pos: u32,
    /// Shape `[t, hidden]`.
    pub hidden: TensorFrame,
    /// `None` for a step through the whole route. `Some(h)` for a replay
    /// that refills a replacement hop's cache after a failover: hop `h`
    /// neither forwards nor returns its output, it only copies it to the
    /// client.
    pub last_hop: Option<u32>,
}

/// A session's new route after a failover, sent to a hop that stays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reroute {
    /// The session.
    pub session_id: SessionId,
    /// The new route.
    pub route: Vec<Hop>,
    /// The receiver's index in `route`.
    pub hop_index: u32,
}

impl Reroute {
    /// The receiver's hop.
    ///
    /// # Panics
    ///
    /// If `hop_index` is out of `route`, which a decoded `Reroute` never is.
    pub fn hop(&self) -> &Hop {
        &self.route[self.hop_index as usize]
    }

    /// The hop after the receiver, if any.
    pub fn next_hop(&self) -> Option<&Hop> {
        self.route.get(self.hop_index as usize + 1)
    }

    /// The hop before the receiver, if any.
    pub fn prev_hop(&self) -> Option<&Hop> {
        (self.hop_index as usize)
            .checked_sub(1)
            .map(|i| &self.route[i])
    }
}

/// A typed error frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// The code; `None` for a code this version does not know.
    pub code: Option<ErrorCode>,
    /// The raw code.
    pub raw_code: u16,
    /// What went wrong, for people.
    pub message: String,
    /// The session, if the error is about one.
    pub session_id: Option<SessionId>,
    /// The step, or 0.
    pub seq: u64,
    /// The hop that reports it.
    pub hop_index: u32,
}

impl ErrorFrame {
    /// An error about a session (or none) and step (or 0).
    pub fn new(
        code: ErrorCode,
        message: impl Into<String>,
        session_id: Option<SessionId>,
        seq: u64,
        hop_index: u32,
    ) -> Self {
        Self {
            code: Some(code),
            raw_code: code.as_u16(),
            message: message.into(),
            session_id,
            seq,
            hop_index,
        }
    }
}

impl fmt::Display for ErrorFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(c) => write!(f, "{c:?}: {}", self.message),
            None => write!(f, "error {}: {}", self.raw_code, self.message),
        }
    }
}

/// Every message of `/nomoat/infer/1`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum InferMessage {
    /// Client -> each hop: open a session.
    Open(OpenSession),
    /// Hop -> next hop: this push stream carries `session_id`'s steps.
    Attach {
        /// The session.
        session_id: SessionId,
        /// The sender's hop index.
        from_hop: u32,
    },
    /// Hidden states into a hop.
    Step(Step),
    /// Last hop -> client: final hidden states.
    Result {
        /// The session.
        session_id: SessionId,
        /// The step.
        seq: u64,
        /// Shape `[t, hidden]`.
        hidden: TensorFrame,
    },
    /// Hop -> client: a copy of the hop's output.
    Copy {
        /// The session.
        session_id: SessionId,
        /// The step.
        seq: u64,
        /// The hop.
        hop_index: u32,
        /// Shape `[t, hidden]`.
        hidden: TensorFrame,
    },
    /// Hop -> client: the session is open on the hop.
    Opened {
        /// The session.
        session_id: SessionId,
        /// The hop.
        hop_index: u32,
        /// Positions the hop will hold.
        max_length: u32,
    },
    /// A typed error.
    Error(ErrorFrame),
    /// Either side: the session is over.
    Close {
        /// The session.
        session_id: SessionId,
    },
    /// Client -> a hop that stays: the session's route changed.
    Reroute(Reroute),
}

/// Validates a route and the receiver's index in it.
fn route(hops: Vec<pb::Hop>, hop_index: u32) -> Result<Vec<Hop>, MessageError> {
    if hops.is_empty() || hops.len() > MAX_ROUTE_HOPS {
        return Err(field(
            "route",
            format!("{} hops, expected 1..={MAX_ROUTE_HOPS}", hops.len()),
        ));
    }
    let route = hops
        .into_iter()
        .map(|h| {
            Ok(Hop {
                peer_id: peer_id(h.peer_id, "route.peer_id")?,
                blocks: Blocks::from_pb(h.blocks, "route.blocks")?,
            })
        })
        .collect::<Result<Vec<_>, MessageError>>()?;
    if route
        .windows(2)
        .any(|w| w[0].blocks.end != w[1].blocks.start)
    {
        return Err(field("route", "consecutive hops' blocks do not chain"));
    }
    if hop_index as usize >= route.len() {
        return Err(field(
            "hop_index",
            format!("{hop_index} of {} hops", route.len()),
        ));
    }
    Ok(route)
}

fn route_to_pb(route: &[Hop]) -> Vec<pb::Hop> {
    route
        .iter()
        .map(|h| pb::Hop {
            peer_id: h.peer_id.clone(),
            blocks: Some(h.blocks.to_pb()),
        })
        .collect()
}

pub(crate) fn text(s: String, name: &'static str) -> Result<String, MessageError> {
    if s.len() > MAX_TEXT_BYTES {
        return Err(field(
            name,
            format!("{} bytes, limit {MAX_TEXT_BYTES}", s.len()),
        ));
    }
    Ok(s)
}

impl InferMessage {
    /// Decodes and validates one message (without its length prefix).
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        check_message_len(bytes.len())?;
        Self::decode_bytes(Bytes::copy_from_slice(bytes))
    }

    /// [`decode`](Self::decode) from a shared buffer: the hidden states of
    /// `Step`, `Result` and `Copy` are slices of `bytes`, not copies.
    pub fn decode_bytes(bytes: Bytes) -> Result<Self, MessageError> {
        check_message_len(bytes.len())?;
        // Only hidden-state messages may be large, and a route's length is
        // checked before anything is allocated for it.
        let large = bytes.len() > MAX_CONTROL_BYTES;
        walk(&bytes, |n, payload| {
            if large && !matches!(n, 3..=5) {
                return Err(MessageError::TooLarge {
                    len: bytes.len(),
                    max: MAX_CONTROL_BYTES,
                });
            }
            if let (1 | 9, Some(msg)) = (n, payload) {
                let route_field = if n == 1 { 3 } else { 2 };
                let mut hops = 0;
                walk(msg, |m, _| {
                    hops += usize::from(m == route_field);
                    if hops > MAX_ROUTE_HOPS {
                        return Err(field("route", format!("more than {MAX_ROUTE_HOPS} hops")));
                    }
                    Ok(())
                })?;
            }
            Ok(())
        })?;
        let frame = pb::InferFrame::decode(bytes.clone())
            .map_err(|e| MessageError::Decode(e.to_string()))?;
        use pb::infer_frame::Kind;
        Ok(match frame.kind.ok_or(MessageError::Empty)? {
            Kind::Open(o) => {
                let route = route(o.route, o.hop_index)?;
                if o.max_length == 0 {
                    return Err(field("max_length", "zero"));
                }
                InferMessage::Open(OpenSession {
                    session_id: SessionId::from_bytes(&o.session_id)?,
                    model_id: text(o.model_id, "model_id")?,
                    route,
                    hop_index: o.hop_index,
                    max_length: o.max_length,
                })
            }
            Kind::Attach(a) => InferMessage::Attach {
                session_id: SessionId::from_bytes(&a.session_id)?,
                from_hop: a.from_hop,
            },
            Kind::Step(s) => InferMessage::Step(Step {
                session_id: SessionId::from_bytes(&s.session_id)?,
                seq: s.seq,
                start_pos: s.start_pos,
                hidden: TensorFrame::decode_bytes(s.hidden)?,
                last_hop: s.until_hop.checked_sub(1),
            }),
            Kind::Result(r) => InferMessage::Result {
                session_id: SessionId::from_bytes(&r.session_id)?,
                seq: r.seq,
                hidden: TensorFrame::decode_bytes(r.hidden)?,
            },
            Kind::Copy(c) => InferMessage::Copy {
                session_id: SessionId::from_bytes(&c.session_id)?,
                seq: c.seq,
                hop_index: c.hop_index,
                hidden: TensorFrame::decode_bytes(c.hidden)?,
            },
            Kind::Opened(o) => InferMessage::Opened {
                session_id: SessionId::from_bytes(&o.session_id)?,
                hop_index: o.hop_index,
                max_length: o.max_length,
            },
            Kind::Error(e) => {
                let raw_code = u16::try_from(e.code).map_err(|_| field("code", "beyond u16"))?;
                InferMessage::Error(ErrorFrame {
                    code: ErrorCode::from_u16(raw_code),
                    raw_code,
                    message: text(e.message, "message")?,
                    session_id: if e.session_id.is_empty() {
                        None
                    } else {
                        Some(SessionId::from_bytes(&e.session_id)?)
                    },
                    seq: e.seq,
                    hop_index: e.hop_index,
                })
            }
            Kind::Close(c) => InferMessage::Close {
                session_id: SessionId::from_bytes(&c.session_id)?,
            },
            Kind::Reroute(r) => InferMessage::Reroute(Reroute {
                session_id: SessionId::from_bytes(&r.session_id)?,
                route: route(r.route, r.hop_index)?,
                hop_index: r.hop_index,
            }),
        })
    }

    fn to_pb(&self) -> pb::InferFrame {
        use pb::infer_frame::Kind;
        let kind = match self {
            InferMessage::Open(o) => Kind::Open(pb::OpenSession {
                session_id: o.session_id.0.to_vec(),
                model_id: o.model_id.clone(),
                route: route_to_pb(&o.route),
                hop_index: o.hop_index,
                max_length: o.max_length,
            }),
            InferMessage::Attach {
                session_id,
                from_hop,
            } => Kind::Attach(pb::AttachPush {
                session_id: session_id.0.to_vec(),
                from_hop: *from_hop,
            }),
            InferMessage::Step(s) => Kind::Step(pb::Step {
                session_id: s.session_id.0.to_vec(),
                seq: s.seq,
                start_pos: s.start_pos,
                hidden: s.hidden.encode().into(),
                until_hop: s.last_hop.map_or(0, |h| h.saturating_add(1)),
            }),
            InferMessage::Result {
                session_id,
                seq,
                hidden,
            } => Kind::Result(pb::StepResult {
                session_id: session_id.0.to_vec(),
                seq: *seq,
                hidden: hidden.encode().into(),
            }),
            InferMessage::Copy {
                session_id,
                seq,
                hop_index,
                hidden,
            } => Kind::Copy(pb::SpanOutput {
                session_id: session_id.0.to_vec(),
                seq: *seq,
                hop_index: *hop_index,
                hidden: hidden.encode().into(),
            }),
            InferMessage::Opened {
                session_id,
                hop_index,
                max_length,
            } => Kind::Opened(pb::SessionOpened {
                session_id: session_id.0.to_vec(),
                hop_index: *hop_index,
                max_length: *max_length,
            }),
            InferMessage::Error(e) => Kind::Error(pb::Error {
                code: e.raw_code as u32,
                message: e.message.clone(),
                session_id: e.session_id.map(|s| s.0.to_vec()).unwrap_or_default(),
                seq: e.seq,
                hop_index: e.hop_index,
            }),
            InferMessage::Close { session_id } => Kind::Close(pb::CloseSession {
                session_id: session_id.0.to_vec(),
            }),
            InferMessage::Reroute(r) => Kind::Reroute(pb::RerouteSession {
                session_id: r.session_id.0.to_vec(),
                route: route_to_pb(&r.route),
                hop_index: r.hop_index,
            }),
        };
        pb::InferFrame { kind: Some(kind) }
    }

    /// Encodes the message (without length prefix).
    pub fn encode(&self) -> Vec<u8> {
        self.to_pb().encode_to_vec()
    }

    /// Encodes the message with its 4-byte little-endian length prefix.
    ///
    /// Hidden-state messages are written directly (the same bytes prost
    /// writes), copying the elements once, straight into the output.
    pub fn encode_framed(&self) -> Vec<u8> {
        match self {
            // Replays are rare and keep prost's field order (until_hop last).
            InferMessage::Step(s) if s.last_hop.is_none() => frame_hidden(
                3,
                &s.session_id,
                &[(2, s.seq), (3, u64::from(s.start_pos))],
                4,
                &s.hidden,
            ),
            InferMessage::Result {
                session_id,
                seq,
                hidden,
            } => frame_hidden(4, session_id, &[(2, *seq)], 3, hidden),
            InferMessage::Copy {
                session_id,
                seq,
                hop_index,
                hidden,
            } => frame_hidden(
                5,
                session_id,
                &[(2, *seq), (3, u64::from(*hop_index))],
                4,
                hidden,
            ),
            _ => self.encode_framed_prost(),
        }
    }

    fn encode_framed_prost(&self) -> Vec<u8> {
        let body = self.to_pb();
        let len = body.encoded_len();
        let mut out = Vec::with_capacity(4 + len);
        out.extend_from_slice(&(len as u32).to_le_bytes());
        body.encode(&mut out).expect("a Vec grows as needed");
        out
    }
}

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
    pub blocks: Blocks,
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
    /// nomoat version.
    pub version: String,
    /// Addresses (multiaddr bytes).
    pub addrs: Vec<Vec<u8>>,
    /// Reachability.
    pub reachability: Reachability,
    /// Publisher's clock, ms since the Unix epoch.
    pub timestamp_ms: u64,
}

impl ServerInfo {
    fn from_pb(s: pb::ServerInfo) -> Result<Self, MessageError> {
        let blocks = Blocks::from_pb(s.blocks, "blocks")?;
        if blocks.end > s.num_blocks {
            return Err(field(
                "blocks",
                format!("{blocks} beyond {} blocks", s.num_blocks),
            ));
        }
        if s.addrs.len() > MAX_ADDRS {
            return Err(field("addrs", format!("{} addresses", s.addrs.len())));
        }
        if let Some(a) = s.addrs.iter().find(|a| a.len() > MAX_TEXT_BYTES) {
            return Err(field(
                "addrs",
                format!("address of {} bytes, limit {MAX_TEXT_BYTES}", a.len()),
            ));
        }
        if !s.throughput.is_finite() || s.throughput < 0.0 {
            return Err(field("throughput", "negative or not finite"));
        }
        if !s.load.is_finite() || s.load < 0.0 {
            return Err(field("load", "negative or not finite"));
        }
        Ok(Self {
            peer_id: peer_id(s.peer_id, "peer_id")?,
            model_id: text(s.model_id, "model_id")?,
            blocks,
            num_blocks: s.num_blocks,
            hidden_size: s.hidden_size,
            throughput: s.throughput,
            free_kv_tokens: s.free_kv_tokens,
            load: s.load,
            active_sessions: s.active_sessions,
            version: text(s.version, "version")?,
            addrs: s.addrs,
            reachability: match pb::Reachability::try_from(s.reachability) {
                Ok(pb::Reachability::Public) => Reachability::Public,
                Ok(pb::Reachability::Private) => Reachability::Private,
                _ => Reachability::Unknown,
            },
            timestamp_ms: s.timestamp_ms,
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
            hidden_size: self.hidden_size,
        }
    }

    /// Encodes a heartbeat (gossipsub payload).
    pub fn encode(&self) -> Vec<u8> {
        self.to_pb().encode_to_vec()
    }

    /// Decodes and validates a heartbeat.
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        precheck_server_info(bytes)?;
        Self::from_pb(
            pb::ServerInfo::decode(bytes).map_err(|e| MessageError::Decode(e.to_string()))?,
        )
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
    too_large(bytes.len(), MAX_CONTROL_BYTES)?;
    let r = pb::InfoRequest::decode(bytes).map_err(|e| MessageError::Decode(e.to_string()))?;
    text(r.model_id, "model_id")
}

/// Encodes an information answer.
pub fn encode_info_response(servers: &[ServerInfo]) -> Vec<u8> {
    pb::InfoResponse {
        servers: servers.iter().map(ServerInfo::to_pb).collect(),
    }
    .encode_to_vec()
}

/// Decodes an information answer; invalid entries are an error.
pub fn decode_info_response(bytes: &[u8]) -> Result<Vec<ServerInfo>, MessageError> {
    too_large(bytes.len(), MAX_INFO_BYTES)?;
    let mut servers = 0;
    walk(bytes, |n, payload| {
        if n == 1 {
            servers += 1;
            if servers > MAX_INFO_SERVERS {
                return Err(field(
                    "servers",
                    format!("more than {MAX_INFO_SERVERS} entries"),
                ));
            }
            precheck_server_info(payload.unwrap_or_default())?;
        }
        Ok(())
    })?;
    let r = pb::InfoResponse::decode(bytes).map_err(|e| MessageError::Decode(e.to_string()))?;
    if r.servers.len() > MAX_INFO_SERVERS {
        return Err(field("servers", format!("{} entries", r.servers.len())));
    }
    r.servers.into_iter().map(ServerInfo::from_pb).collect()
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros()).div_ceil(7) as usize
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Writes `InferFrame { <outer>: { 1: session_id, <varints>, <hidden_field>:
/// hidden } }` with its length prefix, as prost would (fields in number
/// order, zero varints omitted). Field numbers are below 16: one-byte tags.
fn frame_hidden(
    outer: u8,
    session: &SessionId,
    varints: &[(u8, u64)],
    hidden_field: u8,
    hidden: &TensorFrame,
) -> Vec<u8> {
    let hlen = hidden.encoded_len();
    let inner = 2
        + SESSION_ID_LEN
        + varints
            .iter()
            .filter(|(_, v)| *v != 0)
            .map(|(_, v)| 1 + varint_len(*v))
            .sum::<usize>()
        + 1
        + varint_len(hlen as u64)
        + hlen;
    let body = 1 + varint_len(inner as u64) + inner;
    let mut out = Vec::with_capacity(4 + body);
    out.extend_from_slice(&(body as u32).to_le_bytes());
    out.push(outer << 3 | 2);
    put_varint(&mut out, inner as u64);
    out.push(1 << 3 | 2);
    out.push(SESSION_ID_LEN as u8);
    out.extend_from_slice(&session.0);
    for &(field, v) in varints {
        if v != 0 {
            out.push(field << 3);
            put_varint(&mut out, v);
        }
    }
    out.push(hidden_field << 3 | 2);
    put_varint(&mut out, hlen as u64);
    hidden.encode_header_to(&mut out);
    out.extend_from_slice(hidden.data());
    out
}

#[cfg(test)]
mod framing_tests {
    use super::*;
    use crate::DType;

    #[test]
    fn direct_framing_equals_prost() {
        let id = SessionId([0xab; SESSION_ID_LEN]);
        for (t, seq, pos) in [
            (1usize, 0u64, 0u32),
            (3, 1, 7),
            (200, 300, 100_000),
            (1, u64::MAX, u32::MAX),
        ] {
            let values: Vec<f32> = (0..t * 8).map(|i| i as f32 * 0.5 - 3.0).collect();
            let hidden = TensorFrame::from_f32_vec(vec![t, 8], values).unwrap();
            for m in [
                InferMessage::Step(Step {
                    session_id: id,
                    seq,
                    start_pos: pos,
                    hidden: hidden.clone(),
                    last_hop: None,
                }),
                InferMessage::Result {
                    session_id: id,
                    seq,
                    hidden: hidden.clone(),
                },
                InferMessage::Copy {
                    session_id: id,
                    seq,
                    hop_index: pos,
                    hidden: hidden.clone(),
                },
            ] {
                let direct = m.encode_framed();
                assert_eq!(direct, m.encode_framed_prost(), "{m:?}");
                let back = InferMessage::decode_bytes(Bytes::from(direct[4..].to_vec())).unwrap();
                assert_eq!(back, m);
            }
        }
        let f16 = TensorFrame::from_f32(vec![2, 4], &[1.0; 8], DType::F16).unwrap();
        let m = InferMessage::Result {
            session_id: id,
            seq: 9,
            hidden: f16,
        };
        assert_eq!(m.encode_framed(), m.encode_framed_prost());
    }

    #[test]
    fn decoded_hidden_states_share_the_received_buffer() {
        let hidden = TensorFrame::from_f32_vec(vec![2, 4], vec![0.25; 8]).unwrap();
        let m = InferMessage::Step(Step {
            session_id: SessionId([1; SESSION_ID_LEN]),
            seq: 1,
            start_pos: 0,
            hidden,
            last_hop: None,
        });
        let buf = Bytes::from(m.encode_framed()[4..].to_vec());
        let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
        let InferMessage::Step(step) = InferMessage::decode_bytes(buf).unwrap() else {
            panic!("not a step");
        };
        assert!(range.contains(&(step.hidden.data().as_ptr() as usize)));
    }
}
