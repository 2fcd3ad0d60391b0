//! One WebSocket connection's life: upgrade and admission (reference §1.5), then a single task
//! that flushes queued frames, reads into the shard's scratch buffer and handles each message.

use super::conn::{find_sub, Conn, Sub};
use super::contain::Contained;
use super::messages::JoinRequest;
use super::Shard;
use crate::channels::ChannelKey;
use crate::http::{error_response, signature::parse_query, Head};
use crate::protocol::channel::{validate_name, ChannelKind, SERVER_TO_USER_PREFIX};
use crate::protocol::events::{
    self, ClientMessage, Data, SigninData, SubscribeData, UnsubscribeData,
};
use crate::protocol::ws::{self, FrameReader, Inbound};
use crate::protocol::{codes, json};
use futures_lite::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use sonic_rs::{JsonValueTrait, LazyValue};
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
pub async fn run(shard: Rc<Shard>, mut stream: TcpStream, head: Head, buf: Vec<u8>) {
    let upgraded = Box::pin(upgrade(&shard, &mut stream, head, buf)).await;
    if let Some((app, buf)) = upgraded {
        // A task of its own: it holds only what a live connection needs, and the accepting
        // task (with its request parsing state) is freed.
        glommio::spawn_local(serve(shard, stream, app, buf)).detach();
    }
}

/// Answers the upgrade and admits the connection: `Some((app, bytes after the head))`.
async fn upgrade(
    shard: &Shard,
    stream: &mut TcpStream,
    head: Head,
    mut buf: Vec<u8>,
) -> Option<(u32, Vec<u8>)> {
    buf.drain(..head.len);
    let Some(sec_key) = head.header("sec-websocket-key") else {
        let _ = stream
            .write_all(&error_response(400, "Missing Sec-WebSocket-Key"))
            .await;
        return None;
    };
    if head.header("sec-websocket-version") != Some("13") {
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
    stream: TcpStream,
    app: u32,
    buf: Vec<u8>,
) -> Connection<impl Future<Output = ()>> {
    let conn = open(&shard, &stream, app);
    let reader = FrameReader::new(buf);
    let handler = read_and_handle(shard.clone(), conn.clone(), stream, reader);
    Connection {
        handler: super::contain::contain(handler),
        shard,
        conn,
    }
}

/// A live connection's task: its handler, contained (a panic in it ends this connection only),
/// then `disconnect` however the handler ended. A plain struct rather than an `async` block, so
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
        disconnect(&this.shard, &this.conn);
        Poll::Ready(())
    }
}

/// Registers an admitted connection with its shard and queues `connection_established`.
fn open(shard: &Shard, stream: &TcpStream, app: u32) -> Rc<Conn> {
    let shared = &shard.shared;
    let id = shard.new_conn_id();
    let burst = shared.app(app).max_client_events_per_second as f32;
    let conn = Rc::new(Conn::new(id, app, shard.now_secs(), burst));
    conn.fd.set(stream.as_raw_fd());
    shard.conns.borrow_mut().insert(id, conn.clone());
    let hello =
        events::connection_established(&shared.socket_id(id), shared.config.activity_timeout);
    conn.send_vec(hello, usize::MAX);
    conn
}

