"""Fusion methods, the training loop and the evaluator of cbstore.

Importing ``fusion`` (or ``fusion.registry``, ``fusion.config``) stays light: torch and LightGBM
are imported only when a method is looked up. :func:`fusion.registry.get_method` and
:func:`fusion.registry.list_methods` import :mod:`fusion.methods`, where every method registers
itself with ``@register``.
"""

from fusion.registry import get_method, list_methods, load_method

__all__ = ["get_method", "list_methods", "load_method"]
