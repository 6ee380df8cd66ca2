//! The sample broker's records: a deterministic generated data set, kept in `last_modified_date`
//! order, and the ways tests change it (mutations, late records, ties, invalid records).

use std::collections::{BTreeMap, HashMap};

use jiff::{SignedDuration, Timestamp};
use serde_json::{Value, json};

use crate::model::Entity;

/// A data set's shape. Every record's fields are in canonical form (RFC 3339 `Z` instants,
/// decimals with fixed scale), so a store row must equal its record text for text.
#[derive(Debug, Clone)]
pub struct DatasetSpec {
    pub seed: u64,
    pub customers: usize,
    pub transactions: usize,
    pub activity: usize,
    /// `last_modified_date` of the first record; the others follow a second apart.
    pub start: Timestamp,
    /// How many consecutive records share one `last_modified_date` (1: none share).
    pub tie_group: usize,
    /// Every Nth record (0: none) is invalid in a way validation must catch.
    pub invalid_every: usize,
}

impl Default for DatasetSpec {
    fn default() -> Self {
        DatasetSpec {
            seed: 360,
            customers: 200,
            transactions: 600,
            activity: 800,
            start: "2026-01-01T00:00:00Z".parse().expect("valid instant"),
            tie_group: 1,
            invalid_every: 0,
        }
    }
}

/// One entity's records, ordered by (`last_modified_date`, key) as the guide's API serves them.
#[derive(Debug, Default, Clone)]
pub struct Table {
    by_modified: BTreeMap<(Timestamp, String), Value>,
    modified_of: HashMap<String, Timestamp>,
}

impl Table {
    /// Inserts or replaces the record `key`.
    pub fn put(&mut self, key: String, modified: Timestamp, record: Value) {
        if let Some(old) = self.modified_of.insert(key.clone(), modified) {
            self.by_modified.remove(&(old, key.clone()));
        }
        self.by_modified.insert((modified, key), record);
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        let modified = self.modified_of.get(key)?;
        self.by_modified.get(&(*modified, key.to_owned()))
    }

    pub fn len(&self) -> usize {
        self.by_modified.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_modified.is_empty()
    }

    /// Records with `from <= last_modified_date <= to`, strictly after `after` when given.
    pub fn window<'a>(
        &'a self,
        from: Timestamp,
        to: Timestamp,
        after: Option<(Timestamp, String)>,
    ) -> impl Iterator<Item = (&'a (Timestamp, String), &'a Value)> + 'a {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let lower = match after {
            Some(position) if position.0 >= from => Excluded(position),
            _ => Included((from, String::new())),
        };
        self.by_modified
            .range((lower, Unbounded))
            .take_while(move |((modified, _), _)| *modified <= to)
    }

    /// Every record, in `last_modified_date` order.
    pub fn records(&self) -> impl Iterator<Item = &Value> {
        self.by_modified.values()
    }
}

/// All three entities' records.
#[derive(Debug, Default, Clone)]
pub struct Dataset {
    pub tables: [Table; 3],
    /// Keys of the records generated invalid, per entity.
    pub invalid: [Vec<String>; 3],
}

impl Dataset {
    pub fn table(&self, entity: Entity) -> &Table {
        &self.tables[entity as usize]
    }

    /// Inserts or replaces a record; its key and `last_modified_date` are read from it.
    pub fn put(&mut self, entity: Entity, record: Value) {
        let key = natural_key(entity, &record);
        let modified = record
            .get("last_modified_date")
            .and_then(Value::as_str)
            .and_then(|t| t.parse().ok())
            .unwrap_or(Timestamp::UNIX_EPOCH);
        self.tables[entity as usize].put(key, modified, record);
    }

    /// Changes a record as a broker would: new field values and a new `last_modified_date`.
    /// Returns false when there is no such record.
    pub fn modify(&mut self, entity: Entity, key: &str, changes: Value, at: Timestamp) -> bool {
        let Some(mut record) = self.table(entity).get(key).cloned() else {
            return false;
        };
        if let (Some(object), Value::Object(changes)) = (record.as_object_mut(), changes) {
            object.extend(changes);
            object.insert("last_modified_date".into(), json!(at.to_string()));
        }
        self.put(entity, record);
        true
    }

    /// Generates the data set `spec` describes. Same spec, same records.
    pub fn generate(spec: &DatasetSpec) -> Dataset {
        let mut data = Dataset::default();
        let mut rng = SplitMix(spec.seed);
        let mut serial = 0usize;
        let mut next_modified = || {
            let at =
                spec.start + SignedDuration::from_secs((serial / spec.tie_group.max(1)) as i64);
            serial += 1;
            at
        };
        let customer_ids: Vec<String> = (0..spec.customers)
            .map(|i| format!("C{:016x}", scramble(spec.seed, i as u64)))
            .collect();
        // Records are generated in one `last_modified_date` sequence across entities, ids
        // uncorrelated with it, as a broker's CRM would serve them.
        for (i, id) in customer_ids.iter().enumerate() {
            let modified = next_modified();
            let mut record = customer(id, i, modified, &mut rng);
            if breaks(spec, i) {
                record["country_code"] = json!("ZZ");
                record.as_object_mut().map(|o| o.remove("affiliate_id"));
                data.invalid[0].push(id.clone());
            }
            data.put(Entity::Customers, record);
        }
        for i in 0..spec.transactions {
            let modified = next_modified();
            let id = format!("T{:016x}", scramble(spec.seed ^ 0x7, i as u64));
            let customer_id = &customer_ids[rng.below(customer_ids.len().max(1))];
            let mut record = transaction(&id, customer_id, modified, &mut rng);
            if breaks(spec, i) {
                record["currency"] = json!("US$");
                record["transaction_type"] = json!("refund");
                data.invalid[1].push(id.clone());
            }
            data.put(Entity::Transactions, record);
        }
        for i in 0..spec.activity {
            let modified = next_modified();
            let customer_id = &customer_ids[rng.below(customer_ids.len().max(1))];
            let day = (spec.start - SignedDuration::from_hours(24 * (1 + i as i64 / 40)))
                .to_zoned(jiff::tz::TimeZone::UTC)
                .date();
            let mut record = activity(&day.to_string(), customer_id, i, modified, &mut rng);
            if breaks(spec, i) {
                record["lots_traded"] = json!("-1.00");
                data.invalid[2].push(natural_key(Entity::TradingActivity, &record));
            }
            data.put(Entity::TradingActivity, record);
        }
        data
    }
}

