//! The soak: for a bounded time, everything at once against one server. A stable population of
//! subscribers receives HTTP publishes (every confirmed subscriber must get every event), sockets
//! churn through connect / subscribe / unsubscribe / disconnect, presence members join and leave,
//! pairs exchange client events under the rate limit, and hostile clients send one bad input
//! each (counting what the server did). The server's RSS and CPU are sampled all along.
//!
//! Each part runs on its own thread with its own epoll pool; they start together after setup
//! (a barrier), stop at the same deadline and report their counts to the main thread.

use crate::cycles::{Cycles, Round};
use crate::measure::{self, r2, record_latency, Report};
use crate::net::{encode_frame, now_ns, Phase, Pool, Ws, WsEvent};
use crate::pusher;
use crate::workloads::{open_subscribed, server_sample, Pace, Publisher};
use crate::Target;
use clap::Args;
use serde_json::json;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Barrier;
use std::time::Duration;

const SEC: u64 = 1_000_000_000;

#[derive(Args, Clone, Debug)]
pub struct SoakArgs {
    #[command(flatten)]
    pub target: Target,
    /// Seconds of mixed load after setup (setup is bounded by --timeout; the drain by --drain).
    #[arg(long, default_value_t = 120)]
    pub duration: u64,
    /// Stable subscribers (connected for the whole run).
    #[arg(long, default_value_t = 600)]
    pub subscribers: usize,
    /// Public channels the stable subscribers are spread over (round robin).
    #[arg(long, default_value_t = 6)]
    pub channels: usize,
    /// HTTP API publishes per second, round robin over the channels.
    #[arg(long, default_value_t = 20.0)]
    pub publish_rate: f64,
    /// Bytes of event data.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    #[arg(long, default_value_t = 4)]
    pub http_conns: usize,
    /// Churn cycles in progress at once (connect, subscribe, unsubscribe, ping, disconnect).
    #[arg(long, default_value_t = 16)]
    pub churn_parallel: usize,
    /// Churn cycles started per second at most (0: as fast as --churn-parallel allows).
    #[arg(long, default_value_t = 100.0)]
    pub churn_rate: f64,
    /// Presence channels, each with one observer counting member_added / member_removed.
    #[arg(long, default_value_t = 4)]
    pub presence_channels: usize,
    /// Presence members joining at once.
    #[arg(long, default_value_t = 8)]
    pub presence_parallel: usize,
    /// Presence joins started per second at most (0: unbounded).
    #[arg(long, default_value_t = 40.0)]
    pub presence_rate: f64,
    /// Pairs of sockets on private channels exchanging client events (both directions).
    #[arg(long, default_value_t = 100)]
    pub pairs: usize,
    /// Client events per second per socket; keep it under the server's limit (10/s).
    #[arg(long, default_value_t = 2.0)]
    pub client_event_rate: f64,
    /// Hostile clients started per second (0: none), cycling through the kinds.
    #[arg(long, default_value_t = 5.0)]
    pub hostile_per_sec: f64,
    /// Seconds a hostile client waits for the server's answer before giving up.
    #[arg(long, default_value_t = 5)]
    pub hostile_wait: u64,
    /// Seconds a half-sent message is held open (unless the server closes it first).
    #[arg(long, default_value_t = 10)]
    pub hostile_hold: u64,
    /// Seconds a slowloris head (one byte per second) may stay open before the client gives up.
    #[arg(long, default_value_t = 20)]
    pub slowloris_max: u64,
    /// Hostile sockets open at once at most (beyond it, starts are skipped and counted).
    #[arg(long, default_value_t = 200)]
    pub hostile_max_open: usize,
    /// Seconds between samples of the server's RSS and CPU.
    #[arg(long, default_value_t = 10)]
    pub sample_every: u64,
    /// Seconds of warm-up before the RSS baseline (default: 10% of the run, at most 60).
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Seconds to wait for outstanding deliveries and member events after the load stops.
    #[arg(long, default_value_t = 5)]
    pub drain: u64,
}

/// Counters every part updates, read by the progress line.
#[derive(Default)]
struct Live {
    publishes: AtomicU64,
    deliveries: AtomicU64,
    churn: AtomicU64,
    presence: AtomicU64,
    ce_sent: AtomicU64,
    ce_received: AtomicU64,
    hostile: AtomicU64,
    errors: AtomicU64,
}

/// Error details printed to stderr at most (the counts are always complete).
const ERROR_LINES: usize = 30;

/// Unexpected things one part saw, by kind.
struct Errors<'a> {
    live: &'a Live,
    printed: &'a AtomicUsize,
    start: u64,
    by_kind: BTreeMap<String, u64>,
}

impl<'a> Errors<'a> {
    fn new(live: &'a Live, printed: &'a AtomicUsize) -> Errors<'a> {
        Errors {
            live,
            printed,
            start: now_ns(),
            by_kind: BTreeMap::new(),
        }
    }

    fn add(&mut self, kind: &str, detail: &str) {
        *self.by_kind.entry(kind.to_owned()).or_default() += 1;
        self.live.errors.fetch_add(1, Relaxed);
        if self.printed.fetch_add(1, Relaxed) < ERROR_LINES {
            let t = (now_ns() - self.start) as f64 / 1e9;
            eprintln!("loadtest soak: {t:.1} s: {kind}: {detail}");
        }
    }
}

