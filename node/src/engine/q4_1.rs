//! Q4_1 products on the file's own blocks.
//!
//! candle stores Q4_1 but multiplies it with a scalar loop (about 2 tokens/s
//! on SmolLM2-135M), so the engine used to repack it into Q8_0 at load time:
//! 1.7x the bytes to read for every token. These types give candle's tiled,
//! multi-threaded quantized matmul ([`k_quants::matmul`]) a Q4_1 dot product
//! that uses AVX2 and FMA when the CPU has them (checked at run time, so one
//! x86-64 binary runs on any x86-64 machine) and a portable loop otherwise.
//!
//! The arithmetic is ggml's: the input row is quantized to 8 bits in blocks
//! of 32 ([`Q8_1`], with the block's sum kept beside its scale), and each
//! weight block contributes `d_w * d_x * Σ q_w q_x + m_w * s_x`, the integer
//! sum exact and the rest in f32.

use candle_core::quantized::k_quants::GgmlType;
use candle_core::quantized::GgmlDType;
use half::f16;

/// Values per block.
const QK: usize = 32;

/// A Q4_1 block as ggml lays it out: scale, minimum, then 32 unsigned
/// nibbles (values `j` and `j + 16` share byte `j`, low nibble first).
#[derive(Debug, Clone, PartialEq)]
#[repr(C)]
pub(super) struct Q4_1 {
    d: f16,
    m: f16,
    qs: [u8; QK / 2],
}

/// The input side of a Q4_1 product: 32 signed bytes, their scale `d` and
/// `s = d * Σ qs`.
#[derive(Debug, Clone, PartialEq)]
#[repr(C)]
pub(super) struct Q8_1 {
    d: f16,
    s: f16,
    qs: [i8; QK],
}

const _: () = assert!(std::mem::size_of::<Q4_1>() == 20);
const _: () = assert!(std::mem::size_of::<Q8_1>() == 36);

fn check_len(n: usize, blocks: usize) {
    // Real asserts: the SIMD loop below reads through raw pointers.
    assert!(
        n.is_multiple_of(QK) && n / QK <= blocks,
        "a Q4_1 product of {n} values over {blocks} blocks"
    );
}

impl GgmlType for Q8_1 {
    const DTYPE: GgmlDType = GgmlDType::Q8_1;
    const BLCK_SIZE: usize = QK;
    type VecDotType = Q8_1;

    fn to_float(xs: &[Self], ys: &mut [f32]) {
        for (x, y) in xs.iter().zip(ys.chunks_exact_mut(QK)) {
            let d = x.d.to_f32();
            for (q, v) in x.qs.iter().zip(y.iter_mut()) {
                *v = f32::from(*q) * d;
            }
        }
    }

    /// ggml's `quantize_row_q8_1`: round to nearest, ties away from zero.
    fn from_float(xs: &[f32], ys: &mut [Self]) {
        for (x, y) in xs.chunks_exact(QK).zip(ys.iter_mut()) {
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, v) in y.qs.iter_mut().zip(x) {
                // |v * id| <= 127, so the cast cannot saturate.
                let r = (v * id).round() as i8;
                *q = r;
                sum += i32::from(r);
            }
            y.d = f16::from_f32(d);
            y.s = f16::from_f32(sum as f32 * d);
        }
    }

    fn vec_dot(n: usize, xs: &[Self], ys: &[Self]) -> f32 {
        Self::vec_dot_unopt(n, xs, ys)
    }

    fn vec_dot_unopt(n: usize, xs: &[Self], ys: &[Self]) -> f32 {
        xs.iter()
            .zip(ys)
            .take(n / QK)
            .map(|(x, y)| {
                let s: i32 =
                    x.qs.iter()
                        .zip(&y.qs)
                        .map(|(&a, &b)| i32::from(a) * i32::from(b))
                        .sum();
                s as f32 * x.d.to_f32() * y.d.to_f32()
            })
            .sum()
    }
}

impl GgmlType for Q4_1 {
    const DTYPE: GgmlDType = GgmlDType::Q4_1;
    const BLCK_SIZE: usize = QK;
    type VecDotType = Q8_1;

