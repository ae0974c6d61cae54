"""Planted ground truth of a synthetic source (``truth.json``).

Labels are recomputed from what was written (diagnosis rows, death and stay times, film
metadata) with the default build rules, and checked against the latent draws they were planted
from, so ``truth.json`` states what a correct build must find.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd

from cbstore.build.phenotypes import Phenotypes
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


class _StayTable:
    """Per-stay arrays of the truth document, computed once from the written rows (stays by ``stay_id``)."""

    def __init__(self, cohort: Cohort, ph: Phenotypes, dx: pd.DataFrame, films: pd.DataFrame):
        s = cohort.stays.sort_values("stay_id", kind="stable").reset_index(drop=True)
        self.s = s
        # ---- phenotype labels from the written diagnosis rows (matching on code AND version)
        labels = ph.label_matrix(dx, s["hadm_id"].to_numpy())
        planted = s[[f"ph{k}" for k in range(len(ph.names))]].to_numpy(np.int8)
        if not np.array_equal(labels, planted):
            bad = np.argwhere(labels != planted)[0]
            raise TruthMismatchError(f"diagnosis rows give phenotype {ph.names[bad[1]]!r} = {labels[tuple(bad)]} "
                                     f"for stay {s['stay_id'].iat[bad[0]]}, planted {planted[tuple(bad)]}")
        self.labels = labels
        table = ph.code_table()
        blind_codes = table[["icd_code", "phenotype"]].drop_duplicates()
        blind_hits = dx[["hadm_id", "icd_code"]].merge(blind_codes, on="icd_code")
        blind = pd.crosstab(blind_hits["hadm_id"], blind_hits["phenotype"]).reindex(
            index=s["hadm_id"].to_numpy(), columns=range(len(ph.names)), fill_value=0).to_numpy() > 0
        self.blind_wrong = (blind != labels.astype(bool)).any(axis=1)
        # ---- outcomes from the written times
        self.intime, self.outtime = s["intime"].to_numpy(), s["outtime"].to_numpy()
        death = s["deathtime"].to_numpy()
        self.mortality = ((death >= 0) & (death >= self.intime) & (death <= self.outtime)).astype(int)
        self.mortality_hosp = ((death >= 0) & (death >= s["admittime"].to_numpy())
                               & (death <= s["dischtime"].to_numpy())).astype(int)
        if not np.array_equal(self.mortality.astype(bool), s["icu_death"].to_numpy(bool)):
            raise TruthMismatchError("ICU death times do not reproduce the planted ICU mortality")
        self.los_days = (self.outtime - self.intime) / 86400.0
        self.los_hours = (self.outtime - self.intime) / 3600.0
        self.adult = s["age"].to_numpy() >= 18
        self.cohort_default = self.adult & (self.los_hours >= WINDOW_HOURS)
        # ---- films
        elig = eligible_films(s, films)
        self.n_eligible = elig.groupby("stay_id").size().reindex(s["stay_id"].to_numpy(), fill_value=0).to_numpy()
        self.n_subject_films = films.groupby("subject_id").size().reindex(
            s["subject_id"].to_numpy(), fill_value=0).to_numpy()
        latest = elig.groupby("stay_id", sort=False).tail(1).set_index("stay_id")
        latest["study_id"] = films.set_index("dicom_id")["study_id"].reindex(latest["dicom_id"].to_numpy()).to_numpy()
        self.latest = latest
        self.eligible_lists = elig.groupby("stay_id", sort=False)["dicom_id"].agg(list).to_dict()

    def records(self, first: int, end: int) -> list[dict]:
        """The ``stays`` entries of stays [first, end)."""
        s = self.s.iloc[first:end]
        factor_names = ("severity",) + ADMISSION_FACTORS
        latent = {f: np.round(s[f].to_numpy(float), 4).tolist() for f in factor_names}
        col = {c: s[c].tolist() for c in ("stay_id", "subject_id", "hadm_id", "age", "gender", "race",
                                          "disparity", "icd_version")}
        label_rows = self.labels[first:end].astype(int).tolist()
        out = []
        for j, i in enumerate(range(first, end)):
            sid = int(col["stay_id"][j])
            if sid in self.eligible_lists:
                last = self.latest.loc[sid]
                cxr = {
                    "eligible": list(self.eligible_lists[sid]),
                    "latest": str(last["dicom_id"]),
                    "latest_study_id": int(last["study_id"]),
                    "latest_study_time": _iso_ms(last["time_ms"]),
                    "latest_view": str(last["view"]),
                    "latest_from_this_stay": bool(int(last["film_stay_id"]) == sid),
                    "latest_findings": {k: _round(last[k]) for k in ("cardiomegaly", "opacity", "effusion")},
                }
            else:
                cxr = {"eligible": [], "latest": None, "latest_study_id": None, "latest_study_time": None,
                       "latest_view": None, "latest_from_this_stay": None, "latest_findings": None}
            cxr["n_films_subject"] = int(self.n_subject_films[i])
            out.append({
                "stay_id": sid, "subject_id": int(col["subject_id"][j]), "hadm_id": int(col["hadm_id"][j]),
                "intime": _iso(self.intime[i]), "outtime": _iso(self.outtime[i]),
                "prediction_time": _iso(self.intime[i] + WINDOW_HOURS * HOUR),
                "age": int(col["age"][j]), "minor": bool(not self.adult[i]), "gender": str(col["gender"][j]),
                "race_raw": str(col["race"][j]), "disparity_group": bool(col["disparity"][j]),
                "icd_version": int(col["icd_version"][j]), "los_hours": _round(self.los_hours[i], 6),
                "in_default_cohort": bool(self.cohort_default[i]),
                "latent": {f: latent[f][j] for f in factor_names},
                "labels": {"mortality": int(self.mortality[i]), "mortality_hosp": int(self.mortality_hosp[i]),
                           "los_days": _round(self.los_days[i], 6), "phenotypes": label_rows[j]},
                "version_blind_phenotypes_differ": bool(self.blind_wrong[i]),
                "cxr": cxr,
            })
        return out


def _summary(t: _StayTable, cohort: Cohort, ph: Phenotypes, dx: pd.DataFrame, films: pd.DataFrame,
             rows: dict) -> dict:
    s, a, labels = t.s, cohort.admissions, t.labels
    kinds = films["kind"].to_numpy()
    has_elig = t.n_eligible > 0
    adult, cohort_default = t.adult, t.cohort_default
    return {
        "n_patients": int(s["subject_id"].nunique()), "n_admissions": int(len(a)),
        "n_icu_admissions": int(a["icu"].sum()), "n_stays": len(s),
        "n_minor_stays": int((~adult).sum()), "n_stays_under_48h": int((t.los_hours < WINDOW_HOURS).sum()),
        "n_default_cohort": int(cohort_default.sum()),
        "n_patients_with_several_stays": int((s.groupby("subject_id").size() > 1).sum()),
        "n_icd9_admissions": int((a["icd_version"] == 9).sum()),
        "n_icd10_admissions": int((a["icd_version"] == 10).sum()),
        "mortality_rate": _round(t.mortality.mean()), "mortality_hosp_rate": _round(t.mortality_hosp.mean()),
        "phenotype_prevalence": {name: _round(labels[:, k].mean()) for k, name in enumerate(ph.names)},
        "n_trap_diagnosis_rows": int(dx["trap"].sum()),
        "n_stays_version_blind_differs": int(t.blind_wrong.sum()),
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


def _head(summary: dict, ph: Phenotypes, *, seed: int, image_size, images_written: bool) -> dict:
    """Every entry of the truth document but ``stays``, in file order."""
    dependence = {"ehr": [], "image": [], "both": [], "none": []}
    models = {}
    for name, ccs in zip(ph.names, ph.ids):
        model = PHENOTYPE_MODEL.get(ccs, (-2.5, {}))
        dependence[phenotype_dependence(model)].append(name)
        models[name] = {"ccs_id": ccs, "intercept": model[0], "weights": dict(model[1])}
    return {
        "format": TRUTH_FORMAT,
        "generator": "cbstore synth",
        "synthetic": True,
        "seed": seed,
        "n_stays": summary["n_stays"],
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
    }


def write_truth(path, cohort: Cohort, ph: Phenotypes, dx: pd.DataFrame, films: pd.DataFrame, *, rows: dict,
                seed: int, image_size, images_written: bool, chunk_stays: int) -> dict:
    """Write ``truth.json`` (see the package docstring for the model), the stays chunk by chunk.

    The text is that of :func:`dumps_truth` on the whole document; only ``chunk_stays`` stays'
    entries are held at once. Returns the document without its ``stays`` entry.
    """
    table = _StayTable(cohort, ph, dx, films)
    head = _head(_summary(table, cohort, ph, dx, films, rows), ph, seed=seed, image_size=image_size,
                 images_written=images_written)
    n = len(table.s)
    chunks = (table.records(first, min(first + chunk_stays, n)) for first in range(0, n, chunk_stays))
    with open(path, "w", encoding="utf-8") as fh:
        _write_document(fh, head, chunks)
    return head


def _write_document(fh, head: dict, stay_chunks) -> None:
    """The truth text: ``head``'s entries indented, then ``stays`` one line per stay."""
    fh.write("{\n ")
    for key, value in head.items():
        text = json.dumps(value, indent=1, allow_nan=False).replace("\n", "\n ")
        fh.write(f"{json.dumps(key)}: {text},\n ")
    fh.write('"stays": [')
    first = True
    for records in stay_chunks:
        for record in records:
            fh.write(("\n  " if first else ",\n  ") + json.dumps(record, allow_nan=False))
            first = False
    fh.write("]" if first else "\n ]")
    fh.write("\n}\n")


def dumps_truth(truth: dict) -> str:
    """JSON text of a whole truth document (``stays`` last): top-level entries indented, one line per stay."""
    buffer = io.StringIO()
    head = {k: v for k, v in truth.items() if k != "stays"}
    _write_document(buffer, head, [truth.get("stays", [])])
    return buffer.getvalue()
