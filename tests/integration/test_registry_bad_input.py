"""Every bad registration gets its documented code and reason, and leaves registry and store as they were."""

from __future__ import annotations

import json
import shutil

import grpc
import pytest

from loraplane.errors import LoraplaneError
from tests.factories import make_peft_adapter, make_tiny_model

S = grpc.StatusCode


def snapshot(cp, client):
    names = [(a.name, a.etag) for a in client.list_adapters()]
    return names, sorted(p.name for p in cp.config.artifact_dir.iterdir() if not p.name.startswith("."))


def expect(call, code, reason):
    with pytest.raises(LoraplaneError) as e:
        call()
    assert (e.value.code, e.value.reason_name) == (code, reason), str(e.value)
    assert "Traceback" not in e.value.message
    return e.value


@pytest.fixture
def seeded(cp, good_adapter):
    """A control plane that already holds one READY adapter, to prove nothing else changes."""
    with cp.client() as c:
        c.create_adapter("existing", str(good_adapter), wait=True)
    return cp


@pytest.fixture(scope="module")
def bad_adapters(adapter_root, base_model):
    """One broken adapter per refusal, all under the allowed root."""
    root = adapter_root / "bad"
    root.mkdir(exist_ok=True)
    good = root / "base"
    if not good.exists():
        make_peft_adapter(base_model, good, r=4, target_modules=("q_proj", "v_proj"))

    def copy_of(name):
        path = root / name
        shutil.copytree(good, path, dirs_exist_ok=True)
        return path

    def peft(name, model=base_model, **kw):
        path = root / name
        if not path.exists():
            make_peft_adapter(model, path, **kw)
        return path

    made = {"no_config": copy_of("no-config"), "truncated": copy_of("truncated"), "corrupt": copy_of("corrupt"),
            "lacking": copy_of("lacking-module")}
    (made["no_config"] / "adapter_config.json").unlink()
    data = (good / "adapter_model.safetensors").read_bytes()
    (made["truncated"] / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    (made["corrupt"] / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    cfg = json.loads((good / "adapter_config.json").read_text())
    (made["lacking"] / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj", "c_attn"]}))
    made["pickle"] = root / "pickle-only"
    made["pickle"].mkdir(exist_ok=True)
    shutil.copy(good / "adapter_config.json", made["pickle"])
    (made["pickle"] / "adapter_model.bin").write_bytes(b"\x80\x04not loaded, ever")
    other_base = root / "other-base"
    if not other_base.exists():
        make_tiny_model(other_base, hidden_size=96)
    made["shape"] = peft("wrong-shape", other_base, r=4)
    made["rank"] = peft("rank-too-big", r=128, target_modules=("q_proj",))
    made["dora"] = peft("dora", r=4, use_dora=True)
    made["mts"] = peft("modules-to-save", r=4, modules_to_save=["lm_head"])
    return made


CASES = [
    ("no_config", S.INVALID_ARGUMENT, "INVALID_ADAPTER_CONFIG"),
    ("pickle", S.INVALID_ARGUMENT, "UNSAFE_FORMAT"),
    ("truncated", S.INVALID_ARGUMENT, "CORRUPT_WEIGHTS"),
    ("corrupt", S.INVALID_ARGUMENT, "CORRUPT_WEIGHTS"),
    ("shape", S.FAILED_PRECONDITION, "ADAPTER_INCOMPATIBLE"),
    ("rank", S.INVALID_ARGUMENT, "RANK_TOO_LARGE"),
    ("lacking", S.FAILED_PRECONDITION, "ADAPTER_INCOMPATIBLE"),
    ("dora", S.INVALID_ARGUMENT, "UNSUPPORTED_FEATURE"),
    ("mts", S.INVALID_ARGUMENT, "UNSUPPORTED_FEATURE"),
]


@pytest.mark.parametrize("case,code,reason", CASES, ids=[c[0] for c in CASES])
def test_bad_adapter_refused_and_nothing_changes(seeded, bad_adapters, case, code, reason):
    with seeded.client() as c:
        before = snapshot(seeded, c)
        expect(lambda: c.create_adapter("newcomer", str(bad_adapters[case]), wait=True), code, reason)
        assert snapshot(seeded, c) == before


@pytest.mark.parametrize("name", ["", "a/b", "..", "../etc", "a..b", "x" * 129, "-lead", "name@v", "ünï", "a b"])
def test_bad_names(seeded, good_adapter, name):
    with seeded.client() as c:
        before = snapshot(seeded, c)
        err = expect(lambda: c.create_adapter(name, str(good_adapter), wait=True), S.INVALID_ARGUMENT, "INVALID_NAME")
        assert err.metadata["field"] == "name"
        assert snapshot(seeded, c) == before


def test_local_path_outside_allowed_roots(seeded, tmp_path, good_adapter):
    outside = tmp_path / "outside"
    shutil.copytree(good_adapter, outside)
    link = good_adapter.parent / "escape-link"
    if not link.exists():
        link.symlink_to(outside)
    with seeded.client() as c:
        before = snapshot(seeded, c)
        for src in (str(outside), str(link), f"{good_adapter}/../../../{outside.relative_to('/')}"):
            expect(lambda s=src: c.create_adapter("escapee", s, wait=True), S.PERMISSION_DENIED, "SOURCE_NOT_ALLOWED")
        assert snapshot(seeded, c) == before


def test_size_limit(cp_factory, good_adapter):
    cp = cp_factory(max_adapter_bytes=1000)
    with cp.client() as c:
        expect(lambda: c.create_adapter("big", str(good_adapter), wait=True), S.INVALID_ARGUMENT, "ADAPTER_TOO_LARGE")
        assert list(c.list_adapters()) == []


def test_unreachable_hf_and_s3(cp_factory, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    cp = cp_factory(hf_endpoint="http://127.0.0.1:9", s3_endpoint_url="http://127.0.0.1:9", source_timeout_s=5)
    with cp.client() as c:
        for src in ("hf://nobody/nothing", "s3://no-bucket/adapter"):
            expect(lambda s=src: c.create_adapter("unreachable", s, wait=True), S.UNAVAILABLE, "SOURCE_UNREACHABLE")
        assert list(c.list_adapters()) == []


def test_bad_source_uris(seeded):
    with seeded.client() as c:
        before = snapshot(seeded, c)
        for src in ("", "relative/path", "ftp://x/y", "hf://", "s3://"):
            expect(lambda s=src: c.create_adapter("weird", s, wait=True), S.INVALID_ARGUMENT, "INVALID_SOURCE")
        assert snapshot(seeded, c) == before


def test_base_model_mismatch(seeded, good_adapter):
    with seeded.client() as c:
        expect(lambda: c.create_adapter("x", str(good_adapter), base_model="meta-llama/Llama-3-8B", wait=True),
               S.FAILED_PRECONDITION, "ADAPTER_INCOMPATIBLE")


def test_unknown_adapter_on_every_method(seeded):
    nf = (S.NOT_FOUND, "ADAPTER_NOT_FOUND")
    with seeded.client() as c:
        before = snapshot(seeded, c)
        version = "sha256:" + "0" * 64
        for call in (lambda: c.get_adapter("ghost"), lambda: c.delete_adapter("ghost"),
                     lambda: c.pin_adapter("ghost"), lambda: c.unpin_adapter("ghost"),
                     lambda: c.resolve_adapter("ghost"), lambda: c.fetch_adapter("ghost", version)):
            expect(call, *nf)
        assert snapshot(seeded, c) == before
