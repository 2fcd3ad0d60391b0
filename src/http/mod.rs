//! The HTTP session: HTTP/1.1 on the shared port (request heads with httparse, bounded bodies,
//! keep-alive), and the signed Pusher HTTP API (`api`).

pub mod api;
pub mod signature;
mod socket;

pub use socket::Socket;

use crate::metrics::Route;
use crate::shard::deadline::{Deadline, DeadlineGuard};
use crate::shard::Shard;
use std::rc::Rc;

/// Longest request head accepted (431 beyond).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// A parsed request head, owned (it outlives the read buffer it came from).
pub struct Head {
    /// `GET`, `POST`, ...
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    /// 1 for HTTP/1.1, 0 for HTTP/1.0.
    pub minor_version: u8,
    /// Lower-cased names.
    pub headers: Vec<(String, String)>,
    /// Bytes of the head, including the blank line.
    pub len: usize,
}

impl Head {
    /// The first value of header `name` (lower-case).
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

    /// A `GET` asking to upgrade to WebSocket.
    pub fn is_websocket_upgrade(&self) -> bool {
        self.method == "GET" && self.header_has_token("upgrade", "websocket")
    }

    /// The client keeps the connection open after the response (HTTP/1.1 unless it says not).
    pub fn keep_alive(&self) -> bool {
        if self.header_has_token("connection", "close") {
            return false;
        }
        self.minor_version >= 1 || self.header_has_token("connection", "keep-alive")
    }

    /// The target split at `?` (the query is empty when there is none).
    pub fn path_and_query(&self) -> (&str, &str) {
        self.target.split_once('?').unwrap_or((&self.target, ""))
    }
}

/// What `parse_head` made of the bytes so far.
pub enum Parsed {
    /// A whole head.
    Complete(Head),
    /// Not all of it yet: read more.
    Partial,
    /// Not HTTP: the message for the 400.
    Invalid(String),
}

/// Parses a request head from the start of `buf`.
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

/// A complete response: status line, headers and `body`.
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
        503 => "Service Unavailable",
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

/// A request refused, by the HTTP layer or the API: its status and a message for the caller.
/// Rendered once, as `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status code.
    pub status: u16,
    /// What went wrong, for the caller (never a secret).
    pub message: String,
}

impl ApiError {
    /// A refusal with `status` and `message`.
    pub fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// The JSON body: `{"error": message}`.
    pub fn body(&self) -> String {
        #[derive(serde::Serialize)]
        struct ErrorBody<'a> {
            error: &'a str,
        }
        let body = ErrorBody {
            error: &self.message,
        };
        sonic_rs::to_string(&body).unwrap_or_else(|_| "{}".into())
    }
}

/// A complete response for a refused request, after which the connection is closed.
pub fn error_response(status: u16, message: &str) -> Vec<u8> {
    let body = ApiError::new(status, message).body();
    response(status, "application/json", body.as_bytes(), false)
}

/// Reads one request head. On a bad or oversized head it answers and returns None. The caller
/// bounds the time it may take (a `Deadline`).
pub async fn read_head(shard: &Shard, stream: &mut Socket, buf: &mut Vec<u8>) -> Option<Head> {
    loop {
        match parse_head(buf) {
            Parsed::Complete(head) => return Some(head),
            Parsed::Invalid(message) => {
                crate::metrics::here().http_request(Route::Other, 400);
                let _ = stream.write_all(&error_response(400, &message)).await;
                return None;
            }
            Parsed::Partial if buf.len() >= MAX_HEAD_BYTES => {
                crate::metrics::here().http_request(Route::Other, 431);
                let _ = stream
                    .write_all(&error_response(431, "Request head too large"))
                    .await;
                return None;
            }
            Parsed::Partial => match stream.read_into(shard, buf).await {
                Ok(n) if n > 0 => {}
                _ => return None,
            },
        }
    }
}

