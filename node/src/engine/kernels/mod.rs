//! The engine's own quantized products, for formats that candle stores but
//! multiplies with scalar loops (Q4_1, Q5_0).
//!
//! Each format is a candle [`GgmlType`], so candle's tiled, pooled matmul
//! ([`k_quants::matmul`]) runs it for one input row, and [`matmul`] runs
//! it for several (prompts, batches of sessions): four weight rows by two
//! inputs at a time, each weight block unpacked once for both. The SIMD
//! kernels use AVX2, FMA and F16C when the CPU has them (checked at run
//! time, so one x86-64 binary runs on any x86-64 machine); a portable loop
//! runs elsewhere. A row's output has the same bits however many rows it
//! is computed with: batching never changes a session's numbers.

use candle_core::quantized::k_quants::{self, GgmlType};

mod q4_1;
mod q5_0;

pub(super) use q4_1::Q4_1;
pub(super) use q5_0::Q5_0;
#[cfg(target_arch = "x86_64")]
pub(super) use q5_0::Q8_0;

/// Values per block of the formats here.
const QK: usize = 32;

/// Refuses a product of `n` values over fewer than `n / 32` blocks.
fn check_len(format: &str, n: usize, blocks: usize) {
    // Real asserts: the SIMD loops read through raw pointers.
    assert!(
        n.is_multiple_of(QK) && n / QK <= blocks,
        "a {format} product of {n} values over {blocks} blocks"
    );
}

/// ggml's 8-bit quantization of one block of 32 inputs (`quantize_row_q8_0`
/// and `_q8_1`): scale `max |x| / 127`, round to nearest, ties away from
/// zero. Returns the scale (as f32, before its f16 rounding) and the sum
/// of the bytes.
fn quantize_q8(x: &[f32], qs: &mut [i8; QK]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, v) in qs.iter_mut().zip(x) {
        // |v * id| <= 127, so the cast cannot saturate.
        *q = (v * id).round() as i8;
        sum += i32::from(*q);
    }
    (d, sum)
}

/// The values of one block of 8-bit codes with scale `d`.
fn dequantize_q8(qs: &[i8; QK], d: half::f16, out: &mut [f32]) {
    let d = d.to_f32();
    for (q, v) in qs.iter().zip(out.iter_mut()) {
        *v = f32::from(*q) * d;
    }
}

/// A weight format with SIMD kernels for four weight rows at once.
#[allow(unsafe_code)]
pub(super) trait FourRows: GgmlType {
    /// The format's name, for errors.
    const NAME: &'static str;

    /// Four weight rows against one input.
    ///
    /// # Safety
    /// [`simd::available`]; every pointer has `nb` blocks after it.
    #[cfg(target_arch = "x86_64")]
    unsafe fn dot_4(nb: usize, x: [*const Self; 4], y: *const Self::VecDotType) -> [f32; 4];

    /// Four weight rows against two inputs; each result has the bits
    /// [`dot_4`](Self::dot_4) gives it.
    ///
    /// # Safety
    /// As [`dot_4`](Self::dot_4).
    #[cfg(target_arch = "x86_64")]
    unsafe fn dot_4x2(
        nb: usize,
        x: [*const Self; 4],
        y: [*const Self::VecDotType; 2],
    ) -> [[f32; 4]; 2];
}

/// [`GgmlType::vec_dot_4`] of a format here: its SIMD kernel where the CPU
/// has one, the portable loop row by row elsewhere.
fn vec_dot_4<T: FourRows>(n: usize, xs: [&[T]; 4], ys: &[T::VecDotType]) -> [f32; 4] {
    let shortest = xs.iter().map(|x| x.len()).min().unwrap_or(0);
    check_len(T::NAME, n, shortest.min(ys.len()));
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        #[allow(unsafe_code)]
        // SAFETY: the CPU has the features (checked above); every row and
        // the input hold at least n / 32 blocks (checked by `check_len`).
        return unsafe { T::dot_4(n / QK, xs.map(|x| x.as_ptr()), ys.as_ptr()) };
    }
    xs.map(|x| T::vec_dot_unopt(n, x, ys))
}

