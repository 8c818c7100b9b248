"""Approximate ablation-and-rescue: `ablate_and_rescue`'s maps (one-shot, frozen mixing) from a few
passes plus one readout (final LayerNorms + unembedding) per (sublayer, stream or pair).

Damage D = KL(P_clean || P_ablated) of each single stream and pair ablated at the state x_l
entering sublayer l (zero ablation: delta = -x_l on those streams); rescue and its global averages
are formed by `AblateRescue.result` (a `RescueResult` with the exact map's keys). With
C_l = H_res[L-1] ... H_res[l] (the frozen mixing carrying delta to the final state x_L):

    "readout" (default)  D ~ KL(P_clean || unembed_streams(x_L + C_l delta))
    "readout_fisher"     D ~ the same + mean_k (v_k . dz_c)(v_k . u) + 1/2 mean_k (v_k . u)^2
                         (u: the change through later sublayers' reads; v_k: K Fisher draws)
    "fisher", "gauss_newton", "linearised"    D ~ 1/2 dz^T F dz, dz = J delta, and variants
    "ig_site"            D = int_0^1 dD/dx(x_l + a delta) . delta da along each site's own path

"readout" and "readout_fisher" track the exact map; the gradient-only ones do not (the per-stream
final LayerNorm is scale-invariant, so most damage is in the last 1% of the ablation path), and
"ig_site" tracks but costs several times the exact map: both are measured references.

Details (derivations, costs, measurements): docs/attribution.md#approximate-ablation-and-rescue
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..causal import clean_run, kl_metric, log_probs, score_dtype
from ..rescue import AblateRescue, RescueResult, ablation_values, run_rescue
from ..runner import split_options
from .core import _capture_hooks, ig_path, mixing_context

METHODS = ("readout", "readout_fisher", "fisher", "gauss_newton", "linearised", "ig_site")


def _weights(mask: Tensor, dtype) -> Tensor:
    """The KL metric's position weights mask / sum(mask) [B, pos] (as `kl_metric` forms them)."""
    m = mask.to(dtype)
    return m / m.sum(-1, keepdim=True)


def _resumed_share(model, layers: Sequence[int]) -> float:
    """Forward-equivalents of one resumed forward from each sublayer l of `layers`: sum_l (L - l) / L."""
    n_sub = model.cfg.n_sublayers
    return sum((n_sub - l) / n_sub for l in layers)


def fisher_projections(
    model,
    tokens: Tensor,
    mask: Tensor,
    deltas: Dict[int, Tensor],
    *,
    samples: int,
    temperature: float = 1.0,
    frozen: bool = True,
    generator: Optional[torch.Generator] = None,
    clean_logits: Optional[Tensor] = None,
    carried: Optional[Dict[int, Tensor]] = None,
    draws: Optional[Tensor] = None,
):
    """(g_l^k . delta_l[s]) for every draw k, sublayer l (the keys of `deltas`), prompt and stream:
    [samples, L, B, n] float64, from one forward of `tokens` and `samples` backwards (module docstring).
    frozen: the mixing coefficients are constants (detached where they enter), as with `frozen_mixing`.
    With `carried` {l: C_l delta_l per source stream [n, B, pos, n, d]} and `draws` y [K, B, pos]
    (given, not sampled) also returns g_L^k . C_l delta_l[s] [samples, L, B, n] (g_L at the final state)."""
    layers = list(deltas)  # in the caller's order (rows of the result)
    states: Dict[int, Tensor] = {}
    hooks = _capture_hooks(
        model, layers, capture_mixing=False, detach_mixing=frozen, states=states, mixing={}
    )
    out = torch.zeros(samples, len(layers), tokens.shape[0], model.cfg.n_streams, dtype=torch.float64)
    out_final = torch.zeros_like(out)
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        final = model(tokens, stop_at_sublayer=model.cfg.n_sublayers)  # [B, pos, n, d]
        lp = log_probs(model.unembed_streams(final), temperature)
        ref = lp.detach() if clean_logits is None else log_probs(clean_logits, temperature)
        root_w = (
            _weights(mask.to(lp.device), lp.dtype).nan_to_num(0.0).sqrt()
        )  # a prompt with no scored position: 0
        probs = ref.exp().flatten(0, 1).float().cpu()  # [B*pos, vocab]
        inputs = [states[l] for l in layers] + [final]
        for k in range(samples):
            y = (
                torch.multinomial(probs, 1, generator=generator).view(tokens.shape)
                if draws is None
                else draws[k]
            )
            score = (lp.gather(-1, y[..., None].to(lp.device))[..., 0] * root_w).sum()
            grads = torch.autograd.grad(score, inputs, retain_graph=k + 1 < samples, materialize_grads=True)
            out[k] = torch.stack(
                [(g.double() * deltas[l].double()).sum((1, 3)) for l, g in zip(layers, grads)]
            ).cpu()  # [L, B, n]
            if carried is not None:
                g_final = grads[-1].double()
                out_final[k] = torch.stack(
                    [(g_final[None] * carried[l]).sum((2, 3, 4)).T for l in layers]
                ).cpu()
    return out if carried is None else (out, out_final)


