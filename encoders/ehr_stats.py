"""``ehr-stats``: hand-crafted summary statistics of the hourly EHR tensor.

For every variable and every sub-window of the observation window the encoder computes, over
the hours in which the variable was observed (raw values, canonical units, no imputation):

``mean``, ``min``, ``max``, ``std`` (population, ddof=0), ``first``, ``last``, ``slope``
(least-squares change per hour against the hour index; needs two observed hours) and
``frac_observed`` (observed hours / hours in the sub-window).

Sub-windows (hours, clipped to the store's window): ``all`` (the whole window), ``first24h``,
``last24h`` and ``last12h``. Two missingness indicators per variable follow, over the whole
window: ``observed_any`` (1.0 or 0.0) and ``hours_since_last`` (from the end of the last observed
hour to the end of the window; NaN if never observed).

A statistic with nothing to compute from is **NaN**, never a made-up value: tree models
(LightGBM) route NaN natively; a neural fusion model must impute (the fusion code does so with
training-fold statistics). The embedding group therefore allows NaN where ``present`` is true.
The encoder is deterministic and trains nothing, so it is fold-independent
(``values [stay, dim]``). Statistics are accumulated in float64 and stored as float32.
Dimension names are ``<variable>__<window>__<statistic>`` in the order variables x windows x
statistics, then ``<variable>__<indicator>``; they are stored in the embedding's attrs.
"""

from __future__ import annotations

import numpy as np

#: Statistics per variable and sub-window, in output order.
STATISTICS = ("mean", "min", "max", "std", "first", "last", "slope", "frac_observed")

#: Sub-windows: name -> (start, stop) in hours; negative = counted from the window's end.
SUB_WINDOWS = (("all", (0, None)), ("first24h", (0, 24)), ("last24h", (-24, None)),
               ("last12h", (-12, None)))

#: Missingness indicators per variable over the whole window, in output order.
INDICATORS = ("observed_any", "hours_since_last")


class EhrStatsEncoder:
    """Deterministic per-variable summary statistics (see the module docstring).

    Parameters
    ----------
    feature_names : sequence of str
        EHR variable names, in ``ehr/feature`` order.
    window_hours : int
        Length of the observation window (``ehr/time`` size).
    """

    name = "ehr-stats"
    modality = "ehr"
    allows_nan = True

    def __init__(self, feature_names, window_hours: int):
        self.feature_names = [str(f) for f in feature_names]
        self.window_hours = int(window_hours)
        self.windows = [(name, self._hours(bounds)) for name, bounds in SUB_WINDOWS]

    def _hours(self, bounds) -> slice:
        start, stop = bounds
        t = self.window_hours
        start = max(0, t + start) if start < 0 else min(start, t)
        stop = t if stop is None else min(stop, t)
        return slice(start, stop)

    @property
    def dim(self) -> int:
        """Output dimension: ``F * (len(SUB_WINDOWS) * len(STATISTICS) + len(INDICATORS))``."""
        return len(self.feature_names) * (len(self.windows) * len(STATISTICS) + len(INDICATORS))

    @property
    def dim_names(self) -> list[str]:
        """Name of every output dimension, in order."""
        names = [f"{f}__{w}__{s}" for f in self.feature_names for w, _ in self.windows
                 for s in STATISTICS]
        return names + [f"{f}__{i}" for f in self.feature_names for i in INDICATORS]

    def provenance(self) -> dict:
        """Attributes describing this encoder, for the embedding group."""
        return {
            "weights": None,
            "weights_sha256": None,
            "seed": None,
            "preprocessing": {
                "input": "ehr/values raw (canonical units), NaN = not observed; no imputation",
                "statistics": list(STATISTICS),
                "sub_windows": {w: [s.start, s.stop] for w, s in self.windows},
                "indicators": list(INDICATORS),
                "nan": "NaN where a statistic has no observed hour (std: 1 needed; slope: 2)",
            },
            "dim_names": self.dim_names,
        }

    def __call__(self, values: np.ndarray) -> np.ndarray:
        """Encode raw EHR values ``[k, T, F]`` (NaN = unobserved) -> float32 ``[k, dim]``."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 3 or values.shape[1:] != (self.window_hours, len(self.feature_names)):
            raise ValueError(f"ehr-stats expects values shaped [stay, {self.window_hours}, "
                             f"{len(self.feature_names)}], got {values.shape}")
        k, _, n_features = values.shape
        per_window = [self._window_stats(values[:, hours, :]) for _, hours in self.windows]
        # [k, F, W, S] -> flattened in the order variables x windows x statistics
        blocks = np.stack(per_window, axis=2).reshape(k, n_features * len(self.windows) * len(STATISTICS))
        indicators = self._indicators(values).reshape(k, n_features * len(INDICATORS))
        return np.concatenate([blocks, indicators], axis=1).astype(np.float32)

    @staticmethod
    def _window_stats(x: np.ndarray) -> np.ndarray:
        """Statistics of ``x`` ``[k, h, F]`` -> ``[k, F, len(STATISTICS)]``."""
        k, h, n_features = x.shape
        out = np.full((k, n_features, len(STATISTICS)), np.nan)
        if h == 0:
            return out
        observed = ~np.isnan(x)
        count = observed.sum(axis=1)                       # [k, F]
        any_obs = count > 0
        filled = np.where(observed, x, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = filled.sum(axis=1) / count
            var = (np.where(observed, x - mean[:, None, :], 0.0) ** 2).sum(axis=1) / count
            hours = np.arange(h, dtype=np.float64)[None, :, None]
            t_mean = np.where(observed, hours, 0.0).sum(axis=1) / count
            dt = np.where(observed, hours - t_mean[:, None, :], 0.0)
            dx = np.where(observed, x - mean[:, None, :], 0.0)
            sxx = (dt ** 2).sum(axis=1)
            slope = np.where(count >= 2, (dt * dx).sum(axis=1) / sxx, np.nan)
        first_idx = np.argmax(observed, axis=1)            # first True (0 if none; masked below)
        last_idx = h - 1 - np.argmax(observed[:, ::-1, :], axis=1)
        first = np.take_along_axis(x, first_idx[:, None, :], axis=1)[:, 0, :]
        last = np.take_along_axis(x, last_idx[:, None, :], axis=1)[:, 0, :]
        out[..., 0] = np.where(any_obs, mean, np.nan)
        out[..., 1] = np.where(any_obs, np.where(observed, x, np.inf).min(axis=1), np.nan)
        out[..., 2] = np.where(any_obs, np.where(observed, x, -np.inf).max(axis=1), np.nan)
        out[..., 3] = np.where(any_obs, np.sqrt(var), np.nan)
        out[..., 4] = np.where(any_obs, first, np.nan)
        out[..., 5] = np.where(any_obs, last, np.nan)
        out[..., 6] = slope
        out[..., 7] = count / h
        return out

    @staticmethod
    def _indicators(x: np.ndarray) -> np.ndarray:
        """``observed_any`` and ``hours_since_last`` per variable -> ``[k, F, 2]``."""
        k, h, n_features = x.shape
        observed = ~np.isnan(x)
        any_obs = observed.any(axis=1)
        last_idx = h - 1 - np.argmax(observed[:, ::-1, :], axis=1)
        since = np.where(any_obs, (h - 1 - last_idx).astype(np.float64), np.nan)
        return np.stack([any_obs.astype(np.float64), since], axis=2)
