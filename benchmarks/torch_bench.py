"""PyTorch-integration benchmark: ``python -m benchmarks.torch_bench``.

Three measurements, float32, one process, interleaved repetitions, medians
(the method of :mod:`kernrnn.bench.cpu`, whose ``SIZES`` it uses):

* a small language model (embedding, 2-layer LSTM, linear head) trained for N
  steps from the same seed with ``torch.nn.LSTM`` and ``kernrnn.torch.LSTM``:
  the losses of both and the time per step;
* a training-step table (forward, backward of every gradient) at the three
  sizes: ``nn.LSTM`` against ``kernrnn.torch.LSTM``, and a CIFG LSTM written
  as a PyTorch loop (eager and ``torch.compile``) against the same cell
  through ``kernrnn.torch.Recurrent``;
* the autograd adapter's overhead: ``kernrnn.torch`` against the native layer
  ``kernrnn.RNN`` (NumPy, explicit backward) on the same problem.

The CIFG cell comes from the example plugin:
``pip install -e docs/examples/kernrnn-example-cells``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from kernrnn.bench.cpu import SIZES, machine, set_threads, versions

__all__ = ["lm_run", "step_table", "main"]


def _median_ms(ts) -> float:
    return statistics.median(ts) * 1e3


def _interleaved(fns: dict, repeats: int, warmup: int) -> dict:
    """Seconds per call of each closure, one call of each per repetition, rotating order."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    keys = list(fns)
    for rep in range(repeats):
        order = keys[rep % len(keys):] + keys[:rep % len(keys)]
        for k in order:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


# -- (a) a small language model --------------------------------------------------------


