//! The nomoat wire contract: protocols, messages, tensor frames, limits and error codes.
//!
//! nomoat serves a large language model from a swarm of peers. Each server runs a
//! contiguous span of the model's transformer blocks; a client pushes the hidden
//! states of a sequence through a chain of servers whose spans, taken in order, cover
//! every block. This crate specifies everything those peers say to each other: the
//! stream protocols and their flows, the messages, the **tensor frame** that carries
//! hidden states, the limits and the error codes. The messages' fields are defined in
//! `proto/nomoat/v1/*.proto`; those files and this page are the whole contract.
//!
//! This crate performs no I/O. It turns bytes into checked values and back, and
//! nothing else: opening streams, timing and retries are the caller's concern. The
//! protobuf types are private; every message is read into a checked domain type
//! ([`InferMessage`], [`ServerInfo`]) that holds only values the rules below allow.
//!
//! # Participants
//!
//! - The **client** holds the token embeddings, the final norm and the LM head. It
//!   turns tokens into hidden states, picks a route, drives the session and samples
//!   the next token from the final hidden states. Raw tokens and logits never leave it.
//! - The **hops** are the servers of the session's route, numbered `0..k` in route
//!   order. Hop `i` runs the blocks [`Hop::blocks`] the route gives it; the blocks of
//!   consecutive hops chain, so together they run `route[0].start..route[k-1].end`.
//!
//! Peers are libp2p peers: streams run over authenticated, encrypted connections,
//! and a peer id names the key that authenticates the other end.
//!
//! | protocol                               | carried by                | messages                      |
//! |----------------------------------------|---------------------------|-------------------------------|
//! | `/nomoat/infer/1` ([`INFER_PROTOCOL`]) | streams, one per session  | [`InferMessage`]              |
//! | `/nomoat/info/1` ([`INFO_PROTOCOL`])   | a stream per query        | `InfoRequest`, `InfoResponse` |
//! | `/nomoat/weights/1` ([`WEIGHTS_PROTOCOL`]) | a stream per request  | [`WeightsRequest`], [`WeightsResponse`] |
//! | topic `nomoat/v1/servers/<model id>`   | gossipsub                 | [`ServerInfo`]                |
//!
//! # Message framing
//!
//! Every message on a stream is a `u32` little-endian length, then that many bytes of
//! protobuf. The length excludes the 4 prefix bytes and is at most
//! [`MAX_MESSAGE_BYTES`]: a receiver reads the prefix, calls [`check_message_len`],
//! and only then allocates and reads the body. A longer prefix is answered with
//! [`ErrorCode::TooLarge`] and the stream is closed (its framing can no longer be
//! trusted). [`InferMessage::encode_framed`] writes prefix and body in one buffer;
//! the other `encode*` functions write the body only.
//!
//! A gossipsub message carries one body without a prefix: gossipsub frames it.
//!
//! # The inference protocol, `/nomoat/infer/1`
//!
//! Every message on an inference stream is one `InferFrame`, read as an
//! [`InferMessage`]. A stream carries one session: its first frame is
//! [`InferMessage::Open`] (client to hop) or [`InferMessage::Attach`] (hop to next
//! hop), and every later frame names the same [`SessionId`], 16 random bytes chosen
//! by the client.
//!
//! ## Opening a session
//!
//! 1. The client opens one stream to each hop of the route and sends it an
//!    [`OpenSession`]: the session id, the model id, the whole route, the receiver's
//!    `hop_index`, and `max_length`, the most positions the session will hold.
//! 2. Hops are opened from the last to the first: the client opens hop `k - 1`, waits
//!    for its [`InferMessage::Opened`], then opens hop `k - 2`, and so on to hop 0.
//! 3. A hop that is not the last opens a **push stream** to the next hop of the route
//!    and sends [`InferMessage::Attach`] with its own hop index as `from_hop`. As the
//!    next hop was opened first, it already holds the session; it accepts the push
//!    stream only from the peer that the route names as hop `from_hop`, where
//!    `from_hop + 1` is its own index.
//! 4. When its session is ready and its push stream attached, a hop answers the
//!    client with [`InferMessage::Opened`], echoing its `hop_index` and giving the
//!    `max_length` it will hold (at most the one asked for).
//!
//! A hop refuses an `OpenSession` with an [`ErrorFrame`]: [`ErrorCode::WrongModel`] for
//! a model it does not serve, [`ErrorCode::WrongBlocks`] for blocks it does not hold,
//! [`ErrorCode::Busy`] when it has no room for another session.
//!
//! ## Steps
//!
//! A [`Step`] carries the hidden states of positions `start_pos..start_pos + t`, as a
//! tensor frame of shape `[t, hidden]`.
//!
//! ```text
//! client --Step--> hop 0 --Step--> hop 1 --Step--> ... --Step--> hop k-1
//!   ^                |               |                             |
//!   +------Copy------+------Copy-----+-----------Result------------+
//! ```
//!
//! - The client sends each step to hop 0, on its stream to hop 0.
//! - Hop `i` runs its blocks on the step's hidden states and sends the output as a
//!   `Step` with the same session id, `seq` and `start_pos` on its push stream to
//!   hop `i + 1`.
//! - The last hop answers the client with [`InferMessage::Result`], the step's final
//!   hidden states, on the client's stream to it.
//! - Every other hop also sends the client an [`InferMessage::Copy`] of its output on
//!   the client's stream to it, after forwarding the step: off the critical path. (The
//!   last hop's result is its copy; it sends no other. A replay step that stops at
//!   `last_hop` is answered with a `Copy` from that hop, the last or not.) The client
//!   thus holds every span's input, which it replays to a replacement when a hop
//!   fails, and re-runs on other servers to spot-check a hop (nomoat-node's
//!   `client::verify`).
//! - Every hop sends its output in the dtype of the step's input (see below).
//!
//! A step therefore crosses `k + 1` network legs on its critical path, not `2k`.
//!
//! ## Sequence numbers and positions
//!
//! Every answer is correlated with its step by `seq`.
//!
//! - `seq` increases within a session. A hop answers a step whose `seq` is not above
//!   the highest it has processed with [`ErrorCode::Replayed`], and does not run it:
//!   a duplicate never changes the session.
//! - A session's length is the number of positions its hops hold. A step with
//!   `start_pos` equal to the length appends; a `start_pos` below the length
//!   **rewinds** the session to `start_pos` first (dropping the later positions), then
//!   appends. A `start_pos` past the length would leave a gap and is refused.
//! - A step that would take the session past its `max_length` is refused with
//!   [`ErrorCode::ContextFull`].
//! - A hop checks the frame against its span with [`TensorFrame::expect`]:
//!   `t >= 1` and the model's hidden size. A mismatch is
//!   [`ErrorCode::BadDType`] or [`ErrorCode::BadShape`].
//! - The wire dtype is the sender's choice, step by step: a hop computes in
//!   f32 and sends its output (on, as the result, and as the copy) in the
//!   dtype of the input it received, so the client's choice holds along the
//!   whole route. [`DType::Q8Block`] needs a hidden size that is a multiple
//!   of [`Q8_BLOCK`].
//!
//! ## Errors
//!
//! A hop reports a failure to the client as an [`InferMessage::Error`] on the client's
//! stream to it: an [`ErrorCode`], a message for people, the session, the step's `seq`
//! (0 when the error is not about a step) and the reporting hop's index. Errors never
//! travel up a push stream; a hop whose push stream to the next hop fails reports
//! that to the client too. A frame naming a session the receiver does not hold is
//! answered with [`ErrorCode::UnknownSession`].
//!
//! After an error about one step the session stays open: the client may retry,
//! rewind or close. A frame whose body does not decode is answered with
//! [`ErrorCode::Malformed`] and the stream stays usable (the length prefix keeps
//! the framing intact); after an oversized length prefix the receiver sends
//! [`ErrorCode::TooLarge`] and closes the stream. Messages other than `Step`,
//! `Result` and `Copy` are at most [`MAX_CONTROL_BYTES`], and repeated fields are
//! counted against their limits before anything is allocated for them.
//!
//! ## Failover
//!
//! When hop `i` fails (it times out, its stream closes, or it reports an error of its
//! own), the client replaces it without starting over. Hops `i..=j` that failed
//! together are replaced by one or more servers that together cover their blocks:
//!
//! 1. The client sends [`InferMessage::Reroute`] (the new route and the receiver's
//!    index) to every hop after the failed ones; each answers `Opened` and now expects
//!    a push stream from its new previous hop.
//! 2. It opens the session on the replacement hops, last first, with `Open` naming
//!    the new route; the last replacement attaches to the hop after it.
//! 3. It sends `Reroute` to the hop before the failed ones (if any), which attaches
//!    its push stream to the first replacement and drops the old one.
//! 4. It replays the failed hops' input history, kept from their predecessors'
//!    copies, to the first replacement, step by step as originally cut, each as a
//!    `Step` with `last_hop` set to the last replacement: that hop only copies its
//!    output to the client, so the hops after it are not disturbed. A replay is
//!    bit-for-bit the computation the failed hop did.
//! 5. It sends the failed step again from hop 0 with a new `seq`; hops that had
//!    already run it rewind (its `start_pos` is below their length).
//!
//! A push stream from a hop that is no longer the receiver's previous hop is ignored
//! from the moment the receiver takes a `Reroute`.
//!
//! ## Closing
//!
//! [`InferMessage::Close`] ends the session on the receiver, which frees its KV cache
//! and closes its push stream and the stream. The client sends it to every hop. A hop
//! that shuts down tells each client with an [`ErrorCode::Internal`] error; a session
//! idle past the server's timeout is dropped, and a later step is answered with
//! [`ErrorCode::UnknownSession`]. A stream that ends without `Close` ends the session
//! too.
//!
//! ## Validation of a message
//!
//! [`InferMessage::decode`] never panics, and accepts a message only if:
//!
//! - it is at most [`MAX_MESSAGE_BYTES`] long, is valid protobuf and carries a message;
//! - every session id is [`SESSION_ID_LEN`] bytes (an error frame's may be empty: the
//!   error is about no session);
//! - an `OpenSession` route has 1 to [`MAX_ROUTE_HOPS`] hops, each with a peer id of
//!   1 to 128 bytes and a non-empty block range; consecutive hops' blocks chain
//!   (`route[i].end == route[i + 1].start`); `hop_index` is within the route; and
//!   `max_length` is at least 1;
//! - every hidden state is a valid tensor frame ([`TensorFrame::decode`]);
//! - an error code fits in a `u16` (an unknown code is kept in
//!   [`ErrorFrame::raw_code`], with [`ErrorFrame::code`] `None`);
//! - every text (model id, error message) is at most [`MAX_TEXT_BYTES`] bytes.
//!
//! Checks against the receiver's own state (model, blocks, session, dtype, shape,
//! positions) are the receiver's, with the codes given above.
//!
//! ## Example: a step
//!
//! ```
//! use nomoat_protocol::{
//!     check_message_len, DType, ErrorCode, ErrorFrame, InferMessage, SessionId, Step,
//!     TensorFrame,
//! };
//!
//! // The client sends one token's hidden state, of width 2, at position 5.
//! let session_id = SessionId([7; 16]);
//! let step = InferMessage::Step(Step {
//!     session_id,
//!     seq: 6,
//!     start_pos: 5,
//!     hidden: TensorFrame::from_f32(vec![1, 2], &[1.0, -2.0], DType::F32)?,
//!     last_hop: None,
//! });
//! let framed = step.encode_framed();
//!
//! // Hop 0 reads the length prefix, checks it, then decodes the body.
//! let len = u32::from_le_bytes(framed[..4].try_into()?) as usize;
//! check_message_len(len)?;
//! let received = InferMessage::decode(&framed[4..4 + len])?;
//! assert_eq!(received, step);
//! let InferMessage::Step(s) = &received else {
//!     unreachable!("a step was sent")
//! };
//! // Its span takes f32 states of width 2, any number of tokens.
//! s.hidden.expect(Some(DType::F32), &[None, Some(2)])?;
//!
//! // The same step again is a replay: hop 0 answers with a typed error.
//! let answer = InferMessage::Error(ErrorFrame::new(
//!     ErrorCode::Replayed,
//!     "step 6 already processed",
//!     Some(session_id),
//!     s.seq,
//!     0,
//! ));
//! let InferMessage::Error(e) = InferMessage::decode(&answer.encode())? else {
//!     unreachable!("an error was sent")
//! };
//! assert_eq!((e.code, e.seq, e.hop_index), (Some(ErrorCode::Replayed), 6, 0));
//!
//! // A damaged message is an error with a wire code, never a panic.
//! let err = InferMessage::decode(&framed[4..4 + len - 1]).unwrap_err();
//! assert_eq!(ErrorCode::from(&err), ErrorCode::Malformed);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # The information protocol, `/nomoat/info/1`
//!
//! Any peer may ask another which servers it knows. The asker opens a stream and sends
//! one `InfoRequest` ([`encode_info_request`]) naming a model id, or empty for every
//! model. The answerer sends one `InfoResponse` ([`encode_info_response`]): every live
//! [`SignedInfo`] it knows for that model, at most [`MAX_INFO_SERVERS`] in at most
//! [`MAX_INFO_BYTES`], its own included when it is a server, each with the signature
//! its server made, so the answerer can relay announcements but not forge or alter
//! them. Then the stream closes. Both messages are framed as above, and
//! [`decode_info_response`] rejects the whole answer if any entry is invalid; the
//! receiver checks each signature and drops the entries whose signer is not the
//! server they describe.
//!
//! # Weight sharing, `/nomoat/weights/1`
//!
//! A model travels as a [`Manifest`] and chunks. The manifest holds what the
//! loader needs besides tensor data (a GGUF file's header with its metadata,
//! tokenizer and tensor infos; or a safetensors model's `config.json`,
//! `tokenizer.json` and `tokenizer_config.json`) and every tensor: name,
//! [`TensorRole`] (block index, embedding, final norm, LM head, or shared),
//! dtype, shape, byte length and the BLAKE3 [`Hash`](struct@Hash) of each chunk of its data.
//! A tensor's data is cut into chunks of `chunk_size` bytes
//! ([`CHUNK_SIZE`], 1 MiB, when imported by nomoat), the last one shorter;
//! chunks never span two tensors, so the chunks of a block are exactly the
//! chunks of its tensors.
//!
//! The **model id** is the BLAKE3 hash of the manifest's canonical bytes,
//! [`Manifest::encode`]. [`Manifest::decode`] accepts only canonical bytes, so
//! a manifest has one id.
//!
//! ## Flows
//!
//! Each request opens a stream; the asker sends one [`WeightsRequest`] (at most
//! [`MAX_CONTROL_BYTES`]), the answerer sends its answers and closes. Messages
//! are framed as above.
//!
//! - [`WeightsRequest::Manifest`]: one [`WeightsResponse::Manifest`] with the
//!   manifest's bytes, or an error. The asker checks them with
//!   [`Manifest::decode_verified`]: bytes that do not hash to the model id are
//!   refused before they are decoded ([`MessageError::WrongHash`]), and the
//!   asker turns to another peer.
//! - [`WeightsRequest::Have`]: one [`WeightsResponse::Have`], the blocks of
//!   which the answerer holds every chunk, and whether it holds the head.
//! - [`WeightsRequest::Chunks`]: 1 to [`MAX_CHUNKS_PER_REQUEST`] hashes; one
//!   answer per hash, in request order: [`WeightsResponse::Chunk`], or an
//!   error with [`ErrorCode::NotFound`]. A sender may write
//!   [`chunk_frame_header`] and then the data, without copying the data into a
//!   message.
//!
//! The asker checks every chunk against the manifest before it uses or
//! stores it: the hash it came with is the one asked for, its length is the
//! one the manifest gives that chunk, and its BLAKE3 hash is its name. A chunk
//! that fails is dropped, the peer is penalised, and the chunk is asked of
//! another peer. Peers that provide a model are found through Kademlia
//! provider records keyed by the model id (hex) and through [`ServerInfo`]
//! announcements of servers of that model id.
//!
//! ## Example: a manifest and a chunk
//!
//! ```
//! use bytes::Bytes;
//! use nomoat_protocol::{
//!     Hash, Manifest, MessageError, ModelFormat, TensorEntry, TensorRole, WeightsResponse,
//!     MIN_CHUNK_BYTES,
//! };
//!
//! let data = vec![7u8; 5000];
//! let manifest = Manifest {
//!     format: ModelFormat::Gguf,
//!     chunk_size: MIN_CHUNK_BYTES, // 4096: this tensor is two chunks
//!     architecture: "llama".into(),
//!     num_blocks: 1,
//!     header: b"GGUF...".to_vec(),
//!     tokenizer: vec![],
//!     tokenizer_config: vec![],
//!     tensors: vec![TensorEntry {
//!         name: "blk.0.ffn_up.weight".into(),
//!         role: TensorRole::Block(0),
//!         dtype: "F32".into(),
//!         shape: vec![1250],
//!         byte_len: 5000,
//!         chunks: data.chunks(4096).map(Hash::of).collect(),
//!     }],
//! };
//! let id = manifest.id();
//! let bytes = manifest.encode();
//! assert_eq!(Manifest::decode_verified(&bytes, &id)?, manifest);
//!
//! // One flipped byte in transit: refused before decoding.
//! let mut forged = bytes.clone();
//! forged[10] ^= 1;
//! assert!(matches!(
//!     Manifest::decode_verified(&forged, &id),
//!     Err(MessageError::WrongHash { .. })
//! ));
//!
//! // Block 0 needs both chunks: 4096 bytes, then 904.
//! let chunks = manifest.chunks_for(&(0..1), false);
//! assert_eq!(chunks.iter().map(|c| c.len).collect::<Vec<_>>(), [4096, 904]);
//!
//! // A chunk answer; the asker checks length and hash before keeping it.
//! let answer = WeightsResponse::Chunk {
//!     hash: chunks[1].hash,
//!     data: Bytes::copy_from_slice(&data[4096..]),
//! };
//! let framed = answer.encode_framed();
//! let WeightsResponse::Chunk { hash, data: got } =
//!     WeightsResponse::decode_bytes(Bytes::from(framed[4..].to_vec()))?
//! else {
//!     unreachable!("a chunk was sent")
//! };
//! assert_eq!(got.len() as u32, chunks[1].len);
//! assert_eq!(Hash::of(&got), hash);
//! # Ok::<(), MessageError>(())
//! ```
//!
//! # Server heartbeats
//!
//! A server publishes its [`ServerInfo`] signed with its peer key ([`SignedInfo`],
//! over [`SERVER_INFO_SIGNING_PREFIX`] and the encoded info) at a regular interval
//! on the gossipsub topic `nomoat/v1/servers/<model id>`. Gossipsub signs each
//! message with the publisher's peer key as well; a receiver drops a heartbeat whose
//! `peer_id` is not both the message's signed source and the signer of the info, and
//! forgets a server whose heartbeats stop. Self-reported numbers (throughput, load, free KV positions) are
//! hints: routing trusts its own measurements over them. `batch_capacity` is the
//! number of sessions one batched pass adds before it takes twice one session's
//! step (0: not measured yet); routing divides a server's open sessions by it.
//!
//! [`ServerInfo::decode`] accepts a heartbeat only if it is at most
//! [`MAX_CONTROL_BYTES`] long, its peer id is 1 to 128 bytes, its block range is
//! non-empty and ends at or before `num_blocks`, throughput, load and batch capacity
//! are finite and not negative, it has at most [`MAX_ADDRS`] addresses and [`MAX_ANNOUNCED_ADAPTERS`]
//! adapters of 32 bytes each, and every text and address
//! is at most [`MAX_TEXT_BYTES`] bytes. An unknown reachability reads as
//! [`Reachability::Unknown`].
//!
//! # The tensor frame, version 1
//!
//! Between peers, hidden states travel as a tensor frame in the `hidden` field of a
//! `Step`, a `StepResult` or a `SpanOutput`.
//!
//! - The **sender** (the client, or the hop running the previous span) builds a
//!   [`TensorFrame`] with [`TensorFrame::new`] or [`TensorFrame::from_f32`] and
//!   writes [`TensorFrame::encode`].
//! - The **receiver** decodes it ([`InferMessage::decode`] calls
//!   [`TensorFrame::decode`]), then calls [`TensorFrame::expect`] with the dtype and
//!   shape its span needs. On any error it answers with the [`ErrorCode`] that
//!   [`ErrorCode::from`] gives for the error.
//!
//! ## Layout
//!
//! A frame is a fixed 8-byte header, the dimensions, then the data. All integers and
//! all elements are little-endian.
//!
//! | offset        | size       | field     | value                                   |
//! |---------------|------------|-----------|-----------------------------------------|
//! | 0             | 2          | magic     | `"NT"` ([`TENSOR_HEADER_MAGIC`])        |
//! | 2             | 1          | version   | `1` ([`TENSOR_FRAME_VERSION`])          |
//! | 3             | 1          | dtype     | [`DType`] as `u8`: 1 f32, 2 f16, 3 bf16, 4 q8 |
//! | 4             | 1          | rank      | `0..=4` ([`MAX_TENSOR_RANK`])           |
//! | 5             | 3          | reserved  | zero                                    |
//! | 8             | 4 × rank   | dims      | one `u32` per axis, outermost first     |
//! | 8 + 4 × rank  | data bytes | data      | elements in row-major order             |
//!
//! The header is therefore `8 + 4 * rank` bytes, and the data is
//! `product(dims) / dtype.block_len() * dtype.block_bytes()` bytes: for the
//! plain dtypes one element is one block. Rank 0 is a scalar: one element.
//! [`DType::Q8Block`] needs a last axis that is a multiple of [`Q8_BLOCK`]; each
//! block is an f16 scale then 32 `i8` values.
//!
//! ## Validation of a frame
//!
//! [`TensorFrame::decode`] accepts a frame only if all of these hold, and never panics
//! on any input:
//!
//! - the magic is `"NT"` and the version is `1`;
//! - the dtype byte names a [`DType`], and the rank is at most [`MAX_TENSOR_RANK`];
//! - the reserved bytes are zero (later versions may use them);
//! - every dimension is at least 1;
//! - the data is at most [`MAX_TENSOR_BYTES`] bytes, computed without overflow and
//!   checked before anything is allocated;
//! - the input is exactly one frame long: no byte missing, no byte left over.
//!
//! [`TensorFrame::new`] checks the same rules on in-memory values, so every
//! `TensorFrame` can be encoded and every encoding decodes to an equal frame. Each
//! frame has exactly one encoding.
//!
//! ## Example: a tensor frame
//!
//! One token's hidden state of width 2, shaped `[batch, tokens, hidden]`, sent as f16:
//!
//! ```
//! use nomoat_protocol::{DType, ErrorCode, TensorError, TensorFrame};
//!
//! let frame = TensorFrame::from_f32(vec![1, 1, 2], &[1.0, -2.0], DType::F16)?;
//! let bytes = frame.encode();
//! assert_eq!(
//!     bytes,
//!     [
//!         b'N', b'T', 1, 2, 3, 0, 0, 0, // magic, version 1, f16, rank 3, reserved
//!         1, 0, 0, 0, // batch 1
//!         1, 0, 0, 0, // tokens 1
//!         2, 0, 0, 0, // hidden 2
//!         0x00, 0x3c, // 1.0 as f16
//!         0x00, 0xc0, // -2.0 as f16
//!     ]
//! );
//! assert_eq!(bytes.len(), frame.encoded_len());
//!
//! // The receiver decodes, then checks the frame against what its span needs:
//! // f16, one sequence, any number of tokens, hidden width 2.
//! let received = TensorFrame::decode(&bytes)?;
//! assert_eq!(received, frame);
//! received.expect(Some(DType::F16), &[Some(1), None, Some(2)])?;
//! assert_eq!(received.to_f32(), [1.0, -2.0]);
//!
//! // A span with another hidden width rejects it, and answers with a wire code.
//! let err = received.expect(None, &[Some(1), None, Some(4096)]).unwrap_err();
//! assert_eq!(err.to_string(), "expected shape [1, ?, 4096], got [1, 1, 2]");
//! assert_eq!(ErrorCode::from(&err), ErrorCode::BadShape);
//!
//! // Damaged input is an error, never a panic.
//! assert!(matches!(
//!     TensorFrame::decode(&bytes[..bytes.len() - 1]),
//!     Err(TensorError::Truncated { .. })
//! ));
//! # Ok::<(), TensorError>(())
//! ```
//!
//! # Limits
//!
//! Every read is bounded before anything is allocated.
//!
//! | limit                      | value           | bounds                                             |
//! |----------------------------|-----------------|----------------------------------------------------|
//! | [`MAX_MESSAGE_BYTES`]      | 64 MiB + 64 KiB | one message body, length prefix excluded           |
//! | [`MAX_CONTROL_BYTES`]      | 256 KiB         | a message without hidden states, chunk or manifest |
//! | [`MAX_TENSOR_BYTES`]       | 64 MiB          | the data of one tensor frame                       |
//! | [`MAX_TENSOR_RANK`]        | 4               | the axes of one tensor frame                       |
//! | [`MAX_ROUTE_HOPS`]         | 64              | the hops of one route                              |
//! | [`MAX_INFO_BYTES`]         | 4 MiB           | one information answer                             |
//! | [`MAX_INFO_SERVERS`]       | 1,024           | the entries of one information answer              |
//! | [`MAX_ADDRS`]              | 32              | the addresses of one `ServerInfo`                  |
//! | [`MAX_ANNOUNCED_ADAPTERS`] | 32              | the adapters of one `ServerInfo`                   |
//! | [`MAX_PUBLIC_KEY_BYTES`]   | 1,024           | the public key of one signed `ServerInfo`          |
//! | [`MAX_SIGNATURE_BYTES`]    | 1,024           | the signature of one signed `ServerInfo`           |
//! | [`MAX_TEXT_BYTES`]         | 4,096           | a model id, error message, version or address      |
//! | [`MAX_EVIDENCE_BYTES`]     | 960 KiB         | one piece of evidence (a gossip message)           |
//! | [`MAX_EVIDENCE_STEPS`]     | 4,096           | the input steps of one piece of evidence           |
//! | [`SESSION_ID_LEN`]         | 16              | a session id, exactly                              |
//! | [`MAX_MANIFEST_BYTES`]     | 32 MiB          | a manifest's canonical bytes                       |
//! | [`MAX_MANIFEST_TENSORS`]   | 65,536          | the tensors of one manifest                        |
//! | [`MAX_MANIFEST_BLOCKS`]    | 65,536          | the blocks of one manifest, and of one `Have`      |
//! | [`MAX_MANIFEST_DIMS`]      | 8               | the axes of a tensor in a manifest                 |
//! | [`MIN_CHUNK_BYTES`]        | 4 KiB           | a manifest's chunk size, at least                  |
//! | [`MAX_CHUNK_BYTES`]        | 4 MiB           | a manifest's chunk size, and so one chunk          |
//! | [`MAX_CHUNKS_PER_REQUEST`] | 64              | the hashes of one `GetChunks`                      |
//! | peer id                    | 1 to 128 bytes  | a peer id in a route or a `ServerInfo`             |
//!
//! The numbers in this table are checked against the constants by a test.
//!
//! A receiver may read at most `8 + 4 * MAX_TENSOR_RANK + MAX_TENSOR_BYTES` bytes for
//! one tensor frame; [`MAX_MESSAGE_BYTES`] leaves room for one frame and its envelope.
//! Limits on state (sessions per server, positions per session, concurrent streams
//! per peer) are each server's own, reported with [`ErrorCode::Busy`] and
//! [`ErrorCode::ContextFull`].
//!
//! # Errors on the wire
//!
//! Local failures are [`TensorError`]s and [`MessageError`]s; the wire carries only
//! [`ErrorCode`], a `u16` namespace shared by every nomoat message. [`ErrorCode::from`]
//! is the one mapping from either to codes: a tensor error maps by its kind, an
//! oversized message to [`ErrorCode::TooLarge`], any other invalid message to
//! [`ErrorCode::Malformed`]. Codes never change meaning; unknown codes read as `None`
//! from [`ErrorCode::from_u16`], and a receiver treats them as
//! [`ErrorCode::Internal`].
//!
//! # Non-goals
//!
//! - No tokens, logits, code or compute graphs on the wire: servers receive hidden
//!   states and run their own blocks.
//! - No encryption, signatures or peer authentication in this layer: libp2p's
//!   transports and gossipsub's signed messages provide them.
//! - No version negotiation inside a protocol: an incompatible change gets a new
//!   protocol id (`/nomoat/infer/2`); fields are only added, and removed field
//!   numbers are `reserved`.
//! - No several sessions on one stream, and no batching of sessions in one step.
//! - No flow control of its own: a stream's back-pressure is the transport's.
//! - For tensor frames: no strides, offsets or views (data is always dense and
//!   row-major); no compression and no checksum (the transport already protects
//!   integrity, and hidden states compress poorly); no big-endian data and no integer
//!   dtypes; no streaming of a single frame (a frame is at most [`MAX_TENSOR_BYTES`]
//!   and is decoded from one contiguous buffer).

