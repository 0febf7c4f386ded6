//! Wire tests for the tensor frame: golden bytes, every error, truncation and
//! property-based round trips.

use nomoat_protocol::{
    DType, ErrorCode, TensorError, TensorFrame, MAX_TENSOR_BYTES, MAX_TENSOR_RANK, Q8_BLOCK,
    TENSOR_FRAME_VERSION, TENSOR_HEADER_MAGIC,
};
use proptest::prelude::*;

/// `[[1.0, -2.0]]` as f32: rank 2, dims 1 and 2.
const GOLDEN_F32: [u8; 24] = [
    b'N', b'T', 1, 1, 2, 0, 0, 0, // magic, version, dtype f32, rank 2, reserved
    1, 0, 0, 0, // dim 0 = 1
    2, 0, 0, 0, // dim 1 = 2
    0x00, 0x00, 0x80, 0x3f, // 1.0 = 0x3f800000
    0x00, 0x00, 0x00, 0xc0, // -2.0 = 0xc0000000
];

/// `[0.5, 1.0, -2.0]` as f16: rank 1, dim 3.
const GOLDEN_F16: [u8; 18] = [
    b'N', b'T', 1, 2, 1, 0, 0, 0, // magic, version, dtype f16, rank 1, reserved
    3, 0, 0, 0, // dim 0 = 3
    0x00, 0x38, // 0.5 = 0x3800
    0x00, 0x3c, // 1.0 = 0x3c00
    0x00, 0xc0, // -2.0 = 0xc000
];

/// `1.0` as a bf16 scalar: rank 0, so no dims.
const GOLDEN_BF16_SCALAR: [u8; 10] = [
    b'N', b'T', 1, 3, 0, 0, 0, 0, // magic, version, dtype bf16, rank 0, reserved
    0x80, 0x3f, // 1.0 = 0x3f80
];

/// Frames with their golden encodings and f32 values; each test runs over all.
fn golden_cases() -> Vec<(TensorFrame, &'static [u8], Vec<f32>)> {
    vec![
        (
            TensorFrame::from_f32(vec![1, 2], &[1.0, -2.0], DType::F32).unwrap(),
            &GOLDEN_F32,
            vec![1.0, -2.0],
        ),
        (
            TensorFrame::from_f32(vec![3], &[0.5, 1.0, -2.0], DType::F16).unwrap(),
            &GOLDEN_F16,
            vec![0.5, 1.0, -2.0],
        ),
        (
            TensorFrame::from_f32(vec![], &[1.0], DType::BF16).unwrap(),
            &GOLDEN_BF16_SCALAR,
            vec![1.0],
        ),
    ]
}

#[test]
fn golden_frames_encode_and_decode() {
    for (frame, bytes, values) in golden_cases() {
        assert_eq!(frame.encode(), bytes, "{frame:?}");
        assert_eq!(frame.encoded_len(), bytes.len(), "{frame:?}");
        let decoded = TensorFrame::decode(bytes).unwrap();
        assert_eq!(decoded, frame);
        assert_eq!(decoded.to_f32(), values);
        assert_eq!(decoded.elem_count(), values.len());
    }
}

#[test]
fn accessors_report_parts() {
    let frame = TensorFrame::decode(&GOLDEN_F32).unwrap();
    assert_eq!(frame.dtype(), DType::F32);
    assert_eq!(frame.shape(), [1, 2]);
    assert_eq!(frame.data(), &GOLDEN_F32[16..]);
    assert_eq!(frame.elem_count(), 2);
}

#[test]
fn encode_to_appends() {
    let frame = TensorFrame::decode(&GOLDEN_F16).unwrap();
    let mut out = b"prefix".to_vec();
    frame.encode_to(&mut out);
    assert_eq!(&out[..6], b"prefix");
    assert_eq!(&out[6..], GOLDEN_F16);
}

#[test]
fn every_prefix_of_a_frame_is_truncated() {
    for (_, bytes, _) in golden_cases() {
        for len in 0..bytes.len() {
            match TensorFrame::decode(&bytes[..len]) {
                Err(TensorError::Truncated { needed, got }) => {
                    assert_eq!(got, len);
                    assert!(needed > got && needed <= bytes.len(), "{needed} at {len}");
                }
                other => panic!("prefix of {len} bytes gave {other:?}"),
            }
        }
    }
}

