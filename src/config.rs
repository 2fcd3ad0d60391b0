//! Configuration: defaults < TOML file (`--config`) < environment (`SHARDPUSH_*`) < command line.
//! Every error names where the bad value came from, the key and the reason.

use serde::Deserialize;
use std::fmt;

/// The server's whole configuration, built once by `Config::load` at startup and shared
/// read-only by every shard. Field names are the TOML keys; unknown keys are an error.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Listen address (WebSocket and HTTP API on one port).
    pub host: String,
    /// Listen port for WebSocket and the HTTP API; 0 = any free port.
    pub port: u16,
    /// Optional second port that serves only the HTTP API.
    pub api_port: Option<u16>,
    /// What this node serves: WebSocket clients and the HTTP API (`all`), or in a cluster only
    /// one of them (`websocket`, `api`).
    pub role: Role,
    /// Number of shards (executor threads); 0 = one per available CPU.
    pub shards: usize,
    /// Seconds of client silence before the server pings; sent to clients in the handshake.
    pub activity_timeout: u32,
    /// Seconds to wait for any reply to a ping before closing with 4201.
    pub pong_timeout: u32,
    /// Outbound bytes queued for one connection before it is closed with 4100 as a slow consumer.
    pub max_outbound_queue_bytes: usize,
    /// Largest WebSocket message accepted from a client; larger ones are discarded with an error.
    pub max_ws_message_bytes: usize,
    /// Largest HTTP request body; larger requests get 413.
    pub max_request_body_bytes: usize,
    /// Seconds an HTTP keep-alive connection may wait for its next request.
    pub http_keep_alive_timeout: u32,
    /// Connections the whole server accepts before answering 4100 "Over capacity"; 0 = no limit.
    pub max_connections: usize,
    /// Seconds from accept by which the first request (an HTTP request with its body, or a
    /// WebSocket upgrade) must have arrived in full; slower sockets are closed.
    pub request_timeout: u32,
    /// Sockets accepted but not yet past their first request head; beyond, new ones get 503.
    pub max_pending_connections: usize,
    /// Bytes of incomplete WebSocket messages held for all connections together; beyond, the
    /// connections that have held one longest are closed with 1008.
    pub max_partial_message_bytes: usize,
    /// Accept connections that send no `protocol` parameter (treated as 7). Strict mode answers
    /// 4008.
    pub allow_missing_protocol: bool,
    /// The apps served (`[[apps]]` tables); with none configured, the development app `DEV_APP`.
    pub apps: Vec<AppConfig>,
    /// Run as one node of a cluster through Redis (`[cluster]`); None: a single node.
    pub cluster: Option<ClusterConfig>,
    /// How webhooks are delivered (`[webhooks]`); which webhooks each app has is per app.
    pub webhooks: WebhooksConfig,
    /// Port of the operations listener: Prometheus metrics (`/metrics`), `/up` and `/ready`;
    /// None: not served.
    pub metrics_port: Option<u16>,
    /// Address the operations listener binds (loopback unless asked otherwise).
    pub metrics_host: String,
    /// Seconds over which a shutdown closes the connections (4200), spread evenly, so that the
    /// clients do not all reconnect to the remaining nodes at once; 0: all at once.
    pub shutdown_grace_period: u32,
    /// `/ready` answers 503 while the process's resident memory is above this many MiB, so that
    /// a load balancer sends new clients elsewhere; 0: no limit.
    pub ready_memory_limit_mb: u64,
    /// PEM file of the certificate chain for `wss://` and `https://` on the main port (and the
    /// API port); with `tls_key`. Empty: plain TCP.
    pub tls_cert: String,
    /// PEM file of the certificate's private key.
    pub tls_key: String,
    /// Serve the debug console at `/console` (signed in the browser with an app's key and
    /// secret).
    pub console: bool,
    /// The command-line options it was loaded with (the file among them): a reload loads
    /// again with the same.
    #[serde(skip)]
    pub loaded_with: Cli,
    /// No app was configured, so the development app was added.
    #[serde(skip)]
    pub dev_app_fallback: bool,
}

/// What a node serves (`role`, `--role`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// WebSocket clients and the HTTP API.
    #[default]
    All,
    /// WebSocket clients only (a cluster node; the HTTP API is served by other nodes).
    Websocket,
    /// The HTTP API only (a cluster node publishing through Redis and answering from the
    /// cluster's state).
    Api,
}

impl Role {
    fn parse(source: &str, key: &str, value: &str) -> Result<Role, ConfigError> {
        match value {
            "all" => Ok(Role::All),
            "websocket" => Ok(Role::Websocket),
            "api" => Ok(Role::Api),
            _ => Err(err(
                source,
                key,
                format!("'{value}' is not one of all, websocket, api"),
            )),
        }
    }

    /// Serves WebSocket clients.
    pub fn serves_websocket(self) -> bool {
        self != Role::Api
    }

    /// Serves the HTTP API.
    pub fn serves_api(self) -> bool {
        self != Role::Websocket
    }
}

