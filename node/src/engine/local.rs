use std::time::{Duration, Instant};

use candle_core::Tensor;
use nomoat_protocol::TensorFrame;

use super::adapter::{AdapterWeights, SpanAdapter};
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
    /// An adapter's part for each span, or none.
    adapters: Vec<std::sync::Arc<SpanAdapter>>,
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
            adapters: Vec::new(),
        }
    }

    /// An adapter's parts for this model's spans, to share between
    /// sessions ([`new_session_with`](Self::new_session_with)).
    pub fn adapter_parts(&self, w: &AdapterWeights) -> Result<Vec<std::sync::Arc<SpanAdapter>>> {
        self.spans
            .iter()
            .map(|s| Ok(std::sync::Arc::new(w.span(s.start(), s.end())?)))
            .collect()
    }

    /// A fresh session that runs with an adapter's parts (from
    /// [`adapter_parts`](Self::adapter_parts); empty: no adapter).
    pub fn new_session_with(&self, adapters: Vec<std::sync::Arc<SpanAdapter>>) -> LocalSession {
        LocalSession {
            adapters,
            ..self.new_session()
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
        let LocalSession { caches, adapters } = session;
        for (i, (span, cache)) in self.spans.iter().zip(caches.iter_mut()).enumerate() {
            if i > 0 {
                // Cross the span boundary as the network would.
                let bytes = hidden_to_frame(&h, nomoat_protocol::DType::F32)?.encode();
                h = hidden_from_frame(&TensorFrame::decode(&bytes)?, hidden)?;
            }
            h = span.forward_with(&h, pos, cache, adapters.get(i).map(|a| &**a))?;
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
        on_token: impl FnMut(u32) -> Result<bool>,
    ) -> Result<(Vec<u32>, GenerationStats)> {
        self.generate_in(self.new_session(), prompt, opts, on_token)
    }

    /// [`generate`](Self::generate) in a given fresh session (e.g. one with
    /// an adapter).
    pub fn generate_in(
        &self,
        mut session: LocalSession,
        prompt: &[u32],
        opts: &GenerateOptions,
        mut on_token: impl FnMut(u32) -> Result<bool>,
    ) -> Result<(Vec<u32>, GenerationStats)> {
        let mut tokens = TokenLoop::new(prompt, opts, self.head.config().max_seq_len)?;
        let mut logits = self.forward_last(&mut session, prompt)?;
        while let Some(next) = tokens.next(&logits, &mut on_token)? {
            logits = self.forward_last(&mut session, &[next])?;
        }
        Ok(tokens.finish())
    }
}

/// The sampling side of a generation, shared by local and swarm generation:
/// picks tokens from logits, applies stop tokens and limits, and times the
/// prompt and the decode.
#[derive(Debug)]
pub struct TokenLoop {
    sampler: Sampler,
    history: Vec<u32>,
    out: Vec<u32>,
    stats: GenerationStats,
    started: Instant,
    decode_start: Option<Instant>,
    max_tokens: usize,
    stop_ids: Vec<u32>,
    /// Positions the model holds once the next token is fed.
    fed: usize,
    limit: usize,
}

impl TokenLoop {
    /// Checks the prompt against the context `limit` and starts the clock.
    pub fn new(prompt: &[u32], opts: &GenerateOptions, limit: usize) -> Result<Self> {
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if prompt.len() >= limit {
            return Err(EngineError::ContextFull {
                requested: prompt.len() + 1,
                limit,
            });
        }
        Ok(Self {
            sampler: Sampler::new(opts.sampling.clone()),
            history: prompt.to_vec(),
            out: Vec::new(),
            stats: GenerationStats {
                prompt_tokens: prompt.len(),
                ..Default::default()
            },
            started: Instant::now(),
            decode_start: None,
            max_tokens: opts.max_tokens,
            stop_ids: opts.stop_ids.clone(),
            fed: prompt.len(),
            limit,
        })
    }

    /// Takes the logits of the last position; returns the token to feed
    /// next, or `None` when the generation is over (a stop token, the token
    /// limit, the context, or `on_token` returning `false`).
    pub fn next<E>(
        &mut self,
        logits: &[f32],
        on_token: &mut impl FnMut(u32) -> std::result::Result<bool, E>,
    ) -> std::result::Result<Option<u32>, E> {
        if self.out.len() >= self.max_tokens {
            return Ok(None);
        }
        let next = self.sampler.sample(logits, &self.history);
        if self.decode_start.is_none() {
            self.stats.prompt_time = self.started.elapsed();
            self.decode_start = Some(Instant::now());
        }
        if self.stop_ids.contains(&next) {
            self.stats.stopped = true;
            return Ok(None);
        }
        self.out.push(next);
        self.history.push(next);
        if !on_token(next)? || self.out.len() >= self.max_tokens || self.fed + 1 > self.limit {
            return Ok(None);
        }
        self.fed += 1;
        Ok(Some(next))
    }

    /// The sampler as it is now: what [`rewind`](Self::rewind) restores.
    pub fn sampler(&self) -> &Sampler {
        &self.sampler
    }

    /// Forgets every generated token after the first `keep`, and goes on
    /// with `sampler` (as it was before token `keep` was sampled), so a
    /// generation taken back to an earlier position samples as it would
    /// have there.
    pub fn rewind(&mut self, keep: usize, sampler: Sampler) {
        let dropped = self.out.len().saturating_sub(keep);
        self.out.truncate(keep);
        self.history.truncate(self.history.len() - dropped);
        self.fed = self.stats.prompt_tokens + keep;
        self.stats.stopped = false;
        self.sampler = sampler;
    }

    /// The generated tokens and the figures.
    pub fn finish(mut self) -> (Vec<u32>, GenerationStats) {
        self.stats.generated_tokens = self.out.len();
        self.stats.decode_time = self.decode_start.map(|s| s.elapsed()).unwrap_or_default();
        (self.out, self.stats)
    }
}
