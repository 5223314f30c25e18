//! Property tests of the frame codec: arbitrary messages round-trip in both
//! encodings the contract allows, and arbitrary or mutated bytes never panic
//! the decoder, which either decodes them or says why not.
//!
//! Whatever these find is pinned by a named regression test in `tests`.

use super::*;
use crate::proto::message::*;
use crate::testing::proptest_config as config;
use crate::testing::value_nodes::{count_nodes, node_mut};
use proptest::prelude::*;
use rmpv::Value;
use std::time::Duration;
use uuid::Uuid;

const FIRST_MICROS: i64 = Timestamp::MIN.as_micros();
const LAST_MICROS: i64 = Timestamp::MAX.as_micros();

fn uuid() -> impl Strategy<Value = Uuid> {
    prop_oneof![
        any::<u128>().prop_map(Uuid::from_u128),
        Just(Uuid::nil()),
        Just(Uuid::max()),
    ]
}

fn timestamp() -> impl Strategy<Value = Timestamp> {
    prop_oneof![
        4 => FIRST_MICROS..=LAST_MICROS,
        1 => prop::sample::select(vec![FIRST_MICROS, LAST_MICROS, 0, -1, 1]),
    ]
    .prop_map(Timestamp::from_micros)
}

/// Text of every kind: empty, ASCII, any Unicode scalar (NUL and controls
/// included), and some multi-byte samples.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just(String::new()),
        3 => "[a-z0-9 _./-]{1,24}",
        3 => any::<String>(),
        1 => prop::sample::select(vec!["日本語のログ", "🦀🦀", "\u{0}", "e\u{301}", "\u{10ffff}"])
            .prop_map(str::to_owned),
    ]
}

fn opt_text() -> impl Strategy<Value = Option<String>> {
    prop::option::of(text())
}

/// Any MessagePack value except NaN floats (which equal nothing, not even
/// themselves) and non-UTF-8 strings (which serde cannot hand back).
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Nil),
        any::<bool>().prop_map(Value::Boolean),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f32>()
            .prop_filter("NaN", |f| !f.is_nan())
            .prop_map(Value::F32),
        any::<f64>()
            .prop_filter("NaN", |f| !f.is_nan())
            .prop_map(Value::F64),
        text().prop_map(Value::from),
        prop::collection::vec(any::<u8>(), 0..24).prop_map(Value::Binary),
        (any::<i8>(), prop::collection::vec(any::<u8>(), 0..20))
            .prop_map(|(t, d)| Value::Ext(t, d)),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((text().prop_map(Value::from), inner.clone()), 0..6)
                .prop_map(Value::Map),
            // Keys need not be strings.
            prop::collection::vec((inner.clone(), inner), 0..3).prop_map(Value::Map),
        ]
    })
}

/// Metadata: absent, or any value but a bare nil (`Some(Nil)` and `None` are
/// the same bytes on the wire and both mean "no metadata").
fn metadata() -> impl Strategy<Value = Option<Value>> {
    prop::option::of(value().prop_filter("bare nil", |v| !v.is_nil()))
}

fn level() -> impl Strategy<Value = LogLevel> {
    prop::sample::select(LogLevel::ALL.to_vec())
}

fn log_fields() -> impl Strategy<Value = LogFields> {
    (level(), text(), text(), metadata(), opt_text()).prop_map(
        |(level, component, message, metadata, session_id)| LogFields {
            level,
            component,
            message,
            metadata,
            session_id,
        },
    )
}

fn log_filter() -> impl Strategy<Value = LogFilter> {
    (
        prop::option::of(level()),
        opt_text(),
        opt_text(),
        prop::option::of(timestamp()),
        prop::option::of(timestamp()),
        opt_text(),
        prop::option::of(any::<i64>()),
        prop::option::of(any::<u32>()),
    )
        .prop_map(
            |(min_level, component, session_id, since, until, contains, after_id, uid)| LogFilter {
                min_level,
                component,
                session_id,
                since,
                until,
                contains,
                after_id,
                uid,
            },
        )
}

fn stored_log() -> impl Strategy<Value = StoredLog> {
    (
        any::<i64>(),
        uuid(),
        timestamp(),
        level(),
        text(),
        opt_text(),
        text(),
        metadata(),
        prop::option::of(any::<u32>()),
    )
        .prop_map(
            |(id, uuid, timestamp, level, component, session_id, message, metadata, uid)| {
                StoredLog {
                    id,
                    uuid,
                    timestamp,
                    level,
                    component,
                    session_id,
                    message,
                    metadata,
                    uid,
                }
            },
        )
}

