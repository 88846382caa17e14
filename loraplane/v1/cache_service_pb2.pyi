from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CacheTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CACHE_TIER_UNSPECIFIED: _ClassVar[CacheTier]
    CACHE_TIER_GPU: _ClassVar[CacheTier]
    CACHE_TIER_CPU: _ClassVar[CacheTier]
    CACHE_TIER_DISK: _ClassVar[CacheTier]
CACHE_TIER_UNSPECIFIED: CacheTier
CACHE_TIER_GPU: CacheTier
CACHE_TIER_CPU: CacheTier
CACHE_TIER_DISK: CacheTier

class CachedAdapter(_message.Message):
    __slots__ = ("name", "version", "tiers", "slot", "pinned", "size_bytes", "active_requests")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    tiers: _containers.RepeatedScalarFieldContainer[CacheTier]
    slot: int
    pinned: bool
    size_bytes: int
    active_requests: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., tiers: _Optional[_Iterable[_Union[CacheTier, str]]] = ..., slot: _Optional[int] = ..., pinned: _Optional[bool] = ..., size_bytes: _Optional[int] = ..., active_requests: _Optional[int] = ...) -> None: ...

class ListCachedAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCachedAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "free_slots")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    FREE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[CachedAdapter]
    free_slots: int
    def __init__(self, adapters: _Optional[_Iterable[_Union[CachedAdapter, _Mapping]]] = ..., free_slots: _Optional[int] = ...) -> None: ...

class PrefetchAdapterRequest(_message.Message):
    __slots__ = ("name", "tier")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    name: str
    tier: CacheTier
    def __init__(self, name: _Optional[str] = ..., tier: _Optional[_Union[CacheTier, str]] = ...) -> None: ...

class PrefetchAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: CachedAdapter
    def __init__(self, adapter: _Optional[_Union[CachedAdapter, _Mapping]] = ...) -> None: ...

class EvictAdapterRequest(_message.Message):
    __slots__ = ("name", "tier")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    name: str
    tier: CacheTier
    def __init__(self, name: _Optional[str] = ..., tier: _Optional[_Union[CacheTier, str]] = ...) -> None: ...

class EvictAdapterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