/// The `[cluster]` table: the Redis server the nodes meet on and how they watch each other.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub redis_url: String,
    /// This node's name in the cluster; generated (unique per start) when empty.
    pub node_id: String,
    /// Prefix of every Redis key and topic, so several deployments can share one Redis.
    pub prefix: String,
    /// Seconds between a node's heartbeats.
    pub heartbeat_interval: u32,
    /// Seconds without a heartbeat after which the other nodes count a node as dead.
    pub node_timeout: u32,
    /// Messages a shard keeps for Redis while it is away or slow; beyond, publishes are refused.
    pub max_queued_messages: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            redis_url: String::new(),
            node_id: String::new(),
            prefix: "shardpush".into(),
            heartbeat_interval: 2,
            node_timeout: 10,
            max_queued_messages: 10_000,
        }
    }
}

/// One app's credentials, switches and limits (an `[[apps]]` table). Each WebSocket connection
/// and each HTTP API request is for one app, found by key or id.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AppConfig {
    /// Identifies the app in HTTP API paths (`/apps/{id}/...`).
    pub id: String,
    /// Public key: in WebSocket paths (`/app/{key}`) and before the `:` of client auth tokens.
    pub key: String,
    /// Signs client auth tokens and HTTP API requests; never sent anywhere.
    pub secret: String,
    /// When off, WebSocket connections are refused with 4003 and HTTP API requests with 403.
    pub enabled: bool,
    /// Concurrent connections for this app; 0 = no limit.
    pub max_connections: u32,
    /// Accept `client-*` events from connections (on private and presence channels).
    pub enable_client_messages: bool,
    /// Client events one connection may send per second; beyond, they are refused with 4301.
    pub max_client_events_per_second: u32,
    /// Distinct users a presence channel may hold; a new user beyond it is refused.
    pub max_presence_members: u32,
    /// Largest `user_info` of one presence member, in bytes.
    pub max_presence_member_size_bytes: u32,
    /// Largest event `data` in bytes, from the HTTP API or a client event.
    pub max_event_payload_bytes: u32,
    /// Longest channel name in characters (1-200).
    pub max_channel_name_length: u32,
    /// Longest event name in bytes, for HTTP and client events.
    pub max_event_name_length: u32,
    /// Channels one HTTP publish may name.
    pub max_event_channels_at_once: u32,
    /// Events in one HTTP batch publish (`/batch_events`).
    pub max_event_batch_size: u32,
    /// `pusher:signin` (user authentication, `#server-to-user-` events, terminate).
    pub enable_user_authentication: bool,
    /// `pusher_internal:watchlist_events` for the `watchlist` in sign-in user data.
    pub enable_watchlist_events: bool,
    /// Ids taken from a sign-in watchlist; the rest are dropped with error 4302.
    pub max_watchlist_size: u32,
    /// `pusher_internal:subscription_count` on every (un)subscribe of a non-presence channel.
    pub enable_subscription_count: bool,
    /// Close (4009) connections that neither sign in nor join a private/presence channel in time.
    pub enable_authorized_connections: bool,
    /// Seconds an unauthorized connection may stay open when the switch above is on.
    pub authorization_timeout: u32,
    /// Seconds a cache channel keeps its last HTTP event.
    pub cache_ttl: u32,
    /// Longest user id (presence `user_id`, sign-in `id`) in characters.
    pub max_user_id_length: u32,
    /// Channels one connection may be subscribed to (or be subscribing to) at once.
    pub max_subscriptions_per_connection: u32,
    /// Webhooks may carry several events per request (gathered for `[webhooks]
    /// batch_window_ms`); off: one event per request, as Pusher sends them.
    pub batch_webhooks: bool,
    /// The app's webhooks (`[[apps.webhooks]]` tables).
    pub webhooks: Vec<WebhookConfig>,
    /// In a cluster: every event a webhook could report, and every HTTP API publish, is also
    /// appended to the Redis stream `{prefix}:events:{app_id}` for consumers of one's own.
    pub event_stream: bool,
    /// Entries the event stream keeps (about: Redis trims whole blocks), the oldest go first.
    pub event_stream_length: u32,
}

/// One webhook of an app: where to send which events.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://` address the events are POSTed to.
    pub url: String,
    /// The events sent.
    pub event_types: Vec<WebhookEventType>,
    /// Only events of channels whose names match.
    pub filter: WebhookFilter,
    /// Extra request headers (never `X-Pusher-*`, `Content-Type` or the id header).
    pub headers: std::collections::BTreeMap<String, String>,
}

/// The request header that carries a webhook's id, the same on every attempt, so a receiver
/// can tell a retry from a new webhook.
pub const WEBHOOK_ID_HEADER: &str = "X-Shardpush-Webhook-Id";