/// How a socket the server closed ended: its close frame's code, or no close frame.
fn close_detail(close_code: Option<u16>) -> String {
    match close_code {
        Some(code) => format!("closed by the server with code {code}"),
        None => "closed by the server without a close frame".into(),
    }
}

const PING: &[u8] = br#"{"event":"pusher:ping","data":{}}"#;

fn unsubscribe(channel: &str) -> String {
    format!("{{\"event\":\"pusher:unsubscribe\",\"data\":{{\"channel\":\"{channel}\"}}}}")
}

fn stable_channel(c: usize) -> String {
    format!("soak-{c}")
}

/// Starts allowed so far by a rate cap (`rate` per second since `start`; 0 = no cap).
fn allowed(rate: f64, start: u64, now: u64) -> u64 {
    if rate <= 0.0 {
        u64::MAX
    } else {
        ((now - start) as f64 / 1e9 * rate) as u64 + 1
    }
}

/// What the subscriber + publisher part measured.
#[derive(Default)]
struct FanoutOut {
    subscribed: usize,
    publishes: u64,
    accepted: u64,
    expected: u64,
    received: u64,
    lost: u64,
    unexpected: u64,
    hist: Option<hdrhistogram::Histogram<u64>>,
    errors: BTreeMap<String, u64>,
}

/// The stable subscribers, by pool index.
struct Stable<'a> {
    /// The channel of each subscriber confirmed during setup.
    channel_of: Vec<Option<usize>>,
    /// Still open (a subscriber the server closed keeps its expectation: its events are lost).
    alive: Vec<bool>,
    received: Vec<u64>,
    hist: hdrhistogram::Histogram<u64>,
    errors: Errors<'a>,
}

impl Stable<'_> {
    fn on_ws(&mut self, ws: &mut Ws, idx: usize, event: WsEvent<'_>) {
        if !self.alive.get(idx).copied().unwrap_or(false) {
            return;
        }
        match event {
            WsEvent::Text(text) => {
                if let Some(stamp) = pusher::stamp_of(text) {
                    self.received[idx] += 1;
                    self.errors.live.deliveries.fetch_add(1, Relaxed);
                    record_latency(&mut self.hist, stamp, now_ns());
                } else if pusher::is_event(text, b"pusher:error") {
                    let text = String::from_utf8_lossy(text);
                    self.errors.add("stable_pusher_error", &text);
                }
            }
            WsEvent::Closed => {
                self.alive[idx] = false;
                self.errors
                    .add("stable_closed", &close_detail(ws.close_code));
            }
        }
    }

    /// True while an open subscriber has fewer events than were accepted on its channel.
    fn waiting(&self, accepted_on: &[u64]) -> bool {
        self.channel_of
            .iter()
            .enumerate()
            .any(|(i, c)| c.is_some_and(|c| self.alive[i] && self.received[i] < accepted_on[c]))
    }
}

/// Stable subscribers on the public channels, and the HTTP publisher.
fn fanout_part(a: &SoakArgs, live: &Live, printed: &AtomicUsize, start: &Barrier) -> FanoutOut {
    let t = &a.target;
    let app = t.app();
    let request = pusher::upgrade_request(&t.addr().to_string(), &app.key);
    let mut pool = Pool::new(t.addr(), request, t.source_base);
    let channels: Vec<String> = (0..a.channels).map(stable_channel).collect();
    let ids = open_subscribed(&mut pool, t, a.subscribers, &|i, id| {
        pusher::subscribe(&app, id, &channels[i % a.channels], None)
    });
    let mut stable = Stable {
        channel_of: vec![None; pool.ws.len()],
        alive: vec![false; pool.ws.len()],
        received: vec![0; pool.ws.len()],
        hist: measure::histogram(),
        errors: Errors::new(live, printed),
    };
    for &idx in &ids {
        let ws = &pool.ws[idx];
        if ws.step == 2 && ws.phase == Phase::Open {
            stable.channel_of[idx] = Some(ws.tag as usize % a.channels);
            stable.alive[idx] = true;
        }
    }
    let subscribed = stable.channel_of.iter().flatten().count();
    for _ in subscribed..a.subscribers {
        let detail = "a stable subscriber was not confirmed during setup";
        stable.errors.add("stable_subscribe_failed", detail);
    }
    let mut publisher = Publisher::open(t, a.http_conns);
    let mut accepted_on = vec![0u64; a.channels];
    let (mut sent, mut accepted, mut rejected) = (0u64, 0u64, 0u64);

    start.wait();
    let begin = now_ns();
    let end = begin + a.duration * SEC;
    let mut pace = Pace::new(t, a.publish_rate.max(0.001), a.payload);
    loop {
        let now = now_ns();
        if now >= end && publisher.idle() {
            break;
        }
        if now > end + 10 * SEC {
            for _ in 0..publisher.in_flight() {
                let detail = "no response to an HTTP publish within 10 s";
                stable.errors.add("publish_unanswered", detail);
            }
            break;
        }
        let publishing = now < end && a.publish_rate > 0.0;
        let wait_ms = match publishing {
            true => (pace.next_due.saturating_sub(now) / 1_000_000).min(5) as i32,
            false => 5,
        };
        pool.poll(
            wait_ms,
            &mut |ws, i, e| stable.on_ws(ws, i, e),
            &mut |_, _, _| {},
        );
        let before = rejected;
        publisher.poll(0, &mut |c, ok| {
            if ok {
                accepted += 1;
                accepted_on[c] += 1;
            } else {
                rejected += 1;
            }
        });
        for _ in before..rejected {
            let detail = "an HTTP publish was not answered 200";
            stable.errors.add("publish_rejected", detail);
        }
        publisher.reopen_broken();
        if publishing {
            let n = publisher.send_due(&mut pace, &channels, "soak");
            sent += n;
            live.publishes.fetch_add(n, Relaxed);
        }
    }
    let drain_end = now_ns() + a.drain * SEC;
    while stable.waiting(&accepted_on) && now_ns() < drain_end {
        pool.poll(5, &mut |ws, i, e| stable.on_ws(ws, i, e), &mut |_, _, _| {});
    }
    let mut out = FanoutOut {
        subscribed,
        publishes: sent,
        accepted,
        ..FanoutOut::default()
    };
    for (i, c) in stable.channel_of.iter().enumerate() {
        let Some(c) = c else { continue };
        let (expected, got) = (accepted_on[*c], stable.received[i]);
        out.expected += expected;
        out.received += got.min(expected);
        out.lost += expected.saturating_sub(got);
        out.unexpected += got.saturating_sub(expected);
    }
    out.hist = Some(stable.hist);
    out.errors = stable.errors.by_kind;
    out
}

