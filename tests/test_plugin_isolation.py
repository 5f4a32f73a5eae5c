"""Broken third-party plugins fail alone; compile checks flag math GPUs cannot compile.

Each broken plugin is a real installed-looking distribution on ``sys.path``.
"""

from __future__ import annotations

import textwrap
import warnings

import pytest
from test_plugins import FIXTURES, make_distribution

from kernrnn.cell import Cell
from kernrnn.cli import main
from kernrnn.plugins import STRICT_ENV, PluginError, PluginWarning, load_registry
from kernrnn.testing import CompileCheckError, check_compiles
from kernrnn.testing.compiles import gpu_math_problems

GOOD = ("kernrnn-good", {"good": "good_mod"}, {"good_mod": (FIXTURES / "mgu_cells.py").read_text()})
HOOK = "from kernrnn.cell import hookimpl\n"
BROKEN = {
    "import": {"imp_mod": "import not_a_module_anywhere_xyz\n"},
    "unknown hook": {"typo_mod": HOOK + "@hookimpl\ndef kernrnn_register_cell(registry):\n"
                                        "    pass\n"},
    "raises": {"raise_mod": HOOK + "@hookimpl\ndef kernrnn_register_cells(registry):\n"
                                   "    raise RuntimeError('boom')\n"},
    "taken name": {"dup_mod": HOOK + "from kernrnn_cells.lstm import LSTM\n@hookimpl\n"
                                     "def kernrnn_register_cells(registry):\n"
                                     "    registry.add(LSTM)\n"},
    "not a cell": {"junk_mod": HOOK + "@hookimpl\ndef kernrnn_register_cells(registry):\n"
                                      "    registry.add('lstm')\n"},
    # a good cell first, then a bad one: the plugin is skipped as a whole
    "half good": {"half_mod": HOOK + "from cuda_test_cells import LINEAR\n@hookimpl\n"
                                     "def kernrnn_register_cells(registry):\n"
                                     "    registry.add(LINEAR)\n    registry.add(None)\n"},
}
REASONS = {"import": "could not be loaded", "unknown hook": "unknown hook",
           "raises": "RuntimeError: boom", "taken name": "'lstm' is registered twice",
           "not a cell": "expected a kernrnn.cell.Cell", "half good": "expected a kernrnn.cell.Cell"}


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """Install the good plugin and every broken one; lenient mode unless a test says otherwise."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(STRICT_ENV, "0")
    monkeypatch.delenv("KERNRNN_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    make_distribution(tmp_path, *GOOD)
    for i, (_case, modules) in enumerate(BROKEN.items()):
        make_distribution(tmp_path, f"kernrnn-broken{i}", {f"broken{i}": next(iter(modules))},
                          modules)
    return {f"broken{i}": case for i, case in enumerate(BROKEN)}


def test_each_broken_plugin_is_skipped_alone(installed):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = load_registry()
    # built-in cells and the good plugin's cell work; nothing of a broken plugin got in
    builtin = {name for name in load_registry(autoload=False).names()}
    assert builtin | {"test_mgu"} == set(reg.names())
    assert reg.source("lstm").plugin == "kernrnn_cells.lstm"
    skipped = {s.source.plugin: s for s in reg.skipped}
    assert set(skipped) == set(installed)
    for plugin, case in installed.items():
        assert REASONS[case] in skipped[plugin].reason, skipped[plugin]
        dist = skipped[plugin].source.distribution
        msgs = [str(w.message) for w in caught if issubclass(w.category, PluginWarning)
                and f"plugin {plugin!r} from distribution {dist!r}" in str(w.message)]
        assert len(msgs) == 1 and "\n" not in msgs[0], msgs


def test_strict_mode_turns_a_skip_into_an_error(installed, monkeypatch):
    monkeypatch.setenv(STRICT_ENV, "1")
    with pytest.raises(PluginError, match=r"plugin 'broken\d' from distribution"):
        load_registry()


def test_cli_lists_skipped_plugins_and_still_trains(installed, tmp_path, capsys, fresh_registry):
    assert main(["cells"]) == 0
    out = capsys.readouterr().out
    table, _, skipped = out.partition("skipped plugins")
    assert "test_mgu" in table and "minimal gated unit" in table  # the description column
    for plugin, case in installed.items():
        assert any(line.strip().startswith(plugin) and REASONS[case] in line
                   for line in skipped.splitlines())
    # the default LSTM trains although broken plugins are installed
    rc = main(["train", "--epochs", "1", "--hidden", "4", "--no-progress", "--no-plot",
               "--out", str(tmp_path / "run")])
    assert rc == 0
    assert (tmp_path / "run" / "checkpoint.npz").exists()


def test_cli_in_strict_mode_reports_one_error_line(installed, monkeypatch, capsys,
                                                   fresh_registry):
    monkeypatch.setenv(STRICT_ENV, "1")
    assert main(["cells"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "kernrnn cells: error: plugin 'broken" in err


def test_module_without_hooks_is_warned_about(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    make_distribution(tmp_path, "kernrnn-nohook", {"nohook": "nohook_mod"}, {"nohook_mod": """
        def kernrnn_register_cells(registry):  # @hookimpl forgotten
            pass
        """})
    with pytest.warns(PluginWarning, match=r"plugin 'nohook' from distribution 'kernrnn-nohook "
                                           r"0.1' implements no kernrnn hook .*@hookimpl"):
        reg = load_registry()
    assert not reg.skipped and "nohook" not in reg.names()


# -- math the GPU cannot compile -----------------------------------------------------------


def _cell(tmp_path, name, body, imports=""):
    """A cell whose forward is ``body`` (an expression of xw, hu, prev), defined in a real file."""
    mod = tmp_path / f"{name}_math.py"
    mod.write_text(textwrap.dedent(f"""
        import math
        import numpy as np
        {imports}

        def fwd(xw, hu, prev):
            a = xw[0] + hu[0]
            return ({body},), ()

        def bwd(saved, prev, ds):
            return (ds[0],), (ds[0],), (0.0,)
        """))
    ns = {}
    exec(compile(mod.read_text(), str(mod), "exec"), ns)
    return Cell(name, gates="a", forward=ns["fwd"], backward=ns["bwd"],
                reference=lambda xw, hu, prev: (xw[0] + hu[0],), description=name)


@pytest.mark.parametrize("name,body,imports,expect", [
    ("npexp", "np.exp(a) * 0 + a", "", "NumPy function np.exp"),
    ("lists", "[a, a][0]", "", "builds a list"),
    ("scipyfn", "expit(a) * 0 + a", "from scipy.special import expit", "SciPy function expit"),
    ("printer", "a if print(a) is None else a", "", "builtin print()"),
])
def test_gpu_incompatible_math_is_flagged_with_its_line(tmp_path, name, body, imports, expect):
    cell = _cell(tmp_path, name, body, imports)
    problems = gpu_math_problems(cell)
    assert problems and expect in problems[0], problems
    line = 8  # the `return` line of fwd in the generated file
    assert f"{name}_math.py line {line}" in problems[0]
    with pytest.raises(CompileCheckError) as info:
        check_compiles(cell, dtypes=("float64",), cpu=False, cuda=False)
    assert any(expect in f for f in info.value.report.failures)


def test_plain_math_passes_the_static_check(tmp_path):
    cell = _cell(tmp_path, "plain", "a + 0 * (math.tanh(a) + abs(a) + np.float64(1) * max(a, 0.0))")
    assert gpu_math_problems(cell) == []


def test_check_compiles_compiles_cpu_kernels_of_a_good_cell():
    from cuda_test_cells import LINEAR

    report = check_compiles(LINEAR, cuda=False)
    assert report.ok and "CPU kernels" in report.checked
    assert any("CUDA PTX" in s for s in report.skipped) or not report.skipped


def test_float32_leak_message_names_the_line(tmp_path):
    cell = _cell(tmp_path, "leaky", "a + math.pi * 0")
    with pytest.raises(CompileCheckError) as info:
        check_compiles(cell, dtypes=("float32",), cpu=False, cuda=False)
    text = str(info.value)
    assert "leaky_math.py line 8: 'return (a + math.pi * 0,), ()'" in text and "math.pi" in text


def _nvvm_missing() -> bool:
    from cuda_test_cells import nvvm_missing_locally

    return nvvm_missing_locally()


@pytest.mark.skipif(_nvvm_missing(), reason="NVVM not found: the PTX check needs numba-cuda")
def test_float64_instructions_in_float32_ptx_are_traced_to_their_line(tmp_path):
    """A float32 kernel whose PTX holds float64 code: the failure names the cell's function
    and line, not only the PTX (``.reg .f64 %fd<5>;``)."""
    cell = _cell(tmp_path, "wide", "a if np.float64(a) / 3.0 > -1.0 else -a")
    with pytest.raises(CompileCheckError) as info:
        check_compiles(cell, dtypes=("float32",), cpu=False, cuda=True)
    ptx = [f for f in info.value.report.failures if f.startswith("CUDA kernel")]
    assert ptx, info.value.report.failures
    assert "wide_math.py line 8: 'return (a if np.float64(a) / 3.0 > -1.0 else -a,), ()'" \
        in ptx[0], ptx[0]


@pytest.mark.skipif(_nvvm_missing(), reason="NVVM not found: the PTX check needs numba-cuda")
def test_math_sin_cos_tan_stay_float32_in_a_hand_written_cell(tmp_path):
    """kernrnn.scalar compiles math.sin/cos/tan as kernrnn.scalar_math's float32 versions:
    CUDA's own float32 sinf/cosf/tanf hold float64 instructions."""
    cell = _cell(tmp_path, "trig", "a + 0 * (math.sin(a) + math.cos(a) + math.tan(a))")
    report = check_compiles(cell, dtypes=("float32",), cpu=False, cuda=True)
    assert report.ok and "CUDA PTX (sm_90)" in report.checked


