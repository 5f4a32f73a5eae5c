"""Hyperparameters (kernrnn.cell.Hyper): constants a cell declares and a layer sets.

Read by the forward as trailing arguments bound by name; no gradient; data for
the kernels (one compile serves every value); kept in state dicts, checkpoints,
``kernrnn.torch`` modules and ``kernrnn train --cell-arg``.  The test cell
``t_hyper`` (tests/hyper_test_cells.py) has one hyperparameter of each kind.
"""

import hashlib
import io
import re

import numpy as np
import pytest
from hyper_test_cells import HYP, hyper_step
from hypothesis import given, settings
from hypothesis import strategies as st

import kernrnn
from kernrnn.cell import Cell, CellError, Hyper
from kernrnn.testing.conformance import forward_errors, gradient_errors
from kernrnn.testing.strategies import problems

FLOATS = st.floats(-1.5, 1.5, allow_nan=False)


def hyper_args():
    return st.fixed_dictionaries({"eps": FLOATS, "gamma": FLOATS, "k": st.integers(-2, 2),
                                  "flip": st.booleans()})


# -- kernels vs the float64 reference, gradients vs finite differences ---------------------


@settings(max_examples=6, deadline=None)
@given(p=problems(max_T=5, max_B=3, max_I=3, max_H=5), args=hyper_args())
def test_layer_matches_reference_and_finite_differences(p, args):
    for dtype in (np.float64, np.float32):
        scaled, absolute = forward_errors(HYP, p, dtype, cell_args=args)
        assert scaled <= 1, (dtype, absolute, p, args)
    gradient_errors(HYP, p, cell_args=args)  # raises naming the gradient that disagrees


def _step_output(dtype=np.float64, h0=0.3, **args):
    """y of one step from the state h0 (every unit), with fixed weights."""
    layer = kernrnn.RNN(HYP, 2, 3, dtype=dtype, seed=4, **args)
    x = np.linspace(-1, 1, 4).reshape(1, 2, 2).astype(dtype)
    y, _ = layer(x, np.full((1, 2, 3), h0, dtype=dtype))
    return y[0].astype(np.float64)


def test_each_hyperparameter_changes_the_step_as_its_formula_says():
    h0 = 0.3
    base = dict(gamma=0.0, k=0)
    d = _step_output(eps=0.5, **base) - h0  # eps * tanh(a)
    np.testing.assert_allclose(_step_output(eps=-1.25, **base) - h0, -2.5 * d, rtol=1e-12)
    np.testing.assert_allclose(_step_output(eps=0.5, flip=True, **base) - h0, -d, rtol=1e-12)
    a = np.arctanh(d / 0.5)  # the pre-activation, so gamma's shift can be predicted
    np.testing.assert_allclose(_step_output(eps=0.5, gamma=0.7, k=0) - h0,
                               0.5 * np.tanh(a - 0.7 * h0), rtol=1e-12)
    y0, y1, y2 = (_step_output(eps=0.5, gamma=0.0, k=k) for k in (0, 1, 2))
    np.testing.assert_allclose(y2 - y0, 2 * (y1 - y0), rtol=1e-12)
    assert np.all(np.abs(y1 - y0) > 1e-3)
    # float32 kernels read the same values in float32
    np.testing.assert_allclose(_step_output(np.float32, eps=-1.25, **base) - h0, -2.5 * d,
                               rtol=1e-5)


def test_new_values_compile_nothing():
    from kernrnn.backends.cpu.build import get_kernels

    def run(eps):
        layer = kernrnn.RNN(HYP, 2, 3, dtype=np.float64, seed=1, eps=eps)
        x = np.linspace(-1, 1, 12).reshape(2, 2, 3)[..., :2].copy()
        y, _ = layer(x)
        layer.backward(np.ones_like(y))
        return y, layer.grads

    def compiled():
        k = get_kernels(HYP, np.dtype(np.float64), (False, False), False)
        ds = [k.forward_train, k.forward_infer, k.backward_loop]
        if k.fused is not None:
            ds += [k.fused.forward_train, k.fused.forward_infer, k.fused.backward_loop]
        return get_kernels.cache_info().misses, sum(len(d.signatures) for d in ds)

    y1, g1 = run(0.5)
    before = compiled()
    y2, g2 = run(-0.2)
    assert compiled() == before  # no kernel built, no signature compiled
    assert not np.allclose(y1, y2) and not np.allclose(g1["weight_ih_l0"], g2["weight_ih_l0"])


