//! The pure frame codec: a 4-byte little-endian length, then that many bytes
//! of MessagePack. No I/O here, so every edge is unit-testable.

use super::message::{Message, Timestamp};
use serde::Deserialize;
use thiserror::Error;
use uuid::Uuid;

/// Bytes in the length prefix.
pub const HEADER_LEN: usize = 4;
/// Largest body a frame may carry (1 MiB).
pub const MAX_FRAME_LEN: usize = 1_048_576;
/// Deepest nesting of maps and arrays a body may have: the envelope needs
/// about six levels, metadata may use 64 (checked when a row is built), the
/// rest is slack. Refusing deeper bodies *while* decoding keeps a hostile
/// frame from recursing through a loop thread's stack.
pub const MAX_NESTING: usize = 96;

/// A length prefix that cannot be resynchronised: the connection must close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FrameError {
    /// Declared length 0.
    #[error("frame length 0 is invalid (1 to {MAX_FRAME_LEN} bytes allowed)")]
    Empty,
    /// Declared length above [`MAX_FRAME_LEN`].
    #[error("frame length {0} exceeds the limit of {MAX_FRAME_LEN} bytes")]
    TooLarge(u32),
}

/// A frame body that is not a valid `Message`; framing stays intact.
#[derive(Debug, Error)]
#[error("invalid message: {0}")]
pub struct DecodeError(#[from] rmp_serde::decode::Error);

/// A message that cannot be framed.
#[derive(Debug, Error)]
pub enum EncodeError {
    /// Serialisation failed.
    #[error("cannot encode message: {0}")]
    Serialize(#[from] rmp_serde::encode::Error),
    /// The encoded body exceeds [`MAX_FRAME_LEN`].
    #[error("encoded message of {0} bytes exceeds the frame limit of {MAX_FRAME_LEN} bytes")]
    TooLarge(usize),
}

/// Reads the length prefix at the start of `buf`.
///
/// `Ok(None)`: fewer than [`HEADER_LEN`] bytes so far. `Ok(Some(n))`: the
/// body is `n` bytes (the whole frame is `HEADER_LEN + n`, which may not all
/// be in `buf` yet). The length is checked before anything is allocated.
pub fn frame_body_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    match len as usize {
        0 => Err(FrameError::Empty),
        n if n > MAX_FRAME_LEN => Err(FrameError::TooLarge(len)),
        n => Ok(Some(n)),
    }
}

/// Decodes one frame body, named-map or positional encoding, refusing
/// bodies nested deeper than [`MAX_NESTING`] and bodies with bytes after
/// the message (a second message in the same frame would otherwise vanish
/// without an answer).
pub fn decode_message(body: &[u8]) -> Result<Message, DecodeError> {
    // Strings are borrowed from `body` and copied once, into the message
    // (a reader would copy each into a buffer first, then again).
    let mut decoder = rmp_serde::Deserializer::from_read_ref(body);
    decoder.set_max_depth(MAX_NESTING);
    let msg = Message::deserialize(&mut decoder)?;
    // A borrowing decoder does not tell how much it read: one more marker
    // is asked for, and only "no byte left" means the body ended with the
    // message.
    match u8::deserialize(&mut decoder) {
        Err(rmp_serde::decode::Error::InvalidMarkerRead(e))
            if e.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            Ok(msg)
        }
        _ => Err(DecodeError(rmp_serde::decode::Error::Syntax(format!(
            "bytes after the message in a frame of {} bytes",
            body.len()
        )))),
    }
}

/// Appends `msg` as one frame (named-map encoding) to `out`.
///
/// On error `out` is left as it was.
pub fn encode_message(msg: &Message, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    let result = rmp_serde::encode::write_named(out, msg);
    let body_len = out.len() - start - HEADER_LEN;
    if let Err(e) = result {
        out.truncate(start);
        return Err(e.into());
    }
    if body_len > MAX_FRAME_LEN {
        out.truncate(start);
        return Err(EncodeError::TooLarge(body_len));
    }
    out[start..start + HEADER_LEN].copy_from_slice(&(body_len as u32).to_le_bytes());
    Ok(())
}

