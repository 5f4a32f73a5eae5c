"""kernrnn.autodiff: a cell's backward, saved values and reference derived from its forward.

* The differentiator: hypothesis draws straight-line scalar forwards (gates, states,
  per-unit parameters, conditional expressions, helpers, a mid-step norm); the derived
  gradients match central finite differences of the Python forward in float64, the
  derived NumPy reference equals the forward, and the math compiles with Numba (float64
  equal to Python, float32 staying float32) and, where NVVM is, to float32 PTX without
  ``.f64``.  (The CUDA simulator runs are in tests/cudasim/test_sim_derive.py.)
* Every shipped cell (a forward only since phase 2): its derived backward equals the
  hand-written one it had before (tests/hand_written_cells.py) to 1e-12 (direct scalar calls,
  per-unit parameter gradients and the LayerNorm LSTM's two stages included), and its derived
  reference equals the hand-written reference.
* Constructs outside the supported set raise CellError naming cell, file, line, construct.
"""

import inspect
import math
import re

import numba
import numpy as np
import pytest
from derive_helpers import (
    args_of,
    chain,
    fd_mismatches,
    flat,
    make_driver,
    programs,
    random_inputs,
    relclose,
)
from hand_written_cells import MATH, hand_written
from hypothesis import given, settings
from hypothesis import strategies as st

from kernrnn import scalar_math
from kernrnn.autodiff import derive, derive_for_cell
from kernrnn.cell import CellError, reference_norm, relu, sigmoid, tanh
from kernrnn.plugins import get_registry
from kernrnn.scalar import compile_scalar

# -- the shipped cells: their forward steps, and hand-written math as the oracle --------------

SHIPPED = sorted(n for n in get_registry().names() if get_registry().source(n).distribution
                 .startswith("kernrnn "))
#: The forward step each shipped cell is written as (the function its plugin gives).
FORWARDS = {n: get_registry().get(n).step for n in SHIPPED if get_registry().get(n).step}
_DERIVED = {}


def derived(name, recompute=True):
    key = (name, recompute)
    if key not in _DERIVED:
        _DERIVED[key] = derive_for_cell(get_registry().get(name), FORWARDS[name],
                                        recompute=recompute)
    return _DERIVED[key]


def test_every_shipped_cell_has_a_forward_and_hand_written_math():
    assert sorted(FORWARDS) == SHIPPED
    # a step with recurrent products (rhn) has no hand-written form: the contract has none
    assert sorted(MATH) == [n for n in SHIPPED if not get_registry().get(n).staged]


def _cell_inputs(cell, rng):
    G, S = cell.n_gates, cell.n_state
    xw = tuple(float(v) for v in rng.uniform(-2, 2, G))
    hu = tuple(float(v) for v in rng.uniform(-2, 2, G)) if cell.has_recurrent else None
    prev = tuple(float(np.asarray(v)) for v in cell.sample_states(rng, ()))
    params = tuple(tuple(float(v) for v in rng.uniform(-1, 1, p.blocks)) for p in cell.params)
    dstate = tuple(float(v) for v in rng.uniform(-1, 1, S))
    return xw, hu, prev, params, dstate


def _raw(cell, rng):
    """The raw input x_t as the contract passes it (a 1-tuple), or None without raw input
    (drawn after :func:`_cell_inputs`' values, which stay those of the other cells)."""
    return (float(rng.uniform(-2, 2)),) if cell.raw_input else None


def _assert_same(label, got, want, worst, rel=1e-12):
    assert len(got) == len(want), f"{label}: {len(got)} tuples, expected {len(want)}"
    for k, (g, w) in enumerate(zip(got, want)):
        assert len(g) == len(w), f"{label}[{k}]: {len(g)} values, expected {len(w)}"
        for m, (a, b) in enumerate(zip(g, w)):
            err = abs(a - b) / max(1.0, abs(a), abs(b))
            worst[0] = max(worst[0], err)
            assert err <= rel, f"{label}[{k}][{m}]: derived {a!r}, hand-written {b!r}"


