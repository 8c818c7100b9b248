"""Loading and saving `HookedMHC` checkpoints.

Formats read by `load_pretrained(name_or_path)`:
- a nanoGPT-style `.pt` of the public mHC code: `{"model": state_dict, "model_args": {...}}`,
  keys possibly prefixed `_orig_mod.` (how `wgpeng/mhc-780m`, file `best_ckpt_large.pt`, and the
  stream-collapse paper's models are published);
- a folder in the hub layout of the public 781M checkpoints: `config.json` (= model_args) +
  `model.safetensors` (nanoGPT keys), or a folder holding one nanoGPT `.pt`;
- a folder written by `save_pretrained` (our keys, `config.json` with `mhc_interp_format`);
- a HuggingFace hub repo id: downloaded with `huggingface_hub`, then read as a folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from .config import ConfigError, MHCConfig
from .device import available_memory_bytes

log = logging.getLogger(__name__)
FORMAT_KEY = "mhc_interp_format"
FORMAT_VERSION = 1
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: wrong layout, missing/unexpected keys, unreachable hub."""


@dataclass(frozen=True)
class Placement:
    """The dtype and device a loaded model's tensors are put in, tensor by tensor (`build_model`): a
    bf16 checkpoint loaded as bf16 is neither copied nor passed through float32, and on a GPU the
    weights are copied there one at a time. dtype "auto" is the checkpoint's own floating dtype."""

    dtype: Union[torch.dtype, str] = torch.float32
    device: Union[str, torch.device] = "cpu"

    def resolve(self, state_dict: Dict[str, Tensor]) -> "Placement":
        dtype = self.dtype
        if dtype == "auto":
            floats = [v.dtype for v in state_dict.values() if v.is_floating_point()]
            dtype = max(set(floats), key=floats.count) if floats else torch.float32
        return Placement(dtype, torch.device(self.device))


# ------------------------------------------------------------------- nanoGPT key translation
_TOP_LEVEL_KEYS = {
    "transformer.wte.weight": "embed.weight",
    "transformer.wpe.weight": "pos_embed.weight",
    "transformer.ln_f.weight": "ln_final.weight",
    "transformer.ln_f.bias": "ln_final.bias",
    "expand_stream.lss": "expand.lss",
}  # nanoGPT key -> ours, outside the blocks


def _translate_key(key: str) -> Optional[str]:
    """Our key for nanoGPT key `key`, or None for keys that carry no new tensor."""
    if key in _TOP_LEVEL_KEYS:
        return _TOP_LEVEL_KEYS[key]
    block = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", key)
    layer, rest = block.groups() if block else (None, "")  # not in a block: refused below
    m = re.fullmatch(r"(?:branch_(attn|mlp)|hc_(attn|mlp)\.branch)\.([01])\.(.+)", rest)
    if m:
        branch_sub, hc_sub, part, param = m.groups()
        sub = branch_sub or hc_sub
        if part == "0":
            return f"blocks.{layer}.{sub}.ln.{param}"
        if param == "bias":  # the causal-mask buffer of nanoGPT's non-flash attention
            return None
        return f"blocks.{layer}.{sub}.{param}"
    m = re.fullmatch(r"hc_(attn|mlp)\.(.+)", rest)
    if m:
        return f"blocks.{layer}.{m.group(1)}.mixer.{m.group(2).replace('norm.gamma', 'norm_gamma')}"
    if rest == "expand_stream.lss":  # the shared expansion module, repeated in every block
        return "expand.lss"
    raise CheckpointError(f"unexpected key {key!r} in checkpoint")


