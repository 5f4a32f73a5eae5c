"""kernrnn's fused kernels as PyTorch modules (``pip install 'kernrnn[torch]'``).

* :class:`LSTM`, :class:`GRU`, :class:`RNN`: drop-ins for ``torch.nn.LSTM`` /
  ``GRU`` / ``RNN`` (same arguments, parameters, state dicts, inputs, outputs);
* :class:`Recurrent`: the same interface for any registered cell;
* :class:`LSTMCell`, :class:`GRUCell`, :class:`RNNCell`: drop-ins for
  ``torch.nn.LSTMCell`` / ``GRUCell`` / ``RNNCell`` (one fused step), and
  :class:`RecurrentCell` for any registered cell;
* :func:`patch` (``torch.nn``'s classes replaced, for a script one does not own)
  and :func:`convert` (the recurrent modules of a built model turned, in place).

Calls kernrnn cannot run (other dtypes or devices, autocast, ``torch.func``
transforms) run PyTorch's implementation, with a one-time
:class:`FallbackWarning`.

Autograd runs kernrnn's BPTT kernels; the forward and backward are
``torch.library`` custom ops (``kernrnn::rnn_forward``, ``kernrnn::rnn_backward``)
with fake implementations, so ``torch.compile(fullgraph=True)`` and
``DistributedDataParallel`` work with them.  CPU tensors reach the kernels as
NumPy views, CUDA tensors as CuPy views (DLPack) on torch's current stream.
The core of kernrnn never imports torch; this subpackage does.
"""

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("kernrnn.torch needs PyTorch: pip install 'kernrnn[torch]'") from exc

from kernrnn.torch.cells import GRUCell, LSTMCell, RecurrentCell, RNNCell
from kernrnn.torch.modules import GRU, LSTM, RNN, FallbackWarning, Recurrent
from kernrnn.torch.patching import Patch, convert, patch

__all__ = ["LSTM", "GRU", "RNN", "Recurrent", "LSTMCell", "GRUCell", "RNNCell", "RecurrentCell",
           "patch", "Patch", "convert", "FallbackWarning"]
