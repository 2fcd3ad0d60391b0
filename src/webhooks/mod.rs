//! Webhooks (reference §6): shards emit events without ever waiting; a hub thread applies
//! the 3-second rule and the cache-miss window, picks each app's webhooks that want an event,
//! batches, signs, and hands requests to worker threads, retrying failures with backoff.
//!
//! ```text
//! shard ──append (EventQueue)──▶ hub ──request──▶ workers ──POST──▶ receiver
//!                                 ▲                  │
//!                                 └──── outcome ─────┘
//! ```
//!
//! On a single node everything pending lives in the hub's memory, bounded per app by
//! `[webhooks] max_pending`; what exceeds a bound is counted and logged. In a cluster the
//! events are decided and queued in Redis (`durable`), and the hub reads them from there.

mod durable;
pub mod entries;
pub mod event;
mod gate;
mod hub;
mod sender;

pub use event::Event;

use crate::config::{AppConfig, Config, WebhookEventType};
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Messages (a worker's outcome, entries from Redis) the hub may have waiting.
const INBOX_CAPACITY: usize = 16_384;
/// Events the shards may have handed over and the hub not taken yet.
const EVENTS_CAPACITY: usize = 65_536;

/// Events handed over by the shards. A shard only appends (a lock that is almost never
/// contended, no system call); the hub takes them every few milliseconds. Waking the hub's
/// thread for each event instead, on the shard's own core, cost more than the event's whole
/// handling (two context switches).
pub type EventQueue = Mutex<Vec<(u32, Event)>>;

/// One app's webhooks, as the hub and the workers use them.
pub struct AppHooks {
    key: String,
    secret: String,
    batch: bool,
    hooks: Vec<Hook>,
}

/// One webhook of an app.
struct Hook {
    url: String,
    /// The URL as logs show it: without its query, which may carry a token.
    shown: String,
    /// Bits of the event types it wants.
    types: u8,
    starts_with: String,
    ends_with: String,
    headers: Vec<(String, String)>,
}

impl Hook {
    fn wants(&self, event: &Event) -> bool {
        let channel = event.channel();
        self.types & event.kind().bit() != 0
            && channel.starts_with(&self.starts_with)
            && channel.ends_with(&self.ends_with)
    }
}

impl AppHooks {
    fn of(app: &AppConfig) -> AppHooks {
        let hooks = app.webhooks.iter().map(|h| Hook {
            url: h.url.clone(),
            shown: crate::log::redact_url(h.url.split(['?', '#']).next().unwrap_or_default()),
            types: h.event_types.iter().fold(0, |bits, t| bits | t.bit()),
            starts_with: h.filter.channel_name_starts_with.clone(),
            ends_with: h.filter.channel_name_ends_with.clone(),
            headers: h.headers.clone().into_iter().collect(),
        });
        AppHooks {
            key: app.key.clone(),
            secret: app.secret.clone(),
            batch: app.batch_webhooks,
            hooks: hooks.collect(),
        }
    }

    /// The event types the shards have to emit for this app: those a webhook wants, and the
    /// other half of each pair the 3-second rule matches up (a quick re-occupy cancels a
    /// vacate, so vacates are needed even by a webhook that only wants occupies).
    fn emitted_types(&self) -> u8 {
        use WebhookEventType::*;
        let mut bits = self.hooks.iter().fold(0, |bits, h| bits | h.types);
        for (a, b) in [
            (ChannelOccupied, ChannelVacated),
            (MemberAdded, MemberRemoved),
        ] {
            if bits & (a.bit() | b.bit()) != 0 {
                bits |= a.bit() | b.bit();
            }
        }
        bits
    }
}

/// One request: a signed body for one webhook, the same bytes on every attempt.
pub struct Request {
    app: u32,
    hook: usize,
    /// Events in the body.
    events: usize,
    /// In a cluster: the queue entries of the events.
    entries: Vec<String>,
    body: Vec<u8>,
    signature: String,
    id: String,
    /// When the body was made (its `time_ms`); retries stop `retry_for` after it.
    time_ms: u64,
    /// Attempts made so far.
    attempts: u32,
}

/// What became of webhook events, for the metrics and the exit report.
#[derive(Default)]
pub struct Stats {
    /// Events held by this node for delivery (waiting, batched, in flight, retrying, or in the
    /// 3 s delay), as of the hub's last turn.
    pub pending: AtomicU64,
    /// Events in requests that got a 2xx.
    pub delivered: AtomicU64,
    /// Events given up on: refused by the receiver (4xx), or still failing after `retry_for`.
    pub failed: AtomicU64,
    /// Events dropped because a bound was reached (the hub's inbox, `max_pending`).
    pub dropped: AtomicU64,
    /// Attempts that failed and were tried again.
    pub retried: AtomicU64,
}

impl Stats {
    /// Counts `n` dropped events; logs the first drop and each time the total doubles.
    pub fn drop_events(&self, n: u64, why: &str) {
        let before = self.dropped.fetch_add(n, Ordering::Relaxed);
        let after = before + n;
        if before == 0 || (before + 1).next_power_of_two() <= after {
            crate::log_warn!(
                dropped = after,
                "webhooks: {after} events dropped so far ({why})"
            );
        }
    }
}

/// The shards' handle on the webhooks: knows which events are wanted and passes them on.
pub struct Webhooks {
    inbox: SyncSender<hub::Inbox>,
    events: Arc<EventQueue>,
    /// Per app, the event types the shards emit (see `AppHooks::emitted_types`).
    emitted: Vec<u8>,
    /// Per app, the event types its webhooks take (with the pairs of the 3-second rule).
    queued: Vec<u8>,
    /// Delivery counts.
    pub stats: Arc<Stats>,
    /// Told when the hub has nothing left, after `finish`.
    finished: Mutex<Receiver<()>>,
}

impl Webhooks {
    /// Starts the hub and its workers (and in a cluster, the thread of the queue in Redis);
    /// None when no app has a webhook or an event stream. `instance` is this process's number
    /// (the socket id prefix, also the cluster's instance).
    pub fn start(
        config: &Config,
        instance: u32,
        console: Option<Arc<crate::feed::Console>>,
    ) -> io::Result<Option<Webhooks>> {
        let streams = |a: &AppConfig| a.event_stream && config.cluster.is_some();
        if config
            .apps
            .iter()
            .all(|a| a.webhooks.is_empty() && !streams(a))
        {
            return Ok(None);
        }
        let apps: Arc<[AppHooks]> = config.apps.iter().map(AppHooks::of).collect();
        let queued: Vec<u8> = apps.iter().map(AppHooks::emitted_types).collect();
        // An event stream takes every kind of event.
        let every_kind = u8::MAX;
        let emitted = (config.apps.iter().zip(&queued))
            .map(|(app, &bits)| if streams(app) { every_kind } else { bits })
            .collect();
        let settings = &config.webhooks;
        let agent = sender::agent(settings).map_err(io::Error::other)?;
        let stats = Arc::new(Stats::default());
        let (inbox, inbox_rx) = mpsc::sync_channel(INBOX_CAPACITY);
        let events = Arc::new(EventQueue::default());
        let hub_events = events.clone();
        let (jobs, jobs_rx) = mpsc::channel();
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        // At least `max_in_flight_per_app` workers per app with webhooks: no app ever waits
        // for workers that other apps' slow receivers hold.
        let with_hooks = apps.iter().filter(|a| !a.hooks.is_empty()).count();
        let workers = settings
            .workers
            .max(with_hooks * settings.max_in_flight_per_app);
        for i in 0..workers {
            let (jobs, hub, agent, apps) =
                (jobs_rx.clone(), inbox.clone(), agent.clone(), apps.clone());
            std::thread::Builder::new()
                .name(format!("webhook-{i}"))
                .spawn(move || sender::work(jobs, hub, agent, apps))?;
        }
        let (finished_tx, finished) = mpsc::sync_channel(1);
        let durable = match durable::Durable::new(config, instance, &queued) {
            Some(queue) => {
                let (orders, orders_rx) = mpsc::channel();
                let room: Arc<[AtomicUsize]> = apps.iter().map(|_| AtomicUsize::new(0)).collect();
                let held_ids = Arc::new(Mutex::new(Vec::new()));
                let every = queue.touch_every();
                let link = hub::DurableLink::new(orders, room.clone(), held_ids.clone(), every);
                let hub = inbox.clone();
                std::thread::Builder::new()
                    .name("webhook-queue".into())
                    .spawn(move || queue.run(hub, orders_rx, durable::Shared { room, held_ids }))?;
                Some(link)
            }
            None => None,
        };
        let hub = hub::Hub::new(
            apps,
            settings.clone(),
            stats.clone(),
            instance,
            jobs,
            durable,
            console,
        );
        std::thread::Builder::new()
            .name("webhooks".into())
            .spawn(move || hub.run(inbox_rx, hub_events, finished_tx))?;
        Ok(Some(Webhooks {
            inbox,
            events,
            emitted,
            queued,
            stats,
            finished: Mutex::new(finished),
        }))
    }

    /// Whether the shards emit events of this type for this app (for its webhooks or, in a
    /// cluster, its event stream).
    #[inline]
    pub fn wants(&self, app: u32, kind: WebhookEventType) -> bool {
        self.emitted
            .get(app as usize)
            .is_some_and(|bits| bits & kind.bit() != 0)
    }

    /// The event types the app's webhooks take, as bits (`WebhookEventType::bit`).
    pub fn queued(&self, app: u32) -> u8 {
        self.queued.get(app as usize).copied().unwrap_or(0)
    }

    /// Hands a shard's events (app, event) to the hub in one message, never waiting: when
    /// the hub is that far behind, they are dropped and counted.
    pub fn emit_all(&self, mut events: Vec<(u32, Event)>) {
        let n = events.len() as u64;
        let Ok(mut queue) = self.events.lock() else {
            return self.stats.drop_events(n, "the hub stopped");
        };
        if queue.len() + events.len() > EVENTS_CAPACITY {
            drop(queue);
            return self.stats.drop_events(n, "the hub was that far behind");
        }
        queue.append(&mut events);
    }

    /// At exit: sends what waits (the 3 s delays end now: the server is leaving), and waits up
    /// to `max` for the deliveries. Returns the events still undelivered.
    pub fn finish(&self, max: Duration) -> u64 {
        let _ = self.inbox.send(hub::Inbox::Finish);
        let Ok(finished) = self.finished.lock() else {
            return 0;
        };
        match finished.recv_timeout(max) {
            Ok(()) => 0,
            Err(_) => {
                let (reply, pending) = mpsc::sync_channel(1);
                let _ = self.inbox.send(hub::Inbox::Pending(reply));
                pending.recv_timeout(Duration::from_secs(1)).unwrap_or(0)
            }
        }
    }
}
