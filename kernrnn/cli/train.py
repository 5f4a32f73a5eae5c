"""``kernrnn train``, ``kernrnn predict``, ``kernrnn generate``.

``kernrnn train`` with no arguments trains an LSTM on the embedded yearly
sunspot series on the CPU, compares the held-out forecast with the last-value
baseline, and writes a checkpoint, a loss-curve PNG and ``metrics.json`` to
``--out``.  ``--resume CKPT`` continues a run exactly where it stopped.
matplotlib and tqdm (the ``train`` extra) are imported only when used.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

from kernrnn._checks import to_host
from kernrnn.cli import require_extra

# Options that define a run; on --resume they come from the checkpoint and an
# explicitly given different value is an error.  None marks "not given".
TASK_DEFAULTS = {
    "forecast": {"epochs": 40, "lr": 3e-3, "batch_size": 16, "hidden": 32},
    "charlm": {"epochs": 10, "lr": 3e-3, "batch_size": 32, "hidden": 128},
    "adding": {"epochs": 40, "lr": 1e-2, "batch_size": 32, "hidden": 64},
    "copy": {"epochs": 20, "lr": 3e-3, "batch_size": 32, "hidden": 64},
}
COMMON_DEFAULTS = {
    "cell": "lstm", "layers": 1, "device": "cpu", "dtype": "float32", "optimizer": "adam",
    "momentum": 0.9, "clip": 1.0, "tbptt": 0, "seed": 0,
    "embedding": None, "dropout": 0.0, "recurrent_dropout": 0.0, "input_dropout": 0.0,
    "zoneout": None, "proj": 0,
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a model (default: LSTM on the embedded sunspot series, CPU)",
        description="Train a recurrent model and compare it with a naive baseline on held-out "
                    "data.  With no options: an LSTM forecasting the embedded yearly sunspot "
                    "numbers on the CPU.",
    )
    g = p.add_argument_group("data")
    g.add_argument("--task", choices=["forecast", "charlm", "adding", "copy"], default=None,
                   help="forecast: a series (embedded sunspots or --data CSV); charlm: "
                        "character LM of --data TEXT; adding / copy: synthetic long-memory "
                        "tasks (default: from --data)")
    g.add_argument("--data", default=None, help="CSV time series or text file")
    g.add_argument("--column", default=None, help="CSV column name or 0-based index "
                                                   "(default: the last column)")
    g.add_argument("--seq-len", type=int, default=None,
                   help="window length (forecast 20, charlm 100); T for adding/copy (100)")
    g.add_argument("--steps-per-epoch", type=int, default=None,
                   help="batches per epoch of the synthetic tasks (default 50)")
    g.add_argument("--vary-lengths", action="store_true", default=None,
                   help="adding problem with per-sequence lengths in [T/2, T]")
    g = p.add_argument_group("model")
    g.add_argument("--cell", default=None, help="registered cell (`kernrnn cells`; default lstm)")
    g.add_argument("--hidden", type=int, default=None,
                   help="hidden units per layer (forecast 32, charlm 128, adding/copy 64)")
    g.add_argument("--layers", type=int, default=None, help="stacked recurrent layers (1)")
    g.add_argument("--embedding", type=int, default=None, help="embedding size (token tasks)")
    g.add_argument("--dropout", type=float, default=None,
                   help="dropout between stacked layers, as PyTorch's (0; needs --layers >= 2)")
    g.add_argument("--recurrent-dropout", type=float, default=None,
                   help="variational dropout on h_{t-1}, one mask per sequence, inside the "
                        "kernels (0)")
    g.add_argument("--input-dropout", type=float, default=None,
                   help="variational dropout on each layer's input (0)")
    g.add_argument("--zoneout", type=float, nargs="+", default=None, metavar="Z",
                   help="zoneout rate, one for every state or one per state, e.g. 0.1 0.05 "
                        "for the LSTM's (h, c) (0)")
    g.add_argument("--proj", type=int, default=None, metavar="P",
                   help="LSTM with projections: h = W_hr (o * tanh c) of P < --hidden units, "
                        "as PyTorch's proj_size (0: none)")
    g.add_argument("--no-bias", action="store_true", default=None,
                   help="recurrent layers without bias parameters (PyTorch's bias=False)")
    g.add_argument("--device", default=None, help="cpu (default) or cuda")
    g.add_argument("--dtype", choices=["float32", "float64"], default=None,
                   help="parameter and activation precision (float32)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None,
                   help="epochs to train in total (forecast 40, charlm 10, adding 40, copy 20)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="sequences per batch (forecast 16, others 32)")
    g.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], default=None,
                   help="(adam)")
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate (3e-3; adding 1e-2)")
    g.add_argument("--momentum", type=float, default=None, help="SGD momentum (0.9)")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="L2 penalty (adam, sgd; 0) or decoupled decay (adamw; 0.01)")
    g.add_argument("--clip", type=float, default=None,
                   help="clip the global gradient norm to this (1.0; 0 = no clipping)")
    g.add_argument("--tbptt", type=int, default=None,
                   help="truncated BPTT: chunks of this many steps (0 = full BPTT)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the initialisation and the data order (0)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="output directory (default runs/<task>-<cell>)")
    g.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue the run saved in CKPT exactly where it stopped")
    g.add_argument("--stop-after", type=int, default=None, metavar="STEPS",
                   help="stop (and checkpoint) once this many steps are done in total")
    g.add_argument("--save-every", type=int, default=10, metavar="EPOCHS",
                   help="also checkpoint every this many epochs (10; 0 = only at the end)")
    g.add_argument("--threads", type=int, default=1,
                   help="CPU threads for Numba and BLAS (1: small models are latency-bound "
                        "and extra threads only add hand-off cost)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plot", action="store_true", help="skip the loss-curve PNG")
    p.set_defaults(func=run_train)

    q = sub.add_parser("predict", help="forecast from / evaluate a checkpoint")
    q.add_argument("checkpoint")
    q.add_argument("--data", default=None,
                   help="forecast from this CSV instead of the training data")
    q.add_argument("--steps", type=int, default=10, help="values to forecast (10)")
    q.add_argument("--evaluate", action="store_true",
                   help="also report the held-out error against the naive baseline")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.add_argument("--device", default="cpu")
    q.add_argument("--threads", type=int, default=1, help="CPU threads (1)")
    q.set_defaults(func=_with_threads(run_predict))

    r = sub.add_parser("generate", help="sample text from a character-LM checkpoint")
    r.add_argument("checkpoint")
    r.add_argument("--prime", default=None, help="text to start from (default: a newline or "
                                                 "the first vocabulary character)")
    r.add_argument("--length", type=int, default=200, help="characters to generate (200)")
    r.add_argument("--temperature", type=float, default=0.8)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="cpu")
    r.add_argument("--threads", type=int, default=1, help="CPU threads (1)")
    r.set_defaults(func=_with_threads(run_generate))


# -- helpers ---------------------------------------------------------------------


def _with_threads(fn):
    def run(args):
        limits = _limit_threads(args.threads)
        try:
            return fn(args)
        finally:
            limits.restore_original_limits()

    run.__doc__ = fn.__doc__
    return run


def _positive(value, flag, minimum=1):
    if value is not None and value < minimum:
        raise ValueError(f"{flag} must be >= {minimum}, got {value}")
    return value


def _finite(value, flag):
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{flag} must be a finite number, got {value}")
    return value


#: Keys a checkpoint's ``model`` section must hold (SequenceModel.config()).
MODEL_KEYS = ("cell", "input_size", "hidden_size", "output_size", "num_layers", "vocab_size",
              "embedding_dim", "head", "dtype")


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _fmt_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            return f"{value:.3g} {unit}"
        value /= 1024
    return f"{value:.3g} PiB"


def _check_memory(cfg, task, batch_size, origin):
    """Refuse sizes whose training step cannot fit in this machine's memory, before allocating.

    ``cfg`` has the model's sizes (a model config or the options); the task
    gives the input/output sizes and the window length.  A synthetic task also
    generates a whole epoch of inputs at once.
    """
    import numpy as np

    from kernrnn.train.model import training_memory_estimate

    try:
        sizes = {k: int(cfg[k]) for k in ("hidden_size", "num_layers")}
        batch, seq_len = int(batch_size), int(task.seq_len)
        embedding = cfg.get("embedding_dim")
        need = training_memory_estimate(
            cfg["cell"], sizes["hidden_size"], input_size=task.input_size or 1,
            output_size=task.output_size, num_layers=sizes["num_layers"],
            bidirectional=bool(cfg.get("bidirectional")), vocab_size=task.vocab_size,
            embedding_dim=None if embedding is None else int(embedding), batch_size=batch,
            seq_len=seq_len, dtype=cfg.get("dtype") or "float32",
            proj_size=int(cfg.get("proj_size") or 0))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{origin}: malformed sizes ({type(e).__name__}: {e})") from None
    if task.name in ("adding", "copy"):
        need += seq_len * batch * task.steps_per_epoch(batch) * 3 * np.dtype(np.float64).itemsize
    limit = _physical_memory()
    if limit and need > limit:
        raise ValueError(
            f"{origin} would need at least {_fmt_bytes(need)} of memory for one training "
            f"step, more than this machine's {_fmt_bytes(limit)}; use smaller sizes")


def _limit_threads(n):
    """Give Numba and BLAS ``n`` threads for the whole run.

    Numba's kernels call BLAS through SciPy, whose OpenBLAS is a second copy
    next to NumPy's; it is loaded here first so that the limit reaches it too
    (threadpoolctl only limits libraries already loaded).  Measured on a loaded
    2-core machine: an unlimited second pool made an LSTM step 4x slower.
    """
    import numba
    import scipy.linalg.cython_blas  # noqa: F401  (load SciPy's BLAS before limiting)
    from threadpoolctl import threadpool_limits

    _positive(n, "--threads")
    cap = numba.config.NUMBA_NUM_THREADS
    if n > cap:
        raise ValueError(f"--threads must be <= {cap} (NUMBA_NUM_THREADS), got {n}")
    before = numba.get_num_threads()
    numba.set_num_threads(n)
    limits = threadpool_limits(limits=n)

    class _Restore:
        def restore_original_limits(self):
            limits.restore_original_limits()
            numba.set_num_threads(before)

    return _Restore()


def _regularization(opt) -> dict:
    """The kernels' regularisation from the options, each rate checked by name."""
    out = {}
    for flag in ("recurrent_dropout", "input_dropout"):
        v = opt(flag)
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"--{flag.replace('_', '-')} must lie in [0, 1], got {v}")
        out[flag] = v
    zo = opt("zoneout")
    if zo:
        for v in zo:
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"--zoneout rates must lie in [0, 1], got {v}")
        out["zoneout"] = zo[0] if len(zo) == 1 else tuple(zo)
    return out


