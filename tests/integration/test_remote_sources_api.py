"""Hub and S3 registrations through the real control plane, against local Hub and S3 fixtures."""

from __future__ import annotations

import time

import grpc
import pytest

from loraplane.errors import LoraplaneError
from loraplane.v1 import adapter_pb2
from tests import hub_fixture, s3_fixture

hub = hub_fixture.hub
moto_server, s3 = s3_fixture.moto_server, s3_fixture.s3


def test_hf_registration_pins_commit_and_sends_token(cp_factory, hub, good_adapter, monkeypatch):
    sha = hub.add_repo("acme/sql-lora", good_adapter, token="hf_secret_token_123")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_123")
    cp = cp_factory(hf_endpoint=hub.url, hf_token="hf_secret_token_123")
    with cp.client() as c:
        a = c.create_adapter("sql", "hf://acme/sql-lora", wait=True)
        assert a.state == adapter_pb2.ADAPTER_STATE_READY
        assert a.resolved_revision == sha and a.source.startswith("hf://acme/sql-lora")
        downloads = hub.file_requests("adapter_model.safetensors", "GET")
        assert downloads and all(sha in r.path or "cdn-lfs" in r.path for r in downloads)
        assert not hub.file_requests("adapter_model.bin")
        # The same content from a local path is the same version: content addressing.
        local = c.create_adapter("sql-local", str(good_adapter), wait=True)
        assert local.version == a.version


def test_hf_revision_moves_but_registered_commit_stays(cp_factory, hub, good_adapter, adapter_root, base_model):
    from tests.factories import make_peft_adapter

    first = hub.add_repo("acme/moving", good_adapter)
    cp = cp_factory(hf_endpoint=hub.url)
    with cp.client() as c:
        a = c.create_adapter("moving-v1", "hf://acme/moving@main", wait=True)
        assert a.resolved_revision == first
        other = make_peft_adapter(base_model, adapter_root / "moving-v2", r=2, seed=7)
        second = hub.add_repo("acme/moving", other)
        b = c.create_adapter("moving-v2", "hf://acme/moving", revision="main", wait=True)
        assert b.resolved_revision == second != first and b.version != a.version
        pinned = c.create_adapter("moving-old", "hf://acme/moving", revision=first, wait=True)
        assert pinned.version == a.version


def test_hf_missing_repo_fails_cleanly_and_async_leaves_failed(cp_factory, hub):
    cp = cp_factory(hf_endpoint=hub.url)
    with cp.client() as c:
        with pytest.raises(LoraplaneError) as e:
            c.create_adapter("missing", "hf://acme/nope", wait=True)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE and e.value.reason_name == "SOURCE_UNREACHABLE"
        c.create_adapter("missing", "hf://acme/nope")
        for _ in range(200):
            got = c.get_adapter("missing")
            if got.state == adapter_pb2.ADAPTER_STATE_FAILED:
                break
            time.sleep(0.05)
        assert got.state == adapter_pb2.ADAPTER_STATE_FAILED and got.failure_message


def test_s3_registration(cp_factory, s3, good_adapter):
    uri = s3.upload_dir("adapters/s3-one", good_adapter)
    cp = cp_factory(s3_endpoint_url=s3.endpoint_url)
    with cp.client() as c:
        a = c.create_adapter("s3-one", uri, wait=True)
        assert a.state == adapter_pb2.ADAPTER_STATE_READY and a.source == uri
        assert c.fetch_adapter("s3-one", a.version)
        with pytest.raises(LoraplaneError) as e:
            c.create_adapter("s3-two", f"s3://{s3.bucket}-missing/x", wait=True)
        assert e.value.reason_name == "SOURCE_UNREACHABLE"
        assert [x.name for x in c.list_adapters()] == ["s3-one"]
