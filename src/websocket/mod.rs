//! The WebSocket session: one connection's life from its upgrade request (admission, reference
//! §1.5) to its end, as a single task that flushes queued frames, reads into the shard's shared
//! buffer and handles each message (`handlers`, `signin`).

mod handlers;
mod signin;

use crate::feed::Note;
use crate::http::{error_response, signature::parse_query, Head, Socket};
use crate::metrics::Route;
use crate::protocol::codes;
use crate::protocol::events;
use crate::protocol::ws::{self, FrameReader};
use crate::shard::conn::{Conn, ConnState};
use crate::shard::contain::{self, Contained};
use crate::shard::{Phase, Shard};
use crate::tls::{Fed, PollWriter};
use futures_lite::io::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use std::future::{poll_fn, Future};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

/// A WebSocket connection from its upgrade request to its end. The upgrade (with the parsed
/// request head) runs in its own boxed future, so none of it stays in the memory of a
/// connection that lives for hours.
pub async fn run(shard: Rc<Shard>, mut socket: Socket, head: Head, buf: Vec<u8>) {
    let upgraded = Box::pin(upgrade(&shard, &mut socket, head, buf)).await;
    match upgraded {
        // A task of its own: it holds only what a live connection needs, and the accepting
        // task (with its request parsing state) is freed.
        Some((app, buf)) => {
            glommio::spawn_local(serve(shard, socket, app, buf)).detach();
        }
        None => socket.close_tls(),
    }
}

/// Answers the upgrade and admits the connection: `Some((app, bytes after the head))`.
async fn upgrade(
    shard: &Shard,
    stream: &mut Socket,
    head: Head,
    mut buf: Vec<u8>,
) -> Option<(u32, Vec<u8>)> {
    buf.drain(..head.len);
    let refused = |status| crate::metrics::here().http_request(Route::WebSocketUpgrade, status);
    let Some(sec_key) = head.header("sec-websocket-key") else {
        refused(400);
        let _ = stream
            .write_all(&error_response(400, "Missing Sec-WebSocket-Key"))
            .await;
        return None;
    };
    if head.header("sec-websocket-version") != Some("13") {
        refused(426);
        let _ = stream
            .write_all(&error_response(
                426,
                "Only WebSocket version 13 is supported",
            ))
            .await;
        return None;
    }
    let subprotocol = head
        .header("sec-websocket-protocol")
        .and_then(pick_subprotocol);
    let upgrade = ws::upgrade_response(sec_key.as_bytes(), subprotocol);
    if stream.write_all(&upgrade).await.is_err() {
        return None;
    }
    let (path, query) = head.path_and_query();
    match admit(shard, path, query) {
        Ok(app) => {
            buf.shrink_to_fit();
            Some((app, buf))
        }
        Err((code, reason)) => {
            reject(shard, stream, code, &reason).await;
            None
        }
    }
}

/// The connection's life after admission: flush, read, handle, until either side ends it.
fn serve(
    shard: Rc<Shard>,
    socket: Socket,
    app: u32,
    buf: Vec<u8>,
) -> Connection<impl Future<Output = ()>> {
    let Socket { stream, tls } = socket;
    let conn = open(&shard, &stream, app, tls);
    let reader = FrameReader::new(buf);
    let handler = read_and_handle(shard.clone(), conn.clone(), stream, reader);
    Connection {
        handler: contain::contain(handler),
        shard,
        conn,
    }
}

/// A live connection's task: its handler, contained (a panic in it ends this connection only),
/// then `Shard::remove_conn` however the handler ended. A plain struct rather than an `async` block, so
/// the task, which lives as long as the connection, stores each part once.
struct Connection<F> {
    handler: Contained<F>,
    shard: Rc<Shard>,
    conn: Rc<Conn>,
}

impl<F: Future<Output = ()>> Future for Connection<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // SAFETY: `handler` is structurally pinned: it is never moved out of `self`; the other
        // fields are never pinned.
        let this = unsafe { self.get_unchecked_mut() };
        let handler = unsafe { Pin::new_unchecked(&mut this.handler) };
        let result = match handler.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(result) => result,
        };
        if result.is_err() {
            this.conn.abort();
        }
        this.shard.remove_conn(&this.conn);
        this.shard.handle_own_messages();
        Poll::Ready(())
    }
}

