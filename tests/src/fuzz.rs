//! The bodies of the fuzz targets (`fuzz/fuzz_targets/*.rs`), one per
//! decoder of untrusted input, and the replay of their corpora
//! (`fuzz/corpus/TARGET/`) that `cargo test` runs.
//!
//! Each body feeds the bytes to the same function the node uses on a
//! peer's, a file's or an HTTP client's bytes. A decoder may refuse the
//! input with a typed error; it must never panic, and what it accepts must
//! encode back to bytes that decode to the same encoding again.

use bytes::Bytes;

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// Every target, by the name of its corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("infer_message", infer_message),
    ("tensor_frame", tensor_frame),
    ("info_message", info_message),
    ("weights_message", weights_message),
    ("manifest", manifest),
    ("gguf_header", gguf_header),
    ("safetensors_header", safetensors_header),
    ("config_json", config_json),
    ("api_body", api_body),
];

/// Checks that what `encode` makes of a decoded value decodes again to a
/// value with the same encoding.
fn stable<T>(value: T, encode: impl Fn(&T) -> Vec<u8>, decode: impl Fn(&[u8]) -> Option<T>) {
    let once = encode(&value);
    let again = decode(&once).expect("a decoder refused what its own encoder wrote");
    assert_eq!(encode(&again), once, "re-encoding changed the bytes");
}

/// `/nomoat/infer/1` messages (Open, Attach, Step, Result, Error...).
pub fn infer_message(data: &[u8]) {
    use nomoat_protocol::InferMessage;
    if let Ok(m) = InferMessage::decode(data) {
        stable(m, InferMessage::encode, |b| InferMessage::decode(b).ok());
    }
    let _ = InferMessage::decode_bytes(Bytes::copy_from_slice(data));
}

/// Hidden-state tensor frames, as hops send them.
pub fn tensor_frame(data: &[u8]) {
    use nomoat_protocol::TensorFrame;
    if let Ok(f) = TensorFrame::decode(data) {
        stable(f, TensorFrame::encode, |b| TensorFrame::decode(b).ok());
    }
}

/// `/nomoat/info/1` requests and answers, and gossiped announcements.
pub fn info_message(data: &[u8]) {
    use nomoat_protocol::{
        decode_info_request, decode_info_response, encode_info_request, encode_info_response,
        ServerInfo,
    };
    if let Ok(id) = decode_info_request(data) {
        stable(
            id,
            |i| encode_info_request(i),
            |b| decode_info_request(b).ok(),
        );
    }
    if let Ok(servers) = decode_info_response(data) {
        stable(
            servers,
            |s| encode_info_response(s),
            |b| decode_info_response(b).ok(),
        );
    }
    if let Ok(info) = ServerInfo::decode(data) {
        stable(info, ServerInfo::encode, |b| ServerInfo::decode(b).ok());
    }
    if let Ok(signed) = nomoat_protocol::SignedInfo::decode(data) {
        // Whatever the bytes, checking the signature answers, never panics.
        let _ = nomoat_node::net::signed::verify_info(&signed);
        stable(signed, nomoat_protocol::SignedInfo::encode, |b| {
            nomoat_protocol::SignedInfo::decode(b).ok()
        });
    }
}

/// `/nomoat/weights/1` requests and answers.
pub fn weights_message(data: &[u8]) {
    use nomoat_protocol::{WeightsRequest, WeightsResponse};
    if let Ok(r) = WeightsRequest::decode(data) {
        stable(r, WeightsRequest::encode, |b| {
            WeightsRequest::decode(b).ok()
        });
    }
    if let Ok(r) = WeightsResponse::decode_bytes(Bytes::copy_from_slice(data)) {
        // The framed encoding carries a 4-byte length first.
        stable(
            r,
            |r| r.encode_framed()[4..].to_vec(),
            |b| WeightsResponse::decode_bytes(Bytes::copy_from_slice(b)).ok(),
        );
    }
}

/// Model manifests, as fetched from peers.
pub fn manifest(data: &[u8]) {
    use nomoat_protocol::{Hash, Manifest};
    let decoded = Manifest::decode(data);
    // Bytes whose hash is the id asked for verify exactly when they decode.
    let verified = Manifest::decode_verified(data, &Hash::of(data));
    assert_eq!(
        decoded.is_ok(),
        verified.is_ok(),
        "{decoded:?} / {verified:?}"
    );
    if let Ok(m) = decoded {
        stable(m, Manifest::encode, |b| Manifest::decode(b).ok());
    }
}

