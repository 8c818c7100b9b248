"""A folder the program writes as a whole (the report) without ever losing a user's file.

The folder is built under a hidden sibling `.{name}.partial-{pid}-{random}` and put in place only
when complete, with a manifest (`MANIFEST`: every file written, with its SHA-256). An existing
folder may be replaced only where it holds nothing but an earlier output of this program, unchanged
since it was written; anything else (a file the user added, a report file the user edited, a
folder that was never a report) makes `check` refuse, unless `force`, and then only the files the
earlier manifest names are replaced: the user's stay. The current working directory (or a folder
holding it) is never removed or renamed; it is updated file by file.

Interrupted runs leave their partial folder behind only when killed outright (SIGKILL); the next
run into the same parent removes partial folders of this naming whose process is gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

MANIFEST = "mhc-report-manifest.json"
WRITER = "mhc-interp report"


class OutputFolderError(ValueError):
    """An output folder the program may not write into (it holds the user's files)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> List[str]:
    """Every file and symlink under `folder` (not following links), as sorted relative paths."""
    out = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        out += [str(rel / f) for f in files]
        out += [str(rel / d) for d in dirs if (Path(root) / d).is_symlink()]
    return sorted(out)


def read_manifest(folder: Path) -> Dict[str, str]:
    """{relative path: sha256} of the files an earlier run wrote into `folder` ({} if none)."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) and data.get("written_by") == WRITER else None
    return (
        {k: v for k, v in files.items() if isinstance(v, str)}  # JSON keys are strings
        if isinstance(files, dict)
        else {}
    )


def foreign_files(folder: Path) -> List[str]:
    """Files under `folder` that are not an unchanged output of an earlier run (the user's)."""
    own = read_manifest(folder)
    return [
        p
        for p in _files(folder)
        if p != MANIFEST and not (p in own and _sha256_or_none(folder / p) == own[p])
    ]


def check(out: Path, force: bool = False) -> None:
    """Refuse (OutputFolderError) an `out` that exists and holds anything but an earlier, unchanged
    output, unless `force`; refuse a path that is a file whatever `force` says."""
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputFolderError(f"output folder {out} exists and is a file")
    theirs = foreign_files(out)
    if theirs and not force:
        shown = ", ".join(theirs[:5]) + (f" and {len(theirs) - 5} more" if len(theirs) > 5 else "")
        raise OutputFolderError(
            f"output folder {out} holds files this program did not write, or changed since: {shown}. "
            f"Choose a new folder, or pass --force to write the report into it anyway (files with the "
            f"report's names are overwritten, the others stay)"
        )


def _partial_pattern(out: Path) -> "re.Pattern[str]":
    # ours: .{name}.partial-{pid}-{mkdtemp suffix}; before pids were in the name: .{name}.partial-{suffix}
    return re.compile(rf"\.{re.escape(out.name)}\.partial-(?:(\d+)-)?[a-z0-9_]{{8}}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid < 2**31  # exists but not ours, or an impossible pid (treated as gone)
    return True


def remove_stale_partials(out: Path) -> List[Path]:
    """Remove partial folders of earlier runs into `out` whose process no longer runs; returns them."""
    pattern, removed = _partial_pattern(out), []
    if not out.parent.is_dir():
        return removed
    for entry in out.parent.iterdir():
        m = pattern.fullmatch(entry.name)
        if m and entry.is_dir() and not entry.is_symlink() and not (m.group(1) and _alive(int(m.group(1)))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def staging_folder(out: Path) -> Path:
    """A new, empty partial folder beside `out` (stale ones of dead runs removed first)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))


def _holds_cwd(out: Path) -> bool:
    cwd = Path.cwd().resolve()
    return cwd == out or out in cwd.parents


def commit(staged: Path, out: Path) -> None:
    """Put the complete `staged` folder in place at `out`, writing its manifest.

    `out` absent: a rename. `out` an earlier, unchanged output (and not the working directory): a
    swap of two renames, then the old one removed. Otherwise (`check` passed with force, or `out`
    holds the working directory): file by file, deleting only the earlier manifest's files and
    the folders they leave empty; the manifest is written last."""
    files = _files(staged)
    manifest = {"written_by": WRITER, "files": {p: _sha256(staged / p) for p in files}}
    (staged / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if not out.exists():
        staged.rename(out)
        return
    if not foreign_files(out) and not _holds_cwd(out):
        old = staged.with_name(staged.name + "-old")
        out.rename(old)
        staged.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        return
    earlier = read_manifest(out)
    for rel in earlier:
        target = out / rel
        if (target.is_file() or target.is_symlink()) and _sha256_or_none(target) == earlier[rel]:
            target.unlink()
            _remove_empty_parents(target.parent, out)
    (out / MANIFEST).unlink(missing_ok=True)
    for rel in files + [MANIFEST]:
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged / rel, target)
    shutil.rmtree(staged, ignore_errors=True)


def _sha256_or_none(path: Path) -> Optional[str]:
    return None if path.is_symlink() else _sha256(path)


def _remove_empty_parents(folder: Path, top: Path) -> None:
    while folder != top and top in folder.parents and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent
