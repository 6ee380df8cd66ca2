//! The Track360 forex entity model: what every source is normalised into and every sink stores.
//!
//! Money and lots are exact decimals; instants are UTC; `date` is a calendar day.

use std::fmt;
use std::str::FromStr;

use compact_str::CompactString;
use jiff::Timestamp;
use jiff::civil::Date;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// One of the three kinds of record Track360 computes commissions from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Entity {
    Customers,
    Transactions,
    TradingActivity,
}

impl Entity {
    /// In dependency order: customers first, so that the others find their customer.
    pub const ALL: [Entity; 3] = [
        Entity::Customers,
        Entity::Transactions,
        Entity::TradingActivity,
    ];

    /// The name used in config files, the CLI, the store and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Entity::Customers => "customers",
            Entity::Transactions => "transactions",
            Entity::TradingActivity => "trading_activity",
        }
    }

    /// The path segment of the guide's API (`/api/v1/forex/<segment>`).
    pub fn api_segment(self) -> &'static str {
        match self {
            Entity::Customers => "customers",
            Entity::Transactions => "transactions",
            Entity::TradingActivity => "trading-activity",
        }
    }

    /// Every Track360 field of the entity, as the guide names them.
    pub fn fields(self) -> &'static [&'static str] {
        match self {
            Entity::Customers => &[
                "customer_id",
                "signup_date",
                "last_modified_date",
                "affiliate_id",
                "campaign_id",
                "click_id",
                "lang_id",
                "country_code",
                "kyc_status_id",
                "sales_status_id",
                "trading_account_type",
                "leverage",
                "first_name",
                "last_name",
                "email",
            ],
            Entity::Transactions => &[
                "transaction_id",
                "customer_id",
                "transaction_type",
                "amount",
                "currency",
                "transaction_date",
                "status",
                "last_modified_date",
            ],
            Entity::TradingActivity => &[
                "date",
                "customer_id",
                "instrument",
                "lots_traded",
                "volume_usd",
                "spread_cost",
                "commission",
                "pnl",
                "currency",
                "last_modified_date",
            ],
        }
    }

    /// The fields holding instants (RFC 3339 UTC once normalised).
    pub fn timestamp_fields(self) -> &'static [&'static str] {
        match self {
            Entity::Customers => &["signup_date", "last_modified_date"],
            Entity::Transactions => &["transaction_date", "last_modified_date"],
            Entity::TradingActivity => &["last_modified_date"],
        }
    }

    /// The natural key's fields, in key order.
    pub fn key_fields(self) -> &'static [&'static str] {
        match self {
            Entity::Customers => &["customer_id"],
            Entity::Transactions => &["transaction_id"],
            Entity::TradingActivity => &["date", "customer_id", "instrument", "currency"],
        }
    }
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Entity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "customers" => Ok(Entity::Customers),
            "transactions" => Ok(Entity::Transactions),
            "trading_activity" | "trading-activity" => Ok(Entity::TradingActivity),
            other => Err(format!(
                "unknown entity `{other}`: expected customers, transactions or trading_activity"
            )),
        }
    }
}

/// A trader account, attributed to an IB or affiliate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Customer {
    pub customer_id: CompactString,
    pub signup_date: Timestamp,
    pub last_modified_date: Option<Timestamp>,
    pub affiliate_id: CompactString,
    pub campaign_id: Option<CompactString>,
    pub click_id: Option<CompactString>,
    pub lang_id: Option<CompactString>,
    pub country_code: Option<CompactString>,
    pub kyc_status_id: Option<CompactString>,
    pub sales_status_id: Option<CompactString>,
    pub trading_account_type: Option<CompactString>,
    pub leverage: Option<CompactString>,
    pub first_name: Option<CompactString>,
    pub last_name: Option<CompactString>,
    pub email: Option<CompactString>,
}

/// The kinds of money movement the guide names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionType {
    Deposit,
    Withdrawal,
    IbRebate,
    Bonus,
    Adjustment,
}

impl TransactionType {
    pub fn as_str(self) -> &'static str {
        match self {
            TransactionType::Deposit => "deposit",
            TransactionType::Withdrawal => "withdrawal",
            TransactionType::IbRebate => "ib_rebate",
            TransactionType::Bonus => "bonus",
            TransactionType::Adjustment => "adjustment",
        }
    }
}

impl FromStr for TransactionType {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "deposit" => Ok(TransactionType::Deposit),
            "withdrawal" => Ok(TransactionType::Withdrawal),
            "ib_rebate" => Ok(TransactionType::IbRebate),
            "bonus" => Ok(TransactionType::Bonus),
            "adjustment" => Ok(TransactionType::Adjustment),
            _ => Err(()),
        }
    }
}

/// A money movement on a trader account. Status changes re-send the same `transaction_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub transaction_id: CompactString,
    pub customer_id: CompactString,
    pub transaction_type: TransactionType,
    pub amount: Decimal,
    pub currency: CompactString,
    pub transaction_date: Timestamp,
    pub status: CompactString,
    pub last_modified_date: Option<Timestamp>,
}

