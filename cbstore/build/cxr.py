"""Chest X-ray side of the build: MIMIC-CXR-JPG metadata, film selection and image loading.

Three steps, each usable on its own:

1. :func:`read_cxr_metadata` reads ``mimic-cxr-2.0.0-metadata.csv.gz`` into one row per image
   with a parsed study datetime and the image path relative to the release root.
2. :func:`select_films` picks, for every ICU stay, the latest frontal film (AP/PA) taken
   between ICU admission (minus an optional look-back) and the prediction time. Nothing taken
   after the prediction time is ever eligible.
3. :func:`iter_image_batches` decodes the selected films block by block (grayscale, aspect
   preserving resize of the short side, centre crop) so the store writer can stream regions.

Nothing here writes into the MIMIC-CXR-JPG folder.
"""

from __future__ import annotations

import gzip
import warnings
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cbstore.build.sources import CXR_METADATA, find_cxr_file
from cbstore.errors import SourceError

#: One row per image: the official train/validate/test split (not used for cbstore splits).
CXR_SPLIT = "mimic-cxr-2.0.0-split.csv.gz"
#: One row per study: 14 CheXpert labels.
CXR_CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv.gz"
#: One row per study: 14 NegBio labels.
CXR_NEGBIO = "mimic-cxr-2.0.0-negbio.csv.gz"

#: Metadata columns cbstore needs (the file has more).
METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime")

#: Metadata rows :func:`read_cxr_metadata` reads at a time.
METADATA_CHUNK_ROWS = 5_000

#: Columns returned by :func:`select_films`.
SELECTION_COLUMNS = (
    "dicom_id", "study_id", "study_time", "hours_before_prediction", "view_position",
    "n_eligible", "path",
)

#: Absent reason of a stay without an eligible film.
NO_ELIGIBLE_FILM = "no_eligible_film"
#: Prefixes of the absent reason of a selected film that could not be used.
FILE_MISSING = "file_missing"
DECODE_ERROR = "decode_error"

#: Images handed to one worker task (amortises task overhead, keeps blocks responsive).
_TASK_IMAGES = 16


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------

def parse_study_times(study_date: Sequence, study_time: Sequence) -> np.ndarray:
    """Combine MIMIC-CXR ``StudyDate`` and ``StudyTime`` into datetimes (millisecond precision).

    Parameters
    ----------
    study_date : array-like
        Integers ``YYYYMMDD`` (as numbers or strings), e.g. ``21500312``.
    study_time : array-like
        Floats ``HHMMSS.fff`` **without zero padding**: ``71502.25`` is 07:15:02.25 and
        ``502.0`` is 00:05:02. Blank/NaN gives ``NaT``.

    Returns
    -------
    numpy.ndarray
        ``datetime64[ms]``; ``NaT`` where date or time is blank.

    Raises
    ------
    ValueError
        If a non-blank date or time is not a valid calendar date / time of day; the message
        shows the offending values.

    Examples
    --------
    >>> parse_study_times([21500312], [71502.25])
    array(['2150-03-12T07:15:02.250'], dtype='datetime64[ms]')
    """
    date_num = pd.to_numeric(pd.Series(study_date, dtype=object), errors="coerce").to_numpy(float)
    time_num = pd.to_numeric(pd.Series(study_time, dtype=object), errors="coerce").to_numpy(float)
    if date_num.shape != time_num.shape:
        raise ValueError(f"StudyDate and StudyTime lengths differ: {date_num.shape} vs {time_num.shape}")
    blank = np.isnan(date_num) | np.isnan(time_num)
    # Integer arithmetic on the HHMMSS number is the same as left-padding its integer part
    # to six digits, and never depends on how the float was printed.
    ms_code = np.round(np.where(blank, 0.0, time_num) * 1000.0).astype(np.int64)
    hhmmss, frac_ms = np.divmod(ms_code, 1000)
    hour, minute, second = hhmmss // 10000, (hhmmss // 100) % 100, hhmmss % 100
    date_int = np.where(blank, 19700101, date_num).astype(np.int64)
    year, month, day = date_int // 10000, (date_int // 100) % 100, date_int % 100

    bad_time = ~blank & ((time_num < 0) | (hour > 23) | (minute > 59) | (second > 59))
    if bad_time.any():
        examples = ", ".join(repr(v) for v in np.asarray(study_time, dtype=object)[bad_time][:5])
        raise ValueError(f"{int(bad_time.sum())} StudyTime value(s) are not HHMMSS.fff times: {examples}")
    dates = pd.to_datetime(
        pd.DataFrame({"year": year, "month": month, "day": day}), errors="coerce"
    ).to_numpy("datetime64[ms]")
    bad_date = ~blank & (np.isnat(dates) | (date_num != date_int))
    if bad_date.any():
        examples = ", ".join(repr(v) for v in np.asarray(study_date, dtype=object)[bad_date][:5])
        raise ValueError(f"{int(bad_date.sum())} StudyDate value(s) are not YYYYMMDD dates: {examples}")
    offset_ms = ((hour * 60 + minute) * 60 + second) * 1000 + frac_ms
    out = dates + offset_ms.astype("timedelta64[ms]")
    out[blank] = np.datetime64("NaT", "ms")
    return out


