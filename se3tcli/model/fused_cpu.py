"""The fused CPU kernel of the attention layers (``fused_attention.c``, forward and backward): build, load and
call.

The C source is compiled on first use with the system's C compiler into the se3t cache directory (about a
second; keyed by the source, the compiler, the flags, the C library and the CPU, since it is built for this
CPU) and loaded with ctypes. Where no compiler is found or the build fails, :func:`kernel_library` returns
None and the model keeps its PyTorch path; a failed build is remembered (a ``.failed`` file beside the
library, with the compiler's message) so that later runs skip it quietly, until that file is deleted.
``SE3T_FUSED_CPU=0`` turns the kernel off (for A/B benchmarks).

Receivers are split into blocks of whole molecules (:func:`receiver_blocks`): per block, one matrix product
makes the frame coefficients of its edges, then one kernel call shares the block's receivers between
``torch.get_num_threads()`` OpenMP threads. Built with ``-fopenmp``, the library binds to the
``libgomp.so.1`` that PyTorch has loaded where PyTorch uses GNU OpenMP under that name (the Linux CPU
wheels), so the kernel and PyTorch's operations take turns on one thread pool; with another OpenMP runtime
the two pools are separate (correct, but they may spin against each other).
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

log = logging.getLogger(__name__)

DISABLE_ENV = "SE3T_FUSED_CPU"  # "0": never use the kernel
_SOURCE = Path(__file__).resolve().with_name("fused_attention.c")  # absolute: it includes itself
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
# A block's coefficients (rows x S·2·C numbers) stay around this size, in cache (see attention.py); blocks
# hold whole molecules, and one molecule above MAX_BLOCK_COEFFICIENTS (64 MB in float32; ~18,000 pairs of
# atoms at 32 channels and lmax 2) takes the PyTorch path, which bounds its memory by blocks of edges.
BLOCK_COEFFICIENTS = 500_000
MAX_BLOCK_COEFFICIENTS = 16_000_000


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
        ("stats", ctypes.c_void_p),
        ("n_threads", ctypes.c_int64),
    ]


class _Grads(ctypes.Structure):
    """Mirror of ``se3t_attention_grads`` in fused_attention.c."""

    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("grad_out", "out", "stats", "grad_features", "grad_queries")),
        ("grad_coefficients", ctypes.c_void_p),
        ("n_nodes", ctypes.c_int64),
    ]


def _machine_signature() -> str:
    """What a ``-march=native`` build depends on: the CPU (every /proc/cpuinfo line but clock readings, which
    covers x86's flags and ARM's features alike) and the C library."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = [platform.processor(), platform.machine()]
    cpu = sorted({line for line in lines if "mhz" not in line.lower() and "bogomips" not in line.lower()})
    return "\n".join([*cpu, platform.machine(), *platform.libc_ver()])


def _compiler() -> list[str] | None:
    """``$CC`` (may carry arguments: ``ccache gcc``), else ``cc``, else ``gcc``; None if none is found."""
    command = shlex.split(os.environ.get("CC", "")) or ["cc"]
    found = shutil.which(command[0])
    if found is None and "CC" not in os.environ:
        found = shutil.which("gcc")
    return None if found is None else [found, *command[1:]]


def _compile(compiler: list[str], target: Path) -> None:
    """Build the shared library into ``target`` atomically (a temporary file renamed into place)."""
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run(
            [*compiler, *_FLAGS, str(_SOURCE), "-o", str(built), "-lm"],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(built, target)


def _first_line(error: BaseException) -> str:
    """The compiler's first error line (or the exception's message), for a one-line warning."""
    if isinstance(error, subprocess.CalledProcessError) and not (error.stderr or "").strip():
        return f"the compiler exited with status {error.returncode}"
    detail = str(getattr(error, "stderr", "") or error).strip()
    lines = [line for line in detail.splitlines() if "error" in line.lower()] or detail.splitlines() or [""]
    return lines[0][:300]


@cache
def kernel_library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use), or None where it is turned off or cannot be built."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        log.info("no C compiler found: the attention layers on the CPU use the PyTorch path")
        return None
    try:
        from se3tcli.data.qm9 import default_cache_dir  # the one cache directory of se3t

        key = hashlib.sha256(
            "\0".join([_SOURCE.read_text(), *compiler, *_FLAGS, _machine_signature()]).encode()
        ).hexdigest()[:16]
        folder = default_cache_dir() / "kernels"
        target, failed = folder / f"fused_attention-{key}.so", folder / f"fused_attention-{key}.failed"
        if failed.exists():  # a build that failed before: do not retry (and warn) in every run
            log.info("the fused CPU kernel did not build before (see %s): using the PyTorch path", failed)
            return None
        folder.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            try:
                _compile(compiler, target)
            except (OSError, subprocess.SubprocessError) as error:
                command = shlex.join([*compiler, *_FLAGS, str(_SOURCE)])
                failed.write_text(f"{command}\n{getattr(error, 'stderr', None) or error}")
                log.warning(
                    "could not build the fused CPU kernel (%s; details in %s, delete it to retry): "
                    "using the PyTorch path",
                    _first_line(error),
                    failed,
                )
                return None
        library = ctypes.CDLL(str(target))
    except (OSError, RuntimeError) as error:  # unreadable source, no home or cache folder, unloadable library
        log.warning("could not load the fused CPU kernel (%s): using the PyTorch path", _first_line(error))
        return None
    for real in ("f32", "f64"):
        getattr(library, f"se3t_attention_{real}").argtypes = [ctypes.POINTER(_Args)]
        getattr(library, f"se3t_attention_backward_{real}").argtypes = [
            ctypes.POINTER(_Args),
            ctypes.POINTER(_Grads),
        ]
        getattr(library, f"se3t_attention_{real}").restype = ctypes.c_int
        getattr(library, f"se3t_attention_backward_{real}").restype = ctypes.c_int
    return library