fn ack_status() -> impl Strategy<Value = AckStatus> {
    prop_oneof![
        Just(AckStatus::Accepted),
        Just(AckStatus::Queued),
        text().prop_map(AckStatus::Rejected),
    ]
}

/// Every code; `Other` only with names no known code has (a known name
/// always decodes to its own variant, and every known name lacks `X-`).
fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        prop::sample::select(vec![
            ErrorCode::FrameTooLarge,
            ErrorCode::InvalidFrame,
            ErrorCode::InvalidMessage,
            ErrorCode::Unauthorized,
            ErrorCode::RateLimited,
            ErrorCode::Unavailable,
            ErrorCode::Unsupported,
            ErrorCode::InvalidRequest,
            ErrorCode::Internal,
        ]),
        text().prop_map(|s| ErrorCode::Other(format!("X-{s}"))),
    ]
}

fn duration() -> impl Strategy<Value = Duration> {
    (any::<u64>(), 0..1_000_000_000u32).prop_map(|(s, n)| Duration::new(s, n))
}

fn payload() -> impl Strategy<Value = Payload> {
    let names = || prop::collection::vec(text(), 0..4);
    prop_oneof![
        log_fields().prop_map(Payload::LogEntry),
        (text(), any::<bool>(), names(), opt_text()).prop_map(
            |(path, recursive, patterns, session_id)| Payload::StartMonitoring {
                path,
                recursive,
                patterns,
                session_id,
            }
        ),
        text().prop_map(|path| Payload::StopMonitoring { path }),
        (text(), text(), opt_text(), opt_text()).prop_map(
            |(session_id, identity, agent_type, workspace)| Payload::SessionStart {
                session_id,
                identity,
                agent_type,
                workspace,
            }
        ),
        text().prop_map(|session_id| Payload::SessionEnd { session_id }),
        (log_filter(), any::<u64>())
            .prop_map(|(filter, limit)| Payload::QueryLogs { filter, limit }),
        prop::collection::vec(log_fields(), 0..6).prop_map(|entries| Payload::LogBatch { entries }),
        text().prop_map(|token| Payload::Authenticate { token }),
        Just(Payload::GetStatus),
        Just(Payload::Ping),
        Just(Payload::ListMonitoring),
        (uuid(), ack_status())
            .prop_map(|(request_id, status)| Payload::Acknowledgment { request_id, status }),
        (prop::collection::vec(stored_log(), 0..4), any::<u64>()).prop_map(
            |(entries, total_count)| Payload::LogResults {
                entries,
                total_count
            }
        ),
        (error_code(), text(), metadata()).prop_map(|(code, message, details)| Payload::Error {
            code,
            message,
            details
        }),
        (
            prop::collection::vec(
                (
                    text(),
                    text(),
                    text(),
                    opt_text(),
                    prop::option::of(timestamp())
                )
                    .prop_map(|(name, status, message, reason, since)| {
                        ComponentStatus {
                            name,
                            status,
                            message,
                            reason,
                            since,
                        }
                    }),
                0..4
            ),
            duration(),
            opt_text()
        )
            .prop_map(|(components, uptime, version)| Payload::Status {
                components,
                uptime,
                version
            }),
        prop::collection::vec(
            (
                text(),
                any::<bool>(),
                names(),
                opt_text(),
                any::<bool>(),
                any::<bool>()
            )
                .prop_map(
                    |(path, recursive, patterns, session_id, active, watch_cap_reached)| {
                        MonitoredPath {
                            path,
                            recursive,
                            patterns,
                            session_id,
                            active,
                            watch_cap_reached,
                        }
                    }
                ),
            0..3
        )
        .prop_map(|paths| Payload::Monitoring { paths }),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    (uuid(), timestamp(), payload()).prop_map(|(id, timestamp, payload)| Message {
        id,
        timestamp,
        payload,
    })
}

/// One frame of `msg` in the named encoding.
fn frame(msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    encode_message(msg, &mut out).expect("a generated message encodes");
    out
}

/// A byte-level edit of a frame (header included).
#[derive(Debug, Clone)]
enum Mutation {
    /// Flip bit `bit` of the byte at `at` (modulo the length).
    FlipBit { at: usize, bit: u8 },
    /// Overwrite the byte at `at` with `byte`.
    SetByte { at: usize, byte: u8 },
    /// Keep only the first `len` bytes.
    Truncate { len: usize },
    /// Insert `bytes` at `at`.
    Insert { at: usize, bytes: Vec<u8> },
    /// Remove up to `len` bytes from `at`.
    Remove { at: usize, len: usize },
    /// Copy up to `len` bytes from `from` to before `to` (a splice of the
    /// frame with itself).
    Duplicate { from: usize, len: usize, to: usize },
    /// Replace the length prefix.
    Length(u32),
    /// Add `delta` to the length prefix (wrapping).
    LengthDelta(i32),
}

/// Bytes that mean something to a MessagePack decoder: the never-used
/// `0xc1`, nil, the 32-bit length markers, fix-map and fix-array headers.
const INTERESTING: &[u8] = &[
    0x00, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xc0, 0xc1, 0xc4, 0xc6, 0xc7, 0xc9, 0xcb, 0xd9,
    0xdb, 0xdc, 0xdd, 0xde, 0xdf, 0xff,
];

fn mutation() -> impl Strategy<Value = Mutation> {
    let byte = prop_oneof![any::<u8>(), prop::sample::select(INTERESTING)];
    let length = prop_oneof![
        Just(0u32),
        Just(1),
        Just(MAX_FRAME_LEN as u32),
        Just(MAX_FRAME_LEN as u32 + 1),
        Just(u32::MAX),
        any::<u32>(),
        0..4096u32,
    ];
    prop_oneof![
        4 => (any::<usize>(), 0..8u8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        3 => (any::<usize>(), byte).prop_map(|(at, byte)| Mutation::SetByte { at, byte }),
        1 => any::<usize>().prop_map(|len| Mutation::Truncate { len }),
        2 => (any::<usize>(), prop::collection::vec(prop_oneof![any::<u8>(), prop::sample::select(INTERESTING)], 1..12))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<usize>(), 1..16usize).prop_map(|(at, len)| Mutation::Remove { at, len }),
        1 => (any::<usize>(), 1..64usize, any::<usize>())
            .prop_map(|(from, len, to)| Mutation::Duplicate { from, len, to }),
        1 => length.prop_map(Mutation::Length),
        1 => (-64..64i32).prop_map(Mutation::LengthDelta),
    ]
}

fn apply(frame: &mut Vec<u8>, m: &Mutation) {
    let len = frame.len();
    let pos = |at: usize| if len == 0 { 0 } else { at % len };
    match *m {
        Mutation::FlipBit { at, bit } if len > 0 => frame[pos(at)] ^= 1 << bit,
        Mutation::SetByte { at, byte } if len > 0 => frame[pos(at)] = byte,
        Mutation::FlipBit { .. } | Mutation::SetByte { .. } => {}
        Mutation::Truncate { len: keep } => frame.truncate(keep % (len + 1)),
        Mutation::Insert { at, ref bytes } => {
            let at = at % (len + 1);
            frame.splice(at..at, bytes.iter().copied());
        }
        Mutation::Remove { at, len: n } => {
            let at = pos(at);
            let end = (at + n).min(len);
            frame.drain(at..end);
        }
        Mutation::Duplicate { from, len: n, to } => {
            let from = pos(from);
            let piece = frame[from..(from + n).min(len)].to_vec();
            let to = to % (frame.len() + 1);
            frame.splice(to..to, piece);
        }
        Mutation::Length(n) if len >= HEADER_LEN => {
            frame[..HEADER_LEN].copy_from_slice(&n.to_le_bytes())
        }
        Mutation::LengthDelta(d) if len >= HEADER_LEN => {
            let n = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]);
            frame[..HEADER_LEN].copy_from_slice(&n.wrapping_add_signed(d).to_le_bytes());
        }
        Mutation::Length(_) | Mutation::LengthDelta(_) => {}
    }
}

