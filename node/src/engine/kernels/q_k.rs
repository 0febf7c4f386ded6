//! Q4_K and Q6_K products on the file's own super-blocks.
//!
//! candle multiplies these formats either row by row (one dot product per
//! output, no weight block shared between inputs) or on tiles it repacks
//! the weights into and keeps beside them (1.33x the Q4_K bytes). The
//! engine holds every weight once, so prompts used to run on the first
//! path: a fifth of Qwen2.5-0.5B's prefill went to its `ffn_down` (Q4_K
//! and Q6_K). These kernels multiply four weight rows by up to four inputs
//! at a time on the stored blocks.
//!
//! The arithmetic is ggml's: the input row is quantized to 8 bits in
//! super-blocks of 256 ([`Q8K`], with sums of each 16 inputs), the integer
//! sums of a super-block are exact, and each super-block adds
//! `d_w d_x Σ` (and, for Q4_K, `- dmin_w d_x Σ mins`) in f32. A row's
//! integer sums are kept in eight i32 lanes, lane `l` for the values `p`
//! with `p mod 32` in `4l..4l + 4`, whichever kernel runs (AVX-512 VNNI,
//! AVX2 or the portable loop), so all three give the same bits.

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ6K, GgmlType};
use candle_core::quantized::GgmlDType;
use half::f16;

use super::FourRows;

/// Values per super-block.
const QK_K: usize = 256;

/// A Q4_K super-block as ggml lays it out: scale and scale of the minima,
/// eight 6-bit scales and eight 6-bit minima packed in 12 bytes, then 256
/// nibbles (bytes `32j..32j + 32` hold values `64j..64j + 32` in their low
/// nibbles and `64j + 32..64j + 64` in their high ones). Value `p` is
/// `d sc[p / 32] q - dmin m[p / 32]`.
#[derive(Debug, Clone, PartialEq)]
#[repr(C)]
pub(in crate::engine) struct Q4K {
    d: f16,
    dmin: f16,
    scales: [u8; 12],
    qs: [u8; QK_K / 2],
}

/// A Q6_K super-block as ggml lays it out: the low four bits of the 256
/// codes, their high two bits, sixteen i8 scales (one per 16 values) and
/// the scale. Value `p` is `d sc[p / 16] (code - 32)`.
#[derive(Debug, Clone, PartialEq)]
#[repr(C)]
pub(in crate::engine) struct Q6K {
    ql: [u8; QK_K / 2],
    qh: [u8; QK_K / 4],
    scales: [i8; QK_K / 16],
    d: f16,
}

/// The input side of a K-quant product: 256 signed bytes, their scale and
/// the sums of each 16 of them.
#[derive(Debug, Clone, PartialEq)]
#[repr(C)]
pub(in crate::engine) struct Q8K {
    d: f32,
    qs: [i8; QK_K],
    bsums: [i16; QK_K / 16],
}

// The weight types are candle's blocks byte for byte (the engine reads
// candle's stored tensors as them, and lets candle quantize into them).
const _: () = assert!(std::mem::size_of::<Q4K>() == 144);
const _: () = assert!(std::mem::size_of::<Q4K>() == std::mem::size_of::<BlockQ4K>());
const _: () = assert!(std::mem::align_of::<Q4K>() == std::mem::align_of::<BlockQ4K>());
const _: () = assert!(std::mem::size_of::<Q6K>() == 210);
const _: () = assert!(std::mem::size_of::<Q6K>() == std::mem::size_of::<BlockQ6K>());
const _: () = assert!(std::mem::align_of::<Q6K>() == std::mem::align_of::<BlockQ6K>());
const _: () = assert!(std::mem::size_of::<Q8K>() == 292);

/// Refuses a product of `n` values over fewer than `n / 256` blocks.
fn check_len(format: &str, n: usize, blocks: usize) {
    // Real asserts: the SIMD loops read through raw pointers.
    assert!(
        n.is_multiple_of(QK_K) && n / QK_K <= blocks,
        "a {format} product of {n} values over {blocks} super-blocks"
    );
}

/// `ys` as candle's blocks of the same layout.
fn as_candle<T, C>(ys: &mut [T]) -> &mut [C] {
    assert!(
        std::mem::size_of::<T>() == std::mem::size_of::<C>()
            && std::mem::align_of::<T>() == std::mem::align_of::<C>()
    );
    #[allow(unsafe_code)]
    // SAFETY: the two types are `repr(C)` structs of the same fields in the
    // same order (ggml's block layouts), of equal size and alignment
    // (asserted), made of f16s and byte arrays valid for any bits; the
    // slice reborrows `ys`.
    unsafe {
        std::slice::from_raw_parts_mut(ys.as_mut_ptr().cast::<C>(), ys.len())
    }
}

