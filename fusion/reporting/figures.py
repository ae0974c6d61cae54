"""The report's figures, drawn headless with matplotlib and written as PNG and SVG.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas, never through
``pyplot``, so no global figure state is touched (reports may be built in threads). Each figure
has one axes per panel and nothing else (no colour bars), so a figure's panels can be counted in
its SVG (one ``<g id="axes_N">`` group per panel).
"""

from __future__ import annotations

import math
import pathlib

import numpy as np

__all__ = ["calibration_figure", "critical_difference_figure", "fairness_figure",
           "method_colours", "reliance_figure", "robustness_figure", "save_figure"]

_DPI = 110
_PANEL = (4.6, 3.4)


def _new_figure(n_panels: int, *, ncols: int = 3, panel=_PANEL):
    """A figure with ``n_panels`` axes laid out on a grid (unused cells removed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        fig.delaxes(ax)
    return fig, list(axes[:n_panels])


def method_colours(methods) -> dict:
    """A fixed colour per method (tab10, then tab20), in the order given."""
    from matplotlib import colormaps

    names = list(dict.fromkeys(methods))
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def save_figure(fig, folder, name: str) -> tuple[pathlib.Path, pathlib.Path]:
    """Write ``fig`` as ``<folder>/<name>.png`` and ``.svg``; return both paths."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    png, svg = folder / f"{name}.png", folder / f"{name}.svg"
    fig.savefig(png, dpi=_DPI, metadata={"Software": None})
    fig.savefig(svg, metadata={"Date": None})
    return png, svg


