"""Development sessions: ``nox -s tests|cudasim|lint|docs|bench|gpu``.

``nox`` alone runs tests, lint and docs.  Arguments after ``--`` are passed
to the tool (pytest, ruff, sphinx-build, ``kernrnn bench``, the GPU script).
"""

import nox

nox.options.sessions = ["tests", "lint", "docs"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = False


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test-suite, installed as the README's test command does."""
    session.install("-e", ".[test,cudasim,train]", "torch==2.13.0")
    session.run("python", "-m", "pytest", "-n", "auto", "--dist", "loadfile", *session.posargs)


@nox.session
def cudasim(session: nox.Session) -> None:
    """Tests of the CUDA kernels under Numba's CUDA simulator (no GPU needed).

    Only the tests marked ``cudasim``.  They set ``NUMBA_ENABLE_CUDASIM=1``
    themselves (in a subprocess: the variable must be set before ``numba.cuda``
    is imported, while the PTX compile check needs the real target), exactly as
    under a plain ``pytest``.
    """
    session.install("-e", ".[test,cudasim,train]")
    session.run("python", "-m", "pytest", "-m", "cudasim", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff, configured in pyproject.toml."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Sphinx HTML in docs/_build/html; warnings are errors, every reference must resolve."""
    session.install("-e", ".[docs,test,train]", "torch==2.13.0")
    session.run(
        "sphinx-build", "-W", "-n", "--keep-going", "-b", "html",
        "docs", "docs/_build/html", *session.posargs,
    )


@nox.session
def bench(session: nox.Session) -> None:
    """CPU benchmark, kernrnn vs PyTorch in the same process (``kernrnn bench``)."""
    session.install("-e", ".[bench]")
    session.run("kernrnn", "bench", *session.posargs)


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """GPU checks and benchmark in the current environment (CuPy, numba-cuda, PyTorch).

    ``benchmarks/gpu.py`` is a script of the checkout, not of the installed
    package; nox runs it from the repository root, where ``benchmarks`` imports.
    """
    session.run("python", "-m", "benchmarks.gpu", *session.posargs)
