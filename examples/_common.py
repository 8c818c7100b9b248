"""What the paper-figure scripts in `examples/` share: the command line, loading the model and
the corpus, token budgets (`--fast`), saving figures and results, and the value `main` returns.

Every script is

    python examples/NAME.py [--model NAME_OR_PATH] [--out DIR] [--fast] [--device cpu]
                            [--dtype float32] [--max-tokens N] [--corpus FILE ...] [--quiet]

and its `main(argv)` returns an `Output` (figures with captions, probe results, a summary line),
which `make_gallery.py` and the tests read. The default model is the shipped demo model
(`mhc_interp.shipped.default_model_path()`: the tiny parity checkpoint while no demo model is shipped);
`--model wgpeng/mhc-780m --device cuda --dtype bfloat16` runs the papers' model.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # the scripts only write files

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mhc_interp.data import read_texts  # noqa: E402
from mhc_interp.probes import ProbeResult  # noqa: E402
from mhc_interp.shipped import default_corpus, default_model_path, load  # noqa: E402
from mhc_interp.token_windows import TokenBudget, corpus_tokens, patching_prompts  # noqa: E402


@dataclass
class Output:
    """What a script's `main` returns (and `make_gallery.py` collects)."""

    name: str  # script name, e.g. "h_res_matrices"
    summary: str  # the one-line summary it printed
    text: str = ""  # the summary without script name, model and timing
    figures: Dict[str, str] = field(default_factory=dict)  # PNG path -> caption
    results: Dict[str, ProbeResult] = field(default_factory=dict)
    files: List[str] = field(default_factory=list)  # other files written (tables)
    extra: Dict = field(default_factory=dict)  # script-specific numbers


class Example:
    """One script run: parsed arguments, the loaded model, the output folder, the token budget."""

    def __init__(
        self,
        name: str,
        doc: str,
        argv: Optional[Sequence[str]] = None,
        causal: bool = False,
        add_arguments=None,
    ):
        self.name = name
        parser = argparse.ArgumentParser(
            prog=f"{name}.py", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        parser.add_argument(
            "--model",
            default=None,
            help="hub id (e.g. wgpeng/mhc-780m), folder or .pt "
            f"(default: the shipped demo model, now {default_model_path().name})",
        )
        parser.add_argument("--out", default=None, help=f"output folder (default: out/{name})")
        parser.add_argument("--fast", action="store_true", help="tiny token budgets: a few seconds")
        parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
        parser.add_argument(
            "--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"]
        )
        parser.add_argument(
            "--max-tokens",
            type=int,
            default=None,
            help="corpus tokens for the observational probes (default 16384; --fast 1024)",
        )
        parser.add_argument(
            "--corpus",
            nargs="*",
            default=None,
            help="text files (default: the shipped Hamlet excerpt; random token ids "
            "if the model has no tokenizer)",
        )
        parser.add_argument("--quiet", action="store_true", help="no progress bars")
        if causal:
            parser.add_argument(
                "--prompts",
                type=int,
                default=None,
                help="prompts for the interventions (default 8; --fast 4)",
            )
            parser.add_argument(
                "--prompt-len", type=int, default=None, help="tokens per prompt (default 64; --fast 32)"
            )
        if add_arguments is not None:
            add_arguments(parser)
        self.args = args = parser.parse_args(list(argv) if argv is not None else None)
        self.out = Path(args.out or Path("out") / name)
        self.cfg = TokenBudget(progress=not args.quiet)
        if args.fast:  # a smoke run of a few seconds on the tiny models (tests, gallery previews)
            self.cfg = self.cfg.fast(cka_minibatch=128)
        if args.max_tokens is not None:
            self.cfg.max_tokens = args.max_tokens
        if causal:
            if args.prompts is not None:
                self.cfg.causal_prompts = args.prompts
            if args.prompt_len is not None:
                self.cfg.causal_seq_len = args.prompt_len
                self.cfg.seq_len = max(self.cfg.seq_len, args.prompt_len)  # windows long enough to cut from
        self.t0 = time.perf_counter()
        self.model = load(args.model, args.device, args.dtype)
        self.model.eval()
        self.out.mkdir(parents=True, exist_ok=True)
        self.model_name = str(args.model or f"demo model ({default_model_path().name})")
        self.output = Output(name=name, summary="")
        self._tokens = None

    # ------------------------------------------------------------------------------ data
    @property
    def n_streams(self) -> int:
        return self.model.cfg.n_streams

    def require_streams(self) -> None:
        if self.n_streams < 2:
            raise SystemExit(
                f"{self.name}: the model has {self.n_streams} stream; this figure compares streams"
            )

    def tokens(self) -> torch.Tensor:
        """[n_seq, seq_len] corpus windows (random ids if the model has no tokenizer), up to the budget."""
        if self._tokens is None:
            paths = [Path(c) for c in self.args.corpus] if self.args.corpus else default_corpus()
            texts = read_texts(paths) if (paths and self.model.tokenizer is not None) else []
            self._tokens = corpus_tokens(self.model, texts, self.cfg)
        return self._tokens

    @property
    def corpus_note(self) -> str:
        t = self.tokens()
        names = ", ".join(Path(c).name for c in (self.args.corpus or default_corpus()))
        src = "random token ids (no tokenizer)" if self.model.tokenizer is None else names
        return f"{src}, {t.numel():,} tokens"

    def prompts(self) -> torch.Tensor:
        """Prompts for the causal probes: the first `causal_prompts` windows, `causal_seq_len` long."""
        tokens = self.tokens()
        if self.cfg.causal_seq_len > tokens.shape[1]:
            raise SystemExit(
                f"{self.output.name}: --prompt-len {self.cfg.causal_seq_len} is longer than the corpus "
                f"windows ({tokens.shape[1]} tokens: the model's context {self.model.cfg.n_ctx} or the "
                f"window length, whichever is shorter)"
            )
        return tokens[: self.cfg.causal_prompts, : self.cfg.causal_seq_len]

    def patching_prompts(self):
        """(clean, corrupted, how) from the corpus windows: `mhc_interp.token_windows.patching_prompts`."""
        return patching_prompts(self.model, self.tokens(), self.cfg)

    def run(self, probes, source=None):
        """`run_probes` over the corpus windows (or `source`) with this run's batch size."""
        from mhc_interp.probes import run_probes

        return run_probes(
            self.model,
            probes,
            self.tokens() if source is None else source,
            batch_size=self.cfg.batch_size,
            progress=self.cfg.progress,
        )

    # ------------------------------------------------------------------------------ outputs
    def save_result(self, result: ProbeResult, name: Optional[str] = None) -> Path:
        result.meta.setdefault("model", self.model_name)
        path = result.save(self.out / (name or result.probe))
        self.output.results[name or result.probe] = result
        return path

    def save_figure(self, fig, stem: str, caption: str) -> Path:
        import matplotlib.pyplot as plt

        path = self.out / f"{stem}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        self.output.figures[str(path)] = caption
        return path

    def save_text(self, filename: str, text: str) -> Path:
        path = self.out / filename
        path.write_text(text)
        self.output.files.append(str(path))
        return path

    def finish(self, summary: str, **extra) -> Output:
        """Print the one-line summary and return the `Output`."""
        secs = time.perf_counter() - self.t0
        self.output.text = summary
        self.output.summary = f"{self.name}: {summary} [{self.model_name}; {secs:.1f} s; -> {self.out}]"
        self.output.extra.update(extra)
        print(self.output.summary)
        return self.output


