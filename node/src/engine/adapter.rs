//! LoRA adapters: low-rank updates of a base model's projections, applied
//! per session and never merged into the shared weights, so sessions with
//! different adapters, or none, run on one span at once.
//!
//! For a target projection `y = x·Wᵀ` an adapter holds `A` (`rank × in`)
//! and `B` (`out × rank`) and the session computes
//! `y = x·Wᵀ + scale·(x·Aᵀ)·Bᵀ`. [`AdapterWeights`] is an adapter as nomoat
//! keeps it: every pair in the base's own layout (the rows of `B` for Q and
//! K are permuted like the base's when a llama GGUF base rotates
//! interleaved pairs), named `blk.{i}.{target}.lora_a` / `.lora_b`.
//! [`SpanAdapter`] is the part of one adapter a span needs, ready to run.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use super::config::ModelConfig;
use super::{EngineError, Result};

/// The projections an adapter may target: GGUF name and Hugging Face
/// (PEFT) module name.
pub const LORA_TARGETS: [(&str, &str); 7] = [
    ("attn_q", "q_proj"),
    ("attn_k", "k_proj"),
    ("attn_v", "v_proj"),
    ("attn_output", "o_proj"),
    ("ffn_gate", "gate_proj"),
    ("ffn_up", "up_proj"),
    ("ffn_down", "down_proj"),
];

/// Largest rank nomoat accepts.
pub const MAX_LORA_RANK: usize = 1024;

/// The index of a GGUF target name in [`LORA_TARGETS`].
pub fn target_index(gguf_name: &str) -> Option<usize> {
    LORA_TARGETS.iter().position(|(g, _)| *g == gguf_name)
}

/// The `(out, in)` shape of a target projection of a model.
pub fn target_shape(cfg: &ModelConfig, target: usize) -> (usize, usize) {
    let (h, f, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (q, kv) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    match target {
        0 => (q, h),
        1 | 2 => (kv, h),
        3 => (h, q),
        4 | 5 => (f, h),
        _ => (h, f),
    }
}

/// What an adapter is for and how it scales; kept as JSON in its manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterMeta {
    /// The id of the base model, as the swarm knows it.
    pub base: String,
    /// The base's architecture.
    pub architecture: String,
    /// The base's blocks.
    pub num_blocks: u32,
    /// The base's residual width.
    pub hidden_size: u32,
    /// Rank of the update.
    pub rank: u32,
    /// Factor of the update: `alpha / rank` (PEFT's rsLoRA: `alpha / √rank`).
    pub scale: f32,
    /// Targeted projections, GGUF names.
    pub targets: Vec<String>,
    /// Where it came from: `peft` or `gguf`.
    pub source: String,
}

impl AdapterMeta {
    /// Checks that the adapter fits a base of `cfg` served as `model_id`.
    pub fn check_base(&self, model_id: &str, cfg: &ModelConfig) -> Result<()> {
        let wrong = |what: String| {
            Err(EngineError::Adapter(format!(
                "this adapter is for {what}; it cannot run on this model"
            )))
        };
        if self.base != model_id {
            return wrong(format!("model {} and this is model {model_id}", self.base));
        }
        if self.architecture != cfg.arch.name()
            || self.num_blocks as usize != cfg.num_blocks
            || self.hidden_size as usize != cfg.hidden_size
        {
            return wrong(format!(
                "a {} model of {} blocks and hidden size {}, and this is a {} model of {} blocks and hidden size {}",
                self.architecture,
                self.num_blocks,
                self.hidden_size,
                cfg.arch.name(),
                cfg.num_blocks,
                cfg.hidden_size
            ));
        }
        Ok(())
    }
}

/// A whole adapter: its description and every `A` and `B`, f32, in the
/// base's layout.
#[derive(Debug, Clone)]
pub struct AdapterWeights {
    /// What it is for.
    pub meta: AdapterMeta,
    /// `blk.{i}.{target}.lora_a` (`rank × in`) and `.lora_b` (`out × rank`).
    pub tensors: BTreeMap<String, Tensor>,
}

/// The name of an adapter tensor.
pub fn lora_name(block: usize, target: &str, b: bool) -> String {
    format!("blk.{block}.{target}.lora_{}", if b { "b" } else { "a" })
}

