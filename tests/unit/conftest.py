"""Fixtures for the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from ntspy.certs import CertPaths, make_test_pki


@pytest.fixture
def pki(tmp_path: Path) -> CertPaths:
    """A throwaway CA and a server certificate for localhost, 127.0.0.1 and ::1."""
    return make_test_pki(tmp_path / "pki")
