//! The workloads. Each one opens what it needs, measures, prints its report and stops by itself.

use crate::cycles::Cycles;
use crate::measure::{self, r2, record_latency, Report};
use crate::net::{now_ns, Pool, WsEvent};
use crate::pusher;
use crate::subscribers::{channel_name, Children};
use crate::Target;
use clap::Args;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Sockets one subscriber process holds at most (the process limit is 20,000 open files).
const PER_PROCESS: usize = 19_000;

fn procs_for(count: usize, asked: usize) -> usize {
    if asked > 0 {
        asked
    } else {
        count.div_ceil(PER_PROCESS).max(1)
    }
}

/// The server's CPU and memory: `--server-pid` plus every `--node-pids` process.
pub(crate) fn server_sample(target: &Target) -> Option<measure::ProcSample> {
    let mut total = measure::sample(target.server_pid?)?;
    for pid in &target.node_pids {
        let node = measure::sample(*pid)?;
        total.cpu_secs += node.cpu_secs;
        total.rss_kib += node.rss_kib;
    }
    Some(total)
}

/// Server CPU seconds since `before` (None without `--server-pid`).
fn server_cpu_since(target: &Target, before: Option<measure::ProcSample>) -> Option<f64> {
    Some(server_sample(target)?.cpu_secs - before?.cpu_secs)
}

fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|p| measure::cpu_secs(*p)).sum()
}

pub(crate) fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn spawn_subscribers(
    target: &Target,
    count: usize,
    channels: usize,
    prefix: &str,
    procs: usize,
) -> Children {
    let mut args = target.child_args();
    args.extend([
        "--channels".into(),
        channels.to_string(),
        "--channel-prefix".into(),
        prefix.to_owned(),
    ]);
    if target.channel_per_node {
        args.extend(["--nodes".into(), (target.node_ports.len() + 1).to_string()]);
    }
    let ports = target.ports();
    // At least one subscriber process per node, the same number on each.
    let procs = procs_for(count, procs).div_ceil(ports.len()) * ports.len();
    Children::spawn(&args, count, procs, target.source_base, &ports)
}

/// Subscribers of each channel, as `spawn_subscribers` places them (see `subscribers::channel_of`).
fn subscribers_per_channel(
    target: &Target,
    count: usize,
    channels: usize,
    procs: usize,
) -> Vec<u64> {
    let nodes = target.node_ports.len() + 1;
    let procs = procs_for(count, procs).div_ceil(nodes) * nodes;
    let mut per_channel = vec![0u64; channels];
    for k in 0..procs {
        let share = crate::subscribers::Share {
            start: count * k / procs,
            count: count * (k + 1) / procs - count * k / procs,
            channels,
            channel_prefix: String::new(),
            nodes: if target.channel_per_node { nodes } else { 0 },
            node_index: k % nodes,
        };
        for g in share.start..share.start + share.count {
            per_channel[crate::subscribers::channel_of(g, &share)] += 1;
        }
    }
    per_channel
}

#[derive(Args, Clone, Debug)]
pub struct IdleArgs {
    #[command(flatten)]
    pub target: Target,
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    #[arg(long, default_value_t = 100)]
    pub channels: usize,
    /// Subscriber processes (0: one per 19,000 connections).
    #[arg(long, default_value_t = 0)]
    pub procs: usize,
    /// Seconds to wait after the last subscription before reading the server's memory.
    #[arg(long, default_value_t = 3)]
    pub settle: u64,
    #[arg(long, default_value = "idle-")]
    pub channel_prefix: String,
}

