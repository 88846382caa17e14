"""Text in and out: tokenizer prompts, UTF-8 streaming deltas, stop strings, stop tokens, EOS."""

from __future__ import annotations

import pytest

from data_plane.engine.detokenizer import IncrementalDetokenizer
from data_plane.engine.output_processor import OutputProcessor
from data_plane.engine.request import FinishReason, Request, SamplingParams
from loraplane.errors import LoraplaneError
from tests.unit.engine_helpers import artifacts, make_engine, one_thread  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine(artifacts):  # noqa: F811
    return make_engine(artifacts.model("llama", tokenizer=True), max_loras=1)


def stream(engine, prompt, params):
    """(token ids, text deltas, finish reason) of one request, step by step."""
    rid = engine.add_request(prompt, params)
    tokens, deltas, reason = [], [], None
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == rid
            tokens.extend(out.token_ids)
            deltas.append(out.text)
            reason = out.finish_reason
    return tokens, deltas, reason


def test_detokenizer_holds_partial_characters_back(engine):
    tok = engine.tokenizer
    text = "ok 日本語 🎉 done"  # none of these characters is in the tokenizer's training corpus
    ids = tok(text).input_ids
    assert len(ids) > len(text)  # multi-byte characters split over several byte tokens
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.add(t) for t in ids]
    assert "".join(deltas) + detok.flush() == text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas.count("") >= 6  # the byte tokens that do not finish a character emit nothing
    assert any(len(d.encode()) >= 3 for d in deltas)  # whole characters at once


def test_detokenizer_uses_prompt_as_context(engine):
    tok = engine.tokenizer
    prompt, rest = tok("héllo").input_ids, tok(" wörld, ça va").input_ids
    detok = IncrementalDetokenizer(tok, prompt)
    assert "".join(detok.add(t) for t in rest) + detok.flush() == " wörld, ça va"


def test_text_prompt_and_streamed_text_equal_decode(engine):
    tokens, deltas, reason = stream(engine, "hello world, the quick", SamplingParams(max_tokens=40, ignore_eos=True))
    assert reason is FinishReason.LENGTH and len(tokens) == 40
    assert "".join(deltas) == engine.tokenizer.decode(tokens, skip_special_tokens=True)


def test_stop_string_ends_output_and_is_not_streamed(engine):
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    _, deltas, _ = stream(engine, "the lazy dog", params)
    full = "".join(deltas)
    stop = full[20:24]
    assert len(stop) == 4 and stop.strip()
    cut = full[:full.find(stop)]
    tokens, deltas, reason = stream(engine, "the lazy dog", SamplingParams(max_tokens=60, ignore_eos=True,
                                                                            stop=("no-such-text", stop)))
    assert reason is FinishReason.STOP
    assert "".join(deltas) == cut
    assert all(stop not in d for d in deltas)
    assert len(tokens) < 60


def test_stop_token_id_is_kept_in_tokens(engine):
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    reference, _, _ = stream(engine, "naïve café", params)
    stop_id = reference[5]
    first = reference.index(stop_id)
    tokens, _, reason = stream(engine, "naïve café", SamplingParams(max_tokens=30, ignore_eos=True,
                                                                   stop_token_ids=(stop_id,)))
    assert reason is FinishReason.STOP and tokens == reference[:first + 1]


def test_eos_stops_unless_ignored():
    processor = OutputProcessor(eos_token_ids=(7,), max_model_len=100)
    stops = Request("a", [1, 2], SamplingParams(max_tokens=5), None)
    assert processor.append_token(stops, 3) is None
    assert processor.append_token(stops, 7) is FinishReason.STOP
    ignores = Request("b", [1, 2], SamplingParams(max_tokens=2, ignore_eos=True), None)
    assert processor.append_token(ignores, 7) is None
    assert processor.append_token(ignores, 7) is FinishReason.LENGTH


