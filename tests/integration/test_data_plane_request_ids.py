"""Client request ids through the real service: a call only ever gets, and aborts, its own request.

The races these tests pin down (a retry or a duplicate queued behind a cancelled call's abort) are
made deterministic by holding the engine thread in a command while the calls are set up, so the
order the engine sees them in is fixed by the test, not by timing.
"""

from __future__ import annotations

import threading

import grpc
import pytest

from loraplane.errors import LoraplaneError
from loraplane.v1 import generation_service_pb2 as gen_pb2
from tests.integration.dp_helpers import engine_held, wait_for


@pytest.fixture
def dp(cp_factory, dp_factory):
    return dp_factory(cp_factory().address)


def request(request_id: str, max_tokens: int) -> gen_pb2.GenerateRequest:
    return gen_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=[1, 2, 3],
                                   sampling=gen_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def count_tokens(responses) -> int:
    return sum(len(r.token_ids) for r in responses)


def test_a_retry_reusing_a_cancelled_calls_id_gets_its_own_tokens(dp):
    loop, generation = dp.plane.engine_loop, dp.plane.generation
    with dp.client() as c:
        first = c.generation.Generate(request("retried", 100))
        next(first)
        with engine_held(loop):
            first.cancel()
            assert wait_for(lambda: generation.active == 0)  # its handler ended and queued its abort
            retry = []
            caller = threading.Thread(target=lambda: retry.extend(c.generation.Generate(request("retried", 8))))
            caller.start()
            assert wait_for(lambda: loop._commands.qsize() == 2)  # the abort, then the retry's add
        caller.join(60)
    assert retry[-1].finish_reason == gen_pb2.FINISH_REASON_LENGTH and count_tokens(retry) == 8
    assert all(r.request_id == "retried" for r in retry)
    assert wait_for(lambda: loop.stats.running == 0 and not loop._streams)


def test_a_duplicate_in_flight_id_is_refused_and_never_aborts_the_first_call(dp):
    loop, generation = dp.plane.engine_loop, dp.plane.generation
    with dp.client() as c:
        first = c.generate([1, 2, 3], request_id="shared", max_tokens=40, ignore_eos=True)
        head = next(first)
        with engine_held(loop):
            second = c.generation.Generate(request("shared", 4))
            # Refused at once; before the fix it was queued behind the held engine instead, and its
            # cancellation (a deadline, here the client's cancel) aborted the first call's request.
            assert wait_for(lambda: second.done() or loop._commands.qsize() == 1)
            second.cancel()
            assert wait_for(lambda: generation.active == 1)
        with pytest.raises(grpc.RpcError) as refused:
            list(second)
        error = LoraplaneError.from_rpc_error(refused.value)
        assert (error.code, error.reason_name) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        assert error.metadata == {"field": "request_id"}
        rest = list(first)
    assert rest[-1].finish_reason == gen_pb2.FINISH_REASON_LENGTH
    assert count_tokens([head, *rest]) == 40
    with dp.client() as c:  # the id is free again once its call ended
        again = list(c.generate([1, 2, 3], request_id="shared", max_tokens=2, ignore_eos=True))
    assert again[-1].finish_reason == gen_pb2.FINISH_REASON_LENGTH
