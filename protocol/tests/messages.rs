//! Wire tests for the messages of `/nomoat/infer/1` and `/nomoat/info/1`: golden
//! bytes worked out by hand from the protobuf encoding rules, every validation rule,
//! and property-based round trips and robustness checks.
//!
//! Invalid messages cannot be built from the domain types, so the tests write
//! protobuf by hand with [`Pb`], an encoder independent of prost.

use nomoat_protocol::{
    check_message_len, decode_info_request, decode_info_response, encode_info_request,
    encode_info_response, BlockRange, DType, ErrorCode, ErrorFrame, Hop, InferMessage,
    MessageError, OpenSession, Reachability, Reroute, ServerInfo, SessionId, SignedInfo, Step,
    TensorError, TensorFrame, MAX_ADDRS, MAX_INFO_SERVERS, MAX_MESSAGE_BYTES, MAX_ROUTE_HOPS,
    MAX_TEXT_BYTES, SESSION_ID_LEN,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// A hand-written protobuf encoder.
// ---------------------------------------------------------------------------

/// Appends `v` as a base-128 varint, low groups first.
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A protobuf message under construction: each method appends one field.
#[derive(Debug, Default, Clone)]
struct Pb(Vec<u8>);

impl Pb {
    fn new() -> Self {
        Self::default()
    }

    fn tag(&mut self, field: u32, wire_type: u8) {
        put_varint(&mut self.0, (u64::from(field) << 3) | u64::from(wire_type));
    }

    /// Wire type 0: `uint32`, `uint64`, enums.
    fn varint(mut self, field: u32, v: u64) -> Self {
        self.tag(field, 0);
        put_varint(&mut self.0, v);
        self
    }

    /// Wire type 2: `bytes`, `string`.
    fn bytes(mut self, field: u32, b: &[u8]) -> Self {
        self.tag(field, 2);
        put_varint(&mut self.0, b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }

    /// Wire type 2: an embedded message.
    fn msg(self, field: u32, m: Pb) -> Self {
        self.bytes(field, &m.0)
    }

    /// Wire type 5: `float`.
    fn f32(mut self, field: u32, v: f32) -> Self {
        self.tag(field, 5);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn build(self) -> Vec<u8> {
        self.0
    }
}

// Field numbers of `InferFrame.kind`.
const OPEN: u32 = 1;
const ATTACH: u32 = 2;
const STEP: u32 = 3;
const RESULT: u32 = 4;
const COPY: u32 = 5;
const OPENED: u32 = 6;
const ERROR: u32 = 7;
const CLOSE: u32 = 8;
const REROUTE: u32 = 9;

/// An `InferFrame` whose `kind` is `field` holding `inner`.
fn frame(field: u32, inner: Pb) -> Vec<u8> {
    Pb::new().msg(field, inner).build()
}

fn block_range(start: u32, end: u32) -> Pb {
    Pb::new().varint(1, start.into()).varint(2, end.into())
}

fn pb_hop(peer_id: &[u8], start: u32, end: u32) -> Pb {
    Pb::new().bytes(1, peer_id).msg(2, block_range(start, end))
}

fn pb_open(session_id: &[u8], route: Vec<Pb>, hop_index: u32, max_length: u32) -> Vec<u8> {
    let mut o = Pb::new().bytes(1, session_id).bytes(2, b"m");
    for h in route {
        o = o.msg(3, h);
    }
    frame(
        OPEN,
        o.varint(4, hop_index.into()).varint(5, max_length.into()),
    )
}

/// `n` hops of two blocks each, chaining from block 0.
fn chain(n: u32) -> Vec<Pb> {
    (0..n).map(|i| pb_hop(&[0xaa], 2 * i, 2 * i + 2)).collect()
}

fn pb_step(session_id: &[u8], hidden: &[u8]) -> Vec<u8> {
    frame(
        STEP,
        Pb::new()
            .bytes(1, session_id)
            .varint(2, 1)
            .varint(3, 0)
            .bytes(4, hidden),
    )
}

/// A valid `ServerInfo` as protobuf; tests append fields to override it (for a
/// scalar field, the last occurrence wins; repeated fields accumulate).
fn pb_server_info() -> Pb {
    Pb::new()
        .bytes(1, &[0xaa])
        .bytes(2, b"m")
        .msg(3, block_range(2, 4))
        .varint(4, 4)
        .f32(5, 1.5)
}

// ---------------------------------------------------------------------------
// Golden bytes.
// ---------------------------------------------------------------------------

/// Session id `00 01 .. 0f`.
const SID: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

/// A length-delimited field holding [`SID`]: the tag byte given (`0x0a` is field 1,
/// wire type 2), the length 16, then the 16 bytes.
macro_rules! sid_field {
    ($tag:expr) => {
        [
            $tag, 0x10, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b,
            0x0c, 0x0d, 0x0e, 0x0f,
        ]
    };
}

fn concat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// OpenSession to hop 1 of a route `aa: 0..2`, `bb: 2..4`, model "m", 300 positions.
fn golden_open() -> (InferMessage, Vec<u8>) {
    let msg = InferMessage::Open(OpenSession {
        session_id: SessionId(SID),
        model_id: "m".to_owned(),
        route: vec![
            Hop {
                peer_id: vec![0xaa],
                blocks: BlockRange { start: 0, end: 2 },
            },
            Hop {
                peer_id: vec![0xbb],
                blocks: BlockRange { start: 2, end: 4 },
            },
        ],
        hop_index: 1,
        max_length: 300,
        adapter: None,
    });
    let bytes = concat(&[
        // InferFrame.open (field 1, LEN), 46 bytes
        &[0x0a, 0x2e],
        // OpenSession.session_id (field 1, LEN), 16 bytes
        &sid_field!(0x0a),
        // model_id (field 2, LEN) "m"
        &[0x12, 0x01, b'm'],
        // route[0] (field 3, LEN), 7 bytes: Hop.peer_id (field 1, LEN) aa, then
        // Hop.blocks (field 2, LEN) with start 0 omitted as a default and end 2
        &[0x1a, 0x07, 0x0a, 0x01, 0xaa, 0x12, 0x02, 0x10, 0x02],
        // route[1] (field 3, LEN), 9 bytes: peer id bb, then blocks 2..4
        &[0x1a, 0x09, 0x0a, 0x01, 0xbb],
        &[0x12, 0x04, 0x08, 0x02, 0x10, 0x04],
        // hop_index (field 4, VARINT) 1
        &[0x20, 0x01],
        // max_length (field 5, VARINT) 300: low 7 bits 0x2c with the continuation
        // bit (0xac), then 300 >> 7 = 2
        &[0x28, 0xac, 0x02],
    ]);
    (msg, bytes)
}

/// `[[1.0, -2.0]]` as an f32 tensor frame (24 bytes).
const F32_FRAME: [u8; 24] = [
    b'N', b'T', 1, 1, 2, 0, 0, 0, // magic, version 1, f32, rank 2, reserved
    1, 0, 0, 0, // dim 0 = 1
    2, 0, 0, 0, // dim 1 = 2
    0x00, 0x00, 0x80, 0x3f, // 1.0
    0x00, 0x00, 0x00, 0xc0, // -2.0
];

/// Step 7 at position 5 carrying [`F32_FRAME`].
fn golden_step() -> (InferMessage, Vec<u8>) {
    let msg = InferMessage::Step(Step {
        session_id: SessionId(SID),
        seq: 7,
        start_pos: 5,
        hidden: TensorFrame::from_f32(vec![1, 2], &[1.0, -2.0], DType::F32).unwrap(),
        last_hop: None,
    });
    let bytes = concat(&[
        &[0x1a, 0x30],     // InferFrame.step (field 3, LEN), 48 bytes
        &sid_field!(0x0a), // Step.session_id (field 1, LEN)
        &[0x10, 0x07],     // seq (field 2, VARINT) 7
        &[0x18, 0x05],     // start_pos (field 3, VARINT) 5
        &[0x22, 0x18],     // hidden (field 4, LEN), 24 bytes
        &F32_FRAME,
    ]);
    (msg, bytes)
}

/// Hop 1 reports step 7 as a replay (code 10), message "dup".
fn golden_error() -> (InferMessage, Vec<u8>) {
    let msg = InferMessage::Error(ErrorFrame::new(
        ErrorCode::Replayed,
        "dup",
        Some(SessionId(SID)),
        7,
        1,
    ));
    let bytes = concat(&[
        &[0x3a, 0x1d],                   // InferFrame.error (field 7, LEN), 29 bytes
        &[0x08, 0x0a],                   // code (field 1, VARINT) 10
        &[0x12, 0x03, b'd', b'u', b'p'], // message (field 2, LEN) "dup"
        &sid_field!(0x1a),               // session_id (field 3, LEN)
        &[0x20, 0x07],                   // seq (field 4, VARINT) 7
        &[0x28, 0x01],                   // hop_index (field 5, VARINT) 1
    ]);
    (msg, bytes)
}

/// An error about no session: session id, seq and hop index are all omitted.
fn golden_sessionless_error() -> (InferMessage, Vec<u8>) {
    let msg = InferMessage::Error(ErrorFrame::new(ErrorCode::Busy, "", None, 0, 0));
    let bytes = vec![
        0x3a, 0x02, // InferFrame.error (field 7, LEN), 2 bytes
        0x08, 0x08, // code (field 1, VARINT) 8; empty message omitted
    ];
    (msg, bytes)
}

/// Close of the golden session.
fn golden_close() -> (InferMessage, Vec<u8>) {
    let msg = InferMessage::Close {
        session_id: SessionId(SID),
    };
    let bytes = concat(&[
        &[0x42, 0x12],     // InferFrame.close (field 8, LEN), 18 bytes
        &sid_field!(0x0a), // CloseSession.session_id (field 1, LEN)
    ]);
    (msg, bytes)
}

#[test]
fn golden_infer_messages() {
    let cases = [
        golden_open(),
        golden_step(),
        golden_error(),
        golden_sessionless_error(),
        golden_close(),
    ];
    for (msg, bytes) in cases {
        assert_eq!(msg.encode(), bytes, "{msg:?}");
        assert_eq!(InferMessage::decode(&bytes).unwrap(), msg);
    }
}

#[test]
fn golden_bytes_match_the_hand_encoder() {
    let route = vec![pb_hop(&[0xaa], 0, 2), pb_hop(&[0xbb], 2, 4)];
    // `Pb` writes `start: 0` explicitly, where prost omits the default; both decode alike.
    let explicit = pb_open(&SID, route, 1, 300);
    assert_eq!(explicit.len(), golden_open().1.len() + 2);
    assert_eq!(InferMessage::decode(&explicit).unwrap(), golden_open().0);

    let step = frame(
        STEP,
        Pb::new()
            .bytes(1, &SID)
            .varint(2, 7)
            .varint(3, 5)
            .bytes(4, &F32_FRAME),
    );
    assert_eq!(step, golden_step().1);
}

#[test]
fn golden_framed_message() {
    let (msg, body) = golden_close();
    let framed = msg.encode_framed();
    assert_eq!(
        framed,
        concat(&[
            &[0x14, 0x00, 0x00, 0x00], // length 20, u32 little-endian
            &[0x42, 0x12],             // InferFrame.close (field 8, LEN), 18 bytes
            &sid_field!(0x0a),         // CloseSession.session_id
        ])
    );
    assert_eq!(&framed[4..], body);

    // A longer body: the prefix is the body's length, little-endian.
    let (msg, body) = golden_step();
    let framed = msg.encode_framed();
    assert_eq!(framed[..4], [0x32, 0, 0, 0]);
    assert_eq!(&framed[4..], body);
}

/// A heartbeat with every field set.
fn golden_server_info() -> (ServerInfo, Vec<u8>) {
    let info = ServerInfo {
        peer_id: vec![0xaa],
        model_id: "m".to_owned(),
        blocks: BlockRange { start: 2, end: 4 },
        num_blocks: 4,
        hidden_size: 8,
        throughput: 1.5,
        free_kv_tokens: 100,
        load: 0.5,
        active_sessions: 1,
        batch_capacity: 2.5,
        version: "0.1".to_owned(),
        addrs: vec![vec![0x04, 127, 0, 0, 1]],
        reachability: Reachability::Public,
        timestamp_ms: 1000,
        adapters: Vec::new(),
    };
    let bytes = vec![
        0x0a, 0x01, 0xaa, // peer_id (field 1, LEN)
        0x12, 0x01, b'm', // model_id (field 2, LEN)
        0x1a, 0x04, 0x08, 0x02, 0x10, 0x04, // blocks (field 3, LEN): 2..4
        0x20, 0x04, // num_blocks (field 4, VARINT) 4
        0x2d, 0x00, 0x00, 0xc0, 0x3f, // throughput (field 5, I32) 1.5 = 0x3fc00000
        0x30, 0x64, // free_kv_tokens (field 6, VARINT) 100
        0x3d, 0x00, 0x00, 0x00, 0x3f, // load (field 7, I32) 0.5 = 0x3f000000
        0x42, 0x03, b'0', b'.', b'1', // version (field 8, LEN) "0.1"
        0x4a, 0x05, 0x04, 127, 0, 0, 1, // addrs[0] (field 9, LEN): /ip4/127.0.0.1
        0x50, 0x01, // reachability (field 10, VARINT) PUBLIC
        0x58, 0xe8, 0x07, // timestamp_ms (field 11, VARINT) 1000 = 0x68 | 0x80, 7
        0x60, 0x01, // active_sessions (field 12, VARINT) 1
        0x68, 0x08, // hidden_size (field 13, VARINT) 8
        0x7d, 0x00, 0x00, 0x20, 0x40, // batch_capacity (field 15, I32) 2.5 = 0x40200000
    ];
    (info, bytes)
}

/// Entries as signed ones (with stand-in keys and signatures: this crate
/// does not check them).
fn signed_all(servers: Vec<ServerInfo>) -> Vec<SignedInfo> {
    servers
        .into_iter()
        .map(|info| SignedInfo {
            info_bytes: info.encode(),
            info,
            public_key: vec![7; 36],
            signature: vec![9; 64],
        })
        .collect()
}

#[test]
fn golden_server_info_and_info_exchange() {
    let (info, bytes) = golden_server_info();
    assert_eq!(bytes.len(), 52);
    assert_eq!(info.encode(), bytes);
    assert_eq!(ServerInfo::decode(&bytes).unwrap(), info);

    // InfoRequest { model_id: "m" }, and the empty request for every model.
    assert_eq!(encode_info_request("m"), [0x0a, 0x01, b'm']);
    assert_eq!(decode_info_request(&[0x0a, 0x01, b'm']).unwrap(), "m");
    assert_eq!(encode_info_request(""), [] as [u8; 0]);
    assert_eq!(decode_info_request(&[]).unwrap(), "");

    // InfoResponse { signed: [SignedServerInfo { info, public_key: [1, 2],
    // signature: [3] }] }: field 2, LEN 61, then the three fields.
    let signed = SignedInfo {
        info: info.clone(),
        info_bytes: bytes.clone(),
        public_key: vec![1, 2],
        signature: vec![3],
    };
    let response = encode_info_response(std::slice::from_ref(&signed));
    assert_eq!(
        response,
        concat(&[
            &[0x12, 0x3d, 0x0a, 0x34],
            &bytes,
            &[0x12, 0x02, 1, 2, 0x1a, 0x01, 3]
        ])
    );
    assert_eq!(
        decode_info_response(&response).unwrap(),
        std::slice::from_ref(&signed)
    );
    assert_eq!(SignedInfo::decode(&signed.encode()).unwrap(), signed);
    assert_eq!(decode_info_response(&[]).unwrap(), []);
    // The unsigned entries of old answers (field 1) are ignored.
    let old = concat(&[&[0x0a, 0x34], &bytes]);
    assert_eq!(decode_info_response(&old).unwrap(), []);
}

// ---------------------------------------------------------------------------
// Validation: every rule, with the error it gives.
// ---------------------------------------------------------------------------

/// Asserts that `result` is a `Field` error about `name`, which maps to `Malformed`.
#[track_caller]
fn assert_field<T: std::fmt::Debug>(result: Result<T, MessageError>, name: &str) {
    assert_field_in(result, name, "");
}

/// As [`assert_field`], naming the case `what` on failure.
#[track_caller]
fn assert_field_in<T: std::fmt::Debug>(result: Result<T, MessageError>, name: &str, what: &str) {
    match result {
        Err(e @ MessageError::Field { field, .. }) if field == name => {
            assert_eq!(ErrorCode::from(&e), ErrorCode::Malformed, "{what}");
        }
        other => panic!("{what}: expected an invalid `{name}`, got {other:?}"),
    }
}

#[test]
fn open_session_rules() {
    let sid = &SID[..];
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty route", pb_open(sid, vec![], 0, 8), "route"),
        (
            "too many hops",
            pb_open(sid, chain(MAX_ROUTE_HOPS as u32 + 1), 0, 8),
            "route",
        ),
        (
            "gap between hops",
            pb_open(sid, vec![pb_hop(&[1], 0, 2), pb_hop(&[2], 3, 4)], 0, 8),
            "route",
        ),
        (
            "overlapping hops",
            pb_open(sid, vec![pb_hop(&[1], 0, 2), pb_hop(&[2], 1, 4)], 0, 8),
            "route",
        ),
        (
            "hops out of order",
            pb_open(sid, vec![pb_hop(&[1], 2, 4), pb_hop(&[2], 0, 2)], 0, 8),
            "route",
        ),
        (
            "hop_index past the route",
            pb_open(sid, chain(2), 2, 8),
            "hop_index",
        ),
        (
            "hop_index far past the route",
            pb_open(sid, chain(2), u32::MAX, 8),
            "hop_index",
        ),
        (
            "short session id",
            pb_open(&SID[..15], chain(2), 0, 8),
            "session_id",
        ),
        (
            "long session id",
            pb_open(&[0; 17], chain(2), 0, 8),
            "session_id",
        ),
        (
            "missing session id",
            pb_open(&[], chain(2), 0, 8),
            "session_id",
        ),
        ("max_length 0", pb_open(sid, chain(2), 0, 0), "max_length"),
        (
            "empty block range",
            pb_open(sid, vec![pb_hop(&[1], 2, 2)], 0, 8),
            "route.blocks",
        ),
        (
            "reversed block range",
            pb_open(sid, vec![pb_hop(&[1], 3, 2)], 0, 8),
            "route.blocks",
        ),
        (
            "block range all defaults",
            pb_open(sid, vec![Pb::new().bytes(1, &[1]).msg(2, Pb::new())], 0, 8),
            "route.blocks",
        ),
        (
            "missing block range",
            pb_open(sid, vec![Pb::new().bytes(1, &[1])], 0, 8),
            "route.blocks",
        ),
        (
            "empty peer id",
            pb_open(sid, vec![pb_hop(&[], 0, 2)], 0, 8),
            "route.peer_id",
        ),
        (
            "long peer id",
            pb_open(sid, vec![pb_hop(&[1; 129], 0, 2)], 0, 8),
            "route.peer_id",
        ),
        (
            "long model id",
            frame(
                OPEN,
                Pb::new()
                    .bytes(1, sid)
                    .bytes(2, &[b'x'; MAX_TEXT_BYTES + 1])
                    .msg(3, pb_hop(&[1], 0, 2))
                    .varint(5, 8),
            ),
            "model_id",
        ),
    ];
    for (what, bytes, name) in cases {
        assert_field_in(InferMessage::decode(&bytes), name, what);
    }
}

fn pb_reroute(route: Vec<Pb>, hop_index: u32) -> Vec<u8> {
    let mut r = Pb::new().bytes(1, &SID);
    for h in route {
        r = r.msg(2, h);
    }
    frame(REROUTE, r.varint(3, hop_index.into()))
}

#[test]
fn reroute_follows_the_route_rules() {
    let ok = InferMessage::decode(&pb_reroute(chain(3), 2)).unwrap();
    let InferMessage::Reroute(r) = ok else {
        panic!("not a reroute: {ok:?}");
    };
    assert_eq!(r.hop_index, 2);
    assert_eq!(r.prev_hop().map(|h| h.blocks.start), Some(2));
    assert!(r.next_hop().is_none());
    let cases = [
        ("empty route", pb_reroute(vec![], 0), "route"),
        (
            "too many hops",
            pb_reroute(chain(MAX_ROUTE_HOPS as u32 + 1), 0),
            "route",
        ),
        (
            "gap between hops",
            pb_reroute(vec![pb_hop(&[1], 0, 2), pb_hop(&[2], 3, 4)], 0),
            "route",
        ),
        (
            "hop_index past the route",
            pb_reroute(chain(2), 2),
            "hop_index",
        ),
    ];
    for (what, bytes, name) in cases {
        assert_field_in(InferMessage::decode(&bytes), name, what);
    }
}

#[test]
fn a_replay_step_names_its_last_hop() {
    let hidden = TensorFrame::from_f32(vec![1, 2], &[1.0, -2.0], DType::F32).unwrap();
    for last_hop in [None, Some(0), Some(5)] {
        let m = InferMessage::Step(Step {
            session_id: SessionId(SID),
            seq: 3,
            start_pos: 1,
            hidden: hidden.clone(),
            last_hop,
        });
        let framed = m.encode_framed();
        assert_eq!(framed[4..], m.encode()[..]);
        assert_eq!(InferMessage::decode(&framed[4..]).unwrap(), m);
    }
}

#[test]
fn open_session_limits_are_inclusive() {
    let max = InferMessage::decode(&pb_open(&SID, chain(MAX_ROUTE_HOPS as u32), 63, 1)).unwrap();
    let InferMessage::Open(open) = max else {
        panic!("{max:?}")
    };
    assert_eq!(open.route.len(), MAX_ROUTE_HOPS);
    assert_eq!(
        open.hop().blocks,
        BlockRange {
            start: 126,
            end: 128
        }
    );
    assert_eq!(open.next_hop(), None);

    let bytes = frame(
        OPEN,
        Pb::new()
            .bytes(1, &SID)
            .bytes(2, &[b'x'; MAX_TEXT_BYTES])
            .msg(3, pb_hop(&[1; 128], 0, 2))
            .msg(3, pb_hop(&[2], 2, 3))
            .varint(5, 8),
    );
    let InferMessage::Open(open) = InferMessage::decode(&bytes).unwrap() else {
        panic!()
    };
    assert_eq!(open.model_id.len(), MAX_TEXT_BYTES);
    assert_eq!(open.hop_index, 0);
    assert_eq!(open.hop().peer_id, [1; 128]);
    assert_eq!(
        open.next_hop().unwrap().blocks,
        BlockRange { start: 2, end: 3 }
    );
}

#[test]
fn every_session_id_is_checked() {
    for len in [0, 1, SESSION_ID_LEN - 1, SESSION_ID_LEN + 1, 32] {
        let sid = vec![7; len];
        let cases = [
            frame(ATTACH, Pb::new().bytes(1, &sid).varint(2, 1)),
            pb_step(&sid, &F32_FRAME),
            frame(RESULT, Pb::new().bytes(1, &sid).bytes(3, &F32_FRAME)),
            frame(COPY, Pb::new().bytes(1, &sid).bytes(4, &F32_FRAME)),
            frame(OPENED, Pb::new().bytes(1, &sid).varint(3, 8)),
            frame(CLOSE, Pb::new().bytes(1, &sid)),
        ];
        for bytes in cases {
            assert_field(InferMessage::decode(&bytes), "session_id");
        }
        // An error frame's session id is optional (empty), but never of another length.
        let error = frame(ERROR, Pb::new().varint(1, 1).bytes(3, &sid));
        if len == 0 {
            assert!(InferMessage::decode(&error).is_ok());
        } else {
            assert_field(InferMessage::decode(&error), "session_id");
        }
    }
}

#[test]
fn hidden_states_must_be_tensor_frames() {
    type Check = fn(&TensorError) -> bool;
    let bad_dtype = {
        let mut f = F32_FRAME;
        f[3] = 9;
        f
    };
    let cases: [(&[u8], Check, ErrorCode); 4] = [
        (
            b"not a frame",
            |e| matches!(e, TensorError::BadMagic),
            ErrorCode::Malformed,
        ),
        (
            &[],
            |e| matches!(e, TensorError::Truncated { .. }),
            ErrorCode::Malformed,
        ),
        (
            &bad_dtype,
            |e| matches!(e, TensorError::UnknownDType(9)),
            ErrorCode::BadDType,
        ),
        (
            &F32_FRAME[..23],
            |e| matches!(e, TensorError::Truncated { .. }),
            ErrorCode::Malformed,
        ),
    ];
    for (hidden, is_expected, code) in cases {
        let messages = [
            pb_step(&SID, hidden),
            frame(RESULT, Pb::new().bytes(1, &SID).bytes(3, hidden)),
            frame(COPY, Pb::new().bytes(1, &SID).bytes(4, hidden)),
        ];
        for bytes in messages {
            match InferMessage::decode(&bytes) {
                Err(e @ MessageError::Tensor(_)) => {
                    let MessageError::Tensor(t) = &e else {
                        unreachable!()
                    };
                    assert!(is_expected(t), "{hidden:?} gave {t:?}");
                    assert_eq!(ErrorCode::from(&e), code, "{e}");
                    assert_eq!(ErrorCode::from(&e), ErrorCode::from(t));
                }
                other => panic!("expected a tensor error, got {other:?}"),
            }
        }
    }
}

#[test]
fn oversized_input_is_too_large() {
    assert!(check_message_len(0).is_ok());
    assert!(check_message_len(MAX_MESSAGE_BYTES).is_ok());
    for len in [MAX_MESSAGE_BYTES + 1, u32::MAX as usize, usize::MAX] {
        match check_message_len(len) {
            Err(e @ MessageError::TooLarge { len: l, max }) => {
                assert_eq!((l, max), (len, MAX_MESSAGE_BYTES));
                assert_eq!(ErrorCode::from(&e), ErrorCode::TooLarge);
            }
            other => panic!("{len}: {other:?}"),
        }
    }

    // The decoders check the length before parsing anything.
    let big = vec![0u8; MAX_MESSAGE_BYTES + 1];
    let is_too_large = |e: MessageError| {
        assert_eq!(ErrorCode::from(&e), ErrorCode::TooLarge);
        matches!(e, MessageError::TooLarge { len, .. } if len == big.len())
    };
    assert!(is_too_large(InferMessage::decode(&big).unwrap_err()));
    assert!(is_too_large(ServerInfo::decode(&big).unwrap_err()));
    assert!(is_too_large(decode_info_request(&big).unwrap_err()));
    assert!(is_too_large(decode_info_response(&big).unwrap_err()));
}

#[test]
fn empty_and_garbage_frames_are_malformed() {
    let empty = InferMessage::decode(&[]).unwrap_err();
    assert!(matches!(empty, MessageError::Empty), "{empty:?}");
    assert_eq!(ErrorCode::from(&empty), ErrorCode::Malformed);
    // Only an unknown field: skipped, so the frame is empty too.
    let unknown = InferMessage::decode(&Pb::new().varint(99, 1).build()).unwrap_err();
    assert!(matches!(unknown, MessageError::Empty), "{unknown:?}");

    for garbage in [&[0xff][..], &[0x0a, 0x05, 0x00], &[0x0a], &[0x08, 0x80]] {
        let err = InferMessage::decode(garbage).unwrap_err();
        assert!(
            matches!(err, MessageError::Decode(_)),
            "{garbage:?}: {err:?}"
        );
        assert_eq!(ErrorCode::from(&err), ErrorCode::Malformed);
    }
}

#[test]
fn error_codes_unknown_and_out_of_range() {
    for raw in [0u16, 14, 999, u16::MAX] {
        let bytes = frame(ERROR, Pb::new().varint(1, raw.into()).bytes(2, b"?"));
        let InferMessage::Error(e) = InferMessage::decode(&bytes).unwrap() else {
            panic!()
        };
        assert_eq!(e.code, None);
        assert_eq!(e.raw_code, raw);
        assert_eq!(e.to_string(), format!("error {raw}: ?"));
        // The raw code survives a round trip.
        let msg = InferMessage::Error(e);
        assert_eq!(InferMessage::decode(&msg.encode()).unwrap(), msg);
    }
    let known = frame(ERROR, Pb::new().varint(1, 6).bytes(2, b"gone"));
    let InferMessage::Error(e) = InferMessage::decode(&known).unwrap() else {
        panic!()
    };
    assert_eq!(e.code, Some(ErrorCode::UnknownSession));
    assert_eq!(e.to_string(), "UnknownSession: gone");

    let wide = frame(ERROR, Pb::new().varint(1, 1 << 16));
    assert_field(InferMessage::decode(&wide), "code");
    let long = frame(
        ERROR,
        Pb::new().varint(1, 1).bytes(2, &[b'x'; MAX_TEXT_BYTES + 1]),
    );
    assert_field(InferMessage::decode(&long), "message");
}

#[test]
fn server_info_rules() {
    let ok = pb_server_info();
    assert!(ServerInfo::decode(&ok.clone().build()).is_ok());
    let nan = f32::NAN;
    let cases: Vec<(&str, Pb, &str)> = vec![
        (
            "blocks beyond num_blocks",
            ok.clone().varint(4, 3),
            "blocks",
        ),
        (
            "blocks in an empty model",
            ok.clone().varint(4, 0),
            "blocks",
        ),
        (
            "empty blocks",
            ok.clone().msg(3, block_range(3, 3)),
            "blocks",
        ),
        (
            "missing blocks",
            Pb::new().bytes(1, &[1]).varint(4, 4),
            "blocks",
        ),
        ("NaN throughput", ok.clone().f32(5, nan), "throughput"),
        (
            "infinite throughput",
            ok.clone().f32(5, f32::INFINITY),
            "throughput",
        ),
        ("negative throughput", ok.clone().f32(5, -1.0), "throughput"),
        ("NaN load", ok.clone().f32(7, nan), "load"),
        ("negative load", ok.clone().f32(7, -0.5), "load"),
        (
            "NaN batch capacity",
            ok.clone().f32(15, nan),
            "batch_capacity",
        ),
        (
            "negative batch capacity",
            ok.clone().f32(15, -2.0),
            "batch_capacity",
        ),
        ("empty peer id", ok.clone().bytes(1, &[]), "peer_id"),
        ("long peer id", ok.clone().bytes(1, &[1; 129]), "peer_id"),
        (
            "long model id",
            ok.clone().bytes(2, &[b'x'; MAX_TEXT_BYTES + 1]),
            "model_id",
        ),
        (
            "long version",
            ok.clone().bytes(8, &[b'x'; MAX_TEXT_BYTES + 1]),
            "version",
        ),
        (
            "too many addresses",
            (0..=MAX_ADDRS).fold(ok.clone(), |m, _| m.bytes(9, &[4, 127, 0, 0, 1])),
            "addrs",
        ),
        (
            "long address",
            ok.clone().bytes(9, &[0; MAX_TEXT_BYTES + 1]),
            "addrs",
        ),
    ];
    for (what, pb, name) in cases {
        let bytes = pb.build();
        assert_field_in(ServerInfo::decode(&bytes), name, what);
        // The same entry inside an info response fails the whole response.
        let response = Pb::new()
            .bytes(2, &Pb::new().bytes(1, &bytes).build())
            .build();
        assert_field_in(decode_info_response(&response), name, what);
    }

    // Limits are inclusive, and an unknown reachability reads as Unknown.
    let edge = (0..MAX_ADDRS)
        .fold(ok.clone(), |m, _| m.bytes(9, &[0; MAX_TEXT_BYTES]))
        .varint(4, 4)
        .msg(3, block_range(0, 4))
        .varint(10, 7)
        .f32(5, 0.0)
        .f32(7, 0.0);
    let info = ServerInfo::decode(&edge.build()).unwrap();
    assert_eq!(info.addrs.len(), MAX_ADDRS);
    assert_eq!(info.blocks, BlockRange { start: 0, end: 4 });
    assert_eq!(info.reachability, Reachability::Unknown);
}

#[test]
fn info_response_and_request_limits() {
    let entry = Pb::new().bytes(1, &pb_server_info().build()).build();
    let many = |n: usize| (0..n).fold(Pb::new(), |m, _| m.bytes(2, &entry)).build();
    assert_eq!(
        decode_info_response(&many(MAX_INFO_SERVERS)).unwrap().len(),
        MAX_INFO_SERVERS
    );
    assert_field(decode_info_response(&many(MAX_INFO_SERVERS + 1)), "signed");
    let long_key = Pb::new()
        .bytes(1, &pb_server_info().build())
        .bytes(2, &[0; nomoat_protocol::MAX_PUBLIC_KEY_BYTES + 1])
        .build();
    assert_field(SignedInfo::decode(&long_key), "public_key");

    let long = Pb::new().bytes(1, &[b'x'; MAX_TEXT_BYTES + 1]).build();
    assert_field(decode_info_request(&long), "model_id");
    let not_utf8 = Pb::new().bytes(1, &[0xff, 0xfe]).build();
    assert!(matches!(
        decode_info_request(&not_utf8),
        Err(MessageError::Decode(_))
    ));
}

// ---------------------------------------------------------------------------
// Property tests.
// ---------------------------------------------------------------------------

fn session_id() -> impl Strategy<Value = SessionId> {
    any::<[u8; SESSION_ID_LEN]>().prop_map(SessionId)
}

fn tensor() -> impl Strategy<Value = TensorFrame> {
    let dtype = prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)];
    (dtype, prop::collection::vec(1usize..4, 0..=4)).prop_flat_map(|(dtype, shape)| {
        let len = shape.iter().product::<usize>() * dtype.block_bytes();
        prop::collection::vec(any::<u8>(), len)
            .prop_map(move |data| TensorFrame::new(dtype, shape.clone(), data).unwrap())
    })
}

