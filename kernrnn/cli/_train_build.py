"""Options of ``kernrnn train`` checked and turned into a task, model and trainer.

Also the checks shared with ``kernrnn predict`` and ``kernrnn generate``:
positive and finite option values, the device, the thread limits, and a
refusal of sizes whose training step cannot fit in this machine's memory.
"""

from __future__ import annotations

import math
import os

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


def _parse_cell_args(items) -> dict:
    """``--cell-arg NAME=VALUE`` options as ``{name: value}``: the value an int, a float or
    ``true``/``false`` where it reads as one, else the text (which the cell then refuses,
    naming what it expects)."""
    out = {}
    for item in items or ():
        name, sep, text = item.partition("=")
        name, text = name.strip(), text.strip()
        if not sep or not name:
            raise ValueError(f"--cell-arg must be NAME=VALUE, got {item!r}")
        if name in out:
            raise ValueError(f"--cell-arg {name} is given twice ({out[name]!r} and {text!r})")
        out[name] = _parse_value(text)
    return out


def _parse_value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


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

    from kernrnn.plugins import resolve_cell
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
        given_args = _parse_cell_args(getattr(args, "cell_arg", None))
        if given_args:
            try:
                kept = resolve_cell(mcfg["cell"]).hyper_values(mcfg.get("cell_args"))
            except (ValueError, TypeError) as e:
                raise ckpt.error(str(e)) from None
            for name, value in given_args.items():
                if name not in kept or kept[name] != value:
                    raise ValueError(
                        f"--cell-arg {name}={value!r} differs from the checkpoint's "
                        f"{kept.get(name, 'no such hyperparameter')!r}; a resumed run keeps its "
                        f"settings (start a new run to change them)")
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
        cell_args=_parse_cell_args(getattr(args, "cell_arg", None)) or None,
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
