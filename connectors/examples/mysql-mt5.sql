-- What connectors/examples/mysql-mt5.toml expects of a MetaTrader 5 replica in MySQL or
-- MariaDB: the SQL Export's `mt5_users` and `mt5_deals`, cut down to the columns it reads.
-- The database `mt5_replica` stands for the broker's own.
--
-- Times: `Time`, `Registration` and the change stamp `Timestamp` (the delta cursor) are
-- trade-server wall-clock (DATETIME, no zone); the connector reads them in the connector's
-- `timezone`. If an export keeps the change stamp as milliseconds (BIGINT), expose it through a
-- view as `FROM_UNIXTIME(Timestamp / 1000)` in a UTC session and set `naive_timezone = "UTC"`.

CREATE DATABASE mt5_replica;

CREATE TABLE mt5_replica.mt5_users (
    Login        BIGINT UNSIGNED PRIMARY KEY,
    `Group`      VARCHAR(64) NOT NULL,
    Registration DATETIME NOT NULL,
    Timestamp    DATETIME(3) NOT NULL,
    Agent        BIGINT UNSIGNED NOT NULL DEFAULT 0,   -- the IB's login; 0 = none
    LeadCampaign VARCHAR(64),
    Leverage     INT UNSIGNED NOT NULL,
    EMail        VARCHAR(128),
    Currency     CHAR(3) NOT NULL,                     -- from the group; kept per user here
    INDEX users_delta (Timestamp, Login)
);

CREATE TABLE mt5_replica.mt5_deals (
    Deal       BIGINT UNSIGNED PRIMARY KEY,
    Timestamp  DATETIME(3) NOT NULL,
    Login      BIGINT UNSIGNED NOT NULL,
    Time       DATETIME NOT NULL,
    Symbol     VARCHAR(32) NOT NULL,
    Action     INT UNSIGNED NOT NULL,    -- 0 buy, 1 sell, 2 balance, 13/14 cancelled, …
    Entry      INT UNSIGNED NOT NULL,    -- 0 in, 1 out, 2 inout, 3 out by
    Volume     BIGINT UNSIGNED NOT NULL, -- 1/10000 lot
    Commission DECIMAL(18, 2) NOT NULL,  -- charges are negative
    Storage    DECIMAL(18, 2) NOT NULL,  -- swap
    Profit     DECIMAL(18, 2) NOT NULL,
    Currency   CHAR(3) NOT NULL,         -- the account's deposit currency
    INDEX deals_delta (Timestamp, Deal),
    INDEX deals_time (Time, Deal)
);

-- The least privilege the connector needs (README, "Onboarding a broker's database").
-- CREATE USER 'track360_reader'@'10.%' IDENTIFIED BY '…' REQUIRE SSL WITH MAX_USER_CONNECTIONS 4;
-- GRANT SELECT ON mt5_replica.mt5_users TO 'track360_reader'@'10.%';
-- GRANT SELECT ON mt5_replica.mt5_deals TO 'track360_reader'@'10.%';

-- A few rows to try it with: server time is Athens (EET/EEST).
INSERT INTO mt5_replica.mt5_users VALUES
  (50001, 'real\\usd', '2026-03-02 10:00:00', '2026-03-02 10:00:00.000', 9001, 'spring', 500, 'trader1@example.com', 'USD'),
  (50002, 'real\\eur', '2026-03-03 11:00:00', '2026-03-03 11:00:00.000', 9001, NULL, 100, 'trader2@example.com', 'EUR');
INSERT INTO mt5_replica.mt5_deals VALUES
  (1, '2026-03-02 10:05:00.000', 50001, '2026-03-02 10:05:00', '', 2, 0, 0, 0, 0, 1000.00, 'USD'),
  (2, '2026-03-02 11:00:00.000', 50001, '2026-03-02 11:00:00', 'EURUSD', 0, 0, 20000, -7.00, 0, 0, 'USD'),
  (3, '2026-03-02 23:59:00.000', 50001, '2026-03-02 23:59:00', 'EURUSD', 1, 1, 20000, -7.00, -1.20, 35.50, 'USD'),
  (4, '2026-03-03 00:01:00.000', 50001, '2026-03-03 00:01:00', 'EURUSD', 0, 0, 10000, -3.50, 0, 0, 'USD'),
  (5, '2026-03-03 11:30:00.000', 50002, '2026-03-03 11:30:00', 'XAUUSD', 0, 0, 500, -1.00, 0, 0, 'EUR'),
  (6, '2026-03-03 14:00:00.000', 50002, '2026-03-03 14:00:00', 'XAUUSD', 1, 1, 500, -1.00, 0, -12.00, 'EUR'),
  (7, '2026-03-04 09:00:00.000', 50002, '2026-03-04 09:00:00', '', 2, 0, 0, 0, 0, -200.00, 'EUR');
