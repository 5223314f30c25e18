//! Seeded generation of hostile input: valid requests of every variant,
//! then mutated at the byte level or in their MessagePack structure, plus
//! frames built to sit at and beyond every limit.

use codi_monitor::proto::{
    encode_message, AckStatus, ComponentStatus, ErrorCode, LogFields, LogFilter, LogLevel, Message,
    MonitoredPath, Payload, StoredLog, Timestamp, HEADER_LEN, MAX_FRAME_LEN,
};
use rmpv::Value;
#[path = "../../src/testing/value_nodes.rs"]
mod value_nodes;
use std::time::Duration;
use uuid::Uuid;
use value_nodes::{count_nodes, node_mut};

/// A small, fast, seedable PRNG (xorshift64*), seeded through splitmix64 so
/// that nearby seeds give unrelated streams.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True one time in `n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// One of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    /// A random UUID (any bits).
    pub fn uuid(&mut self) -> Uuid {
        Uuid::from_u64_pair(self.next_u64(), self.next_u64())
    }

    /// An independent generator derived from this one.
    pub fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }
}

/// Characters that trip text handling: multi-byte, combining, NUL, controls,
/// the last scalar value.
const CHARS: &[char] = &[
    'a',
    'z',
    ' ',
    '%',
    '"',
    '\\',
    'é',
    '日',
    '本',
    '🦀',
    '\u{0}',
    '\n',
    '\t',
    '\u{7f}',
    '\u{301}',
    '\u{200b}',
    '\u{feff}',
    '\u{10ffff}',
];

/// Text of every kind, at most about `max` bytes.
pub fn text(rng: &mut Rng, max: usize) -> String {
    match rng.below(8) {
        0 => String::new(),
        1..=3 => {
            let n = rng.range(1, 12.min(max.max(1)));
            (0..n)
                .map(|_| (b'a' + rng.below(26) as u8) as char)
                .collect()
        }
        4 | 5 => {
            let n = rng.range(1, 24);
            let s: String = (0..n).map(|_| *rng.pick(CHARS)).collect();
            truncate(s, max)
        }
        6 => "x".repeat(rng.range(1, max.max(1))),
        _ => truncate(
            rng.pick(&[
                "fuzz",
                "build",
                "日本語のログ",
                "🦀",
                "",
                "Info",
                "Ping",
                "LogEntry",
            ])
            .to_string(),
            max,
        ),
    }
}

fn truncate(mut s: String, max: usize) -> String {
    while s.len() > max {
        s.pop();
    }
    s
}

fn opt_text(rng: &mut Rng, max: usize) -> Option<String> {
    rng.one_in(2).then(|| text(rng, max))
}

/// Any MessagePack value, nested at most `depth` levels.
pub fn value(rng: &mut Rng, depth: usize) -> Value {
    let leaf = depth == 0 || rng.one_in(2);
    if leaf {
        return match rng.below(11) {
            0 => Value::Nil,
            1 => Value::Boolean(rng.one_in(2)),
            2 => Value::from(rng.next_u64() as i64),
            3 => Value::from(rng.next_u64()),
            4 => Value::from(rng.below(200) as i64 - 100),
            5 => Value::F32(f32::from_bits(rng.next_u64() as u32)),
            6 => Value::F64(f64::from_bits(rng.next_u64())),
            7 => {
                let n = rng.below(40);
                Value::Binary(rng.bytes(n))
            }
            8 => {
                let (tag, n) = (rng.next_u64() as i8, rng.below(20));
                Value::Ext(tag, rng.bytes(n))
            }
            _ => Value::from(text(rng, 64)),
        };
    }
    let n = rng.below(6);
    if rng.one_in(2) {
        Value::Array((0..n).map(|_| value(rng, depth - 1)).collect())
    } else {
        Value::Map(
            (0..n)
                .map(|_| {
                    let key = if rng.one_in(5) {
                        value(rng, 0)
                    } else {
                        Value::from(text(rng, 16))
                    };
                    (key, value(rng, depth - 1))
                })
                .collect(),
        )
    }
}

fn level(rng: &mut Rng) -> LogLevel {
    *rng.pick(&LogLevel::ALL)
}

/// A timestamp anywhere RFC 3339 can write, often at an edge.
pub fn timestamp(rng: &mut Rng) -> Timestamp {
    let (lo, hi) = (Timestamp::MIN.as_micros(), Timestamp::MAX.as_micros());
    match rng.below(6) {
        0 => Timestamp::MIN,
        1 => Timestamp::MAX,
        2 => Timestamp::from_micros(lo + (rng.next_u64() % (hi - lo) as u64) as i64),
        _ => Timestamp::now(),
    }
}

