"""The training loop: truncated BPTT steps, epochs, evaluation, checkpoints, resume.

:func:`train_batch` is one optimisation pass over a batch: the sequence is cut
into chunks of ``tbptt`` steps; each chunk runs forward from the state the
previous chunk ended in, backward with no gradient flowing into that state
(the gradient is stopped at the chunk edge), then clips and updates.  With
``tbptt`` 0 or >= T it is plain full BPTT.

:class:`Trainer` owns everything a run needs to continue exactly where it
stopped: the model, optimizer, data position (epoch, batch in epoch, the
generator state the epoch was drawn from) and the loss history.  A resumed
run draws the same batches in the same order and so reproduces the losses of
an uninterrupted run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from kernrnn._checks import to_host
from kernrnn.train.checkpoint import Checkpoint, save_checkpoint
from kernrnn.train.losses import cross_entropy_loss, length_mask, mse_loss
from kernrnn.train.model import SequenceModel
from kernrnn.train.optim import clip_grad_norm

__all__ = ["train_batch", "predict", "Trainer", "StepResult", "LOSSES"]


#: Keys of a checkpoint's ``position`` section (where in training it was written).
POSITION_KEYS = ("epoch", "step_in_epoch", "global_step", "epoch_rng_state", "rng_state")

LOSSES = {"mse": mse_loss, "ce": cross_entropy_loss}


@dataclass
class StepResult:
    loss: object        # 0-d device array: mean loss over the batch's counted elements
    grad_norm: object   # 0-d device array: largest pre-clipping norm over the chunks
    count: int          # counted elements (positions, or sequences for head="last")
    chunks: int         # optimizer steps taken


def _check_tbptt(tbptt):
    if isinstance(tbptt, bool) or not isinstance(tbptt, (int, np.integer)) or tbptt < 0:
        raise ValueError(f"tbptt must be an int >= 0 (0: full BPTT), got {tbptt!r}")
    return int(tbptt)


def train_batch(model: SequenceModel, loss: str, optimizer, x, y, lengths, tbptt=0,
                clip=None) -> StepResult:
    """One optimisation pass over a batch with truncated BPTT.

    ``x``/``y`` on the model's device (``y`` ``[T, B, ...]`` for ``head="seq"``,
    ``[B, O]`` for ``head="last"``), ``lengths`` a host int array ``[B]``.
    Each chunk's loss is the mean over the positions it holds (for
    ``head="last"``, over the sequences that end inside it); chunks holding
    none only carry the state forward.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
    loss_fn = LOSSES[loss]
    tbptt = _check_tbptt(tbptt)
    if model.rnn.bidirectional and tbptt and tbptt < x.shape[0]:
        raise ValueError("truncated BPTT needs a unidirectional model (the reverse direction "
                         "would see the future of a chunk); use tbptt=0")
    xp = model.xp
    lengths = np.asarray(lengths, dtype=np.int64)
    T = int(x.shape[0])
    k = T if tbptt == 0 else min(tbptt, T)
    model.train()
    state = None
    total, total_count, gmax, chunks = None, 0, None, 0
    for s in range(0, T, k):
        e = min(T, s + k)
        lens = np.clip(lengths - s, 0, e - s)
        if lens.max(initial=0) == 0:
            break  # every sequence has ended
        # the data is time-major; a batch_first model gets (and gives) [B, T, ...] views
        out, hn = model.forward(model._time_major(x[s:e]), state, lens)
        if model.head == "seq":
            out = model._time_major(out)
            target = y[s:e]
            count = int(lens.sum())
            mask = length_mask(lens, e - s, xp, model.dtype)
        else:
            ends = (lengths > s) & (lengths <= e)  # last step lengths-1 lies in [s, e)
            target = y
            count = int(ends.sum())
            mask = xp.asarray(ends.astype(model.dtype))
        state = hn  # the next chunk starts here; no gradient will flow back into it
        if count == 0:
            continue
        value, dout = loss_fn(out, target, mask, denom=count)
        if not math.isfinite(float(value)):  # backward would refuse its non-finite gradient
            raise FloatingPointError(f"loss became {float(value)}")
        model.zero_grad()
        model.backward(model._time_major(dout) if model.head == "seq" else dout)
        norm = clip_grad_norm(model.grads, clip)
        optimizer.step(model.params, model.grads)
        total = value * count if total is None else total + value * count
        gmax = norm if gmax is None else xp.maximum(gmax, norm)
        total_count += count
        chunks += 1
    if total is None:
        raise ValueError("batch has no positions to learn from (all lengths are 0)")
    return StepResult(total / total_count, gmax, total_count, chunks)


def predict(model: SequenceModel, x, lengths=None, batch_size=256):
    """Model outputs for host inputs ``x`` in eval mode, as a host array."""
    xp = model.xp
    was_training = model.training
    model.eval()
    try:
        N = x.shape[1]
        lengths = np.full(N, x.shape[0], np.int64) if lengths is None else np.asarray(lengths)
        outs = []
        for a in range(0, N, batch_size):
            b = min(N, a + batch_size)
            out, _ = model.forward(model._time_major(xp.asarray(x[:, a:b])), None, lengths[a:b])
            outs.append(to_host(model._time_major(out) if model.head == "seq" else out))
        axis = 1 if model.head == "seq" else 0
        return np.concatenate(outs, axis=axis)
    finally:
        model.train(was_training)


