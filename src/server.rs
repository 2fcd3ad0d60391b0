//! Process startup: reserve the port, start one pinned glommio executor per shard, join them
//! into a channel mesh, bind SO_REUSEPORT listeners, and shut down cleanly on SIGINT/SIGTERM.

use crate::config::Config;
use crate::http;
use crate::shard::deadline::DeadlineGuard;
use crate::shard::messages::ShardMsg;
use crate::shard::{contain, Node, Shard};
use crate::webhooks::Webhooks;
use crate::websocket;
use futures_lite::io::AsyncWriteExt;
use glommio::channels::channel_mesh::MeshBuilder;
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const MESH_CHANNEL_SIZE: usize = 4096;
const LISTEN_BACKLOG: i32 = 4096;

fn resolve(host: &str, port: u16) -> io::Result<SocketAddr> {
    (host, port).to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cannot resolve host {host}"),
        )
    })
}

fn reuseport_socket(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Binds (without listening) to learn the real port when 0 was asked for. The socket is kept so
/// the port stays ours; it never listens, so it takes no connections from the shards.
fn reserve(addr: SocketAddr) -> io::Result<(SocketAddr, Socket)> {
    let socket = reuseport_socket(addr)?;
    let bound = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an inet socket"))?;
    Ok((bound, socket))
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = reuseport_socket(addr)?;
    socket.listen(LISTEN_BACKLOG)?;
    // SAFETY: the fd is a listening TCP socket we own; glommio takes ownership.
    Ok(unsafe { TcpListener::from_raw_fd(socket.into_raw_fd()) })
}

/// Shards to run: `shards` from the configuration, or one per CPU.
pub fn shard_count(config: &Config) -> usize {
    if config.shards > 0 {
        config.shards
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// io_uring depth per ring. Every idle socket keeps a poll request in the ring, and glommio
/// cancels and re-arms a timer on each reactor turn; the kernel finds the request to cancel in a
/// hash table sized from the ring depth (8 buckets at glommio's default of 128, the maximum of
/// 256 from 4,096 on). With the default, each cancel walked ~1/8 of all sockets.
const RING_DEPTH: usize = 4096;

/// While a shutdown spreads its closes, how often the shards close their next share.
const SPREAD_TICK: Duration = Duration::from_millis(10);

/// At exit, how long webhooks still pending may take to be delivered.
const WEBHOOK_FINISH: Duration = Duration::from_secs(5);

/// Runs the server until SIGINT/SIGTERM. Returns an error if it could not start.
pub fn run(config: Config) -> io::Result<()> {
    let shards = shard_count(&config);
    let (addr, _reserved) = reserve(resolve(&config.host, config.port)?).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot bind {}:{}: {e}", config.host, config.port),
        )
    })?;
    let api = match config.api_port {
        Some(port) => Some(reserve(resolve(&config.host, port)?)?),
        None => None,
    };
    let api_addr = api.as_ref().map(|(a, _)| *a);
    let dev_only = config.is_dev_app_only();
    let app_list: Vec<String> = config
        .apps
        .iter()
        .map(|a| format!("{} (key {})", a.id, a.key))
        .collect();
    // Blocked first, so that every thread started below (executors, webhook threads) inherits
    // the mask and only the signal thread ever receives them: a signal never interrupts an
    // executor's io_uring wait, nor kills the process through a thread that does not handle it.
    let signals = block_shutdown_signals()?;
    let mut node = Node::new(config, shards);
    if !node.config.tls_cert.is_empty() {
        let tls = crate::tls::TlsSettings::load(&node.config.tls_cert, &node.config.tls_key);
        node.tls = Some(tls.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?);
    }
    let ops_listener = crate::ops::bind(&node)?;
    node.webhooks = Webhooks::start(&node.config, node.socket_prefix, node.console.clone())?;
    let node = Arc::new(node);
    let ops_addr = match ops_listener {
        Some(listener) => Some(crate::ops::serve(listener, node.clone())?),
        None => None,
    };

    contain::install_panic_hook(node.clone());
    let for_signals = node.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || wait_for_signals(signals, &for_signals))?;

    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mesh = MeshBuilder::<ShardMsg, _>::full(shards, MESH_CHANNEL_SIZE);
    let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
    let mut handles = Vec::with_capacity(shards);
    for id in 0..shards {
        let (node, mesh, ready) = (node.clone(), mesh.clone(), ready_tx.clone());
        let handle = LocalExecutorBuilder::new(Placement::Fixed(id % cpus))
            .name(&format!("shard-{id}"))
            .ring_depth(RING_DEPTH)
            .spawn(move || async move { run_shard(id, node, mesh, addr, api_addr, ready).await })
            .map_err(|e| io::Error::other(format!("cannot start shard {id}: {e}")))?;
        handles.push(handle);
    }
    drop(ready_tx);
    for _ in 0..shards {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(io::Error::other("a shard stopped during startup")),
        }
    }
    node.started.store(true, Ordering::Release);
    let tls = match node.tls {
        Some(_) => ", TLS",
        None => "",
    };
    crate::log_info!(
        "shardpush {} listening on {addr} (WebSocket /app/{{key}} and HTTP API{tls})",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(a) = api_addr {
        crate::log_info!("shardpush HTTP API also on {a}");
    }
    if let Some(a) = ops_addr {
        crate::log_info!("shardpush metrics on http://{a}/metrics (and /up, /ready)");
    }
    crate::log_info!("shardpush shards: {shards} (one glommio executor per core, SO_REUSEPORT)");
    crate::log_info!("shardpush apps: {}", app_list.join(", "));
    if dev_only {
        crate::log_warn!("shardpush: no app configured, serving the development app app-id / app-key / app-secret (do not use in production)");
    }
    for handle in handles {
        let _ = handle.join();
    }
    if let Some(webhooks) = &node.webhooks {
        let left = webhooks.finish(WEBHOOK_FINISH);
        let stats = &webhooks.stats;
        crate::log_info!(
            "shardpush webhooks: {} events delivered, {} failed, {} dropped, {} retries, {left} \
             undelivered at exit",
            stats.delivered.load(Ordering::Relaxed),
            stats.failed.load(Ordering::Relaxed),
            stats.dropped.load(Ordering::Relaxed),
            stats.retried.load(Ordering::Relaxed),
        );
    }
    let slow = node.slow_consumer_closes.load(Ordering::Relaxed);
    let panics = node.contained_panics.load(Ordering::Relaxed);
    crate::log_info!(
        "shardpush stopped ({slow} slow-consumer disconnects, {panics} connection handler panics)"
    );
    if node.config.cluster.is_some() {
        let refused = node.cluster_publishes_refused.load(Ordering::Relaxed);
        let skipped = node.cluster_messages_skipped.load(Ordering::Relaxed);
        crate::log_info!(
            "shardpush cluster: {refused} publishes refused while Redis was away, \
             {skipped} unreadable cluster messages skipped"
        );
    }
    Ok(())
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread (and so in every thread it starts
/// later): the signal thread takes them with `sigwait`.
pub fn block_shutdown_signals() -> io::Result<libc::sigset_t> {
    // SAFETY: plain libc calls on a local, initialised signal set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(set)
    }
}

/// The signal thread: the first SIGINT/SIGTERM starts a graceful shutdown, a second one exits
/// at once. `sigwait` takes pending signals too, so none sent before this thread runs is lost.
/// The drain's deadline is kept here, on the OS clock, and the shards are woken directly, so a
/// shutdown never depends on an executor's timers.
fn wait_for_signals(set: libc::sigset_t, node: &Node) {
    let drain = Duration::from_secs(crate::shard::conn::CLOSE_GRACE_SECS as u64 + 1);
    let first = next_signal(node, &set, None).unwrap_or(0);
    let _ = node.drain_started.set(Instant::now());
    node.shutdown.store(true, Ordering::Release);
    node.wake_shards();
    let code = crate::protocol::codes::SHUTTING_DOWN;
    let grace = node.config.shutdown_grace_period;
    crate::log_info!(
        "signal {first} received: not ready, closing connections ({code}) over {grace} s, \
         then stopping"
    );
    // The shards close their connections a share at a time, at each of these wake-ups.
    let spread_end = Instant::now() + Duration::from_secs(grace.into());
    loop {
        let left = spread_end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        if let Some(second) = next_signal(node, &set, Some(left.min(SPREAD_TICK))) {
            exit_now(second);
        }
        node.wake_shards();
    }
    node.spread_over.store(true, Ordering::Release);
    node.wake_shards();
    if let Some(second) = next_signal(node, &set, Some(drain)) {
        exit_now(second);
    }
    node.drain_over.store(true, Ordering::Release);
    node.wake_shards();
    // The shards stop within moments of the drain's end; if the process is still here much later
    // something is stuck, and a supervisor is better served by an exit than by a hang.
    match next_signal(node, &set, Some(Duration::from_secs(10))) {
        Some(second) => exit_now(second),
        None => {
            crate::log_error!("shutdown did not finish 10 s after the drain; exiting");
            crate::log::flush_briefly(Duration::from_millis(200));
            std::process::exit(1);
        }
    }
}

/// The next SIGINT or SIGTERM, waiting at most `timeout` (None: for ever). A SIGHUP meanwhile
/// reloads (`reload`) and the wait goes on.
fn next_signal(node: &Node, set: &libc::sigset_t, timeout: Option<Duration>) -> Option<i32> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let signal = next_blocked_signal(set, deadline)?;
        if signal != libc::SIGHUP {
            return Some(signal);
        }
        reload(node);
    }
}

