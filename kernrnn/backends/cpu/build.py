"""Kernel assembly and caching: the compiled CPU kernels of one cell and precision.

:func:`get_kernels` joins the generated source (:mod:`~kernrnn.backends.cpu.source`,
:mod:`~kernrnn.backends.cpu.fused_source`) into a module per variant, loads it
through the kernel cache (:func:`~kernrnn.backends.codegen.load_module`: Numba's
on-disk cache applies) and keeps the result for the process.  The kernels
without cell math (register tiles, one module per tile shape and precision;
panel packing and the step barrier, one module per precision) live in modules
of their own that every cell shares: their cache entries, more than half of a
dense cell's first compile, serve each new or edited cell
(``kernrnn bench --startup`` shows the split).
:func:`precompile` compiles a kernel with the SLP vectoriser before the
threads run it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numba
import numpy as np

from kernrnn.backends.codegen import cell_fingerprint, load_module, math_namespace
from kernrnn.backends.cpu import microkernel as mk
from kernrnn.backends.cpu import tuning
from kernrnn.backends.cpu.fused_source import (
    fused_forward_source,
    fused_path,
    input_projection_source,
    pack_training_source,
    same_bits_source,
)
from kernrnn.backends.cpu.source import (
    backward_source,
    forward_source,
    same_input_and_recurrent_grads,
)

__all__ = ["CpuKernels", "FusedKernels", "get_kernels", "precompile"]


@dataclass(frozen=True)
class CpuKernels:
    """The compiled kernels of one cell in one precision."""

    forward_train: object
    forward_infer: object
    backward_loop: object
    same_grads: bool
    fused: FusedKernels | None = None


@dataclass(frozen=True)
class FusedKernels:
    """A dense cell's kernels on packed ``W_hh`` (see
    :func:`~kernrnn.backends.cpu.fused_source.fused_path`).

    ``mr x (Gr*nu)`` forward tiles over panels of ``nu`` units; the backward's
    ``dHU @ W_hh`` uses ``mrb x nu`` tiles.  Compiled with the SLP vectoriser
    (:func:`~kernrnn.backends.cpu.microkernel.compile_with_slp`).
    """

    forward_train: object
    forward_infer: object
    backward_loop: object
    mr: int
    nu: int
    mrb: int
    pack_panels: object  # pack_panels(W, G, H, nu, out, jb0, jb1): mk.pack_forward's layout
    pack_panels_backward: object  # (W, H, nu, out, jb0, jb1): mk.pack_backward's layout
    pack_training: object  # a training forward's share of the packing (pack_training_source)
    input_projection: object  # x_t @ W_ih.T of all steps first (``pre``)
    same_bits: object  # same_bits(a, b): two flat unsigned-int views hold the same bits

    def pack_forward(self, W, n_gates: int, H: int):
        """``W [G*H, K]`` as panels ``[NB, K, G*nu]`` (:func:`~kernrnn.backends.cpu.microkernel.pack_forward`)."""
        nb = -(-H // self.nu)
        out = np.empty((nb, W.shape[1], n_gates * self.nu), dtype=W.dtype)
        self.pack_panels(np.ascontiguousarray(W), n_gates, H, self.nu, out, 0, nb)
        return out

    def pack_backward(self, W, H: int):
        """``W_hh [G*H, H]`` as panels ``[NB, G*H, nu]`` (:func:`~kernrnn.backends.cpu.microkernel.pack_backward`)."""
        nb = -(-H // self.nu)
        out = np.empty((nb, W.shape[0], self.nu), dtype=W.dtype)
        self.pack_panels_backward(np.ascontiguousarray(W), H, self.nu, out, 0, nb)
        return out


_vectorizer_configured = False


def _allow_alias_checks() -> None:
    """Let LLVM vectorise loops that touch many arrays.

    The pointwise loops read and write a dozen arrays that Numba cannot mark
    as non-aliasing, so LLVM guards the vector loop with runtime overlap
    checks; past its default budget (128) it keeps the loop scalar.  This
    raises the process-wide budget to ``tuning.VECTORIZER_CHECKS`` (an LLVM
    option; it only allows more checks, nothing changes for loops that
    vectorised already).  Together
    with ``error_model="numpy"`` (no ZeroDivisionError branch per division)
    the loops compile to AVX2/AVX-512 code; see ``dispatcher.inspect_asm()``.
    """
    global _vectorizer_configured
    if not _vectorizer_configured:
        import llvmlite.binding as llvm

        llvm.set_option("kernrnn",
                        f"-vectorize-memory-check-threshold={tuning.VECTORIZER_CHECKS}")
        _vectorizer_configured = True


@lru_cache(maxsize=None)
def get_kernels(cell, dtype, reg=(False, False), proj=False) -> CpuKernels:
    """Build (or load from Numba's cache) the CPU kernels of ``cell``.

    ``reg`` = (recurrent dropout, zoneout): a variant with those sections (see
    :mod:`kernrnn.regularization`); the plain kernels carry none of their cost.
    ``proj``: the variant with an LSTMP projection in the loop (BLAS per step,
    no packed tiles).
    """
    _allow_alias_checks()
    dtype = np.dtype(dtype)
    reg = (bool(reg[0]), bool(reg[1]))
    same = same_input_and_recurrent_grads(cell)
    source = "import math\nimport numba\nimport numpy as np\n" + "\n".join(
        [forward_source(cell, True, reg, proj), forward_source(cell, False, reg, proj),
         backward_source(cell, same, reg=reg, proj=proj)]
    )
    source = (f"# kernrnn CPU kernels: cell {cell.name!r}, {dtype}, regularisation {reg}, "
              f"projection {bool(proj)}, math {cell_fingerprint(cell)}\n" + source)
    tag = f"cpu_{cell.name}_{dtype.name}" + ("_reg" if any(reg) else "") + ("_proj" if proj else "")
    module = load_module(source, tag, math_namespace(cell, dtype))
    fused = _fused_kernels(cell, dtype, same, reg) \
        if (tuning.FUSED and fused_path(cell) and not proj) else None
    return CpuKernels(module.forward_train, module.forward_infer, module.backward_loop, same,
                      fused)


def _fused_kernels(cell, dtype, same: bool, reg=(False, False)) -> FusedKernels:
    G, Gr = cell.n_gates, cell.n_recurrent_gates
    mr, nu = mk.block_shape(Gr, dtype.itemsize)
    mrx, _ = mk.block_shape(G, dtype.itemsize)
    mrb, _ = mk.block_shape(1, dtype.itemsize)
    tiles = {(h, Gr * nu) for h in (mr, *mk.tail_heights(mr, exact=False))}
    tiles |= {(h, G * nu) for h in (mrx, *mk.tail_heights(mrx, exact=False))}
    tiles |= {(h, nu) for h in (mrb, *mk.tail_heights(mrb, exact=False))}
    shared = _shared_kernels(dtype)
    ns = math_namespace(cell, dtype)
    ns.update(shared)
    for a, b in sorted(tiles):
        ns[mk.tile_name(a, b)] = _tile(a, b, nu, dtype)
    project = _input_projection(G, mrx, nu, dtype)
    # the shared modules' names (hashes of their source) are part of this source, so a
    # change there also gives this module a new name and Numba cache entry
    used = sorted({getattr(v, "__module__", "") for k, v in ns.items()
                   if k.startswith("tile_") or k in shared})
    source = "\n".join(
        ["import math\nimport numba\nimport numpy as np\n",
         fused_forward_source(cell, True, mr, mrx, nu, reg),
         fused_forward_source(cell, False, mr, mrx, nu, reg),
         backward_source(cell, same, packed=(mrb, nu), reg=reg)])
    source = (f"# kernrnn CPU kernels on packed W_hh: cell {cell.name!r}, {dtype}, "
              f"regularisation {reg}, math {cell_fingerprint(cell)}\n"
              f"# shared kernels from {', '.join(used)}\n" + source)
    module = load_module(source, f"cpu_fused_{cell.name}_{dtype.name}"
                         + ("_reg" if any(reg) else ""), ns)
    return FusedKernels(module.forward_train, module.forward_infer, module.backward_loop,
                        mr, nu, mrb, shared["pack_panels"], shared["pack_panels_backward"],
                        shared["pack_training"], project, shared["same_bits"])


@lru_cache(maxsize=None)
def _tile(mr: int, nr: int, nu: int, dtype) -> object:
    """One register tile (:func:`~kernrnn.backends.cpu.microkernel.tile_source`), in a module
    of its own: no cell's math is in it, so every cell with this tile shape shares one
    compilation and one kernel-cache entry (a new cell compiles only its own kernels)."""
    dtype = np.dtype(dtype)
    source = ("import numba\n" + mk.tile_source(mr, nr, nu))
    module = load_module(f"# kernrnn register tile, {dtype}\n" + source,
                         f"cpu_{mk.tile_name(mr, nr)}_{dtype.name}", {"ZERO": dtype.type(0)})
    return getattr(module, mk.tile_name(mr, nr))


@lru_cache(maxsize=None)
def _input_projection(n_gates: int, mrx: int, nu: int, dtype) -> object:
    """The input projection of all steps (:func:`~kernrnn.backends.cpu.fused_source.input_projection_source`),
    in a module of its own: no cell math in it, so every cell with ``n_gates`` gates shares
    one compilation and kernel-cache entry per precision."""
    dtype = np.dtype(dtype)
    ns = {mk.tile_name(h, n_gates * nu): _tile(h, n_gates * nu, nu, dtype)
          for h in (mrx, *mk.tail_heights(mrx, exact=False))}
    tiles = ", ".join(sorted(f.__module__ for f in ns.values()))
    source = (f"# kernrnn input projection of all steps, {n_gates} gates, {dtype}\n"
              f"# tiles from {tiles}\nimport numba\nimport numpy as np\n"
              + input_projection_source(n_gates, mrx, nu))
    module = load_module(source, f"cpu_projection_g{n_gates}_{dtype.name}", ns)
    return module.input_projection


@lru_cache(maxsize=None)
def _shared_kernels(dtype) -> dict:
    """The packed road's kernels that hold no cell math (panel packing, step barrier,
    bit comparison), one module per precision shared by every cell."""
    dtype = np.dtype(dtype)
    source = "\n".join(["import math\nimport numba\nimport numpy as np\n",
                        mk.barrier_source(), mk.pack_source(), pack_training_source(),
                        same_bits_source()])
    ns = {"ZERO": dtype.type(0), "atomic_load": mk.atomic_load,
          "atomic_store": mk.atomic_store, "spin_pause": mk.spin_pause,
          "yield_core": mk.yield_core, "FLAG_STRIDE": mk.FLAG_STRIDE}
    module = load_module(f"# kernrnn packed-road kernels without cell math, {dtype}\n"
                         + source, f"cpu_packing_{dtype.name}", ns)
    return {name: getattr(module, name) for name in
            ("step_barrier", "pack_panels", "pack_panels_backward", "pack_training",
             "same_bits")}


_compiled_sigs: set = set()


def _arg_key(a):
    """What decides Numba's type of a kernel argument, cheaply (``numba.typeof`` costs
    about 7 us an array, 0.15 ms for a fused forward's 30 arguments at every call)."""
    if isinstance(a, np.ndarray):
        f = a.flags
        return (a.dtype.str, a.ndim, f.c_contiguous, f.f_contiguous, f.writeable, f.aligned)
    return type(a)


def precompile(kernel, args) -> None:
    """Compile (or load from cache) ``kernel`` for ``args`` with the SLP vectoriser on.

    The tiles vectorise only with it; compiling before the threads start also
    keeps two threads from compiling the same kernel at once.
    """
    key = (id(kernel), tuple(_arg_key(a) for a in args))
    if key in _compiled_sigs:
        return
    with mk.compile_with_slp():
        kernel.compile(tuple(numba.typeof(a) for a in args))
    _compiled_sigs.add(key)

