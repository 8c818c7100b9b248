"""Small matplotlib helpers shared by the probes' `plot()` methods, so every heatmap is readable
the same way: a grid of small panels with labels only on the outer edge (no y-label drawn over
the neighbouring panel), cell numbers whose colour is chosen from the cell's own luminance (black
on light cells, white on dark ones), and a panel that says why it is empty.

matplotlib is imported by the callers (inside `plot()`), never at module import time.
"""

from __future__ import annotations

import math
import textwrap
from typing import Callable, Optional, Sequence, Tuple

import numpy as np


def text_color(rgba) -> str:
    """ "black" or "white", whichever reads better on a cell of colour `rgba` (WCAG relative
    luminance of the sRGB colour, threshold 0.179: the point where both contrasts are equal)."""
    rgb = np.asarray(rgba, dtype=float)[:3]
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    luminance = float(lin @ np.array([0.2126, 0.7152, 0.0722]))
    return "black" if luminance > 0.179 else "white"


def cell_fontsize(ax, shape: Tuple[int, int], chars: int = 4, equal: bool = True) -> float:
    """A font size (points) at which `chars` characters fit in one cell of a heatmap of `shape`
    (rows, columns) drawn on `ax` (call it after the layout and the colour bars are set: it
    reads the axes' box; `equal`: square cells, as `imshow` draws by default); 6 to 11 points."""
    fig_w, fig_h = ax.figure.get_size_inches()
    pos = ax.get_position()
    cell_w, cell_h = pos.width * fig_w / max(shape[1], 1), pos.height * fig_h / max(shape[0], 1)
    if equal:
        cell_w = cell_h = min(cell_w, cell_h)
    size = min(72 * cell_w / (0.66 * chars + 0.6), 72 * cell_h / 1.6)
    return float(np.clip(size, 6, 11))


MAX_ANNOTATED_COLUMNS = 8  # wider heatmaps get no numbers: they would not fit their cells


def annotate(
    ax,
    im,
    values: np.ndarray,
    fontsize: float = 8,
    labels: Optional[np.ndarray] = None,
) -> bool:
    """Write each cell's value to 2 decimals (or `labels[i, j]`, where given and not empty) on an `imshow`
    heatmap, in black or white according to the cell's colour under `im`'s colormap and norm.
    NaN cells are left blank unless `labels` names them (then in black: they are not drawn).
    Returns False (and writes nothing) for more than MAX_ANNOTATED_COLUMNS columns."""
    values = np.asarray(values, dtype=float)
    if values.shape[1] > MAX_ANNOTATED_COLUMNS:
        return False
    for (i, j), v in np.ndenumerate(values):
        label = f"{v:.2f}" if labels is None else labels[i, j]
        if not label or (labels is None and np.isnan(v)):
            continue
        color = "black" if np.isnan(v) else text_color(im.cmap(im.norm(v)))
        ax.text(j, i, label, ha="center", va="center", fontsize=fontsize, color=color)
    return True


def panel_grid(
    n_panels: int,
    panel_in: Tuple[float, float],
    max_cols: int = 4,
    extra_width: float = 0.9,
):
    """(fig, axes [n_panels], n_cols): up to `max_cols` panels a row, each `panel_in` inches,
    unused grid cells hidden; `extra_width` inches for a colour bar on the right, 0.6 for titles."""
    import matplotlib.pyplot as plt

    cols = min(max_cols, n_panels)
    rows = math.ceil(n_panels / cols)
    cols = math.ceil(n_panels / rows)  # balance the rows: 5 panels -> 3 + 2, not 4 + 1
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(panel_in[0] * cols + extra_width, panel_in[1] * rows + 0.6),
        squeeze=False,
    )
    flat = axes.ravel()
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    return fig, flat[:n_panels], cols


def heatmap_grid(
    matrices: Sequence[np.ndarray],
    titles: Sequence[str],
    *,
    vmin: float,
    vmax: float,
    xlabel: str,
    ylabel: str,
    colorbar: str,
    title: str,
    chars: int = 4,
    labels: Optional[Callable[[np.ndarray], np.ndarray]] = None,
):
    """Small multiples: one annotated [rows, columns] heatmap per matrix (up to 4 a row, axis
    labels on the outer panels only, one shared colour bar and scale) -> the figure. `labels(m)`
    gives each panel's cell texts (default: the values to 2 decimals)."""
    fig, axes, cols = panel_grid(len(matrices), (2.4, 2.1))
    for k, (ax, m, name) in enumerate(zip(axes, matrices, titles)):
        im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap="viridis")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]))
        if k % cols == 0:  # axis labels on the left column and the bottom row only (they would overlap)
            ax.set_ylabel(ylabel)
        if k + cols >= len(axes):
            ax.set_xlabel(xlabel)
    fig.subplots_adjust(wspace=0.3, hspace=0.35)
    fig.colorbar(im, ax=list(axes), shrink=0.8, label=colorbar)
    size = cell_fontsize(axes[0], np.shape(matrices[0]), chars=chars)
    for ax, m in zip(axes, matrices):
        annotate(ax, ax.images[0], m, fontsize=size, labels=None if labels is None else labels(m))
    fig.suptitle(title, **({"fontsize": 9} if len(title) > 60 else {}))
    return fig


def empty_panel(ax, reason: str) -> None:
    """Say on an empty panel why it is empty (wrapped at 30 characters, centred, no ticks)."""
    ax.tick_params(left=False, labelleft=False, bottom=False, labelbottom=False)  # shared axes keep theirs
    ax.text(
        0.5,
        0.5,
        textwrap.fill(reason, 30),
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=8,
        color="#444",
        wrap=True,
    )