/// SIGHUP: what can change without a restart is read again.
fn reload(node: &Node) {
    crate::ops::reload::reload_apps(node);
    reload_tls(node);
}

/// SIGHUP: the TLS certificate and key are read again; new handshakes present the new
/// certificate, connections keep theirs. A file that cannot be used leaves the old one in place.
fn reload_tls(node: &Node) {
    let Some(tls) = &node.tls else {
        return;
    };
    match tls.reload() {
        Ok(()) => crate::log_warn!(
            "SIGHUP: TLS certificate reloaded from {} (new connections use it)",
            tls.cert_path()
        ),
        Err(e) => {
            crate::log_warn!("SIGHUP: TLS certificate NOT reloaded, keeping the old one: {e}")
        }
    }
}

/// The next of the blocked signals, waiting until `deadline` at most (None: for ever).
fn next_blocked_signal(set: &libc::sigset_t, deadline: Option<Instant>) -> Option<i32> {
    loop {
        let signal = match deadline {
            None => {
                let mut signal = 0;
                // SAFETY: `set` is a valid signal set and `signal` a valid out-pointer.
                match unsafe { libc::sigwait(set, &mut signal) } {
                    0 => signal,
                    _ => continue,
                }
            }
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return None;
                }
                let ts = libc::timespec {
                    tv_sec: left.as_secs() as libc::time_t,
                    tv_nsec: left.subsec_nanos() as libc::c_long,
                };
                // SAFETY: valid set and timespec; no siginfo wanted.
                match unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) } {
                    -1 => continue, // EAGAIN (timed out: checked above) or EINTR
                    signal => signal,
                }
            }
        };
        return Some(signal);
    }
}

fn exit_now(signal: i32) -> ! {
    crate::log_warn!("second signal ({signal}), exiting now");
    crate::log::flush_briefly(Duration::from_millis(200));
    std::process::exit(128 + signal)
}

async fn run_shard(
    id: usize,
    node: Arc<Node>,
    mesh: MeshBuilder<ShardMsg, glommio::channels::channel_mesh::Full>,
    addr: SocketAddr,
    api_addr: Option<SocketAddr>,
    ready: mpsc::Sender<io::Result<()>>,
) {
    let shard = Rc::new(Shard::new(id, node.clone()));
    let (senders, receivers) = match mesh.join().await {
        Ok(pair) => pair,
        Err(e) => {
            let _ = ready.send(Err(io::Error::other(format!(
                "shard mesh join failed: {e}"
            ))));
            return;
        }
    };
    let listeners = [Some(addr), api_addr]
        .into_iter()
        .flatten()
        .map(listen)
        .collect::<io::Result<Vec<_>>>();
    let listeners = match listeners {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(io::Error::new(
                e.kind(),
                format!("shard {id} cannot listen on {addr}: {e}"),
            )));
            return;
        }
    };
    shard.start(senders, receivers);
    let mut accepts = Vec::new();
    for (slot, listener) in listeners.into_iter().enumerate() {
        let api_only = slot == 1;
        accepts.push(glommio::spawn_local(accept_loop(
            shard.clone(),
            listener,
            api_only,
        )));
    }
    let _ = ready.send(Ok(()));
    shard.lifecycle().await;
    // The listeners stopped when the drain began.
    for accept in accepts {
        accept.await;
    }
    shard.report_departures_at_exit();
}

