//! Subscriber processes. Every workload that needs many sockets runs them in child processes
//! of this binary (`loadtest subscribers ...`), each with its own source addresses, so one run can
//! exceed the 20,000 open files a process may have. A child reports on stdout:
//! `READY <subscribed> <errors> <elapsed_ns>`, then `RECV <n>` every 100 ms, and after `STOP` on
//! stdin, `DONE <received> <histogram hex>`.

use crate::measure::{self, histogram_to_hex, record_latency};
use crate::net::{now_ns, Pool, WsEvent};
use crate::pusher::{self, App};
use std::io::{BufRead, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// What a child is asked to do.
#[derive(clap::Args, Clone, Debug)]
pub struct Share {
    /// Global index of this child's first connection (connection g joins channel g % channels).
    #[arg(long, default_value_t = 0)]
    pub start: usize,
    #[arg(long)]
    pub count: usize,
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    #[arg(long, default_value = "load-")]
    pub channel_prefix: String,
    /// With `--channel-per-node`: the cluster's node count (0: every channel on every node).
    #[arg(long, default_value_t = 0)]
    pub nodes: usize,
    /// This process's node (its index among `--port` and `--node-ports`).
    #[arg(long, default_value_t = 0)]
    pub node_index: usize,
}

/// The channel of global connection `g`: `g % channels`, or with `nodes` only the channels
/// of this process's node (c % nodes == node_index), in turn.
pub fn channel_of(g: usize, share: &Share) -> usize {
    if share.nodes == 0 || share.channels < share.nodes {
        return g % share.channels;
    }
    let k = share.node_index % share.nodes;
    let on_node = (share.channels - k).div_ceil(share.nodes);
    k + share.nodes * (g % on_node)
}

pub fn channel_name(prefix: &str, c: usize) -> String {
    format!("{prefix}{c}")
}

/// Connects `count` sockets (at most `concurrency` opening at once) and subscribes each to its
/// channel. Returns (subscribed, errors, elapsed ns).
pub fn open_and_subscribe(
    pool: &mut Pool,
    app: &App,
    share: &Share,
    concurrency: usize,
    deadline_ns: u64,
) -> (usize, usize, u64) {
    let started = now_ns();
    let mut next = 0usize;
    let mut subscribed = 0usize;
    let mut failed = 0usize;
    let channels: Vec<String> = (0..share.channels)
        .map(|c| channel_name(&share.channel_prefix, c))
        .collect();
    while subscribed + failed < share.count && now_ns() < deadline_ns {
        while next < share.count && pool.opening < concurrency {
            let global = share.start + next;
            if pool
                .open_ws(channel_of(global, share) as u32, now_ns())
                .is_none()
            {
                failed += 1;
            }
            next += 1;
        }
        pool.poll(
            5,
            &mut |ws, _, event| match event {
                WsEvent::Text(text) => {
                    let confirmed = pusher::advance_subscription(ws, text, |tag, id| {
                        pusher::subscribe(app, id, &channels[tag as usize], None)
                    });
                    subscribed += confirmed as usize;
                }
                WsEvent::Closed => {
                    if ws.step < 2 {
                        failed += 1;
                    }
                }
            },
            &mut |_, _, _| {},
        );
    }
    (subscribed, failed, now_ns() - started)
}

/// The child process: subscribe, report, then count and time deliveries until told to stop.
pub fn run_child(target: &crate::Target, share: &Share) {
    let app = target.app();
    let request = pusher::upgrade_request(&target.addr().to_string(), &app.key);
    let mut pool = Pool::new(target.addr(), request, target.source_base);
    let deadline = now_ns() + target.timeout().as_nanos() as u64;
    let (ready, errors, elapsed) =
        open_and_subscribe(&mut pool, &app, share, target.concurrency, deadline);
    let wait_ms = if target.busy_poll { 0 } else { 20 };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "READY {ready} {errors} {elapsed}");
    let _ = out.flush();

    // Commands from the parent: MARK (report and reset the counters) and STOP (report and exit).
    let (commands, inbox) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let line = line.unwrap_or_else(|_| "STOP".into());
            let stop = line.trim() == "STOP";
            if commands.send(line.trim().to_owned()).is_err() || stop {
                return;
            }
        }
        let _ = commands.send("STOP".into());
    });
    let mut received = 0u64;
    let mut closed = 0u64;
    let mut hist = measure::histogram();
    let mut last_report = now_ns();
    loop {
        pool.poll(
            wait_ms,
            &mut |_, _, event| match event {
                WsEvent::Text(text) => {
                    if let Some(sent) = pusher::stamp_of(text) {
                        received += 1;
                        record_latency(&mut hist, sent, now_ns());
                    }
                }
                WsEvent::Closed => closed += 1,
            },
            &mut |_, _, _| {},
        );
        if now_ns() - last_report > 100_000_000 {
            last_report = now_ns();
            let _ = writeln!(out, "RECV {received} {closed}");
            let _ = out.flush();
        }
        let command = match inbox.try_recv() {
            Ok(c) => c,
            Err(mpsc::TryRecvError::Empty) if now_ns() < deadline => continue,
            Err(_) => "STOP".into(),
        };
        let _ = writeln!(out, "DONE {received} {closed} {}", histogram_to_hex(&hist));
        let _ = out.flush();
        if command == "STOP" {
            return;
        }
        received = 0;
        closed = 0;
        hist.reset();
    }
}

/// The parent's handle on its subscriber children.
pub struct Children {
    children: Vec<(Child, ChildStdin)>,
    lines: mpsc::Receiver<(usize, String)>,
    pub received: Vec<u64>,
    pub closed: Vec<u64>,
}

