"""Helpers shared by the test files: sources, stores, data, modules and run folders made in the test.

One module, in sections: a hand-written MIMIC-shaped source of a few stays (``write_tiny_source``),
tiny stores with fake cached embeddings (``make_fusion_store``), the missing-modality method
helpers (``tiny_data``, ``module_for``, ``batch_of`` ...), toy modules for the trainer's
extension points (``toy_sources``, ``GrowingNet`` ...) and tiny run folders for the report
(``make_run``, ``make_grid``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from cbstore.store.reader import open_store
from cbstore.store.writer import write_store
from cbstore.testing import random_content
from fusion.data import FusionPart, load_fusion_data
from fusion.evaluation import evaluate_predictions, write_json, write_predictions
from fusion.registry import get_method
from fusion.trainer import FitStage, PartBatches, fit_process_state, task_loss

# --------------------------------------------------------------------------------------------------
# A hand-written, MIMIC-shaped source of a few stays for exact tests of the build's SQL.
#
# Real table headers (MIMIC-IV v2.2), quoting as in the release (non-NULL fields quoted, NULL as
# an empty unquoted field). Every value is chosen so that the expected store content can be
# stated by hand (``tests/cbstore/build/test_build.py``); the comments next to the rows say what each one tests.

HEADERS = {
    "hosp/patients": ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"],
    "hosp/admissions": ["subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
                        "admit_provider_id", "admission_location", "discharge_location", "insurance", "language",
                        "marital_status", "race", "edregtime", "edouttime", "hospital_expire_flag"],
    "hosp/diagnoses_icd": ["subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"],
    "hosp/labevents": ["labevent_id", "subject_id", "hadm_id", "specimen_id", "itemid", "order_provider_id",
                       "charttime", "storetime", "value", "valuenum", "valueuom", "ref_range_lower",
                       "ref_range_upper", "flag", "priority", "comments"],
    "icu/icustays": ["subject_id", "hadm_id", "stay_id", "first_careunit", "last_careunit", "intime", "outtime",
                     "los"],
    "icu/chartevents": ["subject_id", "hadm_id", "stay_id", "caregiver_id", "charttime", "storetime", "itemid",
                        "value", "valuenum", "valueuom", "warning"],
    "icu/outputevents": ["subject_id", "hadm_id", "stay_id", "caregiver_id", "charttime", "storetime", "itemid",
                         "value", "valueuom"],
}

T0 = "2150-01-01 08:00:00"  # intime of most stays


def _t(hours: float, base: str = T0) -> str:
    stamp = np.datetime64(base.replace(" ", "T")) + np.timedelta64(int(round(hours * 3600)), "s")
    return str(stamp).replace("T", " ")


def write_table(path: Path, header: list[str], rows: list[list], *, compress: bool = True,
                upper: tuple[str, ...] = ()) -> None:
    """Write a MIMIC-style CSV (gz): non-None fields quoted, None as an empty field."""
    lines = [",".join(h.upper() if h in upper else h for h in header)]
    for row in rows:
        assert len(row) == len(header), (path, row)
        lines.append(",".join("" if v is None else '"' + str(v).replace('"', '""') + '"' for v in row))
    data = ("\n".join(lines) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path.write_bytes(gzip.compress(data, mtime=0))
    else:
        path.write_bytes(data)


def _chart(subject, hadm, stay, hours, itemid, value, valuenum=None, base=T0):
    return [subject, hadm, stay, 1, _t(hours, base), _t(hours + 0.1, base), itemid, value,
            valuenum if valuenum is not None else value, None, 0]


def tables() -> dict[str, list[list]]:
    """Rows of every table."""
    patients = [
        [10000001, "M", 60, 2150, "2014 - 2016", None],
        [10000002, "F", 16, 2150, "2014 - 2016", None],        # minor -> excluded
        [10000003, "F", 80, 2148, "2014 - 2016", "2150-01-05"],  # dies (dod only) during stay 30000003
        [10000004, "M", 45, 2150, "2014 - 2016", None],
        [10000005, "M", 70, 2150, "2014 - 2016", None],
        [10000006, "F", 50, 2150, "2014 - 2016", None],
    ]
    admissions = [
        [10000001, 20000001, "2150-01-01 02:00:00", "2150-01-10 12:00:00", None, "EW EMER.", "P1", "EMERGENCY ROOM",
         "HOME", "Medicare", "ENGLISH", "MARRIED", "WHITE - RUSSIAN", None, None, 0],
        [10000002, 20000002, "2150-01-01 02:00:00", "2150-01-09 12:00:00", None, "URGENT", "P1", "EMERGENCY ROOM",
         "HOME", "Other", "ENGLISH", "SINGLE", "BLACK/AFRICAN", None, None, 0],
        [10000003, 20000003, "2150-01-01 02:00:00", "2150-01-05 23:00:00", None, "EW EMER.", "P1", "EMERGENCY ROOM",
         "DIED", "Medicaid", "?", None, "PORTUGUESE", None, None, 0],
        [10000004, 20000004, "2150-01-01 02:00:00", "2150-01-20 12:00:00", "2150-01-04 06:00:00", "EW EMER.", "P1",
         "EMERGENCY ROOM", "DIED", "Medicare", "ENGLISH", "WIDOWED", "HISPANIC/LATINO - CUBAN", None, None, 1],
        [10000005, 20000005, "2150-01-01 02:00:00", "2150-01-20 12:00:00", "2150-01-15 06:00:00", "ELECTIVE", "P1",
         "PHYSICIAN REFERRAL", "DIED", "Private", "ENGLISH", "MARRIED", "", None, None, 1],
        [10000006, 20000006, "2150-01-01 02:00:00", "2150-01-20 12:00:00", None, "ELECTIVE", "P1",
         "PHYSICIAN REFERRAL", "HOME", "Private", "ENGLISH", "MARRIED", "ASIAN - KOREAN", None, None, 0],
    ]
    icustays = [
        # subject, hadm, stay, first, last, intime, outtime, los
        [10000001, 20000001, 30000001, "MICU", "MICU", T0, "2150-01-04 08:00:00", "3.0"],
        [10000002, 20000002, 30000002, "MICU", "MICU", T0, "2150-01-04 08:00:00", "3.0"],   # minor
        [10000003, 20000003, 30000003, "SICU", "SICU", T0, "2150-01-05 20:00:00", None],    # los from times: 4.5
        [10000004, 20000004, 30000004, "CCU", "CCU", T0, "2150-01-04 06:00:00", "2.9166666666666665"],
        [10000005, 20000005, 30000005, "CCU", "CCU", T0, "2150-01-02 08:00:00", "1.0"],    # 24 h < window
        [10000006, 20000006, 30000006, "TSICU", "TSICU", T0, "2150-01-09 08:00:00", "8.0"],  # no EHR in window
        [10000001, 20000099, 30000007, "MICU", "MICU", T0, "2150-01-04 08:00:00", "3.0"],  # hadm not in admissions
        # second stay of subject 10000001 in the same admission, later
        [10000001, 20000001, 30000008, "MICU", "MICU", "2150-01-06 00:00:00", "2150-01-09 00:00:00", "3.0"],
    ]
    s1 = (10000001, 20000001, 30000001)
    chart = [
        # heart rate, hour 0: 80 twice (exact duplicate rows) and 90 -> mean of distinct events 85
        _chart(*s1, 0.5, 220045, 80),
        _chart(*s1, 0.5, 220045, 80),
        _chart(*s1, 0.75, 220045, 90),
        _chart(*s1, 1.5, 220045, 500),          # out of range -> dropped; hour 1 has no heart rate
        _chart(*s1, -0.5, 220045, 70),          # before intime -> not used
        _chart(*s1, 48.0, 220045, 70),          # at prediction time -> not used
        _chart(*s1, 47.99, 220045, 100),        # last hour
        # temperature in F (223761) -> C
        _chart(*s1, 2.2, 223761, 98.6),
        # FiO2 as a fraction (below 1 -> x100) and as a percentage, same hour -> mean of 50 and 40
        _chart(*s1, 3.1, 223835, 0.5),
        _chart(*s1, 3.2, 223835, 40),
        # weight: last of the hour
        _chart(*s1, 4.1, 226512, 80),
        _chart(*s1, 4.9, 226512, 82),
        # GCS parts in hour 5 -> total 4 + 6 + 5 = 15; hour 6 only eye -> no total
        _chart(*s1, 5.0, 220739, 4),
        _chart(*s1, 5.1, 223901, 6),
        _chart(*s1, 5.2, 223900, 5),
        _chart(*s1, 6.0, 220739, 3),
        # heart rhythm text: hour 7 "SR (Sinus Rhythm)" then "AF (Atrial Fibrillation) " -> afib
        [*s1, 1, _t(7.1), _t(7.2), 220048, "SR (Sinus Rhythm)", None, None, 0],
        [*s1, 1, _t(7.6), _t(7.7), 220048, "AF (Atrial Fibrillation) ", None, None, 0],
        # hour 8 "Junctional" -> rhythm_other; hour 9 "v paced" -> paced (case-insensitive)
        [*s1, 1, _t(8.1), _t(8.2), 220048, "Junctional", None, None, 0],
        [*s1, 1, _t(9.1), _t(9.2), 220048, "v paced", None, None, 0],
        # capillary refill: hour 10 normal then abnormal (max) -> 1; hour 11 normal -> 0
        [*s1, 1, _t(10.1), _t(10.2), 223951, "Normal <3 Seconds", None, None, 0],
        [*s1, 1, _t(10.3), _t(10.4), 224308, "Abnormal >3 Seconds", None, None, 0],
        [*s1, 1, _t(11.1), _t(11.2), 223951, "Normal <3 Seconds", None, None, 0],
        # numeric item with an empty valuenum -> not used
        [*s1, 1, _t(12.1), _t(12.2), 220045, "___", None, None, 0],
        # glucose charted (220621) in hour 13, pooled with lab glucose below
        _chart(*s1, 13.1, 220621, 100),
        # other stays
        _chart(10000002, 20000002, 30000002, 1.0, 220045, 77),
        _chart(10000003, 20000003, 30000003, 1.0, 220045, 110),
        _chart(10000004, 20000004, 30000004, 1.0, 220045, 60),
        _chart(10000005, 20000005, 30000005, 1.0, 220045, 65),
        _chart(10000006, 20000006, 30000006, 49.0, 220045, 65),   # only after the window
        _chart(10000001, 20000099, 30000007, 1.0, 220045, 75),
        _chart(10000001, 20000001, 30000008, 2.0, 220045, 95, base="2150-01-06 00:00:00"),
    ]
    labs = [
        # glucose lab (50931) in hour 13 with an EMPTY hadm_id -> pooled: mean(100, 140) = 120
        [1, 10000001, None, 1, 50931, None, _t(13.5), _t(14), "140", "140", "mg/dL", None, None, None, None, None],
        # creatinine in hour 14, linked to the admission
        [2, 10000001, 20000001, 2, 50912, None, _t(14.5), _t(15), "1.2", "1.2", "mg/dL", None, None, None, None,
         None],
        # a lab of the same subject before the ICU stay -> not used
        [3, 10000001, 20000001, 3, 50912, None, _t(-2), _t(-1), "9.0", "9.0", "mg/dL", None, None, None, None, None],
        # non-numeric lab result -> not used
        [4, 10000001, 20000001, 4, 50912, None, _t(15.5), _t(16), "HEMOLYZED", None, None, None, None, None, None,
         None],
    ]
    output = [
        # urine: hour 16 two items summed 100 + 50; exact duplicate row ignored
        [10000001, 20000001, 30000001, 1, _t(16.2), _t(16.3), 226559, "100", "mL"],
        [10000001, 20000001, 30000001, 1, _t(16.2), _t(16.3), 226559, "100", "mL"],
        [10000001, 20000001, 30000001, 1, _t(16.7), _t(16.8), 226560, "50", "mL"],
    ]
    diagnoses = [
        [10000001, 20000001, 1, "4019", 9],       # Essential hypertension (ICD-9)
        [10000001, 20000001, 2, " I10 ", 10],     # Essential hypertension (ICD-10, padded)
        [10000001, 20000001, 3, "R65.21", 10],    # Shock, written with a dot
        [10000003, 20000003, 1, "4019", 10],      # not an ICD-10 code -> no label
        [10000004, 20000004, 1, "42731", 9],      # Cardiac dysrhythmias
    ]
    return {"hosp/patients": patients, "hosp/admissions": admissions, "hosp/diagnoses_icd": diagnoses,
            "hosp/labevents": labs, "icu/icustays": icustays, "icu/chartevents": chart, "icu/outputevents": output}


CXR_HEADER = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
              "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
              "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]

#: Films: (dicom_id, subject_id, study_id, view, StudyDate, StudyTime, write_file)
FILMS = [
    ("d-early", 10000001, 50000001, "AP", 21500101, 100000.0, True),   # 10:00 -> eligible for 30000001
    ("d-late", 10000001, 50000002, "PA", 21500102, 201500.5, True),    # 20:15:00.5 -> latest eligible
    ("d-lat", 10000001, 50000002, "LATERAL", 21500102, 201500.5, True),  # lateral -> not eligible
    ("d-after", 10000001, 50000003, "AP", 21500103, 80000.5, True),    # 08:00:00.5, after the prediction time
    ("d-missing", 10000004, 50000004, "AP", 21500101, 90000.0, False),  # file missing
    # eligible for 30000006, which cohort step 5 drops (no EHR in its window): in no store row
    ("d-dropped", 10000006, 50000006, "AP", 21500102, 120000.0, True),
]


def write_tiny_source(root: Path, *, compress: bool = True) -> tuple[Path, Path]:
    """Write the tiny MIMIC-IV and MIMIC-CXR-JPG sources under ``root``; return both folders."""
    iv = root / "mimic-iv" / "2.2"
    for name, rows in tables().items():
        write_table(iv / f"{name}.csv{'.gz' if compress else ''}", HEADERS[name], rows, compress=compress)
    cxr = root / "mimic-cxr-jpg"
    rows = [[d, s, st, "CHEST (PORTABLE AP)", v, 3056, 2544, date, time, "CHEST", "antero-posterior", "Erect"]
            for d, s, st, v, date, time, _ in FILMS]
    write_table(cxr / "mimic-cxr-2.0.0-metadata.csv.gz", CXR_HEADER, rows)
    for d, s, st, *_rest, write in FILMS:
        if write:
            path = cxr / "files" / f"p{str(s)[:2]}" / f"p{s}" / f"s{st}" / f"{d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray((np.arange(48 * 40).reshape(48, 40) % 251).astype(np.uint8))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            path.write_bytes(buf.getvalue())
    (cxr / "files").mkdir(parents=True, exist_ok=True)
    return iv, cxr


def _array_files(store: Path) -> dict[str, bytes]:
    """Every chunk file of a store (metadata JSON, which holds creation times, excluded)."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and not p.name.endswith(".json")}


