"""`mhc-interp report`: run every probe on a model over a corpus and write a report folder:
figures (PNG), results (JSON + NPZ), and an offline `index.html` that shows them with one-line
explanations.

The folder is built under a temporary name and renamed into place only when complete, so an
interrupted run never leaves a half-written report that a re-run (or a reader) would trust.
"""
from __future__ import annotations

import html
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from . import output_folder
from .data import read_texts
from .timing import PhaseTimer
from .probes import (CKA, AblateRescue, ActivationPatching, CrossStreamPredictability, Curvature,
                     HeadDetector, LogitLens, ProbeResult, StreamUsage, SymmetricReplacement, run_probes)

CAPTIONS: Dict[str, str] = {
    "h_res": "Token-averaged residual mixer H_res [target, source] at evenly spaced sublayers: "
             "near-identity means streams are kept apart; off-diagonal mass means they are mixed.",
    "shares": "Read share (H_pre), norm-weighted read share and write share (H_post) per stream: "
              "a stream with most of the share dominates what the sublayers read or write.",
    "stream_norms": "Mean L2 norm of each stream entering every sublayer (log scale).",
    "h_post": "H_post Frobenius norm and its variance across tokens and across streams per sublayer.",
    "cka_intra": "Debiased linear CKA between the streams of one sublayer: 1 = same representation "
                 "up to rotation and scale, 0 = unrelated.",
    "cka_inter": "Debiased CKA between every (sublayer, stream) representation.",
    "curvature": "Token-trajectory curvature per stream and for the stream sum (degrees; 90 = random "
                 "walk, 120 = i.i.d. points, lower = straighter trajectories).",
    "rescue_global": "Global rescue % (rows: ablated stream, columns: recovered stream), one-shot zero "
                     "ablation with frozen mixing, as in Table 1 of 'Ablate and Rescue'.",
    "rescue_layers": "Rescue % per sublayer.",
    "rescue_difference": "Per-sublayer rescue difference R(i|ij) - R(j|ij) for every pair: far from 0 "
                         "= one stream of the pair carries what matters.",
    "kl_ablated": "Damage KL(P_clean || P_ablated) of every pair ablation per sublayer.",
    "patching_recomputed": "Activation patching (denoising) per sublayer and stream: KL to the clean "
                           "distribution after restoring one clean stream into the corrupted run, mixing recomputed.",
    "patching_frozen": "The same with the mixing frozen to the corrupted run (content effect).",
    "patching_routing": "Recomputed minus frozen: the part of the effect mediated by the mixers.",
    "logit_lens/kl": "Logit lens: KL from the final distribution to the prediction read off each site "
                     "through the final LayerNorm and unembedding, for the stream sum and each stream alone.",
    "logit_lens/top1": "Logit lens: how often each view's top-1 token agrees with the final prediction.",
    "logit_lens/writes": "Each sublayer's branch output (what it writes) read through the final LayerNorm and "
                         "unembedding: KL to the final distribution and top-1 agreement.",
    "logit_lens/final_decomposition": "The final logits split exactly into per-stream contributions.",
    "head_detector/scores": "Attention-head scores per (layer, head): previous-token, duplicate-token, "
                            "induction, successor and copy-suppression.",
    "head_detector/layer_distribution": "Where the best heads of each kind sit.",
    "head_detector/read_write": "Which streams each layer's attention reads (H_pre) and writes (H_post).",
    "predictability/matrices": "Held-out ridge R^2 of stream j (columns) predicted linearly from stream i "
                               "(rows), per layer: a complement to CKA that is sensitive to scale.",
    "predictability/trend": "Mean off-diagonal cross-stream R^2 over depth.",
}


@dataclass
class ReportConfig:
    max_tokens: int = 16384
    seq_len: int = 128
    batch_size: int = 8
    causal_prompts: int = 8
    causal_seq_len: int = 64
    cka_minibatch: int = 256
    predictability_tokens: int = 2048
    progress: bool = True
    skip: Sequence[str] = field(default_factory=tuple)


