"""Named pretrained weights: where their files are looked for, and how they are loaded safely.

cbstore never downloads weights. A named set of weights resolves to one file whose name is
exactly the basename of its release URL (as published by torchxrayvision or torchvision). The file
is searched, in this order, in

1. the directory given with ``--weights-dir`` (``weights_dir=`` in Python),
2. the directory in the environment variable :data:`WEIGHTS_DIR_ENV` (``CBSTORE_WEIGHTS_DIR``),
3. the library's own cache: ``torchxrayvision.utils.get_cache_dir()`` for torchxrayvision weights,
   ``<torch.hub.get_dir()>/checkpoints`` for torchvision weights.

When it is in none of them, :class:`~encoders.errors.WeightsNotFoundError` names the expected
file name, the directories searched and the URL to download it from (taken from the libraries'
own metadata, not hard-coded here).

Loading never unpickles arbitrary objects: every file is read with
``torch.load(..., weights_only=True)``. The official torchxrayvision DenseNet files are pickled
whole ``nn.Module`` objects rather than state dicts; they are read with the same restricted
unpickler and an explicit allow-list of the layer classes a DenseNet-121 is made of
(:func:`densenet_safe_globals`), so a file that names any other class or function is refused
instead of executed. A state dict saved under the same file name is accepted as well, which is
the way out if a file ever needs a class outside the list (see :func:`load_state_dict`).
"""

from __future__ import annotations

import collections
import hashlib
import os
import pathlib
import pickle
from dataclasses import dataclass

from encoders.errors import WeightsError, WeightsNotFoundError

#: Environment variable naming a directory of weight files (same role as ``--weights-dir``).
WEIGHTS_DIR_ENV = "CBSTORE_WEIGHTS_DIR"

#: Weights name meaning "random initialisation from a seed" (for tests and baselines).
RANDOM = "random"

#: File formats of weight files: what :func:`load_state_dict` expects inside.
FORMAT_XRV_DENSENET = "xrv-densenet"      # pickled whole xrv DenseNet module, or its state dict
FORMAT_STATE_DICT = "state-dict"          # a plain state dict (xrv ResNetAE, torchvision)


@dataclass(frozen=True)
class WeightsSource:
    """Where a named set of weights comes from.

    Attributes
    ----------
    name : str
        The weights name (e.g. ``"densenet121-res224-all"``).
    url : str
        Release URL, from the library's own metadata.
    file_format : str
        :data:`FORMAT_XRV_DENSENET` or :data:`FORMAT_STATE_DICT`.
    library : str
        ``"torchxrayvision"`` or ``"torchvision"``; selects the library cache directory searched.
    """

    name: str
    url: str
    file_format: str
    library: str

    @property
    def filename(self) -> str:
        """File name expected on disk: the basename of :attr:`url`."""
        return self.url.rsplit("/", 1)[-1]


def weights_source(name: str) -> WeightsSource:
    """Look up the release metadata of a named set of weights.

    Parameters
    ----------
    name : str
        A torchxrayvision DenseNet weights name (``"densenet121-res224-all"``, ``"-chex"``, ...),
        the autoencoder weights ``"101-elastic"``, or a torchvision ResNet-50 weights enum name
        (``"IMAGENET1K_V1"``, ``"IMAGENET1K_V2"``).

    Returns
    -------
    WeightsSource

    Raises
    ------
    WeightsError
        If the name is unknown; the message lists the valid names.
    """
    import torchvision
    import torchxrayvision as xrv

    if name in xrv.models.model_urls and name.startswith("densenet"):
        return WeightsSource(name, xrv.models.model_urls[name]["weights_url"],
                             FORMAT_XRV_DENSENET, "torchxrayvision")
    if name in xrv.autoencoders.model_urls:
        return WeightsSource(name, xrv.autoencoders.model_urls[name]["weights_url"],
                             FORMAT_STATE_DICT, "torchxrayvision")
    members = torchvision.models.ResNet50_Weights.__members__
    if name in members:
        return WeightsSource(name, members[name].url, FORMAT_STATE_DICT, "torchvision")
    valid = ([k for k in xrv.models.model_urls if k.startswith("densenet")]
             + list(xrv.autoencoders.model_urls) + list(members))
    raise WeightsError(f"unknown weights name {name!r}; valid names: {', '.join(valid)} "
                       f"(or {RANDOM!r} for a seeded random initialisation)")


def library_cache_dir(library: str) -> pathlib.Path:
    """The directory where a library keeps downloaded weights (never written by cbstore)."""
    if library == "torchxrayvision":
        import torchxrayvision as xrv

        return pathlib.Path(xrv.utils.get_cache_dir()).expanduser()
    import torch

    return pathlib.Path(torch.hub.get_dir()).expanduser() / "checkpoints"