impl AdapterWeights {
    /// Checks every pair's shape against `cfg` and the rank, and that every
    /// value is finite.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        let r = self.meta.rank as usize;
        if r == 0 || r > MAX_LORA_RANK {
            return Err(EngineError::Adapter(format!(
                "rank {r} is out of range: 1 to {MAX_LORA_RANK}"
            )));
        }
        if !self.meta.scale.is_finite() {
            return Err(EngineError::Adapter("the scale is not finite".into()));
        }
        let mut pairs = 0;
        for (name, t) in &self.tensors {
            let (block, target, b) = parse_lora_name(name).ok_or_else(|| {
                EngineError::Adapter(format!("`{name}` is not an adapter tensor name"))
            })?;
            if block >= cfg.num_blocks {
                return Err(EngineError::Adapter(format!(
                    "`{name}` is for block {block}, the model has blocks 0..{}",
                    cfg.num_blocks
                )));
            }
            let (out, inp) = target_shape(cfg, target);
            let expected = if b { [out, r] } else { [r, inp] };
            if t.dims() != expected {
                return Err(EngineError::TensorShape {
                    tensor: name.clone(),
                    expected: expected.to_vec(),
                    got: t.dims().to_vec(),
                });
            }
            let other = lora_name(block, LORA_TARGETS[target].0, !b);
            if !self.tensors.contains_key(&other) {
                return Err(EngineError::Adapter(format!(
                    "`{name}` has no partner `{other}`"
                )));
            }
            let finite = t
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .all(|v| v.is_finite());
            if !finite {
                return Err(EngineError::Adapter(format!(
                    "`{name}` holds a value that is not finite"
                )));
            }
            pairs += 1;
        }
        if pairs == 0 {
            return Err(EngineError::Adapter("the adapter has no tensors".into()));
        }
        Ok(())
    }

    /// The parts of blocks `[start, end)`, ready to run.
    pub fn span(&self, start: usize, end: usize) -> Result<SpanAdapter> {
        let scale = f64::from(self.meta.scale);
        let mut blocks = Vec::with_capacity(end.saturating_sub(start));
        for block in start..end {
            let mut pairs: [Option<LoraPair>; 7] = Default::default();
            for (t, (target, _)) in LORA_TARGETS.iter().enumerate() {
                let a = self.tensors.get(&lora_name(block, target, false));
                let b = self.tensors.get(&lora_name(block, target, true));
                if let (Some(a), Some(b)) = (a, b) {
                    pairs[t] = Some(LoraPair {
                        a_t: a.t()?.contiguous()?,
                        b_t: (b.t()? * scale)?.contiguous()?,
                    });
                }
            }
            blocks.push(BlockAdapter { pairs });
        }
        Ok(SpanAdapter { start, blocks })
    }

    /// The base's weight `w` (`out × in`, f32) of `target` in `block` with
    /// this adapter merged in: `w + scale·B·A`. For reference checks.
    pub fn merged(&self, block: usize, target: &str, w: &Tensor) -> Result<Tensor> {
        let a = self.tensors.get(&lora_name(block, target, false));
        let b = self.tensors.get(&lora_name(block, target, true));
        match (a, b) {
            (Some(a), Some(b)) => Ok((w + (b.matmul(a)? * f64::from(self.meta.scale))?)?),
            _ => Ok(w.clone()),
        }
    }

    /// Bytes of the adapter's tensors (f32).
    pub fn bytes(&self) -> usize {
        self.tensors.values().map(|t| t.elem_count() * 4).sum()
    }
}

/// `(block, target index, is B)` of an adapter tensor name.
pub fn parse_lora_name(name: &str) -> Option<(usize, usize, bool)> {
    let rest = name.strip_prefix("blk.")?;
    let (block, rest) = rest.split_once('.')?;
    let (target, ab) = rest.rsplit_once(".lora_")?;
    let b = match ab {
        "a" => false,
        "b" => true,
        _ => return None,
    };
    Some((block.parse().ok()?, target_index(target)?, b))
}

/// One projection's update, stored to run: `Aᵀ` and `scale·Bᵀ`.
#[derive(Debug)]
pub(crate) struct LoraPair {
    a_t: Tensor,
    b_t: Tensor,
}

impl LoraPair {
    /// `y + scale·(x·Aᵀ)·Bᵀ` for `x` of shape `(b, t, in)`.
    pub(crate) fn add_to(&self, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let (inp, out) = (x.dim(D::Minus1)?, y.dim(D::Minus1)?);
        let rows = x.elem_count() / inp.max(1);
        if rows <= DIRECT_ROWS {
            let up = self.direct(x, rows, inp, out)?;
            let up = Tensor::from_vec(up, y.shape(), x.device())?;
            return Ok((y + up)?);
        }
        let low = x.reshape((rows, inp))?.matmul(&self.a_t)?;
        let up = low.matmul(&self.b_t)?.reshape(y.shape())?;
        Ok((y + up)?)
    }

