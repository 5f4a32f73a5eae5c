"""``kernrnn bench --startup``: where a new cell's first seconds go.

A fresh interpreter (so nothing is compiled in memory) builds one layer and
runs its first training step (forward and backward) and its first inference
forward, with an empty kernel cache and then again with the same, now warm,
cache.  Every Numba compilation is recorded through Numba's event API
(``numba:compile``): which function, how long (with and without the
compilations nested in it) and whether it came from the on-disk cache.  The
phases (import, construction with the compile check, first forward, first
backward, first inference forward) are timed around the calls.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

__all__ = ["breakdown", "format_breakdown", "PHASES"]

PHASES = ("import", "construction", "train forward", "train backward", "inference forward")


def _child(cell: str, B: int, T: int, I: int, H: int, order: str, rename: str = "") -> dict:
    """Run in the fresh interpreter: time the phases and every Numba compilation.

    ``rename``: use the registered ``cell``'s math under this name (a new cell to the
    kernel cache, as an edited cell is: its own kernels compile, shared ones load).
    """
    t_start = time.perf_counter()
    import numpy as np
    from numba.core import event

    import kernrnn

    compiles: list[dict] = []
    stack: list[list] = []
    phase = ["import"]

    class _Recorder(event.Listener):
        def on_start(self, ev):
            stack.append([time.perf_counter(), 0.0])

        def on_end(self, ev):
            t0, inner = stack.pop()
            dt = time.perf_counter() - t0
            if stack:
                stack[-1][1] += dt
            disp = ev.data.get("dispatcher")
            py = getattr(disp, "py_func", None)
            compiles.append(dict(
                name=getattr(py, "__qualname__", repr(disp)),
                module=getattr(py, "__module__", "?"), phase=phase[0], total_s=dt,
                self_s=dt - inner, depth=len(stack)))

    event.register("numba:compile", _Recorder())
    times = {"import": time.perf_counter() - t_start}
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (T, B, I)).astype(np.float32)

    def timed(name, fn):
        phase[0] = name
        t0 = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - t0
        return out

    if rename:
        import dataclasses

        from kernrnn.plugins import get_registry

        cell = dataclasses.replace(get_registry().get(cell), name=rename)
    layer = timed("construction", lambda: kernrnn.RNN(cell, I, H, dtype=np.float32, seed=0))

    def train():
        layer.train()
        y, _ = timed("train forward", lambda: layer(x))
        timed("train backward", lambda: layer.backward(np.ones_like(y)))

    def infer():
        layer.eval()
        timed("inference forward", lambda: layer(x))

    for part in (order.split(",")):
        {"train": train, "infer": infer}[part]()
    total = time.perf_counter() - t_start
    # loads from Numba's on-disk cache raise no compile event: count them on the dispatchers
    loaded = sorted(f"{getattr(d.py_func, '__qualname__', '?')} ({m.__name__})"
                    for m in list(sys.modules.values()) if m.__name__.startswith("kernrnn_gen_")
                    for d in vars(m).values() if sum(getattr(d, "_cache_hits", {}).values()))
    return {"phases": times, "compiles": compiles, "loaded": loaded, "total_s": total}


def _run_child(cell, size, threads, env_dir, order, rename="") -> dict:
    B, T, I, H = size
    env = dict(os.environ, KERNRNN_TIERS="0", KERNRNN_CACHE_DIR=os.path.join(env_dir, "kernels"),
               NUMBA_CACHE_DIR=os.path.join(env_dir, "numba"),
               NUMBA_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               KERNRNN_NUM_THREADS=str(threads))
    code = ("import json, sys; from kernrnn.bench.startup import _child; "
            f"print('@@' + json.dumps(_child({cell!r}, {B}, {T}, {I}, {H}, {order!r}, {rename!r})))")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                         capture_output=True, text=True).stdout
    wall = time.perf_counter() - t0
    line = [ln for ln in out.splitlines() if ln.startswith("@@")][-1]
    result = json.loads(line[2:])
    result["wall_s"] = wall
    return result


RUNS = {"cold": "empty kernel cache", "edited": "a new cell (the same math under another "
         "name, as after an edit) with the cache the cold run left",
        "warm": "the same cell again, warm cache"}


def breakdown(cell="lstm", size=(32, 100, 64, 128), threads=1, order="train,infer") -> dict:
    """Three fresh interpreters on one kernel cache (see :data:`RUNS`): ``cell`` renamed
    with an empty cache, then ``cell`` itself twice."""
    tmp = tempfile.mkdtemp(prefix="kernrnn-startup-")
    try:
        cold = _run_child(cell, size, threads, tmp, order, rename=f"{cell}_before_edit")
        edited = _run_child(cell, size, threads, tmp, order)
        warm = _run_child(cell, size, threads, tmp, order)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"cell": cell, "size": list(size), "threads": threads, "order": order,
            "cold": cold, "edited": edited, "warm": warm}


def format_breakdown(r: dict) -> str:
    """Phases side by side (cold, warm), then every compilation of the cold run."""
    B, T, I, H = r["size"]
    lines = [f"start-up of {r['cell']} (B,T,I,H = {B},{T},{I},{H}, float32, "
             f"{r['threads']} thread(s)), fresh interpreter each:",
             *(f"  {k}: {v}" for k, v in RUNS.items()),
             f"  {'phase':<22}" + "".join(f"{k + ' s':>10}" for k in RUNS)]
    for p in PHASES:
        if p in r["cold"]["phases"]:
            lines.append(f"  {p:<22}" + "".join(f"{r[k]['phases'][p]:>10.2f}" for k in RUNS))
    for key, label in (("total_s", "in the interpreter"), ("wall_s", "process, start to end")):
        lines.append(f"  {label:<22}" + "".join(f"{r[k][key]:>10.2f}" for k in RUNS))
    for which in RUNS:
        comp = r[which]["compiles"]
        loaded = r[which].get("loaded", [])
        lines.append(f"\n{which} cache: {len(comp)} functions compiled "
                     f"({sum(c['self_s'] for c in comp):.2f} s), {len(loaded)} kernels loaded "
                     f"from the kernel cache")
        if not comp:
            continue
        lines.append(f"  {'phase':<18}{'function (nested: indented)':<34}{'self s':>8}"
                     f"{'total s':>9}  module")
        for c in comp:
            mod = c["module"] or "?"
            mod = mod if len(mod) <= 40 else mod[:37] + "..."
            name = "  " * c["depth"] + c["name"]
            lines.append(f"  {c['phase']:<18}{name:<34}{c['self_s']:>8.3f}{c['total_s']:>9.3f}"
                         f"  {mod}")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m kernrnn.bench.startup CELL [B,T,I,H [JSON]]
    size = tuple(int(v) for v in sys.argv[2].split(",")) if len(sys.argv) > 2 else \
        (32, 100, 64, 128)
    result = breakdown(sys.argv[1] if len(sys.argv) > 1 else "lstm", size)
    if len(sys.argv) > 3:
        with open(sys.argv[3], "w") as f:
            json.dump(result, f, indent=1)
    print(format_breakdown(result))
