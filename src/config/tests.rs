use super::*;
use std::collections::HashMap;

/// A fake environment built from pairs.
struct Env(HashMap<String, String>);

impl Env {
    fn new(pairs: &[(&str, &str)]) -> Env {
        let mut map: HashMap<String, String> = [
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
            ("XDG_DATA_HOME", "/home/me/.data"),
            ("HOME", "/home/me"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in pairs {
            map.insert(k.to_string(), v.to_string());
        }
        Env(map)
    }

    fn lookup(&self) -> impl Fn(&str) -> Option<String> + '_ {
        |k| self.0.get(k).cloned()
    }
}

fn resolve_as(
    text: &str,
    o: &Overrides,
    env: &Env,
    purpose: Purpose,
) -> Result<Config, ConfigError> {
    let lookup = env.lookup();
    let host = Host {
        env: &lookup,
        euid: 1000,
        purpose,
    };
    resolve(RawConfig::parse(text, "<text>")?, o, &host, None)
}

fn daemon(text: &str, o: &Overrides, env: &Env) -> Result<Config, ConfigError> {
    resolve_as(text, o, env, Purpose::Daemon)
}

fn plain(text: &str) -> Config {
    daemon(text, &Overrides::default(), &Env::new(&[])).unwrap()
}

fn err(text: &str, o: &Overrides, env: &Env) -> String {
    daemon(text, o, env).unwrap_err().to_string()
}

fn tcp(addr: &str) -> Option<SocketAddr> {
    Some(addr.parse().unwrap())
}

/// A token file with the given content and mode in a fresh temp dir.
fn token_file(content: &str, mode: u32) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    fs::write(&path, content).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    (dir, path)
}

#[test]
fn empty_file_gives_every_default() {
    let c = plain("");
    assert_eq!(c.general.workspace, None);
    assert_eq!(c.general.log_level, DEFAULT_LOG_LEVEL);
    assert_eq!(c.general.session_timeout, DEFAULT_SESSION_TIMEOUT);
    assert_eq!(
        c.storage.sqlite_path,
        Path::new("/home/me/.data/codi/codi.db")
    );
    assert_eq!(c.storage.cache_size_mb, DEFAULT_CACHE_SIZE_MB);
    assert_eq!(c.storage.retention_days, DEFAULT_RETENTION_DAYS);
    assert_eq!(c.storage.reader_threads, DEFAULT_READER_THREADS);
    assert_eq!(c.storage.batch_max_rows, DEFAULT_BATCH_MAX_ROWS);
    assert_eq!(c.storage.inflight_bytes, DEFAULT_INFLIGHT_BYTES);
    let m = &c.monitor;
    assert_eq!(
        m.unix_socket_path.as_deref(),
        Some(Path::new("/run/user/1000/codi/monitor.sock"))
    );
    assert_eq!(m.tcp_listen, None);
    assert!(m.workers >= 1);
    assert_eq!(m.token, None);
    assert_eq!(m.token_file, None);
    assert_eq!(m.socket_group, None);
    assert_eq!(m.rate_limit, DEFAULT_RATE_LIMIT);
    assert_eq!(m.rate_burst, DEFAULT_RATE_BURST);
    assert_eq!(m.max_connections, DEFAULT_MAX_CONNECTIONS);
    assert_eq!(
        m.max_pending_per_connection,
        DEFAULT_MAX_PENDING_PER_CONNECTION
    );
    assert_eq!(m.file_batch_size, DEFAULT_FILE_BATCH_SIZE);
    assert_eq!(m.export_patterns, DEFAULT_EXPORT_PATTERNS);
    assert_eq!(m.scan_interval, DEFAULT_SCAN_INTERVAL);
    assert!(!c.server_hub.enabled);
    assert_eq!(c.server_hub.url, None);
    assert_eq!(c.server_hub.batch_size, DEFAULT_SERVER_HUB_BATCH_SIZE);
    assert_eq!(c.server_hub.sync_interval, DEFAULT_SYNC_INTERVAL);
    assert_eq!(c.source, None);
}

