//! The nomoat wire contract: tensor frames, their limits and the wire's error codes.
//!
//! nomoat serves a large language model from a swarm of peers. Each peer runs a
//! contiguous span of the model's transformer blocks; a client pushes the hidden
//! states of a sequence through a chain of peers whose spans, taken in order, cover
//! every block. Between two peers the hidden states travel as a **tensor frame**,
//! specified here. The messages that carry frames are defined in
//! `proto/nomoat/v1/*.proto`; this crate and those files are the whole contract.
//!
//! This crate performs no I/O. It turns bytes into checked values and back, and
//! nothing else: which stream a frame arrives on, and when, is the caller's concern.
//!
//! # Participants
//!
//! - The **sender** (a client, or the peer running the previous span) builds a
//!   [`TensorFrame`] with [`TensorFrame::new`] or [`TensorFrame::from_f32`] and
//!   writes [`TensorFrame::encode`].
//! - The **receiver** (the peer running the next span) reads a length-delimited
//!   message, calls [`TensorFrame::decode`] on the tensor bytes, then
//!   [`TensorFrame::expect`] with the dtype and shape its span needs. On any error it
//!   answers with the [`ErrorCode`] that [`ErrorCode::from`] gives for the error.
//!
//! # The tensor frame, version 1
//!
//! A frame is a fixed 8-byte header, the dimensions, then the data. All integers and
//! all elements are little-endian.
//!
//! | offset        | size       | field     | value                                   |
//! |---------------|------------|-----------|-----------------------------------------|
//! | 0             | 2          | magic     | `"NT"` ([`TENSOR_HEADER_MAGIC`])        |
//! | 2             | 1          | version   | `1` ([`TENSOR_FRAME_VERSION`])          |
//! | 3             | 1          | dtype     | [`DType`] as `u8`: 1 f32, 2 f16, 3 bf16 |
//! | 4             | 1          | rank      | `0..=4` ([`MAX_TENSOR_RANK`])           |
//! | 5             | 3          | reserved  | zero                                    |
//! | 8             | 4 × rank   | dims      | one `u32` per axis, outermost first     |
//! | 8 + 4 × rank  | data bytes | data      | elements in row-major order             |
//!
//! The header is therefore `8 + 4 * rank` bytes, and the data is
//! `product(dims) * dtype.size_in_bytes()` bytes. Rank 0 is a scalar: one element.
//!
//! # Validation
//!
//! [`TensorFrame::decode`] accepts a frame only if all of these hold, and never panics
//! on any input:
//!
//! - the magic is `"NT"` and the version is `1`;
//! - the dtype byte names a [`DType`], and the rank is at most [`MAX_TENSOR_RANK`];
//! - the reserved bytes are zero (later versions may use them);
//! - every dimension is at least 1;
//! - the data is at most [`MAX_TENSOR_BYTES`] bytes, computed without overflow and
//!   checked before anything is allocated;
//! - the input is exactly one frame long: no byte missing, no byte left over.
//!
//! [`TensorFrame::new`] checks the same rules on in-memory values, so every
//! `TensorFrame` can be encoded and every encoding decodes to an equal frame. Each
//! frame has exactly one encoding.
//!
//! # Limits
//!
//! - [`MAX_TENSOR_BYTES`]: 64 MiB of data per frame. A receiver may read at most
//!   `8 + 4 * MAX_TENSOR_RANK + MAX_TENSOR_BYTES` bytes for one frame.
//! - [`MAX_TENSOR_RANK`]: 4 axes.
//!
//! # Errors on the wire
//!
//! Local failures are [`TensorError`]s; the wire carries only [`ErrorCode`], a
//! `u16` namespace shared by every nomoat message. [`ErrorCode::from`] is the one
//! mapping from tensor errors to codes. Codes never change meaning; unknown codes
//! read as `None` from [`ErrorCode::from_u16`].
//!
//! # Non-goals
//!
//! - No strides, offsets or views: data is always dense and row-major.
//! - No compression and no checksum: the transport (QUIC with TLS) already protects
//!   integrity, and hidden states compress poorly.
//! - No big-endian data and no integer dtypes.
//! - No streaming of a single frame: a frame is at most [`MAX_TENSOR_BYTES`] and is
//!   decoded from one contiguous buffer.
//!
//! # Example
//!
//! One token's hidden state of width 2, shaped `[batch, tokens, hidden]`, sent as f16:
//!
//! ```
//! use nomoat_protocol::{DType, ErrorCode, TensorError, TensorFrame};
//!
//! let frame = TensorFrame::from_f32(vec![1, 1, 2], &[1.0, -2.0], DType::F16)?;
//! let bytes = frame.encode();
//! assert_eq!(
//!     bytes,
//!     [
//!         b'N', b'T', 1, 2, 3, 0, 0, 0, // magic, version 1, f16, rank 3, reserved
//!         1, 0, 0, 0, // batch 1
//!         1, 0, 0, 0, // tokens 1
//!         2, 0, 0, 0, // hidden 2
//!         0x00, 0x3c, // 1.0 as f16
//!         0x00, 0xc0, // -2.0 as f16
//!     ]
//! );
//! assert_eq!(bytes.len(), frame.encoded_len());
//!
//! // The receiver decodes, then checks the frame against what its span needs:
//! // f16, one sequence, any number of tokens, hidden width 2.
//! let received = TensorFrame::decode(&bytes)?;
//! assert_eq!(received, frame);
//! received.expect(Some(DType::F16), &[Some(1), None, Some(2)])?;
//! assert_eq!(received.to_f32(), [1.0, -2.0]);
//!
//! // A span with another hidden width rejects it, and answers with a wire code.
//! let err = received.expect(None, &[Some(1), None, Some(4096)]).unwrap_err();
//! assert_eq!(err.to_string(), "expected shape [1, ?, 4096], got [1, 1, 2]");
//! assert_eq!(ErrorCode::from(&err), ErrorCode::BadShape);
//!
//! // Damaged input is an error, never a panic.
//! assert!(matches!(
//!     TensorFrame::decode(&bytes[..bytes.len() - 1]),
//!     Err(TensorError::Truncated { .. })
//! ));
//! # Ok::<(), TensorError>(())
//! ```

mod error;
mod tensor;

pub use error::{ErrorCode, TensorError};
pub use tensor::{DType, TensorFrame};

/// Largest data section of one tensor frame, in bytes (64 MiB).
pub const MAX_TENSOR_BYTES: usize = 64 * 1024 * 1024;

/// Largest number of axes of one tensor frame.
pub const MAX_TENSOR_RANK: usize = 4;

/// First two bytes of every tensor frame.
pub const TENSOR_HEADER_MAGIC: [u8; 2] = *b"NT";

/// Version of the tensor frame layout described in the crate docs.
pub const TENSOR_FRAME_VERSION: u8 = 1;
