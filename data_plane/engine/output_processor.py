"""After a step: append each request's new token, decide whether it finished, build its delta.

Stop strings are searched in the decoded text and cut from it; text that might be the start
of a stop string is held back until it is known not to be, so a streamed delta never has to
be taken back.
"""

from __future__ import annotations

from data_plane.engine.detokenizer import IncrementalDetokenizer
from data_plane.engine.request import FinishReason, Request, RequestOutput


class OutputProcessor:
    def __init__(self, eos_token_ids: tuple[int, ...], max_model_len: int):
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}

    def track(self, request: Request, detokenizer: IncrementalDetokenizer | None) -> None:
        if detokenizer is not None:
            self.detokenizers[request.request_id] = detokenizer

    def forget(self, request: Request) -> None:
        self.detokenizers.pop(request.request_id, None)

    def append_token(self, request: Request, token_id: int) -> FinishReason | None:
        """Record the token and the text it adds; return why the request finished, if it did."""
        request.output_token_ids.append(token_id)
        params = request.sampling
        detokenizer = self.detokenizers.get(request.request_id)
        if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self.eos_token_ids):
            reason = FinishReason.STOP
        else:
            if detokenizer is not None and self._add_text(request, detokenizer.add(token_id)):
                return FinishReason.STOP
            if len(request.output_token_ids) < params.max_tokens and request.num_tokens < self.max_model_len:
                return None
            reason = FinishReason.LENGTH
        # Text still held for an unfinished character can hold a stop string too ("D\ufffd" after
        # "EN" with stop "END"): flush it through the same check, which makes the end a STOP.
        if detokenizer is not None and self._add_text(request, detokenizer.flush()):
            return FinishReason.STOP
        return reason

    def _add_text(self, request: Request, text: str) -> bool:
        """Append decoded text; True when it completed a stop string (the text is cut there and the
        detokenizer dropped: nothing after a stop string is ever emitted)."""
        old_len = len(request.text)
        request.text += text
        if request.sampling.stop and _cut_stop_string(request, old_len):
            del self.detokenizers[request.request_id]
            return True
        return False

    def output(self, request: Request, reason: FinishReason | None) -> RequestOutput:
        """The delta since the last output; with `reason` set, the request's final output."""
        detokenizer = self.detokenizers.get(request.request_id)
        if reason is not None and detokenizer is not None:
            request.text += detokenizer.flush()
        end = len(request.text) if reason is not None else len(request.text) - _held_back(request)
        text = request.text[request.num_sent_chars:end]
        tokens = tuple(request.output_token_ids[request.num_sent_tokens:])
        request.num_sent_chars = max(request.num_sent_chars, end)
        request.num_sent_tokens = len(request.output_token_ids)
        return RequestOutput(
            request_id=request.request_id, token_ids=tokens, text=text, finished=reason is not None,
            finish_reason=reason, prompt_tokens=request.num_prompt_tokens,
            completion_tokens=len(request.output_token_ids), adapter=request.adapter,
            first_scheduled=request.first_scheduled)


def _cut_stop_string(request: Request, old_len: int) -> bool:
    """Truncate request.text at the first stop string that the new text completed."""
    longest = max(len(s) for s in request.sampling.stop)
    start = max(0, old_len - longest + 1)
    hits = [i for s in request.sampling.stop if (i := request.text.find(s, start)) >= 0]
    if not hits:
        return False
    request.text = request.text[:min(hits)]
    return True


def _held_back(request: Request) -> int:
    """Length of the longest text suffix that is a proper prefix of a stop string."""
    text = request.text
    best = 0
    for stop in request.sampling.stop:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
