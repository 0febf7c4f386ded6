use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The model file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a valid GGUF or safetensors model (truncated, corrupt).
    #[error("{path} is not a valid model file: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The model's architecture is not one nomoat runs.
    #[error("unsupported architecture `{0}`: nomoat runs llama and qwen2 models")]
    UnsupportedArch(String),
    /// A tensor is stored in a type nomoat cannot compute with.
    #[error("tensor `{tensor}` has unsupported type {dtype}; supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K")]
    UnsupportedDType {
        /// The tensor's name.
        tensor: String,
        /// Its type.
        dtype: String,
    },
    /// A required metadata key or config field is missing or has the wrong type.
    #[error("model config: {0}")]
    Config(String),
    /// A tensor the architecture needs is not in the file.
    #[error("tensor `{0}` is missing from the model file")]
    MissingTensor(String),
    /// A tensor's shape does not match the model config.
    #[error("tensor `{tensor}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        /// The tensor's name.
        tensor: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
    },
    /// A block span lies outside the model or is empty.
    #[error(
        "blocks {start}..{end} are not a span of this model, which has blocks 0..{num_blocks}"
    )]
    BadSpan {
        /// First block.
        start: usize,
        /// One past the last block.
        end: usize,
        /// BlockRange in the model.
        num_blocks: usize,
    },
    /// A sequence would grow past the model's context (or the configured cap).
    #[error("context full: {requested} tokens requested, the limit is {limit}")]
    ContextFull {
        /// Position after the step.
        requested: usize,
        /// Maximum sequence length.
        limit: usize,
    },
    /// A LoRA adapter is malformed or does not fit the model.
    #[error("adapter: {0}")]
    Adapter(String),
    /// A hidden state has the wrong shape or dtype for this model.
    #[error("bad hidden state: {0}")]
    BadHidden(String),
    /// A rollback asked for a position beyond the cache's length.
    #[error("cannot roll back to position {to}: the cache holds {len} positions")]
    BadRollback {
        /// Requested position.
        to: usize,
        /// Current length.
        len: usize,
    },
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    BadToken {
        /// The token.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// Tokenizer construction, encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The prompt is empty after tokenization.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// A tensor computation failed.
    #[error("compute: {0}")]
    Candle(#[from] candle_core::Error),
    /// The weight store failed.
    #[error("{0}")]
    Store(Box<crate::store::StoreError>),
    /// A tensor's chunk is not in the weight store.
    #[error("tensor `{tensor}` is not in the weight store (chunk {chunk} missing): fetch it with `nomoat serve --model MODEL_ID --bootstrap PEER`, or import the model file")]
    MissingChunk {
        /// The tensor's name.
        tensor: String,
        /// The missing chunk's hash.
        chunk: String,
    },
    /// A tensor frame could not be built or read.
    #[error("tensor frame: {0}")]
    Frame(#[from] nomoat_protocol::TensorError),
}

impl From<crate::store::StoreError> for EngineError {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Store(Box::new(e))
    }
}
