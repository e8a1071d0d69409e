//! Connections: the accept loop and what every connection is held to.
//!
//! - Connections are counted in total and per peer address; one over either
//!   limit is closed as soon as it is accepted.
//! - Running out of file descriptors (or socket buffers) does not spin the
//!   accept loop: it backs off (10 ms doubling to 1 s) and says so, at most
//!   once a second.
//! - A connection must open its first request within the handshake timeout
//!   (TCP, TLS, the HTTP/2 preface: whatever the peer is slow at), and is
//!   closed after the idle timeout with no request open.
//! - Every request registers a deadline (its whole life, response stream
//!   and flow-control stalls included); a connection still carrying a
//!   request past its deadline is closed, which frees everything that
//!   request held.
//!
//! The checks live in the connection's I/O ([`GuardedIo`]), the one place
//! that is polled whatever the peer does; requests see their connection
//! through [`PeerInfo`] in their extensions.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

use crate::serving::metrics::Metrics;

/// Limits on connections, streams, buffers and time: every peer is bounded.
/// Each is a `serve` setting (flag, `PSI_*` variable or config file key of
/// the same name); docs/SECURITY.md says what a peer can still do within them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetLimits {
    /// Connections open at once, in total (lowered to fit the open-file limit).
    pub max_connections: usize,
    /// Connections open at once from one peer IP address.
    pub max_connections_per_peer: usize,
    /// HTTP/2 streams (requests) open at once on one connection.
    pub max_concurrent_streams: u32,
    /// Time from accepting a connection to its first request.
    pub handshake_timeout: Duration,
    /// Time a connection may stay open with no request open.
    pub idle_timeout: Duration,
    /// Time from a request's start to the end of its request body.
    pub body_timeout: Duration,
    /// A request's whole life, its response (stream) and any flow-control
    /// stall included; past it the connection is closed.
    pub stream_timeout: Duration,
    /// Bytes of request bodies received and held by requests in progress,
    /// server-wide.
    pub buffer_budget_bytes: usize,
    /// The same, per connection.
    pub connection_buffer_bytes: usize,
    /// Largest HTTP/2 header list (all metadata of one request).
    pub max_header_list_bytes: u32,
    /// HTTP/2 receive window per stream: bytes a peer may send that the
    /// server has not read yet.
    pub stream_window_bytes: u32,
    /// HTTP/2 receive window per connection.
    pub connection_window_bytes: u32,
}

impl Default for NetLimits {
    fn default() -> Self {
        Self {
            max_connections: 512,
            max_connections_per_peer: 64,
            max_concurrent_streams: 32,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            body_timeout: Duration::from_secs(30),
            stream_timeout: Duration::from_secs(300),
            buffer_budget_bytes: 256 << 20,
            connection_buffer_bytes: 32 << 20,
            max_header_list_bytes: 16 << 10,
            stream_window_bytes: 256 << 10,
            connection_window_bytes: 1 << 20,
        }
    }
}

/// Descriptors kept free for the data directory, the audit database and
/// the admin endpoint when `max_connections` is fitted to the open-file limit.
const RESERVED_DESCRIPTORS: u64 = 64;

impl NetLimits {
    /// `max_connections` lowered, if needed, so that the connections and
    /// [`RESERVED_DESCRIPTORS`] fit under the process's open-file limit.
    #[must_use]
    pub fn fitted_to_open_file_limit(self) -> Self {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        match limit {
            Some(limit) => self.fitted_to(limit),
            None => self,
        }
    }

    /// As [`NetLimits::fitted_to_open_file_limit`] under an open-file limit
    /// of `open_files`. The per-address limit is lowered in proportion, so
    /// that one address never fills a server the limit made small.
    #[must_use]
    pub fn fitted_to(mut self, open_files: u64) -> Self {
        let room =
            usize::try_from(open_files.saturating_sub(RESERVED_DESCRIPTORS)).unwrap_or(usize::MAX);
        if self.max_connections > room {
            let fitted = room.max(1);
            let per_peer = (self.max_connections_per_peer.saturating_mul(fitted)
                / self.max_connections.max(1))
            .max(1);
            tracing::warn!(
                open_file_limit = open_files,
                max_connections = fitted,
                max_connections_per_peer = per_peer,
                "max_connections lowered to fit the open-file limit, and the per-address limit in proportion (raise it with `ulimit -n` or LimitNOFILE=)"
            );
            self.max_connections = fitted;
            self.max_connections_per_peer = self.max_connections_per_peer.min(per_peer);
        }
        self
    }
}

