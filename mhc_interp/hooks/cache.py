"""`MHCCache`: the dict `run_with_cache` returns, with helpful errors and per-stream access."""

from __future__ import annotations

from typing import Dict

from torch import Tensor

from ..contract import MultiStreamModel
from .names import unknown_hook_error
from .streams import check_streams, select_streams


class MHCCache(dict):
    """{hook name: activation}. `cache.stream(name, s)` -> [batch, pos, d_model] (or
    [batch, pos] for h_pre / h_post); a list of streams keeps the stream axis."""

    def __init__(self, data: Dict[str, Tensor], model: MultiStreamModel):
        super().__init__(data)
        self.model = model

    def __missing__(self, name: str):
        if name in self.model.hook_dict:
            raise KeyError(f"{name!r} is a hook point but was not cached (check names_filter)")
        raise unknown_hook_error(name, self.model.hook_dict)

    def stream(self, name: str, streams) -> Tensor:
        return select_streams(self[name], check_streams(self.model, name, streams))

    def to(self, device) -> "MHCCache":
        return MHCCache({k: v.to(device) for k, v in self.items()}, self.model)
