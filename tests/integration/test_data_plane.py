"""The data plane as a service: real control plane, real Redis, real gRPC, tiny real model, PEFT oracle."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest
import redis
import torch

from loraplane.cli import main
from loraplane.errors import LoraplaneError
from loraplane.v1 import cache_service_pb2 as cache_pb2
from loraplane.v1 import generation_service_pb2 as gen_pb2
from tests.factories import make_peft_adapter
from tests.integration.dp_helpers import wait_for

PROMPTS = [[5, 17, 42, 99, 7], [3, 14, 15, 92, 65, 35, 89], [200, 100, 50]]
N = 8


@pytest.fixture(scope="module")
def adapters(base_model, adapter_root):
    made = {}
    for i, (name, r) in enumerate((("alpha", 4), ("beta", 8), ("gamma", 16))):
        path = adapter_root / f"dp-{name}"
        if not path.exists():
            make_peft_adapter(base_model, path, r=r, alpha=2 * r, seed=10 + i,
                              target_modules=("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"))
        made[name] = path
    return made


@pytest.fixture(scope="module")
def oracle(base_model, adapters):
    """Greedy continuations from HF transformers + PEFT, per (adapter or None, prompt index)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model, torch_dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, adapters["alpha"], adapter_name="alpha")
    for name in ("beta", "gamma"):
        model.load_adapter(adapters[name], adapter_name=name)
    out = {}
    for adapter in (None, "alpha", "beta", "gamma"):
        for i, prompt in enumerate(PROMPTS):
            ids = torch.tensor([prompt])
            with torch.no_grad():
                for _ in range(N):
                    if adapter is None:
                        with model.disable_adapter():
                            logits = model(ids).logits
                    else:
                        model.set_adapter(adapter)
                        logits = model(ids).logits
                    ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            out[(adapter, i)] = ids[0, len(prompt):].tolist()
    return out


@pytest.fixture
def plane(cp_factory, dp_factory, adapters):
    cp = cp_factory()
    with cp.client() as c:
        for name, path in adapters.items():
            c.create_adapter(name, str(path), wait=True)
    dp = dp_factory(cp.address)
    return cp, dp


def tokens(client, prompt, adapter="", **kw):
    ids, last = [], None
    for last in client.generate(prompt, adapter, max_tokens=N, ignore_eos=True, **kw):
        ids.extend(last.token_ids)
    return ids, last


def test_mixed_adapters_through_every_tier_match_peft(plane, oracle):
    cp, dp = plane
    jobs = [(a, i) for _ in range(2) for a in ("alpha", None, "beta", "gamma") for i in range(len(PROMPTS))]
    results, errors = {}, []

    def run(job):
        adapter, i = job
        try:
            with dp.client() as c:
                ids, last = tokens(c, PROMPTS[i], adapter or "")
            results[job] = (ids, last)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append((job, e))

    threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for (adapter, i), (ids, last) in results.items():
        assert ids == oracle[(adapter, i)], (adapter, i)
        assert last.finish_reason == gen_pb2.FINISH_REASON_LENGTH
        assert last.usage.completion_tokens == N and last.usage.prompt_tokens == len(PROMPTS[i])
        assert last.adapter_version.startswith("sha256:") == (adapter is not None)
    # 3 adapters through 2 slots and 2 CPU entries: every tier had to evict.
    with dp.client() as c:
        for adapter in ("gamma", "alpha", "beta", "gamma"):  # serial, so eviction order is forced too
            assert tokens(c, PROMPTS[0], adapter)[0] == oracle[(adapter, 0)]
    metrics = dp.plane.metrics.registry
    assert metrics.get_sample_value("loraplane_adapter_evictions_total", {"tier": "gpu"}) >= 1
    assert metrics.get_sample_value("loraplane_adapter_evictions_total", {"tier": "cpu"}) >= 1
    assert metrics.get_sample_value("loraplane_adapter_cache_lookups_total", {"tier": "disk", "result": "hit"}) >= 1
    lookups = sum(metrics.get_sample_value("loraplane_adapter_cache_lookups_total", {"tier": "cpu", "result": r}) or 0
                  for r in ("hit", "miss"))
    adapter_requests = sum(metrics.get_sample_value("loraplane_adapter_requests_total", {"adapter": a}) or 0
                           for a in ("alpha", "beta", "gamma"))
    assert lookups == adapter_requests  # exactly one CPU-tier lookup per adapter request
    assert metrics.get_sample_value("loraplane_adapter_cache_lookups_total", {"tier": "cpu", "result": "hit"}) >= 1


