"""Sites: which stream states a probe reads - one vocabulary for every probe and the crosscoder.

A site is a stream-state hook point, an activation [batch, pos, n_streams, d_model]. A site spec:

    "layers"      the embedding streams and every block's output (L + 1 sites):
                  hook_streams_init, blocks.{l}.mlp.hook_streams_out for l = 0..L-1
    "sublayers"   the embedding streams and every sublayer's output (2L + 1 sites):
                  hook_streams_init, {sublayer}.hook_streams_out for every sublayer
    k (an int)    k evenly spaced block outputs, the first and the last included (all L if k >= L)
    [names]       stream-state hook names, in the order given
    None          DEFAULT_SITES ("layers") - the default of CKA, Curvature, LogitLens and
                  CrossStreamPredictability; the crosscoder's ActivationBuffer defaults to 4
                  (its buffer holds every site of every token it keeps)

`site_hooks(model, spec)` resolves a spec to hook names; `resolve_sites(model, spec)` to
(hook name, stream) pairs, every stream of each hook, and its lists may also hold such pairs
(the crosscoder reads single streams). Names are checked against the model - an unknown one
raises `HookNameError` listing the closest names - and must be stream states (one of the
probe's `suffixes`), distinct, and at least one.

Also here: `site_label` ("embed", "blocks.3.mlp", "blocks.3.mlp/s2"), `evenly_spaced` picks, and
`forward_sites`, the one collecting forward (run_probes, the crosscoder buffer, the curvature control).
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..hooks.names import check_hook_names, suffix
from .base import STREAM_STATE_SUFFIXES, take_rows

if TYPE_CHECKING:
    from ..contract import MultiStreamModel

__all__ = [
    "DEFAULT_SITES",
    "SiteSpec",
    "Site",
    "site_hooks",
    "resolve_sites",
    "check_site_spec",
    "check_site_names",
    "site_label",
    "evenly_spaced",
    "last_sublayer_needed",
    "forward_sites",
    "site_rows",
]

DEFAULT_SITES = "layers"
SiteSpec = Union[None, str, int, Sequence]
Site = Tuple[str, int]  # (hook name, stream index)
_SPEC_FORMS = "'layers', 'sublayers', an int k (k evenly spaced block outputs) or a list of hook names"


def evenly_spaced(n: int, k: int) -> List[int]:
    """Indices of k evenly spaced items of n, the first and the last included (all n if k >= n)."""
    if n <= 0:
        return []
    return np.unique(np.linspace(0, n - 1, max(1, min(int(k), n))).round().astype(int)).tolist()


def check_site_spec(spec: SiteSpec, probe: str = "sites") -> SiteSpec:
    """The spec's form, checked without a model (a constructor's early error); lists are copied."""
    if spec is None or spec in ("layers", "sublayers"):
        return spec
    if isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
        if spec < 1:
            raise ValueError(
                f"{probe}: an int site spec counts evenly spaced block outputs and must be >= 1, got {spec}"
            )
        return int(spec)
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Iterable):
        raise ValueError(f"{probe}: sites must be {_SPEC_FORMS}, got {spec!r}")
    return list(spec)


def check_site_names(
    names: Sequence[str],
    probe: str = "sites",
    known: Optional[Dict] = None,
    suffixes: Sequence[str] = STREAM_STATE_SUFFIXES,
) -> List[str]:
    """Explicit hook names: non-empty, distinct, stream states (`suffixes`) and, given the
    model's `known` hook dict, existing (HookNameError with the closest names)."""
    names = list(names)
    if not names:
        raise ValueError(f"{probe}: `sites` is an empty list")
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"{probe}: site names must be hook-name strings, got {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{probe}: duplicate site names in {names}")
    if known is not None:
        check_hook_names(names, known)
    bad = [n for n in names if suffix(n) not in suffixes]
    if bad:
        raise ValueError(
            f"{probe} sites must be stream states [batch, pos, n_streams, d_model]; these hooks "
            f"are not: {bad} (use one of {tuple(suffixes)})"
        )
    return names


def site_hooks(
    model: "MultiStreamModel",
    spec: SiteSpec = None,
    probe: str = "sites",
    suffixes: Sequence[str] = STREAM_STATE_SUFFIXES,
) -> List[str]:
    """Hook names of a site spec (module docstring), checked against `model`."""
    spec = check_site_spec(DEFAULT_SITES if spec is None else spec, probe)
    L = int(model.cfg.n_layers)
    if spec == "layers":
        return ["hook_streams_init"] + [f"blocks.{l}.mlp.hook_streams_out" for l in range(L)]
    if spec == "sublayers":
        return ["hook_streams_init"] + [f"{s}.hook_streams_out" for s in model.sublayer_names]
    if isinstance(spec, int):
        return [f"blocks.{l}.mlp.hook_streams_out" for l in evenly_spaced(L, spec)]
    return check_site_names(spec, probe, model.hook_dict, suffixes)


