//! Signed-in users (reference §2.5, §3.7, §5.9): `pusher:signin`, delivery to
//! `#server-to-user-{id}`, watchlists and terminating a user's connections.
//!
//! A user is the channel `#server-to-user-{id}`: its subscribers are the connections signed in as
//! that user. The user's home shard therefore counts their connections like any channel's, a
//! `sendToUser` is a plain publish to that channel, and the first/last connection is the user's
//! online/offline moment for the watchers registered on the same home.

use super::conn::Conn;
use super::messages::{JoinRequest, ShardMsg};
use super::Shard;
use crate::channels::ChannelKey;
use crate::protocol::codes;
use crate::protocol::events::{self, SigninData};
use std::rc::Rc;

pub struct SignedIn {
    pub id: Box<str>,
    /// Compact JSON of `user_info` (`null` when absent): the member data of presence channels
    /// joined without `channel_data`.
    pub info: Box<str>,
    /// The home shard has counted the connection and `signin_success` went out.
    pub confirmed: bool,
    /// The exact `user_data`, echoed in `signin_success` once the home shard has answered.
    user_data: Option<Box<str>>,
    /// Watched user ids with their last known status.
    watchlist: Vec<(Box<str>, bool)>,
    /// Watch replies still missing before the first `watchlist_events` can go out.
    watch_pending: usize,
    /// The client's watchlist was longer than the limit (error 4302 after the sign-in).
    watchlist_truncated: bool,
}

impl SignedIn {
    /// The user id, once the sign-in is complete.
    pub fn confirmed_id(&self) -> Option<&str> {
        self.confirmed.then_some(&*self.id)
    }
}

/// Handles `pusher:signin`. Errors carry code 4009 and never close the connection (§2.5).
pub fn signin(shard: &Shard, conn: &Conn, data: Option<SigninData>) {
    let max = shard.max_queued();
    let fail = |message: &str| {
        conn.send_vec(events::error(Some(codes::UNAUTHORIZED), message), max);
    };
    let app = shard.shared.app(conn.app);
    if !app.enable_user_authentication {
        return fail("User authentication is not enabled for this app");
    }
    let Some(SigninData {
        auth,
        user_data: Some(user_data),
    }) = data
    else {
        return fail("pusher:signin needs data with auth and user_data");
    };
    let socket_id = shard.shared.socket_id(conn.id);
    let to_sign = format!("{socket_id}::user::{user_data}");
    let token = auth.as_deref().unwrap_or("");
    if let Err(message) = crate::auth::verify_token(&app.key, &app.secret, token, &to_sign) {
        return fail(&message);
    }
    let user = match events::parse_user_data(&user_data) {
        Ok(user) => user,
        Err(message) => return fail(message),
    };
    if !app.user_id_fits(&user.id) {
        let limit = app.max_user_id_length;
        return fail(&format!("User id is longer than {limit} characters"));
    }
    match conn.user.borrow().as_deref() {
        // Signing in again as the same user: answer again, change nothing.
        Some(current) if *current.id == *user.id => {
            if current.confirmed {
                conn.send_vec(events::signin_success(&user_data), max);
            }
            return;
        }
        Some(_) => return fail("The connection is already signed in as a different user"),
        None => {}
    }
    let mut watchlist: Vec<(Box<str>, bool)> = Vec::new();
    let mut watchlist_truncated = false;
    if app.enable_watchlist_events {
        for id in user.watchlist {
            if watchlist.iter().any(|(w, _)| **w == *id) {
                continue;
            }
            if watchlist.len() == app.max_watchlist_size as usize {
                watchlist_truncated = true;
                break;
            }
            watchlist.push((id.into(), false));
        }
    }
    let key = ChannelKey::user(conn.app, &user.id);
    *conn.user.borrow_mut() = Some(Box::new(SignedIn {
        id: user.id.into(),
        info: user.info.into(),
        confirmed: false,
        user_data: Some(user_data.into()),
        watchlist,
        watch_pending: 0,
        watchlist_truncated,
    }));
    shard.join(JoinRequest {
        key,
        origin: shard.id,
        conn: conn.id,
        member: None,
        max_members: 0,
        repeat: false,
    });
}

