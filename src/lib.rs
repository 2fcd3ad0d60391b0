//! shardpush: a Pusher Channels protocol server on a thread-per-core glommio runtime.
//!
//! Layout, lowest layer first (each imports only from the layers above it in this list):
//! - `protocol`: wire format (channel names, event envelopes, WebSocket frames), pure functions.
//! - `auth`: HMAC signatures and constant-time comparison.
//! - `tls`: the certificate for `wss://` and `https://` (reloadable), one connection's TLS state.
//! - `config`: TOML + environment + command line.
//! - `apps`: the live app table (stable slots, swapped by a reload).
//! - `log`: operator messages (`tracing` events) that can never stall or stop a thread.
//! - `metrics`: each shard's counters (one writer each), summed when scraped.
//! - `feed`: the debug console's log of the events of the apps being watched.
//! - `channels`: per-shard subscriber tables and the home shard's cross-shard view.
//! - `cluster`: several nodes through Redis: each shard's Redis link and the message format.
//! - `webhooks`: events for the apps' HTTP receivers, sent from threads of their own (in a
//!   cluster, queued in Redis).
//! - `shard`: the runtime of one core: connections, the mesh between shards, fanout, the home
//!   side of channels, liveness, shutdown.
//! - `http` and `websocket`: the sessions, one per kind of socket; they drive the runtime.
//! - `ops`: what operators ask of the process: Prometheus metrics, `/up` and `/ready`.
//! - `server`: startup, executors, listeners, signals.
//! - `cli`: the command line: serve, check-config, trigger.

#![warn(missing_docs)]
// A shard's state lives in `RefCell`s shared by its tasks: a borrow held across an `.await` could be
// met by another task's borrow.
#![deny(clippy::await_holding_refcell_ref)]

pub mod apps;
pub mod auth;
pub mod channels;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod feed;
pub mod http;
pub mod log;
pub mod metrics;
pub mod ops;
pub mod protocol;
pub mod server;
pub mod shard;
pub mod tls;
pub mod webhooks;
pub mod websocket;
