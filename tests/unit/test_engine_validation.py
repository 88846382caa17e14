"""Bad input: one exception type (LoraplaneError, INVALID_ARGUMENT family), engine state unchanged.
Bad configuration: ValueError from EngineConfig."""

from __future__ import annotations

import grpc
import pytest

from data_plane.engine.config import EngineConfig
from data_plane.engine.request import SamplingParams
from loraplane.errors import LoraplaneError
from loraplane.v1 import errors_pb2 as R
from tests.unit.engine_helpers import (  # noqa: F401 - fixtures
    artifacts,
    make_engine,
    normalized,
    one_thread,
    random_prompts,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine(artifacts):  # noqa: F811
    model = artifacts.model("llama")
    adapter = artifacts.adapter(model, r=4, seed=31)
    engine = make_engine(model, {"known": adapter}, max_model_len=32, max_loras=2)
    engine.add_request(random_prompts([5])[0], SamplingParams(max_tokens=50, ignore_eos=True), "known",
                       request_id="busy")
    engine.step()
    return engine


def snapshot(engine):
    return (dict(engine._requests), list(engine.scheduler.waiting), list(engine.scheduler.running),
            engine.blocks.num_free, engine.adapter_slots, list(engine.loras.slot_ranks))


BAD_REQUESTS = {
    "prompt too long": (dict(prompt=list(range(33))), "prompt_token_ids", R.ERROR_REASON_PROMPT_TOO_LONG),
    "empty prompt": (dict(prompt=[]), "prompt", R.ERROR_REASON_INVALID_ARGUMENT),
    "token out of vocab": (dict(prompt=[1, 256]), "prompt_token_ids", R.ERROR_REASON_INVALID_ARGUMENT),
    "text without tokenizer": (dict(prompt="hello"), "prompt", R.ERROR_REASON_INVALID_ARGUMENT),
    "max_tokens 0": (dict(sampling=SamplingParams(max_tokens=0)), "max_tokens", R.ERROR_REASON_INVALID_ARGUMENT),
    "max_tokens < 0": (dict(sampling=SamplingParams(max_tokens=-3)), "max_tokens", R.ERROR_REASON_INVALID_ARGUMENT),
    "temperature < 0": (dict(sampling=SamplingParams(temperature=-0.1)), "temperature",
                        R.ERROR_REASON_INVALID_ARGUMENT),
    "top_p 0": (dict(sampling=SamplingParams(top_p=0.0)), "top_p", R.ERROR_REASON_INVALID_ARGUMENT),
    "top_p > 1": (dict(sampling=SamplingParams(top_p=1.5)), "top_p", R.ERROR_REASON_INVALID_ARGUMENT),
    "top_p nan": (dict(sampling=SamplingParams(top_p=float("nan"))), "top_p", R.ERROR_REASON_INVALID_ARGUMENT),
    "top_k < 0": (dict(sampling=SamplingParams(top_k=-1)), "top_k", R.ERROR_REASON_INVALID_ARGUMENT),
    "stop token out of vocab": (dict(sampling=SamplingParams(stop_token_ids=(999,))), "stop_token_ids",
                                R.ERROR_REASON_INVALID_ARGUMENT),
    "empty stop string": (dict(sampling=SamplingParams(stop=("",))), "stop", R.ERROR_REASON_INVALID_ARGUMENT),
    "empty adapter name": (dict(adapter=""), "adapter", R.ERROR_REASON_INVALID_ARGUMENT),
    "adapter not a name": (dict(adapter=3), "adapter", R.ERROR_REASON_INVALID_ARGUMENT),
    "duplicate request id": (dict(request_id="busy"), "request_id", R.ERROR_REASON_INVALID_ARGUMENT),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_refused_and_changes_nothing(engine, case):
    kwargs, field, reason = BAD_REQUESTS[case]
    call = dict(prompt=[1, 2, 3], sampling=SamplingParams()) | kwargs
    before = snapshot(engine)
    with pytest.raises(LoraplaneError) as err:
        engine.add_request(call.pop("prompt"), **call)
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.reason == reason and err.value.metadata["field"] == field
    assert snapshot(engine) == before


def test_unknown_adapter_slot_and_name_are_refused(engine, artifacts):  # noqa: F811
    adapter = normalized(artifacts.model("llama"), artifacts.adapter(artifacts.model("llama"), r=4, seed=31))
    before = snapshot(engine)
    for slot in (2, -1, "0", True):
        with pytest.raises(LoraplaneError) as err:
            engine.load_adapter("new", slot, adapter)
        assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT and err.value.metadata["field"] == "slot"
    with pytest.raises(LoraplaneError) as err:
        engine.evict_adapter("never-loaded")
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT and err.value.metadata["field"] == "adapter"
    with pytest.raises(LoraplaneError) as err:
        engine.generate([[1, 2]], adapters=["never-loaded"])
    assert err.value.metadata["field"] == "adapters"
    with pytest.raises(LoraplaneError):
        engine.generate([[1, 2], [1] * 40])  # the second prompt is too long: neither is queued
    assert snapshot(engine) == before


def test_the_engine_still_works_after_refusals(engine):
    done = engine.generate([[4, 5, 6]], ["known"], SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(done[0].token_ids) == 3 and done[0].adapter == "known"


@pytest.mark.parametrize("overrides,match", [
    (dict(max_loras=-1), "max_loras"),
    (dict(max_lora_rank=0), "max_lora_rank"),
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(max_model_len=0), "max_model_len"),
    (dict(max_model_len=True), "max_model_len"),
    (dict(dtype="int8"), "dtype"),
    (dict(device="tpu"), "device"),
    (dict(num_kv_blocks=4, kv_cache_bytes=1 << 20), "not both"),
    (dict(num_kv_blocks=3, max_model_len=64, kv_block_size=16), "num_kv_blocks"),
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
    (dict(enable_prefix_caching=1), "enable_prefix_caching"),
    (dict(kv_block_size=0), "kv_block_size"),
    (dict(model=""), "model"),
])
def test_config_validation_raises_value_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**{"model": "some/dir", **overrides})


def test_config_defaults_and_aliases():
    config = EngineConfig(model="m", dtype="bf16", max_model_len=4096)
    assert config.dtype == "bfloat16" and config.max_num_batched_tokens == 4096
    assert config.blocks_per_seq == 256


def test_a_request_id_whose_abort_is_still_due_is_not_reused(engine):
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=2), request_id="gone")
    engine.abort("gone")
    with pytest.raises(LoraplaneError) as err:
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=2), request_id="gone")
    assert err.value.metadata["field"] == "request_id"
    finals = [out for out in engine.step() if out.request_id == "gone"]
    assert [(o.finished, o.token_ids) for o in finals] == [(True, ())]
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=2), request_id="gone")  # delivered: free again
    engine.abort("gone")
    engine.step()