def nanogpt_state_dict_to_hooked(sd: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], bool]:
    """Translate a public-mHC-code state dict to our keys. Returns (state dict, tied embeddings).

    Tensors stored twice by that code (`branch_attn.*` and `hc_attn.branch.*`; the LSS vector
    in every block) must agree; the tied `lm_head.weight` is dropped when it equals the embedding.
    """
    out: Dict[str, Tensor] = {}
    sources: Dict[str, str] = {}
    lm_head = None
    for key, value in sd.items():
        key = key.removeprefix("_orig_mod.")
        if key == "lm_head.weight":
            lm_head = value
            continue
        ours = _translate_key(key)
        if ours is None:
            continue
        if ours not in out:
            out[ours], sources[ours] = value, key
        elif not torch.equal(out[ours], value):  # False for different shapes too
            raise CheckpointError(
                f"checkpoint keys {sources[ours]!r} and {key!r} should hold the same tensor but differ"
            )
    if "embed.weight" not in out and lm_head is not None:  # a tied pair stored once, under lm_head.weight
        out["embed.weight"], lm_head = lm_head, None  # (safetensors' save_model keeps the first name sorted)
    tied = lm_head is None or torch.equal(lm_head, out["embed.weight"])
    if not tied:
        out["unembed.weight"] = lm_head
    return out, tied


def hooked_state_dict_to_nanogpt(sd: Dict[str, Tensor], cfg: MHCConfig) -> Dict[str, Tensor]:
    """The inverse of `nanogpt_state_dict_to_hooked`, with the public code's duplicate keys, so a
    model can be exported to (and re-read by) that code's `GPT.load_state_dict`."""
    nanogpt_keys = {ours: theirs for theirs, ours in _TOP_LEVEL_KEYS.items()}
    out: Dict[str, Tensor] = {}
    for key, value in sd.items():
        if key in nanogpt_keys:  # before lm_head: writers that store a shared tensor once keep the first key
            out[nanogpt_keys[key]] = value
        if key == "unembed.weight" or (key == "embed.weight" and cfg.tie_embeddings):
            out["lm_head.weight"] = value
        if key == "expand.lss":
            for layer in range(cfg.n_layers):
                out[f"transformer.h.{layer}.expand_stream.lss"] = value
        if key not in nanogpt_keys and key != "unembed.weight":
            layer, sub, rest = re.fullmatch(r"blocks\.(\d+)\.(attn|mlp)\.(.+)", key).groups()
            if rest.startswith("mixer."):
                out[f"transformer.h.{layer}.hc_{sub}.{rest[6:].replace('norm_gamma', 'norm.gamma')}"] = value
                continue
            part = f"0.{rest[3:]}" if rest.startswith("ln.") else f"1.{rest}"
            out[f"transformer.h.{layer}.branch_{sub}.{part}"] = value
            out[f"transformer.h.{layer}.hc_{sub}.branch.{part}"] = value
    return out


# ------------------------------------------------------------------------- building a model
def build_model(
    cls, cfg: MHCConfig, state_dict: Dict[str, Tensor], source: str, placement: Placement = Placement()
):
    """`cls(cfg)` holding `state_dict`'s tensors (taken out of it) in `placement`'s dtype and device.

    Built on the meta device (no allocation, no init, the global RNG untouched) and checked against
    the weights (layers, keys, shapes: errors name them) and the device's free memory; then each
    tensor is cast (or kept, if already right) and assigned, its source dropped: the peak is the
    state dict plus what is converted so far. Buffers no checkpoint holds are made by the modules'
    `rebuild_buffers()`. Non-finite weights load with a warning that names them."""
    placement = placement.resolve(state_dict)
    with torch.random.fork_rng(devices=[]), _defaults(placement.dtype, "meta"):
        model = cls(cfg)
    expected = model.state_dict()  # meta tensors: the target shape and dtype of every key
    _check_keys(state_dict, expected, cfg, source)
    _check_fits_in_memory(
        sum(t.nbytes for t in (*model.parameters(), *model.buffers())), placement.device, source
    )
    bad = nonfinite_tensors(state_dict.items())
    if bad:
        warnings.warn(
            f"{source}: non-finite weights (NaN or inf) in {bad[:8]}{'...' if len(bad) > 8 else ''}: "
            f"every output of this model will be wrong",
            stacklevel=3,
        )
    # a narrowing cast peaks at the start (all sources + the first copy), a widening one at the end
    # (all copies + the last source): smallest first, resp. last
    order = sorted(
        state_dict,
        key=lambda k: (
            state_dict[k].numel() * (-1 if expected[k].element_size() > state_dict[k].element_size() else 1)
        ),
    )
    storages: set = set()
    placed = {
        key: _own_tensor(state_dict.pop(key), expected[key].dtype, placement.device, storages)
        for key in order
    }
    model.load_state_dict(placed, strict=True, assign=True)  # the model holds `placed`'s tensors themselves
    with _defaults(placement.dtype, placement.device):
        for module in model.modules():
            if callable(getattr(module, "rebuild_buffers", None)):
                module.rebuild_buffers()
    unset = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if unset:
        raise CheckpointError(
            f"{source}: {unset[:8]} are neither in the checkpoint nor rebuilt: a module with a "
            f"non-persistent buffer must define rebuild_buffers()"
        )
    return model.eval()


