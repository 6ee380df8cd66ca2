//! The validation rules on any JSON value as a Track360 record of each entity, and the
//! decimal parser on any text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use t360_connector::model::Entity;
use t360_connector::validate;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = validate::parse_decimal(text);
    }
    let Ok(record) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    for entity in Entity::ALL {
        if let Ok(valid) = validate::validate(entity, &record) {
            // What passed must serialise and pass again unchanged.
            let again = validate::validate(entity, &valid.to_json())
                .unwrap_or_else(|e| panic!("a valid {entity} record fails once serialised: {e:?}"));
            assert_eq!(again.to_json(), valid.to_json());
        }
    }
});
