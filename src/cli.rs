//! The command line (clap): `shardpush [serve]` runs the server, `shardpush check-config`
//! validates a configuration as a start would, `shardpush trigger` publishes one event through a
//! server's HTTP API. Usage errors exit with status 2, as configuration errors do.
//!
//! The server's own options (`config::Cli`) have their environment variables read by
//! `Config::load`, not by clap, so that the precedence (defaults < TOML file < environment <
//! command line) and the errors (which name the source, the key and the reason) stay in one place.

use crate::config::{Cli, Config, ConfigError};
use crate::http::signature::{string_to_sign, Query};
use crate::log::{self, LogFormat, LogSettings};
use std::fmt;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The process environment, as `Config::load` and `LogArgs::resolve` take it.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

const ENVIRONMENT: &str = "\
Environment:
  SHARDPUSH_APP_ID, SHARDPUSH_APP_KEY, SHARDPUSH_APP_SECRET
      Add (or replace, by id) one app. With no app configured at all, the development app
      app-id / app-key / app-secret is served. (trigger reads them as its --app-id, --key,
      --secret.)
  SHARDPUSH_HOST, SHARDPUSH_PORT, SHARDPUSH_SHARDS, SHARDPUSH_REDIS_URL, SHARDPUSH_ROLE,
  SHARDPUSH_METRICS_PORT
      As their options; an option given on the command line wins.
  RUST_LOG, SHARDPUSH_LOG_FORMAT
      As --log-level and --log-format.

Precedence: defaults < TOML file < environment < command line.";

/// `shardpush`: what the command line asked for.
#[derive(Debug, clap::Parser)]
#[command(
    name = "shardpush",
    version,
    about = "shardpush: a Pusher Channels protocol server (WebSocket protocol 7 + HTTP API), \
             thread-per-core.",
    args_conflicts_with_subcommands = true,
    after_help = ENVIRONMENT
)]
pub struct CommandLine {
    /// What to do; none: serve.
    #[command(subcommand)]
    pub action: Option<Action>,
    /// The server's options when no subcommand is given.
    #[command(flatten)]
    pub server: ServerArgs,
}

/// The subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Run the server (what `shardpush` alone does)
    #[command(after_help = ENVIRONMENT)]
    Serve(ServerArgs),
    /// Validate the configuration as a start would, print a one-line summary
    ///
    /// Loads the file, the environment and the options as a start would. Exit status: 0 when
    /// the configuration is valid, 2 when not (the error names the file, the key and the reason).
    #[command(after_help = ENVIRONMENT)]
    CheckConfig(ServerArgs),
    /// Publish one event through a server's HTTP API
    ///
    /// Sends a signed POST /apps/{id}/events and prints the answer's status and body. Exit
    /// status: 0 on a 2xx answer, 1 otherwise, 2 for a usage error.
    Trigger(TriggerArgs),
}

/// Everything a start reads from the command line: the server's options and the log's.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ServerArgs {
    /// The server's options.
    #[command(flatten)]
    pub config: Cli,
    /// How it logs.
    #[command(flatten)]
    pub log: LogArgs,
}

/// `--log-level` and `--log-format`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct LogArgs {
    /// Log level (error, warn, info, debug, trace, off) or a filter directive such as
    /// warn,shardpush::webhooks=debug [env: RUST_LOG] [default: info]
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Log lines as plain text or JSON objects; warnings and errors go to stderr, the rest to
    /// stdout [env: SHARDPUSH_LOG_FORMAT] [default: plain]
    #[arg(long, value_name = "FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

impl LogArgs {
    /// The log settings: the option, else its environment variable, else the default. Errors
    /// name the source and the key, as `Config::load`'s do.
    pub fn resolve(&self, env: Env<'_>) -> Result<LogSettings, ConfigError> {
        let mut settings = LogSettings::default();
        let level = match (&self.log_level, env("RUST_LOG")) {
            (Some(level), _) => Some((CLI, "--log-level", level.clone())),
            (None, Some(level)) if !level.trim().is_empty() => Some((ENV, "RUST_LOG", level)),
            _ => None,
        };
        if let Some((source, key, filter)) = level {
            log::parse_filter(&filter).map_err(|reason| error(source, key, reason))?;
            settings.filter = filter;
        }
        settings.format = match (self.log_format, env("SHARDPUSH_LOG_FORMAT")) {
            (Some(format), _) => format,
            (None, Some(name)) => clap::ValueEnum::from_str(name.trim(), true).map_err(|_| {
                let reason = format!("'{name}' is not one of plain, json");
                error(ENV, "SHARDPUSH_LOG_FORMAT", reason)
            })?,
            (None, None) => LogFormat::Plain,
        };
        Ok(settings)
    }
}

