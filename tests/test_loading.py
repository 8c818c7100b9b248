"""Loading and saving: our format round-trips, the nanoGPT format generalises beyond the six
reference checkpoints, the hub code path works from a local HF cache, and bad checkpoints fail
with errors that name the problem."""

import json
import shutil

import pytest
import torch

from mhc_interp import HookedMHC, MHCConfig
from mhc_interp.config import ConfigError
from mhc_interp.loading import CheckpointError, _defaults, hooked_state_dict_to_nanogpt
from mhc_interp.model.mixers import MIXERS

from .conftest import FIXTURES, perturbed_model, tiny_config


def save_nanogpt(model: HookedMHC, path, prefix=""):
    sd = hooked_state_dict_to_nanogpt(model.state_dict(), model.cfg)
    torch.save(
        {
            "model": {prefix + k: v for k, v in sd.items()},
            "model_args": model.cfg.to_nanogpt_args(),
            "iter_num": 0,
        },
        path,
    )
    return path


@pytest.mark.parametrize(
    "kind,n,bias",
    [
        ("mhc", 3, False),
        ("mhc_lite", 3, True),
        ("hc", 2, False),
        ("mhc_lite_lss", 2, False),
        ("none", 1, False),
        ("mhc", 5, True),
    ],
)
def test_nanogpt_format_generalises(kind, n, bias, tmp_path, tokens):
    model = perturbed_model(tiny_config(kind, n, bias=bias, d_vocab=128, n_ctx=32))
    path = save_nanogpt(model, tmp_path / "ckpt.pt", prefix="_orig_mod.")
    loaded = HookedMHC.from_pretrained(path)
    assert loaded.cfg.bias == bias and loaded.cfg.n_streams == n
    assert torch.equal(loaded(tokens), model(tokens))


def test_own_format_round_trip(tmp_path, tokens, mhc_model):
    mhc_model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["mhc_interp_format"] == 1
    again = HookedMHC.from_pretrained(tmp_path / "m")
    assert torch.equal(again(tokens), mhc_model(tokens))


def test_untied_unembedding_is_kept(tmp_path, tokens):
    model = perturbed_model(tiny_config("mhc", d_vocab=128, n_ctx=32, tie_embeddings=False))
    loaded = HookedMHC.from_pretrained(save_nanogpt(model, tmp_path / "c.pt"))
    assert loaded.cfg.tie_embeddings is False
    assert torch.equal(loaded(tokens), model(tokens))


def test_tied_embedding_stored_once_under_either_name(tokens):
    """A tied embedding written once (safetensors' save_model keeps the first name in sorted order,
    `lm_head.weight`) loads the same as one written under `transformer.wte.weight`."""
    from mhc_interp.loading import nanogpt_state_dict_to_hooked

    model = perturbed_model(tiny_config("mhc", d_vocab=128, n_ctx=32))
    sd = hooked_state_dict_to_nanogpt(model.state_dict(), model.cfg)
    for dropped in ("lm_head.weight", "transformer.wte.weight"):
        ours, tied = nanogpt_state_dict_to_hooked({k: v for k, v in sd.items() if k != dropped})
        assert tied and "unembed.weight" not in ours
        assert torch.equal(ours["embed.weight"], model.embed.weight)


