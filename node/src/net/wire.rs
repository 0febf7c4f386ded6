//! Length-prefixed message I/O on libp2p streams.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use nomoat_protocol::{check_message_len, InferMessage, MessageError};

/// Why a message could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The stream failed or closed mid-message.
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
    /// The message is invalid.
    #[error(transparent)]
    Message(#[from] MessageError),
}

/// Reads one length-prefixed message body; `None` at a clean end of stream.
///
/// # Cancel safety
///
/// Not cancel safe: a cancelled read may leave half a message consumed.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Vec<u8>>, WireError> {
    read_frame_max(r, nomoat_protocol::MAX_MESSAGE_BYTES).await
}

/// Like [`read_frame`], refusing (before reading the body) a frame over
/// `max` bytes: each protocol and state reads with the most it can need, so
/// a peer cannot make the node buffer more.
pub async fn read_frame_max<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, WireError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        got += n;
    }
    let len = u32::from_le_bytes(len) as usize;
    check_message_len(len)?;
    if len > max {
        return Err(MessageError::TooLarge { len, max }.into());
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

/// Reads and decodes one inference message; `None` at a clean end of stream.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<InferMessage>, WireError> {
    match read_frame(r).await? {
        // The hidden state inside stays in this buffer: no copy.
        Some(buf) => Ok(Some(InferMessage::decode_bytes(bytes::Bytes::from(buf))?)),
        None => Ok(None),
    }
}

/// Like [`read_message`], refusing a frame over `max` bytes before its body
/// is read.
pub async fn read_message_max<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<InferMessage>, WireError> {
    match read_frame_max(r, max).await? {
        Some(buf) => Ok(Some(InferMessage::decode_bytes(bytes::Bytes::from(buf))?)),
        None => Ok(None),
    }
}

/// Writes one message with its length prefix and flushes.
pub async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &InferMessage,
) -> Result<(), WireError> {
    w.write_all(&msg.encode_framed()).await?;
    w.flush().await?;
    Ok(())
}

/// Writes raw bytes as one length-prefixed frame and flushes.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, body: &[u8]) -> Result<(), WireError> {
    check_message_len(body.len())?;
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    w.write_all(&out).await?;
    w.flush().await?;
    Ok(())
}
