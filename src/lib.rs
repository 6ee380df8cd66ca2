//! t360-connector: the pull side of Track360's forex integration.
//!
//! source → normalise → validate → sink → checkpoint, driven per (broker, entity) by the engine.

pub mod backfill;
pub mod cli;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod http;
pub mod model;
pub mod normalise;
pub mod reconcile;
pub mod sample_broker;
pub mod sink;
pub mod source;
pub mod state;
pub mod telemetry;
pub mod validate;