/// Sockets that cycle through a state machine: how many cycles finished, and what went wrong.
#[derive(Default)]
struct CycleOut {
    cycles: u64,
    member_added: u64,
    member_removed: u64,
    errors: BTreeMap<String, u64>,
}

/// Seconds a churn or presence cycle may take before it counts as stuck.
const STUCK_SECS: u64 = 10;

/// Step after `pusher:unsubscribe` + `pusher:ping` were sent; the `pusher:pong` ends the cycle.
const LEAVING: u8 = 3;
/// The cycle is over; the socket closes after this poll.
const DONE: u8 = 4;

/// Half the churn sockets join a stable channel (so the fanout lists change under load), the
/// others a public or a private channel of their own.
fn churn_channel(n: u32, channels: usize) -> String {
    match n % 4 {
        0 | 2 => stable_channel((n / 4) as usize % channels),
        1 => format!("soak-churn-{}", n % 97),
        _ => format!("private-soak-churn-{}", n % 31),
    }
}

fn presence_channel(c: usize) -> String {
    format!("presence-soak-{c}")
}

/// What a cycling socket does with a message; returns true when its cycle just finished.
/// After the subscription is confirmed it unsubscribes and pings (or, with `leave_by_close`,
/// just finishes and is closed); the `pusher:pong` finishes the cycle.
fn cycle_step(
    ws: &mut Ws,
    text: &[u8],
    channel: &str,
    subscribe: impl FnOnce(u32, &str) -> String,
    leave_by_close: bool,
    errors: &mut Errors,
    error_kind: &str,
) -> bool {
    if ws.step < 2 {
        if pusher::advance_subscription(ws, text, subscribe) {
            if leave_by_close {
                ws.step = DONE;
                return true;
            }
            ws.send_text(unsubscribe(channel).as_bytes());
            ws.send_text(PING);
            ws.step = LEAVING;
        }
    } else if ws.step == LEAVING && pusher::is_event(text, b"pusher:pong") {
        ws.step = DONE;
        return true;
    }
    if pusher::is_event(text, b"pusher:error") {
        errors.add(error_kind, &String::from_utf8_lossy(text));
    }
    false
}

/// Counts a round of `part`'s cycling sockets: failed connects, sockets the server closed and
/// stuck cycles as errors (`<part>_connect_failed`, `<part>_closed`, `<part>_stuck`: "<what> took
/// more than ..."), finished cycles on `live`. Returns the cycles finished.
fn tally(round: &Round, errors: &mut Errors, part: &str, what: &str, live: &AtomicU64) -> u64 {
    for _ in 0..round.connect_failed {
        errors.add(&format!("{part}_connect_failed"), "connect() failed");
    }
    for &code in &round.dropped {
        errors.add(&format!("{part}_closed"), &close_detail(code));
    }
    for _ in 0..round.stuck {
        let detail = format!("{what} took more than {STUCK_SECS} s");
        errors.add(&format!("{part}_stuck"), &detail);
    }
    live.fetch_add(round.finished, Relaxed);
    round.finished
}

/// Connect, subscribe, unsubscribe, ping, disconnect, with bounded parallelism and rate.
fn churn_part(a: &SoakArgs, live: &Live, printed: &AtomicUsize, start: &Barrier) -> CycleOut {
    let t = &a.target;
    let app = t.app();
    let mut errors = Errors::new(live, printed);
    let request = pusher::upgrade_request(&t.addr().to_string(), &app.key);
    let mut pool = Pool::new(t.addr(), request, t.source_base + 1);
    start.wait();
    let begin = now_ns();
    let end = begin + a.duration * SEC;
    let mut sockets = Cycles::new(a.churn_parallel, Some(STUCK_SECS * SEC));
    let mut cycles = 0u64;
    while now_ns() < end && a.churn_parallel > 0 {
        let may_start = allowed(a.churn_rate, begin, now_ns());
        let round = sockets.round(&mut pool, may_start, &mut |ws, _, event| {
            let WsEvent::Text(text) = event else {
                return false;
            };
            let channel = churn_channel(ws.tag, a.channels);
            let subscribe = |_, id: &str| pusher::subscribe(&app, id, &channel, None);
            let (e, kind) = (&mut errors, "churn_pusher_error");
            cycle_step(ws, text, &channel, subscribe, false, e, kind)
        });
        cycles += tally(&round, &mut errors, "churn", "a churn cycle", &live.churn);
    }
    CycleOut {
        cycles,
        errors: errors.by_kind,
        ..CycleOut::default()
    }
}

