"""The committed stubs match protos/, and protos/ is buf STANDARD clean."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_fresh(tmp_path):
    from scripts.gen_protos import generate

    generate(tmp_path)
    fresh = sorted((tmp_path / "loraplane" / "v1").glob("*_pb2*"))
    assert fresh, "protoc produced nothing"
    committed = ROOT / "loraplane" / "v1"
    stale = [p.name for p in fresh if not filecmp.cmp(p, committed / p.name, shallow=False)]
    missing = [p.name for p in fresh if not (committed / p.name).exists()]
    extra = sorted({p.name for p in committed.glob("*_pb2*")} - {p.name for p in fresh})
    assert not (stale or missing or extra), f"run `make protos`: stale={stale} missing={missing} extra={extra}"


@pytest.mark.skipif(shutil.which("npx") is None, reason="node/npx not installed")
def test_buf_lint_standard():
    proc = subprocess.run(["npx", "--yes", "@bufbuild/buf", "lint"], cwd=ROOT / "protos", capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_error_reason_has_a_status_code():
    from loraplane.errors import REASON_CODES
    from loraplane.v1.errors_pb2 import ErrorReason

    assert set(ErrorReason.values()) - {0} == set(REASON_CODES)
