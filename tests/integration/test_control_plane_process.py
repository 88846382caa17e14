"""`loraplane control-plane` as a real process: embedded Redis, CLI, SIGTERM, persistence across restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplane.cli import main
from loraplane.embedded_redis import free_port

TOKEN = "process-test-token"


def start(base_model, data_dir, root, port):
    env = {**os.environ, "LORAPLANE_ADMIN_TOKEN": TOKEN}
    env.pop("LORAPLANE_REDIS_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "loraplane.cli", "control-plane", "--base-model", str(base_model),
         "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir), "--allowed-root", str(root),
         "--grace-period", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_serving(port, proc, timeout=60.0):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise AssertionError("control plane never became SERVING")
    finally:
        channel.close()


def cli(capsys, port, *args):
    code = main(["adapters", "--address", f"127.0.0.1:{port}", "--token", TOKEN, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_process_cli_sigterm_and_restart(base_model, good_adapter, adapter_root, tmp_path, capsys):
    port = free_port()
    proc = start(base_model, tmp_path / "data", adapter_root, port)
    try:
        wait_serving(port, proc)
        code, out, _ = cli(capsys, port, "register", "cli-one", str(good_adapter), "--wait", "--pin")
        assert code == 0 and "cli-one" in out and "READY" in out and "yes" in out
        code, out, _ = cli(capsys, port, "--json", "list")
        listed = json.loads(out)
        assert [a["name"] for a in listed] == ["cli-one"] and listed[0]["state"] == "ADAPTER_STATE_READY"
        code, out, err = cli(capsys, port, "delete", "cli-one")
        assert code == 2 and "ADAPTER_PINNED" in err
        code, _, err = cli(capsys, port, "get", "../etc/passwd")
        assert code == 2 and "INVALID_NAME" in err
        proc.send_signal(signal.SIGUSR1)  # every thread's stack to the log, and the server carries on
        time.sleep(0.5)
        wait_serving(port, proc, timeout=10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        log = proc.stdout.read()
        assert "control plane stopped" in log and TOKEN not in log
        assert "(most recent call first)" in log and "Current thread" in log
        redis_port = int((tmp_path / "data" / "redis" / "port").read_text())
        assert f"--redis-url redis://127.0.0.1:{redis_port}/0" in log
    finally:
        if proc.poll() is None:
            proc.kill()
    # Same data dir: the embedded Redis comes back from its AOF with the record and the pin.
    proc = start(base_model, tmp_path / "data", adapter_root, port)
    try:
        wait_serving(port, proc)
        code, out, _ = cli(capsys, port, "--json", "get", "cli-one")
        got = json.loads(out)[0]
        assert got["pinned"] is True and got["state"] == "ADAPTER_STATE_READY"
        # ...on the same port, so data planes pointed at it keep their --redis-url.
        assert int((tmp_path / "data" / "redis" / "port").read_text()) == redis_port
        with redis.Redis(port=redis_port) as r:
            assert r.ping()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_config_errors_are_clear(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["control-plane"])  # --base-model is required
    assert "--base-model" in capsys.readouterr().err
    code = main(["control-plane", "--base-model", "x", "--max-lora-rank", "0", "--data-dir", str(tmp_path)])
    assert code == 2 and "max_lora_rank" in capsys.readouterr().err


@pytest.fixture
def torch_threads():
    """`control-plane` in-process sets torch's thread count for the whole process (serve()); put it back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_a_wrong_model_path_is_one_clear_line_not_a_traceback(capfd, tmp_path, adapter_root, torch_threads):
    missing = tmp_path / "no-such-model"
    code = main(["control-plane", "--base-model", str(missing), "--data-dir", str(tmp_path / "cp")])
    err = capfd.readouterr().err
    assert code == 2 and f"model directory {missing} does not exist" in err and "Traceback" not in err
    code = main(["control-plane", "--base-model", str(adapter_root), "--data-dir", str(tmp_path / "cp")])
    err = capfd.readouterr().err
    assert code == 2 and "has no config.json" in err and "Traceback" not in err
    code = main(["data-plane", "--model", str(missing), "--control-plane", "127.0.0.1:1", "--device", "cpu",
                 "--listen", "127.0.0.1:0", "--disk-cache-dir", str(tmp_path / "disk")])
    err = capfd.readouterr().err
    assert code == 2 and "is not a model directory" in err and "Traceback" not in err