def kernel_status() -> str:
    """One line for users: which implementation the CPU attention layers run, and why."""
    library = kernel_library()
    if library is not None:
        return f"fused C kernel ({library._name})"
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return f"PyTorch ({DISABLE_ENV}=0)"
    if _compiler() is None:
        return "PyTorch (no C compiler found)"
    return "PyTorch (the fused C kernel could not be built or loaded; see the se3t cache's 'kernels' folder)"


def applies(x: torch.Tensor, geometry) -> bool:
    """Whether the kernel can run a layer on features ``x``: on the CPU in float32/float64 without autocast,
    the kernel built, and no gradient wanted for the geometry (positions; the kernel's backward covers the
    features, queries and radial coefficients, which is what training needs)."""
    geometry_grad = geometry.envelope.requires_grad or geometry.frames.wigner.requires_grad
    same_dtype = all(t.dtype == x.dtype for t in (geometry.envelope, geometry.frames.wigner, geometry.radial))
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and same_dtype  # the kernel reads every array in one type (a float64 model on a float32 batch: no)
        and geometry.src.dtype == torch.int64
        and not (torch.is_grad_enabled() and geometry_grad)
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

    @property
    def largest_rows(self) -> int:
        return max(last - first for first, last in itertools.pairwise(self.rows))


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
    # The backward gives every edge of a block one gradient slot: a block's edges must fill its rows.
    edges = offsets[torch.tensor(node_cuts)].diff()
    if not torch.equal(edges, torch.tensor(row_cuts).diff() * edges_per_row):
        raise ValueError(f"{dst.shape[0]} edges do not form whole rows of {edges_per_row} (reverse pairs)")
    return ReceiverBlocks(order, offsets, node_cuts, row_cuts)