@contextlib.contextmanager
def _defaults(dtype: torch.dtype, device):
    """torch's default dtype and device inside the block."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _check_keys(
    state_dict: Dict[str, Tensor], expected: Dict[str, Tensor], cfg: MHCConfig, source: str
) -> None:
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    if layers and max(layers) + 1 != cfg.n_layers:
        raise CheckpointError(
            f"{source}: the config says {cfg.n_layers} layers but the weights hold {max(layers) + 1}"
        )
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: checkpoint does not match a {cfg.hyper_conn_type} model with "
            f"{cfg.n_streams} streams, {cfg.n_layers} layers, bias={cfg.bias}: "
            f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    wrong = [
        f"{k}: {tuple(v.shape)} vs expected {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if v.shape != expected[k].shape
    ]
    if wrong:
        raise CheckpointError(f"{source}: tensor shapes do not match the config: {wrong[:8]}")


def _own_tensor(t: Tensor, dtype: torch.dtype, device: torch.device, storages: set) -> Tensor:
    """`t` in `dtype` on `device`, itself if it already is (no copy) unless it is a view into a larger
    storage or one another key took (`storages`): then a copy, so no two parameters share memory."""
    out = t.detach().to(device=device, dtype=dtype)
    if out.data_ptr() in storages or not out.is_contiguous() or out.untyped_storage().nbytes() != out.nbytes:
        out = out.clone(memory_format=torch.contiguous_format)
    storages.add(out.data_ptr())
    return out


def _check_fits_in_memory(need: int, device: torch.device, source: str) -> None:
    """Refuse, with the numbers, a model whose tensors (`need` bytes) exceed the device's free memory."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = available_memory_bytes() if device.type == "cpu" else None
    if free is not None and need > free:
        raise CheckpointError(
            f"{source}: the model needs {need / 2**30:.2f} GiB but {device} has "
            f"{free / 2**30:.2f} GiB of memory available"
        )


def nonfinite_tensors(named_tensors) -> list:
    """Names of the floating-point tensors among (name, tensor) pairs (`state_dict.items()`,
    `model.named_parameters()`) holding a NaN or an infinity."""
    return [k for k, v in named_tensors if v.is_floating_point() and not _all_finite(v)]


def _all_finite(t: Tensor, chunk: int = 1 << 22) -> bool:
    """isfinite over `chunk` elements at a time: no temporary the size of the tensor (the float32
    embedding of a 50k vocabulary at d 1280 would add 430 MiB to a load's peak)."""
    flat = t.detach().reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def _config(parse, raw, source) -> MHCConfig:
    """`parse(raw)` with a ConfigError that names the file it came from."""
    try:
        return parse(raw)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _from_nanogpt(cls, model_args: Dict[str, Any], sd: Dict[str, Tensor], source: str, placement: Placement):
    cfg = _config(MHCConfig.from_nanogpt_args, model_args, source)
    ours, tied = nanogpt_state_dict_to_hooked(sd)
    sd.clear()  # `ours` holds the tensors now: each is freed once build_model has converted it
    cfg.tie_embeddings = tied
    return build_model(cls, cfg, ours, source, placement)