/// Why a connection was closed by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closed {
    Handshake,
    Idle,
    Stream,
}

impl Closed {
    fn label(self) -> &'static str {
        match self {
            Closed::Handshake => "handshake_timeout",
            Closed::Idle => "idle_timeout",
            Closed::Stream => "stream_timeout",
        }
    }
}

#[derive(Debug)]
struct Times {
    open_requests: usize,
    requested: bool,
    idle_since: Instant,
    next_request: u64,
    /// Deadlines of the open requests.
    deadlines: BTreeSet<(Instant, u64)>,
}

/// One connection, shared by its I/O and its requests.
#[derive(Debug)]
pub struct Conn {
    peer: SocketAddr,
    opened: Instant,
    handshake_timeout: Duration,
    idle_timeout: Duration,
    times: Mutex<Times>,
    closed: Mutex<Option<Closed>>,
    waker: AtomicWaker,
    buffered: AtomicUsize,
}

impl Conn {
    fn new(peer: SocketAddr, limits: &NetLimits) -> Self {
        let now = Instant::now();
        Self {
            peer,
            opened: now,
            handshake_timeout: limits.handshake_timeout,
            idle_timeout: limits.idle_timeout,
            times: Mutex::new(Times {
                open_requests: 0,
                requested: false,
                idle_since: now,
                next_request: 0,
                deadlines: BTreeSet::new(),
            }),
            closed: Mutex::new(None),
            waker: AtomicWaker::new(),
            buffered: AtomicUsize::new(0),
        }
    }

    /// The peer's address.
    #[must_use]
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    fn times(&self) -> std::sync::MutexGuard<'_, Times> {
        self.times.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A request opens: until the returned guard drops the connection is
    /// not idle, and if it is still open at `deadline` the connection is closed.
    #[must_use]
    pub fn open_request(self: &Arc<Self>, deadline: Instant) -> OpenRequest {
        let key = {
            let mut t = self.times();
            t.open_requests += 1;
            t.requested = true;
            t.next_request += 1;
            let key = (deadline, t.next_request);
            t.deadlines.insert(key);
            key
        };
        // The I/O re-arms its timer for the new state.
        self.waker.wake();
        OpenRequest {
            conn: Arc::clone(self),
            key,
        }
    }

    /// Adds `n` bytes to this connection's buffered total if it stays within `max`.
    #[must_use]
    pub fn try_buffer(&self, n: usize, max: usize) -> bool {
        let before = self.buffered.fetch_add(n, Ordering::AcqRel);
        if before.saturating_add(n) > max {
            self.buffered.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Releases `n` bytes taken with [`Conn::try_buffer`].
    pub fn release(&self, n: usize) {
        self.buffered.fetch_sub(n, Ordering::AcqRel);
    }

    /// The next moment the connection must be closed at, and why.
    fn deadline(&self) -> Option<(Instant, Closed)> {
        let t = self.times();
        let stream = t.deadlines.first().map(|(at, _)| (*at, Closed::Stream));
        let quiet = if t.open_requests > 0 {
            None
        } else if t.requested {
            Some((t.idle_since + self.idle_timeout, Closed::Idle))
        } else {
            Some((self.opened + self.handshake_timeout, Closed::Handshake))
        };
        match (stream, quiet) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        }
    }
}

/// A request open on a connection; dropping it closes the request.
#[derive(Debug)]
pub struct OpenRequest {
    conn: Arc<Conn>,
    key: (Instant, u64),
}

impl Drop for OpenRequest {
    fn drop(&mut self) {
        {
            let mut t = self.conn.times();
            t.deadlines.remove(&self.key);
            t.open_requests = t.open_requests.saturating_sub(1);
            if t.open_requests == 0 {
                t.idle_since = Instant::now();
            }
        }
        self.conn.waker.wake();
    }
}

/// What a request knows of its connection (in place of tonic's `TcpConnectInfo`).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The peer's address.
    pub remote_addr: SocketAddr,
    /// The connection.
    pub conn: Arc<Conn>,
}

