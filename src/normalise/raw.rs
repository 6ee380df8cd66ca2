//! A broker's record as it arrives, and the values a mapping reads out of it.
//!
//! A REST page's records are kept as their own JSON text (`RawRecord::Text`), not parsed into
//! `serde_json::Value`s: a `Value` allocates every key and every string and builds a map per
//! record, then frees it all a moment later, and that was a fifth of a backfill's CPU. The
//! mapping reads a text record through a `View` (its members, borrowed from the text) and each
//! field as a `Leaf` (a string or number borrowed from the text too). Records from a database
//! or from quarantine are `Value`s and read through the same two types.

use std::borrow::Cow;
use std::fmt;

use jiff::Timestamp;
use jiff::civil::Date;
use rust_decimal::Decimal;
use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

/// One raw record of a page.
#[derive(Debug, Clone)]
pub enum RawRecord {
    /// The record's JSON text, exactly as the broker sent it.
    Text(Box<RawValue>),
    /// A record built from a database row, or read back from quarantine.
    Value(Value),
}

impl From<Value> for RawRecord {
    fn from(value: Value) -> RawRecord {
        RawRecord::Value(value)
    }
}

impl RawRecord {
    /// The record as a JSON value (for quarantine and messages: the rare path).
    pub fn into_value(self) -> Value {
        match self {
            // Text that serde_json captured is valid JSON.
            RawRecord::Text(raw) => serde_json::from_str(raw.get()).unwrap_or(Value::Null),
            RawRecord::Value(value) => value,
        }
    }

    /// The record's JSON text: a text record's as sent, a value's compact.
    pub fn text(&self) -> Cow<'_, str> {
        match self {
            RawRecord::Text(raw) => Cow::Borrowed(raw.get()),
            RawRecord::Value(value) => Cow::Owned(value.to_string()),
        }
    }

    /// The record's members for a mapping to read, or `None` when it is not a JSON object.
    pub fn view(&self) -> Option<View<'_>> {
        match self {
            RawRecord::Text(raw) => members(raw.get()).map(View::Members),
            RawRecord::Value(value) => value.is_object().then_some(View::Value(value)),
        }
    }
}

/// A JSON object as a mapping reads it.
#[derive(Debug)]
pub enum View<'a> {
    Value(&'a Value),
    /// An object's members in the order sent, each value's text borrowed from the record.
    Members(Vec<(Cow<'a, str>, &'a RawValue)>),
}

impl<'a> View<'a> {
    /// The value at `segments` (JSON-pointer segments, already unescaped), if there is one.
    pub fn walk(&self, segments: &[String]) -> Option<Leaf<'a>> {
        match self {
            View::Value(value) => walk_value(value, segments).map(Leaf::from_value),
            View::Members(members) => {
                let (first, rest) = segments.split_first()?;
                walk_raw(member(members, first)?, rest)
            }
        }
    }
}

/// The members of the JSON object `text`, or `None` when it is not one.
fn members(text: &str) -> Option<Vec<(Cow<'_, str>, &RawValue)>> {
    if !text.starts_with('{') {
        return None;
    }
    serde_json::from_str::<Members>(text).ok().map(|m| m.0)
}

/// A repeated key's last value wins, as it does in a `Value`.
fn member<'a>(members: &[(Cow<'a, str>, &'a RawValue)], key: &str) -> Option<&'a RawValue> {
    members
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| *v)
}

fn walk_raw<'a>(raw: &'a RawValue, segments: &[String]) -> Option<Leaf<'a>> {
    let Some((first, rest)) = segments.split_first() else {
        return Some(Leaf::from_raw(raw));
    };
    let text = raw.get();
    if text.starts_with('{') {
        walk_raw(member(&members(text)?, first)?, rest)
    } else if text.starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(text).ok()?;
        walk_raw(items.get(array_index(first)?)?, rest)
    } else {
        None
    }
}

/// `Value::pointer` over pre-split segments: object keys, and array indexes without a sign
/// or leading zeros.
fn walk_value<'a>(value: &'a Value, segments: &[String]) -> Option<&'a Value> {
    segments.iter().try_fold(value, |at, segment| match at {
        Value::Object(map) => map.get(segment),
        Value::Array(items) => items.get(array_index(segment)?),
        _ => None,
    })
}

fn array_index(segment: &str) -> Option<usize> {
    let plain = !segment.starts_with('+') && (segment == "0" || !segment.starts_with('0'));
    segment.parse::<usize>().ok().filter(|_| plain)
}

