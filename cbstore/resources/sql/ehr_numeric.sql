-- Title: Hourly values of the numeric EHR variables
-- Description: From ehr_events: exact duplicate events are dropped (SELECT DISTINCT), each event
--   is mapped to its variable(s), converted to the canonical unit (value * scale + offset,
--   only where the raw value is below `below` if that is set), values outside the variable's
--   range are dropped, and the rest are aggregated per (stay, hour, variable) with the
--   variable's agg: mean, sum, max or last (latest charttime; ties broken by the value).
--   Determinism: the hour's (charttime, value) pairs are collected and sorted (list_sort of
--   structs sorts by charttime, then value), then summed or averaged from first to last, so
--   floating-point sums are the same on every run and thread count; last is the value of the
--   largest (charttime, value) pair, max is order-free. This replaces ordered aggregates
--   (avg(value ORDER BY charttime, value)), which give the same numbers but sort every group
--   at a much higher cost. Rows come out unordered (they are placed by index).
--   Needs ehr_items(var_idx, itemid, source, is_text), ehr_vars(var_idx, agg, low, high)
--   and ehr_convert(var_idx, itemid, below, scale, "offset").
WITH events AS (
    SELECT DISTINCT stay_idx, hour, charttime, itemid, num
    FROM ehr_events
    WHERE num IS NOT NULL
),
mapped AS (
    SELECT e.stay_idx, e.hour, e.charttime, e.itemid, e.num, i.var_idx
    FROM events AS e
    JOIN (SELECT DISTINCT var_idx, itemid FROM ehr_items WHERE NOT is_text) AS i ON i.itemid = e.itemid
),
converted AS (
    SELECT
        m.stay_idx, m.hour, m.charttime, m.var_idx,
        CASE WHEN c.itemid IS NOT NULL AND (c.below IS NULL OR m.num < c.below)
             THEN m.num * c.scale + c."offset" ELSE m.num END AS value
    FROM mapped AS m
    LEFT JOIN ehr_convert AS c ON c.var_idx = m.var_idx AND c.itemid = m.itemid
),
in_range AS (
    SELECT x.*, v.agg
    FROM converted AS x
    JOIN ehr_vars AS v ON v.var_idx = x.var_idx
    WHERE (v.low IS NULL OR x.value >= v.low)
      AND (v.high IS NULL OR x.value <= v.high)
),
grouped AS (
    SELECT stay_idx, hour, var_idx, agg,
           list_sort(list({'t': charttime, 'v': value})) AS ordered
    FROM in_range
    GROUP BY stay_idx, hour, var_idx, agg
)
SELECT
    stay_idx,
    hour,
    var_idx,
    CASE agg
        WHEN 'mean' THEN list_avg(list_transform(ordered, lambda x: x.v))
        WHEN 'sum' THEN list_sum(list_transform(ordered, lambda x: x.v))
        WHEN 'max' THEN list_max(list_transform(ordered, lambda x: x.v))
        WHEN 'last' THEN ordered[-1].v
    END AS value
FROM grouped;
