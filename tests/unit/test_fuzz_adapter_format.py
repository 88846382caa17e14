"""Structured fuzzing of what an uploaded adapter controls: adapter_config.json and the
safetensors header. Random bytes rarely get past the first check; these inputs are shaped like
the real thing so every branch gets hostile values. Properties: every input is accepted or
refused with a LoraplaneError of a documented reason (never another exception, never a hang),
and what is accepted is safe to use (the real safetensors parser reads it, tensors are finite).
"""

from __future__ import annotations

import json
import math
import struct
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from loraplane.adapter_format import check_safetensors_header, normalize_peft, parse_adapter_config
from loraplane.errors import LoraplaneError
from loraplane.model_spec import ModelSpec
from tests.factories import make_peft_adapter, make_tiny_model

HEADER_REASONS = {"CORRUPT_WEIGHTS", "UNSUPPORTED_FEATURE"}
CONFIG_REASONS = {"INVALID_ADAPTER_CONFIG", "UNSUPPORTED_FEATURE"}
NORMALIZE_REASONS = {"INVALID_ADAPTER_CONFIG", "UNSUPPORTED_FEATURE", "CORRUPT_WEIGHTS", "ADAPTER_INCOMPATIBLE",
                     "RANK_TOO_LARGE"}

anything = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8)


# ---- safetensors headers ----------------------------------------------------------------------

def frame(header, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


dims = st.one_of(st.integers(min_value=0, max_value=6), st.integers(min_value=-3, max_value=-1),
                 st.integers(min_value=2**31, max_value=2**64), st.floats(allow_nan=True), st.text(max_size=3),
                 st.none(), st.lists(st.integers(0, 3), max_size=2))
entry = st.fixed_dictionaries({}, optional={
    "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I8", "F64", "U8", "BOOL", "f32"]), anything),
    "shape": st.one_of(st.lists(dims, max_size=3), anything),
    "data_offsets": st.one_of(
        st.lists(st.integers(min_value=-8, max_value=200), min_size=2, max_size=2),
        st.lists(st.one_of(st.integers(-8, 200), st.floats(allow_nan=True), st.text(max_size=2), st.none()),
                 max_size=3),
        anything),
})
headers = st.dictionaries(st.one_of(st.text(max_size=10), st.just("__metadata__")),
                          st.one_of(entry, anything), max_size=4)


@settings(max_examples=600, deadline=None)
@given(header=headers, data=st.binary(max_size=200))
def test_structured_safetensors_headers_are_accepted_or_refused_cleanly(header, data):
    blob = frame(header, data)
    try:
        accepted = check_safetensors_header(blob)
    except LoraplaneError as e:
        assert e.reason_name in HEADER_REASONS, e
        return
    assert isinstance(accepted, dict)
    # What the check accepts, the real parser either reads or refuses with its own error, which
    # every caller turns into CORRUPT_WEIGHTS; nothing else may escape it.
    try:
        st_load(blob)
    except SafetensorError:
        pass


def _real_blob() -> bytes:
    torch.manual_seed(0)
    return st_save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 64),
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(64, 4)},
                   metadata={"format": "pt"})


REAL = _real_blob()
HEADER_END = 8 + struct.unpack("<Q", REAL[:8])[0]


@settings(max_examples=600, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, HEADER_END + 16), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, len(REAL))), extra=st.binary(max_size=16))
def test_mutated_real_safetensors_never_escape_as_other_errors(edits, cut, extra):
    blob = bytearray(REAL)
    for pos, value in edits:
        blob[pos] = value
    blob = bytes(blob[:cut] if cut is not None else blob) + extra
    try:
        check_safetensors_header(blob)
    except LoraplaneError as e:
        assert e.reason_name in HEADER_REASONS
        return
    try:
        st_load(blob)
    except SafetensorError:
        pass


