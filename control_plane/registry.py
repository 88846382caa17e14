"""The adapter registry in Redis: records, indexes, etags, atomic transitions, events.

Every key shares the `{reg}` hash tag, so each Lua script touches one Cluster slot.
Redis is the source of truth; the event stream only tells consumers when to look again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from loraplane.errors import LoraplaneError
from loraplane.v1 import errors_pb2 as R

STATES = ("PENDING", "DOWNLOADING", "VALIDATING", "READY", "FAILED")
ACTIVE_STATES = ("PENDING", "DOWNLOADING", "VALIDATING")
EVENT_MAXLEN = 100_000
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
DROP_TIMEOUT_S = 0.5
_LUA = Path(__file__).parent / "lua"
logger = logging.getLogger(__name__)
# KEYS: adapter, artifact refs; ARGV: name, version. Atomic, so a READY in between is never missed.
_DROP_REF = """
local rec = redis.call('HMGET', KEYS[1], 'state', 'version')
if rec[1] == 'READY' and rec[2] == ARGV[2] then return 0 end
return redis.call('SREM', KEYS[2], ARGV[1])
"""
# The converse: (re)take the ref only while the record is READY at that version.
_KEEP_REF = """
local rec = redis.call('HMGET', KEYS[1], 'state', 'version')
if rec[1] ~= 'READY' or rec[2] ~= ARGV[2] then return 0 end
return redis.call('SADD', KEYS[2], ARGV[1])
"""


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass
class AdapterRecord:
    """One registry hash, typed. Field names match the proto's Adapter message."""

    name: str
    state: str = "PENDING"
    version: str = ""
    source: str = ""
    revision: str = ""
    resolved_revision: str = ""
    rank: int = 0
    alpha: float = 0.0
    target_modules: tuple[str, ...] = ()
    size_bytes: int = 0
    pinned: bool = False
    create_time: int = 0
    update_time: int = 0
    gen: int = 0
    failure_message: str = ""
    failure_reason: str = ""
    base_model: str = ""
    use_rslora: bool = False
    dtype: str = ""
    lease_owner: str = ""
    lease_until: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def etag(self) -> str:
        # create_time is in the etag so a name deleted and registered again never matches an old etag.
        return f"{self.create_time}-{self.gen}"

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> AdapterRecord:
        ints = ("rank", "size_bytes", "create_time", "update_time", "gen", "lease_until")
        kwargs = {}
        for key, value in h.items():
            if key in ints:
                kwargs[key] = int(value or 0)
            elif key == "alpha":
                kwargs[key] = float(value or 0)
            elif key in ("pinned", "use_rslora"):
                kwargs[key] = value == "1"
            elif key == "target_modules":
                kwargs[key] = tuple(m for m in value.split(",") if m)
            elif key in cls.__dataclass_fields__ and key != "extra":
                kwargs[key] = value
        return cls(**kwargs)


def fields_to_args(fields: dict) -> list[str]:
    """Flatten record fields into Lua ARGV pairs with the hash's string encoding."""
    args: list[str] = []
    for key, value in fields.items():
        if isinstance(value, bool):
            value = "1" if value else "0"
        elif isinstance(value, (tuple, list)):
            value = ",".join(value)
        args += [key, str(value)]
    return args


