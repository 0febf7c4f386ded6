//! `serve --max-memory`: fitting a server's span, KV caches and working
//! memory into a limit the operator gives.
//!
//! The limit covers the whole process: the span's weights (known before
//! loading, see [`block_bytes`](crate::engine::block_bytes)), the head when
//! the server runs an API, a reserve for the runtime and for one step's
//! working memory, and what is left goes to KV caches. `--blocks auto` takes
//! the most blocks (at most `--max-blocks`) for which that leaves at least
//! [`MIN_KV_POSITIONS`] positions of KV.

use nomoat_scheduler::BlockRange;

use super::executor::kv_bytes_per_position;
use crate::engine::{ModelConfig, PREFILL_CHUNK};

/// What a server process takes besides weights, KV and step activations:
/// the runtime, the network stack, the model header and tokenizer. Measured
/// about 60-80 MiB for SmolLM2 and Qwen2.5 servers; rounded up.
pub const BASE_RESERVE: u64 = 128 << 20;
/// Fewest KV positions a limit must leave for the span: one session of
/// this length can always open.
pub const MIN_KV_POSITIONS: u64 = 1024;
/// Context the working-memory reserve is sized for; a server with a
/// memory limit cuts every session's length to it.
pub const RESERVE_CONTEXT: u64 = 2048;

/// How a server's memory limit is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBudget {
    /// The limit, bytes.
    pub limit: u64,
    /// The span's weights.
    pub weights: u64,
    /// The head, when the server runs an API.
    pub head: u64,
    /// Runtime and one step's working memory.
    pub reserve: u64,
    /// What KV caches may reserve.
    pub kv: u64,
}

/// Why a span does not fit the memory limit.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// The chosen blocks need more than the limit.
    #[error(
        "blocks {blocks} need {need} MiB (weights {weights} MiB, head {head} MiB, reserve {reserve} MiB, \
         KV for {MIN_KV_POSITIONS} positions {kv} MiB), more than --max-memory {limit} MiB: {hint}"
    )]
    TooLarge {
        /// The blocks.
        blocks: BlockRange,
        /// All of it, MiB.
        need: u64,
        /// Weights, MiB.
        weights: u64,
        /// Head, MiB.
        head: u64,
        /// Reserve, MiB.
        reserve: u64,
        /// Smallest KV, MiB.
        kv: u64,
        /// The limit, MiB.
        limit: u64,
        /// What to do.
        hint: String,
    },
    /// `--kv-memory` asks for more than the limit leaves.
    #[error("--kv-memory {kv} MiB does not fit: --max-memory {limit} MiB leaves {room} MiB for KV caches after the weights and the reserve")]
    KvTooLarge {
        /// Asked, MiB.
        kv: u64,
        /// The limit, MiB.
        limit: u64,
        /// What is left, MiB.
        room: u64,
    },
}

fn mib(b: u64) -> u64 {
    b.div_ceil(1 << 20)
}

/// Working memory of one step piece of [`PREFILL_CHUNK`] positions over a
/// context of `context` positions, plus the step's frames: attention
/// scores and probabilities, the mask, projections, the MLP and the
/// hidden states in and out.
pub fn activation_bytes(cfg: &ModelConfig, context: u64) -> u64 {
    let c = PREFILL_CHUNK as u64;
    let (nh, nkv, hd) = (
        cfg.num_heads as u64,
        cfg.num_kv_heads as u64,
        cfg.head_dim as u64,
    );
    let (h, f) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
    // Scores and their next form (scaled, masked, softmaxed) coexist.
    let attention = 2 * nh * c * context * 4;
    let projections = 3 * c * (nh + 2 * nkv) * hd * 4;
    let mlp = 4 * c * f * 4;
    let frames = 6 * context * h * 4;
    attention + projections + mlp + frames
}

/// The reserve a server of `cfg` keeps besides weights and KV.
pub fn reserve_bytes(cfg: &ModelConfig) -> u64 {
    let context = (cfg.max_seq_len as u64).min(RESERVE_CONTEXT);
    BASE_RESERVE + activation_bytes(cfg, context)
}

