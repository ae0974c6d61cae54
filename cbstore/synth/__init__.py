"""Synthetic MIMIC-shaped sources with planted ground truth (``cbstore synth``).

:func:`write_synthetic_source` writes ``OUT/mimic-iv/`` (MIMIC-IV v2.2 layout: ``hosp/`` and
``icu/`` gzip CSV tables with the real headers and formats), ``OUT/mimic-cxr-jpg/`` (MIMIC-CXR-JPG
2.0.0 layout: metadata, split and CheXpert tables, ``files/pXX/pSUBJECT/sSTUDY/DICOM.jpg``) and
``OUT/truth.json`` (the planted ground truth; never inside the source folders). Each source root
holds ``SYNTHETIC.txt`` and ``cbstore_synthetic.json`` markers. Same seed, same bytes.

Memory
------
The latent world (patients, admissions, stays, diagnoses, the film plan: about 1 KB of data per
stay) is simulated at once; the rows that grow with the source are generated and written chunk by
chunk (``chunk_stays``): chartevents and outputevents by stays in ``stay_id`` order, labevents and
the JPEG films by whole patients in ``subject_id`` order, the stays of ``truth.json`` last. Each
stay, patient and film draws from its own generator, seeded from ``(seed, table, its position)``
(:mod:`cbstore.synth._draws`), and the gzip streams are written without flushes, so every file is
byte-identical whatever the chunk size. The default chunk holds about one million chartevents rows.

Generative model
----------------
Patients, admissions, stays
    Each patient has 1-5 ICU admissions (geometric), 15 % also a hospital-only admission first;
    10 % of ICU admissions have two ICU stays. Patients are drawn until exactly ``n_stays`` stays
    exist. 2 % of patients are minors (anchor_age 14-17); ages above 89 are shown as 91.
    Admissions whose real (un-shifted) date is on or after October 2015 are coded in ICD-10,
    earlier ones in ICD-9 (decided from ``anchor_year_group``), so both versions occur.
Latent factors (standard normal unless said)
    Per admission: renal, infection, glycemia, electrolyte, hypertension, arrhythmia,
    conduction, neuro, liver, bleeding, hypoxemia (all visible in the EHR) and cardiomegaly
    (plus 0.35 x standardised age), opacity, effusion (visible only on X-ray films). Per stay:
    severity = 0.45 frailty(patient) + 0.25 infection + 0.2 renal + 0.2 hypoxemia + 0.75 noise.
EHR
    Per-stay means of every charted / measured item follow the factors
    (:func:`cbstore.synth.ehr.physiology`: e.g. creatinine = exp(0.55 renal), glucose =
    118 exp(0.38 glycemia), temperature = 36.9 + 0.9 max(infection, 0), heart rate up with
    severity, infection and atrial fibrillation, SpO2 down with hypoxemia); each value adds a drift
    over time (worse for high severity and for stays that end in death) and noise. Heart rhythm
    text is "AF ..." with probability sigmoid(-2.2 + 2.4 arrhythmia), paced or "1st AV" with
    sigmoid(-2.6 + 2.6 conduction); capillary refill is abnormal with sigmoid(-2.2 + 1.3 severity).
Phenotypes
    Per admission, phenotype k is present with probability sigmoid(intercept + sum w f)
    (:data:`cbstore.synth.model.PHENOTYPE_MODEL`, by CCS number). EHR-only: septicemia,
    diabetes (both), fluid/electrolyte, essential hypertension, AMI, conduction disorders,
    dysrhythmias, cerebrovascular disease, liver disease, GI hemorrhage, renal failure, CKD, shock.
    Image-only: congestive heart failure (cardiomegaly), pneumonia (opacity), pleurisy (effusion),
    other lower respiratory disease. Both: hypertension with complications, respiratory failure.
    No signal: lipid disorders and coronary atherosclerosis (age only), COPD, upper respiratory,
    complications of care. Labels are planted as ``diagnoses_icd`` rows (1-2 codes of the group in
    the admission's ICD version) among filler codes; 6 % of admissions also get a code valid in
    both versions written with the version in which it is *not* a phenotype code (``V420`` or
    ``V9001`` as ICD-10, ``E860``/``E870``/``E871`` as ICD-9), which a version-blind matcher
    mislabels.
Outcomes
    ICU death per stay with probability sigmoid(-3.2 + 1.2 severity + 0.5 hypoxemia + 0.6 opacity
    + 0.5 effusion + 0.5 cardiomegaly + 0.3 age); a later in-hospital death per admission with
    sigmoid(-4.2 + 0.9 mean severity + 0.3 cardiomegaly + 0.4 age). A death ends the patient's
    history. ICU deaths have ``deathtime`` within [intime, outtime] (0-45 min before outtime,
    ``dischtime`` = ``deathtime``); ``patients.dod`` is the death date (and for 12 % of survivors a
    date after their last discharge). ICU length of stay = exp(log 2.5 + 0.35 severity +
    0.15 infection + 0.6 noise) days, clipped to [0.12, 60]; about 38 % of stays are under 48 h.
X-rays
    A stay has frontal films in [intime, intime + 48 h] with probability sigmoid(a + 1.1 severity)
    (``a`` calibrated so that ``eligible_share``, default 27 %, of the adult stays of >= 48 h have
    one; shorter stays, which are less severe, have a little fewer), more films
    when sicker; most stays have none. Films are also taken up to 30 days before ICU admission,
    after the 48 h prediction time, and just outside both edges; some studies add a lateral
    (LATERAL/LL) image or an image with a blank ``ViewPosition``, and 6 % of stays with films get
    a lateral-only study inside the window. Images render the stay's cardiomegaly, opacity and
    effusion (:mod:`cbstore.synth.images`).
Planted disparity
    Stays whose admission records a race starting with "BLACK" have SpO2 (itemid 220277) charted
    4 points higher than their latent value (capped at 100), like pulse oximeters' known
    overestimation in darker skin. Their latent hypoxemia, and hence their respiratory failure
    and mortality risk, is unchanged, so EHR models that rely on SpO2 underestimate this group's
    risk.

Mess, as in the real files: several stays and admissions per patient, exact duplicate rows
(chartevents, labevents, outputevents), out-of-range values, non-numeric lab results with an empty
``valuenum``, labs with an empty ``hadm_id``, trailing spaces in ``chartevents.value``, charting
just before ``intime``, Fahrenheit temperatures (and Fahrenheit values typed into the Celsius
item), heights in inches, FiO2 as a fraction, ICU deaths whose ``dischtime`` is before ``outtime``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cbstore.build.phenotypes import load_phenotypes
from cbstore.errors import CbstoreError
from cbstore.synth import cxr as _cxr
from cbstore.synth import ehr as _ehr
from cbstore.synth._chunks import default_chunk_stays, patient_chunks, patients_by_subject
from cbstore.synth.model import simulate_cohort
from cbstore.synth.truth import write_truth

__all__ = ["write_synthetic_source", "SynthSummary", "SynthError", "MIMIC_IV_DIR", "MIMIC_CXR_DIR", "TRUTH_FILE"]

MIMIC_IV_DIR = "mimic-iv"
MIMIC_CXR_DIR = "mimic-cxr-jpg"
TRUTH_FILE = "truth.json"
MARKER_TEXT = "SYNTHETIC.txt"
MARKER_JSON = "cbstore_synthetic.json"


class SynthError(CbstoreError, ValueError):
    """Invalid arguments or an output folder that cannot be written."""


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`write_synthetic_source` wrote.

    Attributes
    ----------
    out_dir, mimic_iv, mimic_cxr, truth : str
        The output folder, the two source roots and the truth file.
    n_stays, n_patients, n_admissions : int
    rows : dict of str to int
        Rows per written table (``"hosp/labevents"``, ``"icu/chartevents"``, ``"metadata"``, ...).
    n_images : int
        Image rows in the CXR metadata (JPEG files written only when ``images_written``).
    images_written : bool
    n_eligible_stays : int
        Stays with at least one eligible film (AP/PA within [intime, intime + 48 h]).
    eligible_share : float
    seconds : float
        Wall time of the whole call.
    """

    out_dir: str
    mimic_iv: str
    mimic_cxr: str
    truth: str
    n_stays: int
    n_patients: int
    n_admissions: int
    rows: dict
    n_images: int
    images_written: bool
    n_eligible_stays: int
    eligible_share: float
    seconds: float

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return asdict(self)


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SynthError(f"{out} exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise SynthError(f"{out} is not empty; pass --overwrite (overwrite=True) to replace a synthetic "
                             f"source there, or choose an empty folder")
        for name in (MIMIC_IV_DIR, MIMIC_CXR_DIR):
            root = out / name
            if root.exists() and not (root / MARKER_JSON).is_file():
                raise SynthError(f"{root} exists but is not a cbstore synthetic source (no {MARKER_JSON}); "
                                 f"refusing to delete it. Choose another output folder")
        for name in (MIMIC_IV_DIR, MIMIC_CXR_DIR):
            if (out / name).exists():
                shutil.rmtree(out / name)
        if (out / TRUTH_FILE).exists():
            (out / TRUTH_FILE).unlink()
    out.mkdir(parents=True, exist_ok=True)


