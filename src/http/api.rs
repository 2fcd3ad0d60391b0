//! The signed Pusher HTTP API (reference §5): trigger, batch trigger, channel queries, user
//! termination. Requests are checked here; what they need from the channels comes from the
//! shard runtime's typed queries (`shard::queries`). Every refusal is an `ApiError`.

use super::signature::{self, get, parse_query, percent_decode, Query as Params};
use super::{ApiError, Head};
use crate::channels::ChannelKey;
use crate::config::AppConfig;
use crate::feed::Note;
use crate::protocol::channel::{is_cache_channel, validate_name, ChannelKind};
use crate::protocol::events::{self, Data};
use crate::protocol::json::{self, check_depth, str_literal, MAX_JSON_DEPTH};
use crate::shard::messages::{CachedEvent, ChannelStats, ClusterUnavailable, Publication};
use crate::shard::{Node, Shard};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize};
use sonic_rs::{JsonValueTrait, LazyValue};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// An answer to an HTTP request, before the status line and headers are added.
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// `Content-Type` of the body.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

impl From<ApiError> for Reply {
    fn from(error: ApiError) -> Reply {
        Reply {
            status: error.status,
            content_type: "application/json",
            body: error.body(),
        }
    }
}

/// A 200 with `value` as its JSON body.
fn ok<T: Serialize>(value: &T) -> Reply {
    Reply {
        status: 200,
        content_type: "application/json",
        body: sonic_rs::to_string(value).unwrap_or_else(|_| "{}".into()),
    }
}

/// The `{}` most successful requests answer with.
#[derive(Serialize)]
struct Empty {}

fn fail(status: u16, message: impl Into<String>) -> ApiError {
    ApiError::new(status, message)
}

impl From<ClusterUnavailable> for ApiError {
    fn from(_: ClusterUnavailable) -> ApiError {
        fail(
            503,
            "Redis is unavailable: cluster-wide channel information cannot be given right now",
        )
    }
}

/// What the API answers, whatever went wrong: the handler's result as a reply.
pub async fn handle(shard: &Shard, head: &Head, body: &[u8]) -> Reply {
    match route(shard, head, body).await {
        Ok(reply) => reply,
        Err(error) => error.into(),
    }
}

