use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use nomoat_protocol::TensorFrame;

use super::adapter::{BlockAdapter, LoraPair, SpanAdapter};
use super::attention::{attend, Heads, RopeTables};
use super::compact::CompactMatMul;
use super::config::ModelConfig;
use super::file::{ModelFile, RawWeight, WeightMode};
use super::kv::SpanCache;
use super::{EngineError, Result};

/// Most positions a span computes at once: a longer step (a prompt) runs
/// in pieces of this many, so its working memory does not grow with it.
pub const PREFILL_CHUNK: usize = 256;

/// Whether the engine has a fast CPU kernel for a ggml type (candle's, or
/// its own for Q4_1 and Q5_0).
pub(super) fn has_fast_kernel(dtype: GgmlDType) -> bool {
    matches!(
        dtype,
        GgmlDType::Q4_0
            | GgmlDType::Q4_1
            | GgmlDType::Q5_0
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
///
/// Every quantized format with a kernel is multiplied on its stored blocks
/// ([`CompactMatMul`]), in every mode: candle's own path would keep a
/// repacked copy beside some of them (memory doubled), and its repacked
/// kernels give a row different bits when it is computed with others,
/// which batching must never change.
fn matmul_of(q: Arc<QTensor>, _mode: WeightMode) -> Result<MatMul> {
    if let Some(m) = CompactMatMul::new(q.clone()) {
        return Ok(MatMul::Compact(m));
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
        Self::from_raw(file, prefix, raw, out_dim, bias, mode)
    }

    fn from_raw(
        file: &ModelFile,
        prefix: &str,
        raw: RawWeight,
        out_dim: usize,
        bias: bool,
        mode: WeightMode,
    ) -> Result<Self> {
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

/// Projections of one input, either as one product with their rows
/// stacked (when every part is stored in the same quantized format) or
/// one product each. One product quantizes the input once and wakes the
/// compute threads once.
#[derive(Debug)]
enum Projections {
    Fused {
        weight: MatMul,
        widths: Vec<usize>,
        bias: Option<Tensor>,
        bytes: usize,
    },
    Separate(Vec<Linear>),
}

impl Projections {
    /// `(prefix, out_dim)` per part, all of input width `in_dim`.
    fn load(
        file: &ModelFile,
        parts: &[(String, usize)],
        in_dim: usize,
        bias: bool,
        mode: WeightMode,
    ) -> Result<Self> {
        let mut raws = Vec::with_capacity(parts.len());
        for (prefix, out_dim) in parts {
            let wname = format!("{prefix}.weight");
            let raw = file.read(&wname)?;
            expect_dims(&wname, raw.dims(), &[*out_dim, in_dim])?;
            raws.push(raw);
        }
        let mut quants = Vec::with_capacity(raws.len());
        if mode != WeightMode::F32 {
            for raw in &raws {
                if let RawWeight::Quant(q) = raw {
                    quants.push(q.dtype());
                }
            }
        }
        let fusable = quants.len() == parts.len()
            && quants.iter().all(|d| *d == quants[0])
            && has_fast_kernel(quants[0]);
        if !fusable {
            let linears = parts
                .iter()
                .zip(raws)
                .map(|((prefix, out_dim), raw)| {
                    Linear::from_raw(file, prefix, raw, *out_dim, bias, mode)
                })
                .collect::<Result<Vec<_>>>()?;
            return Ok(Self::Separate(linears));
        }
        let mut data = Vec::new();
        for raw in &raws {
            if let RawWeight::Quant(q) = raw {
                data.extend_from_slice(&q.data()?);
            }
        }
        drop(raws);
        let rows: usize = parts.iter().map(|(_, n)| n).sum();
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            quants[0],
            &data,
            vec![rows, in_dim],
            &Device::Cpu,
        )?;
        drop(data);
        let mut bytes = q.storage_size_in_bytes();
        let weight = matmul_of(Arc::new(q), mode)?;
        let bias = if bias {
            let mut all = Vec::with_capacity(parts.len());
            for (prefix, out_dim) in parts {
                let bname = format!("{prefix}.bias");
                let b = file.read(&bname)?;
                expect_dims(&bname, b.dims(), &[*out_dim])?;
                all.push(b.dequantize()?);
            }
            bytes += rows * 4;
            Some(Tensor::cat(&all, 0)?)
        } else {
            None
        };
        Ok(Self::Fused {
            weight,
            widths: parts.iter().map(|(_, n)| *n).collect(),
            bias,
            bytes,
        })
    }

    /// One output per part, each with its adapter update (`loras[i]` for
    /// part `i`) added.
    fn forward(&self, x: &Tensor, loras: &[Option<&LoraPair>]) -> Result<Vec<Tensor>> {
        match self {
            Self::Separate(ls) => ls
                .iter()
                .enumerate()
                .map(|(i, l)| l.forward(x, loras.get(i).copied().flatten()))
                .collect(),
            Self::Fused {
                weight,
                widths,
                bias,
                ..
            } => {
                let y = weight.forward(x)?;
                let y = match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                };
                let last = y.rank() - 1;
                let mut out = Vec::with_capacity(widths.len());
                let mut at = 0;
                for (i, w) in widths.iter().enumerate() {
                    let part = y.narrow(last, at, *w)?;
                    at += w;
                    out.push(match loras.get(i).copied().flatten() {
                        Some(l) => l.add_to(x, part)?,
                        None => part,
                    });
                }
                Ok(out)
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Self::Fused { bytes, .. } => *bytes,
            Self::Separate(ls) => ls.iter().map(|l| l.bytes).sum(),
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
struct Rope(RopeTables);

impl Rope {
    fn new(cfg: &ModelConfig) -> Result<Self> {
        Ok(Self(RopeTables::new(
            &cfg.rope_inv_freq(),
            cfg.max_seq_len,
            cfg.rope_interleaved,
        )))
    }
}

/// One session's rows in a step of stacked rows, and its cache of the
/// block being run.
struct Segment<'a> {
    pos: usize,
    rows: usize,
    cache: &'a mut super::kv::LayerCache,
    max_len: usize,
}

#[derive(Debug)]
struct Attention {
    /// q, k and v.
    qkv: Projections,
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
            qkv: Projections::load(
                file,
                &[
                    (format!("{p}.attn_q"), nh * hd),
                    (format!("{p}.attn_k"), nkv * hd),
                    (format!("{p}.attn_v"), nkv * hd),
                ],
                h,
                bias,
                mode,
            )?,
            o: Linear::load(file, &format!("{p}.attn_output"), h, nh * hd, false, mode)?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        })
    }

    /// Attention over stacked rows: `segs` say whose rows follow whose,
    /// each segment attending over its own session's cache.
    fn forward(
        &self,
        x: &Tensor,
        segs: &mut [Segment<'_>],
        rope: &Rope,
        lora: Option<&BlockAdapter>,
    ) -> Result<Tensor> {
        let pair = |t: usize| lora.and_then(|l| l.pair(t));
        let (_, total, _) = x.dims3()?;
        let heads = Heads {
            q: self.num_heads,
            kv: self.num_kv_heads,
            dim: self.head_dim,
        };
        let rows = |y: &Tensor| -> Result<Vec<f32>> { Ok(y.flatten_all()?.to_vec1::<f32>()?) };
        let qkv = self.qkv.forward(x, &[pair(0), pair(1), pair(2)])?;
        let mut q = rows(&qkv[0])?;
        let mut k = rows(&qkv[1])?;
        let v = rows(&qkv[2])?;
        let (qw, kw) = (heads.q * heads.dim, heads.kv * heads.dim);
        let mut out = Vec::with_capacity(total * qw);
        let mut at = 0;
        for seg in segs.iter_mut() {
            let t = seg.rows;
            if at + t > total {
                return Err(EngineError::BadHidden(format!(
                    "segments of {} rows over a step of {total}",
                    at + t
                )));
            }
            let qs = &mut q[at * qw..(at + t) * qw];
            let ks = &mut k[at * kw..(at + t) * kw];
            let vs = &v[at * kw..(at + t) * kw];
            rope.0.apply(qs, heads.q, seg.pos);
            rope.0.apply(ks, heads.kv, seg.pos);
            seg.cache
                .append(seg.pos, ks, vs, (t, heads.kv, heads.dim), seg.max_len)?;
            out.extend_from_slice(&attend(qs, seg.cache, seg.pos, t, heads));
            at += t;
        }
        if at != total {
            return Err(EngineError::BadHidden(format!(
                "segments of {at} rows over a step of {total}"
            )));
        }
        let out = Tensor::from_vec(out, (1, total, qw), x.device())?;
        self.o.forward(&out, pair(3))
    }

    fn bytes(&self) -> usize {
        self.qkv.bytes() + self.o.bytes
    }
}

#[derive(Debug)]
struct Mlp {
    /// gate and up.
    gate_up: Projections,
    down: Linear,
}

impl Mlp {
    fn load(file: &ModelFile, p: &str, cfg: &ModelConfig, mode: WeightMode) -> Result<Self> {
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_up: Projections::load(
                file,
                &[(format!("{p}.ffn_gate"), f), (format!("{p}.ffn_up"), f)],
                h,
                false,
                mode,
            )?,
            down: Linear::load(file, &format!("{p}.ffn_down"), h, f, false, mode)?,
        })
    }

    fn forward(&self, x: &Tensor, lora: Option<&BlockAdapter>) -> Result<Tensor> {
        let pair = |t: usize| lora.and_then(|l| l.pair(t));
        let gu = self.gate_up.forward(x, &[pair(4), pair(5)])?;
        let g = candle_nn::ops::silu(&gu[0])?;
        self.down.forward(&(g * &gu[1])?, pair(6))
    }

    fn bytes(&self) -> usize {
        self.gate_up.bytes() + self.down.bytes
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
        segs: &mut [Segment<'_>],
        rope: &Rope,
        lora: Option<&BlockAdapter>,
    ) -> Result<Tensor> {
        let h = self
            .attn
            .forward(&self.attn_norm.forward(x)?, segs, rope, lora)?;
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
        let t = self.check_step(x, pos, cache, adapter)?;
        let (first, last) = cache.blocks();
        let blocks = &self.blocks[first - self.start..last - self.start];
        let max = cache.max_len();
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
                let mut seg = [Segment {
                    pos: pos + done,
                    rows: n,
                    cache: layer,
                    max_len: max,
                }];
                h = block.forward(&h, &mut seg, &self.rope, lora)?;
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

    /// Several sessions' steps as one pass: their rows are stacked, so
    /// every projection reads the weights once for all of them, and each
    /// attends over its own cache. Every output equals the session's step
    /// run alone by [`forward_with`](Self::forward_with), bit for bit: rows
    /// never mix in the projections, norms and MLP, and attention is per
    /// session. The sessions must run the same blocks with the same
    /// adapter, each step at most [`PREFILL_CHUNK`] positions.
    pub fn forward_batch(
        &self,
        steps: &mut [BatchStep<'_>],
        adapter: Option<&SpanAdapter>,
    ) -> Result<Vec<Tensor>> {
        let Some(first_step) = steps.first() else {
            return Ok(Vec::new());
        };
        let (first, last) = first_step.cache.blocks();
        let mut ts = Vec::with_capacity(steps.len());
        for s in steps.iter() {
            let t = self.check_step(s.x, s.pos, s.cache, adapter)?;
            if s.cache.blocks() != (first, last) {
                return Err(EngineError::BadSpan {
                    start: s.cache.blocks().0,
                    end: s.cache.blocks().1,
                    num_blocks: self.config.num_blocks,
                });
            }
            if t > PREFILL_CHUNK {
                return Err(EngineError::BadHidden(format!(
                    "a batched step of {t} positions; the most is {PREFILL_CHUNK}"
                )));
            }
            ts.push(t);
        }
        let xs: Vec<Tensor> = steps.iter().map(|s| s.x.clone()).collect();
        let mut h = if xs.len() == 1 {
            xs[0].clone()
        } else {
            Tensor::cat(&xs, 1)?
        };
        let blocks = &self.blocks[first - self.start..last - self.start];
        for (i, block) in blocks.iter().enumerate() {
            let lora = adapter.and_then(|a| a.block(first + i));
            let mut segs: Vec<Segment<'_>> = steps
                .iter_mut()
                .zip(&ts)
                .map(|(s, &rows)| {
                    let max_len = s.cache.max_len();
                    Segment {
                        pos: s.pos,
                        rows,
                        cache: &mut s.cache.layers[i],
                        max_len,
                    }
                })
                .collect();
            h = block.forward(&h, &mut segs, &self.rope, lora)?;
        }
        let mut outs = Vec::with_capacity(steps.len());
        let mut at = 0;
        for (s, &t) in steps.iter_mut().zip(&ts) {
            s.cache.set_len(s.pos + t);
            outs.push(if ts.len() == 1 {
                h.clone()
            } else {
                h.narrow(1, at, t)?
            });
            at += t;
        }
        Ok(outs)
    }

    /// Checks one step against the span and its cache; returns its
    /// positions.
    fn check_step(
        &self,
        x: &Tensor,
        pos: usize,
        cache: &SpanCache,
        adapter: Option<&SpanAdapter>,
    ) -> Result<usize> {
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
        Ok(t)
    }
}

/// One session's step in [`Span::forward_batch`].
#[derive(Debug)]
pub struct BatchStep<'a> {
    /// Hidden states `(1, t, hidden)`.
    pub x: &'a Tensor,
    /// The first position, the cache's length.
    pub pos: usize,
    /// The session's cache.
    pub cache: &'a mut SpanCache,
}

/// What a client holds: token embedding, final norm and LM head.
#[derive(Debug)]
pub struct Head {
    embedding: Arc<QTensor>,
    norm: RmsNorm,
    lm_head: Linear,
    config: Arc<ModelConfig>,
    /// The queue of [`Head::last_logits_shared`], started on first use.
    shared: std::sync::OnceLock<std::sync::mpsc::SyncSender<LogitsJob>>,
}

/// Most callers whose logits one product computes.
pub const MAX_SHARED_LOGITS: usize = 64;

/// One caller's last position, waiting for its logits.
#[derive(Debug)]
struct LogitsJob {
    /// `(1, 1, hidden)`.
    h: Tensor,
    reply: tokio::sync::oneshot::Sender<std::result::Result<Vec<f32>, String>>,
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
            shared: std::sync::OnceLock::new(),
        })
    }

    /// [`last_logits`](Self::last_logits), computed together with those of
    /// every other caller waiting at the same moment: one product by the
    /// LM head for all of them (the head's weights are read once, not once
    /// per session). The same bits as `last_logits`: rows never mix in
    /// the norm and the quantized product. A gateway's sessions step
    /// through here.
    pub async fn last_logits_shared(self: &Arc<Self>, h: &Tensor) -> Result<Vec<f32>> {
        let t = h.dim(1)?;
        let last = h.narrow(1, t - 1, 1)?.contiguous()?;
        let queue = self.shared.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel(4 * MAX_SHARED_LOGITS);
            let head = Arc::downgrade(self);
            let spawned = std::thread::Builder::new()
                .name("nomoat-logits".into())
                .spawn(move || shared_logits(head, rx));
            if let Err(e) = spawned {
                tracing::warn!("no thread for shared logits ({e}); computing them one by one");
            }
            tx
        });
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job = LogitsJob { h: last, reply };
        match queue.try_send(job) {
            Ok(()) => match rx.await {
                Ok(r) => r.map_err(EngineError::BadHidden),
                Err(_) => Err(EngineError::BadHidden("the logits thread stopped".into())),
            },
            // A full queue (or no thread): this caller computes its own.
            Err(
                std::sync::mpsc::TrySendError::Full(job)
                | std::sync::mpsc::TrySendError::Disconnected(job),
            ) => {
                let me = self.clone();
                tokio::task::spawn_blocking(move || me.last_logits(&job.h))
                    .await
                    .map_err(|e| EngineError::BadHidden(format!("logits task: {e}")))?
            }
        }
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

/// The thread of [`Head::last_logits_shared`]: takes every job waiting
/// (up to [`MAX_SHARED_LOGITS`]), stacks their rows, runs the head once and
/// answers each. It ends with the head (it holds no strong reference, and
/// the head holds the queue's only sender).
fn shared_logits(head: std::sync::Weak<Head>, rx: std::sync::mpsc::Receiver<LogitsJob>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_SHARED_LOGITS {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let Some(head) = head.upgrade() else { break };
        let rows: Vec<Tensor> = jobs.iter().map(|j| j.h.clone()).collect();
        let result = (|| -> Result<Vec<Vec<f32>>> {
            let h = if rows.len() == 1 {
                rows[0].clone()
            } else {
                Tensor::cat(&rows, 1)?
            };
            Ok(head.logits(&h)?.to_dtype(DType::F32)?.to_vec2::<f32>()?)
        })();
        match result {
            Ok(all) => {
                for (j, l) in jobs.into_iter().zip(all) {
                    let _ = j.reply.send(Ok(l));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for j in jobs {
                    let _ = j.reply.send(Err(msg.clone()));
                }
            }
        }
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
