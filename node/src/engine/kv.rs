use super::{EngineError, Result};

/// First allocation of a block's cache, in positions; it doubles as it fills.
pub const INITIAL_CACHE_POSITIONS: usize = 256;

/// Keys and values of one block, `[kv head][position][dim]` each, allocated
/// for `capacity` positions and grown by doubling.
///
/// Plain vectors rather than tensors: a decode step writes one position
/// in place and attends over the slice of each head, where a tensor cache
/// copied every position held at every step.
#[derive(Debug, Default)]
pub(crate) struct LayerCache {
    k: Vec<f32>,
    v: Vec<f32>,
    heads: usize,
    dim: usize,
    capacity: usize,
}

impl LayerCache {
    /// Writes `t` positions of keys and values, token-major `(t, heads,
    /// dim)`, at position `len`.
    pub(crate) fn append(
        &mut self,
        len: usize,
        k: &[f32],
        v: &[f32],
        (t, heads, dim): (usize, usize, usize),
        max_len: usize,
    ) -> Result<()> {
        let row = heads * dim;
        if k.len() != t * row || v.len() != t * row {
            return Err(EngineError::BadHidden(format!(
                "{} keys and {} values for {t} positions of {heads} x {dim}",
                k.len(),
                v.len()
            )));
        }
        if self.capacity > 0 && (heads, dim) != (self.heads, self.dim) {
            return Err(EngineError::BadHidden(format!(
                "a cache of {} x {} heads given {heads} x {dim}",
                self.heads, self.dim
            )));
        }
        let need = len + t;
        if need > self.capacity {
            let cap = need
                .max(self.capacity * 2)
                .max(INITIAL_CACHE_POSITIONS)
                .min(max_len.max(need));
            let grow = |old: &[f32]| {
                let mut fresh = vec![0f32; heads * cap * dim];
                for h in 0..heads.min(self.heads) {
                    let from = h * self.capacity * dim;
                    fresh[h * cap * dim..][..len * dim].copy_from_slice(&old[from..][..len * dim]);
                }
                fresh
            };
            self.k = grow(&self.k);
            self.v = grow(&self.v);
            (self.heads, self.dim, self.capacity) = (heads, dim, cap);
        }
        for i in 0..t {
            for h in 0..heads {
                let at = (h * self.capacity + len + i) * dim;
                let from = (i * heads + h) * dim;
                self.k[at..at + dim].copy_from_slice(&k[from..from + dim]);
                self.v[at..at + dim].copy_from_slice(&v[from..from + dim]);
            }
        }
        Ok(())
    }

    /// Keys and values of kv head `h`, positions `0..len`, `(len, dim)`.
    pub(crate) fn head(&self, h: usize, len: usize) -> (&[f32], &[f32]) {
        let at = h * self.capacity * self.dim;
        let n = len * self.dim;
        (&self.k[at..at + n], &self.v[at..at + n])
    }

    fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * 4
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
            layers: (0..num_layers).map(|_| LayerCache::default()).collect(),
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