def test_a_loaded_tokenizer_is_settled_before_threads_share_it(tmp_path):
    import json

    from data_plane.engine.detokenizer import load_tokenizer
    from tests.unit.engine_helpers import TOKENIZER_VOCAB, save_test_tokenizer

    save_test_tokenizer(tmp_path, TOKENIZER_VOCAB)
    config = json.loads((tmp_path / "tokenizer.json").read_text())
    config["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    (tmp_path / "tokenizer.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    # Already off: no encode from a worker thread has to change the Rust tokenizer (a mutable borrow).
    assert tok._tokenizer.truncation is None and tok._tokenizer.padding is None
    assert len(tok("hello world " * 20).input_ids) > 8


class _CharTokenizer:
    """One character per token id: lets the hold-back logic be driven exactly."""

    def decode(self, ids, **_):
        return "".join(chr(i) for i in ids)


def test_text_that_may_start_a_stop_string_is_held_back():
    processor = OutputProcessor(eos_token_ids=(), max_model_len=100)
    request = Request("r", [ord(">")], SamplingParams(max_tokens=20, stop=("END",)), None)
    processor.track(request, IncrementalDetokenizer(_CharTokenizer(), request.prompt_token_ids))
    sent = []
    for ch in "abEN":
        assert processor.append_token(request, ord(ch)) is None
        sent.append(processor.output(request, None).text)
    assert sent == ["a", "b", "", ""]  # "E", then "EN", could begin "END"
    assert processor.append_token(request, ord("x")) is None
    assert processor.output(request, None).text == "ENx"  # it did not
    processor.append_token(request, ord("E"))
    processor.output(request, None)
    assert processor.append_token(request, ord("N")) is None
    assert processor.append_token(request, ord("D")) is FinishReason.STOP
    final = processor.output(request, FinishReason.STOP)
    assert final.text == "" and final.finished and request.text == "abENx"


class _PieceTokenizer:
    """Token ids name byte strings, decoded as a byte-level BPE tokenizer does (errors="replace")."""

    PIECES = {1: b"EN", 2: b"D\xe6", 3: b"x", 9: b""}

    def decode(self, ids, **_):
        return b"".join(self.PIECES[i] for i in ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("last", ["length", "eos"])
def test_a_stop_string_in_text_held_for_an_unfinished_character_still_stops(last):
    # "D\xe6" completes "END" but ends in a partial character, so the detokenizer holds it; the
    # request then ends (max_tokens, or EOS) and the held text is flushed: it must be stop-checked.
    processor = OutputProcessor(eos_token_ids=(9,), max_model_len=100)
    request = Request("r", [3], SamplingParams(max_tokens=2 if last == "length" else 5, stop=("END",)), None)
    processor.track(request, IncrementalDetokenizer(_PieceTokenizer(), request.prompt_token_ids))
    assert processor.append_token(request, 1) is None
    assert processor.output(request, None).text == ""  # "EN" may begin "END"
    if last == "length":
        reason = processor.append_token(request, 2)
    else:
        assert processor.append_token(request, 2) is None
        reason = processor.append_token(request, 9)
    assert reason is FinishReason.STOP
    final = processor.output(request, reason)
    assert final.text == "" and request.text == ""


def test_a_prompt_the_tokenizer_maps_past_the_vocabulary_is_refused(artifacts):  # noqa: F811
    """A tokenizer with tokens the embeddings never grew for (added tokens, or the wrong tokenizer):
    refused at add_request, where it used to fail the whole step and every request batched with it."""
    from tests.unit.engine_helpers import TOKENIZER_VOCAB

    small = artifacts.model("llama", vocab_size=TOKENIZER_VOCAB - 64)
    engine = make_engine(small, max_loras=1, tokenizer=str(artifacts.model("llama", tokenizer=True)))
    ok = engine.add_request([1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
    with pytest.raises(LoraplaneError) as err:
        engine.add_request("hello world, the quick brown fox", SamplingParams(max_tokens=4))
    assert err.value.metadata["field"] == "prompt" and "vocabulary" in str(err.value)
    done = {out.request_id: out for _ in range(8) for out in engine.step() if out.finished}
    assert done[ok].completion_tokens == 4


def test_stop_strings_without_a_tokenizer_are_refused_and_one_string_is_one_stop(artifacts):  # noqa: F811
    engine = make_engine(artifacts.model("llama"), max_loras=1)
    with pytest.raises(LoraplaneError) as err:
        engine.add_request([1, 2, 3], SamplingParams(stop=["END"]))
    assert err.value.metadata["field"] == "stop"
    assert SamplingParams(stop="END").stop == ("END",)


def test_a_tokenizer_path_given_by_name_must_hold_a_tokenizer(artifacts, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="no tokenizer files"):
        make_engine(artifacts.model("llama"), max_loras=1, tokenizer=str(tmp_path / "typo"))