def assert_same_build(a: Path, b: Path) -> None:
    """Two builds wrote the same files, byte for byte, and the same root attrs but for times and runtime."""
    files_a, files_b = _array_files(a), _array_files(b)
    assert files_a.keys() == files_b.keys() and len(files_a) > 20
    different = [k for k in files_a if files_a[k] != files_b[k]]
    assert different == []
    attrs_a, attrs_b = open_store(a).attrs, open_store(b).attrs
    for key in ("created_at", "runtime"):
        attrs_a.pop(key), attrs_b.pop(key)
    assert attrs_a == attrs_b


# --------------------------------------------------------------------------------------------------
# Tiny stores with fake cached embeddings for the fusion tests.
#
# ``make_fusion_store(path)`` writes a :func:`cbstore.testing.random_content` store and adds
# embeddings ``ehr/ehr-test`` (fold-independent), ``ehr/ehr-perfold`` (per fold) and
# ``cxr/cxr-test``, and a spatial-map embedding ``cxr/cxr-map-test`` (maps ``[4, 2, 2]`` whose
# average pool is its ``values``). The embeddings carry a weak signal of the labels, so a method can learn
# something, and the X-ray embedding is NaN where the store has no film.

EHR_ID, EHR_PERFOLD_ID, CXR_ID, CXR_MAP_ID = "ehr-test", "ehr-perfold", "cxr-test", "cxr-map-test"
EHR_DIM, CXR_DIM = 6, 5
MAP_SHAPE = (4, 2, 2)


