use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use nomoat_protocol::TensorFrame;

use super::adapter::{BlockAdapter, LoraPair, SpanAdapter};
use super::compact::CompactMatMul;
use super::config::ModelConfig;
use super::file::{ModelFile, RawWeight, WeightMode};
use super::kv::SpanCache;
use super::{EngineError, Result};

/// Most positions a span computes at once: a longer step (a prompt) runs
/// in pieces of this many, so its working memory does not grow with it.
pub const PREFILL_CHUNK: usize = 256;

/// Whether candle has a fast CPU kernel for a ggml type.
pub(super) fn has_fast_kernel(dtype: GgmlDType) -> bool {
    matches!(
        dtype,
        GgmlDType::Q4_0
            | GgmlDType::Q8_0
            | GgmlDType::Q2K
            | GgmlDType::Q3K
            | GgmlDType::Q4K
            | GgmlDType::Q6K
    )
}

/// How a weight is multiplied.
#[derive(Debug)]
enum MatMul {
    /// candle's own, which may keep a faster repacked copy.
    Candle(QMatMul),
    /// On the stored blocks alone ([`WeightMode::Compact`]).
    Compact(CompactMatMul),
}

impl MatMul {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Candle(m) => m.forward(x),
            Self::Compact(m) => m.forward(x),
        }
    }
}

/// A matrix multiply by a stored weight, plus an optional bias.
#[derive(Debug)]
struct Linear {
    weight: MatMul,
    bias: Option<Tensor>,
    bytes: usize,
}

fn prepare_qtensor(q: QTensor, mode: WeightMode) -> Result<QTensor> {
    let dtype = q.dtype();
    let float = matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
    let row = q.shape().dims().last().copied().unwrap_or(0);
    if mode == WeightMode::F32 && dtype != GgmlDType::F32 {
        let t = q.dequantize(&Device::Cpu)?;
        return Ok(QTensor::quantize(&t, GgmlDType::F32)?);
    }
    let fast = matches!(mode, WeightMode::Fast | WeightMode::Compact);
    if fast && !float && !has_fast_kernel(dtype) && row % 32 == 0 {
        let t = q.dequantize(&Device::Cpu)?;
        return Ok(QTensor::quantize(&t, GgmlDType::Q8_0)?);
    }
    Ok(q)
}

/// The product by a loaded quantized weight in `mode`.
fn matmul_of(q: Arc<QTensor>, mode: WeightMode) -> Result<MatMul> {
    if mode == WeightMode::Compact {
        if let Some(m) = CompactMatMul::new(q.clone()) {
            return Ok(MatMul::Compact(m));
        }
    }
    Ok(MatMul::Candle(QMatMul::from_arc(q)?))
}

fn matmul_from_raw(raw: RawWeight, mode: WeightMode) -> Result<(MatMul, usize)> {
    match raw {
        RawWeight::Quant(q) => {
            let q = prepare_qtensor(q, mode)?;
            let bytes = match q.dtype() {
                GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => q.shape().elem_count() * 4,
                _ => q.storage_size_in_bytes(),
            };
            Ok((matmul_of(Arc::new(q), mode)?, bytes))
        }
        RawWeight::Dense(t) => {
            let bytes = t.elem_count() * 4;
            Ok((MatMul::Candle(QMatMul::Tensor(t)), bytes))
        }
    }
}

fn expect_dims(name: &str, got: &[usize], expected: &[usize]) -> Result<()> {
    if got != expected {
        return Err(EngineError::TensorShape {
            tensor: name.to_string(),
            expected: expected.to_vec(),
            got: got.to_vec(),
        });
    }
    Ok(())
}

impl Linear {
    fn load(
        file: &ModelFile,
        prefix: &str,
        out_dim: usize,
        in_dim: usize,
        bias: bool,
        mode: WeightMode,
    ) -> Result<Self> {
        let wname = format!("{prefix}.weight");
        let raw = file.read(&wname)?;
        expect_dims(&wname, raw.dims(), &[out_dim, in_dim])?;
        let (weight, mut bytes) = matmul_from_raw(raw, mode)?;
        let bias = if bias {
            let bname = format!("{prefix}.bias");
            let b = file.read(&bname)?;
            expect_dims(&bname, b.dims(), &[out_dim])?;
            bytes += out_dim * 4;
            Some(b.dequantize()?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            bytes,
        })
    }

    fn forward(&self, x: &Tensor, lora: Option<&LoraPair>) -> Result<Tensor> {
        let y = self.weight.forward(x)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        match lora {
            Some(l) => l.add_to(x, y),
            None => Ok(y),
        }
    }
}

