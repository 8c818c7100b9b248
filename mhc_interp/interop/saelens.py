"""SAELens on one residual stream of a multi-stream model: train, load, splice, evaluate.

SAELens trains and evaluates sparse autoencoders on `[batch, pos, d]` activations read at a hook
name. The stream states of an mHC model are `[batch, pos, n_streams, d_model]`, so a stream has to
be chosen. This module names that choice explicitly, as a *site*:

    "blocks.2.attn.hook_streams_in[1]"   stream 1 of the state entering blocks.2.attn  [batch, pos, d_model]
    "blocks.2.attn.hook_read"            a hook that is already [batch, pos, d_model] (no index)

A stream-state hook without an index is refused (it is never flattened to n_streams * d_model and
never broadcast over all streams), and an index on a hook without a stream axis is refused too.

`StreamAdapter(model)` is the model SAELens sees: a `HookedRootModule` whose hook points are the
sites, each `[batch, pos, d_model]`. A hook on site `H[s]` runs on `x[:, :, s]` of the real hook
`H` (a copy), and what it returns is written back into stream s only; the other streams and the
model are untouched. Its `forward` takes the arguments SAELens passes (`return_type="both"`,
`loss_per_token`, `stop_at_layer`, `prepend_bos=False`). Because every site is a plain
`[batch, pos, d]` hook point, SAELens's own activation store, trainer and evaluation (MSE,
explained variance, L0, the spliced model's KL and CE, and the zero-ablation baseline) all act on
the chosen stream and nothing else.

    sae = train_stream_sae(model, "blocks.2.attn.hook_streams_in[1]", train_ds, out="sae-dir")
    sae = SAE.load_from_disk("sae-dir")               # SAELens's own format and loader
    with splice_sae(model, sae):                      # x[:, :, 1] <- SAE(x[:, :, 1]) at that hook
        logits = model(tokens)
    metrics = evaluate_sae(model, sae, eval_ds)       # SAELens's run_evals through the adapter

Metrics (SAELens's definitions, over the evaluated tokens t with x_t in R^d_model):
    mse                 E_t ||x_t - x_hat_t||^2 (summed over d_model, averaged over tokens)
    explained_variance  1 - E_t ||x_t - x_hat_t||^2 / E_t ||x_t - E[x]||^2
    l0                  E_t #{i : f_i(x_t) != 0}
    kl_div_with_sae     E_t KL(p_clean(.|t) || p_spliced(.|t)) over next-token distributions
    kl_div_with_ablation  the same with the stream zeroed at the site instead (the baseline)
    kl_div_score        1 - kl_div_with_sae / kl_div_with_ablation
    ce_loss_*           next-token cross-entropy clean / spliced / ablated, ce_loss_score likewise

Requires the `saelens` extra (`pip install -e ".[saelens]"`): SAELens 6.x, which pins
transformer-lens < 4, so this runs on transformer-lens 3.x (>= 3.3).
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from ..hooks.names import HOOK_SPECS, CheckedHookNames, check_hook_names, suffix, unknown_hook_error

# hooks with a stream axis at dim 2 whose per-stream slice is a [batch, pos, d_model] vector
STREAM_STATE_SUFFIXES = (
    "hook_streams_init",
    "hook_streams_in",
    "hook_streams_out",
    "hook_res_mix",
    "hook_ln_final",
)
# hooks that already are [batch, pos, d_model]
PLAIN_SUFFIXES = tuple(s for s, (axes, _) in HOOK_SPECS.items() if axes == ("batch", "pos", "d_model"))

_SITE = re.compile(r"^(?P<hook>[^\[\]]+?)(?:\[(?P<stream>[^\]]*)\])?$")

Site = Tuple[str, Optional[int]]  # (hook name, stream index or None)


def require_saelens():
    """Import sae_lens, or raise an ImportError that says how to install it."""
    try:
        import sae_lens
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "this needs SAELens, which pins transformer-lens<4: install the extra into its own "
            'environment with `pip install torch==2.13.0 -e ".[saelens]"` (see docs/saelens.md)'
        ) from e
    return sae_lens


# ------------------------------------------------------------------------------------------ sites
def stream_site(hook_name: str, stream: Optional[int] = None) -> str:
    """The site name of stream `stream` of `hook_name` ("H[s]"), or `hook_name` when None."""
    return hook_name if stream is None else f"{hook_name}[{stream}]"


def parse_site(site: str) -> Site:
    """ "blocks.2.attn.hook_streams_in[1]" -> ("blocks.2.attn.hook_streams_in", 1); no index -> None.
    Checks only the syntax; `check_site` checks it against a model."""
    if not isinstance(site, str):
        raise TypeError(
            f"a site is a hook name string such as 'blocks.0.attn.hook_streams_in[1]', got {site!r}"
        )
    m = _SITE.match(site.strip())
    if m is None:
        raise ValueError(
            f"cannot parse site {site!r}; write HOOK or HOOK[stream], e.g. 'blocks.0.attn.hook_streams_in[1]'"
        )
    stream = m.group("stream")
    if stream is None:
        return m.group("hook"), None
    if not stream.isdigit():
        raise ValueError(f"site {site!r}: the stream index must be a non-negative integer, got {stream!r}")
    return m.group("hook"), int(stream)


def check_site(model, site: Union[str, Site]) -> Site:
    """Validate a site against `model`: a known hook; stream states need a stream index in range;
    [batch, pos, d_model] hooks take none; other hooks (attention patterns, H_res, ...) are no
    SAE input. Returns (hook name, stream or None)."""
    hook, stream = parse_site(site) if isinstance(site, str) else site
    check_hook_names([hook], model.hook_dict)
    kind = suffix(hook)
    n = model.cfg.n_streams
    if kind in STREAM_STATE_SUFFIXES:
        if stream is None:
            choices = ", ".join(repr(stream_site(hook, s)) for s in range(n))
            raise ValueError(
                f"{hook!r} is stream-valued [batch, pos, n_streams={n}, d_model]: choose one stream "
                f"({choices}); an SAE reads one [batch, pos, d_model] stream, the streams are never "
                f"flattened or shared"
            )
        if not 0 <= stream < n:
            raise IndexError(
                f"site {stream_site(hook, stream)!r}: stream {stream} is out of range, "
                f"the model has {n} streams (0..{n - 1})"
            )
        return hook, stream
    if kind in PLAIN_SUFFIXES:
        if stream is not None:
            raise ValueError(
                f"{hook!r} has no stream axis (it is [batch, pos, d_model]); drop the "
                f"[{stream}], or use a stream state ({', '.join(STREAM_STATE_SUFFIXES)})"
            )
        return hook, None
    axes = ", ".join(HOOK_SPECS[kind][0])
    raise ValueError(
        f"{hook!r} is [{axes}], not an SAE input: use a stream state "
        f"({', '.join(STREAM_STATE_SUFFIXES)}) with a stream index, or a [batch, pos, "
        f"d_model] hook ({', '.join(PLAIN_SUFFIXES)})"
    )


def all_sites(model) -> List[str]:
    """Every site of `model`: each stream of each stream-state hook, and each [batch, pos, d_model] hook."""
    sites = []
    for name in model.hook_dict:
        kind = suffix(name)
        if kind in STREAM_STATE_SUFFIXES:
            sites += [stream_site(name, s) for s in range(model.cfg.n_streams)]
        elif kind in PLAIN_SUFFIXES:
            sites.append(name)
    return sites


def _write_stream(act: Tensor, stream: Optional[int], new: Tensor) -> Tensor:
    """act [batch, pos, n, d] with stream `stream` replaced by new [batch, pos, d] (a new tensor);
    with stream None, `new` itself (act was [batch, pos, d])."""
    if stream is None:
        return new
    out = act.clone()
    out[:, :, stream] = new
    return out


# ---------------------------------------------------------------------------------------- adapter
class StreamAdapter(CheckedHookNames, HookedRootModule):
    """The model as SAELens sees it: one `[batch, pos, d_model]` hook point per site.

    model: a `HookedMHC` (or any `StreamHookedRoot`); it is wrapped, not copied or changed, and is
        not a submodule (its hook points keep their names). sites: the sites to expose (default
        `all_sites(model)`).

    A hook added at site `H[s]` (by SAELens, `run_with_cache`, `run_with_hooks`, `hooks()`) is
    bridged, for the duration of one forward, by a hook on the real hook point `H` that passes a
    copy of `x[:, :, s]` through the site's hook point and writes the result back into stream s.
    The bridges are attached with the model's own `hooks()` context, so they are removed when the
    forward ends or raises. Unknown sites and stream-valued hook names without an index raise.
    """

    def __init__(self, model, sites: Optional[Sequence[str]] = None):
        super().__init__()
        object.__setattr__(self, "mhc", model)  # not registered: setup() must not rename its hook points
        names = all_sites(model) if sites is None else list(sites)
        self._sites: Dict[str, Site] = {}
        for name in names:
            hook, stream = check_site(model, name)
            canonical = stream_site(hook, stream)
            if canonical in self._sites:
                raise ValueError(f"site {canonical!r} given twice")
            self._sites[canonical] = (hook, stream)
        self.site_points = nn.ModuleList(HookPoint() for _ in self._sites)
        self.setup()

    def setup(self) -> None:
        """hook_dict / mod_dict: {site name: its HookPoint} (the names carry brackets, so they are
        assigned here rather than taken from the module tree)."""
        self.mod_dict, self.hook_dict = {}, {}
        for name, point in zip(self._sites, self.site_points):
            point.name = name
            self.mod_dict[name] = point
            self.hook_dict[name] = point

    # what SAELens reads from a model
    @property
    def cfg(self):
        return self.mhc.cfg

    @property
    def tokenizer(self):
        return self.mhc.tokenizer

    @property
    def W_E(self) -> Tensor:  # SAELens finds the input device from W_E: [d_vocab, d_model]
        return self.mhc.embed.weight

    def check_hook_name(self, name: str) -> None:  # CheckedHookNames: hooks and names_filter are sites
        self.site(name)

    def site(self, name: str) -> Site:
        """(hook name, stream) of an exposed site; a clear error for anything else."""
        try:
            return self._sites[name]
        except KeyError:
            pass
        check_site(self.mhc, name)  # raises for unknown / stream-valued-without-index / bad hooks
        raise unknown_hook_error(name, self._sites)

    # --------------------------------------------------------------------------------- forward
    def _bridge(self, stream: Optional[int], point: HookPoint) -> Callable:
        def bridge(act: Tensor, hook) -> Tensor:
            x = act if stream is None else act[:, :, stream].clone()  # [batch, pos, d_model]
            return _write_stream(act, stream, point(x))

        return bridge

    def active_bridges(self) -> List[Tuple[str, Callable]]:
        """(real hook name, bridge) for every site that has a hook attached now."""
        return [
            (hook, self._bridge(stream, point))
            for (hook, stream), point in zip(self._sites.values(), self.site_points)
            if point.fwd_hooks or point.bwd_hooks
        ]

    def forward(
        self,
        input,
        return_type: Optional[str] = "logits",
        *,
        loss_per_token: bool = False,
        stop_at_layer: Optional[int] = None,
        prepend_bos: Optional[bool] = None,
        **kwargs,
    ) -> Any:
        """Run the wrapped model with the site hooks bridged in.

        input: tokens [batch, pos] (fed as they are: `prepend_bos=True` is refused).
        return_type: "logits" [batch, pos, d_vocab], "loss" (mean next-token cross-entropy, or
            [batch, pos - 1] with `loss_per_token`), "both" (logits, loss) or None.
        stop_at_layer=L: run blocks 0..L-1 only and return the stream state (SAELens passes the
            site's block + 1 when it only needs activations).
        """
        if prepend_bos:
            raise ValueError(
                "prepend_bos=True is not supported: tokens are fed as they are; "
                "prepend a BOS token yourself (SAELens: prepend_bos=False)"
            )
        tokens = self.mhc._check_tokens(input)
        stop = None
        if stop_at_layer is not None:
            if isinstance(stop_at_layer, bool) or not isinstance(stop_at_layer, int) or stop_at_layer < 1:
                raise ValueError(f"stop_at_layer must be a positive int, got {stop_at_layer!r}")
            stop = 2 * stop_at_layer if 2 * stop_at_layer < self.mhc.cfg.n_sublayers else None
        with self.mhc.hooks(fwd_hooks=self.active_bridges()):
            if stop is not None:
                return self.mhc(tokens, stop_at_sublayer=stop, **kwargs)
            if not loss_per_token or return_type not in ("loss", "both"):
                return self.mhc(tokens, return_type=return_type, **kwargs)
            logits = self.mhc(tokens, return_type="logits", **kwargs)  # [batch, pos, d_vocab]
        loss = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none"
        )  # [batch, pos - 1]
        return loss if return_type == "loss" else (logits, loss)


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