def _signal(store) -> np.ndarray:
    """A per-stay score mixing the labels of every task (so each task has some signal)."""
    y = store.labels("mortality").astype(np.float32)
    y += store.labels("phenotype")[:, :3].sum(axis=1) / 3.0
    y += np.clip(store.labels("los"), 0, None) / 6.0
    return y


def _write(store, modality, encoder_id, dim, values_for_fold, present, per_fold=False):
    writer = store.create_embedding(modality, encoder_id, dim, per_fold=per_fold,
                                    attrs={"weights": None, "preprocessing": "test fixture"})
    for r in range(writer.n_regions):
        sl = writer.region(r)
        if per_fold:
            for fold in range(store.n_folds):
                writer.write(r, values_for_fold(fold)[sl], present[sl], fold=fold)
        else:
            writer.write(r, values_for_fold(None)[sl], present[sl])
    writer.finish()


def make_fusion_store(path, *, n_stays: int = 60, image_size: int = 16, n_folds: int = 3,
                      seed: int = 0, embeddings: bool = True, maps: bool = True):
    """Write a tiny store (with fake embeddings unless ``embeddings`` is False, with the spatial
    map unless ``maps`` is False) and open it."""
    write_store(path, random_content(n_stays=n_stays, n_folds=n_folds, window=8, n_features=4,
                                     image_size=image_size, seed=seed))
    store = open_store(path)
    if not embeddings:
        return store
    rng = np.random.default_rng(seed + 1)
    n = store.n_stays
    signal = _signal(store)[:, None]
    ehr = (rng.normal(size=(n, EHR_DIM)) + signal * rng.normal(size=(1, EHR_DIM))).astype(np.float32)
    cxr = (rng.normal(size=(n, CXR_DIM)) + signal * rng.normal(size=(1, CXR_DIM))).astype(np.float32)
    present = store.cxr_present
    cxr[~present] = np.nan
    _write(store, "ehr", EHR_ID, EHR_DIM, lambda fold: ehr, np.ones(n, dtype=bool))
    _write(store, "ehr", EHR_PERFOLD_ID, EHR_DIM, lambda fold: ehr + fold, np.ones(n, dtype=bool),
           per_fold=True)
    _write(store, "cxr", CXR_ID, CXR_DIM, lambda fold: cxr, present)
    if not maps:
        return open_store(path)
    maps = (rng.normal(size=(n, *MAP_SHAPE)) + signal[:, :, None, None]).astype(np.float16)
    maps[~present] = np.nan
    writer = store.create_embedding("cxr", CXR_MAP_ID, MAP_SHAPE[0], map_shape=MAP_SHAPE,
                                    attrs={"weights": None, "preprocessing": "test fixture"})
    for r in range(writer.n_regions):
        sl = writer.region(r)
        pooled = maps[sl].astype(np.float32).mean(axis=(2, 3))
        writer.write(r, pooled, present[sl], spatial=maps[sl])
    writer.finish()
    return open_store(path)


