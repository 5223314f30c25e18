//! What `codi2` reads from its user: metadata arguments, times, and log
//! lines on stdin, grouped into batches that fit one frame.

use crate::proto::{LogFields, LogLevel, Timestamp, MAX_FRAME_LEN};
use std::mem;

/// Most entries in one `LogBatch`.
pub const BATCH_MAX_ENTRIES: usize = 1000;
/// Bytes of encoded entries one batch may carry; the rest of the frame is
/// left for the envelope (id, timestamp, variant and field names).
pub const BATCH_MAX_BYTES: usize = MAX_FRAME_LEN - 4096;

/// Converts JSON to the MessagePack value sent as metadata.
pub fn json_to_value(json: &serde_json::Value) -> rmpv::Value {
    match json {
        serde_json::Value::Null => rmpv::Value::Nil,
        serde_json::Value::Bool(b) => rmpv::Value::Boolean(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                rmpv::Value::from(i)
            } else if let Some(u) = n.as_u64() {
                rmpv::Value::from(u)
            } else {
                rmpv::Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => rmpv::Value::from(s.as_str()),
        serde_json::Value::Array(items) => {
            rmpv::Value::Array(items.iter().map(json_to_value).collect())
        }
        serde_json::Value::Object(map) => rmpv::Value::Map(
            map.iter()
                .map(|(k, v)| (rmpv::Value::from(k.as_str()), json_to_value(v)))
                .collect(),
        ),
    }
}

/// Parses `-m JSON`.
pub fn parse_json_metadata(text: &str) -> Result<rmpv::Value, String> {
    serde_json::from_str::<serde_json::Value>(text)
        .map(|j| json_to_value(&j))
        .map_err(|e| format!("metadata is not valid JSON: {e}"))
}

/// Parses `--meta k=v` pairs into a map, in order. A value that reads as a
/// JSON number or boolean keeps that type; anything else is a string.
pub fn parse_meta_pairs(pairs: &[String]) -> Result<rmpv::Value, String> {
    let mut map = Vec::with_capacity(pairs.len());
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(format!("--meta `{pair}` is not KEY=VALUE"));
        };
        if key.is_empty() {
            return Err(format!("--meta `{pair}` has an empty key"));
        }
        let typed = match serde_json::from_str::<serde_json::Value>(value) {
            Ok(j @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                json_to_value(&j)
            }
            _ => rmpv::Value::from(value),
        };
        map.push((rmpv::Value::from(key), typed));
    }
    Ok(rmpv::Value::Map(map))
}

/// Parses a point in time: RFC 3339, or a duration like `10m` meaning that
/// long before `now` (at the earliest [`Timestamp::MIN`]: `--since 20000y`
/// means "since the beginning", not an instant no frame can carry).
pub fn parse_time(text: &str, now: Timestamp) -> Result<Timestamp, String> {
    if let Ok(t) = Timestamp::parse_rfc3339(text) {
        return Ok(t);
    }
    let ago = humantime::parse_duration(text)
        .map_err(|_| format!("`{text}` is neither an RFC 3339 time nor a duration like \"10m\""))?;
    let micros = i64::try_from(ago.as_micros()).unwrap_or(i64::MAX);
    Ok(Timestamp::from_micros(
        now.as_micros()
            .saturating_sub(micros)
            .max(Timestamp::MIN.as_micros()),
    ))
}

/// What a stdin line gets when it does not say otherwise.
#[derive(Debug, Clone, PartialEq)]
pub struct LineDefaults {
    /// `-l`.
    pub level: LogLevel,
    /// `-c`.
    pub component: String,
    /// `-s`.
    pub session_id: Option<String>,
    /// `-m` / `--meta`.
    pub metadata: Option<rmpv::Value>,
}

