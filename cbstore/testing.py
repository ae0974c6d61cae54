"""Random but valid store content for tests: ``random_content(...)`` -> :class:`StoreContent`.

The content is deterministic for a seed, satisfies every check of ``cbstore validate`` (patient-level
splits, CXR metadata consistent with ``present``, training statistics per fold) and looks roughly
like MIMIC (ids, times on MIMIC's shifted clock, ~30 % of stays with a film).
"""

from __future__ import annotations

import hashlib
from importlib import resources

import numpy as np
import pandas as pd
import yaml

from cbstore.format.content import TEST, TRAIN, VAL, StoreContent
from cbstore.format.schema import LOS_CLASS_EDGES, canonical_json, config_sha256
from cbstore.format.stats import fold_stats

#: The 25 acute and chronic phenotypes of the MIMIC benchmark (Harutyunyan et al. 2019).
PHENOTYPE_NAMES = (
    "Acute and unspecified renal failure", "Acute cerebrovascular disease",
    "Acute myocardial infarction", "Cardiac dysrhythmias", "Chronic kidney disease",
    "Chronic obstructive pulmonary disease and bronchiectasis",
    "Complications of surgical procedures or medical care", "Conduction disorders",
    "Congestive heart failure; nonhypertensive", "Coronary atherosclerosis and other heart disease",
    "Diabetes mellitus with complications", "Diabetes mellitus without complication",
    "Disorders of lipid metabolism", "Essential hypertension", "Fluid and electrolyte disorders",
    "Gastrointestinal hemorrhage", "Hypertension with complications and secondary hypertension",
    "Other liver diseases", "Other lower respiratory disease", "Other upper respiratory disease",
    "Pleurisy; pneumothorax; pulmonary collapse", "Pneumonia (except that caused by tuberculosis)",
    "Respiratory failure; insufficiency; arrest (adult)", "Septicemia (except in labor)", "Shock",
)


def los_class(los_days: np.ndarray) -> np.ndarray:
    """LoS class codes 0..6 for [2,3) [3,4) [4,5) [5,6) [6,7) [7,14) [14,inf) days; -1 below 2 days."""
    return (np.searchsorted(np.asarray(LOS_CLASS_EDGES), np.asarray(los_days), side="right") - 1).astype(np.int8)


def _variables(n_features: int) -> tuple[pd.DataFrame, list, str]:
    raw = resources.files("cbstore.build").joinpath("resources/variables.yaml").read_bytes()
    entries = yaml.safe_load(raw)["variables"]
    if not 1 <= n_features <= len(entries):
        raise ValueError(f"n_features must be 1..{len(entries)}, got {n_features}")
    chosen = entries[:n_features]
    features = pd.DataFrame({
        "name": [e["name"] for e in chosen],
        "unit": [str(e.get("unit", "")) for e in chosen],
        "kind": [e.get("kind", "continuous") for e in chosen],
        "normalize": [e.get("kind", "continuous") != "binary" for e in chosen],
    })
    return features, chosen, hashlib.sha256(raw).hexdigest()