/// Log fields of every shape: metadata of any type and depth, empty and
/// long strings, a session or none.
pub fn log_fields(rng: &mut Rng) -> LogFields {
    let component_max = if rng.one_in(20) { 400 } else { 40 };
    let message_max = if rng.one_in(10) { 4000 } else { 200 };
    LogFields {
        level: level(rng),
        component: text(rng, component_max),
        message: text(rng, message_max),
        metadata: match rng.below(4) {
            0 => None,
            1 => Some(Value::Nil),
            _ => Some(value(rng, 4)),
        },
        session_id: opt_text(rng, 300),
    }
}

fn log_filter(rng: &mut Rng) -> LogFilter {
    LogFilter {
        min_level: rng.one_in(3).then(|| level(rng)),
        component: rng.one_in(3).then(|| text(rng, 20)),
        session_id: rng.one_in(4).then(|| text(rng, 20)),
        since: rng.one_in(4).then(|| timestamp(rng)),
        until: rng.one_in(4).then(|| timestamp(rng)),
        contains: rng.one_in(4).then(|| text(rng, 10)),
        after_id: rng
            .one_in(4)
            .then(|| *rng.pick(&[0, 1, -1, i64::MAX, i64::MIN, 1000])),
        uid: rng
            .one_in(8)
            .then(|| *rng.pick(&[0, 1000, 65534, u32::MAX])),
    }
}

/// Where the hostile connection goes, which decides the requests it may
/// send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The Unix socket: every request is served.
    Unix,
    /// TCP, authenticated first.
    TcpAuthenticated,
    /// TCP that never authenticates (or not rightly).
    TcpRaw,
}

/// A request of any variant (or an answer-only variant, which a daemon
/// must refuse). `StartMonitoring` only goes over TCP, where the daemon
/// refuses it: a watch on a random or mutated path could make the daemon
/// archive files from anywhere on this machine.
pub fn request(rng: &mut Rng, transport: Transport, token: &str) -> Message {
    let payload = match rng.below(40) {
        0..=11 => Payload::LogEntry(log_fields(rng)),
        12..=16 => {
            let most = if rng.one_in(10) { 300 } else { 12 };
            Payload::LogBatch {
                entries: (0..rng.below(most)).map(|_| log_fields(rng)).collect(),
            }
        }
        17 | 18 => Payload::SessionStart {
            session_id: text(rng, 300),
            identity: text(rng, 300),
            agent_type: opt_text(rng, 20),
            workspace: opt_text(rng, 40),
        },
        19 => Payload::SessionEnd {
            session_id: text(rng, 300),
        },
        // Rarer than the rest: queries are the costly requests, and many at
        // once fill the readers' queue (valid queries then wait seconds).
        20 => Payload::QueryLogs {
            filter: log_filter(rng),
            limit: *rng.pick(&[0, 1, 10, 100, 1000, u64::MAX]),
        },
        21..=23 => Payload::Authenticate {
            token: if rng.one_in(2) {
                token.to_owned()
            } else {
                text(rng, 40)
            },
        },
        24 => Payload::GetStatus,
        25..=29 => Payload::Ping,
        30 => Payload::ListMonitoring,
        31 => Payload::StopMonitoring {
            path: format!("/nonexistent/codi-fuzz/{}", text(rng, 20)),
        },
        32 if transport != Transport::Unix => Payload::StartMonitoring {
            path: text(rng, 40),
            recursive: rng.one_in(2),
            patterns: (0..rng.below(3)).map(|_| text(rng, 10)).collect(),
            session_id: opt_text(rng, 20),
        },
        33 => Payload::Acknowledgment {
            request_id: rng.uuid(),
            status: match rng.below(3) {
                0 => AckStatus::Accepted,
                1 => AckStatus::Queued,
                _ => AckStatus::Rejected(text(rng, 20)),
            },
        },
        34 => Payload::LogResults {
            entries: (0..rng.below(3))
                .map(|_| StoredLog {
                    id: rng.next_u64() as i64,
                    uuid: rng.uuid(),
                    timestamp: timestamp(rng),
                    level: level(rng),
                    component: text(rng, 10),
                    session_id: opt_text(rng, 10),
                    message: text(rng, 10),
                    metadata: None,
                    uid: rng.one_in(2).then(|| rng.next_u64() as u32),
                })
                .collect(),
            total_count: rng.next_u64(),
        },
        35 => Payload::Error {
            code: ErrorCode::Other(text(rng, 10)),
            message: text(rng, 20),
            details: rng.one_in(2).then(|| value(rng, 2)),
        },
        36 => Payload::Status {
            components: vec![ComponentStatus {
                name: text(rng, 10),
                status: text(rng, 10),
                message: text(rng, 10),
                reason: rng.one_in(2).then(|| text(rng, 10)),
                since: None,
            }],
            uptime: Duration::new(rng.next_u64(), rng.below(1_000_000_000) as u32),
            version: rng.one_in(2).then(|| text(rng, 5)),
        },
        37 => Payload::Monitoring {
            paths: vec![MonitoredPath {
                path: text(rng, 10),
                recursive: true,
                patterns: Vec::new(),
                session_id: None,
                active: false,
                watch_cap_reached: rng.one_in(2),
            }],
        },
        _ => Payload::Ping,
    };
    Message {
        id: if rng.one_in(2) {
            rng.uuid()
        } else {
            Uuid::now_v7()
        },
        timestamp: timestamp(rng),
        payload,
    }
}

