//! What the debug console (`ops::console`) shows: a bounded log of the events of the apps being
//! watched on this node. Shards (and the webhook hub) note events here; it costs nothing while
//! nobody watches: an app's events are noted only if its console asked for them in the last
//! `WATCH_FOR`. Notes go to a ring shared by the threads, at most `NOTES_PER_SECOND` per thread
//! (the rest are counted as not shown).

use serde::Serialize;
use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long an app's events are noted after its console last asked for them.
const WATCH_FOR: Duration = Duration::from_secs(10);
/// Events the ring keeps, for all apps together (the oldest go first).
const RING: usize = 2000;
/// Events a shard notes per second at most; the rest are counted, not shown.
const NOTES_PER_SECOND: u32 = 500;
/// Bytes of an event's data shown; longer data is cut.
const MAX_DATA: usize = 1024;
/// Events one answer gives at most.
const MAX_ANSWER: usize = 500;

/// One thing that happened to an app, as the console shows it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Note {
    /// Its place in the node's log (increasing).
    pub seq: u64,
    /// When, in Unix milliseconds.
    pub time_ms: u64,
    /// `api_message`, `client_event`, `subscribed`, `unsubscribed`, `member_added`,
    /// `member_removed`, `connected`, `disconnected`, `webhook`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The channel, where there is one.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub channel: String,
    /// The event name (messages), or what happened (webhooks).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub event: String,
    /// The event's data (cut at `MAX_DATA` bytes).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub data: String,
    /// The connection concerned.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub socket_id: String,
    /// The presence member concerned.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub user_id: String,
    #[serde(skip)]
    app: u32,
}

impl Note {
    /// A note of `kind` about `channel`.
    pub fn new(kind: &'static str, channel: &str) -> Note {
        Note {
            kind,
            channel: channel.to_owned(),
            ..Note::default()
        }
    }

    /// With the event name and data (cut to `MAX_DATA` bytes at a character boundary).
    pub fn event(mut self, event: &str, data: &str) -> Note {
        self.event = event.to_owned();
        let mut end = data.len().min(MAX_DATA);
        while !data.is_char_boundary(end) {
            end -= 1;
        }
        self.data = data[..end].to_owned();
        if end < data.len() {
            self.data.push('…');
        }
        self
    }

    /// With the connection's socket id.
    pub fn socket(mut self, socket_id: String) -> Note {
        self.socket_id = socket_id;
        self
    }

    /// With the presence member's user id.
    pub fn user(mut self, user_id: &str) -> Note {
        self.user_id = user_id.to_owned();
        self
    }
}

/// The node's log of watched apps' events.
pub struct Console {
    started: Instant,
    /// Per app slot: until when (ms after `started`) its events are noted.
    watched_until: Box<[AtomicU64]>,
    ring: Mutex<Ring>,
    /// Events not noted because a shard was over `NOTES_PER_SECOND`.
    pub not_shown: AtomicU64,
}

#[derive(Default)]
struct Ring {
    next_seq: u64,
    notes: VecDeque<Note>,
}

thread_local! {
    /// This thread's note budget: (second, notes in it).
    static BUDGET: Cell<(u64, u32)> = const { Cell::new((0, 0)) };
}

impl Console {
    /// A log for `apps` app slots.
    pub fn new(apps: usize) -> Console {
        Console {
            started: Instant::now(),
            watched_until: (0..apps).map(|_| AtomicU64::new(0)).collect(),
            ring: Mutex::new(Ring::default()),
            not_shown: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Whether someone watches app `app` (then its events are worth making into notes).
    pub fn wants(&self, app: u32) -> bool {
        self.watched_until
            .get(app as usize)
            .is_some_and(|until| until.load(Ordering::Relaxed) > self.now_ms())
    }

    /// Notes an event of app `app`, made only if someone watches the app.
    pub fn note(&self, app: u32, make: impl FnOnce() -> Note) {
        if !self.wants(app) {
            return;
        }
        let second = self.now_ms() / 1000;
        let over = BUDGET.with(|b| {
            let (at, count) = b.get();
            let count = if at == second { count + 1 } else { 1 };
            b.set((second, count));
            count > NOTES_PER_SECOND
        });
        if over {
            self.not_shown.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut note = make();
        note.app = app;
        note.time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let Ok(mut ring) = self.ring.lock() else {
            return;
        };
        note.seq = ring.next_seq;
        ring.next_seq += 1;
        if ring.notes.len() == RING {
            ring.notes.pop_front();
        }
        ring.notes.push_back(note);
    }

    /// The app's notes after `since`, and the sequence number to ask from next. Asking is
    /// watching: the app's events are noted for `WATCH_FOR` from now.
    pub fn read(&self, app: u32, since: u64) -> (Vec<Note>, u64) {
        if let Some(until) = self.watched_until.get(app as usize) {
            let until_ms = self.now_ms() + WATCH_FOR.as_millis() as u64;
            until.store(until_ms, Ordering::Relaxed);
        }
        let Ok(ring) = self.ring.lock() else {
            return (Vec::new(), since);
        };
        let notes: Vec<Note> = ring
            .notes
            .iter()
            .filter(|n| n.app == app && n.seq >= since)
            .take(MAX_ANSWER)
            .cloned()
            .collect();
        let next = notes.last().map_or(ring.next_seq, |n| n.seq + 1);
        (notes, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_only_while_watched_bounded_and_per_app() {
        let console = Console::new(2);
        console.note(0, || Note::new("subscribed", "a"));
        assert!(console.read(0, 0).0.is_empty(), "nobody watched yet");
        // Now watched (the read above asked).
        console.note(0, || Note::new("subscribed", "a"));
        console.note(1, || Note::new("subscribed", "other app, not watched"));
        let (notes, next) = console.read(0, 0);
        assert_eq!(notes.len(), 1);
        assert_eq!(
            (notes[0].kind, notes[0].channel.as_str()),
            ("subscribed", "a")
        );
        assert_eq!(console.read(0, next).0.len(), 0);
        for i in 0..RING + 10 {
            console.note(0, || Note::new("api_message", &i.to_string()));
        }
        let ring = console.ring.lock().unwrap();
        assert!(ring.notes.len() <= RING);
        drop(ring);
        let shown = console.read(0, 0).0.len();
        assert!(shown <= MAX_ANSWER);
        assert!(
            console.not_shown.load(Ordering::Relaxed) > 0,
            "over the per-second budget"
        );
    }

    #[test]
    fn long_data_is_cut_at_a_character_boundary() {
        let data = "é".repeat(MAX_DATA);
        let note = Note::new("api_message", "c").event("e", &data);
        assert!(note.data.len() <= MAX_DATA + '…'.len_utf8());
        assert!(note.data.ends_with('…'));
    }
}