/// The kinds of webhook events (TOML names as in Pusher's webhooks).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WebhookEventType {
    /// A channel got its first subscriber.
    ChannelOccupied,
    /// A channel lost its last subscriber (sent 3 s later, if it stayed empty).
    ChannelVacated,
    /// A user's first connection joined a presence channel.
    MemberAdded,
    /// A user's last connection left a presence channel (sent 3 s later, if not back).
    MemberRemoved,
    /// A client sent a `client-*` event.
    ClientEvent,
    /// A client subscribed to a cache channel with no cached event.
    CacheMiss,
    /// A channel's subscription count changed (apps with `enable_subscription_count`).
    SubscriptionCount,
}

impl WebhookEventType {
    /// Its bit in a set of event types.
    pub fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A webhook's channel-name filter; an empty part matches every name.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookFilter {
    /// The channel name starts with this.
    pub channel_name_starts_with: String,
    /// The channel name ends with this.
    pub channel_name_ends_with: String,
}

/// The `[webhooks]` table: how every app's webhooks are delivered.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Threads sending requests (a request waits for its answer on one of them).
    pub workers: usize,
    /// Seconds one attempt may take, connecting included.
    pub request_timeout: u32,
    /// Seconds after its creation (`time_ms`) during which a failed webhook is retried.
    pub retry_for: u32,
    /// Requests of one app waiting for an answer at once (so that one app's slow receiver
    /// leaves the other workers to the other apps).
    pub max_in_flight_per_app: usize,
    /// Events held in memory for delivery (waiting, retrying, or in the 3 s delay); beyond,
    /// new events are dropped, counted and logged.
    pub max_pending: usize,
    /// Apps with `batch_webhooks`: milliseconds events gather before their request goes.
    pub batch_window_ms: u32,
    /// Apps with `batch_webhooks`: events in one request at most.
    pub batch_max_events: usize,
    /// Seconds during which a channel's repeated cache misses make one `cache_miss` webhook.
    pub cache_miss_window: u32,
    /// PEM file of CA certificates trusted for `https://` webhooks besides the public roots.
    pub ca_file: String,
    /// In a cluster: events an app's webhook queue in Redis may hold; beyond, new events are
    /// counted (in Redis) and logged, not queued.
    pub max_pending_in_redis: u32,
    /// In a cluster: seconds after which a webhook held by a node that stopped renewing its
    /// hold (it died) is taken over by another node.
    pub claim_after: u32,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            workers: 16,
            request_timeout: 10,
            retry_for: 300,
            max_in_flight_per_app: 4,
            max_pending: 100_000,
            batch_window_ms: 50,
            batch_max_events: 100,
            cache_miss_window: 5,
            ca_file: String::new(),
            max_pending_in_redis: 1_000_000,
            claim_after: 30,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host: "0.0.0.0".into(),
            port: 6001,
            api_port: None,
            role: Role::All,
            shards: 0,
            activity_timeout: 120,
            pong_timeout: 30,
            max_outbound_queue_bytes: 1 << 20,
            max_ws_message_bytes: 64 * 1024,
            max_request_body_bytes: 1 << 20,
            http_keep_alive_timeout: 30,
            max_connections: 0,
            request_timeout: 10,
            max_pending_connections: 1024,
            max_partial_message_bytes: 64 << 20,
            allow_missing_protocol: true,
            apps: Vec::new(),
            cluster: None,
            webhooks: WebhooksConfig::default(),
            metrics_port: None,
            metrics_host: "127.0.0.1".into(),
            shutdown_grace_period: 3,
            ready_memory_limit_mb: 0,
            tls_cert: String::new(),
            tls_key: String::new(),
            console: false,
            loaded_with: Cli::default(),
            dev_app_fallback: false,
        }
    }
}

impl AppConfig {
    /// Whether a user id (sign-in `id`, presence `user_id`, terminate path) is within the limit.
    pub fn user_id_fits(&self, id: &str) -> bool {
        id.chars().count() <= self.max_user_id_length as usize
    }
}

impl Default for AppConfig {
    fn default() -> Self {
        AppConfig {
            id: String::new(),
            key: String::new(),
            secret: String::new(),
            enabled: true,
            max_connections: 0,
            enable_client_messages: false,
            max_client_events_per_second: 10,
            max_presence_members: 100,
            max_presence_member_size_bytes: 1024,
            max_event_payload_bytes: 10 * 1024,
            max_channel_name_length: 164,
            max_event_name_length: 200,
            max_event_channels_at_once: 100,
            max_event_batch_size: 10,
            enable_user_authentication: true,
            enable_watchlist_events: false,
            max_watchlist_size: 100,
            enable_subscription_count: false,
            enable_authorized_connections: false,
            authorization_timeout: 30,
            cache_ttl: 1800,
            max_user_id_length: 128,
            max_subscriptions_per_connection: 256,
            batch_webhooks: false,
            webhooks: Vec::new(),
            event_stream: false,
            event_stream_length: 100_000,
        }
    }
}

/// A configuration problem: where it came from, which key, and why.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// "command line", "environment", or the configuration file's path.
    pub source: String,
    /// The offending key, option or variable (for TOML syntax errors, the line).
    pub key: String,
    /// What is wrong with its value.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "configuration error in {}: {}: {}",
            self.source, self.key, self.reason
        )
    }
}