mod blocks;
mod codec;
mod error;
mod ids;
mod infer;
mod info;
mod manifest;
mod pb;
mod receipt;
mod tensor;
mod weights;

pub use blocks::{BlockRange, RangeError};
pub use codec::{
    check_message_len, chunk_frame_header, MAX_CONTROL_BYTES, MAX_MESSAGE_BYTES, MAX_TEXT_BYTES,
};
pub use error::{ErrorCode, MessageError, TensorError};
pub use ids::{Hash, Hop, SessionId, HASH_LEN, SESSION_ID_LEN};
pub use infer::{
    ErrorFrame, InferMessage, OpenSession, Reroute, Step, INFER_PROTOCOL, MAX_ROUTE_HOPS,
};
pub use info::{
    decode_info_request, decode_info_response, encode_info_request, encode_info_response,
    Reachability, ServerInfo, SignedInfo, INFO_PROTOCOL, MAX_ADDRS, MAX_ANNOUNCED_ADAPTERS,
    MAX_INFO_BYTES, MAX_INFO_SERVERS, MAX_PUBLIC_KEY_BYTES, MAX_SIGNATURE_BYTES,
    SERVER_INFO_SIGNING_PREFIX,
};
pub use manifest::{
    ChunkRef, Manifest, ModelFormat, TensorEntry, TensorRole, CHUNK_SIZE, MANIFEST_VERSION,
    MAX_CHUNK_BYTES, MAX_MANIFEST_BLOCKS, MAX_MANIFEST_BYTES, MAX_MANIFEST_DIMS,
    MAX_MANIFEST_TENSORS, MIN_CHUNK_BYTES,
};
pub use receipt::{
    frame_hash, Evidence, EvidenceError, InputChain, Receipt, ReceiptBody, INPUT_CHAIN_DOMAIN,
    MAX_EVIDENCE_BYTES, MAX_EVIDENCE_STEPS, RECEIPT_SIGNING_PREFIX,
};
pub use tensor::{DType, TensorFrame, Q8_BLOCK};
pub use weights::{
    Have, WeightsRequest, WeightsResponse, MAX_CHUNKS_PER_REQUEST, WEIGHTS_PROTOCOL,
};

