"""Shared estimator plumbing for the method families.

* :func:`label_prior`: the documented fallback of X-ray-only methods, which predict the training
  prevalence (LoS: class frequencies) for stays without an X-ray.
* :class:`TorchMethod`: a neural method trained by :class:`fusion.trainer.Trainer`; a subclass
  implements only :meth:`TorchMethod.build_module`.
"""

from __future__ import annotations

import pathlib

import numpy as np

from fusion.registry import PRECISIONS, FusionMethod, HyperparameterError, MethodStateError

__all__ = ["OWN_HEAD_HYPERPARAMETERS", "TORCH_CACHED_HYPERPARAMETERS", "TORCH_HYPERPARAMETERS",
           "TORCH_TEST_HYPERPARAMETERS", "TorchMethod", "label_prior"]

#: Hyperparameters of every neural method (defaults follow the reference benchmark's fixed
#: settings: AdamW lr 1e-4 with weight decay 0.01, batch 16, 50 epochs, patience 10, dropout 0.2,
#: hidden 256). ``num_threads``: CPU threads (results are bit-identical for a fixed count; on a
#: shared 2-core machine 1 thread trained a cached late fusion 2.3x faster than 2).
#: ``eval_batch_size``: batch of validation and prediction (at least 2); the defaults, 64 raw and
#: 512 cached, are 4x the training batch, the fixed ratio used before it became a setting.
#: ``precision``: ``"32"`` (float32), or the opt-in ``"bf16-mixed"`` (bfloat16 autocast of the
#: forward passes, float32 weights and optimiser; :data:`fusion.registry.PRECISIONS`).
TORCH_HYPERPARAMETERS = {"lr": 1e-4, "weight_decay": 0.01, "batch_size": 16, "eval_batch_size": 64,
                         "max_epochs": 50, "patience": 10, "dropout": 0.2, "hidden": 256,
                         "head_layers": 0, "num_threads": 1, "precision": "32"}
#: Defaults on cached features (the reference has no cached mode). Each step there is a small MLP
#: update, so batch 16 spends its time in per-step overhead: batch 128 with the learning rate scaled
#: by sqrt(128 / 16) (about 3e-4), and patience 5, keep a cached run on a 20,000-stay store under
#: 30 s on 2 cores. On that store a cached late fusion (mortality) reached test AUROC 0.961 (best
#: epoch 6, 1.1 s per epoch) against 0.962 at batch 16 (best epoch 4, 4.1 s per epoch with the fused
#: AdamW); patience 10 would have kept the same epoch.
TORCH_CACHED_HYPERPARAMETERS = {"batch_size": 128, "eval_batch_size": 512, "lr": 3e-4,
                                "patience": 5}
#: Small settings for the contract tests.
TORCH_TEST_HYPERPARAMETERS = {"max_epochs": 2, "patience": 1, "hidden": 8, "batch_size": 16}
#: :data:`TORCH_HYPERPARAMETERS` less ``head_layers``, for methods whose head is their own design.
OWN_HEAD_HYPERPARAMETERS = {k: v for k, v in TORCH_HYPERPARAMETERS.items() if k != "head_layers"}

WEIGHTS_FILE = "weights.pt"


def label_prior(part, n_outputs: int, multiclass: bool) -> np.ndarray:
    """Training prevalence ``[C]`` of a part (LoS: class frequencies over ``n_outputs`` classes)."""
    if multiclass:
        counts = np.bincount(part.y, minlength=n_outputs).astype(np.float64)
        return counts / max(counts.sum(), 1.0)
    return part.y.astype(np.float64).mean(axis=0)


