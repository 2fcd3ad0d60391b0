//! Node death in a cluster: members of a presence channel on one node, a watcher on another;
//! the victim node is killed (SIGKILL, its PID given by the caller who started it) and the
//! watcher times how long the cluster takes to announce every member's departure.

use crate::measure::{r2, Report};
use crate::net::{now_ns, Pool, WsEvent};
use crate::workloads::open_subscribed;
use crate::{pusher, Target};
use clap::Args;

#[derive(Args, Clone, Debug)]
pub struct NodeDeathArgs {
    /// The watcher's node is `--port`.
    #[command(flatten)]
    pub target: Target,
    /// The node whose members are killed with it.
    #[arg(long)]
    pub victim_port: u16,
    /// Its process, killed with SIGKILL once every member is announced.
    #[arg(long)]
    pub victim_pid: u32,
    /// Members on the victim node.
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// Seconds to wait for the departures.
    #[arg(long, default_value_t = 30)]
    pub wait: u64,
}

const CHANNEL: &str = "presence-node-death";

pub fn node_death(a: &NodeDeathArgs) {
    let t = &a.target;
    let app = t.app();
    let request = pusher::upgrade_request(&t.addr().to_string(), &app.key);
    let mut watching = Pool::new(t.addr(), request, t.source_base);
    let watcher = open_subscribed(&mut watching, t, 1, &|_, id| {
        pusher::subscribe(&app, id, CHANNEL, Some("{\"user_id\":\"watcher\"}"))
    });
    let mut victim = t.clone();
    victim.port = a.victim_port;
    let request = pusher::upgrade_request(&victim.addr().to_string(), &app.key);
    let mut members = Pool::new(victim.addr(), request, t.source_base + 1);
    let joined = open_subscribed(&mut members, &victim, a.members, &|i, id| {
        let data = format!("{{\"user_id\":\"m{i}\"}}");
        pusher::subscribe(&app, id, CHANNEL, Some(&data))
    });
    let (mut added, mut removed) = (0usize, 0usize);
    let (mut first_removed, mut last_removed) = (None, None);
    let mut count = |text: &[u8], now: u64, added: &mut usize, removed: &mut usize| {
        if pusher::is_event(text, b"pusher_internal:member_added") {
            *added += 1;
        } else if pusher::is_event(text, b"pusher_internal:member_removed") {
            *removed += 1;
            first_removed.get_or_insert(now);
            last_removed = Some(now);
        }
    };
    let deadline = now_ns() + a.wait * 1_000_000_000;
    while added < joined.len() && now_ns() < deadline {
        watching.poll(
            5,
            &mut |_, _, event| {
                if let WsEvent::Text(text) = event {
                    count(text, now_ns(), &mut added, &mut removed);
                }
            },
            &mut |_, _, _| {},
        );
        members.poll(0, &mut |_, _, _| {}, &mut |_, _, _| {});
    }
    // SAFETY: sends a signal to the process the caller started and named.
    unsafe { libc::kill(a.victim_pid as i32, libc::SIGKILL) };
    let killed = now_ns();
    let deadline = killed + a.wait * 1_000_000_000;
    while removed < joined.len() && now_ns() < deadline {
        watching.poll(
            20,
            &mut |_, _, event| {
                if let WsEvent::Text(text) = event {
                    count(text, now_ns(), &mut added, &mut removed);
                }
            },
            &mut |_, _, _| {},
        );
    }
    let ms = |at: Option<u64>| at.map(|at| r2((at.saturating_sub(killed)) as f64 / 1e6));
    let mut r = Report::new("node-death", &t.addr().to_string());
    r.add("watchers", watcher.len());
    r.add("members", joined.len());
    r.add("member_added_seen", added);
    r.add("member_removed_seen", removed);
    if let Some(first) = ms(first_removed) {
        r.add("kill_to_first_removed_ms", first);
    }
    if let Some(last) = ms(last_removed) {
        r.add("kill_to_last_removed_ms", last);
    }
    r.print();
}
