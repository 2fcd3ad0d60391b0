//! Channel classification and name validation (reference §3.1-3.2).

/// What a channel name's prefix makes of it. The order of the checks matters:
/// `private-encrypted-` before `private-`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelKind {
    /// No prefix: anyone may subscribe without a signature.
    Public,
    /// `private-`: subscribing needs a signature; client events allowed.
    Private,
    /// `private-encrypted-`: signed like `private-`; clients encrypt the data end to end, so the
    /// server never sees plaintext and refuses client events.
    PrivateEncrypted,
    /// `presence-`: signed, with `channel_data` naming the member; the home shard keeps members.
    Presence,
    /// `#server-to-user-{id}`: reserved for events addressed to a signed-in user.
    ServerToUser,
}

/// Prefix of the channel that stands for a signed-in user (`channels::ChannelKey::user`); only
/// a connection signed in as that user may subscribe to it.
pub const SERVER_TO_USER_PREFIX: &str = "#server-to-user-";

impl ChannelKind {
    /// Classifies a channel name by its prefix alone; never fails (no prefix is `Public`).
    pub fn of(name: &str) -> ChannelKind {
        if name.starts_with("private-encrypted-") {
            ChannelKind::PrivateEncrypted
        } else if name.starts_with("private-") {
            ChannelKind::Private
        } else if name.starts_with("presence-") {
            ChannelKind::Presence
        } else if name.starts_with(SERVER_TO_USER_PREFIX) {
            ChannelKind::ServerToUser
        } else {
            ChannelKind::Public
        }
    }

    /// Whether subscribing needs a signature from the app's auth endpoint.
    pub fn needs_auth(self) -> bool {
        matches!(
            self,
            ChannelKind::Private | ChannelKind::PrivateEncrypted | ChannelKind::Presence
        )
    }

    /// Client events are allowed on private and presence channels, not on encrypted ones
    /// (plaintext from a client would break every encrypted subscriber).
    pub fn allows_client_events(self) -> bool {
        matches!(self, ChannelKind::Private | ChannelKind::Presence)
    }
}

/// Cache channels keep the last HTTP-published event (`cache-`, `private-cache-`, ...).
pub fn is_cache_channel(name: &str) -> bool {
    [
        "cache-",
        "private-cache-",
        "private-encrypted-cache-",
        "presence-cache-",
    ]
    .iter()
    .any(|p| name.starts_with(p))
}

/// Checks an app-chosen channel name: 1..=max_len characters from `A-Za-z0-9_-=@,.;`.
pub fn validate_name(name: &str, max_len: usize) -> Result<(), String> {
    if name.is_empty() {
        return Err("Channel name must not be empty".into());
    }
    if name.len() > max_len {
        return Err(format!(
            "Channel name is too long ({} characters, the limit is {max_len})",
            name.len()
        ));
    }
    let ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_-=@,.;".contains(&b));
    if !ok {
        return Err(format!(
            "Invalid channel name '{name}': only A-Z, a-z, 0-9 and _-=@,.; are allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_prefix_in_the_right_order() {
        assert_eq!(
            ChannelKind::of("private-encrypted-x"),
            ChannelKind::PrivateEncrypted
        );
        assert_eq!(
            ChannelKind::of("private-encrypted-cache-x"),
            ChannelKind::PrivateEncrypted
        );
        assert_eq!(ChannelKind::of("private-x"), ChannelKind::Private);
        assert_eq!(ChannelKind::of("private-cache-x"), ChannelKind::Private);
        assert_eq!(ChannelKind::of("presence-x"), ChannelKind::Presence);
        assert_eq!(
            ChannelKind::of("#server-to-user-7"),
            ChannelKind::ServerToUser
        );
        assert_eq!(ChannelKind::of("my-channel"), ChannelKind::Public);
        assert_eq!(ChannelKind::of("privatex"), ChannelKind::Public);
    }

    #[test]
    fn client_events_only_on_private_and_presence() {
        assert!(ChannelKind::Private.allows_client_events());
        assert!(ChannelKind::Presence.allows_client_events());
        assert!(!ChannelKind::PrivateEncrypted.allows_client_events());
        assert!(!ChannelKind::Public.allows_client_events());
    }

    #[test]
    fn cache_prefixes() {
        assert!(is_cache_channel("cache-a"));
        assert!(is_cache_channel("presence-cache-a"));
        assert!(!is_cache_channel("private-a"));
    }

    #[test]
    fn validates_characters_and_length() {
        assert!(validate_name("private-App.Models.User.1", 164).is_ok());
        assert!(validate_name("a_b-c=d@e,f.g;h", 164).is_ok());
        assert!(validate_name("", 164).is_err());
        assert!(validate_name("has space", 164).is_err());
        assert!(validate_name("ünicode", 164).is_err());
        assert!(validate_name("#server-to-user-1", 164).is_err());
        assert!(validate_name(&"a".repeat(164), 164).is_ok());
        assert!(validate_name(&"a".repeat(165), 164).is_err());
    }
}
