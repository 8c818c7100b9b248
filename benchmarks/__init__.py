"""Benchmarks (see README.md). Importing this package first - as `python -m benchmarks.<name>`
does - makes the process settings the command line makes (`mhc_interp.process`): OpenMP's idle
threads sleep instead of spin (`OMP_WAIT_POLICY=PASSIVE`, unless set already; on a machine whose
cores other work shares, a 2-thread forward of the small shape: 1.8-4.2 s spinning, 0.23-1.5 s
passive) and freed memory is kept for reuse. The OpenMP runtime reads its setting once, when torch
is first imported, hence here."""

from mhc_interp.process import configure_command_process

configure_command_process()
