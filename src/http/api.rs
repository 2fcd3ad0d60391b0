//! The signed Pusher HTTP API (reference §5): trigger, batch trigger, channel queries.
//! Counts come from each channel's home shard, so they are exact across shards.

use super::signature::{self, get, parse_query, percent_decode, Query as Params};
use super::Head;
use crate::channels::ChannelKey;
use crate::config::AppConfig;
use crate::protocol::channel::{is_cache_channel, validate_name, ChannelKind};
use crate::protocol::events::{self, Data};
use crate::protocol::json::{self, check_depth, str_literal, MAX_JSON_DEPTH};
use crate::shard::messages::{CachedEvent, ChannelStats, Query, QueryReply};
use crate::shard::{Shard, Shared};
use serde::Deserialize;
use sonic_rs::{JsonValueTrait, LazyValue};
use std::time::{SystemTime, UNIX_EPOCH};

pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

fn ok(body: String) -> Reply {
    Reply {
        status: 200,
        content_type: "application/json",
        body,
    }
}

fn fail(status: u16, message: impl AsRef<str>) -> Reply {
    Reply {
        status,
        content_type: "application/json",
        body: format!("{{\"error\":{}}}", str_literal(message.as_ref())),
    }
}

pub async fn handle(shard: &Shard, head: &Head, body: &[u8]) -> Reply {
    let (path, raw_query) = head.path_and_query();
    if path == "/" || path == "/health" || path == "/ready" {
        return Reply {
            status: 200,
            content_type: "text/plain",
            body: "OK".into(),
        };
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let params = parse_query(raw_query);
    // pusher-http-python signs and sends `/users/{id}/terminate_connections` without the
    // `/apps/{id}` prefix (§5.9): its app is the one whose key signed the request.
    let (app, rest) = match segments.as_slice() {
        ["apps", app_id, rest @ ..] => (shard.shared.app_by_id(&percent_decode(app_id)), rest),
        rest @ ["users", _, "terminate_connections"] => (
            get(&params, "auth_key").and_then(|k| shard.shared.app_by_key(k)),
            rest,
        ),
        _ => return fail(404, format!("Not found: {path}")),
    };
    let Some(app) = app else {
        return fail(404, format!("Unknown app for {path}"));
    };
    let config = shard.shared.app(app);
    if let Err(reply) = authenticate(config, &head.method, path, &params, body) {
        return reply;
    }
    if !config.enabled {
        return fail(403, "Application disabled");
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
        ) => fail(405, format!("Method {method} not allowed on {path}")),
        _ => fail(404, format!("Not found: {path}")),
    }
}

fn authenticate(
    app: &AppConfig,
    method: &str,
    path: &str,
    params: &Params,
    body: &[u8],
) -> Result<(), Reply> {
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
    pub name: String,
    /// `data` as a JSON string literal (as received when it was a string).
    pub data: String,
    pub channels: Vec<String>,
    /// The connection the publisher asked to leave out (`socket_id`).
    pub except: Option<u64>,
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
    shared: &Shared,
    app: &AppConfig,
    input: EventIn<'_>,
    single_channel: bool,
) -> Result<Event, Reply> {
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
    let except = match input.socket_id {
        None => None,
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
            // A socket id of another node matches no socket here.
            Some(shared.conn_id_of(&id).unwrap_or(u64::MAX))
        }
    };
    let info = Attributes::parse(input.info.as_deref());
    Ok(Event {
        name: name.into_owned(),
        data: literal,
        channels,
        except,
        info,
    })
}

/// Publishes every event, then waits until the channels' home shards have sequenced them.
async fn publish(shard: &Shard, app: u32, events: &[Event]) {
    let mut keys = Vec::new();
    for event in events {
        for channel in &event.channels {
            let key = ChannelKey::new(app, channel);
            let frame = events::frame(&event.name, Some(channel), Data::Raw(&event.data), None);
            shard.publish(key.clone(), frame, event.except, is_cache_channel(channel));
            keys.push(key);
        }
    }
    shard.sequenced(keys.iter()).await;
}

/// `{"name":{"user_count":1,"subscription_count":2},...}` for the requested attributes.
async fn info_json(shard: &Shard, app: u32, channels: &[String], info: Attributes) -> String {
    let mut out = String::from("{");
    let mut seen: Vec<&str> = Vec::new();
    for channel in channels {
        if seen.contains(&channel.as_str()) {
            continue;
        }
        seen.push(channel);
        let stats = shard.channel_stats(ChannelKey::new(app, channel)).await;
        if seen.len() > 1 {
            out.push(',');
        }
        out.push_str(&str_literal(channel));
        out.push(':');
        out.push_str(&stats_json(
            &stats,
            info.user_count && ChannelKind::of(channel) == ChannelKind::Presence,
            info.subscription_count,
            None,
        ));
    }
    out.push('}');
    out
}

