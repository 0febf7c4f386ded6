//! Receipts and evidence: every output a hop returns comes with its
//! signature over the step's input (bound to every earlier input of the
//! session on that hop) and output, so a wrong output is evidence against
//! one peer that anyone holding the inputs can check by recomputing them.
//!
//! This crate knows no key types: it encodes, bounds and checks the hashes;
//! the node checks signatures.

use crate::codec::{decode_pb, ensure_at_most, field_error};
use crate::pb::{self, field};
use crate::{
    BlockRange, Hash, MessageError, SessionId, TensorFrame, MAX_CONTROL_BYTES,
    MAX_PUBLIC_KEY_BYTES, MAX_SIGNATURE_BYTES,
};
use prost::Message as _;

/// The prefix of what a hop signs for a step: followed by the encoded
/// `ReceiptBody`.
pub const RECEIPT_SIGNING_PREFIX: &[u8] = b"nomoat-receipt-v1";
/// What the input chain of a session starts from, before its id.
pub const INPUT_CHAIN_DOMAIN: &[u8] = b"nomoat-inputs-v1";
/// Largest encoded evidence: it travels as one gossip message.
pub const MAX_EVIDENCE_BYTES: usize = 960 * 1024;
/// Most steps one piece of evidence may carry.
pub const MAX_EVIDENCE_STEPS: usize = 4096;

/// BLAKE3 of a tensor frame's encoding, computed without copying it.
pub fn frame_hash(frame: &TensorFrame) -> Hash {
    let mut header = Vec::with_capacity(32);
    frame.encode_header_to(&mut header);
    let mut h = blake3::Hasher::new();
    h.update(&header);
    h.update(frame.data());
    Hash(*h.finalize().as_bytes())
}

/// The running hash of a session's inputs on one hop: every step's start
/// and input frame, in the order the hop computed them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputChain {
    /// The chain's value after its last step.
    pub hash: Hash,
    /// Steps it holds.
    pub steps: u32,
}

impl InputChain {
    /// The chain of a session before its first step.
    pub fn new(session: SessionId) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(INPUT_CHAIN_DOMAIN);
        h.update(&session.0);
        Self {
            hash: Hash(*h.finalize().as_bytes()),
            steps: 0,
        }
    }

    /// Adds a step of input `frame` at `start`.
    pub fn push(&mut self, start: u32, frame: &TensorFrame) {
        self.push_hash(start, frame_hash(frame));
    }

    /// Adds a step whose input frame hashes to `frame`.
    pub fn push_hash(&mut self, start: u32, frame: Hash) {
        let mut h = blake3::Hasher::new();
        h.update(&self.hash.0);
        h.update(&start.to_le_bytes());
        h.update(&frame.0);
        self.hash = Hash(*h.finalize().as_bytes());
        self.steps = self.steps.saturating_add(1);
    }
}

/// What a hop signs for one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptBody {
    /// The model the hop serves.
    pub model_id: String,
    /// The session.
    pub session_id: SessionId,
    /// The step's sequence number.
    pub seq: u64,
    /// The blocks the hop ran.
    pub blocks: BlockRange,
    /// The step's first position.
    pub start_pos: u32,
    /// The step's rows.
    pub rows: u32,
    /// The session's inputs on the hop, this step's included.
    pub inputs: InputChain,
    /// [`frame_hash`] of the output.
    pub output: Hash,
    /// The LoRA adapter the session runs with.
    pub adapter: Option<Hash>,
}

impl ReceiptBody {
    /// Its encoding, as signed.
    pub fn encode(&self) -> Vec<u8> {
        pb::ReceiptBody {
            model_id: self.model_id.clone(),
            session_id: self.session_id.0.to_vec(),
            seq: self.seq,
            blocks: Some(self.blocks.to_pb()),
            start_pos: self.start_pos,
            rows: self.rows,
            inputs: self.inputs.hash.0.to_vec(),
            output: self.output.0.to_vec(),
            steps: self.inputs.steps,
            adapter: self.adapter.map(|a| a.0.to_vec()).unwrap_or_default(),
        }
        .encode_to_vec()
    }

    /// Decodes and validates one.
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        ensure_at_most(bytes.len(), MAX_CONTROL_BYTES)?;
        let b: pb::ReceiptBody = decode_pb(bytes)?;
        Ok(Self {
            model_id: crate::codec::bounded_text(b.model_id, "model_id")?,
            session_id: SessionId::from_bytes(&b.session_id)?,
            seq: b.seq,
            blocks: BlockRange::from_pb(b.blocks, "blocks")?,
            start_pos: b.start_pos,
            rows: b.rows,
            inputs: InputChain {
                hash: Hash::from_bytes(&b.inputs, "inputs")?,
                steps: b.steps,
            },
            output: Hash::from_bytes(&b.output, "output")?,
            adapter: if b.adapter.is_empty() {
                None
            } else {
                Some(Hash::from_bytes(&b.adapter, "adapter")?)
            },
        })
    }
}

