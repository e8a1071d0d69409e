//! Raw HTTP/2 and gRPC framing for hostile peers: what the hostile tests
//! (`crates/server/tests/hostile.rs`) and the load test's attackers
//! (`benches/src/attack.rs`) send where a well-behaved client library would
//! not let them: connections from a chosen loopback address, requests whose
//! bodies stop or never end, streams that never read.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpSocket, TcpStream};

/// The attackers' source address: per-address limits then tell them apart
/// from honest clients on 127.0.0.1.
pub const ATTACKER: &str = "127.0.0.2";

/// A TCP connection from the loopback address `from` to `to`.
///
/// # Errors
/// The connection is refused or `from` cannot be bound.
pub async fn tcp_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let from: IpAddr = from
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// The headers of a `psi.v1.Match/{method}` request (`scheme` "http" or
/// "https"), declaring `purpose`.
///
/// # Errors
/// A purpose that is not a valid header value.
pub fn match_request(scheme: &str, method: &str, purpose: &str) -> http::Result<http::Request<()>> {
    http::Request::builder()
        .method("POST")
        .uri(format!("{scheme}://127.0.0.1/psi.v1.Match/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header(psi_proto::PURPOSE_HEADER, purpose)
        .body(())
}

/// The headers of a `grpc.health.v1.Health/Check` request.
#[must_use]
pub fn health_request(scheme: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("{scheme}://127.0.0.1/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("a valid request")
}

/// A gRPC length-prefixed message.
#[must_use]
pub fn framed(message: &[u8]) -> Bytes {
    let mut out = vec![0u8];
    out.extend_from_slice(
        &u32::try_from(message.len())
            .expect("under 4 GiB")
            .to_be_bytes(),
    );
    out.extend_from_slice(message);
    out.into()
}

/// Sends `data` as the window allows (ending the stream if `end`); false if
/// the server reset the stream.
pub async fn send_all(stream: &mut h2::SendStream<Bytes>, mut data: Bytes, end: bool) -> bool {
    while !data.is_empty() {
        stream.reserve_capacity(data.len().min(1 << 20));
        match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(Ok(n)) if n > 0 => {
                let chunk = data.split_to(n.min(data.len()));
                if stream.send_data(chunk, false).is_err() {
                    return false;
                }
            }
            Some(Ok(_)) => {}
            _ => return false,
        }
    }
    if end {
        return stream.send_data(Bytes::new(), true).is_ok();
    }
    true
}

/// The gRPC status of a response (trailers-only or in the trailers); `None`
/// when the stream was reset or the connection lost before one came.
pub async fn grpc_status(response: h2::client::ResponseFuture) -> Option<i32> {
    let response = response.await.ok()?;
    let code = |h: &http::HeaderMap| {
        h.get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
    };
    if let Some(c) = code(response.headers()) {
        return Some(c);
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.ok()?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    body.trailers().await.ok().flatten().as_ref().and_then(code)
}

/// Reads until the peer closes the connection (EOF or an error).
pub async fn wait_closed(mut io: impl AsyncRead + Unpin) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = io.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}
