//! What every shard of this process reads: the configuration, process-wide counters, and the
//! hooks other threads use to reach a shard. A shard never writes anything here that another
//! shard writes too, except the relaxed counters.

use crate::apps::{AppRef, AppTable};
use crate::config::Config;
use crate::feed::{Console, Note};
use crate::metrics::ShardMetrics;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::task::Waker;
use std::time::{Instant, SystemTime};

/// This server process: one per process, created at startup, shared (`Arc`) by every shard, the
/// signal thread and the panic hook. Read-mostly: the configuration never changes but for the
/// apps, which a reload replaces in `apps`; counters are atomics.
pub struct Node {
    /// The configuration the process started with (its `apps` as at start: the live ones are
    /// in `apps`).
    pub config: Config,
    /// The apps served now, by slot (see `crate::apps`).
    pub apps: AppTable,
    /// Bumped by each reload that changed the apps, after `apps` changed: each shard then closes
    /// the connections of apps now disabled or removed.
    pub apps_generation: AtomicU64,
    /// Number of shards (executors) in the process.
    pub shards: usize,
    /// First part of every socket id (random per process, so ids differ across restarts/nodes).
    pub socket_prefix: u32,
    /// Open WebSocket connections per app (index: the app's slot).
    pub app_connections: Vec<AtomicU32>,
    /// In a cluster, the connections of each app on the other nodes, as of the last heartbeat
    /// (only apps with a `max_connections`; shard 0 writes them).
    pub app_connections_elsewhere: Vec<AtomicU32>,

    /// Open WebSocket connections in the process.
    pub connections: AtomicUsize,
    /// A shutdown was asked for (SIGINT/SIGTERM); set by the signal thread.
    pub shutdown: AtomicBool,
    /// The drain after a shutdown request is over: shards stop waiting for connections to close.
    pub drain_over: AtomicBool,
    /// When the drain began, on the signal thread's clock (set before `shutdown`).
    pub drain_started: std::sync::OnceLock<Instant>,
    /// The spread of the 4200 closes is over: every connection left is closed now.
    pub spread_over: AtomicBool,
    /// Shards whose connections are all gone; each keeps serving the mesh until all are.
    pub shards_drained: AtomicUsize,
    /// Connections closed as slow consumers (4100).
    pub slow_consumer_closes: AtomicU64,
    /// Panics caught while handling one connection (that connection was closed).
    pub contained_panics: AtomicU64,
    /// Publishes to other nodes refused because Redis was away and the queue was full.
    pub cluster_publishes_refused: AtomicU64,
    /// Unreadable messages on cluster topics, skipped.
    pub cluster_messages_skipped: AtomicU64,
    /// Sockets accepted whose first request head has not arrived yet.
    pub pending_connections: AtomicUsize,
    /// Each shard's lifecycle task (see `Shard::lifecycle`), woken from the signal thread. glommio
    /// wakes a task from another thread through its executor's eventfd, so shutdown never
    /// depends on a timer firing (issue 8: an idle shard whose timers were lost slept through
    /// SIGTERM).
    lifecycle_wakers: Mutex<Vec<Option<Waker>>>,
    /// The apps' webhooks (None: no app has any); set once, before the shards start.
    pub webhooks: Option<crate::webhooks::Webhooks>,
    /// Bytes each shard's frame readers hold for incomplete messages (one slot per shard, written
    /// only by its owner; summed only when a shard is over its fair share of the budget).
    partial_bytes: Vec<ShardCounter>,
    /// Each shard's counters for the metrics (written only by that shard; they live as long as
    /// the process).
    pub metrics: Vec<&'static ShardMetrics>,
    /// Every shard is listening: the process is ready for clients (until a shutdown).
    pub started: AtomicBool,
    /// When the process started, for the metrics.
    pub started_at: SystemTime,
    /// The debug console's log (None: `console` is off).
    pub console: Option<Arc<Console>>,
    /// The certificate for `wss://` and `https://` on the client ports (None: plain TCP); set
    /// once, before the shards start, and reloaded on SIGHUP.
    pub tls: Option<crate::tls::TlsSettings>,
}

/// Why the process is not ready for new clients (`/ready` answers 503 with it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotReady {
    /// The shards are not all listening yet.
    Starting,
    /// A shutdown is under way.
    Draining,
    /// Resident memory is above `ready_memory_limit_mb`.
    MemoryLimit,
}

impl NotReady {
    /// The reason, for the 503's body and the metrics.
    pub fn reason(self) -> &'static str {
        match self {
            NotReady::Starting => "starting",
            NotReady::Draining => "draining",
            NotReady::MemoryLimit => "memory above ready_memory_limit_mb",
        }
    }
}

/// A counter on a cache line of its own, so that shards writing their own never contend.
#[repr(align(64))]
#[derive(Default)]
struct ShardCounter(AtomicUsize);

