//! Q5_0 products on the file's own blocks.
//!
//! candle stores Q5_0 but multiplies it with a scalar loop, so the engine
//! used to repack it into Q8_0 at load time: 1.55x the bytes to read for
//! every token, and a second rounding of every weight. Most tensors of
//! Qwen2.5-0.5B's Q4_K_M file are Q5_0 (its rows of 896 values are not
//! whole K-quant super-blocks).
//!
//! The arithmetic is ggml's: the input row is quantized to 8 bits in blocks
//! of 32 ([`Q8_0`]) and each weight block contributes
//! `d_w * d_x * Σ (q_w - 16) q_x`, the integer sum exact.

use candle_core::quantized::k_quants::GgmlType;
use candle_core::quantized::GgmlDType;
use half::f16;

use super::{check_len, dequantize_q8, quantize_q8, FourRows, QK};

/// A Q5_0 block as ggml lays it out: scale, the fifth bits of the 32
/// values (bit `j` for value `j`), then their low four bits as nibbles
/// (values `j` and `j + 16` share byte `j`, low nibble first). A value is
/// `d * (code - 16)`.
#[derive(Debug, Clone, PartialEq)]
#[repr(C)]
pub(in crate::engine) struct Q5_0 {
    d: f16,
    qh: [u8; 4],
    qs: [u8; QK / 2],
}

/// The input side of a Q5_0 product: 32 signed bytes and their scale.
#[derive(Debug, Clone, PartialEq)]
#[repr(C)]
pub(in crate::engine) struct Q8_0 {
    d: f16,
    qs: [i8; QK],
}

const _: () = assert!(std::mem::size_of::<Q5_0>() == 22);
const _: () = assert!(std::mem::size_of::<Q8_0>() == 34);

impl Q5_0 {
    /// The 5-bit code of value `j`, 0..32.
    fn code(&self, j: usize) -> i32 {
        let nibble = if j < QK / 2 {
            self.qs[j] & 0x0F
        } else {
            self.qs[j - QK / 2] >> 4
        };
        let high = (u32::from_le_bytes(self.qh) >> j) & 1;
        i32::from(nibble) | (high as i32) << 4
    }
}