impl ClusterConfig {
    fn validate(&self, source: &str) -> Result<(), ConfigError> {
        use redis::IntoConnectionInfo;
        let key = |field: &str| format!("cluster.{field}");
        if self.redis_url.is_empty() {
            return Err(err(source, &key("redis_url"), "is required in [cluster]"));
        }
        let info = self
            .redis_url
            .as_str()
            .into_connection_info()
            .map_err(|e| err(source, &key("redis_url"), format!("not a Redis URL: {e}")))?;
        if !matches!(info.addr(), redis::ConnectionAddr::Tcp(..)) {
            return Err(err(
                source,
                &key("redis_url"),
                "only redis:// (TCP, no TLS) is supported",
            ));
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
        if self.node_id.len() > 64 || !self.node_id.chars().all(allowed) {
            return Err(err(
                source,
                &key("node_id"),
                "at most 64 of A-Z, a-z, 0-9, '-', '_', '.'",
            ));
        }
        if self.prefix.is_empty() || self.prefix.contains(['{', '}', ' ']) {
            return Err(err(
                source,
                &key("prefix"),
                "must be non-empty, without braces or spaces",
            ));
        }
        if self.heartbeat_interval == 0 {
            return Err(err(
                source,
                &key("heartbeat_interval"),
                "must be at least 1 second",
            ));
        }
        // A heartbeat keeps a node alive for node_timeout less one interval: at least two
        // intervals, so that one late heartbeat never gets a live node taken for dead.
        if self.node_timeout < 3 * self.heartbeat_interval {
            return Err(err(
                source,
                &key("node_timeout"),
                "must be at least three times heartbeat_interval",
            ));
        }
        if self.max_queued_messages == 0 {
            return Err(err(
                source,
                &key("max_queued_messages"),
                "must be greater than 0",
            ));
        }
        Ok(())
    }
}

impl WebhookConfig {
    fn validate(
        &self,
        app: &AppConfig,
        source: &str,
        key: &dyn Fn(&str) -> String,
    ) -> Result<(), ConfigError> {
        let rest = (self.url.strip_prefix("http://"))
            .or_else(|| self.url.strip_prefix("https://"))
            .ok_or_else(|| err(source, &key("url"), "must start with http:// or https://"))?;
        let host = rest.split(['/', '?', '#']).next().unwrap_or("");
        if host.is_empty() || self.url.parse::<ureq::http::Uri>().is_err() {
            return Err(err(source, &key("url"), "is not a valid http(s) URL"));
        }
        if host.contains('@') {
            let reason = "must not carry credentials (user:password@): put them in headers";
            return Err(err(source, &key("url"), reason));
        }
        if self.event_types.is_empty() {
            return Err(err(
                source,
                &key("event_types"),
                "must name at least one event type",
            ));
        }
        if self
            .event_types
            .contains(&WebhookEventType::SubscriptionCount)
            && !app.enable_subscription_count
        {
            let reason = "subscription_count needs the app's enable_subscription_count = true";
            return Err(err(source, &key("event_types"), reason));
        }
        if self.event_types.contains(&WebhookEventType::ClientEvent) && !app.enable_client_messages
        {
            let reason = "client_event needs the app's enable_client_messages = true";
            return Err(err(source, &key("event_types"), reason));
        }
        for (name, value) in &self.headers {
            let at = key(&format!("headers.{name}"));
            let lower = name.to_ascii_lowercase();
            let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
            if name.is_empty() || !name.chars().all(token) {
                return Err(err(source, &at, "is not a valid header name"));
            }
            let reserved = [
                "content-type",
                "content-length",
                "host",
                "transfer-encoding",
            ];
            if lower.starts_with("x-pusher-")
                || lower == WEBHOOK_ID_HEADER.to_ascii_lowercase()
                || reserved.contains(&lower.as_str())
            {
                return Err(err(
                    source,
                    &at,
                    "is set by the server and cannot be replaced",
                ));
            }
            if value.chars().any(|c| c.is_control() && c != '\t') {
                return Err(err(source, &at, "must not contain control characters"));
            }
        }
        Ok(())
    }
}

impl WebhooksConfig {
    fn validate(&self, source: &str) -> Result<(), ConfigError> {
        let key = |field: &str| format!("webhooks.{field}");
        let positive = [
            ("workers", self.workers),
            ("request_timeout", self.request_timeout as usize),
            ("max_in_flight_per_app", self.max_in_flight_per_app),
            ("max_pending", self.max_pending),
            ("batch_max_events", self.batch_max_events),
            ("max_pending_in_redis", self.max_pending_in_redis as usize),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(err(source, &key(field), "must be greater than 0"));
            }
        }
        if self.workers > 1024 {
            return Err(err(source, &key("workers"), "must be at most 1024"));
        }
        if self.claim_after < 3 {
            return Err(err(
                source,
                &key("claim_after"),
                "must be at least 3 seconds",
            ));
        }
        if self.batch_max_events > 100 {
            // Each event's id goes in the request's id header (in a cluster).
            return Err(err(source, &key("batch_max_events"), "must be at most 100"));
        }
        if self.batch_window_ms > 10_000 {
            return Err(err(
                source,
                &key("batch_window_ms"),
                "must be at most 10000",
            ));
        }
        if !self.ca_file.is_empty() {
            read_ca_file(&self.ca_file).map_err(|reason| err(source, &key("ca_file"), reason))?;
        }
        Ok(())
    }
}

