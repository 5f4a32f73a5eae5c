"""kernrnn.torch's cell modules against nn.LSTMCell: the cost of one step, and a small generator.

    python benchmarks/torch_cells.py overhead [--repeats 300] [--threads 1]
    python benchmarks/torch_cells.py train [--steps 20]
    python benchmarks/torch_cells.py all --markdown results.md

``--threads N`` (default 1) gives PyTorch, Numba and BLAS N threads each: on a
small, shared machine more threads mostly measure the threads' hand-offs and
spinning workers.

``overhead``: one LSTM step at B = 1, 32, 256 and H = I = 64, 256, float32,
forward only (``no_grad``) and forward + backward, for ``nn.LSTMCell`` and
``kernrnn.torch.LSTMCell``, with the parts of kernrnn's cost: the native layer
alone (``kernrnn.RNN.forward_with``/``backward_with`` on NumPy arrays: the
kernels and the layer's Python) and an empty custom op of the same signature
(PyTorch's dispatch and autograd wrapping, nothing computed).  Every
repetition calls each variant once, in rotating order; medians.

``train``: PyTorch's ``time_sequence_prediction`` example (two LSTM cells of 51
units and a linear head predict the next value of sine waves, float64), shorter
waves and Adam instead of LBFGS so it runs in seconds: the same seed for
``nn.LSTMCell`` and ``kernrnn.torch.LSTMCell``, the loss at every step and the
time per step (interleaved).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time


def _threads_arg(argv) -> int:
    """``--threads``, read before Numba is imported (it reads NUMBA_NUM_THREADS once)."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return 1


THREADS = _threads_arg(sys.argv[1:])
os.environ["NUMBA_NUM_THREADS"] = str(THREADS)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402
from torch import nn  # noqa: E402

import kernrnn.torch as kt  # noqa: E402
from kernrnn.torch import _ops  # noqa: E402

SIZES = [(1, 64), (32, 64), (256, 64), (1, 256), (32, 256), (256, 256)]


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True,
                                   check=True).stdout.splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    import numba

    return (f"{model}, {os.cpu_count()} logical CPUs, load average {load:.1f} at the start; "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), numba "
            f"{numba.__version__} ({numba.config.NUMBA_NUM_THREADS} threads), python "
            f"{platform.python_version()}")