/// Appends one `LogResults` answer frame (id `id`, stamped `timestamp`)
/// whose entries are already encoded, each a `StoredLog` as
/// `rmp_serde::encode::write_named` writes it: the same bytes
/// [`encode_message`] writes for that answer, without holding every entry
/// decoded at once. The readers build their answers with it.
///
/// On error (the body would exceed [`MAX_FRAME_LEN`]) `out` is left as it
/// was.
pub fn encode_log_results<'a>(
    id: Uuid,
    timestamp: Timestamp,
    entries: impl ExactSizeIterator<Item = &'a [u8]>,
    total_count: u64,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    use rmp::encode::{write_array_len, write_bin, write_map_len, write_str, write_uint};
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    let count = u32::try_from(entries.len()).unwrap_or(u32::MAX);
    // Writing into a Vec cannot fail.
    let _ = write_map_len(out, 3);
    let _ = write_str(out, "id");
    let _ = write_bin(out, id.as_bytes());
    let _ = write_str(out, "timestamp");
    let _ = write_str(out, &timestamp.to_rfc3339());
    let _ = write_str(out, "payload");
    let _ = write_map_len(out, 1);
    let _ = write_str(out, "LogResults");
    let _ = write_map_len(out, 2);
    let _ = write_str(out, "entries");
    let _ = write_array_len(out, count);
    for entry in entries.take(count as usize) {
        out.extend_from_slice(entry);
    }
    let _ = write_str(out, "total_count");
    let _ = write_uint(out, total_count);
    let body_len = out.len() - start - HEADER_LEN;
    if body_len > MAX_FRAME_LEN {
        out.truncate(start);
        return Err(EncodeError::TooLarge(body_len));
    }
    out[start..start + HEADER_LEN].copy_from_slice(&(body_len as u32).to_le_bytes());
    Ok(())
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::message::*;
    use uuid::Uuid;

    fn log_message() -> Message {
        Message {
            id: Uuid::parse_str("0193f1e2-7c4a-7b3e-9d2f-1a2b3c4d5e6f").unwrap(),
            timestamp: Timestamp::parse_rfc3339("2026-11-26T22:34:56.123456Z").unwrap(),
            payload: Payload::LogEntry(LogFields {
                level: LogLevel::Info,
                component: "build".into(),
                message: "compiled 12 crates".into(),
                metadata: Some(rmpv::Value::Map(vec![(
                    "crates".into(),
                    rmpv::Value::from(12),
                )])),
                session_id: Some("s-1".into()),
            }),
        }
    }

    fn all_payloads() -> Vec<Payload> {
        let id = Uuid::now_v7();
        vec![
            log_message().payload,
            Payload::StartMonitoring {
                path: "/tmp/x".into(),
                recursive: true,
                patterns: vec!["*.md".into()],
                session_id: None,
            },
            Payload::StartMonitoring {
                path: "/tmp/y".into(),
                recursive: false,
                patterns: vec![],
                session_id: Some("s".into()),
            },
            Payload::ListMonitoring,
            Payload::Monitoring {
                paths: vec![crate::proto::MonitoredPath {
                    path: "/tmp/x".into(),
                    recursive: true,
                    patterns: vec!["*.md".into()],
                    session_id: None,
                    active: true,
                    watch_cap_reached: false,
                }],
            },
            Payload::StopMonitoring {
                path: "/tmp/x".into(),
            },
            Payload::SessionStart {
                session_id: "s".into(),
                identity: "me".into(),
                agent_type: Some("claude".into()),
                workspace: None,
            },
            Payload::SessionEnd {
                session_id: "s".into(),
            },
            Payload::QueryLogs {
                filter: LogFilter {
                    min_level: Some(LogLevel::Warn),
                    contains: Some("x".into()),
                    since: Some(Timestamp::from_micros(5)),
                    ..LogFilter::default()
                },
                limit: 10,
            },
            Payload::LogBatch {
                entries: vec![LogFields {
                    level: LogLevel::Error,
                    component: "c".into(),
                    message: "m".into(),
                    metadata: None,
                    session_id: None,
                }],
            },
            Payload::Authenticate { token: "t".into() },
            Payload::GetStatus,
            Payload::Ping,
            Payload::Acknowledgment {
                request_id: id,
                status: AckStatus::Rejected("why".into()),
            },
            Payload::Acknowledgment {
                request_id: id,
                status: AckStatus::Accepted,
            },
            Payload::LogResults {
                entries: vec![StoredLog {
                    id: 7,
                    uuid: id,
                    timestamp: Timestamp::from_micros(1_700_000_000_000_000),
                    level: LogLevel::Debug,
                    component: "c".into(),
                    session_id: None,
                    message: "m".into(),
                    metadata: None,
                    uid: None,
                }],
                total_count: 1,
            },
            Payload::Error {
                code: ErrorCode::Other("Novel".into()),
                message: "m".into(),
                details: Some(rmpv::Value::from("d")),
            },
            Payload::Status {
                components: vec![
                    ComponentStatus {
                        name: "writer".into(),
                        status: "healthy".into(),
                        message: "ok".into(),
                        reason: None,
                        since: None,
                    },
                    ComponentStatus {
                        name: "storage".into(),
                        status: "degraded".into(),
                        message: "nearly full; 1 GiB free".into(),
                        reason: Some("nearly full".into()),
                        since: Some(Timestamp::from_micros(1_700_000_000_000_000)),
                    },
                ],
                uptime: std::time::Duration::from_millis(1500),
                version: Some("0.1.0".into()),
            },
        ]
    }

    fn body(frame: &[u8]) -> &[u8] {
        let n = frame_body_len(frame).unwrap().unwrap();
        assert_eq!(frame.len(), HEADER_LEN + n);
        &frame[HEADER_LEN..]
    }

    #[test]
    fn every_variant_round_trips_named() {
        for payload in all_payloads() {
            let msg = Message::new(payload);
            let mut out = Vec::new();
            encode_message(&msg, &mut out).unwrap();
            assert_eq!(decode_message(body(&out)).unwrap(), msg);
        }
    }

    #[test]
    fn every_variant_round_trips_positional() {
        for payload in all_payloads() {
            let msg = Message::new(payload);
            let bytes = rmp_serde::to_vec(&msg).unwrap();
            assert_eq!(decode_message(&bytes).unwrap(), msg);
        }
    }

    #[test]
    fn named_encoding_is_a_map_with_named_keys() {
        let mut out = Vec::new();
        encode_message(&Message::new(Payload::Ping), &mut out).unwrap();
        let value = rmpv::decode::read_value(&mut &out[HEADER_LEN..]).unwrap();
        let map = value.as_map().expect("message is a map");
        let keys: Vec<_> = map.iter().map(|(k, _)| k.as_str().unwrap()).collect();
        assert_eq!(keys, ["id", "timestamp", "payload"]);
        assert_eq!(map[0].1.as_slice().map(<[u8]>::len), Some(16));
        assert_eq!(map[2].1.as_str(), Some("Ping"));
    }

    #[test]
    fn seed_positional_log_without_session_field_decodes() {
        // The seed's LogEntry has four fields; session_id is our extension.
        let value = rmpv::Value::Array(vec![
            rmpv::Value::Binary(vec![1; 16]),
            rmpv::Value::from("2026-11-26T22:34:56Z"),
            rmpv::Value::Map(vec![(
                "LogEntry".into(),
                rmpv::Value::Array(vec![
                    "Warn".into(),
                    "c".into(),
                    "m".into(),
                    rmpv::Value::Nil,
                ]),
            )]),
        ]);
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &value).unwrap();
        let msg = decode_message(&bytes).unwrap();
        let Payload::LogEntry(f) = msg.payload else {
            panic!("not a log entry")
        };
        assert_eq!(f.level, LogLevel::Warn);
        assert_eq!(f.session_id, None);
    }

    #[test]
    fn id_accepts_uuid_string() {
        let value = rmpv::Value::Map(vec![
            ("id".into(), "0193f1e2-7c4a-7b3e-9d2f-1a2b3c4d5e6f".into()),
            ("timestamp".into(), "2026-11-26T22:34:56+01:00".into()),
            ("payload".into(), "Ping".into()),
        ]);
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &value).unwrap();
        let msg = decode_message(&bytes).unwrap();
        assert_eq!(msg.id, log_message().id);
        assert_eq!(msg.timestamp.to_rfc3339(), "2026-11-26T21:34:56.000000Z");
    }

    #[test]
    fn bad_id_and_unknown_variant_are_decode_errors() {
        for value in [
            rmpv::Value::Map(vec![
                ("id".into(), rmpv::Value::Binary(vec![1; 15])),
                ("timestamp".into(), "2026-11-26T22:34:56Z".into()),
                ("payload".into(), "Ping".into()),
            ]),
            rmpv::Value::Map(vec![
                ("id".into(), rmpv::Value::Binary(vec![1; 16])),
                ("timestamp".into(), "2026-11-26T22:34:56Z".into()),
                ("payload".into(), "Teleport".into()),
            ]),
            rmpv::Value::Map(vec![
                ("id".into(), rmpv::Value::Binary(vec![1; 16])),
                ("timestamp".into(), "yesterday".into()),
                ("payload".into(), "Ping".into()),
            ]),
        ] {
            let mut bytes = Vec::new();
            rmpv::encode::write_value(&mut bytes, &value).unwrap();
            assert!(decode_message(&bytes).is_err(), "{value:?}");
        }
    }

    /// Regression (property `timestamps_decode_only_if_they_re_encode`):
    /// an offset that carries an instant past year 0000 or 9999 in UTC was
    /// accepted, stored, and then made every answer listing it undecodable
    /// (`-0001-12-31T23:59:00.000000Z` is not RFC 3339).
    #[test]
    fn timestamps_outside_years_0000_to_9999_in_utc_are_refused() {
        let ping_at = |ts: &str| {
            let value = rmpv::Value::Map(vec![
                ("id".into(), rmpv::Value::Binary(vec![1; 16])),
                ("timestamp".into(), ts.into()),
                ("payload".into(), "Ping".into()),
            ]);
            let mut bytes = Vec::new();
            rmpv::encode::write_value(&mut bytes, &value).unwrap();
            decode_message(&bytes)
        };
        for bad in ["0000-01-01T00:00:00+00:01", "9999-12-31T23:59:59-00:01"] {
            assert!(ping_at(bad).is_err(), "{bad}");
        }
        for (edge, micros) in [
            ("0000-01-01T00:00:00Z", Timestamp::MIN),
            ("0000-01-01T00:01:00+00:01", Timestamp::MIN),
            ("9999-12-31T23:59:59.999999999Z", Timestamp::MAX),
        ] {
            assert_eq!(ping_at(edge).unwrap().timestamp, micros, "{edge}");
        }
        // No instant outside the range can even be made, so every one
        // encodes as text a decoder accepts.
        for (t, edge) in [
            (Timestamp::MIN.as_micros() - 1, Timestamp::MIN),
            (Timestamp::MAX.as_micros() + 1, Timestamp::MAX),
            (i64::MIN, Timestamp::MIN),
        ] {
            let msg = Message {
                timestamp: Timestamp::from_micros(t),
                ..Message::new(Payload::Ping)
            };
            let mut out = Vec::new();
            encode_message(&msg, &mut out).unwrap();
            assert_eq!(decode_message(&out[4..]).unwrap().timestamp, edge);
        }
    }

    /// Regression (property `bytes_after_the_message_are_refused`): a body
    /// with bytes after its message decoded, so a second message packed
    /// into the same frame vanished without an answer.
    #[test]
    fn bytes_after_the_message_are_a_decode_error() {
        let mut out = Vec::new();
        encode_message(&Message::new(Payload::Ping), &mut out).unwrap();
        assert!(decode_message(&out[HEADER_LEN..]).is_ok());
        let two = [&out[HEADER_LEN..], &out[HEADER_LEN..]].concat();
        let err = decode_message(&two).unwrap_err().to_string();
        assert!(err.contains("bytes after the message"), "{err}");
        let nil_after = [&out[HEADER_LEN..], &[0xc0]].concat();
        assert!(decode_message(&nil_after).is_err());
    }

    #[test]
    fn length_prefix_edges() {
        assert_eq!(frame_body_len(&[]), Ok(None));
        assert_eq!(frame_body_len(&[1, 0, 0]), Ok(None));
        assert_eq!(frame_body_len(&0u32.to_le_bytes()), Err(FrameError::Empty));
        assert_eq!(frame_body_len(&1u32.to_le_bytes()), Ok(Some(1)));
        let max = MAX_FRAME_LEN as u32;
        assert_eq!(frame_body_len(&max.to_le_bytes()), Ok(Some(MAX_FRAME_LEN)));
        assert_eq!(
            frame_body_len(&(max + 1).to_le_bytes()),
            Err(FrameError::TooLarge(max + 1))
        );
        assert_eq!(
            frame_body_len(&u32::MAX.to_le_bytes()),
            Err(FrameError::TooLarge(u32::MAX))
        );
    }

    #[test]
    fn encode_refuses_bodies_over_the_limit_and_leaves_output_untouched() {
        let big = |n: usize| {
            Message::new(Payload::LogEntry(LogFields {
                level: LogLevel::Info,
                component: String::new(),
                message: "x".repeat(n),
                metadata: None,
                session_id: None,
            }))
        };
        let mut out = vec![9];
        let probe = {
            let mut v = Vec::new();
            encode_message(&big(0), &mut v).unwrap();
            v.len() - HEADER_LEN
        };
        // "x" * n is a str 32 header (5 bytes) for n >= 65536 instead of 1.
        let fits = MAX_FRAME_LEN - probe - 4;
        encode_message(&big(fits), &mut out).unwrap();
        assert_eq!(frame_body_len(&out[1..]), Ok(Some(MAX_FRAME_LEN)));
        let mut out = vec![9];
        assert!(matches!(
            encode_message(&big(fits + 1), &mut out),
            Err(EncodeError::TooLarge(n)) if n == MAX_FRAME_LEN + 1
        ));
        assert_eq!(out, [9]);
    }

    #[test]
    fn truncated_bodies_fail_to_decode() {
        let mut out = Vec::new();
        encode_message(&log_message(), &mut out).unwrap();
        let full = &out[HEADER_LEN..];
        for cut in 0..full.len() {
            assert!(decode_message(&full[..cut]).is_err(), "cut at {cut}");
        }
    }

    /// A LogEntry body whose metadata is `depth` nested one-element arrays,
    /// spliced in as raw bytes so building it needs no recursion.
    fn nested_metadata(depth: usize) -> Vec<u8> {
        let marker = "\u{1}nest\u{1}";
        let msg = Message::new(Payload::LogEntry(LogFields {
            level: LogLevel::Info,
            component: "c".into(),
            message: "m".into(),
            metadata: Some(rmpv::Value::from(marker)),
            session_id: None,
        }));
        let body = rmp_serde::to_vec_named(&msg).unwrap();
        let mut encoded_marker = Vec::new();
        rmpv::encode::write_value(&mut encoded_marker, &rmpv::Value::from(marker)).unwrap();
        let at = body
            .windows(encoded_marker.len())
            .position(|w| w == encoded_marker.as_slice())
            .unwrap();
        let mut out = body[..at].to_vec();
        out.extend(std::iter::repeat_n(0x91u8, depth));
        out.push(0xc0);
        out.extend_from_slice(&body[at + encoded_marker.len()..]);
        out
    }

    #[test]
    fn nesting_is_capped_while_decoding() {
        assert!(decode_message(&nested_metadata(64)).is_ok());
        assert!(decode_message(&nested_metadata(MAX_NESTING)).is_err());
        // On a loop thread's default 2 MiB stack, a debug build overflowed
        // at about 700 levels before the cap; 100,000 must be refused.
        let deep = std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(|| decode_message(&nested_metadata(100_000)).is_err())
            .unwrap()
            .join()
            .unwrap();
        assert!(deep);
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x2545F4914F6CDD1Du64;
        for len in 0..2000usize {
            let bytes: Vec<u8> = (0..len % 97)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = decode_message(&bytes);
        }
    }

    #[test]
    fn log_results_from_encoded_entries_match_the_codec() {
        let entry = |id: i64, message: &str| StoredLog {
            id,
            uuid: Uuid::from_u128(id as u128),
            timestamp: Timestamp::from_micros(id * 1000),
            level: LogLevel::Warn,
            component: "c".into(),
            session_id: (id % 2 == 0).then(|| "s".into()),
            message: message.into(),
            metadata: Some(rmpv::Value::Binary(vec![id as u8; 3])),
            uid: None,
        };
        let id = Uuid::now_v7();
        let timestamp = Timestamp::from_micros(1_700_000_000_123_456);
        for (count, total) in [(0, 0), (1, 1), (3, 200), (20, 70_000), (40, u64::MAX)] {
            let entries: Vec<StoredLog> = (0..count).map(|i| entry(i, "x")).collect();
            let encoded: Vec<Vec<u8>> = entries
                .iter()
                .map(|e| rmp_serde::to_vec_named(e).unwrap())
                .collect();
            let mut ours = Vec::new();
            encode_log_results(
                id,
                timestamp,
                encoded.iter().map(Vec::as_slice),
                total,
                &mut ours,
            )
            .unwrap();
            let message = Message {
                id,
                timestamp,
                payload: Payload::LogResults {
                    entries,
                    total_count: total,
                },
            };
            let mut theirs = Vec::new();
            encode_message(&message, &mut theirs).unwrap();
            assert_eq!(ours, theirs, "{count} entries, total {total}");
        }
        // Too large: refused, output untouched.
        let big = rmp_serde::to_vec_named(&entry(1, &"y".repeat(MAX_FRAME_LEN))).unwrap();
        let mut out = vec![7];
        let err = encode_log_results(id, timestamp, [big.as_slice()].into_iter(), 1, &mut out);
        assert!(matches!(err, Err(EncodeError::TooLarge(_))));
        assert_eq!(out, [7]);
    }
}