impl Node {
    /// The process state for `config`, run on `shards` shards.
    pub fn new(config: Config, shards: usize) -> Node {
        let app_table = AppTable::new(&config.apps);
        let config_console = config.console;
        let apps = app_table.capacity();
        Node {
            config,
            apps: app_table,
            apps_generation: AtomicU64::new(0),
            shards,
            socket_prefix: random_u32() % 1_000_000_000,
            app_connections: (0..apps).map(|_| AtomicU32::new(0)).collect(),
            app_connections_elsewhere: (0..apps).map(|_| AtomicU32::new(0)).collect(),

            connections: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            drain_over: AtomicBool::new(false),
            drain_started: std::sync::OnceLock::new(),
            spread_over: AtomicBool::new(false),
            shards_drained: AtomicUsize::new(0),
            slow_consumer_closes: AtomicU64::new(0),
            contained_panics: AtomicU64::new(0),
            pending_connections: AtomicUsize::new(0),
            cluster_publishes_refused: AtomicU64::new(0),
            cluster_messages_skipped: AtomicU64::new(0),
            lifecycle_wakers: Mutex::new(vec![None; shards]),
            webhooks: None,
            partial_bytes: (0..shards).map(|_| ShardCounter::default()).collect(),
            metrics: (0..shards)
                .map(|_| &*Box::leak(Box::new(ShardMetrics::new(apps))))
                .collect(),
            started: AtomicBool::new(false),
            started_at: SystemTime::now(),
            console: config_console.then(|| Arc::new(Console::new(apps))),
            tls: None,
        }
    }

    /// Notes an event of app `app` for the debug console, if the console is on and someone
    /// watches the app (`make` runs only then).
    #[inline]
    pub fn console_note(&self, app: u32, make: impl FnOnce() -> Note) {
        if let Some(console) = &self.console {
            console.note(app, make);
        }
    }

    /// Whether a load balancer should send new clients here: started, not shutting down, and
    /// under the memory limit.
    pub fn readiness(&self) -> Result<(), NotReady> {
        if self.shutdown.load(Ordering::Acquire) {
            return Err(NotReady::Draining);
        }
        if !self.started.load(Ordering::Acquire) {
            return Err(NotReady::Starting);
        }
        let limit_mb = self.config.ready_memory_limit_mb;
        if limit_mb > 0
            && crate::metrics::resident_memory_bytes().is_some_and(|b| b > limit_mb << 20)
        {
            return Err(NotReady::MemoryLimit);
        }
        Ok(())
    }

    /// Wakes every shard's lifecycle task, from any thread.
    pub fn wake_shards(&self) {
        let wakers: Vec<Waker> = match self.lifecycle_wakers.lock() {
            Ok(mut slots) => slots.iter_mut().filter_map(Option::take).collect(),
            Err(_) => return,
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Wakes one shard's lifecycle task.
    pub(super) fn wake_shard(&self, shard: usize) {
        let waker = match self.lifecycle_wakers.lock() {
            Ok(mut slots) => slots[shard].take(),
            Err(_) => return,
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Registers `shard`'s lifecycle task to be woken by `wake_shards`/`wake_shard`.
    pub(super) fn set_lifecycle_waker(&self, shard: usize, waker: &Waker) {
        if let Ok(mut slots) = self.lifecycle_wakers.lock() {
            slots[shard] = Some(waker.clone());
        }
    }

    /// The app in slot `index` (a slot this process handed out, from `app_by_key`/`app_by_id`),
    /// with its settings of the moment (a removed app reads as disabled).
    pub fn app(&self, index: u32) -> AppRef {
        self.apps.get(index)
    }

    /// The app whose key clients connect with.
    pub fn app_by_key(&self, key: &str) -> Option<u32> {
        self.apps.by_key(key)
    }

    /// The app whose id the HTTP API names in its paths.
    pub fn app_by_id(&self, id: &str) -> Option<u32> {
        self.apps.by_id(id)
    }

    /// The Pusher socket id of a connection of this process: `{prefix}.{connection id}`.
    pub fn socket_id(&self, conn_id: u64) -> String {
        format!("{}.{}", self.socket_prefix, conn_id)
    }

    /// Maps a client-supplied socket id to a connection id of this process (None: not ours).
    pub fn conn_id_of(&self, socket_id: &str) -> Option<u64> {
        let (prefix, id) = socket_id.split_once('.')?;
        (prefix.parse::<u32>().ok()? == self.socket_prefix).then_some(())?;
        id.parse().ok()
    }

    /// Bytes `shard`'s readers hold for incomplete messages (only that shard writes it).
    pub(super) fn partial_bytes_of(&self, shard: usize) -> usize {
        self.partial_bytes[shard].0.load(Ordering::Relaxed)
    }

    pub(super) fn set_partial_bytes_of(&self, shard: usize, total: usize) {
        self.partial_bytes[shard].0.store(total, Ordering::Relaxed);
    }

    /// Bytes all shards' readers hold for incomplete messages.
    pub fn partial_bytes_total(&self) -> usize {
        self.partial_bytes
            .iter()
            .map(|c| c.0.load(Ordering::Relaxed))
            .sum()
    }
}

fn random_u32() -> u32 {
    let mut buf = [0u8; 4];
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n == 4 {
        u32::from_ne_bytes(buf)
    } else {
        std::process::id() ^ (Instant::now().elapsed().subsec_nanos())
    }
}