pub struct Ready {
    pub subscribed: usize,
    pub errors: usize,
    /// The slowest child's time to open and subscribe everything.
    pub elapsed_ns: u64,
}

impl Children {
    /// Starts `procs` children sharing `count` connections, each from its own source addresses;
    /// child k connects to `ports[k % ports.len()]` (the nodes of a cluster, in turn).
    pub fn spawn(
        base_args: &[String],
        count: usize,
        procs: usize,
        source_base: u32,
        ports: &[u16],
    ) -> Children {
        let exe = std::env::current_exe().expect("own path");
        let (tx, lines) = mpsc::channel();
        let mut children = Vec::new();
        for k in 0..procs {
            let start = count * k / procs;
            let node_index = (k % ports.len()).to_string();
            let end = count * (k + 1) / procs;
            let mut args = base_args.to_vec();
            if let Some(i) = args.iter().position(|a| a == "--port") {
                if let (Some(value), Some(port)) = (args.get_mut(i + 1), ports.get(k % ports.len()))
                {
                    *value = port.to_string();
                }
            }
            let mut child = Command::new(&exe)
                .arg("subscribers")
                .args(&args)
                .args([
                    "--start",
                    &start.to_string(),
                    "--count",
                    &(end - start).to_string(),
                ])
                .args(["--source-base", &(source_base + 2 * k as u32).to_string()])
                .args(["--node-index", &node_index])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start a subscriber child");
            let stdout = child.stdout.take().expect("piped stdout");
            let stdin = child.stdin.take().expect("piped stdin");
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stdout)
                    .lines()
                    .map_while(Result::ok)
                {
                    if tx.send((k, line)).is_err() {
                        break;
                    }
                }
            });
            children.push((child, stdin));
        }
        Children {
            received: vec![0; children.len()],
            closed: vec![0; children.len()],
            children,
            lines,
        }
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|(c, _)| c.id()).collect()
    }

    /// Waits for every child's READY line.
    pub fn wait_ready(&mut self, timeout: Duration) -> Ready {
        let mut ready = Ready {
            subscribed: 0,
            errors: 0,
            elapsed_ns: 0,
        };
        let mut waiting = self.children.len();
        let deadline = std::time::Instant::now() + timeout;
        while waiting > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Ok((_, line)) = self.lines.recv_timeout(left) else {
                eprintln!("loadtest: {waiting} subscriber process(es) not ready in time");
                break;
            };
            let parts: Vec<&str> = line.split_whitespace().collect();
            if let ["READY", s, e, t] = parts.as_slice() {
                ready.subscribed += s.parse::<usize>().unwrap_or(0);
                ready.errors += e.parse::<usize>().unwrap_or(0);
                ready.elapsed_ns = ready.elapsed_ns.max(t.parse().unwrap_or(0));
                waiting -= 1;
            }
        }
        ready
    }

    /// Takes in the progress lines that have arrived; returns the total received so far.
    pub fn progress(&mut self) -> u64 {
        while let Ok((k, line)) = self.lines.try_recv() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            if let ["RECV", n, c] = parts.as_slice() {
                self.received[k] = n.parse().unwrap_or(self.received[k]);
                self.closed[k] = c.parse().unwrap_or(self.closed[k]);
            }
        }
        self.received.iter().sum()
    }

    /// Asks every child for its counts since the last mark (and resets them); returns
    /// (received, closed by the server, merged latency histogram).
    pub fn mark(&mut self) -> (u64, u64, hdrhistogram::Histogram<u64>) {
        self.collect("MARK")
    }

    fn collect(&mut self, command: &str) -> (u64, u64, hdrhistogram::Histogram<u64>) {
        for (_, stdin) in self.children.iter_mut() {
            let _ = writeln!(stdin, "{command}");
            let _ = stdin.flush();
        }
        let mut hist = measure::histogram();
        let mut received = 0;
        let mut closed = 0;
        let mut waiting = self.children.len();
        while waiting > 0 {
            let Ok((_, line)) = self.lines.recv_timeout(Duration::from_secs(30)) else {
                eprintln!("loadtest: {waiting} subscriber process(es) did not answer {command}");
                break;
            };
            let parts: Vec<&str> = line.splitn(4, ' ').collect();
            if let ["DONE", n, c, hex] = parts.as_slice() {
                received += n.parse::<u64>().unwrap_or(0);
                closed += c.parse::<u64>().unwrap_or(0);
                if let Some(h) = measure::histogram_from_hex(hex) {
                    let _ = hist.add(&h);
                }
                waiting -= 1;
            }
        }
        self.received.iter_mut().for_each(|r| *r = 0);
        (received, closed, hist)
    }

    /// Stops every child and waits for it.
    pub fn stop(mut self) -> (u64, u64, hdrhistogram::Histogram<u64>) {
        let result = self.collect("STOP");
        for (child, stdin) in self.children.iter_mut() {
            let _ = stdin.flush();
            let _ = child.wait();
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(nodes: usize, node_index: usize) -> Share {
        Share {
            start: 0,
            count: 0,
            channels: 10,
            channel_prefix: String::new(),
            nodes,
            node_index,
        }
    }

    #[test]
    fn channels_stay_on_their_node_or_spread_over_all() {
        let spread: Vec<usize> = (0..12).map(|g| channel_of(g, &share(0, 1))).collect();
        assert_eq!(spread, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]);
        // 10 channels on 3 nodes: node 1 has channels 1, 4, 7.
        let on_node: Vec<usize> = (0..5).map(|g| channel_of(g, &share(3, 1))).collect();
        assert_eq!(on_node, [1, 4, 7, 1, 4]);
        let node0: Vec<usize> = (0..5).map(|g| channel_of(g, &share(3, 0))).collect();
        assert_eq!(node0, [0, 3, 6, 9, 0]);
    }
}