def test_cells_check_exits_nonzero_for_a_gpu_incompatible_plugin(tmp_path, monkeypatch, capsys,
                                                                 fresh_registry):
    monkeypatch.syspath_prepend(str(tmp_path))
    make_distribution(tmp_path, "kernrnn-npexp", {"npexp": "npexp_mod"}, {"npexp_mod": """
        import numpy as np
        from kernrnn.cell import Cell, hookimpl

        def fwd(xw, hu, prev):
            return (np.tanh(xw[0] + hu[0]),), ()

        def bwd(saved, prev, ds):
            return (ds[0],), (ds[0],), (0.0,)

        def ref(xw, hu, prev):
            return (np.tanh(xw[0] + hu[0]),)

        @hookimpl
        def kernrnn_register_cells(registry):
            registry.add(Cell("npexp", gates="a", forward=fwd, backward=bwd, reference=ref,
                              description="tanh via NumPy"))
        """})
    rc = main(["cells", "--check", "npexp", "rnn"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "check npexp: FAILED" in out and "NumPy function np.tanh" in out
    assert "check rnn: ok" in out
    assert "1 of 2 cells failed the compile check: npexp" in err


def test_layer_refuses_a_float32_leak_naming_line_and_constant(tmp_path):
    import kernrnn
    from kernrnn.cell import CellError

    cell = _cell(tmp_path, "leak2", "a + math.e * 0")
    with pytest.raises(CellError) as info:
        kernrnn.RNN(cell, 2, 3)
    msg = str(info.value)
    assert "must be a float32 scalar" in msg
    assert "leak2_math.py line 8: 'return (a + math.e * 0,), ()' gives float64 (from math.e)" in msg


def test_ptx_check_skips_a_kernel_that_needs_a_missing_cuda_library(monkeypatch):
    """`kernrnn cells --check` must not call a shipped cell broken because this machine
    lacks the CUDA driver (or NVVM) that compiling one of its kernels asks for: the
    PTX part is skipped with the reason, unless it was explicitly requested."""
    cuda = pytest.importorskip("numba.cuda")
    from numba.cuda.cudadrv.error import CudaSupportError

    from kernrnn.testing import compiles

    monkeypatch.setattr(compiles, "ptx_unavailable_reason", lambda: None)

    def compile_ptx(kernel, sig, cc=None):
        raise CudaSupportError("Error at driver init: CUDA driver library cannot be found")

    monkeypatch.setattr(cuda, "compile_ptx", compile_ptx)
    report = check_compiles("mingru", dtypes=("float32",), cpu=False)
    assert report.ok and "CUDA PTX (sm_90)" not in report.checked
    assert any("CUDA PTX" in s and "driver library cannot be found" in s
               for s in report.skipped), report.skipped
    with pytest.raises(CompileCheckError, match="requested but impossible"):
        check_compiles("mingru", dtypes=("float32",), cpu=False, cuda=True)
