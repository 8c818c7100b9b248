"""SAELens on one residual stream of a multi-stream model: train, load, splice, evaluate.

SAELens works on `[batch, pos, d]` activations at a hook name; mHC stream states are
`[batch, pos, n_streams, d_model]`, so the stream is named in the *site*:
`"blocks.2.attn.hook_streams_in[1]"` is stream 1 of that state, `[batch, pos, d_model]`;
`"blocks.2.attn.hook_read"` is already `[batch, pos, d_model]` (no index). A stream-state hook
without an index is refused (never flattened to n_streams * d_model, never broadcast over all
streams), and so is an index on a hook without a stream axis. `StreamAdapter(model)` is the
model SAELens sees: a hook on `H[s]` runs on a copy of `x[:, :, s]` and writes back into stream s
only, so SAELens's activation store, trainer and evaluation (MSE, explained variance, L0, the
spliced and zero-ablated KL and CE) act on that stream alone. Needs the `saelens` extra
(SAELens 6.x pins transformer-lens < 4: transformer-lens 3.x, >= 3.3, in its own environment).

Details: docs/saelens.md#sites-choosing-the-stream and the sections after it (the adapter, an
example, the metrics' definitions, measurements)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from torch import Tensor

from .saelens_adapter import (
    PLAIN_SUFFIXES,
    STREAM_STATE_SUFFIXES,
    Site,
    StreamAdapter,
    _write_stream,
    all_sites,
    check_site,
    parse_site,
    require_saelens,
    stream_site,
)
from .saelens_training import (
    corpus_windows,
    runner_config,
    sae_folder_name,
    token_datasets,
    train_stream_sae,
    train_stream_saes,
)

__all__ = [  # the adapter's and the training module's names are re-exported from here
    "EVAL_KEYS",
    "PLAIN_SUFFIXES",
    "STREAM_STATE_SUFFIXES",
    "Site",
    "StreamAdapter",
    "all_sites",
    "check_sae",
    "check_site",
    "corpus_windows",
    "evaluate_sae",
    "parse_site",
    "require_saelens",
    "runner_config",
    "sae_folder_name",
    "sae_hook",
    "sae_site",
    "splice_sae",
    "stream_site",
    "token_datasets",
    "train_stream_sae",
    "train_stream_saes",
]


# ------------------------------------------------------------------------------------- splicing
def sae_site(sae) -> str:
    """The site an SAE was trained on, from its SAELens metadata (`hook_name`; a `hook_head_index`
    - SAELens's own index into axis 2 - is read as the stream)."""
    meta = getattr(getattr(sae, "cfg", None), "metadata", None)
    name = getattr(meta, "hook_name", None)
    if not name:
        raise ValueError(
            "this SAE records no hook_name in its metadata (cfg.metadata.hook_name), so "
            "where it was trained is unknown; pass site= explicitly"
        )
    head = getattr(meta, "hook_head_index", None)
    if head is not None:
        hook, stream = parse_site(name)
        if stream is not None and stream != head:
            raise ValueError(f"SAE metadata disagree: hook_name {name!r} but hook_head_index {head}")
        return stream_site(hook, head)
    return name


def check_sae(model, sae, site: Optional[str] = None) -> Site:
    """Validate splicing `sae` into `model` (at `site`, default the SAE's own): the site is valid for
    the model, it is the one the SAE was trained on, and the SAE's d_in is the model's d_model.
    Returns (hook name, stream or None)."""
    recorded = getattr(getattr(getattr(sae, "cfg", None), "metadata", None), "hook_name", None)
    trained = check_site(model, sae_site(sae)) if site is None or recorded else None
    target = check_site(model, site) if site is not None else trained
    if trained is not None and target != trained:
        raise ValueError(
            f"this SAE was trained on {stream_site(*trained)!r} but is being spliced into "
            f"{stream_site(*target)!r}: an SAE's features are directions of the activations it was "
            f"trained on; splice it at its own site (leave site= out) or train one for this site"
        )
    d_in, d_model = int(sae.cfg.d_in), int(model.cfg.d_model)
    if d_in != d_model:
        raise ValueError(
            f"the SAE's d_in={d_in} does not match the model's d_model={d_model} "
            f"(at {stream_site(*target)!r} activations are [batch, pos, {d_model}]): "
            f"this SAE belongs to another model"
        )
    return target


def sae_hook(model, sae, site: Optional[str] = None) -> Tuple[str, Callable]:
    """(hook name, hook) for `run_with_hooks` / `hooks()`: at the SAE's site, x[:, :, s] [batch, pos,
    d_model] is replaced by the SAE's reconstruction x_hat = decode(encode(x)); the other streams
    are untouched. Checked with `check_sae`."""
    hook_name, stream = check_sae(model, sae, site)

    def splice(act: Tensor, hook) -> Tensor:
        x = act if stream is None else act[:, :, stream]  # [batch, pos, d_model]
        x_hat = sae(x.to(device=sae.device, dtype=sae.dtype)).to(device=act.device, dtype=act.dtype)
        return _write_stream(act, stream, x_hat)

    return hook_name, splice


@contextmanager
def splice_sae(model, sae, site: Optional[str] = None) -> Iterator[Any]:
    """Run `model` with `sae` spliced in at its site inside the block:

        with splice_sae(model, sae):
            logits = model(tokens)

    The hook is attached with the model's `hooks()` context: it is removed when the block ends,
    also when it raises."""
    name, hook = sae_hook(model, sae, site)
    with model.hooks(fwd_hooks=[(name, hook)]):
        yield model


# ----------------------------------------------------------------------------------- evaluation
EVAL_KEYS = (
    "mse",
    "explained_variance",
    "l0",
    "kl_div_with_sae",
    "kl_div_with_ablation",
    "kl_div_score",
    "ce_loss_without_sae",
    "ce_loss_with_sae",
    "ce_loss_with_ablation",
    "ce_loss_score",
    "cossim",
)


def evaluate_sae(
    model,
    sae,
    dataset,
    *,
    n_batches: int = 4,
    batch_size_prompts: int = 8,
    context_size: Optional[int] = None,
) -> Dict[str, float]:
    """SAELens's standard evaluation (`sae_lens.run_evals`) of `sae` at its site, through the
    adapter: reconstruction (mse, explained_variance, cossim), sparsity (l0), and the model with the
    SAE spliced into its stream against the clean model (kl_div_with_sae, ce_loss_with_sae) and
    against the stream zero-ablated at that site (kl_div_with_ablation, ce_loss_with_ablation).
    Every position of `n_batches` x `batch_size_prompts` windows of `dataset` (the same windows for
    every SAE given the same dataset). Returns {name: float} (`EVAL_KEYS`)."""
    sl = require_saelens()
    from sae_lens.evals import EvalConfig
    from sae_lens.training.activation_scaler import ActivationScaler

    hook, stream = check_sae(model, sae)
    adapter = StreamAdapter(model, sites=[stream_site(hook, stream)])
    context_size = context_size or sae.cfg.metadata.context_size or len(dataset[0]["input_ids"])
    store = sl.ActivationsStore.from_sae(
        adapter,
        sae,
        dataset,
        context_size=context_size,
        streaming=False,
        store_batch_size_prompts=batch_size_prompts,
        device=str(model.device),
    )
    config = EvalConfig(
        batch_size_prompts=batch_size_prompts,
        n_eval_reconstruction_batches=n_batches,
        n_eval_sparsity_variance_batches=n_batches,
        compute_kl=True,
        compute_ce_loss=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
    )
    was_training = sae.training
    sae.eval()
    try:
        metrics, _ = sl.run_evals(
            sae, store, adapter, ActivationScaler(), config, exclude_special_tokens=False
        )
    finally:
        sae.train(was_training)
    flat = {k: v for group in metrics.values() for k, v in group.items()}
    return {k: float(flat[k]) for k in EVAL_KEYS if k in flat}
