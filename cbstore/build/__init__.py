"""The build pipeline, MIMIC-IV + MIMIC-CXR-JPG -> store (``cbstore build``): source checks,
DuckDB extraction, cohort, hourly EHR, labels, phenotypes, film selection, splits, partitioned
writing with its resume state, and the fold statistics read back from what was written
(:func:`cbstore.build.pipeline.build_store`). Its settings, variables, phenotype definitions and
SQL are package data in ``resources/``.

Uses :mod:`cbstore.format` and :mod:`cbstore.store`; nothing below it imports the build.
"""