    fn to_float(xs: &[Self], ys: &mut [f32]) {
        for (x, y) in xs.iter().zip(ys.chunks_exact_mut(QK)) {
            let (d, m) = (x.d.to_f32(), x.m.to_f32());
            for (j, q) in x.qs.iter().enumerate() {
                y[j] = f32::from(q & 0x0F) * d + m;
                y[j + QK / 2] = f32::from(q >> 4) * d + m;
            }
        }
    }

    /// ggml's `quantize_row_q4_1_ref` (weights are read from files; this is
    /// for tests and for completeness of the trait).
    fn from_float(xs: &[f32], ys: &mut [Self]) {
        for (x, y) in xs.chunks_exact(QK).zip(ys.iter_mut()) {
            let min = x.iter().copied().fold(f32::INFINITY, f32::min);
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            y.d = f16::from_f32(d);
            y.m = f16::from_f32(min);
            for j in 0..QK / 2 {
                let q0 = (((x[j] - min) * id + 0.5) as u8).min(15);
                let q1 = (((x[j + QK / 2] - min) * id + 0.5) as u8).min(15);
                y.qs[j] = q0 | (q1 << 4);
            }
        }
    }

    fn vec_dot(n: usize, xs: &[Self], ys: &[Q8_1]) -> f32 {
        check_len(n, xs.len().min(ys.len()));
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            #[allow(unsafe_code)]
            // SAFETY: the CPU has AVX2, FMA and F16C (checked above); both slices
            // hold at least n / 32 blocks (checked by `check_len`).
            return unsafe { avx2::vec_dot(n / QK, xs.as_ptr(), ys.as_ptr()) };
        }
        Self::vec_dot_unopt(n, xs, ys)
    }

    fn vec_dot_4(
        n: usize,
        xs0: &[Self],
        xs1: &[Self],
        xs2: &[Self],
        xs3: &[Self],
        ys: &[Q8_1],
    ) -> (f32, f32, f32, f32) {
        let shortest = [xs0.len(), xs1.len(), xs2.len(), xs3.len(), ys.len()]
            .into_iter()
            .min()
            .unwrap_or(0);
        check_len(n, shortest);
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            let rows = [xs0.as_ptr(), xs1.as_ptr(), xs2.as_ptr(), xs3.as_ptr()];
            #[allow(unsafe_code)]
            // SAFETY: as in `vec_dot`, for every row.
            let [a, b, c, d] = unsafe { avx2::vec_dot_4(n / QK, rows, ys.as_ptr()) };
            return (a, b, c, d);
        }
        (
            Self::vec_dot_unopt(n, xs0, ys),
            Self::vec_dot_unopt(n, xs1, ys),
            Self::vec_dot_unopt(n, xs2, ys),
            Self::vec_dot_unopt(n, xs3, ys),
        )
    }

    fn vec_dot_unopt(n: usize, xs: &[Self], ys: &[Q8_1]) -> f32 {
        let mut sum = 0f32;
        for (x, y) in xs.iter().zip(ys).take(n / QK) {
            let mut s = 0i32;
            for j in 0..QK / 2 {
                s += i32::from(x.qs[j] & 0x0F) * i32::from(y.qs[j]);
                s += i32::from(x.qs[j] >> 4) * i32::from(y.qs[j + QK / 2]);
            }
            sum += x.d.to_f32() * y.d.to_f32() * s as f32 + x.m.to_f32() * y.s.to_f32();
        }
        sum
    }
}

