//! Rotary embedding and attention over a block's [`LayerCache`], on plain
//! slices.
//!
//! A decode step through candle's tensor ops cost a dozen small ops per
//! block (reshapes, copies, two matmuls, a mask, a softmax), each with its
//! own allocation and dispatch, and copied the whole cache once. Here a
//! step is one pass per (position, query head) over its kv head's keys and
//! values, split over the compute threads. Every position is computed the
//! same way whatever the step's length, so a prompt cut into pieces of any
//! size (as a batching server cuts them) gives the same bits as the prompt
//! in one step.

use super::kv::LayerCache;

/// Rotary tables: `cos` and `sin` of `(position, frequency)`.
#[derive(Debug)]
pub(super) struct RopeTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    interleaved: bool,
}

impl RopeTables {
    pub(super) fn new(inv_freq: &[f32], positions: usize, interleaved: bool) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for f in inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Self {
            cos,
            sin,
            half,
            interleaved,
        }
    }

    /// Rotates `x`, token-major `(t, heads, 2 * half)`, for positions
    /// `pos..pos + t`: pairs `(2i, 2i + 1)` when interleaved, `(i, i +
    /// half)` otherwise (candle's `rope_i` and `rope`).
    pub(super) fn apply(&self, x: &mut [f32], heads: usize, pos: usize) {
        let (half, dim) = (self.half, 2 * self.half);
        for (i, token) in x.chunks_exact_mut(heads * dim).enumerate() {
            let at = (pos + i) * half;
            let (cos, sin) = (&self.cos[at..at + half], &self.sin[at..at + half]);
            for head in token.chunks_exact_mut(dim) {
                for f in 0..half {
                    let (a, b) = if self.interleaved {
                        (2 * f, 2 * f + 1)
                    } else {
                        (f, f + half)
                    };
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * cos[f] - x1 * sin[f];
                    head[b] = x0 * sin[f] + x1 * cos[f];
                }
            }
        }
    }
}

/// A dot product in eight independent sums (which the compiler keeps in
/// vector registers).
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `o += w * v`.
fn axpy_portable(o: &mut [f32], w: f32, v: &[f32]) {
    for (a, b) in o.iter_mut().zip(v) {
        *a += w * b;
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use std::arch::x86_64::*;

    pub(super) fn available() -> bool {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; `a` and `b` have the same length.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            s0 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                s0,
            );
            s1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                _mm256_loadu_ps(b.as_ptr().add(i + 8)),
                s1,
            );
            i += 16;
        }
        let s = _mm256_add_ps(s0, s1);
        let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let mut sum = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
        while i < n {
            sum += a[i] * b[i];
            i += 1;
        }
        sum
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; `o` and `v` have the same length.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy(o: &mut [f32], w: f32, v: &[f32]) {
        let n = o.len().min(v.len());
        let wv = _mm256_set1_ps(w);
        let mut i = 0;
        while i + 8 <= n {
            let p = o.as_mut_ptr().add(i);
            _mm256_storeu_ps(
                p,
                _mm256_fmadd_ps(wv, _mm256_loadu_ps(v.as_ptr().add(i)), _mm256_loadu_ps(p)),
            );
            i += 8;
        }
        while i < n {
            o[i] += w * v[i];
            i += 1;
        }
    }
}

/// The vector kernels this CPU runs, chosen once per call of [`attend`].
#[derive(Clone, Copy)]
struct Kernels {
    dot: fn(&[f32], &[f32]) -> f32,
    axpy: fn(&mut [f32], f32, &[f32]),
}

impl Kernels {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            #[allow(unsafe_code)]
            fn dot(a: &[f32], b: &[f32]) -> f32 {
                assert_eq!(a.len(), b.len());
                // SAFETY: chosen only where AVX2 and FMA are (`detect`);
                // the lengths are equal (asserted).
                unsafe { avx2::dot(a, b) }
            }
            #[allow(unsafe_code)]
            fn axpy(o: &mut [f32], w: f32, v: &[f32]) {
                assert_eq!(o.len(), v.len());
                // SAFETY: as for `dot`.
                unsafe { avx2::axpy(o, w, v) }
            }
            return Self { dot, axpy };
        }
        Self {
            dot: dot_portable,
            axpy: axpy_portable,
        }
    }
}

/// Shape of one attention step.
#[derive(Debug, Clone, Copy)]
pub(super) struct Heads {
    pub(super) q: usize,
    pub(super) kv: usize,
    pub(super) dim: usize,
}

