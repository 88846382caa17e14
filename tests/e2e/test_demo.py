"""`loraplane demo` end to end: real training, real servers, one mixed batch, and a clean exit."""

from __future__ import annotations

import io
import os
import signal
import socket
import threading
import time

import pytest

from loraplane.cli import main
from loraplane.demo import BASE, run_demo
from loraplane.demo.model import SMALL, default_cache_dir, ensure_base_model
from loraplane.demo.recipes import PERSONAS
from loraplane.demo.terminal import StreamPanel
from loraplane.demo.train import TrainingFailed, TrainRecipe, ensure_adapters


def _port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) == 0


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_cleaned_up(result) -> None:
    assert result.control_plane and result.data_plane and result.redis_pid
    assert not _port_open(result.control_plane)
    assert not _port_open(result.data_plane)
    assert not _process_alive(result.redis_pid)
    assert result.workdir is not None and not result.workdir.exists()


def _interrupt_when_serving(out: io.StringIO) -> threading.Thread:
    def watch():
        deadline = time.monotonic() + 120
        while "press Ctrl-C" not in out.getvalue():
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("demo-cache")


@pytest.mark.slow
def test_demo_trains_serves_and_cleans_up(cache):
    out, err = io.StringIO(), io.StringIO()
    result = run_demo(cache, out=out, err=err, small=True)

    for persona in PERSONAS:
        assert result.texts[persona.name] == persona.answer, persona.name
    assert BASE in result.texts
    # Sent concurrently with the adapters already in slots: one batch, every adapter in it.
    assert result.largest_batch == len(PERSONAS) + 1
    assert set(result.batch_adapters) == {p.name for p in PERSONAS}
    printed = out.getvalue()
    assert "\x1b[" not in printed  # not a terminal: no colour, no cursor movement
    assert f"loraplane generate --address {result.data_plane} --adapter pirate" in printed
    assert f"loraplane adapters --address {result.control_plane} --token-file" in printed
    assert "trained in" in err.getvalue()
    assert_cleaned_up(result)
    assert any(cache.glob("base-*/config.json")) and len(list(cache.glob("adapters-*/*"))) == len(PERSONAS)

    # Second run: everything from the cache, servers kept up until Ctrl-C.
    out, err = io.StringIO(), io.StringIO()
    interrupter = _interrupt_when_serving(out)
    again = run_demo(cache, out=out, err=err, small=True, serve=True)
    interrupter.join(5)
    assert "trained in" not in err.getvalue() and err.getvalue().count("cached at") == len(PERSONAS) + 1
    assert {p.name: again.texts[p.name] for p in PERSONAS} == again.answers
    assert "press Ctrl-C" in out.getvalue()
    assert_cleaned_up(again)


@pytest.mark.slow
def test_unconverged_training_fails_and_caches_nothing(cache):
    model_dir = ensure_base_model(cache, SMALL)
    recipe = TrainRecipe(steps=2)
    with pytest.raises(TrainingFailed, match="did not memorize"):
        ensure_adapters(cache, model_dir, PERSONAS[:1], recipe, lambda name: lambda *a, **k: None)
    root = cache / f"adapters-{model_dir.name.removeprefix('base-')}"
    assert not list(root.glob(".*"))  # the staging directory is gone
    assert not (root / f"{PERSONAS[0].name}-{recipe.digest(model_dir, PERSONAS[0])}").exists()


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--cache-dir", "--serve", "--small", "--steps"):
        assert flag in help_text


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "loraplane" / "demo"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_panel_colours_a_terminal_unless_no_color(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    tty = _Terminal()
    panel = StreamPanel(tty, [("pirate", "33"), ("base", "37")])
    panel.start()
    panel.add("pirate", " Ahoy")
    panel.add("base", "\x1b[2J\n")  # raw control bytes from the base model must not reach the terminal
    assert "\x1b[33" in tty.getvalue() and "\x1b[2J" not in tty.getvalue()
    assert "\x1b[2F" in tty.getvalue()  # redrawn in place

    monkeypatch.setenv("NO_COLOR", "1")
    plain = _Terminal()
    panel = StreamPanel(plain, [("pirate", "33")])
    panel.add("pirate", " Ahoy")
    panel.finish("pirate")
    assert "\x1b[33m" not in plain.getvalue() and "Ahoy" in plain.getvalue()
