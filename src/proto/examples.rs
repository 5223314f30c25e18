//! The worked hex examples of `docs/PROTOCOL.md`, produced by the real codec.
//!
//! Each example is pinned three ways so the document cannot drift from the
//! code: the codec must produce exactly the hex below; the document must show
//! exactly that hex (in the fenced block after `<!-- hex: NAME -->`); and the
//! byte column of its annotated walk-through (the fenced block after
//! `<!-- bytes: NAME -->`, annotations start after two spaces) must add up to
//! the same bytes. The frames must also decode back to the same messages.

use super::*;
use uuid::Uuid;

/// The document whose examples are checked.
const DOC: &str = include_str!("../../docs/PROTOCOL.md");

/// The frame of example `log-entry-named`, 16 bytes a line.
const LOG_ENTRY_NAMED: &str = "\
9e 00 00 00 83 a2 69 64 c4 10 01 a2 19 ff 5e fb\n\
7c 4a 9d 2f 1a 2b 3c 4d 5e 6f a9 74 69 6d 65 73\n\
74 61 6d 70 bb 32 30 32 36 2d 31 31 2d 32 36 54\n\
32 32 3a 33 34 3a 35 36 2e 31 32 33 34 35 36 5a\n\
a7 70 61 79 6c 6f 61 64 81 a8 4c 6f 67 45 6e 74\n\
72 79 85 a5 6c 65 76 65 6c a4 57 61 72 6e a9 63\n\
6f 6d 70 6f 6e 65 6e 74 a5 62 75 69 6c 64 a7 6d\n\
65 73 73 61 67 65 ad 64 69 73 6b 20 39 31 25 20\n\
66 75 6c 6c a8 6d 65 74 61 64 61 74 61 81 a3 70\n\
63 74 5b aa 73 65 73 73 69 6f 6e 5f 69 64 a3 73\n\
2d 31";

/// The frame of example `log-entry-ack`, 16 bytes a line.
const LOG_ENTRY_ACK: &str = "\
82 00 00 00 83 a2 69 64 c4 10 01 a2 19 ff 5e fd\n\
7e 10 8a 3b 5c 6d 7e 8f 90 12 a9 74 69 6d 65 73\n\
74 61 6d 70 bb 32 30 32 36 2d 31 31 2d 32 36 54\n\
32 32 3a 33 34 3a 35 36 2e 31 32 35 38 37 31 5a\n\
a7 70 61 79 6c 6f 61 64 81 ae 41 63 6b 6e 6f 77\n\
6c 65 64 67 6d 65 6e 74 82 aa 72 65 71 75 65 73\n\
74 5f 69 64 c4 10 01 a2 19 ff 5e fb 7c 4a 9d 2f\n\
1a 2b 3c 4d 5e 6f a6 73 74 61 74 75 73 a8 41 63\n\
63 65 70 74 65 64";

/// The frame of example `ping`, 16 bytes a line.
const PING: &str = "\
49 00 00 00 83 a2 69 64 c4 10 01 a2 19 ff 5f 02\n\
71 23 84 56 78 9a bc de f0 12 a9 74 69 6d 65 73\n\
74 61 6d 70 bb 32 30 32 36 2d 31 31 2d 32 36 54\n\
32 32 3a 33 34 3a 35 36 2e 31 33 30 30 30 30 5a\n\
a7 70 61 79 6c 6f 61 64 a4 50 69 6e 67";

/// The frame of example `ping-ack`, 16 bytes a line.
const PING_ACK: &str = "\
82 00 00 00 83 a2 69 64 c4 10 01 a2 19 ff 5f 02\n\
7f ed b1 c2 d3 e4 f5 06 17 28 a9 74 69 6d 65 73\n\
74 61 6d 70 bb 32 30 32 36 2d 31 31 2d 32 36 54\n\
32 32 3a 33 34 3a 35 36 2e 31 33 30 34 31 32 5a\n\
a7 70 61 79 6c 6f 61 64 81 ae 41 63 6b 6e 6f 77\n\
6c 65 64 67 6d 65 6e 74 82 aa 72 65 71 75 65 73\n\
74 5f 69 64 c4 10 01 a2 19 ff 5f 02 71 23 84 56\n\
78 9a bc de f0 12 a6 73 74 61 74 75 73 a8 41 63\n\
63 65 70 74 65 64";

