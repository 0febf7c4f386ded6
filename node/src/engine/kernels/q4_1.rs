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

use super::{check_len, dequantize_q8, quantize_q8, FourRows, QK};

/// A Q4_1 block as ggml lays it out: scale, minimum, then 32 unsigned
/// nibbles (values `j` and `j + 16` share byte `j`, low nibble first).
#[derive(Debug, Clone, PartialEq)]
#[repr(C)]
pub(in crate::engine) struct Q4_1 {
    d: f16,
    m: f16,
    qs: [u8; QK / 2],
}

/// The input side of a Q4_1 product: 32 signed bytes, their scale `d` and
/// `s = d * Σ qs`.
#[derive(Debug, Clone, PartialEq)]
#[repr(C)]
pub(in crate::engine) struct Q8_1 {
    d: f16,
    s: f16,
    qs: [i8; QK],
}

const _: () = assert!(std::mem::size_of::<Q4_1>() == 20);
const _: () = assert!(std::mem::size_of::<Q8_1>() == 36);

impl GgmlType for Q8_1 {
    const DTYPE: GgmlDType = GgmlDType::Q8_1;
    const BLCK_SIZE: usize = QK;
    type VecDotType = Q8_1;

    fn to_float(xs: &[Self], ys: &mut [f32]) {
        for (x, y) in xs.iter().zip(ys.chunks_exact_mut(QK)) {
            dequantize_q8(&x.qs, x.d, y);
        }
    }