def lm_run(steps=50, vocab=64, emb=32, hidden=128, batch=32, seq=50, seed=0) -> dict:
    """Train the same LM with nn.LSTM and kernrnn.torch.LSTM, step by step in turn."""
    import torch
    from torch import nn

    import kernrnn.torch as kt

    class LM(nn.Module):
        def __init__(self, rnn_cls):
            super().__init__()
            self.embed = nn.Embedding(vocab, emb)
            self.rnn = rnn_cls(emb, hidden, num_layers=2, batch_first=True)
            self.head = nn.Linear(hidden, vocab)

        def forward(self, tokens):
            y, _ = self.rnn(self.embed(tokens))
            return self.head(y)

    models, opts = {}, {}
    for name, cls in (("torch.nn.LSTM", nn.LSTM), ("kernrnn.torch.LSTM", kt.LSTM)):
        torch.manual_seed(seed)
        models[name] = LM(cls)
        opts[name] = torch.optim.Adam(models[name].parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed + 1)
    # a learnable stream: each token is the previous one plus a small random step
    steps_tok = torch.randint(-2, 3, (steps, batch, seq + 1), generator=g)
    data = torch.cumsum(steps_tok, dim=2) % vocab
    losses = {k: [] for k in models}
    times = {k: [] for k in models}
    for i in range(steps):
        tokens = data[i]
        names = list(models) if i % 2 == 0 else list(reversed(models))
        for name in names:
            m, opt = models[name], opts[name]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            logits = m(tokens[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, vocab),
                                               tokens[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            times[name].append(time.perf_counter() - t0)
            losses[name].append(loss.item())
    a, b = (np.array(losses[k]) for k in models)
    return {"losses": losses, "times": times, "max_abs_diff": float(np.abs(a - b).max()),
            "max_rel_diff": float((np.abs(a - b) / np.abs(a)).max()),
            "config": dict(steps=steps, vocab=vocab, emb=emb, hidden=hidden, batch=batch,
                           seq=seq)}


# -- (b, c) training steps -------------------------------------------------------------


def _cifg_loop(x, w_ih, w_hh, b_ih, b_hh):
    """The CIFG LSTM of the example plugin, as a PyTorch loop (gates f, g, o)."""
    import torch

    T, B, _ = x.shape
    H = w_hh.shape[1]
    xw = x @ w_ih.T + b_ih
    h = x.new_zeros(B, H)
    c = x.new_zeros(B, H)
    ys = []
    for t in range(T):
        z = xw[t] + h @ w_hh.T + b_hh
        f = torch.sigmoid(z[:, :H])
        g = torch.tanh(z[:, H:2 * H])
        o = torch.sigmoid(z[:, 2 * H:])
        c = f * c + (1 - f) * g
        h = o * torch.tanh(c)
        ys.append(h)
    return torch.stack(ys)


def _torch_train_step(torch, forward, x, dy, params):
    def step():
        for p in params:
            p.grad = None
        x.grad = None
        forward(x).backward(dy)
    return step


def _native_train_step(layer, x, dy):
    def step():
        layer(x)
        layer.backward(dy)
    return step


def step_table(sizes=SIZES, repeats=10, warmup=2, compiled=True, cifg=True, proj=True,
               progress=None) -> list[dict]:
    """Training-step medians (ms) per size for every implementation.

    ``proj``: also the LSTM with projections (``proj_size = H // 2``)."""
    import torch

    import kernrnn
    import kernrnn.torch as kt

    rows = []
    for (B, T, I, H) in sizes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(T, B, I, generator=g).requires_grad_()
        dy = torch.randn(T, B, H, generator=g)
        fns = {}
        torch.manual_seed(0)
        ref = torch.nn.LSTM(I, H)
        ours = kt.LSTM(I, H)
        ours.load_state_dict(ref.state_dict())
        fns["nn.LSTM"] = _torch_train_step(torch, lambda x: ref(x)[0], x, dy,
                                           list(ref.parameters()))
        fns["kt.LSTM"] = _torch_train_step(torch, lambda x: ours(x)[0], x, dy,
                                           list(ours.parameters()))
        native = kernrnn.RNN("lstm", I, H, dtype=np.float32)
        native.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()})
        xn, dyn = x.detach().numpy().copy(), dy.numpy().copy()
        fns["native lstm"] = _native_train_step(native, xn, dyn)
        if proj:
            P = H // 2
            dyp = torch.randn(T, B, P, generator=g)
            torch.manual_seed(0)
            ref_p = torch.nn.LSTM(I, H, proj_size=P)
            ours_p = kt.LSTM(I, H, proj_size=P)
            ours_p.load_state_dict(ref_p.state_dict())
            fns["nn.LSTM proj"] = _torch_train_step(torch, lambda x: ref_p(x)[0], x, dyp,
                                                    list(ref_p.parameters()))
            fns["kt.LSTM proj"] = _torch_train_step(torch, lambda x: ours_p(x)[0], x, dyp,
                                                    list(ours_p.parameters()))
        compile_s = None
        if cifg:
            torch.manual_seed(1)
            rec = kt.Recurrent("cifg", I, H)
            ps = [rec.weight_ih_l0, rec.weight_hh_l0, rec.bias_ih_l0, rec.bias_hh_l0]
            fns["cifg loop eager"] = _torch_train_step(
                torch, lambda x: _cifg_loop(x, *ps), x, dy, ps)
            if compiled:
                loop_c = torch.compile(_cifg_loop, dynamic=False)
                t0 = time.perf_counter()
                loop_c(x, *ps).backward(dy)
                compile_s = time.perf_counter() - t0
                fns["cifg loop compiled"] = _torch_train_step(
                    torch, lambda x: loop_c(x, *ps), x, dy, ps)
            fns["kt.Recurrent cifg"] = _torch_train_step(torch, lambda x: rec(x)[0], x, dy, ps)
            nat_c = kernrnn.RNN("cifg", I, H, dtype=np.float32)
            nat_c.load_state_dict({k: v.detach().numpy() for k, v in rec.state_dict().items()})
            fns["native cifg"] = _native_train_step(nat_c, xn, dyn)
        times = _interleaved(fns, repeats, warmup)
        row = {"size": (B, T, I, H), "ms": {k: _median_ms(v) for k, v in times.items()},
               "compile_s": compile_s}
        rows.append(row)
        if progress:
            progress(row)
    return rows


# -- report ---------------------------------------------------------------------------


def _ratio(ms, a, b):
    return f"{ms[a] / ms[b]:.2f}" if a in ms and b in ms else "-"


