//! The span engine: llama-family decoder blocks on candle.
//!
//! * [`ModelFile`] opens a GGUF file or a safetensors directory and reads its
//!   [`ModelConfig`] without loading any weights.
//! * [`Span`] holds blocks `[a, b)` and nothing else; [`Head`] holds the token
//!   embedding, the final norm and the LM head.
//! * [`SpanCache`] is one session's KV cache for one span: multi-token
//!   prefill, one-token decode and rollback to an earlier position. Weights
//!   are immutable and shared, so one span serves many sessions at once.
//! * [`Sampler`] turns logits into tokens; [`ChatTokenizer`] turns text into
//!   ids and back; [`LocalModel`] chains a head and spans into a generator.

pub mod adapter;
mod attention;
mod compact;
mod config;
mod error;
mod file;
mod kernels;
mod kv;
mod local;
mod memory;
mod model;
mod par;
mod sampling;
mod tokenizer;

pub use adapter::{AdapterMeta, AdapterWeights, SpanAdapter};
pub use config::{
    Arch, ModelConfig, RopeScaling, MAX_BLOCKS, MAX_CONTEXT, MAX_HEADS, MAX_HEAD_DIM, MAX_HIDDEN,
    MAX_INTERMEDIATE, MAX_VOCAB,
};
pub use error::EngineError;
pub use file::{
    check_gguf_bytes, check_safetensors_bytes, ModelFile, WeightMode, MAX_SAFETENSORS_HEADER,
};
pub use kv::{SpanCache, INITIAL_CACHE_POSITIONS};
pub use local::{
    GenerateOptions, GenerationStats, LocalModel, LocalSession, TokenLoop, DEFAULT_MAX_TOKENS,
};
pub use memory::{block_bytes, head_bytes, loaded_bytes, StoredTensor};
pub use model::{
    hidden_from_frame, hidden_to_frame, BatchStep, Head, Span, MAX_SHARED_LOGITS, PREFILL_CHUNK,
};
pub use sampling::{
    Sampler, SamplingParams, DEFAULT_REPETITION_WINDOW, DEFAULT_SEED, DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
};
pub use tokenizer::{ChatMessage, ChatTokenizer, TextStream};

/// Result type of the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
