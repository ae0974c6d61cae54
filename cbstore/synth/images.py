"""Procedural chest X-ray films (grayscale, vectorised numpy).

A frontal film shows a body outline, two dark lung fields, the mediastinum and a bright heart
silhouette whose width follows the ``cardiomegaly`` factor (cardiothoracic ratio 0.46 + 0.06 z,
magnified 12 % on AP films, as real AP projections are). ``opacity`` adds bright Gaussian patches
inside the lungs, ``effusion`` a bright basal layer with a meniscus rising towards the lateral
wall. Lateral films show a side view whose findings are faint. Every film gets a small random
shift, scale, gain and pixel noise, drawn from the film's own generator
(:class:`cbstore.synth._draws.UnitDraws`), so a film's pixels do not depend on the other films
rendered with it. Images are rendered in batches of one shape.
"""

from __future__ import annotations

import numpy as np

from cbstore.synth._draws import UnitDraws

#: Films rendered at once (bounds the float32 scratch arrays, about 10 per batch).
_BATCH = 64


def _soft_ellipse(Y, X, cy, cx, ry, rx, edge=0.08):
    d = 1.0 - ((Y - cy) / ry) ** 2 - ((X - cx) / rx) ** 2
    return 0.5 + 0.5 * np.tanh(d / (2 * edge))


def _frontal(Y, X, c, o, e, ap, draws: UnitDraws):
    b = len(c)
    col = lambda v: np.asarray(v, np.float32).reshape(b, 1, 1)  # noqa: E731
    dy, dx = col(draws.uniform(-0.03, 0.03)), col(draws.uniform(-0.03, 0.03))
    sc = col(draws.uniform(0.95, 1.05))
    img = np.full((b,) + Y.shape, 0.08, np.float32)
    img += 0.42 * _soft_ellipse(Y, X, 0.52 + dy, 0.5 + dx, 0.55 * sc, 0.46 * sc)
    lung_cy, lung_ry, lung_rx = 0.44 + dy, 0.28 * sc, 0.135 * sc
    lungs = []
    for side in (-1, 1):
        lung_cx = 0.5 + dx + side * 0.19 * sc
        lungs.append((lung_cx, _soft_ellipse(Y, X, lung_cy, lung_cx, lung_ry, lung_rx, 0.06)))
    lung_mask = lungs[0][1] + lungs[1][1]
    img -= 0.30 * lung_mask
    img += 0.25 * _soft_ellipse(Y, X, 0.30 + dy, 0.5 + dx, 0.25 * sc, 0.06 * sc)
    ctr = np.clip(0.46 + 0.06 * col(c), 0.34, 0.74) * np.where(col(ap) > 0, 1.12, 1.0)
    img += 0.35 * _soft_ellipse(Y, X, 0.66 + dy, 0.53 + dx, 0.13 * sc, ctr * 0.46 * sc, 0.06)
    # patchy opacities: three blobs per film inside the lungs
    m_o = np.maximum(col(o) - 0.3, 0.0)
    for _ in range(3):
        side = np.where(draws.random() < 0.5, -1, 1).reshape(b, 1, 1)
        by = lung_cy + col(draws.uniform(-0.55, 0.6)) * lung_ry
        bx = 0.5 + dx + side * 0.19 * sc + col(draws.uniform(-0.55, 0.55)) * lung_rx
        sig = col(draws.uniform(0.05, 0.09))
        blob = np.exp(-((Y - by) ** 2 + (X - bx) ** 2) / (2 * sig ** 2))
        img += 0.22 * m_o * blob * lung_mask
    # effusion: bright base with a meniscus, one side or both
    m_e = np.maximum(col(e) - 0.4, 0.0)
    both = m_e > 0.8
    right_first = col(draws.random() < 0.5) > 0
    level = lung_cy + lung_ry - np.minimum(0.22 * m_e, 0.35)
    for k, (lung_cx, mask) in enumerate(lungs):
        on = both | (right_first if k == 0 else ~right_first)
        lateral = np.abs(X - lung_cx) / lung_rx
        boundary = level - 0.06 * lateral ** 2 * (m_e > 0)
        layer = mask * (0.5 + 0.5 * np.tanh((Y - boundary) / 0.03))
        img += 0.32 * np.where(on & (m_e > 0), 1.0, 0.0).astype(np.float32) * layer
    return img


