"""Random draws that do not depend on how the units (stays, patients, films) are chunked.

Every unit gets its own generator, seeded from ``(seed, stream, unit index)`` with
:class:`numpy.random.SeedSequence`, so a unit's values depend on the seed, the table being
generated and the unit's own position, never on which other units share its chunk. A chunk's code
stays vectorised: :class:`UnitDraws` returns one value per unit, or one value per row given the
unit of each row. Each unit consumes its generator in the order its own rows appear, so a chunk
writer must lay out a unit's rows in an order that does not depend on the other units of the chunk
(the natural order of vectorised code over units: by step, then by unit, then by time).
"""

from __future__ import annotations

import numpy as np

#: Stream numbers of the chunked tables (one independent family of generators each).
STREAMS = {"chartevents": 1, "outputevents": 2, "labevents": 3, "images": 4, "lab_providers": 5}


def unit_generator(seed: int, stream: int, unit: int) -> np.random.Generator:
    """The generator of one unit: a function of ``(seed, stream, unit)`` only."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(stream), int(unit)])))


class UnitDraws:
    """One generator per unit of a chunk, with vectorised draws per unit or per row.

    Parameters
    ----------
    seed : int
        The source's seed.
    stream : int
        Which table (:data:`STREAMS`).
    units : sequence of int
        Global indices of the chunk's units (positions in the whole source, not in the chunk).

    Notes
    -----
    Methods taking ``rows`` return one value per row, where ``rows[i]`` is the chunk position
    (0 .. len(units) - 1) of the unit row ``i`` belongs to; without ``rows``, one value per unit.
    """

    def __init__(self, seed: int, stream: int, units):
        self._gens = [unit_generator(seed, stream, u) for u in np.asarray(units, dtype=np.int64).tolist()]

    def __len__(self) -> int:
        return len(self._gens)

    def take(self, positions) -> UnitDraws:
        """The units at ``positions`` (chunk positions); their generators are shared, not copied."""
        subset = UnitDraws.__new__(UnitDraws)
        subset._gens = [self._gens[i] for i in np.asarray(positions, np.int64).tolist()]
        return subset

    def _standard(self, kind: str, rows) -> np.ndarray:
        if rows is None:
            if kind == "uniform":
                return np.array([g.random() for g in self._gens], dtype=np.float64)
            return np.array([g.standard_normal() for g in self._gens], dtype=np.float64)
        rows = np.asarray(rows, dtype=np.int64)
        counts = np.bincount(rows, minlength=len(self._gens)).tolist()
        draw = "random" if kind == "uniform" else "standard_normal"
        parts = [getattr(g, draw)(c) for g, c in zip(self._gens, counts) if c]
        values = np.concatenate(parts) if parts else np.zeros(0, np.float64)
        if len(rows) > 1 and np.any(rows[1:] < rows[:-1]):
            out = np.empty(len(rows), np.float64)
            out[np.argsort(rows, kind="stable")] = values
            return out
        return values

    def random(self, rows=None) -> np.ndarray:
        """Uniform values in [0, 1)."""
        return self._standard("uniform", rows)

    def uniform(self, low, high, rows=None) -> np.ndarray:
        """Uniform values in [low, high)."""
        return low + (high - low) * self._standard("uniform", rows)

    def normal(self, loc=0.0, scale=1.0, rows=None) -> np.ndarray:
        """Normal values."""
        return loc + scale * self._standard("normal", rows)

    def integers(self, low: int, high: int, rows=None) -> np.ndarray:
        """Integers in [low, high), equally likely."""
        u = self._standard("uniform", rows)
        return np.minimum(low + np.floor(u * (high - low)).astype(np.int64), high - 1)

    def choice(self, p, rows=None) -> np.ndarray:
        """Indices 0 .. len(p) - 1 drawn with probabilities ``p``."""
        cdf = np.cumsum(np.asarray(p, dtype=np.float64))
        u = self._standard("uniform", rows) * cdf[-1]
        return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)

    def poisson(self, lam) -> np.ndarray:
        """One Poisson count per unit (``lam`` a scalar or one rate per unit)."""
        lam = np.broadcast_to(np.asarray(lam, dtype=np.float64), (len(self._gens),)).tolist()
        return np.array([g.poisson(v) for g, v in zip(self._gens, lam)], dtype=np.int64)

    def normal_fields(self, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
        """One array of ``shape`` normal values per unit, stacked: ``[len(units), *shape]``."""
        if not self._gens:
            return np.zeros((0,) + tuple(shape), np.float64)
        return scale * np.stack([g.standard_normal(shape) for g in self._gens])
