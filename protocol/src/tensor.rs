//! Tensor frames: the checked in-memory value and its byte encoding.

use std::fmt;

use bytes::Bytes;
use half::{bf16, f16};

use crate::{
    TensorError, MAX_TENSOR_BYTES, MAX_TENSOR_RANK, TENSOR_FRAME_VERSION, TENSOR_HEADER_MAGIC,
};

/// Bytes before the dimensions: magic, version, dtype, rank and three reserved bytes.
const FIXED_HEADER_LEN: usize = 8;

/// Bytes per dimension in the header.
const DIM_LEN: usize = 4;

// Every dimension is at most the data length in bytes, so the byte limit keeps every
// dimension within the header's `u32`; and a `u32` dimension always fits a `usize`.
const _: () = assert!(MAX_TENSOR_BYTES <= u32::MAX as usize);
const _: () = assert!(usize::BITS >= u32::BITS);
// The rank travels as one byte.
const _: () = assert!(MAX_TENSOR_RANK <= u8::MAX as usize);

/// Element type of a tensor frame, carried as the header's dtype byte.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    /// IEEE 754 binary32, 4 bytes.
    F32 = 1,
    /// IEEE 754 binary16, 2 bytes.
    F16 = 2,
    /// bfloat16 (the upper half of an f32), 2 bytes.
    BF16 = 3,
    /// 8-bit blockwise: each run of [`Q8_BLOCK`] elements along the last
    /// axis is an f16 scale `d` and 32 `i8` values `q`, the element being
    /// `d * q`; 34 bytes per 32 elements. The last axis must be a multiple of
    /// the block.
    Q8Block = 4,
}

/// Elements in one block of [`DType::Q8Block`].
pub const Q8_BLOCK: usize = 32;

impl DType {
    /// Every dtype, in wire-byte order.
    pub const ALL: [Self; 4] = [Self::F32, Self::F16, Self::BF16, Self::Q8Block];

    /// Elements per block: 1 for the plain types, [`Q8_BLOCK`] for `Q8Block`.
    pub fn block_len(self) -> usize {
        match self {
            Self::Q8Block => Q8_BLOCK,
            _ => 1,
        }
    }

    /// Bytes per block of [`block_len`](Self::block_len) elements: the
    /// element size for the plain types.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q8Block => 2 + Q8_BLOCK,
        }
    }

    /// Lower-case name, as used in configs and error messages: `f32`, `f16`,
    /// `bf16`, `q8`.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::Q8Block => "q8",
        }
    }

    /// The dtype [`name`](Self::name) spells.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }
}

impl TryFrom<u8> for DType {
    type Error = TensorError;

