use candle_core::{DType, Device, Tensor};

use super::{EngineError, Result};

/// First allocation of a block's cache, in positions; it doubles as it fills.
pub const INITIAL_CACHE_POSITIONS: usize = 256;

/// Keys and values of one block, preallocated and grown by doubling.
#[derive(Debug)]
pub(crate) struct LayerCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    capacity: usize,
}

impl LayerCache {
    fn new() -> Self {
        Self {
            k: None,
            v: None,
            capacity: 0,
        }
    }

    /// Writes `k`/`v` (shape `(1, kv_heads, t, head_dim)`) at position `len`
    /// and returns views of positions `0..len + t`.
    pub(crate) fn append(
        &mut self,
        len: usize,
        k: &Tensor,
        v: &Tensor,
        max_len: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (b, heads, t, dim) = k.dims4()?;
        let need = len + t;
        if need > self.capacity {
            let cap = need
                .max(self.capacity * 2)
                .max(INITIAL_CACHE_POSITIONS)
                .min(max_len.max(need));
            let fresh_k = Tensor::zeros((b, heads, cap, dim), DType::F32, &Device::Cpu)?;
            let fresh_v = Tensor::zeros((b, heads, cap, dim), DType::F32, &Device::Cpu)?;
            if let (Some(old_k), Some(old_v)) = (&self.k, &self.v) {
                if len > 0 {
                    fresh_k.slice_set(&old_k.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                    fresh_v.slice_set(&old_v.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                }
            }
            self.k = Some(fresh_k);
            self.v = Some(fresh_v);
            self.capacity = cap;
        }
        let (kb, vb) = match (&self.k, &self.v) {
            (Some(k), Some(v)) => (k, v),
            _ => unreachable!("allocated above"),
        };
        kb.slice_set(&k.contiguous()?, 2, len)?;
        vb.slice_set(&v.contiguous()?, 2, len)?;
        Ok((
            kb.narrow(2, 0, need)?.contiguous()?,
            vb.narrow(2, 0, need)?.contiguous()?,
        ))
    }

    fn bytes(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.elem_count() * 4) * 2
    }
}

/// One session's KV cache for one span of blocks.
///
/// A span's `forward` appends to it; [`SpanCache::rollback`] forgets every
/// position from `to` on, so a session can rewind and continue (failover
/// replay, speculative steps, regenerating a reply).
#[derive(Debug)]
pub struct SpanCache {
    pub(crate) layers: Vec<LayerCache>,
    first_block: usize,
    len: usize,
    max_len: usize,
}

impl SpanCache {
    /// A cache for blocks `first_block .. first_block + num_layers`.
    pub(crate) fn new(first_block: usize, num_layers: usize, max_len: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| LayerCache::new()).collect(),
            first_block,
            len: 0,
            max_len,
        }
    }

    /// The blocks this cache belongs to, `(start, end)`.
    pub fn blocks(&self) -> (usize, usize) {
        (self.first_block, self.first_block + self.layers.len())
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the cache holds no position.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The longest sequence this cache accepts.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Bytes allocated for keys and values.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerCache::bytes).sum()
    }

    pub(crate) fn set_len(&mut self, len: usize) {
        self.len = len;
    }

    /// Forgets positions `to..`; the next step starts at position `to`.
    pub fn rollback(&mut self, to: usize) -> Result<()> {
        if to > self.len {
            return Err(EngineError::BadRollback { to, len: self.len });
        }
        self.len = to;
        Ok(())
    }
}
