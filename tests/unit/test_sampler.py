"""The sampler alone (hand-made logits), and seeded sampling through the engine."""

from __future__ import annotations

import math

import pytest
import torch

from data_plane.engine.request import Request, SamplingParams
from data_plane.engine.sampler import ARGMAX_BLOCK, Sampler, greedy_tokens
from tests.unit.engine_helpers import (  # noqa: F401 - fixtures
    artifacts,
    make_engine,
    one_thread,
    random_prompts,
)

pytestmark = pytest.mark.usefixtures("one_thread")
PROBS = torch.tensor([0.05, 0.5, 0.3, 0.15])  # token 1 most likely, then 2, 3, 0


def request(seed=0, **params) -> Request:
    return Request("r", [1], SamplingParams(**params), None, generator=torch.Generator().manual_seed(seed))


def draws(n: int, **params) -> torch.Tensor:
    req = request(**params)
    logits = PROBS.log()[None, :]
    return torch.tensor([Sampler()(logits.clone(), [req])[0] for _ in range(n)])


def test_greedy_is_argmax_per_row():
    logits = torch.randn(5, 50)
    reqs = [request() for _ in range(5)]
    assert Sampler()(logits, reqs) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("vocab", [ARGMAX_BLOCK * 250, ARGMAX_BLOCK * 3 + 5])  # blocked, and the fallback
def test_greedy_tokens_take_the_first_maximum_like_max(vocab):
    torch.manual_seed(0)
    logits = torch.randn(8, vocab)
    logits[1, 7] = logits[1, ARGMAX_BLOCK + 3] = logits[1, -1] = 50.0    # ties across blocks: first wins
    logits[2, 10] = logits[2, 11] = 50.0                                 # ties within a block
    logits[3, 5], logits[3, -2] = float("nan"), float("nan")             # NaN is a maximum, as in max
    logits[4] = float("-inf")
    logits[5, -1] = 1e30                                                 # the last column
    expected = logits.max(dim=-1).indices
    assert expected[1] == 7 and expected[3] == 5 and expected[5] == vocab - 1
    assert torch.equal(greedy_tokens(logits), expected)


def test_temperature_one_follows_the_distribution():
    counts = torch.bincount(draws(4000, temperature=1.0), minlength=4).float() / 4000
    torch.testing.assert_close(counts, PROBS, atol=0.03, rtol=0)


def test_top_k_and_top_p_restrict_the_support():
    assert set(draws(500, temperature=1.0, top_k=2).tolist()) == {1, 2}
    assert set(draws(500, temperature=1.0, top_k=1).tolist()) == {1}
    # top_p 0.75: tokens 1 (0.5) and 2 (0.3) reach it; 3 and 0 come after the mass is reached.
    assert set(draws(500, temperature=1.0, top_p=0.75).tolist()) == {1, 2}
    assert set(draws(500, temperature=1.0, top_p=0.4).tolist()) == {1}
    assert set(draws(1500, temperature=1.0).tolist()) == {0, 1, 2, 3}


def test_low_temperature_sharpens_and_high_temperature_flattens():
    sharp = (draws(1000, temperature=0.2) == 1).float().mean().item()
    flat = (draws(1000, temperature=5.0) == 1).float().mean().item()
    expected_sharp = PROBS[1] ** 5 / (PROBS ** 5).sum()
    assert math.isclose(sharp, expected_sharp.item(), abs_tol=0.04)
    assert flat < 0.35


def test_same_seed_same_draws_and_rows_are_independent():
    a = draws(50, seed=3, temperature=1.0)
    assert torch.equal(a, draws(50, seed=3, temperature=1.0))
    assert not torch.equal(a, draws(50, seed=4, temperature=1.0))
    logits = torch.randn(3, 100)
    alone = Sampler()(logits[1:2].clone(), [request(seed=9, temperature=0.8, top_p=0.9)])
    batch = Sampler()(logits.clone(), [request(seed=1, temperature=1.0), request(seed=9, temperature=0.8, top_p=0.9),
                                       request(seed=2)])
    assert batch[1] == alone[0]


def test_seeded_request_is_batch_invariant_through_the_engine(artifacts):  # noqa: F811
    model = artifacts.model("llama")
    adapter = artifacts.adapter(model, r=8, target_modules=("q_proj", "down_proj"), seed=21)
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=40, seed=1234, ignore_eos=True)
    prompt = random_prompts([11], seed=22)[0]

    alone = make_engine(model, {"x": adapter})
    rid = alone.add_request(prompt, seeded, "x")
    expected = _tokens(alone)[rid]

    crowded = make_engine(model, {"x": adapter})
    others = random_prompts([5, 23, 8], seed=23)
    crowded.add_request(others[0], SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True), "x")
    crowded.add_request(others[1], SamplingParams(max_tokens=9, ignore_eos=True))
    for _ in range(3):
        crowded.step()
    rid = crowded.add_request(prompt, seeded, "x")  # arrives mid-decode, into a different batch
    crowded.add_request(others[2], SamplingParams(max_tokens=30, temperature=1.3, seed=5, ignore_eos=True))
    assert _tokens(crowded)[rid] == expected

    reseeded = make_engine(model, {"x": adapter})
    rid = reseeded.add_request(prompt, SamplingParams(**{**seeded.__dict__, "seed": 99}), "x")
    assert _tokens(reseeded)[rid] != expected


def _tokens(engine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    return tokens


def test_a_temperature_below_the_epsilon_is_greedy_and_a_huge_top_k_keeps_everything():
    """Both used to fail the step (NaN probabilities; a top_k that does not fit a tensor)."""
    logits = PROBS.log()[None, :]
    assert Sampler()(logits.clone(), [request(temperature=1e-40)])[0] == 1
    assert draws(200, temperature=1.0, top_k=2**63, seed=3).tolist() == draws(200, temperature=1.0, seed=3).tolist()