#[test]
fn dtype_bytes_names_and_sizes() {
    let cases = [
        (1u8, DType::F32, "f32", 1, 4),
        (2, DType::F16, "f16", 1, 2),
        (3, DType::BF16, "bf16", 1, 2),
        (4, DType::Q8Block, "q8", 32, 34),
    ];
    assert_eq!(DType::ALL.len(), cases.len());
    for (byte, dtype, name, block, size) in cases {
        assert_eq!(DType::try_from(byte).unwrap(), dtype);
        assert_eq!(dtype as u8, byte);
        assert_eq!(dtype.name(), name);
        assert_eq!(DType::from_name(name), Some(dtype));
        assert_eq!(dtype.to_string(), name);
        assert_eq!(dtype.block_len(), block);
        assert_eq!(dtype.block_bytes(), size);
    }
    assert_eq!(DType::from_name("q4"), None);
    for byte in [0u8, 5, 255] {
        assert!(matches!(DType::try_from(byte), Err(TensorError::UnknownDType(b)) if b == byte));
    }
}

/// `GOLDEN_F32` with byte `at` replaced by `value`.
fn golden_with(at: usize, value: u8) -> Vec<u8> {
    let mut bytes = GOLDEN_F32.to_vec();
    bytes[at] = value;
    bytes
}

/// Recognises the error a case expects.
type IsExpected = fn(&TensorError) -> bool;

#[test]
fn decode_rejects_each_bad_field() {
    let mut too_large = vec![b'N', b'T', 1, 1, 2, 0, 0, 0];
    too_large.extend_from_slice(&(4096u32).to_le_bytes());
    too_large.extend_from_slice(&(4097u32).to_le_bytes());
    let mut trailing = GOLDEN_F32.to_vec();
    trailing.push(0);

    let cases: Vec<(Vec<u8>, IsExpected, ErrorCode)> = vec![
        (
            golden_with(0, b'X'),
            |e| matches!(e, TensorError::BadMagic),
            ErrorCode::Malformed,
        ),
        (
            golden_with(2, 2),
            |e| matches!(e, TensorError::UnsupportedVersion(2)),
            ErrorCode::Unsupported,
        ),
        (
            golden_with(3, 7),
            |e| matches!(e, TensorError::UnknownDType(7)),
            ErrorCode::BadDType,
        ),
        (
            golden_with(4, 5),
            |e| matches!(e, TensorError::RankTooLarge { rank: 5 }),
            ErrorCode::BadShape,
        ),
        (
            golden_with(6, 1),
            |e| matches!(e, TensorError::ReservedNotZero),
            ErrorCode::Malformed,
        ),
        (
            golden_with(12, 0),
            |e| matches!(e, TensorError::ZeroDim { axis: 1 }),
            ErrorCode::BadShape,
        ),
        (
            golden_with(12, 3),
            |e| {
                matches!(
                    e,
                    TensorError::Truncated {
                        needed: 28,
                        got: 24
                    }
                )
            },
            ErrorCode::Malformed,
        ),
        (
            golden_with(12, 1),
            |e| matches!(e, TensorError::TrailingBytes { extra: 4 }),
            ErrorCode::Malformed,
        ),
        (
            trailing,
            |e| matches!(e, TensorError::TrailingBytes { extra: 1 }),
            ErrorCode::Malformed,
        ),
        (
            too_large,
            |e| {
                matches!(e, TensorError::TooLarge { bytes, max }
                    if *bytes == 4096 * 4097 * 4 && *max == MAX_TENSOR_BYTES)
            },
            ErrorCode::TooLarge,
        ),
    ];
    for (bytes, is_expected, code) in cases {
        let err = TensorFrame::decode(&bytes).unwrap_err();
        assert!(is_expected(&err), "{bytes:?} gave {err:?}");
        assert_eq!(ErrorCode::from(&err), code, "{err}");
    }
}

