//! What operators and their tools ask of the process: Prometheus metrics (`exposition`), and
//! health (`/up`: alive; `/ready`: taking new clients). Health is answered on the main port by
//! the shards and, with `metrics_port`, on the operations listener too, which runs on threads of
//! its own so that it still answers while the shards are busy or draining (the main port stops
//! accepting when a drain begins).

pub mod console;
pub mod exposition;
pub mod reload;

use crate::http::api::Reply;
use crate::http::{parse_head, response, Parsed};
use crate::shard::Node;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The answer to a health path (`/`, `/health`, `/up`, `/ready`); None for any other path.
pub fn health(node: &Node, path: &str) -> Option<Reply> {
    let (status, body) = match path {
        "/" | "/health" | "/up" => (200, "OK"),
        "/ready" => match node.readiness() {
            Ok(()) => (200, "OK"),
            Err(why) => (503, why.reason()),
        },
        _ => return None,
    };
    Some(Reply {
        status,
        content_type: "text/plain",
        body: body.into(),
    })
}

/// Requests the operations listener serves at once; more connections get an immediate 503.
const MAX_REQUESTS_AT_ONCE: usize = 16;
/// Time a request on the operations listener may take, reading and writing included (a scraper
/// or a health check sends its request at once: a silent socket only holds a slot this long).
const REQUEST_TIME: Duration = Duration::from_secs(2);
/// Longest request head read on the operations listener.
const MAX_HEAD: usize = 8 * 1024;

/// Binds the operations listener (before the shards start, so a taken port stops the start).
pub fn bind(node: &Node) -> io::Result<Option<TcpListener>> {
    let Some(port) = node.config.metrics_port else {
        return Ok(None);
    };
    let host = &node.config.metrics_host;
    TcpListener::bind((host.as_str(), port))
        .map(Some)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind metrics {host}:{port}: {e}")))
}

/// Serves `/metrics`, `/up` and `/ready` on `listener`, each request on a thread of its own
/// (at most `MAX_REQUESTS_AT_ONCE`), for the life of the process.
pub fn serve(listener: TcpListener, node: Arc<Node>) -> io::Result<SocketAddr> {
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("ops".into())
        .spawn(move || {
            let busy = Arc::new(AtomicUsize::new(0));
            for stream in listener.incoming() {
                let Ok(stream) = stream else {
                    // Out of descriptors, usually: do not spin.
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                if busy.fetch_add(1, Ordering::AcqRel) >= MAX_REQUESTS_AT_ONCE {
                    busy.fetch_sub(1, Ordering::AcqRel);
                    // Told at once, never waited for: one non-blocking write of a short answer.
                    let mut stream = stream;
                    if stream.set_nonblocking(true).is_ok() {
                        let busy = "Too many requests at once on this port; retry";
                        let _ = send(&mut stream, 503, "text/plain", busy);
                    }
                    continue;
                }
                let (node, in_flight) = (node.clone(), busy.clone());
                let spawned = std::thread::Builder::new()
                    .name("ops-request".into())
                    .spawn(move || {
                        let _ = answer(stream, &node);
                        in_flight.fetch_sub(1, Ordering::AcqRel);
                    });
                if spawned.is_err() {
                    // The closure (and its count) was dropped unrun.
                    busy.fetch_sub(1, Ordering::AcqRel);
                }
            }
        })?;
    Ok(addr)
}

/// Reads one request head (bounded in size and time) and answers it; the connection closes.
fn answer(mut stream: TcpStream, node: &Node) -> io::Result<()> {
    let deadline = Instant::now() + REQUEST_TIME;
    let mut buf = Vec::with_capacity(1024);
    let head = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        stream.set_read_timeout(Some(left))?;
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse_head(&buf) {
            Parsed::Complete(head) => break head,
            Parsed::Invalid(message) => return send(&mut stream, 400, "text/plain", &message),
            Parsed::Partial if buf.len() >= MAX_HEAD => {
                return send(&mut stream, 431, "text/plain", "Request head too large")
            }
            Parsed::Partial => {}
        }
    };
    stream.set_write_timeout(Some(REQUEST_TIME))?;
    let (path, _) = head.path_and_query();
    if head.method != "GET" {
        return send(&mut stream, 405, "text/plain", "Only GET");
    }
    if path == "/metrics" {
        let text = exposition::render(node);
        return send(&mut stream, 200, exposition::CONTENT_TYPE, &text);
    }
    match health(node, path) {
        Some(reply) => send(&mut stream, reply.status, reply.content_type, &reply.body),
        None => send(
            &mut stream,
            404,
            "text/plain",
            "Not found: this port serves /metrics, /up and /ready",
        ),
    }
}

fn send(stream: &mut TcpStream, status: u16, content_type: &str, body: &str) -> io::Result<()> {
    stream.write_all(&response(status, content_type, body.as_bytes(), false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, Config};

    fn node(ready_memory_limit_mb: u64) -> Node {
        let mut config = Config::load(&Cli::default(), &|_| None).unwrap();
        config.ready_memory_limit_mb = ready_memory_limit_mb;
        Node::new(config, 1)
    }

    fn status(node: &Node, path: &str) -> Option<(u16, String)> {
        health(node, path).map(|r| (r.status, r.body))
    }

    #[test]
    fn ready_only_between_start_and_shutdown_and_under_the_memory_limit() {
        let n = node(0);
        assert_eq!(status(&n, "/up"), Some((200, "OK".into())));
        assert_eq!(status(&n, "/ready"), Some((503, "starting".into())));
        n.started.store(true, Ordering::Release);
        assert_eq!(status(&n, "/ready"), Some((200, "OK".into())));
        n.shutdown.store(true, Ordering::Release);
        assert_eq!(status(&n, "/ready"), Some((503, "draining".into())));
        assert_eq!(status(&n, "/up"), Some((200, "OK".into())));
        assert_eq!(status(&n, "/metrics"), None);

        // A test process uses more than 1 MiB.
        let small = node(1);
        small.started.store(true, Ordering::Release);
        let (code, body) = status(&small, "/ready").unwrap();
        assert_eq!(
            (code, body.as_str()),
            (503, "memory above ready_memory_limit_mb")
        );
        let large = node(1 << 20);
        large.started.store(true, Ordering::Release);
        assert_eq!(status(&large, "/ready"), Some((200, "OK".into())));
    }
}
