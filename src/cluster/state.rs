//! The cluster's shared state in Redis: who is subscribed where, and presence members. Every
//! piece is owned by one node instance (`owner`: the node id and a number random per start), so
//! that the survivors of a dead node can remove exactly its share, and a node restarted under
//! the same id never inherits its previous life's members.
//!
//! Keys (`P` is the prefix, `T` a channel's topic `P:{app_id:channel}`):
//! - `P:nodes`: sorted set, owner -> when it expires (ms, Redis's clock), renewed by heartbeats;
//! - `P:node:<owner>`: set of the channels where the owner has subscribers, as `["app","channel"]`;
//! - `T:subs`: hash, owner -> how many sockets of the owner are subscribed;
//! - `T:m:<owner>`: hash, user id -> user info (JSON): the owner's presence members.
//!
//! Presence changes are decided in Redis, atomically (Lua), and announced on the channel's topic
//! as `SPJ` and a JSON array: `["added", app, channel, user, info]` when a user's first
//! connection anywhere joins, `["removed", app, channel, user]` when their last one leaves.
//! For apps with `subscription_count` events, a node announces its own count of a channel as
//! `["count", app, channel, owner, "n"]`. Every node applies these idempotently; a node that
//! (re)joins a channel gets the full member list and every node's count in the same Redis step
//! as its own registration (`sync`), so nothing falls between the two.

use redis::Value;

/// First bytes of a presence change on a topic.
pub const STATE_MAGIC: &[u8] = b"SPJ";

/// Shared Lua helpers: whether a user is a member through another owner, and every member of a
/// channel (first owner's info wins) as a flat list.
const HELPERS: &str = r#"
local function elsewhere(topic, owner, user)
  for _, n in ipairs(redis.call('HKEYS', topic .. ':subs')) do
    if n ~= owner and redis.call('HEXISTS', topic .. ':m:' .. n, user) == 1 then
      return true
    end
  end
  return false
