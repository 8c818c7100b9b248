"""`mhc-interp` command line.

    mhc-interp                                   = mhc-interp report (demo model, shipped corpus)
    mhc-interp report [--model M] [--out DIR]    every probe -> figures, results, index.html
    mhc-interp probe NAME [--model M] [--out D]  one probe (see `mhc-interp probe --list`)
    mhc-interp train --texts F... --out DIR      train a small mHC model on text files
    mhc-interp check [--model M]                 summary + logits check against shipped references
    mhc-interp hooks [--model M] [--markdown]    every hook point with its shape

M is a hub id, a folder or a .pt file; by default the demo model shipped in the package.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import List, Optional

from . import __version__
from .process import configure_command_process
from .shipped import (  # noqa: F401
    DEMO_MODEL,
    PARITY_MODEL,
    asset,
    default_corpus,
    default_model_path,
    load,
    resolve_model_path,
    torch_dtype,
)

# torch, the model and the probes are imported inside the commands: --help, --version and argument
# errors answer without them


def check_device(name: str) -> None:
    """Refuse a device this machine cannot run on, before any work."""
    from .device import DeviceError, resolve_device

    try:
        resolve_device(name)
    except DeviceError as e:
        raise SystemExit(f"mhc-interp: {e}") from None


def cmd_check(args) -> int:
    """Exit 1 on non-finite weights or logits, or logits off the shipped reference; a damaged
    archive or a bad config fails in the loader with its own message."""
    import torch

    from .loading import CheckpointError, nonfinite_tensors
    from .model import HookedMHC

    path = resolve_model_path(args.model)
    with warnings.catch_warnings():  # the non-finite weights are reported below, once
        warnings.filterwarnings("ignore", message=".*non-finite weights")
        model = HookedMHC.from_pretrained(path, device=args.device, dtype=torch_dtype(args.dtype))
    print(model.summary())
    bad = nonfinite_tensors(model.named_parameters())
    if bad:
        print(
            f"FAILED: non-finite weights (NaN or inf) in {len(bad)} tensors: {', '.join(bad[:8])}"
            f"{'...' if len(bad) > 8 else ''}"
        )
        return 1
    ref_path = Path(path) / "reference_logits.pt"
    if not ref_path.is_file():
        tokens = torch.arange(min(8, model.cfg.n_ctx), device=model.device)[None] % model.cfg.d_vocab
        with torch.no_grad():
            finite = bool(torch.isfinite(model(tokens)).all())
        print(
            f"no reference logits shipped with {path}: checked only that the logits are finite -> "
            f"{'OK' if finite else 'FAILED (NaN or inf logits)'} ({PARITY_MODEL} ships the public mHC code's "
            f"logits: mhc-interp check --model {PARITY_MODEL})"
        )
        return 0 if finite else 1
    try:
        ref = torch.load(ref_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a crafted or damaged file: refuse, never execute it
        raise CheckpointError(
            f"{ref_path}: not a loadable reference-logits file ({type(e).__name__})"
        ) from None
    if not isinstance(ref, dict) or not {"tokens", "logits"} <= set(ref):
        raise CheckpointError(f"{ref_path}: expected {{'tokens': ..., 'logits': ...}}")
    with torch.no_grad():
        logits = model(ref["tokens"].to(model.device)).float().cpu()
    err = (logits - ref["logits"]).abs().max().item()
    ok = err <= args.tol
    print(
        f"logits check vs {ref.get('source', ref_path)}: tokens {tuple(ref['tokens'].shape)}, "
        f"max |diff| = {err:.2e} (tolerance {args.tol:.0e}) -> {'OK' if ok else 'MISMATCH'}"
    )
    return 0 if ok else 1


def cmd_hooks(args) -> int:
    from .hooks.names import hook_table, hook_table_markdown

    model = load(args.model, args.device, args.dtype)
    if args.markdown:
        print(hook_table_markdown(model))
    else:
        for name, shape, desc in hook_table(model):
            print(f"{name:40s} {shape:42s} {desc}")
    return 0


def _report_config(args):
    from .report import ReportConfig

    cfg = ReportConfig(progress=not args.quiet)
    if args.fast:
        cfg = cfg.fast()
    if args.max_tokens is not None:  # an explicit --max-tokens wins over --fast's
        cfg.max_tokens = args.max_tokens
    cfg.sae = getattr(args, "sae", None)
    cfg.heads_per_layer = getattr(args, "heads_per_layer", None)
    cfg.causal_sublayers = getattr(args, "causal_sublayers", None)
    if getattr(args, "lens_token_fraction", None) is not None:
        cfg.lens_token_fraction = args.lens_token_fraction
    return cfg


def corpus_paths(args) -> List[Path]:
    """--corpus FILES, or the shipped corpus when the flag is absent (an empty --corpus is an error)."""
    if args.corpus is None:
        return default_corpus()
    if not args.corpus:
        raise ValueError(
            "--corpus was given no files: name text files or folders, or leave the flag out "
            "for the shipped corpus"
        )
    return [Path(c) for c in args.corpus]


def cmd_report(args) -> int:
    from .output_folder import check
    from .report import build_report, figure_pool

    check(Path(args.out).expanduser().resolve(), args.force)  # refused before any work
    cfg = _report_config(args)
    figures = figure_pool(cfg)
    figures.start()  # its worker's imports run while this process loads the model
    try:
        model = load(args.model, args.device, args.dtype)
    except BaseException:
        figures.close()
        raise
    index = build_report(
        model,
        Path(args.out),
        corpus_paths(args),
        cfg,
        model_name=str(args.model or "demo model"),
        force=args.force,
        figures=figures,
    )
    print(f"report written to {index}")
    return 0


def cmd_probe(args) -> int:
    from .data import read_texts
    from .interop import sae_features  # noqa: F401 - registers sae_features (SAELens is imported only to load an SAE)
    from .probes import PROBES, run_probes
    from .token_windows import corpus_tokens, patching_prompts

    if args.list or not args.name:
        print("probes: " + ", ".join(sorted(PROBES)))
        return 0
    if args.name not in PROBES:
        raise SystemExit(
            f"mhc-interp: unknown probe {args.name!r}; valid probes: {', '.join(sorted(PROBES))}"
        )
    model = load(args.model, args.device, args.dtype)
    cfg = _report_config(args)
    tokens = corpus_tokens(model, read_texts(corpus_paths(args)), cfg)
    if args.name == "sae_features" and not args.sae:
        raise SystemExit(
            "mhc-interp: probe sae_features needs --sae FOLDER (an SAE saved in SAELens's format)"
        )
    probe = PROBES[args.name](args.sae) if args.name == "sae_features" else PROBES[args.name]()
    if args.name in ("activation_patching", "attribution_patching"):
        clean, corrupted, _ = patching_prompts(model, tokens, cfg)
        probe.setup(model)
        probe.patch(model, clean.to(model.device), corrupted.to(model.device))
        result = probe.result()
    else:
        result = run_probes(model, probe, tokens, batch_size=cfg.batch_size, progress=not args.quiet)
    out = Path(args.out)
    print(f"saved {result.save(out / result.probe)}")
    try:
        for p in result.save_figures(out / "figures"):
            print(f"figure {p}")
    except NotImplementedError:
        pass
    return 0


TRAIN_OUTPUTS = ("config.json", "model.safetensors", "train_log.json")


def check_train_out(out: Path, force: bool) -> None:
    """Refuse to train into a folder that already holds a model (it would be overwritten)."""
    from .loading import TOKENIZER_FILES

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is a file")
    taken = [n for n in (*TRAIN_OUTPUTS, *TOKENIZER_FILES) if (out / n).exists()]
    if taken and not force:
        raise ValueError(
            f"--out {out} already holds {', '.join(taken)}: training would overwrite them; "
            f"choose a new folder or pass --force"
        )


def cmd_train(args) -> int:
    import torch

    from .config import MHCConfig, mixer_class
    from .data import encode_texts, read_texts, split_stream, train_bpe_tokenizer
    from .model import HookedMHC
    from .train import TrainConfig, train

    check_train_out(Path(args.out), args.force)
    texts = read_texts(args.texts)
    tokenizer = train_bpe_tokenizer(texts, vocab_size=args.vocab)
    train_ids, val_ids = split_stream(encode_texts(tokenizer, texts), args.val_fraction)
    torch.manual_seed(args.seed)
    cfg = MHCConfig(
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        d_model=args.d_model,
        n_ctx=args.seq_len + 1,
        d_vocab=len(tokenizer),
        n_streams=mixer_class(args.hyper_conn_type).n_streams_required or args.n_streams,
        hyper_conn_type=args.hyper_conn_type,
        lss_init=args.lss_init,
    )
    model = HookedMHC(cfg, tokenizer=tokenizer)
    history = train(
        model,
        train_ids,
        val_ids,
        TrainConfig(
            max_steps=args.steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            lr=args.lr,
            seed=args.seed,
            device=args.device,
        ),
        out_dir=args.out,
    )
    print(f"saved {args.out}; final validation loss {history['val_loss'][-1]:.3f}")
    return 0


def _model_options(p, default_model="the shipped demo model") -> None:
    """--model, --device, --dtype: which model to load and how."""
    p.add_argument("--model", default=None, help=f"hub id, folder or .pt (default: {default_model})")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16", "float64", "auto"],
        help="the model's dtype; auto = the checkpoint's own (default float32)",
    )


def _corpus_options(p) -> None:
    """--corpus, --max-tokens, --fast, --quiet: the text the probes run on."""
    p.add_argument(
        "--corpus",
        nargs="*",
        default=None,
        help="UTF-8 text files or folders of *.txt (default: shipped Hamlet excerpt)",
    )
    p.add_argument(
        "--max-tokens",
        type=positive_int,
        default=None,
        help="tokens to run the probes on (default 16384; --fast 1024)",
    )
    p.add_argument("--fast", action="store_true", help="a small run (tests, smoke checks)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_report_parser(sub) -> None:
    """The `report` subcommand: every probe into a report folder."""
    report = sub.add_parser("report", help="run every probe and write a report folder")
    _model_options(report)
    _corpus_options(report)
    report.add_argument("--out", default="mhc-report")
    report.add_argument(
        "--sae",
        default=None,
        help="an SAE folder in SAELens's format: adds where its features "
        "fire, per sublayer and stream (needs the saelens extra)",
    )
    report.add_argument(
        "--force",
        action="store_true",
        help="write into --out even if it holds other files "
        "(files with the report's names are overwritten, the others stay)",
    )
    report.add_argument(
        "--heads-per-layer",
        type=positive_int,
        default=None,
        metavar="K",
        help="the head detector ablates K evenly spaced heads per layer (default: all; for big models)",
    )
    report.add_argument(
        "--causal-sublayers",
        type=positive_int,
        default=None,
        metavar="K",
        help="the rescue and patching sweeps cover K evenly spaced sublayers (default: all)",
    )
    report.add_argument(
        "--lens-token-fraction",
        type=_fraction,
        default=None,
        metavar="F",
        help="the logit lens scores a seeded sample of this share of the corpus tokens, with standard "
        "errors (default 0.25; 1: every token)",
    )


def _add_train_parser(sub) -> None:
    """The `train` subcommand: a small mHC model from text files."""
    train = sub.add_parser("train", help="train a small mHC model on text files")
    train.add_argument("--texts", nargs="+", required=True)
    train.add_argument("--out", required=True)
    train.add_argument("--force", action="store_true", help="overwrite a model already in --out")
    for flag, kind, default in (
        ("--steps", positive_int, 1000),
        ("--hyper-conn-type", str, "mhc"),
        ("--n-streams", positive_int, 4),
        ("--lss-init", float, None),
        ("--n-layers", positive_int, 4),
        ("--n-heads", positive_int, 4),
        ("--d-model", positive_int, 128),
        ("--seq-len", positive_int, 128),
        ("--batch-size", positive_int, 32),
        ("--vocab", positive_int, 2048),
        ("--lr", float, 3e-3),
        ("--val-fraction", float, 0.05),
        ("--seed", int, 0),
    ):
        train.add_argument(flag, type=kind, default=default)
    train.add_argument("--device", default="cpu")


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser: one subcommand per `cmd_*`."""
    parser = argparse.ArgumentParser(
        prog="mhc-interp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"mhc-interp {__version__}")
    sub = parser.add_subparsers(dest="command")

    _add_report_parser(sub)
    probe = sub.add_parser("probe", help="run one probe")
    probe.add_argument("name", nargs="?")
    probe.add_argument("--list", action="store_true")
    _model_options(probe)
    _corpus_options(probe)
    probe.add_argument("--out", default="mhc-probe")
    probe.add_argument("--sae", default=None, help="an SAE folder in SAELens's format (for sae_features)")
    _add_train_parser(sub)
    check = sub.add_parser("check", help="summary + logits check against shipped reference logits")
    _model_options(check)
    check.add_argument("--tol", type=float, default=1e-4)
    hooks = sub.add_parser("hooks", help="list hook points and shapes")
    _model_options(hooks)
    hooks.add_argument("--markdown", action="store_true")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["report", *argv]
    args = build_parser().parse_args(argv)
    configure_command_process()  # before any command imports torch
    commands = {
        "check": cmd_check,
        "hooks": cmd_hooks,
        "report": cmd_report,
        "probe": cmd_probe,
        "train": cmd_train,
    }
    from .config import ConfigError
    from .loading import CheckpointError
    from .output_folder import OutputFolderError

    check_device(args.device)
    with interrupts_as_keyboard_interrupt():
        try:
            return commands[args.command](args)
        # Ctrl-C or SIGTERM (partial output is removed on the way out), or bad input
        except (
            KeyboardInterrupt,
            CheckpointError,
            ConfigError,
            OutputFolderError,
            FileNotFoundError,
            FloatingPointError,
            ValueError,
        ) as e:
            if os.environ.get("MHC_INTERP_TRACEBACK"):
                raise
            if isinstance(e, KeyboardInterrupt):
                print("mhc-interp: interrupted", file=sys.stderr)
                return 130
            raise SystemExit(f"mhc-interp: {e}\n(MHC_INTERP_TRACEBACK=1 shows where it came from)") from None


def _fraction(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


@contextlib.contextmanager
def interrupts_as_keyboard_interrupt():
    """SIGTERM handled like Ctrl-C (KeyboardInterrupt), so `finally` blocks clean up; the previous
    handler comes back afterwards. Only in the main thread (where signal handlers can be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run() -> None:
    """The console script: `main()`, then the exit without the interpreter's teardown of torch
    (~0.5 s of module and object finalisation, a thirtieth of the main job), once every file is
    written and closed and the standard streams and logging are flushed. Errors (SystemExit with a
    message) leave through the normal exit."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    run()
