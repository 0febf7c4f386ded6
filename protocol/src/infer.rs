//! Messages of `/nomoat/infer/1`: opening a session on each hop of a
//! route, the steps that carry hidden states through it, their results and
//! copies, errors, failover and closing.

use std::fmt;

use bytes::Bytes;
use prost::Message as _;

use crate::codec::{
    bounded_text, decode_pb, encode_framed_pb, ensure_repeated_at_most, field_error,
    for_each_field, frame_hidden, tag, HiddenLayout, LEN, VARINT,
};
use crate::ids::peer_id;
use crate::pb::{self, field};
use crate::{
    check_message_len, BlockRange, ErrorCode, Hash, Hop, MessageError, SessionId, TensorFrame,
    MAX_CONTROL_BYTES,
};

/// Protocol id of inference sessions.
pub const INFER_PROTOCOL: &str = "/nomoat/infer/1";
/// Most hops in a route.
pub const MAX_ROUTE_HOPS: usize = 64;

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
    /// The LoRA adapter the session runs with, if any.
    pub adapter: Option<Hash>,
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

impl ErrorFrame {
    /// Reads an error from the wire: the code must fit a `u16`, the message
    /// is bounded, and a session id is either absent or 16 bytes.
    pub(crate) fn from_pb(e: pb::Error) -> Result<Self, MessageError> {
        let raw_code = u16::try_from(e.code).map_err(|_| field_error("code", "beyond u16"))?;
        Ok(Self {
            code: ErrorCode::from_u16(raw_code),
            raw_code,
            message: bounded_text(e.message, "message")?,
            session_id: if e.session_id.is_empty() {
                None
            } else {
                Some(SessionId::from_bytes(&e.session_id)?)
            },
            seq: e.seq,
            hop_index: e.hop_index,
        })
    }

