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
    DeviceProps,
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
#: Standard deviations of a directional derivative's error allowed (see gpu_selfcheck).
SIGMAS = 3.0


def _reference_errors(cell, x, params, h0, lengths, rev, dy, dhn, got, dt, rng):
    """``{name: error / tolerance}`` of the GPU results ``got`` against the float64
    NumPy reference (:func:`kernrnn.testing.reference.reference_direction`).

    Forward (``y``, ``hn``): element-wise, with the forward tolerance of ``dt``.
    Gradients: the reference has no backward, so each one is checked along
    random directions ``v`` against Richardson central differences of the
    reference loss ``sum(y*dy) + sum(hn*dhn)`` (inputs as the kernels saw
    them, computed in float64).  Element errors ``e_i`` within the gradient
    tolerance ``t_i`` give ``sum(e_i v_i)`` a standard deviation of at most
    ``sqrt(sum((t_i v_i)^2))`` for normal ``v`` drawn after the kernels ran,
    so the allowance is :data:`SIGMAS` of those, plus the finite differences'
    own tolerance.  As in :func:`kernrnn.testing.conformance.gradient_errors`,
    a second direction is tried before a disagreement counts (a kink of
    ``relu`` crossed by the step).
    """
    from kernrnn.testing import tolerances as tol
    from kernrnn.testing.reference import reference_direction

    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    p64 = {k: f64(v) for k, v in params.items()}
    x64, h64 = f64(x), tuple(f64(h) for h in h0)
    dy64, dhn64 = f64(dy), f64(dhn)

    def run(p, xx, hh):
        return reference_direction(cell, xx, p, hh, lengths, reverse=rev)

    y_r, hn_r = run(p64, x64, h64)
    ft, gt = tol.forward_tolerance(dt), tol.grad_tolerance(dt)

    def scaled(a, b, t):
        a, b = f64(a), f64(b)
        return float(np.max(np.abs(a - b) / (t["atol"] + t["rtol"] * np.abs(b)), initial=0.0))

    errs = {"y": scaled(got["y"], y_r, ft),
            "hn": max(scaled(got["hn"][s], hn_r[s], ft) for s in range(len(hn_r)))}

    def loss(p, xx, hh):
        y, hn = run(p, xx, hh)
        return float(np.sum(y * dy64) + sum(np.sum(a * b) for a, b in zip(hn, dhn64)))

    targets = [(k, p64[k], got[k]) for k in params] + [("x", x64, got["dx"])]
    targets += [(f"h0[{s}]", h64[s], got["dh0"][s]) for s in range(len(h64))]
    for name, base, grad in targets:
        grad = f64(grad)
        for _direction in range(2):
            v = rng.standard_normal(base.shape)

            def at(eps, name=name, base=base, v=v):
                moved = base + eps * v
                if name in p64:
                    return loss({**p64, name: moved}, x64, h64)
                if name == "x":
                    return loss(p64, moved, h64)
                s = int(name[3:-1])
                return loss(p64, x64, h64[:s] + (moved,) + h64[s + 1:])

            fd = tol.directional_derivative(at)
            analytic = float(np.sum(grad * v))
            spread = float(np.sqrt(np.sum(((gt["atol"] + gt["rtol"] * np.abs(grad)) * v) ** 2)))
            allowed = SIGMAS * spread + tol.FD["atol"] + tol.FD["rtol"] * max(abs(fd), 1.0)
            err = abs(analytic - fd) / allowed
            if err <= 1:
                break
        errs[name] = err
    return errs