impl Q4K {
    /// The eight 6-bit scales and minima (ggml's `get_scale_min_k4`).
    fn scales_mins(&self) -> ([u8; 8], [u8; 8]) {
        let q = &self.scales;
        let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
        for j in 0..4 {
            sc[j] = q[j] & 63;
            m[j] = q[j + 4] & 63;
        }
        for j in 4..8 {
            sc[j] = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
            m[j] = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        }
        (sc, m)
    }

    /// The 4-bit code of value `p`.
    fn code(&self, p: usize) -> i32 {
        let byte = self.qs[32 * (p / 64) + p % 32];
        i32::from(if p % 64 < 32 { byte & 0x0F } else { byte >> 4 })
    }
}

impl Q6K {
    /// The 6-bit code of value `p`, 0..64.
    fn code(&self, p: usize) -> i32 {
        let (half, l) = (p / 128, p % 128);
        let (quarter, t) = (l / 32, l % 32);
        let ql = self.ql[64 * half + 32 * (quarter % 2) + t];
        let low = if quarter < 2 { ql & 0x0F } else { ql >> 4 };
        let high = (self.qh[32 * half + t] >> (2 * quarter)) & 3;
        i32::from(low | (high << 4))
    }
}

/// The sums of each 32 inputs of a super-block, from its sums of 16.
fn sums_of_32(y: &Q8K) -> [i32; 8] {
    std::array::from_fn(|k| i32::from(y.bsums[2 * k]) + i32::from(y.bsums[2 * k + 1]))
}

/// The sum of eight lanes in the SIMD kernels' order.
fn hsum8(a: [f32; 8]) -> f32 {
    let h = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    let q = [h[0] + h[2], h[1] + h[3]];
    q[0] + q[1]
}

/// Adds super-block sums to the eight f32 lanes: `d * s[l]` to lane `l`.
fn add_lanes(acc: &mut [f32; 8], d: f32, s: [i32; 8]) {
    for (a, s) in acc.iter_mut().zip(s) {
        *a = d.mul_add(s as f32, *a);
    }
}

impl GgmlType for Q8K {
    const DTYPE: GgmlDType = GgmlDType::Q8K;
    const BLCK_SIZE: usize = QK_K;
    type VecDotType = Q8K;

    fn to_float(xs: &[Self], ys: &mut [f32]) {
        for (x, y) in xs.iter().zip(ys.chunks_exact_mut(QK_K)) {
            for (q, v) in x.qs.iter().zip(y.iter_mut()) {
                *v = f32::from(*q) * x.d;
            }
        }
    }

    /// ggml's `quantize_row_q8_K_ref`: the value of largest magnitude maps
    /// to -127, rounding to nearest with ties to even.
    fn from_float(xs: &[f32], ys: &mut [Self]) {
        for (x, y) in xs.chunks_exact(QK_K).zip(ys.iter_mut()) {
            let (mut max, mut amax) = (0f32, 0f32);
            for &v in x {
                if amax < v.abs() {
                    amax = v.abs();
                    max = v;
                }
            }
            if amax == 0.0 {
                y.d = 0.0;
                y.qs = [0; QK_K];
                y.bsums = [0; QK_K / 16];
                continue;
            }
            let iscale = -127.0 / max;
            for (q, &v) in y.qs.iter_mut().zip(x) {
                // |iscale * v| <= 127: no saturation.
                *q = super::round_even(iscale * v).min(127) as i8;
            }
            for (j, s) in y.bsums.iter_mut().enumerate() {
                *s = y.qs[16 * j..16 * (j + 1)]
                    .iter()
                    .map(|&q| i16::from(q))
                    .sum();
            }
            y.d = 1.0 / iscale;
        }
    }

    fn vec_dot(n: usize, xs: &[Self], ys: &[Self]) -> f32 {
        Self::vec_dot_unopt(n, xs, ys)
    }

    fn vec_dot_unopt(n: usize, xs: &[Self], ys: &[Self]) -> f32 {
        xs.iter()
            .zip(ys)
            .take(n / QK_K)
            .map(|(x, y)| {
                let s: i32 =
                    x.qs.iter()
                        .zip(&y.qs)
                        .map(|(&a, &b)| i32::from(a) * i32::from(b))
                        .sum();
                s as f32 * x.d * y.d
            })
            .sum()
    }
}

