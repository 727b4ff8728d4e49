"""The fused CPU kernel for attention inference (``fused_attention.c``): build, load and call.

The C source is compiled on first use with the system's C compiler into the se3t cache directory (about a
second; keyed by the source, the flags and the CPU's instruction set, since it is built for this CPU) and
loaded with ctypes. Where no compiler is found or the build fails, :func:`kernel_library` returns None and
the model keeps its PyTorch path; ``SE3T_FUSED_CPU=0`` turns the kernel off (for A/B benchmarks).

Receivers are split into blocks of whole molecules (:func:`receiver_blocks`): per block, one matrix product
makes the frame coefficients of its edges, then one kernel call shares the block's receivers between
OpenMP threads. Built with ``-fopenmp``, the library binds to the ``libgomp.so.1`` that PyTorch has
already loaded (Linux builds of PyTorch use GNU OpenMP), so the kernel and PyTorch's operations take turns
on one thread pool instead of spinning against each other.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DISABLE_ENV = "SE3T_FUSED_CPU"  # "0": never use the kernel
_SOURCE = Path(__file__).resolve().with_name("fused_attention.c")  # absolute: it includes itself
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
# A block's coefficients (rows x S·2·C numbers) stay around this size, in cache (see attention.py).
BLOCK_COEFFICIENTS = 500_000


class _Args(ctypes.Structure):
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
    ]


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and instruction-set flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags")
    return "\n".join(sorted({line for line in info.splitlines() if line.startswith(wanted)}))


def _compile(compiler: str, target: Path) -> None:
    """Build the shared library into ``target`` atomically (a temporary file renamed into place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run(
            [compiler, *_FLAGS, str(_SOURCE), "-o", str(built), "-lm"],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(built, target)


@cache
def kernel_library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use), or None where it is turned off or cannot be built."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found: attention inference on the CPU uses the PyTorch path")
        return None
    from se3tcli.data.qm9 import default_cache_dir  # the one cache directory of se3t

    key = hashlib.sha256(
        "\0".join([_SOURCE.read_text(), compiler, *_FLAGS, _cpu_signature()]).encode()
    ).hexdigest()[:16]
    target = default_cache_dir() / "kernels" / f"fused_attention-{key}.so"
    try:
        if not target.exists():
            _compile(compiler, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        log.warning("could not build the fused CPU kernel (%s): using the PyTorch path", str(detail).strip())
        return None
    for name in ("se3t_attention_f32", "se3t_attention_f64"):
        getattr(library, name).argtypes = [ctypes.POINTER(_Args)]
        getattr(library, name).restype = ctypes.c_int
    return library


def applies(x: torch.Tensor) -> bool:
    """Whether the kernel can run a layer on features ``x``: CPU inference in float32/float64, no autocast,
    and the kernel built."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and kernel_library() is not None
    )


@dataclass(frozen=True)
class ReceiverBlocks:
    """Edges sorted by receiver, cut into blocks that own all the edges of their receivers.

    ``order[offsets[i]:offsets[i + 1]]`` are the edges into node i; block b covers the receivers
    ``nodes[b]:nodes[b + 1]`` and the coefficient rows ``rows[b]:rows[b + 1]`` (one row per reverse pair of
    edges, or per edge), and every edge into those receivers reads a row inside that range.
    """

    order: torch.Tensor  # [E] int64
    offsets: torch.Tensor  # [n + 1] int64
    nodes: list[int]
    rows: list[int]


def receiver_blocks(dst: torch.Tensor, n_nodes: int, edges_per_row: int, target_rows: int) -> ReceiverBlocks:
    """Blocks of about ``target_rows`` coefficient rows (edge e reads row ``e // edges_per_row``). A cut
    between receivers is valid where every edge before it (in receiver order) reads an earlier row than
    every edge after it: between molecules for radius graphs, whose reverse pairs are sorted by atom; an
    edge list in any other order gets fewer blocks, at worst one."""
    order = torch.argsort(dst, stable=True)
    offsets = torch.zeros(n_nodes + 1, dtype=torch.long)
    torch.cumsum(torch.bincount(dst, minlength=n_nodes), 0, out=offsets[1:])
    rows = order // edges_per_row  # [E], in receiver order
    n_rows = (dst.shape[0] + edges_per_row - 1) // edges_per_row
    node_cuts, row_cuts = [0], [0]
    if n_rows > target_rows:
        before = torch.cummax(rows, 0).values  # the last row read up to each position
        after = torch.cummin(rows.flip(0), 0).values.flip(0)  # the first row read from each position on
        node = torch.arange(1, n_nodes)
        at = offsets[1:-1]  # position in receiver order where node n starts
        inside = (at > 0) & (at < rows.shape[0])
        node, at = node[inside], at[inside]
        valid = before[at - 1] < after[at]
        node, first_row = node[valid], after[at[valid]]
        chosen = torch.searchsorted(first_row, torch.arange(target_rows, n_rows, target_rows))
        for i in torch.unique(chosen[chosen < first_row.shape[0]]).tolist():
            node_cuts.append(int(node[i]))
            row_cuts.append(int(first_row[i]))
    node_cuts.append(n_nodes)
    row_cuts.append(n_rows)
    return ReceiverBlocks(order, offsets, node_cuts, row_cuts)


def attention(
    library: ctypes.CDLL,
    coefficient_layer: tuple[torch.Tensor, torch.Tensor],
    features: torch.Tensor,
    queries: torch.Tensor,
    geometry,
    blocks: ReceiverBlocks,
    n_heads: int,
    tables: tuple[torch.Tensor, torch.Tensor, int, int],
) -> torch.Tensor:
    """Channels-last ``features``/``queries [n, D, C]`` -> the softmax-weighted values ``[n, D, C]`` (before
    the neighbourhood gate and the value mix). ``coefficient_layer``: ``(weight [S·2·C, H], bias)`` of
    :meth:`~se3tcli.model.convolution.EdgeConvolution.term_layer`; ``tables``: the term rows (in, out),
    ``n_coefficients`` and ``n_axial`` of the angular basis."""
    weight, bias = coefficient_layer
    row_in, row_out, n_coef, n_axial = tables
    n_nodes, dim, channels = features.shape
    kernel = library.se3t_attention_f64 if features.dtype == torch.float64 else library.se3t_attention_f32
    envelope = geometry.envelope.contiguous()
    wigner = geometry.frames.wigner.contiguous()
    out = features.new_zeros(n_nodes, dim, channels)
    base = dict(
        lmax=int(round(dim**0.5)) - 1,
        channels=channels,
        n_heads=n_heads,
        n_terms=row_in.shape[0],
        n_coef=n_coef,
        n_axial=n_axial,
        term_row_in=row_in.data_ptr(),
        term_row_out=row_out.data_ptr(),
        src=geometry.src.data_ptr(),
        order=blocks.order.data_ptr(),
        offsets=blocks.offsets.data_ptr(),
        envelope=envelope.data_ptr(),
        wigner=wigner.data_ptr(),
        edges_per_row=geometry.edges_per_row,
        features=features.data_ptr(),
        queries=queries.data_ptr(),
        out=out.data_ptr(),
        scale=(channels // n_heads * dim) ** -0.5,
    )
    for block in range(len(blocks.nodes) - 1):
        first_row, last_row = blocks.rows[block], blocks.rows[block + 1]
        coefficients = torch.addmm(bias, geometry.radial[first_row:last_row], weight.t())  # [rows, S·2·C]
        args = _Args(
            **base,
            coefficients=coefficients.data_ptr(),
            first_row=first_row,
            node_begin=blocks.nodes[block],
            node_end=blocks.nodes[block + 1],
        )
        if kernel(ctypes.byref(args)):
            raise MemoryError("the fused attention kernel could not allocate its scratch memory")
    return out