/// The presence part's sockets: observers (one per channel) and members cycling.
struct Members<'a, 'b> {
    app: &'b pusher::App,
    channels: usize,
    observers: HashSet<usize>,
    out: CycleOut,
    errors: Errors<'a>,
}

impl Members<'_, '_> {
    /// Returns true when the event completed a member's cycle.
    fn on_ws(&mut self, ws: &mut Ws, idx: usize, event: WsEvent<'_>) -> bool {
        let observer = self.observers.contains(&idx);
        match event {
            WsEvent::Text(text) if observer => {
                if pusher::is_event(text, b"pusher_internal:member_added") {
                    self.out.member_added += 1;
                } else if pusher::is_event(text, b"pusher_internal:member_removed") {
                    self.out.member_removed += 1;
                } else if pusher::is_event(text, b"pusher:error") {
                    let text = String::from_utf8_lossy(text);
                    self.errors.add("presence_pusher_error", &text);
                }
                false
            }
            WsEvent::Text(text) => {
                // Member n is user soak-m<n> on channel n % channels; even ones leave by closing.
                let n = ws.tag;
                let channel = presence_channel(n as usize % self.channels);
                let app = self.app;
                let subscribe = |_, id: &str| {
                    let data = format!("{{\"user_id\":\"soak-m{n}\",\"user_info\":{{\"n\":{n}}}}}");
                    pusher::subscribe(app, id, &channel, Some(&data))
                };
                let (by_close, e) = (n.is_multiple_of(2), &mut self.errors);
                let kind = "presence_pusher_error";
                cycle_step(ws, text, &channel, subscribe, by_close, e, kind)
            }
            WsEvent::Closed if observer => {
                self.errors
                    .add("presence_observer_closed", &close_detail(ws.close_code));
                false
            }
            // A member closed before its cycle was complete: `Cycles` counts it.
            WsEvent::Closed => false,
        }
    }
}

/// Presence members joining and leaving (by unsubscribe or by disconnect), watched by one
/// observer per channel that counts member_added and member_removed.
fn presence_part(a: &SoakArgs, live: &Live, printed: &AtomicUsize, start: &Barrier) -> CycleOut {
    let t = &a.target;
    let app = t.app();
    let request = pusher::upgrade_request(&t.addr().to_string(), &app.key);
    let mut pool = Pool::new(t.addr(), request, t.source_base + 2);
    let pc = a.presence_channels;
    let ids = open_subscribed(&mut pool, t, pc, &|c, id| {
        let data = format!("{{\"user_id\":\"soak-observer-{c}\"}}");
        pusher::subscribe(&app, id, &presence_channel(c), Some(&data))
    });
    let mut m = Members {
        app: &app,
        channels: pc,
        observers: ids
            .into_iter()
            .filter(|&i| pool.ws[i].step == 2 && pool.ws[i].phase == Phase::Open)
            .collect(),
        out: CycleOut::default(),
        errors: Errors::new(live, printed),
    };
    for _ in m.observers.len()..pc {
        let detail = "a presence observer was not confirmed during setup";
        m.errors.add("presence_observer_failed", detail);
    }
    start.wait();
    let begin = now_ns();
    let end = begin + a.duration * SEC;
    let mut members = Cycles::new(a.presence_parallel, Some(STUCK_SECS * SEC));
    while now_ns() < end && pc > 0 && a.presence_parallel > 0 {
        let may_start = allowed(a.presence_rate, begin, now_ns());
        let round = members.round(&mut pool, may_start, &mut |ws, i, e| m.on_ws(ws, i, e));
        let (errors, counter) = (&mut m.errors, &live.presence);
        m.out.cycles += tally(&round, errors, "presence", "a presence join", counter);
    }
    // Members still joining leave now; then every member added must be removed again.
    for i in 0..pool.ws.len() {
        if !m.observers.contains(&i) {
            pool.close_ws(i);
        }
    }
    let drain_end = now_ns() + a.drain * SEC;
    while now_ns() < drain_end {
        // Only the observers are left: no cycle ends here.
        pool.poll(5, &mut |ws, i, e| _ = m.on_ws(ws, i, e), &mut |_, _, _| {});
        let out = &m.out;
        if out.member_added == out.member_removed && out.member_added >= out.cycles {
            break;
        }
    }
    for _ in m.out.member_added..m.out.cycles {
        let detail = "a confirmed presence join's member_added never reached the observer";
        m.errors.add("presence_member_added_missing", detail);
    }
    for _ in m.out.member_removed..m.out.member_added {
        let detail = "a member_added was never followed by member_removed (membership left over)";
        m.errors.add("presence_member_removed_missing", detail);
    }
    m.out.errors = m.errors.by_kind;
    m.out
}