/// `vec_dot` and `vec_dot_4` of a K-quant with SIMD kernels.
macro_rules! simd_dots {
    ($name:literal, $module:ident) => {
        fn vec_dot(n: usize, xs: &[Self], ys: &[Q8K]) -> f32 {
            check_len($name, n, xs.len().min(ys.len()));
            #[cfg(target_arch = "x86_64")]
            if super::simd::available() {
                #[allow(unsafe_code)]
                // SAFETY: the CPU has the features (checked above); both
                // slices hold at least n / 256 blocks (checked above).
                return unsafe {
                    $module::dot::<1, 1>(n / QK_K, [xs.as_ptr()], [ys.as_ptr()])[0][0]
                };
            }
            Self::vec_dot_unopt(n, xs, ys)
        }

        fn vec_dot_4(
            n: usize,
            xs0: &[Self],
            xs1: &[Self],
            xs2: &[Self],
            xs3: &[Self],
            ys: &[Q8K],
        ) -> (f32, f32, f32, f32) {
            let [a, b, c, d] = super::vec_dot_4(n, [xs0, xs1, xs2, xs3], ys);
            (a, b, c, d)
        }
    };
}

impl GgmlType for Q4K {
    const DTYPE: GgmlDType = GgmlDType::Q4K;
    const BLCK_SIZE: usize = QK_K;
    type VecDotType = Q8K;

    fn to_float(xs: &[Self], ys: &mut [f32]) {
        for (x, y) in xs.iter().zip(ys.chunks_exact_mut(QK_K)) {
            let (sc, m) = x.scales_mins();
            let (d, dmin) = (x.d.to_f32(), x.dmin.to_f32());
            for (p, v) in y.iter_mut().enumerate() {
                let (ds, dm) = (d * f32::from(sc[p / 32]), dmin * f32::from(m[p / 32]));
                *v = ds * x.code(p) as f32 - dm;
            }
        }
    }

    /// candle's quantizer (ggml's `quantize_row_q4_K_ref`): weights are
    /// read from files; this is for tests and for the trait.
    fn from_float(xs: &[f32], ys: &mut [Self]) {
        BlockQ4K::from_float(xs, as_candle(ys));
    }

    simd_dots!("Q4_K", q4k);

    fn vec_dot_unopt(n: usize, xs: &[Self], ys: &[Q8K]) -> f32 {
        let mut acc = [0f32; 8];
        for (x, y) in xs.iter().zip(ys).take(n / QK_K) {
            let (sc, m) = x.scales_mins();
            let mut s = [0i32; 8];
            for p in 0..QK_K {
                s[(p % 32) / 4] += i32::from(sc[p / 32]) * x.code(p) * i32::from(y.qs[p]);
            }
            add_lanes(&mut acc, x.d.to_f32() * y.d, s);
            let q8 = sums_of_32(y);
            let mut mins = [0i32; 8];
            for (k, s) in mins.iter_mut().enumerate().take(4) {
                let [a, b] = [2 * k, 2 * k + 1];
                *s = i32::from(m[a]) * q8[a] + i32::from(m[b]) * q8[b];
            }
            // Only lanes 0..4 take the minima (the kernels add zeros to the
            // others, which changes nothing).
            let dm = -(x.dmin.to_f32() * y.d);
            for (a, s) in acc.iter_mut().zip(mins).take(4) {
                *a = dm.mul_add(s as f32, *a);
            }
        }
        hsum8(acc)
    }
}

impl GgmlType for Q6K {
    const DTYPE: GgmlDType = GgmlDType::Q6K;
    const BLCK_SIZE: usize = QK_K;
    type VecDotType = Q8K;

    fn to_float(xs: &[Self], ys: &mut [f32]) {
        for (x, y) in xs.iter().zip(ys.chunks_exact_mut(QK_K)) {
            let d = x.d.to_f32();
            for (p, v) in y.iter_mut().enumerate() {
                *v = d * f32::from(x.scales[p / 16]) * (x.code(p) - 32) as f32;
            }
        }
    }

    /// candle's quantizer (ggml's `quantize_row_q6_K_ref`), as for Q4_K.
    fn from_float(xs: &[f32], ys: &mut [Self]) {
        BlockQ6K::from_float(xs, as_candle(ys));
    }

    simd_dots!("Q6_K", q6k);

    fn vec_dot_unopt(n: usize, xs: &[Self], ys: &[Q8K]) -> f32 {
        let mut acc = [0f32; 8];
        for (x, y) in xs.iter().zip(ys).take(n / QK_K) {
            let mut s = [0i32; 8];
            for p in 0..QK_K {
                s[(p % 32) / 4] +=
                    i32::from(x.scales[p / 16]) * (x.code(p) - 32) * i32::from(y.qs[p]);
            }
            add_lanes(&mut acc, x.d.to_f32() * y.d, s);
        }
        hsum8(acc)
    }
}

