-- Report views for analysts. They read the tables with FINAL, so every click
-- and every conversion counts once whether or not the server has merged
-- away duplicate rows and older conversion versions yet. (argMax by version
-- would do too; FINAL keeps the queries plain and runs on 18.16 and on
-- current releases alike.)
--
-- Views are dropped and created again, so that applying this file replaces
-- an older definition. DROP TABLE rather than DROP VIEW: 18.16 knows only
-- the former, and it drops views on every release. Dependents go first.
--
-- Column names are distinct at every query level (n_clicks inside,
-- clicks outside) because older servers resolve an alias before a column of
-- the same name and would see sum(clicks) AS clicks as nested aggregates.
DROP TABLE IF EXISTS {db}.report_daily;
DROP TABLE IF EXISTS {db}.report_hourly;
DROP TABLE IF EXISTS {db}.report_facts;

-- report_facts: one row per click and one per conversion (its latest
-- version), the common ground of the reports; query it for groupings the
-- reports lack (by source, sub1, goal, reject_reason, ...).
--   kind: 'click' or 'conversion'
--   ts: the click's time, or the conversion's (of its latest version)
--   goal, status, reject_reason, currency: '' for clicks
--   revenue, payout: 0 for clicks
CREATE VIEW IF NOT EXISTS {db}.report_facts AS
SELECT
    ts,
    'click' AS kind,
    offer_id,
    advertiser_id,
    aff_id,
    source,
    sub1,
    sub2,
    sub3,
    sub4,
    sub5,
    '' AS goal,
    '' AS status,
    '' AS reject_reason,
    toDecimal64(0, 4) AS revenue,
    toDecimal64(0, 4) AS payout,
    '' AS currency
FROM {db}.clicks FINAL
UNION ALL
SELECT
    ts,
    'conversion' AS kind,
    offer_id,
    advertiser_id,
    aff_id,
    source,
    sub1,
    sub2,
    sub3,
    sub4,
    sub5,
    goal,
    status,
    reject_reason,
    revenue,
    payout,
    currency
FROM {db}.conversions FINAL;

-- report_daily and report_hourly: per day (hour) of the server's time zone,
-- offer and affiliate. Clicks count by click time, conversions by the time
-- of their latest version (a pending conversion approved two days later
-- counts on the day it was approved).
--   clicks: distinct clicks
--   conversions: approved conversions; pending, rejected: the others
--   cr: conversions / clicks (a ratio, not a percentage; 0 without clicks)
--   revenue: what advertisers owe for the approved conversions
--   payout: what affiliates earn for them; profit: revenue - payout
--   epc: payout / clicks, the affiliate's earnings per click
--   rpc: revenue / clicks, the network's revenue per click
--   currency: the offer's currency ('' without approved conversions)
-- A conversion whose click is unknown has offer_id 0 and aff_id 0.
CREATE VIEW IF NOT EXISTS {db}.report_daily AS
SELECT
    day,
    offer_id,
    aff_id,
    n_clicks AS clicks,
    n_approved AS conversions,
    n_pending AS pending,
    n_rejected AS rejected,
    if(n_clicks = 0, 0, round(n_approved / n_clicks, 6)) AS cr,
    sum_revenue AS revenue,
    sum_payout AS payout,
    sum_revenue - sum_payout AS profit,
    if(n_clicks = 0, 0, round(toFloat64(sum_payout) / n_clicks, 4)) AS epc,
    if(n_clicks = 0, 0, round(toFloat64(sum_revenue) / n_clicks, 4)) AS rpc,
    approved_currency AS currency
FROM
(
    SELECT
        toDate(ts) AS day,
        offer_id,
        aff_id,
        countIf(kind = 'click') AS n_clicks,
        countIf(kind = 'conversion' AND status = 'approved') AS n_approved,
        countIf(kind = 'conversion' AND status = 'pending') AS n_pending,
        countIf(kind = 'conversion' AND status = 'rejected') AS n_rejected,
        sumIf(revenue, kind = 'conversion' AND status = 'approved') AS sum_revenue,
        sumIf(payout, kind = 'conversion' AND status = 'approved') AS sum_payout,
        maxIf(currency, kind = 'conversion' AND status = 'approved') AS approved_currency
    FROM {db}.report_facts
    GROUP BY day, offer_id, aff_id
);

CREATE VIEW IF NOT EXISTS {db}.report_hourly AS
SELECT
    hour,
    offer_id,
    aff_id,
    n_clicks AS clicks,
    n_approved AS conversions,
    n_pending AS pending,
    n_rejected AS rejected,
    if(n_clicks = 0, 0, round(n_approved / n_clicks, 6)) AS cr,
    sum_revenue AS revenue,
    sum_payout AS payout,
    sum_revenue - sum_payout AS profit,
    if(n_clicks = 0, 0, round(toFloat64(sum_payout) / n_clicks, 4)) AS epc,
    if(n_clicks = 0, 0, round(toFloat64(sum_revenue) / n_clicks, 4)) AS rpc,
    approved_currency AS currency
FROM
(
    SELECT
        toStartOfHour(ts) AS hour,
        offer_id,
        aff_id,
        countIf(kind = 'click') AS n_clicks,
        countIf(kind = 'conversion' AND status = 'approved') AS n_approved,
        countIf(kind = 'conversion' AND status = 'pending') AS n_pending,
        countIf(kind = 'conversion' AND status = 'rejected') AS n_rejected,
        sumIf(revenue, kind = 'conversion' AND status = 'approved') AS sum_revenue,
        sumIf(payout, kind = 'conversion' AND status = 'approved') AS sum_payout,
        maxIf(currency, kind = 'conversion' AND status = 'approved') AS approved_currency
    FROM {db}.report_facts
    GROUP BY hour, offer_id, aff_id
);
