"""Adapter sources against real local trees, a local imitation of the Hub, and moto's S3 server."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import traceback
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control_plane.sources import (
    FetchedAdapter,
    SourceConfig,
    SourceSpec,
    check_source_allowed,
    fetch_source,
    parse_source,
)
from loraplane.adapter_format import CONFIG_FILE, WEIGHTS_FILE
from loraplane.errors import LoraplaneError
from loraplane.model_spec import ModelSpec
from loraplane.v1 import errors_pb2 as R
from tests import hub_fixture, s3_fixture
from tests.factories import make_peft_adapter, make_tiny_model
from tests.hub_fixture import HubFixture, isolate_hf_hub
from tests.s3_fixture import FAKE_SECRET

# The pytest fixtures, bound by assignment so that test parameters of the same name are not redefinitions.
hub, moto_server, s3 = hub_fixture.hub, s3_fixture.moto_server, s3_fixture.s3

TOKEN = "hf_fixtureSECRETtoken0123456789"


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """A real PEFT adapter (config, safetensors weights and the README PEFT writes)."""
    root = tmp_path_factory.mktemp("peft")
    make_tiny_model(root / "model")
    return make_peft_adapter(root / "model", root / "adapter", r=4)


@pytest.fixture
def dest(tmp_path) -> Path:
    path = tmp_path / "dest"
    path.mkdir()
    return path


def raises(reason: int, fn, *args) -> LoraplaneError:
    with pytest.raises(LoraplaneError) as info:
        fn(*args)
    assert info.value.reason == reason, str(info.value)
    return info.value


def assert_fetched(result: FetchedAdapter, dest: Path, adapter: Path) -> None:
    assert result.path == dest
    assert sorted(p.name for p in dest.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        assert not (dest / name).is_symlink()
        assert (dest / name).read_bytes() == (adapter / name).read_bytes()


def only_files(out: Path, adapter: Path, *names: str, extra: dict[str, bytes] | None = None) -> Path:
    """A directory holding some of the adapter's files, plus `extra` ones."""
    out.mkdir(parents=True)
    for name in names:
        shutil.copy(adapter / name, out / name)
    for name, data in (extra or {}).items():
        (out / name).write_bytes(data)
    return out


# -- parse_source --------------------------------------------------------------------------------

@pytest.mark.parametrize("uri, revision, expected", [
    ("/srv/adapters/a1", "", SourceSpec("file", "/srv/adapters/a1")),
    ("/srv//adapters/a1/", "", SourceSpec("file", "/srv/adapters/a1")),
    ("file:///srv/my%20adapter", "", SourceSpec("file", "/srv/my adapter")),
    ("file://localhost/srv/a", "", SourceSpec("file", "/srv/a")),
    ("hf://org/repo", "", SourceSpec("hf", "org/repo")),
    ("hf://org/repo.v2_x-y@refs/pr/3", "", SourceSpec("hf", "org/repo.v2_x-y", "refs/pr/3")),
    ("hf://org/repo@main", "v1.0", SourceSpec("hf", "org/repo", "v1.0")),
    ("HF://org/repo", "0123456789abcdef0123456789abcdef01234567",
     SourceSpec("hf", "org/repo", "0123456789abcdef0123456789abcdef01234567")),
    ("s3://my-bucket", "", SourceSpec("s3", "my-bucket")),
    ("s3://my.bucket/adapters/a1/", "", SourceSpec("s3", "my.bucket/adapters/a1")),
])
def test_parse_valid(uri, revision, expected):
    spec = parse_source(uri, revision)
    assert spec == expected
    assert parse_source(spec.uri()) == spec


