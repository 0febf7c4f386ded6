//! Quantized matrix products on the stored blocks alone.
//!
//! On x86-64 with AVX2, candle's quantized matmul repacks Q4_K weights
//! (and Q6_K ones at the first prompt, Q8_0 on AVX-VNNI/AVX-512 CPUs;
//! on aarch64 Q4_0, Q4_K, Q5_K, Q6_K and Q8_0) into tiles on first use and keeps the tiles beside the original: 1.33x
//! the Q4_K bytes more, so a span then holds 2.3x its file size. A server
//! with a memory limit cannot afford that copy, so
//! [`WeightMode::Compact`](super::WeightMode::Compact) multiplies by the
//! original blocks with candle's plain (vec-dot, multi-threaded) kernels
//! instead: the same arithmetic as the repacked path's reference, less
//! speed on prompts, and exactly the file's bytes in memory.

use std::sync::Arc;

use candle_core::quantized::k_quants::{self, BlockQ4_0, BlockQ5K, GgmlType};
#[cfg(not(target_arch = "x86_64"))]
use candle_core::quantized::k_quants::{BlockQ4K, BlockQ6K, BlockQ8_0};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::kernels::{self, Q4_1, Q5_0};
#[cfg(target_arch = "x86_64")]
use super::kernels::{Q4K, Q6K, Q8_0};

/// Whether candle may keep a repacked copy of a weight of this type, i.e.
/// whether [`CompactMatMul`] is worth using for it.
pub(super) fn candle_repacks(dtype: GgmlDType) -> bool {
    use GgmlDType as D;
    if cfg!(target_arch = "x86_64") {
        matches!(dtype, D::Q4K | D::Q6K | D::Q8_0)
    } else if cfg!(target_arch = "aarch64") {
        matches!(dtype, D::Q4_0 | D::Q4K | D::Q5K | D::Q6K | D::Q8_0)
    } else {
        false
    }
}

/// Whether the engine multiplies a weight of this type with a kernel of
/// its own, through [`CompactMatMul`] in every quantized mode: Q4_1 and
/// Q5_0, which candle keeps but multiplies with scalar loops, and on
/// x86-64 Q8_0, Q4_K and Q6_K, which it multiplies row by row on the
/// stored blocks (see `engine/kernels`; elsewhere candle's NEON kernels
/// are the faster).
pub(super) fn own_kernel(dtype: GgmlDType) -> bool {
    use GgmlDType as D;
    matches!(dtype, D::Q4_1 | D::Q5_0)
        || (cfg!(target_arch = "x86_64") && matches!(dtype, D::Q8_0 | D::Q4K | D::Q6K))
}

/// `x · Wᵀ` for a weight `W` (out × in) of a type that candle repacks, or
/// of one with a kernel of the engine's own, computed on its stored blocks.
#[derive(Debug, Clone)]
pub(super) struct CompactMatMul {
    weight: Arc<QTensor>,
}

impl CompactMatMul {
    /// `None` for a weight of another type (candle's own path keeps no
    /// copy of those, and is fast).
    pub(super) fn new(weight: Arc<QTensor>) -> Option<Self> {
        let d = weight.dtype();
        (candle_repacks(d) || own_kernel(d)).then_some(Self { weight })
    }

    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.contiguous()?;
        x.apply_op1_no_bwd(self)
    }
}

/// The stored blocks of `data` as `T`s, checking size and alignment.
fn blocks<T: GgmlType>(data: &[u8]) -> candle_core::Result<&[T]> {
    let size = std::mem::size_of::<T>();
    if !data.len().is_multiple_of(size)
        || !data
            .as_ptr()
            .addr()
            .is_multiple_of(std::mem::align_of::<T>())
    {
        candle_core::bail!(
            "a quantized weight of {} bytes is not whole, aligned blocks of {size}",
            data.len()
        );
    }
    #[allow(unsafe_code)]
    // SAFETY: the bytes are a QTensor's CPU storage, which candle keeps as
    // a `Vec<T>` of this very block type (checked by the caller through
    // the tensor's dtype); size and alignment are checked above; the
    // block types are `repr(C)` structs of f16 and byte arrays, valid for
    // any bit pattern; the slice borrows `data`, which outlives it.
    let out = unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<T>(), data.len() / size) };
    Ok(out)
}