def corpus_tokens(model, texts: Sequence[str], cfg: ReportConfig) -> Tensor:
    """[n_seq, seq_len] windows of the tokenized corpus, up to max_tokens; random token ids when
    the model has no tokenizer (said in the report)."""
    seq_len = min(cfg.seq_len, model.cfg.n_ctx)
    n_seq = max(1, cfg.max_tokens // seq_len)
    if model.tokenizer is None:
        return torch.randint(0, model.cfg.d_vocab, (n_seq, seq_len), generator=torch.Generator().manual_seed(0))
    ids: List[int] = []
    for t in texts:
        ids += model.tokenizer.encode(t)
        if len(ids) >= n_seq * seq_len:
            break
    n_full = len(ids) // seq_len
    if n_full < 2:
        raise ValueError(f"the corpus has {len(ids)} tokens: too short for windows of {seq_len} tokens")
    return torch.tensor(ids[: min(n_seq, n_full) * seq_len]).view(-1, seq_len)


def patching_prompts(model, tokens: Tensor, cfg: ReportConfig):
    """(clean, corrupted) prompts for activation patching: corpus windows in which a noun, verb or
    adjective of the default word lists can be swapped (symmetric token replacement); without a
    tokenizer, one mid-sequence token is replaced by the next token id."""
    windows = tokens[:, : cfg.causal_seq_len]
    if model.tokenizer is not None:
        try:
            corrupt = SymmetricReplacement(model.tokenizer)
        except ValueError:   # the tokenizer splits the listed words: fall back below
            corrupt = SymmetricReplacement(groups={"none": [-1, -2]})
        keep = [i for i, row in enumerate(windows.tolist()) if any(t in corrupt.successor for t in row[1:])]
        if keep:
            clean = windows[keep[: cfg.causal_prompts]]
            return clean, corrupt(clean), "symmetric token replacement (default word lists)"
    clean = windows[: cfg.causal_prompts]
    corrupted = clean.clone()
    mid = clean.shape[1] // 2
    corrupted[:, mid] = (corrupted[:, mid] + 1) % model.cfg.d_vocab
    return clean, corrupted, f"token {mid} replaced by the next token id (no tokenizer / no listed word)"


def _result_path(folder: Path, result: ProbeResult) -> Path:
    return result.save(folder / "results" / result.probe)


def build_report(model, out: Path, corpus: Optional[Sequence[Path]] = None,
                 cfg: Optional[ReportConfig] = None, model_name: str = "", force: bool = False) -> Path:
    """Run the probes and write the report folder `out`; returns its index.

    `out` is built under a hidden partial folder and put in place when complete
    (`output_folder.commit`). A folder that holds anything but an earlier, unchanged report is
    refused before any work unless `force`; even then only the report's own files are replaced."""
    cfg = cfg or ReportConfig()
    timer = PhaseTimer()
    out = Path(out).expanduser().resolve()
    output_folder.check(out, force)
    with timer("corpus: read and tokenize"):
        texts = read_texts(corpus) if corpus else []
        tokens = corpus_tokens(model, texts, cfg)
    tmp = output_folder.staging_folder(out)
    try:
        sections = _run_all(model, tokens, tmp, cfg, timer)
        notes = [f"model: {model_name} - {model.summary()}",
                 f"corpus: {_corpus_note(model, corpus)}; "
                 f"{tokens.numel():,} tokens in {tokens.shape[0]} windows of {tokens.shape[1]}",
                 f"written {time.strftime('%Y-%m-%d %H:%M:%S')}"]
        with timer("page (index.html, report.json)"):
            timings = [{"phase": p, "seconds": round(sec, 3), "share": round(f, 4)} for p, sec, f in timer.rows()]
            (tmp / "index.html").write_text(render_html(sections, notes, timings))
            (tmp / "report.json").write_text(json.dumps({"notes": notes, "sections": sections, "timings": timings},
                                                        indent=1))
        output_folder.check(out, force)   # again: files may have appeared while the probes ran
        output_folder.commit(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out / "index.html"


def _corpus_note(model, corpus: Optional[Sequence[Path]]) -> str:
    if model.tokenizer is None:
        unused = f" ({', '.join(str(c) for c in corpus)} unused)" if corpus else ""
        return f"random token ids: the model has no tokenizer{unused}"
    return ", ".join(str(c) for c in corpus) if corpus else "random token ids"


def _figures(result: ProbeResult, folder: Path) -> List[Dict[str, str]]:
    """Save the result's figures under figures/<probe>/ (figure names are only unique per probe)."""
    paths = result.save_figures(folder / "figures" / result.probe)
    return [{"src": f"figures/{result.probe}/{p.name}", "name": p.stem,
             "caption": CAPTIONS.get(f"{result.probe}/{p.stem}", CAPTIONS.get(p.stem, ""))} for p in paths]


def _section(result: ProbeResult, folder: Path, timer: PhaseTimer, title: str, **extra) -> Dict:
    """Save the result and its figures (each timed) -> the page section that shows them."""
    with timer(f"{result.probe}: save results"):
        _result_path(folder, result)
    with timer(f"{result.probe}: figures"):
        figures = _figures(result, folder)
    return {"title": title, "figures": figures, "tables": [], **extra}


def _run_all(model, tokens: Tensor, folder: Path, cfg: ReportConfig, timer: PhaseTimer) -> List[Dict]:
    sections: List[Dict] = []
    multi = model.cfg.n_streams > 1
    observational = [Curvature(), LogitLens()]
    if multi:
        observational = [StreamUsage(), CKA(minibatch_tokens=cfg.cka_minibatch),
                         CrossStreamPredictability(max_tokens=cfg.predictability_tokens)] + observational
    results = run_probes(model, [p for p in observational if p.name not in cfg.skip], tokens,
                         batch_size=cfg.batch_size, progress=cfg.progress, timer=timer)
    for name, result in results.items():
        section = _section(result, folder, timer, name.replace("_", " "))
        if name == "stream_usage":
            with timer("stream_usage: figures"):
                section["layer_figures"] = _per_sublayer_h_res(result, folder)
        if name == "cka":
            section["tables"].append(_matrix_table("CKA between streams, last sublayer", result.intra(-1)))
        sections.append(section)
    if "head_detector" not in cfg.skip:
        # per-head ablations (copy suppression) cost a forward per head: a smaller token budget
        heads = run_probes(model, HeadDetector(), tokens[: 2 * cfg.causal_prompts, : cfg.causal_seq_len],
                           batch_size=cfg.causal_prompts, progress=cfg.progress, timer=timer)
        sections.append(_section(heads, folder, timer, "attention heads"))
    if multi and "ablate_rescue" not in cfg.skip:
        rescue = run_probes(model, AblateRescue(), tokens[: cfg.causal_prompts, : cfg.causal_seq_len],
                            batch_size=cfg.causal_prompts, progress=cfg.progress, timer=timer)
        sections.append(_section(rescue, folder, timer, "ablation and rescue", tables=[
            _matrix_table("global rescue % (rows: ablated, columns: recovered)", 100 * rescue["global_rescue"],
                          diagonal="-")]))
    if "activation_patching" not in cfg.skip:
        clean, corrupted, how = patching_prompts(model, tokens, cfg)
        probe = ActivationPatching(mixing="both" if multi else "recomputed")
        with timer("activation_patching: interventions"):
            probe.setup(model)
            probe.patch(model, clean.to(model.device), corrupted.to(model.device))
        with timer("activation_patching: result"):
            patching = probe.result()
        sections.append(_section(patching, folder, timer, "activation patching", note=f"corruption: {how}"))
    return sections


def _per_sublayer_h_res(result: ProbeResult, folder: Path) -> List[Dict[str, str]]:
    """One small H_res heatmap per sublayer, for the page's layer selector."""
    import matplotlib.pyplot as plt

    figs = []
    for k, name in enumerate(result.meta["sublayers"]):
        fig, ax = plt.subplots(figsize=(3, 2.6))
        m = result["mean_h_res"][k]
        ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.5 else "black")
        ax.set_title(f"{name}: mean H_res", fontsize=8)
        ax.set_xlabel("source")
        ax.set_ylabel("target")
        path = folder / "figures" / "layers" / f"h_res_{k:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        figs.append({"src": f"figures/layers/{path.name}", "label": name})
    return figs


def _matrix_table(title: str, m: np.ndarray, diagonal: Optional[str] = None) -> Dict:
    rows = [[diagonal if (diagonal is not None and i == j) else ("n/a" if np.isnan(v) else f"{v:.2f}")
             for j, v in enumerate(row)] for i, row in enumerate(np.asarray(m))]
    return {"title": title, "header": [str(j) for j in range(len(rows))], "rows": rows}


def render_html(sections: List[Dict], notes: List[str], timings: Sequence[Dict] = ()) -> str:
    """A self-contained page (no external resources): figures with captions, tables, a layer
    selector for per-sublayer figures, and a footer table of where the run's time went."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>mhc-interp report</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
             "figure{margin:1em 0}img{max-width:100%}figcaption{color:#444;font-size:0.9em}"
             "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #bbb;padding:2px 8px;"
             "text-align:right}</style></head><body><h1>mhc-interp report</h1><ul>"]
    esc = html.escape   # every string that reaches the page: names of files, models and hooks included
    parts += [f"<li>{esc(n)}</li>" for n in notes]
    parts.append("</ul>")
    for s_i, sec in enumerate(sections):
        parts.append(f"<h2>{esc(sec['title'])}</h2>")
        if sec.get("note"):
            parts.append(f"<p>{esc(sec['note'])}</p>")
        for fig in sec["figures"]:
            parts.append(f"<figure><img src='{esc(fig['src'])}' alt='{esc(fig['name'])}'>"
                         f"<figcaption>{esc(fig['caption'])}</figcaption></figure>")
        if sec.get("layer_figures"):
            opts = "".join(f"<option value='{esc(f['src'])}'>{esc(f['label'])}</option>" for f in sec["layer_figures"])
            first = esc(sec["layer_figures"][0]["src"])
            parts.append(f"<p>Per sublayer: <select id='layer-select-{s_i}' onchange=\"document.getElementById("
                         f"'layer-img-{s_i}').src=this.value\">{opts}</select></p>"
                         f"<figure><img id='layer-img-{s_i}' src='{first}' alt='per-sublayer figure'></figure>")
        for table in sec["tables"]:
            parts.append(f"<table><caption>{esc(table['title'])}</caption><tr><th></th>"
                         + "".join(f"<th>{esc(h)}</th>" for h in table["header"]) + "</tr>")
            for i, row in enumerate(table["rows"]):
                parts.append(f"<tr><th>{i}</th>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
            parts.append("</table>")
    if timings:
        parts.append("<footer><h2 id='timings'>Where the time went</h2><table><caption>wall time per phase "
                     "(the page itself is written after this table)</caption><tr><th>phase</th><th>seconds</th>"
                     "<th>share</th></tr>")
        parts += [f"<tr><td style='text-align:left'>{esc(t['phase'])}</td><td>{t['seconds']:.2f}</td>"
                  f"<td>{100 * t['share']:.1f}%</td></tr>" for t in timings]
        parts.append("</table></footer>")
    parts.append("</body></html>")
    return "\n".join(parts)