def _check_cell(name):
    from kernrnn.plugins import get_registry

    names = get_registry().names()
    if name not in names:
        raise ValueError(f"--cell must be a registered cell {names}, got {name!r}")
    return name


def _check_device(device):
    from kernrnn.backends import check_device, get_backend

    device = check_device(device)
    try:
        get_backend(device)
    except (ImportError, RuntimeError) as e:
        raise ValueError(f"--device {device} is not available here: {e}") from None
    return device


def _build(args, ckpt=None):
    """Task, model, optimizer and trainer from options (and a checkpoint on resume)."""
    import numpy as np

    from kernrnn.train import SequenceModel, Trainer, make_optimizer, make_task, task_from_config

    if ckpt is not None:
        meta = ckpt.meta
        mcfg = ckpt.section("model", MODEL_KEYS)
        tcfg = ckpt.section("task", ("task", "seq_len"))
        tr = ckpt.section("train", ("batch_size", "clip", "tbptt", "seed"))
        ocfg = ckpt.section("optimizer", ("name", "lr", "step"))
        recorded = {
            "task": tcfg["task"], "data": tcfg.get("source") if tcfg["task"] in
            ("forecast", "charlm") and tcfg.get("source") != "sunspots" else None,
            "seq_len": tcfg["seq_len"], "column": tcfg.get("column"),
            "steps_per_epoch": tcfg.get("steps_per_epoch"),
            "vary_lengths": tcfg.get("vary_lengths") or None, "cell": mcfg["cell"],
            "hidden": mcfg["hidden_size"],
            "layers": mcfg["num_layers"], "embedding": mcfg.get("embedding_dim"),
            "dropout": mcfg.get("dropout", 0.0), "no_bias": not mcfg.get("bias", True) or None,
            "recurrent_dropout": mcfg.get("recurrent_dropout", 0.0),
            "input_dropout": mcfg.get("input_dropout", 0.0),
            "zoneout": mcfg.get("zoneout") or None, "proj": mcfg.get("proj_size", 0),
            "dtype": mcfg["dtype"], "batch_size": tr["batch_size"], "optimizer": ocfg["name"],
            "lr": ocfg["lr"], "momentum": ocfg.get("momentum"),
            "weight_decay": ocfg.get("weight_decay"), "clip": tr["clip"] or 0.0,
            "tbptt": tr["tbptt"],
            "seed": tr["seed"],
        }
        for key, value in recorded.items():
            given = getattr(args, key)
            if given is not None and given != value and not (
                    key == "data" and value and os.path.abspath(given) == os.path.abspath(value)):
                flag = "--" + key.replace("_", "-")
                raise ValueError(
                    f"{flag} {given!r} differs from the checkpoint's {value!r}; a resumed run "
                    f"keeps its settings (start a new run to change them)"
                )
        try:
            task = task_from_config(tcfg)
        except (ValueError, TypeError) as e:
            raise ckpt.error(str(e)) from None
        device = _check_device(args.device or "cpu")
        _check_memory(mcfg, task, tr["batch_size"], f"the model in checkpoint {ckpt.path!r}")
        model = SequenceModel.from_config(mcfg, device=device)
        opt_kwargs = {k: v for k, v in ocfg.items() if k not in ("name", "step")}
        if "betas" in opt_kwargs:
            opt_kwargs["betas"] = tuple(opt_kwargs["betas"])
        optimizer = make_optimizer(ocfg["name"], **opt_kwargs)
        trainer = Trainer(model, task, optimizer, batch_size=tr["batch_size"], clip=tr["clip"],
                          tbptt=tr["tbptt"], seed=tr["seed"], eval_every=tr.get("eval_every", 1))
        trainer.restore(ckpt)
        epochs = args.epochs if args.epochs is not None else meta.get("target_epochs",
                                                                     trainer.epoch)
        return task, model, optimizer, trainer, epochs

    for flag in ("seq_len", "hidden", "layers", "epochs", "batch_size", "steps_per_epoch",
                 "embedding"):
        _positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    _positive(args.tbptt, "--tbptt", 0)
    _positive(args.proj, "--proj", 0)
    _positive(args.seed, "--seed", 0)
    for flag in ("lr", "momentum", "weight_decay", "clip"):
        _finite(getattr(args, flag), "--" + flag.replace("_", "-"))
    task = make_task(args.task, args.data, args.seq_len, args.column, args.steps_per_epoch,
                     bool(args.vary_lengths))
    d = {**COMMON_DEFAULTS, **TASK_DEFAULTS[task.name]}
    opt = lambda k: getattr(args, k) if getattr(args, k) is not None else d[k]  # noqa: E731
    cell = _check_cell(opt("cell"))
    device = _check_device(opt("device"))
    dropout = opt("dropout")
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"--dropout must lie in [0, 1], got {dropout}")
    if dropout > 0 and opt("layers") == 1:
        raise ValueError(f"--dropout acts between stacked layers; give --layers >= 2 "
                         f"(got --dropout {dropout} with --layers 1)")
    if opt("proj") and opt("proj") >= opt("hidden"):
        raise ValueError(f"--proj must be smaller than --hidden, got --proj {opt('proj')} with "
                         f"--hidden {opt('hidden')}")
    if task.vocab_size is None and args.embedding is not None:
        raise ValueError(f"--embedding applies to token tasks (charlm, copy), not {task.name!r}")
    sizes = {"cell": cell, "hidden_size": opt("hidden"), "num_layers": opt("layers"),
             "embedding_dim": opt("embedding") if task.vocab_size else None,
             "dtype": opt("dtype"), "proj_size": opt("proj")}
    _check_memory(sizes, task, opt("batch_size"),
                  f"--hidden {opt('hidden')} --layers {opt('layers')} --batch-size "
                  f"{opt('batch_size')} --seq-len {task.seq_len}")
    model = SequenceModel(
        cell, input_size=task.input_size, hidden_size=opt("hidden"),
        output_size=task.output_size, num_layers=opt("layers"), vocab_size=task.vocab_size,
        embedding_dim=opt("embedding") if task.vocab_size else None, head=task.head,
        dtype=np.dtype(opt("dtype")), device=device, seed=opt("seed"),
        dropout=dropout, bias=not args.no_bias, proj_size=opt("proj"), **_regularization(opt),
    )
    name = opt("optimizer")
    wd = args.weight_decay
    if wd is None:
        wd = 1e-2 if name == "adamw" else 0.0  # PyTorch's defaults
    kwargs = {"lr": opt("lr"), "weight_decay": wd}
    if name == "sgd":
        kwargs["momentum"] = opt("momentum")
    elif args.momentum is not None:
        raise ValueError(f"--momentum applies to --optimizer sgd only, got --optimizer {name}")
    optimizer = make_optimizer(name, **kwargs)
    clip = opt("clip")
    if clip < 0:
        raise ValueError(f"--clip must be >= 0 (0 = no clipping), got {clip}")
    trainer = Trainer(model, task, optimizer, batch_size=opt("batch_size"), clip=clip,
                      tbptt=opt("tbptt"), seed=opt("seed"))
    if task.name in ("forecast", "charlm") and opt("batch_size") > task.steps_per_epoch(1):
        raise ValueError(
            f"--batch-size {opt('batch_size')} exceeds the {task.steps_per_epoch(1)} training "
            f"windows of this data; use a smaller batch"
        )
    return task, model, optimizer, trainer, opt("epochs")


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


