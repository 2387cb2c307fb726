//! QUIC framing: each direction of a bidirectional stream carries one [`Envelope`], encoded as a
//! little-endian `u32` byte length followed by the prost message.
//!
//! The reader checks the announced length against its limit before it allocates anything, and
//! grows its buffer only as bytes actually arrive, so a peer that claims a huge frame and sends
//! nothing costs nothing.

use bytes::Bytes;
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::v1::Envelope;
use crate::{MAX_FRAME_BYTES, ProtoError, Result};

/// Bytes of the length prefix.
pub const PREFIX_BYTES: usize = 4;

/// First buffer size of a frame being read; it grows with the data.
const INITIAL_READ_BUFFER: usize = 64 << 10;

/// Encodes `msg` as one frame (length prefix and message), refusing one over [`MAX_FRAME_BYTES`].
pub fn encode_frame(msg: &Envelope) -> Result<Vec<u8>> {
    let len = msg.encoded_len();
    if len > MAX_FRAME_BYTES {
        return Err(ProtoError::FrameTooLarge {
            len: len as u64,
            max: MAX_FRAME_BYTES,
        });
    }
    let mut buf = Vec::with_capacity(PREFIX_BYTES + len);
    // `len` fits in u32: it is at most MAX_FRAME_BYTES.
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    msg.encode_raw(&mut buf);
    Ok(buf)
}

/// Writes `msg` as one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, msg: &Envelope) -> Result<()> {
    let buf = encode_frame(msg)?;
    w.write_all(&buf).await?;
    Ok(())
}

/// Reads one frame of at most `max` message bytes.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Envelope> {
    let mut prefix = [0u8; PREFIX_BYTES];
    let mut got = 0;
    while got < PREFIX_BYTES {
        let n = r.read(&mut prefix[got..]).await?;
        if n == 0 {
            return Err(if got == 0 {
                ProtoError::Closed
            } else {
                ProtoError::Truncated {
                    what: "the length prefix",
                    expected: PREFIX_BYTES,
                }
            });
        }
        got += n;
    }
    let len = u32::from_le_bytes(prefix) as u64;
    if len > max as u64 {
        return Err(ProtoError::FrameTooLarge { len, max });
    }
    // `len <= max`, a usize.
    let len = len as usize;
    let mut buf = Vec::with_capacity(len.min(INITIAL_READ_BUFFER));
    r.take(len as u64).read_to_end(&mut buf).await?;
    if buf.len() != len {
        return Err(ProtoError::Truncated {
            what: "the message",
            expected: len,
        });
    }
    Ok(Envelope::decode(Bytes::from(buf))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{ExpertBatchRequest, HealthRequest, envelope::Msg};

    fn health() -> Envelope {
        Envelope {
            msg: Some(Msg::HealthRequest(HealthRequest {})),
        }
    }

    #[tokio::test]
    async fn round_trip() {
        let msg = Envelope {
            msg: Some(Msg::ExpertBatchRequest(ExpertBatchRequest {
                layer: 3,
                hidden_size: 2,
                n_tokens: 1,
                activations: Bytes::from(vec![1, 2, 3, 4, 5, 6, 7, 8]),
                tokens: vec![0],
                experts: vec![7],
                weights: vec![0.5],
                ..Default::default()
            })),
        };
        let mut wire = Vec::new();
        write_frame(&mut wire, &msg).await.unwrap();
        write_frame(&mut wire, &health()).await.unwrap();
        let mut r = wire.as_slice();
        assert_eq!(read_frame(&mut r, MAX_FRAME_BYTES).await.unwrap(), msg);
        assert_eq!(read_frame(&mut r, MAX_FRAME_BYTES).await.unwrap(), health());
        assert!(matches!(
            read_frame(&mut r, MAX_FRAME_BYTES).await,
            Err(ProtoError::Closed)
        ));
    }

    #[tokio::test]
    async fn a_frame_claiming_4_gb_is_refused_before_allocating() {
        // The claim alone, with no body: reading it must not try to allocate or wait for 4 GB.
        let wire = u32::MAX.to_le_bytes();
        let err = read_frame(&mut wire.as_slice(), MAX_FRAME_BYTES)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ProtoError::FrameTooLarge { len, max } if len == u32::MAX as u64 && max == MAX_FRAME_BYTES),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_frame_just_over_the_limit_is_refused() {
        let wire = 1001u32.to_le_bytes();
        let err = read_frame(&mut wire.as_slice(), 1000).await.unwrap_err();
        assert!(
            matches!(err, ProtoError::FrameTooLarge { len: 1001, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn truncated_frames_are_errors() {
        let full = encode_frame(&health()).unwrap();
        let mut big = encode_frame(&Envelope {
            msg: Some(Msg::ExpertBatchRequest(ExpertBatchRequest {
                activations: Bytes::from(vec![9u8; 100]),
                ..Default::default()
            })),
        })
        .unwrap();
        // Cut inside the length prefix.
        let err = read_frame(&mut &full[..2], MAX_FRAME_BYTES)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                ProtoError::Truncated {
                    what: "the length prefix",
                    ..
                }
            ),
            "{err}"
        );
        // Cut inside the message.
        big.truncate(big.len() - 10);
        let err = read_frame(&mut big.as_slice(), MAX_FRAME_BYTES)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                ProtoError::Truncated {
                    what: "the message",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn garbage_is_a_decode_error() {
        let mut wire = 3u32.to_le_bytes().to_vec();
        wire.extend_from_slice(&[0xff, 0xff, 0xff]);
        let err = read_frame(&mut wire.as_slice(), MAX_FRAME_BYTES)
            .await
            .unwrap_err();
        assert!(matches!(err, ProtoError::Decode(_)), "{err}");
    }

    #[test]
    fn encoding_refuses_oversized_messages() {
        let msg = Envelope {
            msg: Some(Msg::ExpertBatchRequest(ExpertBatchRequest {
                activations: Bytes::from(vec![0u8; MAX_FRAME_BYTES + 1]),
                ..Default::default()
            })),
        };
        assert!(matches!(
            encode_frame(&msg),
            Err(ProtoError::FrameTooLarge { .. })
        ));
    }
}
