//! The protobuf plumbing shared by every nomoat message: the stream-wide
//! limits, checks that build [`MessageError`]s, a field walker that counts
//! repeated fields before prost allocates them, and the hand-written
//! encoders of the large messages (hidden states, chunks) that write the
//! bytes prost would, without copying the payload into a message first.

use bytes::Buf;

use crate::pb::field;
use crate::{
    Hash, MessageError, SessionId, TensorFrame, HASH_LEN, MAX_TENSOR_BYTES, SESSION_ID_LEN,
};

/// Largest message on any nomoat stream, length prefix excluded: one tensor
/// frame plus room for the envelope.
pub const MAX_MESSAGE_BYTES: usize = MAX_TENSOR_BYTES + 64 * 1024;
/// Largest message that carries no hidden state (everything but `Step`,
/// `Result` and `Copy`; a `ServerInfo`; an info request).
pub const MAX_CONTROL_BYTES: usize = 256 * 1024;
/// Longest model id, error message, version or address accepted.
pub const MAX_TEXT_BYTES: usize = 4096;

/// Checks the length prefix of a message before reading it.
pub fn check_message_len(len: usize) -> Result<(), MessageError> {
    ensure_at_most(len, MAX_MESSAGE_BYTES)
}

/// A [`MessageError::Field`]: `field` is missing or out of range.
pub(crate) fn field_error(field: &'static str, reason: impl Into<String>) -> MessageError {
    MessageError::Field {
        field,
        reason: reason.into(),
    }
}

/// [`MessageError::TooLarge`] unless `len <= max`.
pub(crate) fn ensure_at_most(len: usize, max: usize) -> Result<(), MessageError> {
    if len > max {
        return Err(MessageError::TooLarge { len, max });
    }
    Ok(())
}

/// `s`, unless it is longer than [`MAX_TEXT_BYTES`].
pub(crate) fn bounded_text(s: String, name: &'static str) -> Result<String, MessageError> {
    if s.len() > MAX_TEXT_BYTES {
        return Err(field_error(
            name,
            format!("{} bytes, limit {MAX_TEXT_BYTES}", s.len()),
        ));
    }
    Ok(s)
}

/// Decodes a prost message, any failure as [`MessageError::Decode`].
pub(crate) fn decode_pb<M: prost::Message + Default>(bytes: impl Buf) -> Result<M, MessageError> {
    M::decode(bytes).map_err(|e| MessageError::Decode(e.to_string()))
}

/// A prost message with its 4-byte little-endian length prefix.
pub(crate) fn encode_framed_pb(body: &impl prost::Message) -> Vec<u8> {
    let len = body.encoded_len();
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    body.encode(&mut out).expect("a Vec grows as needed");
    out
}

/// Walks the top-level fields of protobuf bytes, calling `f` with each
/// field number and, for length-delimited fields, the payload. Lets limits
/// on repeated fields be checked before prost allocates anything.
pub(crate) fn for_each_field(
    bytes: &[u8],
    mut f: impl FnMut(u32, Option<&[u8]>) -> Result<(), MessageError>,
) -> Result<(), MessageError> {
    let truncated = || MessageError::Decode("truncated field".into());
    let skip = |i: usize, n: usize| {
        i.checked_add(n)
            .filter(|&e| e <= bytes.len())
            .ok_or_else(truncated)
    };
    let mut i = 0;
    while i < bytes.len() {
        let key = read_varint(bytes, &mut i)?;
        let number = (key >> 3) as u32;
        let payload = match key & 7 {
            0 => {
                read_varint(bytes, &mut i)?;
                None
            }
            1 => {
                i = skip(i, 8)?;
                None
            }
            5 => {
                i = skip(i, 4)?;
                None
            }
            2 => {
                let len = read_varint(bytes, &mut i)?;
                let end = skip(i, usize::try_from(len).map_err(|_| truncated())?)?;
                let p = &bytes[i..end];
                i = end;
                Some(p)
            }
            other => {
                return Err(MessageError::Decode(format!(
                    "unsupported wire type {other}"
                )))
            }
        };
        f(number, payload)?;
    }
    Ok(())
}

/// Counts the occurrences of field `number` in `bytes`, refusing more than
/// `max` (of `what`, for the message) with a [`MessageError::Field`] about
/// `name`.
pub(crate) fn ensure_repeated_at_most(
    bytes: &[u8],
    number: u32,
    max: usize,
    name: &'static str,
    what: &str,
) -> Result<(), MessageError> {
    let mut count = 0;
    for_each_field(bytes, |n, _| {
        count += usize::from(n == number);
        if count > max {
            return Err(field_error(name, format!("more than {max} {what}")));
        }
        Ok(())
    })
}

/// Reads the varint at `*i`, moving `*i` past it.
fn read_varint(b: &[u8], i: &mut usize) -> Result<u64, MessageError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b
            .get(*i)
            .ok_or_else(|| MessageError::Decode("truncated varint".into()))?;
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(MessageError::Decode("varint too long".into()))
}