#[test]
fn decode_checks_limits_before_reading_data() {
    // Largest allowed header dims with no data behind them: truncated, not allocated.
    let mut bytes = vec![b'N', b'T', 1, 3, 1, 0, 0, 0];
    bytes.extend_from_slice(&((MAX_TENSOR_BYTES / 2) as u32).to_le_bytes());
    let err = TensorFrame::decode(&bytes).unwrap_err();
    assert!(matches!(
        err,
        TensorError::Truncated { needed, got: 12 } if needed == 12 + MAX_TENSOR_BYTES
    ));

    // Every dim at u32::MAX: the size computation saturates instead of overflowing.
    let mut bytes = vec![b'N', b'T', 1, 1, 4, 0, 0, 0];
    bytes.extend_from_slice(&[0xff; 16]);
    assert!(matches!(
        TensorFrame::decode(&bytes),
        Err(TensorError::TooLarge { .. })
    ));
}

#[test]
fn new_validates_shape_and_length() {
    assert!(matches!(
        TensorFrame::new(DType::F32, vec![1; MAX_TENSOR_RANK + 1], vec![0; 4]),
        Err(TensorError::RankTooLarge { rank: 5 })
    ));
    assert!(matches!(
        TensorFrame::new(DType::F32, vec![2, 0], vec![]),
        Err(TensorError::ZeroDim { axis: 1 })
    ));
    assert!(matches!(
        TensorFrame::new(DType::F16, vec![3], vec![0; 5]),
        Err(TensorError::LengthMismatch {
            expected: 6,
            got: 5
        })
    ));
    assert!(matches!(
        TensorFrame::new(DType::F32, vec![usize::MAX, 2], vec![]),
        Err(TensorError::TooLarge {
            bytes: usize::MAX,
            ..
        })
    ));
    assert!(matches!(
        TensorFrame::from_f32(vec![2, 2], &[1.0; 3], DType::BF16),
        Err(TensorError::LengthMismatch {
            expected: 8,
            got: 6
        })
    ));
    let frame = TensorFrame::new(
        DType::F16,
        vec![MAX_TENSOR_BYTES / 2],
        vec![0; MAX_TENSOR_BYTES],
    );
    assert_eq!(frame.unwrap().elem_count(), MAX_TENSOR_BYTES / 2);
}

#[test]
fn expect_checks_dtype_rank_and_dims() {
    let frame = TensorFrame::from_f32(vec![1, 3, 4], &[0.0; 12], DType::BF16).unwrap();
    let accepted: [(Option<DType>, &[Option<usize>]); 3] = [
        (None, &[None, None, None]),
        (Some(DType::BF16), &[Some(1), None, Some(4)]),
        (Some(DType::BF16), &[Some(1), Some(3), Some(4)]),
    ];
    for (dtype, shape) in accepted {
        assert!(frame.expect(dtype, shape).is_ok(), "{dtype:?} {shape:?}");
    }

    let err = frame
        .expect(Some(DType::F32), &[None, None, None])
        .unwrap_err();
    assert!(matches!(
        err,
        TensorError::DTypeMismatch {
            expected: DType::F32,
            got: DType::BF16
        }
    ));
    assert_eq!(ErrorCode::from(&err), ErrorCode::BadDType);

    let rejected: [(&[Option<usize>], &str); 3] = [
        (
            &[Some(1), None, Some(8)],
            "expected shape [1, ?, 8], got [1, 3, 4]",
        ),
        (&[None, None], "expected shape [?, ?], got [1, 3, 4]"),
        (&[], "expected shape [], got [1, 3, 4]"),
    ];
    for (shape, message) in rejected {
        let err = frame.expect(None, shape).unwrap_err();
        assert!(matches!(err, TensorError::ShapeMismatch { .. }), "{err:?}");
        assert_eq!(err.to_string(), message);
        assert_eq!(ErrorCode::from(&err), ErrorCode::BadShape);
    }
}

#[test]
fn half_conversions_round_to_nearest() {
    let values = [1.0 + f32::EPSILON, 65504.0, 1.0e6, -0.0];
    let f16 = TensorFrame::from_f32(vec![4], &values, DType::F16).unwrap();
    assert_eq!(f16.to_f32(), [1.0, 65504.0, f32::INFINITY, -0.0]);
    let bf16 = TensorFrame::from_f32(vec![4], &values, DType::BF16).unwrap();
    assert_eq!(bf16.to_f32(), [1.0, 65536.0, 999424.0, -0.0]);
}