/// The body length a head announces: `Ok(0)` without `Content-Length`; an error for a bad
/// value or for several that disagree (RFC 9112 §6.3: a request smuggling vector).
pub fn content_length(head: &Head) -> Result<usize, &'static str> {
    let mut length = None;
    let values = head
        .headers
        .iter()
        .filter(|(n, _)| n == "content-length")
        .flat_map(|(_, v)| v.split(','));
    for value in values {
        let value = value.trim();
        // Digits only (RFC 9112): `parse` alone would take "+5".
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err("Invalid Content-Length");
        }
        let n = value
            .parse::<usize>()
            .map_err(|_| "Invalid Content-Length")?;
        if length.is_some_and(|l| l != n) {
            return Err("Conflicting Content-Length headers");
        }
        length = Some(n);
    }
    Ok(length.unwrap_or(0))
}

/// Serves HTTP requests on a keep-alive connection, starting with `head` (already in `buf`).
/// `deadline` bounds each request: it was set at accept for the first one; each complete request
/// gets `request_timeout` to be answered, and the connection then `http_keep_alive_timeout` to
/// send the whole of its next request. Whatever the socket is doing, it is closed at the deadline.
pub async fn serve(
    shard: Rc<Shard>,
    mut stream: Socket,
    buf: Vec<u8>,
    head: Head,
    deadline: DeadlineGuard,
) {
    let _ = deadline
        .within(serve_requests(&shard, &mut stream, buf, head, &deadline))
        .await;
    stream.close_tls();
}

async fn serve_requests(
    shard: &Shard,
    stream: &mut Socket,
    mut buf: Vec<u8>,
    mut head: Head,
    deadline: &Deadline,
) {
    let config = &shard.node().config;
    let max_body = config.max_request_body_bytes;
    let metrics = crate::metrics::here();
    loop {
        let route = Route::of(&head.method, head.path_and_query().0);
        if head.header("transfer-encoding").is_some() {
            metrics.http_request(route, 411);
            let _ = stream
                .write_all(&error_response(411, "Send the body with a Content-Length"))
                .await;
            return;
        }
        let length = match content_length(&head) {
            Ok(n) => n,
            Err(message) => {
                metrics.http_request(route, 400);
                let _ = stream.write_all(&error_response(400, message)).await;
                return;
            }
        };
        if length > max_body {
            metrics.http_request(route, 413);
            let message =
                format!("Request body of {length} bytes exceeds the limit of {max_body} bytes");
            let _ = stream.write_all(&error_response(413, &message)).await;
            return;
        }
        while buf.len() < head.len + length {
            match stream.read_into(shard, &mut buf).await {
                Ok(n) if n > 0 => {}
                _ => return,
            }
        }
        deadline.extend(shard, config.request_timeout);
        let persistent = head.keep_alive();
        let body = &buf[head.len..head.len + length];
        let reply = api::handle(shard, &head, body).await;
        metrics.http_request(route, reply.status);
        let bytes = response(
            reply.status,
            reply.content_type,
            reply.body.as_bytes(),
            persistent,
        );
        if stream.write_all(&bytes).await.is_err() || !persistent {
            return;
        }
        deadline.extend(shard, config.http_keep_alive_timeout);
        buf.drain(..head.len + length);
        if buf.is_empty() {
            buf = Vec::new();
        }
        head = match read_head(shard, stream, &mut buf).await {
            Some(h) => h,
            None => return,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Head {
        match parse_head(raw.as_bytes()) {
            Parsed::Complete(h) => h,
            _ => panic!("not a complete head: {raw}"),
        }
    }

    #[test]
    fn content_length_must_agree() {
        let len = |extra: &str| content_length(&head(&format!("POST / HTTP/1.1\r\n{extra}\r\n")));
        assert_eq!(len(""), Ok(0));
        assert_eq!(len("Content-Length: 12\r\n"), Ok(12));
        assert_eq!(len("Content-Length: 12\r\nContent-Length: 12\r\n"), Ok(12));
        assert_eq!(len("Content-Length: 12, 12\r\n"), Ok(12));
        assert!(len("Content-Length: 12\r\nContent-Length: 13\r\n").is_err());
        assert!(len("Content-Length: 12, 0\r\n").is_err());
        assert!(len("Content-Length: -1\r\n").is_err());
        assert!(len("Content-Length: +5\r\n").is_err());
        assert!(len("Content-Length: \r\n").is_err());
    }

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
