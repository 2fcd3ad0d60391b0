//! A client socket until it is a WebSocket connection or done with HTTP: plain TCP, or TLS over
//! it (`tls_cert`). The sessions read plaintext and write plaintext through it; over TLS the
//! handshake happens as the first request is read, within that request's deadline.

use crate::shard::Shard;
use crate::tls::{Fed, PollWriter, TlsSession};
use futures_lite::io::{AsyncRead, AsyncWriteExt};
use glommio::net::TcpStream;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::Poll;

/// A client socket: the TCP stream and, on a TLS port, its TLS session.
pub struct Socket {
    /// The TCP stream.
    pub stream: TcpStream,
    /// The TLS session (None: plain TCP).
    pub tls: Option<Box<TlsSession>>,
}

impl Socket {
    /// A plain TCP socket.
    pub fn plain(stream: TcpStream) -> Socket {
        Socket { stream, tls: None }
    }

    /// A socket whose bytes are TLS, from the client's hello on.
    pub fn tls(stream: TcpStream, tls: Box<TlsSession>) -> Socket {
        Socket {
            stream,
            tls: Some(tls),
        }
    }

    /// A TLS socket whose handshake has not completed (it failed, if the socket is given up).
    pub fn tls_handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|tls| tls.is_handshaking())
    }

    /// Reads whatever plaintext the socket has into `buf`, through the shard's shared read
    /// buffer: `Ok(0)` at the end of the stream. Over TLS, at most the plaintext of one read's
    /// records is added per call (16 KiB and a little).
    pub async fn read_into(&mut self, shard: &Shard, buf: &mut Vec<u8>) -> io::Result<usize> {
        let Some(tls) = self.tls.as_deref() else {
            return read_plain(shard, &mut self.stream, buf).await;
        };
        loop {
            // Handshake messages (and key updates) the last input called for go out first.
            flush_tls(&mut self.stream, tls).await?;
            let before = buf.len();
            let fed = poll_fn(|cx| {
                let mut buffer = shard.read_buffer();
                match Pin::new(&mut self.stream).poll_read(cx, &mut buffer[..]) {
                    Poll::Ready(Ok(0)) => Poll::Ready(Ok(Fed::Closed)),
                    Poll::Ready(Ok(n)) => {
                        Poll::Ready(tls.feed(&buffer[..n], |plain| buf.extend_from_slice(plain)))
                    }
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
            match fed {
                Ok(Fed::Open) if buf.len() == before => continue,
                Ok(Fed::Open) => return Ok(buf.len() - before),
                Ok(Fed::Closed) => return Ok(buf.len() - before),
                Err(e) => {
                    // rustls has queued the alert that says why; the client may as well see it.
                    tls.send_alert(self.stream.as_raw_fd());
                    return Err(e);
                }
            }
        }
    }

    /// Writes all of `bytes` (encrypted over TLS, a buffer's worth at a time).
    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        let Some(tls) = self.tls.as_deref() else {
            return self.stream.write_all(bytes).await;
        };
        let mut rest = bytes;
        while !rest.is_empty() {
            let taken = tls.encrypt(&[IoSlice::new(rest)])?;
            rest = &rest[taken..];
            flush_tls(&mut self.stream, tls).await?;
            if taken == 0 {
                return Err(io::Error::other("TLS connection closed for writing"));
            }
        }
        Ok(())
    }

    /// Over TLS, ends the stream with `close_notify` (if the socket takes it) before the socket
    /// is dropped.
    pub fn close_tls(&self) {
        if let Some(tls) = &self.tls {
            tls.close(self.stream.as_raw_fd());
        }
    }

    /// A timeout for each read from now on (None: none).
    pub fn set_read_timeout(&self, timeout: Option<std::time::Duration>) {
        let _ = self.stream.set_read_timeout(timeout);
    }
}

/// Reads whatever the socket has into `buf`, through the shard's shared read buffer.
async fn read_plain(shard: &Shard, stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    poll_fn(|cx| {
        let mut buffer = shard.read_buffer();
        match Pin::new(&mut *stream).poll_read(cx, &mut buffer[..]) {
            Poll::Ready(Ok(n)) => {
                buf.extend_from_slice(&buffer[..n]);
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    })
    .await
}

/// Writes every TLS record `tls` holds, waiting for the socket to take them.
async fn flush_tls(stream: &mut TcpStream, tls: &TlsSession) -> io::Result<()> {
    poll_fn(|cx| {
        let mut out = PollWriter {
            stream: &mut *stream,
            cx,
            written: 0,
        };
        match tls.write_to(&mut out) {
            Ok(true) => Poll::Ready(Ok(())),
            Ok(false) => Poll::Pending,
            Err(e) => Poll::Ready(Err(e)),
        }
    })
    .await
}
