use super::*;
use crate::proto::{
    decode_message, encode_message, frame_body_len, ErrorCode, LogFields, LogFilter, LogLevel,
    HEADER_LEN,
};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use uuid::Uuid;

fn read_frame(s: &mut impl Read) -> Option<Message> {
    let mut header = [0u8; HEADER_LEN];
    s.read_exact(&mut header).ok()?;
    let n = frame_body_len(&header).unwrap().unwrap();
    let mut body = vec![0; n];
    s.read_exact(&mut body).unwrap();
    Some(decode_message(&body).unwrap())
}

fn write_msg(s: &mut impl Write, msg: &Message) {
    let mut out = Vec::new();
    encode_message(msg, &mut out).unwrap();
    s.write_all(&out).unwrap();
}

fn accepted(req: &Message) -> Message {
    Message::ack(req.id, AckStatus::Accepted)
}

fn options(endpoints: Vec<Endpoint>) -> ClientOptions {
    ClientOptions {
        endpoints,
        token: None,
        trusted: crate::fsperm::TrustedUsers::current(None),
        timeout: Duration::from_secs(10),
        retry: RetryPolicy {
            base: Duration::from_millis(1),
            tries: 3,
        },
        standalone_db: None,
        notice: |_| {},
    }
}

fn log(message: &str) -> Message {
    Message::new(Payload::LogEntry(LogFields {
        level: LogLevel::Info,
        component: "test".into(),
        message: message.into(),
        metadata: None,
        session_id: None,
    }))
}

#[test]
fn backoff_doubles_from_100_ms() {
    let p = RetryPolicy::default();
    let waits: Vec<u128> = (1..=MAX_TRIES).map(|a| p.delay(a).as_millis()).collect();
    assert_eq!(waits, [100, 200, 400]);
    assert_eq!(p.tries, 3);
}

#[test]
fn pipelined_requests_survive_a_dropped_connection_with_the_same_ids() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || {
        // First connection: take all three requests, answer one, hang up.
        let (mut s, _) = listener.accept().unwrap();
        let first: Vec<Message> = (0..3).map(|_| read_frame(&mut s).unwrap()).collect();
        write_msg(&mut s, &accepted(&first[0]));
        drop(s);
        // Second connection: the unanswered two again, answered in order.
        let (mut s, _) = listener.accept().unwrap();
        let again: Vec<Message> = (0..2).map(|_| read_frame(&mut s).unwrap()).collect();
        for m in &again {
            write_msg(&mut s, &accepted(m));
        }
        assert!(read_frame(&mut s).is_none(), "nothing else is sent");
        (first, again)
    });
    let mut client = Client::connect(options(vec![Endpoint::Unix(path.clone())])).unwrap();
    assert_eq!(client.endpoint(), Some(&Endpoint::Unix(path)));
    let sent: Vec<Message> = (0..3).map(|i| log(&format!("m{i}"))).collect();
    for m in &sent {
        client.send(m.clone()).unwrap();
    }
    assert_eq!(client.pending(), 3);
    for m in &sent {
        let done = client.recv().unwrap().expect("an answer");
        assert_eq!(&done.request, m);
        assert_eq!(done.answer.payload, accepted(m).payload);
    }
    assert!(client.recv().unwrap().is_none());
    drop(client);
    let (first, again) = server.join().unwrap();
    assert_eq!(first, sent, "requests arrive framed, in order, unchanged");
    assert_eq!(again, sent[1..], "resent with the same ids and contents");
}

#[test]
fn gives_up_after_the_retry_budget() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || {
        // Accept and hang up on every connection: the first plus 3 retries.
        for _ in 0..4 {
            let (mut s, _) = listener.accept().unwrap();
            let _ = read_frame(&mut s);
        }
    });
    let mut client = Client::connect(options(vec![Endpoint::Unix(path)])).unwrap();
    let e = client.request(Message::new(Payload::Ping)).unwrap_err();
    assert!(matches!(e, ClientError::GaveUp { tries: 3, .. }), "{e}");
    server.join().unwrap();
}

#[test]
fn an_answer_for_another_request_is_a_protocol_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        read_frame(&mut s).unwrap();
        write_msg(&mut s, &Message::ack(Uuid::nil(), AckStatus::Accepted));
    });
    let mut client = Client::connect(options(vec![Endpoint::Unix(path)])).unwrap();
    let e = client.request(Message::new(Payload::Ping)).unwrap_err();
    assert!(matches!(e, ClientError::Protocol(_)), "{e}");
    server.join().unwrap();
}

#[test]
fn unreachable_without_standalone_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = Client::connect(options(vec![Endpoint::Unix(dir.path().join("none"))])).unwrap_err();
    assert!(matches!(e, ClientError::Unreachable { .. }), "{e}");
}

static NOTICES: AtomicUsize = AtomicUsize::new(0);

