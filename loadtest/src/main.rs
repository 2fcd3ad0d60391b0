//! loadtest: drives any Pusher Channels server (shardpush, sockudo, soketi) with the same
//! workloads over the public protocol and HTTP API, on loopback only, bounded in time and count.

mod cycles;
mod drain;
mod measure;
mod net;
mod node_death;
mod pusher;
mod soak;
mod subscribers;
mod webhook_sink;
mod workloads;

use clap::{Args, Parser, Subcommand};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "loadtest",
    about = "Pusher-protocol load generator (loopback only). Prints a table, then one JSON line."
)]
struct Cli {
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Subcommand)]
enum Workload {
    /// N connections, each subscribed to one of C channels: connect rate and server memory.
    Idle(workloads::IdleArgs),
    /// N subscribers over C channels, signed HTTP publishes at R/s: loss, latency, server CPU.
    Fanout(workloads::FanoutArgs),
    /// Connect, subscribe, disconnect in a loop: cycles/s and errors.
    Churn(workloads::ChurnArgs),
    /// Pairs of connections on private channels exchanging client events.
    ClientEvents(workloads::ClientEventsArgs),
    /// Members joining and leaving presence channels: member event latency.
    Presence(workloads::PresenceArgs),
    /// Everything at once for a bounded time (churn, publishes, presence, client events, hostile
    /// clients): loss, errors, hostile outcomes, and the server's RSS and CPU over time.
    Soak(soak::SoakArgs),
    /// A cluster node killed with presence members on it: time until the survivors announce
    /// every departure.
    NodeDeath(node_death::NodeDeathArgs),
    /// N connections, then SIGTERM to the server: when each close (code, or a TCP close) arrived
    /// after the signal, and the most closes in any 10 ms and 100 ms.
    ///
    /// Example: `loadtest drain --port 6401 --connections 5000 --server-pid PID --cpu 1`
    /// (--server-pid is the server process itself, listening on --port; it gets the SIGTERM.
    /// Also --app-key K, --wait-secs S; N is at most 19,000.)
    Drain(drain::DrainArgs),
    /// A webhook receiver on 127.0.0.1 that answers 200 at once, checks signatures and counts
    /// requests and events per second.
    WebhookSink(webhook_sink::SinkArgs),
    /// (internal) a subscriber process of another run.
    #[command(hide = true)]
    Subscribers(ChildArgs),
}

/// Where and as whom to connect, and the run's bounds.
#[derive(Args, Clone, Debug)]
pub struct Target {
    /// Server address: must be a loopback address (127.0.0.0/8).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: Ipv4Addr,
    #[arg(long, default_value_t = 6001)]
    pub port: u16,
    #[arg(long, default_value = "app-id")]
    pub app_id: String,
    #[arg(long, visible_alias = "app-key", default_value = "app-key")]
    pub key: String,
    #[arg(long, default_value = "app-secret")]
    pub secret: String,
    /// Sample this process's CPU and memory (the server under test).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Other nodes of a cluster: subscriber processes are spread over `--port` and these ports
    /// in turn (publishes still go to `--port`).
    #[arg(long, value_delimiter = ',')]
    pub node_ports: Vec<u16>,
    /// Publish through every node (`--port` and `--node-ports`) in turn, not only `--port`.
    #[arg(long)]
    pub publish_all_nodes: bool,
    /// Each channel's subscribers all on one node (channel c on node c % nodes), instead of
    /// every channel's subscribers spread over all the nodes.
    #[arg(long)]
    pub channel_per_node: bool,
    /// More processes whose CPU and memory count as the server's (the other nodes, redis-server).
    #[arg(long, value_delimiter = ',')]
    pub node_pids: Vec<u32>,
    /// Client sockets bind to 127.0.0.<N>, <N+1>, ... (20,000 sockets per address).
    #[arg(long, default_value_t = 2)]
    pub source_base: u32,
    /// Connections opening at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Hard bound on the whole run, in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Pin the generator (and its children) to this CPU.
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Subscriber processes spin on epoll instead of sleeping in it, so the server's sends do not
    /// pay for waking them (on loopback the sender's CPU runs the receiver's wakeup).
    #[arg(long)]
    pub busy_poll: bool,
}

impl Target {
    pub fn addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.host, self.port)
    }

    /// `--port` and then every `--node-ports`.
    pub fn ports(&self) -> Vec<u16> {
        let mut ports = vec![self.port];
        ports.extend(&self.node_ports);
        ports
    }

    pub fn app(&self) -> pusher::App {
        pusher::App {
            id: self.app_id.clone(),
            key: self.key.clone(),
            secret: self.secret.clone(),
        }
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout)
    }

    /// The flags that give a child process the same target.
    pub fn child_args(&self) -> Vec<String> {
        let mut args = vec![
            "--host".into(),
            self.host.to_string(),
            "--port".into(),
            self.port.to_string(),
            "--app-id".into(),
            self.app_id.clone(),
            "--key".into(),
            self.key.clone(),
            "--secret".into(),
            self.secret.clone(),
            "--concurrency".into(),
            self.concurrency.to_string(),
            "--timeout".into(),
            self.timeout.to_string(),
        ];
        if let Some(cpu) = self.cpu {
            args.extend(["--cpu".into(), cpu.to_string()]);
        }
        if self.busy_poll {
            args.push("--busy-poll".into());
        }
        args
    }
}

#[derive(Args, Clone, Debug)]
struct ChildArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    share: subscribers::Share,
}

fn pin_to(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!("loadtest: cannot pin to CPU {cpu}");
        }
    }
}

fn check(target: &Target) {
    if !target.host.is_loopback() {
        eprintln!("loadtest: --host must be a loopback address (127.0.0.0/8); load tests never leave this machine");
        std::process::exit(2);
    }
    if let Some(cpu) = target.cpu {
        pin_to(cpu);
    }
}

fn main() {
    let cli = Cli::parse();
    match cli.workload {
        Workload::Idle(a) => {
            check(&a.target);
            workloads::idle(&a)
        }
        Workload::Fanout(a) => {
            check(&a.target);
            workloads::fanout(&a)
        }
        Workload::Churn(a) => {
            check(&a.target);
            workloads::churn(&a)
        }
        Workload::ClientEvents(a) => {
            check(&a.target);
            workloads::client_events(&a)
        }
        Workload::Presence(a) => {
            check(&a.target);
            workloads::presence(&a)
        }
        Workload::Soak(a) => {
            check(&a.target);
            soak::soak(&a)
        }
        Workload::Drain(a) => {
            check(&a.target);
            drain::drain(&a)
        }
        Workload::WebhookSink(a) => webhook_sink::run(&a),
        Workload::NodeDeath(a) => {
            check(&a.target);
            node_death::node_death(&a)
        }
        Workload::Subscribers(a) => {
            check(&a.target);
            let t = &a.target;
            subscribers::run_child(t, &a.share)
        }
    }
}