def resolve_sites(model: "MultiStreamModel", spec: SiteSpec = None, probe: str = "crosscoder") -> List[Site]:
    """(hook name, stream) pairs of a site spec: every stream of each hook; a list may also hold
    (hook name, stream) pairs. Raises HookNameError for an unknown hook, ValueError for a hook
    that is not a stream state, a stream out of range, duplicates or an empty list."""
    n = int(model.cfg.n_streams)
    if spec is None or isinstance(spec, (str, numbers.Integral)):
        return [(h, s) for h in site_hooks(model, spec, probe) for s in range(n)]
    out: List[Site] = []
    for item in check_site_spec(spec, probe):
        if isinstance(item, str):
            out.extend((item, s) for s in range(n))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
            if isinstance(item[1], bool) or not isinstance(item[1], numbers.Integral):
                raise TypeError(f"site {tuple(item)!r}: the stream must be an int")
            out.append((item[0], int(item[1])))
        else:
            raise TypeError(
                f"a site is a hook name (all streams) or a (hook name, stream) pair, got {item!r}"
            )
    check_site_names(list(dict.fromkeys(h for h, _ in out)), probe, model.hook_dict)
    wrong = [site for site in out if not 0 <= site[1] < n]
    if wrong:
        raise ValueError(
            f"{probe} sites {wrong}: stream index out of range, the model has {n} streams (0..{n - 1})"
        )
    if len(set(out)) != len(out):
        raise ValueError(f"{probe}: duplicate sites {sorted({s for s in out if out.count(s) > 1})}")
    return out


def site_label(site: Union[str, Site]) -> str:
    """'hook_streams_init' -> 'embed', 'blocks.3.mlp.hook_streams_out' -> 'blocks.3.mlp', other
    hooks keep their name; a pair (hook, 2) -> '<label of hook>/s2'."""
    if not isinstance(site, str):  # (hook, stream)
        return f"{site_label(site[0])}/s{site[1]}"
    return "embed" if site == "hook_streams_init" else site.removesuffix(".hook_streams_out")


def last_sublayer_needed(model: "MultiStreamModel", names: Iterable[str]) -> Optional[int]:
    """The sublayer to stop the forward before (`stop_at_sublayer`), or None if a hook after the
    blocks is needed."""
    index = {s: k for k, s in enumerate(model.sublayer_names)}
    last = -1
    for name in names:
        if not name.startswith("blocks."):
            if name not in ("hook_embed", "hook_pos_embed", "hook_streams_init"):
                return None
            continue
        last = max(last, index[name.rsplit(".", 1)[0]])
    return last + 1


def forward_sites(
    model: "MultiStreamModel", tokens: Tensor, names: Sequence[str], stop: Optional[int] = None
) -> Dict[str, Tensor]:
    """{name: activation} of one no-grad forward of tokens [batch, pos] with hooks on `names`
    only, stopped before sublayer `stop` (default: after the last one `names` need). Raises
    FloatingPointError naming the first non-finite activation (one host sync for all)."""
    acts: Dict[str, Tensor] = {}

    def save(act: Tensor, hook) -> None:
        acts[hook.name] = act

    stop = last_sublayer_needed(model, names) if stop is None else stop
    with torch.no_grad(), model.hooks(fwd_hooks=[(n, save) for n in names]):
        model(tokens, stop_at_sublayer=stop, return_type=None)
    if acts:
        finite = torch.stack([torch.isfinite(a).all() for a in acts.values()])
        if not bool(finite.all()):
            bad = next(n for n, ok in zip(acts, finite.tolist()) if not ok)
            raise FloatingPointError(f"non-finite values (NaN/inf) in activation {bad!r}")
    return acts


def site_rows(acts: Dict[str, Tensor], sites: Sequence[Union[str, Site]], rows: Tensor) -> Tensor:
    """The token rows `rows` (flat [batch * pos] indices, `base.masked_rows`) of every site, from
    acts {name: [batch, pos, n_streams, d]}: hook names -> [len(rows), len(sites), n_streams, d],
    (hook name, stream) pairs -> [len(rows), len(sites), d]."""
    return torch.stack(
        [take_rows(acts[s] if isinstance(s, str) else acts[s[0]][:, :, s[1]], rows) for s in sites], dim=1
    )
