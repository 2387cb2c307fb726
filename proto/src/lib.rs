//! moeshard's wire contract, shared by the coordinator's client and the worker's server so the two
//! cannot drift apart.
//!
//! - [`v1`]: the protobuf messages and the `ExpertWorker` gRPC service (`proto/moeshard.proto`),
//!   generated at build time with protox, so no system `protoc` is needed.
//! - [`frame`]: QUIC framing: one [`v1::Envelope`] per direction of a stream, behind a 4-byte
//!   length, checked against [`MAX_FRAME_BYTES`] before anything is allocated.
//! - [`tensor`]: activations as raw little-endian bytes, and their checks.
//! - [`tls`]: the TLS 1.3 (rustls with ring) set-up of the QUIC endpoints.
//! - [`auth`]: the cluster key and the mutual TLS authentication both transports derive from it.
//! - [`grpc_tls`]: gRPC over TLS with that authentication (listener and connector).

pub mod auth;
pub mod frame;
pub mod grpc_tls;
pub mod tensor;
pub mod tls;

/// Generated protobuf messages and gRPC stubs of `package moeshard.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("moeshard.v1");
}

/// Version of the protocol spoken by this build; hello refuses a peer with another.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest message either side accepts or sends, on both transports (gRPC messages and QUIC
/// frames alike). A prefill chunk of 256 tokens at hidden size 8192 in f32 is 8 MiB; this leaves
/// room for big batches while keeping a malicious length from allocating gigabytes.
pub const MAX_FRAME_BYTES: usize = 256 << 20;

/// Most tokens (hidden states) one expert batch may carry: a prefill chunk of a few thousand
/// tokens fits; beyond it a batch is refused before any work.
pub const MAX_BATCH_TOKENS: usize = 1 << 16;

/// Most (token, expert, weight) rows one expert batch may carry.
pub const MAX_BATCH_ROWS: usize = 1 << 20;

/// Most requests a worker runs at once per connection (QUIC streams, HTTP/2 streams); more wait
/// in the transport's flow control rather than in memory.
pub const MAX_CONCURRENT_REQUESTS: u32 = 64;

/// Which wire carries the messages between the coordinator and a worker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Transport {
    /// gRPC over HTTP/2 (tonic): unary calls.
    #[default]
    Grpc,
    /// QUIC (quinn, TLS 1.3): one bidirectional stream per request, length-prefixed frames.
    Quic,
}

impl Transport {
    /// The command-line spelling.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Grpc => "grpc",
            Transport::Quic => "quic",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Transport {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "grpc" => Ok(Transport::Grpc),
            "quic" => Ok(Transport::Quic),
            other => Err(format!("unknown transport {other:?}; use grpc or quic")),
        }
    }
}

/// The line a worker prints on stdout once it listens, so a parent can read its ephemeral port:
/// `moeshard worker listening on ADDR transport=T`.
pub fn listening_line(addr: std::net::SocketAddr, transport: Transport) -> String {
    format!("{LISTENING_PREFIX}{addr} transport={transport}")
}

/// Parses a [`listening_line`] back into the address and transport.
pub fn parse_listening_line(line: &str) -> Option<(std::net::SocketAddr, Transport)> {
    let rest = line.trim().strip_prefix(LISTENING_PREFIX)?;
    let (addr, t) = rest.split_once(" transport=")?;
    Some((addr.parse().ok()?, t.parse().ok()?))
}

const LISTENING_PREFIX: &str = "moeshard worker listening on ";

/// ALPN protocol name of moeshard over QUIC.
pub const ALPN: &[u8] = b"moeshard/1";

/// Errors of the wire layer.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// A frame announces more bytes than the limit allows.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// The announced length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame: expected {expected} bytes of {what}")]
    Truncated {
        /// Which part of the frame was cut.
        what: &'static str,
        /// How many bytes that part should have had.
        expected: usize,
    },
    /// The stream ended cleanly before a frame began.
    #[error("stream closed before a frame arrived")]
    Closed,
    /// A frame is not a valid protobuf message.
    #[error("malformed message: {0}")]
    Decode(#[from] prost::DecodeError),
    /// Reading or writing the stream failed.
    #[error("stream i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Activation or output bytes do not match their header.
    #[error("bad tensor bytes: {msg}")]
    BadTensor {
        /// What is wrong (expected vs found).
        msg: String,
    },
    /// A cluster key is missing, unreadable or too short.
    #[error("cluster key: {msg}")]
    Key {
        /// What is wrong, with the file's path.
        msg: String,
    },
    /// TLS or certificate set-up failed.
    #[error("TLS set-up: {msg}")]
    Tls {
        /// What failed.
        msg: String,
    },
}

/// Result alias for the wire layer.
pub type Result<T, E = ProtoError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_line_round_trips() {
        let addr: std::net::SocketAddr = "127.0.0.1:40123".parse().unwrap();
        let line = listening_line(addr, Transport::Quic);
        assert_eq!(
            line,
            "moeshard worker listening on 127.0.0.1:40123 transport=quic"
        );
        assert_eq!(parse_listening_line(&line), Some((addr, Transport::Quic)));
        assert_eq!(parse_listening_line("something else"), None);
    }
}
