"""The model side of the SAELens bridge: sites (one stream of a stream-state hook, or a
[batch, pos, d_model] hook) and `StreamAdapter`, the model SAELens sees, with one
[batch, pos, d_model] hook point per site. See `mhc_interp.interop.saelens` for the whole picture."""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from torch import Tensor, nn
from torch.nn import functional as F
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from ..hooks.names import HOOK_SPECS, CheckedHookNames, check_hook_names, suffix, unknown_hook_error
from ..probes.base import STREAM_STATE_SUFFIXES  # a stream's slice of these is [batch, pos, d_model]

# hooks that already are [batch, pos, d_model]
PLAIN_SUFFIXES = tuple(s for s, (axes, _) in HOOK_SPECS.items() if axes == ("batch", "pos", "d_model"))

_SITE = re.compile(r"^(?P<hook>[^\[\]]+?)(?:\[(?P<stream>[^\]]*)\])?$")

Site = Tuple[str, Optional[int]]  # (hook name, stream index or None)


def require_saelens():
    """Import sae_lens, or raise an ImportError that says how to install it."""
    try:
        import sae_lens
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "this needs SAELens, which pins transformer-lens<4: install the extra into its own "
            'environment with `pip install torch==2.13.0 -e ".[saelens]"` (see docs/saelens.md)'
        ) from e
    return sae_lens


# ------------------------------------------------------------------------------------------ sites
def stream_site(hook_name: str, stream: Optional[int] = None) -> str:
    """The site name of stream `stream` of `hook_name` ("H[s]"), or `hook_name` when None."""
    return hook_name if stream is None else f"{hook_name}[{stream}]"


def parse_site(site: str) -> Site:
    """ "blocks.2.attn.hook_streams_in[1]" -> ("blocks.2.attn.hook_streams_in", 1); no index -> None.
    Checks only the syntax; `check_site` checks it against a model."""
    if not isinstance(site, str):
        raise TypeError(
            f"a site is a hook name string such as 'blocks.0.attn.hook_streams_in[1]', got {site!r}"
        )
    m = _SITE.match(site.strip())
    if m is None:
        raise ValueError(
            f"cannot parse site {site!r}; write HOOK or HOOK[stream], e.g. 'blocks.0.attn.hook_streams_in[1]'"
        )
    stream = m.group("stream")
    if stream is None:
        return m.group("hook"), None
    if not stream.isdigit():
        raise ValueError(f"site {site!r}: the stream index must be a non-negative integer, got {stream!r}")
    return m.group("hook"), int(stream)


def check_site(model, site: Union[str, Site]) -> Site:
    """Validate a site against `model`: a known hook; stream states need a stream index in range;
    [batch, pos, d_model] hooks take none; other hooks (attention patterns, H_res, ...) are no
    SAE input. Returns (hook name, stream or None)."""
    hook, stream = parse_site(site) if isinstance(site, str) else site
    check_hook_names([hook], model.hook_dict)
    kind = suffix(hook)
    n = model.cfg.n_streams
    if kind in STREAM_STATE_SUFFIXES:
        if stream is None:
            choices = ", ".join(repr(stream_site(hook, s)) for s in range(n))
            raise ValueError(
                f"{hook!r} is stream-valued [batch, pos, n_streams={n}, d_model]: choose one stream "
                f"({choices}); an SAE reads one [batch, pos, d_model] stream, the streams are never "
                f"flattened or shared"
            )
        if not 0 <= stream < n:
            raise IndexError(
                f"site {stream_site(hook, stream)!r}: stream {stream} is out of range, "
                f"the model has {n} streams (0..{n - 1})"
            )
        return hook, stream
    if kind in PLAIN_SUFFIXES:
        if stream is not None:
            raise ValueError(
                f"{hook!r} has no stream axis (it is [batch, pos, d_model]); drop the "
                f"[{stream}], or use a stream state ({', '.join(STREAM_STATE_SUFFIXES)})"
            )
        return hook, None
    axes = ", ".join(HOOK_SPECS[kind][0])
    raise ValueError(
        f"{hook!r} is [{axes}], not an SAE input: use a stream state "
        f"({', '.join(STREAM_STATE_SUFFIXES)}) with a stream index, or a [batch, pos, "
        f"d_model] hook ({', '.join(PLAIN_SUFFIXES)})"
    )


def all_sites(model) -> List[str]:
    """Every site of `model`: each stream of each stream-state hook, and each [batch, pos, d_model] hook."""
    sites = []
    for name in model.hook_dict:
        kind = suffix(name)
        if kind in STREAM_STATE_SUFFIXES:
            sites += [stream_site(name, s) for s in range(model.cfg.n_streams)]
        elif kind in PLAIN_SUFFIXES:
            sites.append(name)
    return sites


def _write_stream(act: Tensor, stream: Optional[int], new: Tensor) -> Tensor:
    """act [batch, pos, n, d] with stream `stream` replaced by new [batch, pos, d] (a new tensor);
    with stream None, `new` itself (act was [batch, pos, d])."""
    if stream is None:
        return new
    out = act.clone()
    out[:, :, stream] = new
    return out