@pytest.mark.parametrize("uri, revision, field", [
    ("", "", "source"),
    ("relative/path", "", "source"),
    ("./adapter", "", "source"),
    ("ftp://host/x", "", "source"),
    ("http://example.com/a", "", "source"),
    ("/srv/a\x00b", "", "source"),
    ("file:///srv/a%00b", "", "source"),
    ("file:///srv/%ff", "", "source"),
    ("file://otherhost/srv/a", "", "source"),
    ("/srv/a\nb", "", "source"),
    ("/" + "a" * 1024, "", "source"),
    ("hf://repo-without-org", "", "source"),
    ("hf://org/repo/extra", "", "source"),
    ("hf://../repo", "", "source"),
    ("hf://org/..", "", "source"),
    ("hf://org/re..po", "", "source"),
    ("hf://org/-repo", "", "source"),
    ("hf://org/repo@", "", "source"),
    ("hf://org/repo@../main", "", "source"),
    ("hf://org/repo@a b", "", "source"),
    ("hf://org/repo", "feature/../x", "revision"),
    ("hf://org/repo", "-rf", "revision"),
    ("/srv/a", "main", "revision"),
    ("s3://bucket/a", "v1", "revision"),
    ("s3://Bad_Bucket/a", "", "source"),
    ("s3://ab", "", "source"),
    ("s3://bucket/a/../b", "", "source"),
    ("s3://bucket/a//b", "", "source"),
    ("s3://bucket/a?versionId=1", "", "source"),
    ("s3://bucket/a*", "", "source"),
])
def test_parse_invalid(uri, revision, field):
    error = raises(R.ERROR_REASON_INVALID_SOURCE, parse_source, uri, revision)
    assert error.metadata == {"field": field}
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.message


_PREFIXES = st.sampled_from(["", "/", "/srv/", "file://", "file:///", "file:///srv/", "hf://", "hf://org/",
                             "hf://org/repo@", "s3://", "s3://bucket/", "s3://my-bucket/p/", "HF://o/"])
_TEXT = st.text(st.characters(codec="utf-8") | st.sampled_from("/@.%-_:?#\x00 ") | st.characters(), max_size=80)


@settings(max_examples=400, deadline=None)
@given(prefix=_PREFIXES, rest=_TEXT, revision=st.one_of(st.just(""), _TEXT))
def test_parse_only_raises_loraplane_errors_and_round_trips(prefix, rest, revision):
    try:
        spec = parse_source(prefix + rest, revision)
    except LoraplaneError as e:
        assert e.reason == R.ERROR_REASON_INVALID_SOURCE
        return
    assert spec.scheme in ("file", "hf", "s3")
    assert parse_source(spec.uri()) == spec
    assert len(spec.uri()) <= 1024


_HF_NAME = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9_]|-(?!-)){0,20}[A-Za-z0-9]", fullmatch=True)
_S3_KEY = st.from_regex(r"[a-z0-9]{3,12}(/[A-Za-z0-9!_'()=+@,: -]{0,3}[A-Za-z0-9][A-Za-z0-9!_'()=+@,: -]{0,3}){0,4}",
                        fullmatch=True)
_PATH_PART = st.text(st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"]), min_size=1, max_size=10)


@settings(max_examples=100, deadline=None)
@given(org=_HF_NAME, name=_HF_NAME, rev=st.from_regex(r"(|[a-z0-9]{1,10}(/[a-z0-9]{1,5}){0,2})", fullmatch=True),
       s3_key=_S3_KEY, path=st.lists(_PATH_PART.filter(lambda s: "/" not in s), max_size=4))
def test_valid_specs_round_trip(org, name, rev, s3_key, path):
    specs = [parse_source(f"hf://{org}/{name}", rev), parse_source(f"s3://{s3_key}"),
             parse_source("/" + "/".join(path))]
    for spec in specs:
        assert parse_source(spec.uri()) == spec


# -- SourceConfig --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"allowed_roots": ("relative",)}, {"allowed_roots": "/srv"}, {"s3_key": "k"}, {"s3_secret": "s"},
    {"s3_anon": True, "s3_key": "k", "s3_secret": "s"}, {"max_bytes": 0}, {"max_bytes": True},
    {"timeout_s": float("nan")}, {"timeout_s": 0}, {"hf_endpoint": "ftp://x"}, {"hf_token": ""},
    {"hf_endpoint": "http://user:pw@hub.local"}, {"s3_endpoint_url": "https://AKIA0:secret@s3.local"},
    {"hf_endpoint": "https://token@hub.local"},
])
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        SourceConfig(**kwargs)


def test_config_repr_hides_secrets():
    config = SourceConfig(allowed_roots=["/srv"], hf_token=TOKEN, s3_key="AKIA0", s3_secret=FAKE_SECRET,
                          hf_endpoint="http://hub.local/")
    assert config.allowed_roots == (Path("/srv"),) and config.hf_endpoint == "http://hub.local"
    assert TOKEN not in repr(config) and FAKE_SECRET not in repr(config)


# -- allowed roots -------------------------------------------------------------------------------

