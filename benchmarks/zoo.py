"""Evidence for the cell zoo: one row per shipped zoo cell, and minGRU's ``none`` form.

``python -m benchmarks.zoo`` prints a Markdown report (``docs/benchmarks/
zoo.md`` is one) with, per cell: the lines of its file; the largest errors
:func:`kernrnn.testing.check_cell` saw against the float64 reference; a
training step (forward and BPTT of one layer, float32, B=64, T=100, I=256,
H=256) of kernrnn next to the same cell written as a PyTorch loop with
autograd (eager), timed in the same process with interleaved repetitions
(medians); and ``kernrnn train --cell NAME``'s held-out error against the
naive baseline (the default forecasting task and budget).  Then minGRU's
``recurrent="none"`` layer against a dense cell with the same math that
ignores its ``hu`` (what minGRU cost before contract v2).

The PyTorch loops are written from the cells' equations (``docs/cells.md``),
with the input projection (and its norm) for all steps in one product, as a
careful eager implementation would; torch is needed only for that column.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kernrnn.cell import Cell, sigmoid

__all__ = ["ZOO", "SIZE", "file_lines", "conformance", "time_training_steps", "train_cells",
           "mingru_forms", "main"]

ZOO = ("lstm_peephole", "cifg", "janet", "indrnn", "mingru", "minlstm", "lstm_ln", "gru_ln",
       "ugrnn", "mgu", "slstm", "rhn", "cornn", "sru", "antisymmetric")
#: Sizes of the timed training step.
SIZE = {"B": 64, "T": 100, "I": 256, "H": 256}


def file_lines(name: str) -> int:
    """Lines of the file that defines the registered cell ``name``."""
    import importlib

    from kernrnn.plugins import get_registry

    module = importlib.import_module(get_registry().source(name).plugin)
    return len(Path(module.__file__).read_text().splitlines())


def conformance(name: str, examples: int = 10) -> dict:
    """:func:`~kernrnn.testing.check_cell`'s largest errors for ``name`` (raises on failure)."""
    from kernrnn.testing import check_cell

    r = check_cell(name, examples=examples)
    return {"float64": r.max_forward_error["float64"], "float32": r.max_forward_error["float32"],
            "gradient": r.max_gradient_error, "examples": r.examples}


# -- the cells as PyTorch loops ----------------------------------------------------