#[test]
fn daemon_down_goes_standalone_at_once_and_says_so_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data/codi.db");
    let mut opts = options(vec![Endpoint::Unix(dir.path().join("none.sock"))]);
    opts.standalone_db = Some(db.clone());
    opts.notice = |s| {
        assert!(
            s.starts_with("daemon not reachable; wrote directly to "),
            "{s}"
        );
        NOTICES.fetch_add(1, Ordering::SeqCst);
    };
    let mut client = Client::connect(opts).unwrap();
    assert_eq!(client.standalone_db(), Some(db.as_path()));
    for i in 0..3 {
        let m = log(&format!("m{i}"));
        let answer = client.request(m.clone()).unwrap();
        assert_eq!(answer.payload, accepted(&m).payload);
    }
    assert_eq!(NOTICES.load(Ordering::SeqCst), 1);
    let ping = client.request(Message::new(Payload::Ping)).unwrap();
    assert!(matches!(
        ping.payload,
        Payload::Error {
            code: ErrorCode::Unsupported,
            ..
        }
    ));
}

#[test]
fn daemon_dying_mid_stream_hands_unanswered_requests_to_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.sock");
    let db = dir.path().join("codi.db");
    let listener = UnixListener::bind(&path).unwrap();
    let sock = path.clone();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let got = (0..2).map(|_| read_frame(&mut s).unwrap()).count();
        // The daemon goes away for good: no socket to reconnect to.
        std::fs::remove_file(&sock).unwrap();
        got
    });
    let mut opts = options(vec![Endpoint::Unix(path)]);
    opts.standalone_db = Some(db.clone());
    let mut client = Client::connect(opts).unwrap();
    let sent = [log("a"), log("b")];
    for m in &sent {
        client.send(m.clone()).unwrap();
    }
    for m in &sent {
        let done = client.recv().unwrap().unwrap();
        assert_eq!(done.answer.payload, accepted(m).payload);
    }
    assert_eq!(server.join().unwrap(), 2);
    assert_eq!(client.standalone_db(), Some(db.as_path()));
    let answer = client
        .request(Message::new(Payload::QueryLogs {
            filter: LogFilter::default(),
            limit: 10,
        }))
        .unwrap();
    let Payload::LogResults { entries, .. } = answer.payload else {
        panic!("not results")
    };
    let uuids: Vec<Uuid> = entries.iter().map(|e| e.uuid).collect();
    assert_eq!(uuids, [sent[0].id, sent[1].id]);
}

#[test]
fn tcp_authenticates_first_when_a_token_is_known() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let auth = read_frame(&mut s).unwrap();
        write_msg(&mut s, &accepted(&auth));
        let ping = read_frame(&mut s).unwrap();
        write_msg(&mut s, &accepted(&ping));
        // A second client with a wrong token.
        let (mut s, _) = listener.accept().unwrap();
        let bad = read_frame(&mut s).unwrap();
        write_msg(
            &mut s,
            &Message::ack(bad.id, AckStatus::Rejected("wrong token".into())),
        );
        (auth.payload, ping.payload)
    });
    let mut opts = options(vec![Endpoint::Tcp(addr)]);
    opts.token = Some("s3cret".into());
    let mut client = Client::connect(opts.clone()).unwrap();
    client.request(Message::new(Payload::Ping)).unwrap();
    let e = Client::connect(opts).unwrap_err();
    assert!(
        matches!(&e, ClientError::AuthRefused { reason, .. } if reason == "wrong token"),
        "{e}"
    );
    let (auth, ping) = server.join().unwrap();
    assert_eq!(
        auth,
        Payload::Authenticate {
            token: "s3cret".into()
        }
    );
    assert_eq!(ping, Payload::Ping);
}

#[test]
fn a_request_larger_than_a_frame_is_unsendable() {
    let (_dir, path, server) = {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            assert!(read_frame(&mut s).is_none(), "nothing is sent");
        });
        (dir, path, server)
    };
    let mut client = Client::connect(options(vec![Endpoint::Unix(path)])).unwrap();
    let e = client
        .send(log(&"x".repeat(crate::proto::MAX_FRAME_LEN)))
        .unwrap_err();
    assert!(matches!(e, ClientError::Unsendable(_)), "{e}");
    assert_eq!(client.pending(), 0);
    drop(client);
    server.join().unwrap();
}

#[test]
fn an_untrusted_socket_is_skipped_with_one_notice_and_the_next_endpoint_used() {
    use std::os::unix::fs::PermissionsExt;
    static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let dir = tempfile::tempdir().unwrap();
    // Another user could have planted this one: its directory is
    // group-writable.
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o770)).unwrap();
    let planted = UnixListener::bind(open.join("d.sock")).unwrap();
    planted.set_nonblocking(true).unwrap();
    let good_path = dir.path().join("d.sock");
    let good = UnixListener::bind(&good_path).unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = good.accept().unwrap();
        let m = read_frame(&mut s).unwrap();
        write_msg(&mut s, &accepted(&m));
    });
    let mut opts = options(vec![
        Endpoint::Unix(open.join("d.sock")),
        Endpoint::Unix(good_path.clone()),
    ]);
    opts.notice = |s| SEEN.lock().unwrap().push(s.to_owned());
    let mut client = Client::connect(opts).unwrap();
    assert_eq!(client.endpoint(), Some(&Endpoint::Unix(good_path)));
    let m = log("to the right daemon");
    assert_eq!(
        client.request(m.clone()).unwrap().payload,
        accepted(&m).payload
    );
    server.join().unwrap();
    let seen = SEEN.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let open_real = std::fs::canonicalize(&open).unwrap();
    assert!(
        seen[0].starts_with(&format!("not using unix:{}/d.sock: ", open.display()))
            && seen[0].contains(&format!(
                "{} is writable by group or others",
                open_real.display()
            )),
        "{seen:?}"
    );
    let err = planted.accept().unwrap_err();
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::WouldBlock,
        "nothing connected to it"
    );
}

