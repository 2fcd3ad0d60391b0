//! SIGHUP: the configuration file is read again and its apps take effect without a restart
//! (added, removed, disabled, changed limits or credentials). A file that does not load is
//! refused with its error, and the running apps stay as they were. The shards then close the
//! connections of apps now disabled or removed (4003). Other settings (ports, shards, cluster,
//! webhook delivery) and an app's webhooks need a restart: a reload says so and leaves them.

use crate::config::{AppConfig, Config};
use crate::shard::Node;
use std::sync::atomic::Ordering;

/// Reloads the apps from the configuration the process was started with.
pub fn reload_apps(node: &Node) {
    let new = match Config::load(&node.config.loaded_with, &|k| std::env::var(k).ok()) {
        Ok(config) => config,
        Err(e) => {
            crate::log_warn!("reload refused, the running apps are kept: {e}");
            return;
        }
    };
    // An empty or truncated file (a deployment tool rewriting it) must not swap the apps for
    // the development app with its public secret.
    if new.dev_app_fallback && !node.config.dev_app_fallback {
        let file = new
            .loaded_with
            .config_file
            .as_deref()
            .unwrap_or("the configuration");
        crate::log_warn!(
            "reload refused, the running apps are kept: {file}: apps: no app is configured"
        );
        return;
    }
    match node.apps.replace(&new.apps, reloadable) {
        Err(e) => crate::log_warn!("reload refused, the running apps are kept: {e}"),
        Ok(changes) if changes.is_empty() => crate::log_info!("reload: the apps are unchanged"),
        Ok(changes) => {
            node.apps_generation.fetch_add(1, Ordering::Release);
            node.wake_shards();
            crate::log_info!(
                "reload: apps added {:?}, removed {:?}, changed {:?}",
                changes.added,
                changes.removed,
                changes.changed
            );
        }
    }
    let restart_only = restart_only_changes(&node.config, &new);
    if !restart_only.is_empty() {
        crate::log_warn!(
            "reload: {} changed; this takes effect at the next restart",
            restart_only.join(", ")
        );
    }
}

/// Whether an app's new settings can take effect without a restart: its webhooks and event
/// stream are fixed at start (their delivery threads and Redis queues are set up then).
fn reloadable(old: Option<&AppConfig>, new: &AppConfig) -> Result<(), String> {
    let hooks = |a: &AppConfig| {
        (
            a.webhooks.clone(),
            a.batch_webhooks,
            a.event_stream,
            a.event_stream_length,
        )
    };
    match old {
        None if !new.webhooks.is_empty() || new.event_stream => {
            Err("a new app's webhooks and event stream need a restart".into())
        }
        Some(old) if hooks(old) != hooks(new) => {
            Err("changes to webhooks, batch_webhooks or event_stream need a restart".into())
        }
        // The webhooks' requests are signed with the key and secret of the start.
        Some(old)
            if !old.webhooks.is_empty() && (old.key != new.key || old.secret != new.secret) =>
        {
            Err("a new key or secret of an app with webhooks needs a restart".into())
        }
        _ => Ok(()),
    }
}

/// The settings outside `[[apps]]` that differ: they apply only at start.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    // Every key is either compared or named as handled elsewhere: the pattern lists them all
    // (no `..`), so a key added to `Config` fails to compile here until it is placed.
    macro_rules! compare {
        ($($key:ident),* ; elsewhere: $($other:ident),*) => {
            let Config { $($key: _,)* $($other: _,)* } = old;
            $(if old.$key != new.$key {
                keys.push(stringify!($key));
            })*
        };
    }
    compare!(
        host,
        port,
        api_port,
        role,
        shards,
        activity_timeout,
        pong_timeout,
        max_outbound_queue_bytes,
        max_ws_message_bytes,
        max_request_body_bytes,
        http_keep_alive_timeout,
        max_connections,
        request_timeout,
        max_pending_connections,
        max_partial_message_bytes,
        allow_missing_protocol,
        webhooks,
        metrics_port,
        metrics_host,
        shutdown_grace_period,
        ready_memory_limit_mb,
        tls_cert,
        tls_key,
        console;
        // The apps are what a reload applies; the cluster is compared below, without its
        // generated node id; the rest is how this configuration was loaded.
        elsewhere: apps, cluster, loaded_with, dev_app_fallback
    );
    // Without the node id, which is generated anew at each load when none is configured.
    let cluster = |c: &Config| {
        c.cluster.clone().map(|mut c| {
            c.node_id.clear();
            c
        })
    };
    if cluster(old) != cluster(new) {
        keys.push("cluster");
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhooks_are_fixed_at_start_and_other_keys_are_named() {
        let plain = AppConfig::default();
        let mut hooked = AppConfig::default();
        hooked.webhooks.push(Default::default());
        assert!(reloadable(None, &plain).is_ok());
        assert!(reloadable(None, &hooked).is_err());
        assert!(reloadable(Some(&plain), &hooked).is_err());
        let mut limited = plain.clone();
        limited.max_connections = 3;
        limited.secret = "new".into();
        assert!(reloadable(Some(&plain), &limited).is_ok());

        let old = Config::load(&Default::default(), &|_| None).unwrap();
        let mut new = old.clone();
        assert!(restart_only_changes(&old, &new).is_empty());
        new.port = 1;
        new.shutdown_grace_period = 9;
        new.apps.clear();
        assert_eq!(
            restart_only_changes(&old, &new),
            ["port", "shutdown_grace_period"]
        );
    }
}