def search_dirs(source: WeightsSource, weights_dir: str | os.PathLike | None = None) -> list[pathlib.Path]:
    """Directories searched for the file of ``source``, in order (see the module docstring)."""
    dirs = []
    if weights_dir is not None:
        dirs.append(pathlib.Path(weights_dir).expanduser())
    env = os.environ.get(WEIGHTS_DIR_ENV)
    if env:
        dirs.append(pathlib.Path(env).expanduser())
    dirs.append(library_cache_dir(source.library))
    return dirs


def resolve_weights_file(name: str, weights_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Find the local file of a named set of weights; never downloads.

    Parameters
    ----------
    name : str
        Weights name (see :func:`weights_source`).
    weights_dir : path-like, optional
        Directory searched first.

    Returns
    -------
    pathlib.Path
        The first existing file named :attr:`WeightsSource.filename` in :func:`search_dirs`.

    Raises
    ------
    WeightsError
        Unknown name.
    WeightsNotFoundError
        No such file; the message names the file, the directories searched and the URL.
    """
    source = weights_source(name)
    dirs = search_dirs(source, weights_dir)
    for folder in dirs:
        candidate = folder / source.filename
        if candidate.is_file():
            return candidate
    searched = "\n".join(f"  - {d}" for d in dirs)
    raise WeightsNotFoundError(
        f"weights {name!r}: file {source.filename!r} not found. Searched:\n{searched}\n"
        f"cbstore does not download weights. Download it from\n  {source.url}\n"
        f"and put it (same file name) into a directory passed with --weights-dir or set in "
        f"${WEIGHTS_DIR_ENV}, or into the {source.library} cache above.")


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def densenet_safe_globals() -> list:
    """Classes the restricted unpickler may build when reading an official xrv DenseNet file.

    Only layer classes of a DenseNet-121 (torchxrayvision's own blocks and the torch.nn layers
    they contain) and the containers used by ``nn.Module`` state; no functions.
    """
    import torch.nn as nn
    from torchxrayvision import models

    return [
        models.DenseNet, models._DenseBlock, models._DenseLayer, models._Transition,
        nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
        nn.Linear, nn.Sequential, nn.ModuleList, nn.Dropout, nn.Identity,
        collections.OrderedDict, set,
    ]


def load_state_dict(path: str | os.PathLike, file_format: str) -> dict:
    """Read a weights file into a state dict without unrestricted unpickling.

    Parameters
    ----------
    path : path-like
        The file.
    file_format : str
        :data:`FORMAT_STATE_DICT`: the file holds a state dict (read with ``weights_only=True``).
        :data:`FORMAT_XRV_DENSENET`: the file holds a pickled torchxrayvision ``DenseNet`` module
        (the official release format) or a state dict; a module is read with ``weights_only=True``
        and the allow-list of :func:`densenet_safe_globals`, then reduced to its state dict.

    Returns
    -------
    dict of str to torch.Tensor

    Raises
    ------
    WeightsError
        The file is unreadable, names a class outside the allow-list, or holds something else.
        For a file needing other classes the message explains how to convert it once into a
        state dict (only for a file from a trusted source).
    """
    import torch

    path = pathlib.Path(path)
    safe = densenet_safe_globals() if file_format == FORMAT_XRV_DENSENET else []
    try:
        with torch.serialization.safe_globals(safe):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"{path}: refused by the safe loader (torch.load weights_only=True): {_first_line(exc)}. "
            "cbstore never unpickles arbitrary objects. If this file comes from a trusted source "
            "(e.g. the official torchxrayvision release), convert it once into a state dict and "
            "save it under the same file name:\n"
            "  python -c \"import torch; m = torch.load('IN', weights_only=False); "
            "torch.save(m.state_dict() if hasattr(m, 'state_dict') else m, 'OUT')\"") from exc
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise WeightsError(f"{path}: cannot read weights file ({exc}); download it again") from exc
    if isinstance(obj, torch.nn.Module):
        for module in obj.modules():  # files pickled by torch < 1.6 lack this attribute
            if not hasattr(module, "_non_persistent_buffers_set"):
                module._non_persistent_buffers_set = set()
        obj = obj.state_dict()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
    return dict(obj)


def load_into(module, state: dict, path: str | os.PathLike, *, prefix_strip: str = "") -> None:
    """Load ``state`` into ``module`` strictly, with an error naming the file on mismatch."""
    if prefix_strip:
        state = {k[len(prefix_strip):] if k.startswith(prefix_strip) else k: v for k, v in state.items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path}: weights do not fit {type(module).__name__}: "
                           f"{_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if "Unsupported global" in line:
            return line.strip()
    return text.splitlines()[0] if text else type(exc).__name__