async fn route(shard: &Shard, head: &Head, body: &[u8]) -> Result<Reply, ApiError> {
    let (path, raw_query) = head.path_and_query();
    let node = shard.node();
    if let Some(reply) = crate::ops::health(node, path) {
        return Ok(reply);
    }
    if path.starts_with("/console") && !head.is_websocket_upgrade() {
        let params = parse_query(raw_query);
        let check =
            |app: u32, path: &str| authenticate(&node.app(app), &head.method, path, &params, body);
        if let Some(reply) = crate::ops::console::serve(node, &head.method, path, &params, check) {
            return reply;
        }
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if head.is_websocket_upgrade() {
        let message = match node.config.role.serves_websocket() {
            true => "This port serves the HTTP API only: connect WebSocket clients to the main port",
            false => "This node serves the HTTP API only (role = api): connect WebSocket clients to a node with role all or websocket",
        };
        return Err(fail(404, message));
    }
    if !node.config.role.serves_api() {
        return Err(fail(
            404,
            "This node serves WebSocket clients only (role = websocket): send API requests to a node with role all or api",
        ));
    }
    let params = parse_query(raw_query);
    // pusher-http-python signs and sends `/users/{id}/terminate_connections` without the
    // `/apps/{id}` prefix (§5.9): its app is the one whose key signed the request.
    let (app, rest) = match segments.as_slice() {
        ["apps", app_id, rest @ ..] => (node.app_by_id(&percent_decode(app_id)), rest),
        rest @ ["users", _, "terminate_connections"] => (
            get(&params, "auth_key").and_then(|k| node.app_by_key(k)),
            rest,
        ),
        _ => return Err(fail(404, format!("Not found: {path}"))),
    };
    let Some(app) = app else {
        return Err(fail(404, format!("Unknown app for {path}")));
    };
    let config = node.apps.get_full(app);
    let config = &*config;
    authenticate(config, &head.method, path, &params, body)?;
    if !config.enabled {
        return Err(fail(403, "Application disabled"));
    }
    let method = head.method.as_str();
    match (method, rest) {
        ("POST", ["events"]) => trigger(shard, app, config, body).await,
        ("POST", ["batch_events"]) => batch(shard, app, config, body).await,
        ("GET", ["channels"]) => list_channels(shard, app, &params).await,
        ("GET", ["channels", channel]) => {
            channel_info(shard, app, &percent_decode(channel), &params).await
        }
        ("GET", ["channels", channel, "users"]) => {
            channel_users(shard, app, &percent_decode(channel)).await
        }
        ("POST", ["users", user_id, "terminate_connections"]) => {
            terminate(shard, app, config, &percent_decode(user_id)).await
        }
        ("POST", ["channels", channel, "events"]) => {
            let channel = percent_decode(channel);
            deprecated_trigger(shard, app, config, &channel, &params, body).await
        }
        ("GET", ["channels", channel, "stats"]) => {
            deprecated_stats(shard, app, &percent_decode(channel)).await
        }
        (
            _,
            ["events"]
            | ["batch_events"]
            | ["channels"]
            | ["channels", _]
            | ["channels", _, "users" | "events" | "stats"]
            | ["users", _, "terminate_connections"],
        ) => Err(fail(405, format!("Method {method} not allowed on {path}"))),
        _ => Err(fail(404, format!("Not found: {path}"))),
    }
}

fn authenticate(
    app: &AppConfig,
    method: &str,
    path: &str,
    params: &Params,
    body: &[u8],
) -> Result<(), ApiError> {
    let Some(key) = get(params, "auth_key") else {
        return Err(fail(401, "Missing required parameter: auth_key"));
    };
    if !crate::auth::constant_time_eq(key.as_bytes(), app.key.as_bytes()) {
        return Err(fail(401, format!("Unknown auth_key: {key}")));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    signature::verify(method, path, params, body, &app.secret, now).map_err(|e| fail(401, e.0))
}

/// One event as the API receives it (`/events` body, or one `batch` item).
#[derive(Deserialize)]
struct EventIn<'a> {
    #[serde(borrow, default)]
    name: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<LazyValue<'a>>,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(borrow, default)]
    socket_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    info: Option<std::borrow::Cow<'a, str>>,
}

/// An event that passed validation: ready to encode per channel.
pub struct Event {
    /// The event name.
    pub name: String,
    /// `data` as a JSON string literal (as received when it was a string).
    pub data: String,
    /// The channels it goes to.
    pub channels: Vec<String>,
    /// The connection the publisher asked to leave out (`socket_id`).
    pub except: Option<u64>,
    /// The `socket_id` to leave out when it is not a connection of this node.
    pub except_elsewhere: Option<Box<str>>,
    info: Attributes,
}

/// The `info` attributes a request asked for (comma-separated; unknown names are ignored).
#[derive(Clone, Copy, Default)]
struct Attributes {
    /// Any attribute was named: the response then carries per-channel objects.
    requested: bool,
    user_count: bool,
    subscription_count: bool,
    cache: bool,
}

impl Attributes {
    fn parse(info: Option<&str>) -> Attributes {
        let mut attributes = Attributes::default();
        for name in info
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
        {
            attributes.requested = true;
            match name {
                "user_count" => attributes.user_count = true,
                "subscription_count" => attributes.subscription_count = true,
                "cache" => attributes.cache = true,
                _ => {}
            }
        }
        attributes
    }
}

fn validate(
    node: &Node,
    app: &AppConfig,
    input: EventIn<'_>,
    single_channel: bool,
) -> Result<Event, ApiError> {
    let name = input
        .name
        .filter(|n| !n.is_empty())
        .ok_or_else(|| fail(400, "Missing event name"))?;
    if name.len() > app.max_event_name_length as usize {
        return Err(fail(
            400,
            format!(
                "Event name is longer than {} characters",
                app.max_event_name_length
            ),
        ));
    }
    if name.starts_with("pusher:") || name.starts_with("pusher_internal:") {
        return Err(fail(
            400,
            "Event names starting with pusher: or pusher_internal: are reserved",
        ));
    }
    let data = input.data.ok_or_else(|| fail(400, "Missing event data"))?;
    let (literal, size) = if data.is_str() {
        let raw = data.as_raw_str();
        let size = json::decoded_len(raw)
            .ok_or_else(|| fail(400, "Event data is not a valid JSON string (bad escape)"))?;
        (raw.to_owned(), size)
    } else {
        let compact =
            json::compact(data.as_raw_str()).ok_or_else(|| fail(400, "Invalid event data"))?;
        let size = compact.len();
        (str_literal(&compact), size)
    };
    if size > app.max_event_payload_bytes as usize {
        let limit = app.max_event_payload_bytes;
        return Err(fail(
            413,
            format!("Event data is {size} bytes; the limit is {limit} bytes"),
        ));
    }
    let channels = match (input.channels, input.channel) {
        (Some(list), None) => list,
        (None, Some(one)) => vec![one],
        (Some(_), Some(_)) => return Err(fail(400, "Give either channels or channel, not both")),
        (None, None) => return Err(fail(400, "Missing channels")),
    };
    if channels.is_empty() {
        return Err(fail(400, "channels must not be empty"));
    }
    if single_channel && channels.len() != 1 {
        return Err(fail(400, "A batch event goes to exactly one channel"));
    }
    let max = app.max_event_channels_at_once as usize;
    if channels.len() > max {
        return Err(fail(
            400,
            format!("An event can go to at most {max} channels"),
        ));
    }
    for channel in &channels {
        match ChannelKind::of(channel) {
            ChannelKind::ServerToUser => {}
            _ => validate_name(channel, app.max_channel_name_length as usize)
                .map_err(|m| fail(400, m))?,
        }
    }
    if channels.len() > 1
        && channels
            .iter()
            .any(|c| ChannelKind::of(c) == ChannelKind::PrivateEncrypted)
    {
        return Err(fail(
            400,
            "Cannot trigger to several channels when one of them is private-encrypted-",
        ));
    }
    let (except, except_elsewhere) = match input.socket_id {
        None => (None, None),
        Some(id) => {
            let valid = id.split_once('.').is_some_and(|(a, b)| {
                !a.is_empty()
                    && !b.is_empty()
                    && a.bytes().all(|c| c.is_ascii_digit())
                    && b.bytes().all(|c| c.is_ascii_digit())
            });
            if !valid {
                return Err(fail(400, format!("Invalid socket_id '{id}'")));
            }
            match node.conn_id_of(&id) {
                Some(conn) => (Some(conn), None),
                // Another node's socket: that node leaves it out.
                None => (None, Some(Box::from(&*id))),
            }
        }
    };
    let info = Attributes::parse(input.info.as_deref());
    Ok(Event {
        name: name.into_owned(),
        data: literal,
        channels,
        except,
        except_elsewhere,
        info,
    })
}

/// Publishes every event to each of its channels, encoded once per channel, and waits until
/// the channels' home shards have sequenced them.
async fn publish(shard: &Shard, app: u32, events: &[Event]) -> Result<(), ApiError> {
    let mut publications = Vec::new();
    for event in events {
        for channel in &event.channels {
            let frame = events::frame(&event.name, Some(channel), Data::Raw(&event.data), None);
            publications.push(Publication {
                key: ChannelKey::new(app, channel),
                frame: Arc::from(frame),
                except: event.except,
                except_elsewhere: event.except_elsewhere.clone(),
                cache: is_cache_channel(channel),
                ticket: None,
            });
        }
    }
    let refused = shard.publish_all(publications).await;
    if refused == 0 {
        let published = &crate::metrics::here().events_published;
        published.add(events.len() as u64);
        for event in events {
            for channel in &event.channels {
                shard.node().console_note(app, || {
                    Note::new("api_message", channel).event(&event.name, &event.data)
                });
            }
        }
    }
    if refused == 0 && shard.node().app(app).event_stream {
        for event in events {
            let socket_id = match (event.except, &event.except_elsewhere) {
                (Some(conn), _) => shard.node().socket_id(conn),
                (None, Some(elsewhere)) => elsewhere.to_string(),
                (None, None) => String::new(),
            };
            for channel in &event.channels {
                let key = ChannelKey::new(app, channel);
                shard.stream_api_event(&key, &event.name, &event.data, &socket_id);
            }
        }
    }
    if refused > 0 {
        return Err(fail(
            503,
            format!(
                "Redis is unreachable and this node's queue for it is full: {refused} \
                 publication(s) reached subscribers on this node only; retry later"
            ),
        ));
    }
    Ok(())
}

/// A channel's attributes in a response; absent fields were not asked for.
#[derive(Serialize, Default)]
struct ChannelAttributes<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    occupied: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_count: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subscription_count: Option<u32>,
    /// `Some(None)`: asked for, and no event is cached (`null`).
    #[serde(skip_serializing_if = "Option::is_none")]
    cache: Option<Option<CachedBody<'a>>>,
}