def test_dtype_and_device(tokens):
    model = HookedMHC.from_pretrained(FIXTURES / "mhc_n4.pt", device="cpu", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    ref = torch.load(FIXTURES / "mhc_n4.logits.pt", weights_only=True)
    with torch.no_grad():
        logits = model(tokens).float()
    assert (logits - ref).abs().max() < 0.25 * ref.abs().max()


def _fake_hf_cache(cache_dir, repo_id, files_from):
    """Lay out a HuggingFace hub cache (models--owner--name/snapshots/<rev>, refs/main) the way
    huggingface_hub writes it, so the real download code can run with local_files_only."""
    repo_dir = cache_dir / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in files_from:
        shutil.copy(f, snapshot / f.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)


def test_hub_id_through_local_hf_cache(tmp_path, tokens):
    folder = FIXTURES / "hub_layout_mhc_lite_n4"
    _fake_hf_cache(tmp_path, "someone/mhc-tiny", [folder / "config.json", folder / "model.safetensors"])
    model = HookedMHC.from_pretrained("someone/mhc-tiny", cache_dir=str(tmp_path), local_files_only=True)
    assert (model(tokens) - torch.load(folder / "logits.pt", weights_only=True)).abs().max() <= 1e-4


def test_hub_repo_with_single_pt_file(tmp_path, tokens):
    _fake_hf_cache(tmp_path, "wgpeng/mhc-tiny", [FIXTURES / "mhc_n4.pt"])
    model = HookedMHC.from_pretrained("wgpeng/mhc-tiny", cache_dir=str(tmp_path), local_files_only=True)
    assert (model(tokens) - torch.load(FIXTURES / "mhc_n4.logits.pt", weights_only=True)).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "files,fetched",
    [
        (["README.md", "model.safetensors", "best.pt", "config.json"], ["config.json", "model.safetensors"]),
        (["best_ckpt.pt", "sub/old.pt", "vocab.json", "merges.txt"], ["best_ckpt.pt"]),
        (["a.pt", "b.bin"], "several checkpoints \\['a.pt', 'b.bin'\\]; pass filename"),
        (["README.md", "config.json"], "no checkpoint found .* it holds \\['README.md', 'config.json'\\]"),
    ],
)
def test_online_hub_download_picks_the_checkpoint_files(files, fetched, tmp_path, monkeypatch):
    """Online, the repo's file list decides what is downloaded: config.json + model.safetensors,
    else its one top-level weights file (plus the tokenizer files it may hold); none or several
    is refused."""
    import huggingface_hub

    from mhc_interp.loading import TOKENIZER_FILES, download_from_hub

    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, revision=None: list(files))
    downloads = []

    def snapshot_download(repo_id, allow_patterns, **kwargs):
        downloads.append(allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    if isinstance(fetched, str):
        with pytest.raises(CheckpointError, match="hub repo 'someone/repo': " + fetched):
            download_from_hub("someone/repo", local_files_only=False)
        assert downloads == []
    else:
        assert download_from_hub("someone/repo", local_files_only=False) == tmp_path
        assert downloads == [[*fetched, *TOKENIZER_FILES]]


def test_hub_unreachable_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="could not fetch 'nobody/no-such-model'.*local path"):
        HookedMHC.from_pretrained("nobody/no-such-model", cache_dir=str(tmp_path), local_files_only=True)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="neither an existing file"):
        HookedMHC.from_pretrained(str(tmp_path / "nothing.pt"))


