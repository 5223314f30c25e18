//! Log metadata: any MessagePack value on the wire, JSON text in the
//! database (readable with `sqlite3` and SQLite's JSON functions).
//!
//! MessagePack is richer than JSON, so the conversion is lossy in documented
//! ways: non-finite floats become `null`, non-string map keys become their
//! JSON text, binary becomes an array of byte values and an extension value
//! becomes `{"$ext": type, "data": [bytes]}`.

use rmpv::Value;
use serde::ser::{Error as _, SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use std::borrow::Cow;

/// Deepest nesting of arrays and maps accepted in metadata.
pub const MAX_METADATA_DEPTH: usize = 64;

/// Converts a MessagePack value to compact JSON text.
///
/// Fails only when arrays and maps nest more than [`MAX_METADATA_DEPTH`]
/// levels deep; the error is a sentence fit for a `Rejected` answer.
pub fn to_json(value: &Value) -> Result<String, String> {
    to_json_at(value, 0)
}

fn to_json_at(value: &Value, depth: usize) -> Result<String, String> {
    serde_json::to_string(&Json { value, depth }).map_err(|e| e.to_string())
}

/// Converts stored JSON text back to a MessagePack value for an answer;
/// text that is not valid JSON is returned as a string value.
pub fn from_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::from(text))
}

/// A value to serialise, `depth` arrays or maps below the top.
struct Json<'a> {
    value: &'a Value,
    depth: usize,
}

impl Json<'_> {
    fn child<'b>(&self, value: &'b Value) -> Json<'b> {
        Json {
            value,
            depth: self.depth + 1,
        }
    }

    fn enter<E: serde::ser::Error>(&self) -> Result<(), E> {
        if self.depth >= MAX_METADATA_DEPTH {
            Err(E::custom(format!(
                "metadata is nested more than {MAX_METADATA_DEPTH} levels deep"
            )))
        } else {
            Ok(())
        }
    }
}

fn lossy(s: &rmpv::Utf8String) -> Cow<'_, str> {
    match s.as_str() {
        Some(s) => Cow::Borrowed(s),
        None => String::from_utf8_lossy(s.as_bytes()),
    }
}

struct Bytes<'a>(&'a [u8]);

impl Serialize for Bytes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for b in self.0 {
            seq.serialize_element(b)?;
        }
        seq.end()
    }
}

impl Serialize for Json<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.value {
            Value::Nil => s.serialize_unit(),
            Value::Boolean(b) => s.serialize_bool(*b),
            Value::Integer(i) => match (i.as_u64(), i.as_i64()) {
                (Some(u), _) => s.serialize_u64(u),
                (None, Some(i)) => s.serialize_i64(i),
                (None, None) => s.serialize_unit(),
            },
            Value::F32(f) if f.is_finite() => s.serialize_f32(*f),
            Value::F64(f) if f.is_finite() => s.serialize_f64(*f),
            Value::F32(_) | Value::F64(_) => s.serialize_unit(),
            Value::String(text) => s.serialize_str(&lossy(text)),
            Value::Binary(bytes) => Bytes(bytes).serialize(s),
            Value::Ext(kind, data) => {
                let mut map = s.serialize_map(Some(2))?;
                map.serialize_entry("$ext", kind)?;
                map.serialize_entry("data", &Bytes(data))?;
                map.end()
            }
            Value::Array(items) => {
                self.enter()?;
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&self.child(item))?;
                }
                seq.end()
            }
            Value::Map(entries) => {
                self.enter()?;
                let mut map = s.serialize_map(Some(entries.len()))?;
                for (key, value) in entries {
                    let key: Cow<'_, str> = match key {
                        Value::String(text) => lossy(text),
                        other => {
                            Cow::Owned(to_json_at(other, self.depth + 1).map_err(S::Error::custom)?)
                        }
                    };
                    map.serialize_entry(&key, &self.child(value))?;
                }
                map.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(levels: usize) -> Value {
        let mut v = Value::from(1);
        for _ in 0..levels {
            v = Value::Array(vec![v]);
        }
        v
    }

    /// A MessagePack str 3 whose bytes are not UTF-8.
    fn invalid_utf8() -> Value {
        let value = rmpv::decode::read_value(&mut &[0xa3, b'o', 0xff, b'k'][..]).unwrap();
        assert!(value.as_str().is_none());
        value
    }

    #[test]
    fn scalars() {
        let cases: Vec<(Value, &str)> = vec![
            (Value::Nil, "null"),
            (Value::from(true), "true"),
            (Value::from(-5), "-5"),
            (Value::from(u64::MAX), "18446744073709551615"),
            (Value::from(i64::MIN), "-9223372036854775808"),
            (Value::F64(1.5), "1.5"),
            (Value::F32(1.1), "1.1"),
            (Value::F64(f64::NAN), "null"),
            (Value::F64(f64::INFINITY), "null"),
            (Value::F32(f32::NEG_INFINITY), "null"),
            (Value::from("a\"b\n"), r#""a\"b\n""#),
            (invalid_utf8(), "\"o\u{fffd}k\""),
            (Value::Binary(vec![0, 7, 255]), "[0,7,255]"),
            (Value::Ext(-3, vec![1, 2]), r#"{"$ext":-3,"data":[1,2]}"#),
        ];
        for (value, json) in cases {
            assert_eq!(to_json(&value).unwrap(), json, "{value:?}");
        }
    }

    #[test]
    fn containers_and_non_string_keys() {
        let value = Value::Map(vec![
            ("s".into(), Value::Array(vec![Value::from(1), Value::Nil])),
            (Value::from(7), Value::from("int key")),
            (Value::from(true), Value::from("bool key")),
            (
                Value::Array(vec![Value::from(1), Value::from("x")]),
                Value::from("array key"),
            ),
            (Value::Nil, Value::Map(vec![])),
        ]);
        let json = to_json(&value).unwrap();
        assert_eq!(
            json,
            r#"{"s":[1,null],"7":"int key","true":"bool key","[1,\"x\"]":"array key","null":{}}"#
        );
    }

    #[test]
    fn depth_limit() {
        assert!(to_json(&nested(MAX_METADATA_DEPTH)).is_ok());
        let err = to_json(&nested(MAX_METADATA_DEPTH + 1)).unwrap_err();
        assert!(err.contains("nested more than 64 levels"), "{err}");
        let deep_maps = (0..200).fold(Value::Nil, |v, _| Value::Map(vec![("k".into(), v)]));
        assert!(to_json(&deep_maps).is_err());
        // A deep structure used as a map key counts too.
        let deep_key = Value::Map(vec![(nested(MAX_METADATA_DEPTH), Value::Nil)]);
        assert!(to_json(&deep_key).is_err());
    }

    #[test]
    fn round_trip_through_json() {
        let value = Value::Map(vec![
            ("n".into(), Value::from(-3)),
            ("u".into(), Value::from(3u64)),
            ("f".into(), Value::F64(2.25)),
            ("a".into(), Value::Array(vec![Value::from("x"), Value::Nil])),
            ("b".into(), Value::from(false)),
        ]);
        assert_eq!(from_json(&to_json(&value).unwrap()), value);
        let deep = nested(MAX_METADATA_DEPTH);
        assert_eq!(from_json(&to_json(&deep).unwrap()), deep);
    }

    #[test]
    fn invalid_json_comes_back_as_text() {
        assert_eq!(from_json("{oops"), Value::from("{oops"));
    }
}
