"""GPU check and benchmark: ``python -m benchmarks.gpu``.

On a machine with an NVIDIA GPU, CuPy, numba-cuda and PyTorch (CUDA), in a
few minutes and without network:

1. runs the gpu-marked tests (``pytest -m gpu``) of the checkout's ``tests/``;
2. checks the CUDA backend against the CPU float64 reference on random
   inputs: outputs and gradients (float64 and float32) of every shipped cell,
   and a float32 training step at a realistic size against the float64 CPU
   backend and against PyTorch with the same weights;
3. times forward (inference) and a training step (forward + backward) of
   kernrnn and of PyTorch's nn.RNN/LSTM/GRU (cuDNN) on the same GPU, float32,
   at (B=64, T=100, I=H=512) and (B=8, T=100, I=H=256), and prints a table
   of median times and ratios (kernrnn / cuDNN; below 1 means kernrnn is
   faster).

Exit status 0 when every check passed, 1 when one failed, 2 when there is no
usable GPU.  ``--out FILE`` also writes the report as Markdown (commit it as
``docs/benchmarks/cuda-<date>-<gpu>.md``).  From a source checkout without
installing: ``PYTHONPATH=.:plugins python3 -m benchmarks.gpu --out FILE``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SIZES = [(64, 100, 512, 512), (8, 100, 256, 256)]  # (B, T, I, H)
CELLS = [("rnn", "RNN"), ("lstm", "LSTM"), ("gru", "GRU")]


class Report:
    """Prints lines and keeps them for the Markdown file."""

    def __init__(self):
        self.lines: list[str] = []
        self.failures: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def fail(self, what: str) -> None:
        self.failures.append(what)
        self(f"FAILED: {what}")


def _versions() -> str:
    import cupy
    import numba

    parts = [f"python {platform.python_version()}", f"numpy {np.__version__}",
             f"numba {numba.__version__}", f"cupy {cupy.__version__}"]
    try:
        import importlib.metadata as md

        parts.append(f"numba-cuda {md.version('numba-cuda')}")
    except Exception:
        pass
    try:
        import torch

        parts.append(f"torch {torch.__version__} (cuDNN {torch.backends.cudnn.version()})")
    except Exception:
        parts.append("torch missing")
    return ", ".join(parts)


def _gpu_name() -> str:
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


# -- 1. tests ---------------------------------------------------------------------


def run_gpu_tests(report: Report, timeout: float) -> None:
    tests = Path(__file__).resolve().parent.parent / "tests"
    if not (tests / "test_gpu.py").exists():
        report("gpu tests: skipped (no tests/ directory in this checkout)")
        return
    import importlib.util

    if importlib.util.find_spec("pytest") is None or importlib.util.find_spec("hypothesis") is None:
        report("gpu tests: skipped (pytest or hypothesis is not installed)")
        return
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", str(tests), "-m", "gpu", "-q", "-p",
             "no:cacheprovider", "-rs"],
            cwd=tests.parent, capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        report.fail(f"pytest -m gpu did not finish within {timeout:.0f} s")
        return
    tail = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()][-15:]
    for ln in tail:
        report(f"    {ln}")
    if proc.returncode != 0:
        report(proc.stderr[-2000:])
        report.fail(f"pytest -m gpu exited with {proc.returncode}")
    else:
        report(f"gpu tests passed ({time.perf_counter() - t0:.0f} s)")


# -- 2. correctness ---------------------------------------------------------------


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)) if b.size else 0.0


def check_against_reference(report: Report) -> None:
    """Every registered cell: forward vs the float64 reference (f64 and f32), gradients vs
    finite differences on small problems and vs the CPU float64 backend on larger ones
    (finite differences across a relu kink are wrong on large problems, not the kernels)."""
    from kernrnn.plugins import get_registry
    from kernrnn.testing import tolerances as tol
    from kernrnn.testing.conformance import (
        ConformanceError,
        forward_errors,
        gradient_errors,
        random_problem,
        run_layer,
    )
    from kernrnn.testing.strategies import make_arrays

    report("| cell | problems | max fwd err f64 | max fwd err f32 | grad err vs FD (small, f64) "
           "| grad err vs CPU f64 (large) |")
    report("|---|---|---|---|---|---|")
    rng = np.random.default_rng(2024)
    for cell in get_registry():
        worst = {"f64": 0.0, "f32": 0.0, "fd": 0.0, "cpu": 0.0}
        n = 6
        try:
            for _ in range(n):
                small = random_problem(rng)
                worst["fd"] = max(worst["fd"], gradient_errors(cell, small, "cuda"))
                p = random_problem(rng, max_T=12, max_B=9, max_I=24, max_H=40, max_layers=2)
                for dtype, key in ((np.float64, "f64"), (np.float32, "f32")):
                    scaled, absolute = forward_errors(cell, p, dtype, "cuda")
                    if scaled > 1:
                        raise ConformanceError(
                            f"{np.dtype(dtype)} forward error {absolute:.3e} over "
                            f"{tol.forward_tolerance(dtype)} on {p}")
                    worst[key] = max(worst[key], absolute)
                params, x, h0 = make_arrays(cell, p, np.float64)
                D = 2 if p.bidirectional else 1
                dy = rng.uniform(-1, 1, (p.T, p.B, D * p.H))
                dhn = tuple(rng.uniform(-1, 1, (p.num_layers * D, p.B, p.H))
                            for _ in range(cell.n_state))
                want = run_layer(cell, p, params, x, h0, "cpu", dy, dhn)
                got = run_layer(cell, p, params, x, h0, "cuda", dy, dhn)
                errs = [_rel(got[2], want[2])] + [_rel(got[4][k], want[4][k]) for k in want[4]]
                errs += [_rel(a, b) for a, b in zip(got[3], want[3], strict=True)]
                worst["cpu"] = max(worst["cpu"], max(errs))
                if worst["cpu"] > 1e-9:
                    raise ConformanceError(f"float64 gradients differ from the CPU backend by "
                                           f"{worst['cpu']:.2e} (relative) on {p}")
        except ConformanceError as exc:
            report.fail(f"cell {cell.name!r} vs reference: {exc}")
            continue
        report(f"| {cell.name} | {n} | {worst['f64']:.1e} | {worst['f32']:.1e} | "
               f"{worst['fd']:.1e} | {worst['cpu']:.1e} |")


def check_training_step(report: Report, torch) -> None:
    """float32 CUDA vs float64 CPU backend (and PyTorch), one mid-size training step."""
    import cupy

    import kernrnn

    T, B, I, H = 50, 32, 128, 128
    lens = np.sort(np.random.default_rng(1).integers(T // 2, T + 1, B))[::-1].copy()
    report(f"\nfloat32 CUDA training step vs float64 CPU backend (T={T}, B={B}, I={I}, H={H}, "
           f"2 layers, bidirectional, variable lengths): max |err| / max |ref|")
    report("| cell | y | hn | dx | dh0 | weight grads | vs torch y |")
    report("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(7)
    for cell, tname in CELLS:
        ref = kernrnn.RNN(cell, I, H, num_layers=2, bidirectional=True, dtype=np.float64, seed=3)
        gpu = kernrnn.RNN(cell, I, H, num_layers=2, bidirectional=True, dtype=np.float32,
                          device="cuda")
        gpu.load_state_dict({k: cupy.asarray(v.astype(np.float32)) for k, v in ref.params.items()})
        x = rng.uniform(-1, 1, (T, B, I))
        dy = rng.uniform(-1, 1, (T, B, 2 * H))
        y_r, hn_r = ref(x, lengths=lens)
        dx_r, dh_r = ref.backward(dy)
        y_g, hn_g = gpu(cupy.asarray(x, dtype=cupy.float32), lengths=lens)
        dx_g, dh_g = gpu.backward(cupy.asarray(dy, dtype=cupy.float32))
        first = lambda s: s[0] if isinstance(s, tuple) else s  # noqa: E731
        errs = [_rel(cupy.asnumpy(y_g), y_r), _rel(cupy.asnumpy(first(hn_g)), first(hn_r)),
                _rel(cupy.asnumpy(dx_g), dx_r), _rel(cupy.asnumpy(first(dh_g)), first(dh_r)),
                max(_rel(cupy.asnumpy(gpu.grads[k]), ref.grads[k]) for k in ref.grads)]
        torch_err = float("nan")
        if torch is not None:
            m = getattr(torch.nn, tname)(I, H, num_layers=2, bidirectional=True).cuda()
            m.load_state_dict({k: torch.from_numpy(v.astype(np.float32)).cuda()
                               for k, v in ref.params.items()})
            packed = torch.nn.utils.rnn.pack_padded_sequence(
                torch.from_numpy(x.astype(np.float32)).cuda(), torch.from_numpy(lens))
            with torch.no_grad():
                out, _ = m(packed)
            out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)
            torch_err = _rel(cupy.asnumpy(y_g), out.cpu().numpy())
        report(f"| {cell} | " + " | ".join(f"{e:.1e}" for e in errs) + f" | {torch_err:.1e} |")
        if max(errs) > 2e-3 or torch_err > 2e-3:
            report.fail(f"{cell}: float32 CUDA training step differs from the float64 "
                        f"reference by {max(errs):.2e} (torch {torch_err:.2e}); expected < 2e-3")


# -- 3. timing --------------------------------------------------------------------


def _median_ms(fn, sync, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _time_case(cell, tname, B, T, I, H, torch, sync, reps):
    """Median ms (kernrnn fwd, same with CUDA graphs, cuDNN fwd, then the same for a
    training step) and the gate count."""
    import cupy

    import kernrnn

    layer = kernrnn.RNN(cell, I, H, dtype=np.float32, device="cuda", seed=0)
    x = cupy.random.uniform(-1, 1, (T, B, I), dtype=cupy.float32)
    dy = cupy.random.uniform(-1, 1, (T, B, H), dtype=cupy.float32)

    def k_fwd():
        layer.eval()
        layer(x)

    def k_train():
        layer.train()
        layer(x)
        layer.backward(dy)

    from kernrnn.backends import cuda as cb

    cb.set_graphs(False)
    kf = _median_ms(k_fwd, sync, reps)
    kt = _median_ms(k_train, sync, reps)
    cb.set_graphs(True)  # warm-up runs eagerly, captures, then replays
    try:
        kfg = _median_ms(k_fwd, sync, reps)
        ktg = _median_ms(k_train, sync, reps)
    finally:
        cb.set_graphs(None)
    tf = tt = float("nan")
    if torch is not None:
        m = getattr(torch.nn, tname)(I, H).cuda()
        # cuDNN computes dx too when x requires grad, as kernrnn always does
        tx = torch.as_tensor(x, device="cuda").requires_grad_()
        tdy = torch.as_tensor(dy, device="cuda")

        def t_fwd():
            with torch.no_grad():
                m(tx)

        def t_train():
            out, _ = m(tx)
            out.backward(tdy)

        tf = _median_ms(t_fwd, sync, reps)
        tt = _median_ms(t_train, sync, reps)
    return kf, kfg, tf, kt, ktg, tt, layer.cell.n_gates


def time_against_cudnn(report: Report, torch, reps: int) -> None:
    import cupy

    from kernrnn.backends import cuda as cb

    def sync():
        cupy.cuda.Device().synchronize()
        if torch is not None:
            torch.cuda.synchronize()

    report(f"\nfloat32 (cuDNN without TF32), median of {reps} runs, ms; ratio = kernrnn / cuDNN "
           f"(< 1: kernrnn faster); forward = inference, train = forward + backward incl. dx; "
           f"CUDA path: {cb.get_path()}")
    report("(graphs: the per-step loop replayed as a CUDA graph, KERNRNN_CUDA_GRAPHS=1)")
    report("| cell | B | T | I | H | kernrnn fwd | +graphs | cuDNN fwd | ratio | ratio graphs | "
           "kernrnn train | +graphs | cuDNN train | ratio | ratio graphs | fwd TFLOP/s |")
    report("|" + "---|" * 16)
    for cell, tname in CELLS:
        for B, T, I, H in SIZES:
            kf, kfg, tf, kt, ktg, tt, G = _time_case(cell, tname, B, T, I, H, torch, sync, reps)
            flops = 2.0 * T * B * G * H * (I + H)
            report(f"| {cell} | {B} | {T} | {I} | {H} | {kf:.3f} | {kfg:.3f} | {tf:.3f} | "
                   f"{kf / tf:.2f} | {kfg / tf:.2f} | {kt:.3f} | {ktg:.3f} | {tt:.3f} | "
                   f"{kt / tt:.2f} | {ktg / tt:.2f} | {flops / min(kf, kfg) / 1e9:.2f} |")
    report(f"graph use: {cb.graph_stats}")
    raw = {np.dtype(k).name: v for k, v in cb._raw_gemm_ok.items()}
    report(f"per-step GEMM through raw cuBLAS calls (else cupy.matmul): {raw or 'not used'}")


# -- main -------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20, help="timed runs per case (default 20)")
    ap.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    ap.add_argument("--skip-checks", action="store_true", help="do not run the correctness checks")
    ap.add_argument("--test-timeout", type=float, default=240.0, help="seconds for pytest -m gpu")
    ap.add_argument("--out", type=Path, help="also write the report to this Markdown file")
    args = ap.parse_args(argv)

    from kernrnn.backends import cuda as cb

    try:
        cb.require()
    except cb.CudaUnavailableError as exc:
        print(f"no usable GPU: {exc}", file=sys.stderr)
        return 2
    try:
        import torch

        from benchmarks import torch_fp32_precision

        # kernrnn computes float32 in float32; so must cuDNN for a like-for-like check
        # and timing (its default lets RNNs use TF32 tensor cores, 10-bit mantissas).
        torch_fp32_precision(torch, "ieee")
        if not torch.cuda.is_available():
            print("PyTorch has no CUDA: cuDNN timings are left out", file=sys.stderr)
            torch = None
    except ImportError:
        print("PyTorch is not installed: cuDNN timings are left out", file=sys.stderr)
        torch = None

    report = Report()
    t_start = time.perf_counter()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    report(f"# kernrnn CUDA check and benchmark, {now}")
    report(f"GPU: {_gpu_name()}; {_versions()}")
    report()
    steps = []
    if not args.skip_tests:
        steps.append(("gpu-marked tests", lambda: run_gpu_tests(report, args.test_timeout)))
    if not args.skip_checks:
        steps.append(("CUDA vs float64 reference", lambda: check_against_reference(report)))
        steps.append(("training step", lambda: check_training_step(report, torch)))
    steps.append(("timing", lambda: time_against_cudnn(report, torch, args.reps)))
    for name, step in steps:
        report(f"\n## {name}\n")
        t0 = time.perf_counter()
        try:
            step()
        except Exception as exc:  # report and go on: the other parts still tell something
            import traceback

            report("```\n" + traceback.format_exc()[-3000:] + "```")
            report.fail(f"{name}: {type(exc).__name__}: {exc}")
        report(f"({name}: {time.perf_counter() - t0:.1f} s)")
    report(f"\ntotal {time.perf_counter() - t_start:.0f} s; "
           + ("all checks passed" if not report.failures
              else f"{len(report.failures)} failure(s): " + "; ".join(report.failures)))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(report.lines) + "\n")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
