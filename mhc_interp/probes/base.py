"""The probe contract: how every probe - built in or yours - is written.

A probe is a streaming reducer over a corpus:

    class MyProbe(Probe):
        name = "my_probe"                               # registry key and result label
        def hook_names(self, model) -> list[str]: ...   # the hook points it needs cached
        def update(self, acts, mask) -> None: ...       # one batch: acts {name: tensor}, mask [batch, pos]
        def result(self) -> ProbeResult: ...            # plain arrays + metadata

The runner (`mhc_interp.probes.runner.run_probes`) owns batching, devices, dtype, position
masking (BOS / position 0 and padding excluded by default), progress bars, NaN checks and
sharing one forward among several probes. `update` must aggregate online: its state may not grow
with the number of batches. `setup(model)` (optional) validates the model and sizes the state.
`own_runs(model, tokens, mask)` (optional) is called after each shared forward, for forwards a
probe needs beyond it (e.g. a control on altered tokens).

A probe shows up in `mhc-interp report` by declaring its section, `report = ReportSection(title,
captions={figure name: caption})`: the report runs it in its shared forward (built by
`for_report(cfg)`, `cls()` by default) or, where its `report_run` returns results, on prompts of
its own, and shows the figures of its result's `plot()` and the tables of its `tables()`.

Results are `ProbeResult`s: a dict of numpy arrays plus JSON metadata, saved as `PATH.json` +
`PATH.npz` and loaded back with `ProbeResult.load(PATH)`, with a `plot()` per probe.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch
from torch import Tensor

from ..registry import register

PROBES: Dict[str, Type["Probe"]] = {}
RESULTS: Dict[str, Type["ProbeResult"]] = {}


def register_probe(cls: Type["Probe"]) -> Type["Probe"]:
    """Class decorator: make a probe available by its `name` (e.g. to the CLI); a name another
    probe holds is refused."""
    return register(PROBES, cls.name, cls, "probe")


def register_result(cls: Type["ProbeResult"]) -> Type["ProbeResult"]:
    """Class decorator: let `ProbeResult.load` rebuild this result class by its name."""
    return register(RESULTS, cls.__name__, cls, "result class")


def get_probe(name: str, **kwargs) -> "Probe":
    if name not in PROBES:
        raise KeyError(f"unknown probe {name!r}; registered probes: {sorted(PROBES)}")
    return PROBES[name](**kwargs)


def masked_rows(mask: Tensor, device=None) -> Tensor:
    """Flat indices [N] of the True entries of a [batch, pos] mask (on `device`): found once per
    batch - one host-device sync - and shared by every activation a probe reads."""
    return mask.to(device if device is not None else mask.device, torch.bool).flatten().nonzero().squeeze(1)


def take_rows(act: Tensor, rows: Tensor) -> Tensor:
    """act [batch, pos, ...] -> [N, ...] at the flat indices `rows` (from `masked_rows`)."""
    return act.flatten(0, 1).index_select(0, rows.to(act.device))


def require_streams(model, probe_name: str, minimum: int = 2) -> None:
    """Stream-comparison probes have no meaning on a single-stream (plain residual) model."""
    n = model.cfg.n_streams
    if n < minimum:
        raise ValueError(
            f"probe {probe_name!r} compares residual streams, but this model has {n} stream "
            f"(hyper_conn_type={model.cfg.hyper_conn_type!r}); it has no meaning here"
        )


# hooks whose activations are stream states [batch, pos, n_streams, d_model]
STREAM_STATE_SUFFIXES = (
    "hook_streams_init",
    "hook_streams_in",
    "hook_streams_out",
    "hook_res_mix",
    "hook_ln_final",
)


@dataclass(frozen=True)
class ReportSection:
    """A probe's section of the report: headed `title` (what it shows), one caption per figure
    of its result's `plot()` (`captions`: figure name -> one line), placed by `order` (lower
    first), left out on models with fewer than `min_streams` streams. `result`: the label of the
    result shown, when it is not the probe's `name` (a probe whose run yields several results
    declares a tuple of sections)."""

    title: str
    captions: Mapping[str, str] = field(default_factory=dict)
    order: float = 1000.0
    min_streams: int = 1
    result: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.title, str) or not self.title.strip():
            raise ValueError(f"a report section needs a title saying what it shows, got {self.title!r}")
        bad = [k for k, v in dict(self.captions).items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise ValueError(
                f"report section {self.title!r}: captions map figure names to text; bad entries {bad}"
            )


class Probe:
    """Base class; see the module docstring for the contract."""

    name: ClassVar[str] = "probe"
    report: ClassVar[Union[ReportSection, Tuple[ReportSection, ...], None]] = None  # its report section(s)

    @classmethod
    def for_report(cls, cfg) -> Optional["Probe"]:
        """The probe as the report runs it in its shared forward (cfg: the `ReportConfig`), or None
        to leave it out; None in place of the method: the probe runs itself (`report_run`)."""
        return cls()

    @classmethod
    def report_run(cls, model, tokens: Tensor, cfg, timer) -> List[Tuple["ProbeResult", Dict[str, Any]]]:
        """The report's run of the probe on prompts and budgets of its own (tokens [n_seq, seq_len]:
        the corpus windows; timer: a `PhaseTimer`) -> [(result, extra page fields)]. Called
        where `for_report` is None."""
        return []

    def setup(self, model) -> None:
        """Called once by the runner before the first batch (validate, size the state)."""

    def hook_names(self, model) -> List[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, acts: Dict[str, Tensor], mask: Tensor) -> None:  # pragma: no cover
        """acts: {hook name: activation [batch, pos, ...]}; mask [batch, pos] bool (True = use)."""
        raise NotImplementedError

    def own_runs(self, model, tokens: Tensor, mask: Tensor) -> None:
        """After `update` on a batch: forwards of the probe's own on that batch (tokens, mask
        [batch, pos]), e.g. a control on altered tokens. None by default."""

    def result(self) -> "ProbeResult":  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class ProbeResult:
    """Plain data: `arrays` (numpy) + `meta` (JSON-serialisable). Subclasses add `plot()`."""

    probe: str
    arrays: Dict[str, np.ndarray]
    meta: Dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def save(self, path) -> Path:
        """Write PATH.json (metadata) and PATH.npz (arrays); returns the JSON path. PATH may end in
        .json or .npz; any other dot in it is part of the name ("rescue_T0.5" stays distinct)."""
        json_path, npz_path = _result_paths(path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(npz_path, **self.arrays)
        info = {
            "probe": self.probe,
            "result_class": type(self).__name__,
            "meta": self.meta,
            "arrays": {k: list(v.shape) for k, v in self.arrays.items()},
        }
        json_path.write_text(json.dumps(info, indent=2, default=_jsonable))
        return json_path

    @classmethod
    def load(cls, path) -> "ProbeResult":
        json_path, npz_path = _result_paths(path)
        info = json.loads(json_path.read_text())
        with np.load(npz_path) as npz:
            arrays = {k: npz[k] for k in npz.files}
        klass = RESULTS.get(info.get("result_class"), ProbeResult)
        return klass(probe=info["probe"], arrays=arrays, meta=info["meta"])

    def tables(self) -> List[Dict[str, Any]]:
        """Tables the report shows under the figures: {"title", "header": [str], "rows": [[str]]}."""
        return []

    def findings(self) -> List[Optional[Dict[str, Any]]]:
        """One-line findings for the report's summary (each made by `finding`), none where the result
        cannot say (NaN, one stream)."""
        return []

    @staticmethod
    def finding(key: str, text: str, **values) -> Dict[str, Any]:
        """A `findings()` entry {"key", "text", "values"}: plain data (numpy scalars made Python)."""
        return {
            "key": key,
            "text": text,
            "values": {k: v.item() if isinstance(v, np.generic) else v for k, v in values.items()},
        }

    def plot(self, **kwargs):  # pragma: no cover - overridden
        raise NotImplementedError(f"{type(self).__name__} has no plot")

    def save_figures(self, folder, fmt: str = "png", **kwargs) -> List[Path]:
        """Save what `plot()` draws (one figure or a dict of them) under `folder`."""
        import matplotlib.pyplot as plt

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        figs = self.plot(**kwargs)
        figs = figs if isinstance(figs, dict) else {self.probe: figs}
        paths = []
        for name, fig in figs.items():
            paths.append(folder / f"{name}.{fmt}")
            fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
            plt.close(fig)
        return paths


def matrix_table(title: str, m: np.ndarray, diagonal: Optional[str] = None) -> Dict[str, Any]:
    """A `ProbeResult.tables()` entry for a square matrix m [n, n]: 2 decimals, NaN as "n/a", the
    diagonal as `diagonal` where given."""
    rows = [
        [
            diagonal if (diagonal is not None and i == j) else ("n/a" if np.isnan(v) else f"{v:.2f}")
            for j, v in enumerate(row)
        ]
        for i, row in enumerate(np.asarray(m))
    ]
    return {"title": title, "header": [str(j) for j in range(len(rows))], "rows": rows}


def index_of(key: Union[str, int], names: Sequence[str], what: str, aliases: Sequence[str] = ()) -> int:
    """The position of `key` in `names` (or in `aliases`, e.g. their labels), or `key` as an index
    into them (negative: from the end); KeyError / IndexError name the choices."""
    if isinstance(key, str):
        for listed in (list(names), list(aliases)):
            if key in listed:
                return listed.index(key)
        raise KeyError(f"unknown {what} {key!r}; {what}s: {list(aliases or names)}")
    if not -len(names) <= key < len(names):
        raise IndexError(f"{what} index {key} out of range ({len(names)} {what}s)")
    return int(key) % len(names)


def _result_paths(path) -> Tuple[Path, Path]:
    """(PATH.json, PATH.npz) of a saved result; a trailing .json / .npz on PATH is dropped first."""
    path = Path(path)
    if path.suffix in (".json", ".npz"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".json"), path.with_name(path.name + ".npz")


def _jsonable(obj):
    if isinstance(obj, (np.generic, np.ndarray)):  # numpy scalars and arrays as Python values
        return obj.tolist()
    return str(obj)
