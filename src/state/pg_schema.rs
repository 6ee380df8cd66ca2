//! The PostgreSQL state schema, versioned in `schema_version`; migrations only go forward.
//!
//! The entity tables have the embedded store's columns, as text, exactly as the store writes
//! them (exact decimals, RFC 3339 instants): cast in queries (`amount::numeric`). The daemon's
//! own state uses PostgreSQL types: leases compare instants on the server's clock only.

/// Each entry moves the schema from version `index` to `index + 1`.
pub const MIGRATIONS: &[&str] = &[r#"
    CREATE TABLE customers (
        broker TEXT NOT NULL,
        customer_id TEXT NOT NULL,
        signup_date TEXT NOT NULL,
        last_modified_date TEXT,
        affiliate_id TEXT NOT NULL,
        campaign_id TEXT,
        click_id TEXT,
        lang_id TEXT,
        country_code TEXT,
        kyc_status_id TEXT,
        sales_status_id TEXT,
        trading_account_type TEXT,
        leverage TEXT,
        first_name TEXT,
        last_name TEXT,
        email TEXT,
        PRIMARY KEY (broker, customer_id)
    );
    CREATE TABLE transactions (
        broker TEXT NOT NULL,
        transaction_id TEXT NOT NULL,
        customer_id TEXT NOT NULL,
        transaction_type TEXT NOT NULL,
        amount TEXT NOT NULL,
        currency TEXT NOT NULL,
        transaction_date TEXT NOT NULL,
        status TEXT NOT NULL,
        last_modified_date TEXT,
        PRIMARY KEY (broker, transaction_id)
    );
    CREATE TABLE trading_activity (
        broker TEXT NOT NULL,
        date TEXT NOT NULL,
        customer_id TEXT NOT NULL,
        instrument TEXT NOT NULL,
        lots_traded TEXT NOT NULL,
        volume_usd TEXT,
        spread_cost TEXT,
        commission TEXT,
        pnl TEXT,
        currency TEXT NOT NULL,
        last_modified_date TEXT,
        PRIMARY KEY (broker, date, customer_id, instrument, currency)
    );
    CREATE TABLE quarantine (
        broker TEXT NOT NULL,
        entity TEXT NOT NULL,
        record_key TEXT NOT NULL,
        raw TEXT NOT NULL,
        reasons TEXT NOT NULL,
        stage TEXT NOT NULL DEFAULT 'validation',
        first_seen TIMESTAMPTZ NOT NULL,
        last_seen TIMESTAMPTZ NOT NULL,
        times_seen BIGINT NOT NULL,
        PRIMARY KEY (broker, entity, record_key)
    );
    CREATE TABLE held (
        broker TEXT NOT NULL,
        entity TEXT NOT NULL,
        record_key TEXT NOT NULL,
        customer_id TEXT NOT NULL,
        record JSONB NOT NULL,
        first_seen TIMESTAMPTZ NOT NULL,
        last_seen TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (broker, entity, record_key)
    );
    CREATE INDEX held_by_customer ON held (broker, customer_id);
    CREATE TABLE checkpoints (
        broker TEXT NOT NULL,
        entity TEXT NOT NULL,
        cursor TIMESTAMPTZ NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (broker, entity)
    );
    CREATE TABLE runs (
        id BIGSERIAL PRIMARY KEY,
        broker TEXT NOT NULL,
        entity TEXT NOT NULL,
        kind TEXT NOT NULL,
        holder TEXT NOT NULL,
        started_at TIMESTAMPTZ NOT NULL,
        finished_at TIMESTAMPTZ,
        outcome TEXT NOT NULL,
        window_from TIMESTAMPTZ,
        window_to TIMESTAMPTZ,
        pages BIGINT NOT NULL DEFAULT 0,
        pulled BIGINT NOT NULL DEFAULT 0,
        stored BIGINT NOT NULL DEFAULT 0,
        quarantined BIGINT NOT NULL DEFAULT 0,
        held BIGINT NOT NULL DEFAULT 0,
        error TEXT
    );
    CREATE INDEX runs_by_entity ON runs (broker, entity, id);
    CREATE TABLE backfills (
        broker TEXT NOT NULL,
        entity TEXT NOT NULL,
        since TIMESTAMPTZ NOT NULL,
        until TIMESTAMPTZ NOT NULL,
        done_until TIMESTAMPTZ NOT NULL,
        started_at TIMESTAMPTZ NOT NULL,
        finished_at TIMESTAMPTZ,
        PRIMARY KEY (broker, entity, since)
    );
    CREATE TABLE reconciliations (
        id BIGSERIAL PRIMARY KEY,
        broker TEXT NOT NULL,
        entity TEXT NOT NULL,
        finished_at TIMESTAMPTZ NOT NULL,
        range_from TEXT NOT NULL,
        range_to TEXT NOT NULL,
        outcome TEXT NOT NULL,
        missing BIGINT NOT NULL DEFAULT 0,
        different BIGINT NOT NULL DEFAULT 0,
        gone BIGINT NOT NULL DEFAULT 0,
        repaired BIGINT NOT NULL DEFAULT 0,
        error TEXT
    );
    -- The daemons of the fleet, each heartbeating.
    CREATE TABLE members (
        id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        pid BIGINT NOT NULL,
        started_at TIMESTAMPTZ NOT NULL,
        heartbeat_at TIMESTAMPTZ NOT NULL,
        config_hash TEXT NOT NULL,
        version TEXT NOT NULL
    );
    -- Who works a (broker, entity, lane): holder, fencing epoch (bumped by every new holder),
    -- expiry on the server's clock. A released lease has no holder and has expired.
    CREATE TABLE leases (
        broker TEXT NOT NULL,
        entity TEXT NOT NULL,
        lane TEXT NOT NULL,
        holder TEXT,
        epoch BIGINT NOT NULL,
        acquired_at TIMESTAMPTZ NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (broker, entity, lane)
    );
"#];
