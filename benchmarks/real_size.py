"""The mhc-780m shape end to end on a CPU: loading, the CLI, the report and the causal sweeps,
with peak memory (RSS) and wall time of each step (issue 18, Part 1).

    python -m benchmarks.real_size                         # the full mhc-780m shape (36 layers): long
    python -m benchmarks.real_size --layers 2              # the same steps at 2 layers (~2 min)
    python -m benchmarks.real_size --layers 2 --skip report --tokens 128

Steps (results: benchmarks/results/real_size-L<layers>-cpu.json, or --out):
  1. build    a randomly initialised model of the mhc-780m width (d_model 1280, 20 heads, 4
              streams, vocab 50304, n_ctx 1024, bias) with --layers layers (36 = mhc-780m), built
              in bf16, saved in both real checkpoint layouts under --dir:
                nanogpt.pt   {"model": nanoGPT keys prefixed `_orig_mod.` (the public code's
                             duplicate keys included), "model_args": ...} in --pt-dtype (default
                             float32, as nanoGPT's train.py saves its float32 weights)
                hub/         config.json (= model_args) + model.safetensors in bf16 (duplicate
                             tensors stored once, as `safetensors.torch.save_model` does)
  2. load     `HookedMHC.from_pretrained` of each layout at several dtypes, each in a fresh
              process (`measure`, below): peak RSS over the RSS before the load, against the
              bytes of the loaded model and of the checkpoint's tensors
  3. cli      `mhc-interp check` and `mhc-interp hooks` on both layouts (--dtype bfloat16)
  4. report   `mhc-interp report --model hub/ --max-tokens N --dtype bfloat16 --quiet` for each
              N of --tokens; the sections present, and the report's own timing table
  5. sweeps   `ablate_and_rescue` and `activation_patching` on --sweep-sublayers sublayers (evenly
              spaced, first and last included) of --sweep-prompts x --sweep-seq tokens: seconds
              per intervention and the full sweep over every sublayer extrapolated as
              clean forward + n_sublayers x mean seconds per sampled sublayer (the cost of a
              sublayer's interventions is linear in the sublayers after it, so the mean over
              evenly spaced sublayers is the mean over all of them)

Every CLI step runs as a child process; its peak RSS is the child's `ru_maxrss` (`os.wait4` in a
small launcher process, `run_child`).
The loader reads a checkpoint's tensors into memory and assigns them to a model built on the meta
device, converting them one at a time: a load peaks near the larger of the checkpoint's tensors
and the model (a float32 .pt loaded as bf16: the file's tensors, 2x the bf16 model).

`python -m benchmarks.real_size measure --load PATH:DTYPE ... [--probes N,T]` is the measuring
child (JSON on stdout): it imports torch and mhc_interp (peak RSS of that = the fixed allowance),
then for each load resets the kernel's peak-RSS counter (`/proc/self/clear_refs`, "5") and
reports the peak over the RSS before it. With --probes it then runs every probe on the bf16
model loaded last on N x T random tokens, each measured the same way; tests/test_real_width.py
asserts on its output at 2 layers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

MIB = 2**20
ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"


# ------------------------------------------------------------------------- memory measurement
def status_bytes(field: str) -> int:
    """A `/proc/self/status` memory field (VmRSS, VmHWM, RssAnon, RssFile) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_over(fn: Callable[[], Any]) -> Tuple[Any, Dict[str, float]]:
    """(fn(), {"seconds", "rss_before_mib", "peak_mib", "extra_peak_mib"}): the process's peak RSS
    while fn ran, and how far it rose over the RSS before fn."""
    gc.collect()
    before = status_bytes("VmRSS")
    reset_peak_rss()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = status_bytes("VmHWM")
    return out, dict(
        seconds=seconds,
        rss_before_mib=before / MIB,
        peak_mib=peak / MIB,
        extra_peak_mib=(peak - before) / MIB,
    )