def interleaved(fns: dict, repeats: int, warmup: int = 20) -> dict:
    """Median microseconds per call of each closure, one call each per repetition."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    keys = list(fns)
    for rep in range(repeats):
        for k in keys[rep % len(keys):] + keys[:rep % len(keys)]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


# -- an empty op with rnn_forward's signature: PyTorch's own per-call cost -------------------


@torch.library.custom_op("kernrnn_bench::empty_forward", mutates_args=())
def empty_forward(spec: str, x: torch.Tensor, hx: list[torch.Tensor],
                  lengths: torch.Tensor | None, params: list[torch.Tensor], seed: torch.Tensor,
                  save: bool) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    return (x.new_empty((1, x.shape[1], hx[0].shape[2])), [h.new_empty(h.shape) for h in hx],
            torch.empty(1 if save else 0, dtype=torch.int64))


@torch.library.custom_op("kernrnn_bench::empty_backward", mutates_args=())
def empty_backward(spec: str, handle: torch.Tensor, dy: torch.Tensor, dhn: list[torch.Tensor],
                   params: list[torch.Tensor]
                   ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    return (dy.new_empty((1, dy.shape[1], params[0].shape[1])),
            [d.new_empty(d.shape) for d in dhn], [p.new_empty(p.shape) for p in params])


def _setup(ctx, inputs, output):
    ctx.spec, ctx.params = inputs[0], inputs[4]
    ctx.save_for_backward(output[2], inputs[1], *inputs[4])


def _grad(ctx, dy, dhn, _):
    handle, _x, *params = ctx.saved_tensors
    dhn = [torch.zeros_like(dy) if d is None else d for d in dhn]
    dx, dh0, dp = empty_backward(ctx.spec, handle, dy, dhn, list(params))
    return None, dx, list(dh0), None, list(dp), None, None


torch.library.register_autograd("kernrnn_bench::empty_forward", _grad, setup_context=_setup)


# -- (a) one step --------------------------------------------------------------------------


def overhead_rows(sizes=SIZES, repeats=300) -> list[dict]:
    rows = []
    for B, H in sizes:
        torch.manual_seed(0)
        ref = nn.LSTMCell(H, H)
        ours = kt.LSTMCell(H, H)
        ours.load_state_dict(ref.state_dict())
        x, h, c = torch.randn(B, H), torch.randn(B, H), torch.randn(B, H)
        params = [ours.weight_ih, ours.weight_hh, ours.bias_ih, ours.bias_hh]
        spec = ours._spec()
        engine = _ops.engine_for(spec, x)
        arrays = dict(zip(engine.param_shapes(), (p.detach().numpy() for p in params)))
        xa, ha, ca = x[None].numpy(), h[None].numpy(), c[None].numpy()
        dy = np.ones((1, B, H), dtype=np.float32)
        seed = torch.zeros((), dtype=torch.int64)

        def fwd(m):
            with torch.no_grad():
                m(x, (h, c))

        def step(m):
            h1, c1 = m(x, (h, c))
            (h1.sum() + c1.sum()).backward()

        def native_fwd():
            engine.forward_with(arrays, xa, (ha, ca), training=False, masks=False)

        def native_step():
            _, _, ctx = engine.forward_with(arrays, xa, (ha, ca), training=True, masks=False)
            engine.backward_with(ctx, dy, (dy, dy))

        def empty_fwd():
            with torch.no_grad():
                empty_forward(spec, x[None], [h[None], c[None]], None, params, seed, False)

        def empty_step():
            _, hn, _ = empty_forward(spec, x[None], [h[None], c[None]], None, params, seed, True)
            (hn[0].sum() + hn[1].sum()).backward()

        t = interleaved({"nn fwd": lambda: fwd(ref), "kt fwd": lambda: fwd(ours),
                         "nn step": lambda: step(ref), "kt step": lambda: step(ours),
                         "native fwd": native_fwd, "native step": native_step,
                         "empty op fwd": empty_fwd, "empty op step": empty_step}, repeats)
        rows.append({"B": B, "H": H, **t})
        print(f"B={B} H={H}: " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()) + " us",
              file=sys.stderr)
    return rows


def overhead_markdown(rows) -> str:
    cols = ["nn fwd", "kt fwd", "nn step", "kt step", "native fwd", "native step",
            "empty op fwd", "empty op step"]
    out = ["| B | H=I | " + " | ".join(cols)
           + " | kt/nn fwd | kt/nn step | kt fwd - floor | kt step - floor |",
           "|---" * (len(cols) + 6) + "|"]
    for r in rows:
        # the floor: the native layer's call plus an empty custom op's dispatch
        floor_fwd = r["native fwd"] + r["empty op fwd"]
        floor_step = r["native step"] + r["empty op step"]
        out.append(f"| {r['B']} | {r['H']} | " + " | ".join(f"{r[c]:.0f}" for c in cols)
                   + f" | {r['kt fwd'] / r['nn fwd']:.2f} | {r['kt step'] / r['nn step']:.2f}"
                   + f" | {r['kt fwd'] - floor_fwd:.0f} | {r['kt step'] - floor_step:.0f} |")
    return "\n".join(out)


# -- (b) a sine-wave generator ------------------------------------------------------------------


class Sequence(nn.Module):
    """PyTorch's time_sequence_prediction model, with the cell class as an argument."""

    def __init__(self, cell_cls, hidden=51):
        super().__init__()
        self.hidden = hidden
        self.lstm1 = cell_cls(1, hidden)
        self.lstm2 = cell_cls(hidden, hidden)
        self.linear = nn.Linear(hidden, 1)

    def forward(self, input):
        B = input.size(0)
        h = c = h2 = c2 = torch.zeros(B, self.hidden, dtype=input.dtype)
        outputs = []
        for input_t in input.split(1, dim=1):
            h, c = self.lstm1(input_t, (h, c))
            h2, c2 = self.lstm2(h, (h2, c2))
            outputs.append(self.linear(h2))
        return torch.cat(outputs, dim=1)


