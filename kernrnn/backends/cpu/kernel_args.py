"""The generated CPU kernels' positional arguments, described once.

A kernel takes up to 46 positional arguments.  Each kernel's list is written
once here, as a :class:`KernelArgs`: the source generators write the kernel's
``def`` line from it (:meth:`KernelArgs.signature`) and the host builds the
call's argument tuple from named arrays with it (:meth:`KernelArgs.pack`), so
adding an argument is one edit here, then its uses.  ``GLOSSARY`` says what
each name holds; a name means the same thing in every kernel that takes it.

Shapes: ``T`` steps, ``B`` batch rows, ``H`` hidden units, ``S`` states, ``K``
saved values, ``G`` (``Gr``) input (recurrent) gates, ``NH`` heads of ``dh``
units, ``proj`` the LSTMP projection size, ``nu`` units per packed panel and
``NB`` panels (``Hpad = NB * nu``: H padded to whole panels).  Arrays a call
does not use are one-element stand-ins.
"""

from __future__ import annotations

import operator
import textwrap
from collections.abc import Mapping

__all__ = ["GLOSSARY", "KernelArgs", "FORWARD", "FUSED_FORWARD", "BACKWARD", "PACK_TRAINING",
           "INPUT_PROJECTION", "FORWARD_STAGED", "BACKWARD_STAGED"]

# What each argument name holds, the same in every kernel that takes it.
GLOSSARY = {
    # inputs and weights
    "X": "the layer's input x [T, B, I] (C-contiguous)",
    "XW": "x_t @ W_ih.T of every step [T, B, G*H] (b_ih not yet added)",
    "b_ih": "input bias [G*H]",
    "b_hh": "recurrent bias [Gr*H]",
    "WT": "W_hh transposed per head [NH, dh, Gr*dh] ([1, proj, Gr*H] with a projection)",
    "W": "W_hh as BPTT reads it: [NH, Gr*dh, dh] (plain), or panels [NB, Gr*H, nu] (packed)",
    "Wp": "W_hh packed for the forward tiles: panels [NB, H, Gr*nu]",
    "Wxp": "W_ih packed for the forward tiles: panels [NB, I, G*nu]",
    "Wb": "W_hh packed for BPTT's tiles: panels [NB, Gr*H, nu]",
    "Whh": "W_hh [Gr*H, H] (C-contiguous), to be packed",
    "Wih": "W_ih [G*H, I] (C-contiguous), to be packed",
    "WrT": "W_hr transposed [H, proj] (LSTMP)",
    "Wr": "W_hr [proj, H] (LSTMP)",
    "unit_params": "the cell's per-unit parameters [n_param_scalars*H], in declaration order",
    "g_hh": "gain of the recurrent products' norm [Gr*H]",
    "Gz": "gains of the mid-step norms [n_norm*H]",
    "Bz": "biases of the mid-step norms [n_norm*H]",
    # time buffers (kernrnn.backends.common.TimeBuffers)
    "States": "state at every time boundary [S, T+1, B, H] ([S, 2, B, H]: fused inference)",
    "Saved": "what the cell saved for BPTT [K, T, B, H]",
    "Mid": "a two-stage step's intermediate values [NM, T', B, H] (a staged step's, of every "
           "boundary, one after the other)",
    "Zhat": "a two-stage step's normalised values [NZ, T', B, H] (a staged step's: the "
            "operands of its recurrent products, every boundary's)",
    "Rz": "their reciprocal deviations [NZ, T', B]",
    "HU": "the recurrent products [T'', NH, B, Gr*dh] (normalised, with a recurrent norm)",
    "Rhh": "the recurrent norm's reciprocal deviations [T'', B, nseg]",
    "Hp": "the projected h at every time boundary [T+1, B, proj] (LSTMP)",
    "Y": "output [T, B, H] ([T, B, proj] with a projection; may be a strided view)",
    "lengths": "steps of each batch row, int64 [B]; a finished row carries its state on",
    "reverse": "run the steps from T-1 down to 0",
    # regularisation (kernrnn.regularization.KernelArrays)
    "Mr": "recurrent-dropout mask [B, H] (0 or 1/(1-p))",
    "Hd": "scratch [B, H]: the masked h_{t-1} the recurrent product reads ([B, R*H]: the "
          "states of recurrent_states side by side)",
    "Zthr": "zoneout thresholds, uint64 [S] (training; compared with 24 Philox bits)",
    "Zp": "zoneout rates [S] (evaluation: the expectation)",
    "seed_lo": "the call's seed, low word",
    "seed_hi": "the call's seed, high word",
    "zstream": "Philox stream word of zoneout state 0 (state s adds s)",
    "ztrain": "1: draw zoneout masks (training), 0: blend by the rates",
    # BPTT
    "dY": "output gradient [T, B, H] ([T, B, proj] with a projection; may be strided)",
    "dS": "element-wise part of the state gradients [S, B, H]; holds dh0 at the end",
    "dXW": "gradient of the input pre-activations [T, B, G*H]",
    "dHU": "gradient of the recurrent products [NH, T, B, Gr*dh] (dXW's memory when equal)",
    "dH": "dHU_t @ W_hh of a step: [NH, B, dh], [1, B, proj] (LSTMP), [1, B, Hpad] (packed)",
    "DZ": "scratch [n_norm, B, H]: gradients of the normalised mid-step values (a staged "
          "step's: of its products' operands)",
    "DM": "scratch [n_mid, B, H]: gradients of the mid-step values (a staged step's: of every "
          "boundary's)",
    # a staged step's recurrent products (Cell.products), flat, product q after product q-1
    "WMT": "the products' matrices transposed, flat: product q's W_q.T [H, G_q*H]",
    "WMb": "the products' matrices, flat: product q's W_q [G_q*H, H]",
    "bM": "the products' biases, flat [sum G_q * H]",
    "HM": "the products' results, flat: product q's [T', B, G_q*H] (bias not added)",
    "dHM": "their gradients, flat: product q's [T, B, G_q*H]",
    "dHp": "gradient of the projected h of each step [T, B, proj] (LSTMP)",
    "dSp": "gradient arriving at the projected h from later steps [B, proj] (LSTMP)",
    "dR": "scratch [B, H]: the unprojected h's gradient, dHp_t @ W_hr (LSTMP)",
    "db_ih": "b_ih's gradient, one row per batch chunk [nchunk, G*H]",
    "db_hh": "b_hh's gradient, one row per batch chunk [nchunk, Gr*H]",
    "dg_hh": "g_hh's gradient, one row per batch chunk [nchunk, Gr*H]",
    "d_unit_params": "unit_params' gradient, one row per batch chunk [nchunk, n_param_scalars*H]",
    "dGz": "Gz's gradient, one row per batch chunk [nchunk, n_norm*H]",
    "dBz": "Bz's gradient, one row per batch chunk [nchunk, n_norm*H]",
    "chunk": "accumulator row of each batch row, int64 [B] (its chunk under the row split)",
    # threads and packing
    "XWc": "x_t @ W_ih.T of all steps for rows b0:b1, row t*(b1-b0) + (b-b0) [T*rows, G*Hpad]",
    "pre": "read the input projection from XWc (computed first by input_projection)",
    "flags": "step-barrier flags, int64 [nthr * FLAG_STRIDE]",
    "nthr": "threads that meet at the step barrier (1: none)",
    "tid": "this thread's index among them",
    "b0": "first batch row of this thread",
    "b1": "batch row past its last",
    "jb0": "first unit block (panel) of this thread",
    "jb1": "unit block past its last",
    "G": "input gates",
    "Gr": "recurrent gates",
    "H": "hidden units",
    "nu": "units per panel",
}


