//! Declarative field mapping: per entity, each Track360 field from a path of the source record
//! or a constant, through at most one converter.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::BTreeMap;

use jiff::tz::TimeZone;
use rust_decimal::Decimal;
use serde_json::Value;

use super::pii::PiiPolicy;
use super::raw::{Leaf, View};
use super::time::parse_instant_as;
use crate::config::plan::{TimeFormat, json_pointer, pointer_segments};
use crate::config::raw::{RawField, RawFieldRule};
use crate::model::Entity;
use crate::validate::parse_decimal;

/// How one Track360 field is made.
#[derive(Debug, Clone)]
pub struct FieldRule {
    pub field: &'static str,
    pub source: FieldSource,
    /// Used when the path is absent or null.
    pub default: Option<Value>,
    pub convert: Convert,
    /// A path's JSON-pointer segments, unescaped once at load (`Value::pointer` would unescape
    /// into new strings for every record).
    segments: Vec<String>,
}

#[derive(Debug, Clone)]
pub enum FieldSource {
    /// A JSON pointer into the source record.
    Path(String),
    Const(Value),
}

#[derive(Debug, Clone)]
pub enum Convert {
    /// As it is.
    Plain,
    /// An instant in this format → RFC 3339 UTC (for `date`: the day in the connector's zone).
    Time(TimeFormat),
    /// A decimal (number or string) multiplied by this factor, exactly.
    Scale(Decimal),
    /// A code looked up in this map.
    Map(BTreeMap<String, String>),
}

/// One record in Track360 shape: field name → value, borrowed from the source record where
/// no conversion was needed. At most one entry a field, in the entity's field order.
#[derive(Debug, Default)]
pub struct Fields<'a> {
    entries: Vec<(&'static str, Leaf<'a>)>,
    /// Where `get` looks first: the entry after the last one found. Validation asks for the
    /// fields in the order they are kept, so a lookup is one comparison, not a scan from the
    /// front (which was a name comparison for every field before it, for every field).
    next: Cell<usize>,
}

impl<'a> Fields<'a> {
    fn new(entries: Vec<(&'static str, Leaf<'a>)>) -> Fields<'a> {
        Fields {
            entries,
            next: Cell::new(0),
        }
    }

    pub fn get(&self, field: &str) -> Option<&Leaf<'a>> {
        let at = match self.entries.get(self.next.get()) {
            Some((name, _)) if *name == field => self.next.get(),
            _ => self.entries.iter().position(|(name, _)| *name == field)?,
        };
        self.next.set(at + 1);
        Some(&self.entries[at].1)
    }

    /// The fields of `object` that are Track360 fields of `entity`, as they are.
    pub fn of_object(entity: Entity, object: &'a serde_json::Map<String, Value>) -> Fields<'a> {
        Fields::new(
            entity
                .fields()
                .iter()
                .filter_map(|f| Some((*f, Leaf::from_value(object.get(*f)?))))
                .collect(),
        )
    }

    /// As a JSON object (what quarantine keys and `apply` are made from).
    pub fn to_value(&self) -> Value {
        Value::Object(
            self.entries
                .iter()
                .map(|(name, v)| ((*name).to_owned(), v.to_value()))
                .collect(),
        )
    }
}

/// A connector's compiled mapping for every entity.
#[derive(Debug, Clone)]
pub struct Mapping {
    rules: [Vec<FieldRule>; 3],
    zone: TimeZone,
    pub pii: PiiPolicy,
}

impl Mapping {
    /// The `track360-standard` preset: every field from its own name.
    pub fn standard(zone: TimeZone, pii: PiiPolicy) -> Mapping {
        Mapping {
            rules: Entity::ALL.map(|e| e.fields().iter().map(|f| identity(e, f)).collect()),
            zone,
            pii,
        }
    }

    /// The source column `field` is read from as it is — a one-segment path, no conversion
    /// beyond reading RFC 3339 — or `None` (a database cannot compute with it then).
    pub fn plain_column(&self, entity: Entity, field: &str) -> Option<&str> {
        let rule = self.rules[entity as usize]
            .iter()
            .find(|r| r.field == field)?;
        match (&rule.source, &rule.convert) {
            (FieldSource::Path(path), Convert::Plain | Convert::Time(TimeFormat::Rfc3339)) => {
                let name = path.strip_prefix('/')?;
                (!name.is_empty() && !name.contains('/') && !name.contains('~')).then_some(name)
            }
            _ => None,
        }
    }

