"""Formatting-independent size of a package (issue 15's "fewer lines"): code tokens without comments
and docstrings, statements, and docstring lines, next to raw lines (which `ruff format` alone changes).

    python -m benchmarks.code_size [mhc_interp] [--base COMMIT [--format-base]]

With --base, the same numbers for the package at that commit (read through `git show`); with
--format-base also for that commit's code as `ruff format` writes it now, so raw and code lines
compare like for like."""

import argparse
import ast
import io
import subprocess
import tokenize
from pathlib import Path
from typing import Dict, Iterable, Tuple

_SKIPPED = {
    tokenize.COMMENT,
    tokenize.NL,
    tokenize.NEWLINE,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.ENDMARKER,
}


def _docstring_lines(tree: ast.Module) -> Dict[int, int]:
    """{first line: line count} of every module / class / function docstring."""
    nodes = [tree] + [
        n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    ]
    out = {}
    for node in nodes:
        first = node.body[0] if node.body else None
        if (
            isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        ):
            out[first.lineno] = first.end_lineno - first.lineno + 1
    return out


def size(sources: Iterable[str]) -> Dict[str, int]:
    """lines, code lines (holding a code token), code tokens (neither counts comments or docstrings),
    statements and docstring lines of Python sources."""
    total = dict(lines=0, code_lines=0, code_tokens=0, statements=0, docstring_lines=0)
    for src in sources:
        tree = ast.parse(src)
        docs = _docstring_lines(tree)
        code = [
            tok
            for tok in tokenize.generate_tokens(io.StringIO(src).readline)
            if tok.type not in _SKIPPED and not (tok.type == tokenize.STRING and tok.start[0] in docs)
        ]
        total["lines"] += src.count("\n")
        total["code_lines"] += len({line for tok in code for line in range(tok.start[0], tok.end[0] + 1)})
        total["docstring_lines"] += sum(docs.values())
        total["statements"] += sum(isinstance(n, ast.stmt) for n in ast.walk(tree))
        total["code_tokens"] += len(code)
    return total


def ruff_formatted(src: str) -> str:
    """`src` as `ruff format` (this project's settings) writes it."""
    done = subprocess.run(
        ["ruff", "format", "--stdin-filename", "x.py", "-"], input=src, capture_output=True, text=True
    )
    return done.stdout if done.returncode == 0 else src


def sources_at(commit: str, package: str) -> Tuple[str, ...]:
    files = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", commit, package], capture_output=True, text=True
    )
    paths = [p for p in files.stdout.split() if p.endswith(".py")]
    return tuple(
        subprocess.run(["git", "show", f"{commit}:{p}"], capture_output=True, text=True).stdout for p in paths
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("package", nargs="?", default="mhc_interp")
    p.add_argument("--base", default=None, help="a commit to compare with")
    p.add_argument(
        "--format-base",
        action="store_true",
        help="also the base as `ruff format` would write it (lines alike)",
    )
    args = p.parse_args()
    now = size(path.read_text() for path in Path(args.package).rglob("*.py"))
    print("now ", now)
    if args.base:
        base = sources_at(args.base, args.package)
        print(f"{args.base[:10]}", size(base))
        if args.format_base:
            print(f"{args.base[:10]} formatted", size(ruff_formatted(src) for src in base))


if __name__ == "__main__":
    main()