/// A daemon draining to stop half-closes its connections and waits for
/// each client to go (up to a second): a client that gives up on one says
/// so at once, not only once it has reconnected elsewhere.
#[test]
fn a_client_hangs_up_a_connection_it_gives_up_on_before_it_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let first = read_frame(&mut s).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        // Draining: read until the client goes.
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        listener.set_nonblocking(true).unwrap();
        let reconnected_first = listener.accept().is_ok();
        listener.set_nonblocking(false).unwrap();
        assert!(
            !reconnected_first,
            "the client hung up only after it had reconnected"
        );
        let (mut s, _) = listener.accept().unwrap();
        let again = read_frame(&mut s).unwrap();
        assert_eq!(again.id, first.id, "the same request, resent");
        write_msg(&mut s, &accepted(&again));
    });
    let mut opts = options(vec![Endpoint::Unix(path)]);
    // Far longer than the server needs to look for a second connection.
    opts.retry.base = Duration::from_secs(1);
    let mut client = Client::connect(opts).unwrap();
    let answer = client.request(log("resent")).unwrap();
    assert!(matches!(
        answer.payload,
        Payload::Acknowledgment {
            status: AckStatus::Accepted,
            ..
        }
    ));
    server.join().unwrap();
}

/// A standalone write that finds the database held goes back to the front
/// of the queue for the daemon; when the handoff fails (no socket within
/// the timeout, retries used up), the request stays unanswered, and a
/// later `recv` answers it once the database is free, not a panic.
#[test]
fn a_request_a_failed_handoff_left_is_answered_by_the_next_recv() {
    use crate::store::lock::DatabaseLock;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data/codi.db");
    let mut opts = options(vec![Endpoint::Unix(dir.path().join("none.sock"))]);
    opts.standalone_db = Some(db.clone());
    opts.timeout = Duration::from_millis(100);
    opts.retry.tries = 1;
    let mut client = Client::connect(opts).unwrap();
    assert_eq!(client.standalone_db(), Some(db.as_path()));
    let daemon = DatabaseLock::acquire(&db).unwrap();
    let held = log("held");
    let e = client.send(held.clone()).unwrap_err();
    assert!(matches!(e, ClientError::GaveUp { .. }), "{e}");
    assert_eq!(client.pending(), 1, "the request is kept, unanswered");
    let e = client.recv().unwrap_err();
    assert!(matches!(e, ClientError::GaveUp { .. }), "still held: {e}");
    assert_eq!(client.pending(), 1, "still kept");
    drop(daemon);
    let done = client.recv().unwrap().expect("answered");
    assert_eq!(done.request.id, held.id);
    assert_eq!(done.answer.payload, accepted(&held).payload);
    assert_eq!(client.pending(), 0);
    assert!(client.recv().unwrap().is_none(), "answered once");
}

/// An answer given locally, as one from a daemon, starts a fresh round of
/// retries: a stream written directly waits out every daemon that holds
/// the database for a moment, not only the first few of its life.
#[test]
fn each_hold_a_standalone_stream_waits_out_gets_the_full_retry_budget() {
    use crate::store::lock::DatabaseLock;
    use std::sync::mpsc;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data/codi.db");
    let mut opts = options(vec![Endpoint::Unix(dir.path().join("none.sock"))]);
    opts.standalone_db = Some(db.clone());
    opts.timeout = Duration::from_secs(10);
    opts.retry.tries = 1;
    let mut client = Client::connect(opts).unwrap();
    assert_eq!(client.standalone_db(), Some(db.as_path()));
    for round in 0..3 {
        let (held_tx, held_rx) = mpsc::channel();
        let db = db.clone();
        // A daemon that holds the database for a moment, then exits
        // without ever serving a socket.
        let holder = thread::spawn(move || {
            let lock = DatabaseLock::acquire(&db).unwrap();
            held_tx.send(()).unwrap();
            thread::sleep(Duration::from_millis(200));
            drop(lock);
        });
        held_rx.recv().unwrap();
        let msg = log(&format!("round {round}"));
        client
            .send(msg.clone())
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let done = client.recv().unwrap().expect("answered");
        assert_eq!(done.request.id, msg.id);
        assert_eq!(done.answer.payload, accepted(&msg).payload);
        holder.join().unwrap();
    }
    assert_eq!(client.standalone_db(), Some(db.as_path()));
}