class TorchMethod(FusionMethod):
    """A method whose model is an ``nn.Module`` trained by :class:`fusion.trainer.Trainer`.

    Subclasses implement :meth:`build_module` (from ``spec``: shapes, task, feature mode and
    inputs); the module may define the trainer's extension points (:mod:`fusion.trainer`).
    X-ray-only methods (``modalities == {"cxr"}``) train and validate on the stays with an X-ray
    and predict the training prevalence elsewhere.

    :meth:`save` writes the module's whole state dict, extra state included (the architecture of
    a module that grew, a neighbour bank), and :meth:`load` rebuilds the module with
    :meth:`build_module` and loads that state dict into it. Building and loading run inside
    :func:`fusion.trainer.fit_process_state`, so the global torch generator is left as it was.

    Fitted attributes: ``module_``, ``spec_``, ``history_``, ``prior_``.
    """

    resumable = True

    hyperparameters = TORCH_HYPERPARAMETERS
    cached_hyperparameters = TORCH_CACHED_HYPERPARAMETERS
    test_hyperparameters = TORCH_TEST_HYPERPARAMETERS
    hyperparameter_choices = {"precision": PRECISIONS}
    #: Device for training and prediction (None: CUDA when available); not a hyperparameter.
    device = None
    progress = False

    # ----- to implement -------------------------------------------------------------------------
    def build_module(self, spec: dict):
        """Return a fresh ``nn.Module`` for ``spec`` (see :meth:`_spec`)."""
        raise NotImplementedError

    # ----- helpers ------------------------------------------------------------------------------
    @property
    def cxr_only(self) -> bool:
        """True for methods that read only the X-ray."""
        return set(self.modalities) == {"cxr"}

    def _spec(self, data) -> dict:
        return {"task": data.task, "features": data.features, "n_outputs": data.n_outputs,
                "inputs": sorted(self.inputs_for(data.features)), "n_features": data.n_features,
                "window_hours": data.window_hours, "image_size": data.image_size,
                "ehr_dim": data.ehr_dim, "cxr_dim": data.cxr_dim,
                "cxr_map_shape": (None if getattr(data, "cxr_map_shape", None) is None
                                  else list(data.cxr_map_shape)),
                "cxr_map_attrs": _map_provenance(getattr(data, "cxr_map_attrs", None))}

    def _rows(self, part) -> np.ndarray | None:
        """Rows the model sees: all, or only those with an X-ray for X-ray-only methods."""
        return np.flatnonzero(part.cxr_present) if self.cxr_only else None

    def _trainer(self, task: str):
        from fusion.trainer import Trainer

        p = self.params
        return Trainer(task, lr=p["lr"], weight_decay=p["weight_decay"], batch_size=p["batch_size"],
                       eval_batch_size=p["eval_batch_size"], max_epochs=p["max_epochs"],
                       patience=p["patience"], seed=self.seed, device=self.device,
                       progress=self.progress, num_threads=p["num_threads"],
                       precision=p["precision"])

    def _check_data(self, data) -> frozenset:
        self.check_task(data.task)
        self._check_features(data)
        inputs = self.inputs_for(data.features)
        missing = inputs - frozenset(data.inputs)
        if missing:
            raise MethodStateError(f"method {self.name!r} needs input(s) {sorted(missing)} but the "
                                   f"data was loaded with {sorted(data.inputs)}")
        return inputs

    def _check_params(self) -> None:
        p = self.params
        for key in ("batch_size", "max_epochs", "patience", "hidden", "num_threads"):
            if key in p and p[key] < 1:
                raise HyperparameterError(f"method {self.name!r}: {key} must be >= 1, got {p[key]}")
        if "eval_batch_size" in p and p["eval_batch_size"] < 2:
            raise HyperparameterError(f"method {self.name!r}: eval_batch_size must be >= 2 (no "
                                      f"evaluation batch of one), got {p['eval_batch_size']}")
        if "head_layers" in p and p["head_layers"] < 0:
            raise HyperparameterError(f"method {self.name!r}: head_layers must be >= 0")
        if "dropout" in p and not 0.0 <= p["dropout"] < 1.0:
            raise HyperparameterError(f"method {self.name!r}: dropout must be in [0, 1), "
                                      f"got {p['dropout']}")
        if p.get("lr", 1.0) <= 0:
            raise HyperparameterError(f"method {self.name!r}: lr must be > 0, got {p['lr']}")

    def _map_shape(self, spec: dict) -> list:
        """``[C, h, w]`` of the stored spatial map a cached mode reads (input ``cxr_map``).

        Raises
        ------
        MethodStateError
            If the data was loaded without one; the message gives the ``cbstore encode``
            command that adds a map embedding.
        """
        from cbstore.inputs.reader import EMBEDDING_KINDS

        if not spec.get("cxr_map_shape"):
            raise MethodStateError(
                f"method {self.name!r} reads the X-ray as a stored spatial map (input cxr_map) in "
                "cached mode, and the data has none: add one with `cbstore encode STORE --encoder "
                f"{EMBEDDING_KINDS['cxr_map'][1]}` (or another -block3 / -layer3 encoder) and load "
                "the data with the method's inputs")
        return list(spec["cxr_map_shape"])

    def _check_heads(self) -> None:
        """Refuse a ``hidden`` width that attention heads (``n_heads``) cannot split evenly."""
        p = self.params
        if p["hidden"] % p["n_heads"]:
            raise HyperparameterError(f"method {self.name!r}: hidden ({p['hidden']}) must be "
                                      f"divisible by n_heads ({p['n_heads']})")

    # ----- estimator contract -------------------------------------------------------------------
    def fit(self, data, *, device=None, progress: bool = False, checkpoint=None) -> "TorchMethod":
        """Train on the train part with early stopping on the val part; return ``self``.

        ``checkpoint``: epoch checkpoint file (see :meth:`fusion.trainer.Trainer.fit`); a fit
        interrupted after some epochs resumes from it when called again with the same settings.
        """
        from fusion.modules import EmbeddingInput, seed_augmentations
        from fusion.trainer import PartBatches, fit_process_state

        inputs = self._check_data(data)
        self._check_params()
        if device is not None:
            self.device = device
        self.progress = progress
        train, val = data.part("train"), data.part("val")
        rows = self._rows(train)
        if rows is not None and rows.size == 0:
            raise MethodStateError(
                f"method {self.name!r} reads only the X-ray, but no training stay has an X-ray "
                f"(cohort {data.cohort!r}, cxr_missing_rate {data.cxr_missing_rate}); "
                "lower the missing rate or use a method that reads the EHR")
        spec = self._spec(data)
        trainer = self._trainer(data.task)
        with fit_process_state(self.seed, trainer.device, self.params["num_threads"]):
            module = self.build_module(spec)
            seed_augmentations(module, self.seed)  # the fit's own augmentation stream
            train_rows = np.arange(len(train)) if rows is None else rows
            for layer in module.modules():
                if isinstance(layer, EmbeddingInput):  # standardise with training statistics only
                    mean, std = EmbeddingInput.statistics(getattr(train, layer.key)[train_rows])
                    layer.mean.copy_(_tensor(mean))
                    layer.std.copy_(_tensor(std))
            self.history_ = trainer.fit(module, PartBatches(train, inputs, rows),
                                        PartBatches(val, inputs, self._rows(val)),
                                        checkpoint=checkpoint)
        self.module_, self.spec_ = module, spec
        self.prior_ = label_prior(train, data.n_outputs, data.multiclass)
        self.fitted_ = True
        return self

    def _predict(self, data, part: str) -> dict:
        from fusion.trainer import PartBatches

        self._check_fitted()
        inputs = self._check_data(data)
        item = data.part(part)
        rows = self._rows(item)
        out = self._trainer(data.task).predict(self.module_, PartBatches(item, inputs, rows))
        if rows is None:
            return out
        full = {}
        for key, value in out.items():  # X-ray-only: training prevalence where absent
            filled = np.tile(self.prior_, (len(item), 1))
            filled[rows] = value
            full[key] = filled
        if not out:
            full["prob"] = np.tile(self.prior_, (len(item), 1))
        return full

    def predict_proba(self, data, part: str) -> np.ndarray:
        """float64 ``[n, C]`` probabilities for every stay of ``part``."""
        return self._predict(data, part)["prob"]

    def predict_modality_proba(self, data, part: str) -> dict:
        """Per-modality probabilities when the module returns them (NaN where the X-ray is absent)."""
        out = self._predict(data, part)
        present = data.part(part).cxr_present
        result = {}
        if "ehr" in out:
            result["ehr"] = out["ehr"]
        if "cxr" in out:
            cxr = out["cxr"].copy()
            cxr[~present] = np.nan
            result["cxr"] = cxr
        return result

    def _state(self) -> dict:
        return {"spec": self.spec_, "history": dict(self.history_),
                "prior": [float(v) for v in self.prior_]}

    def save(self, folder) -> pathlib.Path:
        """Write ``method.json`` and the module's state dict, extra state included (``weights.pt``).

        The file is read back with ``torch.load(weights_only=True)``: extra state must be made
        of tensors, numbers, strings, lists, tuples and dicts.
        """
        import torch

        folder = super().save(folder)
        torch.save(_on_cpu(self.module_.state_dict()), folder / WEIGHTS_FILE)
        return folder

    def _restore(self, state: dict, folder: pathlib.Path) -> None:
        import torch

        from fusion.trainer import fit_process_state

        path = folder / WEIGHTS_FILE
        if not path.is_file():
            raise MethodStateError(f"{folder}: no {WEIGHTS_FILE}; the saved method is incomplete")
        self.spec_ = state["spec"]
        self.history_ = state["history"]
        self.prior_ = np.asarray(state["prior"], dtype=np.float64)
        weights = torch.load(path, map_location="cpu", weights_only=True)
        # building initialises weights from the global generator: fork it, leave it as it was
        with fit_process_state(self.seed, torch.device("cpu"), self.params.get("num_threads")):
            module = self.build_module(self.spec_)
            module.load_state_dict(weights)  # extra state first rebuilds the saved architecture
        module.eval()
        self.module_ = module


def _map_provenance(attrs: dict | None) -> dict | None:
    """What a method needs to rebuild the stages after a stored spatial map (JSON-safe)."""
    if attrs is None:
        return None
    return {k: attrs.get(k) for k in ("encoder_id", "encoder_name", "weights", "seed", "map_stage",
                                      "map_shape", "input_resolution")}


def _on_cpu(value):
    """``value`` (a state dict, or the extra state inside one) with every tensor on the CPU."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


def _tensor(values: np.ndarray):
    import torch

    return torch.as_tensor(values, dtype=torch.float32)