macro_rules! four_rows {
    ($t:ty, $name:literal, $module:ident) => {
        #[allow(unsafe_code)]
        impl FourRows for $t {
            const NAME: &'static str = $name;

            #[cfg(target_arch = "x86_64")]
            unsafe fn dot_4(nb: usize, x: [*const Self; 4], y: *const Q8K) -> [f32; 4] {
                // SAFETY: the caller's.
                unsafe { $module::dot::<4, 1>(nb, x, [y])[0] }
            }

            #[cfg(target_arch = "x86_64")]
            unsafe fn dot_4x2(nb: usize, x: [*const Self; 4], y: [*const Q8K; 2]) -> [[f32; 4]; 2] {
                // SAFETY: the caller's.
                unsafe { $module::dot::<4, 2>(nb, x, y) }
            }

            #[cfg(target_arch = "x86_64")]
            unsafe fn dot_4x4(nb: usize, x: [*const Self; 4], y: [*const Q8K; 4]) -> [[f32; 4]; 4] {
                // SAFETY: the caller's.
                unsafe { $module::dot_4x4(nb, x, y) }
            }
        }
    };
}

four_rows!(Q4K, "Q4_K", q4k);
four_rows!(Q6K, "Q6_K", q6k);

/// What both K-quant kernels share: loads, lane sums, dispatch.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod common {
    pub(super) use super::super::simd::{f32_of, hsum, vnni};
    pub(super) use std::arch::x86_64::*;

    /// The eight i32 lanes of a 512-bit sum: its two halves added (exact).
    #[inline(always)]
    pub(super) unsafe fn fold(s: __m512i) -> __m256i {
        _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64::<1>(s))
    }

    /// Asks for the lines of the super-block two past block `i` of a
    /// weight row: decode reads each weight once, from memory, and the
    /// hardware prefetcher alone leaves the core waiting (a prefetch past
    /// the row's end is harmless: it never faults).
    #[inline(always)]
    pub(super) unsafe fn prefetch<T>(row: *const T, i: usize) {
        let at = row.wrapping_add(i + 2).cast::<i8>();
        for line in 0..std::mem::size_of::<T>().div_ceil(64) {
            _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(64 * line));
        }
    }

    /// `[a; 16] ++ [b; 16]` as i16s.
    #[inline(always)]
    pub(super) unsafe fn two_scales(a: i16, b: i16) -> __m512i {
        _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm256_set1_epi16(a)),
            _mm256_set1_epi16(b),
        )
    }

    /// `dispatch!(kernel)`: `dot` (AVX-512 VNNI where the CPU has it, else
    /// AVX2) and `dot_4x4` (one AVX-512 kernel, or two AVX2 ones of two
    /// inputs, whose 16 registers would not hold four).
    macro_rules! dispatch {
        ($t:ty, $kernel:ident) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            pub(super) unsafe fn dot_avx2<const R: usize, const C: usize>(
                nb: usize,
                x: [*const $t; R],
                y: [*const Q8K; C],
            ) -> [[f32; R]; C] {
                $kernel::<R, C, false>(nb, x, y)
            }

            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
            pub(super) unsafe fn dot_vnni<const R: usize, const C: usize>(
                nb: usize,
                x: [*const $t; R],
                y: [*const Q8K; C],
            ) -> [[f32; R]; C] {
                $kernel::<R, C, true>(nb, x, y)
            }

            /// # Safety
            /// The CPU has AVX2, FMA and F16C; every pointer has `nb`
            /// blocks after it.
            #[inline(always)]
            pub(super) unsafe fn dot<const R: usize, const C: usize>(
                nb: usize,
                x: [*const $t; R],
                y: [*const Q8K; C],
            ) -> [[f32; R]; C] {
                if vnni() {
                    dot_vnni::<R, C>(nb, x, y)
                } else {
                    dot_avx2::<R, C>(nb, x, y)
                }
            }

            /// # Safety
            /// As [`dot`].
            #[inline(always)]
            pub(super) unsafe fn dot_4x4(
                nb: usize,
                x: [*const $t; 4],
                y: [*const Q8K; 4],
            ) -> [[f32; 4]; 4] {
                if vnni() {
                    return dot_vnni::<4, 4>(nb, x, y);
                }
                let [a, b] = dot_avx2::<4, 2>(nb, x, [y[0], y[1]]);
                let [c, d] = dot_avx2::<4, 2>(nb, x, [y[2], y[3]]);
                [a, b, c, d]
            }
        };
    }
    pub(super) use dispatch;
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod q4k {
    use super::common::*;
    use super::{Q4K, Q8K};

    /// `R` weight rows against `C` inputs over `nb` super-blocks. With
    /// `WIDE` (AVX-512 VNNI) each step takes 64 values: u8 x i8 pairs into
    /// i16, then i16 pairs times the sub-block's scale into i32 in one
    /// instruction; else 32 values with AVX2. The integer sums land in the
    /// same eight lanes either way.
    // Indexed loops over rows, inputs and chunks: the chunk index also
    // picks nibbles and scales.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn kernel<const R: usize, const C: usize, const WIDE: bool>(
        nb: usize,
        x: [*const Q4K; R],
        y: [*const Q8K; C],
    ) -> [[f32; R]; C] {
        // Plain loops, no closures: a closure would not inherit the
        // caller's target features, and its intrinsics would not inline.
        let mut acc = [[_mm256_setzero_ps(); R]; C];
        let low = _mm256_set1_epi8(0x0F);
        for i in 0..nb {
            let mut sc = [[0i16; 8]; R];
            let mut mins = [_mm_setzero_si128(); R];
            let mut dw = [0f32; R];
            let mut dmin = [0f32; R];
            for r in 0..R {
                prefetch(x[r], i);
                let b = &*x[r].add(i);
                let (s, m) = b.scales_mins();
                for j in 0..8 {
                    sc[r][j] = i16::from(s[j]);
                }
                mins[r] = _mm_cvtepu8_epi16(_mm_loadl_epi64(m.as_ptr().cast()));
                dw[r] = f32_of(b.d);
                dmin[r] = f32_of(b.dmin);
            }
            let mut sums = [[_mm256_setzero_si256(); R]; C];
            if WIDE {
                let mut wide = [[_mm512_setzero_si512(); R]; C];
                for j in 0..4 {
                    let mut codes = [_mm512_setzero_si512(); R];
                    let mut scales = [_mm512_setzero_si512(); R];
                    for r in 0..R {
                        let b = &*x[r].add(i);
                        let q = _mm256_loadu_si256(b.qs.as_ptr().add(32 * j).cast());
                        let z = _mm512_inserti64x4::<1>(
                            _mm512_castsi256_si512(_mm256_and_si256(q, low)),
                            _mm256_and_si256(_mm256_srli_epi16::<4>(q), low),
                        );
                        codes[r] = z;
                        scales[r] = two_scales(sc[r][2 * j], sc[r][2 * j + 1]);
                    }
                    for c in 0..C {
                        let yb = &*y[c].add(i);
                        let qy = _mm512_loadu_si512(yb.qs.as_ptr().add(64 * j).cast());
                        for r in 0..R {
                            let p = _mm512_maddubs_epi16(codes[r], qy);
                            wide[c][r] = _mm512_dpwssd_epi32(wide[c][r], p, scales[r]);
                        }
                    }
                }
                for c in 0..C {
                    for r in 0..R {
                        sums[c][r] = fold(wide[c][r]);
                    }
                }
            } else {
                for t in 0..8 {
                    let mut codes = [_mm256_setzero_si256(); R];
                    let mut scales = [_mm256_setzero_si256(); R];
                    for r in 0..R {
                        let b = &*x[r].add(i);
                        let q = _mm256_loadu_si256(b.qs.as_ptr().add(32 * (t / 2)).cast());
                        codes[r] = if t % 2 == 0 {
                            _mm256_and_si256(q, low)
                        } else {
                            _mm256_and_si256(_mm256_srli_epi16::<4>(q), low)
                        };
                        scales[r] = _mm256_set1_epi16(sc[r][t]);
                    }
                    for c in 0..C {
                        let yb = &*y[c].add(i);
                        let qy = _mm256_loadu_si256(yb.qs.as_ptr().add(32 * t).cast());
                        for r in 0..R {
                            // Pairs of products are at most 2 * 15 * 127:
                            // no saturation.
                            let p = _mm256_maddubs_epi16(codes[r], qy);
                            let s = _mm256_madd_epi16(p, scales[r]);
                            sums[c][r] = _mm256_add_epi32(sums[c][r], s);
                        }
                    }
                }
            }
            for c in 0..C {
                let yb = &*y[c].add(i);
                let b16 = _mm256_loadu_si256(yb.bsums.as_ptr().cast());
                let q8 = _mm_hadd_epi16(
                    _mm256_castsi256_si128(b16),
                    _mm256_extracti128_si256::<1>(b16),
                );
                for r in 0..R {
                    let d = _mm256_set1_ps(dw[r] * yb.d);
                    acc[c][r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sums[c][r]), acc[c][r]);
                    let m = _mm256_zextsi128_si256(_mm_madd_epi16(mins[r], q8));
                    let dm = _mm256_set1_ps(-(dmin[r] * yb.d));
                    acc[c][r] = _mm256_fmadd_ps(dm, _mm256_cvtepi32_ps(m), acc[c][r]);
                }
            }
        }
        let mut out = [[0f32; R]; C];
        for c in 0..C {
            for r in 0..R {
                out[c][r] = hsum(acc[c][r]);
            }
        }
        out
    }

    dispatch!(Q4K, kernel);
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod q6k {
    use super::common::*;
    use super::{Q6K, Q8K};

    /// As the Q4_K kernel; the codes are 0..64 and `32 Σ q_x` is taken off
    /// each i16 pair before the scales (pairs of products are at most
    /// 2 * 63 * 127: no saturation).
    #[inline(always)]
    unsafe fn kernel<const R: usize, const C: usize, const WIDE: bool>(
        nb: usize,
        x: [*const Q6K; R],
        y: [*const Q8K; C],
    ) -> [[f32; R]; C] {
        // Plain loops, no closures (see the Q4_K kernel).
        let mut acc = [[_mm256_setzero_ps(); R]; C];
        for i in 0..nb {
            let mut dw = [0f32; R];
            for r in 0..R {
                prefetch(x[r], i);
                dw[r] = f32_of((*x[r].add(i)).d);
            }
            let mut sums = [[_mm256_setzero_si256(); R]; C];
            if WIDE {
                let mut wide = [[_mm512_setzero_si512(); R]; C];
                let low = _mm512_set1_epi8(0x0F);
                let two = _mm512_set1_epi8(0x30);
                for g in 0..4 {
                    let mut codes = [_mm512_setzero_si512(); R];
                    let mut scales = [_mm512_setzero_si512(); R];
                    // Sub-blocks 4g..4g + 4, eight i16 lanes each.
                    let pick = _mm512_set_epi64(
                        0x0003_0003_0003_0003 + 0x0001_0001_0001_0001 * (4 * g as i64),
                        0x0003_0003_0003_0003 + 0x0001_0001_0001_0001 * (4 * g as i64),
                        0x0002_0002_0002_0002 + 0x0001_0001_0001_0001 * (4 * g as i64),
                        0x0002_0002_0002_0002 + 0x0001_0001_0001_0001 * (4 * g as i64),
                        0x0001_0001_0001_0001 + 0x0001_0001_0001_0001 * (4 * g as i64),
                        0x0001_0001_0001_0001 + 0x0001_0001_0001_0001 * (4 * g as i64),
                        0x0001_0001_0001_0001 * (4 * g as i64),
                        0x0001_0001_0001_0001 * (4 * g as i64),
                    );
                    for r in 0..R {
                        let b = &*x[r].add(i);
                        let a = _mm512_loadu_si512(b.ql.as_ptr().add(64 * (g / 2)).cast());
                        let h = _mm256_loadu_si256(b.qh.as_ptr().add(32 * (g / 2)).cast());
                        let hz = _mm512_inserti64x4::<1>(
                            _mm512_castsi256_si512(h),
                            _mm256_srli_epi16::<2>(h),
                        );
                        codes[r] = if g % 2 == 0 {
                            _mm512_or_si512(
                                _mm512_and_si512(a, low),
                                _mm512_and_si512(_mm512_slli_epi16::<4>(hz), two),
                            )
                        } else {
                            _mm512_or_si512(
                                _mm512_and_si512(_mm512_srli_epi16::<4>(a), low),
                                _mm512_and_si512(hz, two),
                            )
                        };
                        let s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(b.scales.as_ptr().cast()));
                        scales[r] = _mm512_permutexvar_epi16(pick, _mm512_castsi256_si512(s16));
                    }
                    for c in 0..C {
                        let yb = &*y[c].add(i);
                        let qy = _mm512_loadu_si512(yb.qs.as_ptr().add(64 * g).cast());
                        let offset = _mm512_maddubs_epi16(_mm512_set1_epi8(32), qy);
                        for r in 0..R {
                            let p = _mm512_sub_epi16(_mm512_maddubs_epi16(codes[r], qy), offset);
                            wide[c][r] = _mm512_dpwssd_epi32(wide[c][r], p, scales[r]);
                        }
                    }
                }
                for c in 0..C {
                    for r in 0..R {
                        sums[c][r] = fold(wide[c][r]);
                    }
                }
            } else {
                let low = _mm256_set1_epi8(0x0F);
                let two = _mm256_set1_epi8(0x30);
                for t in 0..8 {
                    let (half, quarter) = (t / 4, t % 4);
                    let mut codes = [_mm256_setzero_si256(); R];
                    let mut scales = [_mm256_setzero_si256(); R];
                    for r in 0..R {
                        let b = &*x[r].add(i);
                        let ql = _mm256_loadu_si256(
                            b.ql.as_ptr().add(64 * half + 32 * (quarter % 2)).cast(),
                        );
                        let h = _mm256_loadu_si256(b.qh.as_ptr().add(32 * half).cast());
                        let lo = if quarter < 2 {
                            _mm256_and_si256(ql, low)
                        } else {
                            _mm256_and_si256(_mm256_srli_epi16::<4>(ql), low)
                        };
                        let hi = match quarter {
                            0 => _mm256_slli_epi16::<4>(h),
                            1 => _mm256_slli_epi16::<2>(h),
                            2 => h,
                            _ => _mm256_srli_epi16::<2>(h),
                        };
                        codes[r] = _mm256_or_si256(lo, _mm256_and_si256(hi, two));
                        scales[r] = _mm256_set_m128i(
                            _mm_set1_epi16(i16::from(b.scales[2 * t + 1])),
                            _mm_set1_epi16(i16::from(b.scales[2 * t])),
                        );
                    }
                    for c in 0..C {
                        let yb = &*y[c].add(i);
                        let qy = _mm256_loadu_si256(yb.qs.as_ptr().add(32 * t).cast());
                        let offset = _mm256_maddubs_epi16(_mm256_set1_epi8(32), qy);
                        for r in 0..R {
                            let p = _mm256_sub_epi16(_mm256_maddubs_epi16(codes[r], qy), offset);
                            let s = _mm256_madd_epi16(p, scales[r]);
                            sums[c][r] = _mm256_add_epi32(sums[c][r], s);
                        }
                    }
                }
            }
            for c in 0..C {
                let yb = &*y[c].add(i);
                for r in 0..R {
                    let d = _mm256_set1_ps(dw[r] * yb.d);
                    acc[c][r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sums[c][r]), acc[c][r]);
                }
            }
        }
        let mut out = [[0f32; R]; C];
        for c in 0..C {
            for r in 0..R {
                out[c][r] = hsum(acc[c][r]);
            }
        }
        out
    }

    dispatch!(Q6K, kernel);
}

