//! Replays every fuzz target's corpus (`fuzz/corpus/TARGET/`: the seeds,
//! and the inputs of crashes found and fixed) through the same target
//! bodies that `cargo fuzz` runs, so `cargo test` keeps every decoder free
//! of the panics found before. `fuzz/run.sh` does the fuzzing itself.

use nomoat_tests::fuzz::{corpus_dir, write_seeds, TARGETS};

#[test]
fn every_fuzz_corpus_replays_without_a_panic() {
    for (target, run) in TARGETS {
        let dir = corpus_dir(target);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("a corpus entry").path())
            .collect();
        inputs.sort();
        assert!(
            inputs.iter().any(|p| p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))),
            "{target} has no seeds in {}",
            dir.display()
        );
        for input in inputs {
            let bytes = std::fs::read(&input).expect("a corpus file");
            let caught = std::panic::catch_unwind(|| run(&bytes));
            assert!(caught.is_ok(), "{target} panicked on {}", input.display());
        }
    }
}

/// The seeds decode: a seed the decoders refuse would fuzz nothing past
/// the first check.
#[test]
fn the_seeds_are_valid_inputs() {
    use nomoat_protocol::{InferMessage, Manifest, TensorFrame, WeightsRequest, WeightsResponse};
    let seeds = |target: &str| -> Vec<(String, Vec<u8>)> {
        std::fs::read_dir(corpus_dir(target))
            .expect("a corpus")
            .map(|e| e.expect("an entry").path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
            })
            .map(|p| (p.display().to_string(), std::fs::read(&p).expect("a seed")))
            .collect()
    };
    for (name, b) in seeds("infer_message") {
        InferMessage::decode(&b).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for (name, b) in seeds("tensor_frame") {
        TensorFrame::decode(&b).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for (name, b) in seeds("weights_message") {
        let ok = WeightsRequest::decode(&b).is_ok()
            || WeightsResponse::decode_bytes(bytes::Bytes::from(b)).is_ok();
        assert!(ok, "{name} decodes as neither a request nor an answer");
    }
    for (name, b) in seeds("manifest") {
        Manifest::decode(&b).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for (name, b) in seeds("gguf_header") {
        nomoat_node::engine::check_gguf_bytes(&b).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for (name, b) in seeds("safetensors_header") {
        let n = nomoat_node::engine::check_safetensors_bytes(&b)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(n > 0, "{name}");
    }
    for (name, b) in seeds("config_json") {
        nomoat_node::engine::ModelConfig::from_hf_json(std::str::from_utf8(&b).expect("utf-8"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for (name, b) in seeds("api_body") {
        nomoat_tests::fuzz::check_api_body(&b).unwrap_or_else(|e| panic!("{name}: {e:?}"));
    }
}

/// Rewrites the seed corpora from nomoat's encoders and test models:
/// `cargo test -p nomoat-tests --test fuzz_corpus -- --ignored`.
#[test]
#[ignore = "writes fuzz/corpus; run by hand when a format changes"]
fn write_seed_corpora() {
    let root = corpus_dir("x");
    write_seeds(root.parent().expect("the corpus root")).expect("seeds written");
}
