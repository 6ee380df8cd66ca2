//! A broker's record as it arrives, and the values a mapping reads out of it.
//!
//! A REST page's records are not parsed into `serde_json::Value`s: a `Value` allocates every
//! key and every string and builds a map per record, then frees it all a moment later, and
//! that was a fifth of a backfill's CPU. The page is read once (`source::rest::body`): each
//! record that is an object becomes an `Object`, the places of its keys and values in the
//! page's text. The mapping reads it through a `View` and each field as a `Leaf` (a string or
//! number borrowed from the page too). Records from a database or from quarantine are
//! `Value`s and read through the same two types.

use std::borrow::Cow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Range;
use std::sync::Arc;

use jiff::Timestamp;
use jiff::civil::Date;
use rust_decimal::Decimal;
use serde::de::value::SeqAccessDeserializer;
use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

/// One raw record of a page.
#[derive(Debug, Clone)]
pub enum RawRecord {
    /// An object in a page's text.
    Object(Object),
    /// A record built from a database row or read back from quarantine, or a page's record
    /// that is not an object (or has escaped keys).
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
            RawRecord::Object(object) => object.to_value(),
            RawRecord::Value(value) => value,
        }
    }

    /// The record's JSON text, compact.
    pub fn text(&self) -> String {
        match self {
            RawRecord::Object(object) => object.to_value().to_string(),
            RawRecord::Value(value) => value.to_string(),
        }
    }

    /// A hash of the whole record: two answers of a broker hold the same record when these
    /// are equal (a record that changed is a new one). An object is hashed by its members'
    /// texts as sent, without building a value: a broker that printed the same record with
    /// its keys in another order would make it look changed (none is known to).
    pub fn identity(&self) -> u64 {
        let mut hasher = std::hash::DefaultHasher::new();
        match self {
            RawRecord::Object(object) => {
                for (key, value) in object.members() {
                    (key, value).hash(&mut hasher);
                }
            }
            RawRecord::Value(value) => value.to_string().hash(&mut hasher),
        }
        hasher.finish()
    }

    /// The record's members for a mapping to read, or `None` when it is not a JSON object.
    pub fn view(&self) -> Option<View<'_>> {
        match self {
            RawRecord::Object(object) => Some(View::Object(object)),
            RawRecord::Value(value) => value.is_object().then_some(View::Value(value)),
        }
    }
}

/// A JSON object in a page's text: where each member's key and value are. The page's text is
/// shared by its records and freed with the last of them.
#[derive(Debug, Clone)]
pub struct Object {
    page: Arc<str>,
    /// Key start, key length, value start, value length: byte offsets into `page`. Keys
    /// without escapes only (a key with one makes its record a `Value`).
    members: Vec<[u32; 4]>,
}

impl Object {
    /// Each member's key and value text, in the order sent.
    fn members(&self) -> impl DoubleEndedIterator<Item = (&str, &str)> {
        self.members
            .iter()
            .map(|[ks, kl, vs, vl]| (&self.page[span(*ks, *kl)], &self.page[span(*vs, *vl)]))
    }

    /// A repeated key's last value wins, as it does in a `Value`. (Every field of every record
    /// is looked up here: lengths first, bytes only when they match.)
    fn get(&self, key: &str) -> Option<&str> {
        let page = self.page.as_bytes();
        let [_, _, start, len] = *self.members.iter().rev().find(|[ks, kl, _, _]| {
            *kl as usize == key.len() && &page[span(*ks, *kl)] == key.as_bytes()
        })?;
        self.page.get(span(start, len))
    }

    fn to_value(&self) -> Value {
        Value::Object(
            self.members()
                .map(|(k, v)| (k.to_owned(), serde_json::from_str(v).unwrap_or(Value::Null)))
                .collect(),
        )
    }
}

fn span(start: u32, len: u32) -> Range<usize> {
    start as usize..start as usize + len as usize
}

/// A JSON object as a mapping reads it.
#[derive(Debug)]
pub enum View<'a> {
    Value(&'a Value),
    Object(&'a Object),
}

impl<'a> View<'a> {
    /// The value at `segments` (JSON-pointer segments, already unescaped), if there is one.
    pub fn walk(&self, segments: &[String]) -> Option<Leaf<'a>> {
        match self {
            View::Value(value) => walk_value(value, segments).map(Leaf::from_value),
            View::Object(object) => {
                let (first, rest) = segments.split_first()?;
                walk_text(object.get(first)?, rest)
            }
        }
    }
}

