"""Benchmarks (see README.md). Importing this package first - as `python -m benchmarks.<name>`
does - makes OpenMP's idle threads sleep instead of spin (`OMP_WAIT_POLICY=PASSIVE`, unless set
already): on a machine whose cores other work shares, spinning threads take the cores from the
threads they wait for (a 2-thread forward of the small shape: 1.8-4.2 s spinning, 0.23-1.5 s
passive). The OpenMP runtime reads it once, when torch is first imported, hence here."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
