"""Nothing of the user's is lost, executed or silently wrong (issue 19): hostile and careless
input to the loader, the CLI and the report folder, each with the behaviour the README's
reliability table names. The report's folder handling is tested with the probes stubbed out
(`fast_report`): what is checked is which files survive, not the probes."""

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from mhc_interp import HookedMHC, output_folder, report
from mhc_interp.cli import asset, main
from mhc_interp.config import ConfigError, MHCConfig
from mhc_interp.loading import CheckpointError

from .conftest import FIXTURES, tiny_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny-mhc-n4", "--fast", "--quiet"]


# ------------------------------------------------------------------ 1. code execution: torch.load
def test_every_torch_load_passes_weights_only():
    """A bare torch.load unpickles arbitrary objects under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1."""
    bare = []
    for folder in ("mhc_interp", "examples", "benchmarks", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for m in re.finditer(r"torch\.load\(", text):
                call = text[m.start() : text.find("\n\n", m.start())]
                depth, end = 0, 0
                for i, ch in enumerate(call):  # the call's own parentheses
                    depth += ch == "("
                    depth -= ch == ")"
                    if depth == 0 and ch == ")":
                        end = i
                        break
                if "weights_only=True" not in call[:end]:
                    bare.append(f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}")
    assert not bare, f"torch.load without weights_only=True: {bare}"


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "executed"))


def test_check_never_executes_a_crafted_reference_file(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    shutil.copytree(asset("tiny-mhc-n4"), folder)
    marker = tmp_path / "pwned"
    with open(folder / "reference_logits.pt", "wb") as f:
        pickle.dump({"tokens": _Payload(str(marker)), "logits": 0}, f)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(SystemExit, match="not a loadable reference-logits file"):
        main(["check", "--model", str(folder)])
    assert not marker.exists()


# ------------------------------------------------------------------------ 2. the report folder
@pytest.fixture
def fast_report(monkeypatch):
    """`report` with the probes replaced by one tiny figure: the folder logic runs for real."""

    def run_all(model, tokens, folder, cfg, timer, figures):
        (folder / "figures" / "p").mkdir(parents=True)
        (folder / "figures" / "p" / "f.png").write_bytes(b"png")
        return [
            {
                "title": "stub",
                "figures": [{"src": "figures/p/f.png", "name": "f", "caption": ""}],
                "tables": [],
            }
        ]

    monkeypatch.setattr(report, "_run_all", run_all)


def write_report(out, *extra):
    return main(["report", *TINY, "--out", str(out), *extra])


def test_files_added_to_an_earlier_report_are_never_deleted(tmp_path, fast_report):
    out = tmp_path / "rep"
    assert write_report(out) == 0
    (out / "NOTES.md").write_text("my notes")
    (out / "my_analysis").mkdir()
    (out / "my_analysis" / "a.py").write_text("x = 1")
    with pytest.raises(SystemExit, match="did not write.*NOTES.md.*my_analysis/a.py.*--force"):
        write_report(out)
    assert write_report(out, "--force") == 0
    assert (out / "NOTES.md").read_text() == "my notes"
    assert (out / "my_analysis" / "a.py").read_text() == "x = 1"
    assert (out / "index.html").is_file() and (out / "figures" / "p" / "f.png").is_file()
    assert set(output_folder.read_manifest(out)) == {"index.html", "report.json", "figures/p/f.png"}


def test_an_earlier_unchanged_report_is_replaced_and_an_edited_one_refused(tmp_path, fast_report):
    out = tmp_path / "rep"
    assert write_report(out) == 0
    assert write_report(out) == 0  # only its own files: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]
    (out / "index.html").write_text("edited by hand")
    with pytest.raises(SystemExit, match="changed since: index.html"):
        write_report(out)
    assert (out / "index.html").read_text() == "edited by hand"


def test_a_folder_that_merely_looks_like_a_report_is_not_wiped(tmp_path, fast_report):
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<h1>my web site</h1>")
    (site / "report.json").write_text("{}")
    with pytest.raises(SystemExit, match="did not write"):
        write_report(site)
    assert (site / "index.html").read_text() == "<h1>my web site</h1>"


def test_out_dot_inside_a_report_updates_it_in_place(tmp_path, fast_report, monkeypatch):
    out = tmp_path / "rep"
    assert write_report(out) == 0
    inode = out.stat().st_ino
    monkeypatch.chdir(out)
    assert write_report(".") == 0
    assert out.stat().st_ino == inode and Path.cwd() == out  # the shell's folder was never removed
    assert (out / "index.html").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def test_stale_partial_folders_of_dead_runs_are_removed(tmp_path, fast_report):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    ).stdout.strip()
    stale = [
        tmp_path / f".rep.partial-{dead}-abcd1234",
        tmp_path / ".rep.partial-k2j4_x9z",
    ]  # dead pid; old naming
    kept = [
        tmp_path / f".rep.partial-{os.getppid()}-abcd1234",  # a run still going
        tmp_path / ".rep.partial-my-notes",
        tmp_path / ".other.partial-k2j4_x9z",
    ]  # not ours
    for d in stale + kept:
        d.mkdir()
        (d / "x").write_text("x")
    assert write_report(tmp_path / "rep") == 0
    assert not any(d.exists() for d in stale)
    assert all((d / "x").is_file() for d in kept)


