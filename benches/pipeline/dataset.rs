//! The synthetic data set: record `i` of an entity is a pure function of `i`, with the field
//! names and value formats of the sample broker's generated records (src/sample_broker/data.rs),
//! so that every record validates. Nothing is held in memory.
//!
//! - `last_modified_date` = `START` + `i` × the entity's step (2 s for customers, 1 s for the
//!   others, so that the three entities span the same time range at 1 : 2 : 2).
//! - Ids: `p = i × A mod n` (a permutation of `0..n`, uncorrelated with `i`), written as a
//!   16-digit hex number that grows with `p`, so key order is `p` order and (b) can write in key
//!   order without sorting.
//! - A transaction or trading-activity row `i` points at a customer modified no later than it
//!   (the backfill pulls customers first, so nothing is held as an orphan).

use std::fmt::Write as _;
use t360_connector::model::Entity;

/// 2025-01-01T00:00:00Z.
pub const START: i64 = 1_735_689_600;
/// Knuth's multiplicative-hash prime: coprime with every `n` below it.
const A: u64 = 2_654_435_761;
/// Id spacing: `0x1000… + p × M + noise < M` is increasing in `p` for `p < 2^27`.
const M: u64 = 0x9_E377_9B97;
const ID_BASE: u64 = 0x1000_0000_0000_0000;

const COUNTRIES: [&str; 6] = ["CY", "GB", "DE", "AE", "TH", "ZA"];
const LANGUAGES: [&str; 5] = ["en", "de", "ar", "th", "es"];
const CURRENCIES: [&str; 4] = ["USD", "EUR", "GBP", "JPY"];
const TYPES: [&str; 5] = ["deposit", "withdrawal", "ib_rebate", "bonus", "adjustment"];
const STATUSES: [&str; 3] = ["pending", "approved", "rejected"];
const INSTRUMENTS: [&str; 6] = ["EURUSD", "GBPUSD", "USDJPY", "XAUUSD", "US500", "BTCUSD"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ent {
    Customers,
    Transactions,
    Activity,
}

impl Ent {
    pub const ALL: [Ent; 3] = [Ent::Customers, Ent::Transactions, Ent::Activity];

    /// The API path segment.
    pub fn segment(self) -> &'static str {
        match self {
            Ent::Customers => "customers",
            Ent::Transactions => "transactions",
            Ent::Activity => "trading-activity",
        }
    }

    /// The store's table name (and the connector's entity name).
    pub fn table(self) -> &'static str {
        match self {
            Ent::Customers => "customers",
            Ent::Transactions => "transactions",
            Ent::Activity => "trading_activity",
        }
    }

    /// The connector's entity.
    pub fn entity(self) -> Entity {
        match self {
            Ent::Customers => Entity::Customers,
            Ent::Transactions => Entity::Transactions,
            Ent::Activity => Entity::TradingActivity,
        }
    }

    /// Columns in the store's order (after `broker`), which is also the JSON field order.
    pub fn columns(self) -> &'static [&'static str] {
        self.entity().fields()
    }

    /// The natural key's columns.
    pub fn key(self) -> &'static [&'static str] {
        self.entity().key_fields()
    }

    /// Seconds between consecutive records' `last_modified_date`.
    pub fn step(self) -> i64 {
        match self {
            Ent::Customers => 2,
            _ => 1,
        }
    }

    fn seed(self) -> u64 {
        match self {
            Ent::Customers => 0xc057,
            Ent::Transactions => 0x7a45,
            Ent::Activity => 0xac71,
        }
    }
}

/// Records per entity for a total, 1 : 2 : 2.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub n: [u64; 3],
}

impl Sizes {
    pub fn split(total: u64) -> Sizes {
        let c = total / 5;
        let t = 2 * total / 5;
        Sizes {
            n: [c, t, total - c - t],
        }
    }

    pub fn total(&self) -> u64 {
        self.n.iter().sum()
    }

    pub fn of(&self, e: Ent) -> u64 {
        self.n[e as usize]
    }

    /// One second past the newest `last_modified_date`.
    pub fn end(&self) -> i64 {
        Ent::ALL
            .iter()
            .map(|&e| START + e.step() * self.of(e).saturating_sub(1) as i64)
            .max()
            .unwrap_or(START)
            + 1
    }
}

/// A permutation of `0..n`: `i × a mod n`, and back.
#[derive(Debug, Clone, Copy)]
pub struct Perm {
    n: u64,
    a: u64,
    inv: u64,
}

impl Perm {
    pub fn new(n: u64) -> Perm {
        if n <= 1 {
            return Perm { n, a: 0, inv: 0 };
        }
        assert!(
            n < A,
            "sizes above {A} records per entity are not supported"
        );
        let a = A % n;
        Perm {
            n,
            a,
            inv: mod_inverse(a, n),
        }
    }

    pub fn fwd(&self, i: u64) -> u64 {
        if self.n <= 1 {
            return 0;
        }
        ((i as u128 * self.a as u128) % self.n as u128) as u64
    }

    pub fn back(&self, p: u64) -> u64 {
        if self.n <= 1 {
            return 0;
        }
        ((p as u128 * self.inv as u128) % self.n as u128) as u64
    }
}

