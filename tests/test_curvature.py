"""Token-trajectory curvature: reference parity, planted geometry, masking, bounded state, errors, I/O."""

import math

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from mhc_interp.hooks.names import HookNameError
from mhc_interp.probes.base import ProbeResult
from mhc_interp.probes.curvature import Curvature, CurvatureResult, sequence_curvatures, step_angles
from mhc_interp.probes.runner import run_probes

from .conftest import perturbed_model, tiny_config


# ------------------------------------------------------------------ slow, obvious reference
def ref_sequence_curvature(X, valid, eps=1e-12):
    """X [pos, d] numpy, valid [pos] bool -> (mean angle in degrees or None, n angles); loops."""
    T = X.shape[0]
    steps = [None] * (T - 1)
    for t in range(T - 1):
        if valid[t] and valid[t + 1]:
            v = X[t + 1].astype(np.float64) - X[t].astype(np.float64)
            if np.linalg.norm(v) > eps:
                steps[t] = v
    angles = []
    for t in range(T - 2):
        a, b = steps[t], steps[t + 1]
        if a is None or b is None:
            continue
        cos = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
        angles.append(math.degrees(math.acos(min(1.0, max(-1.0, cos)))))
    return (sum(angles) / len(angles) if angles else None), len(angles)


def ref_stats(curvs):
    c = np.array([k for k in curvs if k is not None], dtype=np.float64)
    mean = c.mean() if len(c) else np.nan
    sem = c.std(ddof=1) / math.sqrt(len(c)) if len(c) > 1 else np.nan
    return mean, sem, len(c)


def reference(model, rows, sites, batch_size=1, exclude_first=1, pad_id=0):
    """rows: list of token lists (ragged allowed). A full run_with_cache per chunk of `batch_size`
    rows, right-padded like the runner pads them, then python loops over sequences, columns and
    positions. Chunking like the runner matters: the model computes its mixing coefficients in
    float32 whatever its dtype, so even a float64 model's activations depend on the batch shape at
    ~1e-8 deg of curvature. `names_filter` matters too: caching hook_pattern switches attention
    from SDPA to the eager path (float32 softmax), which the runner's forward does not take."""
    n = model.cfg.n_streams
    mean = np.zeros((len(sites), n + 1))
    sem = np.zeros_like(mean)
    count = np.zeros_like(mean, dtype=np.int64)
    per = {(i, k): [] for i in range(len(sites)) for k in range(n + 1)}
    for c in range(0, len(rows), batch_size):
        chunk = rows[c : c + batch_size]
        width = max(len(r) for r in chunk)
        toks = torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in chunk])
        _, cache = model.run_with_cache(toks, names_filter=list(sites))
        for b, row in enumerate(chunk):
            valid = np.zeros(width, bool)
            valid[exclude_first : len(row)] = True
            for i, site in enumerate(sites):
                X = cache[site][b].detach().double().numpy()  # [pos, n, d]
                for k in range(n + 1):
                    Xk = X[:, k] if k < n else X.sum(1)
                    per[(i, k)].append(ref_sequence_curvature(Xk, valid)[0])
    for (i, k), curvs in per.items():
        mean[i, k], sem[i, k], count[i, k] = ref_stats(curvs)
    return mean, sem, count


class _RaggedDataset:
    """Just enough of a datasets.Dataset for the runner: ragged `input_ids` rows."""

    column_names = ["input_ids"]

    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter({"input_ids": r} for r in self.rows)


@pytest.fixture(scope="module")
def mhc():
    # float64 weights keep activation rounding (and so reference-vs-probe differences) far below 1e-9
    return perturbed_model(tiny_config("mhc", 4), seed=1).double()


