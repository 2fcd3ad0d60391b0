//! The Prometheus text format (version 0.0.4) of the process's metrics: each shard's counters
//! summed, plus what the node, the webhooks and the kernel know. Labels come from bounded
//! sets only: app ids from the configuration, shard numbers, close codes, routes, statuses.

use crate::metrics::{self, Counter, Gauge, Route, ShardMetrics};
use crate::shard::Node;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::time::UNIX_EPOCH;

/// The `Content-Type` of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The whole scrape.
pub fn render(node: &Node) -> String {
    let mut out = Out(String::with_capacity(8 * 1024));
    let shards = &node.metrics;
    let sum = |f: &dyn Fn(&ShardMetrics) -> &Counter| shards.iter().map(|m| f(m).get()).sum();
    let live = node.apps.live();
    let apps: Vec<(usize, &str)> = live
        .iter()
        .map(|(s, a)| (*s as usize, a.id.as_str()))
        .collect();

    out.family("shardpush_build_info", "gauge", "The running version.");
    let version = env!("CARGO_PKG_VERSION");
    out.sample("shardpush_build_info", &[("version", version)], 1);
    out.family(
        "process_start_time_seconds",
        "gauge",
        "When the process started, in seconds since the Unix epoch.",
    );
    let start = node
        .started_at
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    out.sample("process_start_time_seconds", &[], start.as_secs());
    if let Some(bytes) = metrics::resident_memory_bytes() {
        out.family("process_resident_memory_bytes", "gauge", "Resident memory.");
        out.sample("process_resident_memory_bytes", &[], bytes);
    }
    if let Some(fds) = metrics::open_fds() {
        out.family("process_open_fds", "gauge", "Open file descriptors.");
        out.sample("process_open_fds", &[], fds);
    }
    out.family(
        "shardpush_ready",
        "gauge",
        "1 while the process takes new clients (what /ready answers).",
    );
    out.sample("shardpush_ready", &[], node.readiness().is_ok() as u64);
    out.family("shardpush_shards", "gauge", "Shards (executor threads).");
    out.sample("shardpush_shards", &[], node.shards as u64);

    out.family(
        "shardpush_connections",
        "gauge",
        "Open WebSocket connections, per app.",
    );
    for (slot, app) in &apps {
        let count = node.app_connections[*slot].load(Ordering::Relaxed) as u64;
        out.sample("shardpush_connections", &[("app", app)], count);
    }
    out.counter(
        "shardpush_connections_opened_total",
        "WebSocket connections admitted.",
        sum(&|m| &m.connections_opened),
    );
    let by_code = |name, help, f: &dyn Fn(&ShardMetrics) -> &[Counter], out: &mut Out| {
        out.family(name, "counter", help);
        for slot in 0..metrics::CLOSE_SLOTS {
            let n: u64 = shards.iter().map(|m| f(m)[slot].get()).sum();
            if n > 0 {
                out.sample(name, &[("code", &metrics::close_label(slot))], n);
            }
        }
    };
    by_code(
        "shardpush_connections_closed_total",
        "Admitted WebSocket connections that ended, by the close code that ended them (1006: \
         no close frame from either side).",
        &|m| &m.connections_closed,
        &mut out,
    );
    by_code(
        "shardpush_connections_refused_total",
        "WebSocket upgrades refused at admission, by close code.",
        &|m| &m.connections_refused,
        &mut out,
    );
    out.family(
        "shardpush_pending_sockets",
        "gauge",
        "Sockets accepted whose first request has not arrived yet.",
    );
    let pending = node.pending_connections.load(Ordering::Relaxed) as u64;
    out.sample("shardpush_pending_sockets", &[], pending);

    let per_app = |name, help, pick: fn(&ShardMetrics) -> &[Gauge], out: &mut Out| {
        out.family(name, "gauge", help);
        for (slot, app) in &apps {
            let n = ShardMetrics::app_total(shards, pick, *slot);
            out.sample(name, &[("app", app)], n as u64);
        }
    };
    per_app(
        "shardpush_subscriptions",
        "Confirmed channel subscriptions of this node's connections, per app.",
        |m| &m.subscriptions,
        &mut out,
    );
    per_app(
        "shardpush_channels",
        "Channels with at least one subscriber on this node, per app.",
        |m| &m.channels,
        &mut out,
    );
    per_app(
        "shardpush_presence_members",
        "Members of presence channels connected to this node, per app (summed over channels).",
        |m| &m.presence_members,
        &mut out,
    );

    out.counter(
        "shardpush_client_messages_total",
        "WebSocket messages received from clients.",
        sum(&|m| &m.client_messages),
    );
    out.counter(
        "shardpush_websocket_received_bytes_total",
        "Bytes read from WebSocket clients.",
        sum(&|m| &m.bytes_received),
    );
    out.counter(
        "shardpush_client_events_total",
        "Client events (client-*) accepted.",
        sum(&|m| &m.client_events),
    );
    out.counter(
        "shardpush_client_events_rate_limited_total",
        "Client events refused by the per-connection rate limit (4301).",
        sum(&|m| &m.client_events_rate_limited),
    );
    out.family(
        "shardpush_http_requests_total",
        "counter",
        "HTTP requests answered, by route and status.",
    );
    for (r, route) in Route::ALL.iter().enumerate() {
        for slot in 0..metrics::STATUS_SLOTS {
            let n: u64 = shards.iter().map(|m| m.http_requests[r][slot].get()).sum();
            if n > 0 {
                let status = metrics::status_label(slot);
                let labels = [("route", route.label()), ("status", status.as_str())];
                out.sample("shardpush_http_requests_total", &labels, n);
            }
        }
    }
    out.counter(
        "shardpush_events_published_total",
        "Events accepted by the HTTP API (a batch counts each event).",
        sum(&|m| &m.events_published),
    );
    out.counter(
        "shardpush_frames_delivered_total",
        "Frames queued for WebSocket connections (one per connection per message).",
        sum(&|m| &m.frames_delivered),
    );
    out.counter(
        "shardpush_websocket_sent_bytes_total",
        "Bytes written to WebSocket connections.",
        sum(&|m| &m.bytes_sent),
    );
    out.counter(
        "shardpush_tls_handshake_failures_total",
        "TLS sockets given up before their handshake completed (not TLS, refused, or closed or \
         timed out first).",
        sum(&|m| &m.tls_handshake_failures),
    );
    out.counter(
        "shardpush_slow_consumer_closes_total",
        "Connections closed because their outbound queue was full (4100).",
        node.slow_consumer_closes.load(Ordering::Relaxed),
    );
    out.counter(
        "shardpush_handler_panics_total",
        "Panics caught while serving one connection (that connection was closed).",
        node.contained_panics.load(Ordering::Relaxed),
    );
    out.per_shard(
        "shardpush_mesh_queue_depth",
        "Messages each shard has queued for the shards and not yet handed over.",
        shards,
        |m| &m.mesh_queue_depth,
    );
    out.family(
        "shardpush_partial_message_bytes",
        "gauge",
        "Bytes held for incomplete WebSocket messages (see max_partial_message_bytes).",
    );
    let partial = node.partial_bytes_total() as u64;
    out.sample("shardpush_partial_message_bytes", &[], partial);

    if node.config.cluster.is_some() {
        cluster(node, &mut out);
    }
    if let Some(webhooks) = &node.webhooks {
        let stats = &webhooks.stats;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        out.family(
            "shardpush_webhook_events_pending",
            "gauge",
            "Webhook events this node holds for delivery (batched, in flight, retrying, or in \
             the 3 s delay).",
        );
        let pending = get(&stats.pending);
        out.sample("shardpush_webhook_events_pending", &[], pending);
        out.counter(
            "shardpush_webhook_events_delivered_total",
            "Webhook events in requests answered with a 2xx.",
            get(&stats.delivered),
        );
        out.counter(
            "shardpush_webhook_events_failed_total",
            "Webhook events given up on (refused, or failing past retry_for).",
            get(&stats.failed),
        );
        out.counter(
            "shardpush_webhook_events_dropped_total",
            "Webhook events dropped at a bound (max_pending).",
            get(&stats.dropped),
        );
        out.counter(
            "shardpush_webhook_retries_total",
            "Webhook requests that failed and were tried again.",
            get(&stats.retried),
        );
    }
    out.0
}