    /// ggml's `quantize_row_q8_1`.
    fn from_float(xs: &[f32], ys: &mut [Self]) {
        for (x, y) in xs.chunks_exact(QK).zip(ys.iter_mut()) {
            let (d, sum) = quantize_q8(x, &mut y.qs);
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
        check_len("Q4_1", n, xs.len().min(ys.len()));
        #[cfg(target_arch = "x86_64")]
        if super::simd::available() {
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
        let [a, b, c, d] = super::vec_dot_4(n, [xs0, xs1, xs2, xs3], ys);
        (a, b, c, d)
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

#[allow(unsafe_code)]
impl FourRows for Q4_1 {
    const NAME: &'static str = "Q4_1";

    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    unsafe fn dot_4(nb: usize, x: [*const Self; 4], y: *const Q8_1) -> [f32; 4] {
        // SAFETY: the caller's.
        unsafe { avx2::vec_dot_4(nb, x, y) }
    }

    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    unsafe fn dot_4x2(nb: usize, x: [*const Self; 4], y: [*const Q8_1; 2]) -> [[f32; 4]; 2] {
        // SAFETY: the caller's.
        unsafe { avx2::dot_4x2(nb, x, y) }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use super::super::simd::{f32_of, hsum, vnni};
    use super::{Q4_1, Q8_1};
    use std::arch::x86_64::*;

    /// The 32 weights of a block as bytes 0..16: the low nibbles in the
    /// lower lane (values 0..16), the high ones in the upper (16..32).
    #[inline(always)]
    unsafe fn nibbles(x: &Q4_1) -> __m256i {
        let packed = _mm_loadu_si128(x.qs.as_ptr().cast());
        let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }

    /// Σ q_w q_x of a block as 8 f32 partial sums: u8 x i8 products summed
    /// in fours by one instruction with VNNI (`WIDE`), else pairs into i16
    /// (at most 2 * 15 * 128: no saturation) and pairs of those into i32.
    /// Both give the same integers.
    #[inline(always)]
    unsafe fn block_sums<const WIDE: bool>(qx: __m256i, qy: __m256i) -> __m256 {
        let sums = if WIDE {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), qx, qy)
        } else {
            _mm256_madd_epi16(_mm256_maddubs_epi16(qx, qy), _mm256_set1_epi16(1))
        };
        _mm256_cvtepi32_ps(sums)
    }

    /// Asks for the line 32 blocks past block `i` of a weight row: decode
    /// reads each weight once, from memory, and the hardware prefetcher
    /// alone leaves the core waiting (a prefetch past the row's end is
    /// harmless: it never faults).
    #[inline(always)]
    unsafe fn prefetch(row: *const Q4_1, i: usize) {
        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(i + 32).cast());
    }

    /// Σ over `nb` blocks, as ggml's AVX2 `ggml_vec_dot_q4_1_q8_1`.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `x` and `y` point to `nb` blocks
    /// each.
    #[inline(always)]
    unsafe fn vec_dot_k<const WIDE: bool>(nb: usize, x: *const Q4_1, y: *const Q8_1) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0f32;
        for i in 0..nb {
            prefetch(x, i);
            let (x, y) = (&*x.add(i), &*y.add(i));
            mins += f32_of(x.m) * f32_of(y.s);
            let d = _mm256_set1_ps(f32_of(x.d) * f32_of(y.d));
            let qy = _mm256_loadu_si256(y.qs.as_ptr().cast::<__m256i>());
            acc = _mm256_fmadd_ps(d, block_sums::<WIDE>(nibbles(x), qy), acc);
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
    #[inline(always)]
    unsafe fn vec_dot_4_k<const WIDE: bool>(
        nb: usize,
        x: [*const Q4_1; 4],
        y: *const Q8_1,
    ) -> [f32; 4] {
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
            for row in x {
                prefetch(row, i);
            }
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
                acc[r] = _mm256_fmadd_ps(d, block_sums::<WIDE>(nibbles(rows[r]), qy), acc[r]);
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
    #[inline(always)]
    unsafe fn dot_4x2_k<const WIDE: bool>(
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
            for row in x {
                prefetch(row, i);
            }
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
                    acc[c][r] = _mm256_fmadd_ps(d, block_sums::<WIDE>(qx[r], qy), acc[c][r]);
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

    /// Entry points: `$name` runs the AVX2 kernel `$k`, or its VNNI form
    /// where the CPU has AVX-512 VNNI; both give the same bits.
    macro_rules! entry {
        ($name:ident, $avx2:ident, $vnni:ident, $k:ident, ($($a:ident: $t:ty),*) -> $r:ty) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            pub(super) unsafe fn $avx2($($a: $t),*) -> $r {
                $k::<false>($($a),*)
            }

            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
            pub(super) unsafe fn $vnni($($a: $t),*) -> $r {
                $k::<true>($($a),*)
            }

            /// # Safety
            /// The CPU has AVX2, FMA and F16C; every pointer has `nb`
            /// blocks after it.
            #[inline(always)]
            pub(super) unsafe fn $name($($a: $t),*) -> $r {
                if vnni() {
                    $vnni($($a),*)
                } else {
                    $avx2($($a),*)
                }
            }
        };
    }

    entry!(vec_dot, vec_dot_avx2, vec_dot_vnni, vec_dot_k,
        (nb: usize, x: *const Q4_1, y: *const Q8_1) -> f32);
    entry!(vec_dot_4, vec_dot_4_avx2, vec_dot_4_vnni, vec_dot_4_k,
        (nb: usize, x: [*const Q4_1; 4], y: *const Q8_1) -> [f32; 4]);
    entry!(dot_4x2, dot_4x2_avx2, dot_4x2_vnni, dot_4x2_k,
        (nb: usize, x: [*const Q4_1; 4], y: [*const Q8_1; 2]) -> [[f32; 4]; 2]);
}

#[cfg(test)]
mod tests {
    use super::super::matmul;
    use super::super::tests::{dequantized_dot, rows_alone_and_together, values};
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
            let exact = dequantized_dot(&w_back, &x_back);
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
        rows_alone_and_together((k, n), &w, &[1, 2, 3, 4, 7, 8]);
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

    /// With AVX-512 VNNI the kernels give exactly the AVX2 kernels' bits.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vnni_kernels_give_the_avx2_bits() {
        if !super::super::simd::vnni() {
            eprintln!("this CPU has no AVX-512 VNNI: only the AVX2 kernels run here");
            return;
        }
        let n = 1536;
        let nb = n / QK;
        let rows: Vec<_> = (0..4).map(|r| blocks_of(&values(n, 80 + r)).0).collect();
        let ys = [q8(&values(n, 90)), q8(&values(n, 91))];
        let x = [0, 1, 2, 3].map(|r| rows[r].as_ptr());
        let y = [ys[0].as_ptr(), ys[1].as_ptr()];
        let bits4 = |v: [f32; 4]| v.map(f32::to_bits);
        #[allow(unsafe_code)]
        // SAFETY: the CPU has both feature sets (checked above); every
        // pointer has nb blocks after it.
        unsafe {
            let (a, b) = (avx2::dot_4x2_avx2(nb, x, y), avx2::dot_4x2_vnni(nb, x, y));
            assert_eq!(a.map(bits4), b.map(bits4));
            let (a, b) = (
                avx2::vec_dot_4_avx2(nb, x, y[0]),
                avx2::vec_dot_4_vnni(nb, x, y[0]),
            );
            assert_eq!(bits4(a), bits4(b));
            let (a, b) = (
                avx2::vec_dot_avx2(nb, x[0], y[0]),
                avx2::vec_dot_vnni(nb, x[0], y[0]),
            );
            assert_eq!(a.to_bits(), b.to_bits());
        }
    }

    #[test]
    #[should_panic(expected = "Q4_1 product")]
    fn a_product_longer_than_its_blocks_is_refused() {
        let (w, _) = blocks_of(&values(64, 9));
        let xq = q8(&values(64, 10));
        let _ = Q4_1::vec_dot(96, &w, &xq);
    }
}