def logit_changes(model, states, deltas, cache, *, tokens: Optional[Tensor] = None, eps: float = 1e-3):
    """dz = J delta per (sublayer, stream) by central differences of resumed forwards:
    {l: [n, B, pos, vocab]} (2 n resumed forwards per sublayer; float64 models give ~1e-7), the
    mixing frozen to `cache` (None: recomputed). tokens [B, pos]: the clean run's ids (for models
    that route by token id)."""
    out = {}
    with torch.no_grad(), mixing_context(model, cache):
        for l, d in deltas.items():
            per = []
            for s in range(model.cfg.n_streams):
                step = torch.zeros_like(d)
                step[:, :, s] = eps * d[:, :, s]
                up, down = (
                    model(x, start_at_sublayer=l, tokens=tokens).to(score_dtype(d.dtype))
                    for x in (states[l] + step, states[l] - step)
                )
                per.append((up - down) / (2 * eps))
            out[l] = torch.stack(per)
    return out


def _kl_linearised(ref_lp: Tensor, dz: Tensor, weights: Tensor, temperature: float) -> Tensor:
    """KL(P_ref || softmax((z + dz) / T)) with z / T = ref_lp + const, per prompt [B]."""
    lp = torch.log_softmax(ref_lp + dz / temperature, -1)
    return ((ref_lp.exp() * (ref_lp - lp)).sum(-1) * weights).sum(-1)


def _quadratic(ref_lp: Tensor, dz: Tensor, weights: Tensor, temperature: float) -> Tensor:
    """1/2 sum_q w_q dz_q^T F_q dz_q / T^2 with F_q = diag(p) - p p^T, per prompt [B]."""
    p = ref_lp.exp()
    u = dz / temperature
    return 0.5 * (((p * u * u).sum(-1) - (p * u).sum(-1) ** 2) * weights).sum(-1)


def residual_carry(model, cache) -> Dict[int, Tensor]:
    """{l: C_l = H_res[L-1] ... H_res[l]} [B, pos, n(target), n(source)] from a cache of the
    frozen coefficients: how a change of the state entering sublayer l reaches the final state
    through the residual mixing alone (the sublayers' writes held fixed)."""
    out = {}
    prod = None
    for l in reversed(range(model.cfg.n_sublayers)):
        h = cache[f"{model.sublayer_names[l]}.hook_h_res"].double()
        prod = h if prod is None else prod @ h
        out[l] = prod
    return out


def carried_deltas(model, cache, deltas: Dict[int, Tensor]) -> Dict[int, Tensor]:
    """{l: C_l delta_l per source stream s} [n(source), B, pos, n(target), d] float64: column s of
    C_l (`residual_carry`) times stream s of delta_l, the change ablating s makes to the final state."""
    carry = residual_carry(model, cache)
    return {l: torch.einsum("bpts,bpsd->sbptd", carry[l], d.double()) for l, d in deltas.items()}


