"""Generate requests through the real data plane: what is checked before any work, what runs where,
and how a stream ends when the replica stops under it."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from loraplane.errors import LoraplaneError
from tests.integration.dp_helpers import wait_for


class _GatedTokenizer:
    """The model's tokenizer, except that encoding a prompt holding `marker` waits for `gate`."""

    def __init__(self, inner, marker: str):
        self.inner, self.marker = inner, marker
        self.entered, self.gate = threading.Event(), threading.Event()
        self.eos_token_id = inner.eos_token_id

    def __call__(self, text, **kw):
        if self.marker in text:
            self.entered.set()
            self.gate.wait(30)
        return self.inner(text, **kw)

    def decode(self, *args, **kw):
        return self.inner.decode(*args, **kw)


def test_a_prompt_being_tokenized_holds_up_no_other_stream(cp_factory, dp_factory, monkeypatch):
    dp = dp_factory(cp_factory().address)
    engine = dp.plane.engine_loop.engine
    tokenizer = _GatedTokenizer(engine.tokenizer, "slow to tokenize")
    monkeypatch.setattr(engine, "tokenizer", tokenizer)
    slow = {}

    def send_slow():
        with dp.client(timeout=60) as c:
            slow["out"] = list(c.generate("a prompt slow to tokenize", max_tokens=2, ignore_eos=True))

    thread = threading.Thread(target=send_slow)
    thread.start()
    try:
        assert tokenizer.entered.wait(30)
        # Before the fix the engine thread itself tokenized: every stream waited for the gate.
        with dp.client(timeout=10) as c:
            other = list(c.generate([1, 2, 3], max_tokens=4, ignore_eos=True))
        assert sum(len(o.token_ids) for o in other) == 4
        assert "out" not in slow  # still tokenizing
    finally:
        tokenizer.gate.set()
        thread.join(60)
    assert sum(len(o.token_ids) for o in slow["out"]) == 2


def test_a_bad_request_is_refused_before_its_adapter_is_fetched(cp_factory, dp_factory, good_adapter):
    cp = cp_factory()
    with cp.client() as c:
        c.create_adapter("x", str(good_adapter), wait=True)
    dp = dp_factory(cp.address)
    cache = dp.plane.cache
    bad = [dict(max_tokens=0), dict(stop=[f"s{i}" for i in range(17)]), dict(stop=["x" * 257]),
           dict(stop_token_ids=list(range(257)))]
    with dp.client() as c:
        for params in bad:
            with pytest.raises(LoraplaneError) as e:
                list(c.generate([1, 2, 3], "x", **params))
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.metadata["field"] == next(iter(params))
        with pytest.raises(LoraplaneError) as e:  # bad and unknown: the request is what is wrong
            list(c.generate([1, 2, 3], "no-such-adapter", max_tokens=0))
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        # Before the fix each of these downloaded "x" into the disk and CPU tiers first.
        assert cache.cached_keys() == {} and cache.disk.versions() == []
        with pytest.raises(LoraplaneError) as e:
            list(c.generate(list(range(1, 130)), max_tokens=1))
        assert e.value.reason_name == "PROMPT_TOO_LONG" and e.value.metadata["field"] == "prompt_token_ids"
        with pytest.raises(LoraplaneError) as e:
            list(c.generate("word " * 200, max_tokens=1))
        assert e.value.reason_name == "PROMPT_TOO_LONG" and e.value.metadata["field"] == "prompt"
        assert list(c.generate([1, 2, 3], "x", max_tokens=2))[-1].adapter_version


def test_seeds_past_32_bits_sample_differently_on_cpu(cp_factory, dp_factory):
    dp = dp_factory(cp_factory().address)

    def sample(seed):
        with dp.client() as c:
            return [t for o in c.generate([1, 2, 3], max_tokens=24, temperature=1.0, seed=seed, ignore_eos=True)
                    for t in o.token_ids]

    assert sample(7) == sample(7)
    # torch's CPU generator keeps a seed's low 32 bits: these sampled alike before the fix.
    assert sample(7 + 2**32) != sample(7)
    assert sample(7 + 2**32) == sample(7 + 2**32)


