//! LoRA adapters on tiny random-weight models: a random low-rank adapter,
//! written in the test as a PEFT directory and as a GGUF LoRA file, gives
//! through any split of the base into spans the logits of the model with
//! the adapter merged into its weights; sessions with and without it share
//! one model; an adapter of another base is refused.
//!
//! Tolerance: the merged model computes `x·(W + s·B·A)ᵀ`, the adapter run
//! `x·Wᵀ + s·(x·Aᵀ)·Bᵀ`; in f32 the two differ by rounding only. The
//! logits are compared at 1e-3 absolute (they are of order 1-10), where a
//! wrong layout (an unpermuted B of Q or K, a missing scale) is off by
//! more than 0.1.

use anyhow::Result;
use candle_core::quantized::GgmlDType;
use nomoat_node::engine::{LocalModel, ModelFile, WeightMode};
use nomoat_node::store::ChunkStore;
use nomoat_node::weights::adapter::{open_adapter, read_adapter, AdapterError};
use nomoat_node::weights::{import_adapter, model_file_id};
use nomoat_tests::harness;
use nomoat_tests::lora::TestLora;
use nomoat_tests::{max_abs_diff, TinyArch, TinyModel, TinySpec};

const PROMPT: [u32; 7] = [3, 17, 42, 5, 88, 1, 60];
const DECODE: [u32; 4] = [9, 31, 77, 2];
const TOLERANCE: f32 = 1e-3;

#[test]
fn an_adapter_gives_the_merged_models_logits_in_both_formats_and_any_split() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = ChunkStore::open(&dir.path().join("home"))?;
    for arch in [TinyArch::Llama, TinyArch::Qwen2] {
        let base = TinyModel::generate(TinySpec::new(arch))?;
        let lora = TestLora::random(&base, 4, 8.0, 7, &[])?;
        let base_path =
            base.write_gguf(&dir.path().join(format!("{arch:?}.gguf")), GgmlDType::F32)?;
        let merged_path = lora.merged(&base)?.write_gguf(
            &dir.path().join(format!("{arch:?}-merged.gguf")),
            GgmlDType::F32,
        )?;
        let file = ModelFile::open(&base_path)?;
        let base_id = model_file_id(&base_path)?;
        let merged = LocalModel::load_whole(&ModelFile::open(&merged_path)?, WeightMode::Fast)?;
        let want = harness::session_trace(&merged, merged.new_session(), &PROMPT, &DECODE)?;
        let arch_name = file.config().arch.name();
        let peft = lora.write_peft(&dir.path().join(format!("{arch:?}-peft")))?;
        let gguf = lora.write_gguf(&dir.path().join(format!("{arch:?}-lora.gguf")), arch_name)?;
        let mut ids = Vec::new();
        for path in [&peft, &gguf] {
            let imported = import_adapter(&store, path, file.config(), &base_id)?;
            assert_eq!(imported.meta.rank, 4);
            assert_eq!(imported.meta.targets.len(), 7, "{:?}", imported.meta);
            assert!((imported.meta.scale - 2.0).abs() < 1e-6);
            // Importing again gives the same id and writes nothing.
            let again = import_adapter(&store, path, file.config(), &base_id)?;
            assert_eq!((again.id, again.new_chunks), (imported.id, 0));
            ids.push(imported.id);
            let w = open_adapter(&store, &imported.id, file.config(), &base_id, None)?;
            for cuts in [vec![6], vec![2, 6], vec![1, 4, 6]] {
                let model = LocalModel::load(&file, &cuts, WeightMode::Fast)?;
                let session = model.new_session_with(model.adapter_parts(&w)?);
                let got = harness::session_trace(&model, session, &PROMPT, &DECODE)?;
                let diff = harness::worst_diff(&got, &want)?;
                assert!(
                    diff < TOLERANCE,
                    "{arch:?} {} split {cuts:?}: {diff}",
                    path.display()
                );
            }
        }
        // The two formats describe the same update.
        let a = open_adapter(&store, &ids[0], file.config(), &base_id, None)?;
        let b = open_adapter(&store, &ids[1], file.config(), &base_id, None)?;
        for (name, t) in &a.tensors {
            let diff = max_abs_diff(t, &b.tensors[name])?;
            assert!(diff < 1e-6, "{arch:?} {name}: {diff}");
        }
        // Only a span's part is read for a span.
        let part = open_adapter(&store, &ids[0], file.config(), &base_id, Some(2..4))?;
        assert_eq!(part.tensors.len(), 2 * 2 * 7);
        assert!(part
            .tensors
            .keys()
            .all(|n| n.starts_with("blk.2.") || n.starts_with("blk.3.")));
    }
    Ok(())
}

