//! The connection layer of `gps-seg serve`: the accept loop and one HTTP/1.1 connection per
//! client (hyper's `http1` server over the axum router), with what `axum::serve` does not
//! offer:
//!
//! - **Header-read timeout** (`--header-timeout-s`): a request's headers must be complete
//!   within it, counted from the accept on a new connection and from the request's first byte
//!   on a keep-alive one; a connection that trickles headers (slowloris) is closed.
//! - **Idle timeout** (`--idle-timeout-s`): a keep-alive connection with no request for that
//!   long is closed. While a request is in the router (body read, model run, answer) neither
//!   timeout runs: the request timeout of [`super::api`] (504) bounds it.
//! - **Early answers close the connection cleanly**: an answer sent before its request's body
//!   was read (a 503 of admission or budget, a 413, any 4xx) carries `Connection: close`, and
//!   the connection sends FIN and drains what the client still sends (at most
//!   [`LINGER_TOTAL`], [`LINGER_QUIET`] without data) before closing, so an uploading client
//!   reads the answer instead of a reset (a close with unread data sends RST).
//! - **Half-closed requests are answered**: a client that shuts down its write side after its
//!   request still gets the answer (hyper's `half_close`); one that stops mid-body gets a 400.
//! - **Shutdown**: the listener closes; connections with no request in the router (idle, or
//!   mid-headers) close at once; the others finish their request, answer with
//!   `Connection: close`, and close.

use super::metrics::ConnCounters;
use axum::http::{header, HeaderValue, Request};
use axum::response::Response;
use axum::Router;
use hyper::body::{Body as _, Bytes, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use std::convert::Infallible;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

/// The connection timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// From a new connection's accept, or a request's first byte, to the end of its headers.
    pub header_timeout: Duration,
    /// A keep-alive connection's wait for its next request's first byte.
    pub idle_timeout: Duration,
}

/// Longest drain of a request body after an early answer.
pub const LINGER_TOTAL: Duration = Duration::from_secs(10);
/// The drain ends when the client sends nothing for this long.
pub const LINGER_QUIET: Duration = Duration::from_secs(2);

const TIMED_OUT_HEADER: u8 = 1;
const TIMED_OUT_IDLE: u8 = 2;

/// What a connection's socket wrapper and its service share.
#[derive(Debug, Default)]
struct ConnState {
    /// Requests handed to the router, and those answered (or dropped unanswered).
    started: AtomicU64,
    finished: AtomicU64,
    /// An answer went out before its request's body was read.
    unread: AtomicBool,
    /// Which timeout closed the connection (`TIMED_OUT_*`), 0: none.
    timed_out: AtomicU8,
}

impl ConnState {
    fn busy(&self) -> bool {
        self.started.load(Ordering::Acquire) != self.finished.load(Ordering::Acquire)
    }
}

/// One request in the router; finished when dropped (answered, or dropped by hyper).
struct InRouter(Arc<ConnState>);

impl InRouter {
    fn new(state: Arc<ConnState>) -> InRouter {
        state.started.fetch_add(1, Ordering::AcqRel);
        InRouter(state)
    }
}

impl Drop for InRouter {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for (the rest of) a request's headers.
    Header,
    /// Keep-alive, waiting for the next request's first byte.
    Idle,
    /// A request is in the router: no timeout here.
    Busy,
}

/// The socket, with the header-read and idle deadlines enforced on reads.
struct TimedIo {
    tcp: TcpStream,
    state: Arc<ConnState>,
    limits: ConnLimits,
    phase: Phase,
    seen_finished: u64,
    deadline: Pin<Box<Sleep>>,
}

impl TimedIo {
    fn new(tcp: TcpStream, state: Arc<ConnState>, limits: ConnLimits) -> TimedIo {
        TimedIo {
            tcp,
            state,
            limits,
            phase: Phase::Header,
            seen_finished: 0,
            deadline: Box::pin(tokio::time::sleep(limits.header_timeout)),
        }
    }

    fn enter(&mut self, phase: Phase) {
        self.phase = phase;
        let d = match phase {
            Phase::Header => self.limits.header_timeout,
            Phase::Idle => self.limits.idle_timeout,
            Phase::Busy => return,
        };
        self.deadline.as_mut().reset(Instant::now() + d);
    }

    /// Follow the router: busy while a request is in it, idle once it answered.
    fn follow(&mut self) {
        if self.state.busy() {
            self.phase = Phase::Busy;
            return;
        }
        let finished = self.state.finished.load(Ordering::Acquire);
        if finished != self.seen_finished {
            self.seen_finished = finished;
            self.enter(Phase::Idle);
        }
    }
}

impl AsyncRead for TimedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        this.follow();
        let before = buf.filled().len();
        match Pin::new(&mut this.tcp).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.phase == Phase::Idle && buf.filled().len() > before {
                    this.enter(Phase::Header);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if this.phase == Phase::Busy || this.deadline.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                if this.phase == Phase::Idle {
                    // End of stream: hyper closes an idle connection quietly.
                    this.state
                        .timed_out
                        .store(TIMED_OUT_IDLE, Ordering::Release);
                    return Poll::Ready(Ok(()));
                }
                this.state
                    .timed_out
                    .store(TIMED_OUT_HEADER, Ordering::Release);
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "request headers not complete within {} s (--header-timeout-s)",
                        this.limits.header_timeout.as_secs_f64()
                    ),
                )))
            }
            r => r,
        }
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.tcp).poll_write(cx, buf);
        // An answer still going out is not idle time.
        if this.phase == Phase::Idle && matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.enter(Phase::Idle);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// A request body that records when it was read to its end.