impl CustomOp1 for CompactMatMul {
    fn name(&self) -> &'static str {
        "compact-qmatmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(all) = storage else {
            candle_core::bail!("compact matmul takes f32 inputs");
        };
        let Some((from, to)) = layout.contiguous_offsets() else {
            candle_core::bail!("compact matmul takes contiguous inputs");
        };
        let x = &all[from..to];
        let (n, k) = self.weight.shape().dims2()?;
        let mut dims = layout.shape().dims().to_vec();
        if dims.pop() != Some(k) {
            candle_core::bail!(
                "input {:?} does not fit a weight of {:?}",
                layout.shape(),
                self.weight.shape()
            );
        }
        dims.push(n);
        let m = x.len() / k.max(1);
        let mut dst = vec![0f32; m * n];
        let data = self.weight.data()?;
        match self.weight.dtype() {
            GgmlDType::Q4_0 => {
                k_quants::matmul((m, k, n), x, blocks::<BlockQ4_0>(&data)?, &mut dst)?
            }
            GgmlDType::Q4_1 => kernels::matmul((m, k, n), x, blocks::<Q4_1>(&data)?, &mut dst)?,
            GgmlDType::Q5_0 => kernels::matmul((m, k, n), x, blocks::<Q5_0>(&data)?, &mut dst)?,
            #[cfg(target_arch = "x86_64")]
            GgmlDType::Q4K => kernels::matmul((m, k, n), x, blocks::<Q4K>(&data)?, &mut dst)?,
            #[cfg(not(target_arch = "x86_64"))]
            GgmlDType::Q4K => k_quants::matmul((m, k, n), x, blocks::<BlockQ4K>(&data)?, &mut dst)?,
            GgmlDType::Q5K => k_quants::matmul((m, k, n), x, blocks::<BlockQ5K>(&data)?, &mut dst)?,
            #[cfg(target_arch = "x86_64")]
            GgmlDType::Q6K => kernels::matmul((m, k, n), x, blocks::<Q6K>(&data)?, &mut dst)?,
            #[cfg(not(target_arch = "x86_64"))]
            GgmlDType::Q6K => k_quants::matmul((m, k, n), x, blocks::<BlockQ6K>(&data)?, &mut dst)?,
            #[cfg(target_arch = "x86_64")]
            GgmlDType::Q8_0 => kernels::matmul((m, k, n), x, blocks::<Q8_0>(&data)?, &mut dst)?,
            #[cfg(not(target_arch = "x86_64"))]
            GgmlDType::Q8_0 => {
                k_quants::matmul((m, k, n), x, blocks::<BlockQ8_0>(&data)?, &mut dst)?
            }
            other => candle_core::bail!("no compact matmul for {other:?}"),
        }
        Ok((CpuStorage::F32(dst), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    /// The compact product is as close to the exact product by the
    /// dequantized weight as candle's (which may repack, and quantizes the
    /// input in other blocks then), for prompts and single tokens.
    #[test]
    fn compact_products_are_as_exact_as_candles() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (64, 512), &dev)?;
        let types = [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::Q8_0,
        ];
        for dtype in types
            .into_iter()
            .filter(|&d| candle_repacks(d) || own_kernel(d))
        {
            let q = Arc::new(QTensor::quantize(&w, dtype)?);
            let exact_w = q.dequantize(&dev)?;
            let candle = candle_core::quantized::QMatMul::from_arc(q.clone())?;
            let compact = CompactMatMul::new(q).expect("a type candle repacks");
            for m in [1usize, 7] {
                let x = Tensor::randn(0f32, 1.0, (1, m, 512), &dev)?;
                let exact = x.broadcast_matmul(&exact_w.t()?)?;
                let (a, b) = (compact.forward(&x)?, candle.forward(&x)?);
                assert_eq!(a.dims(), exact.dims());
                let err = |t: &Tensor| -> candle_core::Result<f32> {
                    (t - &exact)?.abs()?.max_all()?.to_scalar::<f32>()
                };
                let (ea, eb) = (err(&a)?, err(&b)?);
                let scale = exact.abs()?.max_all()?.to_scalar::<f32>()?;
                // Both quantize the input to 8 bits: errors of ~1% of the
                // largest output.
                assert!(ea <= 0.03 * scale, "{dtype:?} m={m}: {ea} of {scale}");
                assert!(
                    ea <= 2.0 * eb + 1e-3 * scale,
                    "{dtype:?} m={m}: compact {ea}, candle {eb}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn other_types_keep_candles_path() -> candle_core::Result<()> {
        let w = Tensor::zeros((32, 64), candle_core::DType::F32, &Device::Cpu)?;
        assert!(CompactMatMul::new(Arc::new(QTensor::quantize(&w, GgmlDType::Q5_1)?)).is_none());
        assert!(CompactMatMul::new(Arc::new(QTensor::quantize(&w, GgmlDType::Q4_1)?)).is_some());
        Ok(())
    }
}
