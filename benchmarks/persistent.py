"""GPU measurements of the persistent kernel: self-check and benchmark against cuDNN.

``python -m benchmarks.persistent [check|bench|loops]`` on a GPU machine.
Kept out of :mod:`kernrnn.backends.cuda.persistent` so that the backend never
imports the public API (:mod:`kernrnn.functional`) it serves.
"""

from __future__ import annotations

import math
import time

import numpy as np

from kernrnn.backends.cuda.persistent import (  # noqa: F401
    THREADS,
    backward_loop,
    device_props,
    forward_loop,
    plan,
    supported,
)

__all__ = ["benchmark", "loop_benchmark", "gpu_selfcheck", "main"]


def _flops(cell, T, B, I, H) -> float:
    """Forward FLOPs of one layer: input and recurrent GEMMs (the pointwise math is extra)."""
    return 2.0 * T * B * cell.n_gates * H * (I + H)


def benchmark(cells=("lstm", "gru"), T=100, hidden=(256, 512, 1024), batches=(1, 4, 16, 64),
              repeats=20, warmup=3, tf32=False, file=None):
    """Forward and training step, kernrnn (persistent and GEMM paths) vs PyTorch cuDNN.

    float32, I = H, one layer, one direction; prints one row per case with
    median times (ms), the time ratio kernrnn/cuDNN and achieved TFLOP/s
    (forward 2*T*B*G*H*(I+H) FLOPs, training step 3x that).  Times are CUDA
    event times around the whole call, on CuPy's current stream, after
    warm-up.  ``tf32=False`` keeps cuDNN in true float32 (PyTorch allows TF32
    tensor cores in cuDNN by default; kernrnn computes in float32), so both
    sides do the same arithmetic.  Returns the rows as dicts.
    """
    import sys

    import cupy
    import torch

    from benchmarks import torch_fp32_precision
    from kernrnn.functional import rnn_backward, rnn_forward
    from kernrnn.plugins import get_registry

    out = file or sys.stdout
    torch_fp32_precision(torch, "tf32" if tf32 else "ieee")
    props = device_props()
    rows = []
    print(f"# persistent-kernel benchmark on {props.name} ({props.sm_count} SMs), float32, "
          f"T={T}, I=H, cuDNN TF32 {'on' if tf32 else 'off'}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", file=out)
    print("| cell | H | B | path | fwd ms | cuDNN fwd ms | fwd ratio | fwd TFLOP/s | train ms "
          "| cuDNN train ms | train ratio | train TFLOP/s |", file=out)
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", file=out)

    def timed(fn):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, stop))
        return float(np.median(times))

    def torch_timed(fn):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            stop = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        return float(np.median(times))

    from kernrnn.backends import cuda as cuda_backend  # the GEMM path and the layer plumbing

    for name in cells:
        cell = get_registry().get(name)
        for H in hidden:
            for B in batches:
                rows += _bench_case(cell, T, B, H, props, timed, torch_timed, cuda_backend,
                                    rnn_forward, rnn_backward, out)
    return rows


def _bench_case(cell, T, B, H, props, timed, torch_timed, cuda_backend, rnn_forward,
                rnn_backward, out):
    """One row per path for one (cell, H, B): kernrnn vs cuDNN, I = H."""
    import cupy
    import torch

    I, G = H, cell.n_gates
    rng = np.random.default_rng(0)
    bound = 1.0 / np.sqrt(H)

    def uniform(lo, hi, shape):
        return cupy.asarray(rng.uniform(lo, hi, shape).astype(np.float32))

    w_ih, w_hh = uniform(-bound, bound, (G * H, I)), uniform(-bound, bound, (G * H, H))
    b_ih, b_hh = uniform(-bound, bound, G * H), uniform(-bound, bound, G * H)
    x, dy = uniform(-1, 1, (T, B, I)), uniform(-1, 1, (T, B, H))
    f = _flops(cell, T, B, I, H)

    t_fwd = t_train = float("nan")
    tmod = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}.get(cell.name)
    if tmod is not None:
        m = tmod(I, H).cuda()
        with torch.no_grad():
            for pname, arr in (("weight_ih_l0", w_ih), ("weight_hh_l0", w_hh),
                               ("bias_ih_l0", b_ih), ("bias_hh_l0", b_hh)):
                getattr(m, pname).copy_(torch.as_tensor(arr, device="cuda"))
        tx = torch.as_tensor(x, device="cuda")
        tdy = torch.as_tensor(dy, device="cuda")
        txg = tx.clone().requires_grad_(True)

        def torch_fwd():
            with torch.no_grad():
                m(tx)

        def torch_train():
            y, _ = m(txg)
            y.backward(tdy)

        t_fwd = torch_timed(torch_fwd)
        t_train = torch_timed(torch_train)

    def k_fwd():
        rnn_forward(cell, x, w_ih, w_hh, b_ih, b_hh, training=False)

    def k_train():
        _, _, ctx = rnn_forward(cell, x, w_ih, w_hh, b_ih, b_hh, training=True)
        rnn_backward(ctx, dy)

    rows = []
    for path in ("persistent", "gemm"):
        if path == "persistent" and not supported(cell, B, H, np.float32, props):
            print(f"| {cell.name} | {H} | {B} | {path} | not supported |", file=out)
            continue
        cuda_backend.set_path(path)
        try:
            k_f = timed(k_fwd)
            k_t = timed(k_train)
        except Exception as exc:  # report and go on with the table
            print(f"| {cell.name} | {H} | {B} | {path} | failed: {type(exc).__name__}: {exc} |",
                  file=out)
            continue
        finally:
            cuda_backend.set_path(None)
        row = dict(cell=cell.name, H=H, B=B, path=path, fwd_ms=k_f, cudnn_fwd_ms=t_fwd,
                   train_ms=k_t, cudnn_train_ms=t_train,
                   fwd_tflops=f / k_f / 1e9, train_tflops=3 * f / k_t / 1e9)
        rows.append(row)
        print(f"| {cell.name} | {H} | {B} | {path} | {k_f:.3f} | {t_fwd:.3f} | "
              f"{k_f / t_fwd:.2f} | {row['fwd_tflops']:.2f} | {k_t:.3f} | "
              f"{t_train:.3f} | {k_t / t_train:.2f} | {row['train_tflops']:.2f} |",
              file=out, flush=True)
    return rows