    /// Reads a header dtype byte.
    fn try_from(byte: u8) -> Result<Self, Self::Error> {
        match byte {
            1 => Ok(Self::F32),
            2 => Ok(Self::F16),
            3 => Ok(Self::BF16),
            4 => Ok(Self::Q8Block),
            other => Err(TensorError::UnknownDType(other)),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A dense, row-major, little-endian tensor that satisfies every rule of the wire
/// format (see the crate docs).
///
/// The fields are private so that a `TensorFrame` is always valid: it comes from
/// [`new`](Self::new), [`from_f32`](Self::from_f32) or [`decode`](Self::decode), each
/// of which checks rank, dimensions, byte limit and data length. Equality compares
/// the bytes, so two frames holding NaNs with the same bits are equal.
#[derive(Clone, PartialEq, Eq)]
pub struct TensorFrame {
    dtype: DType,
    shape: Vec<usize>,
    /// Shared, so forwarding a frame or slicing it out of a received message
    /// never copies the elements.
    data: Bytes,
}

/// A `Vec<f32>` seen as little-endian bytes, owned by a [`Bytes`].
struct F32Le(Vec<f32>);

impl AsRef<[u8]> for F32Le {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

impl TensorFrame {
    /// Builds a frame from raw little-endian element bytes.
    ///
    /// # Errors
    ///
    /// [`TensorError::RankTooLarge`] past [`MAX_TENSOR_RANK`] axes,
    /// [`TensorError::ZeroDim`] for a zero dimension, [`TensorError::TooLarge`] when the
    /// shape needs more than [`MAX_TENSOR_BYTES`], and [`TensorError::LengthMismatch`]
    /// when `data` is not exactly the length the shape and dtype need.
    pub fn new(
        dtype: DType,
        shape: Vec<usize>,
        data: impl Into<Bytes>,
    ) -> Result<Self, TensorError> {
        let data = data.into();
        let expected = checked_data_len(dtype, &shape)?;
        if data.len() != expected {
            return Err(TensorError::LengthMismatch {
                expected,
                got: data.len(),
            });
        }
        Ok(Self { dtype, shape, data })
    }

    /// Builds a frame of `dtype` from f32 values, rounding to nearest for f16 and bf16.
    /// For `Q8Block`, each block's scale is its largest magnitude over 127,
    /// rounded to f16, and each value is rounded to the nearest multiple of it.
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new); for [`TensorError::LengthMismatch`], `got` counts the
    /// bytes `values` would take in `dtype`. The shape is checked before any
    /// conversion or allocation. [`TensorError::Unrepresentable`] when a
    /// `Q8Block` block holds a value that is not finite or a scale past f16.
    pub fn from_f32(shape: Vec<usize>, values: &[f32], dtype: DType) -> Result<Self, TensorError> {
        let expected = checked_data_len(dtype, &shape)?;
        let got = (values.len() / dtype.block_len()).saturating_mul(dtype.block_bytes())
            + values.len() % dtype.block_len();
        if got != expected {
            return Err(TensorError::LengthMismatch { expected, got });
        }
        let mut data = Vec::with_capacity(expected);
        match dtype {
            DType::F32 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&v.to_le_bytes())),
            DType::F16 => values
                .iter()
                .for_each(|&v| data.extend_from_slice(&f16::from_f32(v).to_le_bytes())),
            DType::BF16 => values
                .iter()
                .for_each(|&v| data.extend_from_slice(&bf16::from_f32(v).to_le_bytes())),
            DType::Q8Block => {
                for (i, block) in values.chunks_exact(Q8_BLOCK).enumerate() {
                    quantize_block(block, &mut data)
                        .ok_or(TensorError::Unrepresentable { block: i })?;
                }
            }
        }
        Ok(Self {
            dtype,
            shape,
            data: data.into(),
        })
    }

    /// Builds an f32 frame that takes ownership of `values`: on little-endian
    /// machines the elements are not copied.
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new).
    pub fn from_f32_vec(shape: Vec<usize>, values: Vec<f32>) -> Result<Self, TensorError> {
        if cfg!(target_endian = "big") {
            return Self::from_f32(shape, &values, DType::F32);
        }
        let expected = checked_data_len(DType::F32, &shape)?;
        let got = values.len().saturating_mul(4);
        if got != expected {
            return Err(TensorError::LengthMismatch { expected, got });
        }
        Ok(Self {
            dtype: DType::F32,
            shape,
            data: Bytes::from_owner(F32Le(values)),
        })
    }