/// Reads and handles frames until either side ends the connection. The socket is closed when
/// this returns (or unwinds); `disconnect` then forgets its descriptor.
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
        let max_message = shard.shared.config.max_ws_message_bytes;
        loop {
            while let Some(inbound) = reader.next(max_message) {
                handle_inbound(&shard, &conn, inbound);
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
/// On success the connection is counted (and `disconnect` uncounts it).
fn admit(shard: &Shard, path: &str, query: &str) -> Result<u32, (u16, String)> {
    let shared = &shard.shared;
    let key = match path.rfind("/app/") {
        Some(i) if !path[i + 5..].is_empty() && !path[i + 5..].contains('/') => &path[i + 5..],
        _ => return Err((codes::PATH_NOT_FOUND, "Path not found".into())),
    };
    let key = crate::http::signature::percent_decode(key);
    let Some(app) = shared.app_by_key(&key) else {
        return Err((
            codes::APP_NOT_FOUND,
            format!("App key {key} not in this cluster. Did you forget to specify the cluster?"),
        ));
    };
    let config = shared.app(app);
    if !config.enabled {
        return Err((codes::APP_DISABLED, "Application disabled".into()));
    }
    let params = parse_query(query);
    match crate::http::signature::get(&params, "protocol") {
        None if shared.config.allow_missing_protocol => {}
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
    let in_app = shared.app_connections[app as usize].fetch_add(1, Ordering::Relaxed);
    if config.max_connections > 0 && in_app >= config.max_connections {
        shared.app_connections[app as usize].fetch_sub(1, Ordering::Relaxed);
        return Err((
            codes::APP_OVER_QUOTA,
            "Application is over connection quota".into(),
        ));
    }
    let total = shared.connections.fetch_add(1, Ordering::Relaxed);
    let cap = shared.config.max_connections;
    if (cap > 0 && total >= cap) || shard.shutting_down.get() {
        shared.connections.fetch_sub(1, Ordering::Relaxed);
        shared.app_connections[app as usize].fetch_sub(1, Ordering::Relaxed);
        return Err((codes::OVER_CAPACITY, "Over capacity".into()));
    }
    Ok(app)
}

/// Completes a refused upgrade: `pusher:error`, then a close with the same code.
async fn reject(shard: &Shard, stream: &mut TcpStream, code: u16, reason: &str) {
    let mut bytes = events::error(Some(code), reason);
    bytes.extend(ws::close_frame(code, reason));
    if stream.write_all(&bytes).await.is_err() {
        return;
    }
    // Give the client a moment to answer the close before the TCP connection goes.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut sink = Vec::new();
    while let Ok(n) = crate::http::read_into(shard, stream, &mut sink).await {
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
    if conn.aborted.get() {
        return Poll::Ready(Io::Done);
    }
    let fd = stream.as_raw_fd();
    loop {
        match conn.flush(fd) {
            Err(_) => return Poll::Ready(Io::Done),
            Ok(true) => {
                if conn.is_closing() && conn.peer_closed.get() {
                    return Poll::Ready(Io::Done);
                }
                break;
            }
            // The socket is full: glommio's write wakes us when it drains (and may write some).
            Ok(false) => {
                match conn.with_front(|front| Pin::new(&mut *stream).poll_write(cx, front)) {
                    Some(Poll::Ready(Ok(n))) => conn.consume(n),
                    Some(Poll::Ready(Err(_))) => return Poll::Ready(Io::Done),
                    _ => break,
                }
            }
        }
    }
    let mut scratch = shard.scratch.borrow_mut();
    match Pin::new(&mut *stream).poll_read(cx, &mut scratch[..]) {
        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(Io::Done),
        Poll::Ready(Ok(n)) => {
            reader.feed(&scratch[..n]);
            Poll::Ready(Io::Read)
        }
        Poll::Pending => Poll::Pending,
    }
}

fn disconnect(shard: &Shard, conn: &Rc<Conn>) {
    // The descriptor is closed with the stream and may be reused: nothing may write to it now.
    conn.fd.set(-1);
    shard.account_partial(conn, 0, false);
    shard.conns.borrow_mut().remove(&conn.id);
    let subs = std::mem::take(&mut *conn.subs.borrow_mut());
    for sub in subs.into_iter().filter(|s| s.confirmed) {
        let key = ChannelKey {
            app: conn.app,
            name: sub.name,
        };
        shard.local.borrow_mut().remove(&key, conn);
        shard.leave(key, sub.user_id.map(String::from));
    }
    shard.sign_out(conn);
    // Pending joins are undone when their reply finds the connection gone.
    let shared = &shard.shared;
    shared.connections.fetch_sub(1, Ordering::Relaxed);
    shared.app_connections[conn.app as usize].fetch_sub(1, Ordering::Relaxed);
    shard.on_disconnect();
}

fn handle_inbound(shard: &Shard, conn: &Conn, inbound: Inbound) {
    let now = shard.now_secs();
    conn.last_seen.set(now);
    conn.ping_sent.set(None);
    if conn.is_closing() {
        if let Inbound::Close(_) = inbound {
            conn.peer_closed.set(true);
            conn.wake();
        }
        return;
    }
    let max = shard.max_queued();
    match inbound {
        Inbound::Text(bytes) => handle_text(shard, conn, &bytes),
        Inbound::Binary => {
            conn.send_vec(
                events::error(
                    None,
                    "Binary frames are not supported; send JSON text frames",
                ),
                max,
            );
        }
        Inbound::Ping(payload) => {
            conn.send_vec(ws::encode_frame(ws::OP_PONG, &payload), max);
        }
        Inbound::Pong => {}
        Inbound::Close(code) => {
            conn.peer_closed.set(true);
            conn.close_bare(code, "", now);
        }
        Inbound::TooLarge(size) => {
            let limit = shard.shared.config.max_ws_message_bytes;
            let message = format!("Message of {size} bytes discarded: the limit is {limit} bytes");
            conn.send_vec(events::error(None, &message), max);
        }
        Inbound::Violation { code, reason } => conn.close_bare(Some(code), reason, now),
    }
}

fn handle_text(shard: &Shard, conn: &Conn, text: &[u8]) {
    let max = shard.max_queued();
    if let Err(message) = json::check_depth(text, json::MAX_JSON_DEPTH) {
        conn.send_vec(events::error(None, &message), max);
        return;
    }
    let Ok(message) = sonic_rs::from_slice::<ClientMessage>(text) else {
        let reply = events::error(
            None,
            "Invalid message format: expected a JSON object with an \"event\"",
        );
        conn.send_vec(reply, max);
        return;
    };
    match &*message.event {
        "pusher:ping" => {
            conn.send_vec(events::pong(), max);
        }
        "pusher:pong" => {}
        "pusher:subscribe" => match events::decode_object::<SubscribeData>(message.data.as_ref()) {
            Some(data) => subscribe(shard, conn, data),
            None => {
                conn.send_vec(
                    events::error(None, "pusher:subscribe needs data with a channel"),
                    max,
                );
            }
        },
        "pusher:unsubscribe" => {
            if let Some(data) = events::decode_object::<UnsubscribeData>(message.data.as_ref()) {
                unsubscribe(shard, conn, &data.channel);
            }
        }
        "pusher:signin" => {
            let data = events::decode_object::<SigninData>(message.data.as_ref());
            super::user::signin(shard, conn, data);
        }
        event if event.starts_with("client-") => {
            client_event(
                shard,
                conn,
                event,
                message.channel.as_deref(),
                message.data.as_ref(),
            );
        }
        #[cfg(debug_assertions)]
        "shardpush:test_panic" if super::contain::fault_injection() => {
            panic!("fault injection: panic while handling a connection")
        }
        #[cfg(debug_assertions)]
        "shardpush:test_panic_shard" if super::contain::fault_injection() => {
            // The sleep makes the panic happen in the task's own later poll, outside this
            // connection's (glommio may run a new task at once, inside the caller's poll).
            glommio::spawn_local(async {
                glommio::timer::sleep(Duration::from_millis(1)).await;
                panic!("fault injection: panic in a shard task")
            })
            .detach();
        }
        // Unknown events are ignored, as the hosted service and other servers do.
        _ => {}
    }
}

fn subscribe(shard: &Shard, conn: &Conn, data: SubscribeData) {
    let max = shard.max_queued();
    let fail = |message: &str| {
        conn.send_vec(events::error(None, message), max);
    };
    let app = shard.shared.app(conn.app);
    let channel = data.channel.as_str();
    let kind = ChannelKind::of(channel);
    if kind == ChannelKind::ServerToUser {
        // Events for the user reach every connection signed in as that user anyway (§3.1);
        // the subscription is only confirmed, never counted.
        let own = conn
            .user
            .borrow()
            .as_ref()
            .and_then(|u| u.confirmed_id())
            .is_some_and(|id| channel.strip_prefix(SERVER_TO_USER_PREFIX) == Some(id));
        return match own {
            true => {
                conn.send_vec(events::subscription_succeeded(channel, "{}"), max);
            }
            false => {
                fail("A #server-to-user- channel is only for a connection signed in as that user")
            }
        };
    }
    if let Err(message) = validate_name(channel, app.max_channel_name_length as usize) {
        return fail(&message);
    }
    // Where the new subscription goes in the sorted list, unless it is there already. Nothing
    // below changes the list before it is inserted.
    let position = {
        let subs = conn.subs.borrow();
        match find_sub(&subs, channel) {
            Ok(i) => Ok(subs[i].confirmed),
            Err(_) if subs.len() >= app.max_subscriptions_per_connection as usize => {
                let limit = app.max_subscriptions_per_connection;
                drop(subs);
                return fail(&format!(
                    "Too many subscriptions: a connection may subscribe to at most {limit} channels"
                ));
            }
            Err(at) => Err(at),
        }
    };
    let insert_at = match position {
        // Still waiting for the home shard: the reply will confirm it.
        Ok(false) => return,
        Ok(true) if kind != ChannelKind::Presence => {
            conn.send_vec(events::subscription_succeeded(channel, "{}"), max);
            return;
        }
        Ok(true) => {
            return shard.join(JoinRequest {
                key: ChannelKey::new(conn.app, channel),
                origin: shard.id,
                conn: conn.id,
                member: None,
                max_members: app.max_presence_members,
                repeat: true,
            });
        }
        Err(at) => at,
    };
    let socket_id = shard.shared.socket_id(conn.id);
    let channel_data = data.channel_data.as_deref();
    if kind.needs_auth() {
        // Presence without channel_data is signed as `socket_id:channel` (signed-in users, §3.4).
        let to_sign = match channel_data.filter(|_| kind == ChannelKind::Presence) {
            Some(channel_data) => format!("{socket_id}:{channel}:{channel_data}"),
            None => format!("{socket_id}:{channel}"),
        };
        let token = data.auth.as_deref().unwrap_or("");
        if let Err(message) = crate::auth::verify_token(&app.key, &app.secret, token, &to_sign) {
            return fail(&message);
        }
    }
    let member = if kind == ChannelKind::Presence {
        let member =
            match channel_data {
                Some(text) => match events::parse_channel_data(text) {
                    Ok(m) => (m.user_id, m.user_info),
                    Err(message) => return fail(message),
                },
                None => {
                    let user = conn.user.borrow();
                    match user.as_ref().filter(|u| u.confirmed) {
                        Some(u) => (u.id.to_string(), u.info.to_string()),
                        None => return fail(
                            "Presence subscriptions need channel_data, or a signed-in connection",
                        ),
                    }
                }
            };
        if !app.user_id_fits(&member.0) {
            let limit = app.max_user_id_length;
            return fail(&format!(
                "Presence user_id is longer than {limit} characters"
            ));
        }
        if member.1.len() > app.max_presence_member_size_bytes as usize {
            let limit = app.max_presence_member_size_bytes;
            return fail(&format!("Presence user_info is larger than {limit} bytes"));
        }
        Some(member)
    } else {
        None
    };
    let mut subs = conn.subs.borrow_mut();
    // Most connections join one channel: the first takes one slot, not the usual four. Later
    // ones grow the Vec as usual, so a connection on many channels does not reallocate on each.
    if subs.capacity() == 0 {
        subs.reserve_exact(1);
    }
    // Kept sorted by name: lookups are binary searches (the insert only shifts pointers).
    subs.insert(
        insert_at,
        Sub {
            name: channel.into(),
            confirmed: false,
            user_id: member.as_ref().map(|(id, _)| id.as_str().into()),
        },
    );
    drop(subs);
    shard.join(JoinRequest {
        key: ChannelKey::new(conn.app, channel),
        origin: shard.id,
        conn: conn.id,
        member,
        max_members: app.max_presence_members,
        repeat: false,
    });
}

fn unsubscribe(shard: &Shard, conn: &Conn, channel: &str) {
    let removed = {
        let mut subs = conn.subs.borrow_mut();
        find_sub(&subs, channel).ok().map(|i| subs.remove(i))
    };
    // Unknown channel: ignored. Pending: the home's reply undoes the join.
    if let Some(sub) = removed.filter(|s| s.confirmed) {
        let key = ChannelKey {
            app: conn.app,
            name: sub.name,
        };
        shard.local.borrow_mut().remove(&key, conn);
        shard.leave(key, sub.user_id.map(String::from));
    }
}

/// Client events, in the reference's order of checks (§3.5). Errors never close the connection.
fn client_event(
    shard: &Shard,
    conn: &Conn,
    event: &str,
    channel: Option<&str>,
    data: Option<&LazyValue<'_>>,
) {
    let max = shard.max_queued();
    let fail = |code: Option<u16>, message: &str| {
        conn.send_vec(events::error(code, message), max);
    };
    let app = shard.shared.app(conn.app);
    if !app.enable_client_messages {
        return fail(
            Some(codes::CLIENT_EVENT_REJECTED),
            "The app does not have client messaging enabled",
        );
    }
    let Some(channel) = channel else {
        return fail(None, "Client events need a channel");
    };
    if !ChannelKind::of(channel).allows_client_events() {
        return fail(
            None,
            "Client events are only allowed on private and presence channels (not encrypted ones)",
        );
    }
    let user_id = {
        let subs = conn.subs.borrow();
        match find_sub(&subs, channel).ok().map(|i| &subs[i]) {
            Some(sub) if sub.confirmed => sub.user_id.clone(),
            _ => {
                return fail(
                    Some(codes::UNAUTHORIZED),
                    "The client is not a member of the specified channel",
                )
            }
        }
    };
    if event.len() > app.max_event_name_length as usize {
        return fail(
            None,
            &format!(
                "Event name is longer than {} characters",
                app.max_event_name_length
            ),
        );
    }
    // Strings are forwarded as received; anything else becomes a compact JSON string.
    let literal = match data {
        Some(v) if v.is_str() => {
            let raw = v.as_raw_str();
            if json::decoded_len(raw).is_none() {
                return fail(
                    None,
                    "Client event data is not a valid JSON string (bad escape)",
                );
            }
            raw.to_owned()
        }
        Some(v) => json::str_literal(&json::compact(v.as_raw_str()).unwrap_or_default()),
        None => json::str_literal("null"),
    };
    if literal.len().saturating_sub(2) > app.max_event_payload_bytes as usize {
        return fail(
            None,
            &format!(
                "Client event data is larger than {} bytes",
                app.max_event_payload_bytes
            ),
        );
    }
    if !take_token(shard, conn, app.max_client_events_per_second as f32) {
        return fail(
            Some(codes::CLIENT_EVENT_REJECTED),
            "Client event rejected due to rate limit",
        );
    }
    let frame = events::frame(
        event,
        Some(channel),
        Data::Raw(&literal),
        user_id.as_deref(),
    );
    // Client events are never cached (§3.8).
    shard.publish(
        ChannelKey::new(conn.app, channel),
        frame,
        Some(conn.id),
        false,
    );
}

/// Token bucket: `rate` per second, burst `rate`.
fn take_token(shard: &Shard, conn: &Conn, rate: f32) -> bool {
    let now = shard.now_ms();
    let (last, tokens) = conn.rate.get();
    let tokens = (tokens + (now.saturating_sub(last)) as f32 * rate / 1000.0).min(rate);
    if tokens < 1.0 {
        conn.rate.set((now, tokens));
        return false;
    }
    conn.rate.set((now, tokens - 1.0));
    true
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