def test_sigterm_is_handled_like_ctrl_c(tmp_path, monkeypatch, capsys):
    def terminated(model, tokens, folder, cfg, timer, figures):
        (folder / "half.png").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(report, "_run_all", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert write_report(tmp_path / "rep") == 130
    assert capsys.readouterr().err.strip() == "mhc-interp: interrupted"
    assert list(tmp_path.iterdir()) == []  # no partial folder, no report
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back


# ------------------------------------------------------------------------------- 3. train --out
def test_train_refuses_to_overwrite_a_model(tmp_path):
    out = tmp_path / "model"
    shutil.copytree(asset("tiny-mhc-n4"), out)
    before = (out / "model.safetensors").read_bytes()
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 200)
    args = [
        "train",
        "--texts",
        str(text),
        "--out",
        str(out),
        "--steps",
        "1",
        "--n-layers",
        "1",
        "--d-model",
        "16",
        "--n-heads",
        "2",
        "--seq-len",
        "8",
        "--batch-size",
        "2",
        "--vocab",
        "270",
    ]
    with pytest.raises(SystemExit, match="already holds config.json, model.safetensors.*--force"):
        main(args)
    assert (out / "model.safetensors").read_bytes() == before
    assert main(args + ["--force"]) == 0
    assert (out / "model.safetensors").read_bytes() != before


# ---------------------------------------------------------------------------- 4. HTML escaping
def test_every_string_reaching_the_page_is_escaped():
    hostile = "<img src=x onerror=alert(1)>"
    page = report.render_html(
        [
            {
                "title": hostile,
                "note": hostile,
                "figures": [{"src": "a'.png", "name": hostile, "caption": hostile}],
                "layer_figures": [{"src": "b'.png", "label": hostile}],
                "tables": [{"title": hostile, "header": [hostile], "rows": [[hostile]]}],
            }
        ],
        [hostile],
    )
    assert "<img src=x" not in page and "a'.png" not in page and "b'.png" not in page
    assert page.count("&lt;img src=x onerror=alert(1)&gt;") == 10  # the title twice: heading and contents


