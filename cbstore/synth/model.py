"""The latent generative model of the synthetic source: patients, admissions, ICU stays, outcomes.

Everything here is in memory and vectorised; the table writers (``ehr.py``, ``cxr.py``) turn the
:class:`Cohort` into MIMIC-shaped rows. Times are int64 seconds since 1970 on MIMIC's shifted
clock (years 2110-2200). See the package docstring for the model in words.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cbstore.build.phenotypes import Phenotypes

HOUR = 3600
DAY = 86400

#: Latent factors visible in the EHR time series (vitals, labs, rhythm, urine output).
EHR_FACTORS = ("severity", "renal", "infection", "glycemia", "electrolyte", "hypertension",
               "arrhythmia", "conduction", "neuro", "liver", "bleeding", "hypoxemia")
#: Latent factors visible only on chest X-ray films.
IMAGE_FACTORS = ("cardiomegaly", "opacity", "effusion")
#: Admission-level factors (shared by the stays of one admission); severity is per stay.
ADMISSION_FACTORS = tuple(f for f in EHR_FACTORS if f != "severity") + IMAGE_FACTORS

#: Phenotype logits by CCS number: (intercept, {factor: weight}). ``age`` is the standardised age
#: (a demographic, not an EHR input); ``electrolyte_abs`` is |electrolyte| - 0.8 (hypo- or
#: hypernatraemia both count). Groups not listed get an intercept of -2.5 and no factors.
PHENOTYPE_MODEL = {
    2: (-2.6, {"infection": 1.9, "severity": 0.8}),          # septicemia
    49: (-1.8, {"glycemia": 1.8}),                            # diabetes without complication
    50: (-2.7, {"glycemia": 1.6, "renal": 0.9}),              # diabetes with complications
    53: (-1.0, {"age": 0.5}),                                 # lipid disorders
    55: (-1.3, {"electrolyte_abs": 2.0}),                     # fluid and electrolyte disorders
    98: (-0.7, {"hypertension": 1.6}),                        # essential hypertension
    99: (-2.4, {"hypertension": 1.1, "renal": 0.8, "cardiomegaly": 1.2}),  # hypertension w/ compl.
    100: (-2.8, {"severity": 0.5}),                           # acute myocardial infarction
    101: (-1.2, {"age": 0.7}),                                # coronary atherosclerosis
    105: (-2.5, {"conduction": 2.4}),                         # conduction disorders
    106: (-1.3, {"arrhythmia": 2.2}),                         # cardiac dysrhythmias
    108: (-1.8, {"cardiomegaly": 2.6}),                       # congestive heart failure
    109: (-2.7, {"neuro": 2.4}),                              # acute cerebrovascular disease
    122: (-1.8, {"opacity": 2.6}),                            # pneumonia
    127: (-1.9, {}),                                          # COPD
    130: (-2.2, {"effusion": 2.6}),                           # pleurisy; pneumothorax; collapse
    131: (-2.0, {"hypoxemia": 1.5, "opacity": 1.4}),          # respiratory failure
    133: (-2.4, {"effusion": 0.8, "opacity": 0.7}),           # other lower respiratory disease
    134: (-2.9, {}),                                          # other upper respiratory disease
    151: (-2.5, {"liver": 2.4}),                              # other liver diseases
    153: (-2.5, {"bleeding": 2.4}),                           # gastrointestinal hemorrhage
    157: (-1.4, {"renal": 2.2}),                              # acute renal failure
    158: (-2.0, {"renal": 1.6}),                              # chronic kidney disease
    238: (-1.6, {}),                                          # complications of care
    249: (-2.9, {"severity": 1.8}),                           # shock
}

#: ICU mortality logit (per stay) and post-ICU in-hospital mortality logit (per admission).
ICU_DEATH_MODEL = (-3.2, {"severity": 1.2, "hypoxemia": 0.5, "opacity": 0.6, "effusion": 0.5,
                          "cardiomegaly": 0.5, "age": 0.3})
HOSP_DEATH_MODEL = (-4.2, {"severity": 0.9, "cardiomegaly": 0.3, "age": 0.4})

#: Recorded race values (admissions.race) and their shares.
RACES = (
    ("WHITE", 0.60), ("BLACK/AFRICAN AMERICAN", 0.11), ("BLACK/CAPE VERDEAN", 0.012),
    ("BLACK/CARIBBEAN ISLAND", 0.008), ("HISPANIC/LATINO - PUERTO RICAN", 0.02),
    ("HISPANIC OR LATINO", 0.015), ("HISPANIC/LATINO - DOMINICAN", 0.01), ("ASIAN", 0.02),
    ("ASIAN - CHINESE", 0.012), ("OTHER", 0.03), ("UNKNOWN", 0.06), ("UNABLE TO OBTAIN", 0.01),
    ("WHITE - OTHER EUROPEAN", 0.02), ("WHITE - RUSSIAN", 0.01), ("PATIENT DECLINED TO ANSWER", 0.006),
    ("AMERICAN INDIAN/ALASKA NATIVE", 0.004), ("MULTIPLE RACE/ETHNICITY", 0.003),
    ("NATIVE HAWAIIAN OR OTHER PACIFIC ISLANDER", 0.002), ("PORTUGUESE", 0.008),
    ("SOUTH AMERICAN", 0.004), ("WHITE - BRAZILIAN", 0.006),
)
#: The planted disparity: stays whose admission records a race starting with this prefix.
DISPARITY_RACE_PREFIX = "BLACK"
#: SpO2 (itemid 220277) of the disparity group reads this many points above the latent value.
DISPARITY_SPO2_SHIFT = 4.0

ANCHOR_YEAR_GROUPS = ("2008 - 2010", "2011 - 2013", "2014 - 2016", "2017 - 2019")
ADMISSION_TYPES = (
    ("EW EMER.", 0.44, "EMERGENCY ROOM"), ("URGENT", 0.14, "TRANSFER FROM HOSPITAL"),
    ("OBSERVATION ADMIT", 0.09, "EMERGENCY ROOM"), ("DIRECT EMER.", 0.05, "PHYSICIAN REFERRAL"),
    ("ELECTIVE", 0.08, "PHYSICIAN REFERRAL"), ("SURGICAL SAME DAY ADMISSION", 0.09, "PHYSICIAN REFERRAL"),
    ("EU OBSERVATION", 0.06, "EMERGENCY ROOM"), ("DIRECT OBSERVATION", 0.03, "CLINIC REFERRAL"),
    ("AMBULATORY OBSERVATION", 0.02, "PROCEDURE SITE"),
)
CAREUNITS = (
    ("Medical Intensive Care Unit (MICU)", 0.22), ("Surgical Intensive Care Unit (SICU)", 0.15),
    ("Cardiac Vascular Intensive Care Unit (CVICU)", 0.16), ("Medical/Surgical Intensive Care Unit (MICU/SICU)", 0.17),
    ("Coronary Care Unit (CCU)", 0.11), ("Trauma SICU (TSICU)", 0.12),
    ("Neuro Surgical Intensive Care Unit (Neuro SICU)", 0.04), ("Neuro Intermediate", 0.02), ("Neuro Stepdown", 0.01),
)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _choice(rng, table, n):
    names = [t[0] for t in table]
    p = np.array([t[1] for t in table], dtype=float)
    return np.array(names, dtype=object)[rng.choice(len(names), size=n, p=p / p.sum())]


def linear_logit(model, factors: dict) -> np.ndarray:
    """Evaluate ``intercept + sum(weight * factor)`` for a model of :data:`PHENOTYPE_MODEL` form."""
    intercept, weights = model
    n = len(next(iter(factors.values())))
    out = np.full(n, intercept, dtype=float)
    for name, w in weights.items():
        out += w * factors[name]
    return out


def phenotype_dependence(model) -> str:
    """Which modality carries a phenotype's signal: ``"ehr"``, ``"image"``, ``"both"`` or ``"none"``."""
    used = {f.replace("_abs", "") for f in model[1]}
    ehr, img = bool(used & set(EHR_FACTORS)), bool(used & set(IMAGE_FACTORS))
    return "both" if ehr and img else "ehr" if ehr else "image" if img else "none"


