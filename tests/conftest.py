import os
from pathlib import Path

# OpenMP's idle threads sleep instead of spinning, in this process and the ones tests start (CLI
# runs, two-process gloo runs, examples): spinning threads take shared cores from the threads they
# wait for (see benchmarks/README.md). Read once, when torch is first imported: hence before it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from mhc_interp import HookedMHC, MHCConfig

FIXTURES = Path(__file__).parent / "fixtures" / "reference_checkpoints"
REFERENCE_NAMES = ["mhc_n4", "mhc_lite_n4", "mhc_lite_lss_n4", "hc_n4", "mhc_n2", "residual"]


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The test models are tiny: one intra-op thread is faster than two, and far faster when
    the cores are busy (thread synchronisation dominates such small ops)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokens():
    return torch.load(FIXTURES / "tokens.pt", weights_only=True)


def tiny_config(hyper_conn_type="mhc", n_streams=4, **kw) -> MHCConfig:
    base = dict(
        n_layers=2,
        n_heads=2,
        d_model=16,
        n_ctx=12,
        d_vocab=40,
        n_streams=n_streams,
        hyper_conn_type=hyper_conn_type,
    )
    if hyper_conn_type == "mhc_lite_lss":
        base["lss_init"] = 0.6
    base.update(kw)
    return MHCConfig(**base)


# Compiled tests: inductor takes ~10-60 s per graph on a 2-core CPU, and a graph is shared by every
# model of the same shapes (parameters are graph inputs), so every compiled test builds its model
# from `compile_test_config()` and runs it on [batch, pos] = COMPILE_SHAPE: the graphs one test
# compiles serve all the others in the session.
COMPILE_SHAPE = (3, 9)


def compile_test_config(hyper_conn_type: str = "mhc") -> MHCConfig:
    """`tiny_config` with a 3-iteration Sinkhorn: the unrolled loop is most of the mixer's graph
    (and of its compile time); what the compiled tests check does not depend on its length."""
    return tiny_config(hyper_conn_type, sinkhorn_iters=3)


def perturbed_model(cfg: MHCConfig, seed: int = 0) -> HookedMHC:
    """A random model whose every parameter is perturbed, so every term of the forward matters."""
    torch.manual_seed(seed)
    model = HookedMHC(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def mhc_model():
    return HookedMHC.from_pretrained(FIXTURES / "mhc_n4.pt")


def planted_reader_model(reader: int = 0, dropped: int = 1) -> HookedMHC:
    """An `hc` model with static coefficients: every sublayer reads only stream `reader`
    (H_pre one-hot), and H_res is the identity except that source stream `dropped` is not carried
    on (its column is zero). Stream `dropped`'s input therefore never reaches the output."""
    model = perturbed_model(tiny_config("hc"), seed=1)
    n = model.cfg.n_streams
    h_res = torch.eye(n)
    h_res[:, dropped] = 0.0
    with torch.no_grad():
        for sub in model.sublayers:
            m = sub.mixer
            m.dynamic_alpha_fn.zero_()
            m.dynamic_beta_fn.zero_()
            m.static_alpha.copy_(torch.cat([torch.eye(n)[:, reader : reader + 1], h_res.T], dim=1))
            m.static_beta.copy_(torch.linspace(0.5, 1.5, n))
    return model
