"""The progress display and the results of ``kernrnn train``: bar, plain lines, metrics, plot."""

from __future__ import annotations

import os
import sys
import time

from kernrnn.cli import require_extra


class _Progress:
    """Progress of a run: a tqdm bar on a terminal, plain lines elsewhere.

    A bar redraws itself with carriage returns, which garbles a log file or a
    CI log; when stderr is not a terminal a plain line is printed instead,
    at most every :data:`PLAIN_EVERY_S` seconds.
    """

    def __init__(self, enabled, total, initial, unit_name, stream=None):
        self.stream = stream or sys.stderr
        self.bar = None
        self.total = total
        self.items = 0
        self.seconds = 0.0
        self.unit_name = unit_name
        self._last = 0.0
        self.plain = enabled and not _isatty(self.stream)
        self._last_plain = time.perf_counter()
        if enabled and not self.plain:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            file=self.stream, smoothing=0.1)

    def _status(self, trainer, loss, norm):
        rate = self.items / self.seconds if self.seconds > 0 else 0.0
        return (f"epoch {trainer.epoch + 1} loss {loss:.4g} |g| {norm:.3g} "
                f"{rate:,.0f} {self.unit_name}/s")

    def step(self, trainer, loss, norm, n_items, dt):
        self.items += n_items
        self.seconds += dt
        now = time.perf_counter()
        if self.plain and now - self._last_plain >= PLAIN_EVERY_S:
            print(f"step {trainer.global_step}/{self.total}: {self._status(trainer, loss, norm)}",
                  file=self.stream, flush=True)
            self._last_plain = now
        if self.bar is None:
            return
        if now - self._last > 0.2 or trainer.global_step == self.bar.total:
            self.bar.set_postfix_str(self._status(trainer, loss, norm), refresh=False)
            self._last = now
        self.bar.update(1)

    def write(self, text):
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


#: Seconds between the plain progress lines written when stderr is not a terminal.
PLAIN_EVERY_S = 30.0


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _fmt_metrics(m):
    better = m["model"] < m["baseline"] if m.get("lower_is_better", True) else \
        m["model"] > m["baseline"]
    rel = (1 - m["model"] / m["baseline"]) * 100 if m["baseline"] else float("nan")
    verdict = f"{abs(rel):.0f}% {'better' if better else 'worse'} than the baseline"
    return (f"held-out {m['metric']}: model {m['model']:.4g} vs {m['baseline_name']} "
            f"{m['baseline']:.4g} ({verdict})")


def _plot(path, trainer, title):
    matplotlib = require_extra("matplotlib", "train", "the loss-curve plot (--no-plot skips it)")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    loss = np.asarray(trainer.losses)
    steps = np.arange(1, len(loss) + 1)
    ax.plot(steps, loss, color="tab:blue", alpha=0.25, lw=0.8, label="training loss (batch)")
    w = max(1, len(loss) // 50)
    if w > 1:
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, color="tab:blue", lw=1.5,
                label=f"training loss ({w}-step mean)")
    if trainer.eval_history:
        spe = trainer.steps_per_epoch()
        ep = np.array([e for e, _ in trainer.eval_history])
        ax.plot(ep * spe, [v for _, v in trainer.eval_history], "o-", color="tab:orange",
                ms=3, label="held-out loss")
    if np.all(loss > 0):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss ({trainer.task.loss})")
    import textwrap

    ax.set_title("\n".join(textwrap.fill(line, 90) for line in title.split("\n")), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