fn text() -> impl Strategy<Value = String> {
    ".{0,12}"
}

fn peer_id() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 1..=128)
}

fn route() -> impl Strategy<Value = Vec<Hop>> {
    let hop = (peer_id(), 1u32..50);
    (0u32..1000, prop::collection::vec(hop, 1..=MAX_ROUTE_HOPS)).prop_map(|(mut start, hops)| {
        hops.into_iter()
            .map(|(peer_id, len)| {
                let blocks = BlockRange {
                    start,
                    end: start + len,
                };
                start = blocks.end;
                Hop { peer_id, blocks }
            })
            .collect()
    })
}

fn open_session() -> impl Strategy<Value = OpenSession> {
    (session_id(), text(), route(), any::<u32>(), 1u32..).prop_map(
        |(session_id, model_id, route, i, max_length)| OpenSession {
            session_id,
            model_id,
            hop_index: i % route.len() as u32,
            route,
            max_length,
            adapter: None,
        },
    )
}

fn error_frame() -> impl Strategy<Value = ErrorFrame> {
    (
        any::<u16>(),
        text(),
        prop::option::of(session_id()),
        any::<u64>(),
        any::<u32>(),
    )
        .prop_map(
            |(raw_code, message, session_id, seq, hop_index)| ErrorFrame {
                code: ErrorCode::from_u16(raw_code),
                raw_code,
                message,
                session_id,
                seq,
                hop_index,
            },
        )
}