/// Largest data section of one tensor frame, in bytes (64 MiB).
pub const MAX_TENSOR_BYTES: usize = 64 * 1024 * 1024;

/// Largest number of axes of one tensor frame.
pub const MAX_TENSOR_RANK: usize = 4;

/// First two bytes of every tensor frame.
pub const TENSOR_HEADER_MAGIC: [u8; 2] = *b"NT";

/// Version of the tensor frame layout described in the crate docs.
pub const TENSOR_FRAME_VERSION: u8 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    /// The crate's sources, where the limits are documented and defined.
    const SOURCES: [&str; 9] = [
        include_str!("lib.rs"),
        include_str!("codec.rs"),
        include_str!("ids.rs"),
        include_str!("infer.rs"),
        include_str!("info.rs"),
        include_str!("manifest.rs"),
        include_str!("weights.rs"),
        include_str!("tensor.rs"),
        include_str!("receipt.rs"),
    ];

    /// The value of the limit a table row names.
    fn limit(name: &str) -> Option<usize> {
        Some(match name {
            "MAX_MESSAGE_BYTES" => MAX_MESSAGE_BYTES,
            "MAX_CONTROL_BYTES" => MAX_CONTROL_BYTES,
            "MAX_TENSOR_BYTES" => MAX_TENSOR_BYTES,
            "MAX_TENSOR_RANK" => MAX_TENSOR_RANK,
            "MAX_ROUTE_HOPS" => MAX_ROUTE_HOPS,
            "MAX_INFO_BYTES" => MAX_INFO_BYTES,
            "MAX_INFO_SERVERS" => MAX_INFO_SERVERS,
            "MAX_ADDRS" => MAX_ADDRS,
            "MAX_ANNOUNCED_ADAPTERS" => MAX_ANNOUNCED_ADAPTERS,
            "MAX_PUBLIC_KEY_BYTES" => MAX_PUBLIC_KEY_BYTES,
            "MAX_SIGNATURE_BYTES" => MAX_SIGNATURE_BYTES,
            "MAX_TEXT_BYTES" => MAX_TEXT_BYTES,
            "MAX_EVIDENCE_BYTES" => MAX_EVIDENCE_BYTES,
            "MAX_EVIDENCE_STEPS" => MAX_EVIDENCE_STEPS,
            "SESSION_ID_LEN" => SESSION_ID_LEN,
            "MAX_MANIFEST_BYTES" => MAX_MANIFEST_BYTES,
            "MAX_MANIFEST_TENSORS" => MAX_MANIFEST_TENSORS,
            "MAX_MANIFEST_BLOCKS" => MAX_MANIFEST_BLOCKS as usize,
            "MAX_MANIFEST_DIMS" => MAX_MANIFEST_DIMS,
            "MIN_CHUNK_BYTES" => MIN_CHUNK_BYTES as usize,
            "MAX_CHUNK_BYTES" => MAX_CHUNK_BYTES as usize,
            "MAX_CHUNKS_PER_REQUEST" => MAX_CHUNKS_PER_REQUEST,
            _ => return None,
        })
    }

    /// A value as the table writes it: `65,536`, `4 MiB`, `64 MiB + 64 KiB`.
    fn value(text: &str) -> usize {
        text.split(" + ")
            .map(|term| {
                let (number, unit) = term.split_once(' ').unwrap_or((term, ""));
                let number: usize = number.replace(',', "").parse().expect(term);
                number
                    * match unit {
                        "" => 1,
                        "KiB" => 1 << 10,
                        "MiB" => 1 << 20,
                        other => panic!("unit {other:?} in {text:?}"),
                    }
            })
            .sum()
    }

    /// The rows of the limits table in the crate docs: first and second cell.
    fn table() -> Vec<(String, String)> {
        let docs = SOURCES[0]
            .split("//! # Limits")
            .nth(1)
            .expect("a Limits section");
        docs.lines()
            .skip(1) // the rest of the heading's line
            .take_while(|l| l.starts_with("//!"))
            .filter_map(|l| l.strip_prefix("//! |"))
            .skip(2) // the header and the rule
            .map(|row| {
                let cells: Vec<&str> = row.split('|').map(str::trim).collect();
                (cells[0].to_owned(), cells[1].to_owned())
            })
            .collect()
    }

    #[test]
    fn the_limits_table_gives_each_constant_its_value() {
        let rows = table();
        assert!(rows.len() > 10, "{rows:?}");
        for (name, text) in &rows {
            if name == "peer id" {
                let max = text
                    .strip_prefix("1 to ")
                    .and_then(|t| t.strip_suffix(" bytes"));
                assert_eq!(
                    max.map(value),
                    Some(ids::MAX_PEER_ID_BYTES),
                    "peer id: {text}"
                );
                continue;
            }
            let name = name
                .strip_prefix("[`")
                .and_then(|n| n.strip_suffix("`]"))
                .unwrap_or_else(|| panic!("row {name:?} names no constant"));
            let expected = limit(name).unwrap_or_else(|| panic!("{name} is not a known limit"));
            assert_eq!(
                value(text),
                expected,
                "{name} is {expected}, the table says {text}"
            );
        }
    }

    #[test]
    fn the_limits_table_lists_every_limit() {
        let listed: Vec<String> = table().into_iter().map(|(name, _)| name).collect();
        for source in SOURCES {
            for line in source.lines() {
                let Some(rest) = line.strip_prefix("pub const ") else {
                    continue;
                };
                let name = rest.split(':').next().unwrap_or_default();
                if name.starts_with("MAX_") || name.starts_with("MIN_") {
                    assert!(
                        listed.contains(&format!("[`{name}`]")),
                        "{name} is missing from the limits table"
                    );
                }
            }
        }
    }
}
