"""Predictions of a fitted method with one modality's inputs permuted across the test stays.

Modality reliance (:func:`fusion.evaluation.modality_reliance`) compares a run's test predictions
with those of the same fitted model when one modality's inputs are shuffled between test stays:
the shuffled inputs keep their distribution (absent X-rays included) but lose their link to the
stay. A run folder keeps these predictions as ``predictions_permuted_<modality>.parquet`` (test
part only, predictions format) so that a report computes reliance from the folder alone.

What moves with a modality (the stay's labels, ids and demographics never move):

* ``ehr``: ``ehr_emb`` (cached), ``ehr`` and ``ehr_mask`` (raw);
* ``cxr``: ``cxr_emb`` and ``cxr_map`` (cached), the X-ray image (raw), its time (``cxr_hours``, where the part
  has it) and the ``cxr_present`` / ``cxr_masked`` flags, so that a stay receives another stay's
  X-ray or its absence.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fusion.evaluation.predictions import EvaluationError

__all__ = ["MODALITY_FIELDS", "PERMUTED_FILE", "permute_modality", "permutation_generator",
           "permuted_data"]

#: Part fields that belong to each modality.
MODALITY_FIELDS = {"ehr": ("ehr_emb", "ehr", "ehr_mask"),
                   "cxr": ("cxr_emb", "cxr_map", "cxr_present", "cxr_masked", "cxr_hours")}
#: File name of the permuted-input predictions in a run folder.
PERMUTED_FILE = "predictions_permuted_{modality}.parquet"
#: Mixed into the run seed so that the permutation draws are their own stream.
_STREAM = 0x5E11A


def permutation_generator(seed: int) -> np.random.Generator:
    """The generator of a run's input permutations (its own stream of the run seed)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _STREAM]))


def _permuted_loader(loader, index: np.ndarray, order: np.ndarray):
    """Image loader giving, for the store position of stay ``i``, the image of stay ``order[i]``."""
    source = index[order]

    def load(positions):
        rows = np.searchsorted(index, np.asarray(positions, dtype=np.int64))
        return loader(source[rows])

    return load


def permute_modality(part, modality: str, rng: np.random.Generator):
    """A copy of ``part`` whose ``modality`` inputs are permuted across its stays.

    Parameters
    ----------
    part : fusion.data.FusionPart
    modality : {"ehr", "cxr"}
    rng : numpy.random.Generator
        Draws the permutation.

    Returns
    -------
    (fusion.data.FusionPart, numpy.ndarray)
        The permuted part and the permutation (stay ``i`` receives the inputs of stay
        ``order[i]``).

    Raises
    ------
    EvaluationError
        Unknown modality.
    """
    if modality not in MODALITY_FIELDS:
        raise EvaluationError(f"unknown modality {modality!r}; valid: {', '.join(MODALITY_FIELDS)}")
    order = rng.permutation(len(part))
    # a field the part type lacks or left empty (None) is skipped
    changes = {name: getattr(part, name)[order] for name in MODALITY_FIELDS[modality]
               if getattr(part, name, None) is not None}
    if modality == "cxr" and part.image_loader is not None:
        changes["image_loader"] = _permuted_loader(part.image_loader, part.index, order)
    return dataclasses.replace(part, **changes), order


def permuted_data(data, modality: str, rng: np.random.Generator, part: str = "test"):
    """``data`` with only ``part`` left, its ``modality`` inputs permuted (see
    :func:`permute_modality`)."""
    permuted, _ = permute_modality(data.part(part), modality, rng)
    return dataclasses.replace(data, parts={part: permuted})
