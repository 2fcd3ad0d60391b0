//! The sweeper: once a second, the shard's slow chores. Socket deadlines, close deadlines,
//! the authorization timeout, pings and pong timeouts, throttled subscription counts and the
//! cache purge. Polling once a second costs far less than a timer per socket.

use super::conn::ConnState;
use super::Shard;
use crate::protocol::{codes, ws};
use std::rc::Rc;
use std::time::Duration;

impl Shard {
    /// The sweeper task of the shard.
    pub(super) async fn sweep(self: Rc<Self>) {
        let mut tick = 0u32;
        loop {
            glommio::timer::sleep(Duration::from_millis(250)).await;
            tick += 1;
            if tick.is_multiple_of(4) {
                self.sweep_once();
            }
        }
    }

    fn sweep_once(&self) {
        self.home_tick();
        let now = self.now_secs();
        for deadline in self.deadlines.borrow().values() {
            deadline.expire_if_due(now);
        }
        let cfg = &self.node.config;
        let ping = Rc::<[u8]>::from(ws::encode_frame(ws::OP_PING, b""));
        // The authorization rule of the app looked up last (connections of one app are many).
        let mut rule: Option<(u32, bool, u32)> = None;
        for conn in self.conns.borrow().values() {
            match conn.state() {
                ConnState::Open => {}
                ConnState::Closing { deadline: None, .. } => {
                    conn.start_close_grace(now);
                    continue;
                }
                ConnState::Closing {
                    deadline: Some(deadline),
                    ..
                } => {
                    if now >= deadline {
                        conn.abort();
                    }
                    continue;
                }
                ConnState::Aborted => continue,
            }
            let now_some = Some(now);
            if !conn.authorized.get() {
                let (enforced, timeout) = match rule {
                    Some((app, enforced, timeout)) if app == conn.app => (enforced, timeout),
                    _ => {
                        let app = self.node.app(conn.app);
                        let found = (app.enable_authorized_connections, app.authorization_timeout);
                        rule = Some((conn.app, found.0, found.1));
                        found
                    }
                };
                if enforced && now.saturating_sub(conn.connected_at) >= timeout {
                    let reason = format!("Connection not authorized within {timeout} seconds");
                    conn.close_with_error(codes::AUTHORIZATION_TIMEOUT, &reason, now_some);
                    continue;
                }
            }
            match conn.ping_sent.get() {
                Some(sent) if now.saturating_sub(sent) >= cfg.pong_timeout => {
                    let reason = "Pong reply not received";
                    conn.close_with_error(codes::PONG_TIMEOUT, reason, now_some);
                }
                Some(_) => {}
                None if now.saturating_sub(conn.last_seen.get()) >= cfg.activity_timeout => {
                    conn.ping_sent.set(Some(now));
                    conn.send(ping.clone(), usize::MAX);
                }
                None => {}
            }
        }
        self.handle_own_messages();
    }
}
