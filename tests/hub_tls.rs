//! Hub sync over TLS to a generic NDJSON receiver (`server_hub.kind =
//! "ndjson"`): the real daemon POSTs its batches over HTTPS to a small
//! receiver written here (rustls over `std::net` threads, its certificate
//! signed by a CA generated in the test with rcgen), which records every
//! request.
//!
//! - With `ca_file` naming the test CA, every log arrives exactly once, with
//!   the `X-Codi-*` headers, basic auth and the URL's path.
//! - Without it (the built-in web roots, which do not hold the test CA) the
//!   handshake is refused, nothing is shipped, and `/health` says the hub is
//!   degraded because of the certificate.
//! - A receiver that answers 500, 307 (a redirect is not followed, and is
//!   no acknowledgement) or 503 gets the same bytes (and batch name) again,
//!   and the next batch only after a 2xx.

#[allow(dead_code)]
mod common;

use base64::Engine;
use codi_monitor::proto::{LogLevel, Message, Payload};
use common::*;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Most bytes of one request the receiver takes.
const MAX_REQUEST: usize = 64 << 20;

/// A test CA and a server certificate it signed for 127.0.0.1.
struct Pki {
    ca_pem: String,
    chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
}

impl Pki {
    fn new() -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "codi-monitor test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);

        let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        leaf.distinguished_name
            .push(DnType::CommonName, "test receiver");
        leaf.use_authority_key_identifier_extension = true;
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_key = KeyPair::generate().unwrap();
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
        Pki {
            ca_pem: ca_cert.pem(),
            chain: vec![leaf_cert.der().clone(), ca_cert.der().clone()],
            key_der: leaf_key.serialize_der(),
        }
    }

    /// Writes the CA certificate where `ca_file` can name it.
    fn write_ca(&self, dir: &Path) -> PathBuf {
        let path = dir.join("hub-ca.pem");
        std::fs::write(&path, &self.ca_pem).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        path
    }
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Request {
    method: String,
    path: String,
    /// Header names in lower case.
    headers: HashMap<String, String>,
    body: Vec<u8>,
    /// The status the receiver answered.
    status: u16,
}

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<Request>>,
    /// Statuses to answer, in order; 200 once they are used up.
    script: Mutex<VecDeque<u16>>,
    /// Batches for this `X-Codi-Table` are answered 500, whatever the
    /// script says.
    refuse_table: Mutex<Option<String>>,
    handshake_failures: AtomicUsize,
    stop: AtomicBool,
}