@dataclass
class Cohort:
    """The simulated world, one frame per entity (all times int64 seconds).

    Attributes
    ----------
    patients : DataFrame
        subject_id, gender, anchor_age, anchor_year, anchor_year_group, dod (seconds at midnight;
        -1 = none), frailty (latent).
    admissions : DataFrame
        subject_id, hadm_id, icu (bool), admittime, dischtime, deathtime (-1 = none),
        admission_type, admission_location, discharge_location, insurance, language,
        marital_status, race, edregtime, edouttime (-1 = none), hospital_expire_flag,
        icd_version, disparity (bool), the :data:`ADMISSION_FACTORS`, and one 0/1 column
        ``ph<k>`` per phenotype.
    stays : DataFrame
        subject_id, hadm_id, stay_id, first_careunit, last_careunit, intime, outtime, los_days,
        admittime, dischtime, deathtime, icd_version, gender, race, anchor_age, anchor_year, age,
        age_z, minor, icu_death (death within [intime, outtime]), hosp_death (in-hospital death),
        disparity, severity, frailty, the :data:`ADMISSION_FACTORS` and the ``ph<k>`` labels of the
        stay's admission.
    """

    patients: pd.DataFrame
    admissions: pd.DataFrame
    stays: pd.DataFrame
    phenotype_ids: list


