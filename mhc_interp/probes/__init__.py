"""Probes read and edit a `HookedMHC` only through its hook points (see `mhc_interp.hooks`).
The probe contract and the built-in probes arrive with the probe issues."""
