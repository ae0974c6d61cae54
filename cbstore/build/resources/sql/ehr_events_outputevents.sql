-- Title: EHR events from icu/outputevents
-- Description: Output events (e.g. urine) of the variables' outputevents items for the cohort
--   stays (joined on stay_id) with charttime in [intime, prediction_time); value is numeric in
--   this table. Needs ehr_cohort and ehr_items (see ehr_events_chartevents.sql).
SELECT
    s.stay_idx,
    (epoch_us(e.charttime) - epoch_us(s.intime)) // 3600000000 AS hour,
    e.charttime,
    e.itemid,
    e.value AS num,
    NULL AS text
FROM mimiciv_icu.outputevents AS e
JOIN ehr_cohort AS s
    ON s.stay_id = e.stay_id
WHERE e.itemid IN (SELECT itemid FROM ehr_items WHERE source = 'outputevents' AND NOT is_text)
  AND e.charttime >= s.intime
  AND e.charttime < s.prediction_time
  AND e.value IS NOT NULL
