"""What a store is, without any I/O: array names, dtypes and dimensions, the attribute schemas,
the tasks and their label arrays, and the definition of the per-fold training statistics.

Every other part of cbstore builds on this package; it imports nothing of cbstore but the errors.
"""
