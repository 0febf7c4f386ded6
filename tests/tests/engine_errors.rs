//! Bad input to the engine: every case is a typed error, never a panic.

use anyhow::Result;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use nomoat_node::engine::{
    hidden_from_frame, EngineError, GenerateOptions, Head, LocalModel, ModelFile, SamplingParams,
    Span, WeightMode,
};
use nomoat_protocol::TensorFrame;
use nomoat_tests::{TinyArch, TinyModel, TinySpec};

fn tiny_gguf(dir: &std::path::Path, dtype: GgmlDType) -> Result<std::path::PathBuf> {
    TinyModel::generate(TinySpec::new(TinyArch::Llama))?.write_gguf(&dir.join("tiny.gguf"), dtype)
}

/// Opens a model and loads everything in it, as `generate` would.
fn load_all(path: &std::path::Path) -> Result<(), EngineError> {
    let file = ModelFile::open(path)?;
    LocalModel::load_whole(&file, WeightMode::Fast).map(|_| ())
}

#[test]
fn truncated_gguf_is_a_clear_error_at_every_cut() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = tiny_gguf(dir.path(), GgmlDType::Q8_0)?;
    let bytes = std::fs::read(&path)?;
    let cut_path = dir.path().join("cut.gguf");
    let n = bytes.len();
    let mut cuts: Vec<usize> = vec![0, 1, 4, 7, 8, 16, 24, 100, 1000, n / 2, n - 100, n - 1];
    cuts.extend((0..n).step_by(n / 200 + 1));
    for cut in cuts {
        std::fs::write(&cut_path, &bytes[..cut])?;
        match load_all(&cut_path) {
            Err(EngineError::Corrupt { reason, .. }) => assert!(!reason.is_empty()),
            Err(other) => panic!("cut at {cut}: expected Corrupt, got {other}"),
            Ok(()) => panic!("cut at {cut} of {n} bytes loaded"),
        }
    }
    Ok(())
}

#[test]
fn corrupt_header_bytes_never_panic() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = tiny_gguf(dir.path(), GgmlDType::F32)?;
    let bytes = std::fs::read(&path)?;
    let bad = dir.path().join("bad.gguf");
    // Not GGUF at all.
    std::fs::write(&bad, b"this is not a model file at all, just text")?;
    assert!(matches!(load_all(&bad), Err(EngineError::Corrupt { .. })));
    // Damage single bytes across the header: any result but a panic is fine,
    // and a damaged length or type must not load as if nothing happened.
    for pos in (0..600.min(bytes.len())).step_by(3) {
        let mut b = bytes.clone();
        b[pos] ^= 0xA5;
        std::fs::write(&bad, &b)?;
        let _ = load_all(&bad);
    }
    Ok(())
}

#[test]
fn unsupported_architecture_is_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("gpt2.gguf");
    TinyModel::generate(TinySpec::new(TinyArch::Llama))?.write_gguf_with(
        &path,
        GgmlDType::F32,
        Some("gpt2"),
        &|_| true,
    )?;
    let err = ModelFile::open(&path).unwrap_err();
    assert!(
        matches!(&err, EngineError::UnsupportedArch(a) if a == "gpt2"),
        "{err}"
    );
    assert!(err.to_string().contains("llama and qwen2"));
    Ok(())
}

#[test]
fn unsupported_quant_type_is_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // Q8_1 is an activation format with no weight kernel.
    let path = tiny_gguf(dir.path(), GgmlDType::Q8_1)?;
    let err = load_all(&path).unwrap_err();
    assert!(
        matches!(&err, EngineError::UnsupportedDType { dtype, .. } if dtype.contains("Q8_1")),
        "{err}"
    );
    // A type id no ggml version defines: patch the first tensor's type field.
    let mut bytes = std::fs::read(&path)?;
    let name = b"token_embd.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("tensor name in file");
    // name, then u32 n_dims (2), then 2 x u64 dims, then the u32 type.
    let ty = at + name.len() + 4 + 16;
    bytes[ty..ty + 4].copy_from_slice(&250u32.to_le_bytes());
    let bad = dir.path().join("unknown-type.gguf");
    std::fs::write(&bad, &bytes)?;
    assert!(matches!(load_all(&bad), Err(EngineError::Corrupt { .. })));
    Ok(())
}

