"""CUDA graphs of the GEMM-per-step loops: with ``KERNRNN_CUDA_GRAPHS=1`` (or
:func:`set_graphs`) a loop seen twice with the same buffers is captured into a
graph and replayed, removing the per-launch Python cost.  Capture needs the
direct cuBLAS calls of :mod:`kernrnn.backends.cuda.stepgemm` (CuPy's own cuBLAS
wrappers refuse to run while a stream captures)."""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict

from kernrnn.backends.cuda import _cublas
from kernrnn.backends.cuda.arrays import SIMULATOR, cupy

__all__ = ["GRAPHS_ENV", "set_graphs", "graphs_enabled", "graph_stats", "layout_key",
           "run_loop", "graph_refusal", "may_capture"]

GRAPHS_ENV = "KERNRNN_CUDA_GRAPHS"
_GRAPH_CACHE_SIZE = 64
_graphs_override: bool | None = None
# key -> (graph or None, scratch, the cuBLAS workspace the graph's GEMMs write)
_graph_cache: OrderedDict = OrderedDict()
_graph_seen: OrderedDict = OrderedDict()  # keys run once eagerly
graph_stats = {"eager": 0, "captured": 0, "replayed": 0, "capture_failed": 0, "refused": 0,
               "replayed_forward": 0, "replayed_backward": 0}
_refusals_warned: set = set()
# guards the caches; held for a whole run_loop (issuing is Python under the GIL anyway)
_lock = threading.RLock()


def set_graphs(enabled: bool | None) -> None:
    """Replay the per-step loop as a CUDA graph (True), never (False), or as
    ``KERNRNN_CUDA_GRAPHS`` says (None; default off)."""
    global _graphs_override
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool or None, got {enabled!r}")
    with _lock:
        _graphs_override = enabled
        _graph_cache.clear()
        _graph_seen.clear()


def graphs_enabled() -> bool:
    if SIMULATOR:
        return False
    if _graphs_override is not None:
        return _graphs_override
    return os.environ.get(GRAPHS_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def graph_refusal(cell, regularised: bool) -> str | None:
    """Why the loops of ``cell`` must run eagerly even with graphs on, or None.

    A graph replays the kernel scalars and device pointers of the call that
    captured it.  A regularised call draws new dropout masks and zoneout seeds
    (kernel scalars) every call, so a replay would reuse the capturing call's
    randomness, and a backward captured in a later call than its forward would
    use other masks than the forward ran with.  Per-unit parameters, norm gains
    and the gradient accumulators of both are arrays made afresh every call,
    which a replay would still read and write at the capturing call's
    addresses; graphs refuse those cells until they own these buffers.
    """
    if regularised:
        return "regularisation draws new masks and seeds every call"
    if cell.n_unit_scalars or cell.normalize or cell.recurrent_norm is not None:
        return ("its per-unit parameters (or hyperparameters) or norm vectors and their "
                "gradients are new arrays every call")
    if not cell.reads_h_only:
        return "the scratch its recurrent_states are gathered in is a new array every call"
    if cell.staged:
        return "its stages' buffers and products' weights are new arrays every call"
    return None


def may_capture(cell, regularised: bool) -> bool:
    """Whether graphs are on and the loops of ``cell`` may be replayed as graphs; warns once
    per reason (and counts ``graph_stats["refused"]``) when they may not."""
    if not graphs_enabled():
        return False
    why = graph_refusal(cell, regularised)
    if why is None:
        return True
    graph_stats["refused"] += 1
    if why not in _refusals_warned:
        _refusals_warned.add(why)
        warnings.warn(f"kernrnn: CUDA graphs are on, but this loop of cell {cell.name!r} runs "
                      f"without them ({why})", RuntimeWarning, stacklevel=4)
    return False


def layout_key(*arrays):
    """Every device pointer, shape and stride a loop bakes in, plus the device and the
    stream it runs on (a graph replays on the stream whose cuBLAS workspace it uses)."""
    where = (cupy.cuda.Device().id, cupy.cuda.get_current_stream().ptr)
    return where + tuple((a.data.ptr, a.shape, a.strides) for a in arrays)


def run_loop(key, issue, make_scratch):
    """Run ``issue(scratch)`` (which enqueues one whole time loop on CuPy's current stream).

    With graphs enabled, a loop is captured into a CUDA graph the second time
    the same key is seen and replayed from then on.  The key holds every
    device pointer, shape and stride the loop bakes in (plus cell, dtype,
    direction, device and stream), so a replay does exactly what issuing the
    loop again would; per-loop scratch buffers live with the graph.  The
    first sighting runs eagerly, which also compiles the kernels and checks
    the direct cuBLAS call, so nothing is compiled, allocated or synchronised
    during a capture.  A failed capture (say, cuBLAS not found, so the per-step
    GEMM is ``cupy.matmul``) warns once and falls back to eager runs for that key.
    """
    with _lock:
        _run_loop(key, issue, make_scratch)


def _run_loop(key, issue, make_scratch):
    if key is None or not graphs_enabled():
        graph_stats["eager"] += 1
        issue(make_scratch())
        return
    entry = _graph_cache.get(key)
    if entry is None and key not in _graph_seen:
        _graph_seen[key] = True
        while len(_graph_seen) > 4 * _GRAPH_CACHE_SIZE:
            _graph_seen.popitem(last=False)
        graph_stats["eager"] += 1
        issue(make_scratch())
        return
    if entry is None:
        scratch = make_scratch()
        graph, workspace = _capture(issue, scratch)
        _graph_cache[key] = entry = (graph, scratch, workspace)
        while len(_graph_cache) > _GRAPH_CACHE_SIZE:
            _graph_cache.popitem(last=False)
    else:
        _graph_cache.move_to_end(key)
        graph_stats["replayed"] += 1
        if key[0] in ("forward", "backward"):
            graph_stats[f"replayed_{key[0]}"] += 1
    graph, scratch, _ = entry
    if graph is None:
        graph_stats["eager"] += 1
        issue(scratch)
    else:
        graph.launch(stream=cupy.cuda.get_current_stream())


def _capture(issue, scratch):
    """Capture ``issue(scratch)`` on the side stream kept for the current stream,
    whose cuBLAS handle exists (bound, with its workspace) before the capture begins.
    Returns ``(graph or None, the workspace the graph's GEMMs write)``."""
    graph = workspace = None
    try:
        side = _cublas.capture_stream(cupy.cuda.get_current_stream().ptr)
        if side is None:
            raise RuntimeError(f"no direct cuBLAS calls: {_cublas.unavailable_reason()}")
        workspace = _cublas.workspace_of(side.ptr)
        with side:
            side.begin_capture()
            try:
                issue(scratch)
            finally:
                graph = side.end_capture()
        graph_stats["captured"] += 1
    except Exception as exc:  # noqa: BLE001 - eager runs still work
        graph_stats["capture_failed"] += 1
        warnings.warn(f"kernrnn: CUDA graph capture failed ({type(exc).__name__}: {exc}); "
                      f"running this loop without graphs", RuntimeWarning, stacklevel=4)
        graph = workspace = None
    return graph, workspace