#[test]
fn file_values_are_used() {
    let c = plain(
        r#"
        [general]
        workspace = "/srv/work"
        log_level = "DEBUG"
        session_timeout = "2h 30m"
        [storage]
        sqlite_path = "/data/codi.db"
        wal_mode = true
        cache_size_mb = 8
        retention_days = 0
        reader_threads = 4
        batch_max_rows = 100
        inflight_bytes = 2097152
        [monitor]
        unix_socket_path = "/run/x.sock"
        socket_group = "codi"
        workers = 3
        rate_limit = 500
        rate_burst = 50
        max_connections = 10
        max_pending_per_connection = 7
        file_batch_size = 9
        export_patterns = ["*.log"]
        scan_interval = "1m"
        [server_hub]
        enabled = true
        url = "https://hub.example/api"
        batch_size = 5
        sync_interval = "10s"
        "#,
    );
    assert_eq!(c.general.workspace.as_deref(), Some(Path::new("/srv/work")));
    assert_eq!(c.general.log_level, LevelFilter::Debug);
    assert_eq!(c.general.session_timeout, Duration::from_secs(9000));
    assert_eq!(c.storage.sqlite_path, Path::new("/data/codi.db"));
    assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
    assert_eq!(
        (
            c.storage.cache_size_mb,
            c.storage.retention_days,
            c.storage.reader_threads,
            c.storage.batch_max_rows,
            c.storage.inflight_bytes
        ),
        (8, 0, 4, 100, 2_097_152)
    );
    let m = &c.monitor;
    assert_eq!(
        m.unix_socket_path.as_deref(),
        Some(Path::new("/run/x.sock"))
    );
    assert_eq!(m.socket_group.as_deref(), Some("codi"));
    assert_eq!(m.workers, 3);
    assert_eq!((m.rate_limit, m.rate_burst), (500, 50));
    assert_eq!(
        (
            m.max_connections,
            m.max_pending_per_connection,
            m.file_batch_size
        ),
        (10, 7, 9)
    );
    assert_eq!(m.export_patterns, ["*.log"]);
    assert_eq!(m.scan_interval, Duration::from_secs(60));
    assert!(c.server_hub.enabled);
    assert_eq!(c.server_hub.url.as_deref(), Some("https://hub.example/api"));
    assert_eq!(c.server_hub.batch_size, 5);
    assert_eq!(c.server_hub.sync_interval, Duration::from_secs(10));
}

#[test]
fn unknown_keys_and_wrong_types_are_errors() {
    let o = Overrides::default();
    let env = Env::new(&[]);
    let e = err("[monitor]\ntcp_prot = 9847\n", &o, &env);
    assert!(e.contains("tcp_prot"), "{e}");
    let e = err("[monitr]\n", &o, &env);
    assert!(e.contains("monitr"), "{e}");
    let e = err("[storage]\nreader_threads = \"two\"\n", &o, &env);
    assert!(e.contains("reader_threads"), "{e}");
}

#[test]
fn bad_durations_and_levels_name_their_key() {
    let o = Overrides::default();
    let env = Env::new(&[]);
    let e = err("[monitor]\nscan_interval = \"soon\"\n", &o, &env);
    assert!(
        e.starts_with("monitor.scan_interval `soon` is not a duration"),
        "{e}"
    );
    let e = err("[server_hub]\nsync_interval = \"0s\"\n", &o, &env);
    assert_eq!(e, "server_hub.sync_interval must be longer than zero");
    let e = err("[general]\nlog_level = \"loud\"\n", &o, &env);
    assert!(e.starts_with("general.log_level `loud`"), "{e}");
    let flag = Overrides {
        log_level: Some("chatty".into()),
        ..Overrides::default()
    };
    let e = err("", &flag, &env);
    assert!(e.starts_with("--log-level `chatty`"), "{e}");
}

