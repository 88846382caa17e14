"""AdapterDistributionService: resolve and digest-checked fetch, plus health and reflection."""

from __future__ import annotations

import hashlib
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loraplane.adapter_format import NormalizedAdapter
from loraplane.errors import LoraplaneError
from loraplane.v1 import distribution_service_pb2 as dist_pb2

S = grpc.StatusCode


def test_resolve_and_fetch_verified(cp, good_adapter):
    with cp.client() as c:
        a = c.create_adapter("dist", str(good_adapter), wait=True)
        m = c.resolve_adapter("dist")
        assert (m.name, m.version, m.rank, m.size_bytes) == ("dist", a.version, 8, a.size_bytes)
        assert c.resolve_adapter(f"dist@{a.version}").version == a.version
        data = c.fetch_adapter("dist", a.version)
        assert "sha256:" + hashlib.sha256(data).hexdigest() == a.version and len(data) == a.size_bytes
        assert {m for _, m, _, _ in NormalizedAdapter.from_bytes(data).pairs()} == set(a.target_modules)


def test_fetch_resumes_from_offset_and_chunks_are_bounded(cp, good_adapter):
    with cp.client() as c:
        a = c.create_adapter("resume", str(good_adapter), wait=True)
        full = c.fetch_adapter("resume", a.version)
        offset = len(full) // 3
        msgs = list(c.distribution.FetchAdapter(
            dist_pb2.FetchAdapterRequest(name="resume", version=a.version, offset=offset), metadata=c.metadata))
        assert msgs[0].offset == offset and b"".join(m.data for m in msgs) == full[offset:]
        assert msgs[-1].digest == a.version and all(len(m.data) <= 1 << 20 for m in msgs)


def test_fetch_refuses_wrong_version_bad_offset_and_unready(cp, good_adapter):
    with cp.client() as c:
        a = c.create_adapter("strict", str(good_adapter), wait=True)
        cases = [
            (lambda: c.fetch_adapter("strict", "sha256:" + "1" * 64), S.NOT_FOUND, "ADAPTER_NOT_FOUND"),
            (lambda: c.fetch_adapter("strict", ""), S.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
            (lambda: c.fetch_adapter("strict", "md5:abc"), S.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
            (lambda: c.resolve_adapter("strict@sha256:" + "2" * 64), S.NOT_FOUND, "ADAPTER_NOT_FOUND"),
            (lambda: c.resolve_adapter("bad/name"), S.INVALID_ARGUMENT, "INVALID_NAME"),
        ]
        for call, code, reason in cases:
            with pytest.raises(LoraplaneError) as e:
                call()
            assert (e.value.code, e.value.reason_name) == (code, reason)
        with pytest.raises(grpc.RpcError) as e:
            list(c.distribution.FetchAdapter(dist_pb2.FetchAdapterRequest(
                name="strict", version=a.version, offset=a.size_bytes + 1)))
        assert e.value.code() == S.INVALID_ARGUMENT


def test_corrupted_artifact_on_disk_is_data_loss(cp, good_adapter):
    with cp.client() as c:
        a = c.create_adapter("rot", str(good_adapter), wait=True)
        path = cp.config.artifact_dir / a.version.removeprefix("sha256:") / "adapter.safetensors"
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(LoraplaneError) as e:
            c.fetch_adapter("rot", a.version)
        assert (e.value.code, e.value.reason_name) == (S.DATA_LOSS, "DIGEST_MISMATCH")


def test_distribution_token_when_configured(cp_factory, good_adapter):
    cp = cp_factory(distribution_token="dist-secret")
    with cp.client() as admin:
        a = admin.create_adapter("tok", str(good_adapter), wait=True)
    with cp.client(token="dist-secret") as dp:
        assert dp.resolve_adapter("tok").version == a.version
        with pytest.raises(LoraplaneError) as e:  # the distribution token is not an admin token
            dp.delete_adapter("tok")
        assert e.value.code == S.UNAUTHENTICATED
    with cp.client(token=None) as anon:
        with pytest.raises(LoraplaneError) as e:
            anon.fetch_adapter("tok", a.version)
        assert e.value.code == S.UNAUTHENTICATED


def test_health_serving_and_reflection(cp):
    channel = grpc.insecure_channel(cp.address)
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "liveness", "startup", "readiness", "loraplane.v1.AdapterRegistryService",
                    "loraplane.v1.AdapterDistributionService"):
        for _ in range(50):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service)).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
            time.sleep(0.1)
        assert status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"loraplane.v1.AdapterRegistryService", "loraplane.v1.AdapterDistributionService",
            "grpc.health.v1.Health"} <= names
    channel.close()
