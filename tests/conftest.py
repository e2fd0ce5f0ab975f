"""Shared fixtures: tiny ds4-layout models generated once per test session, and the reference-package rule.

Under DS4_REQUIRE_REFS=1 (set by .ci/run) a test whose independent reference package is missing fails instead
of skipping; only GPU tests may skip there.
"""

from __future__ import annotations

import importlib
import os

import pytest

from ds4d import _cpu
from ds4d.tiny import make_tiny


def require(module: str):
    """Import a reference package, or skip (fail under DS4_REQUIRE_REFS=1) when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("DS4_REQUIRE_REFS") == "1":
            pytest.fail(f"reference package {module!r} is required (DS4_REQUIRE_REFS=1) but not installed")
        pytest.skip(f"reference package {module!r} not installed")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(params=_cpu.available_isas())
def isa(request):
    """Run a test once per instruction-set level of the native CPU kernels that this machine supports."""
    before = _cpu.isa()
    _cpu.set_isa(request.param)
    yield request.param
    _cpu.set_isa(before)


_cache: dict[tuple, str] = {}


@pytest.fixture(scope="session")
def tiny_model(model_dir):
    """tiny_model(variant="f32", **shape_overrides) -> path of a generated model (made once per session)."""
    def make(variant: str = "f32", seed: int = 0, **overrides) -> str:
        key = (variant, seed, tuple(sorted(overrides.items())))
        if key not in _cache:
            name = "-".join([variant, str(seed)] + [f"{k}{v}" for k, v in sorted(overrides.items())])
            path = model_dir / f"tiny-{name}.gguf"
            make_tiny(path, variant, seed=seed, **overrides)
            _cache[key] = str(path)
        return _cache[key]
    return make


# --- a real daemon for the client's tests -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def spawn_ds4d(tiny_model):
    """spawn_ds4d(*serve_args, home=None, **kw) -> a running `ds4d serve` with the tiny q2 model, through
    tests/daemon_harness.py (`Daemon`: XDG dirs and the socket under `home`, a fresh short /tmp directory by
    default). Every daemon started through it is killed, and its fresh home removed, when the module is done."""
    import shutil

    from daemon_harness import Daemon, short_home

    started: list[tuple[Daemon, bool]] = []

    def spawn(*args: str, home=None, **kw) -> Daemon:
        d = Daemon(home or short_home(), tiny_model("q2"), *args, **kw)
        started.append((d, home is None))
        return d

    yield spawn
    for d, _ in started:
        d.kill()
    for d, fresh in started:
        if fresh:
            shutil.rmtree(d.home, ignore_errors=True)
