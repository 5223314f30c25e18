//! Log metadata: any MessagePack value on the wire, JSON text in the
//! database (readable with `sqlite3` and SQLite's JSON functions).
//!
//! MessagePack is richer than JSON, so the conversion maps the rest onto
//! JSON in documented ways (docs/PROTOCOL.md, "Metadata"):
//!
//! - binary becomes `{"$bin": "<base64>"}` and an extension value
//!   `{"$ext": type, "data": "<base64>"}` (standard alphabet, padded); both
//!   come back exactly as they were sent. Base64 takes 4/3 of the bytes,
//!   where the array of byte values stored before took up to 4 times as
//!   many and decoded into one MessagePack value per byte: 20 logs of
//!   1 MiB of binary made one query take 911 MB;
//! - non-finite floats become `null`, `f32` comes back as `f64`, and
//!   non-string map keys become their JSON text;
//! - rows stored before base64 (binary as an array of numbers, extension
//!   data as one) still read back as those arrays.
//!
//! A map the client sent that looks exactly like one of the two shapes
//! (the single key `"$bin"` with a base64 string, or the keys `"$ext"`
//! with an `i8` and `"data"` with a base64 string, in that order) comes
//! back as binary or an extension value too.

use base64::display::Base64Display;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rmpv::Value;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;
use std::io;
use thiserror::Error;

/// Deepest nesting of arrays and maps accepted in metadata.
pub const MAX_METADATA_DEPTH: usize = 64;

/// The key of a binary value stored as JSON.
pub const BIN_KEY: &str = "$bin";
/// The type key of an extension value stored as JSON (its data is under
/// `"data"`).
pub const EXT_KEY: &str = "$ext";
/// The key of the marker that replaces the metadata of a row too large to
/// answer (see `store::query`).
pub const TRUNCATED_KEY: &str = "$truncated";

/// Why metadata cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MetadataError {
    /// Arrays and maps nest more than [`MAX_METADATA_DEPTH`] levels.
    #[error("metadata is nested more than {MAX_METADATA_DEPTH} levels deep")]
    TooDeep,
    /// Its JSON text would be longer than the bytes allowed.
    #[error("metadata takes more than {0} bytes as JSON")]
    TooLarge(usize),
}

/// Converts a MessagePack value to compact JSON text.
///
/// Fails only when arrays and maps nest more than [`MAX_METADATA_DEPTH`]
/// levels deep; the error is a sentence fit for a `Rejected` answer.
pub fn to_json(value: &Value) -> Result<String, String> {
    to_json_within(value, usize::MAX).map_err(|e| e.to_string())
}

/// Converts a MessagePack value to compact JSON text of at most `max_len`
/// bytes, stopping as soon as it would grow past them (so a hostile value
/// never costs more than `max_len` bytes of memory here).
pub fn to_json_within(value: &Value, max_len: usize) -> Result<String, MetadataError> {
    to_json_at(value, 0, max_len)
}

fn to_json_at(value: &Value, depth: usize, max_len: usize) -> Result<String, MetadataError> {
    let mut out = Capped {
        buf: Vec::new(),
        max_len,
        overflowed: false,
    };
    let failure = Cell::new(None);
    let json = Json {
        value,
        depth,
        max_len,
        failure: &failure,
    };
    match serde_json::to_writer(&mut out, &json) {
        Ok(()) => Ok(String::from_utf8(out.buf).expect("serde_json writes UTF-8")),
        Err(_) if out.overflowed => Err(MetadataError::TooLarge(max_len)),
        Err(_) => Err(failure.take().unwrap_or(MetadataError::TooDeep)),
    }
}

/// A byte buffer that refuses to grow past `max_len`.
struct Capped {
    buf: Vec<u8>,
    max_len: usize,
    overflowed: bool,
}

