"""`SAEFeatures`: where the features of a (SAELens) SAE fire - per feature, per site and stream.

An SAE trained on one stream of one hook (its *home*, e.g. "blocks.2.attn.hook_streams_in[1]")
encodes any d_model vector. Applied to every stream of a set of stream-state hooks, it says how
often each feature's encoder direction is active there:

    frequency[i, j, s]        = P_t( f_i(x_t^{j, s}) > threshold )
    mean_activation[i, j, s]  = E_t[ f_i(x_t^{j, s}) | f_i(x_t^{j, s}) > threshold ]   (0 if it never fires)
    home_frequency[i]         = frequency[i, home site, home stream]
    top_site[i], top_stream[i] = argmax_{j, s} frequency[i, j, s]

with f = sae.encode, x_t^{j, s} the stream-s state at site j for token t (masked tokens only, as
every probe: position 0 and padding left out by the runner). Features that fire in one stream only
are stream-specific; features that fire equally everywhere are shared content. A feature with
home_frequency 0 is dead on this corpus.

    from sae_lens import SAE
    from mhc_interp.interop.sae_features import SAEFeatures
    res = run_probes(model, SAEFeatures(SAE.load_from_disk("sae-dir"), sites="sublayers"), tokens)

Needs only an object with SAELens's `encode`, `cfg.d_in`, `cfg.metadata.hook_name` (a path is
loaded with `sae_lens.SAE.load_from_disk`). Importing this module registers the probe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..hooks.names import check_hook_names, suffix
from ..probes.base import (
    Probe,
    ProbeResult,
    ReportSection,
    masked_rows,
    register_probe,
    register_result,
    take_rows,
)
from .saelens import STREAM_STATE_SUFFIXES, check_sae, check_site, require_saelens, stream_site

Sites = Union[str, Sequence[str]]


@register_probe
class SAEFeatures(Probe):
    """Per-feature firing frequency of an SAE at every stream of a set of sites (module docstring).

    sae: a SAELens SAE, or the path of one saved in SAELens's format.
    sites: "own" (default: the SAE's own hook, every stream), "sublayers" (the SAE's hook type at
        every sublayer, e.g. every `hook_streams_in`; every stream), or a list of hook names of the
        same kind as the SAE's own (stream states, or [batch, pos, d_model] hooks).
    threshold: a feature fires where f_i > threshold (0: any positive activation).
    """

    name = "sae_features"
    report = ReportSection("Where the features of a sparse autoencoder fire (SAELens)", order=60)

    @classmethod
    def for_report(cls, cfg) -> Optional["SAEFeatures"]:
        """Only where the report is given an SAE folder (`--sae`), read at every sublayer."""
        return None if cfg.sae is None else cls(cfg.sae, sites="sublayers")

    def __init__(self, sae=None, sites: Sites = "own", threshold: float = 0.0):
        if sae is None:
            raise TypeError(
                "SAEFeatures needs an SAE: SAEFeatures(sae) with a sae_lens SAE, or "
                "SAEFeatures('path/to/sae') for one saved in SAELens's format"
            )
        if isinstance(sae, (str, Path)):
            path = Path(sae).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(
                    f"no SAE folder at {str(path)!r} (SAELens saves an SAE as a folder "
                    f"with cfg.json and sae_weights.safetensors)"
                )
            sae = require_saelens().SAE.load_from_disk(str(path))
        self.sae = sae
        self.sites_spec = sites
        self.threshold = float(threshold)

    # ------------------------------------------------------------------------------ contract
    def setup(self, model) -> None:
        self.home_hook, self.home_stream = check_sae(model, self.sae)
        self.stream_valued = suffix(self.home_hook) in STREAM_STATE_SUFFIXES
        self.sites = self._resolve_sites(model, self.home_hook)
        self.n_streams = model.cfg.n_streams if self.stream_valued else 1
        self.sae.to(model.device)
        self.sae.eval()
        d_sae, shape = int(self.sae.cfg.d_sae), (len(self.sites), self.n_streams)
        self.fires = torch.zeros(*shape, d_sae, dtype=torch.float64, device=model.device)  # [sites, n, d_sae]
        self.act_sum = torch.zeros_like(self.fires)  # [sites, n, d_sae]
        self.n_tokens = 0

    def _resolve_sites(self, model, hook: str) -> List[str]:
        kind = suffix(hook)
        if isinstance(self.sites_spec, str):
            if self.sites_spec == "own":
                return [hook]
            if self.sites_spec == "sublayers":
                names = [f"{s}.{kind}" for s in model.sublayer_names if f"{s}.{kind}" in model.hook_dict]
                return names or [hook]
            raise ValueError(
                f"{self.name}: sites must be 'own', 'sublayers' or a list of hook names, "
                f"got {self.sites_spec!r}"
            )
        names = list(self.sites_spec)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"{self.name}: sites must be a non-empty list without duplicates, got {names}")
        check_hook_names(names, model.hook_dict)
        own_kind = "stream states" if self.stream_valued else "[batch, pos, d_model] hooks"
        bad = [n for n in names if (suffix(n) in STREAM_STATE_SUFFIXES) != self.stream_valued]
        if bad:
            raise ValueError(
                f"{self.name}: the SAE was trained on {stream_site(hook, self.home_stream)!r}, "
                f"so its sites must be {own_kind}; these are not: {bad}"
            )
        for n in names:
            check_site(model, (n, 0) if self.stream_valued else (n, None))
        return names

    def hook_names(self, model) -> List[str]:
        return list(self.sites)

    @torch.no_grad()
    def update(self, acts: Dict[str, Tensor], mask: Tensor) -> None:
        rows = masked_rows(mask, self.fires.device)
        if rows.numel() == 0:
            return
        for j, name in enumerate(self.sites):
            x = take_rows(acts[name], rows)  # [N, n, d] or [N, d]
            if not self.stream_valued:
                x = x.unsqueeze(1)  # [N, 1, d]
            f = self.sae.encode(x.to(dtype=self.sae.dtype))  # [N, n, d_sae]
            on = f > self.threshold
            self.fires[j] += on.sum(0, dtype=torch.float64)
            self.act_sum[j] += torch.where(on, f, 0).sum(0, dtype=torch.float64)
        self.n_tokens += int(rows.numel())

    def result(self) -> "SAEFeaturesResult":
        if self.n_tokens == 0:
            raise ValueError(f"{self.name}: no unmasked tokens were seen")
        fires = self.fires.permute(2, 0, 1).cpu().numpy()  # [d_sae, sites, n]
        act_sum = self.act_sum.permute(2, 0, 1).cpu().numpy()
        frequency = fires / self.n_tokens
        mean_activation = np.divide(act_sum, fires, out=np.zeros_like(act_sum), where=fires > 0)
        home_j, home_s = _home(self.sites, self.home_hook, self.home_stream)
        flat = frequency.reshape(len(frequency), -1).argmax(1)
        arrays = {
            "frequency": frequency,
            "mean_activation": mean_activation,
            "top_site": flat // self.n_streams,
            "top_stream": flat % self.n_streams,
        }
        if home_j is not None:
            arrays["home_frequency"] = frequency[:, home_j, home_s]
        meta = {
            "sites": self.sites,
            "home_site": stream_site(self.home_hook, self.home_stream),
            "home_hook": self.home_hook,
            "home_stream": self.home_stream,
            "n_streams": self.n_streams,
            "d_sae": int(self.sae.cfg.d_sae),
            "n_tokens": self.n_tokens,
            "threshold": self.threshold,
            "architecture": self.sae.cfg.architecture(),
        }
        return SAEFeaturesResult(probe=self.name, arrays=arrays, meta=meta)


def _home(sites: List[str], hook: str, stream: Optional[int]):
    """(index of the SAE's home hook among the sites, None if it is not one; its home stream, 0
    for a [batch, pos, d_model] hook)."""
    return (sites.index(hook) if hook in sites else None), stream or 0


@register_result
class SAEFeaturesResult(ProbeResult):
    def summary(self, min_frequency: float = 0.0) -> Dict[str, float]:
        """dead: fraction of features that never fire at home; off_home: fraction of the live ones
        that fire most often at another site or stream than their home; home_stream_top: fraction
        of the live ones that, at the home hook, fire most often in the home stream; l0[j, s]: mean
        number of active features per token at site j, stream s (as a nested list). With a TopK SAE
        every site has exactly k active features per token, so frequencies away from home say which
        feature directions the encoder picks there, not how sparse the activations are."""
        freq = self["frequency"]
        home = self.arrays.get("home_frequency")
        live = home > min_frequency if home is not None else np.ones(len(freq), bool)
        home_j, home_s = _home(self.meta["sites"], self.meta["home_hook"], self.meta["home_stream"])
        off = (self["top_site"] != home_j) | (self["top_stream"] != home_s)
        out = {
            "dead": float(1 - live.mean()),
            "off_home": float(off[live].mean()) if live.any() else 0.0,
            "l0": freq.sum(0).tolist(),
        }
        if home_j is not None and live.any():
            # at the home hook: the fraction of live features that fire most often in the home stream
            out["home_stream_top"] = float((freq[live, home_j].argmax(-1) == home_s).mean())
        return out

    def plot(self, top: int = 48):
        """{"sae_features": home frequency histogram | frequency of the `top` most frequent features
        at every site and stream}."""
        import matplotlib.pyplot as plt

        freq, sites, n = self["frequency"], self.meta["sites"], self.meta["n_streams"]
        home = self.arrays.get("home_frequency", freq.max((1, 2)))
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 2.2]})
        floor = 1.0 / max(self.meta["n_tokens"], 1)
        axes[0].hist(np.log10(np.maximum(home, floor / 10)), bins=40, color="tab:blue")
        axes[0].set_xlabel(f"log10 firing frequency at {self.meta['home_site']} (dead at left)")
        axes[0].set_ylabel("features")
        order = np.argsort(-home)[:top]
        grid = freq[order].reshape(len(order), -1)  # [top, sites * n]
        im = axes[1].imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        short = [s.replace("blocks.", "b").replace(".hook_", ".") for s in sites]
        labels = [f"{sh}[{s}]" if n > 1 else sh for sh in short for s in range(n)]
        axes[1].set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        axes[1].set_ylabel(f"feature (top {len(order)} by home frequency)")
        axes[1].set_yticks(range(len(order)), [str(i) for i in order], fontsize=5)
        fig.colorbar(im, ax=axes[1], label="firing frequency")
        fig.suptitle(
            f"SAE features ({self.meta['architecture']}, d_sae={self.meta['d_sae']}) trained on "
            f"{self.meta['home_site']}: where they fire"
        )
        fig.tight_layout()
        return fig
