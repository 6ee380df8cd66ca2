//! Normalisation: a source's raw record → a JSON object in Track360 shape (the guide's field
//! names, RFC 3339 UTC instants), ready for validation.
//!
//! The `track360-standard` preset already speaks Track360's field names, so its normaliser only
//! puts instants on UTC: a naive date-time (no offset) is read in the connector's time zone,
//! because a broker's "server time" is rarely UTC (DOMAIN §2) and assuming UTC silently shifts
//! every record. Declarative field mapping for other API shapes plugs in here.

use jiff::Timestamp;
use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;
use serde_json::Value;

use crate::model::Entity;

/// Turns raw source records into Track360-shaped records.
#[derive(Debug, Clone)]
pub struct Normaliser {
    zone: TimeZone,
}

impl Normaliser {
    /// A normaliser for the standard preset, reading naive timestamps in `zone`.
    pub fn standard(zone: TimeZone) -> Self {
        Normaliser { zone }
    }

    /// Normalises one record in place. Never fails: what it cannot make sense of it leaves
    /// as it was, for validation to reject with a reason.
    pub fn apply(&self, entity: Entity, record: &mut Value) {
        let Some(object) = record.as_object_mut() else {
            return;
        };
        for field in timestamp_fields(entity) {
            if let Some(Value::String(text)) = object.get_mut(*field)
                && let Some(utc) = self.to_utc(text)
            {
                *text = utc.to_string();
            }
        }
    }

    /// The instant a broker's timestamp text stands for, if it is naive or a bare date.
    /// Text that already carries an offset is left to validation, unchanged.
    fn to_utc(&self, text: &str) -> Option<Timestamp> {
        if text.parse::<Timestamp>().is_ok() {
            return None;
        }
        let civil = match text.parse::<DateTime>() {
            Ok(dt) => dt,
            Err(_) => text
                .parse::<Date>()
                .ok()?
                .to_datetime(jiff::civil::Time::midnight()),
        };
        // `compatible` disambiguation: a time in a DST gap moves forward, a repeated hour
        // takes its first occurrence, as the broker's server would have printed it.
        self.zone
            .to_ambiguous_zoned(civil)
            .compatible()
            .ok()
            .map(|z| z.timestamp())
    }
}

fn timestamp_fields(entity: Entity) -> &'static [&'static str] {
    match entity {
        Entity::Customers => &["signup_date", "last_modified_date"],
        Entity::Transactions => &["transaction_date", "last_modified_date"],
        Entity::TradingActivity => &["last_modified_date"],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn naive_times_are_read_in_the_broker_zone() {
        let zone = TimeZone::get("Europe/Athens").unwrap();
        let n = Normaliser::standard(zone);
        let mut winter = json!({"transaction_date": "2026-01-15 10:00:00",
                                "last_modified_date": "2026-07-15T10:00:00"});
        n.apply(Entity::Transactions, &mut winter);
        assert_eq!(winter["transaction_date"], "2026-01-15T08:00:00Z");
        assert_eq!(winter["last_modified_date"], "2026-07-15T07:00:00Z");
    }

    #[test]
    fn explicit_offsets_are_kept_for_validation() {
        let n = Normaliser::standard(TimeZone::get("Europe/Athens").unwrap());
        let mut r = json!({"signup_date": "2026-01-15T10:00:00+05:00"});
        n.apply(Entity::Customers, &mut r);
        assert_eq!(r["signup_date"], "2026-01-15T10:00:00+05:00");
    }
}