/// `dst = x · wᵀ` for `m` input rows of `k` values and `n` Q4_1 weight
/// rows (`w` holds `n * k / 32` blocks). One input row goes through
/// candle's tiled matmul; several (a prompt, or a batch of sessions) go
/// four weight rows by two inputs at a time, each weight block unpacked
/// once for both, split over the compute threads by weight rows. Either
/// way every output has the same bits.
pub(super) fn matmul(
    (m, k, n): (usize, usize, usize),
    x: &[f32],
    w: &[Q4_1],
    dst: &mut [f32],
) -> candle_core::Result<()> {
    let nb = k / QK;
    if !k.is_multiple_of(QK) || w.len() < n * nb || x.len() < m * k || dst.len() < m * n {
        candle_core::bail!(
            "a Q4_1 product of ({m}, {k}) by ({n}, {k}) over {} blocks, {} inputs, {} outputs",
            w.len(),
            x.len(),
            dst.len()
        );
    }
    #[cfg(target_arch = "x86_64")]
    if m > 1 && avx2::available() {
        let zero = Q8_1 {
            d: f16::ZERO,
            s: f16::ZERO,
            qs: [0; QK],
        };
        let mut xq = vec![zero; m * nb];
        for (row, q) in x.chunks_exact(k).zip(xq.chunks_exact_mut(nb)).take(m) {
            Q8_1::from_float(row, q);
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
                    // SAFETY: AVX2, FMA and F16C are there (checked
                    // above); every row pointer has `nb` blocks after it
                    // (w holds n * nb, xq holds m * nb: checked above).
                    let v = unsafe { avx2::dot_4x2(nb, rows, ys) };
                    out.put(r * n + col, &v[0]);
                    out.put((r + 1) * n + col, &v[1]);
                    r += 2;
                }
                if r < m {
                    #[allow(unsafe_code)]
                    // SAFETY: as above.
                    let v = unsafe { avx2::vec_dot_4(nb, rows, xq[r * nb..].as_ptr()) };
                    out.put(r * n + col, &v);
                }
            }
        });
        // The last n % 4 weight rows, one by one as candle's matmul does.
        for col in 4 * quads..n {
            let wr = &w[col * nb..(col + 1) * nb];
            for r in 0..m {
                out.put(
                    r * n + col,
                    &[Q4_1::vec_dot(k, wr, &xq[r * nb..(r + 1) * nb])],
                );
            }
        }
        return Ok(());
    }
    candle_core::quantized::k_quants::matmul((m, k, n), x, w, dst)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use super::{Q4_1, Q8_1};
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub(super) fn available() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }

    #[inline(always)]
    unsafe fn f32_of(h: half::f16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h.to_bits()))))
    }

    /// The 32 weights of a block as bytes 0..16: the low nibbles in the
    /// lower lane (values 0..16), the high ones in the upper (16..32).
    #[inline(always)]
    unsafe fn nibbles(x: &Q4_1) -> __m256i {
        let packed = _mm_loadu_si128(x.qs.as_ptr().cast());
        let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }

    /// Σ q_w q_x of a block as 8 f32 partial sums: u8 x i8 pairs into i16
    /// (at most 2 * 15 * 128: no saturation), pairs of those into i32.
    #[inline(always)]
    unsafe fn block_sums(qx: __m256i, qy: __m256i) -> __m256 {
        let pairs = _mm256_maddubs_epi16(qx, qy);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    #[inline(always)]
    unsafe fn hsum(acc: __m256) -> f32 {
        let half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let half = _mm_add_ps(half, _mm_movehl_ps(half, half));
        _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)))
    }

    /// Σ over `nb` blocks, as ggml's AVX2 `ggml_vec_dot_q4_1_q8_1`.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `x` and `y` point to `nb` blocks
    /// each.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn vec_dot(nb: usize, x: *const Q4_1, y: *const Q8_1) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0f32;
        for i in 0..nb {
            let (x, y) = (&*x.add(i), &*y.add(i));
            mins += f32_of(x.m) * f32_of(y.s);
            let d = _mm256_set1_ps(f32_of(x.d) * f32_of(y.d));
            let qy = _mm256_loadu_si256(y.qs.as_ptr().cast::<__m256i>());
            acc = _mm256_fmadd_ps(d, block_sums(nibbles(x), qy), acc);
        }
        hsum(acc) + mins
    }

    /// The first two halves of a block (`d` and `m`, or `d` and `s`) as
    /// the raw bits of one i32.
    #[inline(always)]
    unsafe fn scales<T>(block: &T) -> i32 {
        std::ptr::read_unaligned((block as *const T).cast::<i32>())
    }

    /// Four rows against one input, each input block loaded once, the
    /// eight scales of a block of four rows converted by one instruction.
    ///
    /// # Safety
    /// As [`vec_dot`], for each of the four rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn vec_dot_4(nb: usize, x: [*const Q4_1; 4], y: *const Q8_1) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        // Lanes 2r + 1 sum row r's m * s terms (lanes 2r are unused).
        let mut mins = _mm256_setzero_ps();
        let lane = [
            _mm256_set1_epi32(0),
            _mm256_set1_epi32(2),
            _mm256_set1_epi32(4),
            _mm256_set1_epi32(6),
        ];
        for i in 0..nb {
            let y = &*y.add(i);
            // (d_y, s_y) in every pair of lanes.
            let ds = _mm_cvtph_ps(_mm_cvtsi32_si128(scales(y)));
            let ds = _mm256_castpd_ps(_mm256_broadcastsd_pd(_mm_castps_pd(ds)));
            let qy = _mm256_loadu_si256(y.qs.as_ptr().cast::<__m256i>());
            let rows = [&*x[0].add(i), &*x[1].add(i), &*x[2].add(i), &*x[3].add(i)];
            // (d_r, m_r) for r = 0..4, times (d_y, s_y).
            let dm = _mm_set_epi32(
                scales(rows[3]),
                scales(rows[2]),
                scales(rows[1]),
                scales(rows[0]),
            );
            let dm = _mm256_mul_ps(_mm256_cvtph_ps(dm), ds);
            mins = _mm256_add_ps(mins, dm);
            for r in 0..4 {
                let d = _mm256_permutevar8x32_ps(dm, lane[r]);
                acc[r] = _mm256_fmadd_ps(d, block_sums(nibbles(rows[r]), qy), acc[r]);
            }
        }
        let mut m = [0f32; 8];
        _mm256_storeu_ps(m.as_mut_ptr(), mins);
        [
            hsum(acc[0]) + m[1],
            hsum(acc[1]) + m[3],
            hsum(acc[2]) + m[5],
            hsum(acc[3]) + m[7],
        ]
    }

    /// Four weight rows against two inputs: the weight blocks are unpacked
    /// once for both. Each of the eight results is computed with exactly
    /// the operations, in the same order, that [`vec_dot_4`] uses for it,
    /// so a row's output has the same bits whether it is computed alone or
    /// with others.
    ///
    /// # Safety
    /// As [`vec_dot`], for each of the four rows and two inputs.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_4x2(
        nb: usize,
        x: [*const Q4_1; 4],
        y: [*const Q8_1; 2],
    ) -> [[f32; 4]; 2] {
        let mut acc = [[_mm256_setzero_ps(); 4]; 2];
        let mut mins = [_mm256_setzero_ps(); 2];
        let lane = [
            _mm256_set1_epi32(0),
            _mm256_set1_epi32(2),
            _mm256_set1_epi32(4),
            _mm256_set1_epi32(6),
        ];
        for i in 0..nb {
            let rows = [&*x[0].add(i), &*x[1].add(i), &*x[2].add(i), &*x[3].add(i)];
            let dm_w = _mm256_cvtph_ps(_mm_set_epi32(
                scales(rows[3]),
                scales(rows[2]),
                scales(rows[1]),
                scales(rows[0]),
            ));
            let qx = [
                nibbles(rows[0]),
                nibbles(rows[1]),
                nibbles(rows[2]),
                nibbles(rows[3]),
            ];
            for c in 0..2 {
                let y = &*y[c].add(i);
                let ds = _mm_cvtph_ps(_mm_cvtsi32_si128(scales(y)));
                let ds = _mm256_castpd_ps(_mm256_broadcastsd_pd(_mm_castps_pd(ds)));
                let qy = _mm256_loadu_si256(y.qs.as_ptr().cast::<__m256i>());
                let dm = _mm256_mul_ps(dm_w, ds);
                mins[c] = _mm256_add_ps(mins[c], dm);
                for r in 0..4 {
                    let d = _mm256_permutevar8x32_ps(dm, lane[r]);
                    acc[c][r] = _mm256_fmadd_ps(d, block_sums(qx[r], qy), acc[c][r]);
                }
            }
        }
        let mut out = [[0f32; 4]; 2];
        for c in 0..2 {
            let mut m = [0f32; 8];
            _mm256_storeu_ps(m.as_mut_ptr(), mins[c]);
            for r in 0..4 {
                out[c][r] = hsum(acc[c][r]) + m[2 * r + 1];
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks_of(values: &[f32]) -> (Vec<Q4_1>, Vec<f32>) {
        let zero = Q4_1 {
            d: f16::ZERO,
            m: f16::ZERO,
            qs: [0; QK / 2],
        };
        let mut q = vec![zero; values.len() / QK];
        Q4_1::from_float(values, &mut q);
        let mut back = vec![0f32; values.len()];
        Q4_1::to_float(&q, &mut back);
        (q, back)
    }

    fn q8(values: &[f32]) -> Vec<Q8_1> {
        let zero = Q8_1 {
            d: f16::ZERO,
            s: f16::ZERO,
            qs: [0; QK],
        };
        let mut q = vec![zero; values.len() / QK];
        Q8_1::from_float(values, &mut q);
        q
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        // A small deterministic generator: no dependence on rand's streams.
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

    /// The SIMD dot product (where the CPU has one) and the portable loop
    /// agree to f32 rounding, and both are the dot product of the values
    /// the blocks stand for.
    #[test]
    fn the_fast_and_portable_products_agree_with_the_dequantized_one() {
        for (n, seed) in [(32, 1), (576, 2), (1536, 3), (4096, 4)] {
            let (w, w_back) = blocks_of(&values(n, seed));
            let x = values(n, seed + 100);
            let xq = q8(&x);
            let mut x_back = vec![0f32; n];
            Q8_1::to_float(&xq, &mut x_back);
            let exact: f64 = w_back
                .iter()
                .zip(&x_back)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            let fast = Q4_1::vec_dot(n, &w, &xq);
            let slow = Q4_1::vec_dot_unopt(n, &w, &xq);
            let scale: f64 = w_back.iter().map(|v| f64::from(v.abs())).sum::<f64>() + 1.0;
            // The only difference from the exact sum is `s` kept in f16.
            assert!(
                (f64::from(slow) - exact).abs() < 2e-3 * scale,
                "{slow} {exact}"
            );
            assert!(
                (f64::from(fast) - f64::from(slow)).abs() < 1e-4 * scale,
                "{fast} {slow}"
            );
        }
    }

    #[test]
    fn four_rows_at_once_equal_one_at_a_time() {
        let n = 1536;
        let rows: Vec<_> = (0..4).map(|r| blocks_of(&values(n, 20 + r)).0).collect();
        let xq = q8(&values(n, 30));
        let (a, b, c, d) = Q4_1::vec_dot_4(n, &rows[0], &rows[1], &rows[2], &rows[3], &xq);
        for (got, row) in [a, b, c, d].into_iter().zip(&rows) {
            let one = Q4_1::vec_dot(n, row, &xq);
            assert!(
                (got - one).abs() <= 1e-4 * one.abs().max(1.0),
                "{got} {one}"
            );
        }
    }

    /// The product of several rows has, row by row, the bits of each row's
    /// product alone (what batching relies on), for odd and even row
    /// counts and a weight row count that is not a multiple of four.
    #[test]
    fn many_rows_at_once_have_the_bits_of_each_alone() {
        let (k, n) = (576, 14);
        let (w, _) = blocks_of(&values(n * k, 40));
        for m in [1usize, 2, 3, 8] {
            let x = values(m * k, 50 + m as u32);
            let mut all = vec![0f32; m * n];
            matmul((m, k, n), &x, &w, &mut all).unwrap();
            for r in 0..m {
                let mut one = vec![0f32; n];
                matmul((1, k, n), &x[r * k..(r + 1) * k], &w, &mut one).unwrap();
                assert!(all[r * n..(r + 1) * n] == one[..], "m {m} row {r}");
            }
        }
        let mut small = vec![0f32; 3];
        assert!(matmul((1, k, n), &values(k, 1), &w, &mut small).is_err());
    }

    #[test]
    fn the_input_quantization_is_ggmls() {
        let mut x = vec![0f32; QK];
        x[0] = 1.0;
        x[1] = -0.5;
        x[2] = 0.25;
        x[17] = 0.998;
        let q = q8(&x);
        assert_eq!(q[0].qs[0], 127);
        assert_eq!(q[0].qs[1], -64); // -63.5 rounds away from zero
        assert_eq!(q[0].qs[2], 32); // 31.75
        assert_eq!(q[0].qs[17], 127); // 126.7
        assert_eq!(
            q[0].s.to_f32(),
            f16::from_f32((127 - 64 + 32 + 127) as f32 / 127.0).to_f32()
        );
        // An all-zero block has scale 0 and no NaN.
        let z = q8(&[0f32; QK]);
        assert_eq!(z[0].d.to_f32(), 0.0);
        assert_eq!(z[0].qs, [0; QK]);
    }

    #[test]
    #[should_panic(expected = "Q4_1 product")]
    fn a_product_longer_than_its_blocks_is_refused() {
        let (w, _) = blocks_of(&values(64, 9));
        let xq = q8(&values(64, 10));
        let _ = Q4_1::vec_dot(96, &w, &xq);
    }
}