#[test]
fn missing_and_misshapen_tensors_are_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tiny = TinyModel::generate(TinySpec::new(TinyArch::Llama))?;
    let path = dir.path().join("missing.gguf");
    tiny.write_gguf_with(&path, GgmlDType::F32, None, &|n| n != "blk.4.ffn_up.weight")?;
    let file = ModelFile::open(&path)?;
    // Spans without block 4 still load; the one with it names the tensor.
    Span::load(&file, 0, 4, WeightMode::Fast)?;
    let err = Span::load(&file, 3, 6, WeightMode::Fast).unwrap_err();
    assert!(
        matches!(&err, EngineError::MissingTensor(n) if n == "blk.4.ffn_up.weight"),
        "{err}"
    );

    // A model directory whose config disagrees with its tensors.
    let st = tiny.write_safetensors(&dir.path().join("st"))?;
    let cfg_path = st.join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path)?
        .replace("\"intermediate_size\": 128", "\"intermediate_size\": 96");
    std::fs::write(&cfg_path, cfg)?;
    let err = load_all(&st).unwrap_err();
    assert!(matches!(err, EngineError::TensorShape { .. }), "{err}");
    Ok(())
}

#[test]
fn bad_safetensors_directories() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let st = TinyModel::generate(TinySpec::new(TinyArch::Qwen2))?
        .write_safetensors(&dir.path().join("st"))?;
    // Truncated weights.
    let w = st.join("model.safetensors");
    let bytes = std::fs::read(&w)?;
    std::fs::write(&w, &bytes[..bytes.len() / 2])?;
    assert!(matches!(load_all(&st), Err(EngineError::Corrupt { .. })));
    // Absurd header length.
    std::fs::write(&w, u64::MAX.to_le_bytes())?;
    assert!(matches!(load_all(&st), Err(EngineError::Corrupt { .. })));
    // No config.json.
    std::fs::remove_file(st.join("config.json"))?;
    assert!(matches!(load_all(&st), Err(EngineError::Io { .. })));
    Ok(())
}

#[test]
fn spans_outside_the_model_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = ModelFile::open(tiny_gguf(dir.path(), GgmlDType::F32)?)?;
    for (a, b) in [(0, 7), (6, 7), (3, 3), (4, 2), (100, 200)] {
        let err = Span::load(&file, a, b, WeightMode::Fast).unwrap_err();
        assert!(
            matches!(err, EngineError::BadSpan { start, end, num_blocks: 6 } if start == a && end == b),
            "{a}..{b}: {err}"
        );
    }
    assert!(matches!(
        LocalModel::load(&file, &[2, 4], WeightMode::Fast),
        Err(EngineError::BadSpan { .. })
    ));
    Ok(())
}

#[test]
fn prompts_past_the_context_and_bad_steps_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = ModelFile::open(tiny_gguf(dir.path(), GgmlDType::F32)?)?;
    let model = LocalModel::load(&file, &[3, 6], WeightMode::Fast)?;
    let limit = file.config().max_seq_len;
    assert_eq!(limit, 64);
    let opts = GenerateOptions {
        max_tokens: 4,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
    };
    let long: Vec<u32> = (0..limit as u32 + 5).map(|i| i % 90).collect();
    let err = model.generate(&long, &opts, |_| Ok(true)).unwrap_err();
    assert!(
        matches!(err, EngineError::ContextFull { limit: 64, .. }),
        "{err}"
    );
    let err = model.generate(&[], &opts, |_| Ok(true)).unwrap_err();
    assert!(matches!(err, EngineError::EmptyPrompt));
    // Generation stops at the context instead of overrunning it.
    let near: Vec<u32> = (0..limit as u32 - 2).map(|i| i % 90).collect();
    let (out, _) = model.generate(
        &near,
        &GenerateOptions {
            max_tokens: 50,
            ..opts.clone()
        },
        |_| Ok(true),
    )?;
    assert!(
        near.len() + out.len() <= limit + 1,
        "{} + {}",
        near.len(),
        out.len()
    );

    // Token ids outside the vocabulary.
    let head = Head::load(&file, WeightMode::Fast)?;
    assert!(matches!(
        head.embed(&[1, 96]),
        Err(EngineError::BadToken { id: 96, vocab: 96 })
    ));

    // Hidden states of the wrong shape, dtype or position reach a span.
    let span = Span::load(&file, 0, 3, WeightMode::Fast)?;
    let mut cache = span.new_cache();
    let wrong_width = Tensor::zeros((1, 2, 32), DType::F32, &Device::Cpu)?;
    assert!(matches!(
        span.forward(&wrong_width, 0, &mut cache),
        Err(EngineError::BadHidden(_))
    ));
    let wrong_dtype = Tensor::zeros((1, 2, 64), DType::F16, &Device::Cpu)?;
    assert!(matches!(
        span.forward(&wrong_dtype, 0, &mut cache),
        Err(EngineError::BadHidden(_))
    ));
    let ok = Tensor::zeros((1, 2, 64), DType::F32, &Device::Cpu)?;
    assert!(matches!(
        span.forward(&ok, 5, &mut cache),
        Err(EngineError::BadHidden(_))
    ));
    span.forward(&ok, 0, &mut cache)?;
    let too_long = Tensor::zeros((1, limit, 64), DType::F32, &Device::Cpu)?;
    assert!(matches!(
        span.forward(&too_long, 2, &mut cache),
        Err(EngineError::ContextFull { .. })
    ));
    // The failed steps left the cache as it was.
    assert_eq!(cache.len(), 2);

    // A frame whose hidden size is wrong.
    let frame = TensorFrame::from_f32(vec![1, 32], &[0.0; 32], nomoat_protocol::DType::F32)?;
    assert!(matches!(
        hidden_from_frame(&frame, 64),
        Err(EngineError::Frame(_))
    ));
    Ok(())
}

