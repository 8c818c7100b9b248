"""Run every paper-figure script into one folder and write a README.md gallery of the figures.

    python examples/make_gallery.py [--out docs/gallery] [--fast] [--model NAME_OR_PATH] [--device cpu]
                                    [--dtype float32] [--max-tokens N] [--prompts N] [--only NAME ...]

Each script runs in-process (`runpy`) with the shared options, into `OUT/<script name>/`
(figures as PNG, results as JSON + NPZ); `OUT/README.md` lists every PNG with its caption and
the script's one-line summary, grouped by paper. A script that fails is reported in the README
and the exit status, and the others still run.
"""

from __future__ import annotations

import argparse
import os
import runpy
import shutil
import sys
import time
import traceback
from pathlib import Path

HERE = Path(os.path.dirname(os.path.abspath(__file__)))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

PAPERS = {
    "Analyzing Stream Collapse in Hyper-Connections (Alimaskina et al. 2026)": [
        "h_res_matrices",
        "read_write_share",
        "stream_norms",
        "curvature",
    ],
    "Ablate and Rescue (Peng et al. 2026, wgpeng/mhc-780m)": [
        "cka_intra",
        "cka_inter",
        "patching_heatmap",
        "rescue_table",
        "rescue_difference",
        "h_post_stats",
    ],
}
SCRIPTS = [s for group in PAPERS.values() for s in group]
CAUSAL = ("patching_heatmap", "rescue_table", "rescue_difference")


def parse(argv=None):
    p = argparse.ArgumentParser(
        prog="make_gallery.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="docs/gallery")
    p.add_argument("--fast", action="store_true", help="tiny token budgets (a smoke gallery)")
    p.add_argument("--model", default=None, help="hub id, folder or .pt (default: the shipped demo model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--corpus", nargs="*", default=None)
    p.add_argument(
        "--prompts",
        type=int,
        default=None,
        help="prompts for the causal scripts (patching, rescue; their default: 8, --fast 4)",
    )
    p.add_argument(
        "--only",
        nargs="*",
        default=None,
        choices=SCRIPTS,
        metavar="NAME",
        help=f"run only these scripts ({', '.join(SCRIPTS)})",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shared = ["--device", args.device, "--dtype", args.dtype]
    for flag, value in (("--model", args.model), ("--max-tokens", args.max_tokens)):
        if value is not None:
            shared += [flag, str(value)]
    if args.corpus:
        shared += ["--corpus", *args.corpus]
    shared += ["--fast"] * args.fast + ["--quiet"] * args.quiet
    causal = ["--prompts", str(args.prompts)] if args.prompts is not None else []
    todo = args.only or SCRIPTS
    outputs, failures = {}, {}
    t0 = time.perf_counter()
    for name in todo:
        folder = out / name
        if folder.exists():
            shutil.rmtree(folder)  # no stale figures from an earlier run
        try:
            main_fn = runpy.run_path(str(HERE / f"{name}.py"))["main"]
            extra = causal if name in CAUSAL else []
            outputs[name] = main_fn(shared + extra + ["--out", str(folder)])
        except (Exception, SystemExit) as exc:  # keep going: report it in the README
            traceback.print_exc()
            failures[name] = f"{type(exc).__name__}: {exc}"
    secs = time.perf_counter() - t0
    (out / "README.md").write_text(render(out, outputs, failures, args))
    print(
        f"gallery: {sum(len(o.figures) for o in outputs.values())} figures from {len(outputs)} scripts "
        f"in {secs:.0f} s -> {out / 'README.md'}" + (f"; FAILED: {', '.join(failures)}" if failures else "")
    )
    return 1 if failures else 0


def render(out: Path, outputs, failures, args) -> str:
    from mhc_interp.shipped import default_model_path

    model = args.model or f"the shipped demo model (`{default_model_path().name}`)"
    cmd = (
        "python examples/make_gallery.py"
        + (" --fast" if args.fast else "")
        + (f" --model {args.model}" if args.model else "")
        + (f" --prompts {args.prompts}" if args.prompts else "")
        + (f" --out {args.out}" if args.out != "docs/gallery" else "")
    )
    lines = [
        "# Figure gallery",
        "",
        f"The papers' figures reproduced by the scripts in `examples/` on {model}"
        f"{' with --fast (tiny token budgets)' if args.fast else ''}; written by `{cmd}` "
        f"on {args.device}. Each script also runs alone, "
        f"e.g. `python examples/rescue_table.py --model wgpeng/mhc-780m --device cuda --dtype bfloat16`; "
        f"results (JSON + NPZ, `ProbeResult.load`) sit next to each figure.",
        "",
    ]
    for paper, names in PAPERS.items():
        names = [n for n in names if n in outputs or n in failures]
        if not names:
            continue
        lines += [f"## {paper}", ""]
        for name in names:
            lines += [f"### `{name}.py`", ""]
            if name in failures:
                lines += [f"**failed**: `{failures[name]}`", ""]
                continue
            o = outputs[name]
            lines += [f"{o.text}.", ""]
            for png, caption in o.figures.items():
                rel = Path(png).resolve().relative_to(out.resolve()).as_posix()
                lines += [f"![{name}]({rel})", "", f"*{caption}*", ""]
            if "table" in o.extra:
                lines += [o.extra["table"], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