def _torch_cells(torch):
    """name -> step(a, u, state, w): a, u the [B, G*H] input and recurrent parts."""
    sg, th = torch.sigmoid, torch.tanh

    def lstm_peephole(a, u, s, w):
        h, c = s
        ai, af, ag, ao = (a + u).chunk(4, 1)
        pi, pf, po = w["peephole"].chunk(3)
        c2 = sg(af + pf * c) * c + sg(ai + pi * c) * th(ag)
        return sg(ao + po * c2) * th(c2), c2

    def cifg(a, u, s, w):
        f, g, o = (a + u).chunk(3, 1)
        f = sg(f)
        c2 = f * s[1] + (1 - f) * th(g)
        return sg(o) * th(c2), c2

    def janet(a, u, s, w):
        sf, c = (a + u).chunk(2, 1)
        return (sg(sf) * s[0] + (1 - sg(sf - 1.0)) * th(c),)

    def indrnn(a, u, s, w):
        return (torch.relu(a + w["u"] * s[0]),)

    def mingru(a, u, s, w):
        z, hh = a.chunk(2, 1)
        z = sg(z)
        return ((1 - z) * s[0] + z * hh,)

    def minlstm(a, u, s, w):
        f, i, hh = a.chunk(3, 1)
        f, i = sg(f), sg(i)
        return ((f * s[0] + i * hh) / (f + i),)

    def lstm_ln(a, u, s, w):
        i, f, g, o = (a + u).chunk(4, 1)
        c2 = sg(f) * s[1] + sg(i) * th(g)
        cn = torch.nn.functional.layer_norm(c2, c2.shape[1:], w["norm_c_weight"],
                                            w["norm_c_bias"])
        return sg(o) * th(cn), c2

    def gru(a, u, s, w):
        ar, az, an = a.chunk(3, 1)
        ur, uz, un = u.chunk(3, 1)
        r, z = sg(ar + ur), sg(az + uz)
        n = th(an + r * un)
        return ((1 - z) * n + z * s[0],)

    def ugrnn(a, u, s, w):
        c, g = (a + u).chunk(2, 1)
        g = sg(g)
        return (g * s[0] + (1 - g) * th(c),)

    def mgu(a, u, s, w):
        af, an = a.chunk(2, 1)
        uf, un = u.chunk(2, 1)
        f = sg(af + uf)
        return ((1 - f) * s[0] + f * th(an + f * un),)

    def slstm(a, u, s, w):
        h, c, n, m = s
        it, ft, z, o = (a + u).chunk(4, 1)
        m2 = torch.maximum(ft + m, it)
        i, f = torch.exp(it - m2), torch.exp(ft + m - m2)
        c2, n2 = f * c + i * th(z), f * n + i
        return sg(o) * c2 / n2, c2, n2, m2

    def rhn(a, u, s, w):  # depth 3: layers 2, 3 read only the state, through weight_hs{l}
        def layer(h, t, prev):
            t = sg(t)
            return th(h) * t + prev * (1 - t)
        s1 = layer(*(a + u).chunk(2, 1), s[0])
        s2 = layer(*(s1 @ w["weight_hs1"].T + w["bias_hs1"]).chunk(2, 1), s1)
        return (layer(*(s2 @ w["weight_hs2"].T + w["bias_hs2"]).chunk(2, 1), s2),)

    def cornn(a, u, s, w, dt=0.042, gamma=2.7, epsilon=4.7):  # u = W y + W_z z + b_hh
        y, z = s
        z2 = z + dt * (th(a + u) - gamma * y - epsilon * z)
        return y + dt * z2, z2

    def sru(a, u, s, w, x=None):  # a = [W x; W_f x; W_r x] + b; h_(t-1) not read
        wx, af, ar = a.chunk(3, 1)
        vf, vr = w["v"].chunk(2)
        c = s[1]
        f, r = sg(af + vf * c), sg(ar + vr * c)
        c2 = f * c + (1 - f) * wx
        return r * c2 + (1 - r) * x, c2

    def antisymmetric(a, u, s, w, eps=0.01):  # u from W - W^T - gamma I (see recurrent)
        return (s[0] + eps * th(a + u),)

    return {"lstm_peephole": lstm_peephole, "cifg": cifg, "janet": janet, "indrnn": indrnn,
            "mingru": mingru, "minlstm": minlstm, "lstm_ln": lstm_ln, "gru_ln": gru,
            "ugrnn": ugrnn, "mgu": mgu, "slstm": slstm, "rhn": rhn, "cornn": cornn,
            "sru": sru, "antisymmetric": antisymmetric}


def _torch_norm(torch, v, norm, n_blocks, gain):
    if norm is None:
        return v
    F = torch.nn.functional
    if norm.over == "row":
        parts = [v]
    else:
        parts = v.chunk(n_blocks, -1)
    if norm.kind == "layer":
        out = [F.layer_norm(p, p.shape[-1:]) for p in parts]
    else:
        out = [p * torch.rsqrt((p * p).mean(-1, keepdim=True) + 1e-5) for p in parts]
    return torch.cat(out, -1) * gain


