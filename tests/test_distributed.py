"""Causal sweeps split over 2 CPU processes (torch.distributed, gloo) give the single-process result.

The workers are started with torch.multiprocessing.spawn, as a launcher (torchrun / accelerate
launch) would; each builds the same tiny DeepSeek-V4 adapter, runs its share of the sublayers and
gets the merged result."""

import os
import sys
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DeepseekV4Config"):  # pragma: no cover
    pytest.skip("this transformers has no DeepSeek-V4", allow_module_level=True)

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from mhc_interp.adapters import HookedHFMHC, tiny_deepseek_v4  # noqa: E402
from mhc_interp.probes import ProbeResult, ablate_and_rescue, activation_patching  # noqa: E402
from mhc_interp.probes.distributed import (  # noqa: E402
    distributed_ablate_and_rescue,
    distributed_activation_patching,
    merge_sublayer_results,
    split_sublayers,
)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def prompts():
    clean = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(7))
    corrupted = clean.clone()
    corrupted[:, 5] = (corrupted[:, 5] + 3) % 96
    return clean, corrupted


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = HookedHFMHC(tiny_deepseek_v4(seed=0))
        clean, corrupted = prompts()
        rescue = distributed_ablate_and_rescue(model, clean, mode="persistent", batch_size=2)
        patching = distributed_activation_patching(model, clean, corrupted, mixing="both", batch_size=2)
        rescue.save(f"{out}/rescue_rank{rank}")
        patching.save(f"{out}/patching_rank{rank}")
        dist.barrier()  # no rank tears gloo down while its peer still talks to it
    finally:
        dist.destroy_process_group()
    # Gloo's worker threads can abort the interpreter's own teardown ("terminate called without an
    # active exception", SIGABRT; pytorch/pytorch#179291). Everything is on disk: leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def single():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = HookedHFMHC(tiny_deepseek_v4(seed=0))
        clean, corrupted = prompts()
        yield (
            model,
            ablate_and_rescue(model, clean, mode="persistent", batch_size=2),
            activation_patching(model, clean, corrupted, mixing="both", batch_size=2),
        )
    finally:
        torch.set_num_threads(before)


def assert_same(a: ProbeResult, b: ProbeResult) -> None:
    assert a.probe == b.probe and sorted(a.arrays) == sorted(b.arrays)
    assert a.meta["sublayers"] == b.meta["sublayers"]
    for key in a.arrays:
        np.testing.assert_allclose(a[key], b[key], atol=1e-6, rtol=1e-5, equal_nan=True, err_msg=key)


def test_two_gloo_processes_give_the_single_process_results(tmp_path, single):
    _, rescue, patching = single
    saved = [tmp_path / f"{name}_rank{rank}.json" for name in ("rescue", "patching") for rank in range(2)]
    try:
        mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    except mp.ProcessExitedException as crash:
        # a worker killed by a signal *after* every rank saved its result died in gloo's teardown,
        # not in the sweep; anything earlier (init, the sweeps, a Python error) fails the test
        if crash.signal_name is None or not all(path.exists() for path in saved):
            raise
        warnings.warn(f"a gloo worker crashed after saving its result: {crash}")
    for rank in range(2):  # every rank holds the merged result
        assert_same(ProbeResult.load(tmp_path / f"rescue_rank{rank}"), rescue)
        assert_same(ProbeResult.load(tmp_path / f"patching_rank{rank}"), patching)
    merged = ProbeResult.load(tmp_path / "rescue_rank0")
    assert merged.table() == rescue.table()  # the global matrix is recomputed from all sublayers


def test_split_and_merge_in_process(single):
    model, rescue, _ = single
    assert split_sublayers(range(5), 0, 2) == [0, 2, 4] and split_sublayers(range(5), 1, 2) == [1, 3]
    assert split_sublayers(range(1), 1, 2) == []
    clean, _ = prompts()
    parts = [
        (ls, ablate_and_rescue(model, clean, mode="persistent", batch_size=2, sublayers=ls))
        for ls in ([3, 0], [2], [1])
    ]
    assert_same(merge_sublayer_results(parts, range(4)), rescue)
    # without a process group the distributed helper runs everything in-process
    assert_same(distributed_ablate_and_rescue(model, clean, mode="persistent", batch_size=2), rescue)
    with pytest.raises(ValueError, match="no partial result covers sublayers \\[1\\]"):
        merge_sublayer_results(parts[:2], range(4))
    with pytest.raises(ValueError, match="two partial results"):
        merge_sublayer_results(parts + parts[2:], range(4))
