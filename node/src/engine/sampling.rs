use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How the next token is chosen from logits.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `0` means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`0` keeps all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `p` (`1` keeps all).
    pub top_p: f32,
    /// Divide positive logits (multiply negative ones) of tokens already
    /// seen by this factor (`1` disables it).
    pub repetition_penalty: f32,
    /// How many recent tokens the repetition penalty looks at.
    pub repetition_window: usize,
    /// OpenAI's presence penalty: subtracted once from the logit of every
    /// token this generation has already produced (`0` disables it).
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty: subtracted from a token's logit once per
    /// time this generation has produced it (`0` disables it).
    pub frequency_penalty: f32,
    /// Seed of the random generator: the same seed gives the same tokens.
    pub seed: u64,
}

/// Default temperature of `nomoat generate`.
pub const DEFAULT_TEMPERATURE: f32 = 0.7;
/// Default nucleus threshold.
pub const DEFAULT_TOP_P: f32 = 0.9;
/// Default seed.
pub const DEFAULT_SEED: u64 = 299_792_458;
/// Default repetition-penalty window.
pub const DEFAULT_REPETITION_WINDOW: usize = 64;

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: DEFAULT_TEMPERATURE,
            top_k: 0,
            top_p: DEFAULT_TOP_P,
            repetition_penalty: 1.0,
            repetition_window: DEFAULT_REPETITION_WINDOW,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: DEFAULT_SEED,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }
}

/// A seeded sampler.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// How often each token has been sampled so far (the generation's own
    /// tokens, which the presence and frequency penalties look at).
    produced: std::collections::HashMap<u32, u32>,
}

impl Sampler {
    /// A sampler with its own seeded generator.
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self {
            params,
            rng,
            produced: std::collections::HashMap::new(),
        }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token; `history` feeds the repetition penalty.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let t = self.choose(logits, history);
        *self.produced.entry(t).or_default() += 1;
        t
    }

    fn choose(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let mut logits = logits.to_vec();
        if p.repetition_penalty != 1.0 && p.repetition_penalty > 0.0 {
            let from = history.len().saturating_sub(p.repetition_window);
            let mut seen = std::collections::HashSet::new();
            for &t in &history[from..] {
                if let Some(l) = logits.get_mut(t as usize) {
                    if seen.insert(t) {
                        *l = if *l > 0.0 {
                            *l / p.repetition_penalty
                        } else {
                            *l * p.repetition_penalty
                        };
                    }
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.produced {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        if p.temperature <= 0.0 || !p.temperature.is_finite() {
            return argmax(&logits);
        }
        let mut idx: Vec<usize> = (0..logits.len()).filter(|&i| !logits[i].is_nan()).collect();
        if idx.is_empty() {
            return 0;
        }
        idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if p.top_k > 0 && p.top_k < idx.len() {
            idx.truncate(p.top_k);
        }
        let max = logits[idx[0]];
        let mut probs: Vec<f32> = idx
            .iter()
            .map(|&i| ((logits[i] - max) / p.temperature).exp())
            .collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if p.top_p > 0.0 && p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (n, &q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p {
                    keep = n + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
            let s: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= s);
        }
        let r: f32 = self.rng.random();
        let mut acc = 0.0;
        for (n, &q) in probs.iter().enumerate() {
            acc += q;
            if r < acc {
                return idx[n] as u32;
            }
        }
        idx[probs.len() - 1] as u32
    }
}

/// Index of the largest logit (the first one on ties).
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frequency_penalty_grows_with_each_repeat_and_presence_penalty_does_not() {
        let logits = [2.0, 1.9, 0.0];
        let run = |presence, frequency| {
            let mut s = Sampler::new(SamplingParams {
                presence_penalty: presence,
                frequency_penalty: frequency,
                ..SamplingParams::greedy()
            });
            (0..6).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(0.0, 0.0), [0; 6]);
        // 0 once (2.0 - 0.15 < 1.9), then 1 once (1.9 - 0.15 = 1.75 < 1.85),
        // then 0 for good: each is penalised once, however often it comes.
        assert_eq!(run(0.15, 0.0), [0, 1, 0, 0, 0, 0]);
        // Each repeat costs 0.06 more: the two tokens alternate in turn.
        assert_eq!(run(0.0, 0.06), [0, 0, 1, 0, 1, 0]);
        // A negative penalty favours what was already said.
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: -1.0,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&[1.0, 1.5], &[]), 1);
        assert_eq!(s.sample(&[1.4, 0.6], &[]), 1);
    }

    #[test]
    fn greedy_takes_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let params = SamplingParams {
            temperature: 5.0,
            top_k: 1,
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(params);
        for _ in 0..50 {
            assert_eq!(s.sample(&[0.0, 1.0, 0.5], &[]), 1);
        }
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            ..SamplingParams::default()
        };
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..params.clone()
            });
            (0..20).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // token 0 holds ~0.88 of the mass: p = 0.5 keeps only it.
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(params);
        for _ in 0..50 {
            assert_eq!(s.sample(&[4.0, 2.0, 0.0, -1.0], &[]), 0);
        }
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(params);
        assert_eq!(s.sample(&[3.0, 2.0], &[0]), 1);
        assert_eq!(s.sample(&[3.0, 2.0], &[1]), 0);
    }
}