/// The CA certificates of a PEM file (for `[webhooks] ca_file`).
pub fn read_ca_file(path: &str) -> Result<Vec<ureq::tls::Certificate<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(ureq::tls::PemItem::Certificate(cert)) => certs.push(cert),
            Ok(_) => {}
            Err(e) => return Err(format!("{path} is not valid PEM: {e}")),
        }
    }
    if certs.is_empty() {
        return Err(format!("{path} holds no certificate"));
    }
    Ok(certs)
}

/// A node id unique per start: the host's name would repeat on a restart, so random bits.
fn generated_node_id() -> String {
    let mut buf = [0u8; 8];
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    let bits = if n == 8 {
        u64::from_ne_bytes(buf)
    } else {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        nanos ^ u64::from(std::process::id())
    };
    format!("node-{bits:016x}")
}

fn err(source: &str, key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        source: source.into(),
        key: key.into(),
        reason: reason.into(),
    }
}

/// Id, key and secret of the development app, served when no app is configured at all.
/// Public knowledge, so startup warns when it is the only app.
pub const DEV_APP: (&str, &str, &str) = ("app-id", "app-key", "app-secret");

/// The server's options on the command line (of `shardpush`, `shardpush serve` and
/// `shardpush check-config`; see `cli`). Each overrides its TOML key and environment variable,
/// which `Config::load` reads; the doc comments are the `--help` text.
#[derive(Clone, Debug, Default, PartialEq, clap::Args)]
pub struct Cli {
    /// TOML configuration file (README.md lists every key)
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config_file: Option<String>,
    /// Listen address [env: SHARDPUSH_HOST] [default: 0.0.0.0]
    #[arg(long, value_name = "ADDR")]
    pub host: Option<String>,
    /// Port for WebSocket and HTTP API; 0 = any free port [env: SHARDPUSH_PORT] [default: 6001]
    #[arg(short = 'p', long, value_name = "PORT")]
    pub port: Option<u16>,
    /// Also serve the HTTP API alone on this port
    #[arg(long, value_name = "PORT")]
    pub api_port: Option<u16>,
    /// Executor threads, one per core [env: SHARDPUSH_SHARDS] [default: available CPUs]
    #[arg(long, value_name = "N")]
    pub shards: Option<usize>,
    /// Run as one node of a cluster through Redis, e.g. redis://127.0.0.1:6379
    /// [env: SHARDPUSH_REDIS_URL]
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,
    /// all, websocket (clients only) or api (HTTP API only); the last two need a cluster
    /// [env: SHARDPUSH_ROLE] [default: all]
    #[arg(long, value_name = "ROLE")]
    pub role: Option<String>,
    /// Serve Prometheus /metrics, /up and /ready on this port (on metrics_host, default
    /// 127.0.0.1) [env: SHARDPUSH_METRICS_PORT]
    #[arg(long, value_name = "PORT")]
    pub metrics_port: Option<u16>,
}

fn parse_num<T: std::str::FromStr>(source: &str, key: &str, v: &str) -> Result<T, ConfigError> {
    v.trim()
        .parse()
        .map_err(|_| err(source, key, format!("'{v}' is not a valid number")))
}