/// `decode_message` as it was before strings were borrowed: a decoder that
/// reads from a slice, and refuses whatever it leaves unread. The borrowing
/// decoder must accept exactly what this one accepts, as the same message.
fn decode_by_reader(body: &[u8]) -> Result<Message, String> {
    let mut rest = body;
    let mut decoder = rmp_serde::Deserializer::new(&mut rest);
    decoder.set_max_depth(MAX_NESTING);
    let msg = Message::deserialize(&mut decoder).map_err(|e| e.to_string())?;
    match rest.len() {
        0 => Ok(msg),
        n => Err(format!("{n} bytes after the message")),
    }
}

/// What a decoder may do with any input: decode it, or refuse it with an
/// error. A message it accepts must itself be encodable and come back
/// unchanged from its own encoding, so that the daemon can always echo,
/// store and answer what it took.
fn check_decodes_or_refuses(body: &[u8]) -> Result<(), TestCaseError> {
    let decoded = decode_message(body);
    let by_reader = decode_by_reader(body);
    prop_assert_eq!(
        decoded.is_ok(),
        by_reader.is_ok(),
        "the borrowing decoder says {:?}, a reader that counts what is left says {:?}",
        decoded.as_ref().map_err(ToString::to_string),
        by_reader
    );
    if let (Ok(msg), Ok(other)) = (&decoded, &by_reader) {
        // Compared as bytes: a NaN in metadata equals nothing.
        prop_assert_eq!(frame(msg), frame(other));
    }
    if let Ok(msg) = decoded {
        let mut out = Vec::new();
        match encode_message(&msg, &mut out) {
            Ok(()) => {
                // Compared as bytes: a NaN in metadata equals nothing.
                let again = decode_message(&out[HEADER_LEN..]).map(|m| frame(&m));
                prop_assert!(
                    again.as_ref().is_ok_and(|f| *f == out),
                    "accepted {msg:?} but its own encoding decodes to {again:?}"
                );
            }
            // Named keys make the body longer than the input: fine as long
            // as the input was near the limit.
            Err(EncodeError::TooLarge(_)) => prop_assert!(body.len() * 3 > MAX_FRAME_LEN),
            Err(e) => prop_assert!(false, "accepted {msg:?} but cannot encode it: {e}"),
        }
    }
    Ok(())
}

