//! Parsing a page's body in one pass: the envelope (paging fields, error fields) as a
//! `Value`, and the array of records at the connector's pointer as `normalise::RawRecord`s,
//! which point into the page's text. Building a `Value` for every record only to drop it was
//! a fifth of a backfill's CPU.

use std::fmt;

use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::config::plan::pointer_segments;
use crate::normalise::RawRecord;
use crate::normalise::raw::{NUMBER_TOKEN, RecordSeed};

/// A page body: the envelope, with an empty array where the records were taken out, and the
/// records when they were an array at the pointer.
pub struct Body {
    pub envelope: Value,
    pub records: Option<Vec<RawRecord>>,
}

/// Parses `bytes` as JSON, reading the array at `pointer` (a JSON pointer; `""` for the whole
/// body) as records. Malformed JSON fails as `serde_json::from_slice` would.
pub fn parse(bytes: &[u8], pointer: &str) -> serde_json::Result<Body> {
    let segments = pointer_segments(pointer);
    // Checked once here, the text needs no check string by string while it is parsed.
    let page: Arc<str> = match std::str::from_utf8(bytes) {
        Ok(text) => Arc::from(text),
        // serde_json's own message, which says where.
        Err(e) => {
            return Err(serde_json::from_slice::<Value>(bytes)
                .err()
                .unwrap_or_else(|| de::Error::custom(e)));
        }
    };
    let mut records = None;
    let mut de = serde_json::Deserializer::from_str(&page);
    let envelope = Slot {
        path: &segments,
        page: &page,
        records: &mut records,
    }
    .deserialize(&mut de)?;
    de.end()?;
    Ok(Body { envelope, records })
}

/// A value on the way to the records: `path` is what is left of the pointer.
struct Slot<'p> {
    path: &'p [String],
    page: &'p Arc<str>,
    records: &'p mut Option<Vec<RawRecord>>,
}

impl<'de> DeserializeSeed<'de> for Slot<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Slot<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        if !self.path.is_empty() {
            // A pointer through an array index: the records are read from the `Value`.
            return Value::deserialize(SeqAccessDeserializer::new(seq));
        }
        let mut records = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(record) = seq.next_element_seed(RecordSeed { page: self.page })? {
            records.push(record);
        }
        *self.records = Some(records);
        Ok(Value::Array(Vec::new()))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let Some((next, rest)) = self.path.split_first() else {
            // The records' place holds an object (or a number): not records; the pager says so.
            return Value::deserialize(MapAccessDeserializer::new(map));
        };
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.is_empty() && key == NUMBER_TOKEN {
                let text: String = map.next_value()?;
                return serde_json::from_str(&text).map_err(de::Error::custom);
            }
            let value = if key == *next {
                // A repeated key's last value wins, as in a `Value`: so do its records.
                *self.records = None;
                map.next_value_seed(Slot {
                    path: rest,
                    page: self.page,
                    records: &mut *self.records,
                })?
            } else {
                map.next_value::<Value>()?
            };
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(body: &Body) -> Option<Vec<String>> {
        body.records
            .as_ref()
            .map(|r| r.iter().map(RawRecord::text).collect())
    }

    #[test]
    fn the_records_are_kept_as_text_and_the_rest_parsed() {
        let json = br#"{"total": 12.50, "data": [{"a": 1}, {"b": "x"}], "next": null}"#;
        let body = parse(json, "/data").unwrap();
        assert_eq!(
            texts(&body),
            Some(vec![r#"{"a":1}"#.to_owned(), r#"{"b":"x"}"#.to_owned()])
        );
        let expected: Value =
            serde_json::from_str(r#"{"total": 12.50, "data": [], "next": null}"#).unwrap();
        assert_eq!(body.envelope, expected);
        // Nested, escaped, at the top, and repeated keys.
        let body = parse(br#"{"r": {"a/b": [{"x": 1}]}}"#, "/r/a~1b").unwrap();
        assert_eq!(texts(&body), Some(vec![r#"{"x":1}"#.to_owned()]));
        let body = parse(br#" [{"x": 1}, 2] "#, "").unwrap();
        assert_eq!(texts(&body).map(|t| t.len()), Some(2));
        let body = parse(br#"{"data": [{"x": 1}], "data": null}"#, "/data").unwrap();
        assert!(body.records.is_none());
        assert_eq!(body.envelope["data"], Value::Null);
    }

    #[test]
    fn anything_else_parses_as_a_value_would() {
        for json in [
            r#"{"data": {"a": 1}}"#,
            r#"{"data": 1.000000000000000000001}"#,
            r#"{"data": "x", "n": -0}"#,
            r#"{"result": null}"#,
            r#"[{"a": 1}]"#,
            r#"{"data": [[1]], "x": [1, {"y": true}]}"#,
            "12345678901234567890123",
            "null",
        ] {
            let body = parse(json.as_bytes(), "/data/0").unwrap();
            let value: Value = serde_json::from_str(json).unwrap();
            assert_eq!(body.envelope, value, "{json}");
            assert!(body.records.is_none());
        }
        // Malformed JSON fails with serde_json's own message.
        for bad in [
            &b""[..],
            b"{",
            br#"{"data": [1,]}"#,
            b"[1] x",
            b"{\"data\": [\"\xff\"]}",
        ] {
            let ours = parse(bad, "/data").err().map(|e| e.to_string());
            let theirs = serde_json::from_slice::<Value>(bad)
                .err()
                .map(|e| e.to_string());
            assert!(ours.is_some());
            assert_eq!(ours, theirs, "{}", String::from_utf8_lossy(bad));
        }
    }
}