/// A hop's signed receipt of one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The decoded body.
    pub body: ReceiptBody,
    /// Its encoding, as signed.
    pub body_bytes: Vec<u8>,
    /// The signer's public key (libp2p protobuf encoding).
    pub public_key: Vec<u8>,
    /// The signature over [`Receipt::signed_payload`].
    pub signature: Vec<u8>,
}

impl Receipt {
    /// What is signed for `body_bytes`: [`RECEIPT_SIGNING_PREFIX`] followed
    /// by them.
    pub fn signed_payload(body_bytes: &[u8]) -> Vec<u8> {
        [RECEIPT_SIGNING_PREFIX, body_bytes].concat()
    }

    pub(crate) fn to_pb(&self) -> pb::StepReceipt {
        pb::StepReceipt {
            body: self.body_bytes.clone(),
            public_key: self.public_key.clone(),
            signature: self.signature.clone(),
        }
    }

    pub(crate) fn from_pb(p: pb::StepReceipt) -> Result<Self, MessageError> {
        if p.public_key.len() > MAX_PUBLIC_KEY_BYTES {
            let n = p.public_key.len();
            return Err(field_error("public_key", format!("{n} bytes")));
        }
        if p.signature.len() > MAX_SIGNATURE_BYTES {
            let n = p.signature.len();
            return Err(field_error("signature", format!("{n} bytes")));
        }
        Ok(Self {
            body: ReceiptBody::decode(&p.body)?,
            body_bytes: p.body,
            public_key: p.public_key,
            signature: p.signature,
        })
    }
}

/// Why evidence does not hold together (before any recomputation).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EvidenceError {
    /// The steps do not run from position 0 without gaps or rewinds.
    #[error("the steps are not contiguous from position 0: step {index} starts at {start}, expected {expected}")]
    NotContiguous {
        /// The step.
        index: usize,
        /// Where it starts.
        start: u32,
        /// Where it should.
        expected: u32,
    },
    /// The steps do not hash to the chain the hop signed.
    #[error("the steps do not hash to the input chain the receipt signs")]
    WrongInputs,
    /// The output does not hash to what the hop signed.
    #[error("the output does not hash to the one the receipt signs")]
    WrongOutput,
    /// The last step, the output and the receipt disagree on shape or
    /// place, or the accused position lies outside the step.
    #[error("evidence is inconsistent: {0}")]
    Inconsistent(String),
}

/// Evidence that the hop whose receipt it holds signed a wrong output.
#[derive(Debug, Clone, PartialEq)]
pub struct Evidence {
    /// The hop's receipt of the step.
    pub receipt: Receipt,
    /// Every input step of the session on the hop, from position 0 to the
    /// receipt's step.
    pub steps: Vec<(u32, TensorFrame)>,
    /// The output the receipt signs.
    pub output: TensorFrame,
    /// The first wrong position, as the accuser found it.
    pub position: u32,
}

impl Evidence {
    /// Encodes it (the gossip payload).
    pub fn encode(&self) -> Vec<u8> {
        pb::Evidence {
            receipt: Some(self.receipt.to_pb()),
            steps: self
                .steps
                .iter()
                .map(|(start, f)| pb::EvidenceStep {
                    start_pos: *start,
                    hidden: f.encode(),
                })
                .collect(),
            output: self.output.encode(),
            position: self.position,
        }
        .encode_to_vec()
    }