def image_paths(subject_id: np.ndarray, study_id: np.ndarray, dicom_id: np.ndarray) -> np.ndarray:
    """Image paths relative to the release root: ``files/p10/p10000032/s50414267/<dicom>.jpg``.

    Parameters
    ----------
    subject_id, study_id : numpy.ndarray
        Integer ids, one per image.
    dicom_id : numpy.ndarray
        String ids, one per image.

    Returns
    -------
    numpy.ndarray
        Object array of str.
    """
    subject = pd.Series(np.asarray(subject_id, dtype=np.int64)).astype(str)
    study = pd.Series(np.asarray(study_id, dtype=np.int64)).astype(str)
    dicom = pd.Series(np.asarray(dicom_id, dtype=object)).astype(str)
    path = "files/p" + subject.str[:2] + "/p" + subject + "/s" + study + "/" + dicom + ".jpg"
    return path.to_numpy(dtype=object)


def read_cxr_metadata(cxr_root: str | Path, *, views: Sequence[str] | None = None,
                      subjects: Sequence[int] | np.ndarray | None = None,
                      chunk_rows: int = METADATA_CHUNK_ROWS) -> pd.DataFrame:
    """Read the MIMIC-CXR-JPG image metadata table, optionally only the rows a film selection can use.

    Parameters
    ----------
    cxr_root : str or path-like
        Root of the MIMIC-CXR-JPG release; the table is ``cxr_root/mimic-cxr-2.0.0-metadata.csv.gz``
        (or the gunzipped ``.csv``).
    views : sequence of str, optional
        Keep only the images of these ``ViewPosition`` values (exact match after stripping
        blanks), e.g. the ``views`` given to :func:`select_films`. Default: all.
    subjects : array-like of int, optional
        Keep only the images of these ``subject_id`` values, e.g. the cohort's. Default: all.
    chunk_rows : int
        Rows read at a time. Only the kept rows of each chunk are parsed and held, so the
        whole table (377,110 rows in v2.0.0) is never in memory as text at once.

    Returns
    -------
    pandas.DataFrame
        One row per kept image, in file order, with columns ``dicom_id`` (str), ``subject_id``
        (int64), ``study_id`` (int64), ``view_position`` (str, ``""`` where blank),
        ``study_time`` (``datetime64[s]``; fractional seconds are rounded *up*, so a film
        counts as taken no earlier than it was, and ``study_time <= prediction_time`` never
        admits a film taken after a whole-second prediction time; ``NaT`` where date or time
        is blank) and ``path`` (str, relative to ``cxr_root``).

    Raises
    ------
    SourceError
        If the file is missing, truncated or not gzip, lacks a needed column, has a blank
        ``dicom_id`` or a non-integer id on any row, or holds unparseable dates or times on a
        kept row. The message names the file and what to do.

    Notes
    -----
    :func:`select_films` of the kept rows equals :func:`select_films` of all rows when
    ``views`` and ``subjects`` are those of the selection: the other rows are never eligible.
    The warning about blank study dates or times counts the kept rows.
    """
    path = find_cxr_file(cxr_root, CXR_METADATA)
    what = f"MIMIC-CXR-JPG metadata {path}"
    with _csv_errors(what):
        header = pd.read_csv(path, nrows=0).columns
    missing = [c for c in METADATA_COLUMNS if c not in header]
    if missing:
        raise SourceError(
            f"{what} lacks column(s) {', '.join(missing)} (has: {', '.join(header)}). "
            f"Use the original {CXR_METADATA} from MIMIC-CXR-JPG v2.0.0."
        )
    if isinstance(views, str):
        views = (views,)
    wanted_subjects = None if subjects is None else np.unique(np.asarray(subjects, dtype=np.int64))
    parts, first_line = [], 2
    chunks = _csv_chunks(path, what, int(chunk_rows), usecols=list(METADATA_COLUMNS),
                         dtype={"dicom_id": str, "subject_id": "int64", "study_id": "int64",
                                "ViewPosition": str, "StudyDate": str, "StudyTime": str},
                         keep_default_na=False)
    with closing(chunks):
        for chunk in chunks:
            if (chunk["dicom_id"] == "").any():
                rows = np.flatnonzero(chunk["dicom_id"].to_numpy() == "")[:5] + first_line
                raise SourceError(f"{what} has blank dicom_id on line(s) {rows.tolist()}.")
            first_line += len(chunk)
            chunk["ViewPosition"] = chunk["ViewPosition"].str.strip()
            keep = np.ones(len(chunk), dtype=bool)
            if views is not None:
                keep &= chunk["ViewPosition"].isin(list(views)).to_numpy()
            if wanted_subjects is not None:
                keep &= np.isin(chunk["subject_id"].to_numpy(np.int64), wanted_subjects)
            if keep.any():  # an empty part would turn the str columns of the others into object ones
                parts.append(_metadata_rows(chunk[keep], what))
    table = pd.concat(parts, ignore_index=True) if parts else _metadata_rows(_no_metadata_rows(), what)
    n_blank = int(table["study_time"].isna().sum())
    if n_blank:
        warnings.warn(
            f"{what}: {n_blank} image(s) have a blank StudyDate or StudyTime; they are never "
            "eligible for a stay.",
            stacklevel=2,
        )
    return table