#[test]
fn a_gguf_header_with_zero_alignment_is_corrupt_not_a_panic() -> Result<()> {
    use candle_core::quantized::{gguf_file, QTensor};
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("zero-align.gguf");
    let t = QTensor::quantize(
        &Tensor::zeros((4, 32), DType::F32, &Device::Cpu)?,
        GgmlDType::F32,
    )?;
    let arch = gguf_file::Value::String("llama".into());
    let align = gguf_file::Value::U32(0);
    let mut f = std::fs::File::create(&path)?;
    gguf_file::write(
        &mut f,
        &[
            ("general.architecture", &arch),
            ("general.alignment", &align),
        ],
        &[("token_embd.weight", &t)],
    )?;
    drop(f);
    // A local file.
    let err = ModelFile::open(&path).unwrap_err();
    assert!(matches!(err, EngineError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("alignment"), "{err}");
    // The same header inside a manifest, as a peer would hand it out.
    let header = std::fs::read(&path)?;
    let store = nomoat_node::store::ChunkStore::open(&dir.path().join("store"))?;
    let data = vec![0u8; 4 * 32 * 4];
    let hash = nomoat_protocol::Hash::of(&data);
    store.put(&hash, &data)?;
    let manifest = nomoat_protocol::Manifest {
        format: nomoat_protocol::ModelFormat::Gguf,
        chunk_size: nomoat_protocol::CHUNK_SIZE,
        architecture: "llama".into(),
        num_blocks: 1,
        header,
        tokenizer: Vec::new(),
        tokenizer_config: Vec::new(),
        tensors: vec![nomoat_protocol::TensorEntry {
            name: "token_embd.weight".into(),
            role: nomoat_protocol::TensorRole::Embedding,
            dtype: "F32".into(),
            shape: vec![4, 32],
            byte_len: data.len() as u64,
            chunks: vec![hash],
        }],
    };
    let id = store.put_manifest(&manifest)?;
    let err = ModelFile::open_store(&store, &id).unwrap_err();
    assert!(matches!(err, EngineError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("alignment"), "{err}");
    Ok(())
}

#[test]
fn safetensors_offsets_past_any_file_are_corrupt() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let st = TinyModel::generate(TinySpec::new(TinyArch::Qwen2))?
        .write_safetensors(&dir.path().join("st"))?;
    let w = st.join("model.safetensors");
    // One tensor whose window wraps around u64 (a release build would
    // otherwise wrap past the size check, a debug build panic).
    for offsets in [
        format!("[{}, {}]", u64::MAX - 2, u64::MAX),
        format!("[8, {}]", u64::MAX),
        "[16, 8]".to_string(),
    ] {
        let header = format!(
            r#"{{"model.embed_tokens.weight":{{"dtype":"F32","shape":[2],"data_offsets":{offsets}}}}}"#
        );
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&[0u8; 64]);
        std::fs::write(&w, &bytes)?;
        let err = load_all(&st).unwrap_err();
        assert!(
            matches!(err, EngineError::Corrupt { .. }),
            "{offsets}: {err}"
        );
    }
    Ok(())
}

#[test]
fn a_config_json_with_absurd_sizes_is_refused_before_anything_is_allocated() -> Result<()> {
    let base = serde_json::json!({
        "model_type": "qwen2",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 100,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6
    });
    assert!(nomoat_node::engine::ModelConfig::from_hf_json(&base.to_string()).is_ok());
    for (field, value) in [
        ("hidden_size", serde_json::json!(1u64 << 40)),
        ("num_hidden_layers", serde_json::json!(1_000_000)),
        ("intermediate_size", serde_json::json!(1u64 << 40)),
        ("vocab_size", serde_json::json!(1u64 << 33)),
        ("num_attention_heads", serde_json::json!(0)),
        ("rms_norm_eps", serde_json::json!(-1.0)),
        ("hidden_size", serde_json::json!("sixty-four")),
    ] {
        let mut cfg = base.clone();
        cfg[field] = value.clone();
        let err = nomoat_node::engine::ModelConfig::from_hf_json(&cfg.to_string()).unwrap_err();
        assert!(
            matches!(err, EngineError::Config(_)),
            "{field} = {value}: {err}"
        );
    }
    let mut scaled = base.clone();
    scaled["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": 0.0});
    assert!(nomoat_node::engine::ModelConfig::from_hf_json(&scaled.to_string()).is_err());
    Ok(())
}
