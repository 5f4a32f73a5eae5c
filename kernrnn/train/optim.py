"""Optimizers that update parameter arrays in place, and global-norm clipping.

Formulas follow PyTorch's ``torch.optim.SGD``, ``Adam`` and ``AdamW`` (the
tests compare with them), so hyperparameters carry over.  Every operation runs
with the arrays' own module (NumPy or CuPy): nothing leaves the device.

An optimizer keeps its state by parameter name, so ``step(params, grads)``
takes the two dicts each time (a model may rebuild its dicts; the arrays
themselves are updated in place).
"""

from __future__ import annotations

import math

import numpy as np

from kernrnn._checks import to_host
from kernrnn.train.losses import array_module

__all__ = ["SGD", "Adam", "AdamW", "clip_grad_norm", "global_norm", "make_optimizer",
           "OPTIMIZERS"]


def _positive(value, name, allow_zero=False):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        want = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {want}, got {value!r}")
    return v


def _check_keys(params, grads):
    if set(params) != set(grads):
        raise ValueError(
            f"params and grads must have the same keys; only in params: "
            f"{sorted(set(params) - set(grads))}, only in grads: {sorted(set(grads) - set(params))}"
        )


class Optimizer:
    """Base class: per-parameter state slots, a step counter, save/restore."""

    name = "optimizer"
    slots: tuple[str, ...] = ()

    def __init__(self, lr):
        self.lr = _positive(lr, "lr")
        self.step_count = 0
        self.state: dict[str, dict[str, object]] = {s: {} for s in self.slots}

    def hyperparams(self) -> dict:
        raise NotImplementedError

    def required_slots(self) -> tuple[str, ...]:
        """Slots every parameter has once a step was taken (a resume needs all of them)."""
        return self.slots

    def step(self, params: dict, grads: dict) -> None:
        _check_keys(params, grads)
        self.step_count += 1
        for k, p in params.items():
            self._update(k, p, grads[k])

    def _slot(self, slot, key, like):
        arr = self.state[slot].get(key)
        if arr is None:
            arr = array_module(like).zeros_like(like)
            self.state[slot][key] = arr
        return arr

    # -- checkpoints -------------------------------------------------------

    def state_dict(self) -> tuple[dict, dict]:
        """``(meta, arrays)``: JSON-able hyperparameters and step, host arrays by slot/name."""
        meta = {"name": self.name, "step": self.step_count, **self.hyperparams()}
        arrays = {f"{slot}/{k}": np.array(to_host(v), copy=True)
                  for slot, d in self.state.items() for k, v in d.items()}
        return meta, arrays

    def load_state_dict(self, meta: dict, arrays: dict, params: dict) -> None:
        """Restore from :meth:`state_dict`; shapes are checked against ``params``."""
        if meta.get("name") != self.name:
            raise ValueError(
                f"optimizer state is for {meta.get('name')!r}, this optimizer is {self.name!r}"
            )
        xp = array_module(next(iter(params.values())))
        state = {s: {} for s in self.slots}
        for key, arr in arrays.items():
            slot, _, pname = key.partition("/")
            if slot not in state:
                raise ValueError(f"optimizer state has unknown slot {slot!r} (key {key!r})")
            if pname not in params:
                raise ValueError(f"optimizer state has a slot for unknown parameter {pname!r}")
            if arr.dtype.kind != "f":
                raise ValueError(f"optimizer state {key!r} has dtype {arr.dtype}, expected floats")
            if tuple(arr.shape) != tuple(params[pname].shape):
                raise ValueError(
                    f"optimizer state {key!r} has shape {list(arr.shape)}, parameter has "
                    f"{list(params[pname].shape)}"
                )
            state[slot][pname] = xp.asarray(arr.astype(params[pname].dtype))
        step = meta.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"optimizer state step must be an int >= 0, got {step!r}")
        if step > 0:
            for slot in self.required_slots():
                missing = [k for k in params if k not in state[slot]]
                if missing:
                    raise ValueError(
                        f"optimizer state lacks {slot!r} for {len(missing)} of {len(params)} "
                        f"parameters (e.g. {missing[0]!r}) after {step} steps; resuming would "
                        f"restart {self.name}'s running averages at zero")
        self.state, self.step_count = state, step
        for k in ("lr",):
            if k in meta:
                self.lr = float(meta[k])


