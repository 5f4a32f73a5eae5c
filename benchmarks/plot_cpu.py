"""Plots of a recorded ``kernrnn bench --json`` run, for the Benchmarks page.

``python -m benchmarks.plot_cpu benchmarks/results/cpu.json --out docs/benchmarks``
draws, from the recorded timings only (nothing is measured):

* ``cpu-ratios.png``: kernrnn / PyTorch time for each cell with a PyTorch
  ``nn.*`` anchor, one panel per cell, forward and training step per size;
* ``cpu-loop-speedup.png``: how many times faster the CIFG plugin's training
  step is than the same cell written as a PyTorch loop (eager and
  ``torch.compile``), per size, when the run has ``--loop-cells``.

Ratios are medians of the interleaved repetitions, as in the run's Markdown
table (:class:`kernrnn.bench.cpu.Case`).  Needs matplotlib (the ``train`` extra).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kernrnn.bench.cpu import Case

__all__ = ["load_cases", "plot_ratios", "plot_loop_speedup", "main"]


def load_cases(path) -> list[Case]:
    """The cases of a ``kernrnn bench --json`` file."""
    return [Case(**c) for c in json.loads(Path(path).read_text())["cases"]]


def _size(c: Case) -> str:
    return f"{c.B},{c.T},{c.I},{c.H}"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ratios(cases, path, title: str) -> int:
    """One panel per cell with an ``nn.*`` anchor; returns the number of bars drawn."""
    plt = _plt()
    timed = [c for c in cases if c.torch and c.anchor == "nn"]
    cells = list(dict.fromkeys(c.cell for c in timed))
    if not cells:
        raise ValueError("no case with a PyTorch nn.* anchor in this run")
    sizes = list(dict.fromkeys(_size(c) for c in timed))
    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.8), sharey=True,
                             squeeze=False)
    drawn, top = 0, max(c.ratio for c in timed)
    for ax, cell in zip(axes[0], cells):
        for k, (mode, color) in enumerate((("forward", "tab:blue"), ("train", "tab:orange"))):
            xs, ys = [], []
            for i, size in enumerate(sizes):
                for c in timed:
                    if c.cell == cell and c.mode == mode and _size(c) == size:
                        xs.append(i + (k - 0.5) * 0.4)
                        ys.append(c.ratio)
            bars = ax.bar(xs, ys, 0.4, color=color,
                          label="forward" if mode == "forward" else "training step")
            ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1, rotation=90)
            drawn += len(ys)
        ax.axhline(1.0, color="k", linestyle="--", linewidth=1)
        ax.set_title(cell.upper() if cell in ("rnn", "lstm", "gru") else cell, fontsize=10)
        ax.set_xticks(range(len(sizes)), sizes, fontsize=7, rotation=35, ha="right")
        ax.set_xlabel("B,T,I,H", fontsize=7)
        ax.set_ylim(0, max(1.25, top * 1.2))
    axes[0][0].set_ylabel("kernrnn time / PyTorch time\n(below 1: kernrnn faster)", fontsize=8)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def plot_loop_speedup(cases, path, title: str) -> int:
    """PyTorch loop time / kernrnn time per size and loop kind; returns the bars drawn."""
    plt = _plt()
    loops = [c for c in cases if c.torch and c.anchor != "nn"]
    if not loops:
        return 0
    cell = loops[0].cell
    sizes = list(dict.fromkeys(_size(c) for c in loops))
    kinds = list(dict.fromkeys(c.anchor for c in loops))
    width = 0.8 / len(kinds)
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    drawn = 0
    for k, kind in enumerate(kinds):
        xs, ys = [], []
        for i, size in enumerate(sizes):
            for c in loops:
                if c.anchor == kind and _size(c) == size:
                    xs.append(i + (k - (len(kinds) - 1) / 2) * width)
                    ys.append(1.0 / c.ratio)
        bars = ax.bar(xs, ys, width, label=f"against the {kind}")
        ax.bar_label(bars, fmt="%.1fx", fontsize=7, padding=1)
        drawn += len(ys)
    ax.axhline(3.0, color="k", linestyle=":", linewidth=1)
    ax.set_ylim(0, 1.15 * max(1.0 / c.ratio for c in loops))
    ax.set_xticks(range(len(sizes)), sizes, fontsize=8, rotation=25, ha="right")
    ax.set_xlabel("B,T,I,H", fontsize=8)
    ax.set_ylabel("PyTorch loop time / kernrnn time", fontsize=8)
    ax.set_title(title + f"\n{cell} plugin, training step (dotted: 3x)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.plot_cpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help="a kernrnn bench --json file")
    ap.add_argument("--out", default=".", help="folder for the PNG files (default: here)")
    ap.add_argument("--title", default="", help="first line of each plot's title")
    args = ap.parse_args(argv)
    cases = load_cases(args.json)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = args.title or Path(args.json).name
    n = plot_ratios(cases, out / "cpu-ratios.png", title)
    print(f"{out / 'cpu-ratios.png'}: {n} bars")
    n = plot_loop_speedup(cases, out / "cpu-loop-speedup.png", title)
    if n:
        print(f"{out / 'cpu-loop-speedup.png'}: {n} bars")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
