//! Sending one webhook request: a blocking HTTP/1.1 client (ureq, rustls with certificate
//! verification) on worker threads of their own, so a slow receiver only ever holds a worker,
//! never a shard.

use super::hub::Inbox;
use super::{AppHooks, Request};
use crate::config::WebhooksConfig;
use crate::config::WEBHOOK_ID_HEADER as ID_HEADER;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use ureq::tls::{Certificate, RootCerts, TlsConfig};

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx answer.
    Delivered,
    /// Worth another try later: no answer (connect, reset, timeout), 5xx, 408 or 429.
    Retry(String),
    /// Never worth another try: another 4xx, a redirect, a refused certificate.
    Refused(String),
}

/// The HTTP client every worker shares (one pool of kept-alive connections).
pub fn agent(settings: &WebhooksConfig) -> Result<ureq::Agent, String> {
    let roots = if settings.ca_file.is_empty() {
        RootCerts::WebPki
    } else {
        // The file's CAs are trusted besides the public ones, not instead of them.
        let mut certs: Vec<Certificate<'static>> = webpki_root_certs::TLS_SERVER_ROOT_CERTS
            .iter()
            .map(|c| Certificate::from_der(c).to_owned())
            .collect();
        certs.extend(crate::config::read_ca_file(&settings.ca_file)?);
        RootCerts::new_with_certs(&certs)
    };
    let timeout = Duration::from_secs(settings.request_timeout as u64);
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        // Proxies from the environment would surprise an operator; webhooks go direct.
        .proxy(None)
        .timeout_global(Some(timeout))
        .max_idle_connections(256)
        .max_idle_connections_per_host(settings.max_in_flight_per_app.max(1))
        .user_agent(concat!("shardpush/", env!("CARGO_PKG_VERSION")))
        .tls_config(TlsConfig::builder().root_certs(roots).build())
        .build();
    Ok(config.new_agent())
}

/// One attempt at a request.
pub fn post(agent: &ureq::Agent, app: &AppHooks, request: &Request) -> Outcome {
    let hook = &app.hooks[request.hook];
    let mut builder = agent.post(&hook.url);
    for (name, value) in &hook.headers {
        builder = builder.header(name, value);
    }
    let sent = builder
        // Exactly this: the Node library compares the whole header value.
        .header("Content-Type", "application/json")
        .header("X-Pusher-Key", &app.key)
        .header("X-Pusher-Signature", &request.signature)
        .header(ID_HEADER, &request.id)
        .send(&request.body[..]);
    match sent {
        Ok(mut response) => {
            let status = response.status().as_u16();
            // Read to the end so the connection can be kept for the next request.
            let _ = response
                .body_mut()
                .with_config()
                .limit(64 * 1024)
                .read_to_vec();
            match status {
                200..=299 => Outcome::Delivered,
                408 | 429 | 500..=599 => Outcome::Retry(format!("HTTP {status}")),
                _ => Outcome::Refused(format!("HTTP {status}")),
            }
        }
        // A certificate that does not verify stays so: not retried. Other TLS failures (an
        // alert from a restarting proxy, say) are retried like any network error.
        Err(e) if e.to_string().contains("certificate") => Outcome::Refused(format!("TLS: {e}")),
        Err(e) => Outcome::Retry(e.to_string()),
    }
}

/// A worker thread: takes requests, sends each once, reports how it went to the hub.
pub fn work(
    jobs: Arc<Mutex<Receiver<Request>>>,
    hub: SyncSender<Inbox>,
    agent: ureq::Agent,
    apps: Arc<[AppHooks]>,
) {
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(request) = job else { return };
        let outcome = post(&agent, &apps[request.app as usize], &request);
        if hub.send(Inbox::Done { request, outcome }).is_err() {
            return;
        }
    }
}
