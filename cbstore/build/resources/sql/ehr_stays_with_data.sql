-- Title: Stays with at least one EHR value in the window (cohort step 5)
-- Description: The stay_idx of every stay of ehr_events with a valid numeric event
--   (ehr_numeric_valid: finite, converted, in range) or a text event of a category group (every
--   such event sets the group's variables to 0 or 1). These are exactly the stays whose hourly
--   tensor (ehr_numeric.sql, ehr_text.sql) has an observed value: derived variables are
--   observed only where all their parts are. Read once over every partition's events, before
--   any partition is aggregated, so the store's rows are known in advance. Sorted.
SELECT stay_idx FROM ehr_numeric_valid
UNION
SELECT e.stay_idx
FROM ehr_events AS e
JOIN ehr_text_groups AS g ON g.itemid = e.itemid
WHERE e.text IS NOT NULL
ORDER BY stay_idx;
