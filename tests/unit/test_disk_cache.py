"""The disk tier's files: a failed write leaves nothing behind, and start-up clears what a crash left."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

from data_plane.lora.disk_cache import DiskCache

REPO = Path(__file__).resolve().parents[2]


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_a_write_the_volume_refuses_raises_and_leaves_no_partial_file(tmp_path):
    # A real failing write, without a full volume: the child process may not write files past 1 KiB
    # (EFBIG, SIGXFSZ ignored), as ENOSPC would cut it short.
    script = textwrap.dedent(f"""
        import errno, resource, signal, sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from data_plane.lora.disk_cache import DiskCache
        cache = DiskCache(Path({str(tmp_path)!r}), 1 << 20)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
        data = b"x" * 65536
        try:
            cache.put("sha256:" + "0" * 64, data)
        except OSError as e:
            assert e.errno == errno.EFBIG, e
            print("refused", cache.versions())
        else:
            print("stored")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "refused []"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_start_up_removes_partial_files_and_keeps_the_entries(tmp_path):
    data = b"adapter bytes"
    DiskCache(tmp_path, 1 << 20).put(digest(data), data)
    (tmp_path / "tmpabc123.part").write_bytes(b"half a wri")
    cache = DiskCache(tmp_path, 1 << 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == [hashlib.sha256(data).hexdigest() + ".safetensors"]
    assert cache.versions() == [digest(data)] and cache.get(digest(data)) == data


def test_an_entry_that_cannot_be_read_is_a_miss_not_an_error(tmp_path):
    version = digest(b"whatever")
    (tmp_path / (version.removeprefix("sha256:") + ".safetensors")).mkdir()  # read_bytes: IsADirectoryError
    cache = DiskCache(tmp_path, 1 << 20)
    assert version in cache
    assert cache.get(version) is None
    assert version not in cache
