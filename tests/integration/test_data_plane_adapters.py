"""Adapter handling through the real service: real control plane, Redis, gRPC and tiny model."""

from __future__ import annotations

import grpc
import pytest

from loraplane.errors import LoraplaneError
from loraplane.v1 import cache_service_pb2 as cache_pb2
from loraplane.v1 import generation_service_pb2 as gen_pb2
from tests.factories import make_peft_adapter

TARGETS = ("q_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def adapter_dirs(base_model, adapter_root):
    made = {}
    for name, r, seed in (("rank4", 4, 1), ("rank4-other", 4, 2), ("rank32", 32, 3)):
        path = adapter_root / f"dpa-{name}"
        if not path.exists():
            make_peft_adapter(base_model, path, r=r, alpha=2 * r, seed=seed, target_modules=TARGETS)
        made[name] = path
    return made


def generate(dp, adapter, max_tokens=2):
    with dp.client(timeout=30) as c:
        return list(c.generate([1, 2, 3], adapter, max_tokens=max_tokens, ignore_eos=True))


def test_an_adapter_above_max_lora_rank_fails_fast_and_blocks_no_one(cp_factory, dp_factory, adapter_dirs):
    cp = cp_factory()
    with cp.client() as c:
        c.create_adapter("big", str(adapter_dirs["rank32"]), wait=True)
        c.create_adapter("small", str(adapter_dirs["rank4"]), wait=True)
    dp = dp_factory(cp.address, max_lora_rank=16)
    for _ in range(2):  # the second time from the disk tier
        with pytest.raises(LoraplaneError) as e:
            generate(dp, "big")  # before the fix: queued for a slot it never got, until the deadline
        assert (e.value.code, e.value.reason_name) == (grpc.StatusCode.INVALID_ARGUMENT, "RANK_TOO_LARGE")
        assert e.value.metadata == {"rank": "32", "max_rank": "16"}
    with dp.client() as c, pytest.raises(LoraplaneError) as e:
        c.prefetch_adapter("big", cache_pb2.CACHE_TIER_GPU)
    assert e.value.reason_name == "RANK_TOO_LARGE"
    assert generate(dp, "small")[-1].finish_reason == gen_pb2.FINISH_REASON_LENGTH
    loop = dp.plane.engine_loop
    assert loop.stats.waiting == 0 and [k.split("@")[0] for k in loop.slots.keys()] == ["small"]