def toy_map(present, generator) -> torch.Tensor:
    """Random spatial maps ``[n, *MAP_SHAPE]`` for a hand-made batch, NaN where ``present`` is False."""
    maps = torch.randn(len(present), *MAP_SHAPE, generator=generator)
    return torch.where(torch.as_tensor(present)[:, None, None, None], maps, torch.nan)


def toy_batch(features, present, seed=0) -> dict:
    """A hand-made mortality batch of ``len(present)`` stays matching :data:`TOY_SPEC`.

    Cached: ``ehr_emb`` and ``cxr_map`` (NaN without a film); raw: ``ehr``, ``ehr_mask`` and 16 px
    films (zeros without one). ``present`` marks the stays with a film.
    """
    g = torch.Generator().manual_seed(seed)
    n = len(present)
    present = torch.tensor(present)
    batch = {"cxr_present": present, "y": torch.randint(0, 2, (n, 1), generator=g).float()}
    if features == "cached":
        batch["ehr_emb"] = torch.randn(n, EHR_DIM, generator=g)
        batch["cxr_map"] = toy_map(present, g)
    else:
        batch["ehr"] = torch.randn(n, 8, 4, generator=g)
        batch["ehr_mask"] = (torch.rand(n, 8, 4, generator=g) > 0.5).float()
        batch["cxr"] = torch.randn(n, 1, 16, 16, generator=g) * 500 * present[:, None, None, None]
    return batch