def _unique_ids(rng, low, high, n):
    ids = rng.choice(high - low, size=n, replace=False).astype(np.int64) + low
    return ids


def simulate_cohort(n_stays: int, rng: np.random.Generator, phenotypes: Phenotypes) -> Cohort:
    """Simulate exactly ``n_stays`` ICU stays with their patients and admissions.

    Parameters
    ----------
    n_stays : int
        Number of ICU stays (>= 1).
    rng : numpy.random.Generator
    phenotypes : Phenotypes
        Definitions whose CCS ids select the phenotype logits of :data:`PHENOTYPE_MODEL`.
    """
    n_pool = int(n_stays)  # every patient has >= 1 stay, so this many patients always suffice
    # ---- patients
    gender = np.where(rng.random(n_pool) < 0.56, "M", "F")
    minor = rng.random(n_pool) < 0.02
    adult_age = np.clip(np.round(rng.normal(64.0, 16.0, n_pool)), 18, 95)
    anchor_age = np.where(minor, rng.integers(14, 18, n_pool), np.minimum(adult_age, 91)).astype(np.int64)
    anchor_year = rng.integers(2110, 2186, n_pool)
    group_idx = rng.integers(0, len(ANCHOR_YEAR_GROUPS), n_pool)
    # real calendar year of the anchor year (inside its group): decides ICD-9 vs ICD-10
    real_anchor = 2008 + 3 * group_idx + rng.random(n_pool) * 3.0
    frailty = rng.normal(size=n_pool)
    pat_race = _choice(rng, RACES, n_pool)

    # ---- admissions (optional leading hospital-only admission, then ICU admissions)
    n_icu_adm = np.minimum(rng.geometric(0.62, n_pool), 5)
    lead = rng.random(n_pool) < 0.15
    n_adm = n_icu_adm + lead
    a_pat = np.repeat(np.arange(n_pool), n_adm)
    a_first = np.repeat(np.cumsum(n_adm) - n_adm, n_adm)
    a_rank = np.arange(len(a_pat)) - a_first
    a_icu = ~(lead[a_pat] & (a_rank == 0))
    n_a = len(a_pat)
    n_st = np.where(a_icu, 1 + (rng.random(n_a) < 0.10), 0)

    lat = {f: rng.normal(size=n_a) for f in ADMISSION_FACTORS}
    lat["cardiomegaly"] = 0.8 * lat["cardiomegaly"] + 0.35 * (anchor_age[a_pat] - 64) / 16.0
    age_z_adm = (anchor_age[a_pat] - 64) / 16.0

    # ---- stays
    s_adm = np.repeat(np.arange(n_a), n_st)
    s_pat = a_pat[s_adm]
    n_s = len(s_adm)
    sev = (0.45 * frailty[s_pat] + 0.25 * lat["infection"][s_adm] + 0.2 * lat["renal"][s_adm]
           + 0.2 * lat["hypoxemia"][s_adm] + 0.75 * rng.normal(size=n_s))
    factors_s = {f: lat[f][s_adm] for f in ADMISSION_FACTORS}
    factors_s["severity"] = sev
    factors_s["age"] = age_z_adm[s_adm]
    los_days = np.exp(np.log(2.5) + 0.35 * sev + 0.15 * lat["infection"][s_adm] + 0.6 * rng.normal(size=n_s))
    los_days = np.clip(los_days, 0.12, 60.0)
    icu_death = rng.random(n_s) < sigmoid(linear_logit(ICU_DEATH_MODEL, factors_s))
    adm_sev = np.bincount(s_adm, sev, minlength=n_a) / np.maximum(n_st, 1)
    factors_a = {f: lat[f] for f in ADMISSION_FACTORS}
    factors_a.update(severity=adm_sev, age=age_z_adm)
    hosp_death_a = a_icu & (rng.random(n_a) < sigmoid(linear_logit(HOSP_DEATH_MODEL, factors_a)))

    # terminal event per stay: ICU death, or post-ICU hospital death after the admission's last stay
    s_first = np.repeat(np.cumsum(n_st) - n_st, n_st)
    s_rank = np.arange(n_s) - s_first
    last_in_adm = s_rank == n_st[s_adm] - 1
    event = icu_death | (hosp_death_a[s_adm] & last_in_adm)
    before = pd.Series(event.astype(int)).groupby(s_pat).cumsum().to_numpy() - event
    keep = before == 0
    # patients in order until n_stays stays are kept; the last one is trimmed (and then survives)
    kept_per_pat = np.bincount(s_pat[keep], minlength=n_pool)
    cum = np.cumsum(kept_per_pat)
    last_pat = int(np.searchsorted(cum, n_stays))
    excess = int(cum[last_pat] - n_stays)
    keep &= s_pat <= last_pat
    if excess:
        trim_idx = np.flatnonzero(keep & (s_pat == last_pat))[-excess:]
        keep[trim_idx] = False
        event[s_pat == last_pat] = False
        icu_death[s_pat == last_pat] = False
        hosp_death_a[a_pat == last_pat] = False
    # admissions kept: hospital-only ones before a kept ICU admission, ICU ones with kept stays
    a_kept_stays = np.bincount(s_adm[keep], minlength=n_a)
    a_keep = np.where(a_icu, a_kept_stays > 0, True) & (a_pat <= last_pat)
    # drop hospital-only admissions of patients whose ICU admissions are all gone (cannot happen, safe)
    # an ICU admission whose terminal event is an ICU death has no post-ICU hospital death
    died_in_icu_adm = np.zeros(n_a, bool)
    died_in_icu_adm[s_adm[keep & icu_death]] = True
    hosp_death_a &= ~died_in_icu_adm
    # a hospital death only counts if the admission's original last stay was kept
    hosp_death_a &= np.bincount(s_adm[keep & last_in_adm], minlength=n_a) > 0

    s_idx = np.flatnonzero(keep)
    a_idx = np.flatnonzero(a_keep)
    p_idx = np.arange(last_pat + 1)
    assert len(s_idx) == n_stays, (len(s_idx), n_stays)

    # ---- timeline (after truncation, per patient in order)
    s_adm_k, s_pat_k = s_adm[s_idx], s_pat[s_idx]
    los_s = np.round(los_days[s_idx] * DAY).astype(np.int64)
    los_s = np.maximum(los_s, 2 * HOUR)
    icu_death_k = icu_death[s_idx]
    # within-admission offsets: ED/ward time before the first stay, gaps between stays
    pre_icu = np.round(rng.uniform(0.3, 30.0, n_a) * HOUR).astype(np.int64)
    gap = np.round(rng.uniform(12.0, 120.0, n_s) * HOUR).astype(np.int64)[s_idx]
    rank_k = pd.Series(np.ones(len(s_idx), int)).groupby(s_adm_k).cumsum().to_numpy() - 1
    gap = np.where(rank_k == 0, 0, gap)
    step = gap + los_s
    end_rel = pd.Series(step).groupby(s_adm_k).cumsum().to_numpy()
    intime_rel = pre_icu[s_adm_k] + end_rel - los_s  # relative to admittime
    outtime_rel = intime_rel + los_s
    # admission lengths
    icu_span = np.zeros(n_a, np.int64)
    np.maximum.at(icu_span, s_adm_k, outtime_rel)
    post = np.round(rng.uniform(0.25, 12.0, n_a) * DAY).astype(np.int64)
    hosp_only_len = np.round(rng.uniform(1.0, 9.0, n_a) * DAY).astype(np.int64)
    adm_len = np.where(a_icu, icu_span + post, hosp_only_len)
    # hospital death after the ICU: between last outtime and the planned discharge
    hosp_death_k = hosp_death_a & a_keep
    death_after = np.round(rng.uniform(0.25, 0.9, n_a) * post).astype(np.int64)
    adm_len = np.where(hosp_death_k, icu_span + np.maximum(death_after, 3 * HOUR), adm_len)
    # ICU death: discharge = death shortly before the recorded ICU outtime
    death_gap = np.round(rng.uniform(0, 45 * 60, n_s)).astype(np.int64)[s_idx]
    icu_death_time_rel = np.maximum(outtime_rel - death_gap, intime_rel + 60)
    adm_icu_death = np.zeros(n_a, bool)
    adm_icu_death[s_adm_k[icu_death_k]] = True
    adm_death_rel = np.full(n_a, -1, np.int64)
    adm_death_rel[s_adm_k[icu_death_k]] = icu_death_time_rel[icu_death_k]
    adm_len = np.where(adm_icu_death, adm_death_rel, adm_len)
    adm_death_rel = np.where(hosp_death_k, adm_len, adm_death_rel)

    a_pat_k = a_pat[a_idx]
    year0 = (pd.to_datetime(pd.Series(anchor_year.astype(str)), format="%Y").to_numpy()
             .astype("datetime64[s]").astype(np.int64))
    start = year0 + np.round(rng.uniform(0, 2.5, n_pool) * 365 * DAY).astype(np.int64)
    between = np.round((20 + rng.exponential(300, n_a)) * DAY).astype(np.int64)
    adm_step = adm_len[a_idx] + between[a_idx]
    cum_steps = pd.Series(adm_step).groupby(a_pat_k).cumsum().to_numpy() - adm_step
    admittime_k = start[a_pat_k] + cum_steps
    admittime = np.zeros(n_a, np.int64)
    admittime[a_idx] = admittime_k
    # keep admission times on whole minutes, like the ED/registration clock
    admittime = admittime // 60 * 60
    dischtime = admittime + adm_len
    deathtime = np.where(adm_death_rel >= 0, admittime + adm_death_rel, -1)
    intime = admittime[s_adm_k] + intime_rel
    outtime = admittime[s_adm_k] + outtime_rel

    # ICD version by real calendar date (ICD-10 from October 2015)
    years_after_anchor = (admittime - year0[a_pat]) / (365.2425 * DAY)
    real_year = real_anchor[a_pat] + years_after_anchor
    icd_version = np.where(real_year >= 2015.75, 10, 9)

    # ---- admission attributes
    atype_i = rng.choice(len(ADMISSION_TYPES), size=n_a, p=np.array([t[1] for t in ADMISSION_TYPES]))
    admission_type = np.array([t[0] for t in ADMISSION_TYPES], dtype=object)[atype_i]
    admission_location = np.array([t[2] for t in ADMISSION_TYPES], dtype=object)[atype_i]
    odd_loc = rng.random(n_a) < 0.05
    admission_location = np.where(odd_loc, "INFORMATION NOT AVAILABLE", admission_location)
    race = pat_race[a_pat].copy()
    race = np.where(rng.random(n_a) < 0.04, "UNKNOWN", race)
    age_at_adm = anchor_age[a_pat] + np.floor(years_after_anchor).astype(int)
    insurance = np.where(age_at_adm >= 65, np.where(rng.random(n_a) < 0.85, "Medicare", "Other"),
                         np.where(rng.random(n_a) < 0.3, "Medicaid", "Other"))
    language = np.where(rng.random(n_a) < 0.9, "ENGLISH", "?")
    marital = np.array(["MARRIED", "SINGLE", "WIDOWED", "DIVORCED", ""], dtype=object)[
        rng.choice(5, size=n_a, p=[0.45, 0.3, 0.12, 0.08, 0.05])]
    discharge_location = np.array(["HOME", "HOME HEALTH CARE", "SKILLED NURSING FACILITY", "REHAB",
                                   "CHRONIC/LONG TERM ACUTE CARE", "HOSPICE", "AGAINST ADVICE", ""],
                                  dtype=object)[rng.choice(8, size=n_a, p=[.3, .25, .2, .08, .05, .03, .01, .08])]
    died = deathtime >= 0
    discharge_location = np.where(died, "DIED", discharge_location)
    ed = np.isin(admission_location, ["EMERGENCY ROOM"])
    edregtime = np.where(ed, admittime - np.round(rng.uniform(1.5, 14, n_a) * HOUR).astype(np.int64), -1)
    edouttime = np.where(ed, admittime + np.round(rng.uniform(0, 50, n_a) * 60).astype(np.int64), -1)
    disparity_a = np.array([str(r).startswith(DISPARITY_RACE_PREFIX) for r in race])

    # ---- phenotype labels per admission
    ph_cols = {}
    fa = dict(factors_a)
    fa["electrolyte_abs"] = np.abs(lat["electrolyte"]) - 0.8
    for k, ccs in enumerate(phenotypes.ids):
        model = PHENOTYPE_MODEL.get(ccs, (-2.5, {}))
        ph_cols[f"ph{k}"] = (rng.random(n_a) < sigmoid(linear_logit(model, fa))).astype(np.int8)

    # ---- dod: in-hospital deaths, and some deaths within a year after the last discharge
    dod = np.full(n_pool, -1, np.int64)
    adm_frame = pd.DataFrame({"pat": a_pat[a_idx], "deathtime": deathtime[a_idx], "disch": dischtime[a_idx]})
    last_disch = adm_frame.groupby("pat")["disch"].max()
    death_row = adm_frame[adm_frame["deathtime"] >= 0].groupby("pat")["deathtime"].max()
    later = last_disch.to_numpy() + np.round(rng.uniform(5, 365, len(last_disch)) * DAY).astype(np.int64)
    dod[last_disch.index] = np.where(rng.random(len(last_disch)) < 0.12, later, -1)
    dod[death_row.index] = death_row.to_numpy()
    dod = np.where(dod >= 0, dod // DAY * DAY, -1)

    # ---- ids
    subject_id = _unique_ids(rng, 10_000_000, 20_000_000, n_pool)
    hadm_id = _unique_ids(rng, 20_000_000, 30_000_000, n_a)
    stay_id = _unique_ids(rng, 30_000_000, 40_000_000, n_s)

    patients = pd.DataFrame({
        "subject_id": subject_id[p_idx], "gender": gender[p_idx], "anchor_age": anchor_age[p_idx],
        "anchor_year": anchor_year[p_idx],
        "anchor_year_group": np.array(ANCHOR_YEAR_GROUPS, dtype=object)[group_idx[p_idx]],
        "dod": dod[p_idx], "frailty": frailty[p_idx],
    })
    admissions = pd.DataFrame({
        "subject_id": subject_id[a_pat[a_idx]], "hadm_id": hadm_id[a_idx], "icu": a_icu[a_idx],
        "admittime": admittime[a_idx], "dischtime": dischtime[a_idx], "deathtime": deathtime[a_idx],
        "admission_type": admission_type[a_idx], "admission_location": admission_location[a_idx],
        "discharge_location": discharge_location[a_idx], "insurance": insurance[a_idx],
        "language": language[a_idx], "marital_status": marital[a_idx], "race": race[a_idx],
        "edregtime": edregtime[a_idx], "edouttime": edouttime[a_idx],
        "hospital_expire_flag": died[a_idx].astype(np.int64), "icd_version": icd_version[a_idx],
        "disparity": disparity_a[a_idx],
        **{f: lat[f][a_idx] for f in ADMISSION_FACTORS},
        **{k: v[a_idx] for k, v in ph_cols.items()},
    })
    careunit = _choice(rng, CAREUNITS, n_s)
    last_unit = np.where(rng.random(n_s) < 0.1, _choice(rng, CAREUNITS, n_s), careunit)
    st = pd.DataFrame({
        "subject_id": subject_id[s_pat_k], "hadm_id": hadm_id[s_adm_k], "stay_id": stay_id[s_idx],
        "first_careunit": careunit[s_idx], "last_careunit": last_unit[s_idx],
        "intime": intime, "outtime": outtime, "los_days": (outtime - intime) / DAY,
        "icu_death": icu_death_k, "hosp_death": died[s_adm_k],
        "disparity": disparity_a[s_adm_k], "race": race[s_adm_k], "gender": gender[s_pat_k],
        "anchor_age": anchor_age[s_pat_k], "anchor_year": anchor_year[s_pat_k],
        "icd_version": icd_version[s_adm_k], "admittime": admittime[s_adm_k],
        "dischtime": dischtime[s_adm_k], "deathtime": deathtime[s_adm_k],
        "severity": sev[s_idx], "frailty": frailty[s_pat_k],
        **{f: lat[f][s_adm_k] for f in ADMISSION_FACTORS},
        **{k: v[s_adm_k] for k, v in ph_cols.items()},
    })
    in_year = pd.to_datetime(st["intime"].to_numpy().astype("datetime64[s]")).year.to_numpy()
    st["age"] = (st["anchor_age"] + in_year - st["anchor_year"]).astype(float)
    st["age_z"] = (st["age"] - 64) / 16.0
    st["minor"] = st["age"] < 18
    # ICU death is exactly "death between intime and outtime"
    dt = st["deathtime"].to_numpy()
    st["icu_death"] = (dt >= 0) & (dt >= st["intime"].to_numpy()) & (dt <= st["outtime"].to_numpy())
    return Cohort(patients=patients, admissions=admissions, stays=st, phenotype_ids=list(phenotypes.ids))