def _torch_train_step(torch, cell, params, x, dy):
    """One training step of the cell as a PyTorch loop: forward, loss, autograd backward."""
    step = _torch_cells(torch)[cell.name]
    w = {k.removesuffix("_l0"): torch.tensor(v, requires_grad=True) for k, v in params.items()}
    xt, dyt = torch.tensor(x), torch.tensor(dy)
    T, B, _ = x.shape
    H = dy.shape[2]
    G = cell.n_gates

    def recurrent(state, W):
        # the states the product reads side by side (coRNN: [y; z]), else h
        h = torch.cat([state[k] for k in cell.recurrent_state_indices], 1)
        if cell.recurrent == "dense":
            v = h @ W.T
        else:  # heads: one product per head, back to gate-major [B, G*H]
            NH, dh = W.shape[0], W.shape[2]
            v = torch.bmm(h.view(B, NH, dh).transpose(0, 1), W.transpose(1, 2))
            v = v.view(NH, B, G, dh).permute(1, 2, 0, 3).reshape(B, G * H)
        return _torch_norm(torch, v, cell.recurrent_norm, G, w.get("norm_hh_weight")) \
            + w["bias_hh"]

    def run():
        for v in w.values():
            v.grad = None
        a = _torch_norm(torch, xt @ w["weight_ih"].T, cell.input_norm, G,
                        w.get("norm_ih_weight")) + w["bias_ih"]
        state = tuple(torch.zeros(B, H, dtype=xt.dtype) for _ in range(cell.n_state))
        if cell.name == "slstm":
            state = state[:2] + (torch.ones(B, H, dtype=xt.dtype),) + state[3:]
        W = w.get("weight_hh")
        if cell.recurrent_weight is not None:  # the parametrised W_hh, once per call
            W = cell.recurrent_weight.forward(W, torch, **cell.hyper_values())
        ys = []
        for t in range(T):
            u = recurrent(state, W) if cell.has_recurrent else None
            state = step(a[t], u, state, w, x=xt[t]) if cell.raw_input else \
                step(a[t], u, state, w)
            ys.append(state[0])
        y = torch.stack(ys)
        (y * dyt).sum().backward()
        return y.detach().numpy()

    return run


def _kernrnn_train_step(cell, params, x, dy, h0):
    import kernrnn

    layer = kernrnn.RNN(cell, x.shape[2], dy.shape[2], dtype=np.float32)
    layer.load_state_dict(params)

    def run():
        layer.zero_grad()
        y, _ = layer(x, h0)
        layer.backward(dy)
        return y

    return run


def _with_torch_threads(torch, n, restore, fn):
    def run():
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(restore)
    return run


def _median_times(fns: dict, repeats: int, warmup: int) -> dict:
    """Median seconds of each callable, repetitions interleaved (alternating order)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    keys = list(fns)
    for r in range(repeats):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _problem(cell, seed=0):
    from kernrnn.testing.strategies import Problem, make_arrays

    B, T, I, H = SIZE["B"], SIZE["T"], SIZE["I"], SIZE["H"]
    p = Problem(T, B, I, H, 1, False, None, True, seed)
    params, x, h0 = make_arrays(cell, p, np.float32)
    if cell.name != "slstm":
        h0 = tuple(np.zeros_like(h) for h in h0)
    else:  # the same initial state as the PyTorch loop: n = 1, the rest 0
        h0 = tuple((np.ones_like(h) if k == 2 else np.zeros_like(h)) for k, h in enumerate(h0))
    dy = np.random.default_rng(seed).uniform(-1, 1, (T, B, H)).astype(np.float32)
    return params, x, h0, dy


def time_training_steps(names=ZOO, repeats=5, warmup=1, threads=2, use_torch=True) -> dict:
    """name -> {"kernrnn": s, "torch": s, "torch_1thread": s}: medians, interleaved.

    ``torch`` runs with ``threads`` threads like kernrnn; ``torch_1thread`` with
    one (on a loaded machine PyTorch's OpenMP pool loses most to the load, so
    both are reported).  The torch entries are None without torch.
    """
    from kernrnn.bench.cpu import set_threads
    from kernrnn.plugins import get_registry

    torch = None
    if use_torch:
        try:
            import torch
        except ImportError:
            torch = None
    set_threads(threads, torch)
    out = {}
    for name in names:
        cell = get_registry().get(name)
        params, x, h0, dy = _problem(cell)
        h0_arg = h0[0] if cell.n_state == 1 else h0
        fns = {"kernrnn": _kernrnn_train_step(cell, params, x, dy, h0_arg)}
        if torch is not None:
            fns["torch"] = _torch_train_step(torch, cell, params, x, dy)
            # the two sides compute the same thing (float32 rounding apart)
            np.testing.assert_allclose(fns["kernrnn"](), fns["torch"](), rtol=1e-3, atol=1e-3)
            if threads > 1:  # PyTorch's OpenMP pool suffers most from a loaded machine
                fns["torch_1thread"] = _with_torch_threads(torch, 1, threads, fns["torch"])
        t = _median_times(fns, repeats, warmup)
        out[name] = {"kernrnn": t["kernrnn"], "torch": t.get("torch"),
                     "torch_1thread": t.get("torch_1thread")}
        print(f"  {name}: {out[name]}", file=sys.stderr, flush=True)
    return out


def train_cells(names=ZOO, extra=()) -> dict:
    """``kernrnn train --cell NAME`` (default task and budget) -> its held-out metrics."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            run_dir = Path(tmp) / name
            cmd = [sys.executable, "-m", "kernrnn", "train", "--cell", name, "--no-progress",
                   "--no-plot", "--out", str(run_dir), *extra]
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            m = json.loads((run_dir / "metrics.json").read_text())
            out[name] = {**m["metrics"], "epochs": m["epochs"], "wall_time_s": m["wall_time_s"]}
            print(f"  {name}: {out[name]['model']:.2f} vs {out[name]['baseline']:.2f}",
                  file=sys.stderr, flush=True)
    return out