/// The connection of a request, on plaintext or TLS.
#[must_use]
pub fn peer_info(extensions: &tonic::codegen::http::Extensions) -> Option<&PeerInfo> {
    extensions.get::<PeerInfo>().or_else(|| {
        extensions
            .get::<tonic::transport::server::TlsConnectInfo<PeerInfo>>()
            .map(tonic::transport::server::TlsConnectInfo::get_ref)
    })
}

/// The client certificate chain of a request's TLS connection.
#[must_use]
pub fn peer_certs(
    extensions: &tonic::codegen::http::Extensions,
) -> Option<Arc<Vec<tonic::transport::CertificateDer<'static>>>> {
    extensions
        .get::<tonic::transport::server::TlsConnectInfo<PeerInfo>>()
        .and_then(tonic::transport::server::TlsConnectInfo::peer_certs)
}

/// A connection's socket with its timeouts enforced.
#[derive(Debug)]
pub struct GuardedIo {
    io: TcpStream,
    conn: Arc<Conn>,
    timer: Pin<Box<Sleep>>,
    metrics: Arc<Metrics>,
    _counted: Counted,
}

impl GuardedIo {
    /// Fails once the connection is past one of its deadlines; otherwise
    /// arms the timer for the next one (and registers for wake-ups when a
    /// request opens or closes).
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        self.conn.waker.register(cx.waker());
        if let Some(why) = *self
            .conn
            .closed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            return Err(timed_out(why));
        }
        let Some((at, why)) = self.conn.deadline() else {
            return Ok(());
        };
        let due = if Instant::now() >= at {
            true
        } else {
            if self.timer.deadline() != at {
                self.timer.as_mut().reset(at);
            }
            self.timer.as_mut().poll(cx).is_ready()
        };
        if !due {
            return Ok(());
        }
        *self
            .conn
            .closed
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(why);
        self.metrics.connection_closed(why.label());
        tracing::debug!(peer = %self.conn.peer, reason = why.label(), "connection closed");
        Err(timed_out(why))
    }
}

fn timed_out(why: Closed) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, why.label())
}

impl AsyncRead for GuardedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for GuardedIo {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        PeerInfo {
            remote_addr: self.conn.peer,
            conn: Arc::clone(&self.conn),
        }
    }
}

/// Open connections, in total and per peer address.
#[derive(Debug, Default)]
struct Census {
    total: AtomicUsize,
    per_peer: Mutex<HashMap<IpAddr, usize>>,
}

/// One counted connection; uncounted when dropped.
#[derive(Debug)]
struct Counted {
    census: Arc<Census>,
    ip: IpAddr,
    metrics: Arc<Metrics>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.census.total.fetch_sub(1, Ordering::AcqRel);
        let mut per_peer = self
            .census
            .per_peer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = per_peer.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per_peer.remove(&self.ip);
            }
        }
        self.metrics.connections_open(-1);
    }
}

impl Census {
    /// Counts a new connection from `ip`, or says which limit it is over.
    fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        limits: &NetLimits,
        metrics: &Arc<Metrics>,
    ) -> Result<Counted, &'static str> {
        let mut per_peer = self.per_peer.lock().unwrap_or_else(PoisonError::into_inner);
        if self.total.load(Ordering::Acquire) >= limits.max_connections {
            return Err("max_connections");
        }
        let n = per_peer.entry(ip).or_insert(0);
        if *n >= limits.max_connections_per_peer {
            return Err("max_connections_per_peer");
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::AcqRel);
        metrics.connections_open(1);
        Ok(Counted {
            census: Arc::clone(self),
            ip,
            metrics: Arc::clone(metrics),
        })
    }
}

/// Logs at most once per period.
#[derive(Debug)]
struct Throttle {
    period_ms: u64,
    last_ms: AtomicU64,
    origin: Instant,
}

impl Throttle {
    fn new(period: Duration) -> Self {
        Self {
            period_ms: u64::try_from(period.as_millis()).unwrap_or(u64::MAX),
            last_ms: AtomicU64::new(0),
            origin: Instant::now(),
        }
    }