# -- train -------------------------------------------------------------------------


def run_train(args) -> int:
    from kernrnn.train import load_checkpoint

    _positive(args.save_every, "--save-every", 0)
    _positive(args.stop_after, "--stop-after", 0)
    # Missing extras are reported now, not after the run when the plot is drawn.
    if not args.no_progress and _isatty(sys.stderr):
        require_extra("tqdm", "train", "the progress bar (--no-progress skips it)")
    if not args.no_plot:
        require_extra("matplotlib", "train", "the loss-curve plot (--no-plot skips it)")
    limits = _limit_threads(args.threads)
    try:
        t_start = time.perf_counter()
        ckpt = load_checkpoint(args.resume) if args.resume else None
        task, model, optimizer, trainer, epochs = _build(args, ckpt)
        if args.resume and args.out is None:
            out = os.path.dirname(os.path.abspath(args.resume))
        else:
            out = args.out or os.path.join("runs", f"{task.name}-{model.cell}")
        os.makedirs(out, exist_ok=True)
        ckpt_path = os.path.join(out, "checkpoint.npz")
        return _train_loop(args, task, model, trainer, epochs, out, ckpt_path, t_start)
    finally:
        limits.restore_original_limits()


def _train_loop(args, task, model, trainer, epochs, out, ckpt_path, t_start) -> int:
    info = sys.stderr
    resumed = trainer.global_step > 0 or trainer.epoch > 0
    start_step = trainer.global_step
    print(f"kernrnn train: {task.describe()}", file=info)
    print(f"model: {model.num_layers}x {model.cell} hidden {model.hidden_size}, "
          f"{model.num_params():,} parameters, {model.dtype.name}, device {model.device}; "
          f"{trainer.optimizer.name} lr {trainer.optimizer.lr:g}, clip "
          f"{trainer.clip or 'off'}, "
          f"{'full BPTT' if not trainer.tbptt else f'TBPTT {trainer.tbptt}'}, batch "
          f"{trainer.batch_size}, seed {trainer.seed}", file=info)
    if resumed:
        print(f"resuming at epoch {trainer.epoch + 1}, step {trainer.global_step} "
              f"from {args.resume}", file=info)
    if epochs <= trainer.epoch:
        print(f"the run has already completed {trainer.epoch} epochs (--epochs {epochs}); "
              f"pass a larger --epochs to train further", file=info)
    spe = trainer.steps_per_epoch()
    total = max(epochs * spe, trainer.global_step)
    if args.stop_after is not None:
        total = min(total, args.stop_after)
    unit = "tok" if task.vocab_size else "timestep"
    progress = _Progress(not args.no_progress, total, trainer.global_step, unit)
    report_every = max(1, epochs // 10)
    stop = {"flag": False}

    def on_sigint(signum, frame):
        if stop["flag"]:
            raise KeyboardInterrupt
        stop["flag"] = True
        progress.write("interrupt: finishing this step, then saving a checkpoint "
                       "(press Ctrl-C again to abort without saving)")

    # the newest checkpoint of this run, for the message when the loss diverges
    good = {"path": args.resume, "step": trainer.global_step} if resumed else {}

    def on_epoch(tr, metrics):
        if tr.epoch % report_every == 0 or tr.epoch == epochs:
            progress.write(f"epoch {tr.epoch}/{epochs}: training loss "
                           f"{sum(tr.losses[-spe:]) / len(tr.losses[-spe:]):.4g}, "
                           f"held-out loss {metrics['loss']:.4g}")
        if args.save_every and tr.epoch % args.save_every == 0 and tr.epoch < epochs:
            tr.save(ckpt_path, {"target_epochs": epochs})
            good.update(path=ckpt_path, step=tr.global_step)

    first_step = {}

    def on_step(tr, loss, norm, n_items, dt):
        if not first_step:
            first_step["s"] = dt
        progress.step(tr, loss, norm, n_items, dt)

    old = signal.signal(signal.SIGINT, on_sigint) if _main_thread() else None
    t_fit = time.perf_counter()
    try:
        status = trainer.fit(epochs, stop_after=args.stop_after, on_step=on_step,
                             on_epoch=on_epoch, should_stop=lambda: stop["flag"])
    except FloatingPointError as e:
        last = (f"the last good checkpoint is {good['path']} (step {good['step']})" if good
                else "no checkpoint was saved before (see --save-every)")
        raise ValueError(f"training diverged: {e}; {last}") from None
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)
        progress.close()
    fit_s = time.perf_counter() - t_fit
    trainer.save(ckpt_path, {"target_epochs": epochs})
    if status == "stopped":
        print(f"stopped after step {trainer.global_step} (epoch {trainer.epoch + 1}); "
              f"checkpoint {ckpt_path}\ncontinue with: kernrnn train --resume {ckpt_path}",
              file=info)
        return 0
    metrics = trainer.last_eval or trainer.evaluate()
    png = None
    if not args.no_plot:
        png = os.path.join(out, "loss.png")
        _plot(png, trainer, f"{task.describe()}\n{model.cell} hidden {model.hidden_size} x "
                            f"{model.num_layers}")
    wall = time.perf_counter() - t_start  # includes loading, evaluation and the plot
    session_steps = trainer.global_step - start_step
    result = {
        "task": task.config(), "model": model.config(), "metrics": metrics,
        "steps": trainer.global_step, "epochs": trainer.epoch,
        "session_steps": session_steps, "wall_time_s": round(wall, 3),
        "train_time_s": round(fit_s, 3), "first_step_s": round(first_step.get("s", 0.0), 3),
        "final_train_loss": trainer.losses[-1] if trainer.losses else None,
    }
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(_fmt_metrics(metrics))
    extra = ""
    if "copy_accuracy" in metrics:
        extra = (f"; recalled-symbol accuracy {metrics['copy_accuracy']:.3f} vs "
                 f"{metrics['baseline_copy_accuracy']:.3f}")
    done = f"{trainer.global_step} steps ({trainer.epoch} epochs)"
    if start_step:
        done += f", {session_steps} of them in this run,"
    print(f"{done} in {wall:.1f} s wall (training {fit_s:.1f} s, first step incl. kernel "
          f"compile/load {first_step.get('s', 0.0):.1f} s){extra}")
    print(f"checkpoint: {ckpt_path}" + (f"\nloss curve: {png}" if png else ""))
    return 0