pub fn idle(a: &IdleArgs) {
    let t = &a.target;
    let before = server_sample(t);
    let mut children = spawn_subscribers(t, a.connections, a.channels, &a.channel_prefix, a.procs);
    let ready = children.wait_ready(t.timeout());
    std::thread::sleep(Duration::from_secs(a.settle));
    let after = server_sample(t);
    let generator_cpu = cpu_of(&children.pids());
    let (_, closed, _) = children.stop();

    let mut r = Report::new("idle", &t.addr().to_string());
    r.add("connections", a.connections);
    r.add("channels", a.channels);
    r.add("subscribed", ready.subscribed);
    r.add("errors", ready.errors);
    r.add("closed_by_server", closed);
    let secs = ready.elapsed_ns as f64 / 1e9;
    r.add("open_all_s", r2(secs));
    r.add(
        "connect_subscribe_per_s",
        r2(ready.subscribed as f64 / secs.max(1e-9)),
    );
    if let (Some(b), Some(f)) = (before, after) {
        r.add("server_rss_before_kib", b.rss_kib);
        r.add("server_rss_after_kib", f.rss_kib);
        let per = (f.rss_kib as f64 - b.rss_kib as f64) * 1024.0 / ready.subscribed.max(1) as f64;
        r.add("server_bytes_per_connection", r2(per));
        r.add("server_cpu_s", r2(f.cpu_secs - b.cpu_secs));
    }
    r.add("generator_cpu_s", r2(generator_cpu));
    r.print();
}

/// Keep-alive HTTP connections publishing through the API, at most one request in flight on
/// each; every request carries the caller's tag (e.g. its channel index) until it completes.
/// When the next publish is due, and what each one carries.
pub(crate) struct Pace {
    pub(crate) next_due: u64,
    pub(crate) interval: u64,
    pub(crate) count: usize,
    pub(crate) payload: usize,
    pub(crate) app: pusher::App,
    pub(crate) host: String,
}

impl Pace {
    /// Publishes at `rate` per second from now, with `payload`-byte stamped data.
    pub(crate) fn new(t: &Target, rate: f64, payload: usize) -> Pace {
        Pace {
            next_due: now_ns(),
            interval: (1e9 / rate) as u64,
            count: 0,
            payload,
            app: t.app(),
            host: t.addr().to_string(),
        }
    }
}

pub(crate) struct Publisher {
    pool: Pool,
    in_flight: Vec<Option<usize>>,
    cursor: usize,
}

impl Publisher {
    /// Opens `conns` connections (spread over the nodes with `--publish-all-nodes`); exits
    /// the process when the server cannot be reached.
    pub(crate) fn open(t: &Target, conns: usize) -> Publisher {
        let mut pool = Pool::new(t.addr(), Vec::new(), t.source_base);
        let ports = match t.publish_all_nodes {
            true => t.ports(),
            false => vec![t.port],
        };
        let conns = conns.max(ports.len());
        for i in 0..conns {
            let to = std::net::SocketAddrV4::new(t.host, ports[i % ports.len()]);
            if let Err(e) = pool.open_http_to(to) {
                eprintln!("loadtest: cannot open a publisher connection: {e}");
                std::process::exit(1);
            }
        }
        Publisher {
            pool,
            in_flight: vec![None; conns],
            cursor: 0,
        }
    }

    /// Waits up to `wait_ms`; `done(tag, accepted)` for every completed request (accepted: 200).
    pub(crate) fn poll(&mut self, wait_ms: i32, done: &mut dyn FnMut(usize, bool)) {
        let in_flight = &mut self.in_flight;
        self.pool
            .poll(wait_ms, &mut |_, _, _| {}, &mut |i, status, _| {
                if let Some(tag) = in_flight[i].take() {
                    done(tag, status == 200);
                }
            });
    }

    /// Replaces idle connections the server closed.
    pub(crate) fn reopen_broken(&mut self) {
        for (i, slot) in self.in_flight.iter().enumerate() {
            if slot.is_none() && self.pool.http[i].broken {
                let _ = self.pool.reopen_http(i);
            }
        }
    }

    /// The next idle, unbroken connection (round robin), if any.
    pub(crate) fn free_connection(&mut self) -> Option<usize> {
        let n = self.in_flight.len();
        let i = (0..n)
            .map(|j| (self.cursor + j) % n)
            .find(|&j| self.in_flight[j].is_none() && !self.pool.http[j].broken)?;
        self.cursor = i + 1;
        Some(i)
    }