def sine_waves(n=32, length=200, period=20, seed=2):
    """The example's data (generate_sine_wave.py), shorter: n waves with random shifts."""
    rng = np.random.default_rng(seed)
    x = np.arange(length) + rng.integers(-4 * period, 4 * period, n)[:, None]
    return torch.from_numpy(np.sin(x / period).astype(np.float64))


def train(steps=20, n=32, length=200, lr=0.01, seed=0) -> dict:
    data = sine_waves(n, length)
    inp, target = data[:, :-1], data[:, 1:]
    models, opts = {}, {}
    for name, cls in (("nn.LSTMCell", nn.LSTMCell), ("kt.LSTMCell", kt.LSTMCell)):
        torch.manual_seed(seed)
        models[name] = Sequence(cls).double()
        opts[name] = torch.optim.Adam(models[name].parameters(), lr=lr)
    losses = {k: [] for k in models}
    times = {k: [] for k in models}
    for step in range(steps):
        for name in (list(models) if step % 2 == 0 else list(models)[::-1]):
            t0 = time.perf_counter()
            opts[name].zero_grad()
            loss = nn.functional.mse_loss(models[name](inp), target)
            loss.backward()
            opts[name].step()
            times[name].append(time.perf_counter() - t0)
            losses[name].append(loss.item())
        print(f"step {step + 1}: " + ", ".join(f"{k} {v[-1]:.6f}" for k, v in losses.items()),
              file=sys.stderr)
    return {"losses": losses, "ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
            "n": n, "length": length, "steps": steps, "lr": lr}


def train_markdown(r) -> str:
    a, b = r["losses"]["nn.LSTMCell"], r["losses"]["kt.LSTMCell"]
    out = [f"Two LSTM cells (51 units) and a linear head, {r['n']} sine waves of "
           f"{r['length']} points, float64, Adam lr {r['lr']}, {r['steps']} steps, seed 0.", "",
           "| step | nn.LSTMCell | kt.LSTMCell |", "|---|---|---|"]
    show = sorted({0, 1, 2, len(a) // 2, len(a) - 1})
    out += [f"| {i + 1} | {a[i]:.10f} | {b[i]:.10f} |" for i in show]
    diff = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    ms = r["ms"]
    out += ["", f"Largest relative loss difference over all steps: {diff:.2e}.", "",
            "| | nn.LSTMCell | kt.LSTMCell | ratio |", "|---|---|---|---|",
            f"| ms per training step (median) | {ms['nn.LSTMCell']:.0f} | "
            f"{ms['kt.LSTMCell']:.0f} | {ms['kt.LSTMCell'] / ms['nn.LSTMCell']:.2f} |"]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["overhead", "train", "all"])
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--markdown", help="also write the tables to this file")
    p.add_argument("--threads", type=int, default=THREADS,
                   help="threads for PyTorch, Numba and BLAS (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import scipy.linalg.cython_blas  # noqa: F401  (the BLAS Numba calls, so it is limited too)

    threadpool_limits(args.threads)
    parts = [f"Command: `python benchmarks/torch_cells.py {' '.join(argv or sys.argv[1:])}`  ",
             f"Machine: {machine()}", ""]
    if args.what in ("overhead", "all"):
        parts += ["### One LSTM step, float32, microseconds (medians)", "",
                  overhead_markdown(overhead_rows(repeats=args.repeats)), ""]
    if args.what in ("train", "all"):
        parts += ["### Sine-wave generator (time_sequence_prediction)", "",
                  train_markdown(train(steps=args.steps)), ""]
    text = "\n".join(parts)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
