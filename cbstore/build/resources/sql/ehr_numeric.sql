-- Title: Hourly values of the numeric EHR variables
-- Description: From the view ehr_numeric_valid (ehr_numeric_valid.sql: events mapped to their
--   variable(s), converted to the canonical unit, finite and in range): exact duplicate events
--   are dropped, and the rest are aggregated per (stay, hour, variable) with the variable's agg:
--   mean, sum, max or last (latest charttime; ties broken by the value).
--   Determinism: a sum of floating-point values depends on the order it is added in, and
--   DuckDB's threads add in no fixed order. Where the order matters, the hour's distinct
--   (charttime, value) pairs are collected and sorted (list_sort of structs sorts by charttime,
--   then value) and summed or averaged from first to last, so results are the same on every run
--   and thread count. That is costly (most of the build's aggregation time when done for every
--   hour), so it is done only where the plain aggregates could differ from it (`ordered`):
--   * one event: every agg is its value;
--   * two events of a mean: a + b is b + a exactly, so their mean is the sum / 2 in any order,
--     and an exact duplicate pair averages to its value;
--   * otherwise (three or more events, or two of a sum or last, where a duplicate must be dropped
--     or the later event found): `ordered`;
--   * max is order-free and duplicate-free at any count.
--   The result is the same, bit for bit, as sorting every hour (tests/cbstore/build/test_ehr_aggregation.py).
--   This replaces ordered aggregates (avg(value ORDER BY charttime, value)), which give the same
--   numbers but sort every group at a much higher cost. Rows come out unordered (they are placed
--   by index).
--   Parameters $first and $last: the stay_idx range aggregated (a slice of the partition, so that
--   the working set does not depend on the partition's size).
--   Needs the view ehr_numeric_valid and ehr_vars(var_idx, agg, low, high).
WITH valid AS (
    SELECT stay_idx, hour, charttime, itemid, num, var_idx, value
    FROM ehr_numeric_valid
    WHERE stay_idx BETWEEN $first AND $last
),
summary AS (
    SELECT stay_idx, hour, var_idx,
           count(*) AS n,
           sum(value) AS total,
           max(value) AS largest
    FROM valid
    GROUP BY stay_idx, hour, var_idx
),
hours AS (
    SELECT s.*, v.agg, v.agg <> 'max' AND (s.n > 2 OR (s.n = 2 AND v.agg <> 'mean')) AS needs_order
    FROM summary AS s
    JOIN ehr_vars AS v USING (var_idx)
),
ordered AS (
    SELECT stay_idx, hour, var_idx, list_sort(list({'t': charttime, 'v': value})) AS events
    FROM (SELECT DISTINCT stay_idx, hour, charttime, itemid, num, var_idx, value
          FROM valid
          SEMI JOIN (SELECT stay_idx, hour, var_idx FROM hours WHERE needs_order) USING (stay_idx, hour, var_idx))
    GROUP BY stay_idx, hour, var_idx
)
SELECT
    h.stay_idx,
    h.hour,
    h.var_idx,
    CASE
        WHEN h.agg = 'max' THEN h.largest
        WHEN h.needs_order THEN CASE h.agg
            WHEN 'mean' THEN list_avg(list_transform(o.events, lambda x: x.v))
            WHEN 'sum' THEN list_sum(list_transform(o.events, lambda x: x.v))
            WHEN 'last' THEN o.events[-1].v
        END
        ELSE h.total / h.n
    END AS value
FROM hours AS h
LEFT JOIN ordered AS o USING (stay_idx, hour, var_idx);
