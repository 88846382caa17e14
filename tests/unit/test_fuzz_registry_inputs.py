"""Properties of the small parsers every registry request goes through: adapter names and
name@version references, page tokens, and source URIs (with the allowed-roots check)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from control_plane.registry import STATES, decode_page_token, encode_page_token
from control_plane.sources import SourceConfig, SourceSpec, parse_source
from control_plane.sources.allowed import inside_allowed_roots
from control_plane.sources.spec import MAX_URI_CHARS
from loraplane.errors import LoraplaneError
from loraplane.names import MAX_NAME_LEN, parse_reference, validate_name

FILTERS = st.sampled_from(["", *STATES])
NAME_CHARS = st.characters(codec="utf-8")


# ---- names ---------------------------------------------------------------------------------------

@settings(max_examples=500)
@given(st.one_of(st.text(max_size=140), st.text(alphabet="abc.-_/@: ", max_size=20),
                 st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,130}", fullmatch=True)))
def test_accepted_names_are_safe_as_keys_paths_and_labels(name):
    try:
        validate_name(name)
    except LoraplaneError as e:
        assert e.reason_name == "INVALID_NAME" and e.metadata == {"field": "name"}
        assert len(e.message) < 400  # never echoes a huge input back
        return
    assert 1 <= len(name) <= MAX_NAME_LEN and name.isascii() and name.isprintable()
    assert name not in (".", "..") and not name.startswith((".", "-", "_")) and ".." not in name
    assert not set(name) & set("/\\@:{}*?[] \t\n\x00")  # Redis hash tags, globs, paths, references
    assert os.path.basename(name) == name and os.path.normpath(name) == name


@settings(max_examples=500)
@given(st.one_of(st.text(max_size=100),
                 st.tuples(st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True),
                           st.one_of(st.from_regex(r"sha256:[0-9a-f]{64}", fullmatch=True), st.text(max_size=80)))
                 .map("@".join)))
def test_references_split_into_a_valid_name_and_an_exact_version(ref):
    try:
        name, version = parse_reference(ref)
    except LoraplaneError as e:
        assert e.reason_name in ("INVALID_NAME", "INVALID_ARGUMENT") and e.metadata.get("field") == "name"
        return
    assert validate_name(name) == name
    assert version == "" or (len(version) == 71 and version.startswith("sha256:")
                             and set(version[7:]) <= set("0123456789abcdef"))
    assert ref == (f"{name}@{version}" if version else name)


# ---- page tokens ---------------------------------------------------------------------------------

@settings(max_examples=400)
@given(after=st.text(max_size=200), state=FILTERS)
def test_page_tokens_round_trip_for_their_own_query_only(after, state):
    token = encode_page_token(after, state)
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert decode_page_token(token, state) == after
    for other in {"", *STATES} - {state}:
        with pytest.raises(LoraplaneError) as e:
            decode_page_token(token, other)
        assert e.value.reason_name == "INVALID_PAGE_TOKEN"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.sampled_from(["a", "f", "x"]), inner, max_size=3)),
                           max_leaves=6)


@settings(max_examples=600)
@given(token=st.one_of(st.text(max_size=300), st.binary(max_size=200).map(_b64),
                       json_values.map(lambda v: _b64(json.dumps(v).encode())),
                       st.text(alphabet="ABCDEFabcdef0123456789-_=+/ \n", max_size=60)),
       state=FILTERS)
def test_decoding_any_string_is_total(token, state):
    try:
        after = decode_page_token(token, state)
    except LoraplaneError as e:
        assert e.reason_name == "INVALID_PAGE_TOKEN" and e.metadata == {"field": "page_token"}
        return
    assert isinstance(after, str)
    # Whatever decodes is only ever used as a ZRANGEBYLEX bound after "(": any string is safe there.


# ---- source URIs ---------------------------------------------------------------------------------

uris = st.one_of(
    st.text(max_size=120),
    st.tuples(st.sampled_from(["/", "file://", "file:///", "file://localhost/", "hf://", "s3://", "HF://", "S3://",
                               "FILE:///"]),
              st.text(alphabet=NAME_CHARS, max_size=80)).map("".join),
    st.tuples(st.sampled_from(["hf://", "s3://"]), st.from_regex(r"[a-z0-9][a-z0-9.-]{1,20}[a-z0-9]", fullmatch=True),
              st.sampled_from(["/", "@", "/a/../b", "/x@main", "/ä", "/a b", "//", "/a?b", "/a#b"]),
              st.text(alphabet="abc/@.-_%2e", max_size=20)).map("".join),
    st.tuples(st.just("file://"), st.text(alphabet="/abc.%20e2fF", max_size=60)).map("".join),
)


@settings(max_examples=1500)
@given(uri=uris, revision=st.one_of(st.just(""), st.text(max_size=30), st.sampled_from(["main", "v1.0", "refs/pr/3",
                                                                                         "../x", "a//b", "x.lock"])))
def test_parse_source_is_total_and_canonical(uri, revision):
    try:
        spec = parse_source(uri, revision)
    except LoraplaneError as e:
        assert e.reason_name == "INVALID_SOURCE" and e.metadata.get("field") in ("source", "revision")
        assert len(e.message) < 600
        return
    assert isinstance(spec, SourceSpec) and spec.scheme in ("file", "hf", "s3")
    canonical = spec.uri()
    assert len(canonical) <= MAX_URI_CHARS and canonical.isprintable()
    assert parse_source(canonical) == spec  # one canonical record per source
    text = spec.location + spec.revision
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)
    if spec.scheme == "file":
        assert spec.location.startswith("/") and "//" not in spec.location
        assert spec.location == "/" or not spec.location.endswith("/")
    elif spec.scheme == "hf":
        org, repo = spec.location.split("/")
        assert org and repo and ".." not in spec.location and "@" not in spec.location
        assert ".." not in spec.revision and not spec.revision.startswith("/")
    else:
        bucket, _, prefix = spec.location.partition("/")
        assert 3 <= len(bucket) <= 63 and bucket == bucket.lower()
        assert all(seg not in ("", ".", "..") for seg in prefix.split("/")) if prefix else True
        assert not set(prefix) & set("?#*[\\")


# ---- the allowed-roots check against an independent oracle -----------------------------------------

@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """root/{a,b/c}, plus links: in -> root/a, out -> outside, up -> .., loop -> loop, deep -> b/c/.."""
    base = tmp_path_factory.mktemp("roots")
    root, outside = base / "root", base / "outside"
    for d in (root / "a", root / "b" / "c", outside / "x"):
        d.mkdir(parents=True)
    (Path(str(root) + "-sibling")).mkdir()
    (root / "in").symlink_to(root / "a")
    (root / "out").symlink_to(outside)
    (root / "up").symlink_to("..")
    (root / "b" / "rel-out").symlink_to("../../outside")
    (root / "loop").symlink_to(root / "loop")
    (root / "deep").symlink_to(Path("b") / "c" / "..")
    return root


SEGMENTS = st.sampled_from(["a", "b", "c", "in", "out", "up", "rel-out", "loop", "deep", "..", ".", "", "x",
                            "missing", "root", "root-sibling"])


def resolve(path: str, depth: int = 0) -> str | None:
    """Symlinks resolved one component at a time, the way the kernel walks a path (None: a loop).
    Written out here so the check is compared with something other than os.path.realpath itself."""
    current = "/"
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        if os.path.islink(candidate):
            if depth > 40:
                return None
            target = os.readlink(candidate)
            resolved = resolve(target if target.startswith("/") else os.path.join(current, target), depth + 1)
            if resolved is None:
                return None
            current = resolved
        else:
            current = candidate
    return current


@settings(max_examples=800, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(SEGMENTS, max_size=6), from_base=st.booleans())
def test_inside_allowed_roots_agrees_with_resolving_the_path(tree, parts, from_base):
    start = tree.parent if from_base else tree
    path = str(start) + "/" + "/".join(parts)
    resolved = resolve(path)
    assume(resolved is not None)  # a loop: refused later, when it is opened (see test_security)
    expected = resolved == str(tree) or resolved.startswith(str(tree) + "/")
    assert inside_allowed_roots(path, SourceConfig(allowed_roots=(tree,))) == expected, (path, resolved)
    assert not inside_allowed_roots(path, SourceConfig(allowed_roots=()))
