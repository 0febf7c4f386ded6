use std::time::{Duration, Instant};

use candle_core::Tensor;
use nomoat_protocol::TensorFrame;

use super::file::{ModelFile, WeightMode};
use super::kv::SpanCache;
use super::model::{hidden_from_frame, hidden_to_frame, Head, Span};
use super::sampling::{Sampler, SamplingParams};
use super::{EngineError, Result};

/// Options of one generation.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Tokens that end the generation (not emitted).
    pub stop_ids: Vec<u32>,
}

/// Default number of tokens `nomoat generate` produces.
pub const DEFAULT_MAX_TOKENS: usize = 256;

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: DEFAULT_MAX_TOKENS,
            sampling: SamplingParams::default(),
            stop_ids: Vec::new(),
        }
    }
}

/// Timings and counts of one generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationStats {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Time to run the prompt (prefill) and sample the first token.
    pub prompt_time: Duration,
    /// Tokens generated (stop token excluded).
    pub generated_tokens: usize,
    /// Time spent generating after the first token.
    pub decode_time: Duration,
    /// Whether a stop token ended the generation.
    pub stopped: bool,
}

impl GenerationStats {
    /// Prefill throughput.
    pub fn prompt_tokens_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_time.as_secs_f64().max(1e-9)
    }

    /// Decode throughput (tokens after the first, over the time they took).
    pub fn decode_tokens_per_sec(&self) -> f64 {
        let n = self.generated_tokens.saturating_sub(1);
        n as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// A head and a chain of spans that together cover a model, in one process.
///
/// Between spans the hidden states go through [`TensorFrame`] bytes, the
/// encoding the swarm carries, so a local chain computes exactly what a
/// swarm of the same spans computes.
#[derive(Debug)]
pub struct LocalModel {
    head: Head,
    spans: Vec<Span>,
}

/// One conversation's state on a [`LocalModel`]: a KV cache per span.
#[derive(Debug)]
pub struct LocalSession {
    caches: Vec<SpanCache>,
}

impl LocalSession {
    /// Positions processed so far.
    pub fn len(&self) -> usize {
        self.caches.first().map_or(0, SpanCache::len)
    }

    /// Whether nothing has been processed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets positions `to..` in every span.
    pub fn rollback(&mut self, to: usize) -> Result<()> {
        self.caches.iter_mut().try_for_each(|c| c.rollback(to))
    }
}

impl LocalModel {
    /// Loads the head and the spans ending at each of `cuts` (the last cut
    /// is the number of blocks; `&[n]` is the whole model as one span).
    pub fn load(file: &ModelFile, cuts: &[usize], mode: WeightMode) -> Result<Self> {
        let n = file.config().num_blocks;
        if cuts.last() != Some(&n) {
            return Err(EngineError::BadSpan {
                start: 0,
                end: cuts.last().copied().unwrap_or(0),
                num_blocks: n,
            });
        }
        let mut start = 0;
        let mut spans = Vec::with_capacity(cuts.len());
        for &end in cuts {
            spans.push(Span::load(file, start, end, mode)?);
            start = end;
        }
        Ok(Self {
            head: Head::load(file, mode)?,
            spans,
        })
    }

    /// Loads the whole model as one span.
    pub fn load_whole(file: &ModelFile, mode: WeightMode) -> Result<Self> {
        Self::load(file, &[file.config().num_blocks], mode)
    }

    /// The head.
    pub fn head(&self) -> &Head {
        &self.head
    }

    /// The spans, in order.
    pub fn spans(&self) -> &[Span] {
        &self.spans
    }

    /// Bytes of weights read per generated token.
    pub fn weight_bytes_per_token(&self) -> usize {
        self.head.weight_bytes() + self.spans.iter().map(Span::weight_bytes).sum::<usize>()
    }

    /// A fresh session.
    pub fn new_session(&self) -> LocalSession {
        LocalSession {
            caches: self.spans.iter().map(Span::new_cache).collect(),
        }
    }

    /// Runs `tokens` at the session's next positions through every span and
    /// returns the final hidden states `(1, t, hidden)`.
    pub fn forward_hidden(&self, session: &mut LocalSession, tokens: &[u32]) -> Result<Tensor> {
        let pos = session.len();
        let limit = self.head.config().max_seq_len;
        if pos + tokens.len() > limit {
            return Err(EngineError::ContextFull {
                requested: pos + tokens.len(),
                limit,
            });
        }
        let hidden = self.head.config().hidden_size;
        let mut h = self.head.embed(tokens)?;
        for (i, (span, cache)) in self.spans.iter().zip(session.caches.iter_mut()).enumerate() {
            if i > 0 {
                // Cross the span boundary as the network would.
                let bytes = hidden_to_frame(&h)?.encode();
                h = hidden_from_frame(&TensorFrame::decode(&bytes)?, hidden)?;
            }
            h = span.forward(&h, pos, cache)?;
        }
        Ok(h)
    }

    /// Logits `(t, vocab)` for every position of `tokens`.
    pub fn forward_logits(&self, session: &mut LocalSession, tokens: &[u32]) -> Result<Tensor> {
        let h = self.forward_hidden(session, tokens)?;
        self.head.logits(&h)
    }

    /// Logits of the last of `tokens`.
    pub fn forward_last(&self, session: &mut LocalSession, tokens: &[u32]) -> Result<Vec<f32>> {
        let h = self.forward_hidden(session, tokens)?;
        self.head.last_logits(&h)
    }

    /// Generates after `prompt`, calling `on_token` with each new token;
    /// `on_token` returns `false` to stop early.
    pub fn generate(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        mut on_token: impl FnMut(u32) -> Result<bool>,
    ) -> Result<(Vec<u32>, GenerationStats)> {
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let limit = self.head.config().max_seq_len;
        if prompt.len() >= limit {
            return Err(EngineError::ContextFull {
                requested: prompt.len() + 1,
                limit,
            });
        }
        let mut session = self.new_session();
        let mut sampler = Sampler::new(opts.sampling.clone());
        let mut history = prompt.to_vec();
        let mut out = Vec::new();
        let mut stats = GenerationStats {
            prompt_tokens: prompt.len(),
            ..Default::default()
        };
        let t0 = Instant::now();
        let mut logits = self.forward_last(&mut session, prompt)?;
        let mut decode_start = None;
        while out.len() < opts.max_tokens {
            let next = sampler.sample(&logits, &history);
            if decode_start.is_none() {
                stats.prompt_time = t0.elapsed();
                decode_start = Some(Instant::now());
            }
            if opts.stop_ids.contains(&next) {
                stats.stopped = true;
                break;
            }
            out.push(next);
            history.push(next);
            if !on_token(next)? || out.len() >= opts.max_tokens || session.len() + 1 > limit {
                break;
            }
            logits = self.forward_last(&mut session, &[next])?;
        }
        stats.generated_tokens = out.len();
        stats.decode_time = decode_start.map(|s| s.elapsed()).unwrap_or_default();
        Ok((out, stats))
    }
}