def robustness_figure(panels, colours: dict):
    """Metric against X-ray missing rate: a panel per (task, cohort, masked parts).

    Parameters
    ----------
    panels : list of dict
        ``{"title", "ylabel", "curves": {method: {"rates", "mean", "low", "high"}}}``; the band
        is drawn between ``low`` and ``high``.
    colours : dict
        Method -> colour.
    """
    fig, axes = _new_figure(len(panels))
    for ax, panel in zip(axes, panels):
        for method, curve in panel["curves"].items():
            rates = np.asarray(curve["rates"])
            ax.plot(rates, curve["mean"], marker="o", ms=3, lw=1.4, color=colours[method],
                    label=method)
            low, high = np.asarray(curve["low"], float), np.asarray(curve["high"], float)
            if np.isfinite(low).any():
                ax.fill_between(rates, low, high, color=colours[method], alpha=0.18, lw=0)
        ax.set_title(panel["title"], fontsize=9)
        ax.set_xlabel("X-ray missing rate", fontsize=8)
        ax.set_ylabel(panel["ylabel"], fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    return fig


def critical_difference_figure(names, ranks, cd: float, title: str):
    """Nemenyi critical-difference diagram: mean ranks on an axis, a bar joining the groups of
    methods whose mean ranks differ by less than ``cd``, and the CD interval drawn on top.

    Parameters
    ----------
    names : list of str
        Methods, sorted by mean rank (best first).
    ranks : list of float
        Their mean ranks (ascending).
    cd : float
        Critical difference.
    title : str
    """
    from fusion.reporting.stats import cliques

    k = len(names)
    half = math.ceil(k / 2)
    groups = cliques(ranks, cd)
    top = -0.35 - 0.22 * len(groups)          # the method labels start below the clique bars
    fig, (ax,) = _new_figure(1, panel=(8.0, 1.8 + 0.3 * (half + len(groups))))
    low, high = 1, max(k, 2)
    ax.set_xlim(low - 0.5, high + 0.5)
    ax.set_ylim(top - 0.45 * half - 0.4, 1.7)
    ax.axis("off")
    ax.hlines(0, low, high, color="black", lw=1)
    for r in range(low, high + 1):
        ax.vlines(r, 0, 0.15, color="black", lw=1)
        ax.text(r, 0.25, str(r), ha="center", va="bottom", fontsize=8)
    ax.hlines(1.2, low, low + cd, color="firebrick", lw=2)
    ax.text(low + cd / 2, 1.3, f"CD = {cd:.2f}", ha="center", va="bottom", fontsize=8,
            color="firebrick")
    for i, (name, rank) in enumerate(zip(names, ranks)):
        left = i < half
        depth = top - 0.45 * (i if left else k - 1 - i)
        x_text = low - 0.4 if left else high + 0.4
        ax.plot([rank, rank, x_text], [0, depth, depth], color="0.3", lw=0.8)
        ax.text(x_text, depth, f"{name} ({rank:.2f})", ha="right" if left else "left",
                va="center", fontsize=8)
    for j, (a, b) in enumerate(groups):
        y = -0.3 - 0.22 * j
        ax.hlines(y, ranks[a] - 0.05, ranks[b] + 0.05, color="black", lw=3)
    ax.set_title(title, fontsize=9)
    return fig


def fairness_figure(panels):
    """Heatmaps of between-group gaps: a panel per (task, cohort), methods x (attribute, gap).

    Parameters
    ----------
    panels : list of dict
        ``{"title", "methods", "columns", "values" [m, c], "flags" [m, c] bool}``; a flagged
        cell gets a ``*`` (some group of that attribute was too small and left out).
    """
    width = max(len(p["columns"]) for p in panels)
    height = max(len(p["methods"]) for p in panels)
    fig, axes = _new_figure(len(panels), ncols=1,
                            panel=(1.6 + 0.75 * width, 1.2 + 0.34 * height))
    for ax, panel in zip(axes, panels):
        values = np.asarray(panel["values"], dtype=np.float64)
        masked = np.ma.masked_invalid(values)
        vmax = float(np.nanmax(values)) if np.isfinite(values).any() else 1.0
        ax.imshow(masked, cmap="Reds", vmin=0.0, vmax=max(vmax, 1e-9), aspect="auto")
        ax.set_xticks(range(len(panel["columns"])), panel["columns"], rotation=40, ha="right",
                      fontsize=7)
        ax.set_yticks(range(len(panel["methods"])), panel["methods"], fontsize=7)
        for (i, j), value in np.ndenumerate(values):
            text = "n/a" if not np.isfinite(value) else f"{value:.2f}"
            if panel["flags"][i][j]:
                text += "*"
            dark = np.isfinite(value) and value > 0.6 * vmax
            ax.text(j, i, text, ha="center", va="center", fontsize=6,
                    color="white" if dark else "black")
        ax.set_title(panel["title"], fontsize=9)
    return fig


def calibration_figure(panels, colours: dict):
    """Reliability diagrams: a panel per (task, cohort), a curve per method.

    Parameters
    ----------
    panels : list of dict
        ``{"title", "curves": {method: {"mean_score", "observed", "count", "ece"}}}`` with one
        entry per non-empty bin.
    colours : dict
    """
    fig, axes = _new_figure(len(panels))
    for ax, panel in zip(axes, panels):
        ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1)
        for method, curve in panel["curves"].items():
            ax.plot(curve["mean_score"], curve["observed"], marker="o", ms=3, lw=1.2,
                    color=colours[method], label=f"{method} (ECE {curve['ece']:.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean predicted probability", fontsize=8)
        ax.set_ylabel("observed frequency", fontsize=8)
        ax.set_title(panel["title"], fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper left")
    return fig


def reliance_figure(panels, colours: dict):
    """Modality reliance: a panel per (task, cohort), a bar per (method, modality).

    Parameters
    ----------
    panels : list of dict
        ``{"title", "metric", "bars": [{"method", "modality", "mean", "sd"}]}``.
    colours : dict
    """
    fig, axes = _new_figure(len(panels), ncols=2)
    for ax, panel in zip(axes, panels):
        bars = panel["bars"]
        y = np.arange(len(bars))
        sd = [b["sd"] if np.isfinite(b["sd"]) else 0.0 for b in bars]
        ax.barh(y, [b["mean"] for b in bars], xerr=sd, color=[colours[b["method"]] for b in bars],
                alpha=0.85, capsize=2)
        ax.set_yticks(y, [f"{b['method']} / {b['modality']}" for b in bars], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel(f"drop in {panel['metric']} when permuted", fontsize=8)
        ax.set_title(panel["title"], fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    return fig