    fn ready(&self) -> bool {
        // Milliseconds since `origin`, plus one: 0 means "never logged".
        let now = u64::try_from(self.origin.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let last = self.last_ms.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= self.period_ms)
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// Whether an accept error means the process or the system ran out of
/// something that only time (closing connections) gives back.
fn is_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == rustix::io::Errno::MFILE.raw_os_error()
            || code == rustix::io::Errno::NFILE.raw_os_error()
            || code == rustix::io::Errno::NOBUFS.raw_os_error()
            || code == rustix::io::Errno::NOMEM.raw_os_error()
    )
}

const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

struct Acceptor {
    listener: TcpListener,
    /// Whether connections speak HTTP/2 in the clear (no TLS): a refused
    /// one is then told why.
    plaintext: bool,
    /// Refused connections being told why.
    explaining: Arc<AtomicUsize>,
    /// Balancers whose connections start with a PROXY protocol v2 header.
    trusted: TrustedProxies,
    /// Their connections whose header is being read.
    reading_headers: Arc<AtomicUsize>,
    /// Their connections, once the header named the client.
    proxied_tx: tokio::sync::mpsc::Sender<(TcpStream, SocketAddr)>,
    proxied_rx: tokio::sync::mpsc::Receiver<(TcpStream, SocketAddr)>,
    limits: NetLimits,
    census: Arc<Census>,
    metrics: Arc<Metrics>,
    backoff: Duration,
    refused_log: Throttle,
    exhausted_log: Throttle,
}

impl Acceptor {
    async fn next(&mut self) -> GuardedIo {
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                // A balancer's connection whose PROXY header named the client.
                Some((stream, client)) = self.proxied_rx.recv() => {
                    if let Some(io) = self.admit(stream, client) {
                        return io;
                    }
                    continue;
                }
            };
            match accepted {
                Ok((stream, peer)) => {
                    self.backoff = BACKOFF_MIN;
                    if self.trusted.contains(peer.ip()) {
                        // Headers being read count against max_connections
                        // too: a balancer forwarding a flood cannot make
                        // readers pile up.
                        if self.reading_headers.load(Ordering::Acquire)
                            >= self.limits.max_connections
                        {
                            self.metrics.connection_refused("max_connections");
                            drop(stream);
                            continue;
                        }
                        self.read_proxy_header(stream, peer);
                        continue;
                    }
                    if let Some(io) = self.admit(stream, peer) {
                        return io;
                    }
                }
                Err(e) if is_exhaustion(&e) => {
                    self.metrics.connection_refused("accept_exhausted");
                    if self.exhausted_log.ready() {
                        tracing::warn!(
                            "cannot accept connections ({e}); backing off {} ms (raise the open-file limit or lower max_connections)",
                            self.backoff.as_millis()
                        );
                    }
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                }
                // ECONNABORTED and the like concern one connection only.
                Err(e) => tracing::debug!("accept failed: {e}"),
            }
        }
    }

    /// Reads, off the accept loop, the PROXY protocol v2 header a trusted
    /// balancer sends first (within `handshake_timeout`); the connection
    /// then comes back to be counted and limited by the client's address.
    /// A balancer's connection without a valid header is closed.
    fn read_proxy_header(&self, mut stream: TcpStream, balancer: SocketAddr) {
        let tx = self.proxied_tx.clone();
        let metrics = Arc::clone(&self.metrics);
        let patience = self.limits.handshake_timeout;
        let reading = Arc::clone(&self.reading_headers);
        reading.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(async move {
            let header = tokio::time::timeout(patience, read_proxy_v2(&mut stream)).await;
            reading.fetch_sub(1, Ordering::AcqRel);
            match header {
                Ok(Ok(Some(client))) => {
                    let _ = tx.send((stream, client)).await;
                }
                // LOCAL (the balancer's own health check): its own address.
                Ok(Ok(None)) => {
                    let _ = tx.send((stream, balancer)).await;
                }
                Ok(Err(e)) => {
                    metrics.connection_refused("proxy_header");
                    tracing::warn!(%balancer, "connection from a trusted balancer refused: {e}");
                }
                Err(_) => {
                    metrics.connection_refused("proxy_header");
                    tracing::warn!(%balancer, "connection from a trusted balancer refused: no PROXY header within the handshake timeout");
                }
            }
        });
    }

    /// Counts `stream` from `peer`, or refuses it over a limit.
    fn admit(&mut self, stream: TcpStream, peer: SocketAddr) -> Option<GuardedIo> {
        match self.census.admit(peer.ip(), &self.limits, &self.metrics) {
            Ok(counted) => Some(self.guard(stream, peer, counted)),
            Err(limit) => {
                // In the clear, told why (a client backs off and
                // retries); otherwise, or when many are being
                // told already, closed at once: a reset, not a hang.
                if self.plaintext && self.explaining.fetch_add(1, Ordering::AcqRel) < MAX_EXPLAINING
                {
                    let explaining = Arc::clone(&self.explaining);
                    tokio::spawn(async move {
                        explain_refusal(stream, limit).await;
                        explaining.fetch_sub(1, Ordering::AcqRel);
                    });
                } else {
                    if self.plaintext {
                        self.explaining.fetch_sub(1, Ordering::AcqRel);
                    }
                    drop(stream);
                }
                self.metrics.connection_refused(limit);
                if self.refused_log.ready() {
                    tracing::warn!(peer = %peer.ip(), limit, "connection refused: over its limit (logged at most every 10 s)");
                }
                None
            }
        }
    }

    fn guard(&self, stream: TcpStream, peer: SocketAddr, counted: Counted) -> GuardedIo {
        // Without TCP_NODELAY small responses wait for delayed ACKs (~40 ms).
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        let conn = Arc::new(Conn::new(peer, &self.limits));
        let at = conn.opened + conn.handshake_timeout;
        GuardedIo {
            io: stream,
            conn,
            timer: Box::pin(tokio::time::sleep_until(at)),
            metrics: Arc::clone(&self.metrics),
            _counted: counted,
        }
    }
}

