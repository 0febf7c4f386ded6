//! What a span takes in memory, known before it is loaded: the figures
//! `serve --max-memory` plans with.
//!
//! The rules follow what loading does ([`WeightMode`]): matrices in a
//! format with a fast kernel keep their stored size, the others are
//! repacked to Q8_0 in `fast` mode, float matrices and every vector become
//! f32, and `f32` mode makes everything f32.

use candle_core::quantized::GgmlDType;
use nomoat_protocol::TensorRole;

use super::file::WeightMode;
use super::model::has_fast_kernel;

/// One stored tensor, as a manifest or a file header describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTensor {
    /// What it is for.
    pub role: TensorRole,
    /// Stored type: a ggml type name (`Q4_1`, `Q4K`) or a float type.
    pub dtype: String,
    /// Dimensions, outermost first.
    pub shape: Vec<u64>,
}

/// The quantized ggml type a stored type name names (`Q4_1`, `Q4K`,
/// `Q4_K`), `None` for float types.
fn ggml_quant(dtype: &str) -> Option<GgmlDType> {
    let d = dtype.to_ascii_uppercase().replace('_', "");
    Some(match d.as_str() {
        "Q40" => GgmlDType::Q4_0,
        "Q41" => GgmlDType::Q4_1,
        "Q50" => GgmlDType::Q5_0,
        "Q51" => GgmlDType::Q5_1,
        "Q80" => GgmlDType::Q8_0,
        "Q81" => GgmlDType::Q8_1,
        "Q2K" => GgmlDType::Q2K,
        "Q3K" => GgmlDType::Q3K,
        "Q4K" => GgmlDType::Q4K,
        "Q5K" => GgmlDType::Q5K,
        "Q6K" => GgmlDType::Q6K,
        "Q8K" => GgmlDType::Q8K,
        _ => return None,
    })
}

/// Bytes one stored tensor takes once loaded in `mode`.
pub fn loaded_bytes(dtype: &str, shape: &[u64], mode: WeightMode) -> u64 {
    let elems = shape.iter().product::<u64>();
    let float = elems.saturating_mul(4);
    if shape.len() < 2 || mode == WeightMode::F32 {
        return float;
    }
    let Some(q) = ggml_quant(dtype) else {
        // F32, F16 and BF16 matrices are kept as f32.
        return float;
    };
    let row = shape.last().copied().unwrap_or(0);
    let fast = matches!(mode, WeightMode::Fast | WeightMode::Compact);
    let q = if fast && !has_fast_kernel(q) && row % 32 == 0 {
        GgmlDType::Q8_0
    } else {
        q
    };
    elems / q.block_size() as u64 * q.type_size() as u64
}

/// Bytes each block's weights take once loaded, for blocks `0..num_blocks`.
pub fn block_bytes(tensors: &[StoredTensor], num_blocks: u32, mode: WeightMode) -> Vec<u64> {
    let mut out = vec![0u64; num_blocks as usize];
    for t in tensors {
        if let TensorRole::Block(b) = t.role {
            if let Some(slot) = out.get_mut(b as usize) {
                *slot += loaded_bytes(&t.dtype, &t.shape, mode);
            }
        }
    }
    out
}

/// Bytes the head (embedding, final norm, LM head) takes once loaded.
pub fn head_bytes(tensors: &[StoredTensor], mode: WeightMode) -> u64 {
    tensors
        .iter()
        .filter(|t| t.role.is_head())
        .map(|t| loaded_bytes(&t.dtype, &t.shape, mode))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loaded_sizes_follow_the_weight_mode() {
        let m = [576u64, 1536];
        let n = 576 * 1536;
        assert_eq!(loaded_bytes("Q4K", &m[..], WeightMode::Fast), n / 256 * 144);
        assert_eq!(
            loaded_bytes("Q6_K", &m[..], WeightMode::Exact),
            n / 256 * 210
        );
        // Q4_1 has a kernel of the engine's own: kept as stored.
        assert_eq!(loaded_bytes("Q4_1", &m[..], WeightMode::Fast), n / 32 * 20);
        assert_eq!(loaded_bytes("Q4_1", &m[..], WeightMode::Exact), n / 32 * 20);
        // So has Q5_0.
        assert_eq!(loaded_bytes("Q5_0", &m[..], WeightMode::Fast), n / 32 * 22);
        // Q5_1 has none: repacked to Q8_0.
        assert_eq!(loaded_bytes("Q5_1", &m[..], WeightMode::Fast), n / 32 * 34);
        assert_eq!(loaded_bytes("F16", &m[..], WeightMode::Fast), n * 4);
        assert_eq!(loaded_bytes("Q8_0", &m[..], WeightMode::F32), n * 4);
        assert_eq!(loaded_bytes("Q8_0", &[576], WeightMode::Fast), 576 * 4);
    }
}