fn infer_message() -> impl Strategy<Value = InferMessage> {
    prop_oneof![
        open_session().prop_map(InferMessage::Open),
        (session_id(), any::<u32>()).prop_map(|(session_id, from_hop)| InferMessage::Attach {
            session_id,
            from_hop
        }),
        (
            session_id(),
            any::<u64>(),
            any::<u32>(),
            tensor(),
            prop::option::of(0u32..u32::MAX)
        )
            .prop_map(|(session_id, seq, start_pos, hidden, last_hop)| {
                InferMessage::Step(Step {
                    session_id,
                    seq,
                    start_pos,
                    hidden,
                    last_hop,
                })
            }),
        (session_id(), route(), any::<u32>()).prop_map(|(session_id, route, i)| {
            InferMessage::Reroute(Reroute {
                session_id,
                hop_index: i % route.len() as u32,
                route,
            })
        }),
        (session_id(), any::<u64>(), tensor()).prop_map(|(session_id, seq, hidden)| {
            InferMessage::Result {
                session_id,
                seq,
                hidden,
            }
        }),
        (session_id(), any::<u64>(), any::<u32>(), tensor()).prop_map(
            |(session_id, seq, hop_index, hidden)| InferMessage::Copy {
                session_id,
                seq,
                hop_index,
                hidden,
            }
        ),
        (session_id(), any::<u32>(), any::<u32>()).prop_map(
            |(session_id, hop_index, max_length)| InferMessage::Opened {
                session_id,
                hop_index,
                max_length,
            }
        ),
        error_frame().prop_map(InferMessage::Error),
        session_id().prop_map(|session_id| InferMessage::Close { session_id }),
    ]
}

