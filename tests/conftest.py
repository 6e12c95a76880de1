"""Shared test set-up.

The whole suite runs with 8 simulated CPU devices so mesh tests and single-device tests share one
process (and one set of compiled functions); single-device code simply uses device 0.
"""

from __future__ import annotations

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_EM = REPO.parent / "shared" / "data" / "em"


@pytest.fixture(scope="session")
def shared_em() -> Path:
    """../shared/data/em beside the checkout; tests that need it skip when it is absent."""
    if not SHARED_EM.is_dir():
        pytest.skip(f"shared EM data not found at {SHARED_EM} (it lies beside the checkout in CI)")
    return SHARED_EM


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """HF directory of the embedded default (SmolLM2-135M-Instruct GGUF, converted once into the cache)."""
    from emajax.models.hub import DEFAULT_MODEL, resolve_model_dir

    return resolve_model_dir(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir: Path):
    """LoadedModel of the embedded default in fp32 (one load shared by the whole session)."""
    from emajax.models.hub import load_model

    return load_model(str(smollm2_dir))