impl Shard {
    /// The user's home counted the connection: confirm the sign-in, start receiving the user's
    /// events, and register the watchlist with each watched user's home.
    pub(super) fn on_signin_reply(&self, key: ChannelKey, conn_id: u64, ok: bool) {
        let conn = self.conns.borrow().get(&conn_id).cloned();
        let Some(conn) = conn.filter(|c| !c.is_closing()) else {
            if ok {
                self.leave(key, None);
            }
            return;
        };
        let max = self.max_queued();
        let watched: Vec<ChannelKey> = {
            let mut slot = conn.user.borrow_mut();
            let Some(user) = slot.as_mut().filter(|u| !u.confirmed) else {
                return;
            };
            user.confirmed = true;
            let user_data = user.user_data.take().unwrap_or_default();
            conn.send_vec(events::signin_success(&user_data), max);
            if user.watchlist_truncated {
                let limit = self.shared.app(conn.app).max_watchlist_size;
                let message =
                    format!("Watchlist too long: only its first {limit} user ids are watched");
                conn.send_vec(
                    events::error(Some(codes::WATCHLIST_TOO_LONG), &message),
                    max,
                );
            }
            user.watch_pending = user.watchlist.len();
            user.watchlist
                .iter()
                .map(|(id, _)| ChannelKey::user(conn.app, id))
                .collect()
        };
        conn.authorized.set(true);
        self.local.borrow_mut().add(key, conn.clone());
        // The user borrow is released: a watched user homed here is answered synchronously.
        for watched in watched {
            self.watching
                .borrow_mut()
                .add(watched.clone(), conn.clone());
            let home = watched.home(self.shared.shards);
            let msg = ShardMsg::Watch {
                key: watched,
                origin: self.id,
                conn: conn.id,
            };
            self.route(home, msg);
        }
    }

    pub(super) fn on_watch_reply(&self, key: &ChannelKey, conn_id: u64, online: bool) {
        let conn = self.conns.borrow().get(&conn_id).cloned();
        if let Some(conn) = conn {
            if note_status(&conn, key, online, true) {
                self.send_watch_snapshot(&conn);
            }
        }
    }

    /// A watched user came online or went offline: tell this shard's watchers (those still
    /// waiting for their first snapshot just record it).
    pub(super) fn on_user_status(&self, key: &ChannelKey, online: bool) {
        let Some(user_id) = key.user_id() else {
            return;
        };
        let watchers: Vec<Rc<Conn>> = self.watching.borrow().subscribers(key).to_vec();
        if watchers.is_empty() {
            return;
        }
        let (on, off) = if online {
            (Some(user_id), None)
        } else {
            (None, Some(user_id))
        };
        let frame: Rc<[u8]> = Rc::from(events::watchlist_events(on.into_iter(), off.into_iter()));
        let max = self.max_queued();
        for conn in watchers {
            let waiting = conn
                .user
                .borrow()
                .as_ref()
                .is_some_and(|u| u.watch_pending > 0);
            if waiting {
                note_status(&conn, key, online, false);
            } else {
                conn.send(frame.clone(), max);
            }
        }
    }

    fn send_watch_snapshot(&self, conn: &Conn) {
        let frame = {
            let user = conn.user.borrow();
            let Some(user) = user.as_ref() else {
                return;
            };
            let online = user.watchlist.iter().filter(|(_, on)| *on);
            let offline = user.watchlist.iter().filter(|(_, on)| !*on);
            events::watchlist_events(online.map(|(id, _)| &**id), offline.map(|(id, _)| &**id))
        };
        conn.send_vec(frame, self.max_queued());
    }

    /// `POST .../users/{id}/terminate_connections`: the user's home closes them on every shard.
    pub fn terminate_user(&self, key: ChannelKey) {
        let home = key.home(self.shared.shards);
        self.route(home, ShardMsg::Terminate { key });
    }

    pub(super) fn close_user_local(&self, key: &ChannelKey) {
        let now = self.now_secs();
        for conn in self.local.borrow().subscribers(key) {
            conn.close_now(codes::UNAUTHORIZED, "You got disconnected by the app", now);
        }
    }

    /// On disconnect: drop the connection's watches, then uncount it (which may announce the
    /// user offline to the remaining watchers).
    pub(super) fn sign_out(&self, conn: &Conn) {
        let Some(user) = conn.user.borrow_mut().take() else {
            return;
        };
        // An unconfirmed sign-in is undone when its reply finds the connection gone.
        if !user.confirmed {
            return;
        }
        for (id, _) in user.watchlist.iter() {
            let watched = ChannelKey::user(conn.app, id);
            self.watching.borrow_mut().remove(&watched, conn);
            let home = watched.home(self.shared.shards);
            let msg = ShardMsg::Unwatch {
                key: watched,
                origin: self.id,
            };
            self.route(home, msg);
        }
        let key = ChannelKey::user(conn.app, &user.id);
        self.local.borrow_mut().remove(&key, conn);
        self.leave(key, None);
    }
}

/// Records a watched user's status for a connection still collecting its first snapshot; a
/// `reply` also counts as one of the awaited answers. Returns true when it was the last one.
fn note_status(conn: &Conn, key: &ChannelKey, online: bool, reply: bool) -> bool {
    let mut user = conn.user.borrow_mut();
    let (Some(user), Some(id)) = (user.as_mut(), key.user_id()) else {
        return false;
    };
    if user.watch_pending == 0 {
        return false;
    }
    if let Some(entry) = user.watchlist.iter_mut().find(|(w, _)| **w == *id) {
        entry.1 = online;
    }
    if reply {
        user.watch_pending -= 1;
    }
    reply && user.watch_pending == 0
}