# ---------------------------------------------------------------------------------------- adapter
class StreamAdapter(CheckedHookNames, HookedRootModule):
    """The model as SAELens sees it: one `[batch, pos, d_model]` hook point per site.

    model: a `HookedMHC` (or any `StreamHookedRoot`); it is wrapped, not copied or changed, and is
        not a submodule (its hook points keep their names). sites: the sites to expose (default
        `all_sites(model)`).

    A hook added at site `H[s]` (by SAELens, `run_with_cache`, `run_with_hooks`, `hooks()`) is
    bridged, for the duration of one forward, by a hook on the real hook point `H` that passes a
    copy of `x[:, :, s]` through the site's hook point and writes the result back into stream s.
    The bridges are attached with the model's own `hooks()` context, so they are removed when the
    forward ends or raises. Unknown sites and stream-valued hook names without an index raise.
    """

    def __init__(self, model, sites: Optional[Sequence[str]] = None):
        super().__init__()
        object.__setattr__(self, "mhc", model)  # not registered: setup() must not rename its hook points
        names = all_sites(model) if sites is None else list(sites)
        self._sites: Dict[str, Site] = {}
        for name in names:
            hook, stream = check_site(model, name)
            canonical = stream_site(hook, stream)
            if canonical in self._sites:
                raise ValueError(f"site {canonical!r} given twice")
            self._sites[canonical] = (hook, stream)
        self.site_points = nn.ModuleList(HookPoint() for _ in self._sites)
        self.setup()

    def setup(self) -> None:
        """hook_dict / mod_dict: {site name: its HookPoint} (the names carry brackets, so they are
        assigned here rather than taken from the module tree)."""
        self.hook_dict = dict(zip(self._sites, self.site_points))
        self.mod_dict = dict(self.hook_dict)
        for name, point in self.hook_dict.items():
            point.name = name

    # what SAELens reads from a model
    @property
    def cfg(self):
        return self.mhc.cfg

    @property
    def tokenizer(self):
        return self.mhc.tokenizer

    @property
    def W_E(self) -> Tensor:  # SAELens finds the input device from W_E: [d_vocab, d_model]
        return self.mhc.embed.weight

    def check_hook_name(self, name: str) -> None:  # CheckedHookNames: hooks and names_filter are sites
        self.site(name)

    def site(self, name: str) -> Site:
        """(hook name, stream) of an exposed site; a clear error for anything else."""
        if name not in self._sites:
            check_site(self.mhc, name)  # raises for unknown / stream-valued-without-index / bad hooks
            raise unknown_hook_error(name, self._sites)
        return self._sites[name]

    # --------------------------------------------------------------------------------- forward
    def _bridge(self, stream: Optional[int], point: HookPoint) -> Callable:
        def bridge(act: Tensor, hook) -> Tensor:
            x = act if stream is None else act[:, :, stream].clone()  # [batch, pos, d_model]
            return _write_stream(act, stream, point(x))

        return bridge

    def active_bridges(self) -> List[Tuple[str, Callable]]:
        """(real hook name, bridge) for every site that has a hook attached now."""
        return [
            (hook, self._bridge(stream, point))
            for (hook, stream), point in zip(self._sites.values(), self.site_points)
            if point.fwd_hooks or point.bwd_hooks
        ]

    def forward(
        self,
        input,
        return_type: Optional[str] = "logits",
        *,
        loss_per_token: bool = False,
        stop_at_layer: Optional[int] = None,
        prepend_bos: Optional[bool] = None,
        **kwargs,
    ) -> Any:
        """Run the wrapped model with the site hooks bridged in.

        input: tokens [batch, pos] (fed as they are: `prepend_bos=True` is refused).
        return_type: "logits" [batch, pos, d_vocab], "loss" (mean next-token cross-entropy, or
            [batch, pos - 1] with `loss_per_token`), "both" (logits, loss) or None.
        stop_at_layer=L: run blocks 0..L-1 only and return the stream state (SAELens passes the
            site's block + 1 when it only needs activations).
        """
        if prepend_bos:
            raise ValueError(
                "prepend_bos=True is not supported: tokens are fed as they are; "
                "prepend a BOS token yourself (SAELens: prepend_bos=False)"
            )
        tokens = self.mhc._check_tokens(input)
        stop = None
        if stop_at_layer is not None:
            if isinstance(stop_at_layer, bool) or not isinstance(stop_at_layer, int) or stop_at_layer < 1:
                raise ValueError(f"stop_at_layer must be a positive int, got {stop_at_layer!r}")
            stop = 2 * stop_at_layer if 2 * stop_at_layer < self.mhc.cfg.n_sublayers else None
        with self.mhc.hooks(fwd_hooks=self.active_bridges()):
            if stop is not None:
                return self.mhc(tokens, stop_at_sublayer=stop, **kwargs)
            if not loss_per_token or return_type not in ("loss", "both"):
                return self.mhc(tokens, return_type=return_type, **kwargs)
            logits = self.mhc(tokens, return_type="logits", **kwargs)  # [batch, pos, d_vocab]
        loss = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none"
        )  # [batch, pos - 1]
        return loss if return_type == "loss" else (logits, loss)