def test_hyperparameters_are_not_parameters():
    layer = kernrnn.RNN(HYP, 2, 3, num_layers=2, bidirectional=True, eps=0.2)
    names = {h.name for h in HYP.hyper}
    assert not names & {k.rsplit("_l", 1)[0] for k in layer.state_dict()}
    assert set(layer.grads) == set(layer.params)
    assert layer.cell_args == {"eps": 0.2, "gamma": 0.1, "k": 1, "flip": False}
    assert "eps=0.2" in repr(layer) and "gamma" not in repr(layer)  # defaults are left out


def test_derived_math_takes_the_hyperparameters_as_one_tuple():
    """The contract's functions take them last, in declaration order; the reference by name."""
    fwd = HYP.forward((0.1, 0.2), (0.3, -0.1), (0.5,), (0.4,), (0.5, 0.1, 1.0, 0.0))
    want = hyper_step((0.1, 0.2), (0.3, -0.1), (0.5,), (0.4,), False, 0.1, 1, 0.5)
    assert fwd[0] == pytest.approx(want)
    src = HYP.derivation().source
    assert "def backward(saved, prev, dstate, u, hyper):" in src
    assert "def reference(xw, hu, prev, u, eps, gamma, k, flip):" in src
    assert [n for n, *_ in HYP.math_signatures()] == ["forward", "backward"]
    assert HYP.math_signatures()[1] == ("backward", [HYP.n_saved, 1, 1, 1, 4], [2, 2, 1, 1])


# -- cells without hyperparameters keep their kernels --------------------------------------

#: sha256 (first 20 hex digits) of the generated CPU and CUDA kernel sources of lstm and gru,
#: as before hyperparameters existed.  A change here slows or changes the shipped cells:
#: update only for an intended change of the generated kernels.
KERNEL_DIGESTS = {"lstm": "62d465d7277f8e72b620", "gru": "8ce14dea1f28733aad4c"}


@pytest.mark.parametrize("name", sorted(KERNEL_DIGESTS))
def test_cells_without_hyperparameters_generate_the_same_kernel_source(name):
    from kernrnn.backends.cpu.fused_source import fused_forward_source
    from kernrnn.backends.cpu.source import (
        backward_source,
        forward_source,
        same_input_and_recurrent_grads,
    )
    from kernrnn.backends.cuda.kernels import kernel_source

    c = kernrnn.get_registry().get(name)
    same = same_input_and_recurrent_grads(c)
    parts = [forward_source(c, True), forward_source(c, False), backward_source(c, same),
             backward_source(c, same, packed=(4, 16)), fused_forward_source(c, True, 4, 4, 16),
             kernel_source(c)]
    digest = hashlib.sha256("".join(parts).encode()).hexdigest()[:20]
    assert digest == KERNEL_DIGESTS[name]
    assert "hyper" not in "".join(parts)


# -- bad declarations and bad values ---------------------------------------------------------


def _fwd_unknown(xw, hu, prev, eps, beta):
    return (prev[0] + eps * xw[0] + beta,)


def _fwd_eps(xw, hu, prev, eps):
    return (prev[0] + eps * (xw[0] + hu[0]),)


def _hand_forward(xw, hu, prev, eps):
    return (xw[0] + hu[0],), ()


def _hand_backward(saved, prev, dstate, eps):
    return (dstate[0],), (dstate[0],), (0.0,)


@pytest.mark.parametrize("kw, match", [
    (dict(forward=_fwd_eps, hyper={"prev": 0.1}), "hyperparameter name must be"),
    (dict(forward=_fwd_eps, hyper={"dropout": 0.1}), "keyword of the layers"),
    (dict(forward=_fwd_eps, hyper={"eps": "0.1"}), "the default must be a finite float"),
    (dict(forward=_fwd_eps, hyper={"eps": float("nan")}), "the default must be a finite"),
    (dict(forward=_fwd_eps, hyper=(Hyper("eps", 1.0), Hyper("eps", 2.0))), "distinct"),
    (dict(forward=_fwd_eps, hyper=("eps",)), "hyper must be a dict"),
    (dict(forward=_fwd_unknown, hyper={"eps": 0.1}), "unknown trailing argument 'beta'"),
    (dict(forward=_hand_forward, backward=_hand_backward, hyper={"eps": 0.1},
          reference=lambda xw, hu, prev, eps: (xw[0] + hu[0],)),
     "need a derived backward"),
])
def test_bad_declarations_name_the_cell_and_what_is_wrong(kw, match):
    with pytest.raises(CellError, match=match) as info:
        Cell("t_bad_hyper", gates="a", **kw)
    assert str(info.value).startswith("cell 't_bad_hyper'")