impl io::Write for Capped {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() + data.len() > self.max_len {
            self.overflowed = true;
            return Err(io::Error::other("metadata too large"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Converts stored JSON text back to a MessagePack value for an answer;
/// text that is not valid JSON is returned as a string value.
pub fn from_json(text: &str) -> Value {
    match serde_json::from_str::<Stored>(text) {
        Ok(Stored(value)) => value,
        Err(_) => Value::from(text),
    }
}

/// A value to serialise, `depth` arrays or maps below the top.
struct Json<'v, 'f> {
    value: &'v Value,
    depth: usize,
    /// The whole text's bound, also applied to keys converted on their own.
    max_len: usize,
    /// Why serialising stopped, when it was not the writer's bound.
    failure: &'f Cell<Option<MetadataError>>,
}

impl<'f> Json<'_, 'f> {
    fn child<'b>(&self, value: &'b Value) -> Json<'b, 'f> {
        Json {
            value,
            depth: self.depth + 1,
            max_len: self.max_len,
            failure: self.failure,
        }
    }

    fn fail<E: serde::ser::Error>(&self, why: MetadataError) -> E {
        let error = E::custom(&why);
        self.failure.set(Some(why));
        error
    }

    fn enter<E: serde::ser::Error>(&self) -> Result<(), E> {
        if self.depth >= MAX_METADATA_DEPTH {
            Err(self.fail(MetadataError::TooDeep))
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

/// Bytes as a base64 string, written straight into the JSON text.
struct Base64<'a>(&'a [u8]);

impl Serialize for Base64<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&Base64Display::new(self.0, &BASE64))
    }
}

impl Serialize for Json<'_, '_> {
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
            Value::Binary(bytes) => {
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry(BIN_KEY, &Base64(bytes))?;
                map.end()
            }
            Value::Ext(kind, data) => {
                let mut map = s.serialize_map(Some(2))?;
                map.serialize_entry(EXT_KEY, kind)?;
                map.serialize_entry("data", &Base64(data))?;
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
                        other => Cow::Owned(
                            to_json_at(other, self.depth + 1, self.max_len)
                                .map_err(|why| self.fail::<S::Error>(why))?,
                        ),
                    };
                    map.serialize_entry(&key, &self.child(value))?;
                }
                map.end()
            }
        }
    }
}

/// A value read back from stored JSON: like `rmpv::Value`'s own
/// deserialisation, except that the two shapes above become binary and
/// extension values again.
struct Stored(Value);

impl<'de> Deserialize<'de> for Stored {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StoredVisitor).map(Stored)
    }
}

struct StoredVisitor;

impl<'de> Visitor<'de> for StoredVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Boolean(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::F64(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Nil)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Nil)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Stored::deserialize(d).map(|s| s.0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Stored(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut pairs = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            let Stored(value) = map.next_value()?;
            pairs.push((Value::from(key), value));
        }
        Ok(tagged(pairs))
    }
}

