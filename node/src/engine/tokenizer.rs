use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::Split;
use tokenizers::tokenizer::SplitDelimiterBehavior;
use tokenizers::{AddedToken, Tokenizer};

use super::config::value_as_u64;
use super::{EngineError, Result};

const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// One message of a chat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with a role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A byte-level BPE tokenizer plus what a chat needs: the ChatML template,
/// the default system prompt and the stop tokens.
#[derive(Debug, Clone)]
pub struct ChatTokenizer {
    inner: Tokenizer,
    stop_ids: Vec<u32>,
}

fn tok_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

fn string_array(md: &HashMap<String, Value>, key: &str) -> Result<Vec<String>> {
    match md.get(key) {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.to_string().cloned().map_err(tok_err))
            .collect(),
        _ => Err(EngineError::Tokenizer(format!(
            "GGUF metadata has no {key} array"
        ))),
    }
}

impl ChatTokenizer {
    /// Builds the tokenizer from GGUF metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(md: &HashMap<String, Value>) -> Result<Self> {
        let model = md
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .unwrap_or("");
        if model != "gpt2" {
            return Err(EngineError::Tokenizer(format!(
                "tokenizer model `{model}` is not supported: nomoat reads byte-level BPE (`gpt2`) tokenizers"
            )));
        }
        let tokens = string_array(md, "tokenizer.ggml.tokens")?;
        let merges = string_array(md, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| EngineError::Tokenizer(format!("bad merge `{m}`")))
            })
            .collect::<Result<Vec<_>>>()?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tok_err)?;
        let mut inner = Tokenizer::new(bpe);
        let pre = md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .unwrap_or("gpt2");
        match pre {
            "smollm" => {
                inner.with_pre_tokenizer(Some(Sequence::new(vec![
                    Digits::new(true).into(),
                    ByteLevel::new(false, true, true).into(),
                ])));
            }
            "qwen2" | "llama3" | "llama-bpe" | "smaug-bpe" => {
                let pattern = if pre == "qwen2" {
                    QWEN2_PATTERN
                } else {
                    LLAMA3_PATTERN
                };
                let split = Split::new(
                    tokenizers::pre_tokenizers::split::SplitPattern::Regex(pattern.to_string()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(tok_err)?;
                inner.with_pre_tokenizer(Some(Sequence::new(vec![
                    split.into(),
                    ByteLevel::new(false, false, false).into(),
                ])));
                if pre == "qwen2" {
                    inner.with_normalizer(Some(NFC)).map_err(tok_err)?;
                }
            }
            _ => {
                inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            }
        }
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // Control and user-defined tokens are matched whole, before BPE.
        if let Some(Value::Array(types)) = md.get("tokenizer.ggml.token_type") {
            let specials: Vec<AddedToken> = types
                .iter()
                .zip(&tokens)
                .filter(|(ty, _)| matches!(value_as_u64(ty), Some(3 | 4)))
                .map(|(_, t)| AddedToken::from(t.clone(), true))
                .collect();
            inner.add_special_tokens(specials).map_err(tok_err)?;
        }
        let mut stop_ids = Vec::new();
        if let Some(id) = md.get("tokenizer.ggml.eos_token_id").and_then(value_as_u64) {
            stop_ids.push(id as u32);
        }
        let mut this = Self { inner, stop_ids };
        this.add_chat_stops();
        Ok(this)
    }

    /// Loads `tokenizer.json` from a model directory (and the chat template
    /// from `tokenizer_config.json` when present).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let json = std::fs::read(&path)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
        let config = std::fs::read(dir.join("tokenizer_config.json")).unwrap_or_default();
        Self::from_json(&json, &config)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// Builds the tokenizer from the bytes of `tokenizer.json` and (possibly
    /// empty) `tokenizer_config.json`.
    pub fn from_json(json: &[u8], config: &[u8]) -> Result<Self> {
        let inner = Tokenizer::from_bytes(json).map_err(tok_err)?;
        let mut stop_ids = Vec::new();
        if let Ok(cfg) = serde_json::from_slice::<serde_json::Value>(config) {
            if let Some(eos) = cfg["eos_token"].as_str() {
                stop_ids.extend(inner.token_to_id(eos));
            }
        }
        let mut this = Self { inner, stop_ids };
        this.add_chat_stops();
        Ok(this)
    }

    /// The tokenizer of an opened model: from GGUF metadata, a model
    /// directory, or a manifest in the weight store.
    pub fn from_model(file: &super::ModelFile) -> Result<Self> {
        if let Some(md) = file.gguf_metadata() {
            return Self::from_gguf(md);
        }
        if let Some(dir) = file.directory() {
            return Self::from_dir(dir);
        }
        match file.tokenizer_json() {
            Some((json, config)) if !json.is_empty() => Self::from_json(json, config),
            _ => Err(EngineError::Tokenizer(format!(
                "{} has no tokenizer",
                file.path().display()
            ))),
        }
    }

    fn add_chat_stops(&mut self) {
        for t in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>"] {
            if let Some(id) = self.inner.token_to_id(t) {
                if !self.stop_ids.contains(&id) {
                    self.stop_ids.push(id);
                }
            }
        }
    }

    /// Token ids that end a generation.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Encodes text; special tokens written in the text (like `<|im_start|>`)
    /// become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids; special tokens are left out when `skip_special` is set.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tok_err)
    }

    /// The ChatML prompt for a conversation, ending with the assistant's turn.
    /// Only the messages given are rendered: no default system prompt is
    /// inserted (as llama.cpp's built-in ChatML template does).
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> String {
        let mut out = String::new();
        for m in messages {
            out.push_str(&format!(
                "<|im_start|>{}\n{}<|im_end|>\n",
                m.role, m.content
            ));
        }
        out.push_str("<|im_start|>assistant\n");
        out
    }
}

/// Turns a growing list of token ids into text pieces, holding back bytes
/// that do not yet form whole UTF-8 characters.
#[derive(Debug, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    emitted: usize,
}

impl TextStream {
    /// Adds a token; returns the new text it completes, if any.
    pub fn push(&mut self, tok: &ChatTokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = tok.decode(&self.ids, true)?;
        if text.ends_with('\u{fffd}') || text.len() <= self.emitted {
            return Ok(None);
        }
        let piece = text.get(self.emitted..).map(str::to_string);
        self.emitted = text.len();
        Ok(piece)
    }

    /// Adds a token and writes the text it completes to `w` (flushed);
    /// returns `false` once `w` fails (e.g. a closed pipe), so the caller can
    /// stop generating quietly.
    pub fn write_to(
        &mut self,
        tok: &ChatTokenizer,
        id: u32,
        w: &mut impl std::io::Write,
    ) -> Result<bool> {
        if let Some(piece) = self.push(tok, id)? {
            if w.write_all(piece.as_bytes())
                .and_then(|_| w.flush())
                .is_err()
            {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