#: The shipped cells with a hand-written form (all but the staged ones).
HANDS = sorted(n for n in FORWARDS if n in MATH)
ONE_STAGE = [n for n in HANDS if n != "lstm_ln"]


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "save-all"])
@pytest.mark.parametrize("name", ONE_STAGE)
@settings(max_examples=20)
@given(seed=st.integers(0, 2**32 - 1))
def test_derived_backward_equals_hand_written(name, recompute, seed):
    cell, shipped = hand_written(name), get_registry().get(name)
    d = derived(name, recompute)
    rng = np.random.default_rng(seed)
    for _ in range(5):
        xw, hu, prev, params, dstate = _cell_inputs(cell, rng)
        raw = _raw(cell, rng)
        new_h, saved_h = cell.forward(*cell.forward_args(xw, hu, prev, params, raw))
        # the derived math takes the registered cell's hyperparameters (the defaults the
        # hand-written oracle fixes)
        new_d, saved_d = d.forward(*shipped.forward_args(xw, hu, prev, params, raw))
        worst = [0.0]
        _assert_same(f"{name} new state", [new_d], [new_h], worst)
        assert len(saved_d) == d.n_saved
        got = d.backward(saved_d, prev, dstate, *params, *shipped.hyper_args())
        want = cell.backward(saved_h, prev, dstate, *params)
        _assert_same(f"{name} (dxw, dhu, dprev, *dparams)", got, want, worst)


@settings(max_examples=20)
@given(seed=st.integers(0, 2**32 - 1), H=st.integers(2, 6))
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "save-all"])
def test_two_stage_split_equals_hand_written(recompute, seed, H):
    """lstm_ln: stage 1 on a row of H units, the row's layer norm, stage 2, then back."""
    cell = hand_written("lstm_ln")
    d = derived("lstm_ln", recompute)
    assert d.normalize == ("c",) and d.forward2 is not None
    rng = np.random.default_rng(seed)
    rows = [_cell_inputs(cell, rng) for _ in range(H)]
    gain, bias = rng.uniform(0.5, 1.5, H), rng.uniform(-0.5, 0.5, H)
    hand = _two_stage_row(cell, rows, gain, bias)
    mine = _two_stage_row(d, rows, gain, bias)
    worst = [0.0]
    for j in range(H):
        _assert_same(f"lstm_ln unit {j}", mine[j], hand[j], worst)


def _layer_norm_backward(z, dzn, gain, kind):
    """d(z) from d(LN(z) * gain + bias) over a row, float64."""
    zc = z - z.mean() if kind == "layer" else z
    rstd = 1.0 / np.sqrt((zc * zc).mean() + 1e-5)
    xhat = zc * rstd
    g = dzn * gain
    m1 = g.mean() if kind == "layer" else 0.0
    return rstd * (g - m1 - xhat * (g * xhat).mean())


def _two_stage_row(math_, rows, gain, bias, kind="layer"):
    """Per unit: (new state, dxw, dhu, dprev) of a two-stage step over one row."""
    firsts = [math_.forward(*args_of(*r[:4])) for r in rows]
    Z = np.array([z[0] for z, _ in firsts])
    ZN = reference_norm(Z, gain, bias, kind)
    outs, b2s = [], []
    for j, r in enumerate(rows):
        _, _, prev, params, dstate = r
        zn, mid = (float(ZN[j]),), firsts[j][1]
        new, saved = math_.forward2(zn, mid, prev, *params)
        outs.append(new)
        b2s.append(math_.backward2(saved, zn, mid, prev, dstate, *params))
    dZ = _layer_norm_backward(Z, np.array([b[0][0] for b in b2s]), gain, kind)
    result = []
    for j, r in enumerate(rows):
        _, _, prev, params, _ = r
        b1 = math_.backward(firsts[j][1], prev, (float(dZ[j]),), b2s[j][1], *params)
        dprev = tuple(a + b for a, b in zip(b1[2], b2s[j][2]))
        result.append([outs[j], b1[0], b1[1], dprev])
    return result


@pytest.mark.parametrize("name", HANDS)
def test_derived_reference_equals_reference(name):
    """The float64 NumPy step generated from the forward equals the hand-written reference."""
    cell = hand_written(name)
    d = derived(name)
    rng = np.random.default_rng(7)
    B, H, G = 3, 4, cell.n_gates
    xw = tuple(rng.uniform(-2, 2, (B, H)) for _ in range(G))
    hu = tuple(rng.uniform(-2, 2, (B, H)) for _ in range(G))
    prev = cell.sample_states(rng, (B, H))
    params = [tuple(rng.uniform(-1, 1, H) for _ in range(p.blocks)) for p in cell.params]
    args = cell.forward_args(xw, hu, prev, params)
    if cell.raw_input:  # the reference takes x by name (below), not as the contract's 1-tuple
        args = args[:-1]
    kw = {}
    if cell.normalize:
        gain, bias = rng.uniform(0.5, 1.5, H), rng.uniform(-0.5, 0.5, H)
        kw["norm"] = lambda _name, z: reference_norm(z, gain, bias, cell.normalize_kind)
    if cell.raw_input:  # an array, by name
        kw["x"] = rng.uniform(-2, 2, (B, H))
    want = cell.reference(*args, **kw)
    got = d.reference(*args, **kw, **get_registry().get(name).hyper_values())  # the defaults
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.shape == (B, H)
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=f"{name} state {k}")


