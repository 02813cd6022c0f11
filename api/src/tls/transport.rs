//! gRPC over [`LiveTls`]: a server's incoming connections, each accepted
//! with the material current at that moment, and client channels whose every
//! (re)connection is made with the material current then. tonic's own TLS
//! would fix the certificate when the server or channel is built.
//!
//! ```text
//!  TcpListener ─accept─▶ spawn: handshake (10 s) ─▶ mpsc ─▶ tonic serve_with_incoming
//!  tonic Channel ─connector─▶ TCP connect ─▶ handshake as server_name ─▶ h2
//! ```

use std::{sync::Arc, time::Duration};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, server::TlsStream};
use tonic::transport::{Channel, Endpoint, Uri};

use super::live::LiveTls;

/// How long a peer has to finish its TLS handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// The mutual-TLS connections accepted on `listener`, for tonic's
/// `serve_with_incoming`. A failed handshake is logged and skipped (the
/// client sees the alert); it never stops the server. Accepting stops, and
/// the listener closes, when tonic drops the stream.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<LiveTls>,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors and the like: do not spin.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.server_config());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake not finished within 10s"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// How long a connection attempt may take (TCP and TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle time after which a side pings the other over HTTP/2.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// An unanswered ping after this long: the connection is dead.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// A lazily connecting mutual-TLS channel to `addr` (`host:port`) that
/// verifies the server as `server_name` and, at every connection, presents
/// the certificate `tls` holds then.
pub fn channel(addr: &str, server_name: &str, tls: &Arc<LiveTls>) -> Result<Channel, ChannelError> {
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|_| ChannelError::ServerName(server_name.into()))?;
    let target = addr.to_owned();
    let tls = tls.clone();
    let connector = tower::service_fn(move |_: Uri| {
        let (target, tls, name) = (target.clone(), tls.clone(), name.clone());
        async move {
            let tcp = TcpStream::connect(&target).await?;
            let _ = tcp.set_nodelay(true);
            let stream = TlsConnector::from(tls.client_config()).connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    // TLS is the connector's: tonic sees a plain HTTP/2 connection.
    // HTTP/2 pings find a connection that went silent (a partition: TCP
    // alone would back off for minutes and resume long after the network
    // healed), so the call fails and the next attempt connects afresh.
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect_with_connector_lazy(connector))
}

/// Why a channel could not be set up (nothing was connected yet).
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("{0:?} is not a DNS name or IP address to verify the server as")]
    ServerName(String),
    #[error("{0}")]
    Address(#[from] tonic::transport::Error),
}
