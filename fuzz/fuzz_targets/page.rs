//! A page body as the REST source receives it: parsed as the client parses it, read by the
//! pager (records, paging fields, loop and error-envelope checks) of the shipped standard and
//! legacy connectors, three times over as if the broker served it again, and every record
//! mapped (each converter of the legacy connector: epoch and zoned naive times, decimal
//! strings, unit scaling, enum maps, nested paths) and validated; the records are also mapped
//! with the PostgreSQL example's mapping (enum codes, hashed personal data).
#![no_main]

use std::path::Path;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use t360_connector::config::{self, ConnectorPlan, SourcePlan};
use t360_connector::engine;
use t360_connector::model::Entity;
use t360_connector::source::Window;
use t360_connector::source::rest::{Fetched, HttpClient, RestPager, ensure_crypto_provider};

struct Connector {
    plan: ConnectorPlan,
    http: HttpClient,
}

fn settings() -> config::Settings {
    // The example connectors' secrets; nothing is ever requested.
    for var in [
        "LEGACY_BROKER_CLIENT_SECRET",
        "POSTGRES_CRM_PASSWORD",
        "POSTGRES_CRM_HASH_KEY",
    ] {
        unsafe { std::env::set_var(var, "fuzz") };
    }
    config::load_settings(None).expect("default settings")
}

/// A mapping that is not a REST connector's: the PostgreSQL example's.
static SQL_MAPPING: LazyLock<ConnectorPlan> = LazyLock::new(|| {
    let text = include_str!("../../connectors/examples/postgres-crm.toml");
    config::parse_connector(text, Path::new("postgres-crm.toml"), &settings()).expect("example")
});

static CONNECTORS: LazyLock<Vec<Connector>> = LazyLock::new(|| {
    ensure_crypto_provider();
    let settings = settings();
    [
        ("sample-broker.toml", include_str!("../../connectors/sample-broker.toml")),
        ("legacy-broker.toml", include_str!("../../connectors/legacy-broker.toml")),
    ]
    .into_iter()
    .map(|(name, text)| {
        let plan = config::parse_connector(text, Path::new(name), &settings).expect(name);
        let SourcePlan::Rest(rest) = &plan.source else {
            panic!("{name} is a REST connector")
        };
        let http = HttpClient::new(&plan.broker, rest).expect("client");
        Connector { plan, http }
    })
    .collect()
});

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let rows = body.pointer("/data").unwrap_or(&body);
    for row in rows.as_array().into_iter().flatten() {
        for entity in Entity::ALL {
            let _ = engine::check(entity, row.clone().into(), &SQL_MAPPING.mapping);
        }
    }
    let window = Window {
        from: jiff::Timestamp::UNIX_EPOCH,
        to: jiff::Timestamp::from_second(1_800_000_000).unwrap(),
    };
    for c in CONNECTORS.iter() {
        let SourcePlan::Rest(rest) = &c.plan.source else {
            unreachable!()
        };
        for entity in Entity::ALL {
            let mut pager = RestPager::new(&c.http, rest, &c.plan.zone, entity, window);
            let url = rest.url(entity);
            for _ in 0..3 {
                // Parsed as the client parses it, records read out of the body: whatever
                // serde_json reads as a value, it must read too.
                let fetched = Fetched::parse(data, &rest.paging.records, None)
                    .expect("a body serde_json parses");
                let Ok(records) = pager.advance(&url, fetched) else {
                    break;
                };
                for record in records {
                    let _ = engine::check(entity, record, &c.plan.mapping);
                }
            }
        }
    }
});
