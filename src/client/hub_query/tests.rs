use super::*;
use proptest::prelude::*;
use std::io::Write as _;
use std::net::TcpListener;

/// Decodes a ClickHouse string literal at the start of `sql` as ClickHouse
/// reads one (`\\`, `\'`, `\xHH`, and the one-letter escapes), and returns
/// it with the rest of the text after its closing quote.
fn unquote(sql: &str) -> Option<(String, &str)> {
    let mut bytes = Vec::new();
    let mut it = sql.strip_prefix('\'')?.char_indices();
    while let Some((i, c)) = it.next() {
        match c {
            '\'' => return Some((String::from_utf8(bytes).ok()?, &sql[i + 2..])),
            '\\' => {
                let (_, e) = it.next()?;
                match e {
                    'x' => {
                        let hi = it.next()?.1.to_digit(16)?;
                        let lo = it.next()?.1.to_digit(16)?;
                        bytes.push((hi * 16 + lo) as u8);
                    }
                    'n' => bytes.push(b'\n'),
                    't' => bytes.push(b'\t'),
                    'r' => bytes.push(b'\r'),
                    '0' => bytes.push(0),
                    other => bytes.extend(other.to_string().as_bytes()),
                }
            }
            c => bytes.extend(c.to_string().as_bytes()),
        }
    }
    None
}

