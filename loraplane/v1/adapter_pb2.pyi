import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from loraplane.v1 import errors_pb2 as _errors_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdapterState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_STATE_UNSPECIFIED: _ClassVar[AdapterState]
    ADAPTER_STATE_PENDING: _ClassVar[AdapterState]
    ADAPTER_STATE_DOWNLOADING: _ClassVar[AdapterState]
    ADAPTER_STATE_VALIDATING: _ClassVar[AdapterState]
    ADAPTER_STATE_READY: _ClassVar[AdapterState]
    ADAPTER_STATE_FAILED: _ClassVar[AdapterState]

class AdapterEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_EVENT_TYPE_UNSPECIFIED: _ClassVar[AdapterEventType]
    ADAPTER_EVENT_TYPE_CREATED: _ClassVar[AdapterEventType]
    ADAPTER_EVENT_TYPE_READY: _ClassVar[AdapterEventType]
    ADAPTER_EVENT_TYPE_UPDATED: _ClassVar[AdapterEventType]
    ADAPTER_EVENT_TYPE_FAILED: _ClassVar[AdapterEventType]
    ADAPTER_EVENT_TYPE_DELETED: _ClassVar[AdapterEventType]
    ADAPTER_EVENT_TYPE_PINNED: _ClassVar[AdapterEventType]
    ADAPTER_EVENT_TYPE_UNPINNED: _ClassVar[AdapterEventType]
ADAPTER_STATE_UNSPECIFIED: AdapterState
ADAPTER_STATE_PENDING: AdapterState
ADAPTER_STATE_DOWNLOADING: AdapterState
ADAPTER_STATE_VALIDATING: AdapterState
ADAPTER_STATE_READY: AdapterState
ADAPTER_STATE_FAILED: AdapterState
ADAPTER_EVENT_TYPE_UNSPECIFIED: AdapterEventType
ADAPTER_EVENT_TYPE_CREATED: AdapterEventType
ADAPTER_EVENT_TYPE_READY: AdapterEventType
ADAPTER_EVENT_TYPE_UPDATED: AdapterEventType
ADAPTER_EVENT_TYPE_FAILED: AdapterEventType
ADAPTER_EVENT_TYPE_DELETED: AdapterEventType
ADAPTER_EVENT_TYPE_PINNED: AdapterEventType
ADAPTER_EVENT_TYPE_UNPINNED: AdapterEventType

class Adapter(_message.Message):
    __slots__ = ("name", "version", "state", "failure_message", "failure_reason", "source", "revision", "resolved_revision", "rank", "alpha", "target_modules", "size_bytes", "pinned", "create_time", "update_time", "etag", "base_model", "use_rslora", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FAILURE_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_REVISION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    USE_RSLORA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    state: AdapterState
    failure_message: str
    failure_reason: _errors_pb2.ErrorReason
    source: str
    revision: str
    resolved_revision: str
    rank: int
    alpha: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    size_bytes: int
    pinned: bool
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    etag: str
    base_model: str
    use_rslora: bool
    dtype: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., state: _Optional[_Union[AdapterState, str]] = ..., failure_message: _Optional[str] = ..., failure_reason: _Optional[_Union[_errors_pb2.ErrorReason, str]] = ..., source: _Optional[str] = ..., revision: _Optional[str] = ..., resolved_revision: _Optional[str] = ..., rank: _Optional[int] = ..., alpha: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., size_bytes: _Optional[int] = ..., pinned: _Optional[bool] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., etag: _Optional[str] = ..., base_model: _Optional[str] = ..., use_rslora: _Optional[bool] = ..., dtype: _Optional[str] = ...) -> None: ...

class AdapterManifest(_message.Message):
    __slots__ = ("name", "version", "size_bytes", "rank", "target_modules", "dtype", "base_model", "pinned")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    size_bytes: int
    rank: int
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    dtype: str
    base_model: str
    pinned: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., size_bytes: _Optional[int] = ..., rank: _Optional[int] = ..., target_modules: _Optional[_Iterable[str]] = ..., dtype: _Optional[str] = ..., base_model: _Optional[str] = ..., pinned: _Optional[bool] = ...) -> None: ...

class AdapterEvent(_message.Message):
    __slots__ = ("event_id", "type", "name", "version", "time")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    type: AdapterEventType
    name: str
    version: str
    time: _timestamp_pb2.Timestamp
    def __init__(self, event_id: _Optional[str] = ..., type: _Optional[_Union[AdapterEventType, str]] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
