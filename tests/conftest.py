"""Shared fixtures.

Tests that need the real data read it from ``../shared/data`` (or ``$NEUROEXPLAIN_SHARED_DATA``).
When it is missing they skip on a developer machine but **fail** in CI (``CI`` set), so CI never
passes by silently skipping them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: lines a test asks to print in pytest's terminal summary (e.g. the bad-input corpus summary)
SUMMARY_LINES = pytest.StashKey[list[str]]()
SHARED_DATA = Path(os.environ.get("NEUROEXPLAIN_SHARED_DATA", REPO.parent / "shared" / "data"))


def _require(path: Path) -> Path:
    if not path.exists():
        msg = f"shared data not found at {path} (set NEUROEXPLAIN_SHARED_DATA)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def ixi_root() -> Path:
    """The 100-subject IXI BIDS dataset with DL-MUSE dseg derivatives."""
    return _require(SHARED_DATA / "ixi")


@pytest.fixture(scope="session")
def mob_root() -> Path:
    """Mouse olfactory bulb spatial transcriptomics (Stahl 2016, replicate 11)."""
    return _require(SHARED_DATA / "mob")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    for line in config.stash.get(SUMMARY_LINES, []):
        terminalreporter.write_line(line)


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch thread (tiny tensors run fastest, and without contention)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
