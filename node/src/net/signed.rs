//! Announcements signed by the server they describe, so that a peer that
//! relays them (in an info answer) can neither forge nor alter one; and
//! the receipts a hop signs for each output it returns.

use libp2p::identity::{Keypair, PublicKey};
use libp2p::PeerId;
use nomoat_protocol::{Receipt, ReceiptBody, ServerInfo, SignedInfo};

/// `body`, signed with `key` (the hop's).
pub fn sign_receipt(key: &Keypair, body: ReceiptBody) -> Receipt {
    let body_bytes = body.encode();
    let signature = key
        .sign(&Receipt::signed_payload(&body_bytes))
        .unwrap_or_default();
    Receipt {
        body,
        body_bytes,
        public_key: key.public().encode_protobuf(),
        signature,
    }
}

/// The peer that signed `receipt`, once its signature is good.
///
/// # Errors
///
/// What is wrong, in words.
pub fn verify_receipt(receipt: &Receipt) -> Result<PeerId, String> {
    let key = PublicKey::try_decode_protobuf(&receipt.public_key)
        .map_err(|e| format!("bad public key: {e}"))?;
    let peer = key.to_peer_id();
    if !key.verify(
        &Receipt::signed_payload(&receipt.body_bytes),
        &receipt.signature,
    ) {
        return Err(format!("the receipt's signature by {peer} does not verify"));
    }
    Ok(peer)
}

/// `info`, signed with `key` (the key of the server it describes).
pub fn sign_info(key: &Keypair, info: ServerInfo) -> SignedInfo {
    let info_bytes = info.encode();
    let signature = key
        .sign(&SignedInfo::signed_payload(&info_bytes))
        .unwrap_or_default();
    SignedInfo {
        info,
        info_bytes,
        public_key: key.public().encode_protobuf(),
        signature,
    }
}

/// The peer id of the server `signed` describes, once its key is that
/// peer's and the signature is good.
///
/// # Errors
///
/// What is wrong, in words.
pub fn verify_info(signed: &SignedInfo) -> Result<PeerId, String> {
    let key = PublicKey::try_decode_protobuf(&signed.public_key)
        .map_err(|e| format!("bad public key: {e}"))?;
    let peer = key.to_peer_id();
    if PeerId::from_bytes(&signed.info.peer_id).ok() != Some(peer) {
        return Err(format!(
            "signed by {peer}, which is not the server it describes"
        ));
    }
    if !key.verify(
        &SignedInfo::signed_payload(&signed.info_bytes),
        &signed.signature,
    ) {
        return Err(format!("the signature of {peer} does not verify"));
    }
    Ok(peer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nomoat_protocol::{BlockRange, Reachability};

    fn info(peer: PeerId, ts: u64) -> ServerInfo {
        ServerInfo {
            peer_id: peer.to_bytes(),
            model_id: "m".into(),
            blocks: BlockRange { start: 0, end: 4 },
            num_blocks: 8,
            throughput: 1.0,
            free_kv_tokens: 10,
            load: 0.0,
            version: "v".into(),
            addrs: Vec::new(),
            reachability: Reachability::Public,
            timestamp_ms: ts,
            active_sessions: 0,
            batch_capacity: 0.0,
            hidden_size: 64,
            adapters: Vec::new(),
        }
    }

    #[test]
    fn a_receipt_verifies_only_untouched() {
        use nomoat_protocol::{Hash, InputChain, SessionId};
        let key = Keypair::generate_ed25519();
        let body = ReceiptBody {
            model_id: "m".into(),
            session_id: SessionId([3; 16]),
            seq: 1,
            blocks: BlockRange { start: 0, end: 2 },
            start_pos: 0,
            rows: 4,
            inputs: InputChain::new(SessionId([3; 16])),
            output: Hash([9; 32]),
            adapter: None,
        };
        let r = sign_receipt(&key, body);
        assert_eq!(verify_receipt(&r), Ok(key.public().to_peer_id()));
        let mut altered = r.clone();
        altered.body.output = Hash([8; 32]);
        altered.body_bytes = altered.body.encode();
        assert!(verify_receipt(&altered).is_err());
    }

    #[test]
    fn only_the_servers_own_untouched_signature_verifies() {
        let key = Keypair::generate_ed25519();
        let me = key.public().to_peer_id();
        let signed = sign_info(&key, info(me, 1));
        assert_eq!(verify_info(&signed), Ok(me));
        let round = SignedInfo::decode(&signed.encode()).unwrap();
        assert_eq!(verify_info(&round), Ok(me));
        // A relay that stamps the entry newer breaks the signature.
        let mut newer = signed.clone();
        newer.info.timestamp_ms = u64::MAX;
        newer.info_bytes = newer.info.encode();
        assert!(verify_info(&newer).unwrap_err().contains("does not verify"));
        // Another key cannot vouch for this server.
        let other = Keypair::generate_ed25519();
        let forged = sign_info(&other, info(me, 2));
        assert!(verify_info(&forged).unwrap_err().contains("not the server"));
    }
}
