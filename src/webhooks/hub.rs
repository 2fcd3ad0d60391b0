//! The hub thread: every pending webhook passes through here. It turns events into signed
//! requests (one per webhook that wants the event, or a batch), keeps each app within its
//! requests in flight, and schedules retries; the workers only send.

use super::durable::{Entry, ToRedis};
use super::event::{self, Event};
use super::gate::Gate;
use super::sender::Outcome;
use super::{AppHooks, EventQueue, Request, Stats};
use crate::auth::hmac_sha256_hex;
use crate::config::WebhooksConfig;
use crate::feed::{Console, Note};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Longest wait between retries of one request.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The hub looks at the shards' events this often while they come, and after a quiet second
/// at least every `QUIET_WAKE` (so an event waits a few ms, at most 50 ms).
const BUSY_WAKE: Duration = Duration::from_millis(2);
const QUIET_WAKE: Duration = Duration::from_millis(50);
const QUIET_AFTER: Duration = Duration::from_secs(1);

/// What the hub is told.
pub enum Inbox {
    /// Entries read from an app's queue in Redis (a cluster).
    Entries {
        /// The app's index in the configuration.
        app: u32,
        /// The entries, in order.
        entries: Vec<Entry>,
    },
    /// A worker finished an attempt.
    Done {
        /// The request it sent.
        request: Request,
        /// How it went.
        outcome: Outcome,
    },
    /// The server is stopping: send everything now, then report when nothing is left.
    Finish,
    /// How many events are still pending?
    Pending(SyncSender<u64>),
}

/// What the operator has been told about one webhook's receiver: one line when it starts
/// failing and one when it recovers, and give-ups summed over `GIVE_UP_LOG_EVERY`.
#[derive(Default)]
struct Health {
    failing: bool,
    given_up_untold: u64,
    given_up_told_at: Option<Instant>,
}

/// Give-ups of one webhook are logged at most this often (with their count).
const GIVE_UP_LOG_EVERY: Duration = Duration::from_secs(10);

/// Events gathering for one webhook of an app with `batch_webhooks`.
#[derive(Default)]
struct Batch {
    events: Vec<Vec<u8>>,
    /// In a cluster: the queue entries of the events.
    entries: Vec<String>,
    /// In a cluster: when the earliest event happened.
    time_ms: Option<u64>,
    /// When the batch goes out (set by its first event).
    deadline: Option<Instant>,
}

/// The hub's state; owned by its thread.
pub struct Hub {
    apps: Arc<[AppHooks]>,
    settings: WebhooksConfig,
    stats: Arc<Stats>,
    workers: Sender<Request>,
    gate: Gate,
    /// `[app][hook]`.
    batches: Vec<Vec<Batch>>,
    /// `[app][hook]`.
    health: Vec<Vec<Health>>,
    /// Requests ready to go, per app.
    ready: Vec<VecDeque<Request>>,
    in_flight: Vec<usize>,
    /// Requests waiting to be retried, by due time (the number orders equal times).
    retries: BinaryHeap<Reverse<(Instant, u64)>>,
    retrying: ahash::AHashMap<u64, Request>,
    /// Per app, events held in batches, ready queues, retries and in flight (the gate counts
    /// its own). Each app has its own bound, so one app's dead receiver never holds up another.
    held: Vec<usize>,
    id_prefix: String,
    next_id: u64,
    finishing: bool,
    /// The end of the finish was reported (or asked of the Redis thread).
    finish_told: bool,
    /// In a cluster: the queue in Redis.
    durable: Option<DurableLink>,
    /// The debug console's log, told of each attempt (None: the console is off).
    console: Option<Arc<Console>>,
}