/// `dst = x · wᵀ` for `m` input rows of `k` values and `n` weight rows
/// (`w` holds `n * k / 32` blocks). One input row goes through candle's
/// tiled matmul; several go four weight rows by two inputs at a time,
/// split over the compute threads by weight rows. Either way every output
/// has the same bits.
pub(super) fn matmul<T: FourRows>(
    (m, k, n): (usize, usize, usize),
    x: &[f32],
    w: &[T],
    dst: &mut [f32],
) -> candle_core::Result<()> {
    let nb = k / QK;
    if !k.is_multiple_of(QK) || w.len() < n * nb || x.len() < m * k || dst.len() < m * n {
        candle_core::bail!(
            "a {} product of ({m}, {k}) by ({n}, {k}) over {} blocks, {} inputs, {} outputs",
            T::NAME,
            w.len(),
            x.len(),
            dst.len()
        );
    }
    #[cfg(target_arch = "x86_64")]
    if m > 1 && simd::available() {
        let mut xq = vec![T::VecDotType::zeros(); m * nb];
        for (row, q) in x.chunks_exact(k).zip(xq.chunks_exact_mut(nb)).take(m) {
            T::VecDotType::from_float(row, q);
        }
        let out = super::par::SharedOut::new(dst);
        let out = &out;
        let xq = &xq;
        let quads = n / 4;
        candle_core::utils::barrier_pool().execute_chunked(quads, |range| {
            for quad in range {
                let col = 4 * quad;
                let rows = [0, 1, 2, 3].map(|j| w[(col + j) * nb..].as_ptr());
                let mut r = 0;
                while r + 2 <= m {
                    let ys = [xq[r * nb..].as_ptr(), xq[(r + 1) * nb..].as_ptr()];
                    #[allow(unsafe_code)]
                    // SAFETY: the CPU has the features (checked above);
                    // every row pointer has `nb` blocks after it (w holds
                    // n * nb, xq holds m * nb: checked above).
                    let v = unsafe { T::dot_4x2(nb, rows, ys) };
                    out.put(r * n + col, &v[0]);
                    out.put((r + 1) * n + col, &v[1]);
                    r += 2;
                }
                if r < m {
                    #[allow(unsafe_code)]
                    // SAFETY: as above.
                    let v = unsafe { T::dot_4(nb, rows, xq[r * nb..].as_ptr()) };
                    out.put(r * n + col, &v);
                }
            }
        });
        // The last n % 4 weight rows, one by one as candle's matmul does.
        for col in 4 * quads..n {
            let wr = &w[col * nb..(col + 1) * nb];
            for r in 0..m {
                out.put(r * n + col, &[T::vec_dot(k, wr, &xq[r * nb..(r + 1) * nb])]);
            }
        }
        return Ok(());
    }
    k_quants::matmul((m, k, n), x, w, dst)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod simd {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    /// Whether the CPU has AVX2, FMA and F16C.
    pub(super) fn available() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }

    /// Whether the CPU also has AVX-512 (F, BW, VL) with VNNI: the kernels
    /// then sum byte products in one instruction and unpack bits with
    /// masks.
    pub(super) fn vnni() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            available()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
        })
    }

    /// An f16 as f32, converted by F16C.
    #[inline(always)]
    pub(super) unsafe fn f32_of(h: half::f16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h.to_bits()))))
    }

    /// The sum of eight lanes, in a fixed order.
    #[inline(always)]
    pub(super) unsafe fn hsum(acc: __m256) -> f32 {
        let half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let half = _mm_add_ps(half, _mm_movehl_ps(half, half));
        _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)))
    }
}

#[cfg(test)]
mod tests {
    /// Deterministic values in -1..1: no dependence on rand's streams.
    pub(super) fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The exact dot product of what two rows of blocks stand for.
    pub(super) fn dequantized_dot(w: &[f32], x: &[f32]) -> f64 {
        w.iter()
            .zip(x)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum()
    }
}
