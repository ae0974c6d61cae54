"""MIMIC-CXR-JPG 2.0.0 shaped files of the synthetic source: film plan, metadata, split, CheXpert
labels and the JPEG files.

Films are planned per ICU stay: a few before ICU admission, eligible ones inside the first 48 h
(for a share of stays that grows with severity, calibrated to a target share of stays with an
eligible film), and later ones after the prediction time; studies may add a lateral or an image
with a blank ``ViewPosition``. Times are kept in milliseconds (``StudyTime`` has fractions).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image

from cbstore.synth._draws import STREAMS, UnitDraws
from cbstore.synth._io import write_table
from cbstore.synth.images import render_films
from cbstore.synth.model import HOUR, Cohort, sigmoid

HEADERS = {
    "metadata": ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                 "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                 "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"],
    "split": ["dicom_id", "study_id", "subject_id", "split"],
    "chexpert": ["subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                 "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity", "No Finding",
                 "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices"],
}
FILE_NAMES = {"metadata": "mimic-cxr-2.0.0-metadata.csv.gz", "split": "mimic-cxr-2.0.0-split.csv.gz",
              "chexpert": "mimic-cxr-2.0.0-chexpert.csv.gz"}

#: Default rules of a build for a film to be eligible (used for the planted truth).
WINDOW_HOURS = 48
ELIGIBLE_VIEWS = ("AP", "PA")
_MS_HOUR = HOUR * 1000
_VIEW_MEANING = {"AP": "antero-posterior", "PA": "postero-anterior", "LATERAL": "lateral", "LL": "left lateral",
                 "": ""}
_PROCEDURE = {"portable": "CHEST (PORTABLE AP)", "pa_lat": "CHEST (PA AND LAT)", "preop": "CHEST (PRE-OP PA & LAT)"}


def _calibrate_intercept(score: np.ndarray, target: float) -> float:
    """Intercept ``a`` with ``mean(sigmoid(a + score)) == target`` (bisection, deterministic)."""
    lo, hi = -20.0, 20.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if sigmoid(mid + score).mean() < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _hex_ids(rng, n):
    words = rng.integers(0, 2 ** 32, (n, 5), dtype=np.uint64)
    return np.array(["-".join(f"{int(w):08x}" for w in row) for row in words], dtype=object)


def plan_films(cohort: Cohort, rng: np.random.Generator, eligible_share: float = 0.27,
               image_size=64) -> pd.DataFrame:
    """One row per image: who, when, which view, which findings, which pixel shape.

    Returns
    -------
    pandas.DataFrame
        subject_id, stay_id (the stay whose care produced the film), study_id, dicom_id,
        time_ms (study time, ms since 1970), view ("AP", "PA", "LATERAL", "LL" or ""), frontal,
        kind ("pre", "window", "late", "edge_early", "edge_late", "window_lateral"),
        cardiomegaly, opacity, effusion (the film's findings), rows, cols, procedure, orientation.
    """
    s = cohort.stays.sort_values("stay_id", kind="stable").reset_index(drop=True)
    n = len(s)
    intime = s["intime"].to_numpy() * 1000
    outtime = s["outtime"].to_numpy() * 1000
    sev = s["severity"].to_numpy()
    window_end = intime + WINDOW_HOURS * _MS_HOUR
    # in-window frontal studies: a share of stays growing with severity, calibrated on the stays a
    # default build keeps (adults with >= 48 h in the ICU) so that a built store shows the target share
    score = 1.1 * sev
    kept = (s["age"].to_numpy() >= 18) & (outtime - intime >= WINDOW_HOURS * _MS_HOUR)
    a = _calibrate_intercept(score[kept] if kept.any() else score, eligible_share)
    has_win = rng.random(n) < sigmoid(a + score)
    n_win = has_win * (1 + rng.poisson(0.25 + 0.35 * np.maximum(sev, 0)))
    n_pre = rng.poisson(0.5, n)
    n_late = np.minimum(rng.poisson(0.3 + 0.2 * np.maximum((outtime - intime) / (24 * _MS_HOUR) - 2, 0)), 5)
    edge_early = rng.random(n) < 0.04
    edge_late = rng.random(n) < 0.04
    win_lateral = has_win & (rng.random(n) < 0.06)

    def times(counts, lo, hi):
        idx = np.repeat(np.arange(n), counts)
        return idx, (lo[idx] + rng.random(len(idx)) * (hi[idx] - lo[idx])).astype(np.int64)

    win_hi = np.minimum(window_end, outtime)
    parts = []
    for kind, counts, lo, hi in (
        ("window", n_win, intime, win_hi),
        ("pre", n_pre, intime - 30 * 24 * _MS_HOUR, intime - 5 * 60_000),
        ("late", n_late, window_end + 60_000, np.maximum(outtime, window_end + 72 * _MS_HOUR)),
        ("edge_early", edge_early.astype(int), intime - _MS_HOUR, intime - 1000),
        ("edge_late", edge_late.astype(int), window_end + 1000, window_end + _MS_HOUR),
        ("window_lateral", win_lateral.astype(int), intime, win_hi),
    ):
        idx, t = times(counts, lo, hi)
        parts.append(pd.DataFrame({"stay": idx, "time_ms": t, "kind": kind}))
    studies = pd.concat(parts, ignore_index=True)
    studies["subject_id"] = s["subject_id"].to_numpy()[studies["stay"].to_numpy()]
    # fractions of a second as in StudyTime: 0-3 decimals
    frac = rng.choice([0, 10, 250, 500, 531, 93], len(studies))
    studies["time_ms"] = studies["time_ms"] // 1000 * 1000 + frac
    # study times unique per subject (so "the latest film" is never a tie)
    studies = studies.sort_values(["subject_id", "time_ms"], kind="stable").reset_index(drop=True)
    while True:
        same = (studies["subject_id"].diff() == 0) & (studies["time_ms"].diff() == 0)
        if not same.any():
            break
        studies.loc[same, "time_ms"] += 1000
    ns = len(studies)
    studies["study_id"] = rng.choice(10_000_000, ns, replace=False).astype(np.int64) + 50_000_000
    kind = studies["kind"].to_numpy()
    in_icu = np.isin(kind, ["window", "late", "edge_late"])
    frontal_view = np.where(in_icu, np.where(rng.random(ns) < 0.88, "AP", "PA"),
                            np.where(rng.random(ns) < 0.5, "AP", "PA"))
    lateral_view = np.where(rng.random(ns) < 0.8, "LATERAL", "LL")
    add_lateral = (rng.random(ns) < np.where(frontal_view == "PA", 0.9, 0.15)) | (kind == "window_lateral")
    has_frontal = kind != "window_lateral"
    add_blank = rng.random(ns) < 0.03
    # per-study findings: the stay's factors plus a little film-to-film variation
    stay = studies["stay"].to_numpy()
    fac = np.stack([s[f].to_numpy()[stay] for f in ("cardiomegaly", "opacity", "effusion")], 1)
    fac = fac + 0.12 * rng.normal(size=fac.shape)
    img_parts = []
    for present, view in ((has_frontal, frontal_view), (add_lateral, lateral_view),
                          (add_blank, np.full(ns, "", dtype=object))):
        idx = np.flatnonzero(present)
        img_parts.append(pd.DataFrame({"study": idx, "view": np.asarray(view, dtype=object)[idx]}))
    imgs = pd.concat(img_parts, ignore_index=True)
    si = imgs["study"].to_numpy()
    ni = len(imgs)
    imgs["subject_id"] = studies["subject_id"].to_numpy()[si]
    imgs["stay_id"] = s["stay_id"].to_numpy()[stay[si]]
    imgs["study_id"] = studies["study_id"].to_numpy()[si]
    imgs["time_ms"] = studies["time_ms"].to_numpy()[si]
    imgs["kind"] = kind[si]
    imgs["dicom_id"] = _hex_ids(rng, ni)
    # a blank ViewPosition image is really a frontal or a lateral one
    imgs["frontal"] = np.where(imgs["view"] == "", rng.random(ni) < 0.5, np.isin(imgs["view"], ["AP", "PA"]))
    for k, name in enumerate(("cardiomegaly", "opacity", "effusion")):
        imgs[name] = fac[si, k]
    if isinstance(image_size, (tuple, list)):
        rows = np.full(ni, int(image_size[0]))
        cols = np.full(ni, int(image_size[1]))
    else:
        size = int(image_size)
        shape_kind = rng.choice(3, ni, p=[0.75, 0.15, 0.10])
        rows = np.where(shape_kind == 2, round(size * 1.15), size)
        cols = np.where(shape_kind == 1, round(size * 1.2), size)
    imgs["rows"], imgs["cols"] = rows.astype(np.int64), cols.astype(np.int64)
    proc = np.where(in_icu[si] & (frontal_view[si] == "AP"), _PROCEDURE["portable"],
                    np.where(kind[si] == "pre", _PROCEDURE["preop"], _PROCEDURE["pa_lat"]))
    imgs["procedure"] = np.where(rng.random(ni) < 0.02, "", proc)
    imgs["orientation"] = np.where(imgs["view"] == "", "",
                                   np.where(rng.random(ni) < 0.1, "", np.where(in_icu[si], "Recumbent", "Erect")))
    imgs = imgs.sort_values(["subject_id", "study_id", "dicom_id"], kind="stable").reset_index(drop=True)
    return imgs.drop(columns=["study"])


def study_date_time(time_ms: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """``StudyDate`` (int YYYYMMDD) and ``StudyTime`` text (``HHMMSS.fff`` without zero padding)."""
    time_ms = np.asarray(time_ms, np.int64)
    dt = time_ms.astype("datetime64[ms]")
    day = dt.astype("datetime64[D]")
    ymd = pd.DatetimeIndex(day)
    date = (ymd.year * 10000 + ymd.month * 100 + ymd.day).to_numpy().astype(np.int64)
    ms_of_day = (dt - day).astype(np.int64)
    sec, ms = ms_of_day // 1000, ms_of_day % 1000
    hhmmss = (sec // 3600) * 10000 + (sec % 3600) // 60 * 100 + sec % 60
    text = [f"{h}.{(f'{m:03d}'.rstrip('0') or '0')}" for h, m in zip(hhmmss.tolist(), ms.tolist())]
    return date, text


def write_metadata_tables(cxr_root: Path, films: pd.DataFrame, cohort: Cohort, rng) -> dict[str, int]:
    """Write the metadata, split and CheXpert tables; returns their row counts."""
    date, time_text = study_date_time(films["time_ms"].to_numpy())
    view = films["view"].astype(str).to_numpy()

    def text(values):
        v = np.asarray(values, dtype=object).astype(str)
        return pa.array(v, mask=(v == ""))

    meta = pa.table({
        "dicom_id": films["dicom_id"].astype(str).to_numpy(), "subject_id": films["subject_id"].to_numpy(),
        "study_id": films["study_id"].to_numpy(), "PerformedProcedureStepDescription": text(films["procedure"]),
        "ViewPosition": text(view), "Rows": films["rows"].to_numpy(), "Columns": films["cols"].to_numpy(),
        "StudyDate": date, "StudyTime": pa.array(time_text, pa.string()),
        "ProcedureCodeSequence_CodeMeaning": text(films["procedure"]),
        "ViewCodeSequence_CodeMeaning": text([_VIEW_MEANING[v] for v in view]),
        "PatientOrientationCodeSequence_CodeMeaning": text(films["orientation"]),
    })
    counts = {"metadata": write_table(cxr_root / FILE_NAMES["metadata"], meta)}
    subjects = np.unique(films["subject_id"].to_numpy())
    u = rng.random(len(subjects))
    subject_split = pd.Series(np.where(u < 0.975, "train", np.where(u < 0.985, "validate", "test")), index=subjects)
    split = pa.table({
        "dicom_id": films["dicom_id"].astype(str).to_numpy(), "study_id": films["study_id"].to_numpy(),
        "subject_id": films["subject_id"].to_numpy(),
        "split": subject_split.loc[films["subject_id"].to_numpy()].to_numpy().astype(str),
    })
    counts["split"] = write_table(cxr_root / FILE_NAMES["split"], split)
    st = films.groupby("study_id", sort=True).agg(subject_id=("subject_id", "first"),
                                                  stay_id=("stay_id", "first"),
                                                  c=("cardiomegaly", "mean"), o=("opacity", "mean"),
                                                  e=("effusion", "mean")).reset_index()
    st = st.sort_values(["subject_id", "study_id"], kind="stable")
    k = len(st)
    sev = cohort.stays.set_index("stay_id")["severity"].reindex(st["stay_id"].to_numpy()).to_numpy()

    def grade(x, pos, unc, neg):
        out = np.full(k, np.nan)
        out[x > pos] = 1.0
        out[(x > unc) & (x <= pos)] = -1.0
        out[(x < neg) & (rng.random(k) < 0.5)] = 0.0
        return out

    c, o, e = st["c"].to_numpy(), st["o"].to_numpy(), st["e"].to_numpy()
    labels = {
        "Atelectasis": np.where(rng.random(k) < 0.12, 1.0, np.where(rng.random(k) < 0.05, -1.0, np.nan)),
        "Cardiomegaly": grade(c, 1.0, 0.6, -0.3),
        "Consolidation": grade(o, 1.5, 1.2, 0.0),
        "Edema": np.where((c > 1.2) & (rng.random(k) < 0.6), 1.0, np.nan),
        "Enlarged Cardiomediastinum": np.where((c > 0.8) & (rng.random(k) < 0.3), -1.0, np.nan),
        "Fracture": np.where(rng.random(k) < 0.01, 1.0, np.nan),
        "Lung Lesion": np.where(rng.random(k) < 0.02, 1.0, np.nan),
        "Lung Opacity": grade(o, 0.8, 0.5, -0.3),
        "Pleural Effusion": grade(e, 1.0, 0.6, 0.0),
        "Pleural Other": np.where(rng.random(k) < 0.005, 1.0, np.nan),
        "Pneumonia": grade(o, 1.2, 0.8, 0.0),
        "Pneumothorax": np.where(rng.random(k) < 0.02, 1.0, np.where(rng.random(k) < 0.2, 0.0, np.nan)),
        "Support Devices": np.where((sev > 0.8) & (rng.random(k) < 0.7), 1.0, np.nan),
    }
    positive = np.zeros(k, bool)
    for name, v in labels.items():
        if name != "Support Devices":
            positive |= v == 1.0
    labels["No Finding"] = np.where(~positive, 1.0, np.nan)
    chex = {"subject_id": st["subject_id"].to_numpy(), "study_id": st["study_id"].to_numpy()}
    for name in HEADERS["chexpert"][2:]:
        v = labels[name]
        chex[name] = pa.array([f"{x:.1f}" for x in v.tolist()], pa.string(), mask=np.isnan(v))
    counts["chexpert"] = write_table(cxr_root / FILE_NAMES["chexpert"], pa.table(chex))
    return counts


def image_relpath(subject_id, study_id, dicom_id) -> str:
    """``files/p{first two digits}/p{subject}/s{study}/{dicom}.jpg`` as in MIMIC-CXR-JPG."""
    sid = str(int(subject_id))
    return f"files/p{sid[:2]}/p{sid}/s{int(study_id)}/{dicom_id}.jpg"


def film_chunks(films: pd.DataFrame, subject_chunks) -> list[tuple[int, int]]:
    """(first, end) film positions of each group of patients (``films`` sorted by ``subject_id``).

    ``subject_chunks`` lists, per chunk, the first and the last ``subject_id`` of its patients.
    """
    subjects = films["subject_id"].to_numpy()
    return [(int(np.searchsorted(subjects, lo, "left")), int(np.searchsorted(subjects, hi, "right")))
            for lo, hi in subject_chunks]


def write_images(cxr_root: Path, films: pd.DataFrame, seed: int, chunks, quality: int = 90) -> int:
    """Render and save every film as a grayscale JPEG, chunk by chunk; returns the number written.

    ``chunks`` are (first, end) positions in ``films``. Film ``i`` draws from its own generator
    (seeded from ``seed`` and ``i``), so the files do not depend on the chunks.
    """
    written = 0
    for first, end in chunks:
        written += _write_image_chunk(cxr_root, films.iloc[first:end],
                                      UnitDraws(seed, STREAMS["images"], range(first, end)), quality)
    return written


def _write_image_chunk(cxr_root: Path, films: pd.DataFrame, draws: UnitDraws, quality: int) -> int:
    factors = films[["cardiomegaly", "opacity", "effusion"]].to_numpy(np.float32)
    frontal = films["frontal"].to_numpy(bool)
    ap = (films["view"] == "AP").to_numpy() | ((films["view"] == "").to_numpy() & frontal)
    shapes = list(zip(films["rows"].tolist(), films["cols"].tolist()))
    paths = [cxr_root / image_relpath(sub, st, dic) for sub, st, dic in
             zip(films["subject_id"].tolist(), films["study_id"].tolist(), films["dicom_id"].tolist())]
    for folder in sorted({p.parent for p in paths}):
        folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for shape in sorted(set(shapes)):
        idx = np.flatnonzero([sh == shape for sh in shapes])
        pixels = render_films(factors[idx], frontal[idx], ap[idx], shape, draws.take(idx))
        for j, i in enumerate(idx):
            Image.fromarray(pixels[j]).save(paths[i], format="JPEG", quality=quality)
            written += 1
    return written