#: Module specification matching the tiny stores (4 EHR features, 8 hours, 16 px images), for
#: method tests that build a module without data and feed it hand-made batches.
TOY_SPEC = {"task": "mortality", "n_outputs": 1, "n_features": 4, "window_hours": 8,
            "image_size": 16, "ehr_dim": EHR_DIM, "cxr_dim": CXR_DIM,
            "cxr_map_shape": list(MAP_SHAPE)}


def toy_module(cls, features: str, seed: int = 0, **params):
    """The module of method class ``cls`` for ``features``: its test hyperparameters updated by
    ``params``, built from :data:`TOY_SPEC` after seeding torch with ``seed``."""
    import torch

    method = cls(features=features, **{**cls.test_hyperparameters, **params})
    torch.manual_seed(seed)
    return method.build_module({**TOY_SPEC, "features": features})


def train_on_batch(module, batch, *, steps: int, lr: float, batch_size: int = 32, seed: int = 0):
    """Train a toy module in place for ``steps`` Adam steps on random mini-batches of the rows of
    ``batch`` (mortality loss plus the module's ``aux_loss``, if any); return it in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    n = batch["y"].shape[0]
    module.train()
    for _ in range(steps):
        rows = torch.randint(0, n, (batch_size,), generator=generator)
        mini = {k: v[rows] for k, v in batch.items()}
        out = module(mini)
        loss = task_loss(out["logits"], mini["y"], "mortality") + out.get("aux_loss", 0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return module.eval()


# --------------------------------------------------------------------------------------------------
# Shared helpers of the missing-modality method tests: tiny data, a built module, batches.
#
# ``tiny_data(tmp, mode)`` loads mortality from a tiny fusion store; ``module_for(name, data)``
# builds the method's untrained module for that data, with the method's test hyperparameters;
# ``batch_of(data, part, rows)`` returns rows of a part as one batch.

def tiny_store(path, n_stays=60):
    return make_fusion_store(path, n_stays=n_stays)


def tiny_data(store, mode, task="mortality", **kwargs):
    return load_fusion_data(store, task, 0, features=mode, ehr_encoder=EHR_ID, **kwargs)


def method_for(name, data, **params):
    cls = get_method(name)
    return cls(seed=0, features=data.features, **{**cls.test_hyperparameters, **params})


def module_for(name, data, seed=0, **params):
    """The untrained module of method ``name`` for ``data`` (built with a seeded generator)."""
    method = method_for(name, data, **params)
    with fit_process_state(seed, torch.device("cpu"), 1):
        return method.build_module(method._spec(data))


def source_of(data, part, name):
    return PartBatches(data.part(part), get_method(name).inputs_for(data.features))


def batch_of(data, part, name, rows=None):
    source = source_of(data, part, name)
    rows = np.arange(len(source)) if rows is None else np.asarray(rows)
    return source[rows]


def mixed_test_batch(data, name):
    """The test part of ``data`` as one batch for method ``name``, and its X-ray present flags
    (the tiny store's test part mixes stays with and without an X-ray)."""
    batch = batch_of(data, "test", name)
    present = batch["cxr_present"].numpy()
    assert present.any() and not present.all()
    return batch, present


def mixed_setup(store, name, mode, prepare=None):
    """Tiny ``mode`` data, the method's untrained module in eval mode and a mixed test batch.

    ``prepare(module, data)``, if given, runs before eval mode (e.g. a neighbour bank or priors).
    Returns ``(data, module, batch, present)`` as :func:`mixed_test_batch` gives the last two.
    """
    data = tiny_data(store, mode)
    module = module_for(name, data)
    if prepare is not None:
        prepare(module, data)
    batch, present = mixed_test_batch(data, name)
    return data, module.eval(), batch, present


def assert_batch_independent(module, batch, seed=0):
    """Each stay's logits are the same in the whole batch, in a shuffled batch and alone."""
    n = batch["y"].shape[0]
    order = np.random.default_rng(seed).permutation(n)
    with torch.no_grad():
        whole = module(batch)["logits"]
        shuffled = module(with_rows(batch, order))["logits"]
        alone = torch.cat([module(with_rows(batch, [i]))["logits"] for i in range(n)])
    torch.testing.assert_close(shuffled, whole[order])
    torch.testing.assert_close(alone, whole)


def with_rows(batch, rows):
    """Rows ``rows`` of a batch (a dict of tensors) as a new batch."""
    index = torch.as_tensor(np.asarray(rows), dtype=torch.long)
    return {k: v[index] for k, v in batch.items()}


def randomise_xray(batch, rows, seed=0):
    """A copy of ``batch`` whose X-ray inputs (image, embedding or spatial map) at ``rows`` are
    random noise."""
    generator = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in batch.items()}
    index = torch.as_tensor(np.asarray(rows), dtype=torch.long)
    for key in ("cxr", "cxr_emb", "cxr_map"):
        if key in out:
            shape = out[key][index].shape
            out[key][index] = torch.randn(shape, generator=generator) * (
                500.0 if key == "cxr" else 3.0)
    return out


