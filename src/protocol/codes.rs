//! Every close code and Pusher error code the server sends, by name. Pusher's ranges tell a
//! client what to do (reference §1.5): 4000-4099 do not reconnect, 4100-4199 reconnect after a
//! back-off, 4200-4299 reconnect at once, 4300-4399 an error on an open connection.

/// RFC 6455: the peer broke the framing rules.
pub const PROTOCOL_ERROR: u16 = 1002;
/// RFC 6455: a text message (or close reason) that is not UTF-8.
pub const INVALID_UTF8: u16 = 1007;
/// RFC 6455: closed to enforce a server limit (the partial-message memory budget).
pub const POLICY_VIOLATION: u16 = 1008;
/// RFC 6455: reserved for "no code in the close frame"; never sent.
pub const NO_STATUS: u16 = 1005;
/// RFC 6455: reserved for "closed without a close frame"; never sent.
pub const ABNORMAL_CLOSURE: u16 = 1006;

/// No app with the key in the connection's path.
pub const APP_NOT_FOUND: u16 = 4001;
/// The app is switched off (`enabled = false`).
pub const APP_DISABLED: u16 = 4003;
/// The app has its `max_connections` already.
pub const APP_OVER_QUOTA: u16 = 4004;
/// The path is not `/app/{key}`.
pub const PATH_NOT_FOUND: u16 = 4005;
/// A `protocol` outside 4-7.
pub const UNSUPPORTED_PROTOCOL: u16 = 4007;
/// No `protocol` parameter (when `allow_missing_protocol` is off).
pub const NO_PROTOCOL_VERSION: u16 = 4008;
/// The connection is not authorized for what it did. Pusher uses this one code for four cases,
/// named below so that each use says which it is.
pub const UNAUTHORIZED: u16 = 4009;
/// 4009 as an error on an open connection: a `pusher:signin` refused.
pub const SIGNIN_REFUSED: u16 = UNAUTHORIZED;
/// 4009 as an error on an open connection: a client event on a channel the socket is not in.
pub const NOT_A_MEMBER: u16 = UNAUTHORIZED;
/// 4009 as a close: the app terminated the user's connections (HTTP API).
pub const USER_TERMINATED: u16 = UNAUTHORIZED;
/// 4009 as a close: an authorized-connections app got no sign-in or private subscription in
/// time.
pub const AUTHORIZATION_TIMEOUT: u16 = UNAUTHORIZED;
/// The server is at `max_connections`, or the socket is a slow consumer: back off, reconnect.
pub const OVER_CAPACITY: u16 = 4100;
/// The server is shutting down: reconnect (to another node) at once.
pub const SHUTTING_DOWN: u16 = 4200;
/// No reply to the server's ping within `pong_timeout`.
pub const PONG_TIMEOUT: u16 = 4201;
/// A client event refused: client events are off for the app, or over the rate limit.
pub const CLIENT_EVENT_REJECTED: u16 = 4301;
/// A sign-in watchlist longer than `max_watchlist_size` (the rest of it was dropped).
pub const WATCHLIST_TOO_LONG: u16 = 4302;