# Started by a small launcher, not from this process: a child's ru_maxrss also holds the high-water
# RSS of the address space it was exec'd from (Linux keeps the larger at execve), and Python's
# subprocess starts children with vfork, i.e. from this process's address space, whose RSS after
# building and saving a model is larger than many of the commands measured (mhc-interp hooks at 36
# layers: 4720 MiB reported from here, 3295 MiB through the launcher).
_LAUNCHER = """
import json, os, subprocess, sys, threading, time
t0 = time.perf_counter()
interval, timeline = float(sys.argv[2]), []

def sample(pid):   # the child's RSS every `interval` s: (seconds since start, MiB)
    while True:
        try:
            with open(f"/proc/{pid}/status") as f:
                rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
        except (OSError, StopIteration):
            return
        timeline.append((round(time.perf_counter() - t0, 1), round(rss / 1024)))
        time.sleep(interval)

with open(sys.argv[1], "wb") as out:
    proc = subprocess.Popen(sys.argv[3:], stdout=out, stderr=subprocess.STDOUT)
    if interval > 0:
        threading.Thread(target=sample, args=(proc.pid,), daemon=True).start()
    _, status, usage = os.wait4(proc.pid, 0)
print(json.dumps(dict(rc=os.waitstatus_to_exitcode(status), seconds=time.perf_counter() - t0,
                      peak_rss_mib=usage.ru_maxrss / 1024, rss_timeline=timeline)))
"""


