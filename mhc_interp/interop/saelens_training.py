"""Training SAEs on sites with SAELens's own runners: token windows from text files, the
train / eval split, the runner configuration, and single- and multi-site training."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from .saelens_adapter import StreamAdapter, check_site, parse_site, require_saelens, stream_site


# ------------------------------------------------------------------------------------ data sets
def corpus_windows(model, paths: Sequence[Union[str, Path]], context_size: int) -> Tensor:
    """The text files tokenized with the model's tokenizer and cut into consecutive windows of
    `context_size` tokens -> [n_windows, context_size] (each file's short remainder dropped)."""
    from ..data import read_text_file

    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer; build the token windows yourself")
    if not 2 <= context_size <= model.cfg.n_ctx:
        raise ValueError(f"context_size must lie in [2, n_ctx={model.cfg.n_ctx}], got {context_size}")
    rows = []
    for path in paths:
        ids = model.tokenizer.encode(read_text_file(Path(path)))
        rows += [ids[i : i + context_size] for i in range(0, len(ids) - context_size + 1, context_size)]
    if not rows:
        raise ValueError(f"the corpus {[str(p) for p in paths]} holds fewer than {context_size} tokens")
    return torch.tensor(rows, dtype=torch.long)


def token_datasets(windows: Tensor, eval_fraction: float = 0.1):
    """(train, eval) `datasets.Dataset`s with an `input_ids` column (SAELens's pretokenized form):
    the last `eval_fraction` of the windows is held out for evaluation."""
    from datasets import Dataset

    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must lie in (0, 1), got {eval_fraction}")
    n_eval = max(1, int(round(len(windows) * eval_fraction)))
    if len(windows) - n_eval < 1:
        raise ValueError(f"{len(windows)} windows are too few to hold {n_eval} out for evaluation")
    rows = windows.tolist()
    return Dataset.from_dict({"input_ids": rows[:-n_eval]}), Dataset.from_dict({"input_ids": rows[-n_eval:]})


# ------------------------------------------------------------------------------------- training
def _sae_config(sl, d_in: int, d_sae: int, architecture: str, k: int, l1_coefficient: float):
    if architecture == "topk":
        return sl.TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k)
    if architecture == "standard":
        return sl.StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=l1_coefficient)
    raise ValueError(
        f"architecture must be 'topk' or 'standard', got {architecture!r} (other SAELens "
        f"architectures: build the runner config yourself)"
    )


def _runner_fields(
    model,
    *,
    context_size: int = 128,
    training_tokens: int = 200_000,
    train_batch_size_tokens: int = 1024,
    store_batch_size_prompts: int = 16,
    n_batches_in_buffer: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    output_path: Optional[Union[str, Path]] = None,
    device: Optional[str] = None,
    model_name: str = "mhc-interp",
    exclude_first: int = 1,
) -> Dict[str, Any]:
    """The runner-config fields shared by the single- and multi-SAE runners (see `runner_config`)."""
    sl = require_saelens()
    if not isinstance(exclude_first, int) or not 0 <= exclude_first < context_size:
        raise ValueError(
            f"exclude_first must be an int in [0, context_size={context_size}), got {exclude_first!r}"
        )
    positions = context_size - exclude_first
    if n_batches_in_buffer * positions < train_batch_size_tokens:
        # SAELens's mixing buffer holds n_batches_in_buffer * (trained positions per window) tokens
        raise ValueError(
            f"n_batches_in_buffer={n_batches_in_buffer} x {positions} trained positions per "
            f"window < train_batch_size_tokens={train_batch_size_tokens}: raise "
            f"n_batches_in_buffer or lower the batch"
        )
    return dict(
        model_name=model_name,
        model_class_name=type(model).__name__,
        dataset_path="",
        streaming=False,
        context_size=context_size,
        prepend_bos=False,
        seqpos_slice=(exclude_first, None) if exclude_first else (None,),
        exclude_special_tokens=False,
        training_tokens=training_tokens,
        train_batch_size_tokens=train_batch_size_tokens,
        store_batch_size_prompts=store_batch_size_prompts,
        n_batches_in_buffer=n_batches_in_buffer,
        lr=lr,
        seed=seed,
        device=str(model.device) if device is None else device,
        logger=sl.LoggingConfig(log_to_wandb=False),
        checkpoint_path=None,
        n_checkpoints=0,
        output_path=None if output_path is None else str(output_path),
    )


