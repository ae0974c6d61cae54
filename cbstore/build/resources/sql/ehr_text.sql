-- Title: Hourly values of the binary EHR variables read from text items
-- Description: From ehr_events: exact duplicate events are dropped. Each text event of a
--   category group (binary variables sharing an item) gets one category: the first variable,
--   in variables-file order, one of whose prefixes starts the value (case-insensitive), else the
--   group's catch-all ("*") variable, else none. Every variable of the group then sees 1 if it is
--   the event's category and 0 otherwise, aggregated per (stay, hour, variable) with the
--   variable's agg (last: the latest event, ties broken by the text; max: any event).
--   As in ehr_numeric.sql, the hour's events are sorted as (charttime, text, value) structs
--   instead of ordered aggregates, so results do not depend on threads; rows come out unordered.
--   Parameters $first and $last: the stay_idx range aggregated (as in ehr_numeric.sql).
--   Needs ehr_items, ehr_vars, ehr_text_groups(group_id, itemid),
--   ehr_text_vars(group_id, var_idx) and ehr_text_prefixes(group_id, var_idx, prefix).
WITH events AS (
    SELECT DISTINCT e.stay_idx, e.hour, e.charttime, e.itemid, e.text, g.group_id
    FROM ehr_events AS e
    JOIN ehr_text_groups AS g ON g.itemid = e.itemid
    WHERE e.text IS NOT NULL
      AND e.stay_idx BETWEEN $first AND $last
),
categorised AS (
    SELECT
        e.stay_idx, e.hour, e.charttime, e.itemid, e.text, e.group_id,
        coalesce(
            min(p.var_idx) FILTER (WHERE p.prefix <> '*' AND starts_with(lower(e.text), lower(p.prefix))),
            min(p.var_idx) FILTER (WHERE p.prefix = '*')
        ) AS category
    FROM events AS e
    JOIN ehr_text_prefixes AS p ON p.group_id = e.group_id
    GROUP BY e.stay_idx, e.hour, e.charttime, e.itemid, e.text, e.group_id
),
indicators AS (
    SELECT
        c.stay_idx, c.hour, c.charttime, c.text, v.var_idx, x.agg,
        CASE WHEN c.category = v.var_idx THEN 1.0 ELSE 0.0 END AS value
    FROM categorised AS c
    JOIN ehr_text_vars AS v ON v.group_id = c.group_id
    JOIN ehr_vars AS x ON x.var_idx = v.var_idx
),
grouped AS (
    SELECT stay_idx, hour, var_idx, agg,
           list_sort(list({'t': charttime, 'x': text, 'v': value})) AS ordered
    FROM indicators
    GROUP BY stay_idx, hour, var_idx, agg
)
SELECT
    stay_idx,
    hour,
    var_idx,
    CASE agg
        WHEN 'last' THEN ordered[-1].v
        WHEN 'max' THEN list_max(list_transform(ordered, lambda e: e.v))
        WHEN 'mean' THEN list_avg(list_transform(ordered, lambda e: e.v))
        WHEN 'sum' THEN list_sum(list_transform(ordered, lambda e: e.v))
    END AS value
FROM grouped;
