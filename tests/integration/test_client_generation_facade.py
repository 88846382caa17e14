"""The SDK's data-plane facade (Client and AsyncClient alike) against a real control plane, Redis
and data plane: stop strings, prompt types, generate_text and the cache service methods."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from loraplane import AsyncClient, Client, LoraplaneError
from loraplane.client import generate_request
from loraplane.v1 import cache_service_pb2 as cache_pb2
from loraplane.v1 import generation_service_pb2 as gen_pb2

PROMPT = [5, 17, 42, 99, 7]
DP_TOKEN = "dp-admin-token"


@pytest.fixture
def plane(cp_factory, dp_factory, good_adapter):
    cp = cp_factory()
    with cp.client() as c:
        c.create_adapter("facade", str(good_adapter), wait=True)
    return cp, dp_factory(cp.address, admin_token=DP_TOKEN)


def test_a_single_stop_string_is_one_stop_string_not_its_characters():
    assert list(generate_request("x", stop="END").sampling.stop) == ["END"]
    assert list(generate_request("x", stop=["END", "STOP"]).sampling.stop) == ["END", "STOP"]
    assert list(generate_request("x", stop=("a",)).sampling.stop) == ["a"]
    assert list(generate_request("x").sampling.stop) == []


@pytest.mark.parametrize("prompt", [b"hello", bytearray(b"hello")])
def test_a_bytes_prompt_is_refused_not_sent_as_token_ids(prompt):
    with pytest.raises(TypeError, match=r"str .*list of ints"):
        generate_request(prompt)


def _stop_string_past_its_characters(text: str) -> str:
    """A substring of `text` first found at p > 0 with one of its characters already in text[:p]:
    stopping at it leaves text[:p], stopping at any of its characters leaves less."""
    for length in (3, 2, 4):
        for p in range(1, len(text) - length + 1):
            s = text[p:p + length]
            if "\ufffd" not in s and text.index(s) == p and any(ch in text[:p] for ch in s):
                return s
    pytest.skip(f"no usable stop string in the tiny model's greedy text {text!r}")


def test_stop_string_and_bytes_prompt_against_the_data_plane(plane):
    _, dp = plane
    with Client(dp.address) as c:
        text, last = c.generate_text(PROMPT, "facade", max_tokens=24, ignore_eos=True)
        assert last.finish_reason == gen_pb2.FINISH_REASON_LENGTH
        stop = _stop_string_past_its_characters(text)
        cut, last = c.generate_text(PROMPT, "facade", max_tokens=24, ignore_eos=True, stop=stop)
        assert (cut, last.finish_reason) == (text[:text.index(stop)], gen_pb2.FINISH_REASON_STOP)
        with pytest.raises(TypeError, match="list of ints"):
            c.generate_text(b"\x05\x11", "facade", max_tokens=2)

    async def scenario():
        async with AsyncClient(dp.address) as ac:
            cut, last = await ac.generate_text(PROMPT, "facade", max_tokens=24, ignore_eos=True, stop=stop)
            assert (cut, last.finish_reason) == (text[:text.index(stop)], gen_pb2.FINISH_REASON_STOP)
            with pytest.raises(TypeError, match="list of ints"):
                await ac.generate_text(b"\x05\x11", "facade", max_tokens=2)

    asyncio.run(scenario())


def test_async_client_has_the_data_plane_methods_of_client(plane):
    _, dp = plane
    for name in ("generate_text", "list_cached_adapters", "prefetch_adapter", "evict_adapter"):
        assert hasattr(AsyncClient, name), name
    CPU = cache_pb2.CACHE_TIER_CPU

    def tiers(listed) -> list[int]:
        return [t for a in listed.adapters if a.name == "facade" for t in a.tiers]

    async def scenario():
        async with AsyncClient(dp.address, DP_TOKEN) as ac:
            assert tiers(await ac.list_cached_adapters()) == []
            cached = await ac.prefetch_adapter("facade", CPU)
            assert cached.name == "facade" and CPU in cached.tiers and cached.version.startswith("sha256:")
            listed = await ac.list_cached_adapters()
            assert isinstance(listed, cache_pb2.ListCachedAdaptersResponse) and CPU in tiers(listed)
            assert await ac.evict_adapter("facade", CPU) is None
            assert CPU not in tiers(await ac.list_cached_adapters())
            with pytest.raises(LoraplaneError) as e:
                await ac.prefetch_adapter("nobody")
            assert e.value.code == grpc.StatusCode.NOT_FOUND
            return await ac.generate_text(PROMPT, "facade", max_tokens=6, ignore_eos=True)

    text, last = asyncio.run(scenario())
    with Client(dp.address) as c:
        expected_text, expected_last = c.generate_text(PROMPT, "facade", max_tokens=6, ignore_eos=True)
    assert isinstance(text, str) and text == expected_text
    assert last.usage.completion_tokens == 6 and last.finish_reason == gen_pb2.FINISH_REASON_LENGTH
    assert last.adapter_version == expected_last.adapter_version and last.adapter_version.startswith("sha256:")

    async def anonymous():  # the cache service needs the data plane's token, and says so
        async with AsyncClient(dp.address) as ac:
            with pytest.raises(LoraplaneError) as e:
                await ac.list_cached_adapters()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED

    asyncio.run(anonymous())
