//! The engine's own quantized products: for formats that candle stores but
//! multiplies with scalar loops (Q4_1, Q5_0), and on x86-64 for those it
//! multiplies row by row or on repacked copies (Q8_0, Q4_K, Q6_K).
//!
//! Each format is a candle [`GgmlType`], so candle's tiled, pooled matmul
//! ([`k_quants::matmul`]) runs it for one input row, and [`matmul`] runs
//! it for several (prompts, batches of sessions): four weight rows by up
//! to four inputs at a time, each weight block unpacked once for all. The
//! SIMD kernels use AVX2, FMA and F16C when the CPU has them, AVX-512 with
//! VNNI where it has those (checked at run time, so one x86-64 binary runs
//! on any x86-64 machine); a portable loop runs elsewhere. A row's output
//! has the same bits however many rows it is computed with: batching never
//! changes a session's numbers.

use candle_core::quantized::k_quants::{self, GgmlType};

mod q4_1;
mod q5_0;
// Used on x86-64 only (candle's NEON kernels serve these formats elsewhere).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
mod q_k;

pub(super) use q4_1::Q4_1;
pub(super) use q5_0::Q5_0;
#[cfg(target_arch = "x86_64")]
pub(super) use q5_0::Q8_0;
#[cfg(target_arch = "x86_64")]
pub(super) use q_k::{Q4K, Q6K};

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
        *q = round_away(v * id) as i8;
        sum += i32::from(*q);
    }
    (d, sum)
}

/// `v` rounded to the nearest integer, ties away from zero (`f32::round`),
/// for |v| < 2^23: a truncating conversion and a compare, where `round`
/// would call libm on x86-64 CPUs without SSE4.1 in the baseline.
fn round_away(v: f32) -> i32 {
    let t = v as i32;
    let frac = v - t as f32;
    if frac >= 0.5 {
        t + 1
    } else if frac <= -0.5 {
        t - 1
    } else {
        t
    }
}

/// `v` rounded to the nearest integer, ties to even
/// (`f32::round_ties_even`), for |v| < 2^23, as [`round_away`].
fn round_even(v: f32) -> i32 {
    let t = v as i32;
    let frac = v - t as f32;
    if frac > 0.5 || (frac == 0.5 && t % 2 != 0) {
        t + 1
    } else if frac < -0.5 || (frac == -0.5 && t % 2 != 0) {
        t - 1
    } else {
        t
    }
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

    /// Four weight rows against four inputs, each result with the bits
    /// [`dot_4`](Self::dot_4) gives it.
    ///
    /// # Safety
    /// As [`dot_4`](Self::dot_4).
    #[cfg(target_arch = "x86_64")]
    unsafe fn dot_4x4(
        nb: usize,
        x: [*const Self; 4],
        y: [*const Self::VecDotType; 4],
    ) -> [[f32; 4]; 4] {
        // SAFETY: the caller's.
        let [a, b] = unsafe { Self::dot_4x2(nb, x, [y[0], y[1]]) };
        // SAFETY: the caller's.
        let [c, d] = unsafe { Self::dot_4x2(nb, x, [y[2], y[3]]) };
        [a, b, c, d]
    }

    /// `dst = x · wᵀ` for several input rows by a kernel that unpacks each
    /// weight block once for all of them, each output with the bits
    /// [`dot_4`](Self::dot_4) gives it; `false` (nothing done) where the
    /// format or the CPU has none. [`matmul`] has checked the sizes.
    #[cfg(target_arch = "x86_64")]
    fn matmul_wide(_mkn: (usize, usize, usize), _x: &[f32], _w: &[Self], _dst: &mut [f32]) -> bool {
        false
    }
}

