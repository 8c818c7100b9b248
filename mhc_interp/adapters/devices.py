"""Models spread over devices (accelerate `device_map`, cpu / disk offload): where a module runs,
its offloaded weights made real for a step, and hook points that run their hooks on one device."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from .spec import UnsupportedModelError

__all__ = ["execution_device", "onloaded", "AdapterHookPoint"]


def _hooks_of(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", [hook]))


def execution_device(module: nn.Module, fallback: Optional[torch.device] = None) -> torch.device:
    """Where accelerate runs `module` (its hook's execution device), else where its weights are."""
    for hook in _hooks_of(module):
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    for t in module.parameters():  # its own first, then its submodules
        if t.device.type != "meta":
            return t.device
    if fallback is not None:
        return fallback
    raise UnsupportedModelError(
        f"cannot tell which device {type(module).__name__} runs on (meta weights, no hook)"
    )


@contextmanager
def onloaded(*modules: nn.Module) -> Iterator[None]:
    """Make accelerate-offloaded modules' own weights real for the duration (their hooks'
    pre/post_forward, exactly what calling the modules would do); a no-op otherwise."""
    hooks = [(m, h) for m in modules for h in _hooks_of(m) if getattr(h, "offload", False)]
    for m, h in hooks:
        h.pre_forward(m)
    try:
        yield
    finally:
        for m, h in reversed(hooks):
            h.post_forward(m, None)


class _GatheringHook:
    """A TransformerLens hook run on `device`: the activation is moved there, the result back."""

    def __init__(self, fn: Callable, device: torch.device):
        self.fn, self.device = fn, device

    def __call__(self, act, hook):
        if not isinstance(act, Tensor) or act.device == self.device:
            return self.fn(act, hook=hook)
        out = self.fn(act.to(self.device), hook=hook)
        return out.to(act.device) if isinstance(out, Tensor) else out

    def __repr__(self) -> str:
        inner = getattr(self.fn, "func", self.fn)
        return f"gathered({getattr(inner, '__name__', type(inner).__name__)} on {self.device})"


class AdapterHookPoint(HookPoint):
    """A HookPoint that, when `gather_device` is set (model spread over several devices), runs
    its hooks on that device (see `_GatheringHook`)."""

    gather_device: Optional[torch.device] = None

    def add_hook(self, hook, dir="fwd", is_permanent=False, level=None, prepend=False, **kwargs):
        if self.gather_device is not None and not isinstance(hook, _GatheringHook):
            hook = _GatheringHook(hook, self.gather_device)
        return super().add_hook(
            hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend, **kwargs
        )
