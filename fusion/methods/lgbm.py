"""Gradient-boosted trees (LightGBM) on cached embeddings: unimodal, early and late fusion.

* ``lgbm-ehr``: trees on the EHR embedding.
* ``lgbm-cxr``: trees on the X-ray embedding, trained on the stays with an X-ray; the training
  prevalence for stays without one.
* ``lgbm-early``: trees on the concatenation; an absent X-ray is NaN, which LightGBM routes
  natively at every split.
* ``lgbm-late``: an EHR model and an X-ray model; the prediction is the mean of the probabilities
  of the modalities present (EHR only where the X-ray is absent).

One booster per label (binary tasks: 1, phenotype: 25) or one multiclass booster (LoS). Boosting
stops early on the validation log-loss (``lgb.early_stopping``). Training is deterministic
(``deterministic=True``, fixed seeds) and, because histograms are built column-wise
(``force_col_wise=True``: one thread per feature), the trees do not depend on the thread count;
``num_threads=0`` (LightGBM's convention: every core) is the default, and the tests check that 1
and 2 threads give the same model. ``learning_rate=0.1`` is LightGBM's own default. Embeddings
have many dense continuous dimensions (1024 for DenseNet-121), hence ``max_bin=63`` and
``feature_fraction=0.5`` (about 3x and 2x faster per tree than LightGBM's 255 and 1.0), and
``early_stopping_rounds=20``. The binned training set is built once and shared by the 25
phenotype boosters. A label with a single class in the training part gets a constant prediction
(its training prevalence). Boosters are saved as LightGBM text model files.
"""

from __future__ import annotations

import pathlib

import numpy as np

from cbstore.format.tasks import get_task
from fusion.methods.base import label_prior
from fusion.registry import FusionMethod, HyperparameterError, MethodStateError, register

__all__ = ["BoosterSet", "LGBMCXR", "LGBMEarly", "LGBMEHR", "LGBMLate"]

LGBM_HYPERPARAMETERS = {"n_estimators": 1000, "learning_rate": 0.1, "num_leaves": 31,
                        "min_child_samples": 20, "feature_fraction": 0.5, "lambda_l2": 0.0,
                        "max_bin": 63, "early_stopping_rounds": 20, "num_threads": 0}
LGBM_TEST_HYPERPARAMETERS = {"n_estimators": 15, "num_leaves": 4, "min_child_samples": 2,
                             "early_stopping_rounds": 5, "num_threads": 1}
LGBM_PAPER = ("Ke G. et al., LightGBM: a highly efficient gradient boosting decision tree, "
              "NeurIPS 2017")
BOOSTER_FOLDER = "boosters"


