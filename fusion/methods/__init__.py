"""Fusion methods, one module per family; importing this package registers every method.

To add a method: write ``fusion/methods/<family>.py`` with a class decorated by
``@fusion.registry.register("<name>")`` and import the module here. The contract test suite
(``tests/test_method_contract.py``) then tests it with no further change.
"""

from fusion.methods import latefusion, lgbm, unimodal  # noqa: F401  (registration side effect)
