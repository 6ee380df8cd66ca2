//! The guide's validation rules (SPEC §5), applied to a record in Track360 shape.
//!
//! A record is a JSON object whose keys are the Track360 field names (normalisation put it in
//! that shape). Validation parses every field into the entity model and checks every rule,
//! collecting *every* reason, so that a quarantined record says all that is wrong with it at once.

use std::borrow::Cow;
use std::str::FromStr;

use compact_str::CompactString;
use jiff::Timestamp;
use jiff::civil::Date;
use rust_decimal::Decimal;
use serde_json::Value;

use crate::model::{Customer, Entity, Record, TradingActivity, Transaction, TransactionType};
use crate::normalise::{Fields, Leaf};

/// Longest string the guide accepts, in characters.
const MAX_STRING_CHARS: usize = 500;
/// Most significant digits the guide accepts in a number.
const MAX_SIGNIFICANT_DIGITS: usize = 15;
/// Most decimal places the guide accepts in `lots_traded`.
const MAX_LOT_DECIMALS: u32 = 2;

/// Parses and checks one record of `entity`: the entity, or every reason it is invalid.
pub fn validate(entity: Entity, record: &Value) -> Result<Record, Vec<String>> {
    let Some(object) = record.as_object() else {
        return Err(vec![format!(
            "record is not a JSON object (found {})",
            Leaf::from_value(record).kind()
        )]);
    };
    validate_fields(entity, &Fields::of_object(entity, object))
}

/// As `validate`, on the fields a mapping made (borrowed from the source record).
pub fn validate_fields(entity: Entity, fields: &Fields) -> Result<Record, Vec<String>> {
    let mut r = FieldReader {
        fields,
        reasons: Vec::new(),
    };
    let parsed = match entity {
        Entity::Customers => customer(&mut r).map(Record::Customer),
        Entity::Transactions => transaction(&mut r).map(Record::Transaction),
        Entity::TradingActivity => trading_activity(&mut r).map(Record::TradingActivity),
    };
    match parsed {
        Some(record) if r.reasons.is_empty() => Ok(record),
        _ => Err(r.reasons),
    }
}

fn customer(r: &mut FieldReader) -> Option<Customer> {
    let customer_id = r.id("customer_id");
    let signup_date = r.timestamp("signup_date", Required::Yes);
    let last_modified_date = r.timestamp("last_modified_date", Required::No);
    let affiliate_id = r.id("affiliate_id");
    let campaign_id = r.string("campaign_id");
    let click_id = r.string("click_id");
    let lang_id = r.coded("lang_id", "an ISO 639-1 language code", is_language);
    let country_code = r.coded(
        "country_code",
        "an ISO 3166-1 alpha-2 country code",
        is_country,
    );
    let kyc_status_id = r.string("kyc_status_id");
    let sales_status_id = r.string("sales_status_id");
    let trading_account_type = r.string("trading_account_type");
    let leverage = r.string("leverage");
    let first_name = r.string("first_name");
    let last_name = r.string("last_name");
    let email = r.coded("email", "a valid email address", is_email);
    Some(Customer {
        customer_id: customer_id?,
        signup_date: signup_date.flatten()?,
        last_modified_date: last_modified_date.flatten(),
        affiliate_id: affiliate_id?,
        campaign_id,
        click_id,
        lang_id,
        country_code,
        kyc_status_id,
        sales_status_id,
        trading_account_type,
        leverage,
        first_name,
        last_name,
        email,
    })
}

fn transaction(r: &mut FieldReader) -> Option<Transaction> {
    let transaction_id = r.id("transaction_id");
    let customer_id = r.id("customer_id");
    let transaction_type = r.required_string("transaction_type").and_then(|t| {
        TransactionType::from_str(&t).ok().or_else(|| {
            r.fail(
                "transaction_type",
                format!(
                    "`{}` is not one of deposit, withdrawal, ib_rebate, bonus, adjustment",
                    clip(&t)
                ),
            )
        })
    });
    let amount = r.decimal("amount", Required::Yes, Sign::Any);
    let currency = r.currency("currency");
    let transaction_date = r.timestamp("transaction_date", Required::Yes);
    let status = r.required_string("status");
    let last_modified_date = r.timestamp("last_modified_date", Required::No);
    Some(Transaction {
        transaction_id: transaction_id?,
        customer_id: customer_id?,
        transaction_type: transaction_type?,
        amount: amount.flatten()?,
        currency: currency?,
        transaction_date: transaction_date.flatten()?,
        status: status?,
        last_modified_date: last_modified_date.flatten(),
    })
}