#[test]
fn range_checks_name_their_key() {
    let o = Overrides::default();
    let env = Env::new(&[]);
    assert_eq!(
        err("[storage]\nreader_threads = 0\n", &o, &env),
        "storage.reader_threads is 0 but must be at least 1"
    );
    let e = err("[storage]\ninflight_bytes = 1000\n", &o, &env);
    assert!(e.starts_with("storage.inflight_bytes is 1000"), "{e}");
    let e = err("[monitor]\nworkers = 100000\n", &o, &env);
    assert!(e.starts_with("monitor.workers is 100000"), "{e}");
    let e = err("[monitor]\nrate_limit = 10\nrate_burst = 0\n", &o, &env);
    assert!(e.starts_with("monitor.rate_burst is 0"), "{e}");
    let e = err("[monitor]\nexport_patterns = [\"\"]\n", &o, &env);
    assert!(e.starts_with("monitor.export_patterns"), "{e}");
    let e = err("[server_hub]\nenabled = true\n", &o, &env);
    assert_eq!(
        e,
        "server_hub.enabled is true but server_hub.url is not set"
    );
    let e = err("[server_hub]\nurl = \"ftp://x\"\n", &o, &env);
    assert!(e.starts_with("server_hub.url `ftp://x`"), "{e}");
}

#[test]
fn workers_zero_means_cores() {
    let c = plain("[monitor]\nworkers = 0\n");
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(c.monitor.workers, cores);
    let flag = Overrides {
        workers: Some(2),
        ..Overrides::default()
    };
    let c = daemon("[monitor]\nworkers = 5\n", &flag, &Env::new(&[])).unwrap();
    assert_eq!(c.monitor.workers, 2);
}

#[test]
fn db_path_precedence_is_file_then_env_then_flag() {
    let file = "[storage]\nsqlite_path = \"/file.db\"\n";
    let none = Overrides::default();
    assert_eq!(plain(file).storage.sqlite_path, Path::new("/file.db"));
    let env = Env::new(&[("CODI_DB", "/env.db")]);
    let c = daemon(file, &none, &env).unwrap();
    assert_eq!(c.storage.sqlite_path, Path::new("/env.db"));
    let flag = Overrides {
        db: Some("/flag.db".into()),
        ..Overrides::default()
    };
    let c = daemon(file, &flag, &env).unwrap();
    assert_eq!(c.storage.sqlite_path, Path::new("/flag.db"));
}

#[test]
fn log_level_flag_beats_file() {
    let flag = Overrides {
        log_level: Some("trace".into()),
        ..Overrides::default()
    };
    let c = daemon("[general]\nlog_level = \"warn\"\n", &flag, &Env::new(&[])).unwrap();
    assert_eq!(c.general.log_level, LevelFilter::Trace);
}

#[test]
fn tcp_port_and_tcp_address_turn_tcp_on() {
    let e = err(
        "[monitor]\ntcp_port = 4000\n",
        &Overrides::default(),
        &Env::new(&[]),
    );
    assert!(e.contains("needs a token"), "{e}");
    let c = plain("[monitor]\ntcp_port = 4000\nallow_unauthenticated_tcp = true\n");
    assert_eq!(c.monitor.tcp_listen, tcp("127.0.0.1:4000"));
    assert!(
        c.warnings[0].contains("listens without a token"),
        "{:?}",
        c.warnings
    );
    assert!(c.monitor.unix_socket_path.is_some());
    let c = plain("[monitor]\ntcp_address = \"[::1]:4001\"\nunix_socket_path = \"\"\nallow_unauthenticated_tcp = true\n");
    assert_eq!(c.monitor.tcp_listen, tcp("[::1]:4001"));
    assert_eq!(c.monitor.unix_socket_path, None);
}

#[test]
fn tcp_settings_are_checked() {
    let o = Overrides::default();
    let env = Env::new(&[]);
    let e = err(
        "[monitor]\ntcp_port = 1\ntcp_address = \"127.0.0.1:2\"\n",
        &o,
        &env,
    );
    assert!(e.contains("both set"), "{e}");
    let e = err("[monitor]\ntcp_address = \"localhost\"\n", &o, &env);
    assert!(e.starts_with("monitor.tcp_address `localhost`"), "{e}");
    let e = err("[monitor]\ntcp_port = 0\n", &o, &env);
    assert!(e.starts_with("monitor.tcp_port is 0"), "{e}");
    let e = err("", &o, &Env::new(&[("CODI_MONITOR_PORT", "http")]));
    assert!(e.starts_with("CODI_MONITOR_PORT=http"), "{e}");
    let flag = Overrides {
        tcp: Some("nowhere".into()),
        ..Overrides::default()
    };
    assert!(err("", &flag, &env).starts_with("--tcp `nowhere`"));
}

