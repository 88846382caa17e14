"""The SDK's async client and the CLI's watch, against a real control plane."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from loraplane import AsyncClient, LoraplaneError
from loraplane.cli import main
from loraplane.v1 import adapter_pb2


def test_async_client_full_cycle(cp, good_adapter):
    async def scenario():
        async with AsyncClient(cp.address, cp.token) as c:
            a = await c.create_adapter("async-sdk", str(good_adapter), wait=True)
            assert a.state == adapter_pb2.ADAPTER_STATE_READY
            assert (await c.get_adapter("async-sdk")).version == a.version
            assert [x.name async for x in c.list_adapters(page_size=1)] == ["async-sdk"]
            assert (await c.pin_adapter("async-sdk")).pinned
            assert not (await c.unpin_adapter("async-sdk")).pinned
            assert (await c.resolve_adapter("async-sdk")).version == a.version
            assert len(await c.fetch_adapter("async-sdk", a.version)) == a.size_bytes
            events = []
            async for event in c.watch_adapters("0"):
                events.append(adapter_pb2.AdapterEventType.Name(event.type))
                if len(events) == 4:
                    break
            assert events == ["ADAPTER_EVENT_TYPE_CREATED", "ADAPTER_EVENT_TYPE_READY", "ADAPTER_EVENT_TYPE_PINNED",
                              "ADAPTER_EVENT_TYPE_UNPINNED"]
            await c.delete_adapter("async-sdk")
            with pytest.raises(LoraplaneError) as e:
                await c.get_adapter("async-sdk")
            assert e.value.code == grpc.StatusCode.NOT_FOUND

    asyncio.run(scenario())


def test_cli_watch_json_with_limit(cp, good_adapter, capsys):
    with cp.client() as c:
        c.create_adapter("watched", str(good_adapter), wait=True)
    code = main(["adapters", "--address", cp.address, "--token", cp.token, "--json", "watch", "--after", "0",
                 "--limit", "2"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and [e["type"] for e in lines] == ["ADAPTER_EVENT_TYPE_CREATED", "ADAPTER_EVENT_TYPE_READY"]
    assert all(e["name"] == "watched" and e["event_id"] for e in lines)


def test_cli_connection_flags_and_json_work_after_the_command_too(cp, good_adapter, capsys, monkeypatch):
    monkeypatch.delenv("LORAPLANE_ADMIN_TOKEN", raising=False)
    with cp.client() as c:
        c.create_adapter("placed", str(good_adapter), wait=True)
    capsys.readouterr()
    for argv in (["adapters", "--address", cp.address, "--token", cp.token, "--json", "list"],
                 ["adapters", "list", "--address", cp.address, "--token", cp.token, "--json"],
                 ["adapters", "--address", cp.address, "get", "placed", "--token", cp.token, "--json"]):
        assert main(argv) == 0, argv
        out = json.loads(capsys.readouterr().out)
        assert (out[0] if isinstance(out, list) else out)["name"] == "placed", argv
    # Given twice, the one after the command wins; the parent's stays when the command's is absent.
    assert main(["adapters", "--address", cp.address, "--token", "wrong", "list", "--token", cp.token]) == 0
    assert "placed" in capsys.readouterr().out
    assert main(["adapters", "--address", "127.0.0.1:1", "--token", cp.token, "list", "--address", cp.address]) == 0
    assert "placed" in capsys.readouterr().out


def test_cli_auth_failure_says_it_once_and_where_the_token_is(cp, capsys, monkeypatch):
    monkeypatch.delenv("LORAPLANE_ADMIN_TOKEN", raising=False)
    assert main(["adapters", "list", "--address", cp.address]) == 2
    err = capsys.readouterr().err
    assert "error: UNAUTHENTICATED: " in err and "UNAUTHENTICATED UNAUTHENTICATED" not in err
    assert "hint:" in err and "admin-token" in err
