//! The debug console (`console = true`): a page at `/console` for one app at a time, like
//! Pusher's: live connection and channel counts, a live log of the app's events on this node
//! (`crate::feed`), and a form that sends a test event. The page signs its requests in the
//! browser with the app's key and secret, exactly as the HTTP API is signed, so there is no new
//! secret to manage and the secret never leaves the browser.

use crate::feed::{Console, Note};
use crate::http::api::Reply;
use crate::http::signature::{get, Query};
use crate::http::ApiError;
use crate::metrics::ShardMetrics;
use crate::shard::Node;
use serde::Serialize;
use std::sync::atomic::Ordering;

const PAGE: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");

/// What a feed request gets: the app's counts on this node and its new notes.
#[derive(Serialize)]
struct Feed {
    connections: u64,
    channels: i64,
    subscriptions: i64,
    presence_members: i64,
    events: Vec<Note>,
    next: u64,
    not_shown: u64,
}

/// Answers the console's paths (`/console...`) when the console is on; None otherwise, or for
/// other paths. `authenticate` checks a signed request against the app's key and secret.
pub fn serve(
    node: &Node,
    method: &str,
    path: &str,
    params: &Query,
    authenticate: impl FnOnce(u32, &str) -> Result<(), ApiError>,
) -> Option<Result<Reply, ApiError>> {
    let console = node.console.as_ref()?;
    let rest = path.strip_prefix("/console")?;
    let file = |content_type, body: &str| {
        Some(Ok(Reply {
            status: 200,
            content_type,
            body: body.to_owned(),
        }))
    };
    let segments: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        ("GET", [""]) => file("text/html; charset=utf-8", PAGE),
        ("GET", ["console.js"]) => file("text/javascript; charset=utf-8", SCRIPT),
        ("GET", ["console.css"]) => file("text/css; charset=utf-8", STYLE),
        ("GET", ["apps", app_id, "feed"]) => {
            Some(feed(node, console, app_id, path, params, authenticate))
        }
        _ => Some(Err(ApiError::new(404, format!("Not found: {path}")))),
    }
}

fn feed(
    node: &Node,
    console: &Console,
    app_id: &str,
    path: &str,
    params: &Query,
    authenticate: impl FnOnce(u32, &str) -> Result<(), ApiError>,
) -> Result<Reply, ApiError> {
    let app_id = crate::http::signature::percent_decode(app_id);
    let Some(app) = node.app_by_id(&app_id) else {
        return Err(ApiError::new(404, format!("Unknown app {app_id}")));
    };
    // A removed app's slot reads as disabled (and has no credentials to check).
    if !node.app(app).enabled {
        return Err(ApiError::new(403, "Application disabled"));
    }
    authenticate(app, path)?;
    let since = get(params, "since")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (events, next) = console.read(app, since);
    let slot = app as usize;
    let sum = |pick| ShardMetrics::app_total(&node.metrics, pick, slot);
    let feed = Feed {
        connections: node.app_connections[slot].load(Ordering::Relaxed).into(),
        channels: sum(|m| &m.channels),
        subscriptions: sum(|m| &m.subscriptions),
        presence_members: sum(|m| &m.presence_members),
        events,
        next,
        not_shown: console.not_shown.load(Ordering::Relaxed),
    };
    Ok(Reply {
        status: 200,
        content_type: "application/json",
        body: sonic_rs::to_string(&feed).unwrap_or_else(|_| "{}".into()),
    })
}