def test_concurrent_misses_share_one_fetch(plane):
    _, dp = plane
    barrier = threading.Barrier(6)
    outs = []

    def run():
        barrier.wait()
        with dp.client() as c:
            outs.append(tokens(c, PROMPTS[1], "beta")[0])

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(outs) == 6 and all(o == outs[0] for o in outs)
    assert dp.plane.fetcher.fetches == 1


def cached(dp):
    with dp.client() as c:
        return {a.name: a for a in c.list_cached_adapters().adapters}


def test_pin_survives_cache_pressure(plane, oracle):
    cp, dp = plane
    with cp.client() as admin:
        admin.pin_adapter("alpha")
    assert wait_for(lambda: cache_pb2.CACHE_TIER_GPU in cached(dp).get("alpha", cache_pb2.CachedAdapter()).tiers)
    with dp.client() as c:
        for adapter in ("beta", "gamma", "beta", "gamma"):
            assert tokens(c, PROMPTS[2], adapter)[0] == oracle[(adapter, 2)]
    entry = cached(dp)["alpha"]
    assert entry.pinned and cache_pb2.CACHE_TIER_GPU in entry.tiers and cache_pb2.CACHE_TIER_CPU in entry.tiers
    with cp.client() as admin:
        admin.unpin_adapter("alpha")
    assert wait_for(lambda: not cached(dp).get("alpha", cache_pb2.CachedAdapter()).pinned)


def test_register_pinned_reaches_the_data_plane_and_a_freed_pin_budget_is_reused(plane):
    """A pin given at registration is applied once the adapter is READY (it used to wait for a
    reconcile); a pin that found the GPU pin budget full (max_pinned_loras 1 here) moves onto the
    GPU when the budget frees."""
    cp, dp = plane
    gpu = cache_pb2.CACHE_TIER_GPU

    def entry(name):
        return cached(dp).get(name, cache_pb2.CachedAdapter())

    with cp.client() as admin:
        admin.create_adapter("delta", str(cp.config.allowed_roots[0] / "dp-beta"), wait=True, pinned=True)
    assert wait_for(lambda: entry("delta").pinned and gpu in entry("delta").tiers)
    assert entry("delta").active_requests == 0, "the pin's hold on the CPU entry is no request"
    with cp.client() as admin:
        admin.pin_adapter("alpha")
    assert wait_for(lambda: entry("alpha").pinned)
    assert gpu not in entry("alpha").tiers
    with cp.client() as admin:
        admin.unpin_adapter("delta")
    assert wait_for(lambda: gpu in entry("alpha").tiers and entry("alpha").pinned)
    assert dp.plane.engine_loop.slots.pinned == {entry("alpha").name + "@" + entry("alpha").version}


def test_delete_during_traffic(plane, oracle):
    cp, dp = plane
    with dp.client() as c:
        stream = c.generate(PROMPTS[0], "alpha", max_tokens=60, ignore_eos=True)
        first = next(stream)
        with cp.client() as admin:
            admin.delete_adapter("alpha")
        rest = list(stream)
        assert rest[-1].finish_reason == gen_pb2.FINISH_REASON_LENGTH  # in-flight request finished
        produced = list(first.token_ids) + [t for m in rest for t in m.token_ids]
        assert produced[:N] == oracle[("alpha", 0)]
        assert wait_for(lambda: cache_pb2.CACHE_TIER_GPU not in cached(dp).get("alpha", cache_pb2.CachedAdapter()).tiers)
        with pytest.raises(LoraplaneError) as e:
            tokens(c, PROMPTS[0], "alpha")
        assert e.value.code == grpc.StatusCode.NOT_FOUND and e.value.reason_name == "ADAPTER_NOT_FOUND"