#[cfg(test)]
mod tests {
    use super::super::tests::{blocks_of, dequantized_dot, rows_alone_and_together, values};
    use super::*;

    /// The weights dequantize as candle's blocks of the same bytes do, and
    /// the inputs round trip within half a step.
    #[test]
    fn blocks_hold_what_ggml_puts_in_them() {
        let v = values(4 * QK_K, 3);
        let (q4, back4) = blocks_of::<Q4K>(&v);
        let mut candle4 = vec![0f32; v.len()];
        BlockQ4K::to_float(as_candle::<Q4K, BlockQ4K>(&mut q4.clone()), &mut candle4);
        assert_eq!(back4, candle4);
        let (q6, back6) = blocks_of::<Q6K>(&v);
        let mut candle6 = vec![0f32; v.len()];
        BlockQ6K::to_float(as_candle::<Q6K, BlockQ6K>(&mut q6.clone()), &mut candle6);
        assert_eq!(back6, candle6);
        let (q8, back8) = blocks_of::<Q8K>(&v);
        for (b, (a, g)) in q8.iter().zip(v.chunks(QK_K).zip(back8.chunks(QK_K))) {
            for (a, g) in a.iter().zip(g) {
                assert!((a - g).abs() <= 0.5 * b.d.abs() * 1.0001, "{a} {g}");
            }
            let sums: Vec<i16> =
                b.qs.chunks(16)
                    .map(|c| c.iter().map(|&q| i16::from(q)).sum())
                    .collect();
            assert_eq!(sums, b.bsums);
        }
    }