/// `shardpush trigger`'s options.
#[derive(Clone, clap::Args)]
pub struct TriggerArgs {
    /// The server: http(s)://HOST:PORT, no path
    #[arg(
        long,
        env = "SHARDPUSH_URL",
        value_name = "URL",
        default_value = "http://127.0.0.1:6001"
    )]
    pub url: String,
    /// The app's id
    #[arg(long, env = "SHARDPUSH_APP_ID", value_name = "ID")]
    pub app_id: String,
    /// The app's key
    #[arg(long, env = "SHARDPUSH_APP_KEY", value_name = "KEY")]
    pub key: String,
    /// The app's secret, which signs the request (prefer the environment variable: a command
    /// line is visible to every user of the machine)
    #[arg(
        long,
        env = "SHARDPUSH_APP_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub secret: String,
    /// A channel to publish on (repeat for several)
    #[arg(long = "channel", value_name = "NAME", required = true)]
    pub channels: Vec<String>,
    /// The event's name
    #[arg(long, value_name = "NAME")]
    pub event: String,
    /// The event's data: a string, usually JSON, sent as it is
    #[arg(long, value_name = "JSON_STRING")]
    pub data: String,
    /// Leave out this connection (the one that caused the event)
    #[arg(long, value_name = "ID")]
    pub socket_id: Option<String>,
}

impl fmt::Debug for TriggerArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TriggerArgs")
            .field("url", &log::redact_url(&self.url))
            .field("app_id", &self.app_id)
            .field("key", &self.key)
            .field("secret", &"***")
            .field("channels", &self.channels)
            .field("event", &self.event)
            .field("data", &self.data)
            .field("socket_id", &self.socket_id)
            .finish()
    }
}

/// The body of `POST /apps/{id}/events`, fields in the order the Pusher libraries send them.
#[derive(serde::Serialize)]
struct EventBody<'a> {
    name: &'a str,
    channels: &'a [String],
    data: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    socket_id: Option<&'a str>,
}

/// An HTTP API request ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRequest {
    /// The whole URL, signed query included.
    pub url: String,
    /// The JSON body.
    pub body: String,
}

impl TriggerArgs {
    /// The signed request for the event, as of `timestamp` (Unix seconds).
    pub fn request(&self, timestamp: u64) -> Result<SignedRequest, ConfigError> {
        let base = base_url(&self.url)?;
        let path = format!("/apps/{}/events", percent_encode(&self.app_id));
        let body = EventBody {
            name: &self.event,
            channels: &self.channels,
            data: &self.data,
            socket_id: self.socket_id.as_deref(),
        };
        let body = sonic_rs::to_string(&body).map_err(|e| error(CLI, "--data", e.to_string()))?;
        let query = signed_query(
            "POST",
            &path,
            &[],
            body.as_bytes(),
            &self.key,
            &self.secret,
            timestamp,
        );
        Ok(SignedRequest {
            url: format!("{base}{path}?{query}"),
            body,
        })
    }
}

