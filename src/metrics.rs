//! Counters for the Prometheus endpoint. Each shard writes only its own `ShardMetrics`, found
//! through a thread-local: one writer per counter, so an increment is a plain load and store
//! (no locked read-modify-write) on cache lines no other shard writes. A scrape reads every
//! shard's counters and sums them (`crate::ops::exposition`).

use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// A monotonic counter with a single writer thread.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n` (only the owning thread calls this).
    #[inline]
    pub fn add(&self, n: u64) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.wrapping_add(n), Ordering::Relaxed);
    }

    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// The value, from any thread.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A gauge with a single writer thread; one shard's part of a sum, so it may be negative (a
/// subscription counted on one shard and uncounted on another never happens, but the sum
/// stays right if it did).
#[derive(Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Adds `n` (negative to lower it).
    #[inline]
    pub fn add(&self, n: i64) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.wrapping_add(n), Ordering::Relaxed);
    }

    /// Sets the value.
    #[inline]
    pub fn set(&self, n: i64) {
        self.0.store(n, Ordering::Relaxed);
    }

    /// The value, from any thread.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Close codes counted by name; every other code is counted as `other`.
pub const CLOSE_CODES: [u16; 21] = [
    1000, 1001, 1002, 1005, 1006, 1007, 1008, 1009, 1011, 4001, 4003, 4004, 4005, 4007, 4008, 4009,
    4100, 4200, 4201, 4301, 4302,
];
/// Slots of a by-close-code counter: the codes above, then `other`.
pub const CLOSE_SLOTS: usize = CLOSE_CODES.len() + 1;

/// The slot of `code` in a by-close-code counter.
pub fn close_slot(code: u16) -> usize {
    slot_in(&CLOSE_CODES, code)
}

/// The label of a by-close-code slot.
pub fn close_label(slot: usize) -> String {
    label_in(&CLOSE_CODES, slot)
}

/// The slot of `value` in a counter by the values of `named`: its place, or the last slot
/// (`other`) for a value not named.
fn slot_in(named: &[u16], value: u16) -> usize {
    named
        .iter()
        .position(|&v| v == value)
        .unwrap_or(named.len())
}

/// The label of a slot of a counter by the values of `named` (`other` for the last).
fn label_in(named: &[u16], slot: usize) -> String {
    named
        .get(slot)
        .map_or_else(|| "other".to_owned(), u16::to_string)
}

/// What an HTTP request asked for, as a bounded label (never the path itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// `POST /apps/{id}/events`.
    Events,
    /// `POST /apps/{id}/batch_events`.
    BatchEvents,
    /// `GET /apps/{id}/channels`.
    Channels,
    /// `GET /apps/{id}/channels/{name}`.
    Channel,
    /// `GET /apps/{id}/channels/{name}/users`.
    ChannelUsers,
    /// `POST .../users/{id}/terminate_connections`.
    TerminateConnections,
    /// The deprecated `POST /apps/{id}/channels/{name}/events` and `GET .../stats`.
    Deprecated,
    /// `/`, `/up`, `/health`, `/ready`.
    Health,
    /// The debug console's page and feed (`/console...`).
    Console,
    /// A WebSocket upgrade refused before the connection was admitted (a bad handshake).
    WebSocketUpgrade,
    /// Anything else (unknown paths, unreadable requests).
    Other,
}