/// The balancers (addresses or CIDR blocks) whose connections start with a
/// PROXY protocol v2 header naming the client (haproxy `send-proxy-v2`):
/// connections from them are counted, limited and logged by that client's
/// address. A connection from any other address is taken as it comes (a
/// PROXY header from it is not honoured: it fails as HTTP/2 or TLS).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<(IpAddr, u8)>);

impl TrustedProxies {
    /// Parses `a.b.c.d`, `a.b.c.d/n`, IPv6 alike, comma-separated.
    ///
    /// # Errors
    /// An entry that is neither an address nor a CIDR block.
    pub fn parse(list: &str) -> Result<Self, String> {
        list.split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|entry| {
                let (addr, bits) = entry.split_once('/').unwrap_or((entry, ""));
                let ip: IpAddr = addr
                    .parse()
                    .map_err(|_| format!("`{entry}` is not an IP address or CIDR block"))?;
                let max = if ip.is_ipv4() { 32 } else { 128 };
                let bits = if bits.is_empty() {
                    max
                } else {
                    bits.parse::<u8>()
                        .ok()
                        .filter(|b| *b <= max)
                        .ok_or_else(|| format!("`{entry}`: the prefix length must be 0 to {max}"))?
                };
                Ok((ip, bits))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// Whether `ip` is one of them.
    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|&(net, bits)| match (net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        })
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The PROXY protocol v2 signature.
const PROXY_V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest PROXY v2 address block accepted (addresses and TLVs).
const PROXY_V2_MAX_LEN: usize = 1024;

/// Reads a PROXY protocol v2 header from `stream`: the client's address,
/// or `None` for a LOCAL header (the balancer's own connection).
async fn read_proxy_v2(stream: &mut TcpStream) -> io::Result<Option<SocketAddr>> {
    use tokio::io::AsyncReadExt;
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_string());
    let mut head = [0u8; 16];
    stream.read_exact(&mut head).await?;
    let (signature, rest) = head.split_at(12);
    if signature != PROXY_V2_SIGNATURE {
        return Err(bad("no PROXY protocol v2 header"));
    }
    let [ver_cmd, family, len_hi, len_lo] = <[u8; 4]>::try_from(rest).map_err(|_| bad("short"))?;
    let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
    if ver_cmd >> 4 != 2 || len > PROXY_V2_MAX_LEN {
        return Err(bad("not a PROXY protocol v2 header"));
    }
    let mut block = vec![0u8; len];
    stream.read_exact(&mut block).await?;
    match (ver_cmd & 0x0f, family) {
        (0, _) => Ok(None),
        // TCP over IPv4: source address, destination, source port, destination port.
        (1, 0x11) => {
            let b: [u8; 12] = block
                .get(..12)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| bad("short IPv4 address block"))?;
            let ip = std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            Ok(Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([b[8], b[9]]),
            )))
        }
        (1, 0x21) => {
            let b: [u8; 36] = block
                .get(..36)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| bad("short IPv6 address block"))?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(b.get(..16).unwrap_or(&[0; 16]));
            let ip = std::net::Ipv6Addr::from(octets);
            Ok(Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([b[32], b[33]]),
            )))
        }
        _ => Err(bad("a PROXY header for other than TCP")),
    }
}