/// Runs `check` on every frame the daemon would cut from `stream`: frames
/// back to back, until a length prefix it must refuse or a partial frame.
fn for_each_frame(
    stream: &[u8],
    mut check: impl FnMut(&[u8]) -> Result<(), TestCaseError>,
) -> Result<(), TestCaseError> {
    let mut rest = stream;
    loop {
        match frame_body_len(rest) {
            Ok(Some(n)) if rest.len() >= HEADER_LEN + n => {
                check(&rest[HEADER_LEN..HEADER_LEN + n])?;
                rest = &rest[HEADER_LEN + n..];
            }
            Ok(Some(n)) => {
                prop_assert!((1..=MAX_FRAME_LEN).contains(&n));
                return Ok(());
            }
            Ok(None) => {
                prop_assert!(rest.len() < HEADER_LEN);
                return Ok(());
            }
            Err(FrameError::Empty) => {
                prop_assert_eq!(&rest[..HEADER_LEN], &[0u8; 4][..]);
                return Ok(());
            }
            Err(FrameError::TooLarge(n)) => {
                prop_assert!(n as usize > MAX_FRAME_LEN);
                return Ok(());
            }
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn any_message_round_trips_named(msg in message()) {
        let out = frame(&msg);
        prop_assert_eq!(frame_body_len(&out), Ok(Some(out.len() - HEADER_LEN)));
        prop_assert_eq!(decode_message(&out[HEADER_LEN..]).unwrap(), msg);
    }

    #[test]
    fn any_message_round_trips_positional(msg in message()) {
        let body = rmp_serde::to_vec(&msg).unwrap();
        prop_assert_eq!(decode_message(&body).unwrap(), msg);
    }

    #[test]
    fn bytes_after_the_message_are_refused(
        msg in message(),
        trailing in prop::collection::vec(any::<u8>(), 1..16),
        positional in any::<bool>(),
    ) {
        let mut body = if positional { rmp_serde::to_vec(&msg).unwrap() } else { rmp_serde::to_vec_named(&msg).unwrap() };
        body.extend(trailing);
        prop_assert!(decode_message(&body).is_err());
    }

    #[test]
    fn any_header_is_read_without_panic(header in any::<[u8; 4]>(), tail in prop::collection::vec(any::<u8>(), 0..8)) {
        let mut buf = header.to_vec();
        buf.extend(tail);
        let n = u32::from_le_bytes(header);
        match frame_body_len(&buf) {
            Ok(Some(len)) => prop_assert!(len == n as usize && (1..=MAX_FRAME_LEN).contains(&len)),
            Ok(None) => prop_assert!(false, "four bytes are a whole header"),
            Err(FrameError::Empty) => prop_assert_eq!(n, 0),
            Err(FrameError::TooLarge(m)) => prop_assert!(m == n && n as usize > MAX_FRAME_LEN),
        }
        for short in 0..HEADER_LEN {
            prop_assert_eq!(frame_body_len(&buf[..short]), Ok(None));
        }
    }

    #[test]
    fn arbitrary_bytes_decode_or_refuse(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check_decodes_or_refuses(&bytes)?;
        for_each_frame(&bytes, check_decodes_or_refuses)?;
    }

    #[test]
    fn mutated_frames_decode_or_refuse(
        msgs in prop::collection::vec(message(), 1..4),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let mut stream: Vec<u8> = msgs.iter().flat_map(frame).collect();
        for m in &mutations {
            apply(&mut stream, m);
        }
        for_each_frame(&stream, check_decodes_or_refuses)?;
        if stream.len() > HEADER_LEN {
            check_decodes_or_refuses(&stream[HEADER_LEN..])?;
        }
    }

    #[test]
    fn mutated_positional_bodies_decode_or_refuse(
        msg in message(),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let mut body = rmp_serde::to_vec(&msg).unwrap();
        for m in &mutations {
            apply(&mut body, m);
        }
        check_decodes_or_refuses(&body)?;
    }
}

/// Timestamp text near every edge: the first and last instants RFC 3339 can
/// write, offsets that carry them past year 0 or 9999 in UTC, leap seconds,
/// impossible dates, lowercase separators, and plain garbage.
fn timestamp_text() -> impl Strategy<Value = String> {
    let year = prop_oneof![
        Just(0u32),
        Just(1),
        Just(1969),
        Just(1970),
        Just(2026),
        Just(9998),
        Just(9999),
        0..10_000u32
    ];
    let offset = prop_oneof![
        Just("Z".to_owned()),
        Just("z".to_owned()),
        (any::<bool>(), 0..24u32, 0..60u32)
            .prop_map(|(neg, h, m)| format!("{}{h:02}:{m:02}", if neg { '-' } else { '+' })),
    ];
    let fraction = prop_oneof![Just(String::new()), "\\.[0-9]{1,12}"];
    prop_oneof![
        4 => (year, 1..=12u32, prop_oneof![1..=28u32, 28..=31u32], 0..24u32, 0..60u32, prop_oneof![0..60u32, Just(60)], fraction, offset)
            .prop_map(|(y, mo, d, h, mi, s, f, o)| format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{f}{o}")),
        1 => Just("0000-01-01T00:00:00+00:01".to_owned()),
        1 => Just("9999-12-31T23:59:59-00:01".to_owned()),
        1 => "[0-9T:+.Z-]{0,32}",
    ]
}

/// A structural edit of a message's MessagePack value: well-formed
/// MessagePack that is not (quite) a message.
#[derive(Debug, Clone)]
enum Edit {
    /// Replace node `at` (pre-order index, modulo the node count).
    Replace { at: usize, with: Value },
    /// Drop one entry of the map or array at node `at`.
    Drop { at: usize, index: usize },
    /// Add an entry to the map at node `at` (an unknown field, or a
    /// duplicate of a known one).
    AddEntry { at: usize, key: Value, value: Value },
    /// Rename the map key or replace the string at node `at` (unknown
    /// variants and fields).
    Rename { at: usize, name: String },
    /// Turn the map at node `at` into an array of its values (positional).
    Positional { at: usize },
}

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "id",
            "timestamp",
            "payload",
            "LogEntry",
            "LogBatch",
            "entries",
            "level",
            "component",
            "message",
            "metadata",
            "session_id",
            "Ping",
            "QueryLogs",
            "filter",
            "limit",
            "Authenticate",
            "token",
            "Teleport",
            "",
            "Acknowledgment",
            "request_id",
            "status",
        ])
        .prop_map(str::to_owned),
        text(),
    ]
}

