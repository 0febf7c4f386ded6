//! Test-only lies a server can tell about its computation (hidden
//! `serve --fault-compute`), so tests and `nomoat bench verify` can play
//! the dishonest volunteer that spot checks must catch.
//!
//! A spec is a kind, then optional `,key=value` modifiers:
//!
//! - `perturb[:SCALE]`: add noise of `SCALE` (default 0.5) times each row's
//!   RMS to the output;
//! - `skip`: return the input unchanged, as if the blocks were skipped;
//! - `after=N`: be honest for the first `N` steps of every session;
//! - `rate=P`: lie on a share `P` of the steps after that (default 1);
//! - `client=PEER`: lie only in sessions opened by this peer;
//! - `boast=X`: announce X times the measured throughput (at least X
//!   tokens per second), to draw sessions.
//!
//! e.g. `perturb:0.2,after=50` or `skip,rate=0.05`.

use libp2p::PeerId;
use nomoat_protocol::TensorFrame;

/// What a lying server does to an output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LieKind {
    /// Adds noise of this many times the row's RMS.
    Perturb(f32),
    /// Returns the step's input: the span's blocks are skipped.
    Skip,
}

/// A server's lie: what, from when, how often and to whom.
#[derive(Debug, Clone, PartialEq)]
pub struct ComputeFault {
    /// What the lie does.
    pub kind: LieKind,
    /// Honest steps at the start of every session.
    pub after: u64,
    /// The share of later steps that lie.
    pub rate: f64,
    /// Lie only to this client.
    pub client: Option<PeerId>,
    /// Announced throughput, times the measured one.
    pub boast: f32,
}

impl std::str::FromStr for ComputeFault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let kind = match parts.next().unwrap_or_default().split_once(':') {
            None if s.starts_with("perturb") => LieKind::Perturb(0.5),
            None if s.starts_with("skip") => LieKind::Skip,
            Some(("perturb", scale)) => LieKind::Perturb(
                scale
                    .parse()
                    .ok()
                    .filter(|v: &f32| v.is_finite() && *v > 0.0)
                    .ok_or_else(|| format!("bad perturbation scale `{scale}`"))?,
            ),
            _ => {
                return Err(format!(
                    "unknown compute fault `{s}`: perturb[:SCALE] or skip, then ,after=N ,rate=P ,client=PEER"
                ))
            }
        };
        let mut fault = ComputeFault {
            kind,
            after: 0,
            rate: 1.0,
            client: None,
            boast: 1.0,
        };
        for part in parts {
            match part.split_once('=') {
                Some(("after", n)) => {
                    fault.after = n.parse().map_err(|_| format!("bad step count `{n}`"))?
                }
                Some(("rate", p)) => {
                    fault.rate = p
                        .parse()
                        .ok()
                        .filter(|p: &f64| (0.0..=1.0).contains(p))
                        .ok_or_else(|| format!("bad rate `{p}`: a share in 0..=1"))?
                }
                Some(("boast", x)) => {
                    fault.boast = x
                        .parse()
                        .ok()
                        .filter(|x: &f32| x.is_finite() && *x >= 1.0)
                        .ok_or_else(|| format!("bad boast `{x}`: a factor of at least 1"))?
                }
                Some(("client", peer)) => {
                    fault.client = Some(peer.parse().map_err(|e| format!("bad peer id: {e}"))?)
                }
                _ => return Err(format!("unknown compute fault modifier `{part}`")),
            }
        }
        Ok(fault)
    }
}

impl ComputeFault {
    /// Whether step number `step` (from 0) of a session opened by `client`
    /// lies.
    pub fn lies(&self, step: u64, client: &PeerId) -> bool {
        if self.client.is_some_and(|c| c != *client) || step < self.after {
            return false;
        }
        self.rate >= 1.0 || rand::random::<f64>() < self.rate
    }

    /// The throughput to announce for a measured `throughput`.
    pub fn announced(&self, throughput: f32) -> f32 {
        if self.boast > 1.0 {
            throughput.max(1.0) * self.boast
        } else {
            throughput
        }
    }

    /// The lie told instead of `output`, a step's honest output for `input`.
    pub fn apply(&self, input: &TensorFrame, output: TensorFrame) -> TensorFrame {
        let scale = match self.kind {
            LieKind::Skip => return input.clone(),
            LieKind::Perturb(scale) => scale,
        };
        let shape = output.shape().to_vec();
        let width = shape.last().copied().unwrap_or(1).max(1);
        let mut values = output.to_f32();
        for row in values.chunks_mut(width) {
            let rms = (row.iter().map(|v| v * v).sum::<f32>() / width as f32).sqrt();
            for v in row.iter_mut() {
                *v += scale * rms * (2.0 * rand::random::<f32>() - 1.0);
            }
        }
        TensorFrame::from_f32(shape, &values, output.dtype()).unwrap_or(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nomoat_protocol::DType;

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        let f: ComputeFault = "perturb:0.2,after=50,rate=0.05".parse().unwrap();
        assert_eq!(f.kind, LieKind::Perturb(0.2));
        assert_eq!((f.after, f.rate, f.client), (50, 0.05, None));
        let f: ComputeFault = "skip".parse().unwrap();
        assert_eq!((f.kind, f.after, f.rate), (LieKind::Skip, 0, 1.0));
        assert_eq!(f.announced(3.0), 3.0);
        let f: ComputeFault = "skip,boast=1000".parse().unwrap();
        assert_eq!((f.announced(3.0), f.announced(0.0)), (3000.0, 1000.0));
        assert_eq!(
            "perturb".parse::<ComputeFault>().unwrap().kind,
            LieKind::Perturb(0.5)
        );
        let peer = PeerId::random();
        let f: ComputeFault = format!("skip,client={peer}").parse().unwrap();
        assert!(f.lies(0, &peer) && !f.lies(0, &PeerId::random()));
        for bad in [
            "lie",
            "perturb:-1",
            "skip,rate=2",
            "skip,after=x",
            "skip,x=1",
        ] {
            assert!(bad.parse::<ComputeFault>().is_err(), "{bad}");
        }
    }

    #[test]
    fn lies_start_after_the_honest_steps_and_change_the_output() {
        let f: ComputeFault = "perturb:0.5,after=3".parse().unwrap();
        let me = PeerId::random();
        assert!(!(0..3).any(|s| f.lies(s, &me)));
        assert!((3..10).all(|s| f.lies(s, &me)));
        let input = TensorFrame::from_f32(vec![2, 4], &[1.0; 8], DType::F32).unwrap();
        let out = TensorFrame::from_f32(vec![2, 4], &[2.0; 8], DType::F32).unwrap();
        let lie = f.apply(&input, out.clone());
        assert_eq!(lie.shape(), out.shape());
        assert_ne!(lie.to_f32(), out.to_f32());
        let skip: ComputeFault = "skip".parse().unwrap();
        assert_eq!(skip.apply(&input, out).to_f32(), input.to_f32());
    }
}