/// [`GgmlType::vec_dot_4`] of a format here: its SIMD kernel where the CPU
/// has one, the portable loop row by row elsewhere.
fn vec_dot_4<T: FourRows>(n: usize, xs: [&[T]; 4], ys: &[T::VecDotType]) -> [f32; 4] {
    let shortest = xs.iter().map(|x| x.len()).min().unwrap_or(0);
    let blocks = shortest.min(ys.len());
    // Real asserts: the SIMD loops read through raw pointers.
    assert!(
        n.is_multiple_of(T::BLCK_SIZE) && n / T::BLCK_SIZE <= blocks,
        "a {} product of {n} values over {blocks} blocks",
        T::NAME
    );
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        #[allow(unsafe_code)]
        // SAFETY: the CPU has the features (checked above); every row and
        // the input hold at least n / BLCK_SIZE blocks (checked above).
        return unsafe { T::dot_4(n / T::BLCK_SIZE, xs.map(|x| x.as_ptr()), ys.as_ptr()) };
    }
    xs.map(|x| T::vec_dot_unopt(n, x, ys))
}

/// `dst = x · wᵀ` for `m` input rows of `k` values and `n` weight rows
/// (`w` holds `n * k / BLCK_SIZE` blocks). One input row goes through candle's
/// tiled matmul; several go four weight rows by four inputs at a time,
/// split over the compute threads by weight rows. Either way every output
/// has the same bits.
pub(super) fn matmul<T: FourRows>(
    (m, k, n): (usize, usize, usize),
    x: &[f32],
    w: &[T],
    dst: &mut [f32],
) -> candle_core::Result<()> {
    let nb = k / T::BLCK_SIZE;
    if !k.is_multiple_of(T::BLCK_SIZE) || w.len() < n * nb || x.len() < m * k || dst.len() < m * n {
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
        if T::matmul_wide((m, k, n), x, w, dst) {
            return Ok(());
        }
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
                while r + 4 <= m {
                    let ys = [0, 1, 2, 3].map(|j| xq[(r + j) * nb..].as_ptr());
                    #[allow(unsafe_code)]
                    // SAFETY: as below.
                    let v = unsafe { T::dot_4x4(nb, rows, ys) };
                    for (j, v) in v.iter().enumerate() {
                        out.put((r + j) * n + col, v);
                    }
                    r += 4;
                }
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
    /// The rounding helpers are `f32::round` and `f32::round_ties_even`.
    #[test]
    fn rounding_is_the_standard_librarys() {
        let mut v: Vec<f32> = (-600..=600).map(|i| i as f32 * 0.25).collect();
        v.extend([
            0.49999997,
            -0.49999997,
            0.50000006,
            126.5,
            -126.5,
            127.0,
            -127.0,
        ]);
        v.extend(values(10_000, 5).iter().map(|x| x * 127.0));
        for x in v {
            assert_eq!(super::round_away(x), x.round() as i32, "{x}");
            assert_eq!(super::round_even(x), x.round_ties_even() as i32, "{x}");
        }
    }

    /// Blocks of `values` in format `T`, and what they dequantize to.
    pub(super) fn blocks_of<T: super::GgmlType>(values: &[f32]) -> (Vec<T>, Vec<f32>) {
        let mut q = vec![T::zeros(); values.len() / T::BLCK_SIZE];
        T::from_float(values, &mut q);
        let mut back = vec![0f32; values.len()];
        T::to_float(&q, &mut back);
        (q, back)
    }

    /// [`matmul`](super::matmul) of `m` input rows, for each `m` of `ms`,
    /// gives row by row the bits of each row alone (what batching relies
    /// on), with the `n` weight rows of `w` (`k` values each).
    pub(super) fn rows_alone_and_together<T: super::FourRows>(
        (k, n): (usize, usize),
        w: &[T],
        ms: &[usize],
    ) {
        for &m in ms {
            let x = values(m * k, 50 + m as u32);
            let mut all = vec![0f32; m * n];
            super::matmul((m, k, n), &x, w, &mut all).unwrap();
            for r in 0..m {
                let mut one = vec![0f32; n];
                super::matmul((1, k, n), &x[r * k..(r + 1) * k], w, &mut one).unwrap();
                assert!(
                    all[r * n..(r + 1) * n] == one[..],
                    "{} m {m} row {r}",
                    T::NAME
                );
            }
        }
    }

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