fn server_info() -> impl Strategy<Value = ServerInfo> {
    let reachability = prop_oneof![
        Just(Reachability::Unknown),
        Just(Reachability::Public),
        Just(Reachability::Private),
    ];
    (
        (peer_id(), text(), 0u32..100, 1u32..100, 0u32..100),
        (
            any::<u32>(),
            0.0f32..1e9,
            any::<u32>(),
            0.0f32..=1.0,
            any::<u32>(),
        ),
        (
            text(),
            prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..=MAX_ADDRS),
            reachability,
            any::<u64>(),
            0.0f32..64.0,
        ),
    )
        .prop_map(
            |(
                (peer_id, model_id, start, len, extra),
                (hidden_size, throughput, free_kv_tokens, load, active_sessions),
                (version, addrs, reachability, timestamp_ms, batch_capacity),
            )| ServerInfo {
                peer_id,
                model_id,
                blocks: BlockRange {
                    start,
                    end: start + len,
                },
                num_blocks: start + len + extra,
                hidden_size,
                throughput,
                free_kv_tokens,
                load,
                active_sessions,
                batch_capacity,
                version,
                addrs,
                reachability,
                timestamp_ms,
                adapters: Vec::new(),
            },
        )
}

/// Runs every decoder over `bytes`; none may panic, whatever the bytes.
fn decode_all(bytes: &[u8]) {
    let _ = InferMessage::decode(bytes);
    let _ = ServerInfo::decode(bytes);
    let _ = decode_info_request(bytes);
    let _ = decode_info_response(bytes);
    let _ = SignedInfo::decode(bytes);
    if let Ok(e) = nomoat_protocol::Evidence::decode(bytes) {
        let _ = e.check();
    }
    let _ = nomoat_protocol::ReceiptBody::decode(bytes);
}

