-- Title: Work table of EHR events in the observation window
-- Description: Creates the temporary table of one partition's events, filled from the Parquet
--   files that the three ehr_events_* steps wrote: one row per raw event of an EHR variable's
--   item inside [intime, prediction_time) of a cohort stay, with its hour index. num holds
--   valuenum (numeric items), text the stripped value (text items). DuckDB keeps it in memory up
--   to memory_limit and spills the rest to the work folder.
CREATE OR REPLACE TEMP TABLE ehr_events (
    stay_idx INTEGER,
    hour INTEGER,
    charttime TIMESTAMP,
    itemid BIGINT,
    num DOUBLE,
    text VARCHAR
);