#[test]
fn both_listeners_off_is_refused() {
    let e = err(
        "[monitor]\nunix_socket_path = \"\"\n",
        &Overrides::default(),
        &Env::new(&[]),
    );
    assert!(e.starts_with("no listener is on"), "{e}");
}

#[test]
fn mode_tcp_is_tcp_only_on_loopback() {
    let env = Env::new(&[
        ("CODI_MONITOR_MODE", "tcp"),
        ("CODI_MONITOR_TOKEN", "0123456789abcdef"),
    ]);
    let c = daemon("", &Overrides::default(), &env).unwrap();
    assert_eq!(c.monitor.unix_socket_path, None);
    assert_eq!(c.monitor.tcp_listen, tcp("127.0.0.1:9847"));
    let env = Env::new(&[
        ("CODI_MONITOR_MODE", "TCP"),
        ("CODI_MONITOR_PORT", "5555"),
        ("CODI_MONITOR_TOKEN", "0123456789abcdef"),
    ]);
    let c = daemon("[monitor]\ntcp_port = 4000\n", &Overrides::default(), &env).unwrap();
    assert_eq!(c.monitor.tcp_listen, tcp("127.0.0.1:5555"));
}

#[test]
fn mode_both_and_unix() {
    let env = Env::new(&[
        ("CODI_MONITOR_MODE", "both"),
        ("CODI_MONITOR_TOKEN", "0123456789abcdef"),
    ]);
    let c = daemon(
        "[monitor]\nunix_socket_path = \"\"\n",
        &Overrides::default(),
        &env,
    )
    .unwrap();
    assert_eq!(
        c.monitor.unix_socket_path.as_deref(),
        Some(Path::new("/run/user/1000/codi/monitor.sock"))
    );
    assert_eq!(c.monitor.tcp_listen, tcp("127.0.0.1:9847"));
    let env = Env::new(&[("CODI_MONITOR_MODE", "unix")]);
    let c = daemon("[monitor]\ntcp_port = 4000\n", &Overrides::default(), &env).unwrap();
    assert_eq!(c.monitor.tcp_listen, None);
    assert!(c.monitor.unix_socket_path.is_some());
    let e = err(
        "",
        &Overrides::default(),
        &Env::new(&[("CODI_MONITOR_MODE", "udp")]),
    );
    assert_eq!(e, "CODI_MONITOR_MODE=udp is not one of unix, tcp, both");
}

#[test]
fn env_port_moves_a_file_tcp_listener() {
    let env = Env::new(&[
        ("CODI_MONITOR_PORT", "6000"),
        ("CODI_MONITOR_TOKEN", "0123456789abcdef"),
    ]);
    let c = daemon("[monitor]\ntcp_port = 4000\n", &Overrides::default(), &env).unwrap();
    assert_eq!(c.monitor.tcp_listen, tcp("127.0.0.1:6000"));
    // A port alone does not turn TCP on.
    let c = daemon("", &Overrides::default(), &env).unwrap();
    assert_eq!(c.monitor.tcp_listen, None);
}

#[test]
fn flags_set_listeners() {
    let env = Env::new(&[
        ("CODI_MONITOR_MODE", "tcp"),
        ("CODI_MONITOR_TOKEN", "0123456789abcdef"),
    ]);
    let o = Overrides {
        socket: Some("/tmp/t.sock".into()),
        tcp: Some("127.0.0.1:0".into()),
        ..Overrides::default()
    };
    let c = daemon("", &o, &env).unwrap();
    assert_eq!(
        c.monitor.unix_socket_path.as_deref(),
        Some(Path::new("/tmp/t.sock"))
    );
    assert_eq!(c.monitor.tcp_listen, tcp("127.0.0.1:0"));
    let o = Overrides {
        socket: Some(PathBuf::new()),
        tcp: Some("127.0.0.1:7".into()),
        ..Overrides::default()
    };
    let c = daemon(
        "",
        &o,
        &Env::new(&[("CODI_MONITOR_TOKEN", "0123456789abcdef")]),
    )
    .unwrap();
    assert_eq!(c.monitor.unix_socket_path, None);
}