proptest! {
    #[test]
    fn infer_messages_round_trip(msg in infer_message()) {
        let bytes = msg.encode();
        prop_assert_eq!(InferMessage::decode(&bytes).unwrap(), msg.clone());
        let framed = msg.encode_framed();
        prop_assert_eq!(&framed[..4], &(bytes.len() as u32).to_le_bytes());
        prop_assert_eq!(&framed[4..], &bytes[..]);
    }

    #[test]
    fn a_message_is_named_by_its_variant(msg in infer_message()) {
        // `Step(Step { .. })`, `Result { .. }`: the variant's name comes first.
        let debug = format!("{msg:?}");
        let variant = debug.split(['(', ' ']).next().unwrap();
        prop_assert_eq!(msg.name(), variant);
    }

    #[test]
    fn server_info_round_trips(info in server_info()) {
        prop_assert_eq!(ServerInfo::decode(&info.encode()).unwrap(), info);
    }

    #[test]
    fn info_exchange_round_trips(
        model_id in text(),
        servers in prop::collection::vec(server_info(), 0..6),
    ) {
        prop_assert_eq!(decode_info_request(&encode_info_request(&model_id)).unwrap(), model_id);
        let signed = signed_all(servers);
        prop_assert_eq!(decode_info_response(&encode_info_response(&signed)).unwrap(), signed);
    }

    #[test]
    fn decoders_never_panic_on_arbitrary_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        decode_all(&bytes);
    }

    #[test]
    fn decoders_never_panic_on_damaged_messages(
        msg in infer_message(),
        servers in prop::collection::vec(server_info(), 1..3),
        index in any::<prop::sample::Index>(),
        flip in 1u8..,
        cut in any::<prop::sample::Index>(),
    ) {
        for bytes in [
            msg.encode(),
            servers[0].encode(),
            encode_info_response(&signed_all(servers.clone())),
        ] {
            let mut flipped = bytes.clone();
            flipped[index.index(bytes.len())] ^= flip;
            decode_all(&flipped);
            decode_all(&bytes[..cut.index(bytes.len())]);
        }
    }
}