    /// The SIMD product (where the CPU has one) and the portable loop have
    /// the same bits, and both are the dot product of the values the
    /// blocks stand for.
    fn products_agree<T: GgmlType<VecDotType = Q8K>>() {
        for (n, seed) in [(256, 1), (4864, 2), (8960, 3)] {
            let (w, w_back) = blocks_of::<T>(&values(n, seed));
            let (xq, x_back) = blocks_of::<Q8K>(&values(n, seed + 100));
            let exact = dequantized_dot(&w_back, &x_back);
            let fast = T::vec_dot(n, &w, &xq);
            let slow = T::vec_dot_unopt(n, &w, &xq);
            let scale: f64 = w_back.iter().map(|v| f64::from(v.abs())).sum::<f64>() + 1.0;
            assert!(
                (f64::from(slow) - exact).abs() < 1e-5 * scale,
                "{:?} {slow} {exact}",
                T::DTYPE
            );
            assert_eq!(fast.to_bits(), slow.to_bits(), "{:?} {n}", T::DTYPE);
        }
    }

    #[test]
    fn the_fast_and_portable_products_agree_with_the_dequantized_one() {
        products_agree::<Q4K>();
        products_agree::<Q6K>();
    }

    /// Four rows at once, and several input rows, have each row's bits
    /// alone (what batching relies on), for row counts that use every
    /// tile and a weight row count that is not a multiple of four.
    fn same_bits_alone_and_together<T: FourRows + GgmlType<VecDotType = Q8K>>() {
        let n = 4864;
        let rows: Vec<_> = (0..4)
            .map(|r| blocks_of::<T>(&values(n, 20 + r)).0)
            .collect();
        let (xq, _) = blocks_of::<Q8K>(&values(n, 30));
        let (a, b, c, d) = T::vec_dot_4(n, &rows[0], &rows[1], &rows[2], &rows[3], &xq);
        for (got, row) in [a, b, c, d].into_iter().zip(&rows) {
            assert_eq!(got.to_bits(), T::vec_dot(n, row, &xq).to_bits());
        }
        let (k, n) = (512, 14);
        let (w, _) = blocks_of::<T>(&values(n * k, 40));
        rows_alone_and_together((k, n), &w, &[1, 2, 3, 4, 5, 7, 8]);
    }

