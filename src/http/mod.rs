//! HTTP/1.1 on the shared port: request heads (httparse), bounded bodies, keep-alive, and the
//! signed Pusher HTTP API (`api`).

pub mod api;
pub mod signature;

use crate::shard::Shard;
use futures_lite::io::{AsyncRead, AsyncWriteExt};
use glommio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Poll, Waker};

pub const MAX_HEAD_BYTES: usize = 16 * 1024;

pub struct Head {
    pub method: String,
    pub target: String,
    pub minor_version: u8,
    /// Lower-cased names.
    pub headers: Vec<(String, String)>,
    /// Bytes of the head, including the blank line.
    pub len: usize,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .any(|(_, v)| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }

    pub fn is_websocket_upgrade(&self) -> bool {
        self.method == "GET" && self.header_has_token("upgrade", "websocket")
    }

    pub fn keep_alive(&self) -> bool {
        if self.header_has_token("connection", "close") {
            return false;
        }
        self.minor_version >= 1 || self.header_has_token("connection", "keep-alive")
    }

    pub fn path_and_query(&self) -> (&str, &str) {
        self.target.split_once('?').unwrap_or((&self.target, ""))
    }
}

pub enum Parsed {
    Complete(Head),
    Partial,
    Invalid(String),
}

pub fn parse_head(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => Parsed::Complete(Head {
            method: req.method.unwrap_or("").to_owned(),
            target: req.path.unwrap_or("/").to_owned(),
            minor_version: req.version.unwrap_or(1),
            headers: req
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).trim().to_owned(),
                    )
                })
                .collect(),
            len,
        }),
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(e) => Parsed::Invalid(format!("Malformed HTTP request: {e}")),
    }
}

pub fn response(status: u16, content_type: &str, body: &[u8], keep_alive: bool) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    };
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

pub fn error_response(status: u16, message: &str) -> Vec<u8> {
    let body = format!(
        "{{\"error\":{}}}",
        crate::protocol::json::str_literal(message)
    );
    response(status, "application/json", body.as_bytes(), false)
}