def test_saved_values_and_shared_gradients_of_shipped_cells():
    """What the rule saves for each shipped cell (never more than the hand-written cell),
    and the dxw == dhu fact: the derivation's, the cell's, the one read from the hand-written
    backward's source, and the CPU backend's reading of the derived source all agree."""
    from kernrnn.backends.cpu import same_input_and_recurrent_grads

    assert derived("lstm").saved == ("i", "f", "g", "o", "tanh_c")
    assert derived("gru").saved == ("hu2", "r", "z", "n")
    assert derived("slstm").saved == ("z", "o", "cond", "i", "f")  # c, n recomputed
    assert derived("lstm_peephole").saved == ("i", "f", "tanh2", "o", "tanh_c")  # c recomputed
    assert derived("lstm_ln").mid == ("i", "f", "g", "o", "c")
    assert derived("lstm_ln").saved == ("tanh_norm_c",)
    for name in HANDS:
        cell = hand_written(name)
        d = derived(name)
        rng = np.random.default_rng(0)
        xw, hu, prev, params, _ = _cell_inputs(cell, rng)
        out = cell.forward(*cell.forward_args(xw, hu, prev, params, _raw(cell, rng)))
        hand = len(out[1]) if not cell.normalize else cell.n_mid
        assert (d.n_mid if cell.normalize else d.n_saved) <= hand, (name, d.saved, hand)
        if cell.has_recurrent:
            assert len(d.same_grads) == cell.n_gates
        shipped = get_registry().get(name)
        assert shipped.same_grads == cell.same_grads == d.same_grads, name
        if cell.plain:
            assert all(d.same_grads) == same_input_and_recurrent_grads(cell), name
            assert all(d.same_grads) == same_input_and_recurrent_grads(shipped), name
    assert derived("gru").same_grads == (True, True, False)
    assert derived("mgu").same_grads == (True, False)
    assert derived("slstm").same_grads == (True,) * 4  # through the stabiliser's select


# -- the differentiator on random forwards -------------------------------------------------

# Pure Python and cheap: more examples than the profile's default, so that every kind of
# statement shows up in the deterministic CI run too.
MANY = max(80, settings().max_examples)


def _loss(prog, dstate, layout):
    """L(x) = sum_s dstate_s * new_s, x the flattened inputs of the Python forward."""
    def unflatten(x):
        out, k = [], 0
        for n in layout:
            out.append(tuple(x[k:k + n]))
            k += n
        return out

    def L(x):
        new = prog.fn(*unflatten(x))
        return sum(u * v for u, v in zip(dstate, new))
    return L


def _layout(prog):
    return [prog.gates] + ([prog.gates] if prog.recurrent else []) + [prog.state] + \
        list(prog.params)


@settings(max_examples=MANY, deadline=None)
@given(prog=programs(), seed=st.integers(0, 2**32 - 1))
def test_random_forward_gradients_match_finite_differences(prog, seed):
    rng = np.random.default_rng(seed)
    for recompute in (True, False):
        d = prog.derive(recompute=recompute)
        for _ in range(3):
            xw, hu, prev, params, dstate = random_inputs(rng, prog.gates, prog.state,
                                                         prog.recurrent, prog.params)
            args = args_of(xw, hu, prev, params)
            want = prog.fn(*args)
            new, saved = d.forward(*args)
            assert all(relclose(a, b, 1e-13) for a, b in zip(new, want)), (new, want)
            assert len(saved) == d.n_saved
            grads = d.backward(saved, prev, dstate, *params)
            flat_grads = [v for g in grads for v in g]
            x = [v for a in args for v in a]
            bad = fd_mismatches(_loss(prog, dstate, _layout(prog)), x, flat_grads)
            assert not bad, f"(index, derived, finite difference) {bad}\n{prog.source}\n" \
                            f"{d.source}"
        if prog.recurrent:  # a shared adjoint is one value
            assert all(grads[0][k] == grads[1][k] for k, same in enumerate(d.same_grads)
                       if same)


@settings(deadline=None)
@given(prog=programs(), seed=st.integers(0, 2**32 - 1))
def test_random_forward_reference_equals_forward(prog, seed):
    """The NumPy reference, element by element, is the Python forward."""
    d = prog.derive()
    rng = np.random.default_rng(seed)
    B, H = 2, 3
    arrays = [rng.uniform(-1, 1, (n, B, H)) for n in _layout(prog)[:-len(prog.params) or None]]
    arrays += [rng.uniform(-1, 1, (n, H)) for n in prog.params]
    got = d.reference(*[tuple(a) for a in arrays])
    for b in range(B):
        for h in range(H):
            args = [tuple(float(v) for v in (a[:, b, h] if a.ndim == 3 else a[:, h]))
                    for a in arrays]
            want = prog.fn(*args)
            for s in range(prog.state):
                assert relclose(float(got[s][b, h]), want[s], 1e-12), (s, b, h, prog.source)