    /// Decodes every element to f32 (exactly: f16 and bf16 widen without loss).
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            DType::F32 => self
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            DType::F16 => self
                .data
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DType::BF16 => self
                .data
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DType::Q8Block => {
                let mut out = Vec::with_capacity(self.elem_count());
                for b in self.data.chunks_exact(DType::Q8Block.block_bytes()) {
                    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    out.extend(b[2..].iter().map(|&q| d * f32::from(q as i8)));
                }
                out
            }
        }
    }

    /// This frame in `dtype`: the same frame when it is already, else its
    /// values converted through f32.
    ///
    /// # Errors
    ///
    /// As [`from_f32`](Self::from_f32): a shape `dtype` cannot hold, or
    /// values it cannot represent.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self, TensorError> {
        if dtype == self.dtype {
            return Ok(self.clone());
        }
        Self::from_f32(self.shape.clone(), &self.to_f32(), dtype)
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Dimensions, outermost first; empty for a scalar.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Element bytes, little-endian, row-major.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Rows `start..start + len` of the outermost axis, sharing this frame's
    /// buffer (no copy); `None` when the frame is a scalar, `len` is zero or
    /// the rows are out of range.
    pub fn narrow_rows(&self, start: usize, len: usize) -> Option<Self> {
        let rows = *self.shape.first()?;
        let end = start.checked_add(len)?;
        if len == 0 || end > rows {
            return None;
        }
        let row_bytes = self.data.len() / rows;
        let mut shape = self.shape.clone();
        shape[0] = len;
        Some(Self {
            dtype: self.dtype,
            shape,
            data: self.data.slice(start * row_bytes..end * row_bytes),
        })
    }

    /// Number of elements: the product of the dimensions (1 for a scalar).
    pub fn elem_count(&self) -> usize {
        self.data.len() / self.dtype.block_bytes() * self.dtype.block_len()
    }

    /// Length of [`encode`](Self::encode)'s output: `8 + 4 * rank + data.len()`.
    pub fn encoded_len(&self) -> usize {
        FIXED_HEADER_LEN + DIM_LEN * self.shape.len() + self.data.len()
    }

    /// Appends the frame's encoding to `out`.
    pub fn encode_to(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        self.encode_header_to(out);
        out.extend_from_slice(&self.data);
    }

    /// Appends the header and dimensions (everything before the data).
    pub fn encode_header_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&TENSOR_HEADER_MAGIC);
        // The casts cannot truncate: see the assertions at the top of this module.
        out.extend_from_slice(&[
            TENSOR_FRAME_VERSION,
            self.dtype as u8,
            self.shape.len() as u8,
            0,
            0,
            0,
        ]);
        for &dim in &self.shape {
            out.extend_from_slice(&(dim as u32).to_le_bytes());
        }
    }

    /// Encodes the frame into a new buffer of [`encoded_len`](Self::encoded_len) bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_to(&mut out);
        out
    }

    /// Decodes exactly one frame from `bytes`.
    ///
    /// Checks the fields in wire order and returns the first failure; allocates only
    /// once the whole frame is known to be valid. Never panics.
    ///
    /// # Errors
    ///
    /// Any [`TensorError`] except the two mismatch errors of [`expect`](Self::expect)
    /// and [`TensorError::LengthMismatch`]: a short input is
    /// [`TensorError::Truncated`] and a long one [`TensorError::TrailingBytes`].
    pub fn decode(bytes: &[u8]) -> Result<Self, TensorError> {
        let (dtype, shape, header_len) = Self::check(bytes)?;
        Ok(Self {
            dtype,
            shape,
            data: Bytes::copy_from_slice(&bytes[header_len..]),
        })
    }

    /// [`decode`](Self::decode) from a shared buffer: the frame's data is a
    /// slice of `bytes`, not a copy.
    ///
    /// # Errors
    ///
    /// As [`decode`](Self::decode).
    pub fn decode_bytes(bytes: Bytes) -> Result<Self, TensorError> {
        let (dtype, shape, header_len) = Self::check(&bytes)?;
        Ok(Self {
            dtype,
            shape,
            data: bytes.slice(header_len..),
        })
    }

    /// Validates a whole encoded frame; returns dtype, shape and header length.
    fn check(bytes: &[u8]) -> Result<(DType, Vec<usize>, usize), TensorError> {
        let Some(&[m0, m1, version, dtype, rank, r0, r1, r2]) =
            bytes.first_chunk::<FIXED_HEADER_LEN>()
        else {
            return Err(TensorError::Truncated {
                needed: FIXED_HEADER_LEN,
                got: bytes.len(),
            });
        };
        if [m0, m1] != TENSOR_HEADER_MAGIC {
            return Err(TensorError::BadMagic);
        }
        if version != TENSOR_FRAME_VERSION {
            return Err(TensorError::UnsupportedVersion(version));
        }
        let dtype = DType::try_from(dtype)?;
        let rank = usize::from(rank);
        if rank > MAX_TENSOR_RANK {
            return Err(TensorError::RankTooLarge { rank });
        }
        if [r0, r1, r2] != [0; 3] {
            return Err(TensorError::ReservedNotZero);
        }

        let header_len = FIXED_HEADER_LEN + DIM_LEN * rank;
        let dims = bytes
            .get(FIXED_HEADER_LEN..header_len)
            .ok_or(TensorError::Truncated {
                needed: header_len,
                got: bytes.len(),
            })?;
        let shape: Vec<usize> = dims
            .chunks_exact(DIM_LEN)
            .map(|d| u32::from_le_bytes([d[0], d[1], d[2], d[3]]) as usize)
            .collect();
        let data_len = checked_data_len(dtype, &shape)?;

        // Cannot overflow: both terms are bounded by the limits.
        let frame_len = header_len + data_len;
        match bytes.len().cmp(&frame_len) {
            std::cmp::Ordering::Less => Err(TensorError::Truncated {
                needed: frame_len,
                got: bytes.len(),
            }),
            std::cmp::Ordering::Greater => Err(TensorError::TrailingBytes {
                extra: bytes.len() - frame_len,
            }),
            std::cmp::Ordering::Equal => Ok((dtype, shape, header_len)),
        }
    }

    /// Checks the frame against what the receiver needs.
    ///
    /// `dtype` is checked when `Some`. `shape` must have the frame's rank; each of its
    /// dimensions is checked when `Some` and matches anything when `None`.
    ///
    /// # Errors
    ///
    /// [`TensorError::DTypeMismatch`] first, then [`TensorError::ShapeMismatch`], whose
    /// `expected` spells `None` as `?`, e.g. `[1, ?, 4096]`.
    pub fn expect(&self, dtype: Option<DType>, shape: &[Option<usize>]) -> Result<(), TensorError> {
        if let Some(expected) = dtype {
            if expected != self.dtype {
                return Err(TensorError::DTypeMismatch {
                    expected,
                    got: self.dtype,
                });
            }
        }
        let shape_matches = shape.len() == self.shape.len()
            && shape
                .iter()
                .zip(&self.shape)
                .all(|(want, &got)| want.is_none_or(|want| want == got));
        if !shape_matches {
            return Err(TensorError::ShapeMismatch {
                expected: shape_pattern(shape),
                got: self.shape.clone(),
            });
        }
        Ok(())
    }
}