def runner_config(
    model,
    site: str,
    *,
    d_sae: int = 512,
    architecture: str = "topk",
    k: int = 16,
    l1_coefficient: float = 5.0,
    runner_kwargs: Optional[Dict[str, Any]] = None,
    **fields,
):
    """A SAELens `LanguageModelSAERunnerConfig` for an SAE on one site of `model`.

    architecture: "topk" (f = TopK_k(W_enc(x - b_dec) + b_enc): exactly k active features per
    token, so streams are compared at equal L0) or "standard" (f = ReLU(...), loss
    ||x - x_hat||^2 + l1_coefficient * sum_i f_i ||W_dec,i||). fields: context_size (window
    length), training_tokens, train_batch_size_tokens, store_batch_size_prompts,
    n_batches_in_buffer, lr, seed, output_path, device, model_name, exclude_first. Token windows
    are fed as they are (pretokenized, no BOS added); positions < exclude_first (default 1: the
    attention-sink position 0, which the probes leave out too) are not trained on. No wandb, no
    checkpoints; the final SAE is written in SAELens's format to `output_path` when given. Other
    SAELens runner fields: `runner_kwargs`.
    """
    sl = require_saelens()
    hook, stream = check_site(model, site)
    cfg = _runner_fields(model, **fields)
    cfg.update(
        sae=_sae_config(sl, int(model.cfg.d_model), d_sae, architecture, k, l1_coefficient),
        hook_name=stream_site(hook, stream),
        is_dataset_tokenized=True,
        verbose=False,
    )
    cfg.update(runner_kwargs or {})
    return sl.LanguageModelSAERunnerConfig(**cfg)


def sae_folder_name(site: str) -> str:
    """A file-name-safe name for a site: "blocks.2.attn.hook_streams_in[1]" -> "blocks.2.attn.hook_streams_in.s1"."""
    hook, stream = parse_site(site)
    return hook if stream is None else f"{hook}.s{stream}"


@contextmanager
def _quiet_overrides() -> Iterator[None]:
    """Silence SAELens's notices that an explicitly passed model / dataset overrides its config
    (here that is the documented way in) and its rows-vs-tokens dataset-size warning."""
    import logging

    log = logging.getLogger("sae_lens")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The training dataset contains fewer samples")
            yield
    finally:
        log.setLevel(level)


def train_stream_sae(model, site: str, dataset, *, out: Optional[Union[str, Path]] = None, **config):
    """Train an SAE on `site` of `model` with SAELens's own runner (`LanguageModelSAETrainingRunner`)
    over `dataset` (a pretokenized `datasets.Dataset`, e.g. from `token_datasets`). `config` goes to
    `runner_config`. Returns the trained SAE; with `out`, it is also saved there in SAELens's format
    (load it back with `sae_lens.SAE.load_from_disk(out)`)."""
    sl = require_saelens()
    cfg = runner_config(model, site, output_path=out, **config)
    adapter = StreamAdapter(model, sites=[cfg.hook_name])
    with _quiet_overrides():
        runner = sl.LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=adapter)
        return runner.run()


def train_stream_saes(
    model,
    sites: Sequence[str],
    dataset,
    *,
    out: Optional[Union[str, Path]] = None,
    d_sae: int = 512,
    architecture: str = "topk",
    k: int = 16,
    l1_coefficient: float = 5.0,
    runner_kwargs: Optional[Dict[str, Any]] = None,
    **fields,
) -> Dict[str, Any]:
    """One SAE per site, all trained together by SAELens's `MultiSAETrainingRunner` from one shared
    forward per batch (e.g. every stream of one hook, to compare streams). Same options as
    `runner_config`. Returns {site: trained SAE}; with `out`, SAE i is saved in SAELens's format
    under `out/<sae_folder_name(site)>`."""
    sl = require_saelens()
    sites = [stream_site(*check_site(model, s)) for s in sites]
    if not sites or len(set(sites)) != len(sites):
        raise ValueError(f"sites must be a non-empty list without duplicates, got {sites}")
    names = {sae_folder_name(s): s for s in sites}
    cfg = _runner_fields(model, output_path=out, **fields)
    sae_cfg = {
        n: _sae_config(sl, int(model.cfg.d_model), d_sae, architecture, k, l1_coefficient) for n in names
    }
    cfg.update(saes=sae_cfg, hook_names=names)
    cfg.update(runner_kwargs or {})
    adapter = StreamAdapter(model, sites=sites)
    with _quiet_overrides():
        runner = sl.MultiSAETrainingRunner(
            sl.MultiSAETrainingRunnerConfig(**cfg), override_dataset=dataset, override_model=adapter
        )
        saes = runner.run()
    return {names[n]: sae for n, sae in saes.items()}
