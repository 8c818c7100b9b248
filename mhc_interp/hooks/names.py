"""Hook-point names, their shapes, and validation with suggestions.

Every hook point of `HookedMHC` ends in one of the suffixes of `HOOK_SPECS`; the spec gives its
axes symbolically. `hook_table(model)` checks each spec against a real forward, so the table
published in docs/hooks.md is generated from the model and cannot drift.
"""

from __future__ import annotations

import difflib
import re
from typing import Dict, Iterable, List, Tuple

import torch

from ..contract import MultiStreamModel

# suffix -> (axes, what it holds); the axes are written space-separated below
HOOK_SPECS: Dict[str, Tuple[Tuple[str, ...], str]] = {
    name: (tuple(axes.split()), holds)
    for name, (axes, holds) in {
        "hook_embed": ("batch pos d_model", "token embedding"),
        "hook_pos_embed": ("batch pos d_model", "position embedding"),
        "hook_streams_init": ("batch pos n_streams d_model", "initial streams (expanded embedding)"),
        "hook_streams_in": ("batch pos n_streams d_model", "stream state entering the sublayer"),
        "hook_h_pre": ("batch pos n_streams", "read weights H_pre"),
        "hook_h_post": ("batch pos n_streams", "write weights H_post"),
        "hook_h_res": ("batch pos n_streams n_streams", "stream mixer H_res [target, source]"),
        "hook_read": ("batch pos d_model", "branch input H_pre x (before the branch LayerNorm)"),
        "hook_q": ("batch pos n_heads d_head", "attention queries"),
        "hook_k": ("batch pos n_heads d_head", "attention keys"),
        "hook_v": ("batch pos n_heads d_head", "attention values"),
        "hook_attn_scores": ("batch n_heads pos pos", "masked attention scores [query, key]"),
        "hook_pattern": ("batch n_heads pos pos", "attention pattern [query, key]"),
        "hook_z": ("batch pos n_heads d_head", "attention-weighted values"),
        "hook_pre": ("batch pos d_mlp", "MLP pre-activation"),
        "hook_post": ("batch pos d_mlp", "MLP post-activation (GELU)"),
        "hook_write": ("batch pos d_model", "branch output F(read)"),
        "hook_res_mix": ("batch pos n_streams d_model", "mixed residual H_res x"),
        "hook_streams_out": ("batch pos n_streams d_model", "stream state leaving the sublayer"),
        "hook_ln_final": ("batch pos n_streams d_model", "final LayerNorm, applied per stream"),
        "hook_stream_sum": ("batch pos d_model", "sum over streams of the final-normed state"),
        "hook_logits": ("batch pos d_vocab", "logits at every position"),
    }.items()
}

# Hooks whose axis 2 is the stream axis: per-stream addressing works on them.
STREAM_VALUED = (
    "hook_streams_init",
    "hook_streams_in",
    "hook_streams_out",
    "hook_res_mix",
    "hook_ln_final",
    "hook_h_pre",
    "hook_h_post",
)
MIXING_SUFFIXES = ("hook_h_pre", "hook_h_post", "hook_h_res")


class HookNameError(KeyError):
    """An unknown hook-point name; the message lists the closest valid names."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


def suffix(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def unknown_hook_error(name: str, known: Iterable[str]) -> HookNameError:
    known = list(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return HookNameError(
        f"unknown hook name {name!r}.{hint} ({len(known)} hook points exist; "
        f"see model.hook_dict or the hook table in docs/hooks.md)"
    )


def check_hook_names(names: Iterable[str], known: Dict[str, object]) -> None:
    for name in names:
        if name not in known:
            raise unknown_hook_error(name, known)


class CheckedHookNames:
    """A mixin before TransformerLens' `HookedRootModule`: hooks added by name and `run_with_cache`'s
    `names_filter` (a str or a list) are checked with `check_hook_name` (TransformerLens would skip
    an unknown name silently), and `pos_slice` is refused (it slices axis -2, a stream axis here)."""

    def check_hook_name(self, name: str) -> None:
        check_hook_names([name], self.hook_dict)

    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False) -> None:
        if isinstance(name, str):
            self.check_hook_name(name)
        super().add_hook(name, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def _enable_hook_with_name(self, name: str, hook, dir) -> None:
        self.check_hook_name(name)
        super()._enable_hook_with_name(name, hook, dir)

    def get_caching_hooks(self, names_filter=None, *args, **kwargs):
        if isinstance(names_filter, str):
            names_filter = [names_filter]
        if isinstance(names_filter, (list, tuple)):
            names_filter = list(names_filter)
            for name in names_filter:
                self.check_hook_name(name)
        return super().get_caching_hooks(names_filter, *args, **kwargs)

    def run_with_cache(self, *args, **kwargs):
        if kwargs.get("pos_slice") is not None:
            raise ValueError(
                "pos_slice is not supported: TransformerLens slices axis -2, which is the stream "
                "axis of [batch, pos, n_streams, d_model] hooks; slice positions yourself"
            )
        return super().run_with_cache(*args, **kwargs)


def sizes(cfg, batch: int, pos: int) -> Dict[str, int]:
    dims = ("n_streams", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab")
    return dict(batch=batch, pos=pos, **{dim: getattr(cfg, dim) for dim in dims})


def hook_table(model: MultiStreamModel, batch: int = 2, pos: int = 3) -> List[Tuple[str, str, str]]:
    """(name pattern, symbolic shape, description) for every hook of `model`, in forward order.

    Runs one small forward with every hook cached and raises if any shape differs from its spec.
    """
    tokens = torch.zeros(batch, pos, dtype=torch.long, device=model.device)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    dims = sizes(model.cfg, batch, pos)
    rows: Dict[str, Tuple[str, str, str]] = {}
    for name, act in cache.items():
        axes, desc = HOOK_SPECS[suffix(name)]
        expected = tuple(dims[a] for a in axes)
        if tuple(act.shape) != expected:
            raise AssertionError(f"{name}: shape {tuple(act.shape)} != spec {axes} = {expected}")
        pattern = re.sub(r"^blocks\.\d+\.", "blocks.{l}.", name)
        rows.setdefault(pattern, (pattern, "[" + ", ".join(axes) + "]", desc))
    return list(rows.values())


def hook_table_markdown(model: MultiStreamModel) -> str:
    lines = ["| hook name | shape | holds |", "|---|---|---|"]
    lines += [f"| `{n}` | `{s}` | {d} |" for n, s, d in hook_table(model)]
    return "\n".join(lines)