/// The HTTPS receiver: records each request and answers it.
struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Receiver {
    fn start(pki: &Pki, script: &[u16]) -> Receiver {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key_der.clone()));
        let config = Arc::new(
            rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(pki.chain.clone(), key)
                .unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        shared.script.lock().unwrap().extend(script);
        let s = Arc::clone(&shared);
        let accept = std::thread::spawn(move || {
            for tcp in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(tcp) = tcp else { continue };
                let (s, config) = (Arc::clone(&s), Arc::clone(&config));
                std::thread::spawn(move || serve(tcp, config, &s));
            }
        });
        Receiver {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    fn requests(&self) -> Vec<Request> {
        self.shared.requests.lock().unwrap().clone()
    }

    fn handshake_failures(&self) -> usize {
        self.shared.handshake_failures.load(Ordering::SeqCst)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Serves one connection: TLS, then HTTP/1.1 requests with a
/// `Content-Length` body, kept alive until the client closes.
fn serve(tcp: TcpStream, config: Arc<rustls::ServerConfig>, s: &Shared) {
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut conn = rustls::ServerConnection::new(config).unwrap();
    let mut tcp = tcp;
    while conn.is_handshaking() {
        if conn.complete_io(&mut tcp).is_err() {
            s.handshake_failures.fetch_add(1, Ordering::SeqCst);
            return;
        }
    }
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    loop {
        // One request's head, then its body.
        let (head_len, request) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            if let Ok(httparse::Status::Complete(n)) = req.parse(&buf) {
                let headers: HashMap<String, String> = req
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                break (
                    n,
                    Request {
                        method: req.method.unwrap_or("").to_owned(),
                        path: req.path.unwrap_or("").to_owned(),
                        headers,
                        body: Vec::new(),
                        status: 0,
                    },
                );
            }
            match tls.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if buf.len() > MAX_REQUEST {
                return;
            }
        };
        let mut request = request;
        let len: usize = request
            .headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if len > MAX_REQUEST {
            return;
        }
        while buf.len() < head_len + len {
            match tls.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        request.body = buf[head_len..head_len + len].to_vec();
        buf.drain(..head_len + len);
        let refused = s.refuse_table.lock().unwrap().as_deref().is_some()
            && request.headers.get("x-codi-table") == s.refuse_table.lock().unwrap().as_ref();
        let status = if refused {
            500
        } else {
            s.script.lock().unwrap().pop_front().unwrap_or(200)
        };
        request.status = status;
        s.requests.lock().unwrap().push(request);
        let text = if status == 200 { "ok" } else { "try again" };
        let answer = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        );
        if tls
            .write_all(answer.as_bytes())
            .and_then(|_| tls.flush())
            .is_err()
        {
            return;
        }
    }
}

/// Sends `n` logs (messages `{tag} {i}`) in acknowledged batches of 50.
fn stream(d: &Daemon, n: usize, tag: &str) -> HashSet<String> {
    let mut c = d.unix();
    let mut sent = HashSet::new();
    for chunk in 0..n / 50 {
        let entries: Vec<_> = (0..50)
            .map(|i| {
                let m = format!("{tag} {}", chunk * 50 + i);
                sent.insert(m.clone());
                fields(LogLevel::Info, "hub-tls", &m)
            })
            .collect();
        c.expect_accepted(&Message::new(Payload::LogBatch { entries }));
    }
    sent
}

/// The rows of an NDJSON body.
fn rows(body: &[u8]) -> Vec<serde_json::Value> {
    std::str::from_utf8(body)
        .expect("UTF-8 body")
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

/// The `[server_hub]` section for the receiver at `addr`.
fn hub_config(addr: SocketAddr, host: &str, extra: &str) -> String {
    format!(
        "[server_hub]\nenabled = true\nkind = \"ndjson\"\nurl = \"https://{addr}/ingest\"\n\
         host_id = \"{host}\"\nsync_interval = \"100ms\"\nbatch_size = 300\n\
         backoff_min = \"100ms\"\nbackoff_max = \"1s\"\n{extra}"
    )
}

fn hub_health(d: &Daemon) -> serde_json::Value {
    let r = d.http_get("/health");
    let doc: serde_json::Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("/health is not JSON ({e}): {}", r.text()));
    doc["components"]["hub"].clone()
}

#[test]
fn over_https_with_the_test_ca_every_log_arrives_once_with_its_headers() {
    let pki = Pki::new();
    let receiver = Receiver::start(&pki, &[]);
    let sandbox = Sandbox::new();
    let ca = pki.write_ca(sandbox.path());
    let secret = sandbox.path().join("hub-password");
    std::fs::write(&secret, "pa55word\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let host = format!("tls-{}", std::process::id());
    sandbox.write_config(&hub_config(
        receiver.addr,
        &host,
        &format!(
            "ca_file = \"{}\"\nuser = \"codi\"\npassword_file = \"{}\"\n",
            ca.display(),
            secret.display()
        ),
    ));
    let d = Daemon::start(Arc::clone(&sandbox), Opts::default().with_config());
    let sent = stream(&d, 2000, "tls");
    let local = d.db().count_logs() as usize;
    assert_eq!(local, sent.len());

    let arrived = wait_until(Duration::from_secs(60), || {
        receiver
            .requests()
            .iter()
            .map(|r| rows(&r.body).len())
            .sum::<usize>()
            >= local
    });
    assert!(
        arrived,
        "{} requests, {} handshake failures:\n{}",
        receiver.requests().len(),
        receiver.handshake_failures(),
        d.stderr()
    );
    let requests = receiver.requests();
    assert_eq!(receiver.handshake_failures(), 0);
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("codi:pa55word")
    );
    let mut messages = Vec::new();
    let mut uuids = HashSet::new();
    let mut names = HashSet::new();
    for r in &requests {
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/ingest"));
        let h = |k: &str| r.headers.get(k).map(String::as_str);
        assert_eq!(h("content-type"), Some("application/x-ndjson"));
        assert_eq!(h("x-codi-table"), Some("logs"));
        assert_eq!(h("x-codi-host"), Some(host.as_str()));
        assert_eq!(h("authorization"), Some(auth.as_str()));
        let rows = rows(&r.body);
        let last = rows.last().expect("no empty batch")["id"].as_i64().unwrap();
        let name = h("x-codi-batch").expect("X-Codi-Batch");
        assert!(name.starts_with(&format!("logs-{last}-")), "{name}");
        assert!(names.insert(name.to_owned()), "batch {name} sent twice");
        for row in rows {
            assert_eq!(row["host_id"], host.as_str());
            messages.push(row["message"].as_str().unwrap().to_owned());
            uuids.insert(row["uuid"].as_str().unwrap().parse::<uuid::Uuid>().unwrap());
        }
    }
    assert!(requests.len() >= 2, "batch_size 300 makes several batches");
    assert_eq!(messages.len(), local, "every log once");
    assert_eq!(messages.into_iter().collect::<HashSet<_>>(), sent);
    assert_eq!(uuids, d.db().uuids(), "the stored logs, by uuid");
    assert!(hub_health(&d)["status"] != "degraded", "{}", hub_health(&d));
}

#[test]
fn without_the_test_ca_the_certificate_is_refused_and_nothing_is_shipped() {
    let pki = Pki::new();
    let receiver = Receiver::start(&pki, &[]);
    let sandbox = Sandbox::new();
    let host = format!("untrusted-{}", std::process::id());
    sandbox.write_config(&hub_config(receiver.addr, &host, ""));
    let d = Daemon::start(Arc::clone(&sandbox), Opts::default().with_config());
    stream(&d, 200, "untrusted");
    let mut hub = serde_json::Value::Null;
    let degraded = wait_until(Duration::from_secs(30), || {
        hub = hub_health(&d);
        hub["status"] == "degraded" && receiver.handshake_failures() >= 2
    });
    assert!(degraded, "hub health {hub}:\n{}", d.stderr());
    let reason = hub["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("invalid peer certificate") && reason.contains("UnknownIssuer"),
        "{reason}"
    );
    assert!(
        d.stderr().contains("UnknownIssuer"),
        "the log says why:\n{}",
        d.stderr()
    );
    assert!(
        receiver.requests().is_empty(),
        "no request got past the handshake"
    );
    let watermark: i64 = rusqlite::Connection::open_with_flags(
        sandbox.db(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap()
    .query_row(
        "SELECT last_log_id FROM sync_state WHERE target = 'logs'",
        [],
        |r| r.get(0),
    )
    .unwrap();
    assert_eq!(watermark, 0, "nothing counted as shipped");
}

#[test]
fn a_batch_not_answered_2xx_is_sent_again_byte_identical_before_the_next() {
    let pki = Pki::new();
    let receiver = Receiver::start(&pki, &[500, 307, 503]);
    let sandbox = Sandbox::new();
    let ca = pki.write_ca(sandbox.path());
    let host = format!("retry-{}", std::process::id());
    sandbox.write_config(&hub_config(
        receiver.addr,
        &host,
        &format!(
            "ca_file = \"{}\"\ncontent_type = \"application/json\"\n",
            ca.display()
        ),
    ));
    let d = Daemon::start(Arc::clone(&sandbox), Opts::default().with_config());
    let mut sent = stream(&d, 500, "first");
    let local = || d.db().count_logs() as usize;
    let accepted_rows = |rs: &[Request]| {
        rs.iter()
            .filter(|r| r.status == 200)
            .map(|r| rows(&r.body).len())
            .sum::<usize>()
    };
    // More logs while the first batch is refused: they must wait for it.
    assert!(wait_until(Duration::from_secs(30), || receiver
        .requests()
        .len()
        >= 2));
    sent.extend(stream(&d, 1000, "later"));
    assert!(
        wait_until(Duration::from_secs(60), || accepted_rows(
            &receiver.requests()
        ) >= local()),
        "{:?}:\n{}",
        receiver
            .requests()
            .iter()
            .map(|r| r.status)
            .collect::<Vec<_>>(),
        d.stderr()
    );
    let requests = receiver.requests();
    let statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert_eq!(&statuses[..4], &[500, 307, 503, 200], "{statuses:?}");
    assert!(requests
        .iter()
        .all(|r| r.headers.get("content-type").map(String::as_str) == Some("application/json")));
    for r in &requests[1..4] {
        assert_eq!(r.body, requests[0].body, "re-sent byte-identical");
        assert_eq!(
            r.headers.get("x-codi-batch"),
            requests[0].headers.get("x-codi-batch"),
            "under the same name"
        );
    }
    // The next batch only after the 2xx, and it starts after the first.
    let first_last = rows(&requests[0].body).last().unwrap()["id"]
        .as_i64()
        .unwrap();
    let next_first = rows(&requests[4].body)[0]["id"].as_i64().unwrap();
    assert!(next_first > first_last, "{next_first} after {first_last}");
    assert_ne!(
        requests[4].headers.get("x-codi-batch"),
        requests[0].headers.get("x-codi-batch")
    );
    let shipped: Vec<String> = requests
        .iter()
        .filter(|r| r.status == 200)
        .flat_map(|r| rows(&r.body))
        .map(|row| row["message"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(shipped.len(), local(), "every log accepted once");
    assert_eq!(shipped.into_iter().collect::<HashSet<_>>(), sent);
    let metrics = d.http_get("/metrics").text();
    assert!(
        series(&metrics, "codi_sync_failures_total") >= 3.0,
        "{metrics}"
    );
}

/// SIGHUP applies a new batch size and interval to the running sync, and
/// names the hub keys that take a restart (here `host_id`, which must not
/// change under a batch in flight).
#[test]
fn a_reload_retunes_the_sync_and_names_what_takes_a_restart() {
    let pki = Pki::new();
    let receiver = Receiver::start(&pki, &[]);
    let sandbox = Sandbox::new();
    let ca = pki.write_ca(sandbox.path());
    let host = format!("reload-{}", std::process::id());
    let config = hub_config(
        receiver.addr,
        &host,
        &format!("ca_file = \"{}\"\n", ca.display()),
    );
    sandbox.write_config(&config);
    let d = Daemon::start(Arc::clone(&sandbox), Opts::default().with_config());
    let total = |r: &Receiver| -> usize { r.requests().iter().map(|q| rows(&q.body).len()).sum() };
    stream(&d, 1000, "before");
    assert!(wait_until(Duration::from_secs(60), || total(&receiver) >= 1000));
    let before = receiver.requests().len();
    assert!(
        receiver
            .requests()
            .iter()
            .all(|q| rows(&q.body).len() <= 300),
        "batch_size 300"
    );

    let retuned = config
        .replace("batch_size = 300", "batch_size = 5000")
        .replace("sync_interval = \"100ms\"", "sync_interval = \"3s\"")
        .replace(&format!("host_id = \"{host}\""), "host_id = \"another\"");
    sandbox.write_config(&retuned);
    d.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || d
            .stderr()
            .contains("configuration reloaded")),
        "{}",
        d.stderr()
    );
    assert!(
        d.stderr()
            .contains("changed but not applied until restart: server_hub.host_id"),
        "{}",
        d.stderr()
    );
    // Two thousand logs within the new 3 s interval go in larger batches.
    stream(&d, 2000, "after");
    assert!(wait_until(Duration::from_secs(60), || total(&receiver) >= 3000));
    let after = &receiver.requests()[before..];
    let largest = after.iter().map(|q| rows(&q.body).len()).max().unwrap();
    assert!(
        largest > 300,
        "the new batch_size applies: {largest} rows at most"
    );
    for q in after {
        assert_eq!(
            q.headers.get("x-codi-host").map(String::as_str),
            Some(host.as_str()),
            "host_id needs a restart"
        );
    }
}

/// A hub that refuses one table's batches holds up only that table: logs
/// go on at their own pace while sessions back off, and `/health` names
/// the failing target.
#[test]
fn a_refused_target_backs_off_alone() {
    let pki = Pki::new();
    let receiver = Receiver::start(&pki, &[]);
    *receiver.shared.refuse_table.lock().unwrap() = Some("sessions".into());
    let sandbox = Sandbox::new();
    let ca = pki.write_ca(sandbox.path());
    let host = format!("alone-{}", std::process::id());
    // A long first backoff: with one backoff for all, logs would wait 5 s
    // and then 10 s behind the refused sessions (less a quarter of jitter
    // at most), so 1,000 logs in batches of 300 would need well over 8 s.
    let config = hub_config(
        receiver.addr,
        &host,
        &format!("ca_file = \"{}\"\n", ca.display()),
    )
    .replace("backoff_min = \"100ms\"", "backoff_min = \"5s\"")
    .replace("backoff_max = \"1s\"", "backoff_max = \"1m\"");
    sandbox.write_config(&config);
    let d = Daemon::start(Arc::clone(&sandbox), Opts::default().with_config());
    d.unix()
        .expect_accepted(&Message::new(Payload::SessionStart {
            session_id: "refused".into(),
            identity: "hub-test".into(),
            agent_type: None,
            workspace: None,
        }));
    let refused = |r: &Receiver| r.requests().iter().filter(|q| q.status == 500).count();
    assert!(wait_until(Duration::from_secs(10), || refused(&receiver) >= 1));
    let logs = |r: &Receiver| -> usize {
        r.requests()
            .iter()
            .filter(|q| q.status == 200)
            .map(|q| rows(&q.body).len())
            .sum()
    };
    for wave in 0..4 {
        stream(&d, 250, &format!("wave {wave}"));
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        wait_until(Duration::from_secs(8), || logs(&receiver) >= 1000),
        "logs held up behind the refused sessions: {} of 1000 arrived\n{}",
        logs(&receiver),
        d.stderr()
    );
    let hub = hub_health(&d);
    assert_eq!(hub["status"], "degraded", "{hub}");
    let reason = hub["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("sessions: "), "{reason}");
    assert!(!reason.contains("logs: "), "{reason}");
}
