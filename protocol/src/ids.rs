//! The names peers give things: a session's id, a BLAKE3 hash (a chunk's
//! name, a model id), a peer id, and a route's hop (a peer and its blocks).

use std::fmt;

use crate::codec::field_error;
use crate::{BlockRange, MessageError};

/// Length of a session id.
pub const SESSION_ID_LEN: usize = 16;
/// Bytes of a BLAKE3 hash.
pub const HASH_LEN: usize = 32;
/// Longest peer id accepted (a libp2p peer id is a multihash of at most a few
/// dozen bytes).
pub(crate) const MAX_PEER_ID_BYTES: usize = 128;

/// Writes the first four bytes of an id as hex: enough to tell ids apart in
/// a log line.
fn short_hex(bytes: &[u8], f: &mut fmt::Formatter<'_>) -> fmt::Result {
    for b in &bytes[..4] {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

/// A session's id: 16 random bytes chosen by the client.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub [u8; SESSION_ID_LEN]);

impl SessionId {
    pub(crate) fn from_bytes(b: &[u8]) -> Result<Self, MessageError> {
        let arr: [u8; SESSION_ID_LEN] = b.try_into().map_err(|_| {
            field_error(
                "session_id",
                format!("{} bytes, expected {SESSION_ID_LEN}", b.len()),
            )
        })?;
        Ok(Self(arr))
    }
}

/// The first 8 hex digits.
impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        short_hex(&self.0, f)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

/// A BLAKE3 hash: a chunk's name, or a model id (the manifest's hash).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash(pub [u8; HASH_LEN]);

impl Hash {
    /// The BLAKE3 hash of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// All 64 hex digits.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(2 * HASH_LEN);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self, MessageError> {
        let bad = || field_error("hash", format!("`{s}` is not 64 hex digits"));
        if s.len() != 2 * HASH_LEN || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; HASH_LEN];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Self(out))
    }

    pub(crate) fn from_bytes(b: &[u8], name: &'static str) -> Result<Self, MessageError> {
        let arr: [u8; HASH_LEN] = b
            .try_into()
            .map_err(|_| field_error(name, format!("{} bytes, expected {HASH_LEN}", b.len())))?;
        Ok(Self(arr))
    }
}

/// The first 8 hex digits; `{:#}` gives all 64.
impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.alternate() {
            return f.write_str(&self.to_hex());
        }
        short_hex(&self.0, f)
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({self})")
    }
}

impl std::str::FromStr for Hash {
    type Err = MessageError;
    fn from_str(s: &str) -> Result<Self, MessageError> {
        Self::from_hex(s)
    }
}

/// `id`, unless it is empty or longer than a peer id can be.
pub(crate) fn peer_id(id: Vec<u8>, name: &'static str) -> Result<Vec<u8>, MessageError> {
    if id.is_empty() || id.len() > MAX_PEER_ID_BYTES {
        return Err(field_error(
            name,
            format!("{} bytes, expected 1..={MAX_PEER_ID_BYTES}", id.len()),
        ));
    }
    Ok(id)
}

/// One server of a route: its peer id (binary) and the blocks it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// libp2p peer id bytes.
    pub peer_id: Vec<u8>,
    /// Blocks this hop runs for the session.
    pub blocks: BlockRange,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_print_short_and_parse_from_hex() {
        let h = Hash::of(b"x");
        assert_eq!(h.to_string().len(), 8);
        assert_eq!(format!("{h:#}"), h.to_hex());
        assert_eq!(h.to_hex().parse::<Hash>().unwrap(), h);
        assert!("zz".parse::<Hash>().is_err());
    }

    #[test]
    fn session_ids_print_short() {
        let id = SessionId([0xab; SESSION_ID_LEN]);
        assert_eq!(id.to_string(), "abababab");
        assert_eq!(format!("{id:?}"), "SessionId(abababab)");
        assert!(SessionId::from_bytes(&[0; 15]).is_err());
    }
}