/// Parses one stdin line; `Ok(None)` for a blank line.
///
/// A line that is a JSON object with a string `message` supplies its own
/// `level`, `component`, `session_id` and `metadata` (each optional); any
/// other line is the message itself, with the defaults.
pub fn parse_line(line: &str, defaults: &LineDefaults) -> Result<Option<LogFields>, String> {
    let line = line.trim_end_matches(['\n', '\r']);
    if line.trim().is_empty() {
        return Ok(None);
    }
    let plain = || LogFields {
        level: defaults.level,
        component: defaults.component.clone(),
        message: line.to_owned(),
        metadata: defaults.metadata.clone(),
        session_id: defaults.session_id.clone(),
    };
    if !line.trim_start().starts_with('{') {
        return Ok(Some(plain()));
    }
    let Ok(serde_json::Value::Object(obj)) = serde_json::from_str(line) else {
        return Ok(Some(plain()));
    };
    let Some(serde_json::Value::String(message)) = obj.get("message") else {
        return Ok(Some(plain()));
    };
    let text = |key: &str| -> Result<Option<String>, String> {
        match obj.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(format!("`{key}` must be a string, not {other}")),
        }
    };
    let level = match text("level")? {
        Some(l) => l.parse::<LogLevel>()?,
        None => defaults.level,
    };
    Ok(Some(LogFields {
        level,
        component: text("component")?.unwrap_or_else(|| defaults.component.clone()),
        message: message.clone(),
        metadata: match obj.get("metadata") {
            Some(m) => Some(json_to_value(m)),
            None => defaults.metadata.clone(),
        },
        session_id: text("session_id")?.or_else(|| defaults.session_id.clone()),
    }))
}

/// Groups entries into batches of at most [`BATCH_MAX_ENTRIES`] entries and
/// [`BATCH_MAX_BYTES`] encoded bytes.
#[derive(Debug, Default)]
pub struct Batcher {
    entries: Vec<LogFields>,
    bytes: usize,
}

impl Batcher {
    /// Adds an entry; returns a closed batch when one is ready (the entry
    /// itself may start the next). An entry too large for any frame is
    /// refused.
    pub fn push(&mut self, entry: LogFields) -> Result<Option<Vec<LogFields>>, String> {
        let size = rmp_serde::encode::to_vec_named(&entry)
            .map_err(|e| format!("cannot encode log: {e}"))?
            .len();
        if size > BATCH_MAX_BYTES {
            return Err(format!(
                "log of {size} bytes exceeds the frame limit of {MAX_FRAME_LEN} bytes"
            ));
        }
        let closed = if self.bytes + size > BATCH_MAX_BYTES {
            self.take()
        } else {
            None
        };
        self.entries.push(entry);
        self.bytes += size;
        if closed.is_some() {
            return Ok(closed);
        }
        Ok(if self.entries.len() >= BATCH_MAX_ENTRIES {
            self.take()
        } else {
            None
        })
    }

    /// The entries collected so far as a batch, if any.
    pub fn take(&mut self) -> Option<Vec<LogFields>> {
        self.bytes = 0;
        let entries = mem::take(&mut self.entries);
        (!entries.is_empty()).then_some(entries)
    }

    /// True when nothing is collected.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{encode_message, Message, Payload};
    use rmpv::Value;

    fn defaults() -> LineDefaults {
        LineDefaults {
            level: LogLevel::Info,
            component: "cli".into(),
            session_id: Some("s0".into()),
            metadata: Some(Value::from("d")),
        }
    }