/// Registers an admitted connection with its shard and queues `connection_established`.
fn open(
    shard: &Shard,
    stream: &TcpStream,
    app: u32,
    tls: Option<Box<crate::tls::TlsSession>>,
) -> Rc<Conn> {
    let node = shard.node();
    let id = shard.new_id();
    let burst = node.app(app).max_client_events_per_second as f32;
    let conn = Rc::new(Conn::new(id, app, shard.now_secs(), burst).with_tls(tls));
    conn.fd.set(stream.as_raw_fd());
    shard.add_conn(conn.clone());
    crate::metrics::here().connections_opened.inc();
    node.console_note(app, || {
        Note::new("connected", "").socket(node.socket_id(id))
    });
    let hello = events::connection_established(&node.socket_id(id), node.config.activity_timeout);
    conn.send_vec(hello, usize::MAX);
    conn
}

/// Reads and handles frames until either side ends the connection. The socket is closed when
/// this returns (or unwinds); `Shard::remove_conn` then forgets its descriptor.
// Clippy's suggestion (an `async fn`) is exactly what this avoids.
#[allow(clippy::manual_async_fn)]
fn read_and_handle(
    shard: Rc<Shard>,
    conn: Rc<Conn>,
    mut stream: TcpStream,
    mut reader: FrameReader,
) -> impl Future<Output = ()> {
    // An `async move` block, not an `async fn`: an async fn copies its arguments into locals and
    // would hold the stream and the reader twice for the connection's whole life.
    async move {
        let max_message = shard.node().config.max_ws_message_bytes;
        loop {
            while let Some(inbound) = reader.next(max_message) {
                crate::metrics::here().client_messages.inc();
                handlers::handle_inbound(&shard, &conn, inbound);
                // What the frame sent this shard (a join or sign-in homed here) is handled
                // before the next frame, so that frame sees its outcome.
                shard.handle_own_messages();
            }
            if conn.discard_input.get() {
                reader.fail();
            }
            shard.account_partial(&conn, reader.held_bytes(), reader.is_mid_message());
            if shard.backlogged() {
                Box::pin(shard.backpressure()).await;
            }
            match poll_fn(|cx| poll_io(&shard, &conn, &mut stream, &mut reader, cx)).await {
                Io::Read => {}
                Io::Done => break,
            }
        }
        if let Some(tls) = conn.tls() {
            // Ends the TLS stream properly, if the socket takes it.
            tls.close(stream.as_raw_fd());
        }
    }
}

/// `pusher-channels-protocol-N` (4 <= N <= 7) when the client offered it; never anything else.
fn pick_subprotocol(offered: &str) -> Option<&str> {
    offered.split(',').map(str::trim).find(|p| {
        p.strip_prefix("pusher-channels-protocol-")
            .and_then(|n| n.parse::<u8>().ok())
            .is_some_and(|n| (4..=7).contains(&n))
    })
}

/// Checks in the reference's order: path, app key, enabled, protocol, app quota, server capacity.
/// On success the connection is counted (and `Shard::remove_conn` uncounts it).
fn admit(shard: &Shard, path: &str, query: &str) -> Result<u32, (u16, String)> {
    let node = shard.node();
    let key = match path.rfind("/app/") {
        Some(i) if !path[i + 5..].is_empty() && !path[i + 5..].contains('/') => &path[i + 5..],
        _ => return Err((codes::PATH_NOT_FOUND, "Path not found".into())),
    };
    let key = crate::http::signature::percent_decode(key);
    let Some(app) = node.app_by_key(&key) else {
        return Err((
            codes::APP_NOT_FOUND,
            format!("App key {key} not in this cluster. Did you forget to specify the cluster?"),
        ));
    };
    let config = node.app(app);
    if !config.enabled {
        return Err((codes::APP_DISABLED, "Application disabled".into()));
    }
    let params = parse_query(query);
    match crate::http::signature::get(&params, "protocol") {
        None if node.config.allow_missing_protocol => {}
        None => {
            return Err((
                codes::NO_PROTOCOL_VERSION,
                "No protocol version supplied".into(),
            ))
        }
        Some(v) => match v.parse::<u32>() {
            Ok(4..=7) => {}
            _ => {
                return Err((
                    codes::UNSUPPORTED_PROTOCOL,
                    format!("Unsupported protocol version {v}"),
                ))
            }
        },
    }
    let in_app = node.app_connections[app as usize].fetch_add(1, Ordering::Relaxed);
    // In a cluster, with the other nodes' connections as of the last heartbeat.
    let elsewhere = node.app_connections_elsewhere[app as usize].load(Ordering::Relaxed);
    if config.max_connections > 0 && in_app.saturating_add(elsewhere) >= config.max_connections {
        node.app_connections[app as usize].fetch_sub(1, Ordering::Relaxed);
        return Err((
            codes::APP_OVER_QUOTA,
            "Application is over connection quota".into(),
        ));
    }
    let total = node.connections.fetch_add(1, Ordering::Relaxed);
    let cap = node.config.max_connections;
    if (cap > 0 && total >= cap) || shard.phase() == Phase::Draining {
        node.connections.fetch_sub(1, Ordering::Relaxed);
        node.app_connections[app as usize].fetch_sub(1, Ordering::Relaxed);
        return Err((codes::OVER_CAPACITY, "Over capacity".into()));
    }
    Ok(app)
}