class BoosterSet:
    """The boosters of one input matrix for one task: per label (sigmoid tasks) or multiclass.

    Parameters
    ----------
    task : str
        Task name; its :class:`cbstore.format.tasks.TaskSpec` kind picks per-label binary boosters or
        one multiclass booster.
    n_outputs : int
    params : dict
        LightGBM hyperparameters (:data:`LGBM_HYPERPARAMETERS`).
    seed : int
    """

    def __init__(self, task: str, n_outputs: int, params: dict, seed: int):
        self.task, self.n_outputs, self.params, self.seed = task, n_outputs, params, seed
        self.multiclass = get_task(task).multiclass
        self.models: list = []   # lightgbm.Booster, or float64 [C] constant probabilities

    def _lgb_params(self) -> dict:
        p = self.params
        out = {"learning_rate": p["learning_rate"], "num_leaves": p["num_leaves"],
               "min_child_samples": p["min_child_samples"], "feature_fraction": p["feature_fraction"],
               "lambda_l2": p["lambda_l2"], "max_bin": p["max_bin"],
               "num_threads": p["num_threads"], "seed": self.seed, "deterministic": True,
               "force_col_wise": True, "verbosity": -1}
        if self.multiclass:
            out.update(objective="multiclass", num_class=self.n_outputs, metric="multi_logloss")
        else:
            out.update(objective="binary", metric="binary_logloss")
        return out

    def _datasets(self, x, x_val):
        """Binned training and validation sets, built once and shared by every label's booster."""
        import lightgbm as lgb

        params = self._lgb_params()
        train = lgb.Dataset(x, params=params, free_raw_data=False)
        train.set_label(np.zeros(x.shape[0]))  # placeholder; each booster sets its own labels
        train.construct()
        val = None
        if x_val is not None and len(x_val):
            val = lgb.Dataset(x_val, reference=train, params=params, free_raw_data=False)
            val.set_label(np.zeros(x_val.shape[0]))
            val.construct()
        return train, val

    def _train(self, train, val, y, y_val):
        import lightgbm as lgb

        train.set_label(np.ascontiguousarray(y, dtype=np.float64))
        kwargs = {}
        if val is not None:
            val.set_label(np.ascontiguousarray(y_val, dtype=np.float64))
            kwargs["valid_sets"] = [val]
            kwargs["callbacks"] = [lgb.early_stopping(self.params["early_stopping_rounds"],
                                                      verbose=False)]
        booster = lgb.train(self._lgb_params(), train, num_boost_round=self.params["n_estimators"],
                            keep_training_booster=False, **kwargs)
        # Keep the trees up to the best validation iteration, and hold the model exactly as a
        # saved text model reads back, so that save -> load predicts bit for bit the same.
        return lgb.Booster(model_str=booster.model_to_string())

    def fit(self, x, y, x_val, y_val) -> "BoosterSet":
        """Fit on ``x [n, d]`` / labels ``y`` with early stopping on ``x_val`` / ``y_val``."""
        self.models = []
        if self.multiclass:
            if np.unique(y).size < 2:
                prior = np.bincount(y, minlength=self.n_outputs) / len(y)
                self.models.append(prior.astype(np.float64))
            else:
                self.models.append(self._train(*self._datasets(x, x_val), y, y_val))
            return self
        datasets = None
        for j in range(self.n_outputs):
            yj = y[:, j]
            if yj.min() == yj.max():
                self.models.append(np.array([float(yj[0])]))
                continue
            datasets = datasets or self._datasets(x, x_val)
            self.models.append(self._train(*datasets, yj, y_val[:, j]))
        return self

    def predict(self, x) -> np.ndarray:
        """float64 ``[n, C]`` probabilities."""
        n = x.shape[0]
        if self.multiclass:
            model = self.models[0]
            if isinstance(model, np.ndarray):
                return np.tile(model, (n, 1))
            prob = model.predict(x).reshape(n, self.n_outputs)
            return prob / prob.sum(axis=1, keepdims=True)
        columns = [np.full(n, m[0]) if isinstance(m, np.ndarray) else model_predict(m, x)
                   for m in self.models]
        return np.stack(columns, axis=1).astype(np.float64)

    def save(self, folder: pathlib.Path, prefix: str) -> list:
        """Write the boosters as text model files; return the JSON description of the set."""
        folder.mkdir(parents=True, exist_ok=True)
        described = []
        for j, model in enumerate(self.models):
            if isinstance(model, np.ndarray):
                described.append({"constant": [float(v) for v in model]})
            else:
                name = f"{prefix}_{j:02d}.txt"
                model.save_model(str(folder / name))
                described.append({"file": name})
        return described

    def restore(self, folder: pathlib.Path, described: list) -> "BoosterSet":
        """Rebuild the set from :meth:`save`'s description and files."""
        import lightgbm as lgb

        self.models = []
        for item in described:
            if "constant" in item:
                self.models.append(np.asarray(item["constant"], dtype=np.float64))
            else:
                path = folder / item["file"]
                if not path.is_file():
                    raise MethodStateError(f"{path}: booster file missing; the saved method is "
                                           "incomplete")
                self.models.append(lgb.Booster(model_file=str(path)))
        return self


def model_predict(booster, x) -> np.ndarray:
    """Positive-class probability of a binary booster."""
    return np.asarray(booster.predict(x), dtype=np.float64)