def carried_damage(
    model,
    tokens: Tensor,
    cache,
    moved: Dict[int, Tensor],
    metric,
    sites,
    draws: Optional[Tensor] = None,
    clean_logits: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    temperature: float = 1.0,
):
    """Method "readout": damage [L, n, n, B] = metric(unembed_streams(x_L + C_l delta)) for each
    site (streams (s,) at [s, s], (i, j) at [i, j]) ablated at each l of `moved` (`carried_deltas`;
    module docstring); `metric` is the exact map's KL. With `draws` y [K, B, pos] (and
    clean_logits, mask) also v [K, L, n, n, B] = v_k . dz_c, v_k = sqrt(w) (e_y - p) / T, dz_c the
    carried logit change (else None)."""
    damage = torch.zeros(
        len(moved), model.cfg.n_streams, model.cfg.n_streams, tokens.shape[0], dtype=torch.float64
    )
    v = None if draws is None else torch.zeros(len(draws), *damage.shape, dtype=torch.float64)
    if draws is not None:
        ref_p = log_probs(clean_logits, temperature).double().exp()
        root_w = _weights(mask.to(ref_p.device), torch.float64).nan_to_num(0.0).sqrt()
    with torch.no_grad(), model.frozen_mixing(cache):
        final = model(tokens, stop_at_sublayer=model.cfg.n_sublayers)  # [B, pos, n, d]
        for li, change in enumerate(moved.values()):
            for site in sites:
                z = model.unembed_streams((final.double() + sum(change[s] for s in site)).to(final.dtype))
                damage[li, site[0], site[-1]] = metric(z[None])[0].double().cpu()
                if draws is not None:
                    dz = (z.double() - clean_logits.double()) / temperature  # [B, pos, vocab]
                    mean = (ref_p * dz).sum(-1)  # [B, pos]
                    picked = dz[None].expand(len(draws), *dz.shape).gather(-1, draws[..., None])[..., 0]
                    v[:, li, site[0], site[-1]] = ((picked - mean) * root_w).sum(-1).cpu()  # [K, B]
    return damage, v


def ig_site_damage(
    model,
    states,
    cache,
    delta: Tensor,
    start: int,
    metric,
    *,
    steps: int,
    tokens: Optional[Tensor] = None,
    max_rows: Optional[int] = None,
) -> Tensor:
    """Integrated-gradient estimate of M(x_start + delta) - M(x_start) along the straight path
    (midpoint rule, `steps` points stacked as replicas; mixing frozen to `cache`, None:
    recomputed): [B] float64. `metric` maps logits [k, B, pos, vocab] to [k, B]; tokens [B, pos]:
    the clean run's ids (token-routed models)."""
    x, b = states[start], states[start].shape[0]
    total = torch.zeros(b, dtype=torch.float64, device=x.device)
    with torch.enable_grad(), mixing_context(model, cache):
        for k, point, ids in ig_path(model, x, delta, tokens, steps, max_rows):
            point.requires_grad_(True)  # [k*B, pos, n, d]
            logits = model(point, start_at_sublayer=start, tokens=ids)
            values = metric(logits.view(k, b, *logits.shape[1:]))
            (g,) = torch.autograd.grad(values.nan_to_num(0.0).sum(), point)
            total += (g.view(k, b, *g.shape[1:]).double() * delta.double()[None]).sum((0, 2, 3, 4))
    return total / steps