/// Completes a refused upgrade: `pusher:error`, then a close with the same code.
async fn reject(shard: &Shard, stream: &mut Socket, code: u16, reason: &str) {
    crate::metrics::here().connections_refused[crate::metrics::close_slot(code)].inc();
    let mut bytes = events::error(Some(code), reason);
    bytes.extend(ws::close_frame(code, reason));
    if stream.write_all(&bytes).await.is_err() {
        return;
    }
    // Give the client a moment to answer the close before the TCP connection goes.
    stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut sink = Vec::new();
    while let Ok(n) = stream.read_into(shard, &mut sink).await {
        if n == 0 || sink.len() > 4096 {
            break;
        }
    }
}

enum Io {
    Read,
    Done,
}

/// Flushes the queue (one sendmsg for all pending frames), then reads what has arrived.
fn poll_io(
    shard: &Shard,
    conn: &Conn,
    stream: &mut TcpStream,
    reader: &mut FrameReader,
    cx: &mut Context<'_>,
) -> Poll<Io> {
    conn.set_waker(cx.waker());
    if conn.state() == ConnState::Aborted {
        return Poll::Ready(Io::Done);
    }
    let fd = stream.as_raw_fd();
    loop {
        match conn.flush(fd) {
            Err(_) => return Poll::Ready(Io::Done),
            Ok(true) => {
                if let ConnState::Closing {
                    peer_closed: true, ..
                } = conn.state()
                {
                    return Poll::Ready(Io::Done);
                }
                break;
            }
            // The socket is full: glommio's write wakes us when it drains (and may write some).
            Ok(false) if conn.tls().is_some() => {
                if !wait_writable_tls(conn, stream, cx) {
                    return Poll::Ready(Io::Done);
                }
                if conn.tls().is_some_and(|tls| tls.wants_write()) {
                    break;
                }
            }
            Ok(false) => {
                match conn.with_front(|front| Pin::new(&mut *stream).poll_write(cx, front)) {
                    Some(Poll::Ready(Ok(n))) => {
                        crate::metrics::here().bytes_sent.add(n as u64);
                        conn.consume(n);
                    }
                    Some(Poll::Ready(Err(_))) => return Poll::Ready(Io::Done),
                    _ => break,
                }
            }
        }
    }
    let mut buffer = shard.read_buffer();
    match Pin::new(&mut *stream).poll_read(cx, &mut buffer[..]) {
        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(Io::Done),
        Poll::Ready(Ok(n)) => {
            crate::metrics::here().bytes_received.add(n as u64);
            let Some(tls) = conn.tls() else {
                reader.feed(&buffer[..n]);
                return Poll::Ready(Io::Read);
            };
            // Decrypted on the way in; what the records held reaches the frame reader in order.
            match tls.feed(&buffer[..n], |plain| reader.feed(plain)) {
                Ok(Fed::Open) => Poll::Ready(Io::Read),
                Ok(Fed::Closed) => Poll::Ready(Io::Done),
                Err(_) => {
                    tls.send_alert(fd);
                    Poll::Ready(Io::Done)
                }
            }
        }
        Poll::Pending => Poll::Pending,
    }
}

/// Over TLS, when the socket is full: writes the records rustls holds through glommio, which
/// registers the task to be woken when the socket takes more. False on a write error.
fn wait_writable_tls(conn: &Conn, stream: &mut TcpStream, cx: &mut Context<'_>) -> bool {
    let Some(tls) = conn.tls() else {
        return true;
    };
    let mut out = PollWriter {
        stream,
        cx,
        written: 0,
    };
    let result = tls.write_to(&mut out);
    crate::metrics::here().bytes_sent.add(out.written as u64);
    result.is_ok()
}

#[cfg(test)]
mod tests {
    use super::pick_subprotocol;

    #[test]
    fn echoes_only_offered_pusher_subprotocols() {
        assert_eq!(
            pick_subprotocol("pusher-channels-protocol-7"),
            Some("pusher-channels-protocol-7")
        );
        assert_eq!(
            pick_subprotocol("chat, pusher-channels-protocol-5"),
            Some("pusher-channels-protocol-5")
        );
        assert_eq!(pick_subprotocol("pusher-channels-protocol-9"), None);
        assert_eq!(pick_subprotocol("chat"), None);
    }
}