/// The query string of a signed HTTP API request (reference §5.1): `params`, then `auth_key`,
/// `auth_timestamp`, `auth_version` 1.0, `body_md5` (with a body) and the `auth_signature` of
/// them all, signed as `http::signature` verifies (values unescaped) and sent percent-encoded.
pub fn signed_query(
    method: &str,
    path: &str,
    params: &[(&str, &str)],
    body: &[u8],
    key: &str,
    secret: &str,
    timestamp: u64,
) -> String {
    let mut query: Query = params
        .iter()
        .map(|&(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    query.push(("auth_key".into(), key.into()));
    query.push(("auth_timestamp".into(), timestamp.to_string()));
    query.push(("auth_version".into(), "1.0".into()));
    if !body.is_empty() {
        query.push(("body_md5".into(), crate::auth::md5_hex(body)));
    }
    let to_sign = string_to_sign(method, path, &query);
    let signature = crate::auth::hmac_sha256_hex(secret.as_bytes(), to_sign.as_bytes());
    query.push(("auth_signature".into(), signature));
    let pairs: Vec<String> = query
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect();
    pairs.join("&")
}

/// Percent-encodes all but the unreserved characters (RFC 3986).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `scheme://authority` of `--url`, which must be http(s) with no path, query or fragment (the
/// signature covers the path the server sees).
fn base_url(url: &str) -> Result<String, ConfigError> {
    let bad = |reason: &str| error(CLI, "--url (or SHARDPUSH_URL)", reason);
    let uri: ureq::http::Uri = url
        .parse()
        .map_err(|_| bad("is not a URL such as http://127.0.0.1:6001"))?;
    let scheme = uri.scheme_str().unwrap_or("");
    if scheme != "http" && scheme != "https" {
        return Err(bad("must start with http:// or https://"));
    }
    let Some(authority) = uri.authority() else {
        return Err(bad("has no host"));
    };
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() || url.contains('#') {
        return Err(bad(
            "must be the server's address alone, without a path or query",
        ));
    }
    Ok(format!("{scheme}://{authority}"))
}

const CLI: &str = "command line";
const ENV: &str = "environment";

fn error(source: &str, key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        source: source.into(),
        key: key.into(),
        reason: reason.into(),
    }
}

/// Does what the command line asks, with the process environment; the process's exit status.
pub fn run(line: CommandLine) -> ExitCode {
    let env = |key: &str| std::env::var(key).ok();
    match line.action {
        None => serve(&line.server, &env),
        Some(Action::Serve(args)) => serve(&args, &env),
        Some(Action::CheckConfig(args)) => match check_config(&args, &env) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("shardpush: {e}");
                ExitCode::from(2)
            }
        },
        Some(Action::Trigger(args)) => trigger(&args),
    }
}

/// Loads the configuration and the log settings as a start would: the configuration, or the
/// first error.
pub fn load(args: &ServerArgs, env: Env<'_>) -> Result<(Config, LogSettings), ConfigError> {
    let settings = args.log.resolve(env)?;
    let config = Config::load(&args.config, env)?;
    Ok((config, settings))
}

/// `check-config`: the one-line summary of a valid configuration, or its first error.
pub fn check_config(args: &ServerArgs, env: Env<'_>) -> Result<String, ConfigError> {
    let (config, _) = load(args, env)?;
    let source = match &args.config.config_file {
        Some(file) => format!("file {file}"),
        None => "no file".into(),
    };
    let apps = match config.apps.len() {
        1 if config.is_dev_app_only() => "1 app (the development app)".to_owned(),
        1 => "1 app".to_owned(),
        n => format!("{n} apps"),
    };
    let cluster = match &config.cluster {
        Some(c) => format!("on (Redis {})", log::redact_url(&c.redis_url)),
        None => "off".into(),
    };
    let role = match config.role {
        crate::config::Role::All => "all",
        crate::config::Role::Websocket => "websocket",
        crate::config::Role::Api => "api",
    };
    Ok(format!(
        "configuration OK ({source}): {apps}, port {}, role {role}, cluster {cluster}",
        config.port
    ))
}

/// Runs the server: exit status 2 for a configuration error, 1 when it could not start, 0 after
/// a clean shutdown.
fn serve(args: &ServerArgs, env: Env<'_>) -> ExitCode {
    // Before any thread exists (the log writers start with the first line): every thread
    // inherits the mask, so only the server's signal thread ever takes SIGTERM, SIGINT or SIGHUP.
    if let Err(e) = crate::server::block_shutdown_signals() {
        eprintln!("shardpush: cannot block the shutdown signals: {e}");
        return ExitCode::FAILURE;
    }
    let (config, settings) = match load(args, env) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("shardpush: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = log::init(&settings) {
        eprintln!("shardpush: {e}");
        return ExitCode::FAILURE;
    }
    if let Some(cluster) = &config.cluster {
        crate::log_info!(
            node = %cluster.node_id,
            "cluster node {} through Redis at {} (prefix {})",
            cluster.node_id,
            log::redact_url(&cluster.redis_url),
            cluster.prefix
        );
    }
    let result = crate::server::run(config);
    let status = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            crate::log_error!("cannot start: {e}");
            ExitCode::FAILURE
        }
    };
    log::flush_briefly(Duration::from_secs(1));
    status
}