def test_control_plane_down_cached_still_served_and_recovers(cp_factory, dp_factory, adapters, oracle):
    cp = cp_factory()
    with cp.client() as c:
        for name, path in adapters.items():
            c.create_adapter(name, str(path), wait=True)
    port = cp.plane.port
    dp = dp_factory(cp.address, max_loras=2, max_cpu_loras=3)
    with dp.client() as c:
        assert tokens(c, PROMPTS[0], "alpha")[0] == oracle[("alpha", 0)]
    cp.stop()
    with dp.client() as c:
        assert tokens(c, PROMPTS[0], "alpha")[0] == oracle[("alpha", 0)]  # cached: still served
        with pytest.raises(LoraplaneError) as e:
            tokens(c, PROMPTS[0], "gamma")  # a miss needs the control plane
        assert e.value.code == grpc.StatusCode.UNAVAILABLE and e.value.reason_name == "CONTROL_PLANE_UNAVAILABLE"
    cp_factory(listen=f"127.0.0.1:{port}")  # back on the same address, same Redis and artifacts

    def served():
        with dp.client() as c:
            try:
                return tokens(c, PROMPTS[0], "gamma")[0] == oracle[("gamma", 0)]
            except LoraplaneError as e:
                assert e.code == grpc.StatusCode.UNAVAILABLE
                return False

    assert wait_for(served, timeout=20)


def test_cancel_frees_slot_and_kv(plane):
    _, dp = plane
    with dp.client() as c:
        stream = c.generate(PROMPTS[1], "gamma", max_tokens=100, ignore_eos=True)
        next(stream)
        stream.close()  # the client goes away mid-stream
    loop = dp.plane.engine_loop
    assert wait_for(lambda: loop.stats.running == 0 and loop.stats.waiting == 0 and loop.stats.kv_usage == 0)
    assert wait_for(lambda: dp.plane.generation.active == 0)
    assert "gamma" not in {k.split("@")[0] for k in loop.stats.running_adapters}


def test_unknown_adapter_and_bad_input(plane):
    _, dp = plane
    with dp.client() as c:
        t0 = time.monotonic()
        with pytest.raises(LoraplaneError) as e:
            tokens(c, PROMPTS[0], "nobody")
        assert e.value.code == grpc.StatusCode.NOT_FOUND and time.monotonic() - t0 < 2
        cases = [dict(prompt=PROMPTS[0], max_tokens=0), dict(prompt=PROMPTS[0], temperature=-1),
                 dict(prompt=PROMPTS[0], top_p=1.5), dict(prompt=[], max_tokens=2),
                 dict(prompt=list(range(200)), max_tokens=2), dict(prompt=[999999], max_tokens=2)]
        for kw in cases:
            prompt = kw.pop("prompt")
            with pytest.raises(LoraplaneError) as e:
                list(c.generate(prompt, "", **kw))
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT, kw
        with pytest.raises(LoraplaneError) as e:
            list(c.generate(PROMPTS[0], "../x"))
        assert e.value.reason_name == "INVALID_NAME"
        assert tokens(c, PROMPTS[0])[1].finish_reason == gen_pb2.FINISH_REASON_LENGTH  # still serving
        text, last = c.generate_text("hello there", max_tokens=4, ignore_eos=True)
        assert isinstance(text, str) and last.usage.completion_tokens == 4
        assert main(["generate", "--address", dp.address, "--adapter", "beta", "--max-tokens", "3",
                     "--ignore-eos", "--json", "hi"]) == 0
        info = c.get_model_info()
        assert info.max_loras == 2 and info.architecture == "LlamaForCausalLM" and info.vocab_size == 320


