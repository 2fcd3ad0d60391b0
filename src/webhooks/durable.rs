//! Webhooks of a cluster, kept in Redis until delivered. Each app's queue is a stream
//! (`{prefix}:wh:{app_id}`) that the nodes' Lua scripts append to the moment an event is decided
//! (the 3-second rule and the cache-miss window are decided there too, for the whole cluster).
//! Every node reads it through one consumer group, under its own name (`owner`), so each entry
//! goes to one node; an entry is acknowledged and deleted only once every webhook that wants it
//! has its answer. A node keeps the entries it holds fresh (`XCLAIM … JUSTID`); entries of a
//! node that stopped doing so, because it died, are claimed by a survivor after `claim_after`.
//!
//! This thread is the hub's only link to Redis (a blocking connection; no other runtime).

use super::entries::{claimed_of, int_of, pairs_of, streams_of, string_of, StreamEntry};
use super::event::Event;
use super::hub::Inbox;
use crate::cluster::state::{self, State};
use crate::config::Config;
use redis::Value;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The consumer group every node reads the webhook queues through.
const GROUP: &str = "shardpush";
/// Entries read at once.
const READ_COUNT: usize = 100;
/// How long a read waits for new entries (the thread's other work waits this long at most).
const READ_BLOCK_MS: u64 = 200;
/// How often due departures are looked for.
const DEPARTURES_EVERY: Duration = Duration::from_millis(250);
/// How often the count of events Redis refused to queue is looked at.
const DROPPED_EVERY: Duration = Duration::from_secs(5);
/// How often consumers of dead nodes with nothing pending are removed from the group.
const CONSUMERS_EVERY: Duration = Duration::from_secs(60);

/// What the hub asks of Redis. Orders are kept until Redis has taken them (a failed one is
/// sent again after reconnecting: acknowledging twice does no harm).
pub enum ToRedis {
    /// These entries are done with (delivered, or given up): acknowledge and delete them.
    Done {
        /// The app's index.
        app: u32,
        /// Entry ids.
        ids: Vec<String>,
    },
    /// The node is stopping: report here once every order before this one is applied.
    Flush(SyncSender<()>),
}

/// What the thread shares with the hub.
pub struct Shared {
    /// Per app, the events the hub can take on.
    pub room: Arc<[AtomicUsize]>,
    /// Per app, the ids of the entries the hub holds (kept claimed by this node).
    pub held_ids: Arc<Mutex<Vec<Vec<String>>>>,
}

/// An entry read from an app's queue.
pub struct Entry {
    /// The stream entry id (also the webhook's id for de-duplicating receivers).
    pub id: String,
    /// The event.
    pub event: Event,
    /// When the event happened.
    pub time_ms: u64,
}

/// One app as the queue knows it.
struct QueueApp {
    app_id: String,
    /// Event types written to its queue (`P:wh:apps`).
    bits: u8,
    /// Its event stream's length (0: none).
    stream_length: u32,
}

/// The thread's settings.
pub struct Durable {
    client: redis::Client,
    state: State,
    apps: Vec<QueueApp>,
    queue_bound: u32,
    claim_after: Duration,
}

impl Durable {
    /// For this node (`instance` as in `Cluster::new`) of the configured cluster; `bits` are
    /// each app's event types to queue.
    pub fn new(config: &Config, instance: u32, bits: &[u8]) -> Option<Durable> {
        let cluster = config.cluster.as_ref()?;
        let client = redis::Client::open(config.redis()?).ok()?;
        let apps = config.apps.iter().zip(bits).map(|(app, &bits)| QueueApp {
            app_id: app.id.clone(),
            bits,
            stream_length: if app.event_stream {
                app.event_stream_length
            } else {
                0
            },
        });
        Some(Durable {
            client,
            state: State::new(&cluster.prefix, &cluster.node_id, instance),
            apps: apps.collect(),
            queue_bound: config.webhooks.max_pending_in_redis,
            claim_after: Duration::from_secs(config.webhooks.claim_after as u64),
        })
    }

    /// How often the hub touches what it holds: a third of the time after which others claim.
    pub fn touch_every(&self) -> Duration {
        self.claim_after / 3
    }

    fn queue_key(&self, app: usize) -> String {
        format!("{}:wh:{{{}}}", self.state.prefix(), self.apps[app].app_id)
    }