fn trading_activity(r: &mut FieldReader) -> Option<TradingActivity> {
    let date = r.date("date");
    let customer_id = r.id("customer_id");
    let instrument = r.required_string("instrument");
    let lots_traded = r.decimal("lots_traded", Required::Yes, Sign::NonNegative);
    if let Some(Some(lots)) = lots_traded
        && lots.normalize().scale() > MAX_LOT_DECIMALS
    {
        r.fail::<()>(
            "lots_traded",
            format!("`{lots}` has more than {MAX_LOT_DECIMALS} decimal places"),
        );
    }
    let volume_usd = r.decimal("volume_usd", Required::No, Sign::Any);
    let spread_cost = r.decimal("spread_cost", Required::No, Sign::NonNegative);
    let commission = r.decimal("commission", Required::No, Sign::NonNegative);
    let pnl = r.decimal("pnl", Required::No, Sign::Any);
    let currency = r.currency("currency");
    let last_modified_date = r.timestamp("last_modified_date", Required::No);
    Some(TradingActivity {
        date: date?,
        customer_id: customer_id?,
        instrument: instrument?,
        lots_traded: lots_traded.flatten()?,
        volume_usd: volume_usd?,
        spread_cost: spread_cost?,
        commission: commission?,
        pnl: pnl?,
        currency: currency?,
        last_modified_date: last_modified_date.flatten(),
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Required {
    Yes,
    No,
}

#[derive(Clone, Copy, PartialEq)]
enum Sign {
    Any,
    NonNegative,
}

/// Reads typed fields out of one record, noting a reason for every field that fails.
///
/// Each reader returns `None` when the field failed (a reason was noted); optional readers
/// return `Some(None)` for a field that is absent, so "absent" and "broken" stay apart.
struct FieldReader<'r, 'a> {
    /// The record's Track360 fields.
    fields: &'r Fields<'a>,
    reasons: Vec<String>,
}

impl FieldReader<'_, '_> {
    fn fail<T>(&mut self, field: &str, what: impl std::fmt::Display) -> Option<T> {
        self.reasons.push(format!("{field}: {what}"));
        None
    }

    /// The field's text: absent (and null, and, for optional fields, "") is `Some(None)`.
    fn text(&mut self, field: &str, required: Required) -> Option<Option<CompactString>> {
        let fields = self.fields;
        let text = match fields.get(field) {
            None | Some(Leaf::Null) => None,
            // Integer ids are common in brokers' APIs; their text is the id.
            Some(Leaf::Number(n)) if is_integer_text(n) => Some(Cow::Borrowed(n.as_ref())),
            Some(leaf) => match leaf.text() {
                Some(text) => Some(text),
                None => {
                    return self.fail(field, format!("expected a string, found {}", leaf.kind()));
                }
            },
        };
        match text {
            None if required == Required::Yes => self.fail(field, "is required but missing"),
            // A byte is at most a character: only a long text needs counting.
            Some(s) if s.len() > MAX_STRING_CHARS && s.chars().count() > MAX_STRING_CHARS => self
                .fail(
                    field,
                    format!("is longer than {MAX_STRING_CHARS} characters"),
                ),
            // No store keeps it as text (PostgreSQL refuses it), and no real value holds it.
            Some(s) if s.contains('\0') => self.fail(field, "contains a NUL character"),
            Some(s) if s.trim().is_empty() && required == Required::Yes => {
                self.fail(field, "must not be empty")
            }
            Some(s) if s.is_empty() => Some(None),
            // Most texts are short: kept inline, without an allocation (`CompactString`).
            text => Some(text.map(CompactString::from)),
        }
    }

    fn string(&mut self, field: &str) -> Option<CompactString> {
        self.text(field, Required::No).flatten()
    }

    fn required_string(&mut self, field: &str) -> Option<CompactString> {
        self.text(field, Required::Yes).flatten()
    }

    /// An identifier: a required, non-empty string.
    fn id(&mut self, field: &str) -> Option<CompactString> {
        self.required_string(field)
    }

    /// An optional string that must satisfy `check` when present.
    fn coded(
        &mut self,
        field: &str,
        expected: &str,
        check: fn(&str) -> bool,
    ) -> Option<CompactString> {
        let value = self.string(field)?;
        if check(&value) {
            Some(value)
        } else if is_personal(field) {
            // Personal data is not quoted: reasons are logged and kept whatever the PII policy.
            self.fail(field, format!("is not {expected}"))
        } else {
            self.fail(field, format!("`{}` is not {expected}", clip(&value)))
        }
    }

    fn currency(&mut self, field: &str) -> Option<CompactString> {
        let value = self.required_string(field)?;
        if is_currency(&value) {
            Some(value)
        } else {
            self.fail(
                field,
                format!("`{}` is not an ISO 4217 currency code", clip(&value)),
            )
        }
    }

    fn timestamp(&mut self, field: &str, required: Required) -> Option<Option<Timestamp>> {
        // Converted by the mapping: the instant its text stands for, without printing and
        // parsing it again.
        if let Some(Leaf::Instant(ts)) = self.fields.get(field) {
            return Some(Some(*ts));
        }
        let Some(text) = self.text(field, required)? else {
            return Some(None);
        };
        match text.parse::<Timestamp>() {
            Ok(ts) => Some(Some(ts)),
            Err(_) => self.fail(
                field,
                format!(
                    "`{}` is not an ISO 8601 date-time with a UTC offset",
                    clip(&text)
                ),
            ),
        }
    }

    fn date(&mut self, field: &str) -> Option<Date> {
        let text = self.required_string(field)?;
        let shaped = text.len() == 10 && text.as_bytes()[4] == b'-' && text.as_bytes()[7] == b'-';
        match text.parse::<Date>() {
            Ok(date) if shaped => Some(date),
            _ => self.fail(field, format!("`{}` is not a YYYY-MM-DD date", clip(&text))),
        }
    }

    fn decimal(&mut self, field: &str, required: Required, sign: Sign) -> Option<Option<Decimal>> {
        let fields = self.fields;
        let leaf = match fields.get(field) {
            None | Some(Leaf::Null) if required == Required::Yes => {
                return self.fail(field, "is required but missing");
            }
            None | Some(Leaf::Null) => return Some(None),
            Some(leaf) => leaf,
        };
        let value = match leaf {
            // Scaled by the mapping: already a decimal.
            Leaf::Decimal(d) => *d,
            _ => {
                // Decimals given as strings are as exact as numbers; both are accepted.
                let text = match leaf {
                    Leaf::Number(n) => Cow::Borrowed(n.as_ref()),
                    _ => match leaf.text() {
                        Some(text) => text,
                        None => {
                            return self
                                .fail(field, format!("expected a number, found {}", leaf.kind()));
                        }
                    },
                };
                let text = text.trim();
                match parse_decimal(text) {
                    Some(value) => value,
                    None => {
                        return self.fail(
                            field,
                            format!(
                                "`{}` is not a decimal number of at most 28 digits",
                                clip(text)
                            ),
                        );
                    }
                }
            }
        };
        let digits = significant_digits(value);
        if digits > MAX_SIGNIFICANT_DIGITS {
            return self.fail(
                field,
                format!(
                    "`{value}` has {digits} significant digits, more than {MAX_SIGNIFICANT_DIGITS}"
                ),
            );
        }
        if sign == Sign::NonNegative && value.is_sign_negative() && !value.is_zero() {
            return self.fail(field, format!("`{value}` must not be negative"));
        }
        Some(Some(value))
    }
}

/// Parses a decimal exactly: no rounding, no binary floating point on the way.
pub fn parse_decimal(text: &str) -> Option<Decimal> {
    if text.contains(['e', 'E']) {
        Decimal::from_scientific(text).ok()
    } else {
        Decimal::from_str_exact(text).ok()
    }
}

/// Digits from the first non-zero digit to the last non-zero digit.
fn significant_digits(value: Decimal) -> usize {
    let mantissa = value.mantissa().unsigned_abs();
    if mantissa == 0 {
        return 0;
    }
    // Nearly every amount fits 64 bits, where dividing by ten is a multiplication; 128-bit
    // division is a library call, and this runs for every money field.
    match u64::try_from(mantissa) {
        Ok(mut small) => {
            while small.is_multiple_of(10) {
                small /= 10;
            }
            (small.ilog10() + 1) as usize
        }
        Err(_) => {
            let mut mantissa = mantissa;
            while mantissa.is_multiple_of(10) {
                mantissa /= 10;
            }
            (mantissa.ilog10() + 1) as usize
        }
    }
}

fn is_integer_text(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// A value quoted in a reason, cut short: reasons are read by people and stored per record.
fn clip(text: &str) -> String {
    const MAX: usize = 64;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// The fields a connector's PII policy may drop or hash.
pub fn is_personal(field: &str) -> bool {
    matches!(field, "first_name" | "last_name" | "email")
}

/// A value the PII policy hashed (SHA-256, lower-case hex).
pub fn is_pii_hash(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn is_email(text: &str) -> bool {
    // A hashed address (quarantined or posted under a `hash` policy, then replayed) stands
    // for a valid one: it was checked before it was hashed.
    if is_pii_hash(text) {
        return true;
    }
    let Some((local, domain)) = text.rsplit_once('@') else {
        return false;
    };
    let labels_ok = domain
        .split('.')
        .all(|l| !l.is_empty() && !l.starts_with('-') && !l.ends_with('-'));
    text.len() <= 254
        && !local.is_empty()
        && local.len() <= 64
        && !local.contains('@')
        && domain.contains('.')
        && labels_ok
        && !text.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn is_currency(code: &str) -> bool {
    in_code_list(ISO_4217, code)
}

fn is_country(code: &str) -> bool {
    in_code_list(ISO_3166_ALPHA2, code)
}

fn is_language(code: &str) -> bool {
    in_code_list(ISO_639_1, code)
}

/// Whether `code` is one of `list`'s codes: sorted, all of `code`'s length, one space apart.
/// A binary search: every record checks two or three codes.
fn in_code_list(list: &str, code: &str) -> bool {
    let width = code.len();
    let Some(first) = list.split(' ').next() else {
        return false;
    };
    if width != first.len() {
        return false;
    }
    let stride = width + 1;
    let count = list.len().div_ceil(stride);
    let entry = |i: usize| &list.as_bytes()[i * stride..i * stride + width];
    let (mut low, mut high) = (0, count);
    while low < high {
        let middle = (low + high) / 2;
        match entry(middle).cmp(code.as_bytes()) {
            std::cmp::Ordering::Less => low = middle + 1,
            std::cmp::Ordering::Greater => high = middle,
            std::cmp::Ordering::Equal => return true,
        }
    }
    false
}

/// Active ISO 4217 codes, with the precious metals (XAU, XAG, XPT, XPD) that forex brokers
/// quote, and without the testing (XTS) and "no currency" (XXX) codes.
const ISO_4217: &str = "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB \
BOV BRL BSD BTN BWP BYN BZD CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUC CUP CVE CZK DJF DKK \
DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HRK HTG HUF IDR ILS INR \
IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA \
MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR \
PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SLL SOS SRD SSP STN SVC SYP SZL THB \
TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD USN UYI UYU UYW UZS VED VES VND VUV WST XAF XAG XAU \
XBA XBB XBC XBD XCD XCG XDR XOF XPD XPF XPT XSU XUA YER ZAR ZMW ZWG ZWL";

const ISO_3166_ALPHA2: &str = "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG \
BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX \
CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN \
GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI \
KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ \
MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR \
PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC \
TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT \
ZA ZM ZW";

const ISO_639_1: &str = "aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce \
ch co cr cs cu cv cy da de dv dz ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha \
he hi ho hr ht hu hy hz ia id ie ig ii ik io is it iu ja jv ka kg ki kj kk kl km kn ko kr ks ku \
kv kw ky la lb lg li ln lo lt lu lv mg mh mi mk ml mn mr ms mt my na nb nd ne ng nl nn no nr nv \
ny oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk sl sm sn so sq sr ss st \
su sv sw ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi yo za zh zu";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn significant_digits_ignore_leading_and_trailing_zeros() {
        for (text, digits) in [
            ("0", 0),
            ("0.000", 0),
            ("100", 1),
            ("-0.00120", 2),
            ("123456789012345", 15),
            ("1234567890123456789012345678", 28),
            ("-79228162514264337593543950335", 29),
            ("18446744073709551616", 20),
            ("18446744073709551615", 20),
        ] {
            let value = parse_decimal(text).unwrap();
            assert_eq!(significant_digits(value), digits, "{text}");
        }
    }

    #[test]
    fn code_lists_are_sorted_and_fixed_width_for_the_binary_search() {
        for (list, width) in [(ISO_4217, 3), (ISO_3166_ALPHA2, 2), (ISO_639_1, 2)] {
            let codes: Vec<&str> = list.split(' ').collect();
            assert!(codes.iter().all(|c| c.len() == width), "{codes:?}");
            assert!(codes.windows(2).all(|w| w[0] < w[1]), "not sorted: {list}");
            for code in &codes {
                assert!(in_code_list(list, code), "{code}");
            }
            for absent in ["", "A", "ZZZZ", "AAA", "zz", "ZZ", "XTS", "XXX"] {
                assert_eq!(
                    in_code_list(list, absent),
                    codes.contains(&absent),
                    "{absent}"
                );
            }
        }
    }
    use serde_json::json;

    fn reasons(entity: Entity, record: Value) -> Vec<String> {
        validate(entity, &record).err().unwrap_or_default()
    }

    #[test]
    fn a_nul_character_in_text_is_a_reason() {
        let record = json!({
            "customer_id": "C1", "signup_date": "2026-01-02T03:04:05Z", "affiliate_id": "IB7",
            "first_name": "An\u{0}na"
        });
        assert_eq!(
            reasons(Entity::Customers, record),
            ["first_name: contains a NUL character"]
        );
    }

    #[test]
    fn a_complete_customer_is_valid() {
        let record = json!({
            "customer_id": "C1", "signup_date": "2026-01-02T03:04:05Z", "affiliate_id": "IB7",
            "lang_id": "en", "country_code": "CY", "email": "a.b@example.com", "leverage": "1:500"
        });
        let Ok(Record::Customer(c)) = validate(Entity::Customers, &record) else {
            panic!("valid customer rejected");
        };
        assert_eq!(c.signup_date.to_string(), "2026-01-02T03:04:05Z");
        assert_eq!(c.country_code.as_deref(), Some("CY"));
    }

    #[test]
    fn every_reason_is_reported_not_only_the_first() {
        let got = reasons(
            Entity::Customers,
            json!({"customer_id": "", "signup_date": "yesterday", "lang_id": "english",
                   "country_code": "XX", "email": "not-an-email"}),
        );
        for field in [
            "customer_id",
            "signup_date",
            "affiliate_id",
            "lang_id",
            "country_code",
            "email",
        ] {
            assert!(
                got.iter().any(|r| r.starts_with(field)),
                "{field} not in {got:?}"
            );
        }
    }

    #[test]
    fn money_is_exact_and_bounded() {
        // Parsed from text, as a page is: `json!` would pass 100.10 through an f64.
        let ok: Value = serde_json::from_str(
            r#"{"transaction_id": "T1", "customer_id": "C1", "transaction_type": "deposit",
                "amount": 100.10, "currency": "USD", "transaction_date": "2026-01-02T03:04:05+02:00",
                "status": "approved"}"#,
        )
        .unwrap();
        let Ok(Record::Transaction(t)) = validate(Entity::Transactions, &ok) else {
            panic!("valid transaction rejected");
        };
        assert_eq!(t.amount.to_string(), "100.10");
        assert_eq!(t.transaction_date.to_string(), "2026-01-02T01:04:05Z");

        let mut bad = ok.clone();
        bad["amount"] = serde_json::from_str("1234567890123456.5").unwrap();
        bad["currency"] = json!("usd");
        bad["transaction_type"] = json!("refund");
        let got = reasons(Entity::Transactions, bad);
        assert_eq!(got.len(), 3, "{got:?}");

        let mut huge = ok;
        huge["amount"] = serde_json::from_str("1234567890123456789012345678901234567890").unwrap();
        assert!(reasons(Entity::Transactions, huge)[0].contains("at most 28 digits"));
    }

    #[test]
    fn lots_are_non_negative_with_two_decimals() {
        let row = |lots: Value| {
            json!({"date": "2026-01-02", "customer_id": "C1", "instrument": "EURUSD",
                   "lots_traded": lots, "currency": "USD", "commission": "-1"})
        };
        let got = reasons(Entity::TradingActivity, row(json!("1.005")));
        assert!(got.iter().any(|r| r.contains("decimal places")), "{got:?}");
        assert!(got.iter().any(|r| r.starts_with("commission")), "{got:?}");
        let got = reasons(Entity::TradingActivity, row(json!(-1)));
        assert!(got.iter().any(|r| r.contains("negative")), "{got:?}");
        let mut fine = row(json!("1.50"));
        fine["commission"] = json!("0");
        assert!(validate(Entity::TradingActivity, &fine).is_ok());
    }

    #[test]
    fn dates_must_be_yyyy_mm_dd() {
        let row = json!({"date": "20260102", "customer_id": "C1", "instrument": "X",
                         "lots_traded": 1, "currency": "EUR"});
        assert!(reasons(Entity::TradingActivity, row)[0].contains("YYYY-MM-DD"));
    }

    #[test]
    fn long_strings_are_rejected() {
        let record = json!({"customer_id": "C1", "signup_date": "2026-01-02T03:04:05Z",
                            "affiliate_id": "IB", "first_name": "x".repeat(501)});
        assert!(reasons(Entity::Customers, record)[0].contains("longer than 500"));
    }
}