/// `vec_dot` and `vec_dot_4` of a format multiplied by [`avx2::dot`].
macro_rules! simd_dots {
    ($name:literal) => {
        fn vec_dot(n: usize, xs: &[Self], ys: &[Q8_0]) -> f32 {
            check_len($name, n, xs.len().min(ys.len()));
            #[cfg(target_arch = "x86_64")]
            if super::simd::available() {
                #[allow(unsafe_code)]
                // SAFETY: the CPU has the features (checked above); both
                // slices hold at least n / 32 blocks (checked by `check_len`).
                return unsafe {
                    avx2::dot::<Self, 1, 1>(n / QK, [xs.as_ptr()], [ys.as_ptr()])[0][0]
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
            ys: &[Q8_0],
        ) -> (f32, f32, f32, f32) {
            let [a, b, c, d] = super::vec_dot_4(n, [xs0, xs1, xs2, xs3], ys);
            (a, b, c, d)
        }
    };
}

impl GgmlType for Q8_0 {
    const DTYPE: GgmlDType = GgmlDType::Q8_0;
    const BLCK_SIZE: usize = QK;
    type VecDotType = Q8_0;

    fn to_float(xs: &[Self], ys: &mut [f32]) {
        for (x, y) in xs.iter().zip(ys.chunks_exact_mut(QK)) {
            dequantize_q8(&x.qs, x.d, y);
        }
    }

    /// ggml's `quantize_row_q8_0`.
    fn from_float(xs: &[f32], ys: &mut [Self]) {
        for (x, y) in xs.chunks_exact(QK).zip(ys.iter_mut()) {
            y.d = f16::from_f32(quantize_q8(x, &mut y.qs).0);
        }
    }

    simd_dots!("Q8_0");

    fn vec_dot_unopt(n: usize, xs: &[Self], ys: &[Self]) -> f32 {
        let mut acc = [0f32; 8];
        for (x, y) in xs.iter().zip(ys).take(n / QK) {
            let d = x.d.to_f32() * y.d.to_f32();
            let products = (0..QK).map(|j| i32::from(x.qs[j]) * i32::from(y.qs[j]));
            lanes(&mut acc, d, products);
        }
        hsum8(acc)
    }
}

/// Adds `d * s` to each of eight f32 lanes, `s` the sum of four
/// consecutive integer products: the order of the SIMD kernels, so that
/// the portable loop gives the same bits.
fn lanes(acc: &mut [f32; 8], d: f32, products: impl Iterator<Item = i32>) {
    let mut sums = [0i32; 8];
    for (j, p) in products.enumerate() {
        sums[j / 4] += p;
    }
    for (a, s) in acc.iter_mut().zip(sums) {
        *a = d.mul_add(s as f32, *a);
    }
}

/// The sum of eight lanes in the SIMD kernels' order.
fn hsum8(a: [f32; 8]) -> f32 {
    let h = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    let q = [h[0] + h[2], h[1] + h[3]];
    q[0] + q[1]
}

impl GgmlType for Q5_0 {
    const DTYPE: GgmlDType = GgmlDType::Q5_0;
    const BLCK_SIZE: usize = QK;
    type VecDotType = Q8_0;

    fn to_float(xs: &[Self], ys: &mut [f32]) {
        for (x, y) in xs.iter().zip(ys.chunks_exact_mut(QK)) {
            let d = x.d.to_f32();
            for (j, v) in y.iter_mut().enumerate() {
                *v = (x.code(j) - 16) as f32 * d;
            }
        }
    }

    /// ggml's `quantize_row_q5_0_ref` (weights are read from files; this is
    /// for tests and for completeness of the trait).
    fn from_float(xs: &[f32], ys: &mut [Self]) {
        for (x, y) in xs.chunks_exact(QK).zip(ys.iter_mut()) {
            // The value of largest magnitude, with its sign, maps to -16.
            let max = x
                .iter()
                .copied()
                .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
            let d = max / -16.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut qh = 0u32;
            for j in 0..QK / 2 {
                let q0 = ((x[j] * id + 16.5) as u8).min(31);
                let q1 = ((x[j + QK / 2] * id + 16.5) as u8).min(31);
                y.qs[j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4);
                qh |= u32::from(q0 >> 4) << j;
                qh |= u32::from(q1 >> 4) << (j + QK / 2);
            }
            y.d = f16::from_f32(d);
            y.qh = qh.to_le_bytes();
        }
    }

    simd_dots!("Q5_0");

    fn vec_dot_unopt(n: usize, xs: &[Self], ys: &[Q8_0]) -> f32 {
        let mut acc = [0f32; 8];
        for (x, y) in xs.iter().zip(ys).take(n / QK) {
            let d = x.d.to_f32() * y.d.to_f32();
            let products = (0..QK).map(|j| (x.code(j) - 16) * i32::from(y.qs[j]));
            lanes(&mut acc, d, products);
        }
        hsum8(acc)
    }
}

macro_rules! four_rows {
    ($t:ty, $name:literal) => {
        #[allow(unsafe_code)]
        impl FourRows for $t {
            const NAME: &'static str = $name;

            #[cfg(target_arch = "x86_64")]
            unsafe fn dot_4(nb: usize, x: [*const Self; 4], y: *const Q8_0) -> [f32; 4] {
                // SAFETY: the caller's.
                unsafe { avx2::dot::<Self, 4, 1>(nb, x, [y])[0] }
            }

            #[cfg(target_arch = "x86_64")]
            unsafe fn dot_4x2(
                nb: usize,
                x: [*const Self; 4],
                y: [*const Q8_0; 2],
            ) -> [[f32; 4]; 2] {
                // SAFETY: the caller's.
                unsafe { avx2::dot::<Self, 4, 2>(nb, x, y) }
            }

            #[cfg(target_arch = "x86_64")]
            unsafe fn dot_4x4(
                nb: usize,
                x: [*const Self; 4],
                y: [*const Q8_0; 4],
            ) -> [[f32; 4]; 4] {
                // SAFETY: the caller's.
                unsafe { avx2::dot_4x4::<Self>(nb, x, y) }
            }

            #[cfg(target_arch = "x86_64")]
            fn matmul_wide(
                mkn: (usize, usize, usize),
                x: &[f32],
                w: &[Self],
                dst: &mut [f32],
            ) -> bool {
                matmul_wide(mkn, x, w, dst)
            }
        }
    };
}

four_rows!(Q5_0, "Q5_0");
four_rows!(Q8_0, "Q8_0");

/// [`FourRows::matmul_wide`] of a format here: several input rows by
/// the AVX-512 VNNI kernel, every input pair and every weight pair built
/// once ([`avx2::WideIn`], [`avx2::WideW`]). `false` (nothing done) on
/// CPUs without VNNI.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
fn matmul_wide<T: avx2::Symmetric + FourRows + GgmlType<VecDotType = Q8_0>>(
    (m, k, n): (usize, usize, usize),
    x: &[f32],
    w: &[T],
    dst: &mut [f32],
) -> bool {
    if !super::simd::vnni() {
        return false;
    }
    let nb = k / QK;
    let pairs = nb.div_ceil(2);
    // The caller checked the sizes; these asserts keep the raw reads below
    // in bounds whatever it does.
    assert!(
        k.is_multiple_of(QK) && w.len() >= n * nb && x.len() >= m * k && dst.len() >= m * n,
        "a {} product of ({m}, {k}) by ({n}, {k})",
        T::NAME
    );
    let mut xq = vec![Q8_0::zeros(); m * nb];
    for (row, q) in x.chunks_exact(k).zip(xq.chunks_exact_mut(nb)).take(m) {
        Q8_0::from_float(row, q);
    }
    let mut ins: Vec<avx2::WideIn> = Vec::with_capacity(m * pairs);
    for r in 0..m {
        // SAFETY: the CPU has VNNI (checked above); row r of `xq` has nb
        // blocks; `ins` has room for m * pairs entries, and each is
        // written before `set_len` counts it.
        unsafe {
            avx2::wide_inputs::<T>(nb, xq[r * nb..].as_ptr(), ins.as_mut_ptr().add(r * pairs))
        };
    }
    // SAFETY: every entry was written above.
    unsafe { ins.set_len(m * pairs) };
    let ins = &ins;
    let out = crate::engine::par::SharedOut::new(dst);
    let out = &out;
    let quads = n / 4;
    candle_core::utils::barrier_pool().execute_chunked(quads, |range| {
        let mut ws: Vec<[avx2::WideW; 4]> = Vec::with_capacity(pairs);
        for quad in range {
            let col = 4 * quad;
            let rows = [0, 1, 2, 3].map(|j| w[(col + j) * nb..].as_ptr());
            // SAFETY: as above; every row has nb blocks (w holds n * nb).
            unsafe {
                avx2::wide_weights::<T>(nb, rows, ws.as_mut_ptr());
                ws.set_len(pairs);
            }
            let mut r = 0;
            while r + 4 <= m {
                let ys = [0, 1, 2, 3].map(|j| ins[(r + j) * pairs..].as_ptr());
                // SAFETY: `ws` and every input row hold `pairs` entries.
                let v = unsafe { avx2::wide_tile::<4>(pairs, ws.as_ptr(), ys) };
                for (j, v) in v.iter().enumerate() {
                    out.put((r + j) * n + col, v);
                }
                r += 4;
            }
            while r < m {
                // SAFETY: as above.
                let v = unsafe {
                    avx2::wide_tile::<1>(pairs, ws.as_ptr(), [ins[r * pairs..].as_ptr()])
                };
                out.put(r * n + col, &v[0]);
                r += 1;
            }
        }
    });
    // The last n % 4 weight rows, one by one (the same kernel, so the same
    // bits).
    for col in 4 * quads..n {
        let wr = &w[col * nb..(col + 1) * nb];
        for r in 0..m {
            out.put(r * n + col, &[T::vec_dot(k, wr, &xq[r * nb..(r + 1) * nb])]);
        }
    }
    true
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use super::super::simd::{f32_of, hsum, vnni};
    use super::{Q5_0, Q8_0};
    use std::arch::x86_64::*;

    /// A weight block with a scale and 32 values whose integer products
    /// with an input block's are summed exactly, in i32 lanes of four
    /// consecutive values.
    pub(super) trait Symmetric {
        /// The block's scale.
        fn d(&self) -> half::f16;
        /// The values, unpacked (in whatever form [`sums`](Self::sums)
        /// takes them).
        unsafe fn unpack<const WIDE: bool>(&self) -> __m256i;
        /// Σ q_w q_x in eight i32 lanes (lane `l` for values `4l..4l + 4`).
        unsafe fn sums<const WIDE: bool>(w: __m256i, qy: __m256i) -> __m256i;
        /// What the 32 values' unsigned codes ([`codes`](Self::codes)) are
        /// more than the values, in steps of `d`.
        const OFFSET: u8;
        /// The values plus [`OFFSET`](Self::OFFSET), as unsigned bytes in
        /// order (for the AVX-512 kernel, whose products are u8 x i8).
        unsafe fn codes(&self) -> __m256i;
    }

    /// Σ of u8 x i8 products in lanes of four: one instruction with VNNI,
    /// else pairs into i16 (the callers keep them from saturating) and
    /// pairs of those into i32. Both give the same integers.
    #[inline(always)]
    unsafe fn dot_u8_i8<const WIDE: bool>(a: __m256i, b: __m256i) -> __m256i {
        if WIDE {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
        } else {
            _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
        }
    }

    impl Symmetric for Q5_0 {
        #[inline(always)]
        fn d(&self) -> half::f16 {
            self.d
        }

        /// The 5-bit codes, 0..32, as bytes in order.
        #[inline(always)]
        unsafe fn unpack<const WIDE: bool>(&self) -> __m256i {
            let packed = _mm_loadu_si128(self.qs.as_ptr().cast());
            let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
            let low = _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
            let bits = u32::from_le_bytes(self.qh);
            if WIDE {
                // Add 16 to the bytes whose fifth bit is set.
                return _mm256_mask_add_epi8(low, bits, low, _mm256_set1_epi8(16));
            }
            // Byte j all ones where value j's fifth bit is set: byte j / 8
            // of the bits spread over eight bytes, each tested for its bit.
            let spread = _mm256_shuffle_epi8(
                _mm256_set1_epi32(bits as i32),
                _mm256_set_epi64x(
                    0x0303_0303_0303_0303,
                    0x0202_0202_0202_0202,
                    0x0101_0101_0101_0101,
                    0,
                ),
            );
            let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
            let set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi8(-1));
            _mm256_or_si256(low, _mm256_and_si256(set, _mm256_set1_epi8(16)))
        }

        /// Σ (code - 16) q_x as Σ code q_x - 16 Σ q_x: codes are at most
        /// 31, so pairs of u8 x i8 products stay within i16.
        #[inline(always)]
        unsafe fn sums<const WIDE: bool>(w: __m256i, qy: __m256i) -> __m256i {
            let offset = dot_u8_i8::<WIDE>(_mm256_set1_epi8(16), qy);
            _mm256_sub_epi32(dot_u8_i8::<WIDE>(w, qy), offset)
        }

        const OFFSET: u8 = 16;

        #[inline(always)]
        unsafe fn codes(&self) -> __m256i {
            self.unpack::<true>()
        }
    }

    impl Symmetric for Q8_0 {
        #[inline(always)]
        fn d(&self) -> half::f16 {
            self.d
        }

        #[inline(always)]
        unsafe fn unpack<const WIDE: bool>(&self) -> __m256i {
            _mm256_loadu_si256(self.qs.as_ptr().cast::<__m256i>())
        }

        /// |q_w| times q_x with q_w's sign: pairs of products are at most
        /// 2 * 127 * 127, within i16.
        #[inline(always)]
        unsafe fn sums<const WIDE: bool>(w: __m256i, qy: __m256i) -> __m256i {
            dot_u8_i8::<WIDE>(_mm256_sign_epi8(w, w), _mm256_sign_epi8(qy, w))
        }

        const OFFSET: u8 = 128;

        /// `q + 128`, i.e. the sign bit flipped.
        #[inline(always)]
        unsafe fn codes(&self) -> __m256i {
            let q = _mm256_loadu_si256(self.qs.as_ptr().cast::<__m256i>());
            _mm256_xor_si256(q, _mm256_set1_epi8(-128))
        }
    }

    /// `R` weight rows against `C` inputs over `nb` blocks, each weight
    /// block unpacked once for all inputs. Every result takes the same
    /// operations in the same order whatever `R` and `C` are, and with or
    /// without VNNI (the integer sums are exact either way), so a row's
    /// output has the same bits however it is computed.
    #[inline(always)]
    unsafe fn kernel<T: Symmetric, const R: usize, const C: usize, const WIDE: bool>(
        nb: usize,
        x: [*const T; R],
        y: [*const Q8_0; C],
    ) -> [[f32; R]; C] {
        // Plain loops, no closures: a closure would not inherit the
        // caller's target features, and its intrinsics would not inline.
        let mut acc = [[_mm256_setzero_ps(); R]; C];
        for i in 0..nb {
            let mut dw = [0f32; R];
            let mut qx = [_mm256_setzero_si256(); R];
            for r in 0..R {
                // As in `wide_step`.
                _mm_prefetch::<_MM_HINT_T0>(x[r].wrapping_add(i + 32).cast());
                let row = &*x[r].add(i);
                dw[r] = f32_of(row.d());
                qx[r] = row.unpack::<WIDE>();
            }
            for c in 0..C {
                let y = &*y[c].add(i);
                let dy = f32_of(y.d);
                let qy = _mm256_loadu_si256(y.qs.as_ptr().cast::<__m256i>());
                for r in 0..R {
                    let d = _mm256_set1_ps(dw[r] * dy);
                    let s = _mm256_cvtepi32_ps(T::sums::<WIDE>(qx[r], qy));
                    acc[c][r] = _mm256_fmadd_ps(d, s, acc[c][r]);
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

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx2<T: Symmetric, const R: usize, const C: usize>(
        nb: usize,
        x: [*const T; R],
        y: [*const Q8_0; C],
    ) -> [[f32; R]; C] {
        kernel::<T, R, C, false>(nb, x, y)
    }

    /// The scales of two blocks, `a` in lanes 0..8 and `b` in lanes 8..16.
    #[inline(always)]
    unsafe fn scales2(a: half::f16, b: half::f16) -> __m512 {
        let bits = i32::from(a.to_bits()) | (i32::from(b.to_bits()) << 16);
        let two = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)));
        _mm512_permutexvar_ps(
            _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
            two,
        )
    }

    /// Blocks `i` and, if `TWO`, `i + 1` of `R` weight rows against `C`
    /// inputs, added to `acc`: lanes 0..8 take block `i`, lanes 8..16
    /// block `i + 1` (or nothing: a zero product added).
    #[inline(always)]
    unsafe fn wide_step<T: Symmetric, const R: usize, const C: usize, const TWO: bool>(
        i: usize,
        x: &[*const T; R],
        y: &[*const Q8_0; C],
        acc: &mut [[__m512; R]; C],
    ) {
        let zero = half::f16::ZERO;
        let mut dw = [_mm512_setzero_ps(); R];
        let mut qx = [_mm512_setzero_si512(); R];
        for r in 0..R {
            // Decode reads each weight once, from memory, and the
            // hardware prefetcher alone leaves the core waiting: ask for
            // the line 32 blocks ahead (past the row's end is harmless, a
            // prefetch never faults).
            _mm_prefetch::<_MM_HINT_T0>(x[r].wrapping_add(i + 32).cast());
            let b0 = &*x[r].add(i);
            if TWO {
                let b1 = &*x[r].add(i + 1);
                qx[r] = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(b0.codes()), b1.codes());
                dw[r] = scales2(b0.d(), b1.d());
            } else {
                qx[r] = _mm512_zextsi256_si512(b0.codes());
                dw[r] = scales2(b0.d(), zero);
            }
        }
        for c in 0..C {
            let y0 = &*y[c].add(i);
            let q0 = _mm256_loadu_si256(y0.qs.as_ptr().cast::<__m256i>());
            let (qy, dy) = if TWO {
                let y1 = &*y[c].add(i + 1);
                let q1 = _mm256_loadu_si256(y1.qs.as_ptr().cast::<__m256i>());
                (
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q0), q1),
                    scales2(y0.d, y1.d),
                )
            } else {
                (_mm512_zextsi256_si512(q0), scales2(y0.d, zero))
            };
            // -OFFSET Σ q_x in each lane, so that one instruction per row
            // gives Σ (code - OFFSET) q_x = Σ q_w q_x, exactly.
            let offset = _mm512_dpbusd_epi32(
                _mm512_setzero_si512(),
                _mm512_set1_epi8(T::OFFSET as i8),
                qy,
            );
            let start = _mm512_sub_epi32(_mm512_setzero_si512(), offset);
            for r in 0..R {
                let s = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, qx[r], qy));
                acc[c][r] = _mm512_fmadd_ps(_mm512_mul_ps(dw[r], dy), s, acc[c][r]);
            }
        }
    }

    /// The AVX-512 VNNI form of [`kernel`]: two blocks per 512-bit step,
    /// so each (row, input) pair takes four instructions per 64 values.
    /// Its sums run in sixteen lanes (even blocks in lanes 0..8, odd ones
    /// in 8..16, added at the end), another order than the AVX2 kernel's
    /// eight: on one machine every product has the same bits however it
    /// is computed, across machines they may differ in the last bits.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn dot_vnni<T: Symmetric, const R: usize, const C: usize>(
        nb: usize,
        x: [*const T; R],
        y: [*const Q8_0; C],
    ) -> [[f32; R]; C] {
        let mut acc = [[_mm512_setzero_ps(); R]; C];
        let mut i = 0;
        while i + 2 <= nb {
            wide_step::<T, R, C, true>(i, &x, &y, &mut acc);
            i += 2;
        }
        if i < nb {
            wide_step::<T, R, C, false>(i, &x, &y, &mut acc);
        }
        let mut out = [[0f32; R]; C];
        for c in 0..C {
            for r in 0..R {
                let a = acc[c][r];
                let lo = _mm512_castps512_ps256(a);
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a)));
                out[c][r] = hsum(_mm256_add_ps(lo, hi));
            }
        }
        out
    }

    /// Two blocks of one input row as [`dot_vnni`] uses them, built once
    /// for every weight row: the 64 bytes, the two scales over sixteen
    /// lanes, and each lane's `-OFFSET Σ q_x`.
    #[repr(C, align(64))]
    pub(super) struct WideIn {
        qy: __m512i,
        dy: __m512,
        start: __m512i,
    }

    /// Two blocks of one weight row as [`dot_vnni`] unpacks them, built
    /// once for every input row.
    #[repr(C, align(64))]
    pub(super) struct WideW {
        codes: __m512i,
        dw: __m512,
    }

    /// The [`WideIn`]s of an input row of `nb` blocks, into `out`
    /// (`nb.div_ceil(2)` of them); an odd last block is paired with zeros,
    /// as in [`dot_vnni`].
    ///
    /// # Safety
    /// The CPU has AVX-512 VNNI; `y` has `nb` blocks after it and `out`
    /// room for the pairs.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn wide_inputs<T: Symmetric>(nb: usize, y: *const Q8_0, out: *mut WideIn) {
        for p in 0..nb.div_ceil(2) {
            let i = 2 * p;
            let y0 = &*y.add(i);
            let q0 = _mm256_loadu_si256(y0.qs.as_ptr().cast::<__m256i>());
            let (qy, dy) = if i + 1 < nb {
                let y1 = &*y.add(i + 1);
                let q1 = _mm256_loadu_si256(y1.qs.as_ptr().cast::<__m256i>());
                (
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q0), q1),
                    scales2(y0.d, y1.d),
                )
            } else {
                (_mm512_zextsi256_si512(q0), scales2(y0.d, half::f16::ZERO))
            };
            let offset = _mm512_dpbusd_epi32(
                _mm512_setzero_si512(),
                _mm512_set1_epi8(T::OFFSET as i8),
                qy,
            );
            let start = _mm512_sub_epi32(_mm512_setzero_si512(), offset);
            out.add(p).write(WideIn { qy, dy, start });
        }
    }

    /// The [`WideW`]s of four weight rows of `nb` blocks, pair by pair.
    ///
    /// # Safety
    /// As [`wide_inputs`], for each row.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn wide_weights<T: Symmetric>(
        nb: usize,
        x: [*const T; 4],
        out: *mut [WideW; 4],
    ) {
        for p in 0..nb.div_ceil(2) {
            let i = 2 * p;
            let mut four = [const {
                WideW {
                    codes: unsafe { std::mem::zeroed() },
                    dw: unsafe { std::mem::zeroed() },
                }
            }; 4];
            for r in 0..4 {
                let b0 = &*x[r].add(i);
                four[r] = if i + 1 < nb {
                    let b1 = &*x[r].add(i + 1);
                    WideW {
                        codes: _mm512_inserti64x4::<1>(
                            _mm512_castsi256_si512(b0.codes()),
                            b1.codes(),
                        ),
                        dw: scales2(b0.d(), b1.d()),
                    }
                } else {
                    WideW {
                        codes: _mm512_zextsi256_si512(b0.codes()),
                        dw: scales2(b0.d(), half::f16::ZERO),
                    }
                };
            }
            out.add(p).write(four);
        }
    }

    /// Four weight rows against `C` inputs on blocks built beforehand: the
    /// operations of [`dot_vnni`], in its order, without unpacking a block
    /// again for every group of inputs.
    ///
    /// # Safety
    /// The CPU has AVX-512 VNNI; `w` and each `y` have `pairs` entries.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn wide_tile<const C: usize>(
        pairs: usize,
        w: *const [WideW; 4],
        y: [*const WideIn; C],
    ) -> [[f32; 4]; C] {
        let mut acc = [[_mm512_setzero_ps(); 4]; C];
        for p in 0..pairs {
            let w = &*w.add(p);
            for c in 0..C {
                let yi = &*y[c].add(p);
                for r in 0..4 {
                    let s = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(yi.start, w[r].codes, yi.qy));
                    acc[c][r] = _mm512_fmadd_ps(_mm512_mul_ps(w[r].dw, yi.dy), s, acc[c][r]);
                }
            }
        }
        let mut out = [[0f32; 4]; C];
        for c in 0..C {
            for r in 0..4 {
                let a = acc[c][r];
                let lo = _mm512_castps512_ps256(a);
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a)));
                out[c][r] = hsum(_mm256_add_ps(lo, hi));
            }
        }
        out
    }

    /// `R` weight rows against `C` inputs, with AVX-512 VNNI where the CPU
    /// has it.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; every pointer has `nb` blocks after
    /// it.
    #[inline(always)]
    pub(super) unsafe fn dot<T: Symmetric, const R: usize, const C: usize>(
        nb: usize,
        x: [*const T; R],
        y: [*const Q8_0; C],
    ) -> [[f32; R]; C] {
        if vnni() {
            dot_vnni::<T, R, C>(nb, x, y)
        } else {
            dot_avx2::<T, R, C>(nb, x, y)
        }
    }

    /// Four weight rows against four inputs: one AVX-512 kernel (its 32
    /// registers hold the sixteen sums), or two AVX2 ones of two inputs
    /// (whose 16 registers would not).
    ///
    /// # Safety
    /// As [`dot`].
    #[inline(always)]
    pub(super) unsafe fn dot_4x4<T: Symmetric>(
        nb: usize,
        x: [*const T; 4],
        y: [*const Q8_0; 4],
    ) -> [[f32; 4]; 4] {
        if vnni() {
            return dot_vnni::<T, 4, 4>(nb, x, y);
        }
        let [a, b] = dot_avx2::<T, 4, 2>(nb, x, [y[0], y[1]]);
        let [c, d] = dot_avx2::<T, 4, 2>(nb, x, [y[2], y[3]]);
        [a, b, c, d]
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{blocks_of, dequantized_dot, rows_alone_and_together, values};
    use super::*;

    /// The codes round trip: a block of every code in order dequantizes to
    /// `d * (code - 16)`, and the quantizer is within half a step, or a
    /// whole one for values of the other sign than the block's largest
    /// (which maps to -16 steps, so the other side ends at 15).
    #[test]
    fn blocks_hold_what_ggml_puts_in_them() {
        let x: Vec<f32> = (0..QK).map(|j| j as f32 - 16.0).collect();
        let (q, back) = blocks_of::<Q5_0>(&x);
        // The largest magnitude, -16, maps to code 0 with d = 1.
        assert_eq!(q[0].d.to_f32(), 1.0);
        assert_eq!(back, x);
        let v = values(4096, 7);
        let (q, back) = blocks_of::<Q5_0>(&v);
        for (b, (chunk, got)) in q.iter().zip(v.chunks(QK).zip(back.chunks(QK))) {
            let step = b.d.to_f32().abs();
            let max = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, g) in chunk.iter().zip(got) {
                let other_side = a.signum() != (b.d.to_f32() * -16.0).signum();
                let clamped = a.abs() > 14.5 / 16.0 * max && other_side;
                let bound = if clamped { 1.0 } else { 0.5 } * step;
                assert!((a - g).abs() <= bound + 1e-2 * step, "{a} {g} {step}");
            }
        }
    }

    /// The SIMD product (where the CPU has one) and the portable loop have
    /// the same bits, and both are the dot product of the values the
    /// blocks stand for.
    fn products_agree<T: Values + GgmlType<VecDotType = Q8_0>>() {
        for (n, seed) in [(32, 1), (896, 2), (1536, 3), (4864, 4)] {
            let (w, w_back) = blocks_of::<T>(&values(n, seed));
            let (xq, x_back) = blocks_of::<Q8_0>(&values(n, seed + 100));
            let exact = dequantized_dot(&w_back, &x_back);
            let fast = T::vec_dot(n, &w, &xq);
            let slow = T::vec_dot_unopt(n, &w, &xq);
            let scale: f64 = w_back.iter().map(|v| f64::from(v.abs())).sum::<f64>() + 1.0;
            assert!(
                (f64::from(slow) - exact).abs() < 1e-5 * scale,
                "{slow} {exact}"
            );
            assert!(
                (f64::from(fast) - exact).abs() < 1e-5 * scale,
                "{fast} {exact}"
            );
            #[cfg(target_arch = "x86_64")]
            if super::super::simd::vnni() {
                // The AVX-512 kernel's order, portably.
                let wide = wide_unopt::<T>(&w, &xq);
                assert_eq!(fast.to_bits(), wide.to_bits(), "{:?} {n}", T::DTYPE);
                continue;
            }
            assert_eq!(fast.to_bits(), slow.to_bits(), "{:?} {n}", T::DTYPE);
        }
    }

    /// The integer values of a block, times its scale.
    trait Values: GgmlType {
        fn values(&self) -> (f32, [i32; QK]);
    }

    impl Values for Q5_0 {
        fn values(&self) -> (f32, [i32; QK]) {
            (self.d.to_f32(), std::array::from_fn(|j| self.code(j) - 16))
        }
    }

    impl Values for Q8_0 {
        fn values(&self) -> (f32, [i32; QK]) {
            (
                self.d.to_f32(),
                std::array::from_fn(|j| i32::from(self.qs[j])),
            )
        }
    }

    /// The AVX-512 kernel's sixteen-lane order in plain loops: even blocks
    /// in one set of eight lanes, odd ones in another, the two added lane
    /// by lane at the end.
    fn wide_unopt<T: Values>(xs: &[T], ys: &[Q8_0]) -> f32 {
        let mut acc = [[0f32; 8]; 2];
        for (i, (x, y)) in xs.iter().zip(ys).enumerate() {
            let (dw, w) = x.values();
            let d = dw * y.d.to_f32();
            lanes(
                &mut acc[i % 2],
                d,
                (0..QK).map(|j| w[j] * i32::from(y.qs[j])),
            );
        }
        hsum8(std::array::from_fn(|l| acc[0][l] + acc[1][l]))
    }

    #[test]
    fn the_fast_and_portable_products_agree_with_the_dequantized_one() {
        products_agree::<Q5_0>();
        products_agree::<Q8_0>();
    }

    /// Four rows at once have the bits of each row alone, and the product
    /// of several input rows has, row by row, the bits of each alone (what
    /// batching relies on), for odd and even row counts and a weight row
    /// count that is not a multiple of four.
    fn same_bits_alone_and_together<T: FourRows + GgmlType<VecDotType = Q8_0>>() {
        let n = 896;
        let rows: Vec<_> = (0..4)
            .map(|r| blocks_of::<T>(&values(n, 20 + r)).0)
            .collect();
        let (xq, _) = blocks_of::<Q8_0>(&values(n, 30));
        let (a, b, c, d) = T::vec_dot_4(n, &rows[0], &rows[1], &rows[2], &rows[3], &xq);
        for (got, row) in [a, b, c, d].into_iter().zip(&rows) {
            assert_eq!(got.to_bits(), T::vec_dot(n, row, &xq).to_bits());
        }
        let (k, n) = (896, 14);
        let (w, _) = blocks_of::<T>(&values(n * k, 40));
        rows_alone_and_together((k, n), &w, &[1, 2, 3, 4, 5, 8, 9]);
    }

    #[test]
    fn rows_have_the_same_bits_alone_and_together() {
        same_bits_alone_and_together::<Q5_0>();
        same_bits_alone_and_together::<Q8_0>();
    }

    /// With AVX-512 VNNI the kernels give the bits of their order in plain
    /// loops, for every tile shape, odd and even block counts; the AVX2
    /// kernels give the portable loop's, and the two agree to rounding.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vnni_and_avx2_kernels_give_their_orders_bits() {
        if !super::super::simd::vnni() {
            eprintln!("this CPU has no AVX-512 VNNI: only the AVX2 kernels run here");
            return;
        }
        fn compare<T: avx2::Symmetric + Values + GgmlType<VecDotType = Q8_0>>() {
            for nb in [4864 / QK, 27, 1] {
                let rows: Vec<Vec<T>> = (0..4)
                    .map(|r| blocks_of::<T>(&values(nb * QK, 60 + r)).0)
                    .collect();
                let ys: Vec<Vec<Q8_0>> = (0..4)
                    .map(|c| blocks_of::<Q8_0>(&values(nb * QK, 70 + c)).0)
                    .collect();
                let x = [0, 1, 2, 3].map(|r| rows[r].as_ptr());
                let y = [0, 1, 2, 3].map(|c| ys[c].as_ptr());
                #[allow(unsafe_code)]
                // SAFETY: the CPU has both feature sets (checked above);
                // every pointer has nb blocks after it.
                let (a, b, one) = unsafe {
                    (
                        avx2::dot_4x4::<T>(nb, x, y),
                        avx2::dot_avx2::<T, 4, 2>(nb, x, [y[0], y[1]]),
                        avx2::dot_vnni::<T, 1, 1>(nb, [x[2]], [y[3]]),
                    )
                };
                assert_eq!(one[0][0].to_bits(), a[3][2].to_bits(), "nb {nb}");
                for c in 0..4 {
                    for r in 0..4 {
                        let wide = wide_unopt(&rows[r], &ys[c]);
                        assert_eq!(a[c][r].to_bits(), wide.to_bits(), "nb {nb} {r} {c}");
                        let n = nb * QK;
                        let narrow = T::vec_dot_unopt(n, &rows[r], &ys[c]);
                        if c < 2 {
                            assert_eq!(b[c][r].to_bits(), narrow.to_bits(), "nb {nb} {r} {c}");
                        }
                        let tol = n as f32 * 1e-6 * (1.0 + narrow.abs());
                        assert!((wide - narrow).abs() <= tol, "{wide} {narrow}");
                    }
                }
            }
        }
        compare::<Q5_0>();
        compare::<Q8_0>();
    }

    #[test]
    #[should_panic(expected = "Q5_0 product")]
    fn a_product_longer_than_its_blocks_is_refused() {
        let (w, _) = blocks_of::<Q5_0>(&values(64, 9));
        let (xq, _) = blocks_of::<Q8_0>(&values(64, 10));
        let _ = Q5_0::vec_dot(96, &w, &xq);
    }
}