#[test]
fn quoting_escapes_quotes_backslashes_and_controls_only() {
    assert_eq!(quote("plain text"), "'plain text'");
    assert_eq!(quote("x' OR 1=1 --"), r"'x\' OR 1=1 --'");
    assert_eq!(quote(r"a\"), r"'a\\'");
    assert_eq!(quote(r"\'"), r"'\\\''");
    assert_eq!(quote("a\0b\n\r\t\x1b\x7f"), r"'a\x00b\x0A\x0D\x09\x1B\x7F'");
    assert_eq!(quote("héllo ✓ \u{202e} 日本"), "'héllo ✓ \u{202e} 日本'");
    assert_eq!(quote(""), "''");
    // An attempt to close the literal and comment out the rest stays one
    // literal: nothing follows its closing quote.
    for attack in [
        "x' OR 1=1 --",
        "x\\' OR 1=1 --",
        "x\\\\' OR 1=1 --",
        "'; DROP TABLE codi.logs; --",
        "x\0' OR '1'='1",
        "x\\",
    ] {
        let quoted = quote(attack);
        assert_eq!(unquote(&quoted), Some((attack.to_owned(), "")), "{quoted}");
    }
}

proptest! {
    #[test]
    fn every_text_quotes_to_one_literal_that_decodes_to_it(text in any::<String>()) {
        let quoted = quote(&text);
        prop_assert_eq!(unquote(&quoted), Some((text.clone(), "")));
        prop_assert!(!quoted.chars().any(|c| c.is_ascii_control()));
    }
}

#[test]
fn the_where_clause_has_the_local_conditions() {
    assert_eq!(where_clause(&HubFilter::default()), "");
    let f = HubFilter {
        min_level: Some(LogLevel::Warn),
        component: Some("build".into()),
        session_id: Some("s'1".into()),
        since: Some(Timestamp::from_micros(1_000)),
        until: Some(Timestamp::from_micros(2_000)),
        contains: Some("50%".into()),
        host: Some("web-1".into()),
    };
    assert_eq!(
        where_clause(&f),
        " WHERE host_id = 'web-1' AND level IN ('Warn', 'Error') AND component = 'build' \
         AND session_id = 's\\'1' AND timestamp >= 1000 AND timestamp < 2000 \
         AND position(message, '50%') > 0"
    );
    let trace = HubFilter {
        min_level: Some(LogLevel::Trace),
        ..HubFilter::default()
    };
    assert_eq!(
        where_clause(&trace),
        " WHERE level IN ('Trace', 'Debug', 'Info', 'Warn', 'Error')"
    );
}

#[test]
fn the_queries_read_final_newest_first_and_cap_the_limit() {
    let sql = logs_sql("codi.logs", &HubFilter::default(), 1_000_000);
    assert!(sql.contains("FROM codi.logs FINAL ORDER BY"), "{sql}");
    assert!(
        sql.ends_with(
            "ORDER BY timestamp DESC, host_id DESC, id DESC LIMIT 10000 FORMAT JSONEachRow"
        ),
        "{sql}"
    );
    assert_eq!(
        count_sql("codi.logs", &HubFilter::default()),
        "SELECT count() AS matches FROM codi.logs FINAL FORMAT JSONEachRow"
    );
}

#[test]
fn a_target_checks_its_names_and_never_shows_the_password() {
    let t = HubTarget::new(
        "http://hub:8123/",
        "codi",
        "logs",
        Some("ops"),
        Some("s3cret"),
    )
    .unwrap();
    assert_eq!(t.url(), "http://hub:8123");
    let shown = format!("{t:?}");
    assert!(
        !shown.contains("s3cret") && !shown.contains("czNjcmV0"),
        "{shown}"
    );
    assert!(shown.contains("<redacted>"), "{shown}");
    let only_password = HubTarget::new("http://h", "codi", "logs", None, Some("pw")).unwrap();
    assert_eq!(
        only_password.auth.as_deref(),
        Some("Basic ZGVmYXVsdDpwdw==")
    );
    assert!(HubTarget::new("http://h", "codi", "logs", None, None)
        .unwrap()
        .auth
        .is_none());
    for (db, table) in [
        ("codi", "logs; DROP"),
        ("1x", "logs"),
        ("", "logs"),
        ("c", "l`"),
    ] {
        let e = HubTarget::new("http://h", db, table, None, None).unwrap_err();
        assert!(matches!(e, HubQueryError::Config(_)), "{e}");
    }
    let e = HubTarget::new("http://u:pw@h", "codi", "logs", None, None).unwrap_err();
    assert!(!e.to_string().contains("pw@"), "{e}");
}

/// One row as the hub sends it, with `id` and the stored size given.
fn line(host: &str, id: i64, stored: usize) -> String {
    serde_json::json!({
        "host_id": host,
        "id": id,
        "uuid_text": "00000000-0000-0000-0000-000000000007",
        "timestamp": 1_000 + id,
        "level": "Warn",
        "uid": 1000,
        "stored_bytes": stored,
        "component_shown": "build",
        "session_shown": null,
        "message_shown": format!("message {id}"),
        "metadata_shown": "{\"k\":[1,2]}",
    })
    .to_string()
        + "\n"
}

fn read(body: &str) -> Result<(Vec<HubLog>, bool), HubQueryError> {
    read_logs(body.as_bytes(), 100, MAX_ANSWER_BYTES)
}

#[test]
fn rows_come_oldest_first_with_their_hosts() {
    let body = line("b", 2, 10) + &line("a", 9, 10);
    let (logs, cut_short) = read(&body).unwrap();
    assert!(!cut_short);
    assert_eq!(
        logs.iter()
            .map(|l| (l.host.as_str(), l.log.id))
            .collect::<Vec<_>>(),
        [("a", 9), ("b", 2)]
    );
    let log = &logs[1].log;
    assert_eq!(log.level, LogLevel::Warn);
    assert_eq!(log.timestamp, Timestamp::from_micros(1_002));
    assert_eq!(log.uid, Some(1000));
    assert_eq!(log.uuid, Uuid::from_u128(7));
    assert_eq!(
        log.metadata,
        Some(rmpv::Value::Map(vec![(
            "k".into(),
            rmpv::Value::Array(vec![1.into(), 2.into()])
        )]))
    );
    // Integers quoted (ClickHouse's default for 64-bit ones) read alike.
    let quoted = line("a", 9, 10)
        .replace("\"id\":9", "\"id\":\"9\"")
        .replace("\"uid\":1000", "\"uid\":\"1000\"");
    assert_eq!(read(&quoted).unwrap().0, read(&line("a", 9, 10)).unwrap().0);
    assert!(read("").unwrap().0.is_empty());
}

#[test]
fn a_row_too_large_comes_cut_as_a_local_one_does() {
    let big = MAX_ROW_BYTES + 1;
    let body = line("a", 1, big).replace(
        "\"message_shown\":\"message 1\"",
        &format!(
            "\"message_shown\":\"{}é\"",
            "m".repeat(TRUNCATED_MESSAGE_BYTES - 1)
        ),
    );
    let (logs, _) = read(&body).unwrap();
    let log = &logs[0].log;
    assert_eq!(
        log.message,
        "m".repeat(TRUNCATED_MESSAGE_BYTES - 1),
        "cut at a char"
    );
    assert_eq!(
        log.metadata,
        Some(rmpv::Value::Map(vec![(
            metadata::TRUNCATED_KEY.into(),
            rmpv::Value::from(big as u64)
        )]))
    );
    let small = &read(&line("a", 1, 10)).unwrap().0[0].log;
    assert_eq!(small.message, "message 1");
    assert_eq!(
        small.metadata.as_ref().unwrap().as_map().unwrap()[0]
            .0
            .as_str(),
        Some("k")
    );
}

#[test]
fn a_hostile_answer_is_a_clear_error() {
    let good = line("a", 1, 10);
    for (body, why) in [
        ("not json\n".to_owned(), "row 1: expected"),
        (
            good.clone() + "Code: 241, e.displayText() = DB::Exception: Memory limit\n",
            "row 2",
        ),
        (
            good.replace("\"id\":1", "\"id\":\"x1\""),
            "`x1` is not an integer",
        ),
        (good.replace("\"id\":1", "\"id\":1.5"), "row 1"),
        (good.replace("\"id\":1", "\"id\":[]"), "row 1"),
        (good.replace("\"Warn\"", "\"Loud\""), "unknown level `Loud`"),
        (
            good.replace("\"uid\":1000", "\"uid\":-1"),
            "uid -1 is out of range",
        ),
        (good.replace("00000000-0000", "zz"), "uuid `zz"),
        (good.replace(",\"host_id\":\"a\"", ""), "row 1"),
        (good.trim_end().to_owned(), "ends in the middle of a row"),
        (good.repeat(101), "more than the 100 rows asked for"),
        ("{\"x\":\"\x1b[2J\"}\n".to_owned(), "\\x1b[2J"),
    ] {
        let e = read(&body).unwrap_err();
        assert!(matches!(e, HubQueryError::BadAnswer(_)), "{e}");
        let text = e.to_string();
        assert!(text.contains(why), "{text} lacks {why}");
        assert!(!text.contains('\x1b'), "{text:?}");
        assert!(text.len() < 1000, "{text}");
    }
    // Text that is not UTF-8 is shown, not refused.
    let mut bytes = good.clone().into_bytes();
    let at = good.find("message 1").unwrap();
    bytes[at] = 0xff;
    let (logs, _) = read_logs(&bytes[..], 100, MAX_ANSWER_BYTES).unwrap();
    assert_eq!(logs[0].log.message, "\u{fffd}essage 1");
}

#[test]
fn an_answer_over_the_bound_keeps_the_newest_rows_that_fit() {
    let one = line("a", 1, 10);
    let body = one.repeat(3) + &"x".repeat(10_000);
    let bound = (one.len() * 3 + 100) as u64;
    let (logs, cut_short) = read_logs(body.as_bytes(), 100, bound).unwrap();
    assert!(cut_short);
    assert_eq!(logs.len(), 3);
    // An endless line is read only up to the bound.
    let endless = std::io::repeat(b'x');
    let (logs, cut_short) = read_logs(endless, 100, 1 << 20).unwrap();
    assert!(cut_short && logs.is_empty());
}

#[test]
fn the_count_is_one_non_negative_integer() {
    assert_eq!(read_count(&b"{\"matches\":42}\n"[..]).unwrap(), 42);
    assert_eq!(read_count(&b"{\"matches\":\"42\"}\n"[..]).unwrap(), 42);
    for bad in [
        "",
        "{\"matches\":-1}",
        "{\"n\":1}",
        "[1]",
        "{\"matches\":1}{}",
    ] {
        let e = read_count(bad.as_bytes())
            .map(|n| panic!("{bad}: {n}"))
            .unwrap_err();
        assert!(matches!(e, HubQueryError::BadAnswer(_)), "{bad}: {e}");
    }
}

/// A one-shot HTTP server on loopback that reads a request and answers
/// `answer` (written with `pause` between chunks of 1 KiB); the URL.
fn serve(answer: Vec<u8>, pause: Duration) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        let mut buf = [0u8; 65536];
        let _ = s.read(&mut buf);
        for chunk in answer.chunks(1024) {
            if s.write_all(chunk).is_err() {
                return;
            }
            std::thread::sleep(pause);
        }
    });
    url
}

