"""Fusion methods, one module per family.

:data:`METHOD_MODULES` maps each method name to the module that registers it, so that looking
up one method imports only its module (LightGBM methods never import torch).
:func:`import_all` imports every module.

To add a method: write ``fusion/methods/<family>.py`` with a class decorated by
``@fusion.registry.register("<name>")`` and add its name here. The contract test suite
(``tests/fusion/test_method_contract.py``) then tests it with no further change, and
``tests/fusion/test_registry.py`` checks that this map and the registrations agree.
"""

import importlib

#: Method name -> module of this package that registers it.
METHOD_MODULES = {
    "latefusion": "latefusion",
    "aug": "aug",
    "inforeg": "inforeg",
    "lgbm-ehr": "lgbm", "lgbm-cxr": "lgbm", "lgbm-early": "lgbm", "lgbm-late": "lgbm",
    "lstm": "unimodal", "transformer": "unimodal", "resnet": "unimodal", "ehr-mlp": "unimodal",
    "cxr-mlp": "unimodal",
    "medfuse": "medfuse", "drfuse": "drfuse", "m3care": "m3care", "smil": "smil",
    "mmtm": "mmtm", "daft": "daft", "utde": "utde",
    "shaspec": "shaspec",
    "flexmoe": "flexmoe",
    "umse": "umse",
    "healnet": "healnet",
}


def import_module_of(name: str) -> None:
    """Import the module registering method ``name`` (nothing for an unknown name)."""
    if name in METHOD_MODULES:
        importlib.import_module(f"{__name__}.{METHOD_MODULES[name]}")


def import_all() -> None:
    """Import every method module, so that every method has registered itself."""
    for module in sorted(set(METHOD_MODULES.values())):
        importlib.import_module(f"{__name__}.{module}")
