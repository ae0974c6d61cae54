-- Title: Phenotype matches of each cohort stay
-- Description: Distinct (stay_idx, phenotype_idx) pairs where a diagnosis of the stay's hospital
--   admission (hosp/diagnoses_icd, any seq_num) matches a phenotype code. Codes are compared
--   after trimming spaces, removing dots and upper-casing, together with icd_version, because
--   some codes exist in both ICD-9 and ICD-10. Needs the registered tables
--   label_cohort(stay_idx, hadm_id) and phenotype_codes(phenotype_idx, icd_code, icd_version).
SELECT DISTINCT
    s.stay_idx,
    c.phenotype_idx
FROM label_cohort AS s
JOIN mimiciv_hosp.diagnoses_icd AS d
    ON d.hadm_id = s.hadm_id
JOIN phenotype_codes AS c
    ON c.icd_version = d.icd_version
   AND c.icd_code = upper(replace(trim(d.icd_code), '.', ''))
ORDER BY s.stay_idx, c.phenotype_idx;