def test_drain_finishes_inflight_and_refuses_new(plane):
    _, dp = plane
    with dp.client() as c:
        stream = c.generate(PROMPTS[0], "beta", max_tokens=40, ignore_eos=True)
        next(stream)
        stopper = threading.Thread(target=dp.stop)
        stopper.start()
        assert wait_for(lambda: dp.plane.generation.draining)
        rest = list(stream)
        assert rest[-1].finish_reason == gen_pb2.FINISH_REASON_LENGTH
        stopper.join(30)
    with dp.client(timeout=2) as c, pytest.raises(LoraplaneError) as e:
        tokens(c, PROMPTS[0])
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_heartbeat_and_metrics(plane, redis_url, redis_prefix, dp_factory):
    cp, _ = plane
    from loraplane.embedded_redis import free_port

    port = free_port()
    dp = dp_factory(cp.address, metrics_port=port, replica_id="metrics-dp")
    long_prompt = list(range(1, 40))  # two full KV blocks of 16 before its last token
    with dp.client() as c:
        tokens(c, PROMPTS[0], "alpha")
        first, _ = tokens(c, long_prompt, "alpha")
        assert tokens(c, long_prompt, "alpha")[0] == first  # the second time from the prefix cache
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    key = f"{redis_prefix}:{{reg}}:replica:metrics-dp"
    assert wait_for(lambda: '"alpha"' in client.hget(key, "gpu") or "")
    beat = client.hgetall(key)
    assert beat["address"] == dp.address and beat["free_slots"] == "1" and 0 < client.pttl(key) <= 600
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for series in ("vllm:lora_requests_info{", "max_lora=\"2\"", "vllm:num_requests_waiting{",
                   "vllm:kv_cache_usage_perc{", "loraplane_time_to_first_token_seconds_bucket",
                   "loraplane_adapter_requests_total{adapter=\"alpha\"}", "loraplane_requests_running",
                   "vllm:prefix_cache_queries_total{", "vllm:prefix_cache_hits_total{"):
        assert series in body, series
    assert "loraplane_prefix_cache_hits_total 32.0" in body  # 2 blocks of 16 tokens reused


def test_engine_failure_fails_the_batch_and_the_replica_keeps_serving(plane, oracle, monkeypatch):
    _, dp = plane
    runner = dp.plane.engine_loop.engine.runner
    real_run = runner.run
    calls = {"n": 0}

    def fail_once(batch):  # a fault injected into one step, as a device error would be
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected device fault")
        return real_run(batch)

    monkeypatch.setattr(runner, "run", fail_once)
    with dp.client() as c:
        with pytest.raises(LoraplaneError) as e:
            tokens(c, PROMPTS[0], "beta")
        assert e.value.code == grpc.StatusCode.INTERNAL and e.value.reason_name == "ENGINE_FAILURE"
        assert "Traceback" not in e.value.message and "injected" not in e.value.message
        assert tokens(c, PROMPTS[0], "beta")[0] == oracle[("beta", 0)]
    stats = dp.plane.engine_loop.stats
    assert wait_for(lambda: dp.plane.engine_loop.stats.running == 0) and stats.kv_usage == 0


def test_queue_time_runs_until_the_engine_schedules_the_request(cp_factory, dp_factory):
    """loraplane_request_queue_seconds is arrival to first scheduled step: with one sequence at a
    time, a request behind a long one queues for about that one's whole run (it used to be timed
    only to the hand-off to the engine thread, a few ms)."""
    cp = cp_factory()
    dp = dp_factory(cp.address, max_num_seqs=1)
    with dp.client() as c:
        first = c.generate(PROMPTS[0], max_tokens=60, ignore_eos=True)
        next(first)  # running: the next request must wait for all of it
        second = threading.Thread(target=lambda: tokens(c, PROMPTS[1]))
        second.start()
        for _ in first:
            pass
        second.join(60)
    registry = dp.plane.metrics.registry
    queued = registry.get_sample_value("loraplane_request_queue_seconds_sum")
    ttft = registry.get_sample_value("loraplane_time_to_first_token_seconds_sum")
    assert registry.get_sample_value("loraplane_request_queue_seconds_count") == 2
    assert queued >= 0.5 * ttft, (queued, ttft)


def test_metrics_bind_the_host_given_ipv6_included(cp_factory, dp_factory):
    """IPv6-only clusters need /metrics on ::; 0.0.0.0 was hard-coded (the scrape was refused)."""
    import socket

    from loraplane.embedded_redis import free_port

    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    port = free_port()
    dp_factory(cp_factory().address, metrics_port=port, metrics_host="::1")
    with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=10) as r:
        assert b"loraplane_requests_waiting" in r.read()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