impl Route {
    /// Every route, in slot order.
    pub const ALL: [Route; 11] = [
        Route::Events,
        Route::BatchEvents,
        Route::Channels,
        Route::Channel,
        Route::ChannelUsers,
        Route::TerminateConnections,
        Route::Deprecated,
        Route::Health,
        Route::Console,
        Route::WebSocketUpgrade,
        Route::Other,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Route::Events => "events",
            Route::BatchEvents => "batch_events",
            Route::Channels => "channels",
            Route::Channel => "channel",
            Route::ChannelUsers => "channel_users",
            Route::TerminateConnections => "terminate_connections",
            Route::Deprecated => "deprecated",
            Route::Health => "health",
            Route::Console => "console",
            Route::WebSocketUpgrade => "websocket_upgrade",
            Route::Other => "other",
        }
    }

    /// The route a request's method and path name (what the API would do with it).
    pub fn of(method: &str, path: &str) -> Route {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (method, segments.as_slice()) {
            (_, [""] | ["up"] | ["health"] | ["ready"]) => Route::Health,
            (_, ["console", ..]) => Route::Console,
            ("POST", ["apps", _, "events"]) => Route::Events,
            ("POST", ["apps", _, "batch_events"]) => Route::BatchEvents,
            ("GET", ["apps", _, "channels"]) => Route::Channels,
            ("GET", ["apps", _, "channels", _]) => Route::Channel,
            ("GET", ["apps", _, "channels", _, "users"]) => Route::ChannelUsers,
            ("POST", ["apps", _, "users", _, "terminate_connections"])
            | ("POST", ["users", _, "terminate_connections"]) => Route::TerminateConnections,
            ("POST", ["apps", _, "channels", _, "events"])
            | ("GET", ["apps", _, "channels", _, "stats"]) => Route::Deprecated,
            _ => Route::Other,
        }
    }
}

/// HTTP statuses counted by value; every other one is counted as `other`.
pub const STATUSES: [u16; 14] = [
    200, 400, 401, 403, 404, 405, 408, 411, 413, 426, 429, 431, 500, 503,
];
/// Slots of a by-status counter: the statuses above, then `other`.
pub const STATUS_SLOTS: usize = STATUSES.len() + 1;

/// The slot of `status` in a by-status counter.
pub fn status_slot(status: u16) -> usize {
    slot_in(&STATUSES, status)
}

/// The label of a by-status slot.
pub fn status_label(slot: usize) -> String {
    label_in(&STATUSES, slot)
}

/// One shard's counters and gauges (the process's are the sums over shards). Aligned so that
/// two shards' counters never share a cache line.
#[repr(align(128))]
pub struct ShardMetrics {
    /// WebSocket connections admitted.
    pub connections_opened: Counter,
    /// Admitted connections that ended, by the close code that ended them (the server's, or
    /// the client's when it closed first; 1006 when the TCP connection went without a close).
    pub connections_closed: [Counter; CLOSE_SLOTS],
    /// WebSocket upgrades refused at admission, by close code.
    pub connections_refused: [Counter; CLOSE_SLOTS],
    /// WebSocket messages received from clients (every kind).
    pub client_messages: Counter,
    /// Bytes read from WebSocket clients.
    pub bytes_received: Counter,
    /// `client-*` events accepted and passed on.
    pub client_events: Counter,
    /// `client-*` events refused by the per-connection rate limit.
    pub client_events_rate_limited: Counter,
    /// HTTP requests answered, by route and status.
    pub http_requests: [[Counter; STATUS_SLOTS]; Route::ALL.len()],
    /// Events accepted by the HTTP API (a batch counts each of its events; an event to several
    /// channels counts once).
    pub events_published: Counter,
    /// Frames queued for WebSocket connections (one per socket per message).
    pub frames_delivered: Counter,
    /// Bytes written to WebSocket connections (over TLS: the records, as sent).
    pub bytes_sent: Counter,
    /// TLS sockets given up before their handshake completed (not TLS, refused by rustls,
    /// closed or timed out first).
    pub tls_handshake_failures: Counter,
    /// Messages queued for other shards (and this one) and not yet handed over.
    pub mesh_queue_depth: Gauge,
    /// 1 while the shard's Redis link is connected (a cluster node).
    pub redis_link_up: Gauge,
    /// Times the shard's Redis link went down after having been up.
    pub redis_link_losses: Counter,
    /// Per app (index of `Config::apps`): confirmed subscriptions of this shard's connections.
    pub subscriptions: Box<[Gauge]>,
    /// Per app: channels homed on this shard with a subscriber on this node.
    pub channels: Box<[Gauge]>,
    /// Per app: distinct users in the presence channels homed on this shard, summed over the
    /// channels (a user in two channels counts twice), counting this node's members.
    pub presence_members: Box<[Gauge]>,
}