    /// Compiles `[mapping.<entity>]` tables over the standard preset. Problems come back as
    /// (key, message), every one of them.
    pub fn compile(
        raw: &BTreeMap<String, BTreeMap<String, RawField>>,
        zone: TimeZone,
        pii: PiiPolicy,
    ) -> Result<Mapping, Vec<(String, String)>> {
        let mut mapping = Mapping::standard(zone, pii);
        let mut problems = Vec::new();
        for (entity_name, fields) in raw {
            let entity = match entity_name.parse::<Entity>() {
                Ok(e) => e,
                Err(e) => {
                    problems.push((format!("mapping.{entity_name}"), e));
                    continue;
                }
            };
            for (field_name, raw_rule) in fields {
                let key = format!("mapping.{entity_name}.{field_name}");
                let Some(field) = entity.fields().iter().find(|f| *f == field_name) else {
                    problems.push((
                        key,
                        format!(
                            "`{field_name}` is not a Track360 field of {entity}: {}",
                            entity.fields().join(", ")
                        ),
                    ));
                    continue;
                };
                match compile_rule(entity, field, raw_rule) {
                    Ok(rule) => {
                        let slot = &mut mapping.rules[entity as usize];
                        if let Some(existing) = slot.iter_mut().find(|r| r.field == rule.field) {
                            *existing = rule;
                        }
                    }
                    Err(message) => problems.push((key, message)),
                }
            }
        }
        if problems.is_empty() {
            Ok(mapping)
        } else {
            Err(problems)
        }
    }

    /// Maps one raw record to Track360 shape. Fields that could not be converted keep their
    /// source value (so validation and quarantine keys still see it) and get a reason.
    pub fn apply(&self, entity: Entity, raw: &Value) -> (Value, Vec<String>) {
        if !raw.is_object() {
            return (raw.clone(), Vec::new());
        }
        let (fields, reasons) = self.fields(entity, &View::Value(raw));
        (fields.to_value(), reasons)
    }

    /// As `apply`, as a view that borrows what it does not convert from the record: the
    /// per-record path, without a copy of every field.
    pub fn fields<'a>(&'a self, entity: Entity, raw: &View<'a>) -> (Fields<'a>, Vec<String>) {
        let mut out = Vec::with_capacity(self.rules[entity as usize].len());
        let mut reasons = Vec::new();
        for rule in &self.rules[entity as usize] {
            let found = match &rule.source {
                FieldSource::Path(_) => raw.walk(&rule.segments).filter(|v| !v.is_null()),
                FieldSource::Const(value) => Some(Leaf::from_value(value)),
            };
            let Some(value) = found.or_else(|| rule.default.as_ref().map(Leaf::from_value)) else {
                continue;
            };
            match self.convert(rule, &value) {
                Ok(None) => out.push((rule.field, value)),
                Ok(Some(converted)) => out.push((rule.field, converted)),
                Err(why) => {
                    let from = match &rule.source {
                        FieldSource::Path(p) => format!(" (from {p})"),
                        FieldSource::Const(_) => String::new(),
                    };
                    let shown = if crate::validate::is_personal(rule.field) {
                        String::new()
                    } else {
                        format!("`{}`", clip(&value))
                    };
                    let what = format!("{shown}{from} {why}");
                    reasons.push(format!("{}: {}", rule.field, what.trim_start()));
                    out.push((rule.field, value));
                }
            }
        }
        (Fields::new(out), reasons)
    }

    /// Applies the PII policy to a raw record at the paths the PII fields come from, so that
    /// quarantine keeps no personal data the policy drops or hashes.
    pub fn redact_raw(&self, entity: Entity, raw: &mut Value) {
        if !self.pii.applies_to(entity) {
            return;
        }
        for rule in &self.rules[entity as usize] {
            let FieldSource::Path(pointer) = &rule.source else {
                continue;
            };
            let Some((parent, last)) = pointer.rsplit_once('/') else {
                continue;
            };
            let name = last.replace("~1", "/").replace("~0", "~");
            let parent = if parent.is_empty() {
                Some(&mut *raw)
            } else {
                raw.pointer_mut(parent)
            };
            if let Some(Value::Object(object)) = parent
                && let Some(value) = object.get_mut(&name)
                && !self.pii.apply_value(rule.field, value)
            {
                object.remove(&name);
            }
        }
    }

    /// The converted value, or `None` when it is the value as it is.
    fn convert(&self, rule: &FieldRule, value: &Leaf) -> Result<Option<Leaf<'static>>, String> {
        match &rule.convert {
            Convert::Plain => Ok(None),
            Convert::Time(format) => {
                let ts = parse_instant_as(value, format, &self.zone)?;
                if rule.field == "date" {
                    Ok(Some(Leaf::Day(ts.to_zoned(self.zone.clone()).date())))
                } else {
                    Ok(Some(Leaf::Instant(ts)))
                }
            }
            Convert::Scale(factor) => {
                let text = match value {
                    Leaf::Number(n) => n,
                    Leaf::Str(s) => s.trim(),
                    _ => return Err("is not a number".into()),
                };
                let number = parse_decimal(text).ok_or("is not a decimal number")?;
                let scaled = number.checked_mul(*factor).ok_or("overflows when scaled")?;
                Ok(Some(Leaf::Decimal(scaled.normalize())))
            }
            Convert::Map(map) => {
                let code = match value {
                    Leaf::Str(s) => s.to_string(),
                    Leaf::Number(_) | Leaf::Bool(_) => value.to_value().to_string(),
                    _ => return Err("is not a code".into()),
                };
                map.get(&code)
                    .map(|v| Some(Leaf::Str(Cow::Owned(v.clone()))))
                    .ok_or_else(|| "is not in the connector's enum map".to_owned())
            }
        }
    }
}

