//! The prost types generated from `proto/nomoat/v1`, private to the crate,
//! and the field numbers that the pre-decode walks and the hand-written
//! encoders use, each named once in [`field`].

pub(crate) use generated::*;

#[allow(
    clippy::all,
    missing_docs,
    unreachable_pub,
    missing_debug_implementations
)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/nomoat.v1.rs"));
}

/// Names protobuf field numbers once: `NAME: Message.field = number`. The
/// unit test below checks every one against the compiled `.proto` files,
/// so a renumbered field fails the tests instead of silently going
/// uncounted.
macro_rules! field_numbers {
    ($($(#[$doc:meta])* $name:ident: $message:ident . $field:ident = $number:literal,)*) => {
        $($(#[$doc])* pub(crate) const $name: u32 = $number;)*

        /// Every named number: message, field, number.
        #[cfg(test)]
        pub(crate) const ALL: &[(&str, &str, u32)] =
            &[$((stringify!($message), stringify!($field), $name)),*];
    };
}

/// Field numbers of the messages in `proto/nomoat/v1`.
pub(crate) mod field {
    field_numbers! {
        /// The `OpenSession` of an `InferFrame`.
        INFER_FRAME_OPEN: InferFrame.open = 1,
        /// The `Step` of an `InferFrame`.
        INFER_FRAME_STEP: InferFrame.step = 3,
        /// The `StepResult` of an `InferFrame`.
        INFER_FRAME_RESULT: InferFrame.result = 4,
        /// The `SpanOutput` of an `InferFrame`.
        INFER_FRAME_COPY: InferFrame.copy = 5,
        /// The `RerouteSession` of an `InferFrame`.
        INFER_FRAME_REROUTE: InferFrame.reroute = 9,
        /// The hops of an `OpenSession`'s route.
        OPEN_SESSION_ROUTE: OpenSession.route = 3,
        /// The hops of a `RerouteSession`'s route.
        REROUTE_SESSION_ROUTE: RerouteSession.route = 2,
        /// `Step.session_id`.
        STEP_SESSION_ID: Step.session_id = 1,
        /// `Step.seq`.
        STEP_SEQ: Step.seq = 2,
        /// `Step.start_pos`.
        STEP_START_POS: Step.start_pos = 3,
        /// `Step.hidden`.
        STEP_HIDDEN: Step.hidden = 4,
        /// `StepResult.session_id`.
        STEP_RESULT_SESSION_ID: StepResult.session_id = 1,
        /// `StepResult.seq`.
        STEP_RESULT_SEQ: StepResult.seq = 2,
        /// `StepResult.hidden`.
        STEP_RESULT_HIDDEN: StepResult.hidden = 3,
        /// `SpanOutput.session_id`.
        SPAN_OUTPUT_SESSION_ID: SpanOutput.session_id = 1,
        /// `SpanOutput.seq`.
        SPAN_OUTPUT_SEQ: SpanOutput.seq = 2,
        /// `SpanOutput.hop_index`.
        SPAN_OUTPUT_HOP_INDEX: SpanOutput.hop_index = 3,
        /// `SpanOutput.hidden`.
        SPAN_OUTPUT_HIDDEN: SpanOutput.hidden = 4,
        /// The addresses of a `ServerInfo`.
        SERVER_INFO_ADDRS: ServerInfo.addrs = 9,
        /// The adapters of a `ServerInfo`.
        SERVER_INFO_ADAPTERS: ServerInfo.adapters = 14,
        /// The signed entries of an `InfoResponse`.
        INFO_RESPONSE_SIGNED: InfoResponse.signed = 2,
        /// `SignedServerInfo.info`.
        SIGNED_SERVER_INFO_INFO: SignedServerInfo.info = 1,
        /// The steps of an `Evidence`.
        EVIDENCE_STEPS: Evidence.steps = 2,
        /// `Manifest.chunk_size` (the tests write it by hand).
        #[cfg(test)]
        MANIFEST_CHUNK_SIZE: Manifest.chunk_size = 3,
        /// The tensors of a `Manifest`.
        MANIFEST_TENSORS: Manifest.tensors = 9,
        /// The `GetChunks` of a `WeightsRequest`.
        WEIGHTS_REQUEST_CHUNKS: WeightsRequest.chunks = 2,
        /// The hashes of a `GetChunks`.
        GET_CHUNKS_HASHES: GetChunks.hashes = 2,
        /// The `ManifestData` of a `WeightsResponse`.
        WEIGHTS_RESPONSE_MANIFEST: WeightsResponse.manifest = 1,
        /// The `ChunkData` of a `WeightsResponse`.
        WEIGHTS_RESPONSE_CHUNK: WeightsResponse.chunk = 2,
        /// `ChunkData.hash`.
        CHUNK_DATA_HASH: ChunkData.hash = 1,
        /// `ChunkData.data`.
        CHUNK_DATA_DATA: ChunkData.data = 2,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    /// `Message.field number` lines, written by `build.rs` from the
    /// descriptors that protox compiles.
    const COMPILED: &str = include_str!(concat!(env!("OUT_DIR"), "/field_numbers.txt"));

    #[test]
    fn named_field_numbers_match_the_proto_files() {
        let compiled: HashMap<&str, u32> = COMPILED
            .lines()
            .map(|line| {
                let (name, number) = line.split_once(' ').expect("`name number`");
                (name, number.parse().expect("a field number"))
            })
            .collect();
        assert!(compiled.len() > 50, "{} fields compiled", compiled.len());
        for &(message, field, number) in super::field::ALL {
            let name = format!("{message}.{field}");
            assert_eq!(
                compiled.get(name.as_str()),
                Some(&number),
                "{name} is numbered {number} in pb.rs"
            );
        }
    }
}