def gpu_selfcheck(cells=None, cases=None, file=None, dtypes=(np.float32, np.float64),
                  blocks=None) -> bool:
    """Run the persistent kernels on the GPU and compare them with the float64 reference.

    Several-block grids with the real grid barrier (what the simulator cannot
    run): forward and BPTT for every registered cell (or ``cells``), float32
    and float64, variable lengths and the reverse direction, against the
    float64 NumPy reference :mod:`kernrnn.testing.reference` on the same
    inputs (tolerances of :mod:`kernrnn.testing.tolerances`; gradients along
    random directions, see :func:`_reference_errors`), so that no code is
    shared with the kernels under test.  Also launches the same kernels once
    per step: per-block work is deterministic, so the persistent launch must
    match the stepwise one bit for bit; a broken barrier would show as a
    difference.  Prints one line per case and returns whether all passed.
    ``dtypes`` limits the precisions (each one compiles its own kernels);
    ``blocks`` overrides the grid (the device check's rehearsal under the
    simulator passes 1, since the simulator runs blocks one after another).
    """
    import sys

    from kernrnn.backends import cuda as cb
    from kernrnn.plugins import get_registry

    xp = cb.xp
    host = (lambda a: a.get()) if xp is not np else np.asarray  # noqa: E731

    def dev(a):  # a copy on the device (NumPy's asarray would alias under the simulator)
        return xp.array(a, copy=True)

    def sync():
        if xp is not np:
            xp.cuda.get_current_stream().synchronize()

    props = DeviceProps(sm_count=blocks or 1, smem_per_block_optin=227 * 1024,
                        name="simulator") if cb.SIMULATOR else None
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
                if not supported(cell, B, H, dt, props):
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
                XW = (x.reshape(T * B, I) @ W_ih.T).reshape(T, B, G * H) + b_ih
                results = {}
                for mode in ("persistent", "stepwise"):
                    States = xp.zeros((S, T + 1, B, H), dt)
                    States[:, T if rev else 0] = dev(h0)
                    Saved = xp.zeros((K, T, B, H), dt)
                    ybuf = xp.full((T, B, 2 * H), np.nan, dt)
                    Y = ybuf[:, :, :H]  # strided, as in a bidirectional layer
                    d_len = dev(lengths)
                    d_W = dev(W_hh)
                    forward_loop(cell, dev(XW), d_W, dev(b_hh), States, Saved,
                                 Y, d_len, rev, True, stepwise=mode == "stepwise", blocks=blocks)
                    dS = dev(dhn)
                    dXW = xp.full((T, B, G * H), np.nan, dt)
                    dHU = xp.full((T, B, G * H), np.nan, dt)
                    backward_loop(cell, dev(dy), dS, d_W, States, Saved, d_len, rev,
                                  dXW, dHU, stepwise=mode == "stepwise", blocks=blocks)
                    sync()
                    dXW_h, dHU_h = host(dXW).reshape(T * B, -1), host(dHU).reshape(T * B, -1)
                    St = host(States)
                    Hprev = St[0, 1:] if rev else St[0, :T]
                    results[mode] = dict(
                        y=host(Y), hn=St[:, 0 if rev else T],
                        dx=(dXW_h @ W_ih).reshape(T, B, I), dh0=host(dS),
                        weight_hh=dHU_h.T @ Hprev.reshape(T * B, H),
                        weight_ih=dXW_h.T @ x.reshape(T * B, I),
                        bias_ih=dXW_h.sum(axis=0), bias_hh=dHU_h.sum(axis=0),
                    )
                r = results["persistent"]
                params = {"weight_ih": W_ih, "weight_hh": W_hh, "bias_ih": b_ih,
                          "bias_hh": b_hh}
                errs = _reference_errors(cell, x, params, h0, lengths, rev, dy, dhn, r, dt,
                                         np.random.default_rng(rng.integers(2**32)))
                bad = [k for k, e in errs.items() if not e <= 1]
                same = all(np.array_equal(r[k], results["stepwise"][k], equal_nan=True)
                           for k in r)
                if not same:
                    bad.append("persistent != stepwise")
                ok &= not bad
                print(f"{'ok  ' if not bad else 'FAIL'} {name} T={T} B={B} H={H} rev={rev} "
                      f"{np.dtype(dt).name}: error/tolerance vs float64 reference "
                      f"{', '.join(f'{k} {e:.2f}' for k, e in errs.items())}"
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
