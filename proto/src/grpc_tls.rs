//! gRPC over TLS 1.3 with cluster-key mutual authentication (see [`crate::auth`]).
//!
//! tonic's own TLS options take CA certificates, not a custom verifier, so the TLS layer sits
//! below it: [`incoming`] turns a TCP listener into a stream of authenticated connections for
//! `serve_with_incoming`, and [`Connector`] dials for `Endpoint::connect_with_connector`. A peer
//! that fails the handshake never reaches the gRPC server, so no RPC of any kind is reachable
//! without the key.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tonic::codegen::http::Uri;
use tracing::{debug, warn};

use crate::Result;
use crate::auth::{ClusterKey, SERVER_NAME, client_config, server_config};

/// ALPN of gRPC (HTTP/2).
const H2: &[u8] = b"h2";

/// Longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most handshakes in progress at once; connections beyond it are dropped at once.
pub const MAX_PENDING_HANDSHAKES: usize = 64;

/// An authenticated server-side connection.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    remote: Option<SocketAddr>,
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = Option<SocketAddr>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.remote
    }
}

/// Accepts TCP connections on `listener` and yields those whose peer proves `key`; the others
/// are logged and dropped.
pub fn incoming(
    listener: TcpListener,
    key: &ClusterKey,
) -> Result<impl futures::Stream<Item = Result<TlsConn, io::Error>> + Send + 'static> {
    let cfg = server_config(key, H2)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let (tx, mut rx) = mpsc::channel::<TlsConn>(MAX_PENDING_HANDSHAKES);
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let Ok(permit) = Arc::clone(&pending).try_acquire_owned() else {
                warn!(%remote, "too many TLS handshakes in progress: connection dropped");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(inner)) => {
                        drop(permit);
                        debug!(%remote, "peer authenticated");
                        let _ = tx
                            .send(TlsConn {
                                inner,
                                remote: Some(remote),
                            })
                            .await;
                    }
                    Ok(Err(e)) => {
                        warn!(%remote, "refused a peer that did not prove the cluster key: {e}")
                    }
                    Err(_) => warn!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    Ok(futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|c| c.map(Ok))
    }))
}

/// Dials a worker over TCP and authenticates it with the cluster key (for tonic's
/// `Endpoint::connect_with_connector`).
#[derive(Clone)]
pub struct Connector {
    tls: tokio_rustls::TlsConnector,
}

impl Connector {
    /// A connector proving `key`.
    pub fn new(key: &ClusterKey) -> Result<Self> {
        let cfg = client_config(key, H2)?;
        Ok(Connector {
            tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
        })
    }
}

type Dialed = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower_service::Service<Uri> for Connector {
    type Response = Dialed;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Dialed>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let authority = uri
                .authority()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host:port"))?
                .as_str()
                .to_string();
            let tcp = TcpStream::connect(&authority).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(SERVER_NAME)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let stream = tls.connect(name, tcp).await.map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("TLS with {authority} failed (is it of this cluster, with the same key?): {e}"),
                )
            })?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}