# -- minGRU: "none" against the same math with a dead recurrent product -----------


def _dense_forward(xw, hu, prev):
    z = sigmoid(xw[0])
    return ((1 - z) * prev[0] + z * xw[1],), (z, xw[1])


def _dense_backward(saved, prev, dstate):
    z, candidate = saved
    dh = dstate[0]
    return (dh * (candidate - prev[0]) * z * (1 - z), dh * z), (0, 0), (dh * (1 - z),)


def _dense_reference(xw, hu, prev):
    z = 1.0 / (1.0 + np.exp(-xw[0]))
    return ((1.0 - z) * prev[0] + z * xw[1],)


#: minGRU as contract v1 had to write it: a dense recurrent product it ignores.
MINGRU_DENSE = Cell("mingru_dense", gates="zh", forward=_dense_forward,
                    backward=_dense_backward, reference=_dense_reference,
                    description="minGRU with a dead W_hh (benchmark only)")


def mingru_forms(repeats=9, warmup=2, threads=2, sizes=((64, 100, 256, 256), (64, 100, 32, 32))):
    """minGRU ``none`` vs the faked dense cell: medians of forward and training step, and sizes."""
    import kernrnn
    from kernrnn.bench.cpu import set_threads
    from kernrnn.plugins import get_registry

    set_threads(threads)
    rows = []
    for B, T, I, H in sizes:
        rng = np.random.default_rng(0)
        x = rng.uniform(-1, 1, (T, B, I)).astype(np.float32)
        dy = rng.uniform(-1, 1, (T, B, H)).astype(np.float32)
        none = kernrnn.RNN(get_registry().get("mingru"), I, H, dtype=np.float32, seed=0)
        dense = kernrnn.RNN(MINGRU_DENSE, I, H, dtype=np.float32, seed=0)
        dense.load_state_dict({**none.state_dict(), "weight_hh_l0": dense.params["weight_hh_l0"],
                               "bias_hh_l0": dense.params["bias_hh_l0"]})
        np.testing.assert_allclose(dense(x)[0], none(x)[0], rtol=1e-5, atol=1e-6)

        def train(layer):
            def run():
                layer.zero_grad()
                layer(x)
                layer.backward(dy)
            return run

        fns = {"none forward": lambda: none.eval()(x), "dense forward": lambda: dense.eval()(x)}
        t_fwd = _median_times(fns, repeats, warmup)
        none.train(), dense.train()
        t_trn = _median_times({"none": train(none), "dense": train(dense)}, repeats, warmup)
        n_none = sum(v.size for v in none.params.values())
        n_dense = sum(v.size for v in dense.params.values())
        rows.append({"size": (B, T, I, H), "params_none": n_none, "params_dense": n_dense,
                     "forward_none": t_fwd["none forward"], "forward_dense": t_fwd["dense forward"],
                     "train_none": t_trn["none"], "train_dense": t_trn["dense"]})
        print(f"  mingru {B, T, I, H}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


# -- report -------------------------------------------------------------------------


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def markdown(lines, errors, times, trained, forms, command, loads) -> str:
    out = [f"Command: `{command}`", "",
           f"Load average (1, 5, 15 min) before / after: {loads[0]} / {loads[1]}", "",
           "| cell | lines | fwd err f64 | fwd err f32 | grad err | train step kernrnn | "
           "PyTorch loop (2 / 1 threads) | PyTorch / kernrnn | held-out (model vs baseline) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name in lines:
        e, t, tr = errors.get(name), times.get(name), trained.get(name)
        err = (f"{e['float64']:.1e} | {e['float32']:.1e} | {e['gradient']:.1e}" if e
               else "- | - | -")
        if t:
            tt, ratio = "-", "-"
            if t["torch"]:
                one = t.get("torch_1thread") or t["torch"]
                tt = f"{t['torch'] * 1e3:.0f} / {one * 1e3:.0f} ms"
                best = min(t["torch"], one)
                ratio = f"{t['torch'] / t['kernrnn']:.1f}x / {best / t['kernrnn']:.1f}x"
            tm = f"{t['kernrnn'] * 1e3:.0f} ms | {tt} | {ratio}"
        else:
            tm = "- | - | -"
        trn = (f"{tr['metric']} {tr['model']:.2f} vs {tr['baseline']:.2f} "
               f"({100 * (1 - tr['model'] / tr['baseline']):+.0f}%)" if tr else "-")
        out.append(f"| `{name}` | {lines[name]} | {err} | {tm} | {trn} |")
    if forms:
        out += ["", "minGRU, `recurrent=\"none\"` against the same math with a dense `W_hh` "
                "it ignores (float32, medians):", "",
                "| B, T, I, H | parameters none / dense | forward none / dense | "
                "train step none / dense |", "|---|---|---|---|"]
        for r in forms:
            out.append(f"| {', '.join(map(str, r['size']))} | {r['params_none']} / "
                       f"{r['params_dense']} | {r['forward_none'] * 1e3:.1f} / "
                       f"{r['forward_dense'] * 1e3:.1f} ms "
                       f"({r['forward_dense'] / r['forward_none']:.1f}x) | "
                       f"{r['train_none'] * 1e3:.1f} / {r['train_dense'] * 1e3:.1f} ms "
                       f"({r['train_dense'] / r['train_none']:.1f}x) |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.zoo", description=__doc__)
    ap.add_argument("--cells", default=",".join(ZOO))
    ap.add_argument("--examples", type=int, default=10, help="check_cell problems per cell")
    ap.add_argument("--repeats", type=int, default=5, help="timed repetitions (medians)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma-separated: errors,times,train,forms")
    ap.add_argument("--json", default=None, help="also write the raw numbers here")
    args = ap.parse_args(argv)
    names = [c for c in args.cells.split(",") if c]
    skip = set(args.skip.split(","))
    os.environ.setdefault("KERNRNN_DISABLE_PLUGIN_AUTOLOAD", "1")
    from kernrnn.plugins import get_registry

    loads = [_load()]
    lines = {n: file_lines(n) for n in names}
    errors = {} if "errors" in skip else {n: conformance(n, args.examples) for n in names}
    get_registry()  # built before timing
    times = {} if "times" in skip else time_training_steps(names, args.repeats,
                                                           threads=args.threads)
    trained = {} if "train" in skip else train_cells(names)
    forms = [] if "forms" in skip else mingru_forms(threads=args.threads)
    loads.append(_load())
    command = "python -m benchmarks.zoo " + " ".join(argv if argv is not None
                                                         else sys.argv[1:])
    print(markdown(lines, errors, times, trained, forms, command.strip(), loads))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"lines": lines, "errors": errors, "times": times, "trained": trained,
             "forms": forms, "load": loads}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