def hide_all_xrays(batch):
    """A copy of ``batch`` in which no stay has an X-ray (zero image, NaN embedding)."""
    out = {k: v.clone() for k, v in batch.items()}
    out["cxr_present"] = torch.zeros_like(out["cxr_present"])
    if "cxr" in out:
        out["cxr"].zero_()
    if "cxr_emb" in out:
        out["cxr_emb"].fill_(float("nan"))
    return out


def fit_and_hide(name, store, mode="cached", **params):
    """Fit ``name`` and predict the test part as loaded and with every X-ray hidden.

    Returns ``(prob, prob_hidden, present)`` where ``present`` marks the test stays with an X-ray.
    """
    data = tiny_data(store, mode)
    method = method_for(name, data, **params).fit(data, device="cpu")
    return predict_with_xrays_hidden(method, data, store, ehr_encoder=EHR_ID)


def predict_with_xrays_hidden(method, data, store, **load_options):
    """Test predictions of a fitted mortality ``method`` on ``data`` and on the same stays with
    every X-ray hidden at test (loaded from ``store`` with ``load_options``).

    Returns ``(prob, prob_hidden, present)`` where ``present`` marks the test stays with an X-ray.
    """
    hidden = load_fusion_data(store, "mortality", 0, features=data.features, cxr_missing_rate=1.0,
                              missing_at=("test",), **load_options)
    return (method.predict_proba(data, "test"), method.predict_proba(hidden, "test"),
            data.part("test").cxr_present)


# --------------------------------------------------------------------------------------------------
# Toy data and toy modules that exercise each extension point of :class:`fusion.trainer.Trainer`.
#
# The data are linearly separable points in ``ehr_emb`` (4 columns); the modules are tiny so that a
# fit takes a fraction of a second.

def toy_part(n=120, seed=0, flip=False, name="train"):
    """A part whose label is ``x0 + 0.5 x1 > 0`` (inverted with ``flip``)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.float32)[:, None]
    y = (1 - y) if flip else y
    return FusionPart(name=name, index=np.arange(n), stay_id=np.arange(n) + 1000, y=y,
                      cxr_present=np.zeros(n, dtype=bool), cxr_masked=np.zeros(n, dtype=bool),
                      ehr_emb=x)


def toy_sources(n=120, flip_val=False):
    """Training and validation batch sources."""
    return (PartBatches(toy_part(n), {"ehr_emb"}),
            PartBatches(toy_part(n // 2, seed=1, flip=flip_val, name="val"), {"ehr_emb"}))


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.dropout = nn.Dropout(0.3)

    def forward(self, batch):
        return {"logits": self.layer(self.dropout(batch["ehr_emb"]))}


class GrowingNet(nn.Module):
    """Adds a head at the end of each epoch in ``grow_at``; the architecture is its extra state."""

    def __init__(self, grow_at=(2,)):
        super().__init__()
        self.grow_at = tuple(grow_at)
        self.base = nn.Linear(4, 1)
        self.dropout = nn.Dropout(0.2)
        self.heads = nn.ModuleList()
        self.initial = {}  # head index -> weight at creation

    def add_head(self):
        head = nn.Linear(4, 1).to(self.base.weight.device)
        self.initial[len(self.heads)] = head.weight.detach().clone()
        self.heads.append(head)

    def forward(self, batch):
        x = self.dropout(batch["ehr_emb"])
        logits = self.base(x)
        for head in self.heads:
            logits = logits + head(x)
        return {"logits": logits}

    def on_train_epoch_end(self, ctx):
        if ctx.epoch in self.grow_at:
            self.add_head()
        ctx.log("heads", len(self.heads))

    def get_extra_state(self):
        return {"heads": len(self.heads)}

    def set_extra_state(self, state):
        while len(self.heads) > state["heads"]:
            del self.heads[len(self.heads) - 1]
        while len(self.heads) < state["heads"]:
            self.add_head()


class BankNet(nn.Module):
    """A neighbour bank built from the training part at fit start, saved as extra state.

    The prediction adds the mean label of the 3 nearest bank rows, scaled by a learned weight.
    """

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.scale = nn.Parameter(torch.ones(1))
        self.register_buffer("bank_x", torch.zeros(0, 4), persistent=False)
        self.register_buffer("bank_y", torch.zeros(0, 1), persistent=False)

    def on_fit_start(self, ctx, train):
        xs, ys = zip(*[(b["ehr_emb"], b["y"]) for b in ctx.batches(train)])
        self.bank_x, self.bank_y = torch.cat(xs), torch.cat(ys)

    def forward(self, batch):
        x = batch["ehr_emb"]
        nearest = torch.cdist(x, self.bank_x).topk(3, largest=False).indices
        neighbours = self.bank_y[nearest].mean(dim=1) - 0.5
        return {"logits": self.layer(x) + self.scale * neighbours}

    def get_extra_state(self):
        return {"bank_x": self.bank_x, "bank_y": self.bank_y}

    def set_extra_state(self, state):
        self.bank_x, self.bank_y = state["bank_x"], state["bank_y"]


class StagedNet(nn.Module):
    """Two branches trained one after the other (``first`` then ``second``)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 1)
        self.second = nn.Linear(4, 1)

    def forward(self, batch):
        x = batch["ehr_emb"]
        return {"logits": self.first(x) + self.second(x), "logits_first": self.first(x)}

    def fit_stages(self):
        return [FitStage("first", trainable=("first",), max_epochs=2,
                         monitor_output="logits_first"),
                FitStage("second", trainable=("second",), max_epochs=3, patience=2)]