/// Shows the data as a length only: frames reach tens of MiB.
impl fmt::Debug for TensorFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TensorFrame")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("data_len", &self.data.len())
            .finish()
    }
}

/// Appends one `Q8Block` block of `block`'s values; `None` when one is not
/// finite or the scale does not fit an f16.
fn quantize_block(block: &[f32], out: &mut Vec<u8>) -> Option<()> {
    let amax = block
        .iter()
        .try_fold(0f32, |m, &v| v.is_finite().then(|| m.max(v.abs())))?;
    let d = f16::from_f32(amax / 127.0);
    if !d.is_finite() {
        return None;
    }
    let df = d.to_f32();
    let inv = if df > 0.0 { 1.0 / df } else { 0.0 };
    out.extend_from_slice(&d.to_le_bytes());
    out.extend(
        block
            .iter()
            .map(|&v| (v * inv).round().clamp(-127.0, 127.0) as i8 as u8),
    );
    Some(())
}

/// Data length in bytes of a `dtype` tensor of `shape`, checked against the limits.
///
/// Zero dimensions are reported before size: a tensor with a zero axis is invalid
/// whatever its other axes. The product saturates, so overflow reads as too large.
/// A blockwise dtype needs a last axis that is a whole number of blocks.
fn checked_data_len(dtype: DType, shape: &[usize]) -> Result<usize, TensorError> {
    if shape.len() > MAX_TENSOR_RANK {
        return Err(TensorError::RankTooLarge { rank: shape.len() });
    }
    if let Some(axis) = shape.iter().position(|&dim| dim == 0) {
        return Err(TensorError::ZeroDim { axis });
    }
    let block = dtype.block_len();
    if block > 1 {
        let last = shape.last().copied().unwrap_or(1);
        if last % block != 0 {
            return Err(TensorError::NotBlockAligned {
                dtype,
                dim: last,
                block,
            });
        }
    }
    let (outer, last) = match shape.split_last() {
        Some((&last, outer)) => (outer, last),
        None => (&[][..], 1),
    };
    let bytes = outer.iter().fold(
        (last / block).saturating_mul(dtype.block_bytes()),
        |bytes, &dim| bytes.saturating_mul(dim),
    );
    if bytes > MAX_TENSOR_BYTES {
        return Err(TensorError::TooLarge {
            bytes,
            max: MAX_TENSOR_BYTES,
        });
    }
    Ok(bytes)
}