@pytest.mark.parametrize("header", [
    {"t": {"dtype": "F32", "shape": 5, "data_offsets": [0, 4]}},
    {"t": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}},
    {"t": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}},
    {"t": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}},
    {"t": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
    {"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},  # a gap before the first tensor
    {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
     "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},  # two tensors on the same bytes
])
def test_malformed_entries_are_corrupt_weights(header):
    with pytest.raises(LoraplaneError) as e:
        check_safetensors_header(frame(header, b"\0" * 8))
    assert e.value.reason_name == "CORRUPT_WEIGHTS"


# ---- adapter_config.json ------------------------------------------------------------------------

config_values = st.one_of(anything, st.integers(min_value=1, max_value=64), st.sampled_from([
    float("inf"), float("-inf"), float("nan"), 1e308, 1e-308, 0, -1, True, "q_proj", ["q_proj", "v_proj"], "all-linear"]))
patterns = st.dictionaries(st.one_of(st.sampled_from(["q_proj", "v_proj", "layers.0.self_attn.q_proj", "^model",
                                                       "(", "[", "a{2,", "(.*)*x", "q_proj|v_proj", ".*"]),
                                     st.text(max_size=10)),
                           config_values, max_size=3)
configs = st.fixed_dictionaries(
    {"r": st.one_of(st.integers(1, 16), config_values),
     "lora_alpha": st.one_of(st.floats(0.5, 64), config_values),
     "target_modules": st.one_of(st.just(["q_proj", "v_proj"]), config_values)},
    optional={"rank_pattern": st.one_of(patterns, config_values), "alpha_pattern": st.one_of(patterns, config_values),
              "use_rslora": config_values, "layers_to_transform": config_values, "bias": config_values,
              "peft_type": config_values, "fan_in_fan_out": config_values, "use_dora": config_values})

MODULE_PATHS = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.10.mlp.up_proj"]


@settings(max_examples=800, deadline=None)
@given(cfg=configs)
def test_adapter_config_is_accepted_or_refused_and_accepted_ones_are_usable(cfg):
    raw = json.dumps(cfg)  # Python's json writes NaN and Infinity, as a hostile file may
    try:
        parsed = parse_adapter_config(raw)
    except LoraplaneError as e:
        assert e.reason_name in CONFIG_REASONS, e
        return
    assert isinstance(parsed.r, int) and parsed.r >= 1 and math.isfinite(parsed.lora_alpha)
    for path in MODULE_PATHS:
        t0 = time.perf_counter()
        rank = parsed.rank_for(path)
        scale = parsed.scaling(path, rank)
        # The patterns are regexes from the file: matching must stay cheap, whatever they are.
        assert time.perf_counter() - t0 < 0.5
        assert isinstance(rank, int) and rank >= 1 and math.isfinite(scale), (cfg, rank, scale)


@pytest.mark.parametrize("key", ["(.*)*x", "(a|a)*$", ".*.*.*.*.*.*.*.*.*.*.*.*x", "(", "x{1000000}"])
def test_hostile_rank_pattern_keys_are_refused_fast(key):
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "rank_pattern": {key: 4}, "alpha_pattern": {}}
    t0 = time.perf_counter()
    try:
        parsed = parse_adapter_config(json.dumps(cfg))
        parsed.rank_for("model.layers.0.self_attn.q_proj")
    except LoraplaneError as e:
        assert e.reason_name == "INVALID_ADAPTER_CONFIG"
    assert time.perf_counter() - t0 < 0.5


# ---- the whole normalization, with hostile configs over real weights ------------------------------

@pytest.fixture(scope="module")
def real_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-norm")
    model = make_tiny_model(root / "model")
    adapter = make_peft_adapter(model, root / "adapter", r=4, target_modules=("q_proj", "v_proj"))
    return (ModelSpec.from_pretrained(str(model)), json.loads((adapter / "adapter_config.json").read_text()),
            (adapter / "adapter_model.safetensors").read_bytes())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.dictionaries(st.sampled_from(["r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
                                                   "layers_to_transform", "target_modules"]),
                                 st.one_of(config_values, patterns), max_size=3),
       dtype=st.sampled_from(["auto", "float16", "bfloat16", "float32"]))
def test_normalized_artifacts_are_finite_whatever_the_config(real_adapter, overrides, dtype):
    spec, base_cfg, weights = real_adapter
    try:
        config = parse_adapter_config(json.dumps({**base_cfg, **overrides}))
        adapter = normalize_peft(config, weights, spec, max_rank=64, dtype=dtype)
    except LoraplaneError as e:
        assert e.reason_name in NORMALIZE_REASONS, e
        return
    for name, tensor in adapter.tensors.items():
        assert torch.isfinite(tensor).all(), (overrides, dtype, name)


@pytest.mark.parametrize("overrides,dtype", [
    ({"lora_alpha": 1e300}, "float32"),
    ({"lora_alpha": 1e6}, "float16"),  # finite in float32, infinite once cast to float16
    ({"alpha_pattern": {"q_proj": 1e300}}, "auto"),
])
def test_scaling_that_overflows_is_refused(real_adapter, overrides, dtype):
    spec, base_cfg, weights = real_adapter
    with pytest.raises(LoraplaneError) as e:
        normalize_peft(parse_adapter_config(json.dumps({**base_cfg, **overrides})), weights, spec, 64, dtype)
    assert e.value.reason_name == "INVALID_ADAPTER_CONFIG"