# ------------------------------------------------------------------------- 1. parity
def test_matches_reference_and_batch_size_invariant(mhc):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, mhc.cfg.d_vocab, (7, 12), generator=g)
    sites = ["hook_streams_init"] + [f"blocks.{l}.mlp.hook_streams_out" for l in range(mhc.cfg.n_layers)]
    results = {}
    for bs in (1, 2, 3):
        mean, sem, count = reference(mhc, tokens.tolist(), sites, batch_size=bs)
        r = run_probes(mhc, Curvature(), tokens, batch_size=bs, progress=False)
        assert r.meta["site_names"] == sites
        assert r["mean"].shape == (3, 5) and r.meta["columns"][-1] == "sum"
        np.testing.assert_allclose(r["mean"], mean, rtol=0, atol=1e-9)
        np.testing.assert_allclose(r["sem"], sem, rtol=0, atol=1e-9)
        np.testing.assert_array_equal(r["n_sequences"], count)
        np.testing.assert_allclose(r["change_from_first"], mean - mean[:1], rtol=0, atol=1e-9)
        assert np.all((mean > 0) & (mean < 180)) and np.all(sem > 0)
        results[bs] = r
    # across runner batch sizes the activations themselves differ by float32 rounding of the
    # mixing coefficients (~5e-8 deg here); the probe's own batching invariance is tested exactly
    # in test_online_aggregation_ignores_batching
    for bs in (2, 3):
        np.testing.assert_allclose(results[bs]["mean"], results[1]["mean"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(results[bs]["sem"], results[1]["sem"], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(results[bs]["n_sequences"], results[1]["n_sequences"])


def test_online_aggregation_ignores_batching(mhc):
    """The same activations fed in batches of 1, 2, 3 or all at once give the same result."""
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, mhc.cfg.d_vocab, (7, 12), generator=g)
    probe0 = Curvature(sites="sublayers")
    probe0.setup(mhc)
    _, cache = mhc.run_with_cache(tokens, names_filter=probe0.site_names)
    acts = {n: cache[n] for n in probe0.site_names}
    mask = torch.ones(7, 12, dtype=torch.bool)
    mask[:, 0] = False
    mask[2, 7:] = False  # ragged tails too
    mask[5, 4:] = False
    results = []
    for bs in (7, 1, 2, 3):
        probe = Curvature(sites="sublayers")
        probe.setup(mhc)
        for c in range(0, 7, bs):
            probe.update({n: a[c : c + bs] for n, a in acts.items()}, mask[c : c + bs])
        results.append(probe.result())
    for r in results[1:]:
        for key in ("mean", "sem", "change_from_first"):
            np.testing.assert_allclose(r[key], results[0][key], rtol=1e-13, atol=1e-12)
        for key in ("n_sequences", "n_skipped", "n_angles"):
            np.testing.assert_array_equal(r[key], results[0][key])
    assert results[0]["n_angles"][0, 0] == 5 * 9 + 4 + 1


def test_ragged_padding_and_sublayers_match_reference(mhc):
    g = torch.Generator().manual_seed(3)
    lengths = [12, 5, 9, 3, 2, 11]  # lengths 2 and 3 leave no angle after position 0 is masked
    rows = [torch.randint(1, mhc.cfg.d_vocab, (n,), generator=g).tolist() for n in lengths]
    probe = Curvature(sites="sublayers")
    r = run_probes(mhc, probe, _RaggedDataset(rows), batch_size=4, progress=False)
    sites = r.meta["site_names"]
    assert len(sites) == 2 * mhc.cfg.n_layers + 1 and sites[0] == "hook_streams_init"
    mean, sem, count = reference(mhc, rows, sites, batch_size=4)
    np.testing.assert_allclose(r["mean"], mean, rtol=0, atol=1e-9)
    np.testing.assert_allclose(r["sem"], sem, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(r["n_sequences"], count)
    assert np.all(r["n_sequences"] == 4) and np.all(r["n_skipped"] == 2)


def test_single_stream_model_columns_coincide():
    model = perturbed_model(tiny_config("none", 1), seed=2).double()
    tokens = torch.randint(0, model.cfg.d_vocab, (5, 12), generator=torch.Generator().manual_seed(1))
    r = run_probes(model, Curvature(), tokens, batch_size=2, progress=False)
    assert r["mean"].shape == (model.cfg.n_layers + 1, 2)
    np.testing.assert_allclose(r["mean"][:, 0], r["mean"][:, 1], atol=1e-12)
    mean, _, _ = reference(model, tokens.tolist(), r.meta["site_names"], batch_size=2)
    np.testing.assert_allclose(r["mean"], mean, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------- 2. planted geometry
def _line(batch, pos, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(batch, 1, d, generator=g), torch.randn(batch, 1, d, generator=g)
    return a + torch.arange(pos, dtype=torch.float64).view(1, pos, 1) * b.double()


def _turning(batch, pos, d, theta_deg, seed=0):
    """A planar polygonal path whose consecutive steps turn by exactly theta, embedded in R^d."""
    g = torch.Generator().manual_seed(seed)
    th = math.radians(theta_deg)
    t = torch.arange(pos - 1, dtype=torch.float64)
    steps2 = torch.stack([torch.cos(t * th), torch.sin(t * th)], -1)  # [pos-1, 2]
    out = []
    for _ in range(batch):
        basis, _ = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))
        scale = 0.5 + torch.rand((), generator=g, dtype=torch.float64)
        steps = scale * steps2 @ basis.T  # [pos-1, d]
        start = torch.randn(1, d, generator=g, dtype=torch.float64)
        out.append(torch.cat([start, start + steps.cumsum(0)], 0))
    return torch.stack(out)  # [batch, pos, d]


def test_planted_geometry_helper():
    g = torch.Generator().manual_seed(0)
    iid = torch.randn(4, 40, 2000, generator=g)
    k = sequence_curvatures(iid)
    assert k.dtype == torch.float64 and k.shape == (4,)
    assert torch.all((k - 120).abs() < 2), k
    assert torch.all(sequence_curvatures(_line(3, 20, 64)).abs() < 1e-6)
    for theta in (10.0, 45.0, 90.0, 135.0, 170.0):
        k, n = sequence_curvatures(_turning(3, 15, 32, theta), return_counts=True)
        np.testing.assert_allclose(k.numpy(), theta, atol=1e-8)
        assert torch.all(n == 13)
    # a random walk (i.i.d. increments) in high dimension turns by ~90 degrees
    walk = torch.randn(2, 60, 2000, generator=g).cumsum(1)
    assert torch.all((sequence_curvatures(walk) - 90).abs() < 2)


def test_planted_geometry_through_update():
    batch, pos, d = 3, 30, 2000
    streams = torch.stack(
        [
            _line(batch, pos, d, seed=1),
            torch.randn(batch, pos, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64),
            _turning(batch, pos, d, 60.0, seed=3),
        ],
        2,
    ).float()  # [batch, pos, 3, d]
    mask = torch.ones(batch, pos, dtype=torch.bool)
    mask[:, 0] = False
    probe = Curvature(sites=["hook_streams_init", "blocks.0.mlp.hook_streams_out"])
    # site 1: every stream is the same straight line -> 0 everywhere, sum included
    same_line = _line(batch, pos, d, seed=4).float().unsqueeze(2).expand(-1, -1, 3, -1)
    for _ in range(2):  # two identical batches: same means, 2x the sequences
        probe.update({"hook_streams_init": streams, "blocks.0.mlp.hook_streams_out": same_line}, mask)
    r = probe.result()
    assert r["mean"].shape == (2, 4) and r.meta["columns"] == ["stream 0", "stream 1", "stream 2", "sum"]
    assert abs(r["mean"][0, 0]) < 1e-3  # float32 storage of a line: tiny rounding kinks
    assert abs(r["mean"][0, 1] - 120) < 2
    assert abs(r["mean"][0, 2] - 60) < 1e-2
    assert np.all(np.abs(r["mean"][1]) < 1e-3)
    np.testing.assert_array_equal(r["n_sequences"], 2 * batch)
    np.testing.assert_array_equal(r["n_angles"], 2 * batch * (pos - 3))
    # helper agrees with the probe on the sum column
    k = sequence_curvatures(streams.double().sum(2), mask)
    np.testing.assert_allclose(r["mean"][0, 3], k.mean().item(), atol=1e-10)
    np.testing.assert_allclose(r["change_from_first"][1], r["mean"][1] - r["mean"][0])


# ------------------------------------------------------------------------------ 3. masking
def test_zero_length_steps_are_excluded():
    x = _turning(2, 10, 8, 50.0, seed=5)
    dup = torch.cat([x[:, :4], x[:, 3:4], x[:, 4:]], 1)  # point 3 repeated
    _, valid = step_angles(dup)
    assert valid.shape == (2, 9)
    # step 3 (3 -> 3') has length 0: angles 2 (steps 2,3) and 3 (steps 3,4) are dropped, not joined
    assert valid[0].tolist() == [True, True, False, False, True, True, True, True, True]
    k, n = sequence_curvatures(dup, return_counts=True)
    np.testing.assert_allclose(k.numpy(), 50.0, atol=1e-8)
    assert n.tolist() == [7, 7]
    for b in range(2):
        ref_k, ref_n = ref_sequence_curvature(dup[b].numpy(), np.ones(11, bool))
        assert ref_n == 7 and abs(ref_k - k[b].item()) < 1e-9
    # a sequence of one repeated point has no angle at all
    const = torch.ones(1, 6, 4)
    assert torch.isnan(sequence_curvatures(const)).all()


def test_masked_positions_break_trajectories():
    x = _turning(1, 10, 8, 40.0, seed=6)
    x[0, 5] = float("nan")  # ignored: masked
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, 5] = False
    _, valid = step_angles(x, mask)
    # valid steps 0..3 (positions 0-4) and 6..8 (positions 6-9): angles 0,1,2 and 6,7
    assert valid[0].tolist() == [True, True, True, False, False, False, True, True]
    k, n = sequence_curvatures(x, mask, return_counts=True)
    assert n.item() == 5 and abs(k.item() - 40.0) < 1e-8
    # bridging the gap (a step 4 -> 6) would give a different answer
    bridged = torch.cat([x[:, :5], x[:, 6:]], 1)
    assert abs(sequence_curvatures(bridged).item() - 40.0) > 1.0
    ref_k, ref_n = ref_sequence_curvature(np.nan_to_num(x[0].numpy()), mask[0].numpy())
    assert ref_n == 5 and abs(ref_k - k.item()) < 1e-9
    # too few valid positions -> NaN curvature, and the probe counts the sequence as skipped
    clean = _turning(2, 10, 8, 40.0, seed=7)
    short = torch.zeros(2, 10, dtype=torch.bool)
    short[0, 2:4] = True  # one step, no angle
    short[1, 1:] = True
    k = sequence_curvatures(clean, short)
    assert torch.isnan(k[0]) and abs(k[1].item() - 40.0) < 1e-8
    probe = Curvature(sites=["hook_streams_init"])
    probe.update({"hook_streams_init": clean.unsqueeze(2).float()}, short)
    r = probe.result()
    assert r["n_sequences"].tolist() == [[1, 1]] and r["n_skipped"].tolist() == [[1, 1]]
    assert abs(r["mean"][0, 0] - 40.0) < 1e-3 and np.isnan(r["sem"]).all()  # SEM needs 2 sequences


# -------------------------------------------------------------------------- 4. bounded state
def _state_size(probe):
    total = 0
    for v in vars(probe).values():
        if isinstance(v, np.ndarray):
            total += v.nbytes
        elif isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, (list, tuple, dict)):
            total += len(v)
    return total


def test_state_does_not_grow():
    probe = Curvature(sites=["hook_streams_init", "blocks.0.attn.hook_streams_out"])
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(4, 9, dtype=torch.bool)
    sizes = []
    for i in range(60):
        acts = {n: torch.randn(4, 9, 2, 16, generator=g) for n in probe.site_names}
        probe.update(acts, mask)
        sizes.append((_state_size(probe), probe.state_nbytes()))
    assert len(set(sizes)) == 1
    r = probe.result()
    assert r["n_sequences"].tolist() == [[240] * 3] * 2
    assert np.all(np.abs(r["mean"] - 120) < 15)  # d = 16: near, not at, the high-d baseline


# --------------------------------------------------------------------------------- 5. errors
def test_bad_sites(mhc):
    with pytest.raises(ValueError, match="must be stream states"):
        Curvature(sites=["blocks.0.mlp.hook_streams_outt"])
    with pytest.raises(ValueError, match="sites must be"):
        Curvature(sites="layer")
    with pytest.raises(ValueError, match="control_fraction"):
        Curvature(control_fraction=0)
    with pytest.raises(HookNameError, match="unknown hook name"):
        run_probes(
            mhc,
            Curvature(sites=["blocks.7.mlp.hook_streams_out"]),
            torch.zeros(1, 4, dtype=torch.long),
            progress=False,
        )
    with pytest.raises(RuntimeError, match="setup"):
        Curvature().update({}, torch.ones(1, 3, dtype=torch.bool))
    probe = Curvature(sites=["hook_streams_init"])
    with pytest.raises(KeyError, match="missing"):
        probe.update(
            {"blocks.0.mlp.hook_streams_out": torch.zeros(1, 3, 2, 4)}, torch.ones(1, 3, dtype=torch.bool)
        )


def test_nan_activation_raises():
    probe = Curvature(sites=["hook_streams_init"])
    x = torch.randn(2, 8, 2, 16)
    x[1, 4, 0, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        probe.update({"hook_streams_init": x}, torch.ones(2, 8, dtype=torch.bool))
    x[1, 4, 0, 3] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite"):
        sequence_curvatures(x[:, :, 0])
    # the same NaN at a masked position is harmless
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 4] = False
    probe = Curvature(sites=["hook_streams_init"])
    probe.update({"hook_streams_init": x}, mask)
    assert np.isfinite(probe.result()["mean"]).all()


# ------------------------------------------------------------------------------------ 6. I/O
def test_save_load_and_plot(mhc, tmp_path):
    tokens = torch.randint(0, mhc.cfg.d_vocab, (4, 12), generator=torch.Generator().manual_seed(2))
    r = run_probes(mhc, Curvature(), tokens, batch_size=2, progress=False)
    path = r.save(tmp_path / "curv")
    back = ProbeResult.load(tmp_path / "curv")
    assert path.exists() and isinstance(back, CurvatureResult)
    assert back.meta["site_names"] == r.meta["site_names"] and back.meta["columns"] == r.meta["columns"]
    for key, value in r.arrays.items():
        np.testing.assert_array_equal(back[key], value)
    fig = back.plot()
    fig.savefig(tmp_path / "curv.png")
    assert (tmp_path / "curv.png").stat().st_size > 1000
    files = back.save_figures(tmp_path / "figs")
    assert files[0].exists() and files[0].suffix == ".png"
    ax = fig.axes[0]
    assert ax.get_ylabel() == "curvature (degrees)" and len(ax.get_xticks()) == mhc.cfg.n_layers + 1


# ---------------------------------------------------------------------------- 7. controls
@pytest.mark.parametrize(
    "fraction,rows", [(1.0, [0, 1, 2, 3, 4]), (0.25, [0, 2, 4]), (0.75, [0, 1, 2, 3, 4])]
)
def test_shuffled_token_control_matches_reference(mhc, fraction, rows):
    """The control is the curvature of each batch's first ceil(control_fraction x batch) windows
    (batches of 2 here) with the valid positions' tokens permuted within each row (position 0 and
    padding stay), one seeded permutation per row in order; the real curvature uses every row."""
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, mhc.cfg.d_vocab, (5, 12), generator=g)
    r = run_probes(mhc, Curvature(seed=3, control_fraction=fraction), tokens, batch_size=2, progress=False)
    gen = torch.Generator().manual_seed(3)
    shuffled = tokens[rows].clone()
    for b, row in enumerate(rows):
        idx = torch.arange(1, 12)
        shuffled[b, idx] = tokens[row, idx[torch.randperm(11, generator=gen)]]
    assert not torch.equal(shuffled, tokens[rows])
    assert torch.equal(shuffled.sort(1).values, tokens[rows].sort(1).values)
    assert torch.equal(shuffled[:, 0], tokens[rows, 0])
    mean, sem, count = reference(mhc, shuffled.tolist(), r.meta["site_names"], batch_size=2)
    assert r.meta["control_fraction"] == fraction
    np.testing.assert_allclose(r["shuffled_mean"], mean, rtol=0, atol=1e-9)
    np.testing.assert_allclose(r["shuffled_sem"], sem, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(r["shuffled_n_sequences"], count)
    # the real curvature is untouched by the control
    real, _, _ = reference(mhc, tokens.tolist(), r.meta["site_names"], batch_size=2)
    np.testing.assert_allclose(r["mean"], real, rtol=0, atol=1e-9)
    assert r.meta["baselines"] == {"iid_points": 120.0, "random_walk": 90.0}
    assert r.meta["shuffled_control"] is True
    off = run_probes(mhc, Curvature(shuffled_control=False), tokens, batch_size=2, progress=False)
    assert "shuffled_mean" not in off.arrays and off.meta["shuffled_control"] is False
    np.testing.assert_array_equal(off["mean"], r["mean"])


def test_shuffle_keeps_masked_positions():
    from mhc_interp.probes.curvature import shuffle_valid_positions

    tokens = torch.arange(24).view(3, 8)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[:, 0] = False
    mask[1, 5:] = False  # padding
    out = shuffle_valid_positions(tokens, mask, torch.Generator().manual_seed(0))
    assert torch.equal(out[~mask], tokens[~mask])
    for b in range(3):
        assert sorted(out[b, mask[b]].tolist()) == sorted(tokens[b, mask[b]].tolist())
    assert not torch.equal(out, tokens)


def test_iid_and_random_walk_baselines_exact_in_low_dimension():
    """120° (i.i.d. points) and 90° (random walk) hold in any dimension, not only as d -> inf:
    within 4 s.e.m. in d = 2 and 3 with uniform (non-Gaussian) points and Laplace-like steps."""
    from mhc_interp.probes.curvature import IID_POINTS_DEG, RANDOM_WALK_DEG

    g = torch.Generator().manual_seed(0)
    for d in (2, 3):
        iid = sequence_curvatures(torch.rand(400, 200, d, generator=g, dtype=torch.float64))
        steps = torch.randn(400, 200, d, generator=g, dtype=torch.float64) ** 3  # symmetric, heavy-tailed
        walk = sequence_curvatures(steps.cumsum(1))
        for k, target in ((iid, IID_POINTS_DEG), (walk, RANDOM_WALK_DEG)):
            sem = k.std() / len(k) ** 0.5
            assert abs(k.mean().item() - target) < 4 * sem.item(), (d, k.mean().item(), target)


def test_rows_too_short_for_an_angle_raise(mhc):
    """Rows of 3 tokens leave 2 valid positions after position 0: one step, no angle. That is an
    error naming the reason, not a silent NaN result."""
    tokens = torch.randint(0, mhc.cfg.d_vocab, (4, 3), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"needs >= 3 consecutive valid positions.*longest sequence had 2"):
        run_probes(mhc, Curvature(), tokens, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="needs >= 3"):
        run_probes(mhc, Curvature(), tokens[:, :2], batch_size=2, progress=False)
    # a column without any angle (a constant stream) among valid ones: NaN with a warning
    probe = Curvature(sites=["hook_streams_init"])
    x = torch.randn(2, 8, 2, 4, generator=torch.Generator().manual_seed(1))
    x[:, :, 1] = 1.0
    probe.update({"hook_streams_init": x}, torch.ones(2, 8, dtype=torch.bool))
    with pytest.warns(UserWarning, match=r"no valid angle .*embed/stream 1"):
        r = probe.result()
    assert np.isnan(r["mean"][0, 1]) and np.isfinite(r["mean"][0, 0])


def test_plot_shows_the_controls(mhc):
    tokens = torch.randint(0, mhc.cfg.d_vocab, (4, 12), generator=torch.Generator().manual_seed(2))
    r = run_probes(mhc, Curvature(), tokens, batch_size=2, progress=False)
    fig = r.plot()
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert {"shuffled-token control (dotted)", "i.i.d. points (120°)", "random walk (90°)"} <= set(labels)
    dotted = [l for l in fig.axes[0].lines if l.get_linestyle() == ":"]
    assert len(dotted) == mhc.cfg.n_streams + 1
    np.testing.assert_allclose(dotted[-1].get_ydata(), r["shuffled_mean"][:, -1])
