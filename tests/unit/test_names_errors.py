from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from loraplane.errors import LoraplaneError, reason_name
from loraplane.names import MAX_NAME_LEN, parse_reference, validate_name
from loraplane.v1 import errors_pb2 as R


@pytest.mark.parametrize("name", ["a", "llama-3_sql.v2", "0", "A" * MAX_NAME_LEN])
def test_good_names(name):
    assert validate_name(name) == name


@given(st.text(max_size=200))
def test_name_validation_is_total_and_safe(name):
    try:
        validate_name(name)
    except LoraplaneError as e:
        assert e.reason == R.ERROR_REASON_INVALID_NAME and e.code == grpc.StatusCode.INVALID_ARGUMENT
        return
    assert "/" not in name and ".." not in name and 0 < len(name) <= MAX_NAME_LEN and name.isascii()


def test_references():
    v = "sha256:" + "a" * 64
    assert parse_reference("x") == ("x", "") and parse_reference(f"x@{v}") == ("x", v)
    with pytest.raises(LoraplaneError):
        parse_reference("x@latest")


def test_status_roundtrip_keeps_code_reason_and_metadata():
    err = LoraplaneError(R.ERROR_REASON_RANK_TOO_LARGE, "rank 99 > 64", {"rank": "99"})
    status = err.to_status()
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT and reason_name(err.reason) == "RANK_TOO_LARGE"

    class FakeCall(grpc.RpcError):  # the shape grpc gives a client: code(), details(), trailing_metadata()
        def code(self):
            return status.code

        def details(self):
            return status.details

        def trailing_metadata(self):
            return status.trailing_metadata

    back = LoraplaneError.from_rpc_error(FakeCall())
    assert (back.code, back.reason, back.message, back.metadata) == (err.code, err.reason, err.message, err.metadata)
