"""Triton kernels over the segmented KV pool, and their torch counterparts.

``_name.py`` modules hold only ``@triton.jit`` code; ``name.py`` modules hold
the launchers, which validate nothing themselves (``radixseg.attention``
checks every argument first) and plan the grid. Nothing here imports Triton at
package import time: ``radixseg.attention`` loads the launchers on first use,
so the torch backend (:mod:`radixseg.kernels.reference`) works without Triton.
"""