def verify_archive(path: Path) -> None:
    """Check the CRC-32 of every member of a zip-format torch checkpoint (torch does not: a file
    with flipped bytes loads and runs); a CheckpointError names the damaged member. The legacy
    non-zip format carries no checksums."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint archive ({e}): download or copy it again") from e
    if damaged is not None:
        raise CheckpointError(
            f"{path}: damaged checkpoint: the checksum of {damaged!r} does not match its data "
            f"(corrupted on disk or in transfer): download or copy it again"
        )


def load_nanogpt_checkpoint(cls, path: Path, placement: Placement = Placement()):
    verify_archive(path)
    try:  # read into memory (not mapped): `build_model` assigns these tensors to the model
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"{path}: not a loadable torch checkpoint ({e})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path}: expected a nanoGPT mHC checkpoint {{'model': state_dict, 'model_args': {{...}}}}, "
            f"found {keys}"
        )
    return _from_nanogpt(cls, ckpt["model_args"], ckpt["model"], str(path), placement)


def _read_safetensors(path: Path) -> Dict[str, Tensor]:
    """The tensors of a safetensors file, read into memory (not mapped: a model keeps them)."""
    from safetensors import SafetensorError, safe_open

    try:
        try:
            with safe_open(str(path), "pt", backend="pread") as f:  # safetensors >= 0.8
                return f.get_tensors()
        except TypeError:  # an older safetensors maps the file: copy the tensors out of it
            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k).clone() for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or damaged ({e})") from e


def read_json(path: Path) -> Dict[str, Any]:
    """A JSON object from `path`, or a CheckpointError naming the file and the fault."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def load_folder(cls, folder: Path, placement: Placement = Placement(), filename: Optional[str] = None):
    """A folder in our format, the hub layout (config.json + model.safetensors), or with one .pt."""
    if filename is not None:
        target = folder / filename
        if not target.is_file():
            raise CheckpointError(f"{folder}: has no file {filename!r}")
        return load_nanogpt_checkpoint(cls, target, placement)
    config_path, weights = folder / "config.json", folder / "model.safetensors"
    if config_path.is_file() and weights.is_file():
        config = read_json(config_path)
        if FORMAT_KEY in config:
            if "config" not in config:
                raise CheckpointError(
                    f"{config_path}: has {FORMAT_KEY!r} but no 'config' entry; keys {sorted(config)}"
                )
            cfg = _config(MHCConfig.from_dict, config["config"], config_path)
            return build_model(cls, cfg, _read_safetensors(weights), str(folder), placement)
        return _from_nanogpt(cls, config, _read_safetensors(weights), str(folder), placement)
    (checkpoint,) = _checkpoint_files([p.name for p in folder.iterdir()], folder)  # not the hub layout
    return load_nanogpt_checkpoint(cls, folder / checkpoint, placement)


def _checkpoint_files(names: List[str], where) -> List[str]:
    """Which of the files of a folder or hub repo (`names`) hold its checkpoint: config.json +
    model.safetensors, else its one weights file (.pt, ...); a CheckpointError for none or several."""
    if "config.json" in names and "model.safetensors" in names:
        return ["config.json", "model.safetensors"]
    weights = sorted(n for n in names if n.endswith(WEIGHT_SUFFIXES) and "/" not in n)
    if len(weights) == 1:
        return weights
    if weights:
        raise CheckpointError(f"{where}: several checkpoints {weights}; pass filename=...")
    raise CheckpointError(
        f"{where}: no checkpoint found (expected config.json + model.safetensors, or one "
        f"{'/'.join(WEIGHT_SUFFIXES)} file); it holds {sorted(names)}"
    )


# --------------------------------------------------------------------------------------- hub


def download_from_hub(
    repo_id: str,
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
    local_files_only: Optional[bool] = None,
    filename: Optional[str] = None,
) -> Path:
    """Fetch what `load_folder` needs from the hub (or the local HF cache) -> snapshot folder."""
    import huggingface_hub
    from huggingface_hub import constants, snapshot_download

    if local_files_only is None:
        local_files_only = bool(constants.HF_HUB_OFFLINE)
    try:
        if filename is not None:
            patterns = [filename, *TOKENIZER_FILES]
        elif local_files_only:
            patterns = ["*.json", "*.safetensors", *[f"*{s}" for s in WEIGHT_SUFFIXES], "merges.txt"]
        else:
            files = huggingface_hub.list_repo_files(repo_id, revision=revision)
            patterns = [*_checkpoint_files(files, f"hub repo {repo_id!r}"), *TOKENIZER_FILES]
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            allow_patterns=patterns,
        )
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo: all the same to the user
        where = "the local HuggingFace cache" if local_files_only else "the HuggingFace hub"
        raise CheckpointError(
            f"could not fetch {repo_id!r} from {where} ({type(e).__name__}: {e}). If you are "
            f"offline, download the checkpoint elsewhere and pass its local path (a .pt file or a "
            f"folder) instead of a hub id."
        ) from e
    return Path(folder)