    /// Sends each publish that is due by now, `pace.interval` apart, round robin over
    /// `channels` (each request tagged with its channel's index), while a connection is free.
    /// More than 1 s behind, it skips ahead instead of bursting to catch up. Returns the count.
    pub(crate) fn send_due(&mut self, pace: &mut Pace, channels: &[String], event: &str) -> u64 {
        let mut sent = 0;
        while pace.next_due <= now_ns() {
            let Some(i) = self.free_connection() else {
                break; // every connection busy: the publisher is lagging
            };
            let c = pace.count % channels.len();
            pace.count += 1;
            let data = pusher::stamped_data(now_ns(), pace.payload);
            let request = pusher::trigger_request(
                &pace.app,
                &pace.host,
                &channels[c],
                event,
                &data,
                unix_secs(),
            );
            self.send_on(i, c, &request);
            sent += 1;
            pace.next_due += pace.interval;
        }
        if pace.next_due + 1_000_000_000 < now_ns() {
            pace.next_due = now_ns();
        }
        sent
    }

    pub(crate) fn send_on(&mut self, i: usize, tag: usize, request: &[u8]) {
        self.pool.http[i].send(request, now_ns());
        self.in_flight[i] = Some(tag);
    }

    /// Requests without a response yet.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.iter().filter(|f| f.is_some()).count()
    }

    pub(crate) fn idle(&self) -> bool {
        self.in_flight.iter().all(Option::is_none)
    }
}

#[derive(Args, Clone, Debug)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub target: Target,
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// Publishes per second (each to one channel, round robin).
    #[arg(long, default_value_t = 5.0)]
    pub rate: f64,
    /// Seconds of publishing (per step with --find-max).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Bytes of event data.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Keep-alive HTTP connections of the publisher (one request in flight on each).
    #[arg(long, default_value_t = 8)]
    pub http_conns: usize,
    #[arg(long, default_value_t = 0)]
    pub procs: usize,
    #[arg(long, default_value = "fan-")]
    pub channel_prefix: String,
    /// Step the rate up (x --step-factor) until p99 exceeds --max-p99-ms, a delivery is lost or
    /// the publisher cannot keep the rate; report the highest sustainable deliveries/s.
    #[arg(long)]
    pub find_max: bool,
    #[arg(long, default_value_t = 50.0)]
    pub max_p99_ms: f64,
    #[arg(long, default_value_t = 1.5)]
    pub step_factor: f64,
    #[arg(long, default_value_t = 12)]
    pub max_steps: usize,
    /// Seconds to wait for outstanding deliveries after the last publish.
    #[arg(long, default_value_t = 5)]
    pub drain: u64,
}

/// What one publishing phase measured.
struct Phase {
    rate: f64,
    sent: u64,
    accepted: u64,
    rejected: u64,
    expected: u64,
    received: u64,
    closed: u64,
    publish_secs: f64,
    delivery_secs: f64,
    server_cpu: Option<f64>,
    generator_cpu: f64,
    hist: hdrhistogram::Histogram<u64>,
}

impl Phase {
    fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.received)
    }

    fn p99_ms(&self) -> f64 {
        if self.hist.is_empty() {
            return f64::INFINITY;
        }
        self.hist.value_at_quantile(0.99) as f64 / 1000.0
    }

    fn report(&self, r: &mut Report) {
        r.add("rate_target", r2(self.rate));
        r.add("publishes_sent", self.sent);
        r.add("publishes_accepted", self.accepted);
        r.add("publishes_rejected", self.rejected);
        r.add(
            "publish_rate_achieved",
            r2(self.sent as f64 / self.publish_secs.max(1e-9)),
        );
        r.add("deliveries_expected", self.expected);
        r.add("deliveries_received", self.received);
        r.add("deliveries_lost", self.lost());
        r.add("sockets_closed_by_server", self.closed);
        r.add(
            "deliveries_per_s",
            r2(self.received as f64 / self.delivery_secs.max(1e-9)),
        );
        r.extend(measure::latency_fields(&self.hist));
        if let Some(cpu) = self.server_cpu {
            r.add("server_cpu_s", r2(cpu));
            r.add(
                "server_cpu_s_per_million_deliveries",
                r2(cpu * 1e6 / self.received.max(1) as f64),
            );
        }
        r.add("generator_cpu_s", r2(self.generator_cpu));
    }
}