def _no_metadata_rows() -> pd.DataFrame:
    """Raw metadata columns without rows (a table with no row kept)."""
    return pd.DataFrame({"dicom_id": pd.Series(dtype=object), "subject_id": pd.Series(dtype=np.int64),
                         "study_id": pd.Series(dtype=np.int64), "ViewPosition": pd.Series(dtype=object),
                         "StudyDate": pd.Series(dtype=object), "StudyTime": pd.Series(dtype=object)})


def _metadata_rows(chunk: pd.DataFrame, what: str) -> pd.DataFrame:
    """The :func:`read_cxr_metadata` rows of raw metadata rows (``ViewPosition`` already stripped)."""
    try:
        times = parse_study_times(chunk["StudyDate"].replace("", np.nan),
                                  chunk["StudyTime"].replace("", np.nan))
    except ValueError as exc:
        raise SourceError(f"{what}: {exc}") from exc
    subject = chunk["subject_id"].to_numpy(np.int64)
    study = chunk["study_id"].to_numpy(np.int64)
    dicom = chunk["dicom_id"].to_numpy(dtype=object)
    return pd.DataFrame({
        "dicom_id": dicom,
        "subject_id": subject,
        "study_id": study,
        "view_position": chunk["ViewPosition"].to_numpy(dtype=object),
        "study_time": _ceil_to_seconds(times),
        "path": image_paths(subject, study, dicom),
    })


def _csv_chunks(path: Path, what: str, chunk_rows: int, **kwargs) -> Iterator[pd.DataFrame]:
    """``pandas.read_csv(path, chunksize=chunk_rows, **kwargs)`` chunk by chunk, its errors as :class:`SourceError`.

    Only the reading is translated: an error raised by the caller while it handles a chunk
    stays as it is.
    """
    with _csv_errors(what):
        reader = pd.read_csv(path, chunksize=chunk_rows, **kwargs)
    with reader:
        while True:
            with _csv_errors(what):
                chunk = next(reader, None)
            if chunk is None:
                return
            yield chunk


@contextmanager
def _csv_errors(what: str) -> Iterator[None]:
    """Turn ``pandas.read_csv``'s damaged-file errors into :class:`SourceError`."""
    try:
        yield
    except (EOFError, gzip.BadGzipFile, zlib.error, UnicodeDecodeError) as exc:
        raise SourceError(
            f"{what} is truncated or not gzip ({type(exc).__name__}: {exc}): re-download it "
            "from PhysioNet and check it against SHA256SUMS.txt."
        ) from exc
    except pd.errors.EmptyDataError as exc:
        raise SourceError(f"{what} is empty: re-download it from PhysioNet.") from exc
    except pd.errors.ParserError as exc:
        raise SourceError(f"{what} is not a valid CSV table: {exc}") from exc
    except ValueError as exc:
        # A blank or non-integer subject_id / study_id.
        raise SourceError(f"{what}: subject_id and study_id must be integers ({exc}).") from exc