fn wire_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => value(),
        1 => timestamp_text().prop_map(Value::from),
        1 => field_name().prop_map(Value::from),
        1 => prop_oneof![Just(15usize), Just(16), Just(17), 0..40usize]
            .prop_flat_map(|n| prop::collection::vec(any::<u8>(), n))
            .prop_map(Value::Binary),
        1 => prop::sample::select(vec![
            Value::from(u64::MAX), Value::from(i64::MIN), Value::from(-1), Value::F64(f64::NAN),
            Value::F64(f64::INFINITY), Value::F32(-0.0),
        ]),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<usize>(), wire_value()).prop_map(|(at, with)| Edit::Replace { at, with }),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(at, index)| Edit::Drop { at, index }),
        1 => (any::<usize>(), field_name().prop_map(Value::from), wire_value())
            .prop_map(|(at, key, value)| Edit::AddEntry { at, key, value }),
        2 => (any::<usize>(), field_name()).prop_map(|(at, name)| Edit::Rename { at, name }),
        1 => any::<usize>().prop_map(|at| Edit::Positional { at }),
    ]
}

fn apply_edit(root: &mut Value, e: &Edit) {
    let total = count_nodes(root);
    match e {
        Edit::Replace { at, with } => *node_mut(root, at % total) = with.clone(),
        Edit::Drop { at, index } => match node_mut(root, at % total) {
            Value::Array(items) if !items.is_empty() => {
                let i = index % items.len();
                items.remove(i);
            }
            Value::Map(entries) if !entries.is_empty() => {
                let i = index % entries.len();
                entries.remove(i);
            }
            _ => {}
        },
        Edit::AddEntry { at, key, value } => {
            if let Value::Map(entries) = node_mut(root, at % total) {
                entries.push((key.clone(), value.clone()));
            }
        }
        Edit::Rename { at, name } => match node_mut(root, at % total) {
            Value::Map(entries) if !entries.is_empty() => entries[0].0 = Value::from(name.as_str()),
            node @ Value::String(_) => *node = Value::from(name.as_str()),
            _ => {}
        },
        Edit::Positional { at } => {
            let node = node_mut(root, at % total);
            if let Value::Map(entries) = node {
                *node = Value::Array(entries.drain(..).map(|(_, v)| v).collect());
            }
        }
    }
}