/// Deterministic values over a wide range, with an outlier per row.
fn wavy(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = (i as f32 * 0.37).sin() * 3.0;
            if i % 97 == 5 {
                x * 40.0
            } else {
                x
            }
        })
        .collect()
}

#[test]
fn q8_blocks_encode_scale_then_values_and_round_trip_within_half_a_step() {
    // One block: the scale is the largest magnitude over 127, in f16.
    let mut values = [0f32; Q8_BLOCK];
    values[0] = 127.0;
    values[1] = -63.6;
    values[2] = 0.4;
    let f = TensorFrame::from_f32(vec![1, Q8_BLOCK], &values, DType::Q8Block).unwrap();
    assert_eq!(f.data().len(), 34);
    assert_eq!(&f.data()[..2], &half::f16::from_f32(1.0).to_le_bytes());
    assert_eq!(f.data()[2] as i8, 127);
    assert_eq!(f.data()[3] as i8, -64);
    assert_eq!(f.data()[4] as i8, 0);
    assert_eq!(f.elem_count(), Q8_BLOCK);
    let back = f.to_f32();
    assert_eq!(&back[..3], &[127.0, -64.0, 0.0]);
    // Encode, decode: the same bytes.
    assert_eq!(TensorFrame::decode(&f.encode()).unwrap(), f);

    // Many rows: every value is within half a step of its block's scale.
    let (rows, hidden) = (7, 576);
    let values = wavy(rows * hidden);
    let f = TensorFrame::from_f32(vec![rows, hidden], &values, DType::Q8Block).unwrap();
    assert_eq!(f.data().len(), rows * hidden / 32 * 34);
    let back = f.to_f32();
    for (b, (orig, got)) in values.chunks(32).zip(back.chunks(32)).enumerate() {
        let amax = orig.iter().fold(0f32, |m, v| m.max(v.abs()));
        let step = amax / 127.0;
        for (o, g) in orig.iter().zip(got) {
            assert!(
                (o - g).abs() <= step * 0.5 + amax * 1e-3,
                "block {b}: {o} -> {g}"
            );
        }
    }
    // Rows stay whole blocks: narrowing shares the buffer and decodes the same.
    let mid = f.narrow_rows(2, 3).unwrap();
    assert_eq!(mid.to_f32(), back[2 * hidden..5 * hidden]);
    // An all-zero block has scale zero and decodes to zeros.
    let zeros = TensorFrame::from_f32(vec![64], &[0.0; 64], DType::Q8Block).unwrap();
    assert_eq!(zeros.to_f32(), vec![0.0; 64]);
}

#[test]
fn q8_refuses_unaligned_shapes_and_values_it_cannot_hold() {
    let err = TensorFrame::from_f32(vec![2, 40], &[0.0; 80], DType::Q8Block).unwrap_err();
    assert!(
        matches!(
            err,
            TensorError::NotBlockAligned {
                dim: 40,
                block: 32,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(ErrorCode::from(&err), ErrorCode::BadShape);
    assert!(err.to_string().contains("multiple of 32"), "{err}");
    // A scalar is one element: not a block.
    assert!(matches!(
        TensorFrame::new(DType::Q8Block, vec![], vec![0; 34]),
        Err(TensorError::NotBlockAligned { dim: 1, .. })
    ));
    // Data length is whole blocks.
    assert!(matches!(
        TensorFrame::new(DType::Q8Block, vec![32], vec![0; 33]),
        Err(TensorError::LengthMismatch {
            expected: 34,
            got: 33
        })
    ));
    for bad in [f32::NAN, f32::INFINITY, 1.0e7] {
        let mut values = vec![1.0; 64];
        values[40] = bad;
        let err = TensorFrame::from_f32(vec![64], &values, DType::Q8Block).unwrap_err();
        assert!(
            matches!(err, TensorError::Unrepresentable { block: 1 }),
            "{bad}: {err:?}"
        );
        assert_eq!(ErrorCode::from(&err), ErrorCode::BadDType);
    }
    // A decoded frame with any bytes is valid: every block decodes.
    let frame = TensorFrame::new(DType::Q8Block, vec![2, 32], vec![0xff; 68]).unwrap();
    let decoded = TensorFrame::decode(&frame.encode()).unwrap();
    assert_eq!(decoded.to_f32().len(), 64);
}

#[test]
fn to_dtype_converts_through_f32_and_keeps_a_frame_already_in_it() {
    let values = wavy(2 * 64);
    let f32s = TensorFrame::from_f32(vec![2, 64], &values, DType::F32).unwrap();
    assert_eq!(f32s.to_dtype(DType::F32).unwrap(), f32s);
    for dtype in [DType::F16, DType::BF16, DType::Q8Block] {
        let f = f32s.to_dtype(dtype).unwrap();
        assert_eq!(f.dtype(), dtype);
        assert_eq!(f.shape(), [2, 64]);
        assert_eq!(
            f,
            TensorFrame::from_f32(vec![2, 64], &values, dtype).unwrap()
        );
    }
}

#[test]
fn header_constants_match_the_spec() {
    assert_eq!(&TENSOR_HEADER_MAGIC, b"NT");
    assert_eq!(TENSOR_FRAME_VERSION, 1);
    assert_eq!(MAX_TENSOR_RANK, 4);
    assert_eq!(MAX_TENSOR_BYTES, 1 << 26);
}

fn any_dtype() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)]
}