@pytest.mark.parametrize("given, match", [
    ({"epss": 0.1}, "unknown hyperparameter 'epss'; the cell declares: eps=0.5, gamma=0.1, "
                    "k=1, flip=False"),
    ({"eps": "0.1"}, "'eps' must be a finite float \\(default 0.5\\), got '0.1' \\(str\\)"),
    ({"eps": float("nan")}, "'eps' must be a finite float"),
    ({"gamma": float("inf")}, "'gamma' must be a finite float"),
    ({"eps": True}, "'eps' must be a finite float"),
    ({"k": 1.5}, "'k' must be an int \\(default 1\\), got 1.5 \\(float\\)"),
    ({"k": True}, "'k' must be an int"),
    ({"flip": 1}, "'flip' must be a bool \\(default False\\), got 1 \\(int\\)"),
])
def test_bad_values_are_cell_errors(given, match):
    with pytest.raises(CellError, match=match):
        kernrnn.RNN(HYP, 2, 3, **given)
    with pytest.raises(CellError, match=match):
        kernrnn.RNN(HYP, 2, 3, cell_args=given)


def test_reserved_names_cover_the_layers_keywords():
    """A hyperparameter is a keyword of the layers too, so it may not be named like theirs."""
    import inspect

    from kernrnn.cell import RESERVED_HYPER_NAMES
    from kernrnn.train import SequenceModel

    layers = [kernrnn.RNN, SequenceModel]
    try:
        from kernrnn.torch import Recurrent
        layers.append(Recurrent)
    except ImportError:  # torch is optional
        pass
    for cls in layers:
        names = set(inspect.signature(cls.__init__).parameters) - {"self", "hyper"}
        assert names <= RESERVED_HYPER_NAMES, (cls, names - RESERVED_HYPER_NAMES)


def test_a_forward_may_leave_out_a_hyperparameter():
    """One only a RecurrentWeight reads, say: still declared, set and checked."""
    cell = Cell("t_unused_hyper", gates="a", forward=_fwd_eps,
                hyper={"eps": 0.5, "gamma": 0.1})
    assert cell.hyper_values({"gamma": 2.0}) == {"eps": 0.5, "gamma": 2.0}
    layer = kernrnn.RNN(cell, 1, 2, dtype=np.float64, seed=0, gamma=3.0)
    x = np.ones((2, 1, 1))
    default = kernrnn.RNN(cell, 1, 2, dtype=np.float64, seed=0)
    np.testing.assert_array_equal(layer(x)[0], default(x)[0])


def test_values_given_twice_or_not_as_a_dict():
    with pytest.raises(ValueError, match=r"\['eps'\] given both in cell_args and as keyword"):
        kernrnn.RNN(HYP, 2, 3, cell_args={"eps": 0.1}, eps=0.2)
    with pytest.raises(TypeError, match="cell_args must be a dict"):
        kernrnn.RNN(HYP, 2, 3, cell_args=[("eps", 0.1)])


def test_errors_name_plugin_and_distribution(fresh_registry):
    import hyper_test_cells

    kernrnn.register_plugin(hyper_test_cells)
    with pytest.raises(CellError, match="cell 't_hyper' \\(plugin 'hyper_test_cells' from "
                                        "distribution 'registered at run time'\\): hyperparameter "
                                        "'eps' must be a finite float"):
        kernrnn.RNN("t_hyper", 2, 3, eps="x")
    with pytest.raises(CellError, match="cell 'lstm' \\(plugin 'kernrnn_cells.lstm' .*\\): unknown "
                                        "hyperparameter 'eps'; the cell declares: none"):
        kernrnn.RNN("lstm", 2, 3, eps=0.1)


# -- state dicts, checkpoints, the CLI ------------------------------------------------------