/// Renders an expected shape with `?` for the free dimensions: `[1, ?, 4096]`.
fn shape_pattern(shape: &[Option<usize>]) -> String {
    let dims: Vec<String> = shape
        .iter()
        .map(|dim| dim.map_or_else(|| "?".to_owned(), |dim| dim.to_string()))
        .collect();
    format!("[{}]", dims.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrow_rows_shares_the_buffer() {
        let values: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let f = TensorFrame::from_f32_vec(vec![4, 3], values).unwrap();
        let mid = f.narrow_rows(1, 2).unwrap();
        assert_eq!(mid.shape(), [2, 3]);
        assert_eq!(mid.to_f32(), [3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
        assert_eq!(mid.data().as_ptr(), f.data()[12..].as_ptr());
        assert_eq!(f.narrow_rows(0, 4).unwrap(), f);
        assert!(f.narrow_rows(3, 2).is_none());
        assert!(f.narrow_rows(1, 0).is_none());
        assert!(f.narrow_rows(usize::MAX, 2).is_none());
        let scalar = TensorFrame::from_f32(vec![], &[1.0], DType::F32).unwrap();
        assert!(scalar.narrow_rows(0, 1).is_none());
    }

    #[test]
    fn data_len_checks_rank_then_zero_dims_then_size() {
        let len = |shape: &[usize]| checked_data_len(DType::F32, shape);
        assert_eq!(len(&[]).ok(), Some(4));
        assert_eq!(len(&[3, 5]).ok(), Some(60));
        assert_eq!(len(&[MAX_TENSOR_BYTES / 4]).ok(), Some(MAX_TENSOR_BYTES));
        assert!(matches!(
            len(&[1; MAX_TENSOR_RANK + 1]),
            Err(TensorError::RankTooLarge { rank: 5 })
        ));
        assert!(matches!(
            len(&[usize::MAX, 0]),
            Err(TensorError::ZeroDim { axis: 1 })
        ));
        assert!(matches!(
            len(&[MAX_TENSOR_BYTES / 4 + 1]),
            Err(TensorError::TooLarge { bytes, .. }) if bytes == MAX_TENSOR_BYTES + 4
        ));
    }

    #[test]
    fn overflowing_shape_saturates() {
        let err = checked_data_len(DType::F16, &[usize::MAX, 3]).unwrap_err();
        assert!(matches!(
            err,
            TensorError::TooLarge {
                bytes: usize::MAX,
                max: MAX_TENSOR_BYTES
            }
        ));
    }

    #[test]
    fn shape_pattern_marks_free_dims() {
        assert_eq!(shape_pattern(&[]), "[]");
        assert_eq!(shape_pattern(&[Some(1), None, Some(64)]), "[1, ?, 64]");
    }

    #[test]
    fn debug_omits_data() {
        let frame = TensorFrame::new(DType::BF16, vec![2], vec![0; 4]).unwrap();
        assert_eq!(
            format!("{frame:?}"),
            "TensorFrame { dtype: BF16, shape: [2], data_len: 4 }"
        );
    }
}