fn identity(entity: Entity, field: &'static str) -> FieldRule {
    let convert = if entity.timestamp_fields().contains(&field) {
        Convert::Time(TimeFormat::Rfc3339)
    } else {
        Convert::Plain
    };
    let source = FieldSource::Path(format!("/{field}"));
    FieldRule {
        field,
        segments: segments(&source),
        source,
        default: None,
        convert,
    }
}

fn segments(source: &FieldSource) -> Vec<String> {
    match source {
        FieldSource::Path(pointer) => pointer_segments(pointer),
        FieldSource::Const(_) => Vec::new(),
    }
}

fn compile_rule(entity: Entity, field: &'static str, raw: &RawField) -> Result<FieldRule, String> {
    let rule = match raw {
        RawField::Path(path) => RawFieldRule {
            path: Some(path.clone()),
            ..RawFieldRule::default()
        },
        RawField::Rule(rule) => rule.clone(),
    };
    let source = match (&rule.path, &rule.constant) {
        (Some(path), None) => FieldSource::Path(json_pointer(path)?),
        (None, Some(constant)) => FieldSource::Const(to_json(constant)?),
        (None, None) => return Err("needs `path` or `const`".into()),
        (Some(_), Some(_)) => return Err("takes `path` or `const`, not both".into()),
    };
    let default = rule.default.as_ref().map(to_json).transpose()?;
    let converters = [
        rule.time.is_some(),
        rule.scale.is_some(),
        rule.map.is_some(),
    ];
    if converters.iter().filter(|c| **c).count() > 1 {
        return Err("takes at most one of `time`, `scale` and `enum`".into());
    }
    let convert = if let Some(time) = &rule.time {
        if !(entity.timestamp_fields().contains(&field) || field == "date") {
            return Err(format!(
                "`time` applies to instants and `date`, not to `{field}`"
            ));
        }
        Convert::Time(TimeFormat::parse(time)?)
    } else if let Some(scale) = &rule.scale {
        Convert::Scale(
            parse_decimal(scale).ok_or_else(|| format!("scale `{scale}` is not a decimal"))?,
        )
    } else if let Some(map) = &rule.map {
        Convert::Map(map.clone())
    } else if entity.timestamp_fields().contains(&field) {
        Convert::Time(TimeFormat::Rfc3339)
    } else {
        Convert::Plain
    };
    Ok(FieldRule {
        field,
        segments: segments(&source),
        source,
        default,
        convert,
    })
}