def test_streams_still_running_when_the_grace_period_ends_get_a_reason(cp_factory, dp_factory, monkeypatch):
    dp = dp_factory(cp_factory().address, grace_period_s=1.0, max_model_len=128)
    engine = dp.plane.engine_loop.engine
    step = engine.step

    def slow_step():  # the real step, slowed so a 100-token stream outlives the grace period
        time.sleep(0.05)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    seen = {"tokens": 0}

    def stream():
        try:
            with dp.client(timeout=60) as c:
                for out in c.generate([1, 2, 3], max_tokens=100, ignore_eos=True):
                    seen["tokens"] += len(out.token_ids)
        except LoraplaneError as e:
            seen["error"] = e

    thread = threading.Thread(target=stream)
    thread.start()
    assert wait_for(lambda: seen["tokens"] > 0)
    dp.stop()
    thread.join(30)
    # Before the fix: UNAVAILABLE "Cancelling all calls" from grpc, with no ErrorInfo.
    error = seen["error"]
    assert (error.code, error.reason_name) == (grpc.StatusCode.UNAVAILABLE, "SERVER_NOT_READY")
    assert "grace period" in error.message and 0 < seen["tokens"] < 100



def test_a_call_that_gets_its_adapter_after_the_grace_period_gets_the_reason_too(cp_factory, dp_factory,
                                                                                 good_adapter, monkeypatch):
    cp = cp_factory()
    with cp.client() as c:
        c.create_adapter("x", str(good_adapter), wait=True)
    dp = dp_factory(cp.address, grace_period_s=1.0)
    cache, generation = dp.plane.cache, dp.plane.generation
    check, entered, gate = cache.check, threading.Event(), threading.Event()

    def held_check(adapter):  # the real check, once the grace period is over
        entered.set()
        gate.wait(30)
        check(adapter)

    monkeypatch.setattr(cache, "check", held_check)
    seen = {}

    def call():
        try:
            with dp.client(timeout=60) as c:
                list(c.generate([1, 2, 3], "x", max_tokens=2))
        except LoraplaneError as e:
            seen["error"] = e

    caller = threading.Thread(target=call)
    caller.start()
    assert entered.wait(30)  # fetched, being parsed: not in the engine yet
    stopper = threading.Thread(target=dp.stop)
    stopper.start()
    assert wait_for(lambda: generation.stop_error is not None)
    gate.set()
    caller.join(30)
    stopper.join(60)
    # Before the fix it went on to the stopping engine and got grpc's bare "Cancelling all calls".
    error = seen["error"]
    assert (error.code, error.reason_name) == (grpc.StatusCode.UNAVAILABLE, "SERVER_NOT_READY")


def test_a_broken_engine_fails_calls_at_once_and_fails_liveness(cp_factory, dp_factory):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from loraplane.grpc_server import LIVENESS, READINESS

    dp = dp_factory(cp_factory().address)
    engine = dp.plane.engine_loop.engine

    def fault(*_args, **_kw):  # the step fails, and so does the abort that cleans up after it
        raise RuntimeError("injected device fault")

    dp.plane.engine_loop.call(lambda e: (setattr(e.runner, "run", fault), setattr(e, "abort", fault))).result(30)
    for _ in range(2):  # the stream in the failed step, then one after: neither waits for its deadline
        with dp.client(timeout=20) as c, pytest.raises(LoraplaneError) as e:
            list(c.generate([1, 2, 3], max_tokens=4))
        assert e.value.reason_name == "ENGINE_FAILURE"
    assert engine.runner.run is fault
    with grpc.insecure_channel(dp.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def status(name):
            return health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status

        # Before the fix the engine thread died and the kubelet kept a replica that could serve nothing.
        assert wait_for(lambda: status(LIVENESS) == health_pb2.HealthCheckResponse.NOT_SERVING)
        assert status(READINESS) == health_pb2.HealthCheckResponse.NOT_SERVING