fn to_bytes(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).expect("writing to a Vec cannot fail");
    out
}

/// `depth` nested containers around nil, each an array, a map under a key
/// or a map keyed by the next level, chosen by `kinds` (cycled).
fn nested_bytes(depth: usize, kinds: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(depth * 3 + 1);
    for i in 0..depth {
        match kinds[i % kinds.len()] % 3 {
            0 => out.push(0x91),
            1 => out.extend_from_slice(&[0x81, 0xa1, b'k']),
            _ => out.push(0x81),
        }
    }
    out.push(0xc0);
    // A map keyed by the next level still needs its value.
    let open_keys = (0..depth)
        .filter(|i| kinds[i % kinds.len()] % 3 == 2)
        .count();
    out.extend(std::iter::repeat_n(0xc0, open_keys));
    out
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn timestamps_decode_only_if_they_re_encode(text in timestamp_text()) {
        let t = Timestamp::parse_rfc3339(&text);
        if let Ok(t) = t {
            let again = Timestamp::parse_rfc3339(&t.to_rfc3339());
            prop_assert_eq!(again, Ok(t), "{} was accepted as {}", text, t);
        }
        let msg = Value::Map(vec![
            ("id".into(), Value::Binary(vec![7; 16])),
            ("timestamp".into(), Value::from(text.as_str())),
            ("payload".into(), "Ping".into()),
        ]);
        check_decodes_or_refuses(&to_bytes(&msg))?;
    }

    #[test]
    fn edited_messages_decode_or_refuse(
        msg in message(),
        edits in prop::collection::vec(edit(), 1..4),
        positional in any::<bool>(),
    ) {
        let body = if positional { rmp_serde::to_vec(&msg).unwrap() } else { rmp_serde::to_vec_named(&msg).unwrap() };
        let mut root = rmpv::decode::read_value(&mut body.as_slice()).unwrap();
        for e in &edits {
            apply_edit(&mut root, e);
        }
        check_decodes_or_refuses(&to_bytes(&root))?;
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed(
        msg in message(),
        depth in prop_oneof![0..2 * MAX_NESTING, Just(MAX_NESTING), 2 * MAX_NESTING..200_000],
        kinds in prop::collection::vec(any::<u8>(), 1..4),
        at in any::<usize>(),
    ) {
        // The nest replaces a random node of a real message, so it may sit
        // in metadata, in an id, in the payload or be the whole body.
        let mut root = rmpv::decode::read_value(&mut rmp_serde::to_vec_named(&msg).unwrap().as_slice()).unwrap();
        let marker = Value::from("\u{1}nest-here\u{1}");
        let total = count_nodes(&root);
        *node_mut(&mut root, at % total) = marker.clone();
        let body = to_bytes(&root);
        let mark = to_bytes(&marker);
        let pos = body.windows(mark.len()).position(|w| w == mark.as_slice()).unwrap();
        let mut deep = body[..pos].to_vec();
        deep.extend(nested_bytes(depth, &kinds));
        deep.extend_from_slice(&body[pos + mark.len()..]);
        // A loop thread has 8 MiB; a quarter of that must already suffice.
        let (decoded, by_reader, body_depth) = std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(move || {
                let r = decode_message(&deep).map(|_| ());
                (r.map_err(|e| e.to_string()), decode_by_reader(&deep).map(|_| ()), depth)
            })
            .unwrap()
            .join()
            .expect("decoding must not overflow the stack");
        prop_assert_eq!(decoded.is_ok(), by_reader.is_ok(), "{:?} / {:?}", decoded, by_reader);
        if body_depth > MAX_NESTING {
            prop_assert!(decoded.is_err(), "{body_depth} levels were accepted");
        }
    }
}

/// A named-map message with these three fields, as bytes.
fn named(id: Value, timestamp: Value, payload: Value) -> Vec<u8> {
    to_bytes(&Value::Map(vec![
        ("id".into(), id),
        ("timestamp".into(), timestamp),
        ("payload".into(), payload),
    ]))
}

/// A string no value can hold, put in place by [`splice_raw`].
const RAW: &str = "\u{1}raw\u{1}";

/// `body` with every encoded [`RAW`] replaced by `raw` as written, so that
/// a test can put bytes no value can hold (a str of invalid UTF-8) anywhere.
fn splice_raw(body: Vec<u8>, raw: &[u8]) -> Vec<u8> {
    let mark = to_bytes(&Value::from(RAW));
    let mut out = Vec::with_capacity(body.len());
    let mut rest = body.as_slice();
    while let Some(pos) = rest.windows(mark.len()).position(|w| w == mark.as_slice()) {
        out.extend_from_slice(&rest[..pos]);
        out.extend_from_slice(raw);
        rest = &rest[pos + mark.len()..];
    }
    out.extend_from_slice(rest);
    out
}

/// Hand-made edges where borrowing could change what is accepted: strings
/// as bin and bin as strings, invalid UTF-8, ids in every form, extension
/// values, enums in unusual shapes, containers with too many or too few
/// items, and bytes after the message. Each must decode exactly as a
/// reader that counts what is left decodes it.
#[test]
fn hand_made_edges_decode_as_a_reader_would() {
    let raw = || Value::from(RAW);
    let id = || Value::Binary(vec![7; 16]);
    let ts = || Value::from("2026-12-08T00:00:00Z");
    let (info, c, nil) = (|| Value::from("Info"), || Value::from("c"), || Value::Nil);
    let bin = |b: &[u8]| Value::Binary(b.to_vec());
    let ext = |t: i8, n: usize| Value::Ext(t, vec![0; n]);
    let one = |key: &str, value: Value| Value::Map(vec![(key.into(), value)]);
    let entry = |level: Value, component: Value, metadata: Value| {
        let fields = [
            ("level", level),
            ("component", component),
            ("message", "m".into()),
        ];
        let mut fields: Vec<(Value, Value)> =
            fields.into_iter().map(|(k, v)| (k.into(), v)).collect();
        fields.push(("metadata".into(), metadata));
        named(id(), ts(), one("LogEntry", Value::Map(fields)))
    };
    let ping = |id: Value, ts: Value| named(id, ts, "Ping".into());
    let payload = |p: Value| named(id(), ts(), p);
    let bad_utf8: &[u8] = &[0xa2, 0xff, 0xfe];
    let bad_16: Vec<u8> = [0xb0].into_iter().chain(0xf0..=0xff).collect();
    let uuid_text = "0193f1e2-7c4a-7b3e-9d2f-1a2b3c4d5e6f";
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("plain", entry(info(), c(), nil())),
        (
            "component bad UTF-8",
            splice_raw(entry(info(), raw(), nil()), bad_utf8),
        ),
        ("component as bin", entry(info(), bin(b"c"), nil())),
        ("component as bad bin", entry(info(), bin(&[0xff]), nil())),
        ("component as ext", entry(info(), ext(1, 1), nil())),
        (
            "metadata bad UTF-8",
            splice_raw(entry(info(), c(), raw()), bad_utf8),
        ),
        ("metadata ext timestamp", entry(info(), c(), ext(-1, 12))),
        (
            "metadata ext of 0 bytes",
            splice_raw(entry(info(), c(), raw()), &[0xc7, 0, 5]),
        ),
        ("metadata bin", entry(info(), c(), bin(&[1, 2]))),
        ("level as bin", entry(bin(b"Info"), c(), nil())),
        ("level as index", entry(Value::from(2), c(), nil())),
        ("level as map", entry(one("Info", nil()), c(), nil())),
        (
            "level bad UTF-8",
            splice_raw(entry(raw(), c(), nil()), bad_utf8),
        ),
        ("id as string", ping(uuid_text.into(), ts())),
        (
            "id as 32 digits",
            ping(uuid_text.replace('-', "").into(), ts()),
        ),
        ("id as 16 chars", ping("0123456789abcdef".into(), ts())),
        (
            "id as 16 bytes of bad UTF-8",
            splice_raw(ping(raw(), ts()), &bad_16),
        ),
        (
            "id as 16 ints",
            ping(Value::Array(vec![Value::from(1); 16]), ts()),
        ),
        (
            "id as 17 ints",
            ping(Value::Array(vec![Value::from(1); 17]), ts()),
        ),
        ("id as 15 bytes", ping(bin(&[1; 15]), ts())),
        ("id as ext", ping(ext(1, 16), ts())),
        ("timestamp as bin", ping(id(), bin(b"2026-12-08T00:00:00Z"))),
        ("timestamp as ext", ping(id(), ext(-1, 8))),
        (
            "timestamp bad UTF-8",
            splice_raw(ping(id(), raw()), bad_utf8),
        ),
        ("payload as bin", payload(bin(b"Ping"))),
        ("payload as map to nil", payload(one("Ping", nil()))),
        ("payload as map to 0", payload(one("Ping", Value::from(0)))),
        (
            "payload as map of two",
            payload(Value::Map(vec![("Ping".into(), nil()); 2])),
        ),
        (
            "payload as array",
            payload(Value::Array(vec!["Ping".into()])),
        ),
        ("payload as index", payload(Value::from(0))),
        (
            "patterns as empty bin",
            payload(one(
                "StartMonitoring",
                Value::Array(vec!["/".into(), true.into(), bin(&[])]),
            )),
        ),
        (
            "entries as empty bin",
            payload(one("LogBatch", one("entries", bin(&[])))),
        ),
        (
            "positional entry of six",
            payload(one(
                "LogEntry",
                Value::Array(vec![info(), c(), "m".into(), nil(), nil(), nil()]),
            )),
        ),
        (
            "positional entry of three",
            payload(one("LogEntry", Value::Array(vec![info(), c(), "m".into()]))),
        ),
        (
            "positional message",
            to_bytes(&Value::Array(vec![id(), ts(), "Ping".into()])),
        ),
        (
            "positional message of four",
            to_bytes(&Value::Array(vec![id(), ts(), "Ping".into(), nil()])),
        ),
        (
            "positional message of two",
            to_bytes(&Value::Array(vec![id(), ts()])),
        ),
    ];
    // A map that says it has one entry more than it has; then that entry,
    // unknown.
    let mut short = ping(id(), ts());
    short[0] = 0x84;
    cases.push(("map one entry short", short.clone()));
    short.extend(to_bytes(&"x".into()));
    short.extend(to_bytes(&Value::from(1)));
    cases.push(("unknown field", short));
    let whole = ping(id(), ts());
    for tail in [
        &[0xc0][..],
        &[0xc1],
        &[0xd9],
        &[0xd9, 5],
        &[0xdd, 0xff, 0xff, 0xff, 0xff],
        &whole,
    ] {
        let mut body = whole.clone();
        body.extend_from_slice(tail);
        cases.push(("bytes after", body));
    }
    for (name, body) in &cases {
        let decoded = decode_message(body).map_err(|e| e.to_string());
        let by_reader = decode_by_reader(body);
        assert_eq!(
            decoded.is_ok(),
            by_reader.is_ok(),
            "{name}: {decoded:?} / {by_reader:?}"
        );
        if let (Ok(a), Ok(b)) = (&decoded, &by_reader) {
            assert_eq!(frame(a), frame(b), "{name}");
        }
    }
    // The edges are real ones: some of each kind are accepted.
    let accepted = |name: &str| {
        cases
            .iter()
            .any(|(n, b)| *n == name && decode_message(b).is_ok())
    };
    for name in [
        "component as bin",
        "metadata bad UTF-8",
        "id as 16 bytes of bad UTF-8",
        "level as map",
        "patterns as empty bin",
    ] {
        assert!(accepted(name), "{name}");
    }
}