/// A keep-alive HTTP connection as the shard's sweeper sees it: idle ones are expired there,
/// once a second, instead of arming (and cancelling) an io_uring timer on every read.
#[derive(Default)]
pub struct KeepAlive {
    pub last_active: Cell<u32>,
    pub expired: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl KeepAlive {
    pub fn expire(&self) {
        self.expired.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

/// Reads whatever the socket has into `buf`, through the shard's scratch buffer.
pub async fn read_into(
    shard: &Shard,
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> io::Result<usize> {
    read_until_expired(shard, stream, buf, None).await
}

async fn read_until_expired(
    shard: &Shard,
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    keep_alive: Option<&KeepAlive>,
) -> io::Result<usize> {
    poll_fn(|cx| {
        if let Some(ka) = keep_alive {
            if ka.expired.get() {
                return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
            }
            *ka.waker.borrow_mut() = Some(cx.waker().clone());
        }
        let mut scratch = shard.scratch.borrow_mut();
        match Pin::new(&mut *stream).poll_read(cx, &mut scratch[..]) {
            Poll::Ready(Ok(n)) => {
                buf.extend_from_slice(&scratch[..n]);
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    })
    .await
}

/// Reads one request head. On a bad or oversized head it answers and returns None.
pub async fn read_head(shard: &Shard, stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Head> {
    read_head_until_expired(shard, stream, buf, None).await
}

async fn read_head_until_expired(
    shard: &Shard,
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    keep_alive: Option<&KeepAlive>,
) -> Option<Head> {
    loop {
        match parse_head(buf) {
            Parsed::Complete(head) => return Some(head),
            Parsed::Invalid(message) => {
                let _ = stream.write_all(&error_response(400, &message)).await;
                return None;
            }
            Parsed::Partial if buf.len() >= MAX_HEAD_BYTES => {
                let _ = stream
                    .write_all(&error_response(431, "Request head too large"))
                    .await;
                return None;
            }
            Parsed::Partial => match read_until_expired(shard, stream, buf, keep_alive).await {
                Ok(n) if n > 0 => {}
                _ => return None,
            },
        }
    }
}

/// Serves HTTP requests on a keep-alive connection, starting with `head` (already in `buf`).
/// The first request was read under the socket's read timeout; after it, the sweeper closes
/// connections idle for `http_keep_alive_timeout` seconds.
pub async fn serve(shard: Rc<Shard>, mut stream: TcpStream, buf: Vec<u8>, head: Head) {
    let _ = stream.set_read_timeout(None);
    let id = shard.new_conn_id();
    let keep_alive = Rc::new(KeepAlive::default());
    keep_alive.last_active.set(shard.now_secs());
    shard.http_conns.borrow_mut().insert(id, keep_alive.clone());
    serve_requests(&shard, &mut stream, buf, head, &keep_alive).await;
    shard.http_conns.borrow_mut().remove(&id);
}

async fn serve_requests(
    shard: &Shard,
    stream: &mut TcpStream,
    mut buf: Vec<u8>,
    mut head: Head,
    keep_alive: &KeepAlive,
) {
    let max_body = shard.shared.config.max_request_body_bytes;
    loop {
        keep_alive.last_active.set(shard.now_secs());
        if head.header("transfer-encoding").is_some() {
            let _ = stream
                .write_all(&error_response(411, "Send the body with a Content-Length"))
                .await;
            return;
        }
        let length = match head.header("content-length").map(|v| v.parse::<usize>()) {
            None => 0,
            Some(Ok(n)) => n,
            Some(Err(_)) => {
                let _ = stream
                    .write_all(&error_response(400, "Invalid Content-Length"))
                    .await;
                return;
            }
        };
        if length > max_body {
            let message =
                format!("Request body of {length} bytes exceeds the limit of {max_body} bytes");
            let _ = stream.write_all(&error_response(413, &message)).await;
            return;
        }
        while buf.len() < head.len + length {
            match read_until_expired(shard, stream, &mut buf, Some(keep_alive)).await {
                Ok(n) if n > 0 => {}
                _ => return,
            }
        }
        let persistent = head.keep_alive();
        let body = &buf[head.len..head.len + length];
        let reply = api::handle(shard, &head, body).await;
        let bytes = response(
            reply.status,
            reply.content_type,
            reply.body.as_bytes(),
            persistent,
        );
        if stream.write_all(&bytes).await.is_err() || !persistent {
            return;
        }
        buf.drain(..head.len + length);
        if buf.is_empty() {
            buf = Vec::new();
        }
        head = match read_head_until_expired(shard, stream, &mut buf, Some(keep_alive)).await {
            Some(h) => h,
            None => return,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_heads_and_keep_alive_rules() {
        let raw = b"GET /app/k?protocol=7 HTTP/1.1\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n\r\nrest";
        let Parsed::Complete(h) = parse_head(raw) else {
            panic!()
        };
        assert!(h.is_websocket_upgrade());
        assert_eq!(h.path_and_query(), ("/app/k", "protocol=7"));
        assert_eq!(h.len, raw.len() - 4);
        let Parsed::Complete(h) = parse_head(b"POST /x HTTP/1.0\r\n\r\n") else {
            panic!()
        };
        assert!(!h.keep_alive());
        let Parsed::Complete(h) = parse_head(b"POST /x HTTP/1.1\r\nConnection: close\r\n\r\n")
        else {
            panic!()
        };
        assert!(!h.keep_alive());
        assert!(matches!(
            parse_head(b"GET / HTTP/1.1\r\nHost"),
            Parsed::Partial
        ));
        assert!(matches!(
            parse_head(b"\x00\x01 nonsense\r\n\r\n"),
            Parsed::Invalid(_)
        ));
    }
}
