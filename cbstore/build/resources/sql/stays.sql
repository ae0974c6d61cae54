-- Title: ICU stays with their hospital admission and patient
-- Description: One row per row of icu/icustays (no filtering), left-joined to the hospital
--   admission it names (same hadm_id AND same subject_id) and to the patient. The flags
--   has_admission / has_patient and the age at ICU admission
--   (anchor_age + year(intime) - anchor_year) feed the cohort steps in cbstore/cohort.py.
--   Reads hosp/admissions, hosp/patients, icu/icustays.
SELECT
    i.stay_id,
    i.subject_id,
    i.hadm_id,
    i.first_careunit,
    i.intime,
    i.outtime,
    i.los,
    a.hadm_id IS NOT NULL AS has_admission,
    p.subject_id IS NOT NULL AS has_patient,
    a.admittime,
    a.dischtime,
    a.deathtime,
    a.hospital_expire_flag,
    a.admission_type,
    a.insurance,
    a.language,
    a.marital_status,
    a.race,
    p.gender,
    p.dod,
    p.anchor_age + (year(i.intime) - p.anchor_year) AS age
FROM mimiciv_icu.icustays AS i
LEFT JOIN mimiciv_hosp.admissions AS a
    ON a.hadm_id = i.hadm_id AND a.subject_id = i.subject_id
LEFT JOIN mimiciv_hosp.patients AS p
    ON p.subject_id = i.subject_id
ORDER BY i.stay_id, a.admittime, p.anchor_year;
