"""The fused CPU kernel of the attention layers (``se3tcli/model/fused_attention.c``, forward and backward).

* :mod:`.library`: build it with the system's C compiler, cache it, load it; never raises;
* :mod:`.cache`: the private cache folder and the SHA-256 record that every load is checked against;
* :mod:`.abi`: the ctypes mirrors of its argument structures, checked against the C ones on loading;
* :mod:`.blocks`: receiver blocks of whole molecules, one kernel call each;
* :mod:`.call`: the call and its autograd backward.

Whether a layer runs it is decided in one place, :func:`se3tcli.model.backend.resolve`.
"""

from __future__ import annotations


def kernel_status() -> str:
    """The line ``se3t info`` prints for the CPU attention layers: what the ``auto`` backend resolves to and
    why (:func:`se3tcli.model.backend.resolve`)."""
    from se3tcli.model.backend import resolve  # imported here: backend imports this package's modules

    return resolve().line