def _main_thread():
    import threading

    return threading.current_thread() is threading.main_thread()


# -- predict / generate ------------------------------------------------------------


def _load_for_inference(path, device, data=None):
    from kernrnn.train import SequenceModel, load_checkpoint, task_from_config

    ckpt = load_checkpoint(path)
    mcfg = ckpt.section("model", MODEL_KEYS)
    tcfg = ckpt.section("task", ("task", "seq_len"))
    try:
        task = task_from_config(tcfg, data=data)
    except (ValueError, TypeError) as e:
        raise ckpt.error(str(e)) from None
    _check_memory(mcfg, task, 1, f"the model in checkpoint {path!r}")
    model = SequenceModel.from_config(mcfg, device=_check_device(device))
    try:
        model.load_state_dict(ckpt.group("param"))
    except (ValueError, TypeError) as e:
        raise ckpt.error(str(e)) from None
    model.eval()
    return ckpt, model, task


def run_predict(args) -> int:
    import numpy as np

    from kernrnn.train import predict

    _positive(args.steps, "--steps", 0)
    ckpt, model, task = _load_for_inference(args.checkpoint, args.device, args.data)
    result = {"task": task.name}
    if task.name == "forecast":
        W = task.seq_len
        hist = list(task.z)
        preds = []
        for _ in range(args.steps):
            ctx = np.asarray(hist[-W:], dtype=model.dtype)
            out = predict(model, ctx[:, None, None])
            z = float(out[len(ctx) - 1, 0, 0])
            preds.append(z * task.std + task.mean)
            hist.append(z)
        labels = _next_labels(task.labels, args.steps)
        result["forecast"] = [{"label": lab, "value": v}
                              for lab, v in zip(labels, preds, strict=True)]
    if args.evaluate or task.name != "forecast":
        d = task.eval_data(model.dtype)
        result["evaluation"] = task.evaluate(predict(model, d.x, d.lengths))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if "forecast" in result:
        print(f"forecast of {task.column} from {task.source} ({args.steps} steps ahead, "
              f"each fed back as input):")
        for row in result["forecast"]:
            print(f"  {row['label']}\t{row['value']:.4g}")
    if "evaluation" in result:
        print(_fmt_metrics(result["evaluation"]))
    return 0