def test_allowed_roots(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    (tmp_path / "root-evil").mkdir()
    (root / "escape").symlink_to(outside)
    (root / "inner").symlink_to(root / "a")
    (tmp_path / "root-link").symlink_to(root)
    config = SourceConfig(allowed_roots=(tmp_path / "root-link",))  # roots are resolved too
    check_source_allowed(parse_source(str(root / "a")), config)
    check_source_allowed(parse_source(str(root / "inner")), config)
    check_source_allowed(parse_source("hf://org/repo"), config)
    check_source_allowed(parse_source("s3://bucket/x"), config)
    for path in (outside, root / "escape", f"{root}/a/../../outside", tmp_path / "root-evil", "/etc"):
        error = raises(R.ERROR_REASON_SOURCE_NOT_ALLOWED, check_source_allowed, parse_source(str(path)), config)
        assert error.code == grpc.StatusCode.PERMISSION_DENIED
    error = raises(R.ERROR_REASON_SOURCE_NOT_ALLOWED, check_source_allowed,
                   parse_source(str(root / "a")), SourceConfig())
    assert "no local source roots" in error.message


# -- local ---------------------------------------------------------------------------------------

def test_local_fetch_copies_the_two_files(adapter_dir, tmp_path, dest):
    src = tmp_path / "root" / "a1"
    shutil.copytree(adapter_dir, src)
    config = SourceConfig(allowed_roots=(tmp_path / "root",))
    result = fetch_source(parse_source(f"file://{src}"), config, dest)
    assert result.resolved_revision == ""
    assert_fetched(result, dest, adapter_dir)
    (src / WEIGHTS_FILE).write_bytes(b"edited later")
    assert (dest / WEIGHTS_FILE).read_bytes() == (adapter_dir / WEIGHTS_FILE).read_bytes()


def test_local_refusals(adapter_dir, tmp_path, dest):
    root = tmp_path / "root"
    root.mkdir()
    config = SourceConfig(allowed_roots=(root,))
    cases = {
        "pickle": (R.ERROR_REASON_UNSAFE_FORMAT, [CONFIG_FILE], {"adapter_model.bin": b"\x80\x04pickle"}),
        "noconfig": (R.ERROR_REASON_INVALID_ADAPTER_CONFIG, [WEIGHTS_FILE], {}),
        "noweights": (R.ERROR_REASON_INVALID_ADAPTER_CONFIG, [CONFIG_FILE], {}),
    }
    for name, (reason, files, extra) in cases.items():
        only_files(root / name, adapter_dir, *files, extra=extra)
        raises(reason, fetch_source, parse_source(str(root / name)), config, dest)
        assert not any(dest.iterdir())
    shutil.copytree(adapter_dir, root / "big")
    error = raises(R.ERROR_REASON_ADAPTER_TOO_LARGE, fetch_source, parse_source(str(root / "big")),
                   SourceConfig(allowed_roots=(root,), max_bytes=100), dest)
    assert error.metadata["max_bytes"] == "100"
    raises(R.ERROR_REASON_SOURCE_UNREACHABLE, fetch_source, parse_source(str(root / "missing")), config, dest)
    # The roots are checked again at fetch time, and per file: a weights symlink out of the root is refused.
    raises(R.ERROR_REASON_SOURCE_NOT_ALLOWED, fetch_source, parse_source(str(root / "big")), SourceConfig(), dest)
    (root / "sneaky").mkdir()
    shutil.copy(adapter_dir / CONFIG_FILE, root / "sneaky" / CONFIG_FILE)
    (root / "sneaky" / WEIGHTS_FILE).symlink_to(adapter_dir / WEIGHTS_FILE)
    raises(R.ERROR_REASON_SOURCE_NOT_ALLOWED, fetch_source, parse_source(str(root / "sneaky")), config, dest)
    # A weights file that is a symlink loop inside the root: refused, not an internal error.
    (root / "loop").mkdir()
    shutil.copy(adapter_dir / CONFIG_FILE, root / "loop" / CONFIG_FILE)
    (root / "loop" / WEIGHTS_FILE).symlink_to(root / "loop" / "other")
    (root / "loop" / "other").symlink_to(root / "loop" / WEIGHTS_FILE)
    raises(R.ERROR_REASON_SOURCE_NOT_ALLOWED, fetch_source, parse_source(str(root / "loop")), config, dest)
    (dest / "x").touch()
    with pytest.raises(ValueError):
        fetch_source(parse_source(str(root / "big")), config, dest)


# -- Hugging Face Hub ----------------------------------------------------------------------------

def test_hf_fetch_pins_the_default_branch_to_its_sha(hub, adapter_dir, dest):
    sha = hub.add_repo("org/adapter", adapter_dir)
    result = fetch_source(parse_source("hf://org/adapter"), SourceConfig(hf_endpoint=hub.url), dest)
    assert result.resolved_revision == sha
    assert_fetched(result, dest, adapter_dir)
    files = hub.file_requests()
    assert files and all(sha in r.path for r in files if "/resolve/" in r.path)
    assert not hub.file_requests("README.md")
    info = [r for r in hub.requests if r.path.startswith("/api/")]
    assert [r.path for r in info] == ["/api/models/org/adapter"] and info[0].query == {"blobs": ["true"]}
    assert not any("authorization" in r.headers for r in hub.requests)


@pytest.mark.parametrize("form", ["suffix", "argument"])
def test_hf_fetch_at_a_branch_and_at_an_old_sha(hub, adapter_dir, tmp_path, dest, form):
    old = hub.add_repo("org/adapter", adapter_dir)
    other = only_files(tmp_path / "v2", adapter_dir, CONFIG_FILE, extra={WEIGHTS_FILE: b"v2 weights"})
    dev = hub.add_repo("org/adapter", other, revision="dev")
    hub.add_repo("org/adapter", other)  # main moves on: an old sha must still give the old files

    def fetch(rev: str, into: Path):
        spec = parse_source(f"hf://org/adapter@{rev}") if form == "suffix" else parse_source("hf://org/adapter", rev)
        return fetch_source(spec, SourceConfig(hf_endpoint=hub.url), into)

    assert fetch("dev", dest).resolved_revision == dev
    assert (dest / WEIGHTS_FILE).read_bytes() == b"v2 weights"
    assert all(dev in r.path for r in hub.file_requests() if "/resolve/" in r.path)
    (tmp_path / "old").mkdir()
    result = fetch(old, tmp_path / "old")
    assert result.resolved_revision == old
    assert_fetched(result, tmp_path / "old", adapter_dir)


def test_hf_without_cdn_redirects(adapter_dir, dest, monkeypatch, tmp_path):
    with HubFixture(cdn_host=None) as plain:
        isolate_hf_hub(monkeypatch, tmp_path, plain.url)
        sha = plain.add_repo("org/adapter", adapter_dir)
        # hf_endpoint unset: the (patched) default endpoint is used.
        assert fetch_source(parse_source("hf://org/adapter"), SourceConfig(), dest).resolved_revision == sha
        assert not any(r.path.startswith("/cdn-lfs/") for r in plain.requests)


def test_hf_token_is_sent_and_never_shown(hub, adapter_dir, tmp_path, dest, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")  # it sets its own level (WARNING)
    hub.add_repo("org/private", adapter_dir, token=TOKEN)
    config = SourceConfig(hf_endpoint=hub.url, hf_token=TOKEN)
    fetch_source(parse_source("hf://org/private"), config, dest)
    hub_requests = [r for r in hub.requests if not r.path.startswith("/cdn-lfs/")]
    assert hub_requests and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub_requests)
    # The LFS CDN is another origin: the token must not follow the redirect there.
    cdn = [r for r in hub.requests if r.path.startswith("/cdn-lfs/")]
    assert cdn and not any("authorization" in r.headers for r in cdn)

    monkeypatch.setenv("HF_TOKEN", TOKEN)  # honoured when the config names no token
    hub.clear_requests()
    (tmp_path / "env").mkdir()
    fetch_source(parse_source("hf://org/private"), SourceConfig(hf_endpoint=hub.url), tmp_path / "env")
    assert hub.requests[0].headers.get("authorization") == f"Bearer {TOKEN}"
    monkeypatch.delenv("HF_TOKEN")

    for token in (None, TOKEN[::-1]):
        (tmp_path / f"t{token}").mkdir()
        error = raises(R.ERROR_REASON_SOURCE_UNREACHABLE, fetch_source, parse_source("hf://org/private"),
                       SourceConfig(hf_endpoint=hub.url, hf_token=token), tmp_path / f"t{token}")
        shown = "".join(traceback.format_exception(error)) + str(error.metadata)
        assert "org/private" in error.message
        assert TOKEN not in shown and TOKEN[::-1] not in shown
    assert "huggingface_hub" in caplog.text  # its debug log was captured, and it holds no token
    assert TOKEN not in caplog.text and TOKEN[::-1] not in caplog.text


def test_hf_unreachable(hub, adapter_dir, dest):
    hub.add_repo("org/adapter", adapter_dir)
    config = SourceConfig(hf_endpoint=hub.url, timeout_s=5)
    for uri in ("hf://org/missing", "hf://org/adapter@no-such-branch"):
        error = raises(R.ERROR_REASON_SOURCE_UNREACHABLE, fetch_source, parse_source(uri), config, dest)
        assert error.code == grpc.StatusCode.UNAVAILABLE and error.metadata["source"] == uri
    hub.stop()
    start = time.monotonic()
    error = raises(R.ERROR_REASON_SOURCE_UNREACHABLE, fetch_source, parse_source("hf://org/adapter"), config, dest)
    assert time.monotonic() - start < 5 and hub.url in error.message
    assert not any(dest.iterdir())


def test_hf_timeout(hub, adapter_dir, dest):
    hub.add_repo("org/adapter", adapter_dir)
    hub.delay_s = 1.0
    config = SourceConfig(hf_endpoint=hub.url, timeout_s=0.2)
    error = raises(R.ERROR_REASON_SOURCE_UNREACHABLE, fetch_source, parse_source("hf://org/adapter"), config, dest)
    assert "timed out after 0.2 s" in error.message


def test_hf_refusals_happen_before_downloading(hub, adapter_dir, tmp_path, dest):
    pickle_only = only_files(tmp_path / "pickle", adapter_dir, CONFIG_FILE, "README.md",
                             extra={"adapter_model.bin": b"\x80\x04 not loaded"})
    hub.add_repo("org/pickle", pickle_only)
    hub.add_repo("org/noconfig", only_files(tmp_path / "noconfig", adapter_dir, WEIGHTS_FILE))
    hub.add_repo("org/adapter", adapter_dir)
    config = SourceConfig(hf_endpoint=hub.url)
    raises(R.ERROR_REASON_UNSAFE_FORMAT, fetch_source, parse_source("hf://org/pickle"), config, dest)
    raises(R.ERROR_REASON_INVALID_ADAPTER_CONFIG, fetch_source, parse_source("hf://org/noconfig"), config, dest)
    small = SourceConfig(hf_endpoint=hub.url, max_bytes=1000)
    error = raises(R.ERROR_REASON_ADAPTER_TOO_LARGE, fetch_source, parse_source("hf://org/adapter"), small, dest)
    assert error.metadata["size_bytes"] == str((adapter_dir / WEIGHTS_FILE).stat().st_size)
    assert hub.file_requests() == []  # not one byte of any file was asked for
    assert not any(dest.iterdir())


def test_hf_size_limit_holds_when_the_listing_lies(hub, adapter_dir, tmp_path, dest):
    hub.add_repo("org/liar", adapter_dir, announced_sizes={WEIGHTS_FILE: 10})
    config = SourceConfig(hf_endpoint=hub.url, max_bytes=1000)
    error = raises(R.ERROR_REASON_ADAPTER_TOO_LARGE, fetch_source, parse_source("hf://org/liar"), config, dest)
    assert "ran past" in error.message
    assert not (dest / WEIGHTS_FILE).exists()
    # Under the limit, a size that differs from the announced one is a broken source, not a bug of ours.
    (tmp_path / "again").mkdir()
    error = raises(R.ERROR_REASON_SOURCE_UNREACHABLE, fetch_source, parse_source("hf://org/liar"),
                   SourceConfig(hf_endpoint=hub.url), tmp_path / "again")
    assert "did not arrive as the Hub announced" in error.message


# -- S3 ------------------------------------------------------------------------------------------

def test_s3_fetch(s3, adapter_dir, dest, tmp_path):
    uri = s3.upload_dir("adapters/a1", adapter_dir)
    result = fetch_source(parse_source(uri), SourceConfig(s3_endpoint_url=s3.endpoint_url), dest)
    assert_fetched(result, dest, adapter_dir)
    head = s3.client.head_object(Bucket=s3.bucket, Key=f"adapters/a1/{WEIGHTS_FILE}")
    assert result.resolved_revision == head["ETag"].strip('"')

    s3.enable_versioning()
    uri = s3.upload_dir("adapters/versioned", adapter_dir)
    (tmp_path / "v").mkdir()
    config = SourceConfig(s3_endpoint_url=s3.endpoint_url, s3_key="AKIA-explicit", s3_secret=FAKE_SECRET)
    result = fetch_source(parse_source(uri), config, tmp_path / "v")
    head = s3.client.head_object(Bucket=s3.bucket, Key=f"adapters/versioned/{WEIGHTS_FILE}")
    assert result.resolved_revision == head["VersionId"]


def test_s3_refusals(s3, adapter_dir, tmp_path, dest, monkeypatch):
    config = SourceConfig(s3_endpoint_url=s3.endpoint_url, s3_key="AKIA-explicit", s3_secret=FAKE_SECRET)
    for uri in ("s3://no-such-bucket-here/a1", f"s3://{s3.bucket}/nothing/here"):
        error = raises(R.ERROR_REASON_SOURCE_UNREACHABLE, fetch_source, parse_source(uri), config, dest)
        assert FAKE_SECRET not in "".join(traceback.format_exception(error))
    s3.upload_dir("pickle", only_files(tmp_path / "p", adapter_dir, CONFIG_FILE,
                                       extra={"adapter_model.bin": b"\x80\x04"}))
    raises(R.ERROR_REASON_UNSAFE_FORMAT, fetch_source, parse_source(f"s3://{s3.bucket}/pickle"), config, dest)
    s3.upload_dir("a1", adapter_dir)
    small = SourceConfig(s3_endpoint_url=s3.endpoint_url, max_bytes=1000)
    raises(R.ERROR_REASON_ADAPTER_TOO_LARGE, fetch_source, parse_source(f"s3://{s3.bucket}/a1"), small, dest)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    error = raises(R.ERROR_REASON_SOURCE_UNREACHABLE, fetch_source, parse_source(f"s3://{s3.bucket}/a1"),
                   SourceConfig(s3_endpoint_url=s3.endpoint_url), dest)
    assert "credentials" in error.message
    dead = SourceConfig(s3_endpoint_url="http://127.0.0.1:9", timeout_s=2)
    raises(R.ERROR_REASON_SOURCE_UNREACHABLE, fetch_source, parse_source(f"s3://{s3.bucket}/a1"), dead, dest)
    assert not any(dest.iterdir())
    assert os.environ["AWS_EC2_METADATA_DISABLED"] == "true"


def test_the_base_model_spec_comes_at_its_revision_from_the_configured_hub(hub, tmp_path):
    """The control plane validates against the config.json the data planes serve: the Helm chart's
    model.revision (--base-model-revision), from --hf-endpoint (a mirror) with --hf-token."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "vocab_size": 256}
    hub.add_files("org/base", {"config.json": json.dumps(config).encode()})
    wider = {**config, "intermediate_size": 256}
    v2 = hub.add_files("org/base", {"config.json": json.dumps(wider).encode()}, revision="v2")
    hub.add_files("org/base", {"config.json": json.dumps(config).encode()})  # main moves on
    assert ModelSpec.from_pretrained("org/base").intermediate_size == 128
    assert ModelSpec.from_pretrained("org/base", "v2").intermediate_size == 256
    assert ModelSpec.from_pretrained("org/base", v2).intermediate_size == 256
    with pytest.raises(ValueError, match="cannot get config.json of 'org/base'"):
        ModelSpec.from_pretrained("org/base", "no-such-branch")
    with pytest.raises(ValueError, match="applies to Hub ids"):
        ModelSpec.from_pretrained(str(tmp_path), "v2")
    with HubFixture() as mirror:  # only the mirror has it, and only with its token
        mirror.add_files("org/private", {"config.json": json.dumps(wider).encode()}, token="hf_mirror")
        with pytest.raises(ValueError, match="cannot get config.json"):
            ModelSpec.from_pretrained("org/private")
        with pytest.raises(ValueError, match="cannot get config.json"):
            ModelSpec.from_pretrained("org/private", endpoint=mirror.url)
        spec = ModelSpec.from_pretrained("org/private", endpoint=mirror.url, token="hf_mirror")
        assert spec.intermediate_size == 256
