"""Process-wide settings a command (the CLI, a benchmark) makes once, before torch is imported.

- OpenMP's idle threads spin by default (libgomp); on cores shared with other work that takes the
  cores from the threads they wait for (a 2-thread forward: 8-23 s spinning, 4.0 s passive). The
  runtime reads `OMP_WAIT_POLICY` once, when torch is first imported. An explicit setting wins.
- glibc serves every allocation over 32 MiB with its own mmap and unmaps it on free, so each large
  temporary tensor (a probe's vocabulary-sized block) is page-faulted in, zeroed by the kernel, anew:
  7.7 s of the demo report's 24 s were system time, 2.5 M page faults. Keeping freed memory in the
  heap for reuse (mallopt: no mmap, no trimming) cut that to 2.0 s. The cost: the process does not
  give memory back to the system until it exits, the right trade for a command, not for a library
  imported into a long-lived process (hence not done on `import mhc_interp`). Not glibc: nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks for reuse (see the module docstring); whether it could."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def configure_command_process() -> None:
    """The settings of a command's process: passive OpenMP waits (unless set) and freed memory kept."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    keep_freed_memory()
