"""SAELens interop (mhc_interp.interop): train an SAE with SAELens's own runner on one stream of a
shipped model, save / load it in SAELens's format, splice it, evaluate it, read its features.

SAELens 6.x pins transformer-lens<4, so these run in the second environment (CI: .venv-saelens,
`pip install -e ".[saelens]"`) and are skipped in the default one (transformer-lens 4).
"""

import pytest
import torch
from torch.nn import functional as F

pytest.importorskip(
    "sae_lens",
    reason="SAELens is not installed: it needs transformer-lens<4; install the "
    "extra in its own venv: pip install torch==2.13.0 -e '.[saelens]'",
)

from sae_lens import SAE, TopKSAE, TopKSAEConfig  # noqa: E402

from mhc_interp import HookedMHC  # noqa: E402
from mhc_interp.interop.sae_features import SAEFeatures  # noqa: E402
from mhc_interp.interop.saelens import (  # noqa: E402
    StreamAdapter,
    check_sae,
    check_site,
    evaluate_sae,
    sae_hook,
    splice_sae,
    token_datasets,
    train_stream_sae,
)
from mhc_interp.probes import run_probes  # noqa: E402
from mhc_interp.shipped import resolve_model_path  # noqa: E402

HOOK = "blocks.1.attn.hook_streams_in"
SITE = HOOK + "[1]"
CTX = 32


@pytest.fixture(scope="module")
def model():
    return HookedMHC.from_pretrained(resolve_model_path("tiny-mhc-n4")).eval()  # d_model 32, 4 streams


@pytest.fixture(scope="module")
def windows(model):
    torch.manual_seed(0)
    return torch.randint(0, model.cfg.d_vocab, (96, CTX))


@pytest.fixture(scope="module")
def trained(model, windows, tmp_path_factory):
    """(trained SAE, its folder): a tiny TopK SAE on stream 1 of blocks.1.attn.hook_streams_in,
    trained by SAELens's LanguageModelSAETrainingRunner through the adapter (seconds)."""
    out = tmp_path_factory.mktemp("sae")
    train, _ = token_datasets(windows, eval_fraction=0.25)
    sae = train_stream_sae(
        model,
        SITE,
        train,
        out=out,
        d_sae=64,
        k=8,
        context_size=CTX,
        training_tokens=12_000,
        train_batch_size_tokens=256,
        store_batch_size_prompts=8,
        n_batches_in_buffer=16,
        lr=3e-3,
    )
    return sae, out