    pub(crate) fn to_pb(&self) -> pb::Error {
        pb::Error {
            code: u32::from(self.raw_code),
            message: self.message.clone(),
            session_id: self.session_id.map(|s| s.0.to_vec()).unwrap_or_default(),
            seq: self.seq,
            hop_index: self.hop_index,
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
    /// Hop -> client, just before a `Result` or `Copy`: the hop's signed
    /// receipt of that output.
    Receipt(crate::Receipt),
}

/// Validates a route and the receiver's index in it.
fn route(hops: Vec<pb::Hop>, hop_index: u32) -> Result<Vec<Hop>, MessageError> {
    if hops.is_empty() || hops.len() > MAX_ROUTE_HOPS {
        return Err(field_error(
            "route",
            format!("{} hops, expected 1..={MAX_ROUTE_HOPS}", hops.len()),
        ));
    }
    let route = hops
        .into_iter()
        .map(|h| {
            Ok(Hop {
                peer_id: peer_id(h.peer_id, "route.peer_id")?,
                blocks: BlockRange::from_pb(h.blocks, "route.blocks")?,
            })
        })
        .collect::<Result<Vec<_>, MessageError>>()?;
    if route
        .windows(2)
        .any(|w| w[0].blocks.end != w[1].blocks.start)
    {
        return Err(field_error(
            "route",
            "consecutive hops' blocks do not chain",
        ));
    }
    if hop_index as usize >= route.len() {
        return Err(field_error(
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
        for_each_field(&bytes, |n, payload| {
            let hidden = matches!(
                n,
                field::INFER_FRAME_STEP | field::INFER_FRAME_RESULT | field::INFER_FRAME_COPY
            );
            if large && !hidden {
                return Err(MessageError::TooLarge {
                    len: bytes.len(),
                    max: MAX_CONTROL_BYTES,
                });
            }
            let route_field = match n {
                field::INFER_FRAME_OPEN => field::OPEN_SESSION_ROUTE,
                field::INFER_FRAME_REROUTE => field::REROUTE_SESSION_ROUTE,
                _ => return Ok(()),
            };
            let msg = payload.unwrap_or_default();
            ensure_repeated_at_most(msg, route_field, MAX_ROUTE_HOPS, "route", "hops")
        })?;
        let frame: pb::InferFrame = decode_pb(bytes.clone())?;
        use pb::infer_frame::Kind;
        Ok(match frame.kind.ok_or(MessageError::Empty)? {
            Kind::Open(o) => {
                let route = route(o.route, o.hop_index)?;
                if o.max_length == 0 {
                    return Err(field_error("max_length", "zero"));
                }
                InferMessage::Open(OpenSession {
                    session_id: SessionId::from_bytes(&o.session_id)?,
                    model_id: bounded_text(o.model_id, "model_id")?,
                    route,
                    hop_index: o.hop_index,
                    max_length: o.max_length,
                    adapter: if o.adapter.is_empty() {
                        None
                    } else {
                        Some(Hash::from_bytes(&o.adapter, "adapter")?)
                    },
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
            Kind::Error(e) => InferMessage::Error(ErrorFrame::from_pb(e)?),
            Kind::Close(c) => InferMessage::Close {
                session_id: SessionId::from_bytes(&c.session_id)?,
            },
            Kind::Reroute(r) => InferMessage::Reroute(Reroute {
                session_id: SessionId::from_bytes(&r.session_id)?,
                route: route(r.route, r.hop_index)?,
                hop_index: r.hop_index,
            }),
            Kind::Receipt(r) => InferMessage::Receipt(crate::Receipt::from_pb(r)?),
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
                adapter: o.adapter.map(|h| h.0.to_vec()).unwrap_or_default(),
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
            InferMessage::Error(e) => Kind::Error(e.to_pb()),
            InferMessage::Close { session_id } => Kind::Close(pb::CloseSession {
                session_id: session_id.0.to_vec(),
            }),
            InferMessage::Reroute(r) => Kind::Reroute(pb::RerouteSession {
                session_id: r.session_id.0.to_vec(),
                route: route_to_pb(&r.route),
                hop_index: r.hop_index,
            }),
            InferMessage::Receipt(r) => Kind::Receipt(r.to_pb()),
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
                &STEP_LAYOUT,
                &s.session_id,
                &[s.seq, u64::from(s.start_pos)],
                &s.hidden,
            ),
            InferMessage::Result {
                session_id,
                seq,
                hidden,
            } => frame_hidden(&RESULT_LAYOUT, session_id, &[*seq], hidden),
            InferMessage::Copy {
                session_id,
                seq,
                hop_index,
                hidden,
            } => frame_hidden(
                &COPY_LAYOUT,
                session_id,
                &[*seq, u64::from(*hop_index)],
                hidden,
            ),
            _ => self.encode_framed_prost(),
        }
    }

    fn encode_framed_prost(&self) -> Vec<u8> {
        encode_framed_pb(&self.to_pb())
    }

    /// The message's kind, as its variant is named: `"Open"`, `"Step"` …
    pub fn name(&self) -> &'static str {
        match self {
            InferMessage::Open(_) => "Open",
            InferMessage::Attach { .. } => "Attach",
            InferMessage::Step(_) => "Step",
            InferMessage::Result { .. } => "Result",
            InferMessage::Copy { .. } => "Copy",
            InferMessage::Opened { .. } => "Opened",
            InferMessage::Error(_) => "Error",
            InferMessage::Close { .. } => "Close",
            InferMessage::Reroute(_) => "Reroute",
            InferMessage::Receipt(_) => "Receipt",
        }
    }
}

/// `InferFrame { step: Step { session_id, seq, start_pos, hidden } }`.
const STEP_LAYOUT: HiddenLayout = HiddenLayout {
    frame: tag(field::INFER_FRAME_STEP, LEN),
    session_id: tag(field::STEP_SESSION_ID, LEN),
    varints: &[
        tag(field::STEP_SEQ, VARINT),
        tag(field::STEP_START_POS, VARINT),
    ],
    hidden: tag(field::STEP_HIDDEN, LEN),
};

/// `InferFrame { result: StepResult { session_id, seq, hidden } }`.
const RESULT_LAYOUT: HiddenLayout = HiddenLayout {
    frame: tag(field::INFER_FRAME_RESULT, LEN),
    session_id: tag(field::STEP_RESULT_SESSION_ID, LEN),
    varints: &[tag(field::STEP_RESULT_SEQ, VARINT)],
    hidden: tag(field::STEP_RESULT_HIDDEN, LEN),
};

/// `InferFrame { copy: SpanOutput { session_id, seq, hop_index, hidden } }`.
const COPY_LAYOUT: HiddenLayout = HiddenLayout {
    frame: tag(field::INFER_FRAME_COPY, LEN),
    session_id: tag(field::SPAN_OUTPUT_SESSION_ID, LEN),
    varints: &[
        tag(field::SPAN_OUTPUT_SEQ, VARINT),
        tag(field::SPAN_OUTPUT_HOP_INDEX, VARINT),
    ],
    hidden: tag(field::SPAN_OUTPUT_HIDDEN, LEN),
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, SESSION_ID_LEN};

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