#[test]
fn beyond_loopback_needs_a_token() {
    let text = "[monitor]\ntcp_address = \"0.0.0.0:9847\"\n";
    let e = err(text, &Overrides::default(), &Env::new(&[]));
    assert_eq!(
        e,
        "monitor.tcp_address 0.0.0.0:9847 is beyond loopback: refusing to listen without a token (set monitor.token_file or CODI_MONITOR_TOKEN)"
    );
    let flag = Overrides {
        tcp: Some("0.0.0.0:1".into()),
        ..Overrides::default()
    };
    let e = err("", &flag, &Env::new(&[]));
    assert!(e.starts_with("--tcp 0.0.0.0:1 is beyond loopback"), "{e}");
    let env = Env::new(&[("CODI_MONITOR_TOKEN", " s3cret\n")]);
    let e = err(text, &Overrides::default(), &env);
    assert!(
        e.starts_with("the token is 6 bytes long but must be at least 16"),
        "{e}"
    );
    let env = Env::new(&[("CODI_MONITOR_TOKEN", " s3cret-s3cret-s3cret\n")]);
    let c = daemon(text, &Overrides::default(), &env).unwrap();
    assert_eq!(c.monitor.token.as_deref(), Some("s3cret-s3cret-s3cret"));
    // codi2 does not listen: no such check.
    let c = resolve_as(text, &Overrides::default(), &Env::new(&[]), Purpose::Client).unwrap();
    assert_eq!(c.monitor.token, None);
}

#[test]
fn token_file_is_read_and_trimmed() {
    let (_dir, path) = token_file("  abc123\n", 0o600);
    let text = format!("[monitor]\ntoken_file = {:?}\n", path.display().to_string());
    let c = plain(&text);
    assert_eq!(c.monitor.token.as_deref(), Some("abc123"));
    assert_eq!(c.monitor.token_file.as_deref(), Some(path.as_path()));
}

#[test]
fn token_file_must_be_private_and_non_empty() {
    let (_dir, path) = token_file("abc", 0o644);
    let text = format!("[monitor]\ntoken_file = {:?}\n", path.display().to_string());
    let e = err(&text, &Overrides::default(), &Env::new(&[]));
    let shown = path.display();
    assert_eq!(
        e,
        format!("monitor.token_file {shown} is accessible by group or others (mode 0644): run `chmod 600 {shown}`")
    );
    let (_dir, path) = token_file(" \n", 0o600);
    let text = format!("[monitor]\ntoken_file = {:?}\n", path.display().to_string());
    let e = err(&text, &Overrides::default(), &Env::new(&[]));
    assert_eq!(e, format!("monitor.token_file {} is empty", path.display()));
    let o = Overrides {
        token_file: Some("/nonexistent/token".into()),
        ..Overrides::default()
    };
    let e = err("", &o, &Env::new(&[]));
    assert!(
        e.starts_with("--token-file /nonexistent/token cannot be read"),
        "{e}"
    );
}

#[test]
fn token_precedence_is_file_then_env_then_flag() {
    let (_d1, file) = token_file("from-file", 0o600);
    let (_d2, flag_file) = token_file("from-flag", 0o600);
    let text = format!("[monitor]\ntoken_file = {:?}\n", file.display().to_string());
    let env = Env::new(&[("CODI_MONITOR_TOKEN", "from-env")]);
    let c = daemon(&text, &Overrides::default(), &env).unwrap();
    assert_eq!(c.monitor.token.as_deref(), Some("from-env"));
    let o = Overrides {
        token_file: Some(flag_file.clone()),
        ..Overrides::default()
    };
    let c = daemon(&text, &o, &env).unwrap();
    assert_eq!(c.monitor.token.as_deref(), Some("from-flag"));
    assert_eq!(c.monitor.token_file, Some(flag_file));
    let e = err(
        "",
        &Overrides::default(),
        &Env::new(&[("CODI_MONITOR_TOKEN", "  ")]),
    );
    assert_eq!(e, "CODI_MONITOR_TOKEN is set but blank");
}