@dataclass
class _Plan:
    """What one layer's kernel calls share: the library, the geometry's tensors and the blocks."""

    library: ctypes.CDLL
    src: torch.Tensor  # [E] int64
    envelope: torch.Tensor  # [E]
    wigner: torch.Tensor  # [E, D, D]
    edges_per_row: int
    blocks: ReceiverBlocks
    n_heads: int
    tables: tuple[torch.Tensor, torch.Tensor, int, int]

    def args(self, features: torch.Tensor, queries: torch.Tensor, out: torch.Tensor, stats) -> dict:
        """The fields of ``se3t_attention_args`` common to every block (keep the tensors alive while used)."""
        row_in, row_out, n_coef, n_axial = self.tables
        _, dim, channels = features.shape
        return dict(
            lmax=int(round(dim**0.5)) - 1,
            channels=channels,
            n_heads=self.n_heads,
            n_terms=row_in.shape[0],
            n_coef=n_coef,
            n_axial=n_axial,
            term_row_in=row_in.data_ptr(),
            term_row_out=row_out.data_ptr(),
            src=self.src.data_ptr(),
            order=self.blocks.order.data_ptr(),
            offsets=self.blocks.offsets.data_ptr(),
            envelope=self.envelope.data_ptr(),
            wigner=self.wigner.data_ptr(),
            edges_per_row=self.edges_per_row,
            features=features.data_ptr(),
            queries=queries.data_ptr(),
            out=out.data_ptr(),
            scale=(channels // self.n_heads * dim) ** -0.5,
            stats=None if stats is None else stats.data_ptr(),
            n_threads=torch.get_num_threads(),
        )

    def kernel(self, name: str, dtype: torch.dtype):
        return getattr(self.library, f"{name}_{'f64' if dtype == torch.float64 else 'f32'}")

    def block_calls(self, base: dict, radial, weight, bias) -> Iterator[tuple[slice, torch.Tensor, _Args]]:
        """Per block: its coefficient rows, their frame coefficients ``[rows, S·2·C]`` (one matrix product)
        and the kernel's arguments (``base`` from :meth:`args`; keep the coefficients alive while used)."""
        for block, (first_row, last_row) in enumerate(itertools.pairwise(self.blocks.rows)):
            rows = slice(first_row, last_row)
            coefficients = torch.addmm(bias, radial[rows], weight.t())
            args = _Args(
                **base,
                coefficients=coefficients.data_ptr(),
                first_row=first_row,
                node_begin=self.blocks.nodes[block],
                node_end=self.blocks.nodes[block + 1],
            )
            yield rows, coefficients, args

    def forward(self, features, queries, radial, weight, bias, stats=None) -> torch.Tensor:
        """``[n, D, C]`` softmax-weighted values; ``stats [n, 2, H]`` (training) gets the softmax's running
        maximum and sum per receiver and head."""
        out = features.new_zeros(features.shape)
        base = self.args(features, queries, out, stats)
        kernel = self.kernel("se3t_attention", features.dtype)
        # _coefficients stays referenced while the kernel reads it through args
        for _rows, _coefficients, args in self.block_calls(base, radial, weight, bias):
            if kernel(ctypes.byref(args)):
                raise MemoryError("the fused attention kernel could not allocate its scratch memory")
        return out

    def backward(
        self, grad_out, out, stats, features, queries, radial, weight, bias
    ) -> tuple[torch.Tensor, ...]:
        """Gradients of the features, queries, radial features, and the term layer's weight and bias."""
        per_row = self.edges_per_row
        grad_out = grad_out.contiguous()
        base = self.args(features, queries, out, stats)
        grad_parts = features.new_zeros(base["n_threads"], *features.shape)  # one share per OpenMP thread
        grad_queries = torch.empty_like(queries)
        grad_radial = torch.empty_like(radial)
        grad_weight, grad_bias = torch.zeros_like(weight), torch.zeros_like(bias)
        kernel = self.kernel("se3t_attention_backward", features.dtype)
        for rows, coefficients, args in self.block_calls(base, radial, weight, bias):
            grad_edges = coefficients.new_empty(coefficients.shape[0], per_row, weight.shape[0])  # per edge
            grads = _Grads(
                grad_out=grad_out.data_ptr(),
                out=out.data_ptr(),
                stats=stats.data_ptr(),
                grad_features=grad_parts.data_ptr(),
                grad_queries=grad_queries.data_ptr(),
                grad_coefficients=grad_edges.data_ptr(),
                n_nodes=features.shape[0],
            )
            if kernel(ctypes.byref(args), ctypes.byref(grads)):
                raise MemoryError("the fused attention kernel could not allocate its scratch memory")
            # [rows, S·2·C]: the edges of a reverse pair share their row (an add of two views, several times
            # faster than a sum over the middle axis of size 2)
            grad_rows = grad_edges[:, 0] + grad_edges[:, 1] if per_row == 2 else grad_edges[:, 0]
            grad_weight.addmm_(grad_rows.t(), radial[rows])
            grad_bias += grad_rows.sum(0)
            torch.mm(grad_rows, weight, out=grad_radial[rows])
        return grad_parts.sum(0), grad_queries, grad_radial, grad_weight, grad_bias


class _FusedAttention(torch.autograd.Function):
    """The kernel with its own backward (no per-edge tensor is kept between forward and backward)."""

    @staticmethod
    def forward(ctx, features, queries, radial, weight, bias, plan: _Plan):
        stats = features.new_empty(features.shape[0], 2, plan.n_heads)
        out = plan.forward(features, queries, radial, weight, bias, stats)
        ctx.save_for_backward(features, queries, radial, weight, bias, out, stats)
        ctx.plan = plan
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        features, queries, radial, weight, bias, out, stats = ctx.saved_tensors
        grads = ctx.plan.backward(grad_out, out, stats, features, queries, radial, weight, bias)
        return (*grads, None)


def attention(
    coefficient_layer: tuple[torch.Tensor, torch.Tensor],
    features: torch.Tensor,
    queries: torch.Tensor,
    geometry,
    blocks: ReceiverBlocks,
    n_heads: int,
    tables: tuple[torch.Tensor, torch.Tensor, int, int],
) -> torch.Tensor:
    """Channels-last ``features``/``queries [n, D, C]`` -> the softmax-weighted values ``[n, D, C]`` (before
    the neighbourhood gate and the value mix), differentiable in the features, queries, the geometry's radial
    features and ``coefficient_layer``: ``(weight [S·2·C, H], bias)`` of
    :meth:`~se3tcli.model.convolution.EdgeConvolution.term_layer`; ``tables``: the term rows (in, out),
    ``n_coefficients`` and ``n_axial`` of the angular basis. Call only where :func:`applies` holds."""
    weight, bias = coefficient_layer
    plan = _Plan(
        kernel_library(),
        geometry.src.contiguous(),
        geometry.envelope.contiguous(),
        geometry.frames.wigner.contiguous(),
        geometry.edges_per_row,
        blocks,
        n_heads,
        tables,
    )
    inputs = (features, queries, geometry.radial.contiguous(), weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _FusedAttention.apply(*inputs, plan)
    return plan.forward(*inputs)