def _lateral(Y, X, c, o, e, draws: UnitDraws):
    b = len(c)
    col = lambda v: np.asarray(v, np.float32).reshape(b, 1, 1)  # noqa: E731
    dy, dx = col(draws.uniform(-0.03, 0.03)), col(draws.uniform(-0.03, 0.03))
    img = np.full((b,) + Y.shape, 0.08, np.float32)
    img += 0.45 * _soft_ellipse(Y, X, 0.52 + dy, 0.5 + dx, 0.55, 0.36)
    img -= 0.25 * _soft_ellipse(Y, X, 0.45 + dy, 0.5 + dx, 0.3, 0.22, 0.06)
    img += 0.25 * _soft_ellipse(Y, X, 0.62 + dy, 0.38 + dx + 0.01 * col(c), 0.13, 0.10 + 0.01 * col(c), 0.06)
    img += 0.08 * np.maximum(col(o) - 0.3, 0) * _soft_ellipse(Y, X, 0.45 + dy, 0.55 + dx, 0.2, 0.15, 0.1)
    img += 0.1 * np.maximum(col(e) - 0.4, 0) * (Y > 0.68 + dy) * _soft_ellipse(Y, X, 0.6 + dy, 0.6 + dx, 0.2, 0.2)
    return img


def render_films(factors: np.ndarray, frontal: np.ndarray, ap: np.ndarray, shape: tuple[int, int],
                 draws: UnitDraws) -> np.ndarray:
    """Render films of one shape.

    Parameters
    ----------
    factors : numpy.ndarray
        float [n, 3]: cardiomegaly, opacity, effusion (standardised latent scale).
    frontal : numpy.ndarray
        bool [n]: frontal (AP/PA) or lateral projection.
    ap : numpy.ndarray
        bool [n]: AP projection (heart magnified); ignored for lateral films.
    shape : (int, int)
        Rows and columns.
    draws : UnitDraws
        One generator per film (in the order of ``factors``).

    Returns
    -------
    numpy.ndarray
        uint8 [n, rows, cols].
    """
    rows, cols = shape
    Y, X = np.meshgrid((np.arange(rows, dtype=np.float32) + 0.5) / rows,
                       (np.arange(cols, dtype=np.float32) + 0.5) / cols, indexing="ij")
    # non-square films keep the anatomy's proportions: pad the longer side with background
    if cols > rows:
        X = (X - 0.5) * cols / rows + 0.5
    elif rows > cols:
        Y = (Y - 0.5) * rows / cols + 0.5
    out = np.empty((len(factors), rows, cols), np.uint8)
    for start in range(0, len(factors), _BATCH):
        sl = slice(start, start + _BATCH)
        f = factors[sl]
        batch = draws.take(np.arange(len(factors))[sl])
        img = np.empty((len(f), rows, cols), np.float32)
        fr = frontal[sl]
        if fr.any():
            img[fr] = _frontal(Y, X, f[fr, 0], f[fr, 1], f[fr, 2], ap[sl][fr], batch.take(np.flatnonzero(fr)))
        if (~fr).any():
            img[~fr] = _lateral(Y, X, f[~fr, 0], f[~fr, 1], f[~fr, 2], batch.take(np.flatnonzero(~fr)))
        b = len(f)
        gain = batch.uniform(0.85, 1.15).astype(np.float32).reshape(b, 1, 1)
        bias = batch.uniform(-0.04, 0.04).astype(np.float32).reshape(b, 1, 1)
        img = img * gain + bias + batch.normal_fields((rows, cols), 0.03).astype(np.float32)
        out[sl] = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out