/// The frame of example `log-entry-positional`, 16 bytes a line.
const LOG_ENTRY_POSITIONAL: &str = "\
5d 00 00 00 93 c4 10 01 a2 19 ff 5e fb 7c 4a 9d\n\
2f 1a 2b 3c 4d 5e 6f bb 32 30 32 36 2d 31 31 2d\n\
32 36 54 32 32 3a 33 34 3a 35 36 2e 31 32 33 34\n\
35 36 5a 81 a8 4c 6f 67 45 6e 74 72 79 95 a4 57\n\
61 72 6e a5 62 75 69 6c 64 ad 64 69 73 6b 20 39\n\
31 25 20 66 75 6c 6c 81 a3 70 63 74 5b a3 73 2d\n\
31";

fn id(s: &str) -> Uuid {
    Uuid::parse_str(s).unwrap()
}

fn ts(s: &str) -> Timestamp {
    Timestamp::parse_rfc3339(s).unwrap()
}

/// Example 1 (and 5): a `LogEntry` request.
fn log_entry() -> Message {
    Message {
        id: id("01a219ff-5efb-7c4a-9d2f-1a2b3c4d5e6f"),
        timestamp: ts("2026-11-26T22:34:56.123456Z"),
        payload: Payload::LogEntry(LogFields {
            level: LogLevel::Warn,
            component: "build".into(),
            message: "disk 91% full".into(),
            metadata: Some(rmpv::Value::Map(vec![(
                "pct".into(),
                rmpv::Value::from(91),
            )])),
            session_id: Some("s-1".into()),
        }),
    }
}

/// Example 2: the daemon's answer to example 1.
fn log_entry_ack() -> Message {
    Message {
        id: id("01a219ff-5efd-7e10-8a3b-5c6d7e8f9012"),
        timestamp: ts("2026-11-26T22:34:56.125871Z"),
        payload: Payload::Acknowledgment {
            request_id: log_entry().id,
            status: AckStatus::Accepted,
        },
    }
}

/// Example 3: a `Ping` request.
fn ping() -> Message {
    Message {
        id: id("01a219ff-5f02-7123-8456-789abcdef012"),
        timestamp: ts("2026-11-26T22:34:56.130000Z"),
        payload: Payload::Ping,
    }
}

/// Example 4: the daemon's answer to example 3.
fn ping_ack() -> Message {
    Message {
        id: id("01a219ff-5f02-7fed-b1c2-d3e4f5061728"),
        timestamp: ts("2026-11-26T22:34:56.130412Z"),
        payload: Payload::Acknowledgment {
            request_id: ping().id,
            status: AckStatus::Accepted,
        },
    }
}

/// A whole frame in the named encoding, as the daemon sends it.
fn named_frame(msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    encode_message(msg, &mut out).unwrap();
    out
}