class Trainer:
    """Epochs of :func:`train_batch` over a task, with evaluation and checkpoints.

    ``seed`` fixes the data order (and, through the caller, the model's
    initialisation): the same seed on the CPU gives the same losses.
    """

    def __init__(self, model, task, optimizer, batch_size=16, clip=1.0, tbptt=0, seed=0,
                 eval_every=1):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.model, self.task, self.optimizer = model, task, optimizer
        self.batch_size = int(batch_size)
        self.clip = None if not clip else float(clip)
        if self.clip is not None and not (self.clip > 0 and math.isfinite(self.clip)):
            raise ValueError(f"clip must be a finite number > 0 (or 0 for none), got {clip!r}")
        self.tbptt = _check_tbptt(tbptt)
        self.seed = int(seed)
        self.eval_every = int(eval_every)
        if task.head != model.head:
            raise ValueError(
                f"task {task.name!r} needs head {task.head!r}, model has {model.head!r}")
        self.rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0x7A11]))
        self.epoch = 0              # completed epochs
        self.step_in_epoch = 0      # batches done in the current epoch
        self.global_step = 0
        self.epoch_rng_state = None  # generator state the current epoch was drawn from
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.eval_history: list[tuple[int, float]] = []
        self.last_eval: dict | None = None
        self.elapsed = 0.0          # training seconds, summed over resumed runs
        self._epoch_data = None

    # -- data --------------------------------------------------------------

    def _load_epoch(self):
        """Draw (or, on resume, redraw) the current epoch and put it on the device."""
        if self.epoch_rng_state is None:
            self.epoch_rng_state = self.rng.bit_generator.state
        else:
            self.rng.bit_generator.state = self.epoch_rng_state
        d = self.task.epoch(self.rng, self.batch_size, dtype=self.model.dtype)
        xp = self.model.xp
        self._epoch_data = (xp.asarray(d.x), xp.asarray(d.y), d.lengths, d.size)

    def steps_per_epoch(self) -> int:
        return self.task.steps_per_epoch(self.batch_size)

    # -- running -----------------------------------------------------------

    def evaluate(self) -> dict:
        d = self.task.eval_data(self.model.dtype)
        out = predict(self.model, d.x, d.lengths)
        return self.task.evaluate(out)

    def fit(self, epochs, stop_after=None, on_step=None, on_epoch=None, should_stop=None) -> str:
        """Train until ``epochs`` epochs are complete.

        ``stop_after``: stop once ``global_step`` reaches it (for splitting a run;
        the caller saves a checkpoint); ``should_stop()`` is asked before each
        batch (an interrupt handler sets it), so a run always stops between steps
        in a state a checkpoint captures exactly.  ``on_step(trainer, loss, norm, n_items,
        seconds)`` is called after each batch, ``on_epoch(trainer, metrics)`` after
        each evaluation.  Returns ``"done"`` or ``"stopped"``.
        """
        epochs = int(epochs)

        def stopping():
            return (stop_after is not None and self.global_step >= stop_after) or \
                (should_stop is not None and should_stop())

        while self.epoch < epochs:
            if stopping():
                return "stopped"
            if self._epoch_data is None:
                self._load_epoch()
            x, y, lengths, N = self._epoch_data
            B = self.batch_size
            nb = math.ceil(N / B)
            while self.step_in_epoch < nb:
                if stopping():
                    return "stopped"
                a = self.step_in_epoch * B
                b = min(N, a + B)
                t0 = time.perf_counter()
                yb = y[:, a:b] if self.model.head == "seq" else y[a:b]
                try:
                    # overflow is detected below, as a non-finite loss: no NumPy warnings
                    with np.errstate(over="ignore", invalid="ignore"):
                        res = train_batch(self.model, self.task.loss, self.optimizer,
                                          x[:, a:b], yb, lengths[a:b], self.tbptt, self.clip)
                except FloatingPointError as e:
                    raise FloatingPointError(f"{e} at step {self.global_step + 1}; lower --lr "
                                             f"or set --clip") from None
                # The one host synchronisation per step: the scalars for logging.
                loss, norm = (float(v) for v in to_host(self.model.xp.stack(
                    [self.model.xp.asarray(res.loss), self.model.xp.asarray(res.grad_norm)])))
                dt = time.perf_counter() - t0
                self.elapsed += dt
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"loss became {loss} at step {self.global_step + 1}; "
                        f"lower --lr or set --clip"
                    )
                self.losses.append(loss)
                self.grad_norms.append(norm)
                self.step_in_epoch += 1
                self.global_step += 1
                if on_step is not None:
                    on_step(self, loss, norm, int(lengths[a:b].sum()), dt)
            self.epoch += 1
            self.step_in_epoch = 0
            self._epoch_data = None
            self.epoch_rng_state = None
            if self.eval_every and (self.epoch % self.eval_every == 0 or self.epoch == epochs):
                metrics = self.evaluate()
                self.last_eval = metrics
                self.eval_history.append((self.epoch, float(metrics["loss"])))
                if on_epoch is not None:
                    on_epoch(self, metrics)
        return "done"

    # -- checkpoints -------------------------------------------------------

    def checkpoint_payload(self, extra_meta=None) -> tuple[dict, dict]:
        from kernrnn import __version__

        opt_meta, opt_arrays = self.optimizer.state_dict()
        meta = {
            "kernrnn_version": __version__,
            "model": self.model.config(),
            "task": self.task.config(),
            "optimizer": opt_meta,
            "train": {"batch_size": self.batch_size, "clip": self.clip, "tbptt": self.tbptt,
                      "seed": self.seed, "eval_every": self.eval_every},
            "position": {
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step,
                "epoch_rng_state": self.epoch_rng_state,
                "rng_state": self.rng.bit_generator.state,
                # where the dropout masks continue (kernrnn.RNN draws them from these)
                "dropout_seed": self.model.rnn.dropout_seed,
                "dropout_calls": self.model.rnn.dropout_calls,
            },
            "elapsed_s": self.elapsed,
            "last_eval": self.last_eval,
        }
        if extra_meta:
            meta.update(extra_meta)
        arrays = {f"param/{k}": v for k, v in self.model.state_dict().items()}
        arrays.update({f"optim/{k}": v for k, v in opt_arrays.items()})
        arrays["history/loss"] = np.asarray(self.losses, dtype=np.float64)
        arrays["history/grad_norm"] = np.asarray(self.grad_norms, dtype=np.float64)
        ev = np.asarray(self.eval_history, dtype=np.float64).reshape(-1, 2)
        arrays["history/eval"] = ev
        return meta, arrays

    def save(self, path, extra_meta=None) -> str:
        meta, arrays = self.checkpoint_payload(extra_meta)
        return save_checkpoint(path, meta, arrays)

    def restore(self, ckpt: Checkpoint) -> None:
        """Load model, optimizer, position and history from ``ckpt``.

        The model and task must already match the checkpoint's configuration.
        """
        meta = ckpt.meta
        want = self.model.config()
        got = dict(ckpt.section("model"))
        if "cell_args" in want:  # hyperparameters a checkpoint leaves out are the defaults
            try:
                got["cell_args"] = self.model.rnn.cell.hyper_values(got.get("cell_args"))
            except (ValueError, TypeError) as e:
                raise ckpt.error(str(e)) from None
        opt_meta = ckpt.section("optimizer", ("name", "step"))
        pos = ckpt.section("position", POSITION_KEYS)
        if got != want:
            diff = sorted(k for k in set(want) | set(got) if got.get(k) != want.get(k))
            raise ValueError(
                "checkpoint is from another model: "
                + ", ".join(f"{k} {got.get(k)!r} (checkpoint) vs {want.get(k)!r}"
                            for k in diff)
            )
        try:
            self.model.load_state_dict(ckpt.group("param"))
            self.optimizer.load_state_dict(opt_meta, ckpt.group("optim"), self.model.params)
        except (ValueError, TypeError) as e:
            raise ckpt.error(str(e)) from None
        try:
            self.epoch = int(pos["epoch"])
            self.step_in_epoch = int(pos["step_in_epoch"])
            self.global_step = int(pos["global_step"])
            self.epoch_rng_state = pos["epoch_rng_state"]
            self.rng.bit_generator.state = pos["rng_state"]
            if "dropout_seed" in pos:  # checkpoints before dropout have neither
                self.model.rnn.dropout_seed = int(pos["dropout_seed"])
                self.model.rnn.dropout_calls = int(pos["dropout_calls"])
        except (KeyError, TypeError, ValueError) as e:
            raise ckpt.error(
                f"position is malformed ({type(e).__name__}: {e})") from None
        hist = ckpt.group("history")
        for name, ndim in (("loss", 1), ("grad_norm", 1), ("eval", 2)):
            a = hist.get(name)
            if a is not None and (a.ndim != ndim or a.dtype.kind != "f"
                                  or (ndim == 2 and a.shape[1] != 2)):
                raise ckpt.error(f"history/{name} must be a float array of "
                                 f"{'[n]' if ndim == 1 else '[n, 2]'}, got {a.dtype} "
                                 f"{list(a.shape)}")
        self.losses = [float(v) for v in hist.get("loss", [])]
        self.grad_norms = [float(v) for v in hist.get("grad_norm", [])]
        self.eval_history = [(int(e), float(v)) for e, v in hist.get("eval", np.zeros((0, 2)))]
        if len(self.losses) != self.global_step:
            raise ckpt.error(
                f"inconsistent: {len(self.losses)} recorded losses for "
                f"global_step {self.global_step}"
            )
        self.last_eval = meta.get("last_eval")
        self.elapsed = float(meta.get("elapsed_s", 0.0))
        self._epoch_data = None
