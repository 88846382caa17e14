"""The error model: one exception type, a rich gRPC status with exactly one ErrorInfo.

Servers raise LoraplaneError (or abort with it); clients get it back from any
grpc.RpcError with `LoraplaneError.from_rpc_error`.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from loraplane.v1 import errors_pb2
from loraplane.v1.errors_pb2 import ErrorReason

# The ErrorInfo domain is the proto package, so it is defined in one place: the proto.
DOMAIN = errors_pb2.DESCRIPTOR.package

_S = grpc.StatusCode
R = errors_pb2
# Each reason has one canonical status code; the table is the documented contract.
REASON_CODES: dict[int, grpc.StatusCode] = {
    R.ERROR_REASON_ADAPTER_NOT_FOUND: _S.NOT_FOUND,
    R.ERROR_REASON_ADAPTER_NOT_READY: _S.FAILED_PRECONDITION,
    R.ERROR_REASON_ADAPTER_INCOMPATIBLE: _S.FAILED_PRECONDITION,
    R.ERROR_REASON_RANK_TOO_LARGE: _S.INVALID_ARGUMENT,
    R.ERROR_REASON_UNSAFE_FORMAT: _S.INVALID_ARGUMENT,
    R.ERROR_REASON_SOURCE_UNREACHABLE: _S.UNAVAILABLE,
    R.ERROR_REASON_CAPACITY_EXHAUSTED: _S.RESOURCE_EXHAUSTED,
    R.ERROR_REASON_REGISTRY_UNAVAILABLE: _S.UNAVAILABLE,
    R.ERROR_REASON_INVALID_NAME: _S.INVALID_ARGUMENT,
    R.ERROR_REASON_ADAPTER_ALREADY_EXISTS: _S.ALREADY_EXISTS,
    R.ERROR_REASON_ADAPTER_PINNED: _S.FAILED_PRECONDITION,
    R.ERROR_REASON_INVALID_SOURCE: _S.INVALID_ARGUMENT,
    R.ERROR_REASON_SOURCE_NOT_ALLOWED: _S.PERMISSION_DENIED,
    R.ERROR_REASON_INVALID_ADAPTER_CONFIG: _S.INVALID_ARGUMENT,
    R.ERROR_REASON_CORRUPT_WEIGHTS: _S.INVALID_ARGUMENT,
    R.ERROR_REASON_UNSUPPORTED_FEATURE: _S.INVALID_ARGUMENT,
    R.ERROR_REASON_ADAPTER_TOO_LARGE: _S.INVALID_ARGUMENT,
    R.ERROR_REASON_ETAG_MISMATCH: _S.ABORTED,
    R.ERROR_REASON_UNAUTHENTICATED: _S.UNAUTHENTICATED,
    R.ERROR_REASON_INVALID_ARGUMENT: _S.INVALID_ARGUMENT,
    R.ERROR_REASON_INVALID_PAGE_TOKEN: _S.INVALID_ARGUMENT,
    R.ERROR_REASON_DIGEST_MISMATCH: _S.DATA_LOSS,
    R.ERROR_REASON_CONTROL_PLANE_UNAVAILABLE: _S.UNAVAILABLE,
    R.ERROR_REASON_SERVER_NOT_READY: _S.UNAVAILABLE,
    R.ERROR_REASON_PROMPT_TOO_LONG: _S.INVALID_ARGUMENT,
    R.ERROR_REASON_DEADLINE_EXCEEDED: _S.DEADLINE_EXCEEDED,
    R.ERROR_REASON_REQUEST_ABORTED: _S.CANCELLED,
    R.ERROR_REASON_ENGINE_FAILURE: _S.INTERNAL,
}


# The status travels in trailers, which gRPC caps at 16 KiB: a message echoing a huge request
# field would replace our status with RESOURCE_EXHAUSTED. Bounded in UTF-8 bytes.
MAX_STATUS_MESSAGE_BYTES = 1024


def _bounded(message: str) -> str:
    data = message.encode("utf-8", "replace")
    if len(data) <= MAX_STATUS_MESSAGE_BYTES:
        return message
    return data[:MAX_STATUS_MESSAGE_BYTES - 3].decode("utf-8", "ignore") + "..."


def reason_name(reason: int) -> str:
    """ERROR_REASON_ADAPTER_NOT_FOUND -> "ADAPTER_NOT_FOUND" (the ErrorInfo.reason string)."""
    return ErrorReason.Name(reason).removeprefix("ERROR_REASON_")


def reason_value(name: str) -> int:
    return ErrorReason.Value("ERROR_REASON_" + name)


class LoraplaneError(Exception):
    """An expected failure with a reason from the proto's ErrorReason enum."""

    def __init__(self, reason: int, message: str, metadata: dict[str, str] | None = None,
                 code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})
        self.code = code or REASON_CODES.get(reason, _S.UNKNOWN)

    @property
    def reason_name(self) -> str:
        return reason_name(self.reason)

    def __str__(self) -> str:
        # "UNAUTHENTICATED UNAUTHENTICATED: ..." and "UNAVAILABLE UNSPECIFIED: ..." say nothing twice.
        if self.reason_name in (self.code.name, "UNSPECIFIED"):
            return f"{self.code.name}: {self.message}"
        return f"{self.code.name} {self.reason_name}: {self.message}"

    def to_status(self) -> grpc.Status:
        info = error_details_pb2.ErrorInfo(reason=self.reason_name, domain=DOMAIN, metadata=self.metadata)
        detail = any_pb2.Any()
        detail.Pack(info)
        code = getattr(code_pb2, self.code.name)
        return rpc_status.to_status(status_pb2.Status(code=code, message=_bounded(self.message), details=[detail]))

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> LoraplaneError:
        """Rebuild the error from a failed call; statuses without ErrorInfo keep their code."""
        code = error.code() if hasattr(error, "code") else _S.UNKNOWN
        message = error.details() if hasattr(error, "details") else str(error)
        status = None
        try:
            status = rpc_status.from_call(error)
        except ValueError:
            status = None
        if status is not None:
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    try:
                        reason = reason_value(info.reason)
                    except ValueError:
                        reason = R.ERROR_REASON_UNSPECIFIED
                    return cls(reason, status.message, dict(info.metadata), code=code)
        return cls(R.ERROR_REASON_UNSPECIFIED, message or "", code=code)


async def abort(context: grpc.aio.ServicerContext, error: LoraplaneError):
    """End the RPC with the error's rich status (never returns)."""
    await context.abort_with_status(error.to_status())


def invalid_argument(field: str, message: str) -> LoraplaneError:
    return LoraplaneError(R.ERROR_REASON_INVALID_ARGUMENT, message, {"field": field})