fn cluster(node: &Node, out: &mut Out) {
    out.per_shard(
        "shardpush_redis_link_up",
        "1 while the shard's Redis link is connected.",
        &node.metrics,
        |m| &m.redis_link_up,
    );
    let losses = node.metrics.iter().map(|m| m.redis_link_losses.get()).sum();
    out.counter(
        "shardpush_redis_link_losses_total",
        "Times a shard's Redis link was lost (it then reconnects).",
        losses,
    );
    out.counter(
        "shardpush_cluster_publishes_refused_total",
        "Publishes refused while Redis was away and the shard's queue for it was full.",
        node.cluster_publishes_refused.load(Ordering::Relaxed),
    );
    out.counter(
        "shardpush_cluster_messages_skipped_total",
        "Unreadable messages on cluster topics, skipped.",
        node.cluster_messages_skipped.load(Ordering::Relaxed),
    );
}

/// The text being built.
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// A gauge each shard has one of, labelled with the shard's number.
    fn per_shard(
        &mut self,
        name: &str,
        help: &str,
        shards: &[&ShardMetrics],
        pick: fn(&ShardMetrics) -> &Gauge,
    ) {
        self.family(name, "gauge", help);
        for (i, m) in shards.iter().enumerate() {
            let value = pick(m).get().max(0) as u64;
            self.sample(name, &[("shard", &i.to_string())], value);
        }
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, "counter", help);
        self.sample(name, &[], value);
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (label, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{label}=\"");
                escape_label_value(&mut self.0, value);
                self.0.push('"');
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// A label value with `\`, `"` and newlines escaped, as the text format requires.
fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_escape_label_values() {
        let mut out = Out(String::new());
        out.sample("m", &[("app", "a\"b\\c\nd"), ("x", "y")], 3);
        assert_eq!(out.0, "m{app=\"a\\\"b\\\\c\\nd\",x=\"y\"} 3\n");
    }

    #[test]
    fn renders_every_family_with_help_and_type() {
        let config =
            crate::config::Config::load(&crate::config::Cli::default(), &|_| None::<String>)
                .unwrap();
        let node = Node::new(config, 2);
        node.metrics[1].frames_delivered.add(5);
        node.metrics[0].frames_delivered.add(2);
        let text = render(&node);
        assert!(text.contains("\nshardpush_frames_delivered_total 7\n"));
        assert!(text.contains("shardpush_connections{app=\"app-id\"} 0\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} has no TYPE"
            );
        }
    }
}
