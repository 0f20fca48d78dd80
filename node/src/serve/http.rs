//! The HTTP listener under the API. Every connection is bounded in time and in number, so idle,
//! half-open or slow clients cannot hold the node's file descriptors and starve real ones:
//!
//! - a connection with no request in flight closes after `idle_timeout`;
//! - a request, headers and body, must arrive within `read_timeout` of its first byte (a slowloris
//!   gets 408 or a closed socket), and until it has, its connection counts as idle;
//! - a response the client stops reading for `idle_timeout` is abandoned;
//! - at `max_connections`, or when the process runs out of file descriptors, a new connection
//!   closes the connection that has been idle longest; only if every one has a request in flight
//!   is the newcomer turned away;
//! - at shutdown, idle connections close at once and the others get the grace period, after
//!   which they are closed whatever they are doing.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, Response, StatusCode};
use axum::response::IntoResponse;
use http_body_util::{BodyExt, Limited};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tower_service::Service;

use super::api::ApiError;

/// How long connections may take and how many there may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    pub read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_body: usize,
}

/// One connection's state, shared by its task, its requests and the registry. Times are in
/// milliseconds since the server's epoch, never 0 (0 means "not set").
struct Conn {
    epoch: Instant,
    /// Requests whose responses have not been sent whole.
    in_flight: AtomicUsize,
    /// When the connection last became idle (opened, or its last response ended).
    idle_since: AtomicU64,
    /// When the first byte of the next request arrived while idle (0: none yet); it stays set
    /// until the request's body has arrived too.
    head_started: AtomicU64,
    /// Since when writing to the client has been blocked (0: it is not): a client that stops
    /// reading its response.
    write_blocked: AtomicU64,
    close: Notify,
}

impl Conn {
    fn new(epoch: Instant) -> Self {
        let conn = Conn {
            epoch,
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            write_blocked: AtomicU64::new(0),
            close: Notify::new(),
        };
        conn.idle_since.store(conn.now(), Ordering::Release);
        conn
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    /// Why the connection should close now, if it should.
    fn expired(&self, now: u64, limits: &HttpLimits) -> Option<&'static str> {
        let since = |t: u64| now.saturating_sub(t);
        let ms = |d: Duration| d.as_millis() as u64;
        if !self.idle() {
            let blocked = self.write_blocked.load(Ordering::Acquire);
            return (blocked != 0 && since(blocked) > ms(limits.idle_timeout)).then_some("the client stopped reading its response");
        }
        let head = self.head_started.load(Ordering::Acquire);
        if head != 0 {
            // A second past the read timeout: the request's own 408 goes first where it can.
            (since(head) > ms(limits.read_timeout) + 1000).then_some("the request did not arrive within the read timeout")
        } else {
            (since(self.idle_since.load(Ordering::Acquire)) > ms(limits.idle_timeout)).then_some("idle")
        }
    }

    /// When the request now being read began (its first byte), marking it begun now if its bytes
    /// came before the connection was idle (pipelined behind the previous request).
    fn request_started(&self, now: u64) -> u64 {
        match self.head_started.compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => now,
            Err(started) => started,
        }
    }

    fn wrote(&self, result: &Poll<std::io::Result<usize>>) {
        match result {
            Poll::Pending => {
                let _ = self.write_blocked.compare_exchange(0, self.now(), Ordering::AcqRel, Ordering::Acquire);
            }
            Poll::Ready(Ok(n)) if *n > 0 => self.write_blocked.store(0, Ordering::Release),
            Poll::Ready(_) => {}
        }
    }
}

/// A request in flight on a connection: the connection is not idle until this is dropped, which
/// happens when the response body has been sent whole (or abandoned).
struct InFlight(Arc<Conn>);

