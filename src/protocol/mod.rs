//! The Pusher Channels wire protocol: channel names, JSON envelopes, WebSocket framing.
//! Pure functions only; no I/O and no shard state.

pub mod channel;
pub mod codes;
pub mod events;
pub mod json;
pub mod ws;