impl ChannelAttributes<'_> {
    /// The counts `info` asked for; `user_count` only where it means something.
    fn of(stats: &ChannelStats, info: Attributes, users: bool) -> Self {
        ChannelAttributes {
            user_count: (info.user_count && users).then_some(stats.user_count),
            subscription_count: info.subscription_count.then_some(stats.subscription_count),
            ..Default::default()
        }
    }
}

/// A cached event in `GET .../channels/{name}?info=cache`.
#[derive(Serialize)]
struct CachedBody<'a> {
    event: LazyValue<'a>,
    data: LazyValue<'a>,
    ttl: u64,
}

impl<'a> CachedBody<'a> {
    /// The event and data of a cached frame (None if the frame is not an event envelope).
    fn of(cached: &'a CachedEvent) -> Option<Self> {
        let envelope = crate::protocol::ws::payload_of(&cached.frame);
        Some(CachedBody {
            event: sonic_rs::get(envelope, ["event"]).ok()?,
            data: sonic_rs::get(envelope, ["data"]).ok()?,
            ttl: cached.ttl_secs,
        })
    }
}

/// Named entries serialized as a JSON object, in their order.
struct ByName<'a, V>(&'a [(String, V)]);

impl<V: Serialize> Serialize for ByName<'_, V> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, value) in self.0 {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