fn any_shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..=6, 0..=MAX_TENSOR_RANK)
}

/// Valid frames with arbitrary data bytes (NaNs and all).
fn any_frame() -> impl Strategy<Value = TensorFrame> {
    (any_dtype(), any_shape()).prop_flat_map(|(dtype, shape)| {
        let len = shape.iter().product::<usize>() * dtype.block_bytes();
        prop::collection::vec(any::<u8>(), len)
            .prop_map(move |data| TensorFrame::new(dtype, shape.clone(), data).unwrap())
    })
}

/// Any f32 but NaN, whose payload the half conversions need not keep.
fn finite_or_infinite_f32() -> impl Strategy<Value = f32> {
    use prop::num::f32::{INFINITE, NORMAL, SUBNORMAL, ZERO};
    NORMAL | SUBNORMAL | ZERO | INFINITE
}

proptest! {
    #[test]
    fn frames_round_trip(frame in any_frame()) {
        let bytes = frame.encode();
        prop_assert_eq!(bytes.len(), frame.encoded_len());
        prop_assert_eq!(bytes.len(), 8 + 4 * frame.shape().len() + frame.data().len());
        prop_assert_eq!(TensorFrame::decode(&bytes).unwrap(), frame);
    }

    #[test]
    fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..128)) {
        // Whatever decodes is canonical: it encodes back to the same bytes.
        if let Ok(frame) = TensorFrame::decode(&bytes) {
            prop_assert_eq!(frame.encode(), bytes);
        }
    }

    #[test]
    fn damaged_frames_never_panic(
        frame in any_frame(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut bytes = frame.encode();
        let at = at.index(bytes.len());
        bytes[at] = byte;
        if let Ok(decoded) = TensorFrame::decode(&bytes) {
            prop_assert_eq!(decoded.encode(), bytes);
        }
    }

    #[test]
    fn f32_values_survive_bit_for_bit(shape in any_shape(), seed in any::<u32>()) {
        let count = shape.iter().product::<usize>();
        let values: Vec<f32> = (0..count)
            .map(|i| f32::from_bits(seed.wrapping_mul(2_654_435_761).wrapping_add(i as u32)))
            .collect();
        let frame = TensorFrame::from_f32(shape, &values, DType::F32).unwrap();
        let back: Vec<u32> = frame.to_f32().iter().map(|v| v.to_bits()).collect();
        let want: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
        prop_assert_eq!(back, want);
    }

    #[test]
    fn half_conversion_is_idempotent(
        dtype in any_dtype(),
        values in prop::collection::vec(finite_or_infinite_f32(), 1..64),
    ) {
        let shape = vec![values.len()];
        let once = TensorFrame::from_f32(shape.clone(), &values, dtype).unwrap();
        let twice = TensorFrame::from_f32(shape, &once.to_f32(), dtype).unwrap();
        prop_assert_eq!(twice, once);
    }
}