fn stats_json(stats: &ChannelStats, users: bool, subs: bool, occupied: Option<bool>) -> String {
    let mut fields = Vec::new();
    if let Some(o) = occupied {
        fields.push(format!("\"occupied\":{o}"));
    }
    if users {
        fields.push(format!("\"user_count\":{}", stats.user_count));
    }
    if subs {
        fields.push(format!(
            "\"subscription_count\":{}",
            stats.subscription_count
        ));
    }
    format!("{{{}}}", fields.join(","))
}

/// What a JSON body must pass before it is parsed: UTF-8 (the parser assumes it) and a bounded
/// depth (the parser recurses).
fn check_body(body: &[u8]) -> Result<(), Reply> {
    if std::str::from_utf8(body).is_err() {
        return Err(fail(400, "The request body must be UTF-8 JSON"));
    }
    check_depth(body, MAX_JSON_DEPTH).map_err(|message| fail(400, message))
}

/// Everything the API checks in the body of `POST /events` (`batch: false`) or
/// `POST /batch_events` (`batch: true`) before it publishes, without touching a shard: the
/// events to publish, or the error reply.
pub fn parse_events(
    shared: &Shared,
    config: &AppConfig,
    body: &[u8],
    batch: bool,
) -> Result<Vec<Event>, Reply> {
    #[derive(Deserialize)]
    struct BatchIn<'a> {
        #[serde(borrow)]
        batch: Vec<EventIn<'a>>,
    }
    check_body(body)?;
    if !batch {
        let input: EventIn<'_> =
            sonic_rs::from_slice(body).map_err(|e| fail(400, format!("Invalid JSON body: {e}")))?;
        return Ok(vec![validate(shared, config, input, false)?]);
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
        match validate(shared, config, item, true) {
            Ok(e) => events.push(e),
            Err(mut reply) => {
                reply.body = format!(
                    "{{\"error\":{}}}",
                    str_literal(&format!("batch[{i}]: {}", reply.body))
                );
                return Err(reply);
            }
        }
    }
    Ok(events)
}

async fn trigger(shard: &Shard, app: u32, config: &AppConfig, body: &[u8]) -> Reply {
    let event = match parse_events(&shard.shared, config, body, false) {
        Ok(mut events) => events.remove(0),
        Err(reply) => return reply,
    };
    shard.backpressure().await;
    publish(shard, app, std::slice::from_ref(&event)).await;
    if !event.info.requested {
        return ok("{}".into());
    }
    ok(format!(
        "{{\"channels\":{}}}",
        info_json(shard, app, &event.channels, event.info).await
    ))
}

async fn batch(shard: &Shard, app: u32, config: &AppConfig, body: &[u8]) -> Reply {
    let events = match parse_events(&shard.shared, config, body, true) {
        Ok(events) => events,
        Err(reply) => return reply,
    };
    shard.backpressure().await;
    publish(shard, app, &events).await;
    if events.iter().all(|e| !e.info.requested) {
        return ok("{}".into());
    }
    let mut items = Vec::with_capacity(events.len());
    for event in &events {
        let channel = &event.channels[0];
        let stats = shard.channel_stats(ChannelKey::new(app, channel)).await;
        let users = event.info.user_count && ChannelKind::of(channel) == ChannelKind::Presence;
        items.push(stats_json(
            &stats,
            users,
            event.info.subscription_count,
            None,
        ));
    }
    ok(format!("{{\"batch\":[{}]}}", items.join(",")))
}

