"""The report's figures are readable: text colour from the cell's luminance, cells within noise
marked, colour bars and numbers where a heatmap needs them, an empty panel that says why, labels
that are not cut. Built from synthetic results (no model), so every case is cheap."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mhc_interp.probes.figure_helpers import annotate, cell_fontsize, panel_grid, text_color  # noqa: E402
from mhc_interp.probes.heads import HEAD_SCORES, HeadScores  # noqa: E402
from mhc_interp.probes.patching import PatchingResult  # noqa: E402
from mhc_interp.probes.rescue import RescueResult  # noqa: E402
from mhc_interp.probes.stream_usage import StreamUsageResult  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def texts(fig) -> list:
    return [t for ax in fig.axes for t in ax.texts]


def test_text_colour_follows_the_cells_luminance():
    viridis, magma = plt.get_cmap("viridis"), plt.get_cmap("magma")
    assert text_color(viridis(1.0)) == "black" and text_color(viridis(0.0)) == "white"
    assert text_color(magma(1.0)) == "black" and text_color(magma(0.0)) == "white"
    assert text_color((1, 1, 1, 1)) == "black" and text_color((0, 0, 0, 1)) == "white"
    # on a heatmap every number gets the colour that reads on its own cell
    fig, ax = plt.subplots()
    m = np.array([[0.0, 0.9], [0.5, 1.0]])
    im = ax.imshow(m, cmap="magma", vmin=0, vmax=1)
    annotate(ax, im, m)
    for t in ax.texts:
        j, i = t.get_position()
        assert t.get_color() == text_color(im.cmap(im.norm(m[int(i), int(j)])))


def test_cell_numbers_fit_their_cells():
    fig, axes, _ = panel_grid(8, (2.4, 2.1))
    assert len(axes) == 8
    small = cell_fontsize(axes[0], (4, 4))
    assert 6 <= small <= 11
    assert cell_fontsize(axes[0], (16, 16)) <= small  # more cells, smaller numbers
    fig, axes, cols = panel_grid(5, (2.4, 2.1))
    assert cols == 3 and sum(ax.get_visible() for ax in fig.axes) == 5  # 3 + 2, spare cell hidden


def patching(sem_scale: float, positions=None) -> PatchingResult:
    rng = np.random.default_rng(0)
    shape = (3, 4) if positions is None else (3, 4, 5)
    arrays = {}
    for mixing in ("recomputed", "frozen"):
        mean = rng.uniform(0.01, 0.05, shape)
        sem = sem_scale * mean
        arrays.update(
            {
                f"kl_{mixing}": mean,
                f"kl_{mixing}_sem": sem,
                f"kl_{mixing}_ci_low": mean - 4.3 * sem,
                f"kl_{mixing}_ci_high": mean + 4.3 * sem,
            }
        )
    arrays["kl_routing"] = arrays["kl_recomputed"] - arrays["kl_frozen"]
    arrays["baseline_clean"], arrays["baseline_corrupted"] = np.float64(0), np.float64(0.06)
    meta = {
        "direction": "denoise",
        "mixing": ["recomputed", "frozen"],
        "metric": "kl",
        "prompts": 3,
        "sublayers": ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn"],
        "n_streams": 4,
        "positions": positions,
    }
    return PatchingResult("activation_patching", arrays, meta)


def hatched(fig) -> int:
    return sum(1 for ax in fig.axes for p in ax.patches if p.get_hatch())


def test_patching_marks_the_cells_within_noise_and_says_so():
    figs = patching(sem_scale=1.0).plot()  # |mean| < 2 s.e.m. everywhere
    assert set(figs) == {"patching_recomputed", "patching_frozen", "patching_routing"}
    for name, fig in figs.items():
        ax = fig.axes[0]
        assert hatched(fig) == 12, name
        test = "within 2 s.e.m. of 0" if name == "patching_routing" else "with a 95% interval including 0"
        assert f"12 of 12 cells {test}" in ax.get_xlabel(), ax.get_xlabel()
    quiet = patching(sem_scale=0.05).plot()  # well above the noise
    assert hatched(quiet["patching_recomputed"]) == 0
    assert "0 of 12 cells" in quiet["patching_recomputed"].axes[0].get_xlabel()
    # the hatching follows the interval printed on the cell: a cell whose interval reaches 0 is hatched
    one = patching(sem_scale=0.05)
    one.arrays["kl_recomputed_ci_low"][1, 2] = -1e-4
    assert hatched(one.plot()["patching_recomputed"]) == 1
    # mean above, its interval smaller below: the +/- never as large as the mean
    ax = quiet["patching_recomputed"].axes[0]
    means = [t for t in ax.texts if not t.get_text().startswith("\u00b1")]
    plus = [t for t in ax.texts if t.get_text().startswith("\u00b1")]
    assert len(means) == len(plus) == 12
    assert max(t.get_fontsize() for t in plus) < min(t.get_fontsize() for t in means)
    for t in ax.texts:
        j, i = t.get_position()
        v = patching(0.05)["kl_recomputed"][round(i), round(j)]
        assert t.get_color() == text_color(ax.images[0].cmap(ax.images[0].norm(v)))


def test_patching_per_position_is_averaged_without_claims_about_noise():
    figs = patching(sem_scale=1.0, positions="each").plot()
    assert hatched(figs["patching_recomputed"]) == 0  # no per-cell s.e.m. for the average
    assert "prompts" in figs["patching_recomputed"].axes[0].get_xlabel()


def rescue(n: int = 4, sublayers: int = 8) -> RescueResult:
    rng = np.random.default_rng(1)
    r = rng.uniform(0, 1, (sublayers, n, n))
    for k in range(sublayers):
        np.fill_diagonal(r[k], np.nan)
    r[2, 0, 1] = np.nan  # a pair with too little damage
    kl = rng.uniform(0.01, 1, (sublayers, n, n))
    g = np.nansum(r, 0) / np.maximum((~np.isnan(r)).sum(0), 1)
    meta = {
        "mode": "one_shot",
        "sublayers": [f"blocks.{k // 2}.{'attn' if k % 2 == 0 else 'mlp'}" for k in range(sublayers)],
        "n_streams": n,
        "prompts": 4,
    }
    return RescueResult("ablate_rescue", {"rescue": r, "global_rescue": g, "kl_ablated": kl}, meta)


def test_rescue_layers_has_a_colour_bar_and_numbers():
    figs = rescue().plot()
    fig = figs["rescue_layers"]
    panels = [ax for ax in fig.axes if ax.images and ax.get_visible() and ax.get_label() != "<colorbar>"]
    assert len(panels) == 8
    assert len(fig.axes) == 9 and fig.axes[-1].get_label() == "<colorbar>"
    labels = [t.get_text() for t in panels[0].texts]
    assert len(labels) == 16 and labels.count("-") == 4  # every cell, the diagonal undefined
    assert "low" in [t.get_text() for t in panels[2].texts]  # too little damage says so


def test_h_res_labels_do_not_overlap_the_neighbouring_panel():
    n, subs = 4, [f"blocks.{k // 2}.{'attn' if k % 2 == 0 else 'mlp'}" for k in range(8)]
    h = np.tile(np.eye(n), (8, 1, 1)) * 0.9 + 0.025
    z = np.zeros((8, n))
    arrays = {
        "mean_h_res": h,
        "read_share": z + 0.25,
        "read_share_norm": z + 0.25,
        "write_share": z + 0.25,
        "stream_norm": np.ones((9, n)),
        "h_post_fro": np.ones(8),
        "h_post_var_tokens": np.ones(8),
        "h_post_var_streams": np.ones(8),
    }
    fig = StreamUsageResult("stream_usage", arrays, {"sublayers": subs, "n_streams": n}).plot()["h_res"]
    fig.canvas.draw()
    panels = [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]
    renderer = fig.canvas.get_renderer()
    boxes = [ax.get_tightbbox(renderer) for ax in panels]  # each panel with its tick and axis labels
    for a in range(len(boxes)):
        for b in range(a + 1, len(boxes)):
            assert not boxes[a].overlaps(boxes[b]), (panels[a].get_title(), panels[b].get_title())
    assert all(len(ax.texts) == n * n for ax in panels)
    assert min(t.get_fontsize() for ax in panels for t in ax.texts) >= 7


def test_head_figures_say_why_a_panel_is_empty_and_keep_their_labels():
    L, H, n = 3, 4, 4
    rng = np.random.default_rng(2)
    arrays = {k: rng.uniform(0, 1, (L, H)) for k in HEAD_SCORES}
    arrays["successor"] = np.full((L, H), np.nan)
    arrays["mean_h_pre"], arrays["mean_h_post"] = rng.uniform(0, 1, (L, n)), rng.uniform(0, 1, (L, n))
    reason = "no ordinal word list is single tokens in this tokenizer"
    meta = {"n_layers": L, "n_heads": H, "n_streams": n, "skipped": {"successor": reason}}
    figs = HeadScores("head_detector", arrays, meta).plot()
    for name in ("scores", "layer_distribution"):
        shown = " ".join(t.get_text().replace("\n", " ") for t in texts(figs[name]))
        assert reason in shown, name
    rw = figs["read_write"]
    left = rw.axes[0]
    labels = [t.get_text() for t in left.get_yticklabels()]
    assert labels and all(any(s.replace("_", " ") in lab for s in HEAD_SCORES) for lab in labels)
    assert any(ax.get_label() == "<colorbar>" for ax in rw.axes)
    assert len(left.texts) == n * len(labels)  # every cell has its number


def test_heatmaps_too_wide_for_numbers_get_none():
    fig, ax = plt.subplots()
    m = np.random.default_rng(3).uniform(0, 1, (16, 16))
    im = ax.imshow(m)
    assert annotate(ax, im, m) is False and not ax.texts
    assert annotate(ax, im, m[:4, :4]) is True and len(ax.texts) == 16
