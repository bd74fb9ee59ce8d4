//! The accept loop of both listeners (client API and peer), in place of `axum::serve`, which
//! has neither a header-read timeout nor a connection cap, so that hostile clients cannot
//! starve a node:
//!
//! * at most `--max-connections` connections are served at once per port; the loop takes a
//!   permit *before* accepting, so further connections wait in the kernel's backlog instead of
//!   costing a task each;
//! * a connection has `--header-timeout-ms` to finish its TLS handshake, and then again to send
//!   each request's headers (hyper's header-read timeout, which also closes idle keep-alive
//!   connections); a slow-loris client is cut off and its permit freed;
//! * a request has `--body-timeout-ms`, plus a second per MiB it announces, to send its body,
//!   else it gets 408 and its connection is closed;
//! * on a TLS port, a connection whose first byte is not a TLS handshake (plain HTTP) gets a
//!   400 and is closed, never served.
//!
//! Cancelling `stop` stops accepting, lets in-flight requests finish (idle connections close
//! at once) and returns when every connection is closed.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::{header, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

use crate::config::Config;

/// What a listener tolerates from its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
}

impl Limits {
    pub fn from_config(cfg: &Config) -> Limits {
        Limits {
            max_connections: cfg.max_connections,
            header_timeout: cfg.header_timeout(),
            body_timeout: cfg.body_timeout(),
        }
    }
}

/// Extra time a body gets per MiB its Content-Length announces: a snapshot of a few hundred
/// MiB must get through, a client that announces little must send it quickly.
const PER_MIB: Duration = Duration::from_secs(1);
/// Ceiling of the body allowance, so that an absurd Content-Length cannot buy a day.
const MAX_BODY_ALLOWANCE: Duration = Duration::from_secs(3600);
/// How long a refused plain-HTTP connection is drained before closing, so that the client
/// reads the 400 instead of a reset.
const REFUSAL_DRAIN: Duration = Duration::from_millis(500);
/// First byte of every TLS connection (a handshake record).
const TLS_HANDSHAKE: u8 = 0x16;

/// Logs a recurring condition at most once per period (flood of bad handshakes, full cap).
pub(crate) struct Throttle {
    every: Duration,
    last: Mutex<Option<Instant>>,
}

impl Throttle {
    pub(crate) fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            last: Mutex::new(None),
        }
    }

    /// True at most once per period.
    pub(crate) fn ready(&self) -> bool {
        let mut last = self.last.lock().expect("throttle lock");
        let due = match *last {
            Some(t) => t.elapsed() >= self.every,
            None => true,
        };
        if due {
            *last = Some(Instant::now());
        }
        due
    }
}

/// What every connection task of one listener shares.
struct Shared {
    router: Router,
    acceptor: Option<TlsAcceptor>,
    limits: Limits,
    stop: CancellationToken,
    refused: Throttle,
    logger: slog::Logger,
}

/// Serves `router` on `listener` (over TLS with `tls`) until `stop` is cancelled and every
/// connection has closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
    stop: CancellationToken,
    logger: slog::Logger,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let tracker = TaskTracker::new();
    let shared = Arc::new(Shared {
        router,
        acceptor: tls.map(TlsAcceptor::from),
        limits,
        stop: stop.clone(),
        refused: Throttle::new(Duration::from_secs(10)),
        logger,
    });
    let full = Throttle::new(Duration::from_secs(10));
    loop {
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break, // closed: never happens, the semaphore is ours
            },
        };
        if permits.available_permits() == 0 && full.ready() {
            slog::warn!(shared.logger, "connection limit reached; new connections wait";
                "max_connections" => limits.max_connections);
        }
        let (stream, remote) = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: this connection is lost, the
                    // listener is not; back off a little instead of spinning.
                    slog::warn!(shared.logger, "accept failed"; "error" => %e);
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        tracker.spawn(connection(stream, remote, shared.clone(), permit));
    }
    // Close the port first: connections made from now on are refused, not left hanging.
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

