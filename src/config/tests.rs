use super::resolve::{load_from, resolve, Host, Purpose};
use super::*;
use log::LevelFilter;
use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    assert_eq!(c.storage.max_db_size_mb, 0, "no cap unless set");
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
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
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
fn a_parse_error_names_the_line_and_key_but_never_quotes_the_value() {
    let o = Overrides::default();
    let env = Env::new(&[]);
    let secret = "s3cret-token-0123456789";
    let e = err(&format!("[monitor]\ntoken = \"{secret}\"\n"), &o, &env);
    assert!(
        e.contains("line 2, column 1 (`token = ...`)") && e.contains("unknown field `token`"),
        "{e}"
    );
    let e = err(&format!("[monitor]\ntoken_file = \"{secret}\n"), &o, &env);
    assert!(
        e.contains("line 2") && e.contains("`token_file = ...`"),
        "{e}"
    );
    for text in [
        format!("[monitor]\ntoken = \"{secret}\"\n"),
        format!("[monitor]\ntoken_file = \"{secret}\n"),
        format!("[monitor]\nrate_limit = [\n  \"{secret}\",\n]\n"),
    ] {
        let e = err(&text, &o, &env);
        assert!(!e.contains("s3cret"), "{e}");
    }
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
fn the_hub_keys_have_defaults_bounds_and_a_private_password_file() {
    use std::os::unix::fs::PermissionsExt;
    let c = plain("");
    let h = &c.server_hub;
    assert_eq!(h.database, DEFAULT_HUB_DATABASE);
    assert_eq!(
        [&h.tables.logs, &h.tables.sessions, &h.tables.exports],
        DEFAULT_HUB_TABLES
    );
    assert_eq!(h.batch_bytes, DEFAULT_SERVER_HUB_BATCH_BYTES);
    assert_eq!(
        (h.backoff_min, h.backoff_max),
        (DEFAULT_HUB_BACKOFF_MIN, DEFAULT_HUB_BACKOFF_MAX)
    );
    assert_eq!((&h.user, &h.password_file), (&None, &None));
    let machine_id = std::fs::read_to_string(MACHINE_ID_PATH).unwrap_or_default();
    if !machine_id.trim().is_empty() {
        assert_eq!(h.host_id, machine_id.trim());
    }
    assert!(!h.host_id.is_empty());

    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("hub-password");
    std::fs::write(&secret, "s3cret\n").unwrap();
    std::fs::set_permissions(&secret, PermissionsExt::from_mode(0o600)).unwrap();
    let text = format!(
        "[server_hub]\nenabled = true\nurl = \"http://127.0.0.1:8123\"\ndatabase = \"fleet\"\n\
         logs_table = \"logs_v2\"\nuser = \"codi\"\npassword_file = \"{}\"\nhost_id = \"web-1\"\n\
         batch_bytes = 1048576\nbackoff_min = \"2s\"\nbackoff_max = \"5m\"\n",
        secret.display()
    );
    let c = plain(&text);
    let h = &c.server_hub;
    assert_eq!(
        (h.database.as_str(), h.tables.logs.as_str()),
        ("fleet", "logs_v2")
    );
    assert_eq!(
        (h.user.as_deref(), h.host_id.as_str()),
        (Some("codi"), "web-1")
    );
    assert_eq!(h.password_file.as_deref(), Some(secret.as_path()));
    assert_eq!(h.batch_bytes, 1 << 20);
    assert_eq!(
        (h.backoff_min, h.backoff_max),
        (Duration::from_secs(2), Duration::from_secs(300))
    );
    assert!(!c.to_toml().contains("s3cret"), "the password never shows");

    let o = Overrides::default();
    let env = Env::new(&[]);
    let e = err(
        "[server_hub]\nlogs_table = \"logs; DROP TABLE x\"\n",
        &o,
        &env,
    );
    assert!(
        e.starts_with("server_hub.logs_table `logs; DROP TABLE x`"),
        "{e}"
    );
    for url in [
        "http://u:secret@hub:8123",
        "http://hub:8123/?password=secret",
        "https://h/#x",
    ] {
        let e = err(&format!("[server_hub]\nurl = \"{url}\"\n"), &o, &env);
        assert!(e.starts_with("server_hub.url must not hold"), "{e}");
        assert!(!e.contains("secret"), "{e}");
    }
    let e = err("[server_hub]\ndatabase = \"1st\"\n", &o, &env);
    assert!(e.starts_with("server_hub.database"), "{e}");
    let e = err(
        "[server_hub]\nbackoff_min = \"2m\"\nbackoff_max = \"1m\"\n",
        &o,
        &env,
    );
    assert!(e.contains("longer than server_hub.backoff_max"), "{e}");
    let e = err(
        &format!("[server_hub]\nhost_id = \"{}\"\n", "h".repeat(129)),
        &o,
        &env,
    );
    assert!(
        e.starts_with("server_hub.host_id must be at most 128"),
        "{e}"
    );
    std::fs::set_permissions(&secret, PermissionsExt::from_mode(0o644)).unwrap();
    let e = err(&text, &o, &env);
    assert!(e.contains("may be read by others (mode 644)"), "{e}");
    std::fs::write(&secret, "").unwrap();
    std::fs::set_permissions(&secret, PermissionsExt::from_mode(0o600)).unwrap();
    let e = err(&text, &o, &env);
    assert!(e.ends_with("is empty"), "{e}");
    // codi2 loads the same file without reading the daemon's password.
    std::fs::set_permissions(&secret, PermissionsExt::from_mode(0o644)).unwrap();
    let c = resolve_as(&text, &o, &env, Purpose::Client).unwrap();
    assert_eq!(
        c.server_hub.password_file.as_deref(),
        Some(secret.as_path())
    );
}

#[test]
fn a_password_file_is_read_only_when_private_regular_and_small() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pw");
    let mode = |m| std::fs::set_permissions(&file, PermissionsExt::from_mode(m)).unwrap();
    std::fs::write(&file, "s3cret\r\n").unwrap();
    mode(0o600);
    assert_eq!(read_password_file(&file).unwrap(), "s3cret");
    mode(0o640);
    let e = read_password_file(&file).unwrap_err().to_string();
    assert!(e.contains("may be read by others (mode 640)"), "{e}");
    assert!(!e.contains("s3cret"), "{e}");
    std::fs::write(&file, "x".repeat(4097)).unwrap();
    mode(0o600);
    let e = read_password_file(&file).unwrap_err().to_string();
    assert!(e.contains("longer than 4096 bytes"), "{e}");
    std::fs::write(&file, " \n").unwrap();
    assert!(read_password_file(&file)
        .unwrap_err()
        .to_string()
        .ends_with("is empty"));
    let e = read_password_file(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("not a regular file") || e.contains("may be read"),
        "{e}"
    );
    let e = read_password_file(&dir.path().join("none"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("No such file"), "{e}");
}

#[test]
fn a_hub_url_is_http_with_a_host_and_no_credentials() {
    for ok in ["http://127.0.0.1:8123", "https://hub.example/ch/"] {
        check_hub_url("--hub-url", ok).unwrap();
    }
    for (bad, why) in [
        ("ftp://x", "must start with http://"),
        ("hub:8123", "must start with http://"),
        ("http://", "names no host"),
        ("http://h\n/", "names no host"),
        ("http://a b/", "names no host"),
        ("http://u:pw@h/", "must not hold a user"),
        ("http://h/?user=x", "must not hold a user"),
    ] {
        let e = check_hub_url("--hub-url", bad).unwrap_err().to_string();
        assert!(e.starts_with("--hub-url") && e.contains(why), "{bad}: {e}");
        assert!(!e.contains("pw@"), "{e}");
    }
}

#[test]
fn the_hub_kind_and_ca_file_are_checked_and_an_https_url_is_fine() {
    use std::os::unix::fs::PermissionsExt;
    let o = Overrides::default();
    let env = Env::new(&[]);
    let c = plain("");
    assert_eq!(
        (c.server_hub.kind, &c.server_hub.ca_file),
        (HubKind::ClickHouse, &None)
    );
    let base = "[server_hub]\nenabled = true\nhost_id = \"web-1\"\n";

    let c = plain(&format!(
        "{base}kind = \"ndjson\"\nurl = \"https://logs.example:8443/ingest\"\n"
    ));
    assert_eq!(c.server_hub.kind, HubKind::Ndjson);
    assert_eq!(
        c.server_hub.url.as_deref(),
        Some("https://logs.example:8443/ingest")
    );
    assert!(c.to_toml().contains("kind = \"ndjson\""));
    assert_eq!(c.server_hub.content_type, "application/x-ndjson");
    let c = plain(&format!(
        "{base}kind = \"ndjson\"\nurl = \"http://h\"\ncontent_type = \"application/json\"\n"
    ));
    assert_eq!(c.server_hub.content_type, "application/json");
    let e = err(
        &format!("{base}url = \"http://h\"\ncontent_type = \"text/plain\"\n"),
        &o,
        &env,
    );
    assert!(
        e.starts_with("server_hub.content_type `text/plain` must be"),
        "{e}"
    );
    let e = err(
        &format!("{base}kind = \"kafka\"\nurl = \"http://h\"\n"),
        &o,
        &env,
    );
    assert_eq!(
        e,
        "server_hub.kind `kafka` must be \"clickhouse\" or \"ndjson\""
    );
    let e = err(
        "[server_hub]\nenabled = true\nkind = \"ndjson\"\nurl = \"http://h\"\nhost_id = \"wéb\"\n",
        &o,
        &env,
    );
    assert!(
        e.starts_with("server_hub.host_id must be printable ASCII"),
        "{e}"
    );
    // Credentials or a query stay refused in an https URL too.
    let e = err(
        &format!("{base}url = \"https://u:secret@hub/\"\n"),
        &o,
        &env,
    );
    assert!(e.starts_with("server_hub.url must not hold"), "{e}");
    let e = err(&format!("{base}url = \"https://hub/?a=b\"\n"), &o, &env);
    assert!(e.starts_with("server_hub.url must not hold"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["hub.test".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, cert.pem()).unwrap();
    std::fs::set_permissions(&ca, PermissionsExt::from_mode(0o644)).unwrap();
    let with_ca = |url: &str, file: &Path| {
        format!("{base}url = \"{url}\"\nca_file = \"{}\"\n", file.display())
    };
    let c = plain(&with_ca("https://hub.test:8443", &ca));
    assert_eq!(c.server_hub.ca_file.as_deref(), Some(ca.as_path()));
    assert!(c.warnings.is_empty() || !c.warnings.iter().any(|w| w.contains("ca_file")));
    let c = plain(&with_ca("http://hub.test:8123", &ca));
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("ca_file") && w.contains("not used")),
        "{:?}",
        c.warnings
    );

    let missing = dir.path().join("nope.pem");
    let e = err(&with_ca("https://h", &missing), &o, &env);
    assert!(
        e.starts_with(&format!("server_hub.ca_file `{}`: ", missing.display())),
        "{e}"
    );
    let key_only = dir.path().join("key.pem");
    std::fs::write(&key_only, key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key_only, PermissionsExt::from_mode(0o600)).unwrap();
    let e = err(&with_ca("https://h", &key_only), &o, &env);
    assert!(
        e.starts_with("server_hub.ca_file `") && e.contains("holds no PEM certificate"),
        "{e}"
    );
    std::fs::set_permissions(&ca, PermissionsExt::from_mode(0o646)).unwrap();
    let e = err(&with_ca("https://h", &ca), &o, &env);
    assert!(e.contains("may be written by others (mode 646)"), "{e}");
    // Not looked at while the sync is off, as with password_file.
    let off = format!("[server_hub]\nca_file = \"{}\"\n", missing.display());
    assert_eq!(
        plain(&off).server_hub.ca_file.as_deref(),
        Some(missing.as_path())
    );
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

/// Regression (property `plausible_documents_round_trip`): `codi2` with a
/// token file it cannot use (empty or unreadable) fell back to a blank
/// `$CODI_MONITOR_TOKEN` and resolved the empty token, which it would then
/// offer to the daemon.
#[test]
fn client_never_falls_back_to_a_blank_environment_token() {
    let (_dir, path) = token_file(" \n", 0o600);
    let flags = Overrides {
        token_file: Some(path),
        ..Overrides::default()
    };
    let env = Env::new(&[("CODI_MONITOR_TOKEN", "   ")]);
    let c = resolve_as("", &flags, &env, Purpose::Client).unwrap();
    assert_eq!(c.monitor.token, None);
    // Without the flag, a blank variable is refused as it always was.
    let text = "[monitor]\ntoken_file = \"/nonexistent/token\"\n";
    let e = resolve_as(text, &Overrides::default(), &env, Purpose::Client).unwrap_err();
    assert!(e.to_string().contains("is set but blank"), "{e}");
    // A usable environment token is still the fallback.
    let env = Env::new(&[("CODI_MONITOR_TOKEN", " from-env ")]);
    let c = resolve_as(text, &Overrides::default(), &env, Purpose::Client).unwrap();
    assert_eq!(c.monitor.token.as_deref(), Some("from-env"));
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
fn the_admin_endpoint_is_on_at_loopback_by_default() {
    let c = plain("");
    assert_eq!(c.admin.listen_on(), Some(DEFAULT_ADMIN_LISTEN));
    assert!(!c.admin.allow_remote);
    assert_eq!(c.health.disk_min_free_mb, DEFAULT_DISK_MIN_FREE_MB);
    assert_eq!(
        c.health.disk_min_free_percent,
        DEFAULT_DISK_MIN_FREE_PERCENT
    );
    assert_eq!(c.health.failing_for, DEFAULT_FAILING_FOR);
    let c = plain("[admin]\nenabled = false\n");
    assert_eq!(c.admin.listen_on(), None);
    let c = plain("[admin]\nlisten = \"[::1]:9100\"\n[health]\nfailing_for = \"2m\"\n");
    assert_eq!(c.admin.listen_on(), tcp("[::1]:9100"));
    assert_eq!(c.health.failing_for, Duration::from_secs(120));
}

#[test]
fn the_admin_endpoint_goes_beyond_loopback_only_when_asked() {
    let env = Env::new(&[]);
    let o = Overrides::default();
    let e = err("[admin]\nlisten = \"0.0.0.0:9848\"\n", &o, &env);
    assert!(
        e.contains("admin.listen 0.0.0.0:9848 is beyond loopback") && e.contains("allow_remote"),
        "{e}"
    );
    let c = plain("[admin]\nlisten = \"0.0.0.0:9848\"\nallow_remote = true\n");
    assert_eq!(c.admin.listen_on(), tcp("0.0.0.0:9848"));
    assert!(c
        .warnings
        .iter()
        .any(|w| w.contains("without authentication")));
    // Off, the address does not matter.
    plain("[admin]\nenabled = false\nlisten = \"0.0.0.0:9848\"\n");
    // codi2 never listens.
    let c = resolve_as(
        "[admin]\nlisten = \"0.0.0.0:1\"\n",
        &o,
        &env,
        Purpose::Client,
    )
    .unwrap();
    assert!(c.warnings.is_empty());
    let flag = Overrides {
        admin: Some("10.0.0.1:9848".into()),
        ..Overrides::default()
    };
    assert!(err("", &flag, &env).starts_with("--admin 10.0.0.1:9848 is beyond loopback"));
}

#[test]
fn the_admin_flag_picks_a_port_or_turns_it_off() {
    let env = Env::new(&[]);
    let ephemeral = Overrides {
        admin: Some("127.0.0.1:0".into()),
        ..Overrides::default()
    };
    let c = daemon("[admin]\nenabled = false\n", &ephemeral, &env).unwrap();
    assert_eq!(c.admin.listen_on(), tcp("127.0.0.1:0"));
    let off = Overrides {
        admin: Some(String::new()),
        ..Overrides::default()
    };
    assert_eq!(daemon("", &off, &env).unwrap().admin.listen_on(), None);
    let bad = Overrides {
        admin: Some("nine".into()),
        ..Overrides::default()
    };
    assert!(err("", &bad, &env).starts_with("--admin `nine` is not an address"));
    for (text, want) in [
        ("[admin]\nlisten = \"127.0.0.1:0\"\n", "has port 0"),
        ("[admin]\nlisten = \"localhost\"\n", "is not an address"),
        (
            "[health]\ndisk_min_free_percent = 51\n",
            "must be at most 50",
        ),
        ("[health]\nfailing_for = \"0s\"\n", "longer than zero"),
        ("[health]\nfailing_for = \"2d\"\n", "between 1s and 1day"),
        ("[admin]\nport = 1\n", "unknown field"),
    ] {
        let e = err(text, &Overrides::default(), &env);
        assert!(e.contains(want), "{text}: {e}");
    }
}

#[test]
fn packaged_example_parses() {
    let text = include_str!("../../packaging/monitor.toml");
    let c = daemon(text, &Overrides::default(), &Env::new(&[])).unwrap();
    // The package's daemon runs as coditect, not root, so the file names
    // the system paths itself, and every codi2 that reads it trusts
    // coditect's socket, which members of codi may use.
    assert_eq!(
        c.monitor.unix_socket_path.as_deref(),
        Some(Path::new("/run/codi/monitor.sock"))
    );
    assert_eq!(c.storage.sqlite_path, Path::new("/var/lib/codi/codi.db"));
    assert_eq!(c.monitor.socket_group.as_deref(), Some("codi"));
    assert_eq!(c.monitor.service_user.as_deref(), Some("coditect"));
    assert_eq!(c.monitor.tcp_listen, None);
}

#[test]
fn container_config_listens_on_tcp_everywhere_and_needs_its_token() {
    // As packaging/Dockerfile runs it: its environment, and the token that
    // packaging/docker/entrypoint supplies.
    let text = include_str!("../../packaging/docker/monitor.toml");
    let image_env = [("CODI_MONITOR_MODE", "tcp"), ("CODI_MONITOR_PORT", "9847")];
    let mut with_token = image_env.to_vec();
    with_token.push(("CODI_MONITOR_TOKEN", "a-token-of-32-bytes-for-the-test"));
    let c = daemon(text, &Overrides::default(), &Env::new(&with_token)).unwrap();
    assert_eq!(c.monitor.tcp_listen, tcp("0.0.0.0:9847"));
    assert_eq!(c.monitor.unix_socket_path, None);
    assert_eq!(c.storage.sqlite_path, Path::new("/var/lib/codi/codi.db"));
    let e = err(text, &Overrides::default(), &Env::new(&image_env));
    assert!(e.contains("beyond loopback"), "{e}");
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
fn an_enabled_hub_is_in_effect_and_draws_no_warning() {
    let c = plain("");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let c = plain("[server_hub]\nenabled = true\nurl = \"http://hub\"\n");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    assert!(!c.to_toml().contains("# warning:"), "{}", c.to_toml());
}

#[test]
fn retention_and_session_timeout_are_in_effect_and_draw_no_warning() {
    let c = plain("[general]\nsession_timeout = \"1h\"\n[storage]\nretention_days = 30\n");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    assert_eq!(c.general.session_timeout, Duration::from_secs(3600));
    assert_eq!(c.storage.retention_days, 30);
}

#[test]
fn the_size_cap_is_in_mib_and_bounded() {
    let c = plain("[storage]\nmax_db_size_mb = 10240\n");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    assert_eq!(c.storage.max_db_size_mb, 10_240);
    assert!(c.to_toml().contains("max_db_size_mb = 10240"));
    let env = Env::new(&[]);
    let e = err(
        "[storage]\nmax_db_size_mb = 16777217\n",
        &Overrides::default(),
        &env,
    );
    assert!(
        e.contains("storage.max_db_size_mb is 16777217 but must be at most 16777216"),
        "{e}"
    );
    let e = err(
        "[storage]\nmax_db_size_mb = \"10GiB\"\n",
        &Overrides::default(),
        &env,
    );
    assert!(e.contains("max_db_size_mb"), "{e}");
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

/// Property tests: no text makes parsing or resolution panic, and every
/// configuration accepted comes back unchanged from its own `to_toml()`.
mod properties {
    use super::*;
    use crate::testing::proptest_config;
    use proptest::prelude::*;

    /// A TOML value as text: the right type and bounds for some key, the
    /// wrong type for others, numbers at and beyond every bound.
    fn number() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => prop::sample::select(vec![
                0i64, 1, -1, 2, 9, 10, 64, 65, 100, 256, 257, 4096, 4097, 9847, 36_500, 36_501,
                65_535, 65_536, 65_537, 100_000, 100_001, 1_000_000, 1_000_001, 1_048_575,
                1_048_576, 4 << 30, (4 << 30) + 1, u32::MAX as i64, u32::MAX as i64 + 1,
                i64::MAX, i64::MIN,
            ])
            .prop_map(|n| n.to_string()),
            1 => any::<i64>().prop_map(|n| n.to_string()),
            1 => prop::sample::select(vec!["1.5", "nan", "inf", "-0.0", "1e3", "0x10", "1_000", "+5"])
                .prop_map(str::to_owned),
        ]
    }

    fn duration() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => prop::sample::select(vec![
                "0s", "1ns", "99ms", "100ms", "100ms 1ns", "1s", "59s", "1m", "5m", "5m 1ns",
                "90m", "24h", "1day", "1days 1ns", "30days", "30days 1s", "365d", "366d", "1y",
                "1year", "2years", "1M", "18446744073709551615s", "18446744073709551616s",
                "99999999999999999999999h", "1s 1s", "1 s", "-1s", "1.5h", "", " ", "abc", "1",
            ])
            .prop_map(str::to_owned),
            1 => (1..100_000u64, prop::sample::select(vec!["ns", "us", "ms", "s", "m", "h", "d", "w", "months", "y"]))
                .prop_map(|(n, u)| format!("{n}{u}")),
            1 => "[0-9a-z .]{0,12}",
        ]
        .prop_map(|s| toml_string(&s))
    }

    fn toml_string(s: &str) -> String {
        toml::Value::String(s.to_owned()).to_string()
    }

    fn string() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => prop::sample::select(vec![
                "", "/tmp/codi.db", "/run/codi/m.sock", "relative/path", "/", "off", "error",
                "WARN", "Info", "debug", "trace", "verbose", "copy", "move", "Copy", "http://hub",
                "https://hub:8443/x", "ftp://hub", "http://", "127.0.0.1:9847", "0.0.0.0:9000",
                "[::1]:80", "[::]:1", "127.0.0.1:0", "localhost:80", "1.2.3.4", "[fe80::1%2]:80",
                "300.0.0.1:1", "root", "0", "codi", "*.md", "[", "**", "{a,b}",
                "日本語", "\u{0}", "a\nb",
            ])
            .prop_map(str::to_owned),
            1 => any::<String>(),
            1 => "/[a-z]{1,8}/[a-z]{100,130}",
        ]
        .prop_map(|s| toml_string(&s))
    }

    fn boolean() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["true", "false"]).prop_map(str::to_owned)
    }

    fn array() -> impl Strategy<Value = String> {
        prop::collection::vec(string(), 0..4).prop_map(|items| format!("[{}]", items.join(", ")))
    }

    #[derive(Debug, Clone, Copy)]
    enum Kind {
        Number,
        Duration,
        Str,
        Bool,
        Array,
    }

    /// Every key of the file, by section, with the type it expects.
    const KEYS: &[(&str, &[(&str, Kind)])] = &[
        (
            "general",
            &[
                ("workspace", Kind::Str),
                ("log_level", Kind::Str),
                ("session_timeout", Kind::Duration),
            ],
        ),
        (
            "storage",
            &[
                ("sqlite_path", Kind::Str),
                ("wal_mode", Kind::Bool),
                ("cache_size_mb", Kind::Number),
                ("retention_days", Kind::Number),
                ("max_db_size_mb", Kind::Number),
                ("reader_threads", Kind::Number),
                ("batch_max_rows", Kind::Number),
                ("commit_delay_us", Kind::Number),
                ("inflight_bytes", Kind::Number),
            ],
        ),
        (
            "monitor",
            &[
                ("unix_socket_path", Kind::Str),
                ("socket_group", Kind::Str),
                ("tcp_port", Kind::Number),
                ("tcp_address", Kind::Str),
                ("workers", Kind::Number),
                ("token_file", Kind::Str),
                ("rate_limit", Kind::Number),
                ("rate_burst", Kind::Number),
                ("max_connections", Kind::Number),
                ("max_pending_per_connection", Kind::Number),
                ("file_batch_size", Kind::Number),
                ("export_patterns", Kind::Array),
                ("scan_interval", Kind::Duration),
                ("archive_mode", Kind::Str),
                ("allow_unauthenticated_tcp", Kind::Bool),
                ("auth_timeout", Kind::Duration),
                ("max_unauthenticated", Kind::Number),
                ("reserved_unix_connections", Kind::Number),
                ("idle_timeout", Kind::Duration),
                ("service_user", Kind::Str),
                ("query_all_users", Kind::Array),
                ("query_all_groups", Kind::Array),
                ("max_watches_per_root", Kind::Number),
            ],
        ),
        (
            "server_hub",
            &[
                ("enabled", Kind::Bool),
                ("url", Kind::Str),
                ("batch_size", Kind::Number),
                ("sync_interval", Kind::Duration),
                ("batch_bytes", Kind::Number),
                ("database", Kind::Str),
                ("logs_table", Kind::Str),
                ("sessions_table", Kind::Str),
                ("exports_table", Kind::Str),
                ("user", Kind::Str),
                ("password_file", Kind::Str),
                ("host_id", Kind::Str),
                ("backoff_min", Kind::Duration),
                ("backoff_max", Kind::Duration),
                ("kind", Kind::Str),
                ("ca_file", Kind::Str),
                ("content_type", Kind::Str),
            ],
        ),
        (
            "admin",
            &[
                ("enabled", Kind::Bool),
                ("listen", Kind::Str),
                ("allow_remote", Kind::Bool),
            ],
        ),
        (
            "health",
            &[
                ("disk_min_free_mb", Kind::Number),
                ("disk_min_free_percent", Kind::Number),
                ("failing_for", Kind::Duration),
            ],
        ),
    ];

    #[test]
    fn every_key_is_documented() {
        let doc = include_str!("../../docs/CONFIG.md");
        for (section, keys) in KEYS {
            let heading = format!("### `[{section}]`");
            let start = doc
                .find(&heading)
                .unwrap_or_else(|| panic!("docs/CONFIG.md has no {heading}"));
            let body = &doc[start + heading.len()..];
            let table = &body[..body.find("\n### ").unwrap_or(body.len())];
            for (key, _) in keys.iter() {
                assert!(
                    table.contains(&format!("| `{key}` |")),
                    "{section}.{key} is not in the table under {heading}"
                );
            }
        }
    }

    fn value_of(kind: Kind) -> BoxedStrategy<String> {
        match kind {
            Kind::Number => number().boxed(),
            Kind::Duration => duration().boxed(),
            Kind::Str => string().boxed(),
            Kind::Bool => boolean().boxed(),
            Kind::Array => array().boxed(),
        }
    }

    /// A value for `kind`, usually of its type, sometimes of another.
    fn value_for(kind: Kind) -> impl Strategy<Value = String> {
        let any_kind = prop::sample::select(vec![
            Kind::Number,
            Kind::Duration,
            Kind::Str,
            Kind::Bool,
            Kind::Array,
        ])
        .prop_flat_map(value_of);
        prop_oneof![9 => value_of(kind), 1 => any_kind]
    }

    /// A TOML document of known sections and keys with random values, now
    /// and then an unknown key or a section twice.
    fn document() -> impl Strategy<Value = String> {
        let sections: Vec<BoxedStrategy<String>> = KEYS
            .iter()
            .map(|&(section, keys)| {
                let lines: Vec<BoxedStrategy<Option<String>>> = keys
                    .iter()
                    .map(|&(key, kind)| {
                        prop::option::weighted(
                            0.3,
                            value_for(kind).prop_map(move |v| format!("{key} = {v}\n")),
                        )
                        .boxed()
                    })
                    .collect();
                (
                    lines,
                    prop::option::weighted(0.03, "[a-z_]{1,10}"),
                    prop::option::weighted(0.8, Just(())),
                )
                    .prop_map(move |(lines, unknown, present)| {
                        if present.is_none() {
                            return String::new();
                        }
                        let mut out = format!("[{section}]\n");
                        out.extend(lines.into_iter().flatten());
                        if let Some(k) = unknown {
                            out.push_str(&format!("{k} = 1\n"));
                        }
                        out
                    })
                    .boxed()
            })
            .collect();
        (
            sections,
            prop::option::weighted(0.02, Just(())),
            any::<u64>(),
        )
            .prop_map(|(parts, dup, rot)| {
                let n = parts.len();
                let mut doc: String = (0..n)
                    .map(|i| parts[(i + rot as usize) % n].as_str())
                    .collect();
                if dup.is_some() {
                    doc.push_str(&parts[0]);
                }
                doc
            })
    }

    /// An integer in `lo..=hi`, often at a bound.
    fn int(lo: u64, hi: u64) -> BoxedStrategy<String> {
        prop_oneof![Just(lo), Just(hi), lo..=hi]
            .prop_map(|n| n.to_string())
            .boxed()
    }

    /// A duration in `lo..=hi` seconds, written in one of several forms
    /// humantime reads.
    fn secs(lo: u64, hi: u64) -> BoxedStrategy<String> {
        (prop_oneof![Just(lo), Just(hi), lo..=hi], 0..4u8, 0..1000u32)
            .prop_map(|(s, form, ms)| {
                let text = match form {
                    0 => format!("{s}s"),
                    1 if s > 0 && ms > 0 => format!("{}s {ms}ms", s - 1),
                    2 if s % 60 == 0 => format!("{}m", s / 60),
                    3 => humantime::format_duration(Duration::from_secs(s)).to_string(),
                    _ => format!("{s} seconds"),
                };
                toml_string(&text)
            })
            .boxed()
    }

    fn one_of(values: &[&'static str]) -> BoxedStrategy<String> {
        prop::sample::select(values.to_vec())
            .prop_map(toml_string)
            .boxed()
    }

    /// Token files the documents may name: private, readable by others,
    /// empty, missing.
    fn token_files() -> &'static [String; 4] {
        static FILES: std::sync::OnceLock<(tempfile::TempDir, [String; 4])> =
            std::sync::OnceLock::new();
        &FILES
            .get_or_init(|| {
                let dir = tempfile::tempdir().unwrap();
                let write = |name: &str, content: &str, mode: u32| {
                    let p = dir.path().join(name);
                    fs::write(&p, content).unwrap();
                    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
                    p.display().to_string()
                };
                let files = [
                    write("ok", "  0123456789abcdef-file\n", 0o600),
                    write("open", "0123456789abcdef-open", 0o644),
                    write("empty", " \n", 0o600),
                    dir.path().join("missing").display().to_string(),
                ];
                (dir, files)
            })
            .1
    }

    /// A plausible value for `key`: in range, at its bounds, with now and
    /// then (one in twenty) a hostile value instead.
    fn plausible(key: &'static str, kind: Kind) -> BoxedStrategy<String> {
        let good = match key {
            "log_level" => one_of(&[
                "off", "error", "warn", "info", "debug", "trace", "WARN", "Info",
            ]),
            "session_timeout" => secs(60, 365 * 86_400),
            "sqlite_path" => one_of(&["/tmp/codi.db", "rel.db", "/data/日本.db"]),
            "wal_mode" => Just("true".to_owned()).boxed(),
            "cache_size_mb" => int(1, 4096),
            "retention_days" => int(0, 36_500),
            "max_db_size_mb" => int(0, MAX_DB_SIZE_MB),
            "reader_threads" => int(1, 64),
            "batch_max_rows" => int(1, 1_000_000),
            "commit_delay_us" => int(0, 10_000),
            "inflight_bytes" => int(1 << 20, 4 << 30),
            "unix_socket_path" => one_of(&["", "/run/codi/m.sock", "rel.sock"]),
            "tcp_port" => int(1, 65_535),
            "tcp_address" => (
                prop::sample::select(vec![
                    "127.0.0.1",
                    "[::1]",
                    "0.0.0.0",
                    "[fe80::1%2]",
                    "10.1.2.3",
                ]),
                1..=65_535u32,
            )
                .prop_map(|(h, p)| toml_string(&format!("{h}:{p}")))
                .boxed(),
            "workers" => int(0, MAX_WORKERS as u64),
            "token_file" => prop::sample::select(token_files().to_vec())
                .prop_map(|p| toml_string(&p))
                .boxed(),
            "rate_limit" | "rate_burst" => int(0, u32::MAX as u64),
            "max_connections" => prop_oneof![int(1, 130), int(1, 1_000_000)].boxed(),
            "max_pending_per_connection" => int(1, 65_536),
            "file_batch_size" => int(1, 100_000),
            "export_patterns" => prop::collection::vec(
                prop::sample::select(vec![
                    "*.md",
                    "**/*.json",
                    "notes-?.txt",
                    "{a,b}.md",
                    "日本*",
                ]),
                0..3,
            )
            .prop_map(|v| {
                let items: Vec<String> = v.into_iter().map(toml_string).collect();
                format!("[{}]", items.join(", "))
            })
            .boxed(),
            "scan_interval" => secs(1, 86_400),
            "archive_mode" => one_of(&["copy", "move"]),
            "auth_timeout" => prop_oneof![
                secs(1, 300),
                one_of(&["100ms", "250ms", "4m 59s 999ms 999us 1ns"])
            ]
            .boxed(),
            "max_unauthenticated" | "reserved_unix_connections" => int(0, 200),
            "idle_timeout" => secs(1, 30 * 86_400),
            "max_watches_per_root" => int(1, 1_000_000),
            "url" => one_of(&["http://hub", "https://hub:8443/sync", ""]),
            "batch_size" => int(1, 1_000_000),
            "sync_interval" => prop_oneof![secs(1, 86_400), one_of(&["100ms", "1s 1ns"])].boxed(),
            "batch_bytes" => int(64 << 10, 256 << 20),
            "database" | "logs_table" | "sessions_table" | "exports_table" => {
                one_of(&["codi", "logs_v2", "_x", ""])
            }
            "user" => one_of(&["codi", "default", ""]),
            "password_file" => one_of(&[""]),
            "host_id" => one_of(&["host-1", "3d1219c7c4c5404aaa1f6d2a48adfda4", ""]),
            "backoff_min" => prop_oneof![secs(1, 3600), one_of(&["100ms"])].boxed(),
            "backoff_max" => secs(3600, 86_400),
            "listen" => one_of(&["127.0.0.1:9848", "[::1]:1", "0.0.0.0:9848", "127.0.0.1:0"]),
            "disk_min_free_mb" => int(0, 1 << 30),
            "disk_min_free_percent" => int(0, 50),
            "failing_for" => secs(1, 86_400),
            _ => value_of(kind),
        };
        prop_oneof![19 => good, 1 => value_for(kind)].boxed()
    }

    /// A document of a few known keys with plausible values, which the
    /// daemon accepts often enough for the round trip to be tested.
    fn plausible_document() -> impl Strategy<Value = String> {
        let lines: Vec<BoxedStrategy<Option<(&'static str, String)>>> = KEYS
            .iter()
            .flat_map(|&(section, keys)| keys.iter().map(move |&(key, kind)| (section, key, kind)))
            .map(|(section, key, kind)| {
                prop::option::weighted(0.15, plausible(key, kind))
                    .prop_map(move |v| v.map(|v| (section, format!("{key} = {v}\n"))))
                    .boxed()
            })
            .collect();
        lines.prop_map(|lines| {
            let mut doc = String::new();
            for &(section, _) in KEYS {
                let mine: String = lines
                    .iter()
                    .flatten()
                    .filter(|(s, _)| *s == section)
                    .map(|(_, l)| l.as_str())
                    .collect();
                if !mine.is_empty() {
                    doc.push_str(&format!("[{section}]\n{mine}"));
                }
            }
            doc
        })
    }

    /// An environment: the listeners' variables set, unset or odd.
    fn environment() -> impl Strategy<Value = Vec<(&'static str, String)>> {
        let pick = |key: &'static str, values: Vec<&'static str>| {
            prop::option::weighted(0.25, prop::sample::select(values))
                .prop_map(move |v| v.map(|v| (key, v.to_owned())))
        };
        (
            pick(
                "CODI_MONITOR_MODE",
                vec!["unix", "tcp", "both", "TCP", "bogus", ""],
            ),
            pick(
                "CODI_MONITOR_PORT",
                vec!["0", "1", "9000", "65535", "65536", "x", ""],
            ),
            pick(
                "CODI_MONITOR_TOKEN",
                vec![
                    "0123456789abcdef",
                    "  0123456789abcdef-padded  ",
                    "short",
                    "   ",
                    "",
                ],
            ),
            pick("CODI_DB", vec!["/tmp/env.db", "", "relative.db"]),
        )
            .prop_map(|(a, b, c, d)| [a, b, c, d].into_iter().flatten().collect())
    }

    /// Command-line flags. `--tcp` with port 0 is left out: an ephemeral
    /// port has no file form (a file's port 0 is refused on purpose, even
    /// under a `--tcp` that would replace it).
    fn overrides() -> impl Strategy<Value = Overrides> {
        let some = |p: f64, values: Vec<&'static str>| {
            prop::option::weighted(p, prop::sample::select(values).prop_map(str::to_owned))
        };
        (
            some(0.2, vec!["", "/o/m.sock", "rel.sock"]),
            some(
                0.2,
                vec!["127.0.0.1:4000", "[::1]:9", "0.0.0.0:7000", "bogus"],
            ),
            some(0.2, vec!["/o/codi.db", ""]),
            prop::option::weighted(0.2, 0..300usize),
            some(0.2, vec!["debug", "OFF", "loud"]),
            prop::option::weighted(0.1, prop::sample::select(token_files().to_vec())),
        )
            .prop_map(
                |(socket, tcp, db, workers, log_level, token_file)| Overrides {
                    socket: socket.map(PathBuf::from),
                    tcp,
                    db: db.map(PathBuf::from),
                    workers,
                    log_level,
                    token_file: token_file.map(PathBuf::from),
                    ..Overrides::default()
                },
            )
    }

    fn purpose() -> impl Strategy<Value = Purpose> {
        prop::sample::select(vec![Purpose::Daemon, Purpose::Client])
    }

    /// `c` written by `to_toml()` and read back as the same purpose with the
    /// same environment and flags is `c` again, with the same warnings
    /// except for the setting a warning names: a listener that came from
    /// `tcp_port` or `$CODI_MONITOR_MODE` is written as `tcp_address`, and
    /// its warning then says so.
    fn check_round_trip(
        c: &Config,
        flags: &Overrides,
        env: &Env,
        purpose: Purpose,
    ) -> Result<(), TestCaseError> {
        let out = c.to_toml();
        if let Some(token) = &c.monitor.token {
            prop_assert!(!token.is_empty(), "an empty token was resolved");
            prop_assert!(!out.contains(token.as_str()), "the token leaked:\n{}", out);
        }
        let again = match resolve_as(&out, flags, env, purpose) {
            Ok(again) => again,
            Err(e) => {
                return Err(TestCaseError::fail(format!(
                    "to_toml() gave text that is refused: {e}\n{out}"
                )))
            }
        };
        let origin_free = |w: &String| {
            let cut = w.find(" listens without a token").unwrap_or(0);
            w[cut..].to_owned()
        };
        let warnings = |c: &Config| c.warnings.iter().map(origin_free).collect::<Vec<_>>();
        prop_assert_eq!(warnings(&again), warnings(c), "to_toml() gave:\n{}", out);
        let settings = |c: &Config| Config {
            warnings: Vec::new(),
            ..c.clone()
        };
        prop_assert_eq!(settings(&again), settings(c), "to_toml() gave:\n{}", out);
        Ok(())
    }

    proptest! {
        #![proptest_config(proptest_config(256))]

        #[test]
        fn arbitrary_text_never_panics(text in prop_oneof![any::<String>(), "[\\[\\]a-z_=\" \n0-9.#{}]{0,80}"], purpose in purpose()) {
            let _ = resolve_as(&text, &Overrides::default(), &Env::new(&[]), purpose);
        }

        #[test]
        fn hostile_documents_never_panic_and_round_trip(
            doc in document(),
            env in environment(),
            purpose in purpose(),
        ) {
            let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let env = Env::new(&pairs);
            if let Ok(c) = resolve_as(&doc, &Overrides::default(), &env, purpose) {
                check_round_trip(&c, &Overrides::default(), &env, purpose)?;
            }
        }

        #[test]
        fn plausible_documents_round_trip(
            doc in plausible_document(),
            env in environment(),
            flags in overrides(),
            purpose in purpose(),
        ) {
            // The environment still beats the file and the flags beat both,
            // so the file is read back under the same ones.
            let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let env = Env::new(&pairs);
            if let Ok(c) = resolve_as(&doc, &flags, &env, purpose) {
                check_round_trip(&c, &flags, &env, purpose)?;
            }
        }
    }
}