@settings(max_examples=MANY // 2, deadline=None)
@given(prog=programs(norm=True), seed=st.integers(0, 2**32 - 1), H=st.integers(2, 4))
def test_random_two_stage_forward_matches_finite_differences(prog, seed, H):
    """A forward with norm('c', v): the derived stages, chained through the row's layer
    norm, give the finite-difference gradient of the reference step over the row."""
    d = prog.derive()
    assert d.forward2 is not None and d.normalize == ("c",)
    rng = np.random.default_rng(seed)
    rows = [random_inputs(rng, prog.gates, prog.state, prog.recurrent, prog.params)
            for _ in range(H)]

    # the reference with an identity norm is the Python forward, element by element
    ident = d.reference(*_row_arrays(rows, prog), norm=lambda _n, z: z)
    for j, r in enumerate(rows):
        want = prog.fn(*args_of(*r[:4]), lambda _n, z: z)
        assert all(relclose(float(ident[s][0, j]), want[s], 1e-12) for s in range(prog.state))

    bad = _row_gradient_mismatches(prog, d, seed, H)
    assert not bad, f"(index, derived, finite difference) {bad}\n{prog.source}\n{d.source}"


def _unit_from_parts(parts, prog):
    k = 0
    xw = parts[k]
    k += 1
    hu = None
    if prog.recurrent:
        hu = parts[k]
        k += 1
    prev = parts[k]
    return xw, hu, prev, tuple(parts[k + 1:]), None


def _row_arrays(rows, prog):
    """Arguments of the NumPy reference for one row of units: [1, H] arrays, params [H]."""
    def stack(pick, n):
        return tuple(np.array([[pick(r)[k] for r in rows]]) for k in range(n))
    out = [stack(lambda r: r[0], prog.gates)]
    if prog.recurrent:
        out.append(stack(lambda r: r[1], prog.gates))
    out.append(stack(lambda r: r[2], prog.state))
    for i, n in enumerate(prog.params):
        out.append(tuple(np.array([r[3][i][k] for r in rows]) for k in range(n)))
    return out


def _derived_two_stage(d, rows, gain, bias):
    """Per unit, the derived gradients (dxw, [dhu,] dprev, *dparams) through both stages
    (every normalised value uses the same gain and bias here)."""
    firsts = [d.forward(*args_of(*r[:4])) for r in rows]
    Z = np.array([z for z, _ in firsts])  # [H, NZ]
    ZN = np.stack([reference_norm(Z[:, k], gain, bias) for k in range(Z.shape[1])], axis=1)
    b2s = []
    for j, r in enumerate(rows):
        _, _, prev, params, dstate = r
        zn, mid = tuple(float(v) for v in ZN[j]), firsts[j][1]
        _, saved = d.forward2(zn, mid, prev, *params)
        b2s.append(d.backward2(saved, zn, mid, prev, dstate, *params))
    dZN = np.array([b[0] for b in b2s])
    dZ = np.stack([_layer_norm_backward(Z[:, k], dZN[:, k], gain, "layer")
                   for k in range(Z.shape[1])], axis=1)
    out = []
    for j, r in enumerate(rows):
        _, hu, prev, params, _ = r
        b1 = d.backward(firsts[j][1], prev, tuple(float(v) for v in dZ[j]), b2s[j][1],
                        *params)
        n_in = 2 if hu is not None else 1
        summed = [tuple(a + b for a, b in zip(g1, g2)) for g1, g2 in zip(b1[n_in:], b2s[j][2:])]
        out.append(list(b1[:n_in]) + summed)
    return out


def _row_gradient_mismatches(prog, d, seed, H):
    """Derived gradients of a two-stage step over a row against finite differences of the
    derived reference with the row's layer norm."""
    rng = np.random.default_rng(seed)
    gain, bias = rng.uniform(0.5, 1.5, H), rng.uniform(-0.5, 0.5, H)
    rows = [random_inputs(rng, prog.gates, prog.state, prog.recurrent, prog.params)
            for _ in range(H)]
    dstate = np.array([r[4] for r in rows])  # [H, S]
    layout = _layout(prog)

    def L(x):
        per_unit = np.array(x).reshape(H, -1)
        unit_rows = []
        for j in range(H):
            k, parts = 0, []
            for n in layout:
                parts.append(tuple(per_unit[j, k:k + n]))
                k += n
            unit_rows.append(_unit_from_parts(parts, prog))
        new = d.reference(*_row_arrays(unit_rows, prog),
                          lambda _name, z: reference_norm(z, gain, bias))
        return float(sum((dstate[:, s] * new[s][0]).sum() for s in range(prog.state)))

    result = _derived_two_stage(d, rows, gain, bias)
    x, grads = [], []
    for j, r in enumerate(rows):
        x += [v for a in args_of(*r[:4]) for v in a]
        grads += [v for g in result[j] for v in g]
    return fd_mismatches(L, x, grads)


def f_two_norms(xw, hu, prev, p, norm):
    i = sigmoid(xw[0] + hu[0])
    g = tanh(xw[1] + hu[1])
    c = prev[1] * sigmoid(xw[2] + hu[2] + p[0]) + i * g
    d = norm("d", g * prev[0])
    return (tanh(norm("c", c)) * (1.0 + d) * i, c)


@pytest.mark.parametrize("recompute", [True, False])
def test_two_normalised_values_match_finite_differences(recompute):
    """Two norm calls (in an order other than the declared one), a per-unit parameter:
    mid holds what stage 2 reads and stage 1's backward needs, not the values that are
    only normalised."""
    from derive_helpers import Program

    prog = Program("", 3, 2, True, (1,), True, fn=f_two_norms)
    d = derive(f_two_norms, name="two_norms", gates=3, state=2, params=(1,),
               normalize=("c", "d"), recompute=recompute)
    assert d.normalize == ("c", "d")
    if recompute:
        assert d.mid == ("i", "g", "sigmoid2", "c") and d.saved == ("tanh_norm_c",)
    for seed in range(3):
        assert not _row_gradient_mismatches(prog, d, seed, 4), d.source


# -- compiled: Numba CPU, CUDA PTX ----------------------------------------------------------


def _compiled_calls(d, prog, dtype, seed):
    """Each derived function's driver (compiled for ``dtype``) with its Python inputs and
    results from a consistent chain of calls."""
    rng = np.random.default_rng(seed)
    for name, fn, args, result in chain(d, prog, rng):
        run = make_driver(compile_scalar(fn, dtype), args, result)
        yield name, run, args, result


@settings(max_examples=4, deadline=None)
@given(prog=programs(norm=False) | programs(norm=True), seed=st.integers(0, 2**32 - 1))
def test_random_forward_compiles_with_numba(prog, seed):
    """float64: the compiled math gives the Python values; float32: it stays in float32."""
    d = prog.derive()
    for dtype in (np.float64, np.float32):
        for name, run, args, result in _compiled_calls(d, prog, dtype, seed):
            inp = np.array([v for a in args for v in a] or [0.0], dtype=dtype)
            want = flat(result)
            out = np.zeros(max(1, len(want)), dtype=dtype)
            numba.njit(run)(inp, out)
            if dtype == np.float64:
                for a, b in zip(out, want):
                    assert relclose(float(a), b, 1e-12), (name, out, want, d.source)
            else:
                _assert_float32_only(compile_scalar(getattr(d, name), dtype), args, name)
                scale = 1.0 + max([abs(v) for v in inp] + [abs(v) for v in want])
                for a, b in zip(out, want):  # the same math, rounded to float32
                    assert abs(float(a) - b) <= 1e-3 * scale, (name, out, want, d.source)


def _assert_float32_only(fn, args, name):
    types = tuple(numba.types.UniTuple(numba.float32, len(a)) if a else numba.types.Tuple(())
                  for a in args)
    ns = {"fn": fn}
    names = ", ".join(f"a{i}" for i in range(len(args)))
    exec(f"def call({names}):\n    return fn({names})\n", ns)
    jit = numba.njit(ns["call"])
    jit.compile(types)
    rtype = jit.overloads[types].signature.return_type
    members = [m for part in rtype.types for m in
               (part.types if hasattr(part, "types") else (part.dtype,) * part.count)]
    assert all(m == numba.float32 for m in members), f"{name} returns {rtype}"


def _nvvm():
    try:
        from numba import cuda

        from kernrnn.backends.cuda import SIMULATOR
        if SIMULATOR:
            return None
        cuda.compile_ptx(lambda a: None, "void(float32[:])", cc=(9, 0))
        return cuda
    except Exception:  # noqa: BLE001 - no numba-cuda or no NVVM here
        return None


CUDA = _nvvm()
needs_nvvm = pytest.mark.skipif(CUDA is None, reason="NVVM (numba-cuda[cu12]) not available")
F64 = re.compile(r"\.f64\b")


def _ptx_f64_lines(d, prog, seed):
    hits = {}
    for name, run, _args, _result in _compiled_calls(d, prog, np.float32, seed):
        ptx, _ = CUDA.compile_ptx(run, "void(float32[:], float32[:])", cc=(9, 0))
        lines = [ln.strip() for ln in ptx.splitlines() if F64.search(ln)]
        if lines:
            hits[name] = lines[:3]
    return hits


@needs_nvvm
@settings(max_examples=3, deadline=None)
@given(prog=programs(norm=False) | programs(norm=True), seed=st.integers(0, 2**32 - 1))
def test_random_forward_float32_ptx_has_no_f64(prog, seed):
    d = prog.derive()
    assert not _ptx_f64_lines(d, prog, seed), d.source


def every_function(xw, hu, prev, q):
    """Every supported operation once (for the PTX check)."""
    a = xw[0] + hu[0]
    b = math.sin(a) * math.cos(xw[1]) + math.erf(hu[1]) - math.fabs(prev[0]) ** 2
    c = math.exp(tanh(a)) + math.log(1.0 + b * b) + math.sqrt(0.5 + a * a) + relu(-b)
    m = min(a, b, q[0]) + max(c, abs(a)) + (a if a > b and not c <= 0.25 else -b)
    return (sigmoid(m) * prev[0] / (1.5 + c * c),)


@needs_nvvm
def test_every_operation_float32_ptx_has_no_f64():
    from derive_helpers import Program

    prog = Program("", 2, 1, True, (1,), False, fn=every_function)
    d = prog.derive()
    assert not _ptx_f64_lines(d, prog, 0), d.source


# -- float32 sin, cos and tan ----------------------------------------------------------------


def _trig(x):
    """math.sin/cos/tan as a hand-written cell calls them: kernrnn.scalar compiles them as
    kernrnn.scalar_math's float32 versions in float32."""
    return math.sin(x), math.cos(x), math.tan(x)


@pytest.mark.parametrize("limit, tol", [(4.0, 2e-7), (1e4, 2e-7), (1e5, 2e-6)])
def test_float32_sin_cos_accuracy(limit, tol):
    trig32 = compile_scalar(_trig, np.float32)

    @numba.njit
    def run(xs, s, c, t):
        for i in range(xs.size):
            s[i], c[i], t[i] = trig32(xs[i])

    xs = np.random.default_rng(0).uniform(-limit, limit, 200_000).astype(np.float32)
    xs[:6] = [0.0, -0.0, np.pi / 2, np.pi, -np.pi / 4, 3 * np.pi / 2]
    s, c, t = np.empty_like(xs), np.empty_like(xs), np.empty_like(xs)
    run(xs, s, c, t)
    x64 = xs.astype(np.float64)
    assert np.abs(s - np.sin(x64)).max() <= tol
    assert np.abs(c - np.cos(x64)).max() <= tol
    tan64 = np.tan(x64)  # an argument error e moves tan by e (1 + tan^2)
    assert np.all(np.abs(t - tan64) <= 2 * tol * (1 + tan64 * tan64))
    s, c, t = np.empty(2, np.float32), np.empty(2, np.float32), np.empty(2, np.float32)
    run(np.array([np.nan, np.inf], np.float32), s, c, t)
    assert np.isnan(s).all() and np.isnan(c).all() and np.isnan(t).all()


@needs_nvvm
def test_float32_sin_cos_ptx_has_no_f64():
    helpers = compile_scalar(scalar_math.sin, np.float32), compile_scalar(scalar_math.cos,
                                                                          np.float32)
    s32, c32 = helpers
    trig32 = compile_scalar(_trig, np.float32)

    def kernel(a):
        a[0] = s32(a[0]) + c32(a[1])
        s, c, t = trig32(a[2])
        a[3] = s + c + t

    ptx, _ = CUDA.compile_ptx(kernel, "void(float32[:])", cc=(9, 0))
    assert not F64.search(ptx)


# -- constructs outside the supported set ------------------------------------------------------

LABEL = "not a number"


def _recursive(a):
    return _recursive(a - 1.0)  # !


def _kw(a, b):
    return a * b


def bad_for(xw, hu, prev):
    h = prev[0]
    for k in range(2):  # !
        h = h + xw[k]
    return (h,)


def bad_while(xw, hu, prev):
    h = prev[0]
    while h > 0:  # !
        h = h - 1.0
    return (h,)


def bad_if(xw, hu, prev):
    h = xw[0]
    if h > 0:  # !
        h = -h
    return (h,)


def bad_list(xw, hu, prev):
    v = [xw[0], hu[0]]  # !
    return (v[0],)


def bad_dict(xw, hu, prev):
    v = {"a": xw[0]}  # !
    return (v["a"],)


def bad_comprehension(xw, hu, prev):
    return ([x * 2.0 for x in xw][0],)  # !


def bad_unknown_call(xw, hu, prev):
    return (print(xw[0]),)  # !


def bad_numpy_call(xw, hu, prev):
    return (np.exp(xw[0]),)  # !


def bad_attribute(xw, hu, prev):
    a = xw[0]
    return (a.real,)  # !


def bad_index(xw, hu, prev):
    k = 1
    return (xw[k],)  # !


def bad_global(xw, hu, prev):
    return (xw[0] * LABEL,)  # !


def bad_recursion(xw, hu, prev):
    return (_recursive(xw[0]),)


def bad_power(xw, hu, prev):
    return (xw[0] ** 0.5,)  # !


def bad_keyword(xw, hu, prev):
    return (_kw(xw[0], b=hu[0]),)  # !


def bad_old_style(xw, hu, prev):  # !
    h = tanh(xw[0] + hu[0])
    return (h,), (h,)


def bad_arity(xw, prev):  # !
    return (xw[0],)


def bad_middle_return(xw, hu, prev):
    return (xw[0],)  # !
    h = hu[0]  # noqa: F841 - unreachable on purpose


def bad_condition_as_number(xw, hu, prev):
    return ((xw[0] > hu[0]) * 2.0,)  # !


def bad_truthiness(xw, hu, prev):
    return (xw[0] if hu[0] else prev[0],)  # !


def bad_undefined(xw, hu, prev):
    return (xw[0] * undefined_name,)  # noqa: F821  # !


def bad_nested_norm(xw, hu, prev, norm):
    a = norm("c", xw[0] + hu[0])
    b = norm("d", a * prev[0])  # !
    return (b,)


def bad_norm_name(xw, hu, prev, norm):
    return (norm("h", xw[0]),)  # !


def bad_try(xw, hu, prev):
    try:  # !
        h = xw[0]
    except ValueError:
        h = hu[0]
    return (h,)


def bad_string(xw, hu, prev):
    return (xw[0] * "2",)  # !


def bad_item_assignment(xw, hu, prev):
    xw[0] = hu[0]  # !
    return (xw[0],)


BAD = [
    (bad_for, "a for loop", {}), (bad_while, "a while loop", {}),
    (bad_if, "an if statement", {}), (bad_list, "a list", {}), (bad_dict, "a dict", {}),
    (bad_comprehension, "a list comprehension", {}),
    (bad_unknown_call, "the call of print", {}),
    (bad_numpy_call, "the NumPy function np.exp is not supported in a forward to "
     "differentiate (use math.exp)", {}),
    (bad_attribute, "the attribute 'a.real'", {}), (bad_index, "the index 'k'", {}),
    (bad_global, "'LABEL' is a str, not a number", {}),
    (bad_recursion, "calls itself (recursion)", {}), (bad_power, "the power", {}),
    (bad_keyword, "keyword or starred arguments", {}),
    (bad_old_style, "returns nested tuples", {}),
    (bad_arity, "the forward takes 2 arguments", {}),
    (bad_middle_return, "a return before the last statement", {}),
    (bad_condition_as_number, "is a condition where a number is needed", {}),
    (bad_truthiness, "must be a comparison", {}),
    (bad_undefined, "'undefined_name' is not defined", {}),
    (bad_nested_norm, "normalises a value computed from another normalised value",
     {"normalize": ("c", "d")}),
    (bad_norm_name, "norm('h', ...) but the cell normalises ('c',)", {"normalize": ("c",)}),
    (bad_try, "a try statement", {}), (bad_string, "the constant '2'", {}),
    (bad_item_assignment, "assignment to an item", {}),
]


@pytest.mark.parametrize("fn, construct, kw", BAD, ids=[b[0].__name__ for b in BAD])
def test_unsupported_construct_names_cell_line_and_construct(fn, construct, kw):
    lines, first = inspect.getsourcelines(_recursive if fn is bad_recursion else fn)
    (offset,) = [i for i, line in enumerate(lines) if line.rstrip().endswith("# !")]
    lineno, text = first + offset, lines[offset].strip()
    kw = dict(kw)
    normalize = kw.pop("normalize", ())
    with pytest.raises(CellError) as info:
        derive(fn, name="bad_cell", gates=2, state=1, normalize=normalize, **kw)
    msg = str(info.value)
    assert msg.startswith("cell 'bad_cell': "), msg
    assert f"test_derive.py line {lineno}: {text!r}" in msg, msg
    assert construct in msg, msg


def test_lambda_and_compiled_forwards_are_rejected():
    with pytest.raises(CellError, match="cell 'lam'.*lambda"):
        derive(lambda xw, hu, prev: (xw[0],), name="lam", gates=1)
    with pytest.raises(CellError, match="cell 'jit'.*plain Python function"):
        derive(numba.njit(FORWARDS["rnn"]), name="jit", gates=1)


# -- forms of writing a step -------------------------------------------------------------------

SCALE = 0.5


def _gate_pair(a, b):
    """A helper returning a tuple, itself calling a helper."""
    return sigmoid(a), _squash(b)


def _squash(x):
    return x / (1.0 + math.fabs(x))


def f_forms(xw, hu, prev, q):
    h, c = prev
    i, g = _gate_pair(xw[0] + hu[0], xw[1] + hu[1])
    c2: float = c * SCALE + i * g * math.pi / 4
    c2 += q[-1] * h
    lo = min(c2, h, -0.5)
    mid = 1.0 if 0.0 < c2 < 1.0 or not h > lo else -c2 ** 3
    c2 = +c2 - -lo * mid ** 1 + math.cos(-h) * h ** 0
    return (math.sin(c2) * math.sqrt(1.0 + g * g), c2)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_supported_forms_match_finite_differences(seed):
    """Unpacking a tuple argument, helpers returning tuples, annotated and augmented
    assignments, module constants and math.pi, negative indices, chained comparisons with
    and/or/not, min of three, unary plus, powers 0, 1, 3."""
    from derive_helpers import Program

    prog = Program("", 2, 2, True, (2,), False, fn=f_forms)
    d = prog.derive()
    rng = np.random.default_rng(seed)
    for _ in range(5):
        xw, hu, prev, params, dstate = random_inputs(rng, 2, 2, True, (2,))
        args = args_of(xw, hu, prev, params)
        new, saved = d.forward(*args)
        assert all(relclose(a, b, 1e-14) for a, b in zip(new, f_forms(*args)))
        grads = [v for g in d.backward(saved, prev, dstate, *params) for v in g]
        x = [v for a in args for v in a]
        assert not fd_mismatches(_loss(prog, dstate, _layout(prog)), x, grads), d.source


# -- the derived math as a Cell (what phase 2 wires in) ----------------------------------------


def _as_cell(name, **changes):
    """A Cell of the contract built from the derived math and reference of shipped ``name``."""
    from kernrnn.cell import Cell

    ref = get_registry().get(name)
    d = derived(name)
    return Cell(f"derived_{name}", ref.gates, forward=d.forward, backward=d.backward,
                reference=d.reference, forward2=d.forward2, backward2=d.backward2,
                state=ref.state, params=ref.params, recurrent=ref.recurrent, heads=ref.heads,
                input_norm=ref.input_norm, recurrent_norm=ref.recurrent_norm,
                normalize=ref.normalize, normalize_kind=ref.normalize_kind,
                state_sampler=ref.state_sampler, linear=ref.linear, raw_input=ref.raw_input,
                **changes)


# (a cell with hyperparameters takes a derived backward only: its own registration runs the
# same validation on the derived math, with its hyperparameters)
@pytest.mark.parametrize("name", [n for n in HANDS if not get_registry().get(n).hyper])
def test_derived_math_passes_cell_validation(name):
    """Cell validation (contract sizes, forward against the derived reference, linearity)
    accepts the derived functions unchanged; plain cells keep the dxw == dhu fast path."""
    from kernrnn.backends.cpu import same_input_and_recurrent_grads

    cell = _as_cell(name)
    d = derived(name)
    assert cell.n_saved == d.n_saved and cell.n_mid == d.n_mid
    if cell.plain:
        assert same_input_and_recurrent_grads(cell) == all(d.same_grads)


@pytest.mark.parametrize("name", ["lstm_ln", "slstm", "lstm_peephole"])
def test_derived_math_compiles_as_cell_math(name):
    """kernrnn.scalar's per-cell check (the contract's tuple sizes, every value in the
    kernel's precision, float32 leak finder) passes for the derived functions."""
    from kernrnn.scalar import check_cell_compiles, find_precision_leaks

    cell = _as_cell(name)
    for dtype in (np.float32, np.float64):
        check_cell_compiles(cell, dtype)
    for which, sizes, _ in cell.math_signatures():
        types = tuple(numba.types.UniTuple(numba.float32, n) if n else numba.types.Tuple(())
                      for n in sizes)
        assert not find_precision_leaks(getattr(cell, which), np.float32, types), which


def test_derived_two_stage_cell_trains_through_the_layer():
    """One layer-level check: the derived LayerNorm LSTM's kernels (CPU, float64) give the
    finite-difference gradients of the derived reference (layers, directions, lengths)."""
    from kernrnn.testing.conformance import gradient_errors, random_problem

    cell = _as_cell("lstm_ln")
    p = random_problem(np.random.default_rng(1), cell=cell, max_T=3, max_B=2, max_I=3, max_H=4)
    gradient_errors(cell, p)  # raises ConformanceError naming the tensor