/// One connection, holding its permit until it closes.
async fn connection(
    stream: TcpStream,
    remote: SocketAddr,
    shared: Arc<Shared>,
    _permit: OwnedSemaphorePermit,
) {
    // Raft messages are small and latency-bound.
    let _ = stream.set_nodelay(true);
    let Some(acceptor) = shared.acceptor.clone() else {
        return serve_http(stream, remote, &shared).await;
    };
    let handshake = async {
        let mut first = [0u8; 1];
        if stream.peek(&mut first).await? == 0 {
            return Ok(None); // closed before saying anything
        }
        if first[0] != TLS_HANDSHAKE {
            refuse_plain_http(stream).await;
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "plain HTTP on a TLS port",
            ));
        }
        acceptor.accept(stream).await.map(Some)
    };
    let outcome = tokio::select! {
        _ = shared.stop.cancelled() => return,
        r = tokio::time::timeout(shared.limits.header_timeout, handshake) => r,
    };
    let error = match outcome {
        Ok(Ok(Some(tls))) => return serve_http(tls, remote, &shared).await,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no TLS handshake within --header-timeout-ms".to_string(),
    };
    // Certificate problems are what an operator needs to see, but a client retrying many
    // times a second must not flood the log.
    if shared.refused.ready() {
        slog::warn!(shared.logger, "refused connection (further ones are logged at debug \
            level for 10 s)"; "remote" => %remote, "error" => error);
    } else {
        slog::debug!(shared.logger, "refused connection"; "remote" => %remote, "error" => error);
    }
}

/// Answers a plain-HTTP request on a TLS port with 400, as Go's servers do, so that `curl
/// http://` on an `https://` port says what is wrong instead of failing obscurely.
async fn refuse_plain_http(mut stream: TcpStream) {
    const BODY: &str = "Client sent an HTTP request to an HTTPS server.\n";
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    if stream.write_all(answer.as_bytes()).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    // Closing with unread input would send a reset, which may destroy the answer in flight.
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(REFUSAL_DRAIN, async {
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

async fn serve_http<I>(io: I, remote: SocketAddr, shared: &Shared)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let router = shared.router.clone();
    let body_timeout = shared.limits.body_timeout;
    let service = hyper::service::service_fn(move |req| handle(router.clone(), req, body_timeout));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.header_timeout)
        .serve_connection(TokioIo::new(io), service)
        // The raft transport's streams (see `transport`) are HTTP/1.1 upgrades.
        .with_upgrades();
    tokio::pin!(conn);
    let res = tokio::select! {
        res = conn.as_mut() => res,
        _ = shared.stop.cancelled() => {
            // Finishes the request in progress, if any, then closes.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = res {
        slog::debug!(shared.logger, "connection closed"; "remote" => %remote, "error" => %e,
            "header_timeout" => e.is_timeout());
    }
}

/// Runs one request through the router with a deadline on its body.
async fn handle(
    router: Router,
    req: Request<Incoming>,
    body_timeout: Duration,
) -> Result<Response, Infallible> {
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    let allowance = (body_timeout + PER_MIB * u32::try_from(announced >> 20).unwrap_or(u32::MAX))
        .min(MAX_BODY_ALLOWANCE.max(body_timeout));
    let expired = Arc::new(AtomicBool::new(false));
    let deadline = tokio::time::Instant::now() + allowance;
    let req = req.map(|inner| DeadlineBody {
        inner,
        deadline,
        sleep: None,
        expired: expired.clone(),
    });
    let res = router.oneshot(req).await?;
    if expired.load(Ordering::Relaxed) {
        // Whatever the handler made of the failed read (axum says 400), the cause is the
        // client's slowness.
        return Ok((
            StatusCode::REQUEST_TIMEOUT,
            [(header::CONNECTION, "close")],
            "request body not received in time\n",
        )
            .into_response());
    }
    Ok(res)
}

#[derive(Debug, thiserror::Error)]
#[error("request body not received within the body timeout")]
struct BodyTimeout;

/// A request body that fails once its deadline has passed, however slowly it trickles in.
struct DeadlineBody {
    inner: Incoming,
    deadline: tokio::time::Instant,
    /// Created on the first read that has to wait, so that bodiless requests cost no timer.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    expired: Arc<AtomicBool>,
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|r| r.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.as_mut().poll(cx).is_ready() {
            this.expired.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(BodyTimeout.into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