def loop_benchmark(cell_name="lstm", T=100, H=512, B=4, repeats=20):
    """Time forward_loop/backward_loop alone on the GPU (no cuda.py needed)."""
    import cupy

    from kernrnn.plugins import get_registry

    cell = get_registry().get(cell_name)
    G, S, K = cell.n_gates, cell.n_state, cell.n_saved
    f32 = np.float32
    XW = cupy.random.uniform(-1, 1, (T, B, G * H)).astype(f32)
    W = cupy.random.uniform(-1, 1, (G * H, H)).astype(f32) / math.sqrt(H)
    bh = cupy.zeros(G * H, f32)
    States = cupy.zeros((S, T + 1, B, H), f32)
    Saved = cupy.zeros((K, T, B, H), f32)
    Y = cupy.zeros((T, B, H), f32)
    lens = cupy.full(B, T, dtype=np.int64)
    dS = cupy.zeros((S, B, H), f32)
    dXW = cupy.zeros((T, B, G * H), f32)
    dHU = cupy.zeros((T, B, G * H), f32)

    def run_f():
        forward_loop(cell, XW, W, bh, States, Saved, Y, lens, False, True)

    def run_b():
        backward_loop(cell, Y, dS, W, States, Saved, lens, False, dXW, dHU)

    res = {}
    for label, fn in (("forward_loop", run_f), ("backward_loop", run_b)):
        fn()
        cupy.cuda.get_current_stream().synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        cupy.cuda.get_current_stream().synchronize()
        res[label] = (time.perf_counter() - t0) / repeats * 1e3
    return res



# -- GPU self-check (correctness on real hardware, before any timing) ---------------------


SELFCHECK_CASES = (  # T, B, H, I, reverse, lengths: several blocks, odd sizes, masking
    (7, 3, 200, 5, False, None),
    (5, 5, 300, 3, True, (5, 0, 3, 5, 1)),
    (6, 16, 1024, 8, False, None),
    (4, 1, 33, 2, True, None),
    (3, 64, 256, 4, False, (1, 2, 3) * 21 + (0,)),
)


