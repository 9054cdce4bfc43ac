"""Triton kernels over the segmented KV pool, and their torch counterparts.

``_name.py`` modules hold only ``@triton.jit`` code; ``name.py`` modules hold
the launchers, which validate nothing themselves (``radixseg.attention``
checks every argument first) and plan the grid. Nothing here imports Triton at
package import time: ``radixseg.attention`` loads the launchers on first use,
so the torch backend (:mod:`radixseg.kernels.torch_backend`) works without
Triton. ``__all__`` names the modules other code may import; the launchers
(``paged_attention``, ``store``) import Triton when loaded. The developer tool
that compiles the kernels for GPUs a machine lacks is ``scripts/compile_check.py``,
outside the package.
"""

__all__ = ["cpu", "launch", "paged_attention", "store", "torch_backend"]
