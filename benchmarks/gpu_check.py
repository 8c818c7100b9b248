"""GPU correctness at a benchmark shape (random weights): what CPU tests cannot show.

    python -m benchmarks.gpu_check --shape mhc-780m --device cuda --dtype bfloat16

Checks, printing each with its numbers and exiting non-zero if one fails:
  - the eager forward is finite and H_res of every sublayer is column-stochastic (float32
    coefficients even in a bf16 model);
  - `HookedMHC.compile()` agrees with eager (logits, and the cached streams / coefficients);
  - a hook attached after compiling fires inside a sublayer and changes the output as on eager;
  - the batched rescue sweep on two sublayers agrees compiled vs eager;
and counts the host-device synchronisations of that sweep (torch.cuda.set_sync_debug_mode).
Accuracy is judged against a float32 copy of the model: the compiled model in --dtype must be no
less accurate than the eager one (within 1.5x); the sweeps' KLs agree within 5% (+1e-3).
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from mhc_interp import HookedMHC
from mhc_interp.model.sublayer import BOUNDARY_HOOKS
from mhc_interp.probes import ablate_and_rescue

from .common import DTYPES, add_common_args, make_config, prepare, random_tokens

failures = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if not ok:
        failures.append(name)


def main(argv=None) -> int:
    args = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0])).parse_args(argv)
    device = prepare(args)
    batch, seq = min(args.batch, 4), min(args.seq, 512)
    # every parameter perturbed, so the mixers are far from their identity-like init; a float32
    # copy is the reference both the eager and the compiled model (in --dtype) are measured against
    reference = HookedMHC(make_config(args.shape)).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model = copy.deepcopy(reference).to(device, DTYPES[args.dtype])
    reference = reference.to(device)
    tokens = random_tokens(model, batch, seq)
    print(model.summary(), f"| {batch} x {seq} tokens")
    boundary = lambda n: n.endswith(BOUNDARY_HOOKS)  # streams in/out, H_pre/H_post/H_res  # noqa: E731
    hook = [("blocks.1.attn.hook_z", lambda z, hook: torch.zeros_like(z))]

    def rel_err(got, ref):  # max |got - ref| relative to the mean |ref|
        return ((got.float() - ref.float()).abs().max() / (ref.float().abs().mean() + 1e-6)).item()

    def no_worse(name, eager_err, fast_err):  # compiled no less accurate than eager (vs float32)
        check(
            name,
            fast_err <= 1.5 * eager_err + 1e-4,
            f"relative error vs float32: compiled {fast_err:.2e}, eager {eager_err:.2e}",
        )

    with torch.inference_mode():
        ref_logits, ref_cache = reference.run_with_cache(tokens, names_filter=boundary)
        ref_hooked = reference.run_with_hooks(tokens, fwd_hooks=hook)
        eager, cache = model.run_with_cache(tokens, names_filter=boundary)
        eager_hooked = model.run_with_hooks(tokens, fwd_hooks=hook)
        check(
            "eager forward finite",
            bool(torch.isfinite(eager).all()),
            f"relative error vs float32 {rel_err(eager, ref_logits):.2e}",
        )
        col_err = max((cache[f"{s}.hook_h_res"].sum(-2) - 1).abs().max().item() for s in model.sublayer_names)
        dtypes = {cache[f"{s}.hook_h_res"].dtype for s in model.sublayer_names}
        check(
            "H_res columns sum to 1",
            col_err < 1e-4 and dtypes == {torch.float32},
            f"max error {col_err:.2e}, {dtypes}",
        )

        model.compile()
        fast, fast_cache = model.run_with_cache(tokens, names_filter=boundary)
        fast_hooked = model.run_with_hooks(tokens, fwd_hooks=hook)  # attached after compiling
        no_worse("compiled logits", rel_err(eager, ref_logits), rel_err(fast, ref_logits))
        no_worse(
            "compiled boundary caches",
            max(rel_err(cache[k], ref_cache[k]) for k in ref_cache),
            max(rel_err(fast_cache[k], ref_cache[k]) for k in ref_cache),
        )
        no_worse(
            "hook inside a compiled sublayer",
            rel_err(eager_hooked, ref_hooked),
            rel_err(fast_hooked, ref_hooked),
        )
        check(
            "the hook changed the output",
            rel_err(fast_hooked, fast) > 10 * rel_err(fast_hooked, ref_hooked),
            f"relative effect {rel_err(fast_hooked, fast):.2e}",
        )

    subs = [0, model.cfg.n_sublayers - 1]
    fast_r = ablate_and_rescue(model, tokens, sublayers=subs, batch_size=batch)
    model.compile(False)
    eager_r = ablate_and_rescue(model, tokens, sublayers=subs, batch_size=batch)
    for key in ("kl_ablated", "kl_rescued"):
        a, b = torch.as_tensor(fast_r[key]), torch.as_tensor(eager_r[key])
        ok = torch.allclose(a, b, rtol=0.05, atol=1e-3, equal_nan=True)
        check(
            f"rescue {key} compiled == eager",
            ok,
            f"max |diff| {(a - b).nan_to_num().abs().max().item():.3e}, "
            f"max value {b.nan_to_num().abs().max().item():.3e}",
        )
    if device.type == "cuda":  # informational: host-device syncs inside one batched sweep
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                ablate_and_rescue(model, tokens, sublayers=subs, batch_size=batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
        print(
            f"INFO  host-device syncs in a 2-sublayer rescue sweep: {len(syncs)}"
            + (f" (first: {syncs[0]})" if syncs else "")
        )
    print("all passed" if not failures else f"FAILED: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
