//! shardpush: a Pusher Channels protocol server on a thread-per-core glommio runtime.
//!
//! Layout (read in this order):
//! - `protocol`: wire format (channel names, event envelopes, WebSocket frames), pure functions.
//! - `auth`: HMAC signatures and constant-time comparison.
//! - `config`: TOML + environment + command line.
//! - `channels`: per-shard subscriber tables and the home shard's cross-shard view.
//! - `shard`: the runtime of one core: connections, message routing, fanout, liveness.
//! - `http`: HTTP/1.1 handling and the signed HTTP API.
//! - `server`: startup, executors, listeners, signals.
//! - `log`: operator messages that can never stall or stop a thread.

pub mod auth;
pub mod channels;
pub mod config;
pub mod http;
pub mod log;
pub mod protocol;
pub mod server;
pub mod shard;
pub mod websocket;
