"""Reading and writing stores on disk: :mod:`~cbstore.store.reader` (:func:`open_store`),
:mod:`~cbstore.store.writer` (a whole store, or one partition at a time), cached embeddings
(:mod:`~cbstore.store.embeddings`), image shards, ``cbstore validate`` and ``cbstore info``.

Uses :mod:`cbstore.format`; never the build pipeline or the model-input layer.
"""