def test_state_dict_metadata_round_trip():
    x = np.linspace(-1, 1, 12).reshape(2, 3, 2)
    a = kernrnn.RNN(HYP, 2, 3, dtype=np.float64, seed=1, eps=-0.3, flip=True)
    sd = a.state_dict()
    assert sd._metadata == {"": {"cell_args": {"eps": -0.3, "gamma": 0.1, "k": 1,
                                               "flip": True}}}
    b = kernrnn.RNN(HYP, 2, 3, dtype=np.float64, seed=2)
    b.load_state_dict(sd)
    assert b.cell_args == a.cell_args
    np.testing.assert_array_equal(b(x)[0], a(x)[0])
    c = kernrnn.RNN(HYP, 2, 3, dtype=np.float64, seed=2, eps=0.7)
    c.load_state_dict(dict(sd))  # no metadata: the layer keeps its values
    assert c.cell_args["eps"] == 0.7
    sd._metadata[""]["cell_args"]["k"] = 0.5
    before = {k: v.copy() for k, v in c.params.items()}
    with pytest.raises(CellError, match="'k' must be an int"):
        c.load_state_dict(sd)
    assert c.cell_args["eps"] == 0.7 and all(np.array_equal(before[k], c.params[k])
                                             for k in before)


def _trainer(cell_args=None):
    from kernrnn.train import AddingTask, SequenceModel, Trainer, make_optimizer

    task = AddingTask(6, steps_per_epoch=2, test_size=4)
    model = SequenceModel("t_hyper", input_size=task.input_size, hidden_size=3,
                          output_size=task.output_size, head=task.head, seed=0,
                          cell_args=cell_args)
    return Trainer(model, task, make_optimizer("adam", lr=0.01), batch_size=3, seed=0)


def test_checkpoints_keep_the_values(fresh_registry, tmp_path):
    import hyper_test_cells

    from kernrnn.train import SequenceModel, load_checkpoint

    kernrnn.register_plugin(hyper_test_cells)
    tr = _trainer({"eps": 0.25, "k": 2})
    tr.fit(1)
    ck = load_checkpoint(tr.save(tmp_path / "c.npz"))
    assert ck.meta["model"]["cell_args"] == {"eps": 0.25, "gamma": 0.1, "k": 2, "flip": False}
    model = SequenceModel.from_config(ck.meta["model"])
    assert model.rnn.cell_args == tr.model.rnn.cell_args
    tr2 = _trainer({"eps": 0.25, "k": 2})
    tr2.restore(ck)
    with pytest.raises(ValueError, match="cell_args"):  # another value: another model
        _trainer({"eps": 0.3, "k": 2}).restore(ck)
    # a checkpoint without them (written before the cell had any) loads with the defaults
    old = dict(ck.meta["model"])
    del old["cell_args"]
    assert SequenceModel.from_config(old).rnn.cell_args == HYP.hyper_values()
    ck.meta["model"] = old
    _trainer().restore(ck)


def test_cli_cell_arg(fresh_registry, tmp_path, capsys):
    import hyper_test_cells

    from kernrnn.cli import main
    from kernrnn.train import load_checkpoint

    kernrnn.register_plugin(hyper_test_cells)
    tiny = ["train", "--task", "adding", "--seq-len", "4", "--steps-per-epoch", "1",
            "--batch-size", "2", "--hidden", "2", "--cell", "t_hyper", "--no-progress",
            "--no-plot", "--save-every", "0"]
    out = tmp_path / "run"
    rc = main(tiny + ["--epochs", "1", "--out", str(out), "--cell-arg", "eps=0.25",
                      "--cell-arg", "flip=true", "--cell-arg", "k=3"])
    assert rc == 0, capsys.readouterr().err
    ck = load_checkpoint(out / "checkpoint.npz")
    assert ck.meta["model"]["cell_args"] == {"eps": 0.25, "gamma": 0.1, "k": 3, "flip": True}
    capsys.readouterr()
    assert main(["train", "--resume", str(out / "checkpoint.npz"), "--epochs", "2",
                 "--cell-arg", "eps=0.25", "--no-progress", "--no-plot"]) == 0
    for argv, match in [
        (["--resume", str(out / "checkpoint.npz"), "--cell-arg", "eps=0.5"],
         "--cell-arg eps=0.5 differs from the checkpoint's 0.25"),
        (["--cell-arg", "eps"], "--cell-arg must be NAME=VALUE, got 'eps'"),
        (["--cell-arg", "eps=abc"], "cell 't_hyper' .*'eps' must be a finite float .*'abc'"),
        (["--cell-arg", "k=2.5"], "'k' must be an int"),
        (["--cell-arg", "beta=1"], "unknown hyperparameter 'beta'"),
        (["--cell-arg", "eps=1", "--cell-arg", "eps=2"], "--cell-arg eps is given twice"),
    ]:
        capsys.readouterr()
        base = ["train", "--no-progress", "--no-plot"] if argv[0] == "--resume" else \
            tiny + ["--epochs", "1", "--out", str(tmp_path / "other")]
        assert main(base + argv) != 0
        err = capsys.readouterr().err
        assert re.search(match, err), err