#[test]
fn client_reads_token_file_leniently() {
    let (_dir, path) = token_file("tok\n", 0o644);
    let text = format!("[monitor]\ntoken_file = {:?}\n", path.display().to_string());
    let c = resolve_as(
        &text,
        &Overrides::default(),
        &Env::new(&[]),
        Purpose::Client,
    )
    .unwrap();
    assert_eq!(c.monitor.token.as_deref(), Some("tok"));
    let text = "[monitor]\ntoken_file = \"/nonexistent/token\"\n";
    let c = resolve_as(text, &Overrides::default(), &Env::new(&[]), Purpose::Client).unwrap();
    assert_eq!(c.monitor.token, None);
}

#[test]
fn overlong_socket_path_is_refused() {
    let long = format!("/tmp/{}.sock", "x".repeat(120));
    let e = err(
        &format!("[monitor]\nunix_socket_path = {long:?}\n"),
        &Overrides::default(),
        &Env::new(&[]),
    );
    assert!(
        e.starts_with(&format!("monitor.unix_socket_path {long} is")),
        "{e}"
    );
}

#[test]
fn debug_output_redacts_the_token() {
    let c = daemon(
        "",
        &Overrides::default(),
        &Env::new(&[("CODI_MONITOR_TOKEN", "hunter2")]),
    )
    .unwrap();
    let shown = format!("{c:?}");
    assert!(!shown.contains("hunter2"));
    assert!(shown.contains("<redacted>"));
}

#[test]
fn to_toml_round_trips_and_redacts() {
    let env = Env::new(&[("CODI_MONITOR_TOKEN", "hunter2-hunter2-hunter2")]);
    let text = "[monitor]\ntcp_address = \"0.0.0.0:9000\"\nworkers = 2\n[server_hub]\nurl = \"http://h\"\n[general]\nsession_timeout = \"90m\"\n";
    let c = daemon(text, &Overrides::default(), &env).unwrap();
    let out = c.to_toml();
    assert!(!out.contains("hunter2"), "{out}");
    assert!(out.contains("# token: set (redacted)"), "{out}");
    let again = daemon(&out, &Overrides::default(), &env).unwrap();
    assert_eq!(again, c);
    let c = plain("[monitor]\nunix_socket_path = \"/x.sock\"\n");
    assert_eq!(plain(&c.to_toml()), c);
}

#[test]
fn packaged_example_parses() {
    let text = include_str!("../../packaging/monitor.toml");
    let c = daemon(text, &Overrides::default(), &Env::new(&[])).unwrap();
    assert!(c.monitor.unix_socket_path.is_some());
}

fn load_with(
    o: &Overrides,
    env: &Env,
    system: &Path,
    purpose: Purpose,
) -> Result<Config, ConfigError> {
    let lookup = env.lookup();
    let host = Host {
        env: &lookup,
        euid: 1000,
        purpose,
    };
    load_from(o, &host, system)
}

#[test]
fn file_lookup_order() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, workers: usize| {
        let p = dir.path().join(name);
        fs::write(&p, format!("[monitor]\nworkers = {workers}\n")).unwrap();
        p
    };
    let flag = write("flag.toml", 1);
    let envf = write("env.toml", 2);
    let system = write("system.toml", 3);
    let env = Env::new(&[("CODI_CONFIG", envf.to_str().unwrap())]);
    let with_flag = Overrides {
        config: Some(flag.clone()),
        ..Overrides::default()
    };
    let none = Overrides::default();
    let c = load_with(&with_flag, &env, &system, Purpose::Daemon).unwrap();
    assert_eq!((c.monitor.workers, c.source), (1, Some(flag)));
    let c = load_with(&none, &env, &system, Purpose::Daemon).unwrap();
    assert_eq!((c.monitor.workers, c.source), (2, Some(envf)));
    let c = load_with(&none, &Env::new(&[]), &system, Purpose::Daemon).unwrap();
    assert_eq!((c.monitor.workers, c.source), (3, Some(system)));
    let missing = dir.path().join("missing.toml");
    let c = load_with(&none, &Env::new(&[]), &missing, Purpose::Daemon).unwrap();
    assert_eq!(c.source, None);
}