/// `body` behind a length prefix that tells the truth.
pub fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// One frame of `msg`, named or (one time in five) positional; a message
/// too large for one frame becomes a ping.
pub fn encode(rng: &mut Rng, msg: &Message) -> Vec<u8> {
    if rng.one_in(5) {
        if let Ok(body) = rmp_serde::to_vec(msg) {
            if body.len() <= MAX_FRAME_LEN {
                return framed(&body);
            }
        }
    }
    let mut out = Vec::new();
    if encode_message(msg, &mut out).is_err() {
        out.clear();
        encode_message(&Message::new(Payload::Ping), &mut out).unwrap();
    }
    out
}

/// Bytes that mean something to a MessagePack decoder.
const INTERESTING: &[u8] = &[
    0x00, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xc0, 0xc1, 0xc4, 0xc6, 0xc7, 0xc9, 0xcb, 0xd9,
    0xdb, 0xdc, 0xdd, 0xde, 0xdf, 0xff,
];

fn byte(rng: &mut Rng) -> u8 {
    if rng.one_in(2) {
        *rng.pick(INTERESTING)
    } else {
        rng.next_u64() as u8
    }
}

/// One byte-level edit of `frame` (header included).
pub fn mutate_bytes(rng: &mut Rng, frame: &mut Vec<u8>) {
    let len = frame.len();
    if len == 0 {
        frame.push(byte(rng));
        return;
    }
    match rng.below(10) {
        0..=2 => {
            let at = rng.below(len);
            frame[at] ^= 1 << rng.below(8);
        }
        3 | 4 => {
            let at = rng.below(len);
            frame[at] = byte(rng);
        }
        5 => {
            // Truncate the body; the header keeps its (now false) length
            // half the time, so the next frame is read out of step.
            let keep = rng.below(len);
            frame.truncate(keep.max(HEADER_LEN));
            if rng.one_in(2) && frame.len() >= HEADER_LEN {
                let n = (frame.len() - HEADER_LEN) as u32;
                frame[..HEADER_LEN].copy_from_slice(&n.to_le_bytes());
            }
        }
        6 => {
            let at = rng.below(len + 1);
            let n = rng.range(1, 12);
            let bytes: Vec<u8> = (0..n).map(|_| byte(rng)).collect();
            frame.splice(at..at, bytes);
        }
        7 => {
            let at = rng.below(len);
            let end = (at + rng.range(1, 16)).min(len);
            frame.drain(at..end);
        }
        8 => {
            let from = rng.below(len);
            let piece = frame[from..(from + rng.range(1, 64)).min(len)].to_vec();
            let to = rng.below(frame.len() + 1);
            frame.splice(to..to, piece);
        }
        _ if len >= HEADER_LEN => {
            let n = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]);
            let lie = match rng.below(6) {
                0 => n.wrapping_add(rng.range(1, 64) as u32),
                1 => n.wrapping_sub(rng.range(1, 64) as u32),
                2 => 0,
                3 => MAX_FRAME_LEN as u32 + 1,
                4 => u32::MAX,
                _ => rng.next_u64() as u32,
            };
            frame[..HEADER_LEN].copy_from_slice(&lie.to_le_bytes());
        }
        _ => {}
    }
}

