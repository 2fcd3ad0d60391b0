//! The shard side of signed-in users (reference §2.5, §3.7, §5.9): confirming a sign-in,
//! watchlists, and terminating a user's connections. (`pusher:signin` itself is checked by the
//! WebSocket session, `websocket::signin`.)
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
use crate::protocol::events;
use std::rc::Rc;

/// The user a connection signed in as, kept on the connection (`Conn::user`).
pub struct SignedIn {
    /// The user id.
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
    /// A sign-in waiting for its home shard: `user_data` is echoed in `signin_success`, and
    /// `watchlist` (already cut to the app's limit; `truncated` says it was) is registered once
    /// the sign-in is confirmed.
    pub fn new(
        id: &str,
        info: &str,
        user_data: &str,
        watchlist: Vec<Box<str>>,
        truncated: bool,
    ) -> SignedIn {
        SignedIn {
            id: id.into(),
            info: info.into(),
            confirmed: false,
            user_data: Some(user_data.into()),
            watchlist: watchlist.into_iter().map(|id| (id, false)).collect(),
            watch_pending: 0,
            watchlist_truncated: truncated,
        }
    }

    /// The user id, once the sign-in is complete.
    pub fn confirmed_id(&self) -> Option<&str> {
        self.confirmed.then_some(&*self.id)
    }
}

impl Shard {
    /// Starts a sign-in the WebSocket session has verified: the user's home counts the
    /// connection, and its reply confirms the sign-in (`on_signin_reply`).
    pub fn sign_in(&self, conn: &Conn, user: SignedIn) {
        let key = ChannelKey::user(conn.app, &user.id);
        *conn.user.borrow_mut() = Some(Box::new(user));
        self.join(JoinRequest {
            key,
            origin: self.id,
            conn: conn.id,
            member: None,
            max_members: 0,
            duplicate: false,
        });
    }

    /// The user's home counted the connection: confirm the sign-in, start receiving the user's
    /// events, and register the watchlist with each watched user's home.
    pub(super) fn on_signin_reply(&self, key: ChannelKey, conn_id: u64, ok: bool) {
        let Some(conn) = self.conn(conn_id).filter(|c| !c.is_closing()) else {
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
                let limit = self.node.app(conn.app).max_watchlist_size;
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
        self.fanout.add(key, conn.clone());
        for watched in watched {
            self.watching.add(watched.clone(), conn.clone());
            let home = watched.home(self.node.shards);
            let msg = ShardMsg::Watch {
                key: watched,
                origin: self.id,
                conn: conn.id,
            };
            self.route(home, msg);
        }
    }

    /// A watched user's home registered the watch: once all have answered, the connection gets
    /// its first `watchlist_events`.
    pub(super) fn on_watch_reply(&self, key: &ChannelKey, conn_id: u64, online: bool) {
        if let Some(conn) = self.conn(conn_id) {
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
        let watchers: Vec<Rc<Conn>> = self.watching.subscribers(key);
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
    pub(super) fn terminate_user(&self, key: ChannelKey) {
        let home = key.home(self.node.shards);
        self.route(home, ShardMsg::Terminate { key });
    }

    /// Closes this shard's connections signed in as the user (4009).
    pub(super) fn close_user_local(&self, key: &ChannelKey) {
        let now = Some(self.now_secs());
        for conn in self.fanout.subscribers(key) {
            let reason = "You got disconnected by the app";
            conn.close_with_error(codes::USER_TERMINATED, reason, now);
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
            self.watching.remove(&watched, conn);
            let home = watched.home(self.node.shards);
            let msg = ShardMsg::Unwatch {
                key: watched,
                origin: self.id,
            };
            self.route(home, msg);
        }
        let key = ChannelKey::user(conn.app, &user.id);
        self.unsubscribe_confirmed(key, conn, None);
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
