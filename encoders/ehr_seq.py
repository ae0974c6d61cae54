"""``ehr-lstm``: a small self-supervised LSTM over the hourly EHR tensor, trained per fold.

Why self-supervised. A supervised encoder trained on one task (say mortality) bakes that task's
label into features that are then reused for every other task and by every fusion method, and
any encoder fitted on more than a fold's training stays leaks validation or test information.
So the default objective uses no labels at all, and each fold's model sees only that fold's
training stays (its validation stays serve early stopping only; test stays are never read
before the model is frozen).

Objective: next-hour forecasting. A unidirectional LSTM reads, for every hour, the imputed and
normalised values (``cbstore.inputs.preprocess.impute_and_normalise`` with the fold's *training*
statistics: forward fill, then training median; robust scaling) concatenated with the observed
mask (1 where the raw value was measured). A linear head predicts hour ``t + 1``'s normalised
values from the hidden state at hour ``t``; the loss is the mean squared error over the values
actually *observed* at ``t + 1`` (imputed values are not targets, so the model is not taught to
reproduce forward fill). Training: Adam, shuffled mini-batches from a seeded generator, at most
``epochs`` epochs, early stopping on the validation loss with ``patience``; the best-validation
weights are kept.

Outputs, per fold: the pooled embedding is the hidden state after the last hour of the window
(the state at prediction time; the LSTM is causal, so it uses no later data) -> ``[stay, hidden]``;
the per-hour sequence is the hidden state after each hour -> ``[stay, time, hidden]``. Every stay
is present (the EHR modality is never absent; an all-NaN stay is imputed from training medians).

Defaults are small enough for a CPU (hidden 64, 1 layer, 5 epochs); all are configurable.
Results are bit-identical on CPU for the same seed, data and torch thread count.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn

from encoders.errors import EncodingInputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LstmConfig:
    """Hyperparameters of :class:`EhrLstmEncoder` (all stored in the embedding's attrs)."""

    hidden: int = 64
    layers: int = 1
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    patience: int = 2
    seed: int = 0


class _Forecaster(nn.Module):
    def __init__(self, n_features: int, hidden: int, layers: int):
        super().__init__()
        self.lstm = nn.LSTM(2 * n_features, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, n_features)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states, _ = self.lstm(x)             # [B, T, hidden]
        return states, self.head(states)     # predictions for the next hour


def _forecast_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of squared errors over observed targets, and their count."""
    err = (pred - target) ** 2 * mask
    return err.sum(), mask.sum()


class EhrLstmEncoder:
    """Self-supervised next-hour-forecasting LSTM (see the module docstring).

    Parameters
    ----------
    n_features : int
        Number of EHR variables.
    window_hours : int
        Hours per stay.
    config : LstmConfig, optional
        Hyperparameters.
    device : str or torch.device
        Where to train and embed.

    Attributes
    ----------
    model_ : torch.nn.Module
        The fitted network (after :meth:`fit`).
    history_ : dict
        ``train_loss``/``val_loss`` per epoch, ``best_epoch``, ``n_train``, ``n_val``.
    """

    name = "ehr-lstm"
    modality = "ehr"
    allows_nan = False

    def __init__(self, n_features: int, window_hours: int, config: LstmConfig | None = None,
                 device: str | torch.device = "cpu"):
        self.n_features = int(n_features)
        self.window_hours = int(window_hours)
        self.config = config or LstmConfig()
        self.device = torch.device(device)

    @property
    def dim(self) -> int:
        """Embedding dimension (= ``config.hidden``)."""
        return self.config.hidden

    def provenance(self) -> dict:
        """Attributes describing this encoder, for the embedding group."""
        return {
            "weights": "trained-per-fold",
            "weights_sha256": None,
            "seed": self.config.seed,
            "hyperparameters": asdict(self.config),
            "preprocessing": {
                "input": ("cbstore.inputs.preprocess.impute_and_normalise(ehr/values, fold training "
                          "stats) concatenated with the observed mask"),
                "objective": "next-hour forecasting, MSE on observed values (self-supervised)",
                "training_data": "training stays of the fold; validation stays for early stopping",
                "pooled": "hidden state after the last hour",
                "sequence": "hidden state after each hour",
            },
        }

    @staticmethod
    def prepare(raw: np.ndarray, preprocessor, normalize: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """Model input ``[k, T, 2F]`` and observed mask ``[k, T, F]`` from raw values.

        Parameters
        ----------
        raw : numpy.ndarray
            Raw values ``[k, T, F]`` (NaN = unobserved).
        preprocessor : cbstore.inputs.reader.EhrPreprocessor or dict
            The fold's preprocessing (the read path's, so the encoder sees exactly what a fusion
            method sees); a dict of training statistics plus ``normalize`` is accepted too.
        normalize : numpy.ndarray of bool, optional
            With a statistics dict: which features to scale.
        """
        values, mask = _as_preprocessor(preprocessor, normalize)(raw)
        return np.concatenate([values, mask], axis=2), mask

    def _epoch_loss(self, model: nn.Module, x: torch.Tensor, mask: torch.Tensor,
                    order: torch.Tensor, optimiser: torch.optim.Optimizer | None) -> float:
        total, count = 0.0, 0.0
        f = self.n_features
        for start in range(0, len(order), self.config.batch_size):
            idx = order[start:start + self.config.batch_size]
            xb = x[idx].to(self.device)
            mb = mask[idx].to(self.device)
            _, pred = model(xb)
            loss_sum, n = _forecast_loss(pred[:, :-1], xb[:, 1:, :f], mb[:, 1:])
            if optimiser is not None:
                optimiser.zero_grad()
                (loss_sum / n.clamp(min=1.0)).backward()
                optimiser.step()
            total += float(loss_sum.detach())
            count += float(n)
        return total / max(count, 1.0)

    def fit(self, train_raw: np.ndarray, val_raw: np.ndarray, preprocessor,
            normalize: np.ndarray | None = None) -> "EhrLstmEncoder":
        """Train on the training stays of one fold.

        Parameters
        ----------
        train_raw, val_raw : numpy.ndarray
            Raw values ``[k, T, F]`` (NaN = unobserved) of the fold's training and validation
            stays. Validation stays only choose the epoch (early stopping).
        preprocessor : cbstore.inputs.reader.EhrPreprocessor or dict
            The fold's EHR preprocessing (``EhrPreprocessor.from_store(store, fold)``), or its
            training statistics (``Store.fold_stats(fold)``) with ``normalize``.
        normalize : numpy.ndarray of bool, optional
            Which features to scale (``ehr/normalize``), with a statistics dict.

        Returns
        -------
        EhrLstmEncoder
            self, with :attr:`model_` and :attr:`history_`.
        """
        cfg = self.config
        self.preprocessor_ = _as_preprocessor(preprocessor, normalize)
        x_tr, m_tr = (torch.from_numpy(a) for a in self.prepare(train_raw, self.preprocessor_))
        x_va, m_va = (torch.from_numpy(a) for a in self.prepare(val_raw, self.preprocessor_))
        if len(x_tr) == 0:
            raise EncodingInputError("ehr-lstm: the fold has no training stays; the store's splits give "
                                     "this fold an empty training part")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = _Forecaster(self.n_features, cfg.hidden, cfg.layers).to(self.device)
        optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        generator = torch.Generator().manual_seed(cfg.seed)
        history = {"train_loss": [], "val_loss": [], "best_epoch": -1,
                   "n_train": int(len(x_tr)), "n_val": int(len(x_va))}
        best, best_state, stale = float("inf"), copy.deepcopy(model.state_dict()), 0
        for epoch in range(cfg.epochs):
            model.train()
            order = torch.randperm(len(x_tr), generator=generator)
            train_loss = self._epoch_loss(model, x_tr, m_tr, order, optimiser)
            model.eval()
            with torch.no_grad():
                val_loss = (self._epoch_loss(model, x_va, m_va, torch.arange(len(x_va)), None)
                            if len(x_va) else train_loss)
            history["train_loss"].append(train_loss)
            history["val_loss"].append(val_loss)
            logger.info("ehr-lstm epoch %d: train %.4f val %.4f", epoch, train_loss, val_loss)
            if val_loss < best:
                best, best_state, stale = val_loss, copy.deepcopy(model.state_dict()), 0
                history["best_epoch"] = epoch
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
        model.load_state_dict(best_state)
        self.model_ = model.eval()
        self.history_ = history
        return self

    @torch.no_grad()
    def transform(self, raw: np.ndarray, *, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Embed stays with the fitted model.

        Parameters
        ----------
        raw : numpy.ndarray
            Raw values ``[k, T, F]``.
        batch_size : int
            Stays per forward call.

        Returns
        -------
        pooled : numpy.ndarray
            float32 ``[k, hidden]``.
        sequence : numpy.ndarray
            float32 ``[k, T, hidden]``.
        """
        x, _ = self.prepare(raw, self.preprocessor_)
        x = torch.from_numpy(x)
        seqs = []
        for start in range(0, len(x), batch_size):
            states, _ = self.model_(x[start:start + batch_size].to(self.device))
            seqs.append(states.float().cpu())
        sequence = (torch.cat(seqs).numpy() if seqs
                    else np.zeros((0, self.window_hours, self.dim), np.float32))
        return np.ascontiguousarray(sequence[:, -1, :]), sequence


def _as_preprocessor(preprocessor, normalize=None):
    """An :class:`cbstore.inputs.reader.EhrPreprocessor` from one, or from statistics and ``normalize``."""
    from cbstore.inputs.reader import EhrPreprocessor

    if isinstance(preprocessor, EhrPreprocessor):
        return preprocessor
    if normalize is None:
        raise EncodingInputError("ehr-lstm: pass an EhrPreprocessor, or the training statistics "
                                 "together with normalize")
    return EhrPreprocessor(preprocessor, np.asarray(normalize, dtype=bool))