impl ShardMetrics {
    /// Zeroed metrics for a process serving `apps` apps.
    pub fn new(apps: usize) -> ShardMetrics {
        let per_app = || (0..apps).map(|_| Gauge::default()).collect();
        ShardMetrics {
            connections_opened: Counter::default(),
            connections_closed: Default::default(),
            connections_refused: Default::default(),
            client_messages: Counter::default(),
            bytes_received: Counter::default(),
            client_events: Counter::default(),
            client_events_rate_limited: Counter::default(),
            http_requests: Default::default(),
            events_published: Counter::default(),
            frames_delivered: Counter::default(),
            bytes_sent: Counter::default(),
            tls_handshake_failures: Counter::default(),
            mesh_queue_depth: Gauge::default(),
            redis_link_up: Gauge::default(),
            redis_link_losses: Counter::default(),
            subscriptions: per_app(),
            channels: per_app(),
            presence_members: per_app(),
        }
    }

    /// Counts an HTTP request answered with `status`.
    pub fn http_request(&self, route: Route, status: u16) {
        let r = Route::ALL.iter().position(|&x| x == route).unwrap_or(0);
        self.http_requests[r][status_slot(status)].inc();
    }

    /// The process's value of a per-app gauge (`pick` chooses which) for app slot `app`: the
    /// sum over `shards`, never below 0.
    pub fn app_total(
        shards: &[&ShardMetrics],
        pick: fn(&ShardMetrics) -> &[Gauge],
        app: usize,
    ) -> i64 {
        let sum: i64 = shards
            .iter()
            .map(|m| pick(m).get(app).map_or(0, Gauge::get))
            .sum();
        sum.max(0)
    }

    /// Adds `n` to app `app`'s entry of a per-app gauge (apps beyond the table are ignored).
    #[inline]
    pub fn app_gauge(gauges: &[Gauge], app: u32, n: i64) {
        if let Some(g) = gauges.get(app as usize) {
            g.add(n);
        }
    }
}

/// The process's resident memory (RSS), from `/proc/self/statm`.
pub fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// File descriptors the process has open (entries of `/proc/self/fd`).
pub fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

thread_local! {
    static HERE: Cell<Option<&'static ShardMetrics>> = const { Cell::new(None) };
}

/// Makes `metrics` the calling thread's (a shard's executor thread, once at its start).
pub fn enter(metrics: &'static ShardMetrics) {
    HERE.with(|h| h.set(Some(metrics)));
}

/// The calling shard's metrics. Threads that are not shards (and unit tests) get a scratch set
/// nobody reads.
#[inline]
pub fn here() -> &'static ShardMetrics {
    HERE.with(|h| match h.get() {
        Some(m) => m,
        None => {
            let scratch: &'static ShardMetrics = Box::leak(Box::new(ShardMetrics::new(0)));
            h.set(Some(scratch));
            scratch
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_slots() {
        assert_eq!(Route::of("POST", "/apps/1/events"), Route::Events);
        assert_eq!(
            Route::of("GET", "/apps/1/channels/a/users"),
            Route::ChannelUsers
        );
        assert_eq!(
            Route::of("POST", "/users/u/terminate_connections"),
            Route::TerminateConnections
        );
        assert_eq!(Route::of("GET", "/ready"), Route::Health);
        assert_eq!(Route::of("GET", "/apps/1/events"), Route::Other);
        assert_eq!(close_label(close_slot(4200)), "4200");
        assert_eq!(close_label(close_slot(3999)), "other");
        assert_eq!(status_label(status_slot(413)), "413");
        assert_eq!(status_label(status_slot(418)), "other");
    }

    #[test]
    fn one_writer_counters_add_up() {
        let m = ShardMetrics::new(2);
        m.frames_delivered.add(3);
        m.frames_delivered.inc();
        ShardMetrics::app_gauge(&m.subscriptions, 1, 2);
        ShardMetrics::app_gauge(&m.subscriptions, 1, -1);
        ShardMetrics::app_gauge(&m.subscriptions, 7, 1);
        m.http_request(Route::Events, 200);
        assert_eq!(m.frames_delivered.get(), 4);
        assert_eq!(m.subscriptions[1].get(), 1);
        assert_eq!(m.http_requests[0][0].get(), 1);
    }
}