    /// Decodes it, bounded by [`MAX_EVIDENCE_BYTES`] and
    /// [`MAX_EVIDENCE_STEPS`] before anything is allocated.
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        ensure_at_most(bytes.len(), MAX_EVIDENCE_BYTES)?;
        crate::codec::ensure_repeated_at_most(
            bytes,
            field::EVIDENCE_STEPS,
            MAX_EVIDENCE_STEPS,
            "steps",
            "steps",
        )?;
        let e: pb::Evidence = decode_pb(bytes)?;
        let receipt =
            Receipt::from_pb(e.receipt.ok_or_else(|| field_error("receipt", "missing"))?)?;
        let steps = e
            .steps
            .into_iter()
            .map(|s| Ok((s.start_pos, TensorFrame::decode(&s.hidden)?)))
            .collect::<Result<Vec<_>, MessageError>>()?;
        Ok(Self {
            receipt,
            steps,
            output: TensorFrame::decode(&e.output)?,
            position: e.position,
        })
    }

    /// Checks that the steps and output are what the receipt signs, that
    /// the steps run from 0 without rewinds (so recomputing them repeats
    /// exactly what the hop computed), and that the accused position is in
    /// the receipt's step. The signature is the node's to check.
    pub fn check(&self) -> Result<(), EvidenceError> {
        let body = &self.receipt.body;
        let mut chain = InputChain::new(body.session_id);
        let mut at = 0u32;
        for (index, (start, frame)) in self.steps.iter().enumerate() {
            if *start != at {
                return Err(EvidenceError::NotContiguous {
                    index,
                    start: *start,
                    expected: at,
                });
            }
            chain.push(*start, frame);
            at = start.saturating_add(frame.shape().first().copied().unwrap_or(0) as u32);
        }
        if chain != body.inputs {
            return Err(EvidenceError::WrongInputs);
        }
        if frame_hash(&self.output) != body.output {
            return Err(EvidenceError::WrongOutput);
        }
        let inconsistent = |m: String| Err(EvidenceError::Inconsistent(m));
        let Some((last_start, last)) = self.steps.last() else {
            return inconsistent("no steps".into());
        };
        if *last_start != body.start_pos || last.shape().first() != Some(&(body.rows as usize)) {
            return inconsistent(format!(
                "the last step is {} rows at {last_start}, the receipt's {} at {}",
                last.shape().first().copied().unwrap_or(0),
                body.rows,
                body.start_pos
            ));
        }
        if self.output.shape() != last.shape() {
            return inconsistent(format!(
                "output of shape {:?} for an input of shape {:?}",
                self.output.shape(),
                last.shape()
            ));
        }
        if self.position < body.start_pos || self.position >= at {
            return inconsistent(format!(
                "position {} is outside the step's {}..{at}",
                self.position, body.start_pos
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    fn frame(rows: usize, v: f32) -> TensorFrame {
        TensorFrame::from_f32(vec![rows, 32], &vec![v; rows * 32], DType::Q8Block).unwrap()
    }

    fn evidence() -> Evidence {
        let id = SessionId([7; 16]);
        let steps = vec![(0, frame(5, 1.0)), (5, frame(1, 2.0)), (6, frame(1, 3.0))];
        let mut chain = InputChain::new(id);
        for (s, f) in &steps {
            chain.push(*s, f);
        }
        let output = frame(1, -4.0);
        let body = ReceiptBody {
            model_id: "m".into(),
            session_id: id,
            seq: 3,
            blocks: BlockRange { start: 2, end: 4 },
            start_pos: 6,
            rows: 1,
            inputs: chain,
            output: frame_hash(&output),
            adapter: None,
        };
        let body_bytes = body.encode();
        Evidence {
            receipt: Receipt {
                body,
                body_bytes,
                public_key: vec![1; 36],
                signature: vec![2; 64],
            },
            steps,
            output,
            position: 6,
        }
    }

    #[test]
    fn evidence_round_trips_and_checks() {
        let e = evidence();
        let back = Evidence::decode(&e.encode()).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.check(), Ok(()));
    }

    #[test]
    fn altered_evidence_is_refused() {
        let mut e = evidence();
        e.steps[1].1 = frame(1, 2.5);
        assert_eq!(e.check(), Err(EvidenceError::WrongInputs));
        let mut e = evidence();
        e.output = frame(1, 9.0);
        assert_eq!(e.check(), Err(EvidenceError::WrongOutput));
        let mut e = evidence();
        e.steps.remove(1);
        assert!(matches!(
            e.check(),
            Err(EvidenceError::NotContiguous { index: 1, .. })
        ));
        let mut e = evidence();
        e.position = 2;
        assert!(matches!(e.check(), Err(EvidenceError::Inconsistent(_))));
        // A chain with the same frames at other positions is another chain.
        let mut a = InputChain::new(SessionId([7; 16]));
        let mut b = a;
        a.push(0, &frame(1, 1.0));
        b.push(1, &frame(1, 1.0));
        assert_ne!(a, b);
    }

    #[test]
    fn oversized_evidence_is_refused_before_decoding() {
        let big = vec![0u8; MAX_EVIDENCE_BYTES + 1];
        assert!(matches!(
            Evidence::decode(&big),
            Err(MessageError::TooLarge { .. })
        ));
    }
}