/// Names that mean something in a message: fields, variants, statuses,
/// and some that mean nothing.
const NAMES: &[&str] = &[
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
    "GetStatus",
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
    "Accepted",
    "Warn",
    "Fatal",
    "after_id",
];

/// Timestamp text at every edge: offsets that leave years 0000 to 9999 in
/// UTC, leap seconds, impossible dates, other formats.
const TIMESTAMPS: &[&str] = &[
    "0000-01-01T00:00:00Z",
    "0000-01-01T00:00:00+00:01",
    "9999-12-31T23:59:59.999999Z",
    "9999-12-31T23:59:59-00:01",
    "2026-02-30T00:00:00Z",
    "2026-12-31T23:59:60Z",
    "2026-01-01t00:00:00z",
    "2026-01-01 00:00:00Z",
    "2026-01-01T00:00:00.1234567890123Z",
    "2026-01-01",
    "1700000000",
    "",
];

fn wire_value(rng: &mut Rng) -> Value {
    match rng.below(8) {
        0 => Value::from(*rng.pick(TIMESTAMPS)),
        1 => Value::from(*rng.pick(NAMES)),
        2 => {
            let n = *rng.pick(&[0, 15, 16, 17, 36]);
            Value::Binary(rng.bytes(n))
        }
        3 => rng
            .pick(&[
                Value::from(u64::MAX),
                Value::from(i64::MIN),
                Value::from(-1),
                Value::F64(f64::NAN),
                Value::F64(f64::INFINITY),
                Value::Array(Vec::new()),
                Value::Map(Vec::new()),
            ])
            .clone(),
        _ => value(rng, 3),
    }
}

/// One structural edit of a message's MessagePack value: still valid
/// MessagePack, but not (quite) a message.
pub fn edit_structure(rng: &mut Rng, root: &mut Value) {
    let total = count_nodes(root);
    let at = rng.below(total);
    match rng.below(6) {
        0 | 1 => *node_mut(root, at) = wire_value(rng),
        2 => match node_mut(root, at) {
            Value::Array(items) if !items.is_empty() => {
                let i = rng.below(items.len());
                items.remove(i);
            }
            Value::Map(entries) if !entries.is_empty() => {
                let i = rng.below(entries.len());
                entries.remove(i);
            }
            _ => {}
        },
        3 => {
            if let Value::Map(entries) = node_mut(root, at) {
                let key = Value::from(*rng.pick(NAMES));
                let value = wire_value(rng);
                entries.push((key, value));
            }
        }
        4 => {
            let name = Value::from(*rng.pick(NAMES));
            match node_mut(root, at) {
                Value::Map(entries) if !entries.is_empty() => entries[0].0 = name,
                node @ Value::String(_) => *node = name,
                _ => {}
            }
        }
        _ => {
            let node = node_mut(root, at);
            if let Value::Map(entries) = node {
                *node = Value::Array(entries.drain(..).map(|(_, v)| v).collect());
            }
        }
    }
}

/// `msg`'s frame with one to three structural edits.
pub fn structurally_edited(rng: &mut Rng, msg: &Message) -> Vec<u8> {
    let body = if rng.one_in(4) {
        rmp_serde::to_vec(msg)
    } else {
        rmp_serde::to_vec_named(msg)
    };
    let Ok(body) = body else {
        return encode(rng, msg);
    };
    let mut root = rmpv::decode::read_value(&mut body.as_slice()).expect("our own encoding");
    if rng.one_in(4) {
        // The message's own timestamp, at an edge (named or positional).
        let stamp = Value::from(*rng.pick(TIMESTAMPS));
        match &mut root {
            Value::Map(entries) if entries.len() > 1 => entries[1].1 = stamp,
            Value::Array(items) if items.len() > 1 => items[1] = stamp,
            _ => {}
        }
    } else {
        for _ in 0..rng.range(1, 3) {
            edit_structure(rng, &mut root);
        }
    }
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &root).expect("writing to a Vec");
    if out.is_empty() || out.len() > MAX_FRAME_LEN {
        return encode(rng, msg);
    }
    framed(&out)
}

