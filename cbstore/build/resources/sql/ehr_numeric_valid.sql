-- Title: Valid numeric EHR events (a view)
-- Description: Creates the view ehr_numeric_valid over the relation ehr_events (a temporary
--   table of one partition's events, or a view over every partition): each numeric event is
--   mapped to its variable(s), converted to the canonical unit (value * scale + offset, only
--   where the raw value is below `below` if that is set), and kept only if the value is finite
--   and inside the variable's range. Exact duplicate events are NOT dropped here (ehr_numeric.sql
--   does it; ehr_stays_with_data.sql does not need it). DuckDB binds a view when it is created,
--   so cbstore/ehr.py runs this file again whenever ehr_events is replaced. Needs ehr_items(var_idx, itemid, source, is_text),
--   ehr_vars(var_idx, agg, low, high) and ehr_convert(var_idx, itemid, below, scale, "offset").
CREATE OR REPLACE TEMP VIEW ehr_numeric_valid AS
WITH mapped AS (
    SELECT e.stay_idx, e.hour, e.charttime, e.itemid, e.num, i.var_idx
    FROM ehr_events AS e
    JOIN (SELECT DISTINCT var_idx, itemid FROM ehr_items WHERE NOT is_text) AS i ON i.itemid = e.itemid
    WHERE e.num IS NOT NULL AND isfinite(e.num)
),
converted AS (
    SELECT
        m.stay_idx, m.hour, m.charttime, m.itemid, m.num, m.var_idx,
        CASE WHEN c.itemid IS NOT NULL AND (c.below IS NULL OR m.num < c.below)
             THEN m.num * c.scale + c."offset" ELSE m.num END AS value
    FROM mapped AS m
    LEFT JOIN ehr_convert AS c ON c.var_idx = m.var_idx AND c.itemid = m.itemid
)
SELECT x.*, v.agg
FROM converted AS x
JOIN ehr_vars AS v ON v.var_idx = x.var_idx
WHERE (v.low IS NULL OR x.value >= v.low)
  AND (v.high IS NULL OR x.value <= v.high);
