"""MIMIC-IV v2.2 shaped tables of the synthetic source (``hosp/`` and ``icu/``).

Rows are generated vectorised from a :class:`~cbstore.synth.model.Cohort`: per-stay physiology
means come from the latent factors, each charted or measured value adds a time drift and noise.
The event tables are generated and written chunk by chunk; each stay (chartevents, outputevents)
or patient (labevents) draws from its own generator (:mod:`cbstore.synth._draws`), so the files
do not depend on the chunk size.
Which itemids exist comes from ``cbstore/build/resources/variables.yaml`` (read with yaml, so the two stay
in sync) plus a few unrelated items, as in the real dictionaries.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import yaml

#: libyaml's safe loader when available (much faster), else the pure-Python one.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

from cbstore.build.phenotypes import Phenotypes
from cbstore.synth._chunks import patient_chunks, patients_by_subject, stay_chunks
from cbstore.synth._draws import STREAMS, UnitDraws, unit_generator
from cbstore.synth._io import GzipCsvWriter, datetime_strings, float_strings, take_strings, write_table
from cbstore.synth.model import DISPARITY_SPO2_SHIFT, HOUR, Cohort, sigmoid

# ---------------------------------------------------------------------------------------------
# table headers (MIMIC-IV v2.2, in file order)
# ---------------------------------------------------------------------------------------------
HEADERS = {
    "hosp/patients": ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"],
    "hosp/admissions": ["subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
                        "admit_provider_id", "admission_location", "discharge_location", "insurance",
                        "language", "marital_status", "race", "edregtime", "edouttime",
                        "hospital_expire_flag"],
    "hosp/diagnoses_icd": ["subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"],
    "hosp/labevents": ["labevent_id", "subject_id", "hadm_id", "specimen_id", "itemid", "order_provider_id",
                       "charttime", "storetime", "value", "valuenum", "valueuom", "ref_range_lower",
                       "ref_range_upper", "flag", "priority", "comments"],
    "hosp/d_labitems": ["itemid", "label", "fluid", "category"],
    "icu/icustays": ["subject_id", "hadm_id", "stay_id", "first_careunit", "last_careunit", "intime",
                     "outtime", "los"],
    "icu/chartevents": ["subject_id", "hadm_id", "stay_id", "caregiver_id", "charttime", "storetime", "itemid",
                        "value", "valuenum", "valueuom", "warning"],
    "icu/d_items": ["itemid", "label", "abbreviation", "linksto", "category", "unitname", "param_type",
                    "lownormalvalue", "highnormalvalue"],
    "icu/outputevents": ["subject_id", "hadm_id", "stay_id", "caregiver_id", "charttime", "storetime", "itemid",
                         "value", "valueuom"],
}

# ---------------------------------------------------------------------------------------------
# dictionaries: itemid -> description (labels as in MIMIC-IV d_items / d_labitems)
# ---------------------------------------------------------------------------------------------
#: chartevents items: label, abbreviation, category, unitname, param_type, low, high
CHART_ITEMS = {
    220045: ("Heart Rate", "HR", "Routine Vital Signs", "bpm", "Numeric", 60, 100),
    220046: ("Heart rate Alarm - High", "HR Alarm - High", "Alarms", "bpm", "Numeric", None, None),
    220047: ("Heart Rate Alarm - Low", "HR Alarm - Low", "Alarms", "bpm", "Numeric", None, None),
    220048: ("Heart Rhythm", "Heart Rhythm", "Routine Vital Signs", None, "Text", None, None),
    220050: ("Arterial Blood Pressure systolic", "ABPs", "Routine Vital Signs", "mmHg", "Numeric", 90, 140),
    220051: ("Arterial Blood Pressure diastolic", "ABPd", "Routine Vital Signs", "mmHg", "Numeric", 60, 90),
    220052: ("Arterial Blood Pressure mean", "ABPm", "Routine Vital Signs", "mmHg", "Numeric", None, None),
    220179: ("Non Invasive Blood Pressure systolic", "NBPs", "Routine Vital Signs", "mmHg", "Numeric", 90, 140),
    220180: ("Non Invasive Blood Pressure diastolic", "NBPd", "Routine Vital Signs", "mmHg", "Numeric", 60, 90),
    220181: ("Non Invasive Blood Pressure mean", "NBPm", "Routine Vital Signs", "mmHg", "Numeric", None, None),
    225312: ("ART BP Mean", "ART BP Mean", "Routine Vital Signs", "mmHg", "Numeric", None, None),
    220210: ("Respiratory Rate", "RR", "Respiratory", "insp/min", "Numeric", 14, 20),
    224690: ("Respiratory Rate (Total)", "Respiratory Rate (Total)", "Respiratory", "insp/min", "Numeric",
             None, None),
    220277: ("O2 saturation pulseoxymetry", "SpO2", "Respiratory", "%", "Numeric", 90, 100),
    223761: ("Temperature Fahrenheit", "Temperature F", "Routine Vital Signs", "°F", "Numeric", None, None),
    223762: ("Temperature Celsius", "Temperature C", "Routine Vital Signs", "°C", "Numeric", None, None),
    220739: ("GCS - Eye Opening", "GCS - Eye Opening", "Neurological", None, "Text", None, None),
    223900: ("GCS - Verbal Response", "GCS - Verbal Response", "Neurological", None, "Text", None, None),
    223901: ("GCS - Motor Response", "GCS - Motor Response", "Neurological", None, "Text", None, None),
    223835: ("Inspired O2 Fraction", "FiO2", "Respiratory", None, "Numeric", None, None),
    220621: ("Glucose (serum)", "Glucose (serum)", "Labs", "mg/dL", "Numeric", 70, 100),
    225664: ("Glucose finger stick (range 70-100)", "Glucose FS (range 70 -100)", "Routine Vital Signs",
             None, "Numeric", None, None),
    226537: ("Glucose (whole blood)", "Glucose (whole blood)", "Labs", "mg/dL", "Numeric", None, None),
    223830: ("PH (Arterial)", "PH (Arterial)", "Labs", "units", "Numeric", 7.35, 7.45),
    226512: ("Admission Weight (Kg)", "Admission Weight (Kg)", "General", "kg", "Numeric", None, None),
    224639: ("Daily Weight", "Daily Weight", "General", "kg", "Numeric", None, None),
    226730: ("Height (cm)", "Height (cm)", "General", "cm", "Numeric", None, None),
    226707: ("Height", "Height", "General", "Inch", "Numeric", None, None),
    223951: ("Capillary Refill R", "Capillary Refill R", "Skin - Assessment", None, "Text", None, None),
    224308: ("Capillary Refill L", "Capillary Refill L", "Skin - Assessment", None, "Text", None, None),
    226732: ("O2 Delivery Device(s)", "O2 Delivery Device(s)", "Respiratory", None, "Text", None, None),
}
#: outputevents items: label, abbreviation, category
OUTPUT_ITEMS = {
    226559: ("Foley", "Foley", "Output"), 226560: ("Void", "Void", "Output"),
    226561: ("Condom Cath", "Condom Cath", "Output"), 226584: ("Ileoconduit", "Ileoconduit", "Output"),
    226563: ("Suprapubic", "Suprapubic", "Output"), 226564: ("R Nephrostomy", "R Nephrostomy", "Output"),
    226565: ("L Nephrostomy", "L Nephrostomy", "Output"), 226567: ("Straight Cath", "Straight Cath", "Output"),
    226557: ("R Ureteral Stent", "R Ureteral Stent", "Output"),
    226558: ("L Ureteral Stent", "L Ureteral Stent", "Output"),
    226588: ("Chest Tube #1", "Chest Tube #1", "Output"),
}
#: labevents items: label, fluid, category, unit, ref low, ref high, decimals, physiology key
LAB_ITEMS = {
    50912: ("Creatinine", "Blood", "Chemistry", "mg/dL", 0.5, 1.2, 1, "creatinine"),
    51006: ("Urea Nitrogen", "Blood", "Chemistry", "mg/dL", 6, 20, 0, "bun"),
    50983: ("Sodium", "Blood", "Chemistry", "mEq/L", 133, 145, 0, "sodium"),
    50971: ("Potassium", "Blood", "Chemistry", "mEq/L", 3.3, 5.1, 1, "potassium"),
    50902: ("Chloride", "Blood", "Chemistry", "mEq/L", 96, 108, 0, "chloride"),
    50882: ("Bicarbonate", "Blood", "Chemistry", "mEq/L", 22, 32, 0, "bicarbonate"),
    50931: ("Glucose", "Blood", "Chemistry", "mg/dL", 70, 100, 0, "glucose"),
    50868: ("Anion Gap", "Blood", "Chemistry", "mEq/L", 8, 20, 0, "anion_gap"),
    50893: ("Calcium, Total", "Blood", "Chemistry", "mg/dL", 8.4, 10.3, 1, "calcium"),
    51222: ("Hemoglobin", "Blood", "Hematology", "g/dL", 13.7, 17.5, 1, "hemoglobin"),
    51221: ("Hematocrit", "Blood", "Hematology", "%", 40, 51, 1, "hematocrit"),
    51301: ("White Blood Cells", "Blood", "Hematology", "K/uL", 4.0, 11.0, 1, "wbc"),
    51265: ("Platelet Count", "Blood", "Hematology", "K/uL", 150, 400, 0, "platelets"),
    51279: ("Red Blood Cells", "Blood", "Hematology", "m/uL", 4.6, 6.1, 2, "rbc"),
    50960: ("Magnesium", "Blood", "Chemistry", "mg/dL", 1.6, 2.6, 1, "magnesium"),
    50885: ("Bilirubin, Total", "Blood", "Chemistry", "mg/dL", 0, 1.5, 1, "bilirubin"),
    50862: ("Albumin", "Blood", "Chemistry", "g/dL", 3.5, 5.2, 1, "albumin"),
    51237: ("INR(PT)", "Blood", "Hematology", None, 0.9, 1.1, 1, "inr"),
    50820: ("pH", "Blood", "Blood Gas", "units", 7.35, 7.45, 2, "ph"),
    50813: ("Lactate", "Blood", "Blood Gas", "mmol/L", 0.5, 2.0, 1, "lactate"),
    50809: ("Glucose", "Blood", "Blood Gas", "mg/dL", 70, 105, 0, "glucose"),
    51491: ("pH", "Urine", "Hematology", "units", 5, 8, 1, "urine_ph"),
    51097: ("Creatinine, Urine", "Urine", "Chemistry", "mg/dL", None, None, 0, "urine_creatinine"),
}
#: lab panels: (probability outside / inside the ICU, itemids)
LAB_PANELS = (
    ((0.95, 0.97), (50912, 51006, 50983, 50971, 50902, 50882, 50931, 50868, 50893)),
    ((0.85, 0.95), (51222, 51221, 51301, 51265, 51279)),
    ((0.5, 0.75), (50960,)),
    ((0.25, 0.4), (50885, 50862)),
    ((0.3, 0.5), (51237,)),
    ((0.15, 0.55), (50820, 50813, 50809)),
    ((0.05, 0.03), (51491, 51097)),
)
#: relative row noise (log scale) or absolute noise per physiology key
LAB_NOISE = {"creatinine": 0.08, "bun": 0.08, "sodium": 1.5, "potassium": 0.25, "chloride": 2.0,
             "bicarbonate": 1.5, "glucose": 0.12, "anion_gap": 2.0, "calcium": 0.3, "hemoglobin": 0.5,
             "hematocrit": 1.5, "wbc": 0.12, "platelets": 0.1, "rbc": 0.2, "magnesium": 0.15,
             "bilirubin": 0.12, "albumin": 0.2, "inr": 0.06, "ph": 0.03, "lactate": 0.15,
             "urine_ph": 0.5, "urine_creatinine": 0.3}
LOG_NOISE = {"creatinine", "bun", "glucose", "wbc", "platelets", "bilirubin", "inr", "lactate",
             "urine_creatinine"}

RHYTHMS = ("SR (Sinus Rhythm)", "ST (Sinus Tachycardia)", "SB (Sinus Bradycardia)", "AF (Atrial Fibrillation)",
           "A Flut (Atrial Flutter)", "A Paced", "V Paced", "AV Paced", "1st AV (First degree AV Block)",
           "JR (Junctional Rhythm)")
GCS_TEXT = {
    220739: {4: "Spontaneously", 3: "To Speech", 2: "To Pain", 1: "None"},
    223900: {5: "Oriented", 4: "Confused", 3: "Inappropriate Words", 2: "Incomprehensible sounds",
             1: "No Response"},
    223901: {6: "Obeys Commands", 5: "Localizes Pain", 4: "Flex-withdraws", 3: "Abnormal Flexion",
             2: "Abnormal extension", 1: "No response"},
}
CAP_REFILL = ("Normal <3 Seconds", "Abnormal >3 Seconds")
O2_DEVICES = ("None", "Nasal cannula", "Face tent", "High flow nasal cannula", "Endotracheal tube",
              "Non-rebreather")

#: ICD codes used as non-phenotype diagnoses (checked against the definitions at run time).
FILLER_CODES = {
    9: ("3051", "V1582", "2859", "53081", "E8497", "V5861", "311", "32723", "73300", "2809", "V4986",
        "3004", "78052", "V1251", "E9342", "2449"),
    10: ("Z87891", "F329", "K219", "D649", "G4733", "Z7901", "Z66", "F419", "M810", "Y929", "E039",
         "Z8546", "F17210", "Z86718", "G8929", "Y92239"),
}
#: Codes valid in both ICD versions, written with the version in which they are NOT a phenotype code.
TRAP_CODES = {10: ("V420", "V9001"), 9: ("E870", "E871", "E860")}


def variable_itemids(path=None) -> dict[str, list[int]]:
    """Itemids of the EHR variables file by source table.

    Parameters
    ----------
    path : path-like, optional
        A variables YAML file; default the packaged ``cbstore/build/resources/variables.yaml``.

    Returns
    -------
    dict
        ``{"chartevents": [...], "labevents": [...], "outputevents": [...]}`` (sorted, unique).
        An itemid of a variable with several sources is placed by the MIMIC-IV numbering
        (hosp lab items are below 100000, ICU items above).
    """
    raw = (resources.files("cbstore.build") / "resources" / "variables.yaml").read_bytes() if path is None \
        else Path(path).read_bytes()
    out = {"chartevents": set(), "labevents": set(), "outputevents": set()}
    for var in yaml.load(raw, Loader=_YAML_LOADER)["variables"]:
        sources = var.get("source")
        if not sources:
            continue
        sources = [sources] if isinstance(sources, str) else list(sources)
        for itemid in var.get("itemids", []):
            if len(sources) == 1:
                out[sources[0]].add(int(itemid))
            elif itemid < 100000:
                out["labevents"].add(int(itemid))
            else:
                out["chartevents"].add(int(itemid))
    return {k: sorted(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# physiology: latent factors -> mean values
# ---------------------------------------------------------------------------------------------

def physiology(f: dict, n: int) -> dict[str, np.ndarray]:
    """Mean values of EHR measurements given latent factors (arrays of length ``n``).

    ``f`` holds the factors of :data:`~cbstore.synth.model.EHR_FACTORS` (missing ones count as 0),
    ``disparity`` (bool), ``male`` (bool). Values are in the canonical units of variables.yaml.
    """
    z = {k: np.asarray(f.get(k, np.zeros(n)), dtype=float) for k in
         ("severity", "renal", "infection", "glycemia", "electrolyte", "hypertension", "arrhythmia",
          "conduction", "neuro", "liver", "bleeding", "hypoxemia")}
    pos = {k: np.maximum(v, 0.0) for k, v in z.items()}
    hyp = np.log1p(np.exp(1.6 * z["hypoxemia"] - 0.8))  # softplus: mostly 0-1, large when hypoxaemic
    spo2 = 98.0 - 3.2 * hyp - 0.6 * pos["severity"]
    out = {
        "heart_rate": 80 + 9 * z["severity"] + 6 * pos["infection"] + 14 * (z["arrhythmia"] > 0.9),
        "sbp": 121 + 13 * z["hypertension"] - 9 * z["severity"],
        "rr": 18 + 2.2 * z["severity"] + 3.0 * hyp,
        "spo2": spo2,
        "spo2_recorded": spo2 + DISPARITY_SPO2_SHIFT * np.asarray(f.get("disparity", np.zeros(n)), dtype=float),
        "temp_c": 36.9 + 0.9 * pos["infection"] + 0.1 * z["severity"],
        "glucose": 118 * np.exp(0.38 * z["glycemia"] + 0.05 * z["severity"]),
        "ph": 7.40 - 0.03 * z["severity"] - 0.015 * z["renal"],
        "fio2": 40 + 14 * hyp,
        "creatinine": 1.0 * np.exp(0.55 * z["renal"]),
        "bun": 18 * np.exp(0.45 * z["renal"] + 0.12 * z["severity"]),
        "sodium": 139 + 5.0 * z["electrolyte"],
        "potassium": 4.1 + 0.35 * z["renal"] + 0.3 * np.abs(z["electrolyte"]),
        "bicarbonate": 24 - 2.0 * z["severity"] - 1.0 * z["renal"],
        "hemoglobin": np.clip(11.0 - 1.9 * z["bleeding"] - 0.3 * z["severity"], 4.0, None),
        "wbc": 8.5 * np.exp(0.35 * z["infection"]),
        "platelets": 220 * np.exp(-0.2 * z["severity"] - 0.25 * z["liver"]),
        "lactate": 1.4 * np.exp(0.35 * z["severity"] + 0.25 * pos["infection"]),
        "bilirubin": 0.7 * np.exp(0.8 * z["liver"]),
        "albumin": 3.4 - 0.25 * z["severity"] - 0.25 * z["liver"],
        "magnesium": 2.0 + 0.12 * z["renal"],
        "inr": 1.15 * np.exp(0.28 * z["liver"]),
        "calcium": 8.7 - 0.2 * z["renal"],
        "rbc": 3.7 - 0.6 * z["bleeding"],
        "urine_ph": np.full(n, 6.0),
        "urine_creatinine": np.full(n, 80.0),
        "urine_ml_h": 75 * np.exp(-0.45 * z["renal"] - 0.25 * z["severity"]),
        "gcs_loss": np.clip(1.4 * pos["neuro"] + 0.5 * pos["severity"], 0, 6),
    }
    out["dbp"] = 0.52 * out["sbp"] + 4
    out["chloride"] = out["sodium"] - 36 - 0.5 * (out["bicarbonate"] - 24)
    out["hematocrit"] = 3.0 * out["hemoglobin"]
    out["anion_gap"] = out["sodium"] - out["chloride"] - out["bicarbonate"] + 4
    return out


def _factors(frame: pd.DataFrame) -> dict:
    cols = ("severity", "renal", "infection", "glycemia", "electrolyte", "hypertension", "arrhythmia",
            "conduction", "neuro", "liver", "bleeding", "hypoxemia", "disparity")
    return {c: frame[c].to_numpy() for c in cols if c in frame}


def _schedule(dur_h, interval, offset, mask, draws, jitter=0.25, owner=None):
    """Events every ``interval`` hours from ``offset`` until ``dur_h`` for the entities where ``mask``.

    Returns (entity index, hours since the entity's start), rows grouped by entity, each time
    jittered by up to ``jitter * interval``. ``offset`` is a scalar or one value per entity. The
    jitter is drawn from ``draws`` for unit ``owner[entity]`` (default: the entity itself).
    """
    dur_h = np.asarray(dur_h, float)
    offset = np.broadcast_to(np.asarray(offset, float), dur_h.shape)
    n = np.where(mask & (dur_h >= offset), np.floor((dur_h - offset) / interval).astype(np.int64) + 1, 0)
    stay = np.repeat(np.arange(len(dur_h)), n)
    k = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    units = stay if owner is None else np.asarray(owner)[stay]
    t = offset[stay] + k * interval + draws.uniform(-jitter, jitter, rows=units) * interval
    return stay, np.clip(t, 0.0, dur_h[stay])


def _minutes(intime, t_hours):
    """Absolute times rounded to whole minutes."""
    return (intime + np.round(t_hours * 60).astype(np.int64) * 60) // 60 * 60


# ---------------------------------------------------------------------------------------------
# hosp tables
# ---------------------------------------------------------------------------------------------

def _provider_ids(rng, n):
    letters = np.array(list("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"))
    codes = letters[rng.integers(0, len(letters), (n, 5))]
    return np.array(["P" + "".join(r) for r in codes], dtype=object)


def write_patients(path, cohort: Cohort) -> int:
    p = cohort.patients.sort_values("subject_id", kind="stable")
    table = pa.table({
        "subject_id": p["subject_id"].to_numpy(), "gender": p["gender"].astype(str).to_numpy(),
        "anchor_age": p["anchor_age"].to_numpy(), "anchor_year": p["anchor_year"].to_numpy(),
        "anchor_year_group": p["anchor_year_group"].astype(str).to_numpy(),
        "dod": datetime_strings(p["dod"].clip(lower=0), p["dod"] >= 0, date_only=True),
    })
    return write_table(path, table)


def write_admissions(path, cohort: Cohort, rng) -> int:
    a = cohort.admissions.sort_values(["subject_id", "admittime"], kind="stable")
    n = len(a)
    provider = _provider_ids(rng, n)

    def text(col):
        v = a[col].astype(str).to_numpy()
        return pa.array(v, mask=(v == ""))

    table = pa.table({
        "subject_id": a["subject_id"].to_numpy(), "hadm_id": a["hadm_id"].to_numpy(),
        "admittime": datetime_strings(a["admittime"]), "dischtime": datetime_strings(a["dischtime"]),
        "deathtime": datetime_strings(a["deathtime"].clip(lower=0), a["deathtime"] >= 0),
        "admission_type": text("admission_type"), "admit_provider_id": pa.array(provider),
        "admission_location": text("admission_location"), "discharge_location": text("discharge_location"),
        "insurance": text("insurance"), "language": text("language"), "marital_status": text("marital_status"),
        "race": text("race"),
        "edregtime": datetime_strings(a["edregtime"].clip(lower=0), a["edregtime"] >= 0),
        "edouttime": datetime_strings(a["edouttime"].clip(lower=0), a["edouttime"] >= 0),
        "hospital_expire_flag": a["hospital_expire_flag"].to_numpy(),
    })
    return write_table(path, table)


def diagnoses_rows(cohort: Cohort, phenotypes: Phenotypes, rng) -> pd.DataFrame:
    """Diagnosis rows planting each admission's phenotype labels, filler codes and version traps.

    Returns a frame with the ``hosp/diagnoses_icd`` columns plus ``trap`` (bool): a code valid in
    both ICD versions written with the version in which it is not a phenotype code.
    """
    table = phenotypes.code_table()
    known = set(zip(table["icd_code"], table["icd_version"]))
    filler = {v: [c for c in codes if (c, v) not in known] for v, codes in FILLER_CODES.items()}
    traps = {v: [c for c in codes if (c, v) not in known and (c, 19 - v) in known]
             for v, codes in TRAP_CODES.items()}
    lists = {(k, v): np.array(codes, dtype=object)
             for k in range(len(phenotypes.names)) for v, codes in ((9, phenotypes.icd9[k]), (10, phenotypes.icd10[k]))}
    a = cohort.admissions
    n_a = len(a)
    version = a["icd_version"].to_numpy()
    subj, hadm = a["subject_id"].to_numpy(), a["hadm_id"].to_numpy()
    parts = []
    for k in range(len(phenotypes.names)):
        pos = np.flatnonzero(a[f"ph{k}"].to_numpy() == 1)
        for v in (9, 10):
            sel = pos[version[pos] == v]
            codes = lists[(k, v)]
            if len(codes) == 0:
                raise ValueError(f"phenotype {phenotypes.names[k]!r} has no ICD-{v} codes to plant")
            n_codes = 1 + (rng.random(len(sel)) < 0.3)
            rows = np.repeat(sel, n_codes)
            parts.append(pd.DataFrame({"adm": rows, "icd_code": codes[rng.integers(0, len(codes), len(rows))],
                                       "icd_version": v, "trap": False}))
    n_fill = rng.integers(2, 9, n_a)
    rows = np.repeat(np.arange(n_a), n_fill)
    fill_code = np.empty(len(rows), dtype=object)
    for v in (9, 10):
        m = version[rows] == v
        if not filler[v]:
            raise ValueError(f"every filler ICD-{v} code is a phenotype code of the definitions file")
        fill_code[m] = np.array(filler[v], dtype=object)[rng.integers(0, len(filler[v]), m.sum())]
    parts.append(pd.DataFrame({"adm": rows, "icd_code": fill_code, "icd_version": version[rows], "trap": False}))
    # traps only for versions that have one under the definitions in use
    trap_rows = np.flatnonzero((rng.random(n_a) < 0.06) & np.isin(version, [v for v in traps if traps[v]]))
    trap_code = np.empty(len(trap_rows), dtype=object)
    for v in (9, 10):
        m = version[trap_rows] == v
        if m.any():
            trap_code[m] = np.array(traps[v], dtype=object)[rng.integers(0, len(traps[v]), m.sum())]
    parts.append(pd.DataFrame({"adm": trap_rows, "icd_code": trap_code, "icd_version": version[trap_rows],
                               "trap": True}))
    dx = pd.concat(parts, ignore_index=True)
    # one code once per admission (as in MIMIC); a random order gives seq_num
    dx = dx.drop_duplicates(["adm", "icd_code", "icd_version"]).reset_index(drop=True)
    dx["order"] = rng.random(len(dx))
    dx = dx.sort_values(["adm", "order"], kind="stable")
    dx["seq_num"] = dx.groupby("adm").cumcount() + 1
    dx["subject_id"], dx["hadm_id"] = subj[dx["adm"].to_numpy()], hadm[dx["adm"].to_numpy()]
    dx = dx.sort_values(["subject_id", "hadm_id", "seq_num"], kind="stable")
    return dx[["subject_id", "hadm_id", "seq_num", "icd_code", "icd_version", "trap"]].reset_index(drop=True)


def write_diagnoses(path, dx: pd.DataFrame) -> int:
    table = pa.table({c: dx[c].to_numpy() if c != "icd_code" else dx[c].astype(str).to_numpy()
                      for c in HEADERS["hosp/diagnoses_icd"]})
    return write_table(path, table)


def write_d_labitems(path, lab_itemids) -> int:
    ids = sorted(set(LAB_ITEMS) | set(lab_itemids))
    rows = [LAB_ITEMS.get(i, (f"Lab item {i}", "Blood", "Chemistry")) for i in ids]
    table = pa.table({"itemid": np.array(ids, np.int64), "label": [r[0] for r in rows],
                      "fluid": [r[1] for r in rows], "category": [r[2] for r in rows]})
    return write_table(path, table)


#: ``specimen_id`` = 1,000,000 + (panel number x multiplier + shift) mod a prime: unique per panel
#: (an affine map is a bijection modulo a prime) without holding every id drawn so far.
_SPECIMEN_PRIME = 89_999_999
_SPECIMEN_MULTIPLIER = 48_271
_SPECIMEN_SHIFT = 7_654_321


def _specimen_ids(panel_numbers: np.ndarray) -> np.ndarray:
    if len(panel_numbers) and panel_numbers.max() >= _SPECIMEN_PRIME:
        raise ValueError(f"more than {_SPECIMEN_PRIME:,} lab panels: specimen_id would repeat")
    return 1_000_000 + (panel_numbers * _SPECIMEN_MULTIPLIER + _SPECIMEN_SHIFT) % _SPECIMEN_PRIME


class _LabLayout:
    """Admissions and stays grouped by patient in ``subject_id`` order: the unit order of labevents.

    Within a patient, admissions and stays keep the cohort's order. ``chunks(n)`` gives
    consecutive groups of whole patients holding about ``n`` stays each.
    """

    def __init__(self, cohort: Cohort):
        subjects, self.stays_per_patient = patients_by_subject(cohort)
        a = cohort.admissions.reset_index(drop=True)
        a_unit = np.searchsorted(subjects, a["subject_id"].to_numpy())
        order = np.argsort(a_unit, kind="stable")
        self.adm, self.adm_unit = a.iloc[order].reset_index(drop=True), a_unit[order]
        s = cohort.stays.reset_index(drop=True)
        s_unit = np.searchsorted(subjects, s["subject_id"].to_numpy())
        order = np.argsort(s_unit, kind="stable")
        self.stays, self.stay_unit = s.iloc[order].reset_index(drop=True), s_unit[order]

    def chunks(self, chunk_stays: int) -> list[tuple[int, int]]:
        """(first, end) patient positions of each chunk."""
        return patient_chunks(self.stays_per_patient, chunk_stays)

    def part(self, first: int, end: int):
        """Admissions, stays and their chunk-local unit (patient) positions for patients [first, end)."""
        a0, a1 = np.searchsorted(self.adm_unit, [first, end])
        s0, s1 = np.searchsorted(self.stay_unit, [first, end])
        return (self.adm.iloc[a0:a1].reset_index(drop=True), self.adm_unit[a0:a1] - first,
                self.stays.iloc[s0:s1].reset_index(drop=True), self.stay_unit[s0:s1] - first)


def _lab_panels(a, a_unit, s, s_unit, draws: UnitDraws) -> dict:
    """Panel times of a chunk of patients: a 24 h grid over each admission (from a per-patient
    offset), a 12 h grid over each ICU stay and outpatient panels (no ``hadm_id``) before the
    patient's first admission. Panels are grouped by kind, then by admission/stay, then time."""
    n_units = len(draws)
    adm_dur = (a["dischtime"] - a["admittime"]).to_numpy() / HOUR
    offset = draws.uniform(0.5, 6.0)
    pa_idx, pa_t = _schedule(adm_dur, 24.0, offset[a_unit], np.ones(len(a), bool), draws, 0.3, owner=a_unit)
    st_dur = (s["outtime"] - s["intime"]).to_numpy() / HOUR
    ps_idx, ps_t = _schedule(st_dur, 12.0, 1.0, np.ones(len(s), bool), draws, 0.35, owner=s_unit)
    s_adm = pd.Series(np.arange(len(a)), index=a["hadm_id"].to_numpy()).loc[s["hadm_id"].to_numpy()].to_numpy()
    first_adm = np.searchsorted(a_unit, np.arange(n_units))
    n_out = draws.poisson(1.2)
    po_unit = np.repeat(np.arange(n_units), n_out)
    po_adm = first_adm[po_unit]
    days_before = np.round(draws.uniform(2, 400, rows=po_unit) * 24 * HOUR).astype(np.int64)
    po_time = a["admittime"].to_numpy()[po_adm] - days_before
    return {
        "time": np.concatenate([_minutes(a["admittime"].to_numpy()[pa_idx], pa_t),
                                _minutes(s["intime"].to_numpy()[ps_idx], ps_t), po_time // 60 * 60]),
        "adm": np.concatenate([pa_idx, s_adm[ps_idx], po_adm]),
        "kind": np.concatenate([np.zeros(len(pa_idx), int), np.ones(len(ps_idx), int), np.full(len(po_adm), 2)]),
        "stay": np.concatenate([np.full(len(pa_idx), -1), ps_idx, np.full(len(po_adm), -1)]),
    }


def _lab_chunk(a, a_unit, s, s_unit, draws: UnitDraws, lab_itemids, providers, first_panel: int,
               first_id: int) -> tuple[pa.Table, int, int]:
    """The labevents rows of a chunk of patients, sorted by (subject_id, charttime, itemid), the
    number of panels and the number of distinct rows (duplicates repeat a row, ``labevent_id``
    included). ``first_panel`` and ``first_id`` count the panels and distinct rows written before."""
    panels = _lab_panels(a, a_unit, s, s_unit, draws)
    times, adm, kind, stay = panels["time"], panels["adm"], panels["kind"], panels["stay"]
    unit = a_unit[adm]
    # factors: in the ICU the stay's, else the admission's with a milder severity
    fa = {c: a[c].to_numpy()[adm] for c in _factors(a)}
    sev_adm = np.zeros(len(adm))
    in_icu = stay >= 0
    sev_adm[in_icu] = s["severity"].to_numpy()[stay[in_icu]]
    fa["severity"] = sev_adm
    mu = physiology(fa, len(adm))
    n_panel = len(times)
    hadm = a["hadm_id"].to_numpy()[adm].astype(float)
    hadm[kind == 2] = np.nan
    hadm[draws.random(rows=unit) < 0.02] = np.nan          # some inpatient rows are not linked either
    # panels numbered patient by patient (the file order of chunks), whatever the chunk holds
    number = np.empty(n_panel, np.int64)
    number[np.argsort(unit, kind="stable")] = np.arange(n_panel)
    specimen = _specimen_ids(first_panel + number)
    priority = np.where(kind == 2, 2, np.where(draws.random(rows=unit) < 0.6, 0, 1))
    provider = np.where(draws.random(rows=unit) < 0.7, draws.integers(0, len(providers), rows=unit), -1)

    items = sorted(set(lab_itemids) | set(LAB_ITEMS))
    cols = {k: [] for k in ("panel", "itemid", "valuenum")}
    for (p_out, p_in), panel_items in LAB_PANELS:
        take = draws.random(rows=unit) < np.where(in_icu, p_in, p_out)
        for itemid in panel_items:
            if itemid not in items:
                continue
            idx = np.flatnonzero(take)
            key = LAB_ITEMS[itemid][7]
            base = mu[key][idx]
            sd = LAB_NOISE[key]
            noise = draws.normal(rows=unit[idx])
            v = base * np.exp(sd * noise) if key in LOG_NOISE else base + sd * noise
            cols["panel"].append(idx)
            cols["itemid"].append(np.full(len(idx), itemid))
            cols["valuenum"].append(np.round(np.maximum(v, 0.0), LAB_ITEMS[itemid][6]))
    # variables-file lab items this module has no model for get plausible generic values
    for extra in sorted(set(lab_itemids) - set(LAB_ITEMS)):
        idx = np.flatnonzero(draws.random(rows=unit) < 0.3)
        cols["panel"].append(idx)
        cols["itemid"].append(np.full(len(idx), extra))
        cols["valuenum"].append(np.round(np.exp(draws.normal(0, 0.3, rows=unit[idx])), 2))
    panel = np.concatenate(cols["panel"])
    itemid = np.concatenate(cols["itemid"]).astype(np.int64)
    valuenum = np.concatenate(cols["valuenum"])
    n = len(panel)
    row_unit = unit[panel]
    u = draws.random(rows=row_unit)
    # mess: out-of-range values and non-numeric results (valuenum empty)
    valuenum = np.where(u < 0.002, valuenum * 60.0, valuenum)
    valuenum = np.where((u >= 0.002) & (u < 0.003), 0.0, valuenum)
    text_code = np.where(u > 0.985, 1, 0) + np.where(u > 0.995, 1, 0) + np.where(u > 0.998, 1, 0)
    value_text = take_strings(["", "___", "ERROR", "UNABLE TO REPORT"], text_code)
    numeric = text_code == 0
    value = pa.array(np.where(numeric, float_strings(valuenum).to_numpy(zero_copy_only=False),
                              value_text.to_numpy(zero_copy_only=False)).astype(object))
    info = [LAB_ITEMS.get(int(i), (f"Lab item {i}", "Blood", "Chemistry", None, None, None, 2, "")) for i in items]
    item_pos = np.searchsorted(np.array(items), itemid)
    uom = take_strings([r[3] for r in info], item_pos)
    lo = np.array([np.nan if r[4] is None else r[4] for r in info])[item_pos]
    hi = np.array([np.nan if r[5] is None else r[5] for r in info])[item_pos]
    abnormal = numeric & ((valuenum < np.nan_to_num(lo, nan=-np.inf)) | (valuenum > np.nan_to_num(hi, nan=np.inf)))
    ptime = times[panel]
    store = ptime + np.round(draws.uniform(10, 240, rows=row_unit)).astype(np.int64) * 60
    has_store = draws.random(rows=row_unit) > 0.01
    comments = np.where(draws.random(rows=row_unit) < 0.01, 1, 0)
    dup = draws.random(rows=row_unit) < 0.003
    subject = a["subject_id"].to_numpy()[adm[panel]]
    order = np.lexsort((np.arange(n), itemid, ptime, subject))
    labevent_id = np.empty(n, np.int64)
    labevent_id[order] = np.arange(first_id + 1, first_id + n + 1)
    # exact duplicate rows (same labevent_id too), as loaded twice
    order = np.repeat(order, 1 + dup[order])
    sub = lambda arr: arr[order]  # noqa: E731
    table = pa.table({
        "labevent_id": sub(labevent_id),
        "subject_id": sub(subject),
        "hadm_id": pa.array(sub(hadm[panel]), mask=np.isnan(sub(hadm[panel]))).cast(pa.int64()),
        "specimen_id": sub(specimen[panel]),
        "itemid": sub(itemid),
        "order_provider_id": pa.array(sub(providers[np.maximum(provider, 0)][panel]),
                                      mask=sub(provider[panel] < 0)),
        "charttime": datetime_strings(sub(ptime)),
        "storetime": datetime_strings(sub(store), sub(has_store)),
        "value": value.take(pa.array(order)),
        "valuenum": pa.array(sub(valuenum), mask=sub(~numeric)),
        "valueuom": uom.take(pa.array(order)),
        "ref_range_lower": pa.array(sub(lo), mask=np.isnan(sub(lo))),
        "ref_range_upper": pa.array(sub(hi), mask=np.isnan(sub(hi))),
        "flag": pa.array(np.where(sub(abnormal), "abnormal", None)),
        "priority": take_strings(["STAT", "ROUTINE", None], sub(priority[panel])),
        "comments": take_strings([None, "___"], sub(comments)),
    })
    return table, n_panel, n


def write_labevents(path, cohort: Cohort, seed: int, lab_itemids, chunk_stays: int = 2000) -> int:
    """Lab panels every ~24 h of each admission and ~12 h of each ICU stay, plus outpatient panels.

    Written chunk by chunk of whole patients (about ``chunk_stays`` stays each) in ``subject_id``
    order; each patient's values come from its own generator, so the file does not depend on
    ``chunk_stays``. Returns the number of rows written.
    """
    layout = _LabLayout(cohort)
    providers = _provider_ids(unit_generator(seed, STREAMS["lab_providers"], 0), 400)
    n_panels = n_distinct = 0
    with GzipCsvWriter(path, HEADERS["hosp/labevents"]) as writer:
        for first, end in layout.chunks(chunk_stays):
            a, a_unit, s, s_unit = layout.part(first, end)
            draws = UnitDraws(seed, STREAMS["labevents"], range(first, end))
            table, panels, distinct = _lab_chunk(a, a_unit, s, s_unit, draws, lab_itemids, providers,
                                                 n_panels, n_distinct)
            n_panels, n_distinct = n_panels + panels, n_distinct + distinct
            writer.write(table)
        return writer.n_rows


# ---------------------------------------------------------------------------------------------
# icu tables
# ---------------------------------------------------------------------------------------------

def write_icustays(path, cohort: Cohort) -> int:
    s = cohort.stays.sort_values("stay_id", kind="stable")
    los = (s["outtime"] - s["intime"]).to_numpy() / 86400.0
    table = pa.table({
        "subject_id": s["subject_id"].to_numpy(), "hadm_id": s["hadm_id"].to_numpy(),
        "stay_id": s["stay_id"].to_numpy(), "first_careunit": s["first_careunit"].astype(str).to_numpy(),
        "last_careunit": s["last_careunit"].astype(str).to_numpy(),
        "intime": datetime_strings(s["intime"]), "outtime": datetime_strings(s["outtime"]),
        "los": pa.array([f"{x:.17g}" for x in los], type=pa.string()),
    })
    return write_table(path, table)


def write_d_items(path, chart_itemids, output_itemids) -> int:
    rows = []
    for itemid in sorted(set(CHART_ITEMS) | set(chart_itemids)):
        label, abbr, cat, unit, ptype, lo, hi = CHART_ITEMS.get(
            itemid, (f"Chart item {itemid}", f"Item {itemid}", "General", None, "Numeric", None, None))
        rows.append((itemid, label, abbr, "chartevents", cat, unit, ptype, lo, hi))
    for itemid in sorted(set(OUTPUT_ITEMS) | set(output_itemids)):
        label, abbr, cat = OUTPUT_ITEMS.get(itemid, (f"Output item {itemid}", f"Item {itemid}", "Output"))
        rows.append((itemid, label, abbr, "outputevents", cat, "ml", "Numeric", None, None))
    rows.append((225054, "On Pump", "On Pump", "chartevents", "Cardiovascular", None, "Text", None, None))
    rows.append((224082, "Turn", "Turn", "chartevents", "Skin - Impairment", None, "Text", None, None))
    rows.sort()
    cols = list(zip(*rows))
    table = pa.table({
        "itemid": np.array(cols[0], np.int64), "label": list(cols[1]), "abbreviation": list(cols[2]),
        "linksto": list(cols[3]), "category": list(cols[4]), "unitname": pa.array(list(cols[5]), pa.string()),
        "param_type": list(cols[6]),
        "lownormalvalue": pa.array([None if v is None else float(v) for v in cols[7]], pa.float64()),
        "highnormalvalue": pa.array([None if v is None else float(v) for v in cols[8]], pa.float64()),
    })
    return write_table(path, table)


class _Rows:
    """Collects chartevents columns for one batch of stays."""

    def __init__(self):
        self.parts = []

    def add(self, stay, t, itemid, valuenum=None, text=None):
        n = len(stay)
        if n == 0:
            return
        itemid = np.broadcast_to(np.asarray(itemid, np.int64), (n,))
        self.parts.append((np.asarray(stay), np.asarray(t, float), itemid,
                           np.full(n, np.nan) if valuenum is None else np.asarray(valuenum, float),
                           np.full(n, None, object) if text is None else np.asarray(text, object),
                           np.full(n, text is not None)))

    def frame(self):
        """(stay, hours, itemid, valuenum, text, is_text) over all added rows."""
        return tuple(np.concatenate([p[i] for p in self.parts]) for i in range(6))


def _chart_batch(s: pd.DataFrame, draws: UnitDraws, rounds_per_hour: float, chart_ids: set) -> _Rows:
    """Chartevents of a chunk of stays (``s`` indexed 0..n-1, one unit of ``draws`` per stay)."""
    n = len(s)
    dur = (s["outtime"] - s["intime"]).to_numpy() / HOUR
    f = _factors(s)
    mu = physiology(f, n)
    # Stays that end in an ICU death deteriorate only modestly within the window: a stronger drift
    # makes mortality separable from the vitals alone (AUROC ~0.99, far above the ~0.85-0.9 seen on
    # MIMIC) and leaves no room for the image findings that also drive death.
    drift_raw = 0.4 * s["severity"].to_numpy() + 0.5 * s["icu_death"].to_numpy() - 0.3
    rows = _Rows()
    ones = np.ones(n, bool)

    def drift(stay, t):
        return drift_raw[stay] * np.minimum(t, 96.0) / 48.0

    hr_off, bp_off = draws.normal(0, 6), draws.normal(0, 8)
    rr_off, spo2_off = draws.normal(0, 2), draws.normal(0, 1.0)
    arterial = draws.random() < 0.35
    vented = draws.random() < sigmoid(-0.9 + 1.0 * s["severity"].to_numpy() + 0.9 * s["hypoxemia"].to_numpy())
    # ---- vital rounds (HR, BP triple, RR, SpO2 share one charttime)
    early = draws.random() < 0.1      # first round charted before intime (ED hand-over)
    stay, t = _schedule(dur, 1.0 / rounds_per_hour, 0.05, ones, draws, 0.3)
    first = np.r_[True, stay[1:] != stay[:-1]] if len(stay) else np.zeros(0, bool)
    t = np.where(first & early[stay], -draws.uniform(0.1, 1.0, rows=stay), t)
    d = drift(stay, np.maximum(t, 0))
    hr = mu["heart_rate"][stay] + hr_off[stay] + 8 * d + draws.normal(0, 5, rows=stay)
    sbp = mu["sbp"][stay] + bp_off[stay] - 7 * d + draws.normal(0, 9, rows=stay)
    dbp = mu["dbp"][stay] + 0.5 * bp_off[stay] - 4 * d + draws.normal(0, 6, rows=stay)
    mbp = (sbp + 2 * dbp) / 3 + draws.normal(0, 3, rows=stay)
    rr = mu["rr"][stay] + rr_off[stay] + 1.5 * d + draws.normal(0, 2.5, rows=stay)
    spo2 = np.minimum(mu["spo2_recorded"][stay] + spo2_off[stay] - 0.8 * d + draws.normal(0, 1.2, rows=stay), 100)
    u = draws.random(rows=stay)
    hr = np.where(u < 0.0015, 0.0, np.where(u > 0.9985, 999.0, hr))       # charting errors
    art = arterial[stay]
    rows.add(stay, t, 220045, np.round(hr))
    rows.add(stay, t, np.where(art, 220050, 220179), np.round(sbp))
    rows.add(stay, t, np.where(art, 220051, 220180), np.round(dbp))
    art_mean = np.where(art & (draws.random(rows=stay) < 0.2), 225312, 220052)
    rows.add(stay, t, np.where(art, art_mean, 220181), np.round(mbp))
    rows.add(stay, t, np.where(vented[stay], 224690, 220210), np.round(np.maximum(rr, 4)))
    rows.add(stay, t, 220277, np.round(np.maximum(spo2, 60)))
    # ---- temperature every 4 h: Fahrenheit for most stays; some Celsius stays get a F value typed in
    fahrenheit = draws.random() < 0.8
    stay, t = _schedule(dur, 4.0, 0.5, ones, draws)
    temp = mu["temp_c"][stay] + draws.normal(0, 0.25, rows=stay)
    is_f = fahrenheit[stay]
    typo = ~is_f & (draws.random(rows=stay) < 0.01)
    value = np.where(is_f | typo, temp * 9 / 5 + 32, temp)
    rows.add(stay, t, np.where(is_f, 223761, 223762), np.round(value, 1))
    # ---- GCS every 4 h (text value + valuenum)
    stay, t = _schedule(dur, 4.0, 1.0, ones, draws)
    loss = mu["gcs_loss"][stay] + draws.normal(0, 0.5, rows=stay)
    for itemid, top in ((220739, 4), (223900, 5), (223901, 6)):
        score = np.clip(np.round(top - loss * top / 6.0), 1, top).astype(int)
        names = GCS_TEXT[itemid]
        text = np.array([names[k] for k in range(top + 1) if k in names], dtype=object)[score - 1]
        rows.add(stay, t, itemid, score, text)
    # ---- heart rhythm every 4 h
    arr = s["arrhythmia"].to_numpy()
    cond = s["conduction"].to_numpy()
    af = draws.random() < sigmoid(-2.2 + 2.4 * arr)
    af_kind = np.where(draws.random() < 0.85, 3, 4)
    conduction = (draws.random() < sigmoid(-2.6 + 2.6 * cond)) & ~af
    conduction_kind = np.array([5, 6, 7, 8, 8])[draws.integers(0, 5)]
    main = np.where(af, af_kind, np.where(conduction, conduction_kind, 0))
    stay, t = _schedule(dur, 4.0, 0.5, ones, draws)
    hr_now = mu["heart_rate"][stay] + hr_off[stay]
    sinus = np.where(hr_now > 100, 1, np.where(hr_now < 60, 2, 0))
    code = np.where(draws.random(rows=stay) < 0.8, main[stay], sinus)
    code = np.where((main[stay] == 0), sinus, code)
    code = np.where(draws.random(rows=stay) < 0.01, 9, code)
    text = np.array(RHYTHMS, dtype=object)[code]
    pad = draws.random(rows=stay) < 0.05
    text[pad] = text[pad] + " "
    rows.add(stay, t, 220048, None, text)
    # ---- capillary refill every 8 h (right; left for half the stays)
    p_abn = sigmoid(-2.2 + 1.3 * s["severity"].to_numpy())
    for itemid, mask in ((223951, ones), (224308, draws.random() < 0.5)):
        stay, t = _schedule(dur, 8.0, 2.0, mask, draws)
        text = np.array(CAP_REFILL, dtype=object)[(draws.random(rows=stay) < p_abn[stay]).astype(int)]
        pad = draws.random(rows=stay) < 0.05
        text[pad] = text[pad] + " "
        rows.add(stay, t, itemid, None, text)
    # ---- ventilated stays: FiO2 every 4 h (some charted as a fraction), arterial pH every 8 h
    fraction = draws.random() < 0.1
    stay, t = _schedule(dur, 4.0, 1.5, vented, draws)
    fio2 = np.clip(mu["fio2"][stay] + draws.normal(0, 6, rows=stay), 21, 100)
    rows.add(stay, t, 223835, np.where(fraction[stay], np.round(fio2 / 100, 2), np.round(fio2)))
    stay, t = _schedule(dur, 8.0, 3.0, vented, draws)
    rows.add(stay, t, 223830, np.round(mu["ph"][stay] + draws.normal(0, 0.03, rows=stay), 2))
    # ---- glucose: finger sticks (more for hyperglycaemic stays), serum and whole blood
    glyc = s["glycemia"].to_numpy()
    for itemid, interval, p in ((225664, 6.0, sigmoid(-0.5 + 1.5 * glyc)), (220621, 12.0, np.full(n, 0.3)),
                                (226537, 24.0, np.full(n, 0.1))):
        stay, t = _schedule(dur, interval, 2.0, draws.random() < p, draws)
        g = mu["glucose"][stay] * np.exp(draws.normal(0, 0.12, rows=stay))
        rows.add(stay, t, itemid, np.round(g))
    # ---- weight (admission, daily) and height (cm or inches) once
    weight = np.clip(draws.normal(80, 18), 35, 250)
    height_cm = np.clip(np.where(s["gender"].to_numpy() == "M", 176, 163) + draws.normal(0, 8), 130, 210)
    stay, t = _schedule(dur, 1e9, 0.3, draws.random() < 0.9, draws, 0.0)
    rows.add(stay, t, 226512, np.round(weight[stay], 1))
    stay, t = _schedule(dur, 24.0, 6.0, draws.random() < 0.5, draws, 0.1)
    rows.add(stay, t, 224639, np.round(weight[stay] + draws.normal(0, 1.0, rows=stay), 1))
    which = draws.random()
    stay, t = _schedule(dur, 1e9, 0.4, which < 0.6, draws, 0.0)
    rows.add(stay, t, 226730, np.round(height_cm[stay]))
    stay, t = _schedule(dur, 1e9, 0.4, which > 0.75, draws, 0.0)
    inches = np.round(height_cm[stay] / 2.54)
    inches = np.where(draws.random(rows=stay) < 0.02, 0.0, inches)
    rows.add(stay, t, 226707, inches)
    # ---- unrelated items: O2 device every 4 h (text, trailing spaces), HR alarm limits every 12 h
    stay, t = _schedule(dur, 4.0, 0.7, ones, draws)
    dev = np.where(vented[stay], 4, draws.choice([0.4, 0.4, 0.1, 0.1], rows=stay))
    dev = np.where(draws.random(rows=stay) < 0.01, 5, dev)
    text = np.array(O2_DEVICES, dtype=object)[dev]
    pad = draws.random(rows=stay) < 0.08
    text[pad] = text[pad] + " "
    rows.add(stay, t, 226732, None, text)
    stay, t = _schedule(dur, 12.0, 0.2, ones, draws)
    rows.add(stay, t, 220046, np.full(len(t), 120.0))
    rows.add(stay, t, 220047, np.full(len(t), 50.0))
    # variables-file chart items without a model here: a generic numeric value every 12 h
    for extra in sorted(chart_ids - set(CHART_ITEMS)):
        stay, t = _schedule(dur, 12.0, 1.0, ones, draws)
        rows.add(stay, t, extra, np.round(np.exp(draws.normal(0, 0.3, rows=stay)), 2))
    return rows


def _stays_by_id(cohort: Cohort) -> pd.DataFrame:
    """The stays in file order (by ``stay_id``), indexed 0..n-1: the unit order of the ICU tables."""
    return cohort.stays.sort_values("stay_id", kind="stable").reset_index(drop=True)


def _event_order(draws: UnitDraws, stay, *keys) -> np.ndarray:
    """Row order of a chunk's events: by stay, then ``keys`` (first key most significant); about
    0.3 % of rows are repeated right after themselves (exact duplicate rows, as loaded twice)."""
    dup = draws.random(rows=stay) < 0.003
    order = np.lexsort(tuple(reversed(keys)) + (stay,))
    return np.repeat(order, 1 + dup[order])


def write_chartevents(path, cohort: Cohort, seed: int, chart_ids, chartevents_per_stay=None,
                      chunk_stays: int = 2000) -> int:
    """Write ``icu/chartevents`` chunk by chunk of ``chunk_stays`` stays; returns the number of rows.

    ``chartevents_per_stay`` sets the mean rows per stay by changing how often the vital-sign round
    (6 items) is charted; ``None`` charts it hourly (about 8 rows per ICU hour). Each stay's values
    come from its own generator (:mod:`cbstore.synth._draws`), so the file does not depend on
    ``chunk_stays``.
    """
    s_all = _stays_by_id(cohort)
    mean_h = float(((s_all["outtime"] - s_all["intime"]) / HOUR).mean())
    if chartevents_per_stay is None:
        rate = 1.0
    else:
        other = 2.1 * mean_h  # rows per stay of all other items, measured on the defaults
        rate = float(np.clip((chartevents_per_stay - other) / (6.0 * mean_h), 0.05, 60.0))
    units = {i: (CHART_ITEMS[i][3] if i in CHART_ITEMS else None) for i in set(CHART_ITEMS) | set(chart_ids)}
    item_list = sorted(units)
    uom_list = [units[i] for i in item_list]
    with GzipCsvWriter(path, HEADERS["icu/chartevents"]) as writer:
        for start, end in stay_chunks(len(s_all), chunk_stays):
            s = s_all.iloc[start:end].reset_index(drop=True)
            draws = UnitDraws(seed, STREAMS["chartevents"], range(start, end))
            stay, t, itemid, valuenum, text, is_text = _chart_batch(s, draws, rate, set(chart_ids)).frame()
            charttime = _minutes(s["intime"].to_numpy()[stay], t)
            storetime = charttime + draws.integers(0, 45, rows=stay) * 60
            caregiver = draws.integers(10000, 100000, rows=stay)
            no_caregiver = draws.random(rows=stay) < 0.01
            order = _event_order(draws, stay, charttime, itemid)
            stay, charttime, itemid, valuenum, text, is_text, storetime, caregiver, no_caregiver = (
                x[order] for x in (stay, charttime, itemid, valuenum, text, is_text, storetime, caregiver,
                                   no_caregiver))
            n = len(stay)
            # numeric rows show their number, text rows (GCS too) their text; built in arrow, not
            # as one Python string per row
            num = ~is_text & ~np.isnan(valuenum)
            value = pc.if_else(pa.array(num), float_strings(valuenum), pa.array(text, pa.string()))
            del text
            table = pa.table({
                "subject_id": s["subject_id"].to_numpy()[stay], "hadm_id": s["hadm_id"].to_numpy()[stay],
                "stay_id": s["stay_id"].to_numpy()[stay],
                "caregiver_id": pa.array(caregiver, mask=no_caregiver),
                "charttime": datetime_strings(charttime), "storetime": datetime_strings(storetime),
                "itemid": itemid, "value": value,
                "valuenum": pa.array(valuenum, mask=np.isnan(valuenum)),
                "valueuom": take_strings(uom_list, np.searchsorted(item_list, itemid)),
                "warning": pa.array(np.zeros(n, np.int64), mask=np.isnan(valuenum)),
            })
            writer.write(table)
        return writer.n_rows


def _output_batch(s: pd.DataFrame, draws: UnitDraws, output_ids) -> tuple:
    """Outputevents of a chunk of stays: (stay, hours since intime, itemid, value)."""
    n = len(s)
    dur = (s["outtime"] - s["intime"]).to_numpy() / HOUR
    mu = physiology(_factors(s), n)
    urine_items = [i for i in sorted(output_ids) if i in OUTPUT_ITEMS and i != 226588]
    other = np.array(urine_items or [226559], np.int64)[draws.integers(0, max(len(urine_items), 1))]
    main = np.where(draws.random() < 0.75, 226559, other)
    interval = np.where(main == 226559, 1.0, 3.0)
    parts = []
    for iv in (1.0, 3.0):
        stay, t = _schedule(dur, iv, 0.5, interval == iv, draws, 0.2)
        vol = mu["urine_ml_h"][stay] * iv * np.exp(draws.normal(0, 0.35, rows=stay))
        vol = np.where(draws.random(rows=stay) < 0.02, 0.0, vol)
        vol = np.where(draws.random(rows=stay) < 0.001, 9999.0, vol)
        parts.append((stay, t, main[stay], np.round(vol)))
    stay, t = _schedule(dur, 8.0, 2.0, draws.random() < 0.1, draws)
    parts.append((stay, t, np.full(len(t), 226588), np.round(draws.uniform(0, 150, rows=stay))))
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))


def write_outputevents(path, cohort: Cohort, seed: int, output_ids, chunk_stays: int = 2000) -> int:
    """Write ``icu/outputevents`` (urine output, chest tube drainage) chunk by chunk; returns the rows.

    Each stay's values come from its own generator, so the file does not depend on ``chunk_stays``.
    """
    s_all = _stays_by_id(cohort)
    with GzipCsvWriter(path, HEADERS["icu/outputevents"]) as writer:
        for start, end in stay_chunks(len(s_all), chunk_stays):
            s = s_all.iloc[start:end].reset_index(drop=True)
            draws = UnitDraws(seed, STREAMS["outputevents"], range(start, end))
            stay, t, itemid, value = _output_batch(s, draws, output_ids)
            itemid = itemid.astype(np.int64)
            charttime = _minutes(s["intime"].to_numpy()[stay], t)
            storetime = charttime + draws.integers(0, 60, rows=stay) * 60
            caregiver = draws.integers(10000, 100000, rows=stay)
            order = _event_order(draws, stay, charttime, itemid)
            stay, charttime, itemid, value, storetime, caregiver = (
                x[order] for x in (stay, charttime, itemid, value, storetime, caregiver))
            writer.write(pa.table({
                "subject_id": s["subject_id"].to_numpy()[stay], "hadm_id": s["hadm_id"].to_numpy()[stay],
                "stay_id": s["stay_id"].to_numpy()[stay], "caregiver_id": caregiver,
                "charttime": datetime_strings(charttime), "storetime": datetime_strings(storetime),
                "itemid": itemid, "value": value, "valueuom": pa.array(np.full(len(stay), "ml", dtype=object)),
            }))
        return writer.n_rows