def gpu_selfcheck(cells=None, cases=None, file=None, dtypes=(np.float32, np.float64)) -> bool:
    """Run the persistent kernels on the GPU and compare them with the CPU kernels.

    Several-block grids with the real grid barrier (what the simulator cannot
    run): forward and BPTT for every registered cell (or ``cells``), float32
    and float64, variable lengths and the reverse direction, against
    :mod:`kernrnn.backends.cpu` on the same inputs (tolerances of
    :mod:`kernrnn.testing.tolerances`).  Also launches the same kernels once
    per step: per-block work is deterministic, so the persistent launch must
    match the stepwise one bit for bit; a broken barrier would show as a
    difference.  Prints one line per case and returns whether all passed.
    ``dtypes`` limits the precisions (each one compiles its own kernels).
    """
    import sys

    import cupy

    from kernrnn.backends import cpu
    from kernrnn.plugins import get_registry
    from kernrnn.testing import tolerances as tol

    out = file or sys.stdout
    reg = get_registry()
    names = list(cells) if cells is not None else reg.names()
    cases = SELFCHECK_CASES if cases is None else cases
    ok = True
    for name in names:
        cell = reg.get(name)
        G, S, K = cell.n_gates, cell.n_state, cell.n_saved
        for T, B, H, I, rev, lens in cases:
            for dt in dtypes:
                if not supported(cell, B, H, dt):
                    print(f"{name} T={T} B={B} H={H} {np.dtype(dt).name}: not supported, skipped",
                          file=out)
                    continue
                rng = np.random.default_rng(T * 1000 + B * 10 + H)
                bd = 1 / np.sqrt(H)
                W_ih = rng.uniform(-bd, bd, (G * H, I)).astype(dt)
                W_hh = rng.uniform(-bd, bd, (G * H, H)).astype(dt)
                b_ih = rng.uniform(-bd, bd, G * H).astype(dt)
                b_hh = rng.uniform(-bd, bd, G * H).astype(dt)
                x = rng.uniform(-1, 1, (T, B, I)).astype(dt)
                h0 = rng.uniform(-1, 1, (S, B, H)).astype(dt)
                dy = rng.uniform(-1, 1, (T, B, H)).astype(dt)
                dhn = rng.uniform(-1, 1, (S, B, H)).astype(dt)
                lengths = np.array(lens if lens is not None else [T] * B, np.int64)
                params = {"weight_ih": W_ih, "weight_hh": W_hh, "bias_ih": b_ih,
                          "bias_hh": b_hh}
                y_c, hn_c, ctx = cpu.forward(cell, x, params, h0, lengths, rev, True)
                dx_c, dh0_c, g_c = cpu.backward(ctx, dy, dhn)
                XW = (x.reshape(T * B, I) @ W_ih.T).reshape(T, B, G * H) + b_ih
                results = {}
                for mode in ("persistent", "stepwise"):
                    States = cupy.zeros((S, T + 1, B, H), dt)
                    States[:, T if rev else 0] = cupy.asarray(h0)
                    Saved = cupy.zeros((K, T, B, H), dt)
                    ybuf = cupy.full((T, B, 2 * H), np.nan, dt)
                    Y = ybuf[:, :, :H]  # strided, as in a bidirectional layer
                    d_len = cupy.asarray(lengths)
                    d_W = cupy.asarray(W_hh)
                    forward_loop(cell, cupy.asarray(XW), d_W, cupy.asarray(b_hh), States, Saved,
                                 Y, d_len, rev, True, stepwise=mode == "stepwise")
                    dS = cupy.asarray(dhn)
                    dXW = cupy.full((T, B, G * H), np.nan, dt)
                    dHU = cupy.full((T, B, G * H), np.nan, dt)
                    backward_loop(cell, cupy.asarray(dy), dS, d_W, States, Saved, d_len, rev,
                                  dXW, dHU, stepwise=mode == "stepwise")
                    cupy.cuda.get_current_stream().synchronize()
                    dXW_h, dHU_h = dXW.get().reshape(T * B, -1), dHU.get().reshape(T * B, -1)
                    Hprev = States.get()[0, 1:] if rev else States.get()[0, :T]
                    results[mode] = dict(
                        y=Y.get(), hn=States.get()[:, 0 if rev else T],
                        dx=(dXW_h @ W_ih).reshape(T, B, I), dh0=dS.get(),
                        weight_hh=dHU_h.T @ Hprev.reshape(T * B, H),
                        weight_ih=dXW_h.T @ x.reshape(T * B, I),
                    )
                r = results["persistent"]
                want = dict(y=y_c, hn=hn_c, dx=dx_c, dh0=dh0_c, weight_hh=g_c["weight_hh"],
                            weight_ih=g_c["weight_ih"])
                errs, bad = [], []
                for key, w in want.items():
                    t = tol.forward_tolerance(dt) if key in ("y", "hn") else tol.grad_tolerance(dt)
                    err = float(np.max(np.abs(r[key] - w) / (t["atol"] + t["rtol"] * np.abs(w))))
                    errs.append(f"{key} {err:.2f}")
                    if not err <= 1:
                        bad.append(key)
                same = all(np.array_equal(r[k], results["stepwise"][k], equal_nan=True)
                           for k in r)
                if not same:
                    bad.append("persistent != stepwise")
                ok &= not bad
                print(f"{'ok  ' if not bad else 'FAIL'} {name} T={T} B={B} H={H} rev={rev} "
                      f"{np.dtype(dt).name}: error/tolerance {', '.join(errs)}"
                      f"{'; ' + ', '.join(bad) if bad else ''}", file=out, flush=True)
    return ok


def main(argv=None) -> int:
    """``python -m benchmarks.persistent [check|bench|loops]`` on a GPU machine."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks.persistent", description=main.__doc__)
    ap.add_argument("what", nargs="*", help="check, bench, loops (default: check bench)")
    ap.add_argument("--cells", default="lstm,gru")
    ap.add_argument("--hidden", default="256,512,1024")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    what = args.what or ["check", "bench"]
    bad = sorted(set(what) - {"check", "bench", "loops"})
    if bad:
        ap.error(f"unknown task(s) {', '.join(bad)}; choose from check, bench, loops")
    cells = [c for c in args.cells.split(",") if c]
    status = 0
    if "check" in what and not gpu_selfcheck():
        status = 1
    if "loops" in what:
        for name in cells:
            for H in (int(h) for h in args.hidden.split(",")):
                for B in (int(b) for b in args.batches.split(",")):
                    res = loop_benchmark(name, 100, H, B, args.repeats)
                    print(f"{name} H={H} B={B}: " + ", ".join(
                        f"{k} {v:.3f} ms" for k, v in res.items()), flush=True)
    if "bench" in what:
        benchmark(cells=cells, hidden=tuple(int(h) for h in args.hidden.split(",")),
                  batches=tuple(int(b) for b in args.batches.split(",")),
                  repeats=args.repeats)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