    /// `scale·(x·Aᵀ)·Bᵀ` for a few rows in plain loops: candle's matmul
    /// costs tens of microseconds a call at these sizes, more than the
    /// arithmetic, and a rank-16 adapter on every projection makes 14
    /// calls a block.
    fn direct(&self, x: &Tensor, rows: usize, inp: usize, out: usize) -> Result<Vec<f32>> {
        let x = x.flatten_all()?.to_vec1::<f32>()?;
        let rank = self.a_t.dim(1)?;
        let (a_store, a_layout) = self.a_t.storage_and_layout();
        let (b_store, b_layout) = self.b_t.storage_and_layout();
        let (
            candle_core::Storage::Cpu(a_cpu),
            candle_core::Storage::Cpu(b_cpu),
            Some((a0, a1)),
            Some((b0, b1)),
        ) = (
            &*a_store,
            &*b_store,
            a_layout.contiguous_offsets(),
            b_layout.contiguous_offsets(),
        )
        else {
            return Err(EngineError::Adapter(
                "adapter tensors are not contiguous on the CPU".into(),
            ));
        };
        let a = &a_cpu.as_slice::<f32>()?[a0..a1]; // in × rank
        let b = &b_cpu.as_slice::<f32>()?[b0..b1]; // rank × out
        let mut up = vec![0f32; rows * out];
        let mut low = vec![0f32; rank];
        for (xr, ur) in x.chunks_exact(inp).zip(up.chunks_exact_mut(out)) {
            low.fill(0.0);
            for (xi, ar) in xr.iter().zip(a.chunks_exact(rank)) {
                for (l, av) in low.iter_mut().zip(ar) {
                    *l += xi * av;
                }
            }
            for (lj, br) in low.iter().zip(b.chunks_exact(out)) {
                for (u, bv) in ur.iter_mut().zip(br) {
                    *u += lj * bv;
                }
            }
        }
        Ok(up)
    }
}

/// Rows (positions) up to which [`LoraPair`] computes in plain loops.
const DIRECT_ROWS: usize = 4;

/// One block's updates, by [`LORA_TARGETS`] index.
#[derive(Debug, Default)]
pub(crate) struct BlockAdapter {
    pub(crate) pairs: [Option<LoraPair>; 7],
}

impl BlockAdapter {
    pub(crate) fn pair(&self, target: usize) -> Option<&LoraPair> {
        self.pairs.get(target).and_then(Option::as_ref)
    }
}

/// An adapter's updates for blocks `[start, start + len)`, shared by every
/// session that uses it.
#[derive(Debug)]
pub struct SpanAdapter {
    start: usize,
    blocks: Vec<BlockAdapter>,
}

impl SpanAdapter {
    /// First block covered.
    pub fn start(&self) -> usize {
        self.start
    }

    /// One past the last block covered.
    pub fn end(&self) -> usize {
        self.start + self.blocks.len()
    }

    pub(crate) fn block(&self, i: usize) -> Option<&BlockAdapter> {
        i.checked_sub(self.start).and_then(|k| self.blocks.get(k))
    }
}

/// Reorders the rows of `B` for Q or K from Hugging Face's half-split RoPE
/// layout to the interleaved layout of llama GGUF files, as llama.cpp's
/// converter does to the base weights.
pub fn permute_rows_for_interleaved_rope(b: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, r) = b.dims2()?;
    if heads == 0 || out % (heads * 2) != 0 {
        return Err(EngineError::Adapter(format!(
            "cannot split {out} rows into {heads} rotary heads"
        )));
    }
    Ok(b.reshape((heads, 2, out / heads / 2, r))?
        .transpose(1, 2)?
        .reshape((out, r))?
        .contiguous()?)
}

/// An f32 tensor from little-endian bytes of `dtype` (`F32`, `F16`, `BF16`).
pub fn f32_tensor(name: &str, dtype: &str, shape: &[usize], bytes: &[u8]) -> Result<Tensor> {
    let dt = match dtype {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        other => {
            return Err(EngineError::UnsupportedDType {
                tensor: name.to_string(),
                dtype: other.to_string(),
            })
        }
    };
    let want = shape.iter().product::<usize>() * dt.size_in_bytes();
    if bytes.len() != want {
        return Err(EngineError::Adapter(format!(
            "`{name}` has {} bytes, its shape {shape:?} of {dtype} needs {want}",
            bytes.len()
        )));
    }
    Ok(Tensor::from_raw_buffer(bytes, dt, shape, &Device::Cpu)?.to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_both_ways() {
        assert_eq!(parse_lora_name("blk.3.attn_v.lora_b"), Some((3, 2, true)));
        assert_eq!(
            parse_lora_name(&lora_name(11, "ffn_down", false)),
            Some((11, 6, false))
        );
        assert_eq!(parse_lora_name("blk.3.attn_x.lora_a"), None);
        assert_eq!(parse_lora_name("blk.3.attn_q.weight"), None);
    }

    #[test]
    fn the_update_is_the_merged_weight() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (6, 4), &dev)?;
        let a = Tensor::randn(0f32, 1.0, (2, 4), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (6, 2), &dev)?;
        let pair = LoraPair {
            a_t: a.t()?.contiguous()?,
            b_t: (b.t()? * 0.5)?.contiguous()?,
        };
        let merged = (&w + (b.matmul(&a)? * 0.5)?)?;
        // Both paths: a few rows in plain loops, more through candle.
        for rows in [1, DIRECT_ROWS, DIRECT_ROWS + 3] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, 4), &dev)?;
            let y = pair.add_to(&x, x.broadcast_matmul(&w.t()?)?)?;
            let want = x.broadcast_matmul(&merged.t()?)?;
            let diff = (y - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{rows} rows: {diff}");
        }
        Ok(())
    }
}