/// `{"channels":{name: attributes, ...}}`.
#[derive(Serialize)]
struct ChannelsBody<'a, V: Serialize> {
    channels: ByName<'a, V>,
}

/// The attributes of each distinct channel of an event, as `info` asked.
async fn channel_attributes(
    shard: &Shard,
    app: u32,
    channels: &[String],
    info: Attributes,
) -> Result<Vec<(String, ChannelAttributes<'static>)>, ApiError> {
    let mut out: Vec<(String, ChannelAttributes<'static>)> = Vec::new();
    for channel in channels {
        if out.iter().any(|(name, _)| name == channel) {
            continue;
        }
        let stats = shard.channel_stats(ChannelKey::new(app, channel)).await?;
        let presence = ChannelKind::of(channel) == ChannelKind::Presence;
        out.push((
            channel.clone(),
            ChannelAttributes::of(&stats, info, presence),
        ));
    }
    Ok(out)
}

/// What a JSON body must pass before it is parsed: UTF-8 (the parser assumes it) and a bounded
/// depth (the parser recurses).
fn check_body(body: &[u8]) -> Result<(), ApiError> {
    if std::str::from_utf8(body).is_err() {
        return Err(fail(400, "The request body must be UTF-8 JSON"));
    }
    check_depth(body, MAX_JSON_DEPTH).map_err(|message| fail(400, message))
}

/// Everything the API checks in the body of `POST /events` (`batch: false`) or
/// `POST /batch_events` (`batch: true`) before it publishes, without touching a shard: the
/// events to publish, or the error reply.
pub fn parse_events(
    node: &Node,
    config: &AppConfig,
    body: &[u8],
    batch: bool,
) -> Result<Vec<Event>, ApiError> {
    #[derive(Deserialize)]
    struct BatchIn<'a> {
        #[serde(borrow)]
        batch: Vec<EventIn<'a>>,
    }
    check_body(body)?;
    if !batch {
        let input: EventIn<'_> =
            sonic_rs::from_slice(body).map_err(|e| fail(400, format!("Invalid JSON body: {e}")))?;
        return Ok(vec![validate(node, config, input, false)?]);
    }
    let input: BatchIn<'_> = sonic_rs::from_slice(body).map_err(|e| {
        fail(
            400,
            format!("Invalid JSON body (expected {{\"batch\":[...]}}): {e}"),
        )
    })?;
    let max = config.max_event_batch_size as usize;
    if input.batch.len() > max {
        return Err(fail(
            400,
            format!(
                "A batch holds at most {max} events, got {}",
                input.batch.len()
            ),
        ));
    }
    let mut events = Vec::with_capacity(input.batch.len());
    for (i, item) in input.batch.into_iter().enumerate() {
        let event = validate(node, config, item, true).map_err(|mut error| {
            error.message = format!("batch[{i}]: {}", error.message);
            error
        })?;
        events.push(event);
    }
    Ok(events)
}