def _next_labels(labels, n):
    """Continue integer labels (years); otherwise number the steps +1, +2, ..."""
    if labels:
        try:
            last = float(labels[-1])
            if last.is_integer():
                return [str(int(last) + i) for i in range(1, n + 1)]
        except ValueError:
            pass
    return [f"+{i}" for i in range(1, n + 1)]


#: Smallest --temperature: a logit of 1e3 over it stays far below float64's maximum (1.8e308).
MIN_TEMPERATURE = 1e-300


def run_generate(args) -> int:
    import numpy as np

    _positive(args.length, "--length")
    _positive(args.seed, "--seed", 0)
    if not (args.temperature >= MIN_TEMPERATURE and math.isfinite(args.temperature)):
        raise ValueError(f"--temperature must be a finite number >= {MIN_TEMPERATURE:g} "
                         f"(smaller ones overflow the scaled logits), got {args.temperature}")
    ckpt, model, task = _load_for_inference(args.checkpoint, args.device)
    if task.name != "charlm":
        raise ValueError(f"generate needs a character-LM checkpoint (task 'charlm'), "
                         f"{args.checkpoint!r} is task {task.name!r}; use kernrnn predict")
    prime = args.prime
    if prime is None:
        prime = "\n" if "\n" in task.vocab else task.vocab[0]
    if not prime:
        raise ValueError("--prime must not be empty")
    ids = task.encode(prime)
    rng = np.random.default_rng(args.seed)
    xp = model.xp
    out, state = model.forward(xp.asarray(ids[:, None]))
    logits = out[-1, 0]
    generated = []
    for _ in range(args.length):
        with np.errstate(over="ignore", invalid="ignore"):
            z = np.asarray(to_host(logits), dtype=np.float64) / args.temperature
        if not np.isfinite(z).all():
            raise ValueError(
                f"--temperature {args.temperature:g} is too small for these logits (largest "
                f"|logit| {float(np.max(np.abs(to_host(logits)))):.3g}): logits / temperature "
                f"overflow float64; use a larger --temperature")
        p = np.exp(z - z.max())
        p /= p.sum()
        nxt = int(rng.choice(len(p), p=p))
        generated.append(nxt)
        out, state = model.forward(xp.asarray(np.array([[nxt]], dtype=np.int32)), state)
        logits = out[-1, 0]
    sys.stdout.write(prime + task.decode(generated) + "\n")
    return 0

