//! Writes the fuzz targets' seed corpora from the sample broker's own data: pages of both its
//! APIs (valid and invalid records), single records, the shipped connector files, their cron
//! expressions, and `Link` / `Retry-After` headers.
//!
//! `cargo run --example fuzz_seeds -- fuzz/corpus` (README "Security" → "Fuzzing").

use std::path::{Path, PathBuf};

use serde_json::Value;
use t360_connector::model::Entity;
use t360_connector::sample_broker::{Dataset, DatasetSpec, Paging, SampleBroker};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    t360_connector::source::rest::ensure_crypto_provider();
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".into()),
    );
    let data = Dataset::generate(&DatasetSpec {
        customers: 40,
        transactions: 80,
        activity: 80,
        invalid_every: 7,
        ..DatasetSpec::default()
    });
    let broker = SampleBroker::start("127.0.0.1:0".parse()?, data, Paging::Cursor, None).await?;
    let base = broker.base_url();
    let mut written = 0;
    let mut write = |target: &str, name: String, bytes: &[u8]| -> std::io::Result<()> {
        let dir = out.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(name), bytes)?;
        written += 1;
        Ok(())
    };
    for entity in Entity::ALL {
        let segment = entity.api_segment();
        let standard = (1..=3).map(|page| {
            format!("{base}/api/v1/forex/{segment}?per_page=5&page={page}&last_modified_from=1970-01-01T00:00:00Z")
        });
        let legacy_path = match entity {
            Entity::Customers => "clients",
            Entity::Transactions => "deals",
            Entity::TradingActivity => "daily",
        };
        let legacy = (0..3).map(|page| {
            format!(
                "{base}/legacy/v2/{legacy_path}?from=0&offset={}&limit=5",
                page * 5
            )
        });
        for (i, url) in standard.chain(legacy).enumerate() {
            let body = reqwest::get(&url).await?.bytes().await?;
            write("page", format!("{segment}-{i}.json"), &body)?;
            let page: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let records = page
                .pointer("/data")
                .or_else(|| page.pointer("/result/items"))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for (j, record) in records.iter().enumerate() {
                write(
                    "validate",
                    format!("{segment}-{i}-{j}.json"),
                    record.to_string().as_bytes(),
                )?;
            }
        }
    }
    let connectors = Path::new(env!("CARGO_MANIFEST_DIR")).join("connectors");
    for dir in [connectors.clone(), connectors.join("examples")] {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path)?;
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                write("connector_toml", name.clone(), text.as_bytes())?;
                for (k, line) in text.lines().enumerate() {
                    if let Some((_, value)) = line.split_once('=')
                        && let Some(expr) = value
                            .trim()
                            .strip_prefix('"')
                            .and_then(|v| v.split('"').next())
                        && expr.split_whitespace().count() >= 5
                    {
                        write("cron", format!("{name}-{k}"), expr.as_bytes())?;
                    }
                }
            }
        }
    }
    for (i, expr) in [
        "*/5 * * * *",
        "*/10 * * * * *",
        "0 3 * * 1-5",
        "30 2 * * *",
        "0 0 29 2 *",
        "@daily",
    ]
    .iter()
    .enumerate()
    {
        write("cron", format!("extra-{i}"), expr.as_bytes())?;
    }
    for (i, header) in [
        r#"<https://b.example/x?page=3>; rel="next", <https://b.example/x?page=1>; rel="prev""#,
        "</api/v1/forex/customers?cursor=abc>; rel=next",
        "120",
        "Wed, 21 Oct 2015 07:28:00 GMT",
    ]
    .iter()
    .enumerate()
    {
        write("headers", format!("h{i}"), header.as_bytes())?;
    }
    println!("{written} seeds in {}", out.display());
    Ok(())
}