/// One trader's activity on one day, in one instrument and currency.
/// Intra-day re-sends replace the whole row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TradingActivity {
    pub date: Date,
    pub customer_id: CompactString,
    pub instrument: CompactString,
    pub lots_traded: Decimal,
    pub volume_usd: Option<Decimal>,
    pub spread_cost: Option<Decimal>,
    pub commission: Option<Decimal>,
    pub pnl: Option<Decimal>,
    pub currency: CompactString,
    pub last_modified_date: Option<Timestamp>,
}

/// A validated record of any entity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Customer(Customer),
    Transaction(Transaction),
    TradingActivity(TradingActivity),
}

impl Record {
    pub fn entity(&self) -> Entity {
        match self {
            Record::Customer(_) => Entity::Customers,
            Record::Transaction(_) => Entity::Transactions,
            Record::TradingActivity(_) => Entity::TradingActivity,
        }
    }

    /// The natural key as one string (`|`-joined for composite keys).
    pub fn key(&self) -> String {
        match self {
            Record::Customer(c) => c.customer_id.to_string(),
            Record::Transaction(t) => t.transaction_id.to_string(),
            Record::TradingActivity(a) => {
                format!(
                    "{}|{}|{}|{}",
                    a.date, a.customer_id, a.instrument, a.currency
                )
            }
        }
    }

    /// The customer this record belongs to, for records that need one to exist first.
    pub fn parent_customer(&self) -> Option<&str> {
        match self {
            Record::Customer(_) => None,
            Record::Transaction(t) => Some(&t.customer_id),
            Record::TradingActivity(a) => Some(&a.customer_id),
        }
    }

    pub fn last_modified_date(&self) -> Option<Timestamp> {
        match self {
            Record::Customer(c) => c.last_modified_date,
            Record::Transaction(t) => t.last_modified_date,
            Record::TradingActivity(a) => a.last_modified_date,
        }
    }
}

impl Record {
    /// The record as Track360's ingestion API takes it: the guide's field names, instants in
    /// RFC 3339 UTC, `date` as YYYY-MM-DD, money and lots as JSON numbers with their exact
    /// digits (never through a float). Absent optional fields are left out.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::{Map, Value};
        fn text(m: &mut Map<String, Value>, k: &str, v: Option<&str>) {
            if let Some(v) = v {
                m.insert(k.into(), Value::String(v.to_owned()));
            }
        }
        fn instant(m: &mut Map<String, Value>, k: &str, v: Option<Timestamp>) {
            text(m, k, v.map(|t| t.to_string()).as_deref());
        }
        fn number(m: &mut Map<String, Value>, k: &str, v: Option<Decimal>) {
            if let Some(v) = v {
                // With serde_json's arbitrary_precision, a Number keeps the decimal's digits.
                let n: serde_json::Number =
                    v.to_string().parse().expect("a decimal is a JSON number");
                m.insert(k.into(), Value::Number(n));
            }
        }
        let mut m = Map::new();
        match self {
            Record::Customer(c) => {
                text(&mut m, "customer_id", Some(&c.customer_id));
                instant(&mut m, "signup_date", Some(c.signup_date));
                instant(&mut m, "last_modified_date", c.last_modified_date);
                text(&mut m, "affiliate_id", Some(&c.affiliate_id));
                for (k, v) in [
                    ("campaign_id", &c.campaign_id),
                    ("click_id", &c.click_id),
                    ("lang_id", &c.lang_id),
                    ("country_code", &c.country_code),
                    ("kyc_status_id", &c.kyc_status_id),
                    ("sales_status_id", &c.sales_status_id),
                    ("trading_account_type", &c.trading_account_type),
                    ("leverage", &c.leverage),
                    ("first_name", &c.first_name),
                    ("last_name", &c.last_name),
                    ("email", &c.email),
                ] {
                    text(&mut m, k, v.as_deref());
                }
            }
            Record::Transaction(t) => {
                text(&mut m, "transaction_id", Some(&t.transaction_id));
                text(&mut m, "customer_id", Some(&t.customer_id));
                text(
                    &mut m,
                    "transaction_type",
                    Some(t.transaction_type.as_str()),
                );
                number(&mut m, "amount", Some(t.amount));
                text(&mut m, "currency", Some(&t.currency));
                instant(&mut m, "transaction_date", Some(t.transaction_date));
                text(&mut m, "status", Some(&t.status));
                instant(&mut m, "last_modified_date", t.last_modified_date);
            }
            Record::TradingActivity(a) => {
                text(&mut m, "date", Some(&a.date.to_string()));
                text(&mut m, "customer_id", Some(&a.customer_id));
                text(&mut m, "instrument", Some(&a.instrument));
                number(&mut m, "lots_traded", Some(a.lots_traded));
                number(&mut m, "volume_usd", a.volume_usd);
                number(&mut m, "spread_cost", a.spread_cost);
                number(&mut m, "commission", a.commission);
                number(&mut m, "pnl", a.pnl);
                text(&mut m, "currency", Some(&a.currency));
                instant(&mut m, "last_modified_date", a.last_modified_date);
            }
        }
        Value::Object(m)
    }
}