/// `trigger`: sends the event, prints the answer.
fn trigger(args: &TriggerArgs) -> ExitCode {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let request = match args.request(now) {
        Ok(request) => request,
        Err(e) => {
            eprintln!("shardpush: {e}");
            return ExitCode::from(2);
        }
    };
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(10)))
        .user_agent(concat!("shardpush/", env!("CARGO_PKG_VERSION")))
        .build()
        .new_agent();
    let sent = agent
        .post(&request.url)
        .header("Content-Type", "application/json")
        .send(&request.body);
    match sent {
        Ok(mut response) => {
            let status = response.status();
            let body = response
                .body_mut()
                .with_config()
                .limit(1 << 20)
                .read_to_string()
                .unwrap_or_else(|e| format!("(unreadable body: {e})"));
            let reason = status.canonical_reason().unwrap_or("");
            println!("{} {reason}", status.as_u16());
            println!("{}", body.trim_end());
            match status.is_success() {
                true => ExitCode::SUCCESS,
                false => ExitCode::FAILURE,
            }
        }
        Err(e) => {
            eprintln!("shardpush: {}: {e}", log::redact_url(&args.url));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<CommandLine, clap::Error> {
        CommandLine::try_parse_from(std::iter::once("shardpush").chain(args.iter().copied()))
    }

    fn server_args(args: &[&str]) -> ServerArgs {
        match parse(args).unwrap() {
            CommandLine {
                action: None,
                server,
            } => server,
            CommandLine {
                action: Some(Action::Serve(server) | Action::CheckConfig(server)),
                ..
            } => server,
            other => panic!("{other:?}"),
        }
    }

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    struct TempFile(std::path::PathBuf);
    impl TempFile {
        fn new(name: &str, text: &str) -> TempFile {
            let path =
                std::env::temp_dir().join(format!("shardpush-cli-{}-{name}", std::process::id()));
            std::fs::write(&path, text).unwrap();
            TempFile(path)
        }
        fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn no_subcommand_or_serve_takes_the_server_options() {
        let plain = server_args(&["--port", "7000", "-c", "f.toml", "--log-format", "json"]);
        assert_eq!(plain.config.port, Some(7000));
        assert_eq!(plain.config.config_file.as_deref(), Some("f.toml"));
        assert_eq!(plain.log.log_format, Some(LogFormat::Json));
        let serve = server_args(&["serve", "--port", "7000", "--log-level", "debug"]);
        assert_eq!(serve.config.port, Some(7000));
        assert_eq!(serve.log.log_level.as_deref(), Some("debug"));
        let check = parse(&["check-config", "--config", "f.toml"]).unwrap();
        assert!(matches!(check.action, Some(Action::CheckConfig(_))));
        // Options go after the subcommand, not before it.
        assert!(parse(&["--port", "1", "serve"]).is_err());
        assert!(parse(&["--log-format", "xml"]).is_err());
        assert!(parse(&["--nope"]).is_err());
    }

    #[test]
    fn precedence_defaults_file_environment_command_line() {
        let file = TempFile::new(
            "precedence.toml",
            "port = 7001\nshards = 3\nhost = \"10.0.0.1\"\n",
        );
        let load = |args: &[&str], env: &dyn Fn(&str) -> Option<String>| {
            Config::load(&server_args(args).config, env).unwrap()
        };
        let none = env_of(&[]);
        assert_eq!(load(&[], &none).port, 6001);
        let from_file = load(&["-c", file.path()], &none);
        assert_eq!((from_file.port, from_file.shards), (7001, 3));
        let env = env_of(&[("SHARDPUSH_PORT", "7002"), ("SHARDPUSH_HOST", "127.0.0.2")]);
        let from_env = load(&["-c", file.path()], &env);
        assert_eq!((from_env.port, from_env.shards), (7002, 3));
        assert_eq!(from_env.host, "127.0.0.2");
        let from_flag = load(
            &["-c", file.path(), "--port", "7003", "--shards", "1"],
            &env,
        );
        assert_eq!((from_flag.port, from_flag.shards), (7003, 1));
        assert_eq!(from_flag.host, "127.0.0.2");
    }

    #[test]
    fn log_settings_flag_environment_default() {
        let resolve = |args: &[&str], env: &dyn Fn(&str) -> Option<String>| {
            server_args(args).log.resolve(env)
        };
        let none = env_of(&[]);
        assert_eq!(resolve(&[], &none).unwrap(), LogSettings::default());
        let env = env_of(&[
            ("RUST_LOG", "warn,shardpush::webhooks=debug"),
            ("SHARDPUSH_LOG_FORMAT", "JSON"),
        ]);
        let from_env = resolve(&[], &env).unwrap();
        assert_eq!(from_env.filter, "warn,shardpush::webhooks=debug");
        assert_eq!(from_env.format, LogFormat::Json);
        let args = ["--log-level", "error", "--log-format", "plain"];
        let from_flags = resolve(&args, &env).unwrap();
        assert_eq!(from_flags.filter, "error");
        assert_eq!(from_flags.format, LogFormat::Plain);
        let e = resolve(&[], &env_of(&[("SHARDPUSH_LOG_FORMAT", "xml")])).unwrap_err();
        assert_eq!(
            (e.source.as_str(), e.key.as_str()),
            (ENV, "SHARDPUSH_LOG_FORMAT")
        );
        let e = resolve(&[], &env_of(&[("RUST_LOG", "loud")])).unwrap_err();
        assert_eq!((e.source.as_str(), e.key.as_str()), (ENV, "RUST_LOG"));
        let e = resolve(&["--log-level", "inf"], &none).unwrap_err();
        assert_eq!((e.source.as_str(), e.key.as_str()), (CLI, "--log-level"));
        let blank = resolve(&[], &env_of(&[("RUST_LOG", " ")])).unwrap();
        assert_eq!(blank.filter, "info");
    }

    #[test]
    fn check_config_summarises_or_names_the_key() {
        let good = TempFile::new(
            "good.toml",
            "port = 7100\n[[apps]]\nid = \"1\"\nkey = \"k1\"\nsecret = \"s1\"\n\
             [[apps]]\nid = \"2\"\nkey = \"k2\"\nsecret = \"s2\"\n",
        );
        let none = env_of(&[]);
        let summary = check_config(&server_args(&["check-config", "-c", good.path()]), &none);
        let summary = summary.unwrap();
        assert!(summary.contains("configuration OK"), "{summary}");
        assert!(
            summary.contains("2 apps") && summary.contains("port 7100"),
            "{summary}"
        );
        assert!(summary.contains("cluster off"), "{summary}");
        assert!(!summary.contains("s1"), "{summary}");
        // Like a start, it honours the environment and the options.
        let env = env_of(&[("SHARDPUSH_REDIS_URL", "redis://u:hunter2@127.0.0.1:6379")]);
        let args = server_args(&["check-config", "-c", good.path(), "--port", "7200"]);
        let summary = check_config(&args, &env).unwrap();
        assert!(summary.contains("port 7200"), "{summary}");
        assert!(summary.contains("cluster on"), "{summary}");
        assert!(
            !summary.contains("hunter2"),
            "the password is redacted: {summary}"
        );
        let bad = TempFile::new(
            "bad.toml",
            "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"\"\n",
        );
        let e = check_config(&server_args(&["check-config", "-c", bad.path()]), &none);
        let e = e.unwrap_err();
        assert_eq!(
            (e.source.as_str(), e.key.as_str()),
            (bad.path(), "apps[0].secret")
        );
        let env = env_of(&[("SHARDPUSH_PORT", "many")]);
        let e = check_config(&server_args(&["check-config"]), &env).unwrap_err();
        assert_eq!(e.key, "SHARDPUSH_PORT");
    }

    fn trigger_args(args: &[&str]) -> TriggerArgs {
        let mut line = vec!["trigger"];
        line.extend_from_slice(args);
        match parse(&line).unwrap().action {
            Some(Action::Trigger(t)) => t,
            other => panic!("{other:?}"),
        }
    }

    /// The REST worked example of the shared vectors: body, body_md5 and auth_signature.
    #[test]
    fn trigger_request_matches_the_shared_vectors() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/vectors/signatures.json"
        );
        let text = std::fs::read_to_string(path).expect("../shared/vectors/signatures.json");
        use sonic_rs::{JsonContainerTrait, JsonValueTrait};
        let doc: sonic_rs::Value = sonic_rs::from_str(&text).unwrap();
        let vectors = doc["vectors"].as_array().unwrap();
        let named = |name: &str| {
            vectors
                .iter()
                .find(|v| v["name"].as_str() == Some(name))
                .unwrap_or_else(|| panic!("vector {name}"))
        };
        let md5 = named("REST body_md5");
        let signature = named("REST auth_signature (POST /apps/3/events)");
        let secret = signature["secret"].as_str().unwrap();
        let args = trigger_args(&[
            "--url",
            "http://127.0.0.1:6001",
            "--app-id",
            "3",
            "--key",
            "278d425bdf160c739803",
            "--secret",
            secret,
            "--channel",
            "project-3",
            "--event",
            "foo",
            "--data",
            r#"{"some":"data"}"#,
        ]);
        let request = args.request(1353088179).unwrap();
        assert_eq!(request.body, md5["input"].as_str().unwrap());
        let (base, query) = request.url.split_once('?').unwrap();
        assert_eq!(base, "http://127.0.0.1:6001/apps/3/events");
        let expected_query = format!(
            "{}&auth_signature={}",
            signature["string_to_sign"]
                .as_str()
                .unwrap()
                .rsplit('\n')
                .next()
                .unwrap(),
            signature["expected"].as_str().unwrap()
        );
        assert_eq!(query, expected_query);
        assert!(query.contains(md5["expected"].as_str().unwrap()));
        assert!(!request.url.contains(secret) && !format!("{args:?}").contains(secret));
    }

    #[test]
    fn trigger_requests_verify_as_the_server_verifies_them() {
        use crate::http::signature::{parse_query, verify};
        let args = trigger_args(&[
            "--url",
            "https://push.example:443/",
            "--app-id",
            "my app",
            "--key",
            "k&=+%",
            "--secret",
            "s",
            "--channel",
            "a",
            "--channel",
            "private-b",
            "--event",
            "e",
            "--data",
            "plain text, \"quoted\"",
            "--socket-id",
            "1.2",
        ]);
        let request = args.request(1_700_000_000).unwrap();
        let (url, query) = request.url.split_once('?').unwrap();
        assert_eq!(url, "https://push.example:443/apps/my%20app/events");
        let path = url.strip_prefix("https://push.example:443").unwrap();
        let query = parse_query(query);
        let body = request.body.as_bytes();
        assert_eq!(
            verify("POST", path, &query, body, "s", 1_700_000_000),
            Ok(())
        );
        assert!(verify("POST", path, &query, body, "other", 1_700_000_000).is_err());
        let sent: serde_json::Value = serde_json::from_str(&request.body).unwrap();
        assert_eq!(
            sent,
            serde_json::json!({"name": "e", "channels": ["a", "private-b"],
                "data": "plain text, \"quoted\"", "socket_id": "1.2"})
        );
    }

    #[test]
    fn trigger_urls_are_a_server_address_only() {
        let with = |url: &str| {
            let mut args = trigger_args(&[
                "--app-id",
                "1",
                "--key",
                "k",
                "--secret",
                "s",
                "--channel",
                "c",
                "--event",
                "e",
                "--data",
                "d",
            ]);
            args.url = url.into();
            args.request(0)
        };
        assert!(with("http://127.0.0.1:6001").is_ok());
        assert!(with("http://[::1]:6001/").is_ok());
        for bad in [
            "127.0.0.1:6001",
            "ftp://h",
            "http://h/prefix",
            "http://h/?x=1",
            "nope",
        ] {
            let e = with(bad).unwrap_err();
            assert_eq!(e.key, "--url (or SHARDPUSH_URL)", "{bad}");
        }
    }

    #[test]
    fn trigger_needs_its_options() {
        // No app id, no channel: usage errors (exit status 2), the secret never echoed.
        let e = parse(&[
            "trigger", "--key", "k", "--secret", "hunter2", "--event", "e",
        ])
        .map(|_| ())
        .unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}