class KernelArgs:
    """One generated kernel's positional arguments, in order.

    ``names``: the argument names, separated by white space; every one must be
    in ``GLOSSARY``.  ``label`` names the kernels in error messages.
    """

    def __init__(self, label: str, names: str):
        names = tuple(names.split())
        unknown = [n for n in names if n not in GLOSSARY]
        if unknown:
            raise ValueError(f"{label}: arguments {unknown} are not in GLOSSARY")
        if len(set(names)) != len(names):
            raise ValueError(f"{label}: an argument is listed twice: {names}")
        self.label = label
        self.names = names
        self._getters: dict = {}  # number of keyword arguments -> (getter of the rest, of them)

    def __repr__(self) -> str:
        return f"KernelArgs({self.label!r}, {' '.join(self.names)!r})"

    def signature(self, name: str) -> str:
        """The kernel's ``def name(a, b, ...):``, wrapped at 99 columns."""
        head = f"def {name}("
        return textwrap.fill(", ".join(self.names) + "):", width=99, initial_indent=head,
                             subsequent_indent=" " * len(head), break_long_words=False,
                             break_on_hyphens=False)

    def pack(self, values: Mapping, **last) -> tuple:
        """The arguments in order: the last ``len(last)`` ones (a thread's own, typically)
        from the keywords, all others from ``values``; each name exactly once.

        Two lookups per call (about a microsecond for 46 arguments), no per-name loop.
        """
        k = len(last)
        getters = self._getters.get(k)
        if getters is None:
            split = len(self.names) - k
            getters = self._getters[k] = (_getter(self.names[:split]),
                                          _getter(self.names[split:]))
        try:
            args = getters[0](values) + getters[1](last)
        except KeyError:
            split = len(self.names) - k
            if set(last) != set(self.names[split:]):
                raise TypeError(f"{self.label}: the keywords must be its last {k} arguments "
                                f"({', '.join(self.names[split:])}), got {', '.join(last)}"
                                ) from None
            missing = [n for n in self.names[:split] if n not in values]
            raise TypeError(f"{self.label}: no value given for {', '.join(missing)}") from None
        if len(values) + k != len(self.names):
            raise TypeError(f"{self.label}: unexpected arguments "
                            f"{sorted(set(values) - set(self.names))}")
        return args