/// Splits `limit` for blocks `blocks` of a model whose blocks take
/// `block_bytes` each (plus `head` when the server runs an API); `kv`:
/// the `--kv-memory` asked for, if any.
pub fn budget(
    limit: u64,
    cfg: &ModelConfig,
    block_bytes: &[u64],
    blocks: BlockRange,
    head: u64,
    kv: Option<u64>,
) -> Result<MemoryBudget, MemoryError> {
    let weights: u64 = block_bytes
        .get(blocks.start as usize..blocks.end as usize)
        .map_or(0, |b| b.iter().sum());
    let reserve = reserve_bytes(cfg);
    let min_kv =
        MIN_KV_POSITIONS * kv_bytes_per_position(cfg, blocks.start as usize, blocks.end as usize);
    let fixed = weights + head + reserve;
    if fixed + min_kv > limit {
        let fit = blocks_that_fit(limit, cfg, block_bytes, head);
        let hint = if fit == 0 {
            "no block fits; raise --max-memory".to_string()
        } else {
            format!(
                "serve at most {fit} blocks, e.g. --blocks {}..{}, or --blocks auto",
                blocks.start,
                (blocks.start + fit).min(block_bytes.len() as u32)
            )
        };
        return Err(MemoryError::TooLarge {
            blocks,
            need: mib(fixed + min_kv),
            weights: mib(weights),
            head: mib(head),
            reserve: mib(reserve),
            kv: mib(min_kv),
            limit: mib(limit),
            hint,
        });
    }
    let room = limit - fixed;
    let kv = match kv {
        Some(k) if k > room => {
            return Err(MemoryError::KvTooLarge {
                kv: mib(k),
                limit: mib(limit),
                room: room >> 20,
            })
        }
        Some(k) => k,
        None => room,
    };
    Ok(MemoryBudget {
        limit,
        weights,
        head,
        reserve,
        kv,
    })
}

/// The most blocks `k` such that every window of `k` blocks fits `limit`
/// with [`MIN_KV_POSITIONS`] of KV; 0 when not even one block does.
pub fn blocks_that_fit(limit: u64, cfg: &ModelConfig, block_bytes: &[u64], head: u64) -> u32 {
    let n = block_bytes.len();
    let reserve = reserve_bytes(cfg);
    let kv_block = MIN_KV_POSITIONS * kv_bytes_per_position(cfg, 0, 1);
    let fits = |k: usize| {
        block_bytes
            .windows(k)
            .all(|w| w.iter().sum::<u64>() + head + reserve + k as u64 * kv_block <= limit)
    };
    (1..=n).take_while(|&k| fits(k)).last().unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ModelConfig {
        ModelConfig::from_hf_json(
            r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4,
                "vocab_size": 96, "max_position_embeddings": 64}"#,
        )
        .unwrap()
    }

    #[test]
    fn the_limit_pays_weights_head_reserve_and_then_kv() {
        let c = cfg();
        let blocks = [100 << 20, 100 << 20, 150 << 20, 100 << 20];
        let reserve = reserve_bytes(&c);
        let limit = reserve + (300 << 20);
        let b = budget(limit, &c, &blocks, BlockRange::new(0, 2).unwrap(), 0, None).unwrap();
        assert_eq!(b.weights, 200 << 20);
        assert_eq!(b.kv, 100 << 20);
        assert_eq!(b.weights + b.head + b.reserve + b.kv, limit);
        // A given KV budget must fit what is left.
        assert!(budget(
            limit,
            &c,
            &blocks,
            BlockRange::new(0, 2).unwrap(),
            0,
            Some(200 << 20)
        )
        .is_err());
        // Three blocks do not fit, and the error says how many do.
        let e = budget(limit, &c, &blocks, BlockRange::new(0, 3).unwrap(), 0, None).unwrap_err();
        assert!(e.to_string().contains("at most 2 blocks"), "{e}");
        // The heavier window 1..3 does not fit two blocks either with a head.
        assert_eq!(blocks_that_fit(limit, &c, &blocks, 0), 2);
        assert_eq!(blocks_that_fit(limit, &c, &blocks, 60 << 20), 1);
        assert_eq!(blocks_that_fit(reserve, &c, &blocks, 0), 0);
    }
}
