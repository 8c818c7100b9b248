"""How fast is the whole report (`mhc-interp`, i.e. `mhc_interp.report.build_report`)?

    python -m benchmarks.report_throughput                      # demo model + the small shape, CPU
    python -m benchmarks.report_throughput --shape tiny --max-tokens 512 --repeats 1 --warmup 0
    python -m benchmarks.report_throughput --no-demo --shape small

Rows (the report written to a temporary folder each run, progress bars off; rows interleaved
round by round so load drift on a shared machine lands on both alike):
  demo model      the shipped demo model on its default corpus (Hamlet), the main job's settings
                  (`ReportConfig()`: 16,384 tokens; `--max-tokens` changes it for both rows)
  <shape>         random weights of `--shape` (benchmarks/common.py), random token ids (no
                  tokenizer), the same report settings
Columns: seconds per report (median, quartiles), tokens/s (corpus tokens / wall seconds), and
each row's slowest phases from the report's own timing table (`report.json` "timings", median
seconds over the timed runs). `import mhc_interp` and loading the model are outside the timing.
JSON goes to `--out`. No timing asserts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from mhc_interp.report import ReportConfig, build_report
from mhc_interp.shipped import DEMO_MODEL, default_corpus, load

from .common import add_common_args, build_model, cli, interleaved, prepare, print_table, write_result


def main(argv=None):
    p = add_common_args(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter),
        repeats=1,
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=ReportConfig.max_tokens,
        help="corpus tokens per report (default: the main job's)",
    )
    p.add_argument("--no-demo", action="store_true", help="only the --shape row")
    p.add_argument("--phases", type=int, default=8, help="slowest report phases printed per row")
    args = p.parse_args(argv)
    device = prepare(args)
    cfg = ReportConfig(max_tokens=args.max_tokens, progress=False)
    dtype = args.dtype
    models = {}
    if not args.no_demo:
        models["demo model"] = (load(DEMO_MODEL, device=str(device), dtype=dtype), default_corpus())
    models[args.shape] = (build_model(args, device), None)
    timings = {name: [] for name in models}
    tokens = {}

    def report(name):
        model, corpus = models[name]

        def run():
            with tempfile.TemporaryDirectory() as tmp:
                index = build_report(model, Path(tmp) / "report", corpus, cfg, model_name=name)
                info = json.loads((index.parent / "report.json").read_text())
            timings[name].append({t["phase"]: t["seconds"] for t in info["timings"]})
            tokens[name] = _corpus_tokens(info["notes"])

        return run

    for name, (model, _) in models.items():
        print(f"{name}: {model.summary()}")
    rows = interleaved({name: report(name) for name in models}, device, args.repeats, args.warmup)
    for name, r in rows.items():
        runs = timings[name][args.warmup :] or timings[name]
        phases = {ph: statistics.median(t.get(ph, 0.0) for t in runs) for ph in runs[-1]}
        r["phases"] = dict(sorted(phases.items(), key=lambda kv: -kv[1]))
        r["tokens"] = tokens[name]
        r["tokens_per_s"] = tokens[name] / r["seconds"]
    print_table(
        rows,
        [
            ("s/report", "seconds", ".2f"),
            ("q1", "q1", ".2f"),
            ("q3", "q3", ".2f"),
            ("tokens", "tokens", ",d"),
            ("tokens/s", "tokens_per_s", ",.0f"),
        ],
    )
    for name, r in rows.items():
        print(f"\n{name}: slowest phases (s)")
        for ph, s in list(r["phases"].items())[: args.phases]:
            print(f"  {s:8.2f}  {ph}")
    result = dict(max_tokens=args.max_tokens, rows=rows)
    write_result("report_throughput", args, device, result)
    return result


def _corpus_tokens(notes) -> int:
    """The corpus size the report states in its notes ("corpus: ...; 16,384 tokens in ...")."""
    for note in notes:
        if note.startswith("corpus:") and " tokens in " in note:
            return int(note.split(" tokens in ")[0].rsplit(" ", 1)[-1].replace(",", ""))
    raise ValueError(f"no token count in the report's notes: {notes}")


if __name__ == "__main__":
    cli(main)