#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(file: &ModelFile, name: &str, dim: usize, eps: f64) -> Result<Self> {
        let raw = file.read(name)?;
        expect_dims(name, raw.dims(), &[dim])?;
        Ok(Self {
            weight: raw.dequantize()?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

/// Rotary tables shared by the blocks of a span.
#[derive(Debug)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
    interleaved: bool,
}

impl Rope {
    fn new(cfg: &ModelConfig) -> Result<Self> {
        let inv = cfg.rope_inv_freq();
        let half = inv.len();
        let n = cfg.max_seq_len;
        let mut angles = Vec::with_capacity(n * half);
        for p in 0..n {
            for f in &inv {
                angles.push(p as f32 * f);
            }
        }
        let a = Tensor::from_vec(angles, (n, half), &Device::Cpu)?;
        Ok(Self {
            cos: a.cos()?,
            sin: a.sin()?,
            interleaved: cfg.rope_interleaved,
        })
    }

    fn apply(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let t = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        Ok(if self.interleaved {
            candle_nn::rotary_emb::rope_i(x, &cos, &sin)?
        } else {
            candle_nn::rotary_emb::rope(x, &cos, &sin)?
        })
    }
}

#[derive(Debug)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(file: &ModelFile, p: &str, cfg: &ModelConfig, mode: WeightMode) -> Result<Self> {
        let (h, hd, nh, nkv) = (
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_heads,
            cfg.num_kv_heads,
        );
        let bias = cfg.arch.qkv_bias();
        Ok(Self {
            q: Linear::load(file, &format!("{p}.attn_q"), nh * hd, h, bias, mode)?,
            k: Linear::load(file, &format!("{p}.attn_k"), nkv * hd, h, bias, mode)?,
            v: Linear::load(file, &format!("{p}.attn_v"), nkv * hd, h, bias, mode)?,
            o: Linear::load(file, &format!("{p}.attn_output"), h, nh * hd, false, mode)?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        pos: usize,
        rope: &Rope,
        cache: &mut super::kv::LayerCache,
        max_len: usize,
        lora: Option<&BlockAdapter>,
    ) -> Result<Tensor> {
        let pair = |t: usize| lora.and_then(|l| l.pair(t));
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let group = nh / nkv;
        let q = self
            .q
            .forward(x, pair(0))?
            .reshape((b, t, nh, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let k = self
            .k
            .forward(x, pair(1))?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let v = self
            .v
            .forward(x, pair(2))?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?;
        let q = rope.apply(&q, pos)?;
        let k = rope.apply(&k, pos)?;
        let (k, v) = cache.append(pos, &k, &v, max_len)?;
        let s = pos + t;
        // Query heads that share a kv head sit next to each other, so the group
        // folds into the row dimension and K/V are never repeated.
        let q = q.reshape((b, nkv, group * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let scores = if t > 1 {
            let mask: Vec<f32> = (0..t)
                .flat_map(|i| {
                    (0..s).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (t, s), x.device())?;
            scores
                .reshape((b, nkv, group, t, s))?
                .broadcast_add(&mask)?
                .reshape((b, nkv, group * t, s))?
        } else {
            scores
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?; // (b, nkv, group * t, hd)
        let out = out
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        self.o.forward(&out, pair(3))
    }

    fn bytes(&self) -> usize {
        self.q.bytes + self.k.bytes + self.v.bytes + self.o.bytes
    }
}

#[derive(Debug)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn load(file: &ModelFile, p: &str, cfg: &ModelConfig, mode: WeightMode) -> Result<Self> {
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate: Linear::load(file, &format!("{p}.ffn_gate"), f, h, false, mode)?,
            up: Linear::load(file, &format!("{p}.ffn_up"), f, h, false, mode)?,
            down: Linear::load(file, &format!("{p}.ffn_down"), h, f, false, mode)?,
        })
    }

    fn forward(&self, x: &Tensor, lora: Option<&BlockAdapter>) -> Result<Tensor> {
        let pair = |t: usize| lora.and_then(|l| l.pair(t));
        let g = candle_nn::ops::silu(&self.gate.forward(x, pair(4))?)?;
        let u = self.up.forward(x, pair(5))?;
        self.down.forward(&(g * u)?, pair(6))
    }

    fn bytes(&self) -> usize {
        self.gate.bytes + self.up.bytes + self.down.bytes
    }
}

#[derive(Debug)]
struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    ffn_norm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    fn load(file: &ModelFile, idx: usize, cfg: &ModelConfig, mode: WeightMode) -> Result<Self> {
        let p = format!("blk.{idx}");
        let eps = cfg.rms_norm_eps;
        Ok(Self {
            attn_norm: RmsNorm::load(file, &format!("{p}.attn_norm.weight"), cfg.hidden_size, eps)?,
            attn: Attention::load(file, &p, cfg, mode)?,
            ffn_norm: RmsNorm::load(file, &format!("{p}.ffn_norm.weight"), cfg.hidden_size, eps)?,
            mlp: Mlp::load(file, &p, cfg, mode)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        pos: usize,
        rope: &Rope,
        cache: &mut super::kv::LayerCache,
        max_len: usize,
        lora: Option<&BlockAdapter>,
    ) -> Result<Tensor> {
        let h = self
            .attn
            .forward(&self.attn_norm.forward(x)?, pos, rope, cache, max_len, lora)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.ffn_norm.forward(&x)?, lora)?;
        Ok((x + h)?)
    }

    fn bytes(&self) -> usize {
        self.attn.bytes() + self.mlp.bytes() + self.attn_norm.weight.elem_count() * 8
    }
}

/// BlockRange `[start, end)` of a model: the unit a server holds.
///
/// Only these blocks' tensors are read from the file. The weights are
/// immutable; each session brings its own [`SpanCache`].
#[derive(Debug)]
pub struct Span {
    start: usize,
    end: usize,
    blocks: Vec<Block>,
    rope: Rope,
    config: Arc<ModelConfig>,
}

impl Span {
    /// Loads blocks `[start, end)`.
    pub fn load(file: &ModelFile, start: usize, end: usize, mode: WeightMode) -> Result<Self> {
        let cfg = file.config();
        if start >= end || end > cfg.num_blocks {
            return Err(EngineError::BadSpan {
                start,
                end,
                num_blocks: cfg.num_blocks,
            });
        }
        let blocks = (start..end)
            .map(|i| Block::load(file, i, cfg, mode))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            start,
            end,
            blocks,
            rope: Rope::new(cfg)?,
            config: Arc::new(cfg.clone()),
        })
    }

    /// First block held.
    pub fn start(&self) -> usize {
        self.start
    }

    /// One past the last block held.
    pub fn end(&self) -> usize {
        self.end
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Bytes of weights this span reads for every token.
    pub fn weight_bytes(&self) -> usize {
        self.blocks.iter().map(Block::bytes).sum()
    }

    /// A fresh KV cache for one session on this span.
    pub fn new_cache(&self) -> SpanCache {
        SpanCache::new(self.start, self.blocks.len(), self.config.max_seq_len)
    }

    /// A fresh KV cache for a session that runs only blocks `[start, end)`
    /// of this span, holding at most `max_len` positions (capped at the
    /// model's context).
    pub fn new_cache_range(&self, start: usize, end: usize, max_len: usize) -> Result<SpanCache> {
        if start >= end || start < self.start || end > self.end {
            return Err(EngineError::BadSpan {
                start,
                end,
                num_blocks: self.config.num_blocks,
            });
        }
        Ok(SpanCache::new(
            start,
            end - start,
            max_len.min(self.config.max_seq_len),
        ))
    }

    /// Runs the cache's blocks (the whole span, or the sub-range the cache
    /// was made for) on hidden states `x` of shape `(1, t, hidden)` for
    /// positions `pos..pos + t`, appending them to `cache`.
    ///
    /// `pos` must equal the cache's length: roll the cache back first to
    /// recompute earlier positions.
    pub fn forward(&self, x: &Tensor, pos: usize, cache: &mut SpanCache) -> Result<Tensor> {
        self.forward_with(x, pos, cache, None)
    }

    /// [`forward`](Self::forward) with an adapter's updates, which must
    /// cover the cache's blocks.
    pub fn forward_with(
        &self,
        x: &Tensor,
        pos: usize,
        cache: &mut SpanCache,
        adapter: Option<&SpanAdapter>,
    ) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() != 3 || dims[0] != 1 || dims[1] == 0 || dims[2] != self.config.hidden_size {
            return Err(EngineError::BadHidden(format!(
                "expected shape (1, t, {}), got {dims:?}",
                self.config.hidden_size
            )));
        }
        if x.dtype() != DType::F32 {
            return Err(EngineError::BadHidden(format!(
                "expected f32, got {:?}",
                x.dtype()
            )));
        }
        let (first, last) = cache.blocks();
        if first < self.start || last > self.end || first >= last {
            return Err(EngineError::BadSpan {
                start: first,
                end: last,
                num_blocks: self.config.num_blocks,
            });
        }
        if pos != cache.len() {
            return Err(EngineError::BadHidden(format!(
                "step at position {pos} but the session's cache holds {} positions",
                cache.len()
            )));
        }
        let t = dims[1];
        let max = cache.max_len();
        if pos + t > max {
            return Err(EngineError::ContextFull {
                requested: pos + t,
                limit: max,
            });
        }
        if let Some(a) = adapter {
            if a.start() > first || a.end() < last {
                return Err(EngineError::Adapter(format!(
                    "the adapter is loaded for blocks {}..{}, the session runs {first}..{last}",
                    a.start(),
                    a.end()
                )));
            }
        }
        let blocks = &self.blocks[first - self.start..last - self.start];
        // A long step runs in pieces of PREFILL_CHUNK positions, every block
        // on one piece before the next: the same causal attention over the
        // cache, with working memory bounded by the piece, not the prompt.
        let mut outs = Vec::with_capacity(t.div_ceil(PREFILL_CHUNK));
        let mut done = 0;
        while done < t {
            let n = (t - done).min(PREFILL_CHUNK);
            let mut h = if n == t {
                x.clone()
            } else {
                x.narrow(1, done, n)?
            };
            for (i, (block, layer)) in blocks.iter().zip(cache.layers.iter_mut()).enumerate() {
                let lora = adapter.and_then(|a| a.block(first + i));
                h = block.forward(&h, pos + done, &self.rope, layer, max, lora)?;
            }
            outs.push(h);
            done += n;
        }
        cache.set_len(pos + t);
        Ok(if outs.len() == 1 {
            outs.remove(0)
        } else {
            Tensor::cat(&outs, 1)?
        })
    }
}

/// What a client holds: token embedding, final norm and LM head.
#[derive(Debug)]
pub struct Head {
    embedding: Arc<QTensor>,
    norm: RmsNorm,
    lm_head: Linear,
    config: Arc<ModelConfig>,
}

impl Head {
    /// Loads the head of a model.
    pub fn load(file: &ModelFile, mode: WeightMode) -> Result<Self> {
        let cfg = file.config();
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let raw = file.read("token_embd.weight")?;
        expect_dims("token_embd.weight", raw.dims(), &[v, h])?;
        let embedding = Arc::new(match raw {
            RawWeight::Quant(q) => prepare_qtensor(q, mode)?,
            RawWeight::Dense(t) => QTensor::quantize(&t, GgmlDType::F32)?,
        });
        let lm_head = if cfg.tie_word_embeddings {
            let bytes = match embedding.dtype() {
                GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => v * h * 4,
                _ => embedding.storage_size_in_bytes(),
            };
            Linear {
                weight: matmul_of(embedding.clone(), mode)?,
                bias: None,
                bytes,
            }
        } else {
            Linear::load(file, "output", v, h, false, mode)?
        };
        Ok(Self {
            embedding,
            norm: RmsNorm::load(file, "output_norm.weight", h, cfg.rms_norm_eps)?,
            lm_head,
            config: Arc::new(cfg.clone()),
        })
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Bytes of weights read per generated token (the LM head).
    pub fn weight_bytes(&self) -> usize {
        self.lm_head.bytes + self.config.hidden_size * 4
    }

    /// Embeds tokens: shape `(1, t, hidden)`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let vocab = self.config.vocab_size;
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= vocab) {
            return Err(EngineError::BadToken { id, vocab });
        }
        let ids = Tensor::new(tokens, &Device::Cpu)?;
        let e = self.embedding.embedding(&ids)?;
        Ok(e.reshape((1, tokens.len(), self.config.hidden_size))?)
    }

    /// Logits for every position of `h` (shape `(1, t, hidden)`): `(t, vocab)`.
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        let (_, t, hidden) = h.dims3()?;
        let x = self.norm.forward(&h.reshape((t, hidden))?)?;
        self.lm_head.forward(&x, None)
    }

    /// Logits of the last position of `h`.
    pub fn last_logits(&self, h: &Tensor) -> Result<Vec<f32>> {
        let t = h.dim(1)?;
        let last = h.narrow(1, t - 1, 1)?;
        Ok(self
            .logits(&last)?
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?)
    }
}

/// Encodes hidden states `(1, t, hidden)` as a tensor frame of shape
/// `[t, hidden]` in `dtype`.
pub fn hidden_to_frame(h: &Tensor, dtype: nomoat_protocol::DType) -> Result<TensorFrame> {
    let (_, t, hidden) = h.dims3()?;
    // One copy out of the tensor; an f32 frame then owns that buffer.
    let values = h.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(match dtype {
        nomoat_protocol::DType::F32 => TensorFrame::from_f32_vec(vec![t, hidden], values)?,
        other => TensorFrame::from_f32(vec![t, hidden], &values, other)?,
    })
}

/// Decodes a tensor frame into hidden states `(1, t, hidden)`, checking its
/// shape against the model's hidden size.
pub fn hidden_from_frame(frame: &TensorFrame, hidden_size: usize) -> Result<Tensor> {
    frame.expect(None, &[None, Some(hidden_size)])?;
    let t = frame.shape()[0];
    let values = frame.to_f32();
    Ok(Tensor::from_vec(values, (1, t, hidden_size), &Device::Cpu)?)
}
