"""The artifact store's scratch space: what a killed ingest left behind goes, work in progress stays."""

from __future__ import annotations

import os
import time

from control_plane.artifact_store import STALE_SCRATCH_S, ArtifactStore


def _age(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def test_stale_scratch_is_removed_and_live_scratch_is_kept(tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    version = store.put(b"weights")
    dead = store.tmp / "tmpdead"             # a download whose process was killed hours ago
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "adapter_model.safetensors").write_bytes(b"x" * 10)
    for path in (dead / "sub" / "adapter_model.safetensors", dead / "sub", dead):
        _age(path, STALE_SCRATCH_S + 60)
    live = store.tmp / "tmplive"             # an old directory whose file is still being written
    live.mkdir()
    (live / "adapter.safetensors").write_bytes(b"y")
    _age(live, STALE_SCRATCH_S + 60)
    stray = store.tmp / "tmpstray.part"      # a loose file of a dead writer
    stray.write_bytes(b"z")
    _age(stray, STALE_SCRATCH_S + 60)

    assert store.remove_stale_scratch() == 2
    assert sorted(p.name for p in store.tmp.iterdir()) == ["tmplive"]
    assert store.exists(version) and store.path(version).read_bytes() == b"weights"