#[test]
fn sessions_with_and_without_an_adapter_share_a_model_each_exact() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let base = TinyModel::generate(TinySpec::new(TinyArch::Llama))?;
    let lora = TestLora::random(&base, 8, 16.0, 11, &["attn_q", "attn_v", "ffn_down"])?;
    let base_path = base.write_gguf(&dir.path().join("base.gguf"), GgmlDType::F32)?;
    let file = ModelFile::open(&base_path)?;
    let base_id = model_file_id(&base_path)?;
    let w = read_adapter(
        &lora.write_peft(&dir.path().join("peft"))?,
        file.config(),
        &base_id,
    )?;
    assert_eq!(w.meta.targets, ["attn_q", "attn_v", "ffn_down"]);
    let model = LocalModel::load(&file, &[3, 6], WeightMode::Fast)?;
    let parts = model.adapter_parts(&w)?;
    let alone_plain = harness::session_trace(&model, model.new_session(), &PROMPT, &DECODE)?;
    let alone_adapted = harness::session_trace(
        &model,
        model.new_session_with(parts.clone()),
        &PROMPT,
        &DECODE,
    )?;
    assert!(
        harness::worst_diff(&alone_plain, &alone_adapted)? > 0.1,
        "the adapter changes nothing"
    );
    // Interleaved steps of two sessions on the one model.
    let mut plain = model.new_session();
    let mut adapted = model.new_session_with(parts);
    let mut got_plain = vec![model.forward_logits(&mut plain, &PROMPT)?];
    let mut got_adapted = vec![model.forward_logits(&mut adapted, &PROMPT)?];
    for &t in &DECODE {
        got_adapted.push(model.forward_logits(&mut adapted, &[t])?);
        got_plain.push(model.forward_logits(&mut plain, &[t])?);
    }
    assert_eq!(harness::worst_diff(&got_plain, &alone_plain)?, 0.0);
    assert_eq!(harness::worst_diff(&got_adapted, &alone_adapted)?, 0.0);
    Ok(())
}

#[test]
fn an_adapter_of_another_base_is_refused_with_a_clear_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = ChunkStore::open(&dir.path().join("home"))?;
    let llama = TinyModel::generate(TinySpec::new(TinyArch::Llama))?;
    let lora = TestLora::random(&llama, 4, 4.0, 3, &[])?;
    let peft = lora.write_peft(&dir.path().join("peft"))?;
    let gguf = lora.write_gguf(&dir.path().join("lora.gguf"), "llama")?;
    // Another architecture with other shapes.
    let mut spec = TinySpec::new(TinyArch::Qwen2);
    spec.hidden = 96;
    spec.heads = 6;
    let qwen_path =
        TinyModel::generate(spec)?.write_gguf(&dir.path().join("qwen.gguf"), GgmlDType::F32)?;
    let qwen = ModelFile::open(&qwen_path)?;
    let qwen_id = model_file_id(&qwen_path)?;
    let e = import_adapter(&store, &peft, qwen.config(), &qwen_id).unwrap_err();
    assert!(matches!(e, AdapterError::Bad { .. }), "{e}");
    assert!(e.to_string().contains("has shape"), "{e}");
    let e = import_adapter(&store, &gguf, qwen.config(), &qwen_id).unwrap_err();
    assert!(e.to_string().contains("for a llama model"), "{e}");
    // The right base imports it; another model of the same shape is not
    // its base, and opening it there says so.
    let base_path = llama.write_gguf(&dir.path().join("llama.gguf"), GgmlDType::F32)?;
    let base = ModelFile::open(&base_path)?;
    let id = import_adapter(&store, &peft, base.config(), &model_file_id(&base_path)?)?.id;
    let other = TinyModel::generate(TinySpec {
        seed: 99,
        ..TinySpec::new(TinyArch::Llama)
    })?
    .write_gguf(&dir.path().join("other.gguf"), GgmlDType::F32)?;
    let other_id = model_file_id(&other)?;
    let e = open_adapter(&store, &id, base.config(), &other_id, None).unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("and this is model {other_id}")),
        "{e}"
    );
    // A model is not an adapter, and a model file is not a LoRA file.
    let e = import_adapter(&store, &base_path, base.config(), &other_id).unwrap_err();
    assert!(e.to_string().contains("not a LoRA adapter"), "{e}");
    Ok(())
}
