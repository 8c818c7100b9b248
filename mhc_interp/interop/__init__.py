"""Interoperation with other interpretability libraries.

- `mhc_interp.interop.saelens`: train, load, splice and evaluate SAELens sparse autoencoders on
  one stream of a multi-stream model (needs the `saelens` extra: `pip install -e ".[saelens]"`);
  its parts: `saelens_adapter` (sites, `StreamAdapter`) and `saelens_training` (data, runners).
- `mhc_interp.interop.sae_features`: the `SAEFeatures` probe (per-feature firing frequency per
  site and stream), usable with `run_probes`.

Nothing here is imported by `mhc_interp` itself, so the package works without SAELens.
"""
