"""Row statistics of the CUDA kernels (layer/RMS norm): one block per row and segment.

A row of ``L`` values (``H``, or ``Gr*H`` for a recurrent norm over the whole
row) is split over the block's threads on interleaved indices (neighbouring
threads read neighbouring values: coalesced), each thread keeps partial sums,
and a tree in shared memory adds them.  One thread per row, walking the row
serially, would leave a step at H = 1024 waiting a quarter of a millisecond on
a single warp.  The block size is :data:`ROW_BLOCK` on a GPU (any power of two
up to it runs correctly, which the simulator tests use); the arithmetic is
that of :func:`kernrnn.backends.codegen.row_norm`: two passes (mean, then the
centred second moment), in the kernel's precision.

The generated code needs ``ZERO``, ``ONE``, ``EPS``, ``DT`` and ``NBT`` (the
Numba type of the dtype, for the shared array) in the module's globals.
"""

from __future__ import annotations

__all__ = ["ROW_BLOCK", "ROW_HEAD", "block_row_norm", "block_row_norm_backward"]

#: Threads per block of the row-statistics kernels on a GPU (a power of two); also
#: the size of their shared-memory scratch, so no launch may use more.
ROW_BLOCK = 256

#: The opening lines of every row kernel.  Block ``row`` is (batch row ``b``, segment
#: ``seg``); a block whose sequence has ended leaves as a whole (no thread reaches a barrier).
ROW_HEAD = f"""row = cuda.blockIdx.x
B = lengths.shape[0]
if row >= B * NSEG:
    return
b = row // NSEG
seg = row - b * NSEG
if t >= lengths[b]:
    return
tid = cuda.threadIdx.x
nt = cuda.blockDim.x
red = cuda.shared.array({2 * ROW_BLOCK}, NBT)
"""


def _block_sum(names: list[str]) -> list[str]:
    """Replace each per-thread partial sum ``names`` (one or two) by the block's total."""
    lines = [f"red[{i * ROW_BLOCK} + tid] = {n}" for i, n in enumerate(names)]
    lines += ["cuda.syncthreads()", "half = nt // 2", "while half > 0:", "    if tid < half:"]
    lines += [f"        red[{i * ROW_BLOCK} + tid] += red[{i * ROW_BLOCK} + tid + half]"
              for i in range(len(names))]
    lines += ["    cuda.syncthreads()", "    half //= 2"]
    lines += [f"{n} = red[{i * ROW_BLOCK}]" for i, n in enumerate(names)]
    return lines + ["cuda.syncthreads()  # every thread has read the totals before red is reused"]


def _visit(visit: list[str], body: list[str]) -> list[str]:
    """``visit``: a loop header over this thread's values, then lines (at its body's
    indentation) that compute the indices the value expressions use."""
    return [visit[0]] + ["    " + line for line in visit[1:] + body]


def block_row_norm(kind: str, visit: list[str], value: str, length: str, rstd: str, *,
                   prefix: str) -> str:
    """Normalise, in place, the values ``value`` that ``visit`` gives this thread, with
    statistics over the whole block; thread 0 stores the reciprocal deviation to ``rstd``."""
    m, q, r, d = f"{prefix}mean", f"{prefix}sq", f"{prefix}rstd", f"{prefix}d"
    lines = [f"{m} = ZERO"]
    if kind == "layer":
        lines += _visit(visit, [f"{m} += {value}"]) + _block_sum([m])
        lines += [f"{m} = {m} / DT({length})"]
    lines += [f"{q} = ZERO"] + _visit(visit, [f"{d} = {value} - {m}", f"{q} += {d} * {d}"])
    lines += _block_sum([q])
    lines += [f"{r} = ONE / math.sqrt({q} / DT({length}) + EPS)"]
    lines += _visit(visit, [f"{value} = ({value} - {m}) * {r}"])
    lines += ["if tid == 0:", f"    {rstd} = {r}"]
    return "\n".join(lines)


def block_row_norm_backward(kind: str, visit: list[str], grad: str, xhat: str, length: str,
                            rstd: str, *, prefix: str, before: list[str] = ()) -> str:
    """In place: ``grad`` (d of the normalised values) becomes d of the raw values
    (the formulas of :func:`kernrnn.backends.codegen.row_norm_backward`), both sums
    in one block reduction.  ``before``: lines run on each value first (in the same
    visit, by the thread that owns it)."""
    m1, m2 = f"{prefix}m1", f"{prefix}m2"
    body = list(before) + ([f"{m1} += {grad}"] if kind == "layer" else [])
    body += [f"{m2} += {grad} * {xhat}"]
    lines = [f"{m1} = ZERO", f"{m2} = ZERO"] + _visit(visit, body) + _block_sum([m1, m2])
    lines += [f"{m1} = {m1} / DT({length})", f"{m2} = {m2} / DT({length})"]
    lines += _visit(visit, [f"{grad} = {rstd} * ({grad} - {m1} - {xhat} * {m2})"])
    return "\n".join(lines)
