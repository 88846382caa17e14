"""The contract from another language: a Node client (@grpc/grpc-js) generated from protos/ at run time."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

JS = Path(__file__).resolve().parents[1] / "js"
pytestmark = pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None,
                                reason="node/npm not installed")


@pytest.fixture(scope="module")
def node_modules():
    if not (JS / "node_modules" / "@grpc" / "grpc-js").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=JS, check=True,
                       capture_output=True, timeout=300)
    return JS / "node_modules"


def test_node_client_registers_reads_and_decodes_errors(node_modules, cp, good_adapter):
    proc = subprocess.run(["node", str(JS / "client.mjs"), cp.address, cp.token, str(good_adapter)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["created_state"] == "ADAPTER_STATE_READY"
    with cp.client() as c:
        assert seen["version"] == c.get_adapter("from-node").version
    assert seen["listed"] == ["from-node"]
    assert seen["missing"] == {"code": "NOT_FOUND", "reason": "ADAPTER_NOT_FOUND"}
    assert seen["anonymous"] == {"code": "UNAUTHENTICATED", "reason": "UNAUTHENTICATED"}