def _raise_if_cancelling() -> None:
    """Re-raise a cancellation redis-py swallowed. redis-py 8.1 loses a task's cancel() that lands
    inside a command more often than not (measured: 57 of 101 cancels of a task looping over ZRANGE
    and HGETALL; the command returns normally and the task runs on), which made the control plane's
    background loops outlive SIGTERM. Python 3.11+ still records the request (Task.cancelling())."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    if cancelling is not None and cancelling():
        raise asyncio.CancelledError


def _unavailable(fn):
    """Map Redis connectivity failures to REGISTRY_UNAVAILABLE; everything else propagates.

    A restarted or failed-over Redis (or one whose `timeout` dropped idle clients) leaves every idle
    pooled connection pointing at a dead socket, and redis-py only finds out when one is next used.
    So a broken connection also drops the pool's idle ones: the next call connects afresh instead of
    tripping over each stale connection in turn."""

    @functools.wraps(fn)
    async def wrapper(self: Registry, *args, **kwargs):
        try:
            result = await fn(self, *args, **kwargs)
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, redis_errors.BusyLoadingError) as e:
            _raise_if_cancelling()
            if _broken_connection(e):
                await self.drop_idle_connections()
            raise LoraplaneError(R.ERROR_REASON_REGISTRY_UNAVAILABLE, f"the registry (Redis) is unavailable: {e}") from e
        except redis_errors.ResponseError as e:
            # OOM under maxmemory/noeviction, READONLY on a demoted primary, MASTERDOWN: Redis is up but
            # will not take the command. Both refuse a script at its first write, so it wrote nothing
            # and the caller can retry; an UNKNOWN status with Redis's raw text helped no one.
            _raise_if_cancelling()
            logger.error("registry %s: Redis refused the command: %s", fn.__name__, e)
            raise LoraplaneError(R.ERROR_REASON_REGISTRY_UNAVAILABLE,
                                 f"the registry (Redis) refused the command: {e}") from e
        _raise_if_cancelling()
        return result

    return wrapper


def _broken_connection(e: Exception) -> bool:
    """A connection that broke (reset, closed by the server), not Redis refusing us on a good one."""
    return isinstance(e, redis_errors.ConnectionError) and not isinstance(e, (
        redis_errors.BusyLoadingError, redis_errors.AuthenticationError, redis_errors.AuthorizationError,
        redis_errors.MaxConnectionsError))


def _read(fn):
    """A read is sent once more after a broken connection, on a fresh one. Writes are not: a reply
    lost after Redis ran a script would run it twice, so a write reports REGISTRY_UNAVAILABLE and
    the pool is fresh for whatever the caller decides."""

    @functools.wraps(fn)
    async def once_more(self: Registry, *args, **kwargs):
        try:
            return await fn(self, *args, **kwargs)
        except redis_errors.ConnectionError as e:
            if not _broken_connection(e):
                raise
            _raise_if_cancelling()
            logger.debug("registry read %s retried on a fresh connection after: %s", fn.__name__, e)
            await self.drop_idle_connections()
            return await fn(self, *args, **kwargs)

    return _unavailable(once_more)


def _sentinel_master(url: str, opts: dict) -> aioredis.Redis:
    """A client that asks the Sentinels for the current master on every (re)connect, so a failover
    is followed without a restart."""
    from urllib.parse import unquote

    from redis.asyncio.sentinel import Sentinel

    rest = url.removeprefix("redis+sentinel://")
    auth, _, rest = rest.rpartition("@")
    hosts, _, path = rest.partition("/")
    master, _, db = path.partition("/")
    if not hosts or not master:
        raise ValueError("a Sentinel URL is redis+sentinel://[:password@]host:port[,host:port...]/master[/db]")
    password = (unquote(auth.partition(":")[2]) or None) if auth else None
    nodes = []
    for node in hosts.split(","):
        host, _, port = node.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"Sentinel host {node!r} is not host:port")
        nodes.append((host, int(port)))
    sentinel = Sentinel(nodes, socket_timeout=opts["socket_timeout"])
    return sentinel.master_for(master, password=password, db=int(db or 0), **opts)


def encode_page_token(after: str, state_filter: str) -> str:
    raw = json.dumps({"a": after, "f": state_filter}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, state_filter: str) -> str:
    bad = LoraplaneError(R.ERROR_REASON_INVALID_PAGE_TOKEN, "page_token is not one this server issued for this query",
                         {"field": "page_token"})
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise bad from None
    if not isinstance(data, dict) or data.get("f") != state_filter or not isinstance(data.get("a"), str):
        raise bad
    return data["a"]


class Registry:
    """Async access to the registry keys under `{prefix}:{reg}:`."""

    def __init__(self, client: aioredis.Redis, prefix: str = "loraplane"):
        self.client = client
        self.base = f"{prefix}:{{reg}}"
        self._scripts = {name: client.register_script((_LUA / f"{name}.lua").read_text())
                         for name in ("create", "transition", "set_pinned", "delete", "claim")}

    @classmethod
    def from_url(cls, url: str, prefix: str = "loraplane", timeout_s: float = 2.0) -> Registry:
        """redis://, rediss://, unix:// URLs, or redis+sentinel://[:password@]h1:p1,h2:p2/master[/db]."""
        opts = dict(decode_responses=True, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        if url.startswith("redis+sentinel://"):
            return cls(_sentinel_master(url, opts), prefix)
        return cls(aioredis.from_url(url, health_check_interval=10, **opts), prefix)

    # keys
    def adapter_key(self, name: str) -> str:
        return f"{self.base}:adapter:{name}"

    def state_key(self, state: str) -> str:
        return f"{self.base}:state:{state}"

    def refs_key(self, version: str) -> str:
        return f"{self.base}:artifact:{version}"

    @property
    def index_key(self) -> str:
        return f"{self.base}:adapters"

    @property
    def pinned_key(self) -> str:
        return f"{self.base}:pinned"

    @property
    def events_key(self) -> str:
        return f"{self.base}:events"

    def replica_key(self, replica_id: str) -> str:
        return f"{self.base}:replica:{replica_id}"

    @_read
    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def drop_idle_connections(self) -> None:
        """Best effort, and short: closing a socket to a dead peer (TLS waits for its reply) must not
        hold up or replace the error the caller is about to report."""
        with contextlib.suppress(redis_errors.RedisError, OSError, asyncio.TimeoutError):
            await asyncio.wait_for(self.client.connection_pool.disconnect(inuse_connections=False), DROP_TIMEOUT_S)

    async def close(self) -> None:
        await self.client.aclose()

    @_unavailable
    async def create(self, name: str, pinned: bool, fields: dict) -> AdapterRecord:
        keys = [self.adapter_key(name), self.index_key, self.events_key, self.state_key("PENDING"),
                self.state_key("FAILED"), self.pinned_key]
        res = await self._scripts["create"](keys, [name, now_us(), EVENT_MAXLEN, "1" if pinned else "0",
                                                   *fields_to_args(fields)])
        if res[0] == "EXISTS":
            raise LoraplaneError(R.ERROR_REASON_ADAPTER_ALREADY_EXISTS, f"adapter {name!r} already exists",
                                 {"name": name})
        return await self.get(name)

    @_unavailable
    async def transition(self, name: str, from_states: tuple[str, ...], to_state: str, event: str = "",
                         owner: str = "", **fields) -> bool:
        """Atomically move `name` to `to_state`; False if it is gone, elsewhere, or leased by another."""
        keys = [self.adapter_key(name), self.events_key, *(self.state_key(s) for s in STATES)]
        res = await self._scripts["transition"](
            keys, [name, now_us(), EVENT_MAXLEN, ",".join(from_states), to_state, event, owner,
                   *fields_to_args(fields)])
        return res[0] == "OK"

    @_unavailable
    async def claim(self, name: str, owner: str, lease_ms: int, force: bool = False, renew: bool = False) -> bool:
        """Take the ingest lease (free or lapsed), or with renew=True only extend one `owner` holds."""
        res = await self._scripts["claim"]([self.adapter_key(name)],
                                          [owner, time.time_ns() // 1_000_000, lease_ms, "1" if force else "0",
                                           "1" if renew else "0"])
        return res == 1

    @_unavailable
    async def add_artifact_ref(self, version: str, name: str) -> None:
        await self.client.sadd(self.refs_key(version), name)

    @_unavailable
    async def drop_artifact_ref(self, version: str, name: str) -> None:
        """Undo add_artifact_ref, unless the record of that name is READY at that version by now
        (another job for the same name made it so, and the ref is its)."""
        await self.client.eval(_DROP_REF, 2, self.adapter_key(name), self.refs_key(version), name, version)

    @_unavailable
    async def keep_artifact_ref(self, version: str, name: str) -> None:
        await self.client.eval(_KEEP_REF, 2, self.adapter_key(name), self.refs_key(version), name, version)

    @_read
    async def artifact_refs(self, version: str) -> int:
        return await self.client.scard(self.refs_key(version))

    @_read
    async def get(self, name: str) -> AdapterRecord:
        h = await self.client.hgetall(self.adapter_key(name))
        if not h:
            raise LoraplaneError(R.ERROR_REASON_ADAPTER_NOT_FOUND, f"adapter {name!r} not found", {"name": name})
        return AdapterRecord.from_hash(h)

    @_unavailable
    async def set_pinned(self, name: str, pinned: bool, etag: str = "") -> AdapterRecord:
        res = await self._scripts["set_pinned"]([self.adapter_key(name), self.pinned_key, self.events_key],
                                               [name, now_us(), EVENT_MAXLEN, etag, "1" if pinned else "0"])
        self._raise_for(res[0], name)
        return await self.get(name)

    @_unavailable
    async def delete(self, name: str, etag: str = "") -> tuple[str, int]:
        """Delete `name`; returns (its version, adapters still using that artifact)."""
        for _ in range(8):
            state, version = await self.client.hmget(self.adapter_key(name), ["state", "version"])
            if state is None:
                self._raise_for("NOT_FOUND", name)
            version = version or ""
            keys = [self.adapter_key(name), self.index_key, self.events_key, self.pinned_key,
                    self.refs_key(version or "none"), *(self.state_key(s) for s in STATES)]
            res = await self._scripts["delete"](keys, [name, now_us(), EVENT_MAXLEN, etag, version])
            if res[0] == "RETRY":  # the version changed between the read and the script
                continue
            self._raise_for(res[0], name)
            return version, int(res[2])
        raise LoraplaneError(R.ERROR_REASON_ETAG_MISMATCH, f"adapter {name!r} kept changing; try again")

    @staticmethod
    def _raise_for(status: str, name: str) -> None:
        if status == "OK":
            return
        if status == "NOT_FOUND":
            raise LoraplaneError(R.ERROR_REASON_ADAPTER_NOT_FOUND, f"adapter {name!r} not found", {"name": name})
        if status == "ETAG":
            raise LoraplaneError(R.ERROR_REASON_ETAG_MISMATCH,
                                 f"adapter {name!r} changed since that etag; get it again", {"name": name})
        if status == "PINNED":
            raise LoraplaneError(R.ERROR_REASON_ADAPTER_PINNED,
                                 f"adapter {name!r} is pinned; unpin it before deleting", {"name": name})
        raise RuntimeError(f"unexpected registry script status {status!r}")

    @_read
    async def list(self, page_size: int, page_token: str, state_filter: str = "") -> tuple[list[AdapterRecord], str, int]:
        """One page in name order; cost is proportional to the page, not the registry."""
        key = self.state_key(state_filter) if state_filter else self.index_key
        start = "-"
        if page_token:
            start = "(" + decode_page_token(page_token, state_filter)
        names = await self.client.zrangebylex(key, start, "+", start=0, num=page_size + 1)
        more = len(names) > page_size
        names = names[:page_size]
        async with self.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(self.adapter_key(name))
            pipe.zcard(key)
            results = await pipe.execute()
        total = results.pop()
        records = [AdapterRecord.from_hash(h) for h in results if h]
        token = encode_page_token(names[-1], state_filter) if more and names else ""
        return records, token, total

    @_read
    async def names_in(self, state: str) -> list[str]:
        return await self.client.zrange(self.state_key(state), 0, -1)

    @_read
    async def pinned_names(self) -> list[str]:
        return await self.client.zrange(self.pinned_key, 0, -1)

    @_unavailable
    async def read_events(self, after_id: str, block_ms: int, count: int = 100) -> list[tuple[str, dict]]:
        """Events after `after_id` ("$" = only new ones), waiting up to block_ms for the first."""
        res = await self.client.xread({self.events_key: after_id}, count=count, block=block_ms)
        return [(eid, data) for _, entries in res for eid, data in entries]

    @_read
    async def last_event_id(self) -> str:
        entries = await self.client.xrevrange(self.events_key, count=1)
        return entries[0][0] if entries else "0-0"
