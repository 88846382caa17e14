from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor

class HealthProbe(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEALTH_PROBE_UNSPECIFIED: _ClassVar[HealthProbe]
    HEALTH_PROBE_LIVENESS: _ClassVar[HealthProbe]
    HEALTH_PROBE_STARTUP: _ClassVar[HealthProbe]
    HEALTH_PROBE_READINESS: _ClassVar[HealthProbe]
HEALTH_PROBE_UNSPECIFIED: HealthProbe
HEALTH_PROBE_LIVENESS: HealthProbe
HEALTH_PROBE_STARTUP: HealthProbe
HEALTH_PROBE_READINESS: HealthProbe