class ApproxAblateRescue(AblateRescue):
    """`AblateRescue`'s one-shot map estimated (module docstring): method "readout" (2 forwards and
    one readout per sublayer and single / pair, per batch), "readout_fisher" (the same readouts,
    3 forwards and `samples` backwards), or the measured references "fisher" (2 forwards +
    `samples` backwards), "gauss_newton" / "linearised" (2 n resumed forwards per sublayer) and
    "ig_site" (`steps` resumed forwards and backwards per site). Same options, masks, result keys
    and `min_kl` flagging as the exact probe; mode "persistent" is not estimated (the ablation
    repeats at every later sublayer, so the state change is not one site's delta). samples: 4 by
    default (on the demo model 4 and 16 draws track the exact map equally well)."""

    name = "ablate_rescue_approx"

    def __init__(self, method: str = "readout", samples: int = 4, seed: int = 0, steps: int = 2, **kwargs):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}: use one of {METHODS}")
        if kwargs.get("mode", "one_shot") != "one_shot":
            raise ValueError(
                "the approximate map estimates mode='one_shot' only (a persistent ablation is not "
                "one site's state change); run ablate_and_rescue(mode='persistent') for it"
            )
        if kwargs.get("pairs") is not None:
            raise ValueError("the approximate map covers every stream pair (pairs= is not supported)")
        for name, value in (("samples", samples), ("steps", steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        super().__init__(**kwargs)
        self.method, self.samples, self.seed, self.steps = method, samples, seed, steps

    def setup(self, model) -> None:
        super().setup(model)
        if self.method.startswith("readout") and not self.frozen:
            raise ValueError(
                f"method={self.method!r} carries the ablation along the frozen residual mixing: it needs "
                "frozen=True (the exact map's default)"
            )
        self.generator = torch.Generator().manual_seed(self.seed)
        self.passes = {"forwards": 0.0, "backwards": 0.0, "readouts": 0.0}
        # the ablated stream sets: every single stream, then every pair
        self.sites = [(s,) for s in range(self.n)] + self.pair_list

    def intervene(self, model, tokens: Tensor, mask: Tensor) -> None:
        """One batch's damage [L, n, n, B] (single stream s at [s, s], pair i < j at [i, j]) by
        `self.method`, recorded with the forward / backward / readout passes it took."""
        logits, states, cache = clean_run(model, tokens)
        ablation = self.corpus_means if self.uses_corpus_mean else self.ablation
        values = ablation_values(model, states, mask, ablation)
        # zero / mean / tensor ablation of each stream alone: delta_l = value_l - x_l [B, pos, n, d]
        # (stream s of delta_l is the change ablating s makes; a pair's change is the sum of two)
        deltas = {l: (values[l].to(states[l].dtype) - states[l]).expand_as(states[l]) for l in self.layers}
        ref = log_probs(logits, self.temperature)
        weights = _weights(mask.to(ref.device), ref.dtype)
        metric = kl_metric(logits, mask, self.temperature)
        frozen_cache = cache if self.frozen else None
        damage = torch.zeros(len(self.layers), self.n, self.n, tokens.shape[0], dtype=torch.float64)
        if self.method.startswith("readout"):
            damage = self._readout(model, tokens, mask, logits, cache, deltas, metric)
        elif self.method == "fisher":
            proj = self._projections(model, tokens, mask, logits, deltas)  # [K, L, B, n]
            for site in self.sites:
                damage[:, site[0], site[-1]] = 0.5 * (sum(proj[..., s] for s in site) ** 2).mean(0)
        elif self.method == "ig_site":
            for li, l in enumerate(self.layers):
                for site in self.sites:
                    d = torch.zeros_like(deltas[l])
                    d[:, :, list(site)] = deltas[l][:, :, list(site)]
                    damage[li, site[0], site[-1]] = ig_site_damage(
                        model,
                        states,
                        frozen_cache,
                        d,
                        l,
                        metric,
                        steps=self.steps,
                        tokens=tokens,
                        max_rows=self.max_rows,
                    ).cpu()
        else:
            dz = logit_changes(model, states, deltas, frozen_cache, tokens=tokens)
            score = _quadratic if self.method == "gauss_newton" else _kl_linearised
            for li, l in enumerate(self.layers):
                for site in self.sites:
                    change = sum(dz[l][s] for s in site)
                    damage[li, site[0], site[-1]] = (
                        score(ref, change, weights, self.temperature).double().cpu()
                    )
        share, readouts = _resumed_share(model, self.layers), len(self.layers) * len(self.sites)
        site_passes = self.steps * len(self.sites) * share
        passes = {  # (forwards, backwards, readouts) of this batch
            "readout": (2, 0, readouts),  # the clean run and the run to the final state
            "readout_fisher": (3, self.samples, readouts),
            "fisher": (2, self.samples, 0),  # the clean run and the gradient pass's own forward
            "ig_site": (1 + site_passes, site_passes, 0),
        }.get(self.method, (1 + 2 * self.n * share, 0, 0))
        for key, count in zip(self.passes, passes):
            self.passes[key] += count
        self._record(damage, weights)

    def _readout(self, model, tokens, mask, logits, cache, deltas, metric) -> Tensor:
        """Methods "readout" and "readout_fisher": the carried readout's damage [L, n, n, B], and
        for "readout_fisher" plus the later reads' part u to second order from the Fisher draws
        (module docstring)."""
        moved = carried_deltas(model, cache, deltas)
        if self.method == "readout":
            return carried_damage(model, tokens, cache, moved, metric, self.sites)[0]
        ref_p = log_probs(logits, self.temperature).exp().flatten(0, 1).float().cpu()  # [B*pos, vocab]
        draws = torch.stack(
            [
                torch.multinomial(ref_p, 1, generator=self.generator).view(tokens.shape)
                for _ in range(self.samples)
            ]
        )  # [K, B, pos]
        damage, v = carried_damage(
            model,
            tokens,
            cache,
            moved,
            metric,
            self.sites,
            draws=draws.to(logits.device),
            clean_logits=logits,
            mask=mask,
            temperature=self.temperature,
        )
        proj, proj_final = self._projections(model, tokens, mask, logits, deltas, carried=moved, draws=draws)
        ind = proj - proj_final  # [K, L, B, n]: v . u
        for site in self.sites:
            u = sum(ind[..., s] for s in site)  # [K, L, B]
            i, j = site[0], site[-1]
            damage[:, i, j] = damage[:, i, j] + (v[:, :, i, j] * u).mean(0) + 0.5 * (u**2).mean(0)
        return damage

    def _projections(self, model, tokens, mask, logits, deltas, **carried):
        """`fisher_projections` with this probe's draws, temperature and mixing (`carried`: its
        carried= and draws=)."""
        return fisher_projections(
            model,
            tokens,
            mask,
            deltas,
            samples=self.samples,
            temperature=self.temperature,
            frozen=self.frozen,
            generator=self.generator,
            clean_logits=logits,
            **carried,
        )

    def _record(self, damage: Tensor, weights: Tensor) -> None:
        """Add one batch's damage [L, n, n, B] to the statistics as [2 (joint, one-shot), L, n, n,
        B]; prompts with nothing to score are NaN."""
        nan = torch.isnan(weights.sum(-1)).cpu()  # a prompt with nothing to score
        per_prompt = torch.full((2, *damage.shape), float("nan"), dtype=torch.float64)
        for i, j in self.pair_list:
            per_prompt[0, :, i, j] = per_prompt[0, :, j, i] = damage[:, i, j]
            per_prompt[1, :, i, j] = damage[:, i, i]  # one-shot: restoring j leaves i ablated
            per_prompt[1, :, j, i] = damage[:, j, j]
        per_prompt[..., nan] = float("nan")
        self.stats.add(per_prompt)

    def result(self) -> RescueResult:
        out = super().result()
        out.meta.update(
            method=self.method,
            samples=self.samples if "fisher" in self.method else None,
            steps=self.steps if self.method == "ig_site" else None,
            passes=dict(self.passes),
            estimate="approximate (docs/attribution.md)",
        )
        return out


def approximate_rescue(model, tokens, **options) -> RescueResult:
    """Estimate `ablate_and_rescue(model, tokens, **options)` (one-shot) with
    `ApproxAblateRescue(**options)` (method="readout", samples=4, seed=0, steps=2, ...); the
    runner's options and masks are those of `ablate_and_rescue`. `meta["passes"]` counts the
    forwards and backwards (in prompt batches)."""
    runner, probe = split_options(options)
    return run_rescue(ApproxAblateRescue(**probe), model, tokens, **runner)


def exact_rescue_forwards(model, sublayers: Optional[Sequence[int]] = None) -> float:
    """Forward-equivalents of the exact one-shot map per prompt batch: the clean run plus
    n(n+1)/2 resumed forwards per sublayer l, each (L - l) / L of a forward."""
    n = model.cfg.n_streams
    layers = range(model.cfg.n_sublayers) if sublayers is None else sublayers
    return 1 + n * (n + 1) / 2 * _resumed_share(model, layers)


def rescue_fidelity(estimate: RescueResult, exact: RescueResult, k: int = 10) -> Dict[str, Dict[str, float]]:
    """How well an estimated map tracks the exact one: `fidelity` (Pearson, Spearman, top-k by
    value) of the damage per [sublayer, pair] (upper triangle of kl_ablated), of the single-stream
    damage per [sublayer, stream] (= the one-shot rescued KL), of the rescue % per [sublayer, a, r]
    where both are defined, and of the global rescue matrix (off-diagonal)."""
    from .compare import fidelity

    n = exact.meta["n_streams"]
    iu = np.triu_indices(n, 1)
    off = ~np.eye(n, dtype=bool)
    pick_single = lambda r: np.stack([r["kl_rescued"][:, a, (a + 1) % n] for a in range(n)], 1)  # noqa: E731
    return {
        "damage_pairs": fidelity(
            estimate["kl_ablated"][:, iu[0], iu[1]], exact["kl_ablated"][:, iu[0], iu[1]], 0.0, k
        ),
        "damage_single": fidelity(pick_single(estimate), pick_single(exact), 0.0, k),
        "rescue": fidelity(estimate["rescue"][:, off], exact["rescue"][:, off], 0.0, k),
        "global_rescue": fidelity(
            estimate["global_rescue"][off], exact["global_rescue"][off], 0.0, min(k, 3)
        ),
    }
