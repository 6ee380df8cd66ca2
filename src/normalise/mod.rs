//! Normalisation: a source's raw record → a JSON object in Track360 shape (the guide's field
//! names, RFC 3339 UTC instants, decimals as exact text), ready for validation.
//!
//! Each Track360 field comes from a rule: a path into the source record (or a constant), an
//! optional default, and at most one converter (time format, decimal scale, enum map). Fields a
//! connector does not map are read from the source field of the same name, which is the whole
//! of the `track360-standard` preset. Naive timestamps are read in the connector's time zone,
//! because a broker's "server time" is rarely UTC (DOMAIN §2) and assuming UTC silently shifts
//! every record. Personal data is then kept, dropped or hashed per the connector's PII policy.

pub mod mapping;
pub mod pii;
pub(crate) mod raw;
mod time;

pub use mapping::{Convert, FieldRule, FieldSource, Fields, Mapping};
pub use pii::{PiiAction, PiiPolicy};
pub use raw::{Leaf, RawRecord, View};
pub use time::{format_instant, parse_instant_as};
