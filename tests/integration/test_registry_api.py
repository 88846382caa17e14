"""AdapterRegistryService end to end: real Redis, real gRPC server on loopback, real PEFT adapters."""

from __future__ import annotations

import hashlib
import time

import grpc
import pytest

from loraplane.adapter_format import NormalizedAdapter
from loraplane.errors import LoraplaneError
from loraplane.v1 import adapter_pb2

READY = adapter_pb2.ADAPTER_STATE_READY
FAILED = adapter_pb2.ADAPTER_STATE_FAILED


def wait_state(client, name, states=(READY, FAILED), timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        a = client.get_adapter(name)
        if a.state in states:
            return a
        time.sleep(0.05)
    raise AssertionError(f"{name} stuck in {adapter_pb2.AdapterState.Name(a.state)}")


def test_register_wait_ready_and_get(cp, good_adapter):
    with cp.client() as c:
        a = c.create_adapter("good", str(good_adapter), wait=True)
        assert a.state == READY
        assert a.version.startswith("sha256:") and len(a.version) == 71
        assert a.rank == 8 and a.alpha == 16 and not a.use_rslora
        assert list(a.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
        assert a.size_bytes > 0 and a.source == f"file://{good_adapter}"
        assert a.etag and a.create_time.seconds > 0
        got = c.get_adapter("good")
        assert got.version == a.version and got.etag == a.etag
        path = cp.config.artifact_dir / a.version.removeprefix("sha256:") / "adapter.safetensors"
        data = path.read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == a.version
        assert NormalizedAdapter.from_bytes(data).rank == 8


def test_register_async_goes_pending_then_ready_with_events(cp, good_adapter):
    with cp.client() as c:
        start = c.watch_adapters("0", timeout=20)
        a = c.create_adapter("async-one", str(good_adapter))
        assert a.state in (adapter_pb2.ADAPTER_STATE_PENDING, adapter_pb2.ADAPTER_STATE_DOWNLOADING,
                           adapter_pb2.ADAPTER_STATE_VALIDATING, READY)
        ready = wait_state(c, "async-one")
        assert ready.state == READY
        kinds = []
        for event in start:
            kinds.append(adapter_pb2.AdapterEventType.Name(event.type))
            if event.type == adapter_pb2.ADAPTER_EVENT_TYPE_READY:
                assert event.version == ready.version and event.name == "async-one"
                break
        assert kinds == ["ADAPTER_EVENT_TYPE_CREATED", "ADAPTER_EVENT_TYPE_READY"]
        start.close()


def test_failed_async_registration_keeps_reason_and_can_be_retried(cp, good_adapter, adapter_root):
    broken = adapter_root / "later-fixed"
    broken.mkdir(exist_ok=True)
    (broken / "adapter_config.json").write_text((good_adapter / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with cp.client() as c:
        c.create_adapter("retry-me", str(broken))
        failed = wait_state(c, "retry-me")
        assert failed.state == FAILED
        assert adapter_pb2.AdapterState.Name(failed.state) == "ADAPTER_STATE_FAILED"
        assert failed.failure_reason != 0 and "safetensors" in failed.failure_message
        (broken / "adapter_model.safetensors").write_bytes((good_adapter / "adapter_model.safetensors").read_bytes())
        again = c.create_adapter("retry-me", str(broken), wait=True)
        assert again.state == READY and again.failure_message == ""


def test_duplicate_name_is_already_exists(cp, good_adapter):
    with cp.client() as c:
        c.create_adapter("dup", str(good_adapter), wait=True)
        before = c.get_adapter("dup")
        with pytest.raises(LoraplaneError) as e:
            c.create_adapter("dup", str(good_adapter), wait=True)
        assert e.value.code == grpc.StatusCode.ALREADY_EXISTS and e.value.reason_name == "ADAPTER_ALREADY_EXISTS"
        assert c.get_adapter("dup").etag == before.etag


def test_pin_unpin_and_delete_pinned(cp, good_adapter):
    with cp.client() as c:
        a = c.create_adapter("pinme", str(good_adapter), wait=True, pinned=True)
        assert a.pinned
        with pytest.raises(LoraplaneError) as e:
            c.delete_adapter("pinme")
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and e.value.reason_name == "ADAPTER_PINNED"
        assert c.get_adapter("pinme").pinned
        stale = c.get_adapter("pinme").etag
        un = c.unpin_adapter("pinme")
        assert not un.pinned and un.etag != stale
        with pytest.raises(LoraplaneError) as e:
            c.pin_adapter("pinme", etag=stale)
        assert e.value.code == grpc.StatusCode.ABORTED and e.value.reason_name == "ETAG_MISMATCH"
        assert not c.get_adapter("pinme").pinned
        assert c.pin_adapter("pinme", etag=un.etag).pinned
        c.unpin_adapter("pinme")
        c.delete_adapter("pinme")
        with pytest.raises(LoraplaneError) as e:
            c.get_adapter("pinme")
        assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_delete_drops_artifact_only_when_unreferenced(cp, good_adapter):
    with cp.client() as c:
        a = c.create_adapter("twin-a", str(good_adapter), wait=True)
        b = c.create_adapter("twin-b", str(good_adapter), wait=True)
        assert a.version == b.version
        artifact = cp.config.artifact_dir / a.version.removeprefix("sha256:")
        c.delete_adapter("twin-a")
        assert artifact.is_dir()
        c.delete_adapter("twin-b")
        assert not artifact.exists()


def test_pagination_is_stable_and_filtered(cp, good_adapter):
    with cp.client() as c:
        names = [f"page-{i:02d}" for i in range(7)]
        for n in names:
            c.create_adapter(n, str(good_adapter), wait=True)
        page1 = c.list_adapters_page(page_size=3)
        assert [a.name for a in page1.adapters] == names[:3] and page1.total_size == 7
        page2 = c.list_adapters_page(page_size=3, page_token=page1.next_page_token)
        assert [a.name for a in page2.adapters] == names[3:6]
        page3 = c.list_adapters_page(page_size=3, page_token=page2.next_page_token)
        assert [a.name for a in page3.adapters] == names[6:] and page3.next_page_token == ""
        assert [a.name for a in c.list_adapters(page_size=2)] == names
        assert [a.name for a in c.list_adapters(state="ready")] == names
        assert list(c.list_adapters(state="failed")) == []
        for bad in ("not-a-token", "e30"):
            with pytest.raises(LoraplaneError) as e:
                c.list_adapters_page(page_size=3, page_token=bad)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.reason_name == "INVALID_PAGE_TOKEN"
        with pytest.raises(LoraplaneError) as e:  # a token from another filter
            c.list_adapters_page(page_size=3, page_token=page1.next_page_token, state="ready")
        assert e.value.reason_name == "INVALID_PAGE_TOKEN"
        with pytest.raises(LoraplaneError) as e:
            c.list_adapters_page(page_size=5000)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.metadata["field"] == "page_size"


def test_restart_on_same_redis_keeps_records_pins_and_artifacts(cp_factory, good_adapter):
    first = cp_factory()
    with first.client() as c:
        a = c.create_adapter("durable", str(good_adapter), wait=True, pinned=True)
    first.stop()
    second = cp_factory()
    with second.client() as c:
        again = c.get_adapter("durable")
        assert again.version == a.version and again.pinned and again.state == READY
        assert c.fetch_adapter("durable", a.version)


def test_admin_token_required_and_nothing_changes(cp, good_adapter):
    for token in (None, "wrong-token"):
        with cp.client(token=token) as c:
            for call in (lambda: c.create_adapter("sneaky", str(good_adapter), wait=True),
                         lambda: c.list_adapters_page(), lambda: c.delete_adapter("x")):
                with pytest.raises(LoraplaneError) as e:
                    call()
                assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
                assert e.value.reason_name == "UNAUTHENTICATED"
    with cp.client() as c:
        assert list(c.list_adapters()) == []


def test_orphan_sweep_does_not_steal_a_fresh_registration(cp, good_adapter):
    """Another replica's sweep may only take over a job whose lease lapsed, never a fresh one."""
    registry = cp.plane.registry
    with cp.client() as c:
        c.create_adapter("racer", str(good_adapter))  # no wait: the job may still be running
    took = cp.thread.call(registry.claim("racer", "other-replica/job", 30_000))
    record = cp.thread.call(registry.get("racer"))
    assert not took or record.state == "READY"  # a READY record has no lease to take
    assert record.lease_owner != "other-replica/job"
    with cp.client() as c:
        for _ in range(200):
            if c.get_adapter("racer").state == READY:
                break
            time.sleep(0.05)
        assert c.get_adapter("racer").version.startswith("sha256:")


def test_timeout_none_means_no_deadline_and_the_default_is_the_clients(cp, good_adapter):
    """register --wait passes timeout=None: it must wait as long as the ingest takes, not the
    client's 60 s default; calls that name no timeout keep the client's."""
    with cp.client(timeout=0.001) as c:
        assert c.create_adapter("nodeadline", str(good_adapter), wait=True, timeout=None).state == READY
        with pytest.raises(LoraplaneError) as e:
            c.create_adapter("defaulted", str(good_adapter), wait=True)
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_an_explicit_token_flag_or_file_wins_over_the_environment(tmp_path, monkeypatch):
    from loraplane.auth import load_token

    monkeypatch.setenv("LORAPLANE_ADMIN_TOKEN", "stale-from-the-shell")
    path = tmp_path / "token"
    path.write_text("from-the-file\n")
    assert load_token("from-the-flag", "LORAPLANE_ADMIN_TOKEN", path) == "from-the-flag"
    assert load_token(None, "LORAPLANE_ADMIN_TOKEN", path) == "from-the-file"
    assert load_token(None, "LORAPLANE_ADMIN_TOKEN", None) == "stale-from-the-shell"


def test_a_failed_pinned_register_with_wait_leaves_nothing(cp, adapter_root):
    broken = adapter_root / "no-config-for-pinning"
    broken.mkdir(exist_ok=True)
    (broken / "adapter_model.safetensors").write_bytes(b"")
    with cp.client() as c:
        with pytest.raises(LoraplaneError) as e:
            c.create_adapter("badpin", str(broken), wait=True, pinned=True)
        assert e.value.reason_name == "INVALID_ADAPTER_CONFIG"
        with pytest.raises(LoraplaneError) as e:
            c.get_adapter("badpin")
        assert e.value.reason_name == "ADAPTER_NOT_FOUND"
    assert cp.thread.call(cp.plane.registry.pinned_names()) == []
