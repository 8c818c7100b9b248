"""`torch.compile`d copies of the model's pure functions, one per function, shared by every module
that calls it.

The compiled regions are functions of their tensors (and of the calling module, whose parameters
dynamo lifts to graph inputs), never of a module instance's identity, so the 72 sublayers of
mhc-780m share one graph per (sublayer type, dtype, shape regime) instead of compiling 72 times.
Hook points stay *outside* the regions (see `HyperConnectedSublayer.forward`), which is what keeps
TransformerLens hooks, caching, frozen mixing and nnsight working on a compiled model: a region is
only entered when nothing inside it can be observed.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

# Two sublayer types x float32/bf16 x grad/no-grad x static/dynamic shapes exceeds dynamo's
# default of 8 graphs per function; past the limit dynamo silently falls back to eager. The higher
# limit holds for these regions only: torch's global `recompile_limit` is left as it is.
RECOMPILE_LIMIT = 64


@functools.cache
def compile_once(fn: Callable) -> Callable:
    """The `torch.compile`d `fn` (created on first use, then cached; compiling itself happens on
    first call), allowed max(RECOMPILE_LIMIT, the global limit) graphs."""
    limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    try:
        return torch.compile(fn, recompile_limit=limit)
    except TypeError:  # a torch without per-region limits: raise the global one around each call
        compiled = torch.compile(fn)
        return functools.wraps(fn)(lambda *args, **kwargs: _with_limit(limit, compiled, args, kwargs))


def _with_limit(limit: int, compiled: Callable, args: tuple, kwargs: dict):
    with torch._dynamo.config.patch(recompile_limit=limit):
        return compiled(*args, **kwargs)


def torch_hooks_attached(module: nn.Module) -> bool:
    """True if any torch forward/backward (pre-)hook is registered on `module` itself."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def module_observed(module: nn.Module) -> bool:
    """True if anyone may read or change what happens at `module`: a TransformerLens hook or any
    torch forward/backward (pre-)hook is attached, or nnsight has instrumented it (it installs its
    own `forward` on the instance)."""
    return bool(
        torch_hooks_attached(module)
        or "forward" in module.__dict__
        or getattr(module, "fwd_hooks", None)
        or getattr(module, "bwd_hooks", None)
    )


def global_module_hooks() -> bool:
    """True if hooks registered for *every* module (`torch.nn.modules.module.register_module_*`)
    are active: they would not fire inside a compiled region."""
    m = torch.nn.modules.module
    return bool(
        m._global_forward_hooks
        or m._global_forward_pre_hooks
        or m._global_backward_hooks
        or m._global_backward_pre_hooks
    )