/// What the client-event pairs measured.
#[derive(Default)]
struct ClientEventsOut {
    sent: u64,
    received: u64,
    hist: Option<hdrhistogram::Histogram<u64>>,
    errors: BTreeMap<String, u64>,
}

/// Pairs on private channels, each socket sending client events to its partner at a steady
/// rate below the server's per-connection limit (no bursts: a late generator skips instead).
fn client_events_part(
    a: &SoakArgs,
    live: &Live,
    printed: &AtomicUsize,
    start: &Barrier,
) -> ClientEventsOut {
    let t = &a.target;
    let app = t.app();
    let mut errors = Errors::new(live, printed);
    let request = pusher::upgrade_request(&t.addr().to_string(), &app.key);
    let mut pool = Pool::new(t.addr(), request, t.source_base + 3);
    let channel = |i: usize| format!("private-soak-ce-{}", i / 2);
    let ids = open_subscribed(&mut pool, t, a.pairs * 2, &|i, id| {
        pusher::subscribe(&app, id, &channel(i), None)
    });
    let ok = |i: usize| pool.ws[i].step == 2 && pool.ws[i].phase == Phase::Open;
    // A socket sends only when its partner is confirmed too.
    let senders: Vec<(usize, String)> = ids
        .chunks(2)
        .filter(|pair| pair.len() == 2 && ok(pair[0]) && ok(pair[1]))
        .flat_map(|pair| pair.iter().map(|&i| (i, channel(pool.ws[i].tag as usize))))
        .collect();
    for _ in senders.len()..a.pairs * 2 {
        let detail = "a client-event socket (or its partner) was not confirmed during setup";
        errors.add("client_events_subscribe_failed", detail);
    }
    let mut pairs = Pairs {
        alive: vec![false; pool.ws.len()],
        received: 0,
        hist: measure::histogram(),
        errors,
    };
    for (i, _) in &senders {
        pairs.alive[*i] = true;
    }
    start.wait();
    let begin = now_ns();
    let end = begin + a.duration * SEC;
    let n = senders.len() as u64;
    let per_sec = a.client_event_rate * n as f64;
    let (mut k, mut sent) = (0u64, 0u64);
    while now_ns() < end {
        let due = ((now_ns() - begin) as f64 / 1e9 * per_sec) as u64;
        if due > k + 2 * n {
            k = due - n; // more than two events per socket behind: skip rather than burst
        }
        while k < due {
            let (idx, ch) = &senders[(k % n) as usize];
            k += 1;
            if pool.ws[*idx].phase != Phase::Open {
                continue;
            }
            let data = pusher::stamped_data(now_ns(), a.payload);
            let msg =
                format!("{{\"event\":\"client-soak\",\"channel\":\"{ch}\",\"data\":\"{data}\"}}");
            pool.ws[*idx].send_text(msg.as_bytes());
            sent += 1;
            live.ce_sent.fetch_add(1, Relaxed);
        }
        pool.poll(5, &mut |ws, i, e| pairs.on_ws(ws, i, e), &mut |_, _, _| {});
    }
    let drain_end = now_ns() + a.drain * SEC;
    while pairs.received < sent && now_ns() < drain_end {
        pool.poll(5, &mut |ws, i, e| pairs.on_ws(ws, i, e), &mut |_, _, _| {});
    }
    ClientEventsOut {
        sent,
        received: pairs.received,
        hist: Some(pairs.hist),
        errors: pairs.errors.by_kind,
    }
}

/// The client-event sockets, by pool index.
struct Pairs<'a> {
    alive: Vec<bool>,
    received: u64,
    hist: hdrhistogram::Histogram<u64>,
    errors: Errors<'a>,
}

impl Pairs<'_> {
    fn on_ws(&mut self, ws: &mut Ws, idx: usize, event: WsEvent<'_>) {
        if !self.alive.get(idx).copied().unwrap_or(false) {
            return;
        }
        match event {
            WsEvent::Text(text) => {
                if pusher::is_event(text, b"client-soak") {
                    if let Some(stamp) = pusher::stamp_of(text) {
                        self.received += 1;
                        self.errors.live.ce_received.fetch_add(1, Relaxed);
                        record_latency(&mut self.hist, stamp, now_ns());
                    }
                } else if pusher::is_event(text, b"pusher:error") {
                    let text = String::from_utf8_lossy(text);
                    self.errors.add("client_event_error", &text);
                }
            }
            WsEvent::Closed => {
                self.alive[idx] = false;
                self.errors
                    .add("client_event_socket_closed", &close_detail(ws.close_code));
            }
        }
    }
}

/// The hostile inputs, one per client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A client frame without the mask bit.
    Unmasked,
    /// A masked text frame with RSV1 set (no extension was negotiated).
    Rsv,
    /// A frame with the reserved opcode 3.
    Opcode,
    /// A text message of 20,000 `[`.
    DeepJson,
    /// A text message that is not UTF-8.
    BadUtf8,
    /// Half of a 60 KiB message, never finished.
    HalfMessage,
    /// The upgrade request head, one byte per second.
    Slowloris,
}

const KINDS: [Kind; 7] = [
    Kind::Unmasked,
    Kind::Rsv,
    Kind::Opcode,
    Kind::DeepJson,
    Kind::BadUtf8,
    Kind::HalfMessage,
    Kind::Slowloris,
];

