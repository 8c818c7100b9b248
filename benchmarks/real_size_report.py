"""The whole report at the mhc-780m shape on a CPU (issue 18, Part 1, item 2): phase times and
peak RSS at two corpus sizes, to show the probes' state does not grow with the tokens.

    python -m benchmarks.real_size_report                          # 36 layers, --max-tokens 256 512
    python -m benchmarks.real_size_report --layers 4 --tokens 256  # a quick check at small depth

Builds (once, kept in --dir) a randomly initialised model of the mhc-780m shape with --layers
layers in the hub layout (bf16 model.safetensors + config.json = model_args; see real_size.py),
then for each N of --tokens runs, in a child process,

    mhc-interp report --model DIR/hub --max-tokens N --dtype bfloat16 --quiet [--fast]

and records its wall time, peak RSS (`ru_maxrss`, through real_size's launcher), the RSS sampled
every --sample-s seconds, the sections written against the report's list, and the report's own
phase table (report.json "timings"), in benchmarks/results/real_size_report-L<layers>-cpu.json.
--fast (the default here) is the report's small run: 4 causal prompts of 32 tokens, 256
predictability tokens; an explicit --max-tokens still sets the corpus size. Offline the model has
no tokenizer, so the corpus is random token ids (the report says so).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from .real_size import MIB, RESULTS, ROOT, child_env, cli_cmd, random_model, real_config, run_child, save_hub


def expected_sections() -> List[str]:
    """Every section the report declares (the probes' `report` sections; the SAE one needs --sae)."""
    from mhc_interp.report import report_sections

    return [label for label, _, _ in report_sections()]


def hub_checkpoint(folder: Path, layers: int) -> Path:
    """DIR/hub: the random mhc-780m-shape checkpoint with `layers` layers, built if absent."""
    hub = Path(folder) / "hub"
    if (hub / "model.safetensors").is_file() and (hub / "config.json").is_file():
        if json.loads((hub / "config.json").read_text())["n_layer"] == layers:
            return hub
    t0 = time.perf_counter()
    save_hub(random_model(real_config(layers)), hub)
    print(f"built and saved {hub} ({layers} layers) in {time.perf_counter() - t0:.0f} s", flush=True)
    return hub


def report_run(
    hub: Path,
    n_tokens: int,
    out: Path,
    fast: bool = True,
    sample_s: float = 2.0,
    env: Optional[Dict[str, str]] = None,
    code: Path = ROOT,
    heads_per_layer: Optional[int] = 1,
    causal_sublayers: Optional[int] = 8,
) -> Dict[str, Any]:
    """One `mhc-interp report` on `hub` at `n_tokens`: rc, seconds, peak RSS, sections, phase times.
    `code`: the folder whose mhc_interp runs (a snapshot, while others edit the working tree)."""
    cmd = cli_cmd(
        "report",
        "--model",
        hub,
        "--max-tokens",
        n_tokens,
        "--dtype",
        "bfloat16",
        "--quiet",
        "--out",
        out,
        "--force",
        *(["--fast"] if fast else []),
        *(["--heads-per-layer", heads_per_layer] if heads_per_layer else []),
        *(["--causal-sublayers", causal_sublayers] if causal_sublayers else []),
    )
    env = dict(env or child_env(), PYTHONPATH=str(code))
    r = run_child(cmd, env=env, cwd=code, sample_s=sample_s)
    r.update(max_tokens=n_tokens, fast=fast)
    r.pop("output")
    if r["rc"] == 0:
        rep = json.loads((Path(out) / "report.json").read_text())
        r["sections"] = [s.get("probe") for s in rep["sections"]]
        r["missing_sections"] = [s for s in expected_sections() if s not in r["sections"]]
        r["timings"] = rep.get("timings", [])
        r["worker_timings"] = rep.get("worker_timings", [])
        r["corpus"] = rep["summary"]["corpus"]
    return r


def summary_line(r: Dict[str, Any]) -> str:
    head = (
        f"report --max-tokens {r['max_tokens']}{' --fast' if r['fast'] else ''}: rc {r['rc']}, "
        f"{r['seconds']:.0f} s, peak RSS {r['peak_rss_mib']:.0f} MiB"
    )
    if r["rc"] != 0:
        return head + "\n" + r["output_tail"]
    slow = ", ".join(f"{t['phase']} {t['seconds']:.0f}" for t in r["timings"][:8])
    return f"{head}, missing sections {r['missing_sections']}; slowest phases (s): {slow}"


def git_state() -> str:
    """The commit the run measured, and whether the library had uncommitted changes."""

    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (
        " (mhc_interp modified)" if git("status", "--short", "mhc_interp") else ""
    )


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=36, help="36 = mhc-780m")
    p.add_argument(
        "--dir", default="/tmp/real_size_report", help="where the checkpoint (kept) and reports go"
    )
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 512], help="report --max-tokens values")
    p.add_argument("--full", action="store_true", help="the report's default settings instead of --fast")
    p.add_argument("--sample-s", type=float, default=2.0, help="RSS sampling interval")
    p.add_argument("--heads-per-layer", type=int, default=1, help="report --heads-per-layer (0: all heads)")
    p.add_argument("--causal-sublayers", type=int, default=8, help="report --causal-sublayers (0: all)")
    p.add_argument(
        "--code",
        default=str(ROOT),
        help="the folder whose mhc_interp runs (default: this checkout; "
        "a copy of a commit keeps the run off other people's edits)",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    folder = Path(args.dir)
    out_path = Path(args.out) if args.out else RESULTS / f"real_size_report-L{args.layers}-cpu.json"
    hub = hub_checkpoint(folder, args.layers)
    weights_mib = (hub / "model.safetensors").stat().st_size / MIB
    result: Dict[str, Any] = dict(
        layers=args.layers,
        weights_mib=weights_mib,
        cpu_count=os.cpu_count(),
        commit=git_state() if args.code == str(ROOT) else args.code,
        load_average_before=os.getloadavg(),
        runs=[],
    )
    for n_tokens in args.tokens:
        r = report_run(
            hub,
            n_tokens,
            folder / f"report-{n_tokens}",
            fast=not args.full,
            sample_s=args.sample_s,
            code=Path(args.code),
            heads_per_layer=args.heads_per_layer or None,
            causal_sublayers=args.causal_sublayers or None,
        )
        r["load_average_after"] = os.getloadavg()
        result["runs"].append(r)
        print(summary_line(r), flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1))
    print(f"results: {out_path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
