"""Attribution patching (AtP, integrated gradients) against exact activation patching: the maps
side by side, a scatter plot, Pearson / Spearman correlation, top-10 overlap, and the cost of each.

Denoising with the KL metric (the report's setting): clean prompts are Hamlet windows, corrupted
prompts swap one noun / verb / adjective (`mhc_interp.token_windows.patching_prompts`). For each model
and mixing mode (recomputed = total effect, frozen = content effect) the exact
`activation_patching` map [sublayer, stream] is compared with `attribution_patching` (method atp:
one forward + one backward; ig: `--steps` points of integrated gradients), then the
position-resolved map [sublayer, stream, position] on `--position-prompts` prompts (the exact
sweep is one resumed forward per cell: the expensive part), and the mixer attribution
[sublayer, (H_pre, H_post, H_res)] against exact runs with one coefficient tensor patched, and the
stream edges (writer u -> stream s -> reader v) against exact path patching of every edge. Top-10
overlap: the 10 cells with the largest |effect| (value minus the unpatched corrupted run's KL).
The shared reference checkpoints (random tiny models, no tokenizer: random prompts with one token
shifted; in float64, since their effects are below float32 resolution) are graded too unless
`--no-references`. `--corrections` also measures the AtP*-style
corrections (docs/attribution.md: they were not kept). `--rescue` grades the approximate
ablation-and-rescue map (`mhc_interp.probes.attribution.rescue`) against the exact one-shot
`ablate_and_rescue` on the report's causal prompts (docs/attribution.md: `readout_fisher` tracks
it, the gradient-only estimates do not).

    python examples/attribution_vs_patching.py [--model NAME_OR_PATH] [--out DIR] [--fast] [--steps 2]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # run as a file or via runpy
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402
from _common import Example  # noqa: E402

REFERENCES = ["mhc_n4", "mhc_lite_n4", "mhc_lite_lss_n4", "hc_n4", "mhc_n2"]
FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "reference_checkpoints"


def _options(p):
    p.add_argument("--steps", type=int, default=2, help="integrated-gradient points (default 2)")
    p.add_argument(
        "--position-prompts",
        type=int,
        default=2,
        help="prompts for the position-resolved exact sweep (default 2; --fast 1)",
    )
    p.add_argument("--no-references", action="store_true", help="skip the shared reference checkpoints")
    p.add_argument("--corrections", action="store_true", help="also measure AtP*-style corrections")
    p.add_argument(
        "--rescue",
        action="store_true",
        help="also grade the approximate ablation-and-rescue map against the exact one",
    )


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def exact_forward_equivalents(model, positions: int = 1) -> float:
    """Forwards (of one prompt batch) an exact sweep costs: a cell at sublayer l resumes there and
    runs (L - l) / L of the model; plus the clean and corrupted runs."""
    n_sub, n = model.cfg.n_sublayers, model.cfg.n_streams
    return 2 + positions * n * sum((n_sub - l) / n_sub for l in range(n_sub))


def grade(
    model, clean, corrupted, label: str, steps: int, positions=None, batch_size: int = 8, warm: bool = True
):
    """Rows of the fidelity table for one model (both mixings, atp and ig) and the maps."""
    from mhc_interp.probes import activation_patching, attribution_patching
    from mhc_interp.probes.attribution.compare import fidelity

    rows, maps = [], {}
    n_pos = clean.shape[1]
    cells = None
    if positions == "each":  # a patch at a position before every prompt's corruption changes nothing
        first = int((clean != corrupted).float().argmax(1).min())
        cells = (
            (np.arange(n_pos) >= first)[None, None, :]
            .repeat(model.cfg.n_sublayers, 0)
            .repeat(model.cfg.n_streams, 1)
        )
    for mixing in ("recomputed", "frozen") if warm else ():  # warm-up (first-call costs), untimed
        activation_patching(model, clean[:1], corrupted[:1], mixing=mixing, positions=positions)
        for method in ("atp", "ig"):
            attribution_patching(
                model,
                clean[:1],
                corrupted[:1],
                mixing=mixing,
                positions=positions,
                method=method,
                steps=steps,
            )
    for mixing in ("recomputed", "frozen"):
        exact, t_exact = timed(
            lambda: activation_patching(
                model, clean, corrupted, mixing=mixing, positions=positions, batch_size=batch_size
            )
        )
        ex, base = exact[f"kl_{mixing}"], float(exact["baseline_corrupted"])
        maps[("exact", mixing)] = ex
        for method, s in (("atp", 1), ("ig", steps)):
            est, t = timed(
                lambda: attribution_patching(
                    model,
                    clean,
                    corrupted,
                    mixing=mixing,
                    positions=positions,
                    method=method,
                    steps=s,
                    batch_size=batch_size,
                )
            )
            maps[(method, mixing)] = est["attribution"]
            f = fidelity(est["attribution"], ex, base, cells=cells)
            batches = -(-len(clean) // batch_size)
            rows.append(
                dict(
                    model=label,
                    map="[sublayer, stream" + (", position]" if positions else "]"),
                    method=method if method == "atp" else f"ig ({s} steps)",
                    mixing=mixing,
                    **f,
                    time=t,
                    exact_time=t_exact,
                    speedup=t_exact / t,
                    passes=f"{est.meta['forward_passes'] / batches:g} fwd + {est.meta['backward_passes'] / batches:g} bwd",
                    exact_passes=f"{exact_forward_equivalents(model, n_pos if positions else 1):.0f} fwd",
                )
            )
    return rows, maps, base


def grade_mixers(model, clean, corrupted, label: str):
    from mhc_interp.probes import attribution_patching
    from mhc_interp.probes.attribution.compare import fidelity
    from mhc_interp.probes.attribution.mixers import exact_mixer_patching

    rows = []
    for mixing in ("recomputed", "frozen"):
        est = attribution_patching(model, clean, corrupted, mixing=mixing, method="atp", mixers=True)
        ex = exact_mixer_patching(model, clean, corrupted, mixing=mixing).mean(-1)
        f = fidelity(est[f"mixer_{mixing}"], ex, float(est["baseline_corrupted"]))
        rows.append(
            dict(
                model=label,
                map="mixers [sublayer, (H_pre, H_post, H_res)]",
                method="atp",
                mixing=mixing,
                **f,
                passes="(the same pass)",
                exact_passes=f"{3 * model.cfg.n_sublayers} resumed fwd",
            )
        )
    return rows


def grade_edges(model, clean, corrupted, label: str):
    """Every stream edge (u -> v through stream s) against its exact path patch."""
    from mhc_interp.probes.attribution import edge_attribution, exact_edge_patching, fidelity

    n_sub, n = model.cfg.n_sublayers, model.cfg.n_streams
    est, t = timed(lambda: edge_attribution(model, clean, corrupted))
    edges = [(u, v, s) for u in range(n_sub) for v in range(u + 1, n_sub) for s in range(n)]
    exact, t_exact = timed(lambda: exact_edge_patching(model, clean, corrupted, edges).mean(-1))
    base = float(np.nanmean(est["edge"] - est["edge_effect"]))
    f = fidelity(np.array([est["edge"][e] for e in edges]), exact, base)
    return [
        dict(
            model=label,
            map="stream edges [u, v, stream]",
            method="eap (atp)",
            mixing="frozen",
            **f,
            time=t,
            exact_time=t_exact,
            passes="4 fwd + 1 bwd",
            exact_passes=f"{len(edges)} resumed fwd",
        )
    ], est


def reference_prompts(model, n: int = 8, length: int = 16):
    import torch

    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, model.cfg.d_vocab, (n, length), generator=g)
    corrupted = clean.clone()
    corrupted[:, length // 2] = (corrupted[:, length // 2] + 1) % model.cfg.d_vocab
    return clean, corrupted


RESCUE_METHODS = (
    ("readout", {}),
    ("readout_fisher", dict(samples=4)),
    ("readout_fisher", dict(samples=16)),
    ("fisher", dict(samples=16)),
    ("gauss_newton", {}),
    ("linearised", {}),
    ("ig_site", dict(steps=1)),
    ("ig_site", dict(steps=4)),
)


def grade_rescue(model, tokens, label: str, methods=RESCUE_METHODS, batch_size: int = 8):
    """Rows: each approximate ablation-and-rescue method against the exact one-shot map (zero
    ablation, frozen mixing) on `tokens`, per quantity (pair damage per [sublayer, pair], single
    damage per [sublayer, stream], rescue per [sublayer, a, r], global rescue per [a, r]), with
    time and passes per prompt batch (forward-equivalents, a backward counted as 2 forwards, plus
    the readouts - final LayerNorms + unembedding - of the readout methods)."""
    from mhc_interp.probes import ablate_and_rescue
    from mhc_interp.probes.attribution.rescue import (
        approximate_rescue,
        exact_rescue_forwards,
        rescue_fidelity,
    )

    ablate_and_rescue(model, tokens[:1])  # warm-up, untimed
    exact, t_exact = timed(lambda: ablate_and_rescue(model, tokens, batch_size=batch_size))
    batches = -(-tokens.shape[0] // batch_size)
    rows = []
    for method, kw in methods:
        est, t = timed(lambda: approximate_rescue(model, tokens, method=method, batch_size=batch_size, **kw))
        p = est.meta["passes"]
        cost = (p["forwards"] + 2 * p["backwards"]) / batches
        readouts = p.get("readouts", 0) / batches
        name = method + "".join(f" ({k} {v})" for k, v in kw.items())
        for what, f in rescue_fidelity(est, exact).items():
            passes = f"{cost:.0f} fwd-eq" + (f" + {readouts:.0f} readouts" if readouts else "")
            rows.append(
                dict(
                    model=label,
                    map=f"rescue: {what}",
                    method=name,
                    mixing="frozen",
                    **f,
                    time=t,
                    exact_time=t_exact,
                    passes=passes,
                    exact_passes=f"{exact_rescue_forwards(model):.0f} fwd",
                )
            )
    return rows


def table(rows) -> str:
    head = (
        "| model | map | method | mixing | Pearson | Spearman | top-10 overlap | time (s) | exact time (s) "
        "| passes | exact |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    return head + "".join(
        f"| {r['model']} | {r['map']} | {r['method']} | {r['mixing']} | {r['pearson']:.3f} | {r['spearman']:.3f} | "
        f"{r['top_k']}/{r['k']} | {r.get('time', float('nan')):.2f} | {r.get('exact_time', float('nan')):.2f} | "
        f"{r['passes']} | {r['exact_passes']} |\n"
        for r in rows
    )


def draw_maps(maps, base, names, n):
    import matplotlib.pyplot as plt

    keys = [
        k
        for k in (
            ("exact", "recomputed"),
            ("atp", "recomputed"),
            ("ig", "recomputed"),
            ("exact", "frozen"),
            ("atp", "frozen"),
            ("ig", "frozen"),
        )
        if k in maps
    ]
    fig, axes = plt.subplots(2, 3, figsize=(10, 2.2 + 0.5 * len(names)), squeeze=False)
    lim = max(np.nanmax(np.abs(maps[k] - base)) for k in keys)
    for ax, k in zip(axes.ravel(), keys):
        im = ax.imshow(maps[k] - base, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(f"{k[0]}, mixing {k[1]}", fontsize=8)
        ax.set_yticks(range(len(names)), [s.replace("blocks.", "") for s in names], fontsize=6)
        ax.set_xticks(range(n), [f"s{s}" for s in range(n)], fontsize=6)
    fig.colorbar(im, ax=axes, label="KL - unpatched KL (nats)", shrink=0.8)
    return fig


def draw_scatter(maps, base):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.8))
    for ax, mixing in zip(axes, ("recomputed", "frozen")):
        ex = np.ravel(maps[("exact", mixing)]) - base
        for method, marker in (("atp", "o"), ("ig", "x")):
            ax.scatter(
                ex, np.ravel(maps[(method, mixing)]) - base, s=14, marker=marker, label=method, alpha=0.8
            )
        lo, hi = np.nanmin(ex), np.nanmax(ex)
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--", label="y = x")
        ax.set_xlabel("exact patch effect (KL - unpatched KL)")
        ax.set_ylabel("estimated effect")
        ax.set_title(f"mixing {mixing}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def draw_positions(maps, base, names, n):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 0.25 * len(names) * n + 1.5), sharey=True)
    ex = maps[("exact", "recomputed")] - base
    lim = np.nanmax(np.abs(ex))
    for ax, method in zip(axes, ("exact", "atp")):
        m = (maps[(method, "recomputed")] - base).reshape(len(names) * n, -1)  # [(sublayer, stream), pos]
        im = ax.imshow(m, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(f"{method}: per position, mixing recomputed", fontsize=8)
        ax.set_xlabel("patched position")
    axes[0].set_yticks(range(0, len(names) * n, n), [s.replace("blocks.", "") for s in names], fontsize=6)
    fig.colorbar(im, ax=axes, label="KL - unpatched KL", shrink=0.8)
    return fig


def main(argv=None):
    import torch

    from mhc_interp import HookedMHC

    ex = Example("attribution_vs_patching", __doc__, argv, causal=True, add_arguments=_options)
    ex.require_streams()
    clean, corrupted, how = ex.patching_prompts()
    fast = ex.args.fast
    rows, maps, base = grade(
        ex.model,
        clean,
        corrupted,
        "demo" if ex.args.model is None else ex.args.model,
        ex.args.steps,
        batch_size=ex.cfg.batch_size,
        warm=not fast,
    )
    names, n = ex.model.sublayer_names, ex.n_streams
    ex.save_figure(
        draw_maps(maps, base, names, n),
        "attribution_maps",
        "Exact activation patching and its AtP / IG estimates per (sublayer, stream): effect on "
        "KL(P_clean || P) relative to the unpatched corrupted run (blue = the clean stream restores).",
    )
    ex.save_figure(
        draw_scatter(maps, base),
        "attribution_scatter",
        "Estimated against exact patch effect per (sublayer, stream) cell; dashed: y = x.",
    )
    k = 1 if fast else ex.args.position_prompts
    # --fast: the per-position exact sweep up to 8 tokens past the first prompt's corruption only
    first = int((clean[0] != corrupted[0]).float().argmax())
    cut = slice(None, first + 8) if fast else slice(None)
    prow, pmaps, pbase = grade(
        ex.model,
        clean[:k, cut],
        corrupted[:k, cut],
        rows[0]["model"],
        ex.args.steps,
        positions="each",
        warm=not fast,
    )
    rows += prow
    ex.save_figure(
        draw_positions(pmaps, pbase, names, n),
        "attribution_positions",
        f"Position-resolved patching ({k} prompt(s)): exact sweep and AtP, rows = (sublayer, stream).",
    )
    rows += grade_mixers(ex.model, clean, corrupted, rows[0]["model"])
    edge_rows, edges = grade_edges(ex.model, clean, corrupted, rows[0]["model"])
    rows += edge_rows
    ex.save_result(edges)
    for fig_name, fig in edges.plot().items():
        ex.save_figure(
            fig,
            fig_name,
            "Stream-edge attribution: effect on the KL of patching writer u's write into "
            "reader v's read through each stream (mixing frozen to the corrupted run).",
        )
    if ex.args.corrections:
        rows += corrections(ex.model, clean, corrupted, rows[0]["model"])
    if ex.args.rescue:
        rows += grade_rescue(ex.model, ex.prompts(), rows[0]["model"], batch_size=ex.cfg.causal_prompts)
    if not ex.args.no_references and not ex.args.fast:
        for name in REFERENCES:
            # float64: random tiny models predict near-uniformly (KL ~1e-5, edge effects ~1e-10), below
            # float32 resolution of the exact oracle
            ref = HookedMHC.from_pretrained(FIXTURES / f"{name}.pt", dtype=torch.float64).eval()
            rc, rk = reference_prompts(ref)
            rows += grade(ref, rc, rk, name, ex.args.steps)[0] + grade_mixers(ref, rc, rk, name)
            rows += grade_edges(ref, rc, rk, name)[0]
            if ex.args.rescue:
                rows += grade_rescue(ref, rc, name)
    text = (
        f"# Attribution patching vs exact activation patching\n\nprompts: {clean.shape[0]} x {clean.shape[1]} "
        f"tokens ({how}); position-resolved: {k} prompt(s); denoising, KL metric\n\n" + table(rows)
    )
    ex.save_text("fidelity.md", text)
    best = max(
        (r for r in rows if r["map"] == "[sublayer, stream]" and r["model"] == rows[0]["model"]),
        key=lambda r: r["spearman"],
    )
    pos = [r for r in prow if r["method"] == "atp" and r["mixing"] == "recomputed"][0]
    return ex.finish(
        f"best {best['method']} ({best['mixing']}): Spearman {best['spearman']:.3f}, top-10 "
        f"{best['top_k']}/10; position-resolved AtP {pos['speedup']:.0f}x faster than exact, "
        f"Spearman {pos['spearman']:.3f}",
        rows=rows,
    )


def corrections(model, clean, corrupted, label: str):
    """AtP*-style corrections, measured (not shipped): (i) the exact local step - sublayer l run
    exactly on the patched state (its mixer, attention softmax, LayerNorm and MLP), the rest
    linearised with the gradient at the next state; (ii) the mixer fix - only H(x) at sublayer l
    recomputed exactly, the rest first order. Positions: all (no position split)."""
    import contextlib

    import torch

    from mhc_interp.probes import activation_patching
    from mhc_interp.probes.attribution import atp_gradients
    from mhc_interp.probes.attribution.compare import fidelity
    from mhc_interp.probes.causal import clean_run, kl_metric

    mask = torch.ones(clean.shape, dtype=torch.bool)
    mask[:, 0] = False
    cl, cs, _ = clean_run(model, clean)
    _, bs, bc = clean_run(model, corrupted)
    metric = kl_metric(cl, mask)
    n_sub, n = model.cfg.n_sublayers, model.cfg.n_streams
    rows = []
    for mixing in ("recomputed", "frozen"):
        frozen = mixing == "frozen"
        exact = activation_patching(model, clean, corrupted, mixing=mixing)
        g = atp_gradients(model, corrupted, metric, list(range(n_sub)), frozen=frozen)
        with torch.enable_grad(), model.frozen_mixing(bc) if frozen else contextlib.nullcontext():
            xf = model(corrupted, stop_at_sublayer=n_sub).detach().requires_grad_()
            (g_final,) = torch.autograd.grad(metric(model.unembed_streams(xf)[None]).sum(), xf)
        base = g.values.double()
        local, fix = np.zeros((n_sub, n)), np.zeros((n_sub, n))
        for l, sub in enumerate(model.sublayers):
            g_next = g.state_grads[l + 1] if l + 1 < n_sub else g_final
            name = model.sublayer_names[l]
            for s in range(n):
                d = torch.zeros_like(bs[l])
                d[:, :, s] = cs[l][:, :, s] - bs[l][:, :, s]
                with torch.no_grad(), model.frozen_mixing(bc) if frozen else contextlib.nullcontext():
                    step = sub(bs[l] + d) - sub(bs[l])  # [B, pos, n, d]
                local[l, s] = (base + (step * g_next).sum((1, 2, 3)).double()).mean()
                if frozen:
                    continue
                with torch.enable_grad():
                    x = bs[l].clone().requires_grad_()
                    coeffs = sub.mixer(x)
                    grads = [g.mixing_grads[f"{name}.hook_{p}"] for p in ("h_pre", "h_post", "h_res")]
                    (through_mixer,) = torch.autograd.grad(
                        sum((c * gr).sum() for c, gr in zip(coeffs, grads)), x
                    )
                with torch.no_grad():
                    new = sub.mixer(bs[l] + d)
                dh = sum(((a - b.detach()) * gr).flatten(1).sum(-1) for a, b, gr in zip(new, coeffs, grads))
                fix[l, s] = (
                    base + (d * (g.state_grads[l] - through_mixer)).sum((1, 2, 3)).double() + dh.double()
                ).mean()
        b = float(exact["baseline_corrupted"])
        for method, m in (("atp* local exact step", local), ("atp* mixer fix", fix))[: 1 if frozen else 2]:
            rows.append(
                dict(
                    model=label,
                    map="[sublayer, stream]",
                    method=method,
                    mixing=mixing,
                    **fidelity(m, exact[f"kl_{mixing}"], b),
                    passes=f"1 fwd + 1 bwd + {n} fwd",
                    exact_passes="-",
                )
            )
    return rows


if __name__ == "__main__":
    main()