/// `pairs` as a map, unless they are exactly one of the stored shapes of
/// binary and extension values.
fn tagged(pairs: Vec<(Value, Value)>) -> Value {
    let bytes = |v: &Value| v.as_str().and_then(|s| BASE64.decode(s).ok());
    match pairs.as_slice() {
        [(k, v)] if k.as_str() == Some(BIN_KEY) => {
            if let Some(b) = bytes(v) {
                return Value::Binary(b);
            }
        }
        [(k1, t), (k2, v)] if k1.as_str() == Some(EXT_KEY) && k2.as_str() == Some("data") => {
            let kind = t.as_i64().and_then(|t| i8::try_from(t).ok());
            if let (Some(kind), Some(data)) = (kind, bytes(v)) {
                return Value::Ext(kind, data);
            }
        }
        _ => {}
    }
    Value::Map(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nested(levels: usize) -> Value {
        let mut v = Value::from(1);
        for _ in 0..levels {
            v = Value::Array(vec![v]);
        }
        v
    }

    /// A MessagePack str whose bytes need not be UTF-8.
    fn raw_str(bytes: &[u8]) -> Value {
        assert!(bytes.len() < 32);
        let mut encoded = vec![0xa0 | bytes.len() as u8];
        encoded.extend_from_slice(bytes);
        rmpv::decode::read_value(&mut &encoded[..]).unwrap()
    }

    fn invalid_utf8() -> Value {
        let value = raw_str(&[b'o', 0xff, b'k']);
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
            (Value::Binary(vec![0, 7, 255]), r#"{"$bin":"AAf/"}"#),
            (Value::Binary(vec![]), r#"{"$bin":""}"#),
            (Value::Ext(-3, vec![1, 2]), r#"{"$ext":-3,"data":"AQI="}"#),
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
        assert_eq!(
            to_json_within(&deep_key, 1 << 20),
            Err(MetadataError::TooDeep)
        );
    }

    #[test]
    fn size_bound_stops_the_conversion() {
        let blob = Value::Binary(vec![0; 3000]);
        // 3000 bytes are 4000 base64 characters inside `{"$bin":"..."}`.
        assert_eq!(to_json_within(&blob, 4011).unwrap().len(), 4011);
        assert_eq!(
            to_json_within(&blob, 4010),
            Err(MetadataError::TooLarge(4010))
        );
        // Escapes count: 1000 NULs are 6000 bytes of JSON.
        let nuls = Value::from("\0".repeat(1000));
        assert_eq!(
            to_json_within(&nuls, 5000),
            Err(MetadataError::TooLarge(5000))
        );
        // So does a non-string key converted on its own.
        let key = Value::Map(vec![(Value::Binary(vec![1; 3000]), Value::Nil)]);
        assert_eq!(
            to_json_within(&key, 1000),
            Err(MetadataError::TooLarge(1000))
        );
    }

    #[test]
    fn round_trip_through_json() {
        let value = Value::Map(vec![
            ("n".into(), Value::from(-3)),
            ("u".into(), Value::from(3u64)),
            ("f".into(), Value::F64(2.25)),
            ("a".into(), Value::Array(vec![Value::from("x"), Value::Nil])),
            ("b".into(), Value::from(false)),
            ("bin".into(), Value::Binary((0..=255).collect())),
            ("ext".into(), Value::Ext(i8::MIN, vec![0, 255, 7])),
        ]);
        assert_eq!(from_json(&to_json(&value).unwrap()), value);
        let deep = nested(MAX_METADATA_DEPTH);
        assert_eq!(from_json(&to_json(&deep).unwrap()), deep);
        for top in [Value::Binary(vec![9; 1000]), Value::Ext(1, vec![])] {
            assert_eq!(from_json(&to_json(&top).unwrap()), top);
        }
    }

    #[test]
    fn rows_stored_before_base64_read_back_as_arrays() {
        assert_eq!(
            from_json("[0,7,255]"),
            Value::Array(vec![0.into(), 7.into(), 255.into()])
        );
        assert_eq!(
            from_json(r#"{"$ext":-3,"data":[1,2]}"#),
            Value::Map(vec![
                ("$ext".into(), Value::from(-3)),
                ("data".into(), Value::Array(vec![1.into(), 2.into()])),
            ])
        );
    }

    #[test]
    fn maps_that_only_resemble_the_shapes_stay_maps() {
        for json in [
            r#"{"$bin":"not base64!"}"#,
            r#"{"$bin":"QQ"}"#,
            r#"{"$bin":7}"#,
            r#"{"$bin":"AQI=","x":1}"#,
            r#"{"$ext":300,"data":"AQI="}"#,
            r#"{"data":"AQI=","$ext":1}"#,
            r#"{"$ext":1.0,"data":"AQI="}"#,
        ] {
            assert!(matches!(from_json(json), Value::Map(_)), "{json}");
        }
    }

    #[test]
    fn invalid_json_comes_back_as_text() {
        assert_eq!(from_json("{oops"), Value::from("{oops"));
    }

    /// What a value becomes after a trip through the database, by the
    /// documented mapping (module docs).
    fn expected(value: &Value) -> Value {
        match value {
            Value::F32(f) if f.is_finite() => {
                Value::F64(serde_json::to_string(f).unwrap().parse().unwrap())
            }
            Value::F32(_) | Value::F64(_) if !value.as_f64().unwrap().is_finite() => Value::Nil,
            Value::String(s) => Value::from(lossy(s).into_owned()),
            Value::Array(items) => Value::Array(items.iter().map(expected).collect()),
            Value::Map(pairs) => tagged(
                pairs
                    .iter()
                    .map(|(k, v)| {
                        let key = match k {
                            Value::String(s) => lossy(s).into_owned(),
                            other => to_json(other).unwrap(),
                        };
                        (Value::from(key), expected(v))
                    })
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => ".{0,10}",
            1 => Just(BIN_KEY.to_owned()),
            1 => Just(EXT_KEY.to_owned()),
            1 => Just("data".to_owned()),
            1 => Just("AQI=".to_owned()),
        ]
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Nil),
            any::<bool>().prop_map(Value::Boolean),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f32>().prop_map(Value::F32),
            any::<f64>().prop_map(Value::F64),
            text().prop_map(Value::from),
            prop::collection::vec(any::<u8>(), 0..12).prop_map(|b| raw_str(&b)),
            prop::collection::vec(any::<u8>(), 0..48).prop_map(Value::Binary),
            (any::<i8>(), prop::collection::vec(any::<u8>(), 0..24))
                .prop_map(|(t, d)| Value::Ext(t, d)),
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(6, 96, 6, |inner| {
            let key = prop_oneof![3 => text().prop_map(Value::from), 1 => inner.clone()];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((key, inner), 0..6).prop_map(Value::Map),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_value_survives_json_as_documented(v in value()) {
            let json = to_json(&v).unwrap();
            prop_assert_eq!(from_json(&json), expected(&v), "{}", json);
        }

        #[test]
        fn bytes_survive_exactly(bytes in prop::collection::vec(any::<u8>(), 0..2048), kind: i8) {
            let bin = Value::Binary(bytes.clone());
            prop_assert_eq!(from_json(&to_json(&bin).unwrap()), bin);
            let ext = Value::Ext(kind, bytes);
            prop_assert_eq!(from_json(&to_json(&ext).unwrap()), ext);
        }
    }
}