/// Into the JSON text `text` (valid JSON: serde_json read it).
fn walk_text<'a>(text: &'a str, segments: &[String]) -> Option<Leaf<'a>> {
    let Some((first, rest)) = segments.split_first() else {
        return Some(Leaf::from_text(text));
    };
    if text.starts_with('{') {
        let members = serde_json::from_str::<Members>(text).ok()?.0;
        let (_, value) = members.iter().rev().find(|(k, _)| k == first)?;
        walk_text(value.get(), rest)
    } else if text.starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(text).ok()?;
        walk_text(items.get(array_index(first)?)?.get(), rest)
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

    /// From valid JSON text (a value serde_json has read).
    pub fn from_text(text: &'a str) -> Leaf<'a> {
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

/// Reads one record of a page whose text is `page`. The deserializer must read `page` itself
/// (what it borrows must lie in it); anything else makes the record a `Value`.
pub struct RecordSeed<'p> {
    pub page: &'p Arc<str>,
}

/// With `arbitrary_precision`, serde_json hands a number over as a map with this one key.
pub(crate) const NUMBER_TOKEN: &str = "$serde_json::private::Number";

impl<'de> DeserializeSeed<'de> for RecordSeed<'_> {
    type Value = RawRecord;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<RawRecord, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RecordSeed<'_> {
    type Value = RawRecord;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a record")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<RawRecord, M::Error> {
        // Where a text serde_json borrowed lies in the page; `None` if it is not the page's.
        let base = self.page.as_ptr() as usize;
        let place = |text: &str| -> Option<[u32; 2]> {
            let start = (text.as_ptr() as usize).checked_sub(base)?;
            (start + text.len() <= self.page.len()).then_some(())?;
            Some([u32::try_from(start).ok()?, u32::try_from(text.len()).ok()?])
        };
        let mut members: Vec<[u32; 4]> = Vec::with_capacity(map.size_hint().unwrap_or(16));
        while let Some(Key(key)) = map.next_key()? {
            if members.is_empty() && key == NUMBER_TOKEN {
                let text: String = map.next_value()?;
                let number = serde_json::from_str(&text).map_err(de::Error::custom)?;
                return Ok(RawRecord::Value(number));
            }
            let value: &'de RawValue = map.next_value()?;
            let placed = match &key {
                Cow::Borrowed(k) => place(k).zip(place(value.get())),
                Cow::Owned(_) => None,
            };
            if let Some(([ks, kl], [vs, vl])) = placed {
                members.push([ks, kl, vs, vl]);
                continue;
            }
            // An escaped key (its text is not the key): the record becomes a `Value`.
            let read = Object {
                page: Arc::clone(self.page),
                members,
            };
            let Value::Object(mut object) = read.to_value() else {
                unreachable!("an object's value is an object")
            };
            let parse = |v: &RawValue| serde_json::from_str(v.get()).map_err(de::Error::custom);
            object.insert(key.into_owned(), parse(value)?);
            while let Some((k, v)) = map.next_entry::<String, Value>()? {
                object.insert(k, v);
            }
            return Ok(RawRecord::Value(Value::Object(object)));
        }
        Ok(RawRecord::Object(Object {
            page: Arc::clone(self.page),
            members,
        }))
    }

    // Not an object: kept as a value, for validation to say so.
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<RawRecord, A::Error> {
        Value::deserialize(SeqAccessDeserializer::new(seq)).map(RawRecord::Value)
    }

    fn visit_unit<E: de::Error>(self) -> Result<RawRecord, E> {
        Ok(RawRecord::Value(Value::Null))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawRecord, E> {
        Ok(RawRecord::Value(Value::Bool(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawRecord, E> {
        Ok(RawRecord::Value(Value::from(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawRecord, E> {
        Ok(RawRecord::Value(Value::from(v)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawRecord, E> {
        Ok(RawRecord::Value(Value::from(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<RawRecord, E> {
        Ok(RawRecord::Value(Value::String(v.to_owned())))
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

    /// A record as a page's parser reads it.
    fn text(json: &str) -> RawRecord {
        let page: Arc<str> = Arc::from(json);
        let mut de = serde_json::Deserializer::from_str(&page);
        RecordSeed { page: &page }.deserialize(&mut de).unwrap()
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
        assert_eq!(raw.into_value(), value);
    }

    #[test]
    fn a_record_is_the_same_record_until_a_value_changes() {
        let a = text(r#"{"id": "1", "amount": "10.00"}"#).identity();
        assert_eq!(a, text(r#"{ "id":"1" ,"amount" :  "10.00" }"#).identity());
        assert_ne!(a, text(r#"{"id": "1", "amount": "10.50"}"#).identity());
        assert_ne!(
            a,
            text(r#"{"id": "1", "amount": "10.00", "x": null}"#).identity()
        );
    }

    #[test]
    fn only_objects_have_a_view() {
        assert!(text("[1, 2]").view().is_none());
        assert!(text("\"x\"").view().is_none());
        assert!(text("12.50").view().is_none());
        let exact: Value = serde_json::from_str("12.50").unwrap();
        assert_eq!(text("12.50").into_value(), exact);
        assert!(RawRecord::Value(json!(3)).view().is_none());
        assert!(matches!(text(r#"{"a": 1}"#), RawRecord::Object(_)));
        assert_eq!(text(r#"{"a":  1, "b": [2]}"#).text(), r#"{"a":1,"b":[2]}"#);
        // An escaped key is unescaped, as a `Value` would have it.
        let escaped = text(r#"{"a\u0062": 1}"#);
        assert!(matches!(escaped, RawRecord::Value(_)));
        assert_eq!(escaped.into_value(), json!({"ab": 1}));
    }
}
