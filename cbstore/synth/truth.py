"""Planted ground truth of a synthetic source (``truth.json``).

Labels are recomputed from what was written (diagnosis rows, death and stay times, film
metadata) with the default build rules, and checked against the latent draws they were planted
from, so ``truth.json`` states what a correct build must find.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from cbstore.phenotypes import Phenotypes
from cbstore.synth.cxr import ELIGIBLE_VIEWS, WINDOW_HOURS
from cbstore.synth.model import (
    ADMISSION_FACTORS, DISPARITY_RACE_PREFIX, DISPARITY_SPO2_SHIFT, HOSP_DEATH_MODEL, HOUR,
    ICU_DEATH_MODEL, PHENOTYPE_MODEL, Cohort, phenotype_dependence,
)

TRUTH_FORMAT = 1


class TruthMismatchError(AssertionError):
    """The written rows do not reproduce the planted labels (a generator bug)."""


def _iso(seconds) -> str:
    return str(np.datetime64(int(seconds), "s")).replace("T", " ")


def _iso_ms(ms) -> str:
    return str(np.datetime64(int(ms), "ms")).replace("T", " ")


def eligible_films(stays: pd.DataFrame, films: pd.DataFrame) -> pd.DataFrame:
    """Films eligible for each stay under the default rules.

    A film is eligible when it has the stay's ``subject_id``, ``ViewPosition`` in AP/PA and a study
    time within [intime, intime + 48 h] (both ends included, millisecond precision).

    Returns
    -------
    pandas.DataFrame
        One row per (stay, eligible film): stay_id, dicom_id, time_ms, view, film_stay_id,
        cardiomegaly, opacity, effusion; sorted by stay_id, time_ms.
    """
    f = films[films["view"].isin(list(ELIGIBLE_VIEWS))]
    f = f.rename(columns={"stay_id": "film_stay_id"})
    w = stays[["stay_id", "subject_id", "intime"]].copy()
    w["lo"] = w["intime"].to_numpy(np.int64) * 1000
    w["hi"] = w["lo"] + WINDOW_HOURS * HOUR * 1000
    pairs = w.merge(f, on="subject_id", how="inner")
    pairs = pairs[(pairs["time_ms"] >= pairs["lo"]) & (pairs["time_ms"] <= pairs["hi"])]
    cols = ["stay_id", "dicom_id", "time_ms", "view", "film_stay_id", "cardiomegaly", "opacity", "effusion"]
    return pairs.sort_values(["stay_id", "time_ms", "dicom_id"], kind="stable")[cols].reset_index(drop=True)


def _round(x, nd=4):
    return None if x is None or not np.isfinite(x) else round(float(x), nd)


def build_truth(cohort: Cohort, ph: Phenotypes, dx: pd.DataFrame, films: pd.DataFrame, *, rows: dict,
                seed: int, image_size, images_written: bool) -> dict:
    """Assemble the ``truth.json`` document (see the package docstring for the model)."""
    s = cohort.stays.sort_values("stay_id", kind="stable").reset_index(drop=True)
    a = cohort.admissions
    n = len(s)
    # ---- phenotype labels from the written diagnosis rows (matching on code AND version)
    labels = ph.label_matrix(dx, s["hadm_id"].to_numpy())
    planted = s[[f"ph{k}" for k in range(len(ph.names))]].to_numpy(np.int8)
    if not np.array_equal(labels, planted):
        bad = np.argwhere(labels != planted)[0]
        raise TruthMismatchError(f"diagnosis rows give phenotype {ph.names[bad[1]]!r} = {labels[tuple(bad)]} for "
                                 f"stay {s['stay_id'].iat[bad[0]]}, planted {planted[tuple(bad)]}")
    table = ph.code_table()
    blind_codes = table[["icd_code", "phenotype"]].drop_duplicates()
    blind_hits = dx[["hadm_id", "icd_code"]].merge(blind_codes, on="icd_code")
    blind = pd.crosstab(blind_hits["hadm_id"], blind_hits["phenotype"]).reindex(
        index=s["hadm_id"].to_numpy(), columns=range(len(ph.names)), fill_value=0).to_numpy() > 0
    blind_wrong = (blind != labels.astype(bool)).any(axis=1)
    # ---- outcomes from the written times
    intime, outtime = s["intime"].to_numpy(), s["outtime"].to_numpy()
    death = s["deathtime"].to_numpy()
    mortality = ((death >= 0) & (death >= intime) & (death <= outtime)).astype(int)
    mortality_hosp = ((death >= 0) & (death >= s["admittime"].to_numpy())
                      & (death <= s["dischtime"].to_numpy())).astype(int)
    if not np.array_equal(mortality.astype(bool), s["icu_death"].to_numpy(bool)):
        raise TruthMismatchError("ICU death times do not reproduce the planted ICU mortality")
    los_days = (outtime - intime) / 86400.0
    los_hours = (outtime - intime) / 3600.0
    adult = s["age"].to_numpy() >= 18
    cohort_default = adult & (los_hours >= WINDOW_HOURS)
    # ---- films
    elig = eligible_films(s, films)
    n_eligible = elig.groupby("stay_id").size().reindex(s["stay_id"].to_numpy(), fill_value=0).to_numpy()

    factor_names = ("severity",) + ADMISSION_FACTORS
    latent = {f: np.round(s[f].to_numpy(float), 4).tolist() for f in factor_names}
    col = {c: s[c].tolist() for c in ("stay_id", "subject_id", "hadm_id", "age", "gender", "race",
                                      "disparity", "icd_version")}
    n_subject_films = films.groupby("subject_id").size().reindex(s["subject_id"].to_numpy(), fill_value=0).tolist()
    latest = elig.groupby("stay_id", sort=False).tail(1).set_index("stay_id")
    eligible_lists = elig.groupby("stay_id", sort=False)["dicom_id"].agg(list).to_dict()
    study_of = dict(zip(films["dicom_id"], films["study_id"]))
    label_rows = labels.astype(int).tolist()
    stays_out = []
    for i in range(n):
        sid = int(col["stay_id"][i])
        if sid in eligible_lists:
            last = latest.loc[sid]
            cxr = {
                "eligible": list(eligible_lists[sid]),
                "latest": str(last["dicom_id"]),
                "latest_study_id": int(study_of[last["dicom_id"]]),
                "latest_study_time": _iso_ms(last["time_ms"]),
                "latest_view": str(last["view"]),
                "latest_from_this_stay": bool(int(last["film_stay_id"]) == sid),
                "latest_findings": {k: _round(last[k]) for k in ("cardiomegaly", "opacity", "effusion")},
            }
        else:
            cxr = {"eligible": [], "latest": None, "latest_study_id": None, "latest_study_time": None,
                   "latest_view": None, "latest_from_this_stay": None, "latest_findings": None}
        cxr["n_films_subject"] = int(n_subject_films[i])
        stays_out.append({
            "stay_id": sid, "subject_id": int(col["subject_id"][i]), "hadm_id": int(col["hadm_id"][i]),
            "intime": _iso(intime[i]), "outtime": _iso(outtime[i]),
            "prediction_time": _iso(intime[i] + WINDOW_HOURS * HOUR),
            "age": int(col["age"][i]), "minor": bool(not adult[i]), "gender": str(col["gender"][i]),
            "race_raw": str(col["race"][i]), "disparity_group": bool(col["disparity"][i]),
            "icd_version": int(col["icd_version"][i]), "los_hours": _round(los_hours[i], 6),
            "in_default_cohort": bool(cohort_default[i]),
            "latent": {f: latent[f][i] for f in factor_names},
            "labels": {"mortality": int(mortality[i]), "mortality_hosp": int(mortality_hosp[i]),
                       "los_days": _round(los_days[i], 6), "phenotypes": label_rows[i]},
            "version_blind_phenotypes_differ": bool(blind_wrong[i]),
            "cxr": cxr,
        })

    dependence = {"ehr": [], "image": [], "both": [], "none": []}
    models = {}
    for name, ccs in zip(ph.names, ph.ids):
        model = PHENOTYPE_MODEL.get(ccs, (-2.5, {}))
        dependence[phenotype_dependence(model)].append(name)
        models[name] = {"ccs_id": ccs, "intercept": model[0], "weights": dict(model[1])}
    kinds = films["kind"].to_numpy()
    has_elig = n_eligible > 0
    summary = {
        "n_patients": int(s["subject_id"].nunique()), "n_admissions": int(len(a)),
        "n_icu_admissions": int(a["icu"].sum()), "n_stays": n,
        "n_minor_stays": int((~adult).sum()), "n_stays_under_48h": int((los_hours < WINDOW_HOURS).sum()),
        "n_default_cohort": int(cohort_default.sum()),
        "n_patients_with_several_stays": int((s.groupby("subject_id").size() > 1).sum()),
        "n_icd9_admissions": int((a["icd_version"] == 9).sum()),
        "n_icd10_admissions": int((a["icd_version"] == 10).sum()),
        "mortality_rate": _round(mortality.mean()), "mortality_hosp_rate": _round(mortality_hosp.mean()),
        "phenotype_prevalence": {name: _round(labels[:, k].mean()) for k, name in enumerate(ph.names)},
        "n_trap_diagnosis_rows": int(dx["trap"].sum()),
        "n_stays_version_blind_differs": int(blind_wrong.sum()),
        "n_disparity_stays": int(s["disparity"].sum()),
        "n_images": int(len(films)), "n_studies": int(films["study_id"].nunique()),
        "n_images_by_view": {v if v else "(blank)": int(c) for v, c in
                             films["view"].value_counts().sort_index().items()},
        "n_images_before_intime": int(np.isin(kinds, ["pre", "edge_early"]).sum()),
        "n_images_after_prediction_time": int(np.isin(kinds, ["late", "edge_late"]).sum()),
        "n_stays_with_eligible_film": int(has_elig.sum()),
        "eligible_share": _round(has_elig.mean()),
        "eligible_share_default_cohort": _round(has_elig[cohort_default].mean()) if cohort_default.any() else None,
        "rows": dict(rows),
    }
    return {
        "format": TRUTH_FORMAT,
        "generator": "cbstore synth",
        "synthetic": True,
        "seed": seed,
        "n_stays": n,
        "image_size": list(image_size) if isinstance(image_size, (tuple, list)) else image_size,
        "images_written": bool(images_written),
        "build_rules": {
            "window_hours": WINDOW_HOURS,
            "views": list(ELIGIBLE_VIEWS),
            "eligible_film": "same subject_id, ViewPosition in views, intime <= StudyDate+StudyTime <= "
                             "intime + window_hours (millisecond precision)",
            "selected_film": "the latest eligible film (study times are unique per subject)",
            "mortality": "admissions.deathtime within [icustays.intime, icustays.outtime]",
            "mortality_hosp": "admissions.deathtime within [admittime, dischtime]",
            "los_days": "(outtime - intime) in days (= icustays.los)",
            "phenotypes": "any diagnoses_icd row of the stay's hadm_id matching (icd_code, icd_version)",
            "default_cohort": "age >= 18 (anchor_age + year(intime) - anchor_year) and ICU stay >= window_hours",
        },
        "phenotypes": {"names": list(ph.names), "ccs_ids": list(ph.ids), "definitions_sha256": ph.sha256,
                       "dependence": dependence, "models": models},
        "mortality_models": {
            "icu": {"intercept": ICU_DEATH_MODEL[0], "weights": dict(ICU_DEATH_MODEL[1])},
            "post_icu_hospital": {"intercept": HOSP_DEATH_MODEL[0], "weights": dict(HOSP_DEATH_MODEL[1])},
        },
        "disparity": {
            "group": f"admissions.race starts with {DISPARITY_RACE_PREFIX!r} (store race group BLACK)",
            "mechanism": f"SpO2 (chartevents itemid 220277) is charted {DISPARITY_SPO2_SHIFT:g} points above the "
                         "latent value (capped at 100); latent hypoxemia and all outcome risks are unchanged",
            "spo2_shift": DISPARITY_SPO2_SHIFT,
            "affects": ["mortality", "mortality_hosp",
                        "Respiratory failure; insufficiency; arrest (adult)"],
        },
        "summary": summary,
        "stays": stays_out,
    }


def dumps_truth(truth: dict) -> str:
    """JSON text of a truth document: top-level entries indented, one line per stay."""
    lines = []
    for key, value in truth.items():
        if key == "stays":
            body = ",\n".join("  " + json.dumps(v, allow_nan=False) for v in value)
            lines.append(f'"stays": [\n{body}\n ]' if value else '"stays": []')
        else:
            text = json.dumps(value, indent=1, allow_nan=False).replace("\n", "\n ")
            lines.append(f"{json.dumps(key)}: {text}")
    return "{\n " + ",\n ".join(lines) + "\n}\n"