fn mod_inverse(a: u64, n: u64) -> u64 {
    let (mut t, mut new_t) = (0i128, 1i128);
    let (mut r, mut new_r) = (n as i128, a as i128);
    while new_r != 0 {
        let q = r / new_r;
        (t, new_t) = (new_t, t - q * new_t);
        (r, new_r) = (new_r, r - q * new_r);
    }
    assert_eq!(r, 1, "{a} has no inverse modulo {n}");
    t.rem_euclid(n as i128) as u64
}

/// SplitMix64's finaliser (as the sample broker's `scramble`).
pub fn mix(seed: u64, x: u64) -> u64 {
    let mut z = x ^ seed.rotate_left(17);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One record's field values, in `Ent::columns` order, in one reused buffer.
#[derive(Default)]
pub struct Fields {
    pub text: String,
    ends: Vec<usize>,
}

impl Fields {
    fn clear(&mut self) {
        self.text.clear();
        self.ends.clear();
    }

    fn end(&mut self) {
        self.ends.push(self.text.len());
    }

    fn str(&mut self, s: &str) {
        self.text.push_str(s);
        self.end();
    }

    pub fn get(&self, k: usize) -> &str {
        let from = if k == 0 { 0 } else { self.ends[k - 1] };
        &self.text[from..self.ends[k]]
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        (0..self.len()).map(|k| self.get(k))
    }
}

/// The data set of one size.
#[derive(Debug, Clone, Copy)]
pub struct Gen {
    pub sizes: Sizes,
    perms: [Perm; 3],
}

impl Gen {
    pub fn new(sizes: Sizes) -> Gen {
        Gen {
            sizes,
            perms: [
                Perm::new(sizes.n[0]),
                Perm::new(sizes.n[1]),
                Perm::new(sizes.n[2]),
            ],
        }
    }

    pub fn perm(&self, e: Ent) -> &Perm {
        &self.perms[e as usize]
    }

    pub fn modified(e: Ent, i: u64) -> i64 {
        START + e.step() * i as i64
    }

    /// Index range `lo..hi` of `e`'s records with `from <= last_modified_date <= to`.
    pub fn window(&self, e: Ent, from: i64, to: i64) -> (u64, u64) {
        let n = self.sizes.of(e) as i64;
        let step = e.step();
        let lo = (from - START).max(0);
        let lo = (lo + step - 1) / step;
        if to < START {
            return (0, 0);
        }
        let hi = ((to - START) / step + 1).min(n);
        let lo = lo.min(hi);
        (lo as u64, hi as u64)
    }

    /// The customer a transaction or activity row `i` belongs to: modified no later than it.
    fn customer_of(&self, e: Ent, i: u64) -> u64 {
        let n = self.sizes.of(Ent::Customers).max(1);
        let eligible = ((Gen::modified(e, i) - START) / Ent::Customers.step()) as u64 + 1;
        mix(e.seed() ^ 0xc, i) % eligible.min(n)
    }

    fn push_id(&self, f: &mut Fields, e: Ent, prefix: char, i: u64) {
        let p = self.perm(e).fwd(i);
        f.text.push(prefix);
        push_hex16(&mut f.text, ID_BASE + p * M + mix(e.seed(), p) % M);
        f.end();
    }

    /// Record `i` of `e`.
    pub fn fill(&self, e: Ent, i: u64, f: &mut Fields) {
        f.clear();
        let modified = Gen::modified(e, i);
        let h = mix(e.seed(), i ^ 0x5eed_0000_0000);
        let r = |k: u64, n: u64| mix(h, k) % n;
        match e {
            Ent::Customers => {
                self.push_id(f, e, 'C', i);
                push_ts(&mut f.text, modified - 3600 * r(1, 2000) as i64);
                f.end();
                push_ts(&mut f.text, modified);
                f.end();
                f.text.push_str("IB");
                push_pad(&mut f.text, r(2, 40), 3);
                f.end();
                f.text.push_str("CMP");
                push_u64(&mut f.text, r(3, 12));
                f.end();
                let _ = write!(f.text, "clk-{:x}", mix(h, 4));
                f.end();
                f.str(LANGUAGES[r(5, 5) as usize]);
                f.str(COUNTRIES[r(6, 6) as usize]);
                f.str(["pending", "approved"][r(7, 2) as usize]);
                f.str("new");
                f.str(["standard", "ecn", "micro"][r(8, 3) as usize]);
                f.str(["1:100", "1:500"][r(9, 2) as usize]);
                f.text.push_str("Trader");
                push_u64(&mut f.text, i);
                f.end();
                f.str("Sample");
                f.text.push_str("trader");
                push_u64(&mut f.text, i);
                f.text.push_str("@example.com");
                f.end();
            }
            Ent::Transactions => {
                self.push_id(f, e, 'T', i);
                self.push_id(f, Ent::Customers, 'C', self.customer_of(e, i));
                f.str(TYPES[r(1, 5) as usize]);
                let cents = r(2, 5_000_000) + 1;
                push_u64(&mut f.text, cents / 100);
                f.text.push('.');
                push_pad(&mut f.text, cents % 100, 2);
                f.end();
                f.str(CURRENCIES[r(3, 4) as usize]);
                push_ts(&mut f.text, modified - 60 * r(4, 600) as i64);
                f.end();
                f.str(STATUSES[r(5, 3) as usize]);
                push_ts(&mut f.text, modified);
                f.end();
            }
            Ent::Activity => {
                push_date(&mut f.text, (modified - 86_400).div_euclid(86_400));
                f.end();
                self.push_id(f, Ent::Customers, 'C', self.customer_of(e, i));
                f.text.push_str(INSTRUMENTS[(i % 6) as usize]);
                if i >= 6 {
                    f.text.push('.');
                    push_u64(&mut f.text, i);
                }
                f.end();
                let lots = r(1, 5_000) + 1;
                let pnl = r(2, 200_000) as i64 - 100_000;
                push_u64(&mut f.text, lots / 100);
                f.text.push('.');
                push_pad(&mut f.text, lots % 100, 2);
                f.end();
                push_u64(&mut f.text, lots * 1000);
                f.text.push_str(".00");
                f.end();
                push_u64(&mut f.text, lots / 10);
                f.text.push('.');
                push_pad(&mut f.text, lots % 10, 2);
                f.end();
                push_u64(&mut f.text, lots / 20);
                f.text.push('.');
                push_pad(&mut f.text, lots % 20, 2);
                f.end();
                if pnl < 0 {
                    f.text.push('-');
                }
                push_u64(&mut f.text, pnl.unsigned_abs() / 100);
                f.text.push('.');
                push_pad(&mut f.text, pnl.unsigned_abs() % 100, 2);
                f.end();
                f.str(CURRENCIES[r(3, 4) as usize]);
                push_ts(&mut f.text, modified);
                f.end();
            }
        }
    }

    /// Records `lo..hi` of `e` as JSON objects separated by commas.
    pub fn write_records(&self, e: Ent, lo: u64, hi: u64, out: &mut Vec<u8>, f: &mut Fields) {
        let names = e.columns();
        for i in lo..hi {
            if i > lo {
                out.push(b',');
            }
            self.fill(e, i, f);
            out.push(b'{');
            for (k, name) in names.iter().enumerate() {
                if k > 0 {
                    out.push(b',');
                }
                out.push(b'"');
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(b"\":\"");
                // Every value is plain ASCII without quotes or backslashes: no escaping needed.
                out.extend_from_slice(f.get(k).as_bytes());
                out.push(b'"');
            }
            out.push(b'}');
        }
    }
}

pub fn push_u64(s: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    s.push_str(std::str::from_utf8(&digits[at..]).unwrap_or_default());
}

/// `n` in at least `width` digits, zero-padded.
fn push_pad(s: &mut String, n: u64, width: usize) {
    let mut len = 1;
    let mut m = n;
    while m >= 10 {
        m /= 10;
        len += 1;
    }
    for _ in len..width {
        s.push('0');
    }
    push_u64(s, n);
}

fn push_hex16(s: &mut String, n: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for shift in (0..16).rev() {
        s.push(HEX[((n >> (shift * 4)) & 0xf) as usize] as char);
    }
}

/// Days since 1970-01-01 → (year, month, day) (H. Hinnant's `civil_from_days`).
fn civil(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `YYYY-MM-DD`.
pub fn push_date(s: &mut String, days: i64) {
    let (y, m, d) = civil(days);
    push_pad(s, y as u64, 4);
    s.push('-');
    push_pad(s, m, 2);
    s.push('-');
    push_pad(s, d, 2);
}

/// RFC 3339 UTC, whole seconds: `YYYY-MM-DDTHH:MM:SSZ`, as jiff writes a `Timestamp`.
pub fn push_ts(s: &mut String, secs: i64) {
    push_date(s, secs.div_euclid(86_400));
    let t = secs.rem_euclid(86_400) as u64;
    s.push('T');
    push_pad(s, t / 3600, 2);
    s.push(':');
    push_pad(s, t / 60 % 60, 2);
    s.push(':');
    push_pad(s, t % 60, 2);
    s.push('Z');
}

/// Checks the hand-written formatting and the permutations against the reference ones.
pub fn self_check() {
    for secs in [
        0,
        START,
        START + 86_399,
        START + 40_000_000,
        951_782_400,
        4_102_444_800,
    ] {
        let mut s = String::new();
        push_ts(&mut s, secs);
        let jiff = jiff::Timestamp::from_second(secs).expect("in range");
        assert_eq!(s, jiff.to_string(), "timestamp {secs}");
    }
    for n in [1u64, 2, 7, 20_000, 400_000, 4_000_000] {
        let perm = Perm::new(n);
        for i in [0, 1, n / 2, n - 1].into_iter().filter(|&i| i < n) {
            assert_eq!(perm.back(perm.fwd(i)), i, "permutation of {n} at {i}");
        }
    }
    let data = Gen::new(Sizes::split(1000));
    let mut f = Fields::default();
    data.fill(Ent::Activity, 123, &mut f);
    assert_eq!(f.len(), Ent::Activity.columns().len());
}