#[test]
fn unreadable_files() {
    let dir = tempfile::tempdir().unwrap();
    let none = Overrides::default();
    // A directory stands in for an unreadable system file.
    let e = load_with(&none, &Env::new(&[]), dir.path(), Purpose::Daemon).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }), "{e}");
    let c = load_with(&none, &Env::new(&[]), dir.path(), Purpose::Client).unwrap();
    assert_eq!(c.source, None);
    // A named file must exist, for codi2 too.
    let named = Overrides {
        config: Some(dir.path().join("nope.toml")),
        ..Overrides::default()
    };
    let e = load_with(&named, &Env::new(&[]), dir.path(), Purpose::Client).unwrap_err();
    assert!(e.to_string().starts_with("cannot read config file"), "{e}");
    let bad = dir.path().join("bad.toml");
    fs::write(&bad, "[monitor\n").unwrap();
    let named = Overrides {
        config: Some(bad.clone()),
        ..Overrides::default()
    };
    let e = load_with(&named, &Env::new(&[]), dir.path(), Purpose::Daemon).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("invalid config file {}", bad.display())),
        "{e}"
    );
}

#[test]
fn config_doc_shows_the_packaged_example() {
    let doc = include_str!("../../docs/CONFIG.md");
    assert!(doc.contains(include_str!("../../packaging/monitor.toml")));
}

#[test]
fn absurd_values_are_refused_with_their_bounds() {
    let o = Overrides::default();
    let env = Env::new(&[]);
    for (text, want) in [
        (
            "[storage]\nreader_threads = 1000000\n",
            "storage.reader_threads is 1000000 but must be at most 64",
        ),
        (
            "[storage]\nbatch_max_rows = 1000000000000\n",
            "storage.batch_max_rows is 1000000000000 but must be at most 1000000",
        ),
        (
            "[monitor]\nmax_connections = 1000000000\n",
            "monitor.max_connections is 1000000000 but must be at most 1000000",
        ),
        (
            "[monitor]\nscan_interval = \"1ns\"\n",
            "monitor.scan_interval is 1ns but must be between 1s and 1day",
        ),
        (
            "[monitor]\nauth_timeout = \"1h\"\n",
            "monitor.auth_timeout is 1h but must be between 100ms and 5m",
        ),
        (
            "[monitor]\nmax_watches_per_root = 0\n",
            "monitor.max_watches_per_root is 0 but must be at least 1",
        ),
        (
            "[storage]\nwal_mode = false\n",
            "storage.wal_mode = false is not supported",
        ),
    ] {
        let e = err(text, &o, &env);
        assert!(e.starts_with(want), "{text}: {e}");
    }
}

#[test]
fn keys_not_yet_in_effect_draw_warnings() {
    let c = plain("");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let c = plain(
        "[general]\nsession_timeout = \"1h\"\n[storage]\nretention_days = 30\n[server_hub]\nenabled = true\nurl = \"http://hub\"\n",
    );
    let all = c.warnings.join("\n");
    assert!(
        all.contains("general.session_timeout is set but not yet in effect"),
        "{all}"
    );
    assert!(
        all.contains("storage.retention_days is set but not yet in effect"),
        "{all}"
    );
    assert!(
        all.contains("server_hub.enabled is true but hub sync is not yet built"),
        "{all}"
    );
    assert!(
        c.to_toml().contains("# warning: storage.retention_days"),
        "{}",
        c.to_toml()
    );
}

#[test]
fn unix_slots_and_unauthenticated_quota_follow_the_listeners() {
    let env = Env::new(&[("CODI_MONITOR_TOKEN", "0123456789abcdef")]);
    let c = daemon("[monitor]\ntcp_port = 4000\n", &Overrides::default(), &env).unwrap();
    assert_eq!(
        c.monitor.reserved_unix_connections,
        DEFAULT_RESERVED_UNIX_CONNECTIONS
    );
    assert_eq!(c.monitor.max_unauthenticated, DEFAULT_MAX_UNAUTHENTICATED);
    let c = plain("");
    assert_eq!(c.monitor.reserved_unix_connections, 0);
    let e = err(
        "[monitor]\nmax_connections = 10\nreserved_unix_connections = 10\n",
        &Overrides::default(),
        &env,
    );
    assert!(e.contains("must be at most 9"), "{e}");
}