# ---------------------------------------------------------------------------------- plotting
def fmt(values, precision: int = 2) -> str:
    """'0.61, 0.57, 0.64' for a summary line."""
    return ", ".join(f"{v:.{precision}f}" for v in np.ravel(values))


def short(sublayer: str) -> str:
    """'blocks.3.mlp' -> '3.mlp'."""
    return sublayer[len("blocks.") :] if sublayer.startswith("blocks.") else sublayer


def site_label(hook: str) -> str:
    """'blocks.3.mlp.hook_streams_out' -> 'block 3' (a block's output), 'blocks.3.attn.hook_streams_out'
    -> '3.attn out', 'hook_streams_init' -> 'embed'; other hooks -> '3.attn.streams_in'."""
    if hook == "hook_streams_init":
        return "embed"
    if hook.startswith("blocks.") and hook.endswith(".mlp.hook_streams_out"):
        return f"block {hook.split('.')[1]}"
    if hook.endswith(".hook_streams_out"):
        return short(hook[: -len(".hook_streams_out")]) + " out"
    return short(hook).replace("hook_", "")


def sublayer_ticks(ax, names: Sequence[str], axis: str = "x", max_labels: int = 24, offset: int = 0) -> None:
    """Label a sublayer axis with '3.attn'-style names, thinned to at most `max_labels`."""
    step = max(1, int(np.ceil(len(names) / max_labels)))
    if step > 1 and any(n.endswith(".attn") for n in names):
        step += step % 2  # whole blocks: every label is a block's attn sublayer
    idx = list(range(0, len(names), step))
    labels = [short(names[i]) for i in idx]
    if axis == "x":
        ax.set_xticks([i + offset for i in idx], labels, rotation=90 if len(idx) > 8 else 0, fontsize=7)
    else:
        ax.set_yticks([i + offset for i in idx], labels, fontsize=7)