const MASK: [u8; 4] = [0x5a, 0x17, 0xc3, 0x88];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Unmasked => "unmasked_frame",
            Kind::Rsv => "rsv_bit",
            Kind::Opcode => "reserved_opcode",
            Kind::DeepJson => "deep_json",
            Kind::BadUtf8 => "invalid_utf8",
            Kind::HalfMessage => "half_message",
            Kind::Slowloris => "slowloris",
        }
    }

    /// The bytes sent once the connection is established.
    fn payload(self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Kind::Unmasked => encode_frame(&mut out, 0x81, PING, None),
            Kind::Rsv => encode_frame(&mut out, 0x80 | 0x40 | 0x1, PING, Some(MASK)),
            Kind::Opcode => encode_frame(&mut out, 0x80 | 0x3, PING, Some(MASK)),
            Kind::DeepJson => encode_frame(&mut out, 0x81, &[b'['; 20_000], Some(MASK)),
            Kind::BadUtf8 => {
                let text = b"{\"event\":\"pusher:ping\",\"data\":\"\xff\xfe\xc0\x80\"}";
                encode_frame(&mut out, 0x81, text, Some(MASK));
            }
            Kind::HalfMessage => {
                encode_frame(&mut out, 0x81, &[b'x'; 60 * 1024], Some(MASK));
                out.truncate(out.len() / 2);
            }
            Kind::Slowloris => {}
        }
        out
    }

    /// Seconds the client waits for the server before it gives up and closes.
    fn limit(self, a: &SoakArgs) -> u64 {
        match self {
            Kind::Slowloris => a.slowloris_max,
            Kind::HalfMessage => a.hostile_hold,
            _ => a.hostile_wait,
        }
    }
}

struct Hostile {
    kind: Kind,
    started: u64,
    /// The bad input has been sent (for slowloris: bytes of the head sent so far).
    sent: bool,
    head_bytes: usize,
    error_seen: bool,
}

impl Hostile {
    /// What the server did, as a short outcome name.
    fn outcome(&self, ws: &Ws, closed: bool, pong: bool, now: u64) -> String {
        let secs = (now - self.started + SEC / 2) / SEC; // rounded
        if self.kind == Kind::Slowloris {
            return match closed {
                true => format!("closed_after_{secs}s"),
                false => format!("still_open_after_{secs}s"),
            };
        }
        let prefix = if self.error_seen { "pusher_error+" } else { "" };
        let end = match (closed, ws.close_code) {
            _ if !self.sent && closed => "closed_before_input".to_owned(),
            _ if !self.sent => "no_connection_established".to_owned(),
            (true, Some(code)) => format!("close_{code}"),
            (true, None) => "closed_without_close_frame".to_owned(),
            (false, _) if pong => "open_and_answering".to_owned(),
            (false, _) => "open_no_answer".to_owned(),
        };
        format!("{prefix}{end}")
    }
}

/// What the hostile clients saw, by kind and outcome.
#[derive(Default)]
struct HostileOut {
    started: u64,
    skipped: u64,
    outcomes: BTreeMap<&'static str, BTreeMap<String, u64>>,
}

/// One hostile client every 1/--hostile-per-sec s, cycling through the kinds; each waits a
/// bounded time for the server to close it or answer, and records what happened.
fn hostile_part(a: &SoakArgs, live: &Live, start: &Barrier) -> HostileOut {
    let t = &a.target;
    let app = t.app();
    let request = pusher::upgrade_request(&t.addr().to_string(), &app.key);
    let mut pool = Pool::new(t.addr(), request.clone(), t.source_base + 4);
    let mut out = HostileOut::default();
    let mut open: HashMap<usize, Hostile> = HashMap::new();
    start.wait();
    if a.hostile_per_sec <= 0.0 {
        return out;
    }
    let begin = now_ns();
    let end = begin + a.duration * SEC;
    let longest = KINDS.iter().map(|k| k.limit(a)).max().unwrap_or(0);
    let hard_end = end + (longest + 2) * SEC;
    let record = |out: &mut HostileOut, kind: Kind, outcome: String| {
        *out.outcomes
            .entry(kind.name())
            .or_default()
            .entry(outcome)
            .or_default() += 1;
        live.hostile.fetch_add(1, Relaxed);
    };
    let mut resolved: Vec<(usize, bool)> = Vec::new();
    loop {
        let now = now_ns();
        if (now >= end && open.is_empty()) || now >= hard_end {
            break;
        }
        while now < end && out.started + out.skipped < allowed(a.hostile_per_sec, begin, now) {
            let n = out.started + out.skipped;
            let kind = KINDS[(n % KINDS.len() as u64) as usize];
            if open.len() >= a.hostile_max_open {
                out.skipped += 1;
                continue;
            }
            out.started += 1;
            let opened = match kind {
                Kind::Slowloris => pool.open_with(n as u32, now, request[..1].to_vec()),
                _ => pool.open_ws(n as u32, now),
            };
            let Some(idx) = opened else {
                record(&mut out, kind, "connect_failed".into());
                continue;
            };
            let hostile = Hostile {
                kind,
                started: now,
                sent: false,
                head_bytes: 1,
                error_seen: false,
            };
            open.insert(idx, hostile);
        }
        pool.poll(
            5,
            &mut |ws, idx, event| {
                let Some(h) = open.get_mut(&idx) else { return };
                match event {
                    WsEvent::Text(text) => {
                        if !h.sent && pusher::is_event(text, b"pusher:connection_established") {
                            ws.send_raw(&h.kind.payload());
                            h.sent = true;
                        } else if pusher::is_event(text, b"pusher:error") {
                            h.error_seen = true;
                            if h.kind == Kind::DeepJson {
                                ws.send_text(PING); // does the connection still work?
                            }
                        } else if pusher::is_event(text, b"pusher:pong") {
                            let outcome = h.outcome(ws, false, true, now_ns());
                            record(&mut out, h.kind, outcome);
                            resolved.push((idx, false));
                        }
                    }
                    WsEvent::Closed => {
                        let outcome = h.outcome(ws, true, false, now_ns());
                        record(&mut out, h.kind, outcome);
                        resolved.push((idx, true));
                    }
                }
            },
            &mut |_, _, _| {},
        );
        let now = now_ns();
        for (&idx, h) in open.iter_mut() {
            if resolved.iter().any(|&(i, _)| i == idx) {
                continue;
            }
            if now - h.started > h.kind.limit(a) * SEC {
                let outcome = h.outcome(&pool.ws[idx], false, false, now);
                record(&mut out, h.kind, outcome);
                resolved.push((idx, false));
            } else if h.kind == Kind::Slowloris
                && h.head_bytes < request.len()
                && now - h.started >= h.head_bytes as u64 * SEC
            {
                pool.ws[idx].send_raw(&request[h.head_bytes..h.head_bytes + 1]);
                h.head_bytes += 1;
            }
        }
        for (idx, closed_by_server) in resolved.drain(..) {
            open.remove(&idx);
            if !closed_by_server {
                pool.close_ws(idx);
            }
        }
    }
    for (idx, h) in open.drain() {
        let outcome = h.outcome(&pool.ws[idx], false, false, now_ns());
        record(&mut out, h.kind, outcome);
    }
    out
}