impl InFlight {
    fn begin(conn: Arc<Conn>) -> Self {
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        conn.head_started.store(0, Ordering::Release);
        InFlight(conn)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let conn = &self.0;
        conn.idle_since.store(conn.now(), Ordering::Release);
        conn.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The TCP stream, noting when a request's first byte arrives on an idle connection.
struct Watched {
    inner: TcpStream,
    conn: Arc<Conn>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before && self.conn.idle() {
            self.conn.request_started(self.conn.now());
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.conn.wrote(&r);
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.conn.wrote(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The open connections.
#[derive(Default)]
struct Registry {
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Registry {
    fn len(&self) -> usize {
        self.conns.lock().map(|c| c.len()).unwrap_or(0)
    }

    fn insert(&self, id: u64, conn: Arc<Conn>) {
        if let Ok(mut c) = self.conns.lock() {
            c.insert(id, conn);
        }
    }

    fn remove(&self, id: u64) {
        if let Ok(mut c) = self.conns.lock() {
            c.remove(&id);
        }
    }

    /// Closes the connection idle the longest; false if every connection has a request in flight.
    fn evict_idlest(&self) -> bool {
        let Ok(mut conns) = self.conns.lock() else { return false };
        let victim = conns
            .iter()
            .filter(|(_, c)| c.idle())
            .min_by_key(|(_, c)| match c.head_started.load(Ordering::Acquire) {
                // A connection that started a request long ago and still has not finished its
                // headers is the likeliest slowloris.
                0 => c.idle_since.load(Ordering::Acquire),
                head => head,
            })
            .map(|(id, _)| *id);
        match victim.and_then(|id| conns.remove(&id)) {
            Some(c) => {
                c.close.notify_one();
                true
            }
            None => false,
        }
    }

    fn close_all(&self) {
        if let Ok(conns) = self.conns.lock() {
            conns.values().for_each(|c| c.close.notify_one());
        }
    }
}

/// A connection's place in the registry, given back when its task ends.
struct Registered {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.remove(self.id);
    }
}

/// Whether an accept error means the process (or the machine) is out of file descriptors.
fn out_of_descriptors(e: &std::io::Error) -> bool {
    // EMFILE (24) and ENFILE (23) on Linux and the BSDs.
    matches!(e.raw_os_error(), Some(23 | 24))
}

/// Raises this process's soft limit on open files to its hard limit (a server needs many; the
/// soft limit is often 1,024) and returns the soft limit now in force, if there is one.
#[cfg(unix)]
fn descriptor_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    if let (Some(current), Some(max)) = (lim.current, lim.maximum)
        && current < max
    {
        let raised = rustix::process::Rlimit { current: Some(max.min(1 << 20)), maximum: lim.maximum };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::debug!(error = %e, "cannot raise the open-file limit");
        }
    }
    getrlimit(Resource::Nofile).current
}

#[cfg(not(unix))]
fn descriptor_limit() -> Option<u64> {
    None
}

/// Serves `router` on `listener` until `stop` completes, then closes idle connections, gives the
/// others `grace` to finish, and closes what is left. Returns when `stop` completed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    stop: impl Future<Output = ()> + Send,
    grace: Duration,
) -> Instant {
    let epoch = Instant::now();
    // Half the process's file descriptors at most: the rest are the mesh's, the model's and the
    // log's, which strangers holding connections must not starve.
    let mut limits = limits;
    if let Some(fds) = descriptor_limit() {
        let cap = usize::try_from(fds / 2).unwrap_or(usize::MAX).max(1);
        if cap < limits.max_connections {
            tracing::info!(open_file_limit = fds, max_connections = cap, "fewer HTTP connections than asked: half the open-file limit");
            limits.max_connections = cap;
        }
    }
    let registry = Arc::new(Registry::default());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut next_id = 0u64;
    let (mut refused, mut starved) = (0u64, 0u64);
    tokio::pin!(stop);
    loop {
        let (stream, remote) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) if out_of_descriptors(&e) => {
                    // Free a descriptor for the next real client, if any connection is idle.
                    if !registry.evict_idlest() {
                        starved += 1;
                        if starved.is_power_of_two() {
                            tracing::warn!(error = %e, times = starved, "out of file descriptors with every connection busy");
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        if registry.len() >= limits.max_connections && !registry.evict_idlest() {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(%remote, refused, max = limits.max_connections, "connection refused: every connection has a request in flight");
            }
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let id = next_id;
        let conn = Arc::new(Conn::new(epoch));
        registry.insert(id, conn.clone());
        let (router, registry, shutdown) = (router.clone(), registry.clone(), shutdown_rx.clone());
        tokio::spawn(async move {
            // Removed however the task ends (a handler's panic included).
            let _registered = Registered { registry, id };
            serve_connection(stream, remote, conn, router, limits, shutdown).await;
        });
    }
    let stopped = Instant::now();
    drop(listener);
    let _ = shutdown_tx.send(true);
    let deadline = tokio::time::Instant::now() + grace;
    while registry.len() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = registry.len();
    if left > 0 {
        tracing::warn!(connections = left, "grace period over: closing the connections that are left");
        registry.close_all();
    }
    stopped
}

async fn serve_connection(
    stream: TcpStream,
    remote: SocketAddr,
    conn: Arc<Conn>,
    router: Router,
    limits: HttpLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let io = TokioIo::new(Watched { inner: stream, conn: conn.clone() });
    let requests = conn.clone();
    let service = hyper::service::service_fn(move |req| handle(req, remote, requests.clone(), router.clone(), limits));
    let http = hyper::server::conn::http1::Builder::new().max_buf_size(64 << 10).serve_connection(io, service);
    tokio::pin!(http);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing = *shutdown.borrow();
    if closing {
        http.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            // The connection first: a request that arrived with the tick is served, not cut off.
            biased;
            result = http.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%remote, error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            () = conn.close.notified() => return,
            _ = tick.tick() => {
                if let Some(why) = conn.expired(conn.now(), &limits) {
                    tracing::debug!(%remote, why, "closing an HTTP connection");
                    return;
                }
            }
            changed = shutdown.changed(), if !closing => {
                closing = true;
                if changed.is_ok() {
                    // Idle connections close now; one with a request in flight after its response.
                    http.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Reads the whole body (the request within the read timeout of its first byte, and within the
/// size limit), then runs the router; the response carries the in-flight guard until it has been
/// sent whole. Until the body is in, the connection counts as idle: a slow body can be evicted.
async fn handle(
    req: Request<hyper::body::Incoming>,
    remote: SocketAddr,
    conn: Arc<Conn>,
    mut router: Router,
    limits: HttpLimits,
) -> Result<Response<Body>, Infallible> {
    let (mut parts, body) = req.into_parts();
    parts.extensions.insert(ConnectInfo(remote));
    let now = conn.now();
    let left = (conn.request_started(now) + limits.read_timeout.as_millis() as u64).saturating_sub(now);
    let body = match tokio::time::timeout(Duration::from_millis(left), Limited::new(body, limits.max_body).collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            let message = format!("the request body is larger than the limit of {} bytes", limits.max_body);
            return Ok(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, message).into_response());
        }
        Ok(Err(e)) => return Ok(ApiError::new(StatusCode::BAD_REQUEST, format!("cannot read the request body: {e}")).into_response()),
        Err(_) => {
            let message = format!("the request did not arrive within {} s", limits.read_timeout.as_secs_f32());
            return Ok(ApiError::new(StatusCode::REQUEST_TIMEOUT, message).into_response());
        }
    };
    let in_flight = InFlight::begin(conn);
    let response = match router.call(Request::from_parts(parts, Body::from(body))).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let (parts, body) = response.into_parts();
    let body = body.map_frame(move |frame| {
        let _ = &in_flight;
        frame
    });
    Ok(Response::from_parts(parts, Body::new(body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_expires_when_idle_slow_to_send_or_not_reading() {
        let limits = HttpLimits {
            read_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
            max_connections: 8,
            max_body: 1 << 20,
        };
        let conn = Arc::new(Conn::new(Instant::now()));
        conn.idle_since.store(1, Ordering::Release);
        assert_eq!(conn.expired(10_000, &limits), None, "idle for 10 s: not yet");
        assert_eq!(conn.expired(10_002, &limits), Some("idle"));

        // A request's first byte at 5 s: the read timeout (plus a second for its 408) counts from it.
        conn.head_started.store(5_000, Ordering::Release);
        assert_eq!(conn.expired(8_000, &limits), None);
        assert!(conn.expired(8_001, &limits).is_some_and(|why| why.contains("read timeout")));
        assert_eq!(conn.request_started(9_000), 5_000, "a request keeps its first byte's time");

        // In flight, a request is never idle; only a client that stops reading ends it.
        let guard = InFlight::begin(conn.clone());
        assert_eq!(conn.head_started.load(Ordering::Acquire), 0);
        assert_eq!(conn.expired(1_000_000, &limits), None);
        conn.wrote(&Poll::Pending);
        let blocked = conn.write_blocked.load(Ordering::Acquire);
        assert!(blocked > 0);
        assert_eq!(conn.expired(blocked + 10_000, &limits), None);
        assert!(conn.expired(blocked + 10_001, &limits).is_some_and(|why| why.contains("stopped reading")));
        conn.wrote(&Poll::Ready(Ok(100)));
        assert_eq!(conn.expired(blocked + 10_001, &limits), None, "reading again");
        drop(guard);
        assert!(conn.idle());
    }

    #[test]
    fn the_idlest_connection_makes_room_and_busy_ones_never_do() {
        let registry = Registry::default();
        let conns: Vec<Arc<Conn>> = (0..3)
            .map(|i| {
                let c = Arc::new(Conn::new(Instant::now()));
                c.idle_since.store(100 + i, Ordering::Release);
                c
            })
            .collect();
        for (i, c) in conns.iter().enumerate() {
            registry.insert(i as u64, c.clone());
        }
        // The slowloris (a request begun at 50 ms) goes before the idle ones.
        conns[2].head_started.store(50, Ordering::Release);
        let _busy = InFlight::begin(conns[0].clone());
        assert!(registry.evict_idlest());
        assert_eq!(registry.len(), 2);
        assert!(registry.conns.lock().expect("lock").contains_key(&1), "the slowloris went first");
        assert!(registry.evict_idlest());
        assert!(!registry.evict_idlest(), "the busy connection stays");
        assert_eq!(registry.len(), 1);
    }
}