/// GGUF headers: metadata, tensor infos, alignment, offsets.
pub fn gguf_header(data: &[u8]) {
    if let Ok(cfg) = nomoat_node::engine::check_gguf_bytes(data) {
        assert!(cfg.hidden_size > 0 && cfg.num_blocks > 0);
    }
}

/// Safetensors headers: the JSON index and its offsets.
pub fn safetensors_header(data: &[u8]) {
    let _ = nomoat_node::engine::check_safetensors_bytes(data);
}

/// Hugging Face `config.json`.
pub fn config_json(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(cfg) = nomoat_node::engine::ModelConfig::from_hf_json(text) {
            assert!(cfg.hidden_size > 0 && cfg.num_blocks > 0);
        }
    }
}

/// The API's request bodies: the first byte picks OpenAI's chat (0) or
/// completions (1), or Anthropic's messages (2), modulo 3.
pub fn api_body(data: &[u8]) {
    let _ = check_api_body(data);
}

/// The checks [`api_body`] runs, with their answer.
pub fn check_api_body(data: &[u8]) -> Result<(), nomoat_node::gateway::ApiError> {
    let Some((first, body)) = data.split_first() else {
        return Ok(());
    };
    match first % 3 {
        0 => nomoat_node::gateway::check_body(true, body),
        1 => nomoat_node::gateway::check_body(false, body),
        _ => nomoat_node::gateway::check_messages_body(body),
    }
}