def _splits(rng: np.random.Generator, subjects: np.ndarray, n_folds: int) -> np.ndarray:
    """Patient-level splits: fold k tests on patient group k, validates on half of group k+1."""
    patients = rng.permutation(np.unique(subjects))
    out = np.full((len(subjects), n_folds), TRAIN, dtype=np.uint8)
    if n_folds == 1:
        n_p = len(patients)
        test, val = patients[: max(1, n_p * 15 // 100)], patients[max(1, n_p * 15 // 100): max(2, n_p * 30 // 100)]
        out[np.isin(subjects, test), 0] = TEST
        out[np.isin(subjects, val), 0] = VAL
        return out
    groups = np.array_split(patients, n_folds)
    for k in range(n_folds):
        nxt = groups[(k + 1) % n_folds]
        out[np.isin(subjects, nxt[: max(1, len(nxt) // 2)]), k] = VAL
        out[np.isin(subjects, groups[k]), k] = TEST
    return out


def random_content(
    n_stays: int = 40,
    n_folds: int = 5,
    window: int = 48,
    n_features: int = 6,
    image_size: int = 32,
    seed: int = 0,
) -> StoreContent:
    """Make random, valid :class:`StoreContent` for tests.

    Parameters
    ----------
    n_stays : int
        Number of ICU stays (about 0.75 patients per stay).
    n_folds : int
        Number of split folds (patient-disjoint parts in each).
    window : int
        Observation window in hours (length of the EHR time axis).
    n_features : int
        Number of EHR variables, the first ones of ``resources/variables.yaml`` (the first is binary).
    image_size : int
        Side of the square uint8 films.
    seed : int
        Seed; the same arguments give identical content.

    Returns
    -------
    StoreContent
        With images set; ``cbstore.store.writer.write_store`` writes it as a valid store.
    """
    if n_stays < 4:
        raise ValueError("n_stays must be >= 4")
    rng = np.random.default_rng(seed)
    n = n_stays
    stay_ids = np.sort(rng.choice(np.arange(30_000_000, 40_000_000), size=n, replace=False)).astype(np.int64)
    n_patients = max(2, round(n * 0.75))
    patient_ids = np.sort(rng.choice(np.arange(10_000_000, 20_000_000), size=n_patients, replace=False))
    subjects = patient_ids[np.r_[np.arange(n_patients), rng.integers(0, n_patients, n - n_patients)]]
    subjects = rng.permutation(subjects).astype(np.int64)
    hadm_ids = (20_000_000 + rng.choice(10_000_000, size=n, replace=False)).astype(np.int64)

    minute = 60
    base = pd.Timestamp("2110-01-01").value // 1_000_000_000
    intime = base + rng.integers(0, 70 * 365 * 24 * 60, n) * minute
    los_h = window + np.round(rng.lognormal(3.5, 0.9, n)).astype(np.int64)  # every stay covers the window
    outtime = intime + los_h * 3600 + rng.integers(0, 60, n) * minute
    admittime = intime - rng.integers(0, 3 * 24 * 60, n) * minute
    dischtime = outtime + rng.integers(0, 5 * 24 * 60, n) * minute
    prediction_time = intime + window * 3600
    los = ((outtime - intime) / 86400.0).astype(np.float32)
    age = np.round(rng.uniform(18, 91, n), 1).astype(np.float32)
    age_group = np.select([age < 40, age < 60, age < 80], ["18-40", "40-60", "60-80"], "80+")
    race = rng.choice(["WHITE", "BLACK", "HISPANIC", "ASIAN", "OTHER"], n, p=[0.6, 0.15, 0.1, 0.05, 0.1])
    race_raw = np.array([{"WHITE": "WHITE", "BLACK": "BLACK/AFRICAN AMERICAN", "HISPANIC": "HISPANIC/LATINO - PUERTO RICAN",
                          "ASIAN": "ASIAN - CHINESE", "OTHER": "UNKNOWN"}[r] for r in race], dtype=object)
    dt = lambda s: pd.to_datetime(s, unit="s")  # noqa: E731
    stays = pd.DataFrame(
        {
            "subject_id": subjects, "hadm_id": hadm_ids,
            "intime": dt(intime), "outtime": dt(outtime), "prediction_time": dt(prediction_time),
            "admittime": dt(admittime), "dischtime": dt(dischtime),
            "age": age, "age_group": age_group, "gender": rng.choice(["M", "F"], n),
            "race": race, "race_raw": race_raw,
            "insurance": rng.choice(["Medicare", "Medicaid", "Other"], n),
            "admission_type": rng.choice(["EW EMER.", "URGENT", "ELECTIVE", "OBSERVATION ADMIT"], n),
            "marital_status": rng.choice(["MARRIED", "SINGLE", "WIDOWED", ""], n),
            "language": rng.choice(["ENGLISH", "?"], n, p=[0.9, 0.1]),
            "first_careunit": rng.choice(["Medical Intensive Care Unit (MICU)", "Surgical Intensive Care Unit (SICU)",
                                          "Cardiac Vascular Intensive Care Unit (CVICU)"], n),
        },
        index=pd.Index(stay_ids, name="stay_id"),
    )

    mortality = (rng.random(n) < 0.1).astype(np.int8)
    mortality_hosp = np.maximum(mortality, (rng.random(n) < 0.05).astype(np.int8)).astype(np.int8)
    labels = {
        "mortality": mortality,
        "mortality_hosp": mortality_hosp,
        "phenotype_labels": (rng.random((n, len(PHENOTYPE_NAMES))) < 0.2).astype(np.int8),
        "los": los,
        "los_class": los_class(los),
    }

    features, chosen, variables_sha = _variables(n_features)
    values = np.full((n, window, n_features), np.nan, dtype=np.float32)
    for f, entry in enumerate(chosen):
        observed = rng.random((n, window)) < 0.35
        if entry.get("kind") == "binary":
            x = (rng.random((n, window)) < 0.3).astype(np.float32)
        else:
            low, high = entry.get("range", [0.0, 100.0])
            centre, spread = low + 0.4 * (high - low), 0.08 * (high - low)
            x = np.clip(rng.normal(centre, spread, (n, 1)) + rng.normal(0, spread / 3, (n, window)), low, high)
        values[:, :, f] = np.where(observed, np.round(x, 2), np.nan)

    present = rng.random(n) < 0.3
    decode_error = ~present & (rng.random(n) < 0.05)
    hours_s = rng.integers(0, (window + 24) * 3600, n)
    study_time = np.where(present, prediction_time - hours_s, -1)
    dicom = np.array(["-".join(f"{v:08x}" for v in rng.integers(0, 2**32, 5)) if p else ""
                      for p in present], dtype=object)
    cxr = pd.DataFrame(
        {
            "present": present,
            "dicom_id": dicom,
            "study_id": np.where(present, 50_000_000 + rng.integers(0, 10_000_000, n), -1).astype(np.int64),
            "study_time": pd.to_datetime(np.where(present, study_time, 0), unit="s").where(present),
            "hours_before_prediction": np.where(present, hours_s / 3600.0, np.nan).astype(np.float32),
            "view_position": np.where(present, rng.choice(["AP", "PA"], n, p=[0.7, 0.3]), "").astype(object),
            "n_eligible": np.where(present, rng.integers(1, 5, n), np.where(decode_error, 1, 0)).astype(np.int16),
            "absent_reason": np.where(present, "", np.where(decode_error, "decode_error: truncated JPEG",
                                                            "no_eligible_film")).astype(object),
        },
        index=stays.index,
    )
    yy, xx = np.mgrid[0:image_size, 0:image_size] / max(image_size - 1, 1)
    images = np.zeros((n, image_size, image_size), dtype=np.uint8)
    for i in np.flatnonzero(present):
        a, b, c = rng.uniform(0.2, 1.0, 3)
        img = 120 * a * np.sin(3 * b * xx + c) * np.cos(2 * yy) + 128 + rng.normal(0, 12, (image_size, image_size))
        images[i] = np.clip(img, 1, 255).astype(np.uint8)

    splits = _splits(rng, subjects, n_folds)
    config = {"generator": "cbstore.testing.random_content", "n_stays": n, "n_folds": n_folds,
              "window_hours": window, "n_features": n_features, "image_size": image_size, "seed": seed}
    attrs = {
        "sources": {
            "mimic-iv": {"path": "/synthetic/mimic-iv", "version": "synthetic", "synthetic": True},
            "mimic-cxr-jpg": {"path": "/synthetic/mimic-cxr-jpg", "version": "synthetic", "synthetic": True},
        },
        "config": config,
        "config_sha256": config_sha256(config),
        "variables_sha256": variables_sha,
        "phenotypes_sha256": hashlib.sha256(canonical_json(list(PHENOTYPE_NAMES)).encode()).hexdigest(),
        "cohort_flow": [
            {"step": "icu_stays", "n": n + 17, "note": "all ICU stays in icustays"},
            {"step": "adult", "n": n + 9, "note": "age >= 18 at admission"},
            {"step": "min_length", "n": n, "note": f"ICU stay of at least {window} h"},
        ],
        "cxr_skips": {"decode_error": int(decode_error.sum()), "file_missing": 0},
    }
    return StoreContent(
        stays=stays, labels=labels, phenotype_names=list(PHENOTYPE_NAMES), features=features,
        ehr_values=values, cxr=cxr, images=images, splits=splits, stats=fold_stats(values, splits),
        attrs=attrs,
    )
