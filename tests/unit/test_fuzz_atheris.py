"""Coverage-guided fuzzing with atheris (libFuzzer) of every parser that takes untrusted text.

Each target runs in its own process for a bounded number of inputs (LORAPLANE_ATHERIS_RUNS,
default 20000). A target fails on any exception that is not a LoraplaneError with one of the
documented reasons, and libFuzzer's own -timeout catches hangs (ReDoS and the like).
Skipped where atheris is not installed (it is not a dependency: `pip install atheris`).
Run one by hand: python -m tests.unit.test_fuzz_atheris page_token -runs=100000
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNS = int(os.environ.get("LORAPLANE_ATHERIS_RUNS", "20000"))
TARGETS = ("name", "page_token", "source", "adapter_config", "safetensors")


def _value(fdp, depth: int = 0):
    """Any JSON value, chosen by the fuzzer's bytes."""
    pick = fdp.ConsumeIntInRange(0, 8 if depth < 2 else 6)
    if pick == 0:
        return None
    if pick == 1:
        return fdp.ConsumeBool()
    if pick == 2:
        return fdp.ConsumeIntInRange(-(2**40), 2**40)
    if pick == 3:
        return fdp.ConsumeIntInRange(0, 64)
    if pick == 4:
        return fdp.ConsumeRegularFloat() if fdp.ConsumeBool() else fdp.PickValueInList(
            [float("inf"), float("-inf"), float("nan"), 1e308, 0.0])
    if pick in (5, 6):
        return fdp.ConsumeUnicodeNoSurrogates(10)
    if pick == 7:
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return {fdp.ConsumeUnicodeNoSurrogates(6): _value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))}


def _target(kind: str):
    from control_plane.registry import decode_page_token
    from control_plane.sources import parse_source
    from loraplane.adapter_format import check_safetensors_header, parse_adapter_config
    from loraplane.errors import LoraplaneError
    from loraplane.names import parse_reference

    allowed = {
        "name": {"INVALID_NAME", "INVALID_ARGUMENT"}, "page_token": {"INVALID_PAGE_TOKEN"},
        "source": {"INVALID_SOURCE"}, "adapter_config": {"INVALID_ADAPTER_CONFIG", "UNSUPPORTED_FEATURE"},
        "safetensors": {"CORRUPT_WEIGHTS", "UNSUPPORTED_FEATURE"},
    }[kind]

    def call(data: bytes) -> None:
        import atheris

        fdp = atheris.FuzzedDataProvider(data)
        if kind == "name":
            parse_reference(fdp.ConsumeUnicodeNoSurrogates(300))
        elif kind == "page_token":
            decode_page_token(fdp.ConsumeUnicodeNoSurrogates(300), fdp.PickValueInList(["", "READY", "FAILED"]))
        elif kind == "source":
            parse_source(fdp.ConsumeUnicodeNoSurrogates(400), fdp.ConsumeUnicodeNoSurrogates(40))
        elif kind == "adapter_config":
            raw = data if fdp.ConsumeBool() else json.dumps({
                "r": _value(fdp), "lora_alpha": _value(fdp), "target_modules": _value(fdp),
                "rank_pattern": {fdp.ConsumeUnicodeNoSurrogates(12): _value(fdp) for _ in range(fdp.ConsumeIntInRange(0, 2))},
                "alpha_pattern": {fdp.ConsumeUnicodeNoSurrogates(12): _value(fdp) for _ in range(fdp.ConsumeIntInRange(0, 2))},
                fdp.PickValueInList(["use_rslora", "layers_to_transform", "bias", "peft_type", "use_dora"]): _value(fdp)})
            config = parse_adapter_config(raw)
            for path in ("model.layers.0.self_attn.q_proj", "model.layers.3.mlp.down_proj"):
                config.scaling(path, config.rank_for(path))
        elif fdp.ConsumeBool():
            check_safetensors_header(data)
        else:  # shaped like a real header, so the fuzzer spends its time past the framing
            header = {fdp.ConsumeUnicodeNoSurrogates(8): {
                "dtype": fdp.PickValueInList(["F32", "F16", "BF16", "I8"]) if fdp.ConsumeBool() else _value(fdp),
                "shape": [fdp.ConsumeIntInRange(-2, 8) for _ in range(fdp.ConsumeIntInRange(0, 3))]
                if fdp.ConsumeBool() else _value(fdp),
                "data_offsets": [fdp.ConsumeIntInRange(-4, 64), fdp.ConsumeIntInRange(-4, 64)]
                if fdp.ConsumeBool() else _value(fdp)} for _ in range(fdp.ConsumeIntInRange(0, 3))}
            raw = json.dumps(header).encode()
            check_safetensors_header(struct.pack("<Q", len(raw)) + raw + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)))

    def one_input(data: bytes) -> None:
        try:
            call(data)
        except LoraplaneError as e:
            if e.reason_name not in allowed:
                raise AssertionError(f"undocumented reason {e.reason_name}") from e

    return one_input


SEEDS = {
    "name": [b"llama-3_sql.v2", b"a@sha256:" + b"0" * 64],
    "page_token": [b"eyJhIjoiYSIsImYiOiIifQ"],
    "source": [b"/abs/path", b"hf://org/name@main", b"s3://bucket/prefix", b"file:///a%20b"],
    "adapter_config": [b'{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "rank_pattern": {"q_proj": 4}}'],
    "safetensors": [b'\x40\x00\x00\x00\x00\x00\x00\x00{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}      '
                    b"\x00\x00\x80\x3f"],
}


def main(argv: list[str]) -> None:
    import atheris

    kind = argv[1]
    corpus = Path(os.environ.get("LORAPLANE_ATHERIS_CORPUS", f"/tmp/loraplane-atheris-{kind}"))
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(SEEDS[kind]):
        (corpus / f"seed-{i}").write_bytes(seed)
    # Only our parsers get coverage instrumentation: instrumenting torch and grpc costs a minute.
    import grpc  # noqa: F401
    import redis  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    with atheris.instrument_imports(include=["loraplane", "control_plane"]):
        target = _target(kind)
    atheris.Setup([argv[0], *argv[2:], str(corpus)], target)
    atheris.Fuzz()


@pytest.mark.parametrize("kind", TARGETS)
def test_atheris(kind, tmp_path):
    pytest.importorskip("atheris")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.unit.test_fuzz_atheris", kind, f"-runs={RUNS}", "-timeout=5",
         "-rss_limit_mb=2048", "-print_final_stats=1"],
        cwd=REPO, env={**os.environ, "LORAPLANE_ATHERIS_CORPUS": str(tmp_path / "corpus")},
        capture_output=True, text=True, timeout=300)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert "Done" in tail and f"stat::number_of_executed_units: {RUNS}" in tail, tail


if __name__ == "__main__":
    main(sys.argv)