fn to_json(value: &toml::Value) -> Result<Value, String> {
    serde_json::to_value(value).map_err(|e| format!("cannot use {value} as a value: {e}"))
}

fn clip(value: &Leaf) -> String {
    value.to_string().chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn legacy() -> Mapping {
        let raw: BTreeMap<String, BTreeMap<String, RawField>> = toml::from_str(
            r#"
            [transactions]
            transaction_id = "ticket"
            customer_id = { path = "/login" }
            transaction_type = { path = "action", enum = { "2" = "deposit", "3" = "withdrawal" } }
            amount = "amt"
            currency = "ccy"
            transaction_date = { path = "time", time = "epoch_s" }
            status = { const = "approved" }
            last_modified_date = { path = "meta.updated", time = "%Y.%m.%d %H:%M:%S" }
            [trading_activity]
            date = { path = "day", time = "epoch_ms" }
            lots_traded = { path = "volume", scale = "0.0001" }
            "#,
        )
        .unwrap();
        Mapping::compile(
            &raw,
            TimeZone::get("Europe/Athens").unwrap(),
            PiiPolicy::default(),
        )
        .unwrap()
    }

    #[test]
    fn a_legacy_record_becomes_track360_shaped() {
        let raw = json!({"ticket": 77, "login": 1001, "action": 2, "amt": "100.50", "ccy": "EUR",
                         "time": 1767225600, "meta": {"updated": "2026.01.01 02:00:05"}});
        let (out, reasons) = legacy().apply(Entity::Transactions, &raw);
        assert!(reasons.is_empty(), "{reasons:?}");
        assert_eq!(
            out,
            json!({"transaction_id": 77, "customer_id": 1001, "transaction_type": "deposit",
                   "amount": "100.50", "currency": "EUR", "transaction_date": "2026-01-01T00:00:00Z",
                   "status": "approved", "last_modified_date": "2026-01-01T00:00:05Z"})
        );
    }

    #[test]
    fn paths_are_walked_as_json_pointers_are() {
        let raw = json!({"a": {"b/c": [10, {"~d": 2}]}, "": 1, "0": {"01": 3}});
        for pointer in [
            "/a/b~1c/0",
            "/a/b~1c/1/~0d",
            "/a/b~1c/01",
            "/a/b~1c/+1",
            "/a/b~1c/2",
            "/",
            "/0/01",
            "/a/x",
            "/a/b~1c/0/z",
        ] {
            let source = FieldSource::Path(pointer.to_owned());
            assert_eq!(
                View::Value(&raw)
                    .walk(&segments(&source))
                    .map(|l| l.to_value()),
                raw.pointer(pointer).cloned(),
                "{pointer}"
            );
        }
    }

    #[test]
    fn units_are_scaled_exactly_and_days_taken_in_the_zone() {
        let raw = json!({"day": 1767222000000_i64, "volume": 12300});
        let (out, _) = legacy().apply(Entity::TradingActivity, &raw);
        assert_eq!(out["lots_traded"], "1.23");
        // 2025-12-31T23:00:00Z is already 1 January in Athens.
        assert_eq!(out["date"], "2026-01-01");
    }

    #[test]
    fn conversion_failures_name_the_field_and_the_source() {
        let raw = json!({"ticket": 1, "action": 99, "time": "yesterday"});
        let (_, reasons) = legacy().apply(Entity::Transactions, &raw);
        assert!(
            reasons
                .iter()
                .any(|r| r.starts_with("transaction_type: `99` (from /action)")),
            "{reasons:?}"
        );
        assert!(
            reasons
                .iter()
                .any(|r| r.starts_with("transaction_date: `yesterday` (from /time)")),
            "{reasons:?}"
        );
    }

    #[test]
    fn mapping_errors_name_the_entity_and_the_field() {
        let raw: BTreeMap<String, BTreeMap<String, RawField>> = toml::from_str(
            "[transactions]\nammount = \"amt\"\nstatus = { path = \"s\", const = \"x\" }\n[orders]\nid = \"id\"\n",
        )
        .unwrap();
        let problems = Mapping::compile(&raw, TimeZone::UTC, PiiPolicy::default()).unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "mapping.orders",
                "mapping.transactions.ammount",
                "mapping.transactions.status"
            ]
        );
    }
}