    /// Apps whose webhooks have a queue to read.
    fn queued_apps(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.apps.len()).filter(|&i| self.apps[i].bits != 0)
    }

    /// The thread: (re)connects, then serves the hub until it is gone.
    pub fn run(self, hub: SyncSender<Inbox>, orders: Receiver<ToRedis>, shared: Shared) {
        let mut failing = false;
        let mut pause = Duration::from_millis(100);
        let mut backlog = VecDeque::new();
        loop {
            let result = self.connect().and_then(|mut con| {
                if std::mem::take(&mut failing) {
                    crate::log_info!("webhook queue: connected to Redis again");
                }
                pause = Duration::from_millis(100);
                self.serve(&mut con, &hub, &orders, &mut backlog, &shared)
            });
            match result {
                Ok(()) => return,
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        crate::log_warn!("webhook queue: Redis: {e}; retrying");
                    }
                }
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_secs(2));
            if !take_orders(&orders, &mut backlog) {
                return;
            }
        }
    }

    fn connect(&self) -> Result<redis::Connection, String> {
        let timeout = Duration::from_secs(2);
        let mut con = (self.client.get_connection_with_timeout(timeout)).map_err(text)?;
        let io = Some(Duration::from_secs(5));
        con.set_read_timeout(io).map_err(text)?;
        con.set_write_timeout(io).map_err(text)?;
        self.set_up(&mut con)?;
        Ok(con)
    }

    /// The scripts, the apps' settings for them, and the group on every queue (again after
    /// Redis lost them).
    fn set_up(&self, con: &mut redis::Connection) -> Result<(), String> {
        let mut setup = redis::pipe();
        for load in state::load_scripts() {
            setup.add_command(load).ignore();
        }
        let apps = self.apps.iter();
        let settings = apps.map(|a| (a.app_id.as_str(), a.bits, a.stream_length));
        let settings = self.state.webhook_settings(self.queue_bound, settings);
        setup.add_command(settings).ignore();
        setup.query::<()>(con).map_err(text)?;
        for app in self.queued_apps() {
            let mut create = redis::cmd("XGROUP");
            // From the stream's start, so nothing queued before the group existed is missed.
            create.arg("CREATE").arg(self.queue_key(app)).arg(GROUP);
            create.arg("0").arg("MKSTREAM");
            match create.query::<Value>(con) {
                Ok(_) => {}
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(text(e)),
            }
        }
        Ok(())
    }

    fn serve(
        &self,
        con: &mut redis::Connection,
        hub: &SyncSender<Inbox>,
        orders: &Receiver<ToRedis>,
        backlog: &mut VecDeque<ToRedis>,
        shared: &Shared,
    ) -> Result<(), String> {
        let long_ago = Instant::now() - CONSUMERS_EVERY;
        let (mut departures, mut claimed, mut dropped_at, mut touched) =
            (long_ago, long_ago, long_ago, long_ago);
        let mut consumers = Instant::now();
        let mut dropped_seen: Vec<u64> = vec![0; self.apps.len()];
        let claim_every = self.touch_every().min(Duration::from_secs(5));
        loop {
            if !take_orders(orders, backlog) {
                return Ok(());
            }
            while let Some(order) = backlog.front() {
                self.apply(con, order)?;
                backlog.pop_front();
            }
            let now = Instant::now();
            if now.duration_since(touched) >= self.touch_every() {
                touched = now;
                self.touch(con, &shared.held_ids)?;
            }
            if now.duration_since(departures) >= DEPARTURES_EVERY {
                departures = now;
                self.send_departures(con)?;
            }
            if now.duration_since(claimed) >= claim_every {
                claimed = now;
                for app in self.queued_apps() {
                    self.claim(con, app, hub, &shared.room[app])?;
                }
            }
            if now.duration_since(dropped_at) >= DROPPED_EVERY {
                dropped_at = now;
                self.tell_dropped(con, &mut dropped_seen)?;
            }
            if now.duration_since(consumers) >= CONSUMERS_EVERY {
                consumers = now;
                for app in self.queued_apps() {
                    self.forget_dead_consumers(con, app)?;
                }
            }
            self.read(con, hub, &shared.room)?;
        }
    }

    fn apply(&self, con: &mut redis::Connection, order: &ToRedis) -> Result<(), String> {
        match order {
            ToRedis::Done { app, ids } => {
                let key = self.queue_key(*app as usize);
                let mut pipe = redis::pipe();
                pipe.cmd("XACK").arg(&key).arg(GROUP).arg(ids).ignore();
                pipe.cmd("XDEL").arg(&key).arg(ids).ignore();
                pipe.query::<()>(con).map_err(text)
            }
            ToRedis::Flush(done) => {
                let _ = done.try_send(());
                Ok(())
            }
        }
    }

    /// Keeps the entries the hub holds claimed by this node (`XCLAIM … JUSTID` resets their
    /// idle time), so no other node takes them over while they are on their way.
    fn touch(
        &self,
        con: &mut redis::Connection,
        held_ids: &Mutex<Vec<Vec<String>>>,
    ) -> Result<(), String> {
        let held = held_ids.lock().map(|ids| ids.clone()).unwrap_or_default();
        for (app, ids) in held.iter().enumerate() {
            for ids in ids.chunks(1000) {
                let mut claim = redis::cmd("XCLAIM");
                claim.arg(self.queue_key(app)).arg(GROUP);
                claim.arg(self.state.owner()).arg(0).arg(ids).arg("JUSTID");
                claim.query::<Value>(con).map_err(text)?;
            }
        }
        Ok(())
    }

    /// Departures whose 3 s are over, decided and queued by a script (any node may run it).
    fn send_departures(&self, con: &mut redis::Connection) -> Result<(), String> {
        const MOST: i64 = 200;
        for _ in 0..10 {
            let sent: i64 = self
                .state
                .departures(MOST as usize)
                .query(con)
                .map_err(text)?;
            if sent < MOST {
                break;
            }
        }
        Ok(())
    }

    /// New entries of the queues of the apps that have room, for the hub (at most `READ_COUNT`
    /// and the least room of them per queue). Waits up to `READ_BLOCK_MS` for some.
    fn read(
        &self,
        con: &mut redis::Connection,
        hub: &SyncSender<Inbox>,
        room: &[AtomicUsize],
    ) -> Result<(), String> {
        let room_of = |app: usize| room[app].load(Ordering::Relaxed);
        let apps: Vec<usize> = self.queued_apps().filter(|&a| room_of(a) > 0).collect();
        let Some(take) = apps.iter().map(|&a| room_of(a)).min() else {
            std::thread::sleep(Duration::from_millis(READ_BLOCK_MS / 4));
            return Ok(());
        };
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP").arg(GROUP).arg(self.state.owner());
        read.arg("COUNT").arg(take.min(READ_COUNT));
        read.arg("BLOCK").arg(READ_BLOCK_MS).arg("STREAMS");
        for &app in &apps {
            read.arg(self.queue_key(app));
        }
        for _ in &apps {
            read.arg(">");
        }
        let reply = match read.query::<Value>(con) {
            Ok(reply) => reply,
            // Redis restarted empty (or was flushed): the queues and their group are new.
            Err(e) if e.code() == Some("NOGROUP") => return self.set_up(con),
            Err(e) => return Err(text(e)),
        };
        for (key, entries) in streams_of(&reply) {
            let Some(app) = apps.iter().copied().find(|&a| self.queue_key(a) == key) else {
                continue;
            };
            self.hand_over(con, app, entries, hub)?;
        }
        Ok(())
    }

    /// Entries idle for `claim_after` in another node's hands (it died): taken over.
    fn claim(
        &self,
        con: &mut redis::Connection,
        app: usize,
        hub: &SyncSender<Inbox>,
        room: &AtomicUsize,
    ) -> Result<(), String> {
        let mut cursor = "0-0".to_string();
        let mut left = room.load(Ordering::Relaxed);
        for _ in 0..10 {
            let take = left.min(READ_COUNT);
            if take == 0 {
                break;
            }
            let mut claim = redis::cmd("XAUTOCLAIM");
            claim
                .arg(self.queue_key(app))
                .arg(GROUP)
                .arg(self.state.owner());
            claim.arg(self.claim_after.as_millis() as u64).arg(&cursor);
            claim.arg("COUNT").arg(take);
            let reply = match claim.query::<Value>(con) {
                Ok(reply) => reply,
                Err(e) if e.code() == Some("NOGROUP") => return self.set_up(con),
                Err(e) => return Err(text(e)),
            };
            let (next, entries) = claimed_of(&reply);
            left = left.saturating_sub(entries.len());
            self.hand_over(con, app, entries, hub)?;
            match next {
                Some(next) if next != "0-0" => cursor = next,
                _ => break,
            }
        }
        Ok(())
    }

    /// Gives readable entries to the hub; acknowledges (and logs) those that are not.
    fn hand_over(
        &self,
        con: &mut redis::Connection,
        app: usize,
        entries: Vec<StreamEntry>,
        hub: &SyncSender<Inbox>,
    ) -> Result<(), String> {
        let mut good = Vec::with_capacity(entries.len());
        let mut bad = Vec::new();
        for (id, fields) in entries {
            match Event::from_entry(&fields) {
                Some((event, time_ms)) => good.push(Entry { id, event, time_ms }),
                None => bad.push(id),
            }
        }
        if !bad.is_empty() {
            crate::log_warn!(
                queue = %self.queue_key(app),
                "webhook queue: {} unreadable entries skipped (first: {})",
                bad.len(),
                bad[0]
            );
            self.apply(
                con,
                &ToRedis::Done {
                    app: app as u32,
                    ids: bad,
                },
            )?;
        }
        if !good.is_empty() {
            let entries = Inbox::Entries {
                app: app as u32,
                entries: good,
            };
            hub.send(entries)
                .map_err(|_| "the hub stopped".to_string())?;
        }
        Ok(())
    }

    /// Logs how many events Redis refused to queue (over `max_pending_in_redis`) since last told.
    fn tell_dropped(&self, con: &mut redis::Connection, seen: &mut [u64]) -> Result<(), String> {
        let key = format!("{}:wh:dropped", self.state.prefix());
        let ids: Vec<&str> = self.apps.iter().map(|a| a.app_id.as_str()).collect();
        let counts: Vec<Option<u64>> = redis::cmd("HMGET")
            .arg(&key)
            .arg(&ids)
            .query(con)
            .map_err(text)?;
        for ((count, seen), app) in counts.into_iter().zip(seen.iter_mut()).zip(&self.apps) {
            let count = count.unwrap_or(0);
            if count > *seen {
                crate::log_warn!(
                    app = %app.app_id,
                    "webhooks: {} events not queued in Redis since the last report (the app's \
                     queue held max_pending_in_redis)",
                    count - *seen
                );
            }
            *seen = count;
        }
        Ok(())
    }

    /// Removes consumers (earlier lives of nodes) that hold nothing and have been idle long.
    fn forget_dead_consumers(&self, con: &mut redis::Connection, app: usize) -> Result<(), String> {
        let key = self.queue_key(app);
        let mut info = redis::cmd("XINFO");
        info.arg("CONSUMERS").arg(&key).arg(GROUP);
        let Ok(Value::Array(consumers)) = info.query::<Value>(con) else {
            return Ok(());
        };
        let idle_limit = (self.claim_after * 10).as_millis() as i64;
        for consumer in consumers {
            let fields = pairs_of(&consumer);
            let field = |name: &str| fields.iter().find(|(f, _)| f == name).map(|(_, v)| v);
            let name = field("name").and_then(|v| string_of(v));
            let pending = field("pending").and_then(|v| int_of(v));
            let idle = field("idle").and_then(|v| int_of(v));
            if let (Some(name), Some(0), Some(idle)) = (name, pending, idle) {
                if idle > idle_limit && name != self.state.owner() {
                    let mut forget = redis::cmd("XGROUP");
                    forget.arg("DELCONSUMER").arg(&key).arg(GROUP).arg(name);
                    forget.query::<Value>(con).map_err(text)?;
                }
            }
        }
        Ok(())
    }
}

/// Moves the hub's new orders into `backlog`; false once the hub is gone.
fn take_orders(orders: &Receiver<ToRedis>, backlog: &mut VecDeque<ToRedis>) -> bool {
    loop {
        match orders.try_recv() {
            Ok(order) => backlog.push_back(order),
            Err(TryRecvError::Empty) => return true,
            Err(TryRecvError::Disconnected) => return false,
        }
    }
}

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}