def _ceil_to_seconds(times: np.ndarray) -> np.ndarray:
    """Round ``datetime64[ms]`` up to whole seconds, keeping NaT."""
    ms = times.astype("datetime64[ms]").astype(np.int64)
    nat = np.isnat(times)
    seconds = -((-ms) // 1000)
    out = seconds.astype("datetime64[s]")
    out[nat] = np.datetime64("NaT", "s")
    return out


# --------------------------------------------------------------------------------------------
# Film selection
# --------------------------------------------------------------------------------------------

def select_films(
    metadata: pd.DataFrame,
    stays: pd.DataFrame,
    *,
    views: Sequence[str] = ("AP", "PA"),
    lookback_hours: float = 0.0,
) -> pd.DataFrame:
    """Select one film per ICU stay: the latest eligible one.

    A film is eligible for a stay when it belongs to the stay's ``subject_id``, its
    ``view_position`` is in ``views``, and ``intime - lookback_hours <= study_time <=
    prediction_time``. Ties on ``study_time`` go to the largest ``dicom_id``, so the choice is
    deterministic. Films without a study time are never eligible.

    Parameters
    ----------
    metadata : pandas.DataFrame
        As returned by :func:`read_cxr_metadata` (``dicom_id``, ``subject_id``, ``study_id``,
        ``view_position``, ``study_time``, ``path``).
    stays : pandas.DataFrame
        Indexed by ``stay_id``, with ``subject_id``, ``intime`` and ``prediction_time``
        (datetime64, naive).
    views : sequence of str, default ("AP", "PA")
        Accepted ``view_position`` values (exact match; frontal films by default).
    lookback_hours : float, default 0
        How many hours before ``intime`` a film may have been taken (>= 0).

    Returns
    -------
    pandas.DataFrame
        Indexed like ``stays``, columns :data:`SELECTION_COLUMNS`: ``dicom_id`` (str, ``""``
        where none), ``study_id`` (int64, -1), ``study_time`` (``datetime64[s]``, NaT),
        ``hours_before_prediction`` (float32 ``prediction_time - study_time`` >= 0, NaN),
        ``view_position`` (str, ``""``), ``n_eligible`` (int16, number of eligible films) and
        ``path`` (str relative to the CXR root, ``""``).

    Raises
    ------
    ValueError
        If a needed column is missing or ``lookback_hours`` is negative or not finite.
    """
    _require_columns(metadata, ("dicom_id", "subject_id", "study_id", "view_position",
                                "study_time", "path"), "metadata")
    _require_columns(stays, ("subject_id", "intime", "prediction_time"), "stays")
    lookback_hours = float(lookback_hours)
    if not np.isfinite(lookback_hours) or lookback_hours < 0:
        raise ValueError(f"lookback_hours must be a finite number >= 0, got {lookback_hours}")
    if isinstance(views, str):
        views = (views,)

    n = len(stays)
    study_time = _as_ms(metadata["study_time"])
    keep = metadata["view_position"].isin(list(views)).to_numpy() & ~np.isnat(study_time)
    films = pd.DataFrame({
        "subject_id": metadata["subject_id"].to_numpy(np.int64)[keep],
        "film": np.flatnonzero(keep),
        "study_time": study_time[keep],
    })
    windows = pd.DataFrame({
        "pos": np.arange(n, dtype=np.int64),
        "subject_id": stays["subject_id"].to_numpy(np.int64),
        "lower": _as_ms(stays["intime"]) - np.timedelta64(round(lookback_hours * 3_600_000), "ms"),
        "upper": _as_ms(stays["prediction_time"]),
    })
    pairs = windows.merge(films, on="subject_id", how="inner", sort=False)
    time = pairs["study_time"].to_numpy()
    eligible = (time >= pairs["lower"].to_numpy()) & (time <= pairs["upper"].to_numpy())
    pos = pairs["pos"].to_numpy()[eligible]
    film = pairs["film"].to_numpy()[eligible]
    time = time[eligible]

    n_eligible = np.bincount(pos, minlength=n)
    # Latest per stay, ties to the largest dicom_id: sort by (pos, time, dicom) and take the
    # last row of each stay.
    dicom_rank = _string_rank(metadata["dicom_id"].to_numpy(dtype=object)[film])
    order = np.lexsort((dicom_rank, time.astype(np.int64), pos))
    last = order[np.r_[pos[order][1:] != pos[order][:-1], True]] if order.size else order
    chosen_pos, chosen_film = pos[last], film[last]

    dicom_id = np.full(n, "", dtype=object)
    study_id = np.full(n, -1, dtype=np.int64)
    chosen_time = np.full(n, np.datetime64("NaT", "s"), dtype="datetime64[s]")
    view = np.full(n, "", dtype=object)
    path = np.full(n, "", dtype=object)
    hours = np.full(n, np.nan, dtype=np.float32)
    dicom_id[chosen_pos] = metadata["dicom_id"].to_numpy(dtype=object)[chosen_film]
    study_id[chosen_pos] = metadata["study_id"].to_numpy(np.int64)[chosen_film]
    chosen_time[chosen_pos] = study_time[chosen_film].astype("datetime64[s]")
    view[chosen_pos] = metadata["view_position"].to_numpy(dtype=object)[chosen_film]
    path[chosen_pos] = metadata["path"].to_numpy(dtype=object)[chosen_film]
    before_ms = (windows["upper"].to_numpy()[chosen_pos] - study_time[chosen_film]).astype(np.int64)
    hours[chosen_pos] = before_ms / 3_600_000.0
    return pd.DataFrame(
        {
            "dicom_id": dicom_id,
            "study_id": study_id,
            "study_time": chosen_time,
            "hours_before_prediction": hours,
            "view_position": view,
            "n_eligible": np.minimum(n_eligible, np.iinfo(np.int16).max).astype(np.int16),
            "path": path,
        },
        index=stays.index.copy(),
    )


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {', '.join(missing)}; has {', '.join(map(str, frame.columns))}")


def _as_ms(column: pd.Series) -> np.ndarray:
    """Naive datetimes as ``datetime64[ms]`` (a unit wide enough for shifted MIMIC dates)."""
    values = pd.to_datetime(column)
    if getattr(values.dt, "tz", None) is not None:
        raise ValueError(f"column {column.name!r} must hold naive datetimes, got tz {values.dt.tz}")
    return values.to_numpy(dtype="datetime64[ms]")


def _string_rank(values: np.ndarray) -> np.ndarray:
    """Rank of each string in sorted order (equal strings share a rank)."""
    _, rank = np.unique(values.astype(str), return_inverse=True)
    return rank


# --------------------------------------------------------------------------------------------
# Image loading
# --------------------------------------------------------------------------------------------

def decode_film(path: str | Path, image_size: int) -> np.ndarray:
    """Decode one film to a square grayscale image.

    The JPEG is decoded in draft mode (DCT scaling to about twice the target size, grayscale),
    then the centred square of side ``min(width, height)`` is resized to ``image_size`` with a
    bilinear (antialiased) filter. This is an aspect-preserving resize of the short side to
    ``image_size`` followed by a centre crop, done in one resampling step.

    Parameters
    ----------
    path : str or path-like
        Image file (JPEG; other formats PIL reads work, without the draft speed-up).
    image_size : int
        Side of the output square.

    Returns
    -------
    numpy.ndarray
        uint8 ``[image_size, image_size]``.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    PIL.UnidentifiedImageError, OSError, ValueError
        Whatever PIL raises for a corrupt or truncated file.
    """
    size = int(image_size)
    with Image.open(path) as image:
        image.draft("L", (2 * size, 2 * size))
        image.load()
        gray = image if image.mode == "L" else image.convert("L")
        width, height = gray.size
        side = min(width, height)
        left, top = (width - side) / 2.0, (height - side) / 2.0
        out = gray.resize((size, size), Image.Resampling.BILINEAR,
                          box=(left, top, left + side, top + side))
    return np.array(out, dtype=np.uint8)


def iter_image_batches(
    cxr_root: str | Path,
    selection: pd.DataFrame,
    image_size: int = 224,
    *,
    workers: int = 2,
    batch_stays: int = 256,
) -> Iterator[tuple[int, np.ndarray, np.ndarray, list[str]]]:
    """Decode the selected films block by block, in selection order.

    Parameters
    ----------
    cxr_root : str or path-like
        Root of the MIMIC-CXR-JPG release; ``selection.path`` is relative to it. Only read.
    selection : pandas.DataFrame
        As returned by :func:`select_films` (uses ``path``; ``""`` = no film).
    image_size : int, default 224
        Side of the square output images.
    workers : int, default 2
        Decoding threads; 0 or 1 decodes in the calling thread. The output does not depend
        on it.
    batch_stays : int, default 256
        Stays per yielded block (use the store's image shard size so each block is one
        region write).

    Yields
    ------
    start : int
        Position of the block's first stay in ``selection``.
    images : numpy.ndarray
        uint8 ``[k, image_size, image_size]``; zeros where not present.
    present : numpy.ndarray
        bool ``[k]``: a film was selected and decoded.
    absent_reason : list of str
        ``""`` where present, else ``"no_eligible_film"``,
        ``"file_missing: <path>"`` or ``"decode_error: <path>: <error>"``.

    Notes
    -----
    Unusable files do not stop the build; they are reported through ``absent_reason``.
    While the caller handles one block the next one is already being decoded.
    """
    _require_columns(selection, ("path",), "selection")
    image_size = _positive_int(image_size, "image_size")
    batch_stays = _positive_int(batch_stays, "batch_stays")
    workers = int(workers)
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    root = str(Path(cxr_root))
    paths = selection["path"].fillna("").astype(str).to_numpy(dtype=object)
    starts = range(0, len(paths), batch_stays)

    executor: Executor | None = _make_executor(workers) if workers > 1 else None
    try:
        pending = None
        for i, start in enumerate(starts):
            if pending is None:
                pending = _submit_block(executor, root, paths[start:start + batch_stays], image_size)
            nxt = start + batch_stays
            upcoming = (_submit_block(executor, root, paths[nxt:nxt + batch_stays], image_size)
                        if i + 1 < len(starts) else None)
            yield (start, *_collect_block(pending, image_size))
            pending = upcoming
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


#: Threads, not processes: PIL releases the GIL while decoding and resampling, and threads
#: avoid copying each decoded image between processes. Measured on the 2-core dev machine
#: (512x640 JPEGs -> 224): 1 worker ~410 img/s; 2 threads ~730 (best 790); 2 processes ~545
#: (best 730).
_EXECUTOR_KIND = "thread"


def _make_executor(workers: int) -> Executor:
    if _EXECUTOR_KIND == "process":
        return ProcessPoolExecutor(max_workers=workers)
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cbstore-cxr")


def _positive_int(value, name: str) -> int:
    if int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _submit_block(executor: Executor | None, root: str, paths: np.ndarray, image_size: int) -> list:
    """Start decoding one block; returns (positions, future-or-result) pairs."""
    wanted = [i for i, p in enumerate(paths) if p]
    tasks = []
    for j in range(0, len(wanted), _TASK_IMAGES):
        positions = wanted[j:j + _TASK_IMAGES]
        rel = [paths[i] for i in positions]
        if executor is None:
            tasks.append((positions, _decode_many(root, rel, image_size)))
        else:
            tasks.append((positions, executor.submit(_decode_many, root, rel, image_size)))
    return [len(paths), tasks]


def _collect_block(pending: list, image_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    k, tasks = pending
    images = np.zeros((k, image_size, image_size), dtype=np.uint8)
    present = np.zeros(k, dtype=bool)
    reasons = [NO_ELIGIBLE_FILM] * k
    for positions, result in tasks:
        decoded = result.result() if isinstance(result, Future) else result
        for i, (image, reason) in zip(positions, decoded):
            reasons[i] = reason
            if image is not None:
                images[i] = image
                present[i] = True
    return images, present, reasons


def _decode_many(root: str, rel_paths: list[str], image_size: int) -> list:
    """Decode several films; never raises for a bad file (returns ``(None, reason)``)."""
    out = []
    for rel in rel_paths:
        full = Path(root) / rel
        try:
            out.append((decode_film(full, image_size), ""))
        except FileNotFoundError:
            out.append((None, f"{FILE_MISSING}: {rel}"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            # Keep the reason independent of where the release is mounted.
            message = " ".join(str(exc).replace(str(full), rel).split()) or type(exc).__name__
            out.append((None, f"{DECODE_ERROR}: {rel}: {type(exc).__name__}: {message}"))
    return out