fn breaks(spec: &DatasetSpec, i: usize) -> bool {
    spec.invalid_every > 0 && i % spec.invalid_every == spec.invalid_every - 1
}

/// The natural key, as the store and quarantine spell it (`|` between composite parts).
pub fn natural_key(entity: Entity, record: &Value) -> String {
    entity
        .key_fields()
        .iter()
        .map(|f| match record.get(*f) {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        })
        .collect::<Vec<_>>()
        .join("|")
}

const COUNTRIES: [&str; 6] = ["CY", "GB", "DE", "AE", "TH", "ZA"];
const LANGUAGES: [&str; 5] = ["en", "de", "ar", "th", "es"];
const CURRENCIES: [&str; 4] = ["USD", "EUR", "GBP", "JPY"];
const TYPES: [&str; 5] = ["deposit", "withdrawal", "ib_rebate", "bonus", "adjustment"];
const STATUSES: [&str; 3] = ["pending", "approved", "rejected"];
const INSTRUMENTS: [&str; 6] = ["EURUSD", "GBPUSD", "USDJPY", "XAUUSD", "US500", "BTCUSD"];

fn customer(id: &str, i: usize, modified: Timestamp, rng: &mut SplitMix) -> Value {
    let signup = modified - SignedDuration::from_hours(rng.below(2000) as i64);
    let kyc = ["pending", "approved"][rng.below(2)];
    let account = ["standard", "ecn", "micro"][rng.below(3)];
    let leverage = ["1:100", "1:500"][rng.below(2)];
    json!({
        "customer_id": id,
        "signup_date": signup.to_string(),
        "last_modified_date": modified.to_string(),
        "affiliate_id": format!("IB{:03}", rng.below(40)),
        "campaign_id": format!("CMP{}", rng.below(12)),
        "click_id": format!("clk-{:x}", rng.next()),
        "lang_id": LANGUAGES[rng.below(LANGUAGES.len())],
        "country_code": COUNTRIES[rng.below(COUNTRIES.len())],
        "kyc_status_id": kyc,
        "sales_status_id": "new",
        "trading_account_type": account,
        "leverage": leverage,
        "first_name": format!("Trader{i}"),
        "last_name": "Sample",
        "email": format!("trader{i}@example.com"),
    })
}

fn transaction(id: &str, customer_id: &str, modified: Timestamp, rng: &mut SplitMix) -> Value {
    let cents = rng.below(5_000_000) as i64 + 1;
    json!({
        "transaction_id": id,
        "customer_id": customer_id,
        "transaction_type": TYPES[rng.below(TYPES.len())],
        "amount": format!("{}.{:02}", cents / 100, cents % 100),
        "currency": CURRENCIES[rng.below(CURRENCIES.len())],
        "transaction_date": (modified - SignedDuration::from_mins(rng.below(600) as i64)).to_string(),
        "status": STATUSES[rng.below(STATUSES.len())],
        "last_modified_date": modified.to_string(),
    })
}

fn activity(
    day: &str,
    customer_id: &str,
    i: usize,
    modified: Timestamp,
    rng: &mut SplitMix,
) -> Value {
    let lots = rng.below(5_000) as i64 + 1;
    let pnl = rng.below(200_000) as i64 - 100_000;
    json!({
        "date": day,
        "customer_id": customer_id,
        // The index keeps keys unique while customers and instruments repeat.
        "instrument": format!("{}{}", INSTRUMENTS[i % INSTRUMENTS.len()], if i >= 6 { format!(".{i}") } else { String::new() }),
        "lots_traded": format!("{}.{:02}", lots / 100, lots % 100),
        "volume_usd": format!("{}.00", lots * 1000),
        "spread_cost": format!("{}.{:02}", lots / 10, lots % 10),
        "commission": format!("{}.{:02}", lots / 20, lots % 20),
        "pnl": format!("{}{}.{:02}", if pnl < 0 { "-" } else { "" }, pnl.abs() / 100, pnl.abs() % 100),
        "currency": CURRENCIES[rng.below(CURRENCIES.len())],
        "last_modified_date": modified.to_string(),
    })
}

/// A small deterministic generator (SplitMix64): the same seed gives the same data set on
/// every machine, which is all test data needs.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        scramble(0, self.0)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A bijective mix of `x` (SplitMix64's finaliser): distinct inputs give distinct outputs, so
/// generated ids never collide and look random against `last_modified_date`.
pub fn scramble(seed: u64, x: u64) -> u64 {
    let mut z = x ^ seed.rotate_left(17);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
