"""`mhc-interp` command line.

    mhc-interp [check] [--model NAME_OR_PATH]   load a model, print its summary, check its logits
    mhc-interp hooks [--model ...] [--markdown] print every hook point with its shape
"""
from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path
from typing import List, Optional

import torch

from .model import HookedMHC

DEFAULT_MODEL = "tiny-mhc-n4"


def default_model_path() -> Path:
    """The embedded default: a tiny 4-stream mHC checkpoint shipped inside the package."""
    return Path(str(resources.files("mhc_interp") / "assets" / DEFAULT_MODEL))


def load(name: Optional[str], device: str, dtype: str) -> HookedMHC:
    path = default_model_path() if name in (None, DEFAULT_MODEL) else name
    return HookedMHC.from_pretrained(path, device=device, dtype=getattr(torch, dtype))


def cmd_check(args) -> int:
    model = load(args.model, args.device, args.dtype)
    print(model.summary())
    ref_path = (default_model_path() if args.model in (None, DEFAULT_MODEL) else Path(args.model)) / "reference_logits.pt"
    if ref_path.is_file():
        ref = torch.load(ref_path, map_location="cpu")
        tokens = ref["tokens"]
        with torch.no_grad():
            logits = model(tokens.to(model.device)).float().cpu()
        err = (logits - ref["logits"]).abs().max().item()
        ok = err <= args.tol
        print(f"logits check vs {ref.get('source', ref_path)}: tokens {tuple(tokens.shape)}, "
              f"max |diff| = {err:.2e} (tolerance {args.tol:.0e}) -> {'OK' if ok else 'MISMATCH'}")
    else:
        tokens = torch.randint(0, model.cfg.d_vocab, (1, min(16, model.cfg.n_ctx)), device=model.device)
        with torch.no_grad():
            logits = model(tokens)
        ok = bool(torch.isfinite(logits).all())
        print(f"no reference logits shipped with this model; forward on random tokens gives finite "
              f"logits {tuple(logits.shape)}: {ok}")
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[:1].to(model.device), names_filter=lambda n: n.endswith("hook_h_res"))
    first, last = cache[model.sublayer_names[0] + ".hook_h_res"], cache[model.sublayer_names[-1] + ".hook_h_res"]
    torch.set_printoptions(precision=3, sci_mode=False)
    print(f"token-averaged H_res [target, source] at {model.sublayer_names[0]}:\n{first[0, 1:].mean(0)}")
    print(f"... and at {model.sublayer_names[-1]}:\n{last[0, 1:].mean(0)}")
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


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mhc-interp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")

    def common(p):
        p.add_argument("--model", default=None, help="hub id, folder or .pt (default: shipped tiny model)")
        p.add_argument("--device", default="cpu")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    check = sub.add_parser("check", help="summary + logits check (the default)")
    common(check)
    check.add_argument("--tol", type=float, default=1e-4)
    hooks = sub.add_parser("hooks", help="list hook points and shapes")
    common(hooks)
    hooks.add_argument("--markdown", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["check", *argv]
    args = parser.parse_args(argv)
    return {"check": cmd_check, "hooks": cmd_hooks}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