class TwoOptimiserNet(nn.Module):
    """Manual optimisation: each branch has its own optimiser, scheduler and loss (as MMTM)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 1)
        self.b = nn.Linear(4, 1)

    def forward(self, batch):
        x = batch["ehr_emb"]
        logits_a, logits_b = self.a(x), self.b(x)
        return {"logits": logits_a + logits_b, "logits_a": logits_a, "logits_b": logits_b}

    def configure_optimizers(self, ctx):
        optimizers = [torch.optim.SGD(self.a.parameters(), lr=0.1, momentum=0.9),
                      torch.optim.SGD(self.b.parameters(), lr=0.2, momentum=0.9)]
        return optimizers, [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)
                            for o in optimizers]

    def training_step(self, batch, ctx):
        total = 0.0
        for key, optimizer in zip(("logits_a", "logits_b"), ctx.optimizers):
            loss = task_loss(self(batch)[key], batch["y"], ctx.task)
            optimizer.zero_grad(set_to_none=True)
            ctx.backward(loss)
            optimizer.step()
            total = total + loss.detach()
        return total


class InnerLoopNet(nn.Module):
    """One inner gradient step on fast weights (``torch.func.functional_call``), as in SMIL."""

    def __init__(self, inner_lr=0.5):
        super().__init__()
        self.inner_lr = inner_lr
        self.layer = nn.Linear(4, 1)
        self.losses = []  # (loss at the slow weights, loss at the fast weights) per step

    def forward(self, batch):
        return {"logits": self.layer(batch["ehr_emb"])}

    def training_step(self, batch, ctx):
        params = dict(self.named_parameters())
        slow = task_loss(torch.func.functional_call(self, params, (batch,))["logits"], batch["y"],
                         ctx.task)
        grads = torch.autograd.grad(slow, list(params.values()), create_graph=True)
        fast = {name: p - self.inner_lr * g for (name, p), g in zip(params.items(), grads)}
        out = torch.func.functional_call(self, fast, (batch,))
        loss = task_loss(out["logits"], batch["y"], ctx.task)
        self.losses.append((float(slow.detach()), float(loss.detach())))
        optimizer = ctx.optimizers[0]
        optimizer.zero_grad(set_to_none=True)
        ctx.backward(loss)
        optimizer.step()
        return {"loss": loss, "out": out}


class Interrupted(Exception):
    """Stands for a kill in the middle of a training epoch."""


def interrupt_during(monkeypatch, epoch: int, stage_index: int = 0) -> None:
    """Make training epoch ``epoch`` of stage ``stage_index`` raise :class:`Interrupted` halfway."""
    from fusion import trainer as trainer_module

    original = trainer_module._Fit._train_epoch

    def train_epoch(fit):
        if (fit.ctx.stage_index, fit.ctx.epoch) == (stage_index, epoch):
            raise Interrupted(f"killed in epoch {epoch}")
        return original(fit)
    monkeypatch.setattr(trainer_module._Fit, "_train_epoch", train_epoch)


def fit_interrupted_and_resumed(make_method, data, checkpoint, monkeypatch, epoch: int = 3):
    """An uninterrupted fit, and a fit killed in ``epoch`` then resumed from ``checkpoint``.

    ``make_method()`` returns a fresh, unfitted method; returns ``(whole, resumed)``, both fitted.
    """
    import pytest

    whole = make_method().fit(data, device="cpu")
    with monkeypatch.context() as patch:
        interrupt_during(patch, epoch)
        with pytest.raises(Interrupted):
            make_method().fit(data, device="cpu", checkpoint=checkpoint)
    return whole, make_method().fit(data, device="cpu", checkpoint=checkpoint)


# --------------------------------------------------------------------------------------------------
# Tiny run folders for the report tests, written directly in the run-folder format.
#
# ``make_run`` writes what ``cbstore fuse`` leaves in a run folder (``config.json``,
# ``predictions.parquet``, ``predictions_permuted_<modality>.parquet``, ``metrics.json`` from the
# evaluator, ``run.json``, ``COMPLETE``) from synthetic scores, without a store or a fit: the
# scores are the label plus noise, ``signal`` setting how well a method separates the classes.

GROUPS = {"gender": ["F", "M"], "age_group": ["18-40", "40-65", "65+"],
          "race": ["WHITE", "BLACK", "ASIAN"], "insurance": ["Medicare", "Other"],
          "admission_type": ["EMERGENCY", "URGENT"]}
POLICIES = {"lgbm-ehr": "not_used", "lgbm-cxr": "train_prevalence", "lgbm-early": "native",
            "lgbm-late": "ehr_only"}
MODALITIES = {"lgbm-ehr": ("ehr",), "lgbm-cxr": ("cxr",), "lgbm-early": ("cxr", "ehr"),
              "lgbm-late": ("cxr", "ehr")}


def _labels(fold: int, n: int) -> np.ndarray:
    """The labels of a fold's stays: the same for every method (they come from the store)."""
    rng = np.random.default_rng(1000 + fold)
    return (rng.random(n) < 0.35).astype(np.int64)