def kl(clean: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over tokens of KL(p_clean || p_other) of next-token distributions."""
    return (
        F.kl_div(other.log_softmax(-1), clean.log_softmax(-1), log_target=True, reduction="none")
        .sum(-1)
        .mean()
        .item()
    )


def no_hooks(model) -> bool:
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


def test_train_save_load_splice(model, windows, trained):
    sae, out = trained
    loaded = SAE.load_from_disk(out)  # SAELens's own format and loader
    assert loaded.cfg.metadata.hook_name == SITE and loaded.cfg.d_in == model.cfg.d_model
    x = torch.randn(5, model.cfg.d_model)
    torch.testing.assert_close(loaded(x), sae(x))
    tokens = windows[-24:]
    with torch.no_grad():
        clean = model(tokens)
        with splice_sae(model, loaded):
            spliced = model(tokens)
        ablated = model.run_with_hooks(tokens, fwd_hooks=[model.stream_hook(HOOK, 1, 0.0)])
    assert no_hooks(model)
    kl_sae, kl_zero = kl(clean, spliced), kl(clean, ablated)
    assert 0 < kl_sae < kl_zero, (kl_sae, kl_zero)

    # SAELens's own evaluation through the adapter splices the same stream and ablates the same
    # stream: its KLs over the same windows equal the ones computed here by hand
    _, held_out = token_datasets(windows, eval_fraction=0.25)
    metrics = evaluate_sae(model, loaded, held_out, n_batches=1, batch_size_prompts=24)
    assert metrics["kl_div_with_sae"] == pytest.approx(kl_sae, rel=1e-4)
    assert metrics["kl_div_with_ablation"] == pytest.approx(kl_zero, rel=1e-4)
    # (the tiny model on random tokens has nearly constant states: the cosine, not the explained
    # variance, shows that the few-step SAE reconstructs them)
    assert 0 < metrics["l0"] <= 8 and metrics["cossim"] > 0.9 and metrics["mse"] > 0
    assert no_hooks(model)


def test_adapter_exposes_one_stream(model, windows):
    tokens = windows[:3]
    adapter = StreamAdapter(model)
    _, cache = adapter.run_with_cache(tokens, names_filter=[SITE])
    _, full = model.run_with_cache(tokens, names_filter=[HOOK])
    assert cache[SITE].shape == (3, CTX, model.cfg.d_model)
    torch.testing.assert_close(cache[SITE], full[HOOK][:, :, 1], rtol=0, atol=0)
    # a hook on the site edits stream 1 only: the same as zeroing that stream at the real hook
    zeroed = adapter.run_with_hooks(tokens, fwd_hooks=[(SITE, lambda x, hook: torch.zeros_like(x))])
    expected = model.run_with_hooks(tokens, fwd_hooks=[model.stream_hook(HOOK, 1, 0.0)])
    torch.testing.assert_close(zeroed, expected, rtol=0, atol=0)
    torch.testing.assert_close(adapter(tokens), model(tokens), rtol=0, atol=0)

    # hooks never stay attached, also when a hook raises
    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        adapter.run_with_hooks(tokens, fwd_hooks=[(SITE, boom)])
    assert no_hooks(model) and no_hooks(adapter)
    with pytest.raises(ValueError, match="stream-valued"):
        adapter.run_with_cache(tokens, names_filter=[HOOK])  # the bare hook is never flattened


def test_bad_sites(model):
    with pytest.raises(ValueError, match=r"stream-valued .*choose one stream"):
        check_site(model, HOOK)  # a stream state needs an index
    with pytest.raises(ValueError, match="has no stream axis"):
        check_site(model, "blocks.1.attn.hook_read[1]")  # an index on a [b, p, d] hook
    with pytest.raises(ValueError, match="not an SAE input"):
        check_site(model, "blocks.1.attn.hook_pattern")
    with pytest.raises(IndexError, match="out of range"):
        check_site(model, HOOK + "[4]")
    with pytest.raises(KeyError, match="unknown hook name"):
        check_site(model, "blocks.1.attn.hook_stream_in[0]")
    with pytest.raises(ValueError, match="stream-valued"):  # refused before any training
        train_stream_sae(model, HOOK, dataset=None)


def test_bad_saes(model, trained):
    sae, _ = trained
    with pytest.raises(
        ValueError,
        match=r"trained on 'blocks.1.attn.hook_streams_in\[1\]' but is being "
        r"spliced into 'blocks.2.attn.hook_streams_in\[1\]'",
    ):
        with splice_sae(model, sae, site="blocks.2.attn.hook_streams_in[1]"):
            pass
    with pytest.raises(ValueError, match=r"trained on .*\[1\]' but is being spliced into .*\[0\]'"):
        sae_hook(model, sae, site=HOOK + "[0]")  # another stream of the same hook
    wrong = TopKSAE(TopKSAEConfig(d_in=16, d_sae=8, k=2))
    wrong.cfg.metadata.hook_name = SITE
    with pytest.raises(ValueError, match=r"d_in=16 does not match the model's d_model=32"):
        check_sae(model, wrong)
    anonymous = TopKSAE(TopKSAEConfig(d_in=32, d_sae=8, k=2))
    with pytest.raises(ValueError, match="records no hook_name"):
        check_sae(model, anonymous)
    with pytest.raises(RuntimeError, match="inside"):  # the splice never outlives its block
        with splice_sae(model, sae):
            raise RuntimeError("inside")
    assert no_hooks(model)


def test_sae_features_probe(model, windows, trained, tmp_path):
    _, out = trained
    probe = SAEFeatures(str(out), sites="sublayers")
    res = run_probes(model, probe, windows[:16], batch_size=8, progress=False)
    n_sub = model.cfg.n_sublayers
    assert res["frequency"].shape == (64, n_sub, model.cfg.n_streams)
    assert res.meta["home_site"] == SITE and res.meta["sites"][2] == HOOK
    torch.testing.assert_close(
        torch.as_tensor(res["home_frequency"]), torch.as_tensor(res["frequency"][:, 2, 1])
    )
    l0 = res["frequency"].sum(0)  # [sites, streams]: TopK k=8 at most
    assert (l0 <= 8 + 1e-9).all() and l0[2, 1] > 0
    assert ((res["mean_activation"] > 0) == (res["frequency"] > 0)).all()
    assert res.load(res.save(tmp_path / "r"))["frequency"].shape == res["frequency"].shape
    with pytest.raises(TypeError, match="needs an SAE"):
        SAEFeatures()


def test_example_end_to_end(tmp_path):
    """examples/saelens_stream_sae.py --fast --stream 1 on the demo model and the shipped corpus:
    trains with SAELens's single-SAE runner, writes SAELens's format, splices, evaluates."""
    import runpy
    from pathlib import Path

    script = Path(__file__).parent.parent / "examples" / "saelens_stream_sae.py"
    out = runpy.run_path(str(script))["main"](
        ["--fast", "--stream", "1", "--tokens", "4000", "--out", str(tmp_path)]
    )
    site = "blocks.2.attn.hook_streams_in[1]"
    m = out["metrics"][site]
    assert list(out["metrics"]) == [site] and m["kl_div_with_sae"] < m["kl_div_with_ablation"]
    assert (
        SAE.load_from_disk(tmp_path / "saes" / "blocks.2.attn.hook_streams_in.s1").cfg.metadata.hook_name
        == site
    )
    assert (tmp_path / "sae_streams.png").stat().st_size > 2000 and (tmp_path / "sae_features.png").is_file()
    assert out["features"].meta["home_site"] == site


def test_report_section(model, trained, tmp_path):
    """`mhc-interp report --sae FOLDER`: the SAE's features get their own section and results."""
    import json

    from mhc_interp.report import ReportConfig, build_report

    _, out = trained
    others = (
        "stream_usage",
        "cka",
        "predictability",
        "curvature",
        "logit_lens",
        "head_detector",
        "ablate_rescue",
        "activation_patching",
        "attribution_patching",
    )
    cfg = ReportConfig(max_tokens=256, seq_len=CTX, progress=False, skip=others, sae=str(out))
    index = build_report(model, tmp_path / "rep", cfg=cfg)
    written = json.loads((index.parent / "report.json").read_text())
    assert [s["probe"] for s in written["sections"]] == ["sae_features"]
    assert (index.parent / "results" / "sae_features.npz").is_file() and written["sections"][0]["figures"]