def test_missing_and_unexpected_keys_are_named(tmp_path):
    ckpt = torch.load(FIXTURES / "mhc_n4.pt", weights_only=True)
    del ckpt["model"]["transformer.h.1.hc_mlp.static_beta"]
    torch.save(ckpt, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks.1.mlp.mixer.static_beta'\]"):
        HookedMHC.from_pretrained(tmp_path / "missing.pt")
    ckpt = torch.load(FIXTURES / "mhc_n4.pt", weights_only=True)
    ckpt["model"]["transformer.h.0.surprise"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "unexpected.pt")
    with pytest.raises(CheckpointError, match="transformer.h.0.surprise"):
        HookedMHC.from_pretrained(tmp_path / "unexpected.pt")


def test_wrong_stream_count_is_named(tmp_path):
    ckpt = torch.load(FIXTURES / "mhc_n4.pt", weights_only=True)
    ckpt["model_args"]["hyper_conn_n"] = 2
    torch.save(ckpt, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match="shapes do not match"):
        HookedMHC.from_pretrained(tmp_path / "wrong.pt")


def test_unknown_hyper_conn_type_is_named(tmp_path):
    ckpt = torch.load(FIXTURES / "mhc_n4.pt", weights_only=True)
    ckpt["model_args"]["hyper_conn_type"] = "kromhc"
    torch.save(ckpt, tmp_path / "kromhc.pt")
    with pytest.raises(ConfigError, match="unknown hyper_conn_type 'kromhc'"):
        HookedMHC.from_pretrained(tmp_path / "kromhc.pt")


def test_not_a_checkpoint(tmp_path):
    torch.save({"weights": {}}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="expected a nanoGPT mHC checkpoint"):
        HookedMHC.from_pretrained(tmp_path / "odd.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        HookedMHC.from_pretrained(tmp_path / "empty")


def test_inconsistent_duplicate_keys(tmp_path):
    ckpt = torch.load(FIXTURES / "mhc_n4.pt", weights_only=True)
    key = "transformer.h.0.hc_attn.branch.1.c_proj.bias"
    ckpt["model"][key] = ckpt["model"][key] + 1.0  # a new tensor: the two keys share storage
    torch.save(ckpt, tmp_path / "dup.pt")
    with pytest.raises(CheckpointError, match="should hold the same tensor"):
        HookedMHC.from_pretrained(tmp_path / "dup.pt")


def test_config_validation():
    with pytest.raises(ConfigError, match="n_streams=1"):
        MHCConfig(hyper_conn_type="none", n_streams=4)
    with pytest.raises(ConfigError, match="divisible"):
        MHCConfig(d_model=30, n_heads=4)


def test_nanogpt_args_edge_cases():
    """mhc_lite_lss means learned stream scaling whichever way it is built; a `none` checkpoint
    with hyper_conn_n > 1 is the plain residual (as in the public code); a fork's sinkhorn_iters is
    honoured and round-trips; keys nobody knows are named in a warning."""
    assert MHCConfig(hyper_conn_type="mhc_lite_lss").lss_init == 0.6
    assert HookedMHC(tiny_config("mhc_lite_lss", lss_init=None)).expand.lss is not None
    shapes = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=40)
    none = MHCConfig.from_nanogpt_args(dict(shapes, hyper_conn_type="none", hyper_conn_n=4))
    assert none.n_streams == 1
    five = MHCConfig.from_nanogpt_args(dict(shapes, hyper_conn_type="mhc", hyper_conn_n=2, sinkhorn_iters=5))
    assert five.sinkhorn_iters == 5 and MHCConfig.from_nanogpt_args(five.to_nanogpt_args()) == five
    assert "sinkhorn_iters" not in tiny_config("mhc").to_nanogpt_args()  # the public GPTConfig has none
    with pytest.warns(UserWarning, match=r"\['mhc_gate_fn'\] are not part of the public mHC code"):
        MHCConfig.from_nanogpt_args(
            dict(shapes, hyper_conn_type="mhc", hyper_conn_n=2, mhc_gate_fn="softmax")
        )


def test_bf16_checkpoint_is_built_in_bf16_without_a_float32_copy(tmp_path, tokens, monkeypatch):
    """dtype="auto" keeps a bf16 file's dtype and dtype=bf16 builds the model in bf16 directly (the
    constructor allocates in the target dtype); both equal loading in float32 and casting."""
    model = HookedMHC.from_pretrained(FIXTURES / "mhc_n4.pt")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    built_in = []
    init = HookedMHC.__init__

    def recording_init(self, *args, **kwargs):
        built_in.append(torch.get_default_dtype())
        init(self, *args, **kwargs)

    monkeypatch.setattr(HookedMHC, "__init__", recording_init)
    auto = HookedMHC.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert built_in[-1] == torch.bfloat16 and torch.get_default_dtype() == torch.float32
    assert {p.dtype for p in auto.parameters()} == {torch.bfloat16}
    cast = HookedMHC.from_pretrained(tmp_path / "bf16").to(torch.bfloat16)
    assert built_in[-1] == torch.float32 and cast.dtype == torch.bfloat16
    assert torch.equal(auto(tokens), cast(tokens))


def _all_tensors(model):
    return dict(model.named_parameters(), **dict(model.named_buffers()))


@pytest.mark.parametrize("variant", sorted(MIXERS))
@pytest.mark.parametrize(
    "layout,dtype",
    [
        ("ours", torch.float32),
        ("ours", torch.bfloat16),
        ("nanogpt", torch.float32),
        ("nanogpt", torch.bfloat16),
    ],
)
def test_loaded_model_holds_exactly_the_checkpoint(variant, layout, dtype, tmp_path):
    """Built on the meta device and assigned: every parameter and buffer equals the checkpoint's
    tensor cast to the dtype (none left at an init value, none on meta), the buffers no checkpoint
    holds (mHC-lite's permutations) equal a freshly built model's, and the global RNG is untouched."""
    model = perturbed_model(tiny_config(variant, MIXERS[variant].n_streams_required or 3, d_vocab=64), seed=3)
    if layout == "ours":
        model.save_pretrained(tmp_path / "m")
        path = tmp_path / "m"
    else:
        path = save_nanogpt(model, tmp_path / "c.pt", prefix="_orig_mod.")
    rng = torch.get_rng_state()
    loaded = HookedMHC.from_pretrained(path, dtype=dtype, tokenizer=None)
    assert torch.equal(torch.get_rng_state(), rng)
    saved, got = model.state_dict(), _all_tensors(loaded)
    with _defaults(dtype, "cpu"):
        fresh = _all_tensors(HookedMHC(model.cfg))
    assert set(got) == set(fresh)
    for name, tensor in got.items():
        assert not tensor.is_meta, name
        want = saved[name].to(dtype) if name in saved else fresh[name]
        assert tensor.dtype == want.dtype and torch.equal(tensor, want), name
    unsaved = set(got) - set(saved)
    assert unsaved == (
        {f"blocks.{l}.{s}.mixer.perms" for l in range(2) for s in ("attn", "mlp")}
        if variant.startswith("mhc_lite")
        else set()
    )
    # each parameter owns its memory: an in-place edit of one reaches no other
    ptrs = [t.data_ptr() for t in loaded.parameters()]
    assert len(set(ptrs)) == len(ptrs)


def test_loaded_model_does_not_depend_on_the_file(tmp_path, tokens):
    """The weights are read into memory, not mapped: overwriting the checkpoint after loading (the
    same folder saved again, a .pt rewritten) leaves the loaded model as it was."""
    model = perturbed_model(tiny_config("mhc", d_vocab=128, n_ctx=32))
    model.save_pretrained(tmp_path / "m")
    save_nanogpt(model, tmp_path / "c.pt")
    loaded = [HookedMHC.from_pretrained(tmp_path / "m"), HookedMHC.from_pretrained(tmp_path / "c.pt")]
    expected = model(tokens)
    other = perturbed_model(tiny_config("mhc", d_vocab=128, n_ctx=32), seed=9)
    other.save_pretrained(tmp_path / "m")
    save_nanogpt(other, tmp_path / "c.pt")
    for m in loaded:
        assert torch.equal(m(tokens), expected)


def test_a_buffer_nobody_rebuilds_is_named(tmp_path, monkeypatch):
    """A non-persistent buffer that `rebuild_buffers()` does not make again is an error, not a meta
    tensor left in a loaded model."""
    from mhc_interp.model.mixers.mhc_lite import PermutationMixer, permutation_matrices

    perturbed_model(tiny_config("mhc_lite", 3)).save_pretrained(tmp_path / "m")

    def only_once(self):  # made by the constructor (on meta), not again by the loader
        if not hasattr(self, "perms"):
            self.register_buffer("perms", permutation_matrices(self.n_streams), persistent=False)

    monkeypatch.setattr(PermutationMixer, "rebuild_buffers", only_once)
    with pytest.raises(CheckpointError, match=r"blocks.0.attn.mixer.perms.*rebuild_buffers"):
        HookedMHC.from_pretrained(tmp_path / "m")