# -- kernrnn.torch ---------------------------------------------------------------------------


def test_torch_module_takes_and_keeps_the_values():
    torch = pytest.importorskip("torch")
    from kernrnn.torch import Recurrent

    torch.manual_seed(0)
    m = Recurrent(HYP, 2, 3, dtype=torch.float64, eps=-0.4, k=2)
    assert m.cell_args == {"eps": -0.4, "gamma": 0.1, "k": 2, "flip": False}
    assert "eps=-0.4" in repr(m)
    native = kernrnn.RNN(HYP, 2, 3, dtype=np.float64, eps=-0.4, k=2)
    native.load_state_dict({k: v.detach().numpy() for k, v in m.state_dict().items()})
    x = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(2, 3, 2).requires_grad_()
    y, _ = m(x)
    y.sum().backward()
    ny, _ = native(x.detach().numpy())
    ndx, _ = native.backward(np.ones_like(ny))
    np.testing.assert_allclose(y.detach().numpy(), ny, rtol=1e-13)
    np.testing.assert_allclose(x.grad.numpy(), ndx, rtol=1e-12)
    for name, p in m.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), native.grads[name], rtol=1e-12)

    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = Recurrent(HYP, 2, 3, dtype=torch.float64)
    m2.load_state_dict(torch.load(buf))
    assert m2.cell_args == m.cell_args
    torch.testing.assert_close(m2(x)[0], y)
    m2.cell_args = {**m2.cell_args, "eps": 0.4}  # data for the kernels: the next call's
    assert not torch.allclose(m2(x)[0], y)
    with pytest.raises(TypeError):
        m2.cell_args["eps"] = 0.1  # read-only: an assignment checks the values
    with pytest.raises(CellError, match="'k' must be an int"):
        m2.cell_args = {"k": 0.5}
    assert m2.cell_args["eps"] == 0.4
    compiled = torch.compile(m2, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x)[0], m2(x)[0])
    m2.cell_args = {"eps": -0.4, "k": 2}  # a new value: torch.compile sees a new configuration
    torch.testing.assert_close(compiled(x)[0], y)
    with pytest.raises(CellError, match="unknown hyperparameter 'epsilon'"):
        Recurrent(HYP, 2, 3, epsilon=0.1)


def test_torch_cell_module_takes_and_keeps_the_values():
    torch = pytest.importorskip("torch")
    from kernrnn.torch import Recurrent, RecurrentCell

    torch.manual_seed(0)
    cell = RecurrentCell(HYP, 2, 3, dtype=torch.float64, cell_args={"eps": -0.4}, flip=True)
    assert cell.cell_args == {"eps": -0.4, "gamma": 0.1, "k": 1, "flip": True}
    assert "flip=True" in repr(cell)
    layer = Recurrent(HYP, 2, 3, dtype=torch.float64, eps=-0.4, flip=True)
    layer.load_state_dict({f"{k}_l0": v for k, v in cell.state_dict().items()})
    x = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(3, 2)
    h0 = torch.full((3, 3), 0.2, dtype=torch.float64)
    torch.testing.assert_close(cell(x, h0), layer(x[None], h0[None])[0][0])
    sd = cell.state_dict()
    assert sd._metadata[""]["cell_args"] == cell.cell_args
    other = RecurrentCell(HYP, 2, 3, dtype=torch.float64)
    other.load_state_dict(sd)
    assert other.cell_args == cell.cell_args
    torch.testing.assert_close(other(x, h0), cell(x, h0))


# -- the CUDA kernels: PTX ---------------------------------------------------------------------


def test_float32_ptx_reads_hyperparameters_without_float64():
    cuda = pytest.importorskip("numba.cuda", reason="needs numba-cuda")
    from cuda_test_cells import nvvm_missing_locally

    from kernrnn.backends import cuda as cb

    if cb.SIMULATOR or nvvm_missing_locally():
        pytest.skip("compile_ptx needs the real CUDA target and NVVM")
    kernels = cb.get_kernels(HYP, np.float32)
    sigs = cb.ptx_signatures(HYP, np.float32)
    assert any("backward" in n for n in sigs)
    for name, sig in sigs.items():
        ptx, _ = cuda.compile_ptx(getattr(kernels, name), sig, cc=(9, 0))
        hits = [line for line in ptx.splitlines() if re.search(r"\.f64\b", line)]
        assert not hits, (name, hits[:3])