    #[test]
    fn meta_pairs_keep_numbers_and_bools_typed() {
        let pairs: Vec<String> = [
            "n=42", "neg=-1.5", "ok=true", "s=hello", "q=\"x\"", "e=", "eq=a=b", "nul=null",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let got = parse_meta_pairs(&pairs).unwrap();
        let expected = Value::Map(vec![
            ("n".into(), Value::from(42)),
            ("neg".into(), Value::from(-1.5)),
            ("ok".into(), Value::from(true)),
            ("s".into(), Value::from("hello")),
            ("q".into(), Value::from("\"x\"")),
            ("e".into(), Value::from("")),
            ("eq".into(), Value::from("a=b")),
            ("nul".into(), Value::from("null")),
        ]);
        assert_eq!(got, expected);
        assert!(parse_meta_pairs(&["novalue".into()]).is_err());
        assert!(parse_meta_pairs(&["=v".into()]).is_err());
    }

    #[test]
    fn json_metadata_converts_every_type() {
        let v = parse_json_metadata(
            r#"{"a":[1,-2,3.5,"x",null,false],"b":{"c":18446744073709551615}}"#,
        )
        .unwrap();
        let expected = Value::Map(vec![
            (
                "a".into(),
                Value::Array(vec![
                    Value::from(1),
                    Value::from(-2),
                    Value::from(3.5),
                    Value::from("x"),
                    Value::Nil,
                    Value::from(false),
                ]),
            ),
            (
                "b".into(),
                Value::Map(vec![("c".into(), Value::from(u64::MAX))]),
            ),
        ]);
        assert_eq!(v, expected);
        assert!(parse_json_metadata("{oops").is_err());
    }

    #[test]
    fn times_are_rfc3339_or_relative() {
        let now = Timestamp::parse_rfc3339("2026-01-01T12:00:00Z").unwrap();
        assert_eq!(
            parse_time("10m", now).unwrap(),
            Timestamp::parse_rfc3339("2026-01-01T11:50:00Z").unwrap()
        );
        assert_eq!(
            parse_time("1h 30s", now).unwrap(),
            Timestamp::parse_rfc3339("2026-01-01T10:59:30Z").unwrap()
        );
        assert_eq!(
            parse_time("2025-12-31T23:00:00+01:00", now).unwrap(),
            Timestamp::parse_rfc3339("2025-12-31T22:00:00Z").unwrap()
        );
        assert!(parse_time("yesterday", now).is_err());
        // Longer ago than RFC 3339 can write: the earliest instant it can.
        assert_eq!(parse_time("20000years", now).unwrap(), Timestamp::MIN);
        assert!(parse_time("0000-01-01T00:00:00+01:00", now).is_err());
    }

    #[test]
    fn plain_lines_are_messages_with_the_defaults() {
        let f = parse_line("hello world\r\n", &defaults()).unwrap().unwrap();
        assert_eq!(f.message, "hello world");
        assert_eq!(f.level, LogLevel::Info);
        assert_eq!(f.component, "cli");
        assert_eq!(f.session_id.as_deref(), Some("s0"));
        assert_eq!(f.metadata, Some(Value::from("d")));
        assert_eq!(parse_line("   \n", &defaults()).unwrap(), None);
        // JSON that is not an object with a string message stays text.
        for text in ["{not json", "{\"msg\": \"x\"}", "{\"message\": 5}", "[1]"] {
            let f = parse_line(text, &defaults()).unwrap().unwrap();
            assert_eq!(f.message, text);
        }
    }

    #[test]
    fn json_lines_supply_their_own_fields() {
        let line = r#"{"message":"built","level":"warn","component":"ci","session_id":"s9","metadata":{"n":3}}"#;
        let f = parse_line(line, &defaults()).unwrap().unwrap();
        assert_eq!(f.message, "built");
        assert_eq!(f.level, LogLevel::Warn);
        assert_eq!(f.component, "ci");
        assert_eq!(f.session_id.as_deref(), Some("s9"));
        assert_eq!(
            f.metadata,
            Some(Value::Map(vec![("n".into(), Value::from(3))]))
        );
        let f = parse_line(r#"{"message":"m"}"#, &defaults())
            .unwrap()
            .unwrap();
        assert_eq!(f.component, "cli");
        assert_eq!(f.metadata, Some(Value::from("d")));
        assert!(parse_line(r#"{"message":"m","level":"loud"}"#, &defaults()).is_err());
        assert!(parse_line(r#"{"message":"m","component":7}"#, &defaults()).is_err());
    }

    fn entry(message: String) -> LogFields {
        LogFields {
            level: LogLevel::Info,
            component: "c".into(),
            message,
            metadata: None,
            session_id: None,
        }
    }

    #[test]
    fn batches_close_at_the_entry_limit() {
        let mut b = Batcher::default();
        let mut closed = Vec::new();
        for i in 0..2500 {
            if let Some(batch) = b.push(entry(i.to_string())).unwrap() {
                closed.push(batch);
            }
        }
        closed.extend(b.take());
        let sizes: Vec<usize> = closed.iter().map(Vec::len).collect();
        assert_eq!(sizes, [1000, 1000, 500]);
        assert_eq!(closed[2][0].message, "2000");
        assert!(b.is_empty() && b.take().is_none());
    }

    #[test]
    fn batches_close_before_exceeding_a_frame() {
        let mut b = Batcher::default();
        let mut closed = Vec::new();
        for _ in 0..10 {
            if let Some(batch) = b.push(entry("x".repeat(300_000))).unwrap() {
                closed.push(batch);
            }
        }
        closed.extend(b.take());
        assert!(closed.len() >= 4);
        for batch in closed {
            let msg = Message::new(Payload::LogBatch { entries: batch });
            encode_message(&msg, &mut Vec::new()).expect("every batch fits one frame");
        }
        assert!(b.push(entry("x".repeat(MAX_FRAME_LEN))).is_err());
    }
}