def _write_markers(root: Path, version: str, seed: int, n_stays: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER_TEXT).write_text(
        "This folder was written by `cbstore synth`. It is SYNTHETIC: generated data shaped like the\n"
        f"public schema of the release (version {version}); it contains no patient data.\n"
        f"seed: {seed}\nstays: {n_stays}\n", encoding="utf-8")
    (root / MARKER_JSON).write_text(json.dumps(
        {"synthetic": True, "generator": "cbstore synth", "version": version, "seed": seed,
         "n_stays": n_stays}, indent=2) + "\n", encoding="utf-8")


def _subject_chunks(cohort, chunk_stays: int) -> list[tuple[int, int]]:
    """First and last ``subject_id`` of each chunk of whole patients (about ``chunk_stays`` stays)."""
    subjects, stays = patients_by_subject(cohort)
    return [(int(subjects[first]), int(subjects[end - 1])) for first, end in patient_chunks(stays, chunk_stays)]


def write_synthetic_source(out_dir, n_stays: int, seed: int, image_size=64, *, images: bool = True,
                           chartevents_per_stay: float | None = None, eligible_share: float = 0.27,
                           overwrite: bool = False, phenotypes_path=None, variables_path=None,
                           chunk_stays: int | None = None) -> SynthSummary:
    """Write a synthetic MIMIC-IV + MIMIC-CXR-JPG source with planted ground truth.

    Parameters
    ----------
    out_dir : path-like
        Output folder; receives ``mimic-iv/``, ``mimic-cxr-jpg/`` and ``truth.json``.
    n_stays : int
        Number of ICU stays (>= 1).
    seed : int
        Seed of every random draw (same seed and arguments, same bytes).
    image_size : int or (int, int), default 64
        Film size in pixels. An int gives mostly square films with some taller and some wider
        ones (to exercise cropping); a pair (rows, cols) gives that shape for all films.
    images : bool, default True
        Write the JPEG files (metadata tables are written either way; without images a build
        reports the films as missing files).
    chartevents_per_stay : float, optional
        Mean chartevents rows per stay; default charts vital signs hourly (about 650 rows per stay).
    eligible_share : float, default 0.27
        Target share of stays with an eligible film (AP/PA within 48 h of ICU admission).
    overwrite : bool, default False
        Replace an existing synthetic source in ``out_dir``; without it a non-empty folder is refused.
    phenotypes_path, variables_path : path-like, optional
        Definition files (default: the packaged ones).
    chunk_stays : int, optional
        Stays generated and held in memory at once (the event tables, the films and the stays of
        ``truth.json`` are written chunk by chunk); default: about one million chartevents rows
        (:func:`cbstore.synth._chunks.default_chunk_stays`). Every stay, patient and film draws from
        its own generator, so the written bytes do not depend on it; only peak memory does.

    Returns
    -------
    SynthSummary

    Raises
    ------
    SynthError
        Invalid arguments, or ``out_dir`` not empty without ``overwrite`` (or holding a folder that is
        not a synthetic source).

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     summary = write_synthetic_source(tmp, n_stays=20, seed=1, image_size=32)
    >>> summary.n_stays
    20
    """
    t0 = time.perf_counter()
    if not isinstance(n_stays, (int, np.integer)) or isinstance(n_stays, bool) or n_stays < 1:
        raise SynthError(f"n_stays must be a positive integer, got {n_stays!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise SynthError(f"seed must be a non-negative integer, got {seed!r}")
    shape = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size,)
    if len(shape) not in (1, 2) or any(not isinstance(v, (int, np.integer)) or v < 8 for v in shape):
        raise SynthError(f"image_size must be an int >= 8 or a pair (rows, cols) of them, got {image_size!r}")
    if not 0.0 < eligible_share < 1.0:
        raise SynthError(f"eligible_share must be in (0, 1), got {eligible_share!r}")
    if chartevents_per_stay is not None and not chartevents_per_stay > 0:
        raise SynthError(f"chartevents_per_stay must be positive, got {chartevents_per_stay!r}")
    if chunk_stays is None:
        chunk_stays = default_chunk_stays(chartevents_per_stay)
    if not isinstance(chunk_stays, (int, np.integer)) or isinstance(chunk_stays, bool) or chunk_stays < 1:
        raise SynthError(f"chunk_stays must be a positive integer, got {chunk_stays!r}")
    n_stays, seed, chunk_stays = int(n_stays), int(seed), int(chunk_stays)

    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    ph = load_phenotypes(phenotypes_path)
    items = _ehr.variable_itemids(variables_path)
    # cohort-level draws (patients, admissions, diagnoses, film plan): children 0, 1, 2 and 6 of the
    # seed; the event tables and the films draw per stay, patient or film (cbstore.synth._draws)
    children = np.random.SeedSequence(seed).spawn(8)
    r_cohort, r_adm, r_dx, r_cxr = (np.random.default_rng(children[i]) for i in (0, 1, 2, 6))

    cohort = simulate_cohort(n_stays, r_cohort, ph)
    mimic = out / MIMIC_IV_DIR
    cxr_root = out / MIMIC_CXR_DIR
    _write_markers(mimic, "2.2", seed, n_stays)
    _write_markers(cxr_root, "2.0.0", seed, n_stays)
    rows = {}
    rows["hosp/patients"] = _ehr.write_patients(mimic / "hosp/patients.csv.gz", cohort)
    rows["hosp/admissions"] = _ehr.write_admissions(mimic / "hosp/admissions.csv.gz", cohort, r_adm)
    dx = _ehr.diagnoses_rows(cohort, ph, r_dx)
    rows["hosp/diagnoses_icd"] = _ehr.write_diagnoses(mimic / "hosp/diagnoses_icd.csv.gz", dx)
    rows["hosp/d_labitems"] = _ehr.write_d_labitems(mimic / "hosp/d_labitems.csv.gz", items["labevents"])
    rows["hosp/labevents"] = _ehr.write_labevents(mimic / "hosp/labevents.csv.gz", cohort, seed,
                                                  items["labevents"], chunk_stays)
    rows["icu/icustays"] = _ehr.write_icustays(mimic / "icu/icustays.csv.gz", cohort)
    rows["icu/d_items"] = _ehr.write_d_items(mimic / "icu/d_items.csv.gz", items["chartevents"],
                                             items["outputevents"])
    rows["icu/chartevents"] = _ehr.write_chartevents(mimic / "icu/chartevents.csv.gz", cohort, seed,
                                                     items["chartevents"], chartevents_per_stay, chunk_stays)
    rows["icu/outputevents"] = _ehr.write_outputevents(mimic / "icu/outputevents.csv.gz", cohort, seed,
                                                       items["outputevents"], chunk_stays)
    films = _cxr.plan_films(cohort, r_cxr, eligible_share=eligible_share,
                            image_size=shape if len(shape) == 2 else shape[0])
    rows.update(_cxr.write_metadata_tables(cxr_root, films, cohort, r_cxr))
    (cxr_root / "files").mkdir(exist_ok=True)
    n_written = 0
    if images:
        chunks = _cxr.film_chunks(films, _subject_chunks(cohort, chunk_stays))
        n_written = _cxr.write_images(cxr_root, films, seed, chunks)

    truth = write_truth(out / TRUTH_FILE, cohort, ph, dx, films, rows=rows, seed=seed, image_size=image_size,
                        images_written=images, chunk_stays=chunk_stays)
    s = truth["summary"]
    return SynthSummary(
        out_dir=str(out), mimic_iv=str(mimic), mimic_cxr=str(cxr_root), truth=str(out / TRUTH_FILE),
        n_stays=n_stays, n_patients=s["n_patients"], n_admissions=s["n_admissions"], rows=rows,
        n_images=len(films), images_written=bool(images and n_written == len(films)),
        n_eligible_stays=s["n_stays_with_eligible_film"], eligible_share=s["eligible_share"],
        seconds=round(time.perf_counter() - t0, 3),
    )
