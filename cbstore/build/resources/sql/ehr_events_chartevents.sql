-- Title: EHR events from icu/chartevents
-- Description: Events of the variables' chartevents items for the cohort stays (joined on
--   stay_id) with charttime in [intime, prediction_time). Hour = floor((charttime - intime) / 1 h),
--   computed in microseconds so it is exact. Numeric items keep valuenum; text items keep the
--   value with surrounding spaces stripped (MIMIC pads some values, e.g. "On "). Rows with
--   neither are dropped. Needs ehr_cohort(stay_idx, stay_id, subject_id, intime, prediction_time)
--   and ehr_items(var_idx, itemid, source, is_text). A SELECT with the columns of ehr_events
--   (ehr_events_create.sql): cbstore/ehr.py (write_events) writes the UNION ALL of the
--   ehr_events_* steps of the sources in use to Parquet in one COPY statement, so each table is
--   read once.
SELECT
    s.stay_idx,
    (epoch_us(e.charttime) - epoch_us(s.intime)) // 3600000000 AS hour,
    e.charttime,
    e.itemid,
    CASE WHEN NOT t.is_text THEN e.valuenum END AS num,
    CASE WHEN t.is_text THEN nullif(trim(e.value), '') END AS text
FROM mimiciv_icu.chartevents AS e
JOIN ehr_cohort AS s
    ON s.stay_id = e.stay_id
JOIN (SELECT itemid, bool_or(is_text) AS is_text
      FROM ehr_items WHERE source = 'chartevents' GROUP BY itemid) AS t
    ON t.itemid = e.itemid
WHERE e.charttime >= s.intime
  AND e.charttime < s.prediction_time
  AND (CASE WHEN t.is_text THEN nullif(trim(e.value), '') IS NOT NULL ELSE e.valuenum IS NOT NULL END)
