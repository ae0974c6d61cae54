-- Title: Hourly values of the numeric EHR variables
-- Description: From the view ehr_numeric_valid (ehr_numeric_valid.sql: events mapped to their
--   variable(s), converted to the canonical unit, finite and in range): exact duplicate events
--   are dropped (SELECT DISTINCT over the event's columns and its variable, which is the same as
--   dropping them before the mapping), and the rest are aggregated per (stay, hour, variable) with
--   the variable's agg: mean, sum, max or last (latest charttime; ties broken by the value).
--   Determinism: the hour's (charttime, value) pairs are collected and sorted (list_sort of
--   structs sorts by charttime, then value), then summed or averaged from first to last, so
--   floating-point sums are the same on every run and thread count; last is the value of the
--   largest (charttime, value) pair, max is order-free. This replaces ordered aggregates
--   (avg(value ORDER BY charttime, value)), which give the same numbers but sort every group
--   at a much higher cost. Rows come out unordered (they are placed by index).
--   Parameters $first and $last: the stay_idx range aggregated (a slice of the partition, so that
--   the working set does not depend on the partition's size).
--   Needs the view ehr_numeric_valid and what it needs.
WITH in_range AS (
    SELECT DISTINCT stay_idx, hour, charttime, itemid, num, var_idx, value, agg
    FROM ehr_numeric_valid
    WHERE stay_idx BETWEEN $first AND $last
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
