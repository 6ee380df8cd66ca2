//! Personal data policy: each of `first_name`, `last_name` and `email` is kept, dropped or
//! hashed before anything is stored, quarantine included.

use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::model::{Customer, Entity};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PiiAction {
    Keep,
    Drop,
    Hash,
}

impl PiiAction {
    pub fn parse(text: &str) -> Result<PiiAction, String> {
        match text {
            "keep" => Ok(PiiAction::Keep),
            "drop" => Ok(PiiAction::Drop),
            "hash" => Ok(PiiAction::Hash),
            other => Err(format!("`{other}` is not one of: keep, drop, hash")),
        }
    }
}

/// The PII fields of customers.
pub const PII_FIELDS: [&str; 3] = ["first_name", "last_name", "email"];

#[derive(Debug, Clone)]
pub struct PiiPolicy {
    /// In `PII_FIELDS` order.
    pub actions: [PiiAction; 3],
    /// Mixed into every hash, so that a hash cannot be reversed by hashing known addresses.
    pub hash_key: Option<SecretString>,
}

impl Default for PiiPolicy {
    fn default() -> Self {
        PiiPolicy {
            actions: [PiiAction::Keep; 3],
            hash_key: None,
        }
    }
}

impl PiiPolicy {
    pub fn keeps_everything(&self) -> bool {
        self.actions.iter().all(|a| *a == PiiAction::Keep)
    }

    /// Applies the policy to a validated customer.
    pub fn apply(&self, customer: &mut Customer) {
        let fields = [
            &mut customer.first_name,
            &mut customer.last_name,
            &mut customer.email,
        ];
        for (field, action) in fields.into_iter().zip(self.actions) {
            match action {
                PiiAction::Keep => {}
                PiiAction::Drop => *field = None,
                PiiAction::Hash => *field = field.as_deref().map(|v| self.hash(v).into()),
            }
        }
    }

    /// Applies the policy to a value in a raw record (for quarantine), given the field.
    pub fn apply_value(&self, field: &str, value: &mut Value) -> bool {
        let Some(i) = PII_FIELDS.iter().position(|f| *f == field) else {
            return true;
        };
        match self.actions[i] {
            PiiAction::Keep => true,
            PiiAction::Drop => false,
            PiiAction::Hash => {
                if let Some(text) = value.as_str() {
                    *value = Value::String(self.hash(text));
                }
                true
            }
        }
    }

    /// Whether this entity carries fields the policy touches.
    pub fn applies_to(&self, entity: Entity) -> bool {
        entity == Entity::Customers && !self.keeps_everything()
    }

    /// Idempotent: a value that is already a hash (a quarantined record replayed) stays as is.
    fn hash(&self, value: &str) -> String {
        if crate::validate::is_pii_hash(value) {
            return value.to_owned();
        }
        let mut h = Sha256::new();
        if let Some(key) = &self.hash_key {
            h.update(key.expose_secret().as_bytes());
            h.update([0]);
        }
        // Case and surrounding blanks do not make a different person.
        h.update(value.trim().to_lowercase().as_bytes());
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}
