"""Writing your own probe: one small class against the hook API.

`ReadEntropy` measures how spread each sublayer's read is over the streams: the entropy (in
bits) of the normalised read weights p_s = |H_pre_s| / sum |H_pre|, averaged over tokens.
log2(n) bits = reads all streams evenly, 0 bits = reads a single stream.

    python examples/custom_probe.py [--model NAME_OR_PATH] [--out PATH]   # writes PATH.json + PATH.npz

Its `report` declaration makes it a section of every report built once it is registered
(`build_report`), with the figure its result's `plot()` draws under the caption given.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from mhc_interp import HookedMHC
from mhc_interp.probes import Probe, ProbeResult, register_probe, register_result, run_probes
from mhc_interp.probes.base import ReportSection
from mhc_interp.shipped import default_model_path, resolve_model_path


@register_probe
class ReadEntropy(Probe):
    name = "read_entropy"
    report = ReportSection(
        "How spread each sublayer's read is over the streams",
        captions={
            "read_entropy": "Entropy of the read weights |H_pre_s| / sum |H_pre| per sublayer (bits; "
            "log2(n) = all streams read evenly, 0 = a single stream)."
        },
    )

    def setup(self, model):
        self.sublayers = model.sublayer_names
        self.total = torch.zeros(len(self.sublayers), dtype=torch.float64)  # online sums only
        self.count = 0

    def hook_names(self, model):
        return [f"{s}.hook_h_pre" for s in model.sublayer_names]

    def update(self, acts, mask):  # acts[name]: [batch, pos, n_streams]; mask: [batch, pos]
        for i, s in enumerate(self.sublayers):
            h = acts[f"{s}.hook_h_pre"][mask].double().abs()
            p = h / h.sum(-1, keepdim=True)
            self.total[i] += -(p * torch.log2(p.clamp_min(1e-30))).sum(-1).sum().cpu()
        self.count += int(mask.sum())

    def result(self):
        return ReadEntropyResult(
            self.name,
            {"entropy_bits": (self.total / self.count).numpy()},
            {"sublayers": self.sublayers, "tokens": self.count},
        )


@register_result
class ReadEntropyResult(ProbeResult):
    def plot(self):  # one figure, saved as read_entropy.png (a dict {name: figure} for several)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot(self["entropy_bits"], marker=".")
        ax.set_xlabel("sublayer")
        ax.set_ylabel("read entropy (bits)")
        return fig


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(default_model_path()))
    parser.add_argument("--out", default="out/read_entropy", help="result path: writes OUT.json + OUT.npz")
    args = parser.parse_args(argv)
    model = HookedMHC.from_pretrained(resolve_model_path(args.model))  # shipped names, paths, hub ids
    torch.manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (16, min(32, model.cfg.n_ctx)))
    result = run_probes(model, ReadEntropy(), tokens, batch_size=4)
    print(f"saved {result.save(args.out)}")
    for name, bits in zip(result.meta["sublayers"], result["entropy_bits"]):
        print(f"{name:16s} {bits:.3f} bits (max {np.log2(model.cfg.n_streams):.3f})")
    return result


if __name__ == "__main__":
    main()