/// One field's value: as found in the record, or as a mapping's converter made it.
#[derive(Debug, Clone, PartialEq)]
pub enum Leaf<'a> {
    Null,
    Bool(bool),
    /// A JSON number as written: never through a float.
    Number(Cow<'a, str>),
    Str(Cow<'a, str>),
    /// An array or an object: no Track360 field is one; kept for messages and quarantine.
    Compound(Cow<'a, Value>),
    /// Converted by the mapping; each stands for its text (RFC 3339 UTC, `YYYY-MM-DD`, the
    /// normalised decimal), which is what the record holds after mapping.
    Instant(Timestamp),
    Day(Date),
    Decimal(Decimal),
}

impl<'a> Leaf<'a> {
    pub fn from_value(value: &'a Value) -> Leaf<'a> {
        match value {
            Value::Null => Leaf::Null,
            Value::Bool(b) => Leaf::Bool(*b),
            Value::Number(n) => Leaf::Number(Cow::Borrowed(n.as_str())),
            Value::String(s) => Leaf::Str(Cow::Borrowed(s)),
            Value::Array(_) | Value::Object(_) => Leaf::Compound(Cow::Borrowed(value)),
        }
    }

    /// From valid JSON text (what serde_json captured as a `RawValue`).
    pub fn from_raw(raw: &'a RawValue) -> Leaf<'a> {
        let text = raw.get();
        match text.as_bytes().first() {
            Some(b'"') if !text.contains('\\') => {
                Leaf::Str(Cow::Borrowed(&text[1..text.len() - 1]))
            }
            Some(b'n') => Leaf::Null,
            Some(b't') => Leaf::Bool(true),
            Some(b'f') => Leaf::Bool(false),
            Some(b'-' | b'0'..=b'9') => Leaf::Number(Cow::Borrowed(text)),
            // Escaped strings, arrays and objects: parsed (rare in a record's fields).
            _ => match serde_json::from_str::<Value>(text) {
                Ok(Value::String(s)) => Leaf::Str(Cow::Owned(s)),
                Ok(value) => Leaf::Compound(Cow::Owned(value)),
                Err(_) => Leaf::Null,
            },
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Leaf::Null)
    }

    /// What it is, for messages ("expected a string, found a number").
    pub fn kind(&self) -> &'static str {
        match self {
            Leaf::Null => "null",
            Leaf::Bool(_) => "a boolean",
            Leaf::Number(_) => "a number",
            Leaf::Str(_) | Leaf::Instant(_) | Leaf::Day(_) | Leaf::Decimal(_) => "a string",
            Leaf::Compound(v) if v.is_array() => "an array",
            Leaf::Compound(_) => "an object",
        }
    }

    /// The text of a string (a converted value's text included); `None` for other kinds.
    pub fn text(&self) -> Option<Cow<'_, str>> {
        match self {
            Leaf::Str(s) => Some(Cow::Borrowed(s)),
            Leaf::Instant(ts) => Some(Cow::Owned(ts.to_string())),
            Leaf::Day(d) => Some(Cow::Owned(d.to_string())),
            Leaf::Decimal(d) => Some(Cow::Owned(d.to_string())),
            _ => None,
        }
    }

    /// As a JSON value: strings for converted values, as the mapped record holds them.
    pub fn to_value(&self) -> Value {
        match self {
            Leaf::Null => Value::Null,
            Leaf::Bool(b) => Value::Bool(*b),
            Leaf::Number(n) => {
                serde_json::from_str(n).unwrap_or_else(|_| Value::String(n.to_string()))
            }
            Leaf::Compound(v) => v.as_ref().clone(),
            other => Value::String(other.text().unwrap_or_default().into_owned()),
        }
    }
}

impl fmt::Display for Leaf<'_> {
    /// A string's text; any other value as JSON.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.text() {
            Some(text) => f.write_str(&text),
            None => write!(f, "{}", self.to_value()),
        }
    }
}

/// An object's members with their values unparsed.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Members<'de>, M::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some(Key(key)) = map.next_key()? {
                    members.push((key, map.next_value::<&RawValue>()?));
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(ObjectVisitor)
    }
}

/// A key, borrowed from the text unless it has escapes (serde's `Cow<str>` always copies).
pub(crate) struct Key<'a>(pub Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text(json: &str) -> RawRecord {
        RawRecord::Text(serde_json::from_str(json).unwrap())
    }

    fn seg(path: &[&str]) -> Vec<String> {
        path.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_text_record_reads_as_its_value_would() {
        let json = r#"{"id": 7, "amount": "1.50", "n": 1.50e3, "s": "a\"b\u00e9", "x": null,
                       "ok": true, "tags": ["a", {"k": "v"}], "o": {"p": {"q": "deep"}},
                       "dup": 1, "dup": 2}"#;
        let value: Value = serde_json::from_str(json).unwrap();
        let (raw, parsed) = (text(json), RawRecord::Value(value.clone()));
        let (raw_view, parsed_view) = (raw.view().unwrap(), parsed.view().unwrap());
        for path in [
            &["id"][..],
            &["amount"],
            &["n"],
            &["s"],
            &["x"],
            &["ok"],
            &["tags"],
            &["tags", "1", "k"],
            &["tags", "01"],
            &["o", "p", "q"],
            &["o", "p"],
            &["dup"],
            &["missing"],
            &["id", "deeper"],
        ] {
            let (a, b) = (raw_view.walk(&seg(path)), parsed_view.walk(&seg(path)));
            assert_eq!(
                a.as_ref().map(Leaf::to_value),
                b.as_ref().map(Leaf::to_value),
                "{path:?}"
            );
            assert_eq!(
                a.as_ref().map(Leaf::kind),
                b.as_ref().map(Leaf::kind),
                "{path:?}"
            );
        }
        // A number keeps its text: no float on the way.
        assert_eq!(
            raw_view.walk(&seg(&["n"])),
            Some(Leaf::Number(Cow::Borrowed("1.50e3")))
        );
        drop(raw_view);
        assert_eq!(raw.into_value(), value);
    }

    #[test]
    fn only_objects_have_a_view() {
        assert!(text("[1, 2]").view().is_none());
        assert!(text("\"x\"").view().is_none());
        assert!(RawRecord::Value(json!(3)).view().is_none());
        assert_eq!(text(r#"{"a": 1}"#).text(), r#"{"a": 1}"#);
    }
}