fn client(url: &str, total: Duration) -> HubClient {
    let target = HubTarget::new(url, "codi", "logs", Some("u"), Some("pw")).unwrap();
    HubClient::new(target, Duration::from_secs(2), total, None)
}

#[test]
fn a_hub_error_status_shows_its_text_escaped_and_short() {
    let body = format!(
        "Code: 516, DB::Exception: \x1b[31mwrong password{}",
        "!".repeat(5000)
    );
    let answer = format!(
        "HTTP/1.1 401 Unauthorized\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let url = serve(answer.into_bytes(), Duration::ZERO);
    let e = client(&url, Duration::from_secs(10))
        .query_logs(&HubFilter::default(), 10)
        .unwrap_err();
    let HubQueryError::Refused { code, text } = &e else {
        panic!("{e}");
    };
    assert_eq!(*code, 401);
    assert!(text.starts_with("Code: 516, DB::Exception: \\x1b[31mwrong password!"));
    assert!(text.chars().count() <= MAX_ERROR_CHARS + 3, "{text}");
}

#[test]
fn garbage_from_the_hub_is_a_bad_answer() {
    let answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n<html>hello</html>\n".to_vec();
    let url = serve(answer, Duration::ZERO);
    let e = client(&url, Duration::from_secs(10))
        .query_logs(&HubFilter::default(), 10)
        .unwrap_err();
    assert!(e.to_string().contains("<html>hello</html>"), "{e}");
    assert!(matches!(e, HubQueryError::BadAnswer(_)), "{e}");
}

#[test]
fn a_hub_that_trickles_its_answer_is_given_up_on_in_time() {
    let mut answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec();
    answer.extend(line("a", 1, 10).repeat(200).into_bytes());
    let url = serve(answer, Duration::from_millis(300));
    let started = std::time::Instant::now();
    let e = client(&url, Duration::from_secs(1))
        .query_logs(&HubFilter::default(), 1000)
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "{e}");
    assert!(matches!(e, HubQueryError::BadAnswer(_)), "{e}");
    assert!(e.to_string().contains("reading it failed"), "{e}");
}

#[test]
fn no_hub_listening_is_unreachable() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = client(&format!("http://127.0.0.1:{port}"), Duration::from_secs(5))
        .query_logs(&HubFilter::default(), 1)
        .unwrap_err();
    assert!(matches!(e, HubQueryError::Unreachable { .. }), "{e}");
    assert!(!e.to_string().contains("query="), "no query in it: {e}");
}

#[test]
fn a_query_too_long_for_the_hub_is_refused_before_sending() {
    // Nothing listens there: an attempt to send would be Unreachable.
    let f = HubFilter {
        contains: Some("é".repeat(3000)),
        ..HubFilter::default()
    };
    let e = client("http://127.0.0.1:9", Duration::from_secs(5))
        .query_logs(&f, 10)
        .unwrap_err();
    assert!(matches!(e, HubQueryError::Config(_)), "{e}");
    assert!(e.to_string().contains("shorten --contains"), "{e}");
    let e = client("http://127.0.0.1:99999", Duration::from_secs(5))
        .query_logs(&HubFilter::default(), 10)
        .unwrap_err();
    assert!(e.to_string().contains("is not usable"), "{e}");
}