    #[test]
    fn rows_have_the_same_bits_alone_and_together() {
        same_bits_alone_and_together::<Q4K>();
        same_bits_alone_and_together::<Q6K>();
    }

    /// With AVX-512 VNNI the kernels give exactly the AVX2 kernels' bits,
    /// for every tile shape.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vnni_kernels_give_the_avx2_bits() {
        if !super::super::simd::vnni() {
            eprintln!("this CPU has no AVX-512 VNNI: only the AVX2 kernels run here");
            return;
        }
        let nb = 8960 / QK_K;
        let v: Vec<Vec<f32>> = (0..4).map(|r| values(nb * QK_K, 60 + r)).collect();
        let ys: Vec<Vec<Q8K>> = (0..4)
            .map(|c| blocks_of::<Q8K>(&values(nb * QK_K, 70 + c)).0)
            .collect();
        let y = [0, 1, 2, 3].map(|c| ys[c].as_ptr());
        let q4: Vec<Vec<Q4K>> = v.iter().map(|v| blocks_of::<Q4K>(v).0).collect();
        let q6: Vec<Vec<Q6K>> = v.iter().map(|v| blocks_of::<Q6K>(v).0).collect();
        let x4 = [0, 1, 2, 3].map(|r| q4[r].as_ptr());
        let x6 = [0, 1, 2, 3].map(|r| q6[r].as_ptr());
        #[allow(unsafe_code)]
        // SAFETY: the CPU has both feature sets (checked above); every
        // pointer has nb blocks after it.
        unsafe {
            let bits = |a: [[f32; 4]; 2]| a.map(|r| r.map(f32::to_bits));
            let wide4 = q4k::dot_4x4(nb, x4, y);
            let wide6 = q6k::dot_4x4(nb, x6, y);
            for half in 0..2 {
                let yy = [y[2 * half], y[2 * half + 1]];
                let narrow4 = q4k::dot_avx2::<4, 2>(nb, x4, yy);
                let narrow6 = q6k::dot_avx2::<4, 2>(nb, x6, yy);
                assert_eq!(bits(narrow4), bits([wide4[2 * half], wide4[2 * half + 1]]));
                assert_eq!(bits(narrow6), bits([wide6[2 * half], wide6[2 * half + 1]]));
            }
        }
    }

    #[test]
    #[should_panic(expected = "Q4_K product")]
    fn a_product_longer_than_its_blocks_is_refused() {
        let (w, _) = blocks_of::<Q4K>(&values(256, 9));
        let (xq, _) = blocks_of::<Q8K>(&values(256, 10));
        let _ = Q4K::vec_dot(512, &w, &xq);
    }
}
