//! `/nomoat/weights/1` messages: property round-trips, and decoders that
//! never panic on arbitrary bytes.

use bytes::Bytes;
use nomoat_protocol::{
    Hash, Manifest, ModelFormat, TensorEntry, TensorRole, WeightsRequest, WeightsResponse,
    MIN_CHUNK_BYTES,
};
use proptest::prelude::*;

fn any_role(blocks: u32) -> impl Strategy<Value = TensorRole> {
    prop_oneof![
        (0..blocks).prop_map(TensorRole::Block),
        Just(TensorRole::Embedding),
        Just(TensorRole::OutputNorm),
        Just(TensorRole::Output),
        Just(TensorRole::Shared),
    ]
}

fn any_manifest() -> impl Strategy<Value = Manifest> {
    (1u32..8).prop_flat_map(|blocks| {
        let tensor = (
            any_role(blocks),
            1u64..(3 * u64::from(MIN_CHUNK_BYTES)),
            proptest::collection::vec(1u64..100, 1..4),
            any::<u8>(),
        );
        (
            proptest::collection::vec(tensor, 1..12),
            proptest::collection::vec(any::<u8>(), 0..64),
            any::<bool>(),
        )
            .prop_map(move |(tensors, header, st)| Manifest {
                format: if st {
                    ModelFormat::Safetensors
                } else {
                    ModelFormat::Gguf
                },
                chunk_size: MIN_CHUNK_BYTES,
                architecture: "llama".into(),
                num_blocks: blocks,
                header,
                tokenizer: vec![],
                tokenizer_config: vec![],
                tensors: tensors
                    .into_iter()
                    .enumerate()
                    .map(|(i, (role, len, shape, seed))| TensorEntry {
                        name: format!("t{i}"),
                        role,
                        dtype: "F32".into(),
                        shape,
                        byte_len: len,
                        chunks: (0..len.div_ceil(u64::from(MIN_CHUNK_BYTES)))
                            .map(|c| Hash::of(&[seed, c as u8]))
                            .collect(),
                    })
                    .collect(),
            })
    })
}

proptest! {
    #[test]
    fn manifests_round_trip(m in any_manifest()) {
        let bytes = m.encode();
        prop_assert_eq!(Manifest::decode_verified(&bytes, &m.id()).unwrap(), m);
    }

    #[test]
    fn a_flipped_bit_never_passes_as_the_same_model(m in any_manifest(), at in any::<usize>(), bit in 0u8..8) {
        let mut bytes = m.encode();
        let i = at % bytes.len();
        bytes[i] ^= 1 << bit;
        prop_assert!(Manifest::decode_verified(&bytes, &m.id()).is_err());
    }

    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Manifest::decode(&bytes);
        let _ = WeightsRequest::decode(&bytes);
        let _ = WeightsResponse::decode_bytes(Bytes::from(bytes));
    }
}
