//! What a WebSocket connection's messages do: each inbound frame, and each Pusher event a
//! client sends (subscribe, unsubscribe, sign in, client events), checked in the reference's
//! order and answered with a clear `pusher:error` when refused.

use crate::channels::ChannelKey;
use crate::config::WebhookEventType;
use crate::feed::Note;
use crate::protocol::channel::{validate_name, ChannelKind, SERVER_TO_USER_PREFIX};
use crate::protocol::events::{
    self, ClientMessage, Data, PresenceMember, SigninData, SubscribeData, UnsubscribeData,
};
use crate::protocol::ws::{self, Inbound};
use crate::protocol::{codes, json};
use crate::shard::conn::{find_sub, Conn, Sub};
use crate::shard::messages::{JoinRequest, Publication};
use crate::shard::Shard;
use crate::webhooks::Event;
use sonic_rs::{JsonValueTrait, LazyValue};
use std::sync::Arc;
#[cfg(debug_assertions)]
use std::time::Duration;

/// Handles one inbound frame or protocol violation of a connection.
pub(super) fn handle_inbound(shard: &Shard, conn: &Conn, inbound: Inbound) {
    let now = shard.now_secs();
    conn.last_seen.set(now);
    conn.ping_sent.set(None);
    if conn.is_closing() {
        if let Inbound::Close(_) = inbound {
            conn.mark_peer_closed();
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
            conn.close_without_error(code, "", now);
            conn.mark_peer_closed();
        }
        Inbound::TooLarge(size) => {
            let limit = shard.node().config.max_ws_message_bytes;
            let message = format!("Message of {size} bytes discarded: the limit is {limit} bytes");
            conn.send_vec(events::error(None, &message), max);
        }
        Inbound::Violation { code, reason } => conn.close_without_error(Some(code), reason, now),
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
            super::signin::signin(shard, conn, data);
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
        "shardpush:test_panic" if crate::shard::contain::fault_injection() => {
            panic!("fault injection: panic while handling a connection")
        }
        #[cfg(debug_assertions)]
        "shardpush:test_panic_shard" if crate::shard::contain::fault_injection() => {
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
    let app = shard.node().app(conn.app);
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
                origin: shard.id(),
                conn: conn.id,
                member: None,
                max_members: app.max_presence_members,
                duplicate: true,
            });
        }
        Err(at) => at,
    };
    let socket_id = shard.node().socket_id(conn.id);
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
                    Ok(member) => member,
                    Err(message) => return fail(message),
                },
                None => {
                    let user = conn.user.borrow();
                    match user.as_ref().filter(|u| u.confirmed) {
                        Some(u) => PresenceMember {
                            user_id: u.id.to_string(),
                            user_info: u.info.to_string(),
                        },
                        None => return fail(
                            "Presence subscriptions need channel_data, or a signed-in connection",
                        ),
                    }
                }
            };
        if !app.user_id_fits(&member.user_id) {
            let limit = app.max_user_id_length;
            return fail(&format!(
                "Presence user_id is longer than {limit} characters"
            ));
        }
        if member.user_info.len() > app.max_presence_member_size_bytes as usize {
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
            user_id: member.as_ref().map(|m| m.user_id.as_str().into()),
        },
    );
    drop(subs);
    shard.join(JoinRequest {
        key: ChannelKey::new(conn.app, channel),
        origin: shard.id(),
        conn: conn.id,
        member,
        max_members: app.max_presence_members,
        duplicate: false,
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
        shard.unsubscribe_confirmed(key, conn, sub.user_id.map(String::from));
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
    let app = shard.node().app(conn.app);
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
                    Some(codes::NOT_A_MEMBER),
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
        crate::metrics::here().client_events_rate_limited.inc();
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
    let key = ChannelKey::new(conn.app, channel);
    crate::metrics::here().client_events.inc();
    shard.node().console_note(conn.app, || {
        let note = Note::new("client_event", channel).event(event, &literal);
        let note = note.socket(shard.node().socket_id(conn.id));
        note.user(user_id.as_deref().unwrap_or(""))
    });
    shard.webhook(&key, WebhookEventType::ClientEvent, || Event::ClientEvent {
        channel: channel.to_string(),
        event: event.to_string(),
        data_literal: literal,
        socket_id: shard.node().socket_id(conn.id),
        // Members of presence channels only; the server's record, never the payload's.
        user_id: user_id.map(String::from),
    });
    // Client events are never cached (§3.8).
    shard.publish(Publication {
        key,
        frame: Arc::from(frame),
        except: Some(conn.id),
        except_elsewhere: None,
        cache: false,
        ticket: None,
    });
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