async fn trigger(
    shard: &Shard,
    app: u32,
    config: &AppConfig,
    body: &[u8],
) -> Result<Reply, ApiError> {
    let event = parse_events(shard.node(), config, body, false)?.remove(0);
    shard.backpressure().await;
    // The attributes are read first (an event does not change them): when they cannot be
    // given (a cluster without Redis), the 503 comes before anything is published, so a
    // retry never delivers the event twice.
    let channels = match event.info.requested {
        true => Some(channel_attributes(shard, app, &event.channels, event.info).await?),
        false => None,
    };
    publish(shard, app, std::slice::from_ref(&event)).await?;
    match channels {
        Some(channels) => Ok(ok(&ChannelsBody {
            channels: ByName(&channels),
        })),
        None => Ok(ok(&Empty {})),
    }
}

async fn batch(
    shard: &Shard,
    app: u32,
    config: &AppConfig,
    body: &[u8],
) -> Result<Reply, ApiError> {
    #[derive(Serialize)]
    struct BatchBody<'a> {
        batch: Vec<ChannelAttributes<'a>>,
    }
    let events = parse_events(shard.node(), config, body, true)?;
    shard.backpressure().await;
    // Attributes first, as in `trigger`.
    let mut batch = Vec::new();
    if events.iter().any(|e| e.info.requested) {
        for event in &events {
            let channel = &event.channels[0];
            let stats = shard.channel_stats(ChannelKey::new(app, channel)).await?;
            let presence = ChannelKind::of(channel) == ChannelKind::Presence;
            batch.push(ChannelAttributes::of(&stats, event.info, presence));
        }
    }
    publish(shard, app, &events).await?;
    match batch.is_empty() {
        true => Ok(ok(&Empty {})),
        false => Ok(ok(&BatchBody { batch })),
    }
}