/// The hub's side of the Redis queue (a cluster).
pub struct DurableLink {
    /// Orders for the Redis thread.
    pub orders: Sender<ToRedis>,
    /// Per app, the events the hub can take on; the Redis thread reads no more than this.
    pub room: Arc<[AtomicUsize]>,
    /// The ids of the entries held here, per app, as of the last look: the Redis thread keeps
    /// them claimed (only the latest list matters, so a Redis outage piles up nothing).
    pub held_ids: Arc<Mutex<Vec<Vec<String>>>>,
    /// How often `held_ids` is renewed.
    pub touch_every: Duration,
    touched_at: Instant,
    /// Per app and entry id, the requests that still carry it.
    refs: ahash::AHashMap<(u32, String), usize>,
}

impl DurableLink {
    /// The link for a Redis thread taking `orders`.
    pub fn new(
        orders: Sender<ToRedis>,
        room: Arc<[AtomicUsize]>,
        held_ids: Arc<Mutex<Vec<Vec<String>>>>,
        touch_every: Duration,
    ) -> Self {
        DurableLink {
            orders,
            room,
            held_ids,
            touch_every,
            touched_at: Instant::now(),
            refs: ahash::AHashMap::new(),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The wait before attempt `attempts + 1`: 1 s, doubling, at most a minute.
pub fn backoff(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(6);
    Duration::from_secs(1 << exp).min(MAX_BACKOFF)
}

impl Hub {
    /// A hub for these apps; `id_prefix` makes webhook ids unique to this process.
    pub fn new(
        apps: Arc<[AppHooks]>,
        settings: WebhooksConfig,
        stats: Arc<Stats>,
        id_prefix: u32,
        workers: Sender<Request>,
        durable: Option<DurableLink>,
        console: Option<Arc<Console>>,
    ) -> Hub {
        let app_count = apps.len();
        let batches = apps
            .iter()
            .map(|a| a.hooks.iter().map(|_| Batch::default()).collect())
            .collect();
        let health = apps
            .iter()
            .map(|a| a.hooks.iter().map(|_| Health::default()).collect())
            .collect();
        Hub {
            gate: Gate::new(Duration::from_secs(settings.cache_miss_window as u64)),
            ready: apps.iter().map(|_| VecDeque::new()).collect(),
            in_flight: vec![0; apps.len()],
            batches,
            health,
            apps,
            settings,
            stats,
            workers,
            retries: BinaryHeap::new(),
            retrying: ahash::AHashMap::new(),
            held: vec![0; app_count],
            id_prefix: format!("{id_prefix}-{:x}", now_ms()),
            next_id: 0,
            finishing: false,
            finish_told: false,
            durable,
            console,
        }
    }

    /// The thread's loop: until every sender is gone.
    pub fn run(
        mut self,
        inbox: Receiver<Inbox>,
        events: Arc<EventQueue>,
        finished: SyncSender<()>,
    ) {
        let mut last_event = Instant::now() - QUIET_AFTER;
        let mut taken = Vec::new();
        loop {
            let now = Instant::now();
            let poll = match now.duration_since(last_event) < QUIET_AFTER {
                true => BUSY_WAKE,
                false => QUIET_WAKE,
            };
            let wait = self.next_wake(now + poll).saturating_duration_since(now);
            match inbox.recv_timeout(wait) {
                Ok(message) => self.handle(message),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            // Whatever else already arrived, before scheduling.
            while let Ok(message) = inbox.try_recv() {
                self.handle(message);
            }
            if let Ok(mut queue) = events.lock() {
                std::mem::swap(&mut *queue, &mut taken);
            }
            if !taken.is_empty() {
                last_event = Instant::now();
            }
            for (app, event) in taken.drain(..) {
                self.accept(app, event);
            }
            self.run_due(Instant::now());
            self.dispatch();
            self.keep_entries();
            let pending = self.pending() as u64;
            self.stats
                .pending
                .store(pending, std::sync::atomic::Ordering::Relaxed);
            if self.finishing && self.pending() == 0 && !self.finish_told {
                self.finish_told = true;
                match &self.durable {
                    // Done once the Redis thread has acknowledged everything delivered.
                    Some(durable) => {
                        let _ = durable.orders.send(ToRedis::Flush(finished.clone()));
                    }
                    None => {
                        let _ = finished.try_send(());
                    }
                }
            }
        }
    }

    fn handle(&mut self, message: Inbox) {
        match message {
            Inbox::Entries { app, entries } => {
                for entry in entries {
                    self.accept_entry(app, entry);
                }
            }
            Inbox::Done { request, outcome } => self.done(request, outcome),
            Inbox::Finish => self.finishing = true,
            Inbox::Pending(reply) => {
                let _ = reply.try_send(self.pending() as u64);
            }
        }
    }

    /// Events not yet delivered or given up on.
    fn pending(&self) -> usize {
        self.held.iter().sum::<usize>() + self.gate.waiting()
    }

    /// Events of one app not yet delivered or given up on.
    fn pending_of(&self, app: u32) -> usize {
        let held = self.held.get(app as usize).copied().unwrap_or(0);
        held + self.gate.waiting_of(app)
    }

    fn accept(&mut self, app: u32, event: Event) {
        let full = self.pending_of(app) >= self.settings.max_pending;
        // A return still goes through the gate when the app is full: cancelling the departure
        // it matches frees room and keeps a false departure from being sent.
        if full && Gate::is_departure(&event) {
            return self
                .stats
                .drop_events(1, "an app had max_pending events waiting");
        }
        let Some(event) = self.gate.admit(app, event, Instant::now()) else {
            return;
        };
        if full {
            return self
                .stats
                .drop_events(1, "an app had max_pending events waiting");
        }
        self.route(app, &event, None);
    }

    /// An entry of the app's queue in Redis: Redis already applied the gate's rules.
    fn accept_entry(&mut self, app: u32, entry: Entry) {
        let Some(durable) = &mut self.durable else {
            return;
        };
        let key = (app, entry.id);
        // Claimed again while still held here (a late touch): it is already on its way.
        if durable.refs.contains_key(&key) {
            return;
        }
        let id = key.1;
        let routed = self.route(app, &entry.event, Some((&id, entry.time_ms)));
        let Some(durable) = &mut self.durable else {
            return;
        };
        if routed == 0 {
            // No webhook of this node's configuration wants it.
            let _ = durable.orders.send(ToRedis::Done { app, ids: vec![id] });
        } else {
            durable.refs.insert((app, id), routed);
        }
    }

    /// In a cluster: reports each app's room left (none once finishing: nothing new is read
    /// while the node stops), and now and then the entries held here.
    fn keep_entries(&mut self) {
        let max = self.settings.max_pending;
        let rooms: Vec<usize> = (0..self.apps.len() as u32)
            .map(|app| max.saturating_sub(self.pending_of(app)))
            .collect();
        let finishing = self.finishing;
        let Some(durable) = &mut self.durable else {
            return;
        };
        for (room, left) in durable.room.iter().zip(rooms) {
            room.store(if finishing { 0 } else { left }, Ordering::Relaxed);
        }
        if durable.touched_at.elapsed() < durable.touch_every {
            return;
        }
        durable.touched_at = Instant::now();
        let mut held: Vec<Vec<String>> = vec![Vec::new(); self.apps.len()];
        for (app, id) in durable.refs.keys() {
            held[*app as usize].push(id.clone());
        }
        if let Ok(mut ids) = durable.held_ids.lock() {
            *ids = held;
        }
    }

    /// In a cluster: a request is done with (delivered or given up); its entries are done
    /// with once no other request carries them.
    fn release_entries(&mut self, app: u32, entries: Vec<String>) {
        let Some(durable) = &mut self.durable else {
            return;
        };
        let mut done = Vec::new();
        for id in entries {
            let key = (app, id);
            match durable.refs.get_mut(&key) {
                Some(n) if *n > 1 => *n -= 1,
                Some(_) => {
                    durable.refs.remove(&key);
                    done.push(key.1);
                }
                None => {}
            }
        }
        if !done.is_empty() {
            let _ = durable.orders.send(ToRedis::Done { app, ids: done });
        }
    }

    /// Gives the event to each of the app's webhooks that wants it; `entry` is its queue entry
    /// in Redis and when it happened (a cluster). Returns how many webhooks took it.
    fn route(&mut self, app: u32, event: &Event, entry: Option<(&str, u64)>) -> usize {
        let apps = self.apps.clone();
        let Some(hooks) = apps.get(app as usize) else {
            return 0;
        };
        let mut routed = 0;
        let entries = || entry.map(|(id, _)| id.to_string()).into_iter().collect();
        let time_ms = entry.map(|(_, t)| t);
        let mut json = Vec::new();
        for (i, hook) in hooks.hooks.iter().enumerate() {
            if !hook.wants(event) {
                continue;
            }
            if json.is_empty() {
                event.write_json(&mut json);
            }
            self.held[app as usize] += 1;
            routed += 1;
            if !hooks.batch {
                self.make_request(app, i, vec![json.clone()], entries(), time_ms);
                continue;
            }
            let batch = &mut self.batches[app as usize][i];
            batch.events.push(json.clone());
            batch.entries.extend(entry.map(|(id, _)| id.to_string()));
            if let Some(t) = time_ms {
                batch.time_ms = Some(batch.time_ms.map_or(t, |b| b.min(t)));
            }
            let window = Duration::from_millis(self.settings.batch_window_ms as u64);
            batch
                .deadline
                .get_or_insert_with(|| Instant::now() + window);
            if batch.events.len() >= self.settings.batch_max_events {
                self.flush_batch(app, i);
            }
        }
        routed
    }

    fn flush_batch(&mut self, app: u32, hook: usize) {
        let batch = &mut self.batches[app as usize][hook];
        batch.deadline = None;
        let events = std::mem::take(&mut batch.events);
        let entries = std::mem::take(&mut batch.entries);
        let time_ms = batch.time_ms.take();
        if !events.is_empty() {
            self.make_request(app, hook, events, entries, time_ms);
        }
    }

    /// Makes, signs and queues the request for these events (written as JSON). In a cluster,
    /// `entries` are their queue entries, whose ids are the request's id (the same whichever
    /// node sends it), and `time_ms` when the earliest happened.
    fn make_request(
        &mut self,
        app: u32,
        hook: usize,
        events: Vec<Vec<u8>>,
        entries: Vec<String>,
        time_ms: Option<u64>,
    ) {
        let time_ms = time_ms.unwrap_or_else(now_ms);
        let body = event::body(time_ms, &events);
        let signature = hmac_sha256_hex(self.apps[app as usize].secret.as_bytes(), &body);
        let id = if entries.is_empty() {
            self.next_id += 1;
            format!("{}-{}", self.id_prefix, self.next_id - 1)
        } else {
            entries.join(",")
        };
        self.ready[app as usize].push_back(Request {
            app,
            hook,
            events: events.len(),
            entries,
            body,
            signature,
            id,
            time_ms,
            attempts: 0,
        });
    }

    /// Sends each app's ready requests while it has room in flight.
    fn dispatch(&mut self) {
        for (app, ready) in self.ready.iter_mut().enumerate() {
            while self.in_flight[app] < self.settings.max_in_flight_per_app {
                let Some(request) = ready.pop_front() else {
                    break;
                };
                self.in_flight[app] += 1;
                if self.workers.send(request).is_err() {
                    return;
                }
            }
        }
    }

    fn done(&mut self, mut request: Request, outcome: Outcome) {
        let app = request.app as usize;
        self.in_flight[app] = self.in_flight[app].saturating_sub(1);
        request.attempts += 1;
        let events = request.events as u64;
        let url = &self.apps[app].hooks[request.hook].shown;
        if let Some(console) = &self.console {
            let what = match &outcome {
                Outcome::Delivered => format!("delivered to {url}"),
                Outcome::Retry(reason) => format!("failed at {url} ({reason})"),
                Outcome::Refused(reason) => format!("refused by {url} ({reason})"),
            };
            console.note(request.app, || {
                Note::new("webhook", "").event(&what, &String::from_utf8_lossy(&request.body))
            });
        }
        let health = &mut self.health[app][request.hook];
        let give_up = match outcome {
            Outcome::Delivered => {
                self.stats.delivered.fetch_add(events, Ordering::Relaxed);
                if std::mem::take(&mut health.failing) {
                    crate::log_info!(url = %url, "webhooks delivered again");
                }
                None
            }
            Outcome::Refused(reason) => Some(format!("refused ({reason}), not retried")),
            Outcome::Retry(reason) => {
                let wait = backoff(request.attempts);
                let retry_for_ms = self.settings.retry_for as u64 * 1000;
                let budget_end = request.time_ms.saturating_add(retry_for_ms);
                if now_ms() + wait.as_millis() as u64 > budget_end {
                    let attempts = request.attempts;
                    Some(format!(
                        "still failing ({reason}) after {attempts} attempts"
                    ))
                } else {
                    if !std::mem::replace(&mut health.failing, true) {
                        crate::log_warn!(
                            url = %url,
                            "webhooks failing ({reason}); each is retried for up to {} s",
                            self.settings.retry_for
                        );
                    }
                    self.stats.retried.fetch_add(1, Ordering::Relaxed);
                    let number = self.next_id;
                    self.next_id += 1;
                    self.retries.push(Reverse((Instant::now() + wait, number)));
                    self.retrying.insert(number, request);
                    return;
                }
            }
        };
        if let Some(why) = give_up {
            self.stats.failed.fetch_add(events, Ordering::Relaxed);
            health.given_up_untold += events;
            let now = Instant::now();
            let told_lately = health
                .given_up_told_at
                .is_some_and(|t| now.duration_since(t) < GIVE_UP_LOG_EVERY);
            if !told_lately {
                crate::log_error!(
                    url = %url,
                    "webhooks gave up on {} events (the last: {}, {why})",
                    std::mem::take(&mut health.given_up_untold),
                    request.id
                );
                health.given_up_told_at = Some(now);
            }
        }
        let held = &mut self.held[app];
        *held = held.saturating_sub(request.events);
        self.release_entries(request.app, request.entries);
    }

    /// Logs give-ups that came too soon after the last line about them to be logged then.
    fn tell_give_ups(&mut self, now: Instant) {
        for (app, hooks) in self.health.iter_mut().enumerate() {
            for (hook, health) in hooks.iter_mut().enumerate() {
                let due = health
                    .given_up_told_at
                    .is_none_or(|t| now.duration_since(t) >= GIVE_UP_LOG_EVERY);
                if health.given_up_untold > 0 && due {
                    crate::log_error!(
                        url = %self.apps[app].hooks[hook].shown,
                        "webhooks gave up on {} more events",
                        std::mem::take(&mut health.given_up_untold)
                    );
                    health.given_up_told_at = Some(now);
                }
            }
        }
    }

    /// The earliest thing scheduled (a departure, a batch, a retry), or `latest`.
    fn next_wake(&self, latest: Instant) -> Instant {
        let mut wake = latest;
        let batches = self.batches.iter().flatten().filter_map(|b| b.deadline);
        let retry = self.retries.peek().map(|Reverse((due, _))| *due);
        for due in batches.chain(self.gate.next_due()).chain(retry) {
            wake = wake.min(due);
        }
        wake
    }

    /// Departures whose delay is over, batches whose window is over, retries that are due.
    fn run_due(&mut self, now: Instant) {
        for (app, event) in self.gate.due(now, self.finishing) {
            self.route(app, &event, None);
        }
        for app in 0..self.batches.len() {
            for hook in 0..self.batches[app].len() {
                let due = self.batches[app][hook].deadline.is_some_and(|d| d <= now);
                if due || self.finishing {
                    self.flush_batch(app as u32, hook);
                }
            }
        }
        self.tell_give_ups(now);
        while let Some(Reverse((due, number))) = self.retries.peek().copied() {
            if due > now {
                break;
            }
            self.retries.pop();
            if let Some(request) = self.retrying.remove(&number) {
                self.ready[request.app as usize].push_back(request);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_to_a_minute() {
        let waits: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }
}
