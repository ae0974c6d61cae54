-- Title: EHR events from hosp/labevents
-- Description: Laboratory events of the variables' labevents items. labevents has no stay_id
--   and its hadm_id is often empty, so events are attributed to a stay by subject_id and
--   charttime in [intime, prediction_time) only. Only rows with a numeric valuenum are kept.
--   Needs ehr_cohort and ehr_items (see ehr_events_chartevents.sql).
SELECT
    s.stay_idx,
    (epoch_us(e.charttime) - epoch_us(s.intime)) // 3600000000 AS hour,
    e.charttime,
    e.itemid,
    e.valuenum AS num,
    NULL AS text
FROM mimiciv_hosp.labevents AS e
JOIN ehr_cohort AS s
    ON s.subject_id = e.subject_id
WHERE e.itemid IN (SELECT itemid FROM ehr_items WHERE source = 'labevents' AND NOT is_text)
  AND e.charttime >= s.intime
  AND e.charttime < s.prediction_time
  AND e.valuenum IS NOT NULL
