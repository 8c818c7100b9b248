"""The hook API around `HookedMHC`: names and shapes, per-stream addressing, frozen mixing."""
from .cache import MHCCache
from .freeze import frozen_mixing, is_mixing_hook
from .names import HOOK_SPECS, STREAM_VALUED, HookNameError, hook_table, hook_table_markdown
from .streams import check_streams, stream_hook

__all__ = ["MHCCache", "frozen_mixing", "is_mixing_hook", "HOOK_SPECS", "STREAM_VALUED",
           "HookNameError", "hook_table", "hook_table_markdown", "check_streams", "stream_hook"]