def _frame(fold: int, y: np.ndarray, scores: np.ndarray, part: np.ndarray, stay0: int):
    n = y.size
    rng = np.random.default_rng(7 + fold)
    frame = pd.DataFrame({"stay_id": np.arange(stay0, stay0 + n, dtype=np.int64), "part": part,
                          "fold": fold, "task": "mortality", "y_true_mortality": y,
                          "y_prob_mortality": scores, "cxr_present": rng.random(n) < 0.4,
                          "cxr_masked": False})
    for column, values in GROUPS.items():
        # the last value is rare (a small group)
        weights = np.r_[np.ones(len(values) - 1) * 10, 1.0]
        frame[column] = rng.choice(values, size=n, p=weights / weights.sum())
    return frame


def make_run(out, method: str, *, fold: int = 0, seed: int = 0, signal: float = 2.0,
             rate: float = 0.0, at=("train", "test"), n_test: int = 40, n_val: int = 20,
             cohort: str = "full", config_extra: dict | None = None,
             permuted: bool = True) -> Path:
    """Write one complete run folder under ``out``; return it."""
    n = n_val + n_test
    y = _labels(fold, n)
    rng = np.random.default_rng([fold, seed, len(method), int(rate * 100), int(signal * 10)])
    logits = signal * (y - 0.5) + rng.normal(0.0, 1.0, n) - rate * signal * (y - 0.5)
    scores = 1.0 / (1.0 + np.exp(-logits))
    part = np.array(["val"] * n_val + ["test"] * n_test)
    run_id = hashlib.sha256(json.dumps([method, fold, seed, rate, list(at), signal, cohort,
                                        config_extra]).encode()).hexdigest()[:12]
    folder = Path(out) / run_id
    folder.mkdir(parents=True)
    df = _frame(fold, y, scores, part, stay0=10_000 * (fold + 1))
    meta = {"task": "mortality", "labels": ["mortality"], "method": method, "run_id": run_id,
            "fold": fold, "seed": seed, "absent_cxr_policy": POLICIES[method]}
    write_predictions(df, meta, folder / "predictions.parquet")
    if permuted:
        test = df[df["part"] == "test"].reset_index(drop=True)
        for modality in MODALITIES[method]:
            shuffled = test.copy()
            shuffled["y_prob_mortality"] = rng.permutation(test["y_prob_mortality"].to_numpy())
            write_predictions(shuffled, {**meta, "permuted_modality": modality},
                              folder / f"predictions_permuted_{modality}.parquet")
    config = {"run_id": run_id, "cbstore_version": "0.1.0",
              "store": {"path": "/tmp/store.zarr", "config_sha256": "c0ffee" * 4,
                        "format_version": "1.0.0"},
              "method": method, "hyperparameters": {"n_estimators": 10, "num_leaves": 4},
              "task": "mortality", "fold": fold, "seed": seed, "features": "cached",
              "embeddings": {m: {"encoder_id": f"{m}-test"} for m in MODALITIES[method]},
              "cohort": cohort, "cxr_missing_rate": rate, "missing_at": list(at) if rate else [],
              "mask_seed": seed if rate else None, "predicted_parts": ["val", "test"],
              "n_boot": 50, **(config_extra or {})}
    write_json(config, folder / "config.json")
    metrics = evaluate_predictions(df, meta, n_boot=50, seed=seed, min_group_size=5,
                                   intersections=False)
    write_json(metrics, folder / "metrics.json")
    write_json({"run_id": run_id, "absent_cxr_policy": POLICIES[method]}, folder / "run.json")
    (folder / "COMPLETE").write_text(run_id + "\n")
    return folder


def make_grid(out, *, folds=(0, 1), seeds=(0, 1), rates=(0.5, 1.0)) -> list[Path]:
    """Runs of three methods over folds x seeds, masked runs of lgbm-early, and two methods on
    the matched cohort (fold 0, seed 0)."""
    signals = {"lgbm-ehr": 1.5, "lgbm-cxr": 0.5, "lgbm-early": 2.5}
    folders = []
    for method, signal in signals.items():
        for fold in folds:
            for seed in seeds:
                folders.append(make_run(out, method, fold=fold, seed=seed, signal=signal))
    for rate in rates:
        for fold in folds:
            for seed in seeds:
                folders.append(make_run(out, "lgbm-early", fold=fold, seed=seed, signal=2.5,
                                        rate=rate))
    for method in ("lgbm-ehr", "lgbm-early"):
        folders.append(make_run(out, method, signal=signals[method], cohort="matched"))
    return folders