# ------------------------------------------------------------------------ 6-7. untrusted configs
@pytest.mark.parametrize(
    "field,value,message",
    [
        ("n_heads", 0, "n_heads must be >= 1"),
        ("d_model", "128", "d_model must be an integer"),
        ("n_layers", True, "n_layers must be an integer"),
        ("sinkhorn_iters", 10**9, "sinkhorn_iters=1000000000"),
        ("n_ctx", -1, "n_ctx must be >= 1"),
        ("layer_norm_eps", float("nan"), "layer_norm_eps must be a finite"),
        ("bias", "yes", "bias must be true or false"),
        ("n_streams", 64, "more than 16 streams"),
    ],
)
def test_config_fields_are_checked(field, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        MHCConfig(**{**tiny_config().to_dict(), field: value})


def save_ours(folder, config_text=None, weights=None):
    """A folder in our format (tiny mhc model) with its config.json / weights replaced."""
    HookedMHC(tiny_config()).save_pretrained(folder)
    if config_text is not None:
        (folder / "config.json").write_text(config_text)
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


def our_config(**changes):
    return json.dumps({"mhc_interp_format": 1, "config": {**tiny_config().to_dict(), **changes}})


@pytest.mark.parametrize(
    "config_text,weights,message",
    [
        ('{"mhc_interp_format": 1}', None, "no 'config' entry"),
        (our_config(n_heads=0), None, "n_heads must be >= 1"),
        (our_config(d_model="16"), None, "d_model must be an integer"),
        ('{"mhc_interp_format": 1, "config": ', None, "config.json: not valid JSON"),
        (None, b'\x10\x00\x00\x00\x00\x00\x00\x00{"a"', "not a readable safetensors file"),
        (our_config(sinkhorn_iters=10**9), None, "sinkhorn_iters=1000000000 is more than 1000"),
    ],
)
def test_bad_model_folders_are_one_line_errors(tmp_path, config_text, weights, message):
    folder = save_ours(tmp_path / "m", config_text, weights)
    with pytest.raises(SystemExit, match=re.escape(message)):
        main(["check", "--model", str(folder)])


def test_truncated_safetensors_is_a_checkpoint_error(tmp_path):
    folder = save_ours(tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        HookedMHC.from_pretrained(folder)


def test_weights_are_checked_against_the_config_before_anything_is_allocated(tmp_path, monkeypatch):
    """A small file claiming a huge model fails on the shapes, without building the model."""
    wide = save_ours(tmp_path / "wide", our_config(d_model=4096, n_heads=32, d_vocab=50304))
    deep = save_ours(tmp_path / "deep", our_config(n_layers=4000))
    monkeypatch.setattr(
        HookedMHC,
        "_init_weights",  # the meta-device shape check may build; nothing else
        lambda self: self.embed.weight.is_meta or pytest.fail("the model was allocated"),
    )
    with pytest.raises(CheckpointError, match="tensor shapes do not match the config"):
        HookedMHC.from_pretrained(wide)
    with pytest.raises(CheckpointError, match="the config says 4000 layers but the weights hold 2"):
        HookedMHC.from_pretrained(deep)


def test_a_model_larger_than_free_memory_is_refused_with_the_numbers(tmp_path, monkeypatch):
    import mhc_interp.loading as loading

    monkeypatch.setattr(loading, "available_memory_bytes", lambda: 1000)
    with pytest.raises(CheckpointError, match=r"needs 0\.\d+ GiB but cpu has 0\.00 GiB"):
        HookedMHC.from_pretrained(FIXTURES / "mhc_n4.pt")


# -------------------------------------------------------------------------- 8. silent corruption
def flip_bytes_in_largest_tensor(src: Path, dst: Path, n: int = 200) -> None:
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    local = (
        info.header_offset
    )  # the local header's own name and extra-field lengths (torch pads the extra field)
    name_len, extra_len = (int.from_bytes(data[local + k : local + k + 2], "little") for k in (26, 28))
    start = local + 30 + name_len + extra_len + info.file_size // 2
    for i in range(start, start + n):
        data[i] ^= 0x5A
    dst.write_bytes(bytes(data))


def test_flipped_bytes_in_a_pt_are_caught(tmp_path):
    bad = tmp_path / "flipped.pt"
    flip_bytes_in_largest_tensor(FIXTURES / "mhc_n4.pt", bad)
    torch.load(bad, weights_only=True)  # torch itself does not notice
    with pytest.raises(CheckpointError, match="checksum of .* does not match"):
        HookedMHC.from_pretrained(bad)
    with pytest.raises(SystemExit, match="damaged checkpoint"):
        main(["check", "--model", str(bad)])


def test_non_finite_weights_warn_by_name_and_fail_check(tmp_path, capsys):
    model = HookedMHC(tiny_config())
    name, weight = next(
        (n, p) for n, p in model.named_parameters() if n.startswith("blocks.1.mlp") and p.ndim == 2
    )
    with torch.no_grad():
        weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    with pytest.warns(UserWarning, match=re.escape(f"non-finite weights (NaN or inf) in ['{name}']")):
        HookedMHC.from_pretrained(tmp_path / "nan")
    assert main(["check", "--model", str(tmp_path / "nan")]) == 1
    assert f"FAILED: non-finite weights (NaN or inf) in 1 tensors: {name}" in capsys.readouterr().out


# --------------------------------------------------------------------------------- 10. bad input
@pytest.mark.parametrize("value", ["0", "-5", "many"])
def test_max_tokens_must_be_positive(value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["report", "--quiet", "--max-tokens", value])
    assert e.value.code == 2 and "--max-tokens" in capsys.readouterr().err


def test_corpus_flag_without_files_and_binary_corpus_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="--corpus was given no files"):
        main(["report", *TINY, "--corpus", "--out", str(tmp_path / "r")])
    binary = tmp_path / "data.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(SystemExit, match="data.txt is not text .*NUL bytes"):
        main(["probe", "curvature", *TINY, "--corpus", str(binary), "--out", str(tmp_path / "p")])
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(SystemExit, match=r"latin1.txt is not UTF-8 text \(byte 0xe9 at offset 3\)"):
        main(["probe", "curvature", *TINY, "--corpus", str(latin1), "--out", str(tmp_path / "p")])
    assert not (tmp_path / "r").exists() and not (tmp_path / "p").exists()


def test_run_probes_refuses_a_zero_batch(mhc_model, tokens):
    from mhc_interp.probes import StreamUsage, run_probes

    for kw in (dict(batch_size=0), dict(max_tokens=-1), dict(batch_size=2.5)):
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be a positive int"):
            run_probes(mhc_model, StreamUsage(), tokens, progress=False, **kw)