/// Causal attention of `t` query positions `pos..pos + t` (`q` token-major
/// `(t, heads.q, dim)`, rotated) over the cache's positions `0..pos + t`;
/// returns `(t, heads.q * dim)`. Query heads `h * group .. (h + 1) *
/// group` share kv head `h`.
pub(super) fn attend(
    q: &[f32],
    cache: &LayerCache,
    pos: usize,
    t: usize,
    heads: Heads,
) -> Vec<f32> {
    let Heads {
        q: nh,
        kv: nkv,
        dim,
    } = heads;
    let group = nh / nkv.max(1);
    let scale = 1.0 / (dim as f32).sqrt();
    let mut out = vec![0f32; t * nh * dim];
    let items = t * nh;
    let shared = super::par::SharedOut::new(&mut out);
    let shared = &shared;
    let Kernels { dot, axpy } = Kernels::detect();
    let work = |range: std::ops::Range<usize>| {
        let mut scores = Vec::new();
        let mut o = vec![0f32; dim];
        for item in range {
            let (i, h) = (item / nh, item % nh);
            let len = pos + i + 1;
            let (keys, values) = cache.head(h / group, len);
            let qv = &q[item * dim..(item + 1) * dim];
            scores.clear();
            scores.extend(keys.chunks_exact(dim).map(|k| dot(qv, k) * scale));
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in &mut scores {
                *s = (*s - max).exp();
                sum += *s;
            }
            o.fill(0.0);
            for (p, vrow) in scores.iter().zip(values.chunks_exact(dim)) {
                axpy(&mut o, p / sum, vrow);
            }
            // Each item is one row of the output, computed once.
            shared.put(item * dim, &o);
        }
    };
    if items * (pos + t) < 4096 {
        // Too little to be worth waking the other threads.
        work(0..items);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(items, work);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((((i + seed) * 7919) % 1000) as f32 / 500.0) - 1.0)
            .collect()
    }

    /// The slice attention equals softmax(q kᵀ / √d + causal mask) v
    /// computed with candle's tensor ops, with grouped kv heads, for one
    /// and for several positions after a cache of earlier ones.
    #[test]
    fn slice_attention_equals_the_tensor_formula() -> candle_core::Result<()> {
        let (nh, nkv, dim) = (6, 2, 16);
        let heads = Heads {
            q: nh,
            kv: nkv,
            dim,
        };
        for (pos, t) in [(0, 1), (5, 1), (9, 3), (300, 2), (0, 40), (17, 70)] {
            let mut cache = LayerCache::default();
            let total = pos + t;
            let k = values(total * nkv * dim, 1);
            let v = values(total * nkv * dim, 2);
            cache
                .append(0, &k, &v, (total, nkv, dim), 4096)
                .expect("fits");
            let q = values(t * nh * dim, 3);
            let got = attend(&q, &cache, pos, t, heads);

            let dev = Device::Cpu;
            let kt = Tensor::from_vec(k, (total, nkv, dim), &dev)?.transpose(0, 1)?;
            let vt = Tensor::from_vec(v, (total, nkv, dim), &dev)?.transpose(0, 1)?;
            let qt = Tensor::from_vec(q, (t, nh, dim), &dev)?.transpose(0, 1)?;
            let mut want = vec![0f32; t * nh * dim];
            for h in 0..nh {
                let kh = kt.get(h / (nh / nkv))?.contiguous()?;
                let vh = vt.get(h / (nh / nkv))?.contiguous()?;
                let qh = qt.get(h)?.contiguous()?;
                let s = (qh.matmul(&kh.t()?)? / (dim as f64).sqrt())?;
                let mask: Vec<f32> = (0..t)
                    .flat_map(|i| {
                        (0..total).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 })
                    })
                    .collect();
                let s = s.broadcast_add(&Tensor::from_vec(mask, (t, total), &dev)?)?;
                let o = candle_nn::ops::softmax_last_dim(&s)?.matmul(&vh)?;
                for (i, row) in o.to_vec2::<f32>()?.into_iter().enumerate() {
                    want[(i * nh + h) * dim..][..dim].copy_from_slice(&row);
                }
            }
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "pos {pos} t {t}: {a} vs {b}");
            }
        }
        Ok(())
    }

    /// Both rotary layouts equal candle's `rope_i` / `rope` kernels.
    #[test]
    fn rotary_rows_equal_candles_kernels() -> candle_core::Result<()> {
        let (heads, dim, t, pos) = (3, 8, 4, 7);
        let inv: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / dim as f32))
            .collect();
        let dev = Device::Cpu;
        for interleaved in [true, false] {
            let tables = RopeTables::new(&inv, 64, interleaved);
            let x = values(t * heads * dim, 4);
            let mut got = x.clone();
            tables.apply(&mut got, heads, pos);
            let xt = Tensor::from_vec(x, (1, t, heads, dim), &dev)?
                .transpose(1, 2)?
                .contiguous()?;
            let half = dim / 2;
            let cos = Tensor::from_vec(
                tables.cos[pos * half..(pos + t) * half].to_vec(),
                (t, half),
                &dev,
            )?;
            let sin = Tensor::from_vec(
                tables.sin[pos * half..(pos + t) * half].to_vec(),
                (t, half),
                &dev,
            )?;
            let want = if interleaved {
                candle_nn::rotary_emb::rope_i(&xt, &cos, &sin)?
            } else {
                candle_nn::rotary_emb::rope(&xt, &cos, &sin)?
            };
            let want = want.transpose(1, 2)?.flatten_all()?.to_vec1::<f32>()?;
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (a - b).abs() < 1e-6,
                    "interleaved {interleaved}: {a} vs {b}"
                );
            }
        }
        Ok(())
    }
}