pub fn fanout(a: &FanoutArgs) {
    let t = &a.target;
    let mut children = spawn_subscribers(t, a.subscribers, a.channels, &a.channel_prefix, a.procs);
    let ready = children.wait_ready(t.timeout());
    let pids = children.pids();
    let per_channel = subscribers_per_channel(t, a.subscribers, a.channels, a.procs);
    let mut publisher = Publisher::open(t, a.http_conns);
    let channels: Vec<String> = (0..a.channels)
        .map(|c| channel_name(&a.channel_prefix, c))
        .collect();
    let deadline = now_ns() + t.timeout().as_nanos() as u64;

    let mut run_phase = |rate: f64, seconds: u64, children: &mut Children| -> Phase {
        let server_before = server_sample(t);
        let generator_before = cpu_of(&pids) + measure::own_cpu_secs();
        let start = now_ns();
        let end = start + seconds * 1_000_000_000;
        let mut pace = Pace::new(t, rate, a.payload);
        let mut accepted_on = vec![0u64; a.channels];
        let (mut sent, mut accepted, mut rejected) = (0u64, 0u64, 0u64);
        loop {
            let now = now_ns();
            let publishing = now < end && now < deadline;
            if !publishing && publisher.idle() {
                break;
            }
            let wait_ms = match publishing {
                true => (pace.next_due.saturating_sub(now) / 1_000_000).min(5) as i32,
                false => 5,
            };
            publisher.poll(wait_ms, &mut |c, ok| {
                if ok {
                    accepted += 1;
                    accepted_on[c] += 1;
                } else {
                    rejected += 1;
                }
            });
            if now_ns() > end + 10_000_000_000 {
                break; // responses that never came count as rejected below
            }
            publisher.reopen_broken();
            if publishing {
                sent += publisher.send_due(&mut pace, &channels, "load");
            }
        }
        rejected += publisher.in_flight() as u64;
        let publish_secs = (now_ns().min(end) - start) as f64 / 1e9;
        let expected: u64 = accepted_on
            .iter()
            .zip(&per_channel)
            .map(|(n, s)| n * s)
            .sum();
        let drain_end = now_ns() + a.drain * 1_000_000_000;
        let mut delivered_at = now_ns();
        while now_ns() < drain_end {
            if children.progress() >= expected {
                delivered_at = now_ns();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
            delivered_at = now_ns();
        }
        let server_cpu = server_cpu_since(t, server_before);
        let generator_cpu = cpu_of(&pids) + measure::own_cpu_secs() - generator_before;
        let (received, closed, hist) = children.mark();
        Phase {
            rate,
            sent,
            accepted,
            rejected,
            expected,
            received,
            closed,
            publish_secs,
            delivery_secs: (delivered_at - start) as f64 / 1e9,
            server_cpu,
            generator_cpu,
            hist,
        }
    };

    let target = t.addr().to_string();
    let mut report = Report::new(
        if a.find_max {
            "fanout-find-max"
        } else {
            "fanout"
        },
        &target,
    );
    report.add("subscribers", a.subscribers);
    report.add("channels", a.channels);
    report.add("subscribed", ready.subscribed);
    report.add("subscribe_errors", ready.errors);
    report.add("payload_bytes", a.payload);
    if !a.find_max {
        let phase = run_phase(a.rate, a.duration, &mut children);
        children.stop();
        phase.report(&mut report);
        report.print();
        return;
    }
    let mut rate = a.rate;
    let mut best: Option<Phase> = None;
    for step in 0..a.max_steps {
        let phase = run_phase(rate, a.duration, &mut children);
        let achieved = phase.sent as f64 / phase.publish_secs.max(1e-9);
        let ok = phase.lost() == 0 && phase.p99_ms() <= a.max_p99_ms && achieved >= 0.95 * rate;
        println!(
            "step {step}: rate {rate:.0}/s achieved {achieved:.0}/s, {} deliveries/s, p99 {:.2} ms, lost {}{}",
            (phase.received as f64 / phase.delivery_secs.max(1e-9)) as u64,
            phase.p99_ms(),
            phase.lost(),
            if ok { "" } else { "  <- over the limit" }
        );
        if !ok {
            break;
        }
        best = Some(phase);
        rate *= a.step_factor;
        if now_ns() > deadline {
            break;
        }
    }
    children.stop();
    match best {
        Some(phase) => {
            report.add(
                "max_sustainable_deliveries_per_s",
                r2(phase.received as f64 / phase.delivery_secs.max(1e-9)),
            );
            phase.report(&mut report);
        }
        None => report.add("max_sustainable_deliveries_per_s", 0),
    }
    report.print();
}

#[derive(Args, Clone, Debug)]
pub struct ChurnArgs {
    #[command(flatten)]
    pub target: Target,
    /// Cycles in progress at once.
    #[arg(long, default_value_t = 64)]
    pub parallel: usize,
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    #[arg(long, default_value_t = 100)]
    pub channels: usize,
}

pub fn churn(a: &ChurnArgs) {
    let t = &a.target;
    let app = t.app();
    let channels: Vec<String> = (0..a.channels).map(|c| channel_name("churn-", c)).collect();
    let request = pusher::upgrade_request(&t.addr().to_string(), &app.key);
    let mut pool = Pool::new(t.addr(), request, t.source_base);
    let server_before = server_sample(t);
    let own_before = measure::own_cpu_secs();
    let start = now_ns();
    let end = start + a.duration.min(t.timeout) * 1_000_000_000;
    let (mut cycles, mut errors) = (0u64, 0u64);
    let mut hist = measure::histogram();
    // Socket n (its tag) joins channel n % channels.
    let mut sockets = Cycles::new(a.parallel, None);
    while now_ns() < end {
        let round = sockets.round(&mut pool, u64::MAX, &mut |ws, _, event| {
            let WsEvent::Text(text) = event else {
                return false;
            };
            let confirmed = pusher::advance_subscription(ws, text, |tag, id| {
                pusher::subscribe(&app, id, &channels[tag as usize % a.channels], None)
            });
            if confirmed {
                record_latency(&mut hist, ws.since, now_ns());
            }
            confirmed
        });
        // A socket the server closed before its subscription was confirmed is an error.
        errors += round.connect_failed + round.dropped.len() as u64;
        cycles += round.finished;
    }
    let secs = (now_ns() - start) as f64 / 1e9;
    let mut r = Report::new("churn", &t.addr().to_string());
    r.add("parallel", a.parallel);
    r.add("cycles", cycles);
    // Failed connects are in `errors` already (each round counts its own).
    r.add("errors", errors);
    r.add("cycles_per_s", r2(cycles as f64 / secs));
    // Latency of one cycle: connect, upgrade, connection_established, subscribe, confirmation.
    r.extend(measure::latency_fields(&hist));
    if let Some(cpu) = server_cpu_since(t, server_before) {
        r.add("server_cpu_s", r2(cpu));
        r.add(
            "server_cpu_us_per_cycle",
            r2(cpu * 1e6 / cycles.max(1) as f64),
        );
    }
    r.add("generator_cpu_s", r2(measure::own_cpu_secs() - own_before));
    r.print();
}

#[derive(Args, Clone, Debug)]
pub struct ClientEventsArgs {
    #[command(flatten)]
    pub target: Target,
    #[arg(long, default_value_t = 100)]
    pub pairs: usize,
    /// Client events per second per sender (servers allow 10).
    #[arg(long, default_value_t = 5.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
}

/// Opens `count` sockets; socket i subscribes to `channel(i)` (signed when needed).
pub(crate) fn open_subscribed(
    pool: &mut Pool,
    t: &Target,
    count: usize,
    subscribe: &dyn Fn(usize, &str) -> String,
) -> Vec<usize> {
    let mut ids = Vec::with_capacity(count);
    let mut ready = 0usize;
    let deadline = now_ns() + t.timeout().as_nanos() as u64;
    while ready < count && now_ns() < deadline {
        while ids.len() < count && pool.opening < t.concurrency {
            match pool.open_ws(ids.len() as u32, now_ns()) {
                Some(idx) => ids.push(idx),
                None => {
                    eprintln!("loadtest: connect failed");
                    return ids;
                }
            }
        }
        pool.poll(
            5,
            &mut |ws, _, event| {
                if let WsEvent::Text(text) = event {
                    let confirmed = pusher::advance_subscription(ws, text, |tag, id| {
                        subscribe(tag as usize, id)
                    });
                    ready += confirmed as usize;
                }
            },
            &mut |_, _, _| {},
        );
    }
    ids
}

pub fn client_events(a: &ClientEventsArgs) {
    let t = &a.target;
    let app = t.app();
    let request = pusher::upgrade_request(&t.addr().to_string(), &app.key);
    let mut pool = Pool::new(t.addr(), request, t.source_base);
    let channel = |i: usize| format!("private-ce-{}", i / 2);
    let ids = open_subscribed(&mut pool, t, a.pairs * 2, &|i, socket_id| {
        pusher::subscribe(&app, socket_id, &channel(i), None)
    });
    let server_before = server_sample(t);
    let own_before = measure::own_cpu_secs();
    let mut hist = measure::histogram();
    let (mut sent, mut received, mut errors) = (0u64, 0u64, 0u64);
    let start = now_ns();
    let end = start + a.duration.min(t.timeout) * 1_000_000_000;
    let per_sec = a.rate * a.pairs as f64;
    while now_ns() < end {
        let due = ((now_ns() - start) as f64 / 1e9 * per_sec) as u64;
        while sent < due {
            let pair = (sent % a.pairs as u64) as usize;
            let idx = ids[pair * 2];
            let data = pusher::stamped_data(now_ns(), a.payload);
            let msg = format!(
                "{{\"event\":\"client-load\",\"channel\":\"{}\",\"data\":\"{data}\"}}",
                channel(pair * 2)
            );
            pool.ws[idx].send_text(msg.as_bytes());
            sent += 1;
        }
        pool.poll(
            1,
            &mut |_, _, event| {
                if let WsEvent::Text(text) = event {
                    if let Some(stamp) = pusher::stamp_of(text) {
                        received += 1;
                        record_latency(&mut hist, stamp, now_ns());
                    } else if pusher::is_event(text, b"pusher:error") {
                        errors += 1;
                    }
                }
            },
            &mut |_, _, _| {},
        );
    }
    let drain_end = now_ns() + 3_000_000_000;
    while received < sent && now_ns() < drain_end {
        pool.poll(
            5,
            &mut |_, _, event| {
                if let WsEvent::Text(text) = event {
                    if let Some(stamp) = pusher::stamp_of(text) {
                        received += 1;
                        record_latency(&mut hist, stamp, now_ns());
                    }
                }
            },
            &mut |_, _, _| {},
        );
    }
    let secs = (now_ns() - start) as f64 / 1e9;
    let mut r = Report::new("client-events", &t.addr().to_string());
    r.add("pairs", a.pairs);
    r.add("sent", sent);
    r.add("received", received);
    r.add("lost", sent.saturating_sub(received));
    r.add("errors", errors);
    r.add("events_per_s", r2(received as f64 / secs));
    r.extend(measure::latency_fields(&hist));
    if let Some(cpu) = server_cpu_since(t, server_before) {
        r.add("server_cpu_s", r2(cpu));
    }
    r.add("generator_cpu_s", r2(measure::own_cpu_secs() - own_before));
    r.print();
}

#[derive(Args, Clone, Debug)]
pub struct PresenceArgs {
    #[command(flatten)]
    pub target: Target,
    #[arg(long, default_value_t = 10)]
    pub channels: usize,
    /// Members joining at once (each joins, is announced, leaves, and joins again).
    #[arg(long, default_value_t = 50)]
    pub parallel: usize,
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
}

pub fn presence(a: &PresenceArgs) {
    let t = &a.target;
    let app = t.app();
    let request = pusher::upgrade_request(&t.addr().to_string(), &app.key);
    let mut pool = Pool::new(t.addr(), request, t.source_base);
    let channel = |c: usize| format!("presence-load-{c}");
    // One observer per channel, tagged with its channel.
    let observers = open_subscribed(&mut pool, t, a.channels, &|c, socket_id| {
        let data = format!("{{\"user_id\":\"observer-{c}\"}}");
        pusher::subscribe(&app, socket_id, &channel(c), Some(&data))
    });
    let observer_set: std::collections::HashSet<usize> = observers.iter().copied().collect();
    let server_before = server_sample(t);
    let own_before = measure::own_cpu_secs();
    let mut added = measure::histogram();
    let (mut joins, mut removed, mut errors) = (0u64, 0u64, 0u64);
    let start = now_ns();
    let end = start + a.duration.min(t.timeout) * 1_000_000_000;
    // Member n (its tag) joins channel n % channels.
    let mut members = Cycles::new(a.parallel, None);
    while now_ns() < end {
        let round = members.round(&mut pool, u64::MAX, &mut |ws, idx, event| match event {
            WsEvent::Text(text) if observer_set.contains(&idx) => {
                if pusher::is_event(text, b"pusher_internal:member_added") {
                    // The member's user id is its join time: "m<ns>".
                    if let Some(at) = memchr::memmem::find(text, b"user_id\\\":\\\"m") {
                        let digits = &text[at + 13..];
                        let end = digits.iter().position(|b| !b.is_ascii_digit()).unwrap_or(0);
                        if let Ok(ns) = std::str::from_utf8(&digits[..end])
                            .unwrap_or("")
                            .parse::<u64>()
                        {
                            record_latency(&mut added, ns, now_ns());
                        }
                    }
                } else if pusher::is_event(text, b"pusher_internal:member_removed") {
                    removed += 1;
                }
                false
            }
            WsEvent::Text(text) => {
                let confirmed = pusher::advance_subscription(ws, text, |tag, id| {
                    let data = format!("{{\"user_id\":\"m{}\"}}", now_ns());
                    let c = tag as usize % a.channels;
                    pusher::subscribe(&app, id, &channel(c), Some(&data))
                });
                if !confirmed && pusher::is_event(text, b"pusher:error") {
                    errors += 1;
                }
                confirmed
            }
            WsEvent::Closed => false,
        });
        // A member the server closed before it joined is an error (an observer closing is not).
        errors += round.connect_failed + round.dropped.len() as u64;
        joins += round.finished;
    }
    let secs = (now_ns() - start) as f64 / 1e9;
    let mut r = Report::new("presence", &t.addr().to_string());
    r.add("channels", a.channels);
    r.add("joins", joins);
    r.add("joins_per_s", r2(joins as f64 / secs));
    r.add("member_added_seen", added.len());
    r.add("member_removed_seen", removed);
    r.add("errors", errors);
    r.extend(measure::latency_fields(&added));
    if let Some(cpu) = server_cpu_since(t, server_before) {
        r.add("server_cpu_s", r2(cpu));
    }
    r.add("generator_cpu_s", r2(measure::own_cpu_secs() - own_before));
    r.print();
}