end
local function members(topic)
  local seen, out = {}, {}
  for _, n in ipairs(redis.call('HKEYS', topic .. ':subs')) do
    local kv = redis.call('HGETALL', topic .. ':m:' .. n)
    for i = 1, #kv, 2 do
      if not seen[kv[i]] then
        seen[kv[i]] = true
        out[#out + 1] = kv[i]
        out[#out + 1] = kv[i + 1]
      end
    end
  end
  return out
end
local function removed(app_channel, user)
  return 'SPJ' .. cjson.encode({'removed', app_channel[1], app_channel[2], user})
end
local function added(app_channel, user, info)
  return 'SPJ' .. cjson.encode({'added', app_channel[1], app_channel[2], user, info})
end
local function counted(app_channel, owner, n)
  return 'SPJ' .. cjson.encode({'count', app_channel[1], app_channel[2], owner, tostring(n)})
end
local function total(topic)
  local sum = 0
  for _, v in ipairs(redis.call('HVALS', topic .. ':subs')) do sum = sum + (tonumber(v) or 0) end
  return sum
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Webhooks and the event stream (see `webhooks`). `P:wh:apps` holds, per app id, the bits of
-- the event types its webhooks want and (`<app>:stream`) its event stream's length, 0 for none.
local WH_BITS = {channel_occupied = 1, channel_vacated = 2, member_added = 4,
  member_removed = 8, client_event = 16, cache_miss = 32, subscription_count = 64}
local function prefix_of(topic, app_channel)
  return string.sub(topic, 1, #topic - #app_channel[1] - #app_channel[2] - 4)
end
local function wh_config(prefix, app)
  local v = redis.call('HMGET', prefix .. ':wh:apps', app, app .. ':stream', '#queue')
  return tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0
end
-- An event: into the app's webhook queue if its webhooks want it (and the queue is under its
-- bound; beyond, it is counted in P:wh:dropped), and onto its event stream. `fields` are the
-- entry's fields after name and channel.
local function wh_add(prefix, app, name, channel, fields)
  local bits, stream, bound = wh_config(prefix, app)
  local entry = {'name', name, 'channel', channel}
  for _, f in ipairs(fields) do entry[#entry + 1] = f end
  entry[#entry + 1] = 'time_ms'
  entry[#entry + 1] = tostring(now_ms())
  if bit.band(bits, WH_BITS[name] or 0) ~= 0 then
    local queue = prefix .. ':wh:{' .. app .. '}'
    if redis.call('XLEN', queue) < bound then
      redis.call('XADD', queue, '*', unpack(entry))
    else
      redis.call('HINCRBY', prefix .. ':wh:dropped', app, 1)
    end
  end
  if stream > 0 then
    redis.call('XADD', prefix .. ':events:{' .. app .. '}', 'MAXLEN', '~', stream, '*', unpack(entry))
  end
end
-- The 3-second rule, for the whole cluster: a departure (a channel vacated, a member's last
-- connection gone) waits in P:wh:delay; a return before it is due cancels both.
local function wh_depart(prefix, app, channel, user)
  local bits, stream = wh_config(prefix, app)
  if bits == 0 and stream == 0 then return end
  redis.call('ZADD', prefix .. ':wh:delay', now_ms() + 3000, cjson.encode({app, channel, user}))
end
local function wh_arrive(prefix, app, channel, user)
  local bits, stream = wh_config(prefix, app)
  if bits == 0 and stream == 0 then return end
  if redis.call('ZREM', prefix .. ':wh:delay', cjson.encode({app, channel, user})) == 1 then
    return
  end
  if user then
    wh_add(prefix, app, 'member_added', channel, {'user_id', user})
  else
    wh_add(prefix, app, 'channel_occupied', channel, {})
  end
end
-- After a node's count of a channel changed from `before` (the channel's total then).
local function wh_occupancy(topic, app_channel, before)
  local after = total(topic)
  if before == 0 and after > 0 then
    wh_arrive(prefix_of(topic, app_channel), app_channel[1], app_channel[2], nil)
  elseif before > 0 and after == 0 then
    wh_depart(prefix_of(topic, app_channel), app_channel[1], app_channel[2], nil)
  end
end
"#;

/// ARGV: topic, owner, entry, user, info. A user's first connection on this node.
const JOIN: &str = r#"
local topic, owner, user = ARGV[1], ARGV[2], ARGV[4]
local new = redis.call('HSET', topic .. ':m:' .. owner, user, ARGV[5]) == 1
if new and not elsewhere(topic, owner, user) then
  local app_channel = cjson.decode(ARGV[3])
  redis.call('PUBLISH', topic, added(app_channel, user, ARGV[5]))
  wh_arrive(prefix_of(topic, app_channel), app_channel[1], app_channel[2], user)
end
return 0
"#;

/// ARGV: topic, owner, entry, user. A user's last connection on this node left.
const LEAVE: &str = r#"
local topic, owner, user = ARGV[1], ARGV[2], ARGV[4]
if redis.call('HDEL', topic .. ':m:' .. owner, user) == 1 and not elsewhere(topic, owner, user) then
  local app_channel = cjson.decode(ARGV[3])
  redis.call('PUBLISH', topic, removed(app_channel, user))
  wh_depart(prefix_of(topic, app_channel), app_channel[1], app_channel[2], user)
end
return 0
"#;

/// ARGV: topic, owner, entry, index key, count, announce count ("1"/"0"), then user and info of
/// each local member. Replaces the node's whole share of a channel (its first subscriber, or
/// after Redis was away), announces the differences, and returns every member and every node's
/// count.
const SYNC: &str = r#"
local topic, owner, entry, count = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[5])
local app_channel = cjson.decode(entry)
local prefix = prefix_of(topic, app_channel)
local mine = topic .. ':m:' .. owner
local before = total(topic)
if count > 0 then
  redis.call('HSET', topic .. ':subs', owner, count)
  redis.call('SADD', ARGV[4], entry)
else
  redis.call('HDEL', topic .. ':subs', owner)
  redis.call('SREM', ARGV[4], entry)
end
wh_occupancy(topic, app_channel, before)
local old = {}
for _, u in ipairs(redis.call('HKEYS', mine)) do old[u] = true end
redis.call('DEL', mine)
if ARGV[6] == '1' then
  redis.call('PUBLISH', topic, counted(app_channel, owner, count))
end
local now = {}
for i = 7, #ARGV - 1, 2 do
  now[ARGV[i]] = true
  redis.call('HSET', mine, ARGV[i], ARGV[i + 1])
  if not old[ARGV[i]] and not elsewhere(topic, owner, ARGV[i]) then
    redis.call('PUBLISH', topic, added(app_channel, ARGV[i], ARGV[i + 1]))
    wh_arrive(prefix, app_channel[1], app_channel[2], ARGV[i])
  end
end
for u in pairs(old) do
  if not now[u] and not elsewhere(topic, owner, u) then
    redis.call('PUBLISH', topic, removed(app_channel, u))
    wh_depart(prefix, app_channel[1], app_channel[2], u)
  end
end
return {members(topic), redis.call('HGETALL', topic .. ':subs')}
"#;

/// ARGV: prefix, owner, ms until expiry, node id followed by '/', then app id and connection
/// count of each app with a connection limit. Renews the owner and its connection counts, then
/// removes the share of every owner that expired and of earlier lives of the same node id,
/// announcing the members who left with them. Returns 1 if the owner was still registered (0:
/// it had been removed as dead, so it must assert its state again), and for each app given the
/// connections on the other nodes.
const HEARTBEAT: &str = r#"
local prefix, owner, life, same_id = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local nodes = prefix .. ':nodes'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local known = redis.call('ZSCORE', nodes, owner)
redis.call('ZADD', nodes, now + life, owner)
local conns = prefix .. ':conns:'
redis.call('DEL', conns .. owner)
for i = 5, #ARGV - 1, 2 do
  redis.call('HSET', conns .. owner, ARGV[i], ARGV[i + 1])
end
local dead = {}
local all = redis.call('ZRANGE', nodes, 0, -1, 'WITHSCORES')
for i = 1, #all, 2 do
  local n, expiry = all[i], tonumber(all[i + 1])
  if n ~= owner and (expiry < now or string.sub(n, 1, #same_id) == same_id) then
    dead[#dead + 1] = n
  end
end
for _, d in ipairs(dead) do
  local index = prefix .. ':node:' .. d
  for _, entry in ipairs(redis.call('SMEMBERS', index)) do
    local ok, app_channel = pcall(cjson.decode, entry)
    if ok and type(app_channel) == 'table' and #app_channel == 2 then
      local topic = prefix .. ':{' .. app_channel[1] .. ':' .. app_channel[2] .. '}'
      local theirs = topic .. ':m:' .. d
      local users = redis.call('HKEYS', theirs)
      redis.call('DEL', theirs)
      for _, u in ipairs(users) do
        if not elsewhere(topic, d, u) then
          redis.call('PUBLISH', topic, removed(app_channel, u))
          wh_depart(prefix, app_channel[1], app_channel[2], u)
        end
      end
      local before = total(topic)
      if redis.call('HDEL', topic .. ':subs', d) == 1 then
        redis.call('PUBLISH', topic, counted(app_channel, d, 0))
        wh_occupancy(topic, app_channel, before)
      end
    end
  end
    redis.call('DEL', index)
  redis.call('DEL', conns .. d)
  redis.call('ZREM', nodes, d)
end
local others = {}
local alive = redis.call('ZRANGE', nodes, 0, -1)
for i = 5, #ARGV - 1, 2 do
  local sum = 0
  for _, n in ipairs(alive) do
    if n ~= owner then
      sum = sum + (tonumber(redis.call('HGET', conns .. n, ARGV[i])) or 0)
    end
  end
  others[#others + 1] = sum
end
if known then return {1, others} else return {0, others} end
"#;

/// ARGV: topic, payload, ms to keep it. A cache channel's publish: kept as its last event and
/// published in one step, so a node that reads the cache after subscribing either finds the
/// event or receives it.
const PUBLISH_CACHED: &str = r#"
redis.call('SET', ARGV[1] .. ':cache', ARGV[2], 'PX', ARGV[3])
return redis.call('PUBLISH', ARGV[1], ARGV[2])
"#;

/// ARGV: topic, entry, ms during which repeated misses make one `cache_miss` webhook (0: the
/// read is not a subscriber's, no event). Returns a
/// cache channel's last event (as published) and the ms it has left, or an empty list.
const CACHED: &str = r#"
local payload = redis.call('GET', ARGV[1] .. ':cache')
if not payload then
  local app_channel = cjson.decode(ARGV[2])
  local prefix = prefix_of(ARGV[1], app_channel)
  local bits, stream = wh_config(prefix, app_channel[1])
  local wanted = bit.band(bits, WH_BITS.cache_miss) ~= 0 or stream > 0
  if wanted and ARGV[3] ~= '0' and redis.call('SET', ARGV[1] .. ':miss', '1', 'NX', 'PX', ARGV[3]) then
    wh_add(prefix, app_channel[1], 'cache_miss', app_channel[2], {})
  end
  return {}
end
return {payload, redis.call('PTTL', ARGV[1] .. ':cache')}
"#;

/// ARGV: topic. Returns the channel's subscription count and number of distinct users.
const CHANNEL_STATS: &str = r#"
local total = 0
for _, v in ipairs(redis.call('HVALS', ARGV[1] .. ':subs')) do total = total + (tonumber(v) or 0) end
return {total, #members(ARGV[1]) / 2}
"#;

/// ARGV: topic. Returns every member as user id, info, user id, info...
const MEMBERS: &str = r#"
return members(ARGV[1])
"#;

/// ARGV: prefix, app id, channel-name prefix. Returns name, subscription count and user count
/// of every channel of the app with subscribers on some node, flat.
const CHANNELS: &str = r#"
local prefix, app, starts = ARGV[1], ARGV[2], ARGV[3]
local seen, out = {}, {}
for _, n in ipairs(redis.call('ZRANGE', prefix .. ':nodes', 0, -1)) do
  for _, entry in ipairs(redis.call('SMEMBERS', prefix .. ':node:' .. n)) do
    local ok, ac = pcall(cjson.decode, entry)
    if ok and type(ac) == 'table' and ac[1] == app and not seen[ac[2]]
        and string.sub(ac[2], 1, #starts) == starts then
      seen[ac[2]] = true
      local topic = prefix .. ':{' .. app .. ':' .. ac[2] .. '}'
      local total = 0
      for _, v in ipairs(redis.call('HVALS', topic .. ':subs')) do total = total + (tonumber(v) or 0) end
      if total > 0 then
        out[#out + 1] = ac[2]
        out[#out + 1] = total
        out[#out + 1] = #members(topic) / 2
      end
    end
  end
end
return out
"#;

/// ARGV: topic, owner, entry, index key, count. The node's count of a channel went from 0 to
/// more or back to 0: the count and the index in one step with the cluster-wide occupancy it
/// changes (`channel_occupied`, `channel_vacated` webhooks).
const OCCUPANCY: &str = r#"
local topic, owner, entry, count = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[5])
local before = total(topic)
if count > 0 then
  redis.call('SADD', ARGV[4], entry)
  redis.call('HSET', topic .. ':subs', owner, count)
else
  redis.call('HDEL', topic .. ':subs', owner)
  redis.call('SREM', ARGV[4], entry)
end
wh_occupancy(topic, cjson.decode(entry), before)
return 0
"#;

/// ARGV: prefix, app id, name, channel, then the event's other fields (name, value, ...). An
/// event one node sees alone (a client event, its subscription count, an API publish for the
/// event stream). A subscription count is the cluster's, as Redis has it now (this node's own
/// count was written before, on the same link).
const EVENT: &str = r#"
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
if ARGV[3] == 'subscription_count' then
  local topic = ARGV[1] .. ':{' .. ARGV[2] .. ':' .. ARGV[4] .. '}'
  for i = 1, #fields - 1, 2 do
    if fields[i] == 'subscription_count' then fields[i + 1] = tostring(total(topic)) end
  end
end
wh_add(ARGV[1], ARGV[2], ARGV[3], ARGV[4], fields)
return 0
"#;

/// ARGV: prefix, most to take. Sends the departures whose 3 s are over and that nothing
/// cancelled (the channel is still empty, the user still gone from it). Returns how many went.
const DEPARTURES: &str = r#"
local prefix = ARGV[1]
local delay = prefix .. ':wh:delay'
local due = redis.call('ZRANGEBYSCORE', delay, '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do
  redis.call('ZREM', delay, m)
  local ok, d = pcall(cjson.decode, m)
  if ok and type(d) == 'table' and type(d[1]) == 'string' and type(d[2]) == 'string' then
    local topic = prefix .. ':{' .. d[1] .. ':' .. d[2] .. '}'
    if type(d[3]) == 'string' then
      if not elsewhere(topic, '', d[3]) then
        wh_add(prefix, d[1], 'member_removed', d[2], {'user_id', d[3]})
      end
    elseif total(topic) == 0 then
      wh_add(prefix, d[1], 'channel_vacated', d[2], {})
    end
  end
end
return #due
"#;

/// Every script, as each link loads them when it connects (commands send only their SHA-1).
const SCRIPTS: [&str; 12] = [
    JOIN,
    LEAVE,
    SYNC,
    HEARTBEAT,
    PUBLISH_CACHED,
    CACHED,
    CHANNEL_STATS,
    MEMBERS,
    CHANNELS,
    OCCUPANCY,
    EVENT,
    DEPARTURES,
];

/// The commands and replies of the shared state, for one node instance.
pub struct State {
    prefix: String,
    owner: String,
    node_id: String,
}

/// A change of a channel's shared state, announced on its topic.
#[derive(Debug, PartialEq, Eq)]
pub struct StateChange {
    /// The app's id.
    pub app_id: String,
    /// The channel.
    pub channel: String,
    /// What changed.
    pub change: Change,
}

/// What changed in a channel's shared state.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// A user's first connection anywhere joined.
    Added {
        /// The user.
        user_id: String,
        /// The user's info, as JSON.
        user_info: String,
    },
    /// A user's last connection anywhere left.
    Removed {
        /// The user.
        user_id: String,
    },
    /// `terminate_connections` of the user whose channel it is, asked on node `owner`.
    Terminate {
        /// The node that closed its own connections already.
        owner: String,
    },
    /// A node's subscriber count of the channel (0: none, or the node died).
    Count {
        /// The node (owner) whose count it is.
        owner: String,
        /// Its subscribed sockets.
        count: u32,
    },
}

/// What a `sync` reply holds: every member, and every node's count.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Every member (user id, info).
    pub members: Vec<(String, String)>,
    /// Each node's (owner's) subscriber count.
    pub counts: Vec<(String, u32)>,
}

/// A channel's numbers across the cluster.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ClusterStats {
    /// Subscribed sockets on every node.
    pub subscription_count: u32,
    /// Distinct presence users on every node.
    pub user_count: u32,
}

/// Each script's body, full text (the helpers and the body) and SHA-1, made once.
fn scripts() -> &'static [(&'static str, String, String)] {
    static SCRIPTS_LOADED: std::sync::OnceLock<Vec<(&'static str, String, String)>> =
        std::sync::OnceLock::new();
    SCRIPTS_LOADED.get_or_init(|| {
        let texts = SCRIPTS
            .iter()
            .map(|body| (*body, format!("{HELPERS}{body}")));
        let with_sha = texts.map(|(body, text)| {
            let sha = redis::Script::new(&text).get_hash().to_owned();
            (body, text, sha)
        });
        with_sha.collect()
    })
}

/// `SCRIPT LOAD` of every script, for a link to send when it connects.
pub fn load_scripts() -> Vec<redis::Cmd> {
    let load =
        |(_, text, _): &(&str, String, String)| redis::cmd("SCRIPT").arg("LOAD").arg(text).clone();
    scripts().iter().map(load).collect()
}

/// The SHA-1 the heartbeat is sent by (tests tell a shard's heartbeat link by it).
pub fn heartbeat_sha() -> &'static str {
    let found = scripts().iter().find(|(body, ..)| *body == HEARTBEAT);
    found.map_or("", |(_, _, sha)| sha.as_str())
}

/// A script's command: `EVALSHA` (each link loaded every script when it connected).
fn script(body: &str) -> redis::Cmd {
    let known = scripts()
        .iter()
        .find(|(b, ..)| b.len() == body.len() && *b == body);
    let mut cmd = match known {
        Some((_, _, sha)) => redis::cmd("EVALSHA").arg(sha).clone(),
        None => redis::cmd("EVAL").arg(format!("{HELPERS}{body}")).clone(),
    };
    cmd.arg(0);
    cmd
}

impl State {
    /// The state commands of node `node_id` in this life (`instance`), under `prefix`.
    pub fn new(prefix: &str, node_id: &str, instance: u32) -> State {
        State {
            prefix: prefix.to_owned(),
            owner: format!("{node_id}/{instance:08x}"),
            node_id: node_id.to_owned(),
        }
    }

    /// This node's name in the shared state (its id and this life's number).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// How a channel is named in a node's index.
    fn entry(app_id: &str, channel: &str) -> String {
        sonic_rs::to_string(&(app_id, channel)).unwrap_or_default()
    }

    fn index(&self) -> String {
        format!("{}:node:{}", self.prefix, self.owner)
    }

    /// Sets this node's subscriber count of a channel (0 removes it). `crossed_zero`: the
    /// count went from 0 to 1 (or to 0), which also writes the node's index and may change
    /// whether the channel is occupied anywhere (one script); other counts are a plain write.
    pub fn count(
        &self,
        topic: &[u8],
        app_id: &str,
        channel: &str,
        count: u32,
        crossed_zero: bool,
    ) -> redis::Cmd {
        if crossed_zero || count == 0 {
            let mut cmd = script(OCCUPANCY);
            cmd.arg(topic).arg(&self.owner);
            cmd.arg(Self::entry(app_id, channel)).arg(self.index());
            cmd.arg(count);
            return cmd;
        }
        let mut subs = topic.to_vec();
        subs.extend_from_slice(b":subs");
        redis::cmd("HSET")
            .arg(subs)
            .arg(&self.owner)
            .arg(count)
            .clone()
    }

    /// A user's first connection on this node joined a presence channel.
    pub fn join(
        &self,
        topic: &[u8],
        app_id: &str,
        channel: &str,
        user: &str,
        info: &str,
    ) -> redis::Cmd {
        let mut cmd = script(JOIN);
        cmd.arg(topic)
            .arg(&self.owner)
            .arg(Self::entry(app_id, channel));
        cmd.arg(user).arg(info);
        cmd
    }

    /// A user's last connection on this node left a presence channel.
    pub fn leave(&self, topic: &[u8], app_id: &str, channel: &str, user: &str) -> redis::Cmd {
        let mut cmd = script(LEAVE);
        cmd.arg(topic)
            .arg(&self.owner)
            .arg(Self::entry(app_id, channel));
        cmd.arg(user);
        cmd
    }

    /// Replaces this node's share of a channel: its count (announced too with `announce_count`)
    /// and its members (user, info). The reply is a `Snapshot` (`snapshot_of`).
    pub fn sync<'a>(
        &self,
        topic: &[u8],
        (app_id, channel): (&str, &str),
        count: u32,
        announce_count: bool,
        members: impl Iterator<Item = (&'a str, &'a str)>,
    ) -> redis::Cmd {
        let mut cmd = script(SYNC);
        cmd.arg(topic).arg(&self.owner);
        cmd.arg(Self::entry(app_id, channel)).arg(self.index());
        cmd.arg(count).arg(if announce_count { "1" } else { "0" });
        for (user, info) in members {
            cmd.arg(user).arg(info);
        }
        cmd
    }

    /// Renews this node's registration for `life_ms` and its connection count of each app
    /// with a limit, and removes the share of dead nodes (the reply: `heartbeat_of`).
    pub fn heartbeat<'a>(
        &self,
        life_ms: u64,
        connections: impl Iterator<Item = (&'a str, u32)>,
    ) -> redis::Cmd {
        let mut cmd = script(HEARTBEAT);
        cmd.arg(&self.prefix).arg(&self.owner).arg(life_ms);
        cmd.arg(format!("{}/", self.node_id));
        for (app_id, count) in connections {
            cmd.arg(app_id).arg(count);
        }
        cmd
    }

    /// Announces this node's count of a channel to the nodes that serve it (for
    /// `subscription_count` events).
    pub fn announce_count(
        &self,
        topic: &[u8],
        app_id: &str,
        channel: &str,
        count: u32,
    ) -> redis::Cmd {
        let count = count.to_string();
        self.change(
            topic,
            ("count", app_id, channel, &self.owner, count.as_str()),
        )
    }

    /// Publishes a change written by this node (the Lua scripts write theirs themselves).
    fn change(&self, topic: &[u8], fields: impl serde::Serialize) -> redis::Cmd {
        let mut payload = STATE_MAGIC.to_vec();
        payload.extend_from_slice(sonic_rs::to_string(&fields).unwrap_or_default().as_bytes());
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(topic).arg(payload);
        cmd
    }

    /// Asks every node to close the connections of a user (their channel `channel`).
    pub fn terminate(&self, topic: &[u8], app_id: &str, channel: &str) -> redis::Cmd {
        self.change(topic, ("terminate", app_id, channel, &self.owner))
    }

    /// Publishes a cache channel's `payload`, kept as its last event for `ttl_ms`.
    pub fn publish_cached(&self, topic: &[u8], payload: &[u8], ttl_ms: u64) -> redis::Cmd {
        let mut cmd = script(PUBLISH_CACHED);
        cmd.arg(topic).arg(payload).arg(ttl_ms.max(1));
        cmd
    }

    /// Asks for a cache channel's last event (`cached_of`). For a subscriber (`miss_window_ms`
    /// > 0), a miss makes a `cache_miss` event for the app's webhooks, at most one per window.
    pub fn cached(
        &self,
        topic: &[u8],
        (app_id, channel): (&str, &str),
        miss_window_ms: u64,
    ) -> redis::Cmd {
        let mut cmd = script(CACHED);
        cmd.arg(topic).arg(Self::entry(app_id, channel));
        cmd.arg(miss_window_ms);
        cmd
    }

    /// An event this node alone sees, for the app's webhooks and event stream: `name`, the
    /// channel, then the event's other fields.
    pub fn event(
        &self,
        app_id: &str,
        name: &str,
        channel: &str,
        fields: &[(&str, &str)],
    ) -> redis::Cmd {
        let mut cmd = script(EVENT);
        cmd.arg(&self.prefix).arg(app_id).arg(name).arg(channel);
        for (field, value) in fields {
            cmd.arg(*field).arg(*value);
        }
        cmd
    }

    /// Sends the departures (`channel_vacated`, `member_removed`) whose delay is over, at most
    /// `most` of them (the reply: how many went).
    pub fn departures(&self, most: usize) -> redis::Cmd {
        let mut cmd = script(DEPARTURES);
        cmd.arg(&self.prefix).arg(most);
        cmd
    }

    /// Asks for the channels of this node's index (`index_of`).
    pub fn index_entries(&self) -> redis::Cmd {
        redis::cmd("SMEMBERS").arg(self.index()).clone()
    }

    /// What the scripts queue and stream, per app (`P:wh:apps`): the bits of the event types
    /// its webhooks want, its event stream's length (0: none), and the queues' bound. Every
    /// node writes it when its links connect (nodes share their apps' configuration).
    pub fn webhook_settings<'a>(
        &self,
        queue_bound: u32,
        apps: impl Iterator<Item = (&'a str, u8, u32)>,
    ) -> redis::Cmd {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(format!("{}:wh:apps", self.prefix));
        cmd.arg("#queue").arg(queue_bound);
        for (app_id, bits, stream_length) in apps {
            cmd.arg(app_id).arg(bits);
            cmd.arg(format!("{app_id}:stream")).arg(stream_length);
        }
        cmd
    }

    /// The key prefix of the cluster's keys.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Asks for each node's subscriber count of a channel (`counts_of`).
    pub fn counts(&self, topic: &[u8]) -> redis::Cmd {
        let mut subs = topic.to_vec();
        subs.extend_from_slice(b":subs");
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(subs);
        cmd
    }

    /// Asks for a channel's numbers (`stats_of`).
    pub fn channel_stats(&self, topic: &[u8]) -> redis::Cmd {
        let mut cmd = script(CHANNEL_STATS);
        cmd.arg(topic);
        cmd
    }

    /// Asks for a presence channel's members (`members_of`).
    pub fn members(&self, topic: &[u8]) -> redis::Cmd {
        let mut cmd = script(MEMBERS);
        cmd.arg(topic);
        cmd
    }

    /// Asks for an app's occupied channels whose names start with `starts` (`channels_of`).
    pub fn channels(&self, app_id: &str, starts: &str) -> redis::Cmd {
        let mut cmd = script(CHANNELS);
        cmd.arg(&self.prefix).arg(app_id).arg(starts);
        cmd
    }
}

/// The payload of a state change, as the Lua scripts (and `announce_count`) write it.
pub fn decode_change(payload: &[u8]) -> Option<StateChange> {
    let json = payload.strip_prefix(STATE_MAGIC)?;
    crate::protocol::json::check_depth(json, 4).ok()?;
    let fields: Vec<String> = sonic_rs::from_slice(json).ok()?;
    let mut fields = fields.into_iter();
    let (kind, app_id, channel, subject) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    let change = match (kind.as_str(), fields.next()) {
        ("added", Some(user_info)) if is_json(&user_info) => Change::Added {
            user_id: subject,
            user_info,
        },
        ("removed", None) => Change::Removed { user_id: subject },
        ("terminate", None) => Change::Terminate { owner: subject },
        ("count", Some(count)) => Change::Count {
            owner: subject,
            count: count.parse().ok()?,
        },
        _ => return None,
    };
    let change = StateChange {
        app_id,
        channel,
        change,
    };
    fields.next().is_none().then_some(change)
}

/// A string reply's text (bulk or simple; None for any other reply, or bytes not UTF-8).
pub fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn number(value: &Value) -> Option<u32> {
    match value {
        Value::Int(n) => u32::try_from(*n).ok(),
        _ => None,
    }
}

/// A user info from Redis goes into frames as it is: it must be one JSON value.
fn is_json(text: &str) -> bool {
    let depth = crate::protocol::json::MAX_JSON_DEPTH;
    crate::protocol::json::check_depth(text.as_bytes(), depth).is_ok()
        && sonic_rs::from_str::<sonic_rs::Value>(text).is_ok()
}

/// Every member (user id, info) from a `sync` or `members` reply; a member whose info is not
/// JSON is left out.
pub fn members_of(reply: &Value) -> Option<Vec<(String, String)>> {
    let Value::Array(items) = reply else {
        return None;
    };
    let pairs = items.chunks(2).map(|pair| match pair {
        [user, info] => Some((text(user)?, text(info)?)),
        _ => None,
    });
    let members: Option<Vec<_>> = pairs.collect();
    Some(
        members?
            .into_iter()
            .filter(|(_, info)| is_json(info))
            .collect(),
    )
}

/// Each node's (owner's) count, from a `counts` reply (a RESP3 map) or a script's flat list.
pub fn counts_of(reply: &Value) -> Option<Vec<(String, u32)>> {
    let count = |owner: &Value, n: &Value| Some((text(owner)?, text(n)?.parse().ok()?));
    match reply {
        Value::Map(pairs) => pairs.iter().map(|(o, n)| count(o, n)).collect(),
        Value::Array(items) => items
            .chunks(2)
            .map(|pair| match pair {
                [o, n] => count(o, n),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// The channels of a node's index (`index_entries`), as (app id, channel); entries that are not
/// a pair of strings are left out.
pub fn index_of(reply: &Value) -> Vec<(String, String)> {
    let (Value::Set(items) | Value::Array(items)) = reply else {
        return Vec::new();
    };
    let entry = |item: &Value| {
        let text = text(item)?;
        crate::protocol::json::check_depth(text.as_bytes(), 2).ok()?;
        sonic_rs::from_str::<(String, String)>(&text).ok()
    };
    items.iter().filter_map(entry).collect()
}

/// A `sync` reply.
pub fn snapshot_of(reply: &Value) -> Option<Snapshot> {
    let Value::Array(parts) = reply else {
        return None;
    };
    let [members, counts] = parts.as_slice() else {
        return None;
    };
    let counts = counts_of(counts)?;
    Some(Snapshot {
        members: members_of(members)?,
        counts,
    })
}

/// A `cached` reply: the payload as published and the ms it has left (None inside: nothing
/// cached; None outside: not such a reply).
pub fn cached_of(reply: &Value) -> Option<Option<(Vec<u8>, u64)>> {
    let Value::Array(items) = reply else {
        return None;
    };
    match items.as_slice() {
        [] => Some(None),
        [Value::BulkString(payload), Value::Int(ttl_ms)] => {
            Some(Some((payload.clone(), u64::try_from(*ttl_ms).unwrap_or(0))))
        }
        _ => None,
    }
}

/// A `channel_stats` reply.
pub fn stats_of(reply: &Value) -> Option<ClusterStats> {
    match reply {
        Value::Array(items) => match items.as_slice() {
            [subs, users] => Some(ClusterStats {
                subscription_count: number(subs)?,
                user_count: number(users)?,
            }),
            _ => None,
        },
        _ => None,
    }
}

/// A `channels` reply: name and numbers of each channel.
pub fn channels_of(reply: &Value) -> Option<Vec<(String, ClusterStats)>> {
    let Value::Array(items) = reply else {
        return None;
    };
    items
        .chunks(3)
        .map(|row| match row {
            [name, subs, users] => Some((
                text(name)?,
                ClusterStats {
                    subscription_count: number(subs)?,
                    user_count: number(users)?,
                },
            )),
            _ => None,
        })
        .collect()
}

/// A `heartbeat` reply: whether this node was still registered (false: it had been taken for
/// dead), and the connections on the other nodes of each app given, in order.
pub fn heartbeat_of(reply: &Value) -> Option<(bool, Vec<u32>)> {
    let Value::Array(parts) = reply else {
        return None;
    };
    let [Value::Int(known), Value::Array(others)] = parts.as_slice() else {
        return None;
    };
    let others = others.iter().map(number).collect::<Option<_>>()?;
    Some((*known != 0, others))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_decode_and_anything_else_is_refused() {
        let added = br#"SPJ["added","7","presence-a","u\/1","{\"n\":1}"]"#;
        assert_eq!(
            decode_change(added),
            Some(StateChange {
                app_id: "7".into(),
                channel: "presence-a".into(),
                change: Change::Added {
                    user_id: "u/1".into(),
                    user_info: "{\"n\":1}".into(),
                },
            })
        );
        let removed = br#"SPJ["removed","7","presence-a","u"]"#;
        let change = decode_change(removed).map(|c| c.change);
        assert!(matches!(change, Some(Change::Removed { .. })));
        let count = br#"SPJ["count","7","news","n/1","12"]"#;
        let change = decode_change(count).map(|c| c.change);
        let expected = Change::Count {
            owner: "n/1".into(),
            count: 12,
        };
        assert_eq!(change, Some(expected));
        let terminate = br##"SPJ["terminate","7","#server-to-user-u","n/1"]"##;
        let change = decode_change(terminate).map(|c| c.change);
        assert!(matches!(change, Some(Change::Terminate { .. })));
        for bad in [
            &br#"SPJ["removed","7","presence-a"]"#[..],
            br#"SPJ["removed","7","presence-a","u","x"]"#,
            br#"SPJ["added","7","presence-a","u"]"#,
            br#"SPJ["added","7","presence-a","u","{not json"]"#,
            br#"SPJ["other","7","presence-a","u"]"#,
            br#"SPJ["count","7","news","n/1","-1"]"#,
            br#"SPJ["count","7","news","n/1"]"#,
            br#"SPJ{"a":1}"#,
            br#"SPJ[1,2,3,4]"#,
            b"SPJ",
            b"SP1xxxx",
        ] {
            assert_eq!(decode_change(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn replies_decode_only_in_their_shape() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let members = Value::Array(vec![bulk("u1"), bulk("{}"), bulk("u2"), bulk("null")]);
        assert_eq!(
            members_of(&members),
            Some(vec![
                ("u1".into(), "{}".into()),
                ("u2".into(), "null".into())
            ])
        );
        assert_eq!(members_of(&Value::Array(vec![bulk("u1")])), None);
        let counts = Value::Array(vec![bulk("n/1"), bulk("4")]);
        let snapshot = snapshot_of(&Value::Array(vec![members, counts])).unwrap();
        assert_eq!(snapshot.counts, vec![("n/1".to_owned(), 4)]);
        assert_eq!(snapshot.members.len(), 2);
        let bad_count = Value::Array(vec![Value::Array(vec![]), Value::Array(vec![bulk("n")])]);
        assert_eq!(snapshot_of(&bad_count), None);
        let stats = Value::Array(vec![Value::Int(3), Value::Int(2)]);
        let expected = ClusterStats {
            subscription_count: 3,
            user_count: 2,
        };
        assert_eq!(stats_of(&stats), Some(expected));
        assert_eq!(stats_of(&Value::Int(3)), None);
        let rows = Value::Array(vec![bulk("a"), Value::Int(1), Value::Int(0)]);
        assert_eq!(channels_of(&rows).map(|r| r.len()), Some(1));
        let beat = Value::Array(vec![Value::Int(0), Value::Array(vec![Value::Int(5)])]);
        assert_eq!(heartbeat_of(&beat), Some((false, vec![5])));
        assert_eq!(heartbeat_of(&Value::Int(1)), None);
    }
}
