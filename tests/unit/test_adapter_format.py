"""PEFT -> normalized artifact: math preserved, refusals precise, parsers total."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loraplane.adapter_format import (
    NormalizedAdapter,
    check_safetensors_header,
    normalize_peft_dir,
    parse_adapter_config,
)
from loraplane.errors import LoraplaneError
from loraplane.model_spec import ModelSpec
from tests.factories import make_peft_adapter, make_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def spec(model):
    return ModelSpec.from_pretrained(str(model))


@pytest.mark.parametrize("rslora", [False, True])
def test_normalized_delta_equals_peft_delta(model, spec, tmp_path, rslora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = make_peft_adapter(model, tmp_path / "a", r=4, alpha=12, use_rslora=rslora,
                             target_modules=("q_proj", "gate_proj"))
    norm = normalize_peft_dir(path, spec, max_rank=16)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), path)
    layer = peft.base_model.model.model.layers[1].mlp.gate_proj
    expected = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    a = norm.tensors["layers.1.gate_proj.lora_A"]
    b = norm.tensors["layers.1.gate_proj.lora_B"]
    torch.testing.assert_close(b @ a, expected)
    assert layer.scaling["default"] == pytest.approx(12 / math.sqrt(4) if rslora else 12 / 4)


def test_artifact_roundtrip_and_determinism(model, spec, tmp_path):
    path = make_peft_adapter(model, tmp_path / "a", r=2, layers_to_transform=[1])
    first = normalize_peft_dir(path, spec, 8).to_bytes()
    assert first == normalize_peft_dir(path, spec, 8).to_bytes()
    back = NormalizedAdapter.from_bytes(first)
    assert back.rank == 2 and {layer for layer, *_ in back.pairs()} == {1}


def test_rank_pattern_respected(model, spec, tmp_path):
    path = make_peft_adapter(model, tmp_path / "a", r=4, target_modules=("q_proj", "v_proj"),
                             rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 8})
    norm = normalize_peft_dir(path, spec, 8)
    assert norm.tensors["layers.0.v_proj.lora_A"].shape[0] == 2 and norm.rank == 4


@pytest.mark.parametrize("raw,reason", [
    (b"not json", "INVALID_ADAPTER_CONFIG"),
    (b"[]", "INVALID_ADAPTER_CONFIG"),
    (json.dumps({"r": 0, "lora_alpha": 1}).encode(), "INVALID_ADAPTER_CONFIG"),
    (json.dumps({"r": 4, "lora_alpha": "x"}).encode(), "INVALID_ADAPTER_CONFIG"),
    (json.dumps({"r": 4, "use_dora": True}).encode(), "UNSUPPORTED_FEATURE"),
    (json.dumps({"r": 4, "modules_to_save": ["lm_head"]}).encode(), "UNSUPPORTED_FEATURE"),
    (json.dumps({"r": 4, "peft_type": "IA3"}).encode(), "UNSUPPORTED_FEATURE"),
    (json.dumps({"r": 4, "bias": "all"}).encode(), "UNSUPPORTED_FEATURE"),
])
def test_config_refusals(raw, reason):
    with pytest.raises(LoraplaneError) as e:
        parse_adapter_config(raw)
    assert e.value.reason_name == reason


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.dictionaries(st.text(max_size=20), st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10),
    st.lists(st.one_of(st.integers(), st.text(max_size=5)), max_size=3)), max_size=8).map(
    lambda d: json.dumps(d).encode())))
def test_config_parser_is_total(raw):
    """Any input either parses or is refused with LoraplaneError: never another exception."""
    try:
        parse_adapter_config(raw)
    except LoraplaneError:
        pass


def _frame(header: dict, data: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize("blob", [
    b"", b"\x01\x02", struct.pack("<Q", 1 << 40) + b"{}", _frame({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}),
    _frame({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
    _frame({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
    _frame({"t": "nope"}), _frame([1, 2]),
])
def test_safetensors_framing_refused(blob):
    with pytest.raises(LoraplaneError) as e:
        check_safetensors_header(blob)
    assert e.value.reason_name == "CORRUPT_WEIGHTS"


def test_int8_dtype_refused_by_name():
    blob = _frame({"t": {"dtype": "I8", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0")
    with pytest.raises(LoraplaneError) as e:
        check_safetensors_header(blob)
    assert e.value.reason_name == "UNSUPPORTED_FEATURE"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_safetensors_header_check_is_total(blob):
    try:
        check_safetensors_header(blob)
    except LoraplaneError:
        pass


def _rewrite_weights(path, edit) -> None:
    from safetensors.torch import load_file, save_file

    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights)


def _one_name(tensors: dict, fragment: str) -> str:
    return next(n for n in sorted(tensors) if fragment in n)


@pytest.mark.parametrize("edit,reason,says", [
    # A second name for one weight, of another rank: whichever were kept, the other went unchecked.
    (lambda t: t.__setitem__(_one_name(t, "q_proj.lora_A").replace(".weight", ".x.weight"),
                             torch.randn(8, 64)), "CORRUPT_WEIGHTS", "two tensors for layer"),
    (lambda t: t.__setitem__(_one_name(t, "q_proj.lora_A").replace("self_attn", "mlp"),
                             t.pop(_one_name(t, "q_proj.lora_A"))), "ADAPTER_INCOMPATIBLE", "under self_attn"),
    (lambda t: t.__setitem__(_one_name(t, "layers.0.self_attn.q_proj.lora_A").replace("layers.0.", "layers.\u0660."),
                             t.pop(_one_name(t, "layers.0.self_attn.q_proj.lora_A"))),
     "ADAPTER_INCOMPATIBLE", "is not a LoRA weight"),
    (lambda t: t.__setitem__(_one_name(t, "layers.0.self_attn.q_proj.lora_A").replace("layers.0.", "layers." + "9" * 5000 + "."),
                             t.pop(_one_name(t, "layers.0.self_attn.q_proj.lora_A"))),
     "ADAPTER_INCOMPATIBLE", "is not a LoRA weight"),
], ids=["duplicate-name", "wrong-group", "unicode-digit", "5000-digit-layer"])
def test_tensor_names_that_could_smuggle_unchecked_weights_are_refused(model, spec, tmp_path, edit, reason, says):
    path = make_peft_adapter(model, tmp_path / "a", r=4, target_modules=("q_proj",))
    _rewrite_weights(path, edit)
    with pytest.raises(LoraplaneError) as e:
        normalize_peft_dir(path, spec, max_rank=16)
    assert e.value.reason_name == reason and says in str(e.value)