def run_child(
    cmd: Sequence[str], env: Optional[Dict[str, str]] = None, cwd=None, sample_s: float = 0.0
) -> Dict[str, Any]:
    """Run `cmd`; its exit status, wall seconds, peak RSS (MiB, the child's own ru_maxrss, measured
    by a launcher process: see above) and output; with `sample_s` > 0 also its RSS every `sample_s`
    seconds ("rss_timeline": [(seconds, MiB)])."""
    with tempfile.NamedTemporaryFile() as out:
        launched = subprocess.run(
            [sys.executable, "-c", _LAUNCHER, out.name, str(sample_s), *map(str, cmd)],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(launched.stdout)
        text = Path(out.name).read_bytes().decode(errors="replace")
    timeline = {"rss_timeline": r["rss_timeline"]} if sample_s > 0 else {}
    return dict(
        cmd=" ".join(map(str, cmd)),
        rc=r["rc"],
        seconds=r["seconds"],
        peak_rss_mib=r["peak_rss_mib"],
        output_tail=text[-2000:],
        output=text,
        **timeline,
    )


def last_json(r: Dict[str, Any]) -> Dict[str, Any]:
    """The JSON line a `measure` child printed last (warnings may come before it); drops the full
    output from `r` (only its tail is kept in the results)."""
    text = r.pop("output", "")
    return json.loads(next(line for line in reversed(text.strip().splitlines()) if line.startswith("{")))


def child_env() -> Dict[str, str]:
    """The environment of the measured children: offline (no hub look-ups for a tokenizer),
    sleeping OpenMP threads, and a fixed malloc mmap threshold so freed tensors go back to the
    OS (glibc's dynamic threshold would keep some in the heap and hide the next step's peak)."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        MALLOC_MMAP_THRESHOLD_="131072",
        PYTHONPATH=str(ROOT),
    )
    return env


# ----------------------------------------------------------------------------- the model files
def real_config(layers: int = 36):
    """The mhc-780m config (benchmarks/common.py SHAPES) with `layers` layers."""
    from mhc_interp import MHCConfig

    from .common import SHAPES

    return MHCConfig(**dict(SHAPES["mhc-780m"]["cfg"], n_layers=layers, hyper_conn_type="mhc", bias=True))


def random_model(cfg, dtype=None, seed: int = 0):
    """A randomly initialised HookedMHC built directly in `dtype` (bf16 by default)."""
    import torch

    from mhc_interp import HookedMHC

    dtype = dtype or torch.bfloat16
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return HookedMHC(cfg).eval()
    finally:
        torch.set_default_dtype(previous)


def save_layouts(model, folder: Path, pt_dtype=None) -> Dict[str, Path]:
    """Save `model` as a nanoGPT .pt (`_orig_mod.` keys, in `pt_dtype`, default float32) and in the
    hub layout (`save_hub`). -> {"pt": file, "hub": folder}."""
    import torch

    from mhc_interp.loading import hooked_state_dict_to_nanogpt

    pt_dtype = pt_dtype or torch.float32
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # float32 copies made once per tensor: the duplicate keys share them (torch.save stores each once)
    cast = {k: v.detach().to(pt_dtype) for k, v in model.state_dict().items()}
    nano = hooked_state_dict_to_nanogpt(cast, model.cfg)
    torch.save(
        {
            "model": {"_orig_mod." + k: v for k, v in nano.items()},
            "model_args": model.cfg.to_nanogpt_args(),
            "iter_num": 0,
        },
        folder / "nanogpt.pt",
    )
    del cast, nano
    return {"pt": folder / "nanogpt.pt", "hub": save_hub(model, folder / "hub")}


def save_hub(model, folder: Path) -> Path:
    """`model` in the hub layout of the public checkpoints: bf16 model.safetensors (nanoGPT keys,
    duplicate tensors stored once, as `safetensors.torch.save_model` does) + config.json = model_args."""
    import torch
    from safetensors.torch import save_file

    from mhc_interp.loading import hooked_state_dict_to_nanogpt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    seen, hub = set(), {}
    for k, v in hooked_state_dict_to_nanogpt(model.state_dict(), model.cfg).items():
        if id(v) in seen:  # the duplicate keys (and the tied lm_head) hold the same tensor: stored once
            continue
        seen.add(id(v))
        hub[k] = v.detach().to(torch.bfloat16).contiguous()
    save_file(hub, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(model.cfg.to_nanogpt_args(), indent=1))
    return folder


def tensor_bytes(path: Path) -> int:
    """Bytes of the tensors stored in a checkpoint (each storage once), read without loading them."""
    import torch

    path = Path(path)
    if path.is_dir():
        from safetensors import safe_open

        total = 0
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            for k in f.keys():
                s = f.get_slice(k)
                total += (
                    torch.Size(s.get_shape()).numel()
                    * {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}[s.get_dtype()]
                )
        return total
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    storages = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in ckpt["model"].values()}
    return sum(storages.values())


# --------------------------------------------------------------------------- measuring child
def _dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def probe_runs(model, n_seq: int, seq: int) -> Dict[str, Callable[[], Any]]:
    """Every probe on `n_seq` x `seq` random tokens (the causal ones on sublayer 0 only)."""
    import torch

    from mhc_interp.probes import (
        CKA,
        AblateRescue,
        CrossStreamPredictability,
        Curvature,
        HeadDetector,
        LogitLens,
        StreamUsage,
        activation_patching,
        run_probes,
    )

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (n_seq, seq), generator=gen)
    corrupted = tokens.clone()
    corrupted[:, seq // 2] = (corrupted[:, seq // 2] + 1) % model.cfg.d_vocab

    def run(*probes):
        return lambda: run_probes(model, list(probes), tokens, batch_size=n_seq, progress=False)

    def forward():
        with torch.no_grad():
            return model(tokens)

    return {
        "forward": forward,
        "stream_usage": run(StreamUsage()),
        "cka": run(CKA()),  # default minibatch 512, shuffle buffer 4096 rows
        "cka_report": run(CKA(minibatch_tokens=256)),  # the report's setting
        "curvature": run(Curvature()),
        "logit_lens": run(LogitLens()),
        "predictability": run(CrossStreamPredictability()),
        "all_observational": run(
            StreamUsage(), CKA(minibatch_tokens=256), CrossStreamPredictability(), Curvature(), LogitLens()
        ),
        "head_detector_2_heads": run(HeadDetector(heads=[(0, 0), (model.cfg.n_layers - 1, 1)])),
        "ablate_rescue_sublayer_0": run(AblateRescue(sublayers=[0])),
        "activation_patching_sublayer_0": lambda: activation_patching(
            model, tokens, corrupted, sublayers=[0], batch_size=n_seq
        ),
    }


def measure(argv: List[str]) -> Dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.real_size measure")
    p.add_argument("--load", nargs="+", required=True, help="PATH:DTYPE (dtype: auto, bfloat16, float32)")
    p.add_argument("--probes", default=None, help="N,T: run every probe on N x T tokens with the last model")
    p.add_argument("--only", nargs="*", default=None, help="probe names (see probe_runs)")
    p.add_argument(
        "--warmup",
        action="store_true",
        help="load the shipped demo model first (unmeasured), so the first load's lazy imports "
        "(safetensors, zipfile, ...) are not counted",
    )
    args = p.parse_args(argv)
    allowance = status_bytes("VmHWM")
    import torch

    import mhc_interp.probes  # noqa: F401 - imported before the baseline, as the CLI does
    from mhc_interp import HookedMHC

    torch.set_num_threads(int(os.environ.get("REAL_SIZE_THREADS", torch.get_num_threads())))
    out: Dict[str, Any] = dict(
        import_peak_mib=status_bytes("VmHWM") / MIB, python_peak_mib=allowance / MIB, loads=[], probes={}
    )
    model = None
    if args.warmup:
        from mhc_interp.shipped import default_model_path

        HookedMHC.from_pretrained(default_model_path(), tokenizer=None)
    for spec in args.load:
        path, _, dtype = spec.rpartition(":")
        model = None
        gc.collect()
        model, r = peak_over(lambda: HookedMHC.from_pretrained(path, dtype=_dtype(dtype), tokenizer=None))
        r.update(
            path=path,
            dtype=dtype,
            model_dtype=str(model.dtype).replace("torch.", ""),
            model_mib=sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
            / MIB,
            checkpoint_tensor_mib=tensor_bytes(Path(path)) / MIB,
            rss_after_mib=status_bytes("VmRSS") / MIB,
        )
        out["loads"].append(r)
    if args.probes:
        n_seq, seq = (int(x) for x in args.probes.split(","))
        runs = probe_runs(model, n_seq, seq)
        for name, fn in runs.items():
            if args.only and name not in args.only and name != "forward":
                continue
            result, r = peak_over(fn)
            del result  # not held while the next probe is measured
            r["rss_after_mib"] = status_bytes("VmRSS") / MIB
            out["probes"][name] = r
    return out


# ----------------------------------------------------------------------------------- the run
def cli_cmd(*args) -> List[str]:
    return [sys.executable, "-m", "mhc_interp.cli", *map(str, args)]


def sweeps(hub: Path, layers: int, n_sample: int, prompts: int, seq: int) -> Dict[str, Any]:
    """Rescue and patching sweeps on `n_sample` evenly spaced sublayers, extrapolated to all."""
    import torch

    from mhc_interp import HookedMHC
    from mhc_interp.probes import ablate_and_rescue, activation_patching

    model = HookedMHC.from_pretrained(hub, dtype=torch.bfloat16, tokenizer=None)
    n_sub, n = model.cfg.n_sublayers, model.cfg.n_streams
    sample = sorted({round(i * (n_sub - 1) / max(1, n_sample - 1)) for i in range(n_sample)})
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (prompts, seq), generator=gen)
    corrupted = tokens.clone()
    corrupted[:, seq // 2] = (corrupted[:, seq // 2] + 1) % model.cfg.d_vocab
    with torch.no_grad():
        model(tokens)  # warm-up
        t0 = time.perf_counter()
        model(tokens)
        forward_s = time.perf_counter() - t0
    out: Dict[str, Any] = dict(
        prompts=prompts, seq=seq, n_sublayers=n_sub, sublayers=sample, forward_s=forward_s
    )
    kinds = {
        "rescue": (
            n * (n - 1) // 2 + n,
            lambda l: ablate_and_rescue(model, tokens, sublayers=[l], batch_size=prompts),
        ),
        "patching": (
            n,
            lambda l: activation_patching(model, tokens, corrupted, sublayers=[l], batch_size=prompts),
        ),
    }
    for kind, (per_sublayer, fn) in kinds.items():
        times = []
        for l in sample:
            t0 = time.perf_counter()
            fn(l)
            times.append(time.perf_counter() - t0)
        # each call also runs the clean (and corrupted) forward(s): the sublayer's own share is the rest
        clean_runs = 1 if kind == "rescue" else 2
        own = [max(0.0, t - clean_runs * forward_s) for t in times]
        mean_own = sum(own) / len(own)
        out[kind] = dict(
            interventions_per_sublayer=per_sublayer,
            seconds=times,
            seconds_per_intervention=[o / per_sublayer for o in own],
            full_sweep_estimate_s=clean_runs * forward_s + n_sub * mean_own,
        )
        print(
            f"{kind}: sublayers {sample}: {', '.join(f'{t:.1f}' for t in times)} s "
            f"({', '.join(f'{o / per_sublayer:.2f}' for o in own)} s per intervention); "
            f"full sweep over {n_sub} sublayers ~ {out[kind]['full_sweep_estimate_s']:.0f} s",
            flush=True,
        )
    return out


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["measure"]:
        print(json.dumps(measure(argv[1:])))
        return {}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=36, help="36 = mhc-780m; 2 for a quick run")
    p.add_argument(
        "--dir", default=None, help="where the checkpoints go (default: a temporary folder, removed)"
    )
    p.add_argument("--pt-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024], help="report --max-tokens values")
    p.add_argument("--sweep-sublayers", type=int, default=3)
    p.add_argument("--sweep-prompts", type=int, default=8, help="the report's causal_prompts")
    p.add_argument("--sweep-seq", type=int, default=64, help="the report's causal_seq_len")
    p.add_argument("--probes", default="2,32", help="N,T tokens for the per-probe memory step ('' skips it)")
    p.add_argument("--skip", nargs="*", default=[], choices=["load", "cli", "report", "sweeps", "probes"])
    p.add_argument(
        "--code",
        nargs="+",
        default=[str(ROOT)],
        help="folders holding mhc_interp and benchmarks (e.g. two commits' `git archive`): the load "
        "step measures each one's loader, interleaved",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch

    tmp = None
    if args.dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="real_size-")
        folder = Path(tmp.name)
    else:
        folder = Path(args.dir)
    result: Dict[str, Any] = dict(
        layers=args.layers,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        cpu_count=os.cpu_count(),
    )
    out_path = Path(args.out) if args.out else RESULTS / f"real_size-L{args.layers}-cpu.json"

    def save():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1))

    try:
        cfg = real_config(args.layers)
        t0 = time.perf_counter()
        paths = {"pt": folder / "nanogpt.pt", "hub": folder / "hub"}
        reuse = (
            paths["pt"].is_file()
            and (paths["hub"] / "config.json").is_file()
            and json.loads((paths["hub"] / "config.json").read_text())["n_layer"] == args.layers
        )
        if reuse:  # a --dir from an earlier run with these layers is used as it is
            from mhc_interp import HookedMHC

            with torch.device("meta"):
                model = HookedMHC(cfg)  # only counted
        else:
            model = random_model(cfg)
            paths = save_layouts(model, folder, getattr(torch, args.pt_dtype))
        n_params = sum(t.numel() for t in model.parameters())
        del model
        result["build"] = dict(
            seconds=time.perf_counter() - t0,
            parameters=n_params,
            config=cfg.to_dict(),
            pt_mib=paths["pt"].stat().st_size / MIB,
            pt_dtype=args.pt_dtype,
            reused=reuse,
            safetensors_mib=(paths["hub"] / "model.safetensors").stat().st_size / MIB,
        )
        print(
            f"built {n_params / 1e6:.0f}M parameters{' (files reused)' if reuse else ', saved'} in "
            f"{result['build']['seconds']:.0f} s: nanogpt.pt {result['build']['pt_mib']:.0f} MiB, model.safetensors "
            f"{result['build']['safetensors_mib']:.0f} MiB",
            flush=True,
        )
        env = child_env()
        me = [sys.executable, "-m", "benchmarks.real_size", "measure"]
        if "load" not in args.skip:
            result["load"] = []
            for path, dtype in [
                (paths["hub"], "auto"),
                (paths["hub"], "bfloat16"),
                (paths["hub"], "float32"),
                (paths["pt"], "bfloat16"),
                (paths["pt"], "float32"),
            ]:
                for code in args.code:  # interleaved: the machine's load drifts
                    r = run_child(
                        [*me, "--warmup", "--load", f"{path}:{dtype}"],
                        env=dict(env, PYTHONPATH=code),
                        cwd=code,
                    )
                    if r["rc"] != 0:
                        r.pop("output")
                        result["load"].append(dict(r, path=str(path), dtype=dtype, code=code))
                        print(f"load {path} {dtype}: FAILED\n{r['output_tail']}", flush=True)
                        continue
                    m = last_json(r)
                    row = dict(
                        m["loads"][0],
                        import_peak_mib=m["import_peak_mib"],
                        process_peak_mib=r["peak_rss_mib"],
                        code=code,
                    )
                    row["x_model"] = row["extra_peak_mib"] / row["model_mib"]
                    result["load"].append(row)
                    print(
                        f"load {Path(path).name} as {dtype} ({code}): {row['seconds']:.1f} s, peak "
                        f"+{row['extra_peak_mib']:.0f} MiB over {row['rss_before_mib']:.0f} MiB (model "
                        f"{row['model_mib']:.0f} MiB, checkpoint tensors {row['checkpoint_tensor_mib']:.0f} MiB; "
                        f"{row['x_model']:.2f}x the model)",
                        flush=True,
                    )
            save()
        if "probes" not in args.skip and args.probes:
            r = run_child(
                [*me, "--load", f"{paths['hub']}:bfloat16", "--probes", args.probes], env=env, cwd=ROOT
            )
            if r["rc"] == 0:
                result["probes"] = last_json(r)["probes"]
                for name, row in result["probes"].items():
                    print(
                        f"probe {name}: {row['seconds']:.2f} s, peak +{row['extra_peak_mib']:.0f} MiB",
                        flush=True,
                    )
            else:
                r.pop("output")
                result["probes"] = dict(r)
                print(f"probes FAILED\n{r['output_tail']}", flush=True)
            save()
        if "cli" not in args.skip:
            result["cli"] = []
            for cmd in ("check", "hooks"):
                for layout in ("pt", "hub"):
                    r = run_child(
                        cli_cmd(cmd, "--model", paths[layout], "--dtype", "bfloat16"), env=env, cwd=ROOT
                    )
                    r.update(command=cmd, layout=layout)
                    r.pop("output")
                    result["cli"].append(r)
                    print(
                        f"mhc-interp {cmd} ({layout}): rc {r['rc']}, {r['seconds']:.1f} s, peak RSS "
                        f"{r['peak_rss_mib']:.0f} MiB",
                        flush=True,
                    )
            save()
        if "report" not in args.skip:
            from .real_size_report import report_run, summary_line

            result["report"] = []
            for n_tokens in args.tokens:
                r = report_run(paths["hub"], n_tokens, folder / f"report-{n_tokens}", fast=False, env=env)
                result["report"].append(r)
                print(summary_line(r), flush=True)
                save()
        if "sweeps" not in args.skip:
            result["sweeps"] = sweeps(
                paths["hub"], args.layers, args.sweep_sublayers, args.sweep_prompts, args.sweep_seq
            )
            save()
    finally:
        if tmp is not None:
            tmp.cleanup()
    save()
    print(f"results: {out_path}")
    return result


if __name__ == "__main__":
    main()
