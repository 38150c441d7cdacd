-- Trackstar's tables: one row per event the warehouse loader reads from Kafka.
--
-- {db} stands for the database name (trackstar by default). A statement
-- ends with ';' at the end of a line; lines that hold only a comment are
-- dropped before the statement is sent.
--
-- Compatibility: this DDL runs on ClickHouse 18.16 and on current releases,
-- so it uses no LowCardinality, TTL, DateTime64, Map, codecs or skip indexes,
-- and the loader's INSERTs name their columns.
--
-- Idempotence: Kafka delivery is at least once, so the loader may insert the
-- same event twice. Every table is a ReplacingMergeTree whose sorting key
-- identifies the event, so a redelivery is a duplicate row that a merge
-- removes, never a second event. Merges happen whenever the server likes:
-- queries that must count each event once read with FINAL (see the report
-- views), which also collapses rows not merged yet.
--
-- Timestamps: events carry Unix milliseconds; columns are DateTime (whole
-- seconds, UTC epoch, shown in the server's time zone). The loader drops the
-- milliseconds: no report groups finer than an hour, the order of a
-- conversion's records is its version and of a delivery's attempts its
-- attempt number, and the exact millisecond of a click stays in its click_id.
-- A timestamp that is unknown is 0 (1970-01-01 00:00:00 UTC).
--
-- Money: Decimal(18, 4), the same four decimal places as schemas.Amount, in
-- the offer's currency.

-- One row per click the edge redirected. Every column comes from the click
-- event, so a redelivered click is an identical row with the same sorting
-- key, in the same monthly partition.
CREATE TABLE IF NOT EXISTS {db}.clicks
(
    click_id String,
    ts DateTime,
    offer_id UInt32,
    advertiser_id UInt32,
    aff_id UInt32,
    source String,
    sub1 String,
    sub2 String,
    sub3 String,
    sub4 String,
    sub5 String,
    ip String,
    user_agent String,
    referer String
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (offer_id, aff_id, ts, click_id);

-- One row per conversion record the attributor emitted; after merging (or
-- with FINAL) one row per conversion_id, the one with the highest version.
-- Status updates of a conversion (pending -> approved) carry the same
-- conversion_id, a higher version and their own ts, so the sorting key is
-- conversion_id alone and the table has no partition key: both must be the
-- same for every version of a conversion, or versions would never replace
-- each other, and no timestamp is (ts moves with each update; click_ts is
-- 0 for an unknown click). Conversions are a few percent of clicks, so one
-- partition stays small. Rejected conversions are rows too (status
-- rejected, reject_reason set).
CREATE TABLE IF NOT EXISTS {db}.conversions
(
    conversion_id String,
    version UInt32,
    postback_event_id String,
    click_id String,
    ts DateTime,
    click_ts DateTime,
    offer_id UInt32,
    advertiser_id UInt32,
    aff_id UInt32,
    goal String,
    status String,
    reject_reason String,
    txn_id String,
    sale_amount Decimal(18, 4),
    revenue Decimal(18, 4),
    payout Decimal(18, 4),
    currency String,
    ctit_seconds Int64,
    source String,
    sub1 String,
    sub2 String,
    sub3 String,
    sub4 String,
    sub5 String
)
ENGINE = ReplacingMergeTree(version)
ORDER BY conversion_id;

-- One row per partner postback attempt the dispatcher made. An attempt is
-- identified by (conversion_id, version, attempt): the version and status
-- of the conversion being delivered, and the attempt number (1 for the
-- first try). A redelivered attempt record is identical, ts included, so it
-- lands in the same monthly partition and replaces its twin.
-- outcome is delivered, retrying, failed or dead; status_code is 0 when no
-- response came.
CREATE TABLE IF NOT EXISTS {db}.postback_deliveries
(
    conversion_id String,
    version UInt32,
    status String,
    aff_id UInt32,
    attempt UInt32,
    ts DateTime,
    method String,
    url String,
    status_code UInt16,
    duration_ms UInt32,
    outcome String,
    error String
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (conversion_id, version, attempt);