impl Config {
    /// Builds the effective configuration. `env` is the process environment (injected for tests).
    pub fn load(cli: &Cli, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut config = match &cli.config_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| err(path, "(file)", format!("cannot read: {e}")))?;
                Config::from_toml(&text, path)?
            }
            None => Config::default(),
        };
        const ENV: &str = "environment";
        if let Some(v) = env("SHARDPUSH_HOST") {
            config.host = v;
        }
        if let Some(v) = env("SHARDPUSH_PORT") {
            config.port = parse_num(ENV, "SHARDPUSH_PORT", &v)?;
        }
        if let Some(v) = env("SHARDPUSH_SHARDS") {
            config.shards = parse_num(ENV, "SHARDPUSH_SHARDS", &v)?;
        }
        if let Some(v) = env("SHARDPUSH_ROLE") {
            config.role = Role::parse(ENV, "SHARDPUSH_ROLE", &v)?;
        }
        if let Some(v) = env("SHARDPUSH_METRICS_PORT") {
            config.metrics_port = Some(parse_num(ENV, "SHARDPUSH_METRICS_PORT", &v)?);
        }
        if let Some(url) = env("SHARDPUSH_REDIS_URL") {
            config
                .cluster
                .get_or_insert_with(ClusterConfig::default)
                .redis_url = url;
        }
        let env_app = (
            env("SHARDPUSH_APP_ID"),
            env("SHARDPUSH_APP_KEY"),
            env("SHARDPUSH_APP_SECRET"),
        );
        match env_app {
            (Some(id), Some(key), Some(secret)) => {
                config.apps.retain(|a| a.id != id);
                config.apps.push(AppConfig {
                    id,
                    key,
                    secret,
                    ..AppConfig::default()
                });
            }
            (None, None, None) => {}
            _ => {
                return Err(err(
                    ENV,
                    "SHARDPUSH_APP_ID/SHARDPUSH_APP_KEY/SHARDPUSH_APP_SECRET",
                    "set all three or none",
                ))
            }
        }
        if let Some(h) = &cli.host {
            config.host = h.clone();
        }
        if let Some(p) = cli.port {
            config.port = p;
        }
        if cli.api_port.is_some() {
            config.api_port = cli.api_port;
        }
        if let Some(s) = cli.shards {
            config.shards = s;
        }
        if let Some(url) = &cli.redis_url {
            config
                .cluster
                .get_or_insert_with(ClusterConfig::default)
                .redis_url = url.clone();
        }
        if let Some(role) = &cli.role {
            config.role = Role::parse("command line", "--role", role)?;
        }
        if cli.metrics_port.is_some() {
            config.metrics_port = cli.metrics_port;
        }
        if let Some(cluster) = config.cluster.as_mut().filter(|c| c.node_id.is_empty()) {
            cluster.node_id = generated_node_id();
        }
        if config.apps.is_empty() {
            let (id, key, secret) = DEV_APP;
            config.apps.push(AppConfig {
                id: id.into(),
                key: key.into(),
                secret: secret.into(),
                enable_client_messages: true,
                enable_watchlist_events: true,
                ..AppConfig::default()
            });
            config.dev_app_fallback = true;
        }
        config.validate(cli.config_file.as_deref().unwrap_or("configuration"))?;
        config.loaded_with = cli.clone();
        Ok(config)
    }

    /// Parses TOML text over the defaults (no validation; `load` does that). `source` names the
    /// file in errors, which give the line of the problem.
    pub fn from_toml(text: &str, source: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let message = e.message().to_owned();
            let at = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                    format!("line {line}")
                })
                .unwrap_or_else(|| "(document)".into());
            err(source, &at, message)
        })
    }

    fn validate(&self, source: &str) -> Result<(), ConfigError> {
        if self.activity_timeout == 0 {
            return Err(err(
                source,
                "activity_timeout",
                "must be at least 1 second (pusher-js rejects 0)",
            ));
        }
        if self.pong_timeout == 0 {
            return Err(err(source, "pong_timeout", "must be at least 1 second"));
        }
        if self.http_keep_alive_timeout == 0 {
            return Err(err(
                source,
                "http_keep_alive_timeout",
                "must be at least 1 second",
            ));
        }
        if self.request_timeout == 0 {
            return Err(err(source, "request_timeout", "must be at least 1 second"));
        }
        if self.max_pending_connections == 0 {
            return Err(err(
                source,
                "max_pending_connections",
                "must be greater than 0",
            ));
        }
        if self.max_partial_message_bytes < self.max_ws_message_bytes {
            return Err(err(
                source,
                "max_partial_message_bytes",
                "must be at least max_ws_message_bytes",
            ));
        }
        if self.tls_cert.is_empty() != self.tls_key.is_empty() {
            let (key, other) = match self.tls_cert.is_empty() {
                true => ("tls_cert", "tls_key"),
                false => ("tls_key", "tls_cert"),
            };
            return Err(err(source, key, format!("is needed with {other}")));
        }
        if !self.tls_cert.is_empty() {
            let certs =
                crate::tls::read_certs(&self.tls_cert).map_err(|e| err(source, "tls_cert", e))?;
            let key = crate::tls::read_key(&self.tls_key).map_err(|e| err(source, "tls_key", e))?;
            crate::tls::server_config(certs, key).map_err(|e| {
                let reason = format!("{} and {}: {e}", self.tls_key, self.tls_cert);
                err(source, "tls_key", reason)
            })?;
        }
        if self.shutdown_grace_period > 300 {
            return Err(err(
                source,
                "shutdown_grace_period",
                "must be at most 300 seconds",
            ));
        }
        if self.max_ws_message_bytes < 1024 {
            return Err(err(source, "max_ws_message_bytes", "must be at least 1024"));
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate(source)?;
        }
        if self.role != Role::All && self.cluster.is_none() {
            let reason = "websocket and api are roles of a cluster node: set [cluster] redis_url \
                          (or --redis-url)";
            return Err(err(source, "role", reason));
        }
        if self.max_outbound_queue_bytes < 64 * 1024 {
            return Err(err(
                source,
                "max_outbound_queue_bytes",
                "must be at least 65536",
            ));
        }
        for (i, app) in self.apps.iter().enumerate() {
            let key = |field: &str| format!("apps[{i}].{field}");
            for (field, value) in [("id", &app.id), ("key", &app.key), ("secret", &app.secret)] {
                if value.is_empty() {
                    return Err(err(
                        source,
                        &key(field),
                        "is required and must not be empty",
                    ));
                }
            }
            if app.key.contains(['/', '?', '#', ':']) {
                return Err(err(
                    source,
                    &key("key"),
                    "must not contain '/', '?', '#' or ':'",
                ));
            }
            if app.id.contains(['/', '?', '#']) {
                return Err(err(source, &key("id"), "must not contain '/', '?' or '#'"));
            }
            for (j, other) in self.apps.iter().enumerate().take(i) {
                if other.id == app.id {
                    return Err(err(
                        source,
                        &key("id"),
                        format!("duplicates apps[{j}].id '{}'", app.id),
                    ));
                }
                if other.key == app.key {
                    return Err(err(
                        source,
                        &key("key"),
                        format!("duplicates the key of apps[{j}]"),
                    ));
                }
            }
            let positive = [
                (
                    "max_client_events_per_second",
                    app.max_client_events_per_second,
                ),
                ("max_presence_members", app.max_presence_members),
                (
                    "max_presence_member_size_bytes",
                    app.max_presence_member_size_bytes,
                ),
                ("max_event_payload_bytes", app.max_event_payload_bytes),
                ("max_event_name_length", app.max_event_name_length),
                ("max_event_channels_at_once", app.max_event_channels_at_once),
                ("max_event_batch_size", app.max_event_batch_size),
                ("max_watchlist_size", app.max_watchlist_size),
                ("authorization_timeout", app.authorization_timeout),
                ("cache_ttl", app.cache_ttl),
                ("max_user_id_length", app.max_user_id_length),
                (
                    "max_subscriptions_per_connection",
                    app.max_subscriptions_per_connection,
                ),
            ];
            for (field, value) in positive {
                if value == 0 {
                    return Err(err(source, &key(field), "must be greater than 0"));
                }
            }
            if !(1..=200).contains(&app.max_channel_name_length) {
                return Err(err(
                    source,
                    &key("max_channel_name_length"),
                    "must be between 1 and 200",
                ));
            }
            for (j, hook) in app.webhooks.iter().enumerate() {
                let key = |field: &str| format!("apps[{i}].webhooks[{j}].{field}");
                hook.validate(app, source, &key)?;
            }
            if app.event_stream && self.cluster.is_none() {
                let reason = "the event stream is kept in Redis: set [cluster] redis_url";
                return Err(err(source, &key("event_stream"), reason));
            }
            if app.event_stream_length == 0 {
                return Err(err(
                    source,
                    &key("event_stream_length"),
                    "must be greater than 0",
                ));
            }
        }
        self.webhooks.validate(source)
    }

    /// The Redis connection settings of `[cluster] redis_url` (validated at load).
    pub fn redis(&self) -> Option<redis::ConnectionInfo> {
        use redis::IntoConnectionInfo;
        let cluster = self.cluster.as_ref()?;
        cluster.redis_url.as_str().into_connection_info().ok()
    }

    /// Whether the only app is the development app with its public secret, so startup can warn.
    pub fn is_dev_app_only(&self) -> bool {
        self.apps.len() == 1 && self.apps[0].id == DEV_APP.0 && self.apps[0].secret == DEV_APP.2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    /// The server options of a command line (clap, as `shardpush` parses them).
    #[derive(clap::Parser)]
    struct Line {
        #[command(flatten)]
        cli: Cli,
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        use clap::Parser;
        Line::try_parse_from(std::iter::once("shardpush").chain(args.iter().copied()))
            .map(|l| l.cli)
    }

    fn cli(args: &[&str]) -> Cli {
        parse(args).unwrap()
    }

    #[test]
    fn a_role_other_than_all_needs_a_cluster() {
        let no_env = |_: &str| None;
        let e = Config::load(&cli(&["--role", "api"]), &no_env).unwrap_err();
        assert_eq!(e.key, "role");
        let e = Config::load(&cli(&["--role", "both"]), &no_env).unwrap_err();
        assert_eq!(e.key, "--role");
        let args = cli(&["--role", "websocket", "--redis-url", "redis://127.0.0.1:1"]);
        assert_eq!(Config::load(&args, &no_env).unwrap().role, Role::Websocket);
        let env = |k: &str| (k == "SHARDPUSH_ROLE").then(|| "api".to_owned());
        let e = Config::load(&cli(&[]), &env).unwrap_err();
        assert_eq!(e.key, "role");
    }

    #[test]
    fn cluster_from_flag_env_or_file_with_a_generated_node_id() {
        let from_flag = Config::load(&cli(&["--redis-url", "redis://127.0.0.1:7000/2"]), &no_env);
        let cluster = from_flag.unwrap().cluster.unwrap();
        assert_eq!(cluster.redis_url, "redis://127.0.0.1:7000/2");
        assert!(cluster.node_id.starts_with("node-"));
        assert_eq!(
            (cluster.prefix.as_str(), cluster.node_timeout),
            ("shardpush", 10)
        );
        let env = |k: &str| (k == "SHARDPUSH_REDIS_URL").then(|| "redis://:pw@h:1".to_owned());
        let config = Config::load(&Cli::default(), &env).unwrap();
        let info = config.redis().unwrap();
        assert_eq!(info.redis_settings().password(), Some("pw"));
        let other = Config::load(&Cli::default(), &env)
            .unwrap()
            .cluster
            .unwrap();
        assert_ne!(
            config.cluster.unwrap().node_id,
            other.node_id,
            "unique per start"
        );
        let toml = "[cluster]\nredis_url = \"redis://r:6379\"\nnode_id = \"a-1\"\nprefix = \"p\"\n";
        let file = Config::from_toml(toml, "f.toml").unwrap();
        let cluster = file.cluster.unwrap();
        assert_eq!(
            (cluster.node_id.as_str(), cluster.prefix.as_str()),
            ("a-1", "p")
        );
        assert!(Config::load(&Cli::default(), &no_env)
            .unwrap()
            .cluster
            .is_none());
    }

    #[test]
    fn cluster_errors_name_the_key() {
        let bad_url = Config::load(&cli(&["--redis-url", "http://x"]), &no_env).unwrap_err();
        assert_eq!(bad_url.key, "cluster.redis_url");
        let toml = "[cluster]\nredis_url = \"redis://h\"\nnode_id = \"no spaces\"\n";
        let mut config = Config::from_toml(toml, "f.toml").unwrap();
        config.apps.push(AppConfig {
            id: "1".into(),
            key: "k".into(),
            secret: "s".into(),
            ..AppConfig::default()
        });
        let e = config.validate("f.toml").unwrap_err();
        assert_eq!(
            (e.source.as_str(), e.key.as_str()),
            ("f.toml", "cluster.node_id")
        );
    }

    #[test]
    fn defaults_serve_the_development_app() {
        let c = Config::load(&Cli::default(), &no_env).unwrap();
        assert_eq!(c.port, 6001);
        assert_eq!(c.apps.len(), 1);
        assert_eq!(c.apps[0].key, "app-key");
        assert!(c.is_dev_app_only());
        assert_eq!(c.activity_timeout, 120);
    }

    #[test]
    fn toml_apps_and_limits() {
        let c = Config::from_toml(
            "port = 7000\n[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\nmax_presence_members = 5\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.port, 7000);
        assert_eq!(c.apps[0].max_presence_members, 5);
        assert_eq!(c.apps[0].max_event_payload_bytes, 10240);
        assert_eq!(c.apps[0].max_channel_name_length, 164);
    }

    #[test]
    fn unknown_keys_and_bad_types_name_file_and_line() {
        let e = Config::from_toml("port = 1\nprot = 2\n", "x.toml").unwrap_err();
        assert_eq!(e.source, "x.toml");
        assert_eq!(e.key, "line 2");
        assert!(e.reason.contains("prot"), "{e}");
        let e = Config::from_toml("port = \"abc\"\n", "x.toml").unwrap_err();
        assert!(e.to_string().contains("x.toml"));
    }

    #[test]
    fn validation_names_the_key() {
        let mut c = Config::from_toml(
            "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"\"\n",
            "f.toml",
        )
        .unwrap();
        assert_eq!(c.validate("f.toml").unwrap_err().key, "apps[0].secret");
        c.apps[0].secret = "s".into();
        c.apps.push(c.apps[0].clone());
        assert_eq!(c.validate("f.toml").unwrap_err().key, "apps[1].id");
    }

    #[test]
    fn env_overrides_and_env_app() {
        let env = |k: &str| match k {
            "SHARDPUSH_PORT" => Some("7001".to_owned()),
            "SHARDPUSH_APP_ID" => Some("9".to_owned()),
            "SHARDPUSH_APP_KEY" => Some("kk".to_owned()),
            "SHARDPUSH_APP_SECRET" => Some("ss".to_owned()),
            _ => None,
        };
        let c = Config::load(&Cli::default(), &env).unwrap();
        assert_eq!(c.port, 7001);
        assert_eq!(c.apps.len(), 1);
        assert_eq!(c.apps[0].key, "kk");
        let partial = |k: &str| (k == "SHARDPUSH_APP_ID").then(|| "1".to_owned());
        assert!(Config::load(&Cli::default(), &partial).is_err());
        let bad = |k: &str| (k == "SHARDPUSH_PORT").then(|| "x".to_owned());
        assert_eq!(
            Config::load(&Cli::default(), &bad).unwrap_err().key,
            "SHARDPUSH_PORT"
        );
    }

    #[test]
    fn cli_flags() {
        let cli = cli(&[
            "--port",
            "0",
            "--shards=2",
            "-c",
            "f.toml",
            "--metrics-port=9",
        ]);
        assert_eq!(cli.port, Some(0));
        assert_eq!(cli.shards, Some(2));
        assert_eq!(cli.metrics_port, Some(9));
        assert_eq!(cli.config_file.as_deref(), Some("f.toml"));
        assert!(parse(&["--nope"]).is_err());
        assert!(parse(&["--port"]).is_err());
        let e = parse(&["--port", "x"]).unwrap_err();
        assert!(e.to_string().contains("--port"), "{e}");
    }
}