def markdown(lm, rows, threads, argv) -> str:
    out = [f"Command: `python -m benchmarks.torch_bench {' '.join(argv)}`  ",
           f"Machine: {machine()}; {threads} threads (Numba, BLAS, torch), one process.  ",
           f"Versions: {versions()}", ""]
    if lm:
        c = lm["config"]
        names = list(lm["losses"])
        out += ["### (a) Language model, same seed, dropout off", "",
                f"Embedding {c['vocab']}x{c['emb']}, 2-layer LSTM hidden {c['hidden']}, "
                f"linear head; batch {c['batch']} x {c['seq']} tokens, Adam 3e-3, "
                f"{c['steps']} steps, float32.", "",
                "| step | " + " | ".join(names) + " |", "|---|---|---|"]
        n = len(lm["losses"][names[0]])
        for i in sorted({0, 1, 2, n // 4, n // 2, 3 * n // 4, n - 1}):
            out.append(f"| {i + 1} | " + " | ".join(f"{lm['losses'][k][i]:.6f}" for k in names)
                       + " |")
        out += ["", f"Largest loss difference over all steps: {lm['max_abs_diff']:.2e} "
                f"(relative {lm['max_rel_diff']:.2e}).", "",
                "| | " + " | ".join(names) + " | ratio |", "|---|---|---|---|",
                "| ms per step (median) | " + " | ".join(
                    f"{_median_ms(lm['times'][k][2:]):.1f}" for k in names)
                + f" | {_median_ms(lm['times'][names[1]][2:]) / _median_ms(lm['times'][names[0]][2:]):.2f} |",
                ""]
    if rows:
        keys = list(rows[0]["ms"])
        out += ["### (b, c) Training step (forward + backward), ms, medians", "",
                "| B,T,I,H | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
        for r in rows:
            out.append(f"| {','.join(map(str, r['size']))} | "
                       + " | ".join(f"{r['ms'][k]:.2f}" for k in keys) + " |")
        out += ["", "Ratios (time / time):", "",
                "| B,T,I,H | kt.LSTM / nn.LSTM | kt.Recurrent cifg / cifg loop eager | "
                "kt.Recurrent cifg / cifg loop compiled | adapter: kt.LSTM / native lstm | "
                "adapter: kt.Recurrent cifg / native cifg | "
                "LSTMP (proj_size H/2): kt.LSTM / nn.LSTM | torch.compile time s |",
                "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            ms = r["ms"]
            cs = f"{r['compile_s']:.0f}" if r["compile_s"] is not None else "-"
            out.append(f"| {','.join(map(str, r['size']))} | {_ratio(ms, 'kt.LSTM', 'nn.LSTM')} | "
                       f"{_ratio(ms, 'kt.Recurrent cifg', 'cifg loop eager')} | "
                       f"{_ratio(ms, 'kt.Recurrent cifg', 'cifg loop compiled')} | "
                       f"{_ratio(ms, 'kt.LSTM', 'native lstm')} | "
                       f"{_ratio(ms, 'kt.Recurrent cifg', 'native cifg')} | "
                       f"{_ratio(ms, 'kt.LSTM proj', 'nn.LSTM proj')} | {cs} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.torch_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--lm-steps", type=int, default=50, help="LM training steps (0: skip)")
    p.add_argument("--sizes", default="all", help="'all' or indices into SIZES, e.g. 0,1")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd loop")
    p.add_argument("--no-cifg", action="store_true", help="skip the CIFG rows")
    p.add_argument("--no-proj", action="store_true", help="skip the LSTM-with-projections rows")
    p.add_argument("--markdown", default=None, help="also write the report to this file")
    args = p.parse_args(argv)
    import torch

    set_threads(args.threads, torch)
    sizes = SIZES if args.sizes == "all" else [SIZES[int(i)] for i in args.sizes.split(",")]
    lm = lm_run(args.lm_steps) if args.lm_steps else None
    if lm:
        print(f"LM: largest loss difference {lm['max_abs_diff']:.2e}", file=sys.stderr)
    rows = step_table(sizes, repeats=args.repeats, compiled=not args.no_compile,
                      cifg=not args.no_cifg, proj=not args.no_proj,
                      progress=lambda r: print(r, file=sys.stderr, flush=True))
    report = markdown(lm, rows, args.threads, argv)
    print(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
