//! Tensor frame and message errors, and the wire's error codes they map to.

use crate::{DType, MAX_TENSOR_RANK};

/// Why a tensor frame could not be built, decoded or accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TensorError {
    /// The input does not start with the magic `"NT"`.
    #[error("not a tensor frame: bad magic")]
    BadMagic,
    /// The header's version is not [`TENSOR_FRAME_VERSION`](crate::TENSOR_FRAME_VERSION).
    #[error("unsupported tensor frame version {0}")]
    UnsupportedVersion(u8),
    /// The header's dtype byte names no [`DType`].
    #[error("unknown dtype byte {0}")]
    UnknownDType(u8),
    /// The tensor has more than [`MAX_TENSOR_RANK`] axes.
    #[error("tensor rank {rank} exceeds the limit of {}", MAX_TENSOR_RANK)]
    RankTooLarge { rank: usize },
    /// Dimension `axis` is zero; every dimension must be at least 1.
    #[error("dimension {axis} is zero")]
    ZeroDim { axis: usize },
    /// The input ends early: the frame needs `needed` bytes (as far as read), `got` given.
    #[error("tensor frame truncated: needs {needed} bytes, got {got}")]
    Truncated { needed: usize, got: usize },
    /// The input goes on for `extra` bytes after the frame ends.
    #[error("{extra} trailing bytes after the tensor frame")]
    TrailingBytes { extra: usize },
    /// The data is `got` bytes where the shape and dtype need `expected`.
    #[error("tensor data is {got} bytes, but shape and dtype need {expected}")]
    LengthMismatch { expected: usize, got: usize },
    /// The data would take `bytes` (saturating at `usize::MAX`), over the limit `max`.
    #[error("tensor of {bytes} bytes exceeds the limit of {max}")]
    TooLarge { bytes: usize, max: usize },
    /// A reserved header byte is not zero.
    #[error("reserved tensor header bytes are not zero")]
    ReservedNotZero,
    /// The frame's dtype `got` is not the `expected` one.
    #[error("expected dtype {expected}, got {got}")]
    DTypeMismatch { expected: DType, got: DType },
    /// The frame's shape `got` does not match `expected`, where `?` matches any dimension.
    #[error("expected shape {expected}, got {got:?}")]
    ShapeMismatch { expected: String, got: Vec<usize> },
    /// A blockwise `dtype` needs a last axis that is a multiple of `block`; it is `dim`.
    #[error("{dtype} needs a last dimension that is a multiple of {block}, got {dim}")]
    NotBlockAligned {
        dtype: DType,
        dim: usize,
        block: usize,
    },
    /// Block `block` holds a value `Q8Block` cannot represent (not finite, or
    /// a scale past f16's range).
    #[error("block {block} holds a value 8-bit blocks cannot represent (not finite or too large)")]
    Unrepresentable { block: usize },
}

/// Why a message could not be decoded or is not valid.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// The bytes are not a protobuf message of the expected type.
    #[error("malformed message: {0}")]
    Decode(String),
    /// The message is longer than [`MAX_MESSAGE_BYTES`](crate::MAX_MESSAGE_BYTES),
    /// or a part of it longer than the limit of that part.
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

/// The wire's one error namespace, sent as a `u16` in every nomoat error reply.
///
/// Codes never change meaning; new codes are only added. A receiver that reads an
/// unknown code ([`from_u16`](Self::from_u16) gives `None`) treats it as
/// [`Internal`](Self::Internal).
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The peer failed for a reason of its own; another peer may succeed.
    Internal = 1,
    /// A message or frame could not be decoded.
    Malformed = 2,
    /// A message or tensor exceeds a protocol limit.
    TooLarge = 3,
    /// A tensor's rank or dimensions are invalid or not what the peer expects.
    BadShape = 4,
    /// A tensor's dtype is unknown or not what the peer expects.
    BadDType = 5,
    /// The request names a session the peer does not hold.
    UnknownSession = 6,
    /// The request asks for blocks the peer does not serve.
    WrongBlocks = 7,
    /// The peer is at capacity; retry later or elsewhere.
    Busy = 8,
    /// The session's context has no room for more tokens.
    ContextFull = 9,
    /// The step's sequence number was already processed in this session.
    Replayed = 10,
    /// The request needs a version or feature the peer does not support.
    Unsupported = 11,
    /// The request names a model the peer does not serve.
    WrongModel = 12,
    /// The peer does not hold the manifest or chunk asked for; ask another.
    NotFound = 13,
}

impl ErrorCode {
    /// Reads a wire code; `None` for a code this version does not know.
    pub const fn from_u16(code: u16) -> Option<Self> {
        Some(match code {
            1 => Self::Internal,
            2 => Self::Malformed,
            3 => Self::TooLarge,
            4 => Self::BadShape,
            5 => Self::BadDType,
            6 => Self::UnknownSession,
            7 => Self::WrongBlocks,
            8 => Self::Busy,
            9 => Self::ContextFull,
            10 => Self::Replayed,
            11 => Self::Unsupported,
            12 => Self::WrongModel,
            13 => Self::NotFound,
            _ => return None,
        })
    }