struct Tracked {
    inner: Incoming,
    done: Arc<AtomicBool>,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.done.store(true, Ordering::Release);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The router as one connection's hyper service: counts the request in and out of the
/// router, and closes the connection after an answer sent before the body was read.
#[derive(Clone)]
struct RouterService {
    router: TowerToHyperService<Router>,
    state: Arc<ConnState>,
}

type ServiceFuture = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for RouterService {
    type Response = Response;
    type Error = Infallible;
    type Future = ServiceFuture;

    fn call(&self, req: Request<Incoming>) -> ServiceFuture {
        let in_router = InRouter::new(self.state.clone());
        let done = Arc::new(AtomicBool::new(req.body().is_end_stream()));
        let req = req.map(|inner| Tracked {
            inner,
            done: done.clone(),
        });
        let answer = self.router.call(req);
        let state = self.state.clone();
        Box::pin(async move {
            let mut r = answer.await?;
            if !done.load(Ordering::Acquire) {
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                state.unread.store(true, Ordering::Release);
            }
            drop(in_router);
            Ok(r)
        })
    }
}

/// Serve `listener` until `stop` fires (or its sender is dropped), then close the listener and
/// wait for the connections to finish (see the module docs).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    counters: Arc<ConnCounters>,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection holds a receiver; `closed()` resolves when the last one is gone.
    let (open_tx, open_rx) = watch::channel(());
    let mut stop = pin!(stop);
    loop {
        let accepted = tokio::select! {
            _ = stop.as_mut() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((tcp, _)) => {
                counters.accepted.fetch_add(1, Ordering::Relaxed);
                counters.open.fetch_add(1, Ordering::Relaxed);
                let (router, counters, stop_rx, open_rx) = (
                    router.clone(),
                    counters.clone(),
                    stop_rx.clone(),
                    open_rx.clone(),
                );
                tokio::spawn(async move {
                    let _open = Open {
                        counters: counters.clone(),
                        _shutdown_waits: open_rx,
                    };
                    connection(tcp, router, limits, &counters, stop_rx).await;
                });
            }
            // Out of file descriptors or memory: wait instead of spinning; a connection
            // that failed before it was accepted is simply gone.
            Err(e) if is_connection_error(&e) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(open_rx);
    open_tx.closed().await;
    Ok(())
}

/// A connection open: counted in the gauge, and waited for at shutdown while its receiver
/// lives; both end when it is dropped (also when its task panics).
struct Open {
    counters: Arc<ConnCounters>,
    _shutdown_waits: watch::Receiver<()>,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.counters.open.fetch_sub(1, Ordering::Relaxed);
    }
}

fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// One connection, from its accept to its close.
async fn connection(
    tcp: TcpStream,
    router: Router,
    limits: ConnLimits,
    counters: &ConnCounters,
    mut stop: watch::Receiver<bool>,
) {
    let state = Arc::new(ConnState::default());
    let io = TokioIo::new(TimedIo::new(tcp, state.clone(), limits));
    let service = RouterService {
        router: TowerToHyperService::new(router),
        state: state.clone(),
    };
    let mut conn = http1::Builder::new()
        .half_close(true)
        .header_read_timeout(None)
        .serve_connection(io, service);
    let mut stopping = false;
    let result = {
        let mut stopped = pin!(stop.wait_for(|s| *s));
        std::future::poll_fn(|cx| {
            if !stopping && stopped.as_mut().poll(cx).is_ready() {
                stopping = true;
                if !state.busy() {
                    // Idle, or mid-headers: nothing to finish.
                    return Poll::Ready(None);
                }
                Pin::new(&mut conn).graceful_shutdown();
            }
            conn.poll_without_shutdown(cx).map(Some)
        })
        .await
    };
    match state.timed_out.load(Ordering::Acquire) {
        TIMED_OUT_HEADER => {
            counters.header_timeouts.fetch_add(1, Ordering::Relaxed);
        }
        TIMED_OUT_IDLE => {
            counters.idle_timeouts.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
    let Some(result) = result else { return };
    // An answer before the body (ours), or hyper's own 4xx for a malformed request: the client
    // may still be sending.
    let unread = state.unread.load(Ordering::Acquire)
        || result
            .as_ref()
            .err()
            .is_some_and(|e| e.is_parse() || e.is_parse_too_large());
    if !unread || stopping {
        return;
    }
    counters.closed_unread.fetch_add(1, Ordering::Relaxed);
    let tcp = conn.into_parts().io.into_inner().tcp;
    linger(tcp, &mut stop).await;
}

/// Send FIN after the answer, then read and drop what the client still sends until it closes,
/// is quiet for [`LINGER_QUIET`], [`LINGER_TOTAL`] has passed, or the server stops.
async fn linger(mut tcp: TcpStream, stop: &mut watch::Receiver<bool>) {
    if std::future::poll_fn(|cx| Pin::new(&mut tcp).poll_shutdown(cx))
        .await
        .is_err()
    {
        return;
    }
    let end = Instant::now() + LINGER_TOTAL;
    let mut buf = vec![0u8; 64 << 10];
    let mut stopped = pin!(stop.wait_for(|s| *s));
    loop {
        let until = end.min(Instant::now() + LINGER_QUIET);
        tokio::select! {
            _ = stopped.as_mut() => return,
            r = tokio::time::timeout_at(until, tcp.readable()) => {
                if !matches!(r, Ok(Ok(()))) {
                    return;
                }
                match tcp.try_read(&mut buf) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        }
    }
}
