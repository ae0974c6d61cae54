"""Model inputs from a store: the one read path (:mod:`~cbstore.inputs.reader`), imputation and
normalisation with a fold's training statistics, X-ray drop masks for missing-modality runs, and
the torch Dataset (:class:`~cbstore.inputs.dataset.StayDataset`).

Uses :mod:`cbstore.format` and :mod:`cbstore.store`; the build never imports it.
"""
