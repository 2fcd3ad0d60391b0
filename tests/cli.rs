//! The command line of the built binary: --version, --help, check-config, JSON logs, and
//! trigger against a real server with a WebSocket subscriber.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// The variables the binary reads, cleared so that the caller's environment cannot leak in.
const READ_ENV: &[&str] = &[
    "SHARDPUSH_HOST",
    "SHARDPUSH_PORT",
    "SHARDPUSH_SHARDS",
    "SHARDPUSH_ROLE",
    "SHARDPUSH_REDIS_URL",
    "SHARDPUSH_METRICS_PORT",
    "SHARDPUSH_APP_ID",
    "SHARDPUSH_APP_KEY",
    "SHARDPUSH_APP_SECRET",
    "SHARDPUSH_URL",
    "SHARDPUSH_LOG_FORMAT",
    "RUST_LOG",
];

fn shardpush() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_shardpush"));
    for name in READ_ENV {
        command.env_remove(name);
    }
    command
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    shardpush()
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run shardpush")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn temp_file(name: &str, contents: &str) -> (TempDir, String) {
    let dir = std::env::temp_dir().join(format!("shardpush-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    (TempDir(dir), path.to_str().unwrap().to_owned())
}

#[test]
fn version_and_help() {
    let out = run(&["--version"], &[]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("shardpush {}", env!("CARGO_PKG_VERSION"))
    );
    let out = run(&["--help"], &[]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for word in [
        "serve",
        "check-config",
        "trigger",
        "--config",
        "--log-level",
        "--log-format",
        "RUST_LOG",
        "SHARDPUSH_PORT",
    ] {
        assert!(help.contains(word), "--help mentions {word}:\n{help}");
    }
    let out = run(
        &["trigger", "--help"],
        &[("SHARDPUSH_APP_SECRET", "hunter2")],
    );
    assert!(out.status.success());
    let help = text(&out.stdout);
    assert!(
        help.contains("--channel") && help.contains("SHARDPUSH_URL"),
        "{help}"
    );
    assert!(
        !help.contains("hunter2"),
        "the secret's value is never shown:\n{help}"
    );
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["--nope"][..],
        &["--port", "many"],
        &["--log-format", "xml"],
        &["--port", "1", "serve"],
        &["trigger", "--event", "e"],
    ] {
        let out = run(args, &[]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    let out = run(&["--port", "0"], &[("RUST_LOG", "loud")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("RUST_LOG"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn check_config_of_a_good_and_a_bad_file() {
    let (_dir, good) = temp_file("good.toml", &config_toml("", "", ""));
    let out = run(&["check-config", "--config", &good], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let summary = text(&out.stdout);
    assert_eq!(summary.lines().count(), 1, "{summary}");
    assert!(summary.contains("1 app"), "{summary}");
    assert!(summary.contains("port 0"), "{summary}");
    assert!(summary.contains("cluster off"), "{summary}");
    assert!(!summary.contains(SECRET), "{summary}");

    // The environment counts, as for a start: a Redis URL turns the cluster on (its password
    // hidden), a bad port is an error naming the variable.
    let env = [("SHARDPUSH_REDIS_URL", "redis://:hunter2@127.0.0.1:6379")];
    let out = run(&["check-config", "-c", &good], &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let summary = text(&out.stdout);
    assert!(
        summary.contains("cluster on") && !summary.contains("hunter2"),
        "{summary}"
    );
    let out = run(&["check-config", "-c", &good], &[("SHARDPUSH_PORT", "x")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("SHARDPUSH_PORT"));

    let (_dir, bad) = temp_file("bad.toml", &config_toml("", "max_presence_members = 0", ""));
    let out = run(&["check-config", "--config", &bad], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let error = text(&out.stderr);
    assert!(error.contains(&bad), "names the file: {error}");
    assert!(
        error.contains("apps[0].max_presence_members"),
        "names the key: {error}"
    );
    assert!(
        error.contains("must be greater than 0"),
        "says why: {error}"
    );

    let (_dir, typo) = temp_file("typo.toml", "port = 1\nprot = 2\n");
    let out = run(&["check-config", "--config", &typo], &[]);
    assert_eq!(out.status.code(), Some(2));
    let error = text(&out.stderr);
    assert!(
        error.contains("line 2") && error.contains("prot"),
        "{error}"
    );
}

/// `--log-format json`: every line on stdout (info) and stderr (warnings) is a JSON object with
/// a timestamp, a level and a message.
#[test]
fn json_logs_on_both_streams() {
    // No app configured: the development app, and a warning about it on stderr.
    let mut child = shardpush()
        .args(["--host", "127.0.0.1", "--port", "0", "--shards", "1"])
        .args(["--log-format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let listening = loop {
        let line = stdout.next().expect("a listening line").unwrap();
        let json: serde_json::Value = serde_json::from_str(&line).expect(&line);
        if json["message"]
            .as_str()
            .unwrap_or("")
            .contains("listening on")
        {
            break json;
        }
    };
    assert_eq!(listening["level"], "INFO", "{listening}");
    let message = listening["message"].as_str().unwrap();
    assert!(message.contains("listening on 127.0.0.1:"), "{listening}");
    assert!(listening["timestamp"].is_string(), "{listening}");
    assert!(listening["target"].is_string(), "{listening}");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let rest: Vec<String> = stdout.map(Result::unwrap).collect();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let mut levels = Vec::new();
    for line in rest.iter().map(String::as_str).chain(stderr.lines()) {
        let json: serde_json::Value = serde_json::from_str(line).expect(line);
        assert!(json["message"].is_string(), "{line}");
        levels.push(json["level"].as_str().unwrap().to_owned());
    }
    assert!(
        stderr.contains("development app") && levels.contains(&"WARN".to_owned()),
        "{stderr}"
    );
    assert!(
        rest.iter().any(|l| l.contains("shardpush stopped")),
        "the exit report: {rest:?}"
    );
}

/// The test harness finds the port in JSON lines too, and the log level filters.
#[test]
fn the_listening_line_is_found_in_json_and_warn_hides_info() {
    let server = Server::with_config_env(
        &config_toml("", "", ""),
        &[("SHARDPUSH_LOG_FORMAT", "json")],
    );
    let mut c = server.connect();
    c.subscribe("json-logs");
    assert_eq!(server.trigger("json-logs", "e", "d").0, 200);
    // With --log-level warn nothing is printed on stdout: the info lines are filtered out.
    let mut child = shardpush()
        .args(["--host", "127.0.0.1", "--port", "0", "--shards", "1"])
        .args(["--log-level", "warn"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    // The warning about the development app comes after the listeners are up.
    let warning = stderr.next().expect("a warning").unwrap();
    assert!(
        warning.contains(" WARN ") && warning.contains("development app"),
        "{warning}"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "", "no info line at level warn");
}

fn trigger(server: &Server, args: &[&str], secret: &str) -> Output {
    let url = format!("http://127.0.0.1:{}", server.port);
    let mut all = vec!["trigger", "--url", &url, "--app-id", APP_ID, "--key", KEY];
    all.extend_from_slice(args);
    run(&all, &[("SHARDPUSH_APP_SECRET", secret)])
}

#[test]
fn trigger_publishes_to_a_subscriber() {
    let server = Server::start();
    let mut alice = server.connect();
    let mut bob = server.connect();
    assert_eq!(
        alice.subscribe("news")["event"],
        "pusher_internal:subscription_succeeded"
    );
    bob.subscribe("sport");
    let data = r#"{"headline":"it works","n":1}"#;
    let args = [
        "--channel",
        "news",
        "--channel",
        "sport",
        "--event",
        "breaking",
        "--data",
        data,
    ];
    let out = trigger(&server, &args, SECRET);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.starts_with("200 OK"), "{stdout}");
    for (client, channel) in [(&mut alice, "news"), (&mut bob, "sport")] {
        let event = client.recv_event("breaking");
        assert_eq!(event["channel"], channel);
        assert_eq!(event["data"], data);
    }

    // Excluding the sender's own connection.
    let args = [
        "--channel",
        "news",
        "--event",
        "echo",
        "--data",
        "x",
        "--socket-id",
        &alice.socket_id,
    ];
    let out = trigger(&server, &args, SECRET);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(alice.try_recv(Duration::from_millis(300)), None);

    // A wrong secret: the server's 401 is printed, the status is 1, the secret shown nowhere.
    let args = ["--channel", "news", "--event", "e", "--data", "x"];
    let out = trigger(&server, &args, "not-the-secret");
    assert_eq!(out.status.code(), Some(1));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(stdout.starts_with("401"), "{stdout}");
    assert!(!stdout.contains("not-the-secret") && !stderr.contains("not-the-secret"));
    assert_eq!(alice.try_recv(Duration::from_millis(300)), None);
}

#[test]
fn trigger_without_a_server_exits_1() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let args = [
        "trigger",
        "--url",
        &url,
        "--app-id",
        "1",
        "--key",
        "k",
        "--channel",
        "c",
        "--event",
        "e",
        "--data",
        "d",
    ];
    let out = run(&args, &[("SHARDPUSH_APP_SECRET", "hunter2")]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&url) && !stderr.contains("hunter2"),
        "{stderr}"
    );
}

/// A stderr nobody reads fills; the warnings beyond the pipe and the queue are dropped (the
/// server goes on serving), and once stderr is read again the count is logged.
#[test]
fn a_stalled_stderr_drops_lines_and_then_says_how_many() {
    let (server, stderr) = Server::spawn(
        &config_toml("", "", ""),
        &[("SHARDPUSH_FAULT_INJECTION", "1")],
        Stdio::piped(),
    );
    let stderr = stderr.expect("piped stderr");
    // Each contained panic logs two warnings of about 150 bytes: 1000 of them are more than a
    // 64 KiB pipe and the 1024 lines of the queue hold.
    for _ in 0..1000 {
        let mut c = server.connect();
        c.send_json(serde_json::json!({"event": "shardpush:test_panic", "data": {}}));
        let _ = c.try_recv(Duration::from_secs(5));
    }
    let mut c = server.connect();
    c.subscribe("still-serving");
    assert_eq!(server.trigger("still-serving", "e", "d").0, 200);
    assert_eq!(c.recv_event("e")["data"], "d");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("log lines dropped") {
                let _ = tx.send(line);
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the dropped lines are counted and logged");
    assert!(line.contains("stderr was not being read"), "{line}");
    assert!(line.contains(" WARN "), "{line}");
}