    /// The code as sent on the wire.
    pub const fn as_u16(self) -> u16 {
        self as u16
    }
}

/// The one mapping from tensor errors to wire codes.
impl From<&TensorError> for ErrorCode {
    fn from(err: &TensorError) -> Self {
        match err {
            TensorError::BadMagic
            | TensorError::Truncated { .. }
            | TensorError::TrailingBytes { .. }
            | TensorError::LengthMismatch { .. }
            | TensorError::ReservedNotZero => Self::Malformed,
            TensorError::UnsupportedVersion(_) => Self::Unsupported,
            TensorError::UnknownDType(_) | TensorError::DTypeMismatch { .. } => Self::BadDType,
            TensorError::RankTooLarge { .. }
            | TensorError::ZeroDim { .. }
            | TensorError::ShapeMismatch { .. }
            | TensorError::NotBlockAligned { .. } => Self::BadShape,
            TensorError::Unrepresentable { .. } => Self::BadDType,
            TensorError::TooLarge { .. } => Self::TooLarge,
        }
    }
}

/// The one mapping from message errors to wire codes: an oversized message
/// is [`ErrorCode::TooLarge`], a bad tensor maps by its kind, anything else is
/// [`ErrorCode::Malformed`].
impl From<&MessageError> for ErrorCode {
    fn from(e: &MessageError) -> Self {
        match e {
            MessageError::TooLarge { .. } => ErrorCode::TooLarge,
            MessageError::Tensor(t) => ErrorCode::from(t),
            _ => ErrorCode::Malformed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code, in wire order.
    const ALL: [ErrorCode; 13] = [
        ErrorCode::Internal,
        ErrorCode::Malformed,
        ErrorCode::TooLarge,
        ErrorCode::BadShape,
        ErrorCode::BadDType,
        ErrorCode::UnknownSession,
        ErrorCode::WrongBlocks,
        ErrorCode::Busy,
        ErrorCode::ContextFull,
        ErrorCode::Replayed,
        ErrorCode::Unsupported,
        ErrorCode::WrongModel,
        ErrorCode::NotFound,
    ];

    #[test]
    fn codes_are_stable_and_round_trip() {
        for (code, wire) in ALL.into_iter().zip(1u16..) {
            assert_eq!(code.as_u16(), wire, "{code:?}");
            assert_eq!(ErrorCode::from_u16(wire), Some(code));
        }
    }

    #[test]
    fn unknown_codes_read_as_none() {
        for wire in [0, 14, 100, u16::MAX] {
            assert_eq!(ErrorCode::from_u16(wire), None, "{wire}");
        }
    }

    #[test]
    fn every_tensor_error_maps_to_a_code() {
        let cases = [
            (TensorError::BadMagic, ErrorCode::Malformed),
            (TensorError::UnsupportedVersion(2), ErrorCode::Unsupported),
            (TensorError::UnknownDType(9), ErrorCode::BadDType),
            (TensorError::RankTooLarge { rank: 5 }, ErrorCode::BadShape),
            (TensorError::ZeroDim { axis: 0 }, ErrorCode::BadShape),
            (
                TensorError::Truncated { needed: 8, got: 0 },
                ErrorCode::Malformed,
            ),
            (
                TensorError::TrailingBytes { extra: 1 },
                ErrorCode::Malformed,
            ),
            (
                TensorError::LengthMismatch {
                    expected: 4,
                    got: 2,
                },
                ErrorCode::Malformed,
            ),
            (
                TensorError::TooLarge {
                    bytes: usize::MAX,
                    max: 1,
                },
                ErrorCode::TooLarge,
            ),
            (TensorError::ReservedNotZero, ErrorCode::Malformed),
            (
                TensorError::DTypeMismatch {
                    expected: DType::F32,
                    got: DType::F16,
                },
                ErrorCode::BadDType,
            ),
            (
                TensorError::ShapeMismatch {
                    expected: "[1, ?]".to_owned(),
                    got: vec![2, 3],
                },
                ErrorCode::BadShape,
            ),
        ];
        for (err, code) in &cases {
            assert_eq!(ErrorCode::from(err), *code, "{err}");
        }
    }

    #[test]
    fn messages_name_expected_and_got() {
        let err = TensorError::DTypeMismatch {
            expected: DType::BF16,
            got: DType::F32,
        };
        assert_eq!(err.to_string(), "expected dtype bf16, got f32");
        let err = TensorError::RankTooLarge { rank: 7 };
        assert_eq!(err.to_string(), "tensor rank 7 exceeds the limit of 4");
    }
}