def _getter(names: tuple):
    """``m -> tuple(m[n] for n in names)``, with C-speed lookups."""
    if not names:
        return lambda m: ()
    if len(names) == 1:
        name = names[0]
        return lambda m: (m[name],)
    return operator.itemgetter(*names)


#: Arguments of the plain forward kernels (``forward_train``, ``forward_infer``),
#: the time loop of one direction for batch rows ``b0:b1``, BLAS per step
#: (:func:`~kernrnn.backends.cpu.source.forward_source`).
FORWARD = KernelArgs("forward", """
    XW b_ih WT b_hh g_hh unit_params Gz Bz States Saved Mid Zhat Rz HU Rhh Y
    lengths reverse Mr Hd Zthr Zp seed_lo seed_hi zstream ztrain WrT Hp
    b0 b1""")

#: The plain forward of a staged cell (recurrent products between stages), ``FORWARD`` with
#: the products' weights, biases and results.
FORWARD_STAGED = KernelArgs("staged forward", """
    XW b_ih WT b_hh g_hh unit_params Gz Bz States Saved Mid Zhat Rz HU Rhh Y
    lengths reverse Mr Hd Zthr Zp seed_lo seed_hi zstream ztrain WrT Hp
    WMT bM HM b0 b1""")

#: Arguments of the fused forward kernels, the same on packed panels, for rows ``b0:b1``
#: and unit blocks ``jb0:jb1``
#: (:func:`~kernrnn.backends.cpu.fused_source.fused_forward_source`).
FUSED_FORWARD = KernelArgs("fused forward", """
    X Wxp b_ih Wp b_hh unit_params States Saved Y lengths reverse Mr Hd Zthr Zp
    seed_lo seed_hi zstream ztrain XWc flags nthr tid b0 b1 jb0 jb1 pre""")

#: Arguments of ``backward_loop``, BPTT for rows ``b0:b1`` (and, packed, unit blocks
#: ``jb0:jb1``; :func:`~kernrnn.backends.cpu.source.backward_source`).
BACKWARD = KernelArgs("backward_loop", """
    dY dS W States Saved Mid Zhat Rz HU Rhh g_hh unit_params Gz Bz lengths
    reverse dXW dHU dH DZ DM Mr Zthr Zp seed_lo seed_hi zstream
    ztrain Wr dHp dSp dR db_ih db_hh dg_hh d_unit_params dGz dBz chunk flags
    nthr tid b0 b1 jb0 jb1""")

#: ``backward_loop`` of a staged cell: ``BACKWARD`` and the products' weights, biases,
#: results and gradients.
BACKWARD_STAGED = KernelArgs("staged backward_loop", """
    dY dS W States Saved Mid Zhat Rz HU Rhh g_hh unit_params Gz Bz lengths
    reverse dXW dHU dH DZ DM Mr Zthr Zp seed_lo seed_hi zstream
    ztrain Wr dHp dSp dR db_ih db_hh dg_hh d_unit_params dGz dBz chunk WMb bM HM dHM flags
    nthr tid b0 b1 jb0 jb1""")

#: Arguments of ``pack_training``, a training forward's share of packing ``W_hh`` and
#: ``W_ih`` (:func:`~kernrnn.backends.cpu.fused_source.pack_training_source`).
PACK_TRAINING = KernelArgs("pack_training", """
    Whh Wih Gr G H nu Wp Wxp Wb jb0 jb1 flags tid nthr""")

#: Arguments of ``input_projection``, ``x_t @ W_ih.T`` of all steps first, rows ``b0:b1``
#: (:func:`~kernrnn.backends.cpu.fused_source.input_projection_source`).
INPUT_PROJECTION = KernelArgs("input_projection", """
    X Wxp XWc b0 b1 jb0 jb1""")
