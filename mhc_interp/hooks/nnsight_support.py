"""nnsight access to `HookedMHC`, with several input-carrying invokes per trace.

`nnsight.NNsight(model)` already traces a `HookedMHC`: every sublayer and every TransformerLens
`HookPoint` is a module, so `nn_model.blocks[1].attn.hook_h_res.output` reads (or, assigned to,
replaces) the same tensor a TL hook on `"blocks.1.attn.hook_h_res"` sees. `to_nnsight(model)`
adds what bare `NNsight` lacks: batching several `tracer.invoke(tokens)` blocks into one forward
(their inputs concatenated along dim 0; each invoke sees only its own rows).

    nn_model = to_nnsight(model)
    with nn_model.trace() as tracer:
        with tracer.invoke(clean_tokens):
            clean = nn_model.blocks[1].mlp.hook_streams_in.output.save()
        with tracer.invoke(other_tokens):
            nn_model.blocks[1].mlp.hook_streams_in.output[:, :, 2] = 0   # zero stream 2
            patched = nn_model.output.save()

Gotchas (execution order, saving, per-invoke batching, the stream axis at dim 2, in-place writes,
permanent wrapping): docs/hooks.md#nnsight-to_nnsight
"""

from __future__ import annotations

from typing import Any, List, Tuple

import torch
from nnsight import NNsight
from nnsight.intervention.batching import Batcher
from torch import Tensor

from ..contract import MultiStreamModel

__all__ = ["MHCNNsight", "to_nnsight"]


class _ScalarSafeBatcher(Batcher):
    """nnsight 0.8.1's `Batcher` indexes `tensor.shape[0]` to decide whether a tensor is
    batched, which raises IndexError on 0-dim tensors (reading `.output` of a batched
    `return_type="loss"` run). A scalar is not batched: serve it whole, as the base class does
    for any tensor whose leading dim is not the batch."""

    def _narrow_tensor(self, tensor: Tensor, group: list) -> Tensor:
        return tensor if tensor.ndim == 0 else super()._narrow_tensor(tensor, group)

    def _widen_tensor(self, full: Tensor, group: list, edited: Tensor) -> Tensor:
        return edited if full.ndim == 0 else super()._widen_tensor(full, group, edited)


class MHCNNsight(NNsight):
    """`NNsight` for a `HookedMHC` whose `_batch_size`/`_batch` (the nnsight 0.8 batching API)
    concatenate the invokes' inputs along the batch axis."""

    _batcher_class = _ScalarSafeBatcher

    def _invoke_input(self, inputs: Tuple[Any, ...], kwargs: dict) -> Any:
        """The invoke's data input: the first positional argument, or `input=`; None if none."""
        return inputs[0] if inputs else kwargs.get("input")

    def _invoke_rows(self, x: Any) -> Tensor:
        """The data input as a tensor with a batch axis: tokens [batch, pos] (text and 1-D
        sequences are converted the way `HookedMHC.forward` does), or a stream state as is."""
        if isinstance(x, Tensor) and x.is_floating_point():
            return x  # a stream state [batch, pos, n_streams, d_model] (start_at_sublayer)
        return self._module._check_tokens(x)

    def _batch_size(self, *inputs: Any, **kwargs: Any) -> int:
        x = self._invoke_input(inputs, kwargs)
        return 0 if x is None else int(self._invoke_rows(x).shape[0])

    def _batch(self, invokes: List[Tuple[tuple, dict]], fn: Any) -> Tuple[tuple, dict]:
        if not invokes:
            return (), {}
        if len(invokes) == 1:
            return invokes[0]
        rows = [self._invoke_rows(self._invoke_input(args, kwargs)) for args, kwargs in invokes]
        if len({r.shape[1:] for r in rows}) != 1:
            raise ValueError(
                "invokes batched in one trace must share every dimension but the batch one; got "
                f"input shapes {[tuple(r.shape) for r in rows]} (pad or split into separate traces)"
            )
        rest = [(args[1:], {k: v for k, v in kwargs.items() if k != "input"}) for args, kwargs in invokes]
        first_args, first_kwargs = rest[0]
        if any(len(a) != len(first_args) or set(k) != set(first_kwargs) for a, k in rest):
            raise ValueError("invokes batched in one trace must pass the same arguments")
        args = tuple(_merge([a[i] for a, _ in rest], f"argument {i + 1}") for i in range(len(first_args)))
        kwargs = {key: _merge([k[key] for _, k in rest], f"{key}=") for key in first_kwargs}
        return (torch.cat(rows, dim=0), *args), kwargs


def _merge(values: List[Any], what: str) -> Any:
    """One invoke-level argument for the batched call: tensors (e.g. `tokens=`) concatenate
    along the batch axis; anything else must be the same in every invoke."""
    if isinstance(values[0], Tensor):
        return torch.cat(values, dim=0)
    if any(v != values[0] for v in values):
        raise ValueError(f"invokes batched in one trace disagree on {what}: {values}")
    return values[0]


def to_nnsight(model: MultiStreamModel) -> MHCNNsight:
    """Wrap a `HookedMHC` for nnsight, allowing several input-carrying `tracer.invoke(...)`s in
    one trace. The model is not copied: the wrapper and `model` share weights and hook points,
    and TransformerLens hooks keep working on `model`."""
    return MHCNNsight(model)
