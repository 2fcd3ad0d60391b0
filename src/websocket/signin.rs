//! `pusher:signin` (reference §2.5): the checks, in the reference's order, before the user's
//! home shard counts the connection (`Shard::sign_in`).

use crate::protocol::codes;
use crate::protocol::events::{self, SigninData};
use crate::shard::conn::Conn;
use crate::shard::users::SignedIn;
use crate::shard::Shard;

/// Handles `pusher:signin`. Errors carry code 4009 and never close the connection (§2.5).
pub fn signin(shard: &Shard, conn: &Conn, data: Option<SigninData>) {
    let max = shard.max_queued();
    let fail = |message: &str| {
        conn.send_vec(events::error(Some(codes::SIGNIN_REFUSED), message), max);
    };
    let app = shard.node().app(conn.app);
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
    let socket_id = shard.node().socket_id(conn.id);
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
    let mut watchlist: Vec<Box<str>> = Vec::new();
    let mut watchlist_truncated = false;
    if app.enable_watchlist_events {
        for id in user.watchlist {
            if watchlist.iter().any(|w| **w == *id) {
                continue;
            }
            if watchlist.len() == app.max_watchlist_size as usize {
                watchlist_truncated = true;
                break;
            }
            watchlist.push(id.into());
        }
    }
    let signed_in = SignedIn::new(
        &user.id,
        &user.info,
        &user_data,
        watchlist,
        watchlist_truncated,
    );
    shard.sign_in(conn, signed_in);
}
