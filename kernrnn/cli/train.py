"""``kernrnn train``: train a model from the command line.

``kernrnn train`` with no arguments trains an LSTM on the embedded yearly
sunspot series on the CPU, compares the held-out forecast with the last-value
baseline, and writes a checkpoint, a loss-curve PNG and ``metrics.json`` to
``--out``.  ``--resume CKPT`` continues a run exactly where it stopped.
matplotlib and tqdm (the ``train`` extra) are imported only when used.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from kernrnn.cli import require_extra
from kernrnn.cli._train_build import _build, _limit_threads, _positive
from kernrnn.cli._train_progress import _fmt_metrics, _isatty, _plot, _Progress


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
    g.add_argument("--cell-arg", action="append", default=None, metavar="NAME=VALUE",
                   help="a hyperparameter of the cell, e.g. --cell-arg eps=0.1 (repeat for "
                        "more; VALUE is read as an int, a float or true/false; `kernrnn cells` "
                        "lists them)")
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