/// A `LogEntry` frame whose metadata is `depth` nested containers, spliced
/// in as bytes (no recursion to build it).
pub fn deep_frame(rng: &mut Rng, depth: usize) -> Vec<u8> {
    const MARK: &str = "@@fuzz-deep@@";
    let msg = Message::new(Payload::LogEntry(LogFields {
        metadata: Some(Value::from(MARK)),
        ..log_fields(rng)
    }));
    let body = rmp_serde::to_vec_named(&msg).unwrap();
    let mut mark = vec![0xa0 | MARK.len() as u8];
    mark.extend_from_slice(MARK.as_bytes());
    let at = body
        .windows(mark.len())
        .position(|w| w == mark.as_slice())
        .unwrap();
    let mut deep = body[..at].to_vec();
    let map = rng.one_in(2);
    for _ in 0..depth {
        if map {
            deep.extend_from_slice(&[0x81, 0xa1, b'k']);
        } else {
            deep.push(0x91);
        }
    }
    deep.push(0x01);
    deep.extend_from_slice(&body[at + mark.len()..]);
    if deep.len() > MAX_FRAME_LEN {
        deep.truncate(MAX_FRAME_LEN);
    }
    framed(&deep)
}

/// A `LogEntry` frame whose body is `target` bytes (about), the bulk in
/// the message or in a metadata string.
pub fn big_frame(rng: &mut Rng, target: usize) -> Vec<u8> {
    let mut fields = log_fields(rng);
    fields.message = String::new();
    fields.metadata = None;
    let probe = {
        let m = Message::new(Payload::LogEntry(fields.clone()));
        rmp_serde::to_vec_named(&m).unwrap().len()
    };
    // A str 32 header is 5 bytes where the empty message (or the nil
    // metadata) took 1.
    let fill = target.saturating_sub(probe + 4).max(1);
    if rng.one_in(2) {
        fields.message = "m".repeat(fill);
    } else {
        fields.metadata = Some(Value::from("d".repeat(fill)));
    }
    let msg = Message::new(Payload::LogEntry(fields));
    framed(&rmp_serde::to_vec_named(&msg).unwrap())
}

/// How a hostile frame was made, for the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Made {
    /// A valid frame, untouched.
    Valid,
    /// Byte-level edits.
    Bytes,
    /// Structural edits.
    Structure,
    /// Random bytes behind a true length.
    Garbage,
    /// A length prefix of 0 or above 1 MiB, or a frame never finished.
    Length,
    /// Deeply nested metadata.
    Deep,
    /// A body near or above 1 MiB.
    Big,
}

/// One hostile frame (or a piece of one) for a connection over `transport`.
pub fn hostile_frame(rng: &mut Rng, transport: Transport, token: &str) -> (Made, Vec<u8>) {
    let msg = request(rng, transport, token);
    match rng.below(100) {
        0..=29 => (Made::Valid, encode(rng, &msg)),
        30..=58 => {
            let mut frame = encode(rng, &msg);
            for _ in 0..rng.range(1, 4) {
                mutate_bytes(rng, &mut frame);
            }
            (Made::Bytes, frame)
        }
        59..=85 => (Made::Structure, structurally_edited(rng, &msg)),
        86..=90 => {
            let n = rng.range(1, 200);
            let mut body = rng.bytes(n);
            if rng.one_in(2) {
                // Looks like the start of a message map.
                body.splice(0..0, [0x83, 0xa2, b'i', b'd']);
            }
            (Made::Garbage, framed(&body))
        }
        91..=93 => {
            let frame = match rng.below(5) {
                0 => 0u32.to_le_bytes().to_vec(),
                1 => (MAX_FRAME_LEN as u32 + 1).to_le_bytes().to_vec(),
                2 => u32::MAX.to_le_bytes().to_vec(),
                3 => {
                    // Claims 1 MiB, sends a little (the connection then
                    // trickles, closes or is dropped).
                    let mut f = (MAX_FRAME_LEN as u32).to_le_bytes().to_vec();
                    let n = rng.below(64);
                    f.extend(rng.bytes(n));
                    f
                }
                _ => {
                    // Half a header.
                    (rng.range(1, 1000) as u32).to_le_bytes()[..rng.range(1, 3)].to_vec()
                }
            };
            (Made::Length, frame)
        }
        94..=98 => {
            let depth = *rng.pick(&[63, 64, 65, 95, 96, 97, 1000, 100_000]);
            (Made::Deep, deep_frame(rng, depth))
        }
        _ => {
            let target = if rng.one_in(8) {
                *rng.pick(&[MAX_FRAME_LEN - 1, MAX_FRAME_LEN, MAX_FRAME_LEN + 1])
            } else {
                rng.range(16 * 1024 - 8, 16 * 1024 + 8)
                    .max(rng.below(256 * 1024))
            };
            (Made::Big, big_frame(rng, target))
        }
    }
}
