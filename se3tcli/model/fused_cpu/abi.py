"""The C interface of the fused CPU kernel: ctypes mirrors of its argument structures and the binding of its
functions, with a check that each mirror has the size of its C structure (a library built from another
version of ``fused_attention.c`` would otherwise read its arguments from the wrong places)."""

from __future__ import annotations

import ctypes


class LayoutMismatch(Exception):
    """The library's argument structures differ from the mirrors below."""


class Args(ctypes.Structure):
    """Mirror of ``se3t_attention_args`` in fused_attention.c (field order matters)."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in ("lmax", "channels", "n_heads", "n_terms", "n_coef", "n_axial")),
        *((name, ctypes.c_void_p) for name in ("term_row_in", "term_row_out", "src", "order", "offsets")),
        *((name, ctypes.c_void_p) for name in ("envelope", "wigner", "coefficients")),
        ("edges_per_row", ctypes.c_int64),
        ("first_row", ctypes.c_int64),
        *((name, ctypes.c_void_p) for name in ("features", "queries", "out")),
        ("scale", ctypes.c_double),
        ("node_begin", ctypes.c_int64),
        ("node_end", ctypes.c_int64),
        ("stats", ctypes.c_void_p),
        ("n_threads", ctypes.c_int64),
    ]


class Grads(ctypes.Structure):
    """Mirror of ``se3t_attention_grads`` in fused_attention.c."""

    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("grad_out", "out", "stats", "grad_features", "grad_queries")),
        ("grad_coefficients", ctypes.c_void_p),
        ("n_nodes", ctypes.c_int64),
    ]


def bind(library: ctypes.CDLL) -> None:
    """Declare the signatures of the kernel's functions (float32 and float64, forward and backward).

    Raises AttributeError where a function is missing and :class:`LayoutMismatch` where
    ``se3t_args_size()`` / ``se3t_grads_size()`` differ from the sizes of :class:`Args` / :class:`Grads`.
    """
    for real in ("f32", "f64"):
        forward = getattr(library, f"se3t_attention_{real}")
        forward.argtypes, forward.restype = [ctypes.POINTER(Args)], ctypes.c_int
        backward = getattr(library, f"se3t_attention_backward_{real}")
        backward.argtypes, backward.restype = [ctypes.POINTER(Args), ctypes.POINTER(Grads)], ctypes.c_int
    for name, mirror in (("se3t_args_size", Args), ("se3t_grads_size", Grads)):
        size = getattr(library, name)
        size.argtypes, size.restype = [], ctypes.c_size_t
        if size() != ctypes.sizeof(mirror):
            raise LayoutMismatch(
                f"{name}() is {size()} bytes, its ctypes mirror {ctypes.sizeof(mirror)}: "
                "the library was built from another version of fused_attention.c"
            )