class SGD(Optimizer):
    """SGD with momentum (PyTorch's form: ``b = mu*b + g``; ``p -= lr*b``)."""

    name = "sgd"
    slots = ("momentum_buffer",)

    def __init__(self, lr=0.01, momentum=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(lr)
        self.momentum = _positive(momentum, "momentum", allow_zero=True)
        self.weight_decay = _positive(weight_decay, "weight_decay", allow_zero=True)
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum == 0:
            raise ValueError(f"nesterov=True needs momentum > 0, got momentum={momentum!r}")

    def hyperparams(self):
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "nesterov": self.nesterov}

    def required_slots(self):
        return self.slots if self.momentum else ()

    def _update(self, key, p, g):
        if self.weight_decay:
            g = g + self.weight_decay * p
        if self.momentum:
            buf = self.state["momentum_buffer"].get(key)
            if buf is None:  # PyTorch starts the buffer at the first gradient
                buf = g.copy()
                self.state["momentum_buffer"][key] = buf
            else:
                buf *= self.momentum
                buf += g
            g = g + self.momentum * buf if self.nesterov else buf
        p -= self.lr * g


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction; ``weight_decay`` adds L2 to the gradient."""

    name = "adam"
    slots = ("exp_avg", "exp_avg_sq")
    decoupled = False

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(lr)
        if len(tuple(betas)) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        b1, b2 = (float(b) for b in betas)
        for name, b in (("betas[0]", b1), ("betas[1]", b2)):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {b}")
        self.betas = (b1, b2)
        self.eps = _positive(eps, "eps")
        self.weight_decay = _positive(weight_decay, "weight_decay", allow_zero=True)

    def hyperparams(self):
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay}

    def _update(self, key, p, g):
        b1, b2 = self.betas
        if self.weight_decay:
            if self.decoupled:
                p *= 1.0 - self.lr * self.weight_decay
            else:
                g = g + self.weight_decay * p
        m = self._slot("exp_avg", key, p)
        v = self._slot("exp_avg_sq", key, p)
        m *= b1
        m += (1.0 - b1) * g
        v *= b2
        v += (1.0 - b2) * (g * g)
        t = self.step_count
        bc1 = 1.0 - b1 ** t
        bc2 = 1.0 - b2 ** t
        xp = array_module(p)
        denom = xp.sqrt(v) / math.sqrt(bc2)
        denom += self.eps
        p -= (self.lr / bc1) * (m / denom)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): ``p *= 1 - lr*wd`` first."""

    name = "adamw"
    decoupled = True

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(lr, betas, eps, weight_decay)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def make_optimizer(name: str, **kwargs) -> Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    return OPTIMIZERS[name](**kwargs)


def global_norm(grads: dict):
    """The L2 norm of all gradients together, as a 0-d array on their device."""
    arrays = list(grads.values())
    if not arrays:
        raise ValueError("global_norm needs at least one gradient")
    xp = array_module(arrays[0])
    total = None
    for g in arrays:
        s = xp.vdot(g.ravel(), g.ravel()) if g.size else xp.zeros((), g.dtype)
        total = s if total is None else total + s
    return xp.sqrt(total)


def clip_grad_norm(grads: dict, max_norm=None, eps=1e-6):
    """Scale all gradients in place so their global norm is at most ``max_norm``.

    Returns the norm before clipping (a 0-d device array: read it only when
    logging).  As PyTorch's ``clip_grad_norm_``: the factor is
    ``min(1, max_norm / (norm + eps))``, applied without a host round trip.
    ``max_norm`` None or 0 only measures.
    """
    norm = global_norm(grads)
    if max_norm is None or max_norm == 0:
        return norm
    max_norm = _positive(max_norm, "max_norm")
    xp = array_module(norm)
    factor = xp.minimum(max_norm / (norm + eps), 1.0).astype(norm.dtype)
    for g in grads.values():
        g *= factor
    return norm
