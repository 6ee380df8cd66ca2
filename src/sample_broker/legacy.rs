//! The sample broker's second API: the same records in the shape of a legacy CRM/MetaTrader
//! bridge — other paths and names, epoch-millisecond and EET-naive timestamps, string amounts,
//! MT5 volume units, numeric type codes, offset/limit with `has_more`.
//!
//! `GET /legacy/v2/{clients,deals,daily}?from=<epoch ms>&to=<epoch ms>&offset=N&limit=N` →
//! `{"result": {"items": [...], "has_more": bool}}`.

use jiff::Timestamp;
use jiff::tz::TimeZone;
use rust_decimal::Decimal;
use serde_json::{Value, json};

use super::data::Table;
use crate::model::Entity;

/// The zone of the legacy API's naive timestamps (a MetaTrader server on EET/EEST).
pub const SERVER_ZONE: &str = "Europe/Athens";
/// The legacy API's naive timestamp format.
pub const NAIVE_FORMAT: &str = "%Y.%m.%d %H:%M:%S";

/// The legacy path segment of each entity.
pub fn segment(entity: Entity) -> &'static str {
    match entity {
        Entity::Customers => "clients",
        Entity::Transactions => "deals",
        Entity::TradingActivity => "daily",
    }
}

/// The broker's transaction type codes (MT5-like).
pub const TYPE_CODES: [(&str, i64); 5] = [
    ("deposit", 2),
    ("withdrawal", 3),
    ("bonus", 6),
    ("adjustment", 5),
    ("ib_rebate", 18),
];

/// KYC codes.
pub const KYC_CODES: [(&str, i64); 2] = [("pending", 1), ("approved", 2)];

/// One page of the legacy API.
pub fn page(
    table: &Table,
    entity: Entity,
    from: Timestamp,
    to: Timestamp,
    offset: usize,
    limit: usize,
) -> Value {
    let mut rows: Vec<Value> = table
        .window(from, to, None)
        .skip(offset)
        .take(limit + 1)
        .map(|(_, record)| reshape(entity, record))
        .collect();
    let has_more = rows.len() > limit;
    rows.truncate(limit);
    json!({"result": {"items": rows, "has_more": has_more}})
}

/// A standard record in the legacy shape.
pub fn reshape(entity: Entity, r: &Value) -> Value {
    let text = |f: &str| r.get(f).cloned().unwrap_or(Value::Null);
    let instant = |f: &str| {
        r.get(f)
            .and_then(Value::as_str)
            .and_then(|t| t.parse::<Timestamp>().ok())
    };
    let millis = |f: &str| instant(f).map_or(Value::Null, |t| json!(t.as_millisecond()));
    match entity {
        Entity::Customers => {
            let zone = TimeZone::get(SERVER_ZONE).expect("zone database has Europe/Athens");
            let updated = instant("last_modified_date").map_or(Value::Null, |t| {
                json!(t.to_zoned(zone).strftime(NAIVE_FORMAT).to_string())
            });
            let kyc = code(&KYC_CODES, &text("kyc_status_id"));
            json!({
                "login": text("customer_id"), "registered": millis("signup_date"), "updated": updated,
                "agent": text("affiliate_id"), "campaign": text("campaign_id"), "click": text("click_id"),
                "lang": text("lang_id"), "country": text("country_code"), "kyc": kyc,
                "sales_status": text("sales_status_id"), "group": text("trading_account_type"),
                "leverage": text("leverage"),
                "profile": {"first": text("first_name"), "last": text("last_name"), "email": text("email")},
            })
        }
        Entity::Transactions => json!({
            "ticket": text("transaction_id"), "login": text("customer_id"),
            "action": code(&TYPE_CODES, &text("transaction_type")),
            "amount": text("amount"), "ccy": text("currency"),
            "time": instant("transaction_date").map_or(Value::Null, |t| json!(t.as_second())),
            "state": text("status"), "modified_ms": millis("last_modified_date"),
        }),
        Entity::TradingActivity => {
            // MT5 volume units: 1 lot = 10,000 units.
            let volume = r
                .get("lots_traded")
                .and_then(Value::as_str)
                .and_then(|l| l.parse::<Decimal>().ok())
                .map_or(Value::Null, |lots| {
                    let units = lots * Decimal::from(10_000);
                    json!(
                        units
                            .normalize()
                            .to_string()
                            .parse::<i64>()
                            .unwrap_or_default()
                    )
                });
            json!({
                "day": text("date"), "login": text("customer_id"), "symbol": text("instrument"),
                "volume": volume, "notional_usd": text("volume_usd"), "spread": text("spread_cost"),
                "comm": text("commission"), "profit": text("pnl"), "ccy": text("currency"),
                "modified_ms": millis("last_modified_date"),
            })
        }
    }
}

fn code(codes: &[(&str, i64)], value: &Value) -> Value {
    value
        .as_str()
        .and_then(|v| codes.iter().find(|(name, _)| *name == v))
        .map_or_else(|| value.clone(), |(_, c)| json!(c))
}