/// Accept failures are logged at most this often (with the count of those not logged).
const ACCEPT_FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);

async fn accept_loop(shard: Rc<Shard>, listener: TcpListener, api_only: bool) {
    let mut failures_untold = 0u64;
    let mut last_told: Option<Instant> = None;
    loop {
        let next = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            shard.draining().await;
            None
        })
        .await;
        match next {
            None => return,
            Some(Ok(stream)) => {
                glommio::spawn_local(serve_socket(shard.clone(), stream, api_only)).detach();
            }
            Some(Err(e)) => {
                // Out of file descriptors, usually: back off instead of spinning.
                failures_untold += 1;
                if last_told.is_none_or(|t| t.elapsed() >= ACCEPT_FAILURE_LOG_EVERY) {
                    let failures = std::mem::take(&mut failures_untold);
                    crate::log_warn!(shard = shard.id(), failures, "accept failed: {e}");
                    last_told = Some(Instant::now());
                }
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_socket(shard: Rc<Shard>, stream: TcpStream, api_only: bool) {
    let node = shard.node().clone();
    let in_progress = node.pending_connections.fetch_add(1, Ordering::Relaxed);
    let pending = PendingGuard(&node);
    // A panic while serving this socket ends this socket only.
    let _ = contain::contain(serve_new_socket(
        shard,
        stream,
        api_only,
        in_progress,
        pending,
    ))
    .await;
}

/// Uncounts a socket from `pending_connections` once its first request head is in (or never).
struct PendingGuard<'a>(&'a Node);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.pending_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_new_socket(
    shard: Rc<Shard>,
    mut stream: TcpStream,
    api_only: bool,
    in_progress: usize,
    pending: PendingGuard<'_>,
) {
    let _ = stream.set_nodelay(true);
    let node = shard.node().clone();
    let config = &node.config;
    if in_progress >= config.max_pending_connections {
        if node.tls.is_some() {
            // No handshake to spend on an answer: the socket is just closed.
            return;
        }
        let message = "Too many connections are being opened at once; retry shortly";
        crate::metrics::here().http_request(crate::metrics::Route::Other, 503);
        let _ = stream.write_all(&http::error_response(503, message)).await;
        return;
    }
    let mut socket = match &node.tls {
        None => http::Socket::plain(stream),
        Some(tls) => match tls.session() {
            Ok(session) => http::Socket::tls(stream, session),
            Err(_) => return,
        },
    };
    // Slow or silent peers cannot hold a socket open: the whole first request (and, for HTTP,
    // its body), TLS handshake included, must arrive within `request_timeout`.
    let deadline = DeadlineGuard::new(&shard, config.request_timeout);
    let mut buf = Vec::new();
    let head = deadline
        .within(http::read_head(&shard, &mut socket, &mut buf))
        .await
        .flatten();
    drop(pending);
    let Some(head) = head else {
        if socket.tls_handshaking() {
            // Not TLS, refused by rustls, or ended or timed out before the handshake completed.
            crate::metrics::here().tls_handshake_failures.inc();
        }
        return;
    };
    // The HTTP path is boxed so that its state does not enlarge every WebSocket task.
    if head.is_websocket_upgrade() && !api_only && config.role.serves_websocket() {
        drop(deadline);
        websocket::run(shard, socket, head, buf).await;
    } else {
        Box::pin(http::serve(shard, socket, buf, head, deadline)).await;
    }
}