/// One sample of the server: seconds into the load, RSS, CPU since the previous sample.
struct Sample {
    at_s: u64,
    rss_kib: u64,
    cpu_secs: f64,
    cpu_pct: f64,
}

fn merge_errors(into: &mut BTreeMap<String, u64>, from: BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k).or_default() += v;
    }
}

pub fn soak(a: &SoakArgs) {
    let t = &a.target;
    let live = Live::default();
    let printed = AtomicUsize::new(0);
    let parts = 5;
    let barrier = Barrier::new(parts + 1);
    let warmup = a.warmup.unwrap_or((a.duration / 10).min(60));
    let setup_start = now_ns();
    let mut samples: Vec<Sample> = Vec::new();
    let mut server_gone = false;
    let mut own_cpu = 0.0;
    let (fanout, churn, presence, ce, hostile) = std::thread::scope(|s| {
        let fanout = s.spawn(|| fanout_part(a, &live, &printed, &barrier));
        let churn = s.spawn(|| churn_part(a, &live, &printed, &barrier));
        let presence = s.spawn(|| presence_part(a, &live, &printed, &barrier));
        let ce = s.spawn(|| client_events_part(a, &live, &printed, &barrier));
        let hostile = s.spawn(|| hostile_part(a, &live, &barrier));
        barrier.wait();
        let own_before = measure::own_cpu_secs();
        let begin = now_ns();
        println!(
            "soak: setup took {:.1} s; {} s of load, server sampled every {} s",
            (begin - setup_start) as f64 / 1e9,
            a.duration,
            a.sample_every
        );
        let every = a.sample_every.max(1);
        let mut at = 0u64;
        let mut prev: Option<measure::ProcSample> = None;
        loop {
            let due = begin + at * SEC;
            let now = now_ns();
            if due > now {
                std::thread::sleep(Duration::from_nanos(due - now));
            }
            let sample = server_sample(t);
            if t.server_pid.is_some() && sample.is_none() && !server_gone {
                server_gone = true;
                eprintln!("loadtest soak: the server process is gone");
            }
            let cpu_pct = match (prev, sample) {
                (Some(p), Some(s)) if at > 0 => {
                    let dt = (now_ns() - begin) as f64 / 1e9
                        - samples.last().map_or(0.0, |l: &Sample| l.at_s as f64);
                    (s.cpu_secs - p.cpu_secs) / dt.max(1e-9) * 100.0
                }
                _ => 0.0,
            };
            if let Some(s) = sample {
                samples.push(Sample {
                    at_s: at,
                    rss_kib: s.rss_kib,
                    cpu_secs: s.cpu_secs,
                    cpu_pct,
                });
                prev = Some(s);
            }
            let rss = sample.map_or("-".into(), |s| format!("{} KiB", s.rss_kib));
            println!(
                "  t={at:>5} s  rss {rss:>12}  cpu {cpu_pct:>5.1}%  publishes {}  deliveries {}  churn {}  presence {}  client events {}/{}  hostile {}  errors {}",
                live.publishes.load(Relaxed),
                live.deliveries.load(Relaxed),
                live.churn.load(Relaxed),
                live.presence.load(Relaxed),
                live.ce_sent.load(Relaxed),
                live.ce_received.load(Relaxed),
                live.hostile.load(Relaxed),
                live.errors.load(Relaxed),
            );
            if at >= a.duration {
                break;
            }
            at = (at + every).min(a.duration);
        }
        own_cpu = measure::own_cpu_secs() - own_before;
        let join = |name: &str| -> ! { panic!("the soak's {name} thread panicked") };
        (
            fanout.join().unwrap_or_else(|_| join("fanout")),
            churn.join().unwrap_or_else(|_| join("churn")),
            presence.join().unwrap_or_else(|_| join("presence")),
            ce.join().unwrap_or_else(|_| join("client-events")),
            hostile.join().unwrap_or_else(|_| join("hostile")),
        )
    });

    let mut errors = BTreeMap::new();
    if server_gone {
        errors.insert("server_gone".to_owned(), 1);
    }
    merge_errors(&mut errors, fanout.errors);
    merge_errors(&mut errors, churn.errors);
    merge_errors(&mut errors, presence.errors);
    merge_errors(&mut errors, ce.errors);

    let mut r = Report::new("soak", &t.addr().to_string());
    r.add("duration_s", a.duration);
    r.add("subscribers", a.subscribers);
    r.add("subscribed", fanout.subscribed);
    r.add("channels", a.channels);
    r.add("publish_rate", r2(a.publish_rate));
    if !samples.is_empty() {
        let rss: Vec<u64> = samples.iter().map(|s| s.rss_kib).collect();
        let start = samples
            .iter()
            .find(|s| s.at_s >= warmup)
            .unwrap_or(&samples[0]);
        let last = samples.last().unwrap_or(start);
        r.add("sample_every_s", a.sample_every);
        r.add("rss_series_kb", json!(rss));
        let cpu: Vec<serde_json::Value> = samples.iter().skip(1).map(|s| r2(s.cpu_pct)).collect();
        r.add("cpu_series_pct", json!(cpu));
        r.add("warmup_s", start.at_s);
        r.add("rss_start_kb", start.rss_kib);
        r.add("rss_end_kb", last.rss_kib);
        r.add("rss_max_kb", rss.iter().copied().max().unwrap_or(0));
        r.add(
            "rss_growth_after_warmup_kb",
            last.rss_kib as i64 - start.rss_kib as i64,
        );
        let cpu_s = last.cpu_secs - samples[0].cpu_secs;
        r.add("server_cpu_s", r2(cpu_s));
        r.add(
            "server_cpu_pct_avg",
            r2(cpu_s / (last.at_s.max(1)) as f64 * 100.0),
        );
    }
    r.add("publishes", fanout.publishes);
    r.add("publishes_accepted", fanout.accepted);
    r.add("deliveries_expected", fanout.expected);
    r.add("deliveries_received", fanout.received);
    r.add("deliveries_lost", fanout.lost);
    r.add("deliveries_unexpected", fanout.unexpected);
    if let Some(h) = &fanout.hist {
        for (k, v) in measure::latency_fields(h) {
            r.add(&format!("delivery_{k}"), v);
        }
    }
    r.add("churn_cycles", churn.cycles);
    r.add(
        "churn_cycles_per_s",
        r2(churn.cycles as f64 / a.duration.max(1) as f64),
    );
    r.add("presence_cycles", presence.cycles);
    r.add("presence_member_added_seen", presence.member_added);
    r.add("presence_member_removed_seen", presence.member_removed);
    r.add("client_events_sent", ce.sent);
    r.add("client_events_received", ce.received);
    r.add("client_events_lost", ce.sent.saturating_sub(ce.received));
    if let Some(h) = &ce.hist {
        for (k, v) in measure::latency_fields(h) {
            r.add(&format!("client_event_{k}"), v);
        }
    }
    r.add("hostile_started", hostile.started);
    r.add("hostile_skipped", hostile.skipped);
    r.add("hostile_outcomes", json!(hostile.outcomes));
    r.add("errors", errors.values().sum::<u64>());
    r.add("error_kinds", json!(errors));
    r.add("generator_cpu_s", r2(own_cpu));
    r.print();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_inputs_are_what_their_names_say() {
        let unmasked = Kind::Unmasked.payload();
        assert_eq!(unmasked[1] & 0x80, 0, "no mask bit");
        assert_eq!(Kind::Rsv.payload()[0], 0xc1);
        assert_eq!(Kind::Opcode.payload()[0] & 0x0f, 3);
        let deep = Kind::DeepJson.payload();
        assert_eq!(&deep[..4], &[0x81, 0x80 | 126, 0x4e, 0x20]); // 20,000 bytes, masked
        let half = Kind::HalfMessage.payload();
        let declared = u16::from_be_bytes([half[2], half[3]]) as usize;
        assert_eq!(declared, 60 * 1024);
        assert!(half.len() < declared / 2 + 16, "only about half is sent");
        assert!(Kind::Slowloris.payload().is_empty());
    }

    #[test]
    fn rate_caps_allow_a_start_at_once_then_the_rate() {
        assert_eq!(allowed(10.0, 0, 0), 1);
        assert_eq!(allowed(10.0, 0, SEC), 11);
        assert_eq!(allowed(0.0, 0, SEC), u64::MAX);
    }

    #[test]
    fn churn_mixes_stable_public_and_private_channels() {
        let names: Vec<String> = (0..4).map(|n| churn_channel(n, 6)).collect();
        assert_eq!(names[0], "soak-0");
        assert!(names[1].starts_with("soak-churn-"));
        assert_eq!(names[2], "soak-0");
        assert!(names[3].starts_with("private-soak-churn-"));
    }
}