/// A whole frame in the positional encoding, as the seed's client sends it.
fn positional_frame(msg: &Message) -> Vec<u8> {
    let body = rmp_serde::to_vec(msg).unwrap();
    let mut out = u32::try_from(body.len()).unwrap().to_le_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// Lowercase hex, bytes separated by spaces, 16 bytes a line.
fn hex_lines(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|line| {
            line.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The content of the fenced `text` block that follows `<!-- marker -->`.
fn block_after(marker: &str) -> &'static str {
    let tag = format!("<!-- {marker} -->\n```text\n");
    let mut found = DOC.match_indices(&tag);
    let (at, _) = found
        .next()
        .unwrap_or_else(|| panic!("PROTOCOL.md has no block marked `{marker}`"));
    assert!(found.next().is_none(), "`{marker}` marks two blocks");
    let rest = &DOC[at + tag.len()..];
    let end = rest
        .find("\n```")
        .unwrap_or_else(|| panic!("block `{marker}` is not closed"));
    &rest[..end]
}

/// The bytes of an annotated block: each line's text before two spaces.
fn annotated_bytes(block: &str) -> Vec<u8> {
    let mut bytes = Vec::new();
    for line in block.lines() {
        let column = line.split("  ").next().unwrap_or("");
        for token in column.split_whitespace() {
            assert_eq!(token.len(), 2, "not a hex byte: `{token}` in `{line}`");
            let byte = u8::from_str_radix(token, 16)
                .unwrap_or_else(|_| panic!("not a hex byte: `{token}` in `{line}`"));
            bytes.push(byte);
        }
    }
    bytes
}

/// Pins example `name`: codec output, the document's two blocks, decoding.
fn check(name: &str, frame: &[u8], expected: &str, msg: &Message) {
    assert_eq!(
        hex_lines(frame),
        expected,
        "codec output of `{name}` changed"
    );
    assert_eq!(
        block_after(&format!("hex: {name}")),
        expected,
        "PROTOCOL.md shows other bytes for `{name}`"
    );
    assert_eq!(
        hex_lines(&annotated_bytes(block_after(&format!("bytes: {name}")))),
        expected,
        "the annotated bytes of `{name}` in PROTOCOL.md differ"
    );
    let len = frame_body_len(frame).unwrap().unwrap();
    assert_eq!(frame.len(), HEADER_LEN + len, "`{name}` is one whole frame");
    assert_eq!(&decode_message(&frame[HEADER_LEN..]).unwrap(), msg);
}

#[test]
fn log_entry_named() {
    let msg = log_entry();
    check("log-entry-named", &named_frame(&msg), LOG_ENTRY_NAMED, &msg);
}

#[test]
fn log_entry_ack_answer() {
    let msg = log_entry_ack();
    check("log-entry-ack", &named_frame(&msg), LOG_ENTRY_ACK, &msg);
}

#[test]
fn ping_request() {
    let msg = ping();
    check("ping", &named_frame(&msg), PING, &msg);
}

#[test]
fn ping_ack_answer() {
    let msg = ping_ack();
    check("ping-ack", &named_frame(&msg), PING_ACK, &msg);
}

#[test]
fn log_entry_positional() {
    let msg = log_entry();
    check(
        "log-entry-positional",
        &positional_frame(&msg),
        LOG_ENTRY_POSITIONAL,
        &msg,
    );
}

/// PROTOCOL.md: "Keys this version does not know are ignored".
#[test]
fn unknown_keys_are_ignored() {
    let value = rmpv::Value::Map(vec![
        (
            "id".into(),
            rmpv::Value::Binary(log_entry().id.as_bytes().to_vec()),
        ),
        ("timestamp".into(), "2026-11-26T22:34:56.123456Z".into()),
        ("priority".into(), 3.into()),
        (
            "payload".into(),
            rmpv::Value::Map(vec![(
                "LogEntry".into(),
                rmpv::Value::Map(vec![
                    ("level".into(), "Warn".into()),
                    ("component".into(), "build".into()),
                    ("message".into(), "disk 91% full".into()),
                    ("colour".into(), "red".into()),
                    (
                        "metadata".into(),
                        rmpv::Value::Map(vec![("pct".into(), 91.into())]),
                    ),
                    ("session_id".into(), "s-1".into()),
                ]),
            )]),
        ),
    ]);
    let mut body = Vec::new();
    rmpv::encode::write_value(&mut body, &value).unwrap();
    assert_eq!(decode_message(&body).unwrap(), log_entry());
}

/// PROTOCOL.md: the daemon reads both encodings "even mixed within one
/// message".
#[test]
fn named_message_with_positional_payload_decodes() {
    let value = rmpv::Value::Map(vec![
        ("id".into(), "01a219ff-5efb-7c4a-9d2f-1a2b3c4d5e6f".into()),
        (
            "timestamp".into(),
            "2026-11-26T23:34:56.123456+01:00".into(),
        ),
        (
            "payload".into(),
            rmpv::Value::Map(vec![(
                "LogEntry".into(),
                rmpv::Value::Array(vec![
                    "Warn".into(),
                    "build".into(),
                    "disk 91% full".into(),
                    rmpv::Value::Map(vec![("pct".into(), 91.into())]),
                    "s-1".into(),
                ]),
            )]),
        ),
    ]);
    let mut body = Vec::new();
    rmpv::encode::write_value(&mut body, &value).unwrap();
    assert_eq!(decode_message(&body).unwrap(), log_entry());
}