async fn list_channels(shard: &Shard, app: u32, params: &Params) -> Reply {
    let prefix = get(params, "filter_by_prefix").unwrap_or("").to_owned();
    let info = Attributes::parse(get(params, "info"));
    if info.user_count && !prefix.starts_with("presence-") {
        return fail(400, "info=user_count needs filter_by_prefix=presence-");
    }
    let mut all: Vec<(String, ChannelStats)> = Vec::new();
    for target in 0..shard.shared.shards {
        if let QueryReply::List(list) = shard
            .query(
                target,
                Query::List {
                    app,
                    prefix: prefix.clone(),
                },
            )
            .await
        {
            all.extend(list);
        }
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let entries: Vec<String> = all
        .iter()
        .map(|(name, stats)| {
            format!(
                "{}:{}",
                str_literal(name),
                stats_json(stats, info.user_count, info.subscription_count, None)
            )
        })
        .collect();
    ok(format!("{{\"channels\":{{{}}}}}", entries.join(",")))
}

async fn channel_info(shard: &Shard, app: u32, channel: &str, params: &Params) -> Reply {
    if let Err(message) = validate_name(
        channel,
        shard.shared.app(app).max_channel_name_length as usize,
    ) {
        return fail(400, message);
    }
    let info = Attributes::parse(get(params, "info"));
    if info.user_count && ChannelKind::of(channel) != ChannelKind::Presence {
        return fail(400, "info=user_count is only for presence channels");
    }
    let key = ChannelKey::new(app, channel);
    let home = key.home(shard.shared.shards);
    let cache = info.cache && is_cache_channel(channel);
    let QueryReply::Channel(stats, cached) = shard.query(home, Query::Channel { key, cache }).await
    else {
        return fail(500, "Unexpected reply from the channel's shard");
    };
    let mut body = stats_json(
        &stats,
        info.user_count,
        info.subscription_count,
        Some(stats.subscription_count > 0),
    );
    if info.cache {
        body.pop();
        body.push_str(",\"cache\":");
        body.push_str(&cache_json(cached.as_ref()));
        body.push('}');
    }
    ok(body)
}

/// `{"event":..,"data":..,"ttl":seconds}` of a cached event, or `null`.
fn cache_json(cached: Option<&CachedEvent>) -> String {
    let Some(cached) = cached else {
        return "null".into();
    };
    let envelope = crate::protocol::ws::payload_of(&cached.frame);
    let event = sonic_rs::get(envelope, ["event"]);
    let data = sonic_rs::get(envelope, ["data"]);
    match (event, data) {
        (Ok(event), Ok(data)) => format!(
            "{{\"event\":{},\"data\":{},\"ttl\":{}}}",
            event.as_raw_str(),
            data.as_raw_str(),
            cached.ttl_secs
        ),
        _ => "null".into(),
    }
}

/// The deprecated `GET .../channels/{name}/stats` (§5.7).
async fn deprecated_stats(shard: &Shard, app: u32, channel: &str) -> Reply {
    if let Err(message) = validate_name(
        channel,
        shard.shared.app(app).max_channel_name_length as usize,
    ) {
        return fail(400, message);
    }
    let stats = shard.channel_stats(ChannelKey::new(app, channel)).await;
    let presence = ChannelKind::of(channel) == ChannelKind::Presence;
    let users = match presence {
        true => format!(",\"user_count\":{}", stats.user_count),
        false => String::new(),
    };
    ok(format!(
        "{{\"occupied\":{}{users},\"connection_count\":{}}}",
        stats.subscription_count > 0,
        stats.subscription_count
    ))
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
) -> Reply {
    let Ok(data) = std::str::from_utf8(body) else {
        return fail(400, "Event data must be UTF-8 text");
    };
    let literal = str_literal(data);
    let Ok(data) = sonic_rs::from_str::<LazyValue<'_>>(&literal) else {
        return fail(400, "Invalid event data");
    };
    let input = EventIn {
        name: get(params, "name").map(std::borrow::Cow::Borrowed),
        data: Some(data),
        channels: None,
        channel: Some(channel.to_owned()),
        socket_id: get(params, "socket_id").map(std::borrow::Cow::Borrowed),
        info: None,
    };
    let event = match validate(&shard.shared, config, input, true) {
        Ok(e) => e,
        Err(reply) => return reply,
    };
    shard.backpressure().await;
    publish(shard, app, std::slice::from_ref(&event)).await;
    ok("{}".into())
}

/// Closes every connection signed in as the user, on every shard (§5.9).
async fn terminate(shard: &Shard, app: u32, config: &AppConfig, user_id: &str) -> Reply {
    if user_id.is_empty() || !config.user_id_fits(user_id) {
        let limit = config.max_user_id_length;
        return fail(400, format!("A user id has 1 to {limit} characters"));
    }
    let key = ChannelKey::user(app, user_id);
    shard.terminate_user(key.clone());
    shard.sequenced(std::iter::once(&key)).await;
    ok("{}".into())
}

async fn channel_users(shard: &Shard, app: u32, channel: &str) -> Reply {
    if ChannelKind::of(channel) != ChannelKind::Presence {
        return fail(400, "Users can only be listed for presence channels");
    }
    if let Err(message) = validate_name(
        channel,
        shard.shared.app(app).max_channel_name_length as usize,
    ) {
        return fail(400, message);
    }
    let key = ChannelKey::new(app, channel);
    let home = key.home(shard.shared.shards);
    let QueryReply::Users(ids) = shard.query(home, Query::Users(key)).await else {
        return ok("{\"users\":[]}".into());
    };
    let users: Vec<String> = ids
        .iter()
        .map(|id| format!("{{\"id\":{}}}", str_literal(id)))
        .collect();
    ok(format!("{{\"users\":[{}]}}", users.join(",")))
}