/// Refused plaintext connections being told why at once, at most; beyond
/// that a refused connection is closed without a word.
pub const MAX_EXPLAINING: usize = 16;
/// How long a refused connection is given to send its first request.
pub const EXPLAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Answers a refused connection's first request with `UNAVAILABLE` saying
/// the server is at its connection limit (a client backs off and retries,
/// as for a server that is loading), then closes it. Bounded by
/// [`EXPLAIN_TIMEOUT`].
async fn explain_refusal(stream: TcpStream, limit: &'static str) {
    let told = async move {
        let mut conn = h2::server::handshake(stream).await.ok()?;
        let (_request, mut respond) = conn.accept().await?.ok()?;
        let response = http::Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .header("grpc-status", "14")
            .header(
                "grpc-message",
                format!("the server is at its connection limit ({limit}); retry shortly"),
            )
            .body(())
            .ok()?;
        respond.send_response(response, true).ok()?;
        conn.graceful_shutdown();
        while let Some(Ok(_)) = conn.accept().await {}
        Some(())
    };
    let _ = tokio::time::timeout(EXPLAIN_TIMEOUT, told).await;
}

/// The accepted connections of `listener`, counted, limited and guarded;
/// `plaintext` when they speak HTTP/2 in the clear; those from `trusted`
/// balancers by the client address their PROXY protocol v2 header names.
pub fn incoming(
    listener: TcpListener,
    plaintext: bool,
    limits: NetLimits,
    trusted: TrustedProxies,
    metrics: Arc<Metrics>,
) -> impl Stream<Item = Result<GuardedIo, io::Error>> {
    // Bounded: headers read ahead of the accept loop wait here.
    let (proxied_tx, proxied_rx) = tokio::sync::mpsc::channel(64);
    let acceptor = Acceptor {
        listener,
        plaintext,
        explaining: Arc::default(),
        trusted,
        reading_headers: Arc::default(),
        proxied_tx,
        proxied_rx,
        limits,
        census: Arc::new(Census::default()),
        metrics,
        backoff: BACKOFF_MIN,
        refused_log: Throttle::new(Duration::from_secs(10)),
        exhausted_log: Throttle::new(Duration::from_secs(1)),
    };
    futures::stream::unfold(acceptor, |mut acceptor| async move {
        let io = acceptor.next().await;
        Some((Ok(io), acceptor))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_proxies_are_addresses_and_blocks() {
        let t = TrustedProxies::parse("10.0.0.5, 10.1.0.0/16,::1").unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(t.contains(ip("10.0.0.5")));
        assert!(!t.contains(ip("10.0.0.6")));
        assert!(t.contains(ip("10.1.255.7")));
        assert!(!t.contains(ip("10.2.0.1")));
        assert!(t.contains(ip("::1")));
        assert!(!t.contains(ip("::2")));
        assert!(TrustedProxies::parse("").unwrap().is_empty());
        assert!(TrustedProxies::parse("0.0.0.0/0")
            .unwrap()
            .contains(ip("8.8.8.8")));
        for bad in ["10.0.0.0/33", "host.example", "10.0.0.1/x"] {
            assert!(TrustedProxies::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn proxy_v2_headers_name_the_client_and_anything_else_is_refused() {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let send = |bytes: Vec<u8>| async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(&bytes).await.unwrap();
            c
        };
        let header = |cmd: u8, family: u8, block: &[u8]| {
            let mut h = PROXY_V2_SIGNATURE.to_vec();
            h.extend_from_slice(&[0x20 | cmd, family]);
            h.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
            h.extend_from_slice(block);
            h
        };
        let v4 = [192, 0, 2, 7, 10, 0, 0, 1, 0x30, 0x39, 0, 80];
        let _c = send(header(1, 0x11, &v4)).await;
        let (mut s, _) = listener.accept().await.unwrap();
        assert_eq!(
            read_proxy_v2(&mut s).await.unwrap(),
            Some("192.0.2.7:12345".parse().unwrap())
        );
        let _c = send(header(0, 0x00, &[])).await;
        let (mut s, _) = listener.accept().await.unwrap();
        assert_eq!(read_proxy_v2(&mut s).await.unwrap(), None, "LOCAL");
        // An HTTP/2 preface, a short block, UDP: refused.
        for bytes in [
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            header(1, 0x11, &v4[..6]),
            header(1, 0x12, &v4),
        ] {
            let _c = send(bytes).await;
            let (mut s, _) = listener.accept().await.unwrap();
            assert!(read_proxy_v2(&mut s).await.is_err());
        }
    }

    #[test]
    fn a_small_open_file_limit_lowers_the_per_address_limit_in_proportion() {
        let limits = NetLimits::default().fitted_to(128);
        assert_eq!(limits.max_connections, 64);
        assert_eq!(limits.max_connections_per_peer, 8);
        // Room enough: nothing changes.
        assert_eq!(
            NetLimits::default().fitted_to(1 << 20),
            NetLimits::default()
        );
        // Never below one.
        let tiny = NetLimits::default().fitted_to(65);
        assert_eq!(
            (tiny.max_connections, tiny.max_connections_per_peer),
            (1, 1)
        );
    }

    #[test]
    fn the_census_holds_both_limits_and_forgets_closed_connections() {
        let limits = NetLimits {
            max_connections: 3,
            max_connections_per_peer: 2,
            ..NetLimits::default()
        };
        let metrics = Arc::new(Metrics::default());
        let census = Arc::new(Census::default());
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let a1 = census.admit(a, &limits, &metrics).unwrap();
        let _a2 = census.admit(a, &limits, &metrics).unwrap();
        assert_eq!(
            census.admit(a, &limits, &metrics).unwrap_err(),
            "max_connections_per_peer"
        );
        let _b1 = census.admit(b, &limits, &metrics).unwrap();
        assert_eq!(
            census.admit(b, &limits, &metrics).unwrap_err(),
            "max_connections"
        );
        drop(a1);
        assert!(census.admit(b, &limits, &metrics).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_follow_the_requests() {
        let limits = NetLimits::default();
        let conn = Arc::new(Conn::new("127.0.0.1:1".parse().unwrap(), &limits));
        let (at, why) = conn.deadline().unwrap();
        assert_eq!(
            (at, why),
            (conn.opened + limits.handshake_timeout, Closed::Handshake)
        );
        let far = Instant::now() + Duration::from_secs(1000);
        let near = Instant::now() + Duration::from_secs(5);
        let first = conn.open_request(far);
        assert_eq!(conn.deadline(), Some((far, Closed::Stream)));
        let second = conn.open_request(near);
        assert_eq!(conn.deadline(), Some((near, Closed::Stream)));
        drop(second);
        tokio::time::advance(Duration::from_secs(3)).await;
        drop(first);
        let idle_from = Instant::now();
        assert_eq!(
            conn.deadline(),
            Some((idle_from + limits.idle_timeout, Closed::Idle))
        );
    }

    #[test]
    fn buffered_bytes_stay_within_the_connection_limit() {
        let conn = Conn::new("127.0.0.1:1".parse().unwrap(), &NetLimits::default());
        assert!(conn.try_buffer(60, 100));
        assert!(!conn.try_buffer(41, 100));
        assert!(conn.try_buffer(40, 100));
        conn.release(100);
        assert!(conn.try_buffer(100, 100));
    }
}
