"""kernrnn's modules in code one does not own: :func:`patch` ``torch.nn``, :func:`convert` a model.

:func:`patch` replaces the classes ``torch.nn.LSTM``, ``GRU``, ``RNN``,
``LSTMCell``, ``GRUCell`` and ``RNNCell`` by kernrnn's, so a script builds
kernrnn's modules without a change (as kernel libraries that patch a framework
do, e.g. Liger Kernel's ``apply_liger_kernel_to_*``).  :func:`convert` turns the
recurrent modules of a model that is already built into kernrnn's, in place
(as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does for batch norms).
"""

from __future__ import annotations

import warnings

from torch import nn
from torch.nn.modules import rnn as _torch_rnn
from torch.nn.utils import parametrize

from kernrnn.torch import cells, modules

__all__ = ["patch", "Patch", "convert", "PATCHABLE"]

#: The names in ``torch.nn`` that :func:`patch` replaces, and kernrnn's class for each.
PATCHABLE = {"LSTM": modules.LSTM, "GRU": modules.GRU, "RNN": modules.RNN,
             "LSTMCell": cells.LSTMCell, "GRUCell": cells.GRUCell, "RNNCell": cells.RNNCell}

# PyTorch's classes (where they are defined: ``torch.nn``'s names may be patched) -> kernrnn's
_CONVERSIONS = {getattr(_torch_rnn, name): cls for name, cls in PATCHABLE.items()}


class Patch:
    """``torch.nn``'s recurrent classes replaced by kernrnn's, until :meth:`restore`.

    Returned by :func:`patch`; as a context manager it restores the originals on
    exit, also when the body raises.
    """

    def __init__(self, names):
        self._saved = {name: getattr(nn, name) for name in names}
        self._allow_rnn = None
        if {"LSTM", "GRU", "RNN"} & set(names):
            # TorchDynamo refuses instances of torch.nn.LSTM/GRU/RNN, which kernrnn's now
            # are: its allow_rnn lets it trace them (and the ops) as it traces them unpatched
            import torch._dynamo.config as dynamo_config

            self._allow_rnn = dynamo_config.allow_rnn
            dynamo_config.allow_rnn = True
        for name in names:
            setattr(nn, name, PATCHABLE[name])
        self.active = True

    def restore(self) -> None:
        """Put back the classes ``torch.nn`` had before :func:`patch` (again: a no-op)."""
        if self.active:
            for name, cls in self._saved.items():
                setattr(nn, name, cls)
            if self._allow_rnn is not None:
                import torch._dynamo.config as dynamo_config

                dynamo_config.allow_rnn = self._allow_rnn
            self.active = False

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc) -> bool:
        self.restore()
        return False

    def __repr__(self) -> str:
        state = "active" if self.active else "restored"
        return f"<kernrnn.torch.Patch {', '.join(self._saved)} ({state})>"


def patch(*names: str) -> Patch:
    """Replace ``torch.nn.LSTM``, ``GRU``, ``RNN``, ``LSTMCell``, ``GRUCell`` and
    ``RNNCell`` (or only ``names`` of them) by kernrnn's drop-ins.

    Modules built afterwards through ``torch.nn`` (``nn.LSTM(...)``, or
    ``from torch.nn import LSTM`` run afterwards) are kernrnn's; modules built
    before stay PyTorch's (:func:`convert` turns those).  Works as a call
    (``p = patch()``, later ``p.restore()``) and as a context manager
    (``with patch(): ...``) that restores the originals on exit.  Only
    ``torch.nn``'s names change, not ``torch.nn.modules.rnn``'s, where
    PyTorch's classes stay reachable.
    """
    unknown = [n for n in names if n not in PATCHABLE]
    if unknown:
        raise ValueError(f"patch() replaces {sorted(PATCHABLE)}, got unknown name(s) {unknown}")
    return Patch(names or tuple(PATCHABLE))


def convert(module):
    """Turn every ``nn.LSTM``/``GRU``/``RNN``/``LSTMCell``/``GRUCell``/``RNNCell`` in
    ``module`` (``module`` itself included) into kernrnn's drop-in, in place;
    returns ``module``.

    Each module keeps its identity: its class changes and nothing else, so the
    parameters (the same ``Parameter`` objects: state dict, device, dtype,
    ``requires_grad``, an optimizer's references), the training mode, a module
    shared at several places, registered hooks and parametrisations
    (``torch.nn.utils.parametrize``) all stay as they were.  Subclasses of those
    classes are left as they are, with a warning naming them: their own methods
    would be lost.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert() takes an nn.Module, got {type(module).__name__}")
    skipped = []
    for name, m in module.named_modules():  # each module once, shared ones included
        base = parametrize.type_before_parametrizations(m)
        target = _CONVERSIONS.get(base)
        if target is None:
            if isinstance(m, tuple(_CONVERSIONS)):
                skipped.append(f"{name or '<root>'} ({base.__qualname__})")
            continue
        if parametrize.is_parametrized(m):
            # the class parametrize made: PyTorch's class as its base -> kernrnn's
            cls = type(m)
            m.__class__ = type(cls.__name__, (target,),
                               {k: v for k, v in vars(cls).items()
                                if k not in ("__dict__", "__weakref__")})
        else:
            m.__class__ = target
    if skipped:
        warnings.warn(f"kernrnn.torch.convert: left {', '.join(skipped)} as they are: "
                      f"subclasses of PyTorch's recurrent classes, whose own methods a "
                      f"conversion would drop", stacklevel=2)
    return module