# ------------------------------------------------------------------------------- tokenizers
def load_tokenizer(folder: Optional[Path], cfg: MHCConfig):
    """The folder's tokenizer if it ships one; GPT-2's for GPT-2-sized vocabularies if
    `transformers` can load it (offline: from its cache); otherwise None (use token ids). Refused
    if its ids do not all index the model's embedding (len(tokenizer) > d_vocab)."""
    source = cfg.tokenizer_name or ("gpt2" if cfg.d_vocab in (50257, 50304) else None)
    if folder is not None and any((folder / f).is_file() for f in TOKENIZER_FILES[:3]):
        source = folder
        tokenizer = _folder_tokenizer_class(folder).from_pretrained(str(folder))
    elif source is None:
        return None
    else:
        try:  # (offline, HF_HUB_OFFLINE=1, transformers reads its cache only)
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception as e:  # noqa: BLE001
            log.warning("no tokenizer: could not load %r (%s); the model takes token ids", source, e)
            return None
    if len(tokenizer) > cfg.d_vocab:
        raise CheckpointError(
            f"the tokenizer of {source} has {len(tokenizer)} tokens but the model's vocabulary "
            f"only {cfg.d_vocab}: they do not belong together"
        )
    return tokenizer


def _folder_tokenizer_class(folder: Path):
    """The class that loads the folder's tokenizer: the generic fast tokenizer when its config names
    it (what `save_pretrained` of a tokenizers-backed tokenizer writes, as the shipped models'),
    else `AutoTokenizer` (whose import costs ~1.5 s more)."""
    config = folder / "tokenizer_config.json"
    named = read_json(config).get("tokenizer_class") if config.is_file() else None
    if named in ("PreTrainedTokenizerFast", "TokenizersBackend") and (folder / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast
    from transformers import AutoTokenizer

    return AutoTokenizer


# ------------------------------------------------------------------------------ entry points
def load_pretrained(
    cls,
    name_or_path,
    device=None,
    dtype: Union[torch.dtype, str, None] = None,
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
    local_files_only: Optional[bool] = None,
    filename: Optional[str] = None,
    tokenizer: Any = "auto",
):
    """Load a model from a .pt file, a folder, or a hub repo id; see the module docstring.

    dtype: float32 by default; "auto" keeps the checkpoint's floating dtype (e.g. bf16). The model is
    allocated in that dtype on `device` directly (see `Placement`).
    tokenizer: "auto" (the checkpoint's, else GPT-2's when the vocabulary matches), a tokenizer
    object, or None.
    """
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_file():
        folder, filename = path.parent, path.name
    elif path.is_dir():
        folder = path
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", str(name_or_path)) and not str(name_or_path).startswith("."):
        folder = download_from_hub(str(name_or_path), revision, cache_dir, local_files_only, filename)
    else:
        raise CheckpointError(f"{name_or_path!r} is neither an existing file or folder nor a hub repo id")
    model = load_folder(cls, folder, Placement(dtype or torch.float32, device or "cpu"), filename=filename)
    model.tokenizer = load_tokenizer(folder, model.cfg) if tokenizer == "auto" else tokenizer
    return model


def save_pretrained(model, path) -> None:
    """Write `config.json` + `model.safetensors` (+ the tokenizer, if any) to folder `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(
        json.dumps({FORMAT_KEY: FORMAT_VERSION, "config": model.cfg.to_dict()}, indent=2)
    )
    save_file(
        {k: v.contiguous().cpu() for k, v in model.state_dict().items()},  # (state_dict() is detached)
        str(path / "model.safetensors"),
    )
    if hasattr(model.tokenizer, "save_pretrained"):  # (None has not)
        model.tokenizer.save_pretrained(str(path))