/// The corpus directory of `target` in this checkout.
pub fn corpus_dir(target: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Writes each target's seed corpus under `root` (`fuzz/corpus`): valid
/// messages and files of every kind, large ones among them, made by
/// nomoat's own encoders and the test models.
pub fn write_seeds(root: &std::path::Path) -> anyhow::Result<()> {
    use candle_core::quantized::GgmlDType;
    use nomoat_protocol::{
        encode_info_request, encode_info_response, BlockRange, DType, ErrorCode, ErrorFrame, Hash,
        Have, Hop, InferMessage, OpenSession, Reachability, ServerInfo, SessionId, Step,
        TensorFrame, WeightsRequest, WeightsResponse,
    };
    let put = |target: &str, name: &str, bytes: &[u8]| -> anyhow::Result<()> {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
        Ok(())
    };
    let session = SessionId([7; 16]);
    let peer = libp2p::PeerId::random().to_bytes();
    let frame = |rows: usize, hidden: usize, dtype: DType| -> anyhow::Result<TensorFrame> {
        let values: Vec<f32> = (0..rows * hidden).map(|i| (i as f32).sin()).collect();
        Ok(TensorFrame::from_f32(vec![rows, hidden], &values, dtype)?)
    };
    // Tensor frames: each dtype, and a prompt's worth (512 x 576 f32, 1.2 MB).
    for (name, f) in [
        ("f32", frame(3, 64, DType::F32)?),
        ("f16", frame(3, 64, DType::F16)?),
        ("bf16", frame(2, 64, DType::BF16)?),
        ("q8", frame(2, 64, DType::Q8Block)?),
        ("prompt-f32", frame(512, 576, DType::F32)?),
    ] {
        put("tensor_frame", name, &f.encode())?;
    }
    let route = vec![
        Hop {
            peer_id: peer.clone(),
            blocks: BlockRange { start: 0, end: 15 },
        },
        Hop {
            peer_id: libp2p::PeerId::random().to_bytes(),
            blocks: BlockRange { start: 15, end: 30 },
        },
    ];
    let messages = [
        (
            "open",
            InferMessage::Open(OpenSession {
                session_id: session,
                model_id: "c0ffee".repeat(10),
                route,
                hop_index: 1,
                max_length: 2048,
                adapter: None,
            }),
        ),
        (
            "attach",
            InferMessage::Attach {
                session_id: session,
                from_hop: 0,
            },
        ),
        (
            "step",
            InferMessage::Step(Step {
                session_id: session,
                seq: 3,
                start_pos: 12,
                hidden: frame(1, 576, DType::F32)?,
                last_hop: None,
            }),
        ),
        (
            "step-prompt",
            InferMessage::Step(Step {
                session_id: session,
                seq: 0,
                start_pos: 0,
                hidden: frame(512, 576, DType::F16)?,
                last_hop: Some(1),
            }),
        ),
        (
            "result",
            InferMessage::Result {
                session_id: session,
                seq: 3,
                hidden: frame(1, 576, DType::F32)?,
            },
        ),
        (
            "receipt",
            InferMessage::Receipt({
                let body = nomoat_protocol::ReceiptBody {
                    model_id: "0123456789abcdef".into(),
                    session_id: session,
                    seq: 3,
                    blocks: nomoat_protocol::BlockRange { start: 0, end: 8 },
                    start_pos: 12,
                    rows: 1,
                    inputs: nomoat_protocol::InputChain::new(session),
                    output: nomoat_protocol::Hash([5; 32]),
                    adapter: None,
                };
                nomoat_protocol::Receipt {
                    body_bytes: body.encode(),
                    body,
                    public_key: vec![8; 36],
                    signature: vec![9; 64],
                }
            }),
        ),
        (
            "copy",
            InferMessage::Copy {
                session_id: session,
                seq: 3,
                hop_index: 0,
                hidden: frame(1, 576, DType::Q8Block)?,
            },
        ),
        (
            "opened",
            InferMessage::Opened {
                session_id: session,
                hop_index: 0,
                max_length: 2048,
            },
        ),
        (
            "error",
            InferMessage::Error(ErrorFrame::new(
                ErrorCode::Busy,
                "this server holds 64 sessions",
                Some(session),
                3,
                1,
            )),
        ),
        (
            "close",
            InferMessage::Close {
                session_id: session,
            },
        ),
    ];
    for (name, m) in &messages {
        put("infer_message", name, &m.encode())?;
    }
    let info = ServerInfo {
        peer_id: peer.clone(),
        model_id: "c0ffee".repeat(10),
        blocks: BlockRange { start: 0, end: 15 },
        num_blocks: 30,
        hidden_size: 576,
        throughput: 41.5,
        free_kv_tokens: 65536,
        load: 0.25,
        active_sessions: 4,
        batch_capacity: 3.0,
        version: "0.1.0".into(),
        addrs: vec![
            "/ip4/192.0.2.1/udp/4001/quic-v1"
                .parse::<libp2p::Multiaddr>()?
                .to_vec(),
            "/ip4/192.0.2.1/tcp/4001"
                .parse::<libp2p::Multiaddr>()?
                .to_vec(),
        ],
        reachability: Reachability::Public,
        timestamp_ms: 1_790_000_000_000,
        adapters: Vec::new(),
    };
    put("info_message", "request", &encode_info_request("c0ffee"))?;
    put("info_message", "request-all", &encode_info_request(""))?;
    put("info_message", "announcement", &info.encode())?;
    let sign = |info: ServerInfo| {
        let key = libp2p::identity::Keypair::generate_ed25519();
        let info = ServerInfo {
            peer_id: key.public().to_peer_id().to_bytes(),
            ..info
        };
        nomoat_node::net::signed::sign_info(&key, info)
    };
    put(
        "info_message",
        "signed-announcement",
        &sign(info.clone()).encode(),
    )?;
    let many: Vec<nomoat_protocol::SignedInfo> = (0..nomoat_protocol::MAX_INFO_SERVERS as u32)
        .map(|i| {
            sign(ServerInfo {
                blocks: BlockRange {
                    start: i % 30,
                    end: i % 30 + 1,
                },
                ..info.clone()
            })
        })
        .collect();
    put("info_message", "answer-full", &encode_info_response(&many))?;
    let model_id = Hash::of(b"model");
    let hashes: Vec<Hash> = (0..nomoat_protocol::MAX_CHUNKS_PER_REQUEST as u32)
        .map(|i| Hash::of(&i.to_le_bytes()))
        .collect();
    put(
        "weights_message",
        "manifest-request",
        &WeightsRequest::Manifest { model_id }.encode(),
    )?;
    put(
        "weights_message",
        "chunks-request",
        &WeightsRequest::Chunks { model_id, hashes }.encode(),
    )?;
    put(
        "weights_message",
        "have-request",
        &WeightsRequest::Have { model_id }.encode(),
    )?;
    let data = Bytes::from(
        (0..256 * 1024)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let responses = [
        (
            "chunk",
            WeightsResponse::Chunk {
                hash: Hash::of(&data),
                data,
            },
        ),
        (
            "have",
            WeightsResponse::Have(Have {
                blocks: vec![0, 1, 2, 29],
                head: true,
            }),
        ),
        (
            "busy",
            WeightsResponse::error(ErrorCode::Busy, "every slot of this peer is taken"),
        ),
    ];
    for (name, r) in &responses {
        put("weights_message", name, &r.encode_framed()[4..])?;
    }
    // Real files: the tiny models, as GGUF (two types) and safetensors,
    // imported for a manifest.
    let dir = tempfile::tempdir()?;
    let tiny = crate::TinyModel::generate(crate::TinySpec::new(crate::TinyArch::Llama))?;
    let q8 = tiny.write_gguf(&dir.path().join("q8.gguf"), GgmlDType::Q8_0)?;
    put("gguf_header", "tiny-llama-q8_0", &std::fs::read(&q8)?)?;
    let qwen = crate::TinyModel::generate(crate::TinySpec::new(crate::TinyArch::Qwen2))?;
    let f16 = qwen.write_gguf(&dir.path().join("f16.gguf"), GgmlDType::F16)?;
    put("gguf_header", "tiny-qwen2-f16", &std::fs::read(&f16)?)?;
    let st_dir = tiny.write_safetensors(&dir.path().join("st"))?;
    for e in std::fs::read_dir(&st_dir)? {
        let p = e?.path();
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        if name.ends_with(".safetensors") {
            put("safetensors_header", "tiny-llama", &std::fs::read(&p)?)?;
        } else if name == "config.json" {
            put("config_json", "tiny-llama", &std::fs::read(&p)?)?;
        }
    }
    put(
        "config_json",
        "qwen2-rope-scaling",
        br#"{"architectures":["Qwen2ForCausalLM"],"hidden_size":896,"intermediate_size":4864,"num_hidden_layers":24,"num_attention_heads":14,"num_key_value_heads":2,"max_position_embeddings":32768,"rms_norm_eps":1e-6,"rope_theta":1000000.0,"vocab_size":151936,"tie_word_embeddings":true,"rope_scaling":{"type":"linear","factor":2.0}}"#,
    )?;
    let store = nomoat_node::store::ChunkStore::open(&dir.path().join("store"))?;
    let report = nomoat_node::weights::import(&store, &q8)?;
    let manifest = report.manifest.encode();
    put("manifest", "tiny-llama-q8_0", &manifest)?;
    put(
        "weights_message",
        "manifest",
        &WeightsResponse::Manifest(Bytes::from(manifest)).encode_framed()[4..],
    )?;
    // API bodies: the first byte picks chat (even) or completions (odd).
    let long = "lorem ipsum ".repeat(40_000);
    let bodies: [(&str, u8, String); 7] = [
        (
            "chat",
            0,
            r#"{"model":"smollm2-135m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"What is the capital of France?"}],"temperature":0.7,"top_p":0.9,"max_tokens":64,"stop":["\n\n"],"seed":1,"stream":true,"stream_options":{"include_usage":true}}"#.into(),
        ),
        (
            "chat-parts",
            0,
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"Hi"},{"type":"text","text":" there"}]}],"presence_penalty":0.5,"frequency_penalty":-0.5,"n":1}"#.into(),
        ),
        (
            "chat-long",
            0,
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{long}"}}]}}"#),
        ),
        (
            "completion",
            1,
            r#"{"model":"m","prompt":"Once upon a time","max_tokens":16,"temperature":0,"stop":"."}"#.into(),
        ),
        (
            "completion-array",
            1,
            r#"{"model":"m","prompt":["One prompt"],"max_completion_tokens":8}"#.into(),
        ),
        (
            "messages",
            2,
            r#"{"model":"smollm2-135m","max_tokens":64,"system":"Be brief.","messages":[{"role":"user","content":"What is the capital of France?"}],"temperature":0.5,"top_p":0.9,"top_k":40,"stop_sequences":["\n\nUser:"],"stream":true,"metadata":{"user_id":"u1"}}"#.into(),
        ),
        (
            "messages-blocks",
            2,
            r#"{"model":"m","max_tokens":8,"system":[{"type":"text","text":"Be brief."}],"messages":[{"role":"user","content":[{"type":"text","text":"Hi"}]},{"role":"assistant","content":"Hello"}],"thinking":{"type":"disabled"}}"#.into(),
        ),
    ];
    for (name, first, body) in bodies {
        let mut bytes = vec![first];
        bytes.extend_from_slice(body.as_bytes());
        put("api_body", name, &bytes)?;
    }
    Ok(())
}