async fn list_channels(shard: &Shard, app: u32, params: &Params) -> Result<Reply, ApiError> {
    let prefix = get(params, "filter_by_prefix").unwrap_or("");
    let info = Attributes::parse(get(params, "info"));
    if info.user_count && !prefix.starts_with("presence-") {
        return Err(fail(
            400,
            "info=user_count needs filter_by_prefix=presence-",
        ));
    }
    let channels: Vec<(String, ChannelAttributes<'_>)> = shard
        .occupied_channels(app, prefix)
        .await?
        .into_iter()
        .map(|(name, stats)| (name, ChannelAttributes::of(&stats, info, true)))
        .collect();
    Ok(ok(&ChannelsBody {
        channels: ByName(&channels),
    }))
}

/// The channel name of a query path: valid, or a 400.
fn checked_channel(shard: &Shard, app: u32, channel: &str) -> Result<(), ApiError> {
    let max = shard.node().app(app).max_channel_name_length as usize;
    validate_name(channel, max).map_err(|message| fail(400, message))
}

async fn channel_info(
    shard: &Shard,
    app: u32,
    channel: &str,
    params: &Params,
) -> Result<Reply, ApiError> {
    checked_channel(shard, app, channel)?;
    let info = Attributes::parse(get(params, "info"));
    if info.user_count && ChannelKind::of(channel) != ChannelKind::Presence {
        return Err(fail(400, "info=user_count is only for presence channels"));
    }
    let with_cache = info.cache && is_cache_channel(channel);
    let found = shard
        .channel_info(ChannelKey::new(app, channel), with_cache)
        .await?;
    let mut body = ChannelAttributes::of(&found.stats, info, true);
    body.occupied = Some(found.stats.subscription_count > 0);
    if info.cache {
        body.cache = Some(found.cached.as_ref().and_then(CachedBody::of));
    }
    Ok(ok(&body))
}

/// The deprecated `GET .../channels/{name}/stats` (§5.7).
async fn deprecated_stats(shard: &Shard, app: u32, channel: &str) -> Result<Reply, ApiError> {
    #[derive(Serialize)]
    struct StatsBody {
        occupied: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        user_count: Option<u32>,
        connection_count: u32,
    }
    checked_channel(shard, app, channel)?;
    let stats = shard.channel_stats(ChannelKey::new(app, channel)).await?;
    let presence = ChannelKind::of(channel) == ChannelKind::Presence;
    Ok(ok(&StatsBody {
        occupied: stats.subscription_count > 0,
        user_count: presence.then_some(stats.user_count),
        connection_count: stats.subscription_count,
    }))
}

/// The deprecated `POST .../channels/{channel}/events?name=..[&socket_id=..]` whose body is the
/// event data itself (§5.10).
async fn deprecated_trigger(
    shard: &Shard,
    app: u32,
    config: &AppConfig,
    channel: &str,
    params: &Params,
    body: &[u8],
) -> Result<Reply, ApiError> {
    let data = std::str::from_utf8(body).map_err(|_| fail(400, "Event data must be UTF-8 text"))?;
    let literal = str_literal(data);
    let data = sonic_rs::from_str::<LazyValue<'_>>(&literal)
        .map_err(|_| fail(400, "Invalid event data"))?;
    let input = EventIn {
        name: get(params, "name").map(std::borrow::Cow::Borrowed),
        data: Some(data),
        channels: None,
        channel: Some(channel.to_owned()),
        socket_id: get(params, "socket_id").map(std::borrow::Cow::Borrowed),
        info: None,
    };
    let event = validate(shard.node(), config, input, true)?;
    shard.backpressure().await;
    publish(shard, app, std::slice::from_ref(&event)).await?;
    Ok(ok(&Empty {}))
}

/// Closes every connection signed in as the user, on every shard (§5.9).
async fn terminate(
    shard: &Shard,
    app: u32,
    config: &AppConfig,
    user_id: &str,
) -> Result<Reply, ApiError> {
    if user_id.is_empty() || !config.user_id_fits(user_id) {
        let limit = config.max_user_id_length;
        return Err(fail(400, format!("A user id has 1 to {limit} characters")));
    }
    shard
        .terminate_user_connections(ChannelKey::user(app, user_id))
        .await;
    Ok(ok(&Empty {}))
}

async fn channel_users(shard: &Shard, app: u32, channel: &str) -> Result<Reply, ApiError> {
    #[derive(Serialize)]
    struct User {
        id: String,
    }
    #[derive(Serialize)]
    struct UsersBody {
        users: Vec<User>,
    }
    if ChannelKind::of(channel) != ChannelKind::Presence {
        return Err(fail(400, "Users can only be listed for presence channels"));
    }
    checked_channel(shard, app, channel)?;
    let ids = shard
        .presence_user_ids(ChannelKey::new(app, channel))
        .await?;
    let users = ids.into_iter().map(|id| User { id }).collect();
    Ok(ok(&UsersBody { users }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn node() -> Node {
        let mut config = Config::default();
        config.apps.push(AppConfig {
            id: "1".into(),
            key: "k".into(),
            secret: "s".into(),
            ..AppConfig::default()
        });
        Node::new(config, 1)
    }

    #[test]
    fn a_refused_batch_item_is_named_once_in_a_plain_message() {
        let node = node();
        let body =
            br#"{"batch":[{"name":"e","channel":"a","data":"1"},{"channel":"a","data":"2"}]}"#;
        let error = parse_events(&node, &node.app(0), body, true).err().unwrap();
        assert_eq!(error.status, 400);
        assert_eq!(error.message, "batch[1]: Missing event name");
        assert_eq!(
            error.body(),
            r#"{"error":"batch[1]: Missing event name"}"#,
            "rendered once, not a JSON document inside a string"
        );
    }

    #[test]
    fn attributes_serialize_only_what_was_asked() {
        let stats = ChannelStats {
            subscription_count: 3,
            user_count: 2,
        };
        let info = Attributes::parse(Some("user_count, subscription_count"));
        let mut body = ChannelAttributes::of(&stats, info, true);
        body.occupied = Some(true);
        body.cache = Some(None);
        assert_eq!(
            sonic_rs::to_string(&body).unwrap(),
            r#"{"occupied":true,"user_count":2,"subscription_count":3,"cache":null}"#
        );
        let plain = ChannelAttributes::of(&stats, Attributes::parse(None), true);
        assert_eq!(sonic_rs::to_string(&plain).unwrap(), "{}");
        let channels = [("b".to_string(), 1u32), ("a".to_string(), 2)];
        let listed = ChannelsBody {
            channels: ByName(&channels),
        };
        assert_eq!(
            sonic_rs::to_string(&listed).unwrap(),
            r#"{"channels":{"b":1,"a":2}}"#
        );
    }
}
