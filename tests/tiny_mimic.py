"""A hand-written, MIMIC-shaped source of a few stays for exact tests of the build's SQL.

Real table headers (MIMIC-IV v2.2), quoting as in the release (non-NULL fields quoted, NULL as
an empty unquoted field). Every value is chosen so that the expected store content can be
stated by hand (``tests/test_build.py``); the comments next to the rows say what each one tests.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
from PIL import Image

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