class _LGBM(FusionMethod):
    """Common fitting, prediction and saving of the LightGBM methods.

    Subclasses list their booster sets in :attr:`branches`: name -> (input kinds, trained only on
    stays with an X-ray).
    """

    hyperparameters = LGBM_HYPERPARAMETERS
    test_hyperparameters = LGBM_TEST_HYPERPARAMETERS
    paper = LGBM_PAPER
    branches: dict = {}

    def _matrix(self, part, kinds) -> np.ndarray:
        blocks = [getattr(part, kind) for kind in sorted(kinds)]
        missing = [kind for kind, block in zip(sorted(kinds), blocks) if block is None]
        if missing:
            raise MethodStateError(f"method {self.name!r} needs input(s) {missing}, which the data "
                                   "was loaded without")
        return np.concatenate(blocks, axis=1).astype(np.float32, copy=False)

    def _check_params(self) -> None:
        p = self.params
        for key in ("n_estimators", "num_leaves", "min_child_samples", "early_stopping_rounds", "max_bin"):
            if p[key] < 1:
                raise HyperparameterError(f"method {self.name!r}: {key} must be >= 1, got {p[key]}")
        if p["num_threads"] < 0:
            raise HyperparameterError(f"method {self.name!r}: num_threads must be >= 0 (0: every core), "
                                      f"got {p['num_threads']}")
        if p["learning_rate"] <= 0 or not 0 < p["feature_fraction"] <= 1:
            raise HyperparameterError(f"method {self.name!r}: learning_rate must be > 0 and "
                                      "feature_fraction in (0, 1]")

    def fit(self, data, *, device=None, progress: bool = False) -> "_LGBM":
        """Fit every booster set on the train part, stopping early on the val part."""
        self.check_task(data.task)
        self._check_features(data)
        self.inputs_for(data.features)
        self._check_params()
        train, val = data.part("train"), data.part("val")
        self.task_, self.n_outputs_ = data.task, data.n_outputs
        self.prior_ = label_prior(train, data.n_outputs, data.multiclass)
        self.sets_ = {}
        for name, (kinds, cxr_rows) in self.branches.items():
            tr = np.flatnonzero(train.cxr_present) if cxr_rows else np.arange(len(train))
            va = np.flatnonzero(val.cxr_present) if cxr_rows else np.arange(len(val))
            if tr.size == 0:
                raise MethodStateError(
                    f"method {self.name!r}: no training stay has an X-ray (cohort {data.cohort!r}, "
                    f"cxr_missing_rate {data.cxr_missing_rate}); the X-ray model cannot be trained")
            x, x_val = self._matrix(train, kinds)[tr], self._matrix(val, kinds)[va]
            self.sets_[name] = BoosterSet(data.task, data.n_outputs, self.params, self.seed).fit(
                x, train.y[tr], x_val, val.y[va])
        self.fitted_ = True
        return self

    def _branch_proba(self, data, part: str) -> dict:
        self._check_fitted()
        item = data.part(part)
        out = {}
        for name, (kinds, cxr_rows) in self.branches.items():
            x = self._matrix(item, kinds)
            if cxr_rows:
                prob = np.tile(self.prior_, (len(item), 1))
                rows = np.flatnonzero(item.cxr_present)
                if rows.size:
                    prob[rows] = self.sets_[name].predict(x[rows])
                out[name] = prob
            else:
                out[name] = self.sets_[name].predict(x)
        return out

    def predict_proba(self, data, part: str) -> np.ndarray:
        """float64 ``[n, C]`` probabilities of the method's single branch (training prevalence
        where a branch's X-ray is absent); methods with several branches combine them."""
        (prob,) = self._branch_proba(data, part).values()
        return prob

    def _state(self) -> dict:
        return {"task": self.task_, "n_outputs": self.n_outputs_,
                "prior": [float(v) for v in self.prior_],
                "sets": {name: s.save(self._folder / BOOSTER_FOLDER, name)
                         for name, s in self.sets_.items()}}

    def save(self, folder) -> pathlib.Path:
        """Write ``method.json`` and one LightGBM text model file per booster."""
        self._folder = pathlib.Path(folder)
        try:
            return super().save(folder)
        finally:
            del self._folder

    def _restore(self, state: dict, folder: pathlib.Path) -> None:
        self.task_, self.n_outputs_ = state["task"], state["n_outputs"]
        self.prior_ = np.asarray(state["prior"], dtype=np.float64)
        self.sets_ = {name: BoosterSet(self.task_, self.n_outputs_, self.params, self.seed).restore(
            folder / BOOSTER_FOLDER, described) for name, described in state["sets"].items()}


@register("lgbm-ehr")
class LGBMEHR(_LGBM):
    """LightGBM on the cached EHR embedding."""

    inputs = {"cached": frozenset({"ehr_emb"})}
    modalities = frozenset({"ehr"})
    handles_missing_cxr = True
    absent_cxr_policy = "not_used"
    branches = {"ehr": (("ehr_emb",), False)}


@register("lgbm-cxr")
class LGBMCXR(_LGBM):
    """LightGBM on the cached X-ray embedding; training prevalence where the X-ray is absent."""

    inputs = {"cached": frozenset({"cxr_emb"})}
    modalities = frozenset({"cxr"})
    handles_missing_cxr = False
    absent_cxr_policy = "train_prevalence"
    branches = {"cxr": (("cxr_emb",), True)}


@register("lgbm-early")
class LGBMEarly(_LGBM):
    """LightGBM on the concatenated EHR and X-ray embeddings (absent X-ray = NaN, native)."""

    inputs = {"cached": frozenset({"ehr_emb", "cxr_emb"})}
    modalities = frozenset({"ehr", "cxr"})
    handles_missing_cxr = True
    absent_cxr_policy = "native"
    branches = {"early": (("ehr_emb", "cxr_emb"), False)}


@register("lgbm-late")
class LGBMLate(_LGBM):
    """Mean of the EHR model's and (where present) the X-ray model's probabilities."""

    inputs = {"cached": frozenset({"ehr_emb", "cxr_emb"})}
    modalities = frozenset({"ehr", "cxr"})
    handles_missing_cxr = True
    absent_cxr_policy = "ehr_only"
    branches = {"ehr": (("ehr_emb",), False), "cxr": (("cxr_emb",), True)}

    def predict_proba(self, data, part: str) -> np.ndarray:
        """float64 ``[n, C]``: mean of the present modalities' probabilities."""
        out = self._branch_proba(data, part)
        present = data.part(part).cxr_present
        prob = out["ehr"].copy()
        prob[present] = (out["ehr"][present] + out["cxr"][present]) / 2.0
        return prob

    def predict_modality_proba(self, data, part: str) -> dict:
        """``{"ehr": [n, C], "cxr": [n, C]}`` (X-ray NaN where absent)."""
        out = self._branch_proba(data, part)
        cxr = out["cxr"].copy()
        cxr[~data.part(part).cxr_present] = np.nan
        return {"ehr": out["ehr"], "cxr": cxr}
