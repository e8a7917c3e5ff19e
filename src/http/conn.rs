//! The connection layer under the router: an accept loop over hyper's HTTP/1 server with the
//! timeouts that keep slow or hostile clients from holding a connection (and, through its
//! stream, KV blocks) forever, and the graceful shutdown that drains it.
//!
//! - Headers must arrive within [`ConnTimeouts::header_read`] of the connection becoming ready
//!   for a request (hyper's `header_read_timeout`; this also closes idle keep-alive connections):
//!   a slowloris client is cut off with no response.
//! - A response write may make no progress for at most [`ConnTimeouts::write_stall`]: a client
//!   that stops reading fills the socket buffers, its write pends, and [`StallGuard`] fails it.
//!   hyper then drops the connection, the response stream drops its `Generation`, and every
//!   choice is aborted (blocks freed at the engine's next step). The engine itself never waits on
//!   a client: events go into unbounded per-request channels, so a stalled client only delays
//!   its own stream.
//!
//! The body deadline (408) is a middleware in `mod.rs`: it needs the OpenAI error envelope.

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Sleep;
use tower::ServiceExt;

/// How long a client may take to send its headers, and to accept response bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnTimeouts {
    pub header_read: Duration,
    pub write_stall: Duration,
}

impl ConnTimeouts {
    pub fn from_config(s: &crate::config::ServerSection) -> Self {
        Self {
            header_read: Duration::from_secs(s.header_read_timeout_secs),
            write_stall: Duration::from_secs(s.write_stall_timeout_secs),
        }
    }
}

/// Serves `app` on `listener` until `signal` resolves; then accepts nothing more (the listener
/// is dropped, so new connections are refused), lets every open connection finish its
/// in-flight request (keep-alive off) and returns once all are closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    timeouts: ConnTimeouts,
    signal: impl Future<Output = ()> + Send + 'static,
) {
    // `signal_tx` closes when the signal fires; every connection holds a `close_rx` clone, so
    // `close_tx.closed()` resolves once the last connection ends (axum's own scheme).
    let (signal_tx, signal_rx) = watch::channel(());
    tokio::spawn(async move {
        signal.await;
        drop(signal_rx);
    });
    let (close_tx, close_rx) = watch::channel(());
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
            () = signal_tx.closed() => break,
        };
        let app = app.clone();
        let signal_tx = signal_tx.clone();
        let close_rx = close_rx.clone();
        tokio::spawn(async move {
            connection(stream, app, timeouts, signal_tx).await;
            drop(close_rx);
        });
    }
    drop(close_rx);
    drop(listener);
    close_tx.closed().await;
}

async fn connection(
    stream: TcpStream,
    app: Router,
    timeouts: ConnTimeouts,
    signal_tx: watch::Sender<()>,
) {
    let io = TokioIo::new(StallGuard::new(stream, timeouts.write_stall));
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        app.clone().oneshot(req.map(axum::body::Body::new))
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header_read);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut shutting_down = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%e, "connection ended with an error");
                }
                break;
            }
            () = signal_tx.closed(), if !shutting_down => {
                shutting_down = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Per-connection accept errors (the peer reset before we accepted) are nothing; others
/// (out of file descriptors) get a pause so the loop does not spin.
async fn accept_error(e: io::Error) {
    use io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!(%e, "accept failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// A TCP stream whose writes fail with `TimedOut` once one has been pending (no byte accepted
/// by the kernel) for longer than `limit`. Reads are untouched.
pub struct StallGuard {
    inner: TcpStream,
    limit: Duration,
    /// Armed when a write first returns `Pending`, disarmed by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl StallGuard {
    pub fn new(inner: TcpStream, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            stalled: None,
        }
    }

    /// Maps the inner write's result: progress disarms the timer; `Pending` arms it (and
    /// registers its wake-up) or, once it has fired, becomes an error.
    fn watch<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let limit = self.limit;
                let timer = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        tracing::info!(
                            secs = limit.as_secs_f64(),
                            "client stopped reading: closing the connection"
                        );
                        Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "write stalled: the client is not reading",
                        )))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl AsyncRead for StallGuard {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for StallGuard {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