/// Bytes of `v` as a varint.
fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros()).div_ceil(7) as usize
}

/// Appends `v` as a varint.
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Wire type of a varint field.
pub(crate) const VARINT: u8 = 0;
/// Wire type of a length-delimited field.
pub(crate) const LEN: u8 = 2;

/// The one-byte tag of field `number` with wire type `wire`. Used in
/// constants, so a field number of 16 or more fails the build.
pub(crate) const fn tag(number: u32, wire: u8) -> u8 {
    assert!(number < 16, "a one-byte tag needs a field number below 16");
    (number as u8) << 3 | wire
}

/// Where a hidden-state message puts its fields, as one-byte tags:
/// `InferFrame { frame: { session_id, varints.., hidden } }`, the tags in
/// field number order.
#[derive(Debug)]
pub(crate) struct HiddenLayout {
    /// The message's tag in `InferFrame`.
    pub(crate) frame: u8,
    /// The session id's tag.
    pub(crate) session_id: u8,
    /// The tags of the varint fields between session id and hidden states.
    pub(crate) varints: &'static [u8],
    /// The hidden states' tag.
    pub(crate) hidden: u8,
}

/// Writes a hidden-state message with its length prefix, as prost would
/// (fields in number order, zero varints omitted); `varints` are the values
/// of `layout.varints`, in order.
pub(crate) fn frame_hidden(
    layout: &HiddenLayout,
    session: &SessionId,
    varints: &[u64],
    hidden: &TensorFrame,
) -> Vec<u8> {
    debug_assert_eq!(layout.varints.len(), varints.len());
    let fields = || layout.varints.iter().zip(varints).filter(|(_, v)| **v != 0);
    let hlen = hidden.encoded_len();
    let inner = 2
        + SESSION_ID_LEN
        + fields().map(|(_, v)| 1 + varint_len(*v)).sum::<usize>()
        + 1
        + varint_len(hlen as u64)
        + hlen;
    let body = 1 + varint_len(inner as u64) + inner;
    let mut out = Vec::with_capacity(4 + body);
    out.extend_from_slice(&(body as u32).to_le_bytes());
    out.push(layout.frame);
    put_varint(&mut out, inner as u64);
    out.push(layout.session_id);
    out.push(SESSION_ID_LEN as u8);
    out.extend_from_slice(&session.0);
    for (&tag, &v) in fields() {
        out.push(tag);
        put_varint(&mut out, v);
    }
    out.push(layout.hidden);
    put_varint(&mut out, hlen as u64);
    hidden.encode_header_to(&mut out);
    out.extend_from_slice(hidden.data());
    out
}

/// The length prefix and envelope of a chunk answer, up to its data: a
/// sender writes these bytes and then the data itself, without copying the
/// data into a message. Identical to
/// [`WeightsResponse::encode_framed`](crate::WeightsResponse::encode_framed).
pub fn chunk_frame_header(hash: &Hash, data_len: usize) -> Vec<u8> {
    const CHUNK: u8 = tag(field::WEIGHTS_RESPONSE_CHUNK, LEN);
    const HASH: u8 = tag(field::CHUNK_DATA_HASH, LEN);
    const DATA: u8 = tag(field::CHUNK_DATA_DATA, LEN);
    // ChunkData { hash, data } (an empty data field is omitted).
    let data_field = if data_len == 0 {
        0
    } else {
        1 + varint_len(data_len as u64) + data_len
    };
    let inner = 2 + HASH_LEN + data_field;
    let body = 1 + varint_len(inner as u64) + inner;
    let mut out = Vec::with_capacity(4 + 16 + HASH_LEN);
    out.extend_from_slice(&(body as u32).to_le_bytes());
    out.push(CHUNK);
    put_varint(&mut out, inner as u64);
    out.push(HASH);
    out.push(HASH_LEN as u8);
    out.extend_from_slice(&hash.0);
    if data_len > 0 {
        out.push(DATA);
        put_varint(&mut out, data_len as u64);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_match_their_length() {
        for v in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
            let mut i = 0;
            assert_eq!(read_varint(&out, &mut i).unwrap(), v);
            assert_eq!(i, out.len());
        }
    }

    #[test]
    fn the_walker_sees_every_field_and_refuses_truncation() {
        // 1: varint 150, 2: bytes "ab", 3: fixed32, 4: fixed64.
        let bytes = [
            0x08, 0x96, 0x01, 0x12, 2, b'a', b'b', 0x1d, 0, 0, 0, 0, 0x21, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        let mut seen = Vec::new();
        for_each_field(&bytes, |n, p| {
            seen.push((n, p.map(<[u8]>::to_vec)));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            [(1, None), (2, Some(b"ab".to_vec())), (3, None), (4, None)]
        );
        for end in 1..bytes.len() {
            if [3, 7, 12].contains(&end) {
                continue; // a field boundary
            }
            assert!(
                for_each_field(&bytes[..end], |_, _| Ok(())).is_err(),
                "{end}"
            );
        }
    }
}
