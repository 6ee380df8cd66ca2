-- What connectors/examples/postgres-crm.toml expects of a broker's CRM replica in PostgreSQL.
-- The schema `crm_replica` stands for the broker's own; names are theirs to choose, the
-- connector file maps them. Ask for the indexes: every page is a keyset query on them.

CREATE SCHEMA crm_replica;

CREATE TABLE crm_replica.clients (
    id            bigint PRIMARY KEY,                 -- integer ids become text customer_ids
    registered_at timestamp without time zone NOT NULL, -- naive: the CRM writes UTC wall-clock
    updated_at    timestamptz NOT NULL,               -- the delta cursor
    ib_code       text,                               -- the introducing broker / affiliate
    campaign      text,
    country_iso   char(2),
    language      text,
    kyc_state     text,
    leverage      integer,
    given_name    text,
    family_name   text,
    email         text
);
CREATE INDEX clients_delta ON crm_replica.clients (updated_at, id);

CREATE TABLE crm_replica.payments (
    payment_id   text PRIMARY KEY,
    client_id    bigint NOT NULL REFERENCES crm_replica.clients (id),
    kind         text NOT NULL,                       -- DEP / WD / IB / BON / ADJ
    amount       numeric(20, 2) NOT NULL,             -- exact; withdrawals negative
    currency     char(3) NOT NULL,
    booked_at    timestamptz NOT NULL,
    state        text NOT NULL,
    updated_at   timestamptz NOT NULL
);
CREATE INDEX payments_delta ON crm_replica.payments (updated_at, payment_id);

-- Daily trading summaries the CRM already keeps (one row per day, account, symbol, currency).
CREATE TABLE crm_replica.daily_trading (
    trade_date   date NOT NULL,
    client_id    bigint NOT NULL,
    symbol       text NOT NULL,
    currency     char(3) NOT NULL,
    lots         numeric(18, 2) NOT NULL,
    volume_usd   numeric(20, 2),
    commission   numeric(18, 2),
    pnl          numeric(18, 2),
    updated_at   timestamptz NOT NULL,
    PRIMARY KEY (trade_date, client_id, symbol, currency)
);
CREATE INDEX daily_trading_delta ON crm_replica.daily_trading (updated_at, trade_date, client_id, symbol, currency);

-- The least privilege the connector needs (README, "Onboarding a broker's database").
-- CREATE ROLE track360_reader LOGIN PASSWORD '…' CONNECTION LIMIT 4;
-- GRANT USAGE ON SCHEMA crm_replica TO track360_reader;
-- GRANT SELECT ON crm_replica.clients, crm_replica.payments, crm_replica.daily_trading TO track360_reader;
-- ALTER ROLE track360_reader SET default_transaction_read_only = on;

-- A few rows to try it with.
INSERT INTO crm_replica.clients VALUES
  (1001, '2026-01-05 09:30:00', '2026-01-05 09:30:05+00', 'IB-7', 'spring', 'CY', 'en', 'approved', 500, 'Ada', 'Lovelace', 'ada@example.com'),
  (1002, '2026-01-06 14:00:00', '2026-01-07 08:00:00+00', 'IB-7', NULL, 'GR', 'el', 'pending', 100, 'Alan', 'Turing', 'alan@example.com');
INSERT INTO crm_replica.payments VALUES
  ('P-1', 1001, 'DEP', 250.00, 'USD', '2026-01-05 10:00:00+00', 'approved', '2026-01-05 10:00:01+00'),
  ('P-2', 1001, 'WD', -50.00, 'USD', '2026-01-08 12:00:00+00', 'pending', '2026-01-08 12:00:00+00'),
  ('P-3', 1002, 'IB', 12.34, 'EUR', '2026-01-09 00:00:00+00', 'approved', '2026-01-09 00:00:00+00');
INSERT INTO crm_replica.daily_trading VALUES
  ('2026-01-07', 1001, 'EURUSD', 'USD', 3.50, 385000.00, 24.50, -120.75, '2026-01-08 02:00:00+00'),
  ('2026-01-07', 1002, 'XAUUSD', 'EUR', 0.20, 52000.00, 1.40, 33.10, '2026-01-08 02:00:00+00');
