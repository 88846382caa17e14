"""Fault tests: real server processes killed, signalled and cut off from each other.

Servers run as `python -m loraplane.cli ...` subprocesses where the test kills them; a TCP proxy
between two components can cut a connection, or hold a stream at a byte count, so a kill lands
exactly mid-transfer instead of whenever the scheduler allows.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplane.embedded_redis import free_port
from tests.factories import make_peft_adapter, make_tiny_model

REPO = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "fault-admin-token"
# Big enough that one step takes a few ms (streams last seconds) and an r=64 adapter spans several
# 1 MiB FetchAdapter chunks; small enough to load in a second.
MEDIUM = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=2, vocab_size=320, max_position_embeddings=1024)
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="session")
def fault_model(tmp_path_factory) -> Path:
    from tests.unit.engine_helpers import save_test_tokenizer

    path = make_tiny_model(tmp_path_factory.mktemp("fault-base") / "medium-llama", **MEDIUM)
    save_test_tokenizer(path, vocab_size=320)
    return path


@pytest.fixture(scope="session")
def fault_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fault-adapters")


@pytest.fixture(scope="session")
def fault_adapters(fault_model, fault_root) -> dict[str, Path]:
    """"big": r=64 on every module (about 5 MB normalized); "a", "b", "c": small ones."""
    made = {"big": make_peft_adapter(fault_model, fault_root / "big", r=64, alpha=64, target_modules=ALL_MODULES,
                                     seed=7)}
    for i, name in enumerate("abc"):
        made[name] = make_peft_adapter(fault_model, fault_root / name, r=8, alpha=16, seed=20 + i,
                                       target_modules=("q_proj", "v_proj", "down_proj"))
    return made


@pytest.fixture
def token_file(tmp_path) -> Path:
    path = tmp_path / "admin-token"
    path.write_text(ADMIN_TOKEN + "\n")
    path.chmod(0o600)
    return path


class Proc:
    """A server subprocess whose output goes to a file, so a test can read its log at any time."""

    def __init__(self, args: list[str], log: Path, port: int, env: dict | None = None):
        self.args = args
        self.log_path = log
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self._log = open(log, "ab")  # noqa: SIM115 - closed in wait()/cleanup
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        environment.pop("LORAPLANE_ADMIN_TOKEN", None)
        environment.pop("LORAPLANE_REDIS_URL", None)
        self.popen = subprocess.Popen([sys.executable, "-m", "loraplane.cli", *args], cwd=REPO, env=environment,
                                      stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(30)

    def terminate(self) -> None:
        self.popen.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60) -> int:
        code = self.popen.wait(timeout)
        self._log.close()
        return code

    def wait_serving(self, timeout: float = 120) -> None:
        wait_health(self.address, timeout, check_alive=self)


def wait_health(address: str, timeout: float = 60, serving: bool = True, check_alive: Proc | None = None) -> None:
    want = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if check_alive is not None and not check_alive.alive():
                raise AssertionError(f"server exited ({check_alive.popen.returncode}):\n{check_alive.log()[-4000:]}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=1).status == want:
                    return
            except grpc.RpcError:
                if not serving:  # a server that stopped taking calls fails its probe: not ready either
                    return
            time.sleep(0.1)
    raise AssertionError(f"{address} never became {'SERVING' if serving else 'NOT_SERVING'}")


@pytest.fixture
def spawn(tmp_path, token_file):
    """Start server subprocesses; every one still running is killed at teardown."""
    started: list[Proc] = []

    def control_plane(base_model: Path, redis_url: str, prefix: str, allowed_root: Path, *, port: int = 0,
                      data_dir: Path | None = None, extra: tuple = (), env: dict | None = None) -> Proc:
        port = port or free_port()
        args = ["--log-level", "DEBUG", "control-plane", "--base-model", str(base_model),
                "--listen", f"127.0.0.1:{port}", "--redis-url", redis_url, "--redis-prefix", prefix,
                "--data-dir", str(data_dir or tmp_path / "cp"), "--allowed-root", str(allowed_root),
                "--admin-token-file", str(token_file), "--grace-period", "2", "--max-lora-rank", "64", *extra]
        proc = Proc(args, tmp_path / f"cp-{port}-{len(started)}.log", port, env)
        started.append(proc)
        return proc

    def data_plane(model: Path, control_plane_address: str, redis_url: str | None, prefix: str, *,
                   replica: str = "", port: int = 0, extra: tuple = (), env: dict | None = None) -> Proc:
        port = port or free_port()
        replica = replica or f"dp-{len(started)}"
        args = ["--log-level", "DEBUG", "data-plane", "--model", str(model), "--control-plane", control_plane_address,
                "--redis-prefix", prefix, "--listen", f"127.0.0.1:{port}", "--replica-id", replica,
                "--max-loras", "2", "--max-cpu-loras", "2", "--max-lora-rank", "64", "--max-model-len", "512",
                "--max-num-seqs", "8", "--device", "cpu", "--disk-cache-dir", str(tmp_path / f"{replica}-disk"),
                "--grace-period", "30", *extra]
        if redis_url:
            args += ["--redis-url", redis_url]
        proc = Proc(args, tmp_path / f"{replica}.log", port, env)
        started.append(proc)
        return proc

    yield SimpleNamespace(control_plane=control_plane, data_plane=data_plane, started=started)
    for proc in started:
        if proc.alive():
            proc.kill()
        proc._log.close()


@pytest.fixture
def prefix() -> str:
    return f"lpfault-{uuid.uuid4().hex[:10]}"


class TcpProxy:
    """127.0.0.1:<port> -> target, with switches: cut every connection, or hold the
    target-to-client direction once it has carried `hold_at` bytes (to kill a peer mid-stream)."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.open = True  # False: new connections are closed at once, like a partitioned network
        self.hold_at: int | None = None
        self.held = threading.Event()
        self.downstream_bytes = 0  # target -> client, over all connections
        self.connections = 0
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open:
                _abort(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
                upstream.settimeout(None)
            except OSError:
                _abort(client)
                continue
            with self._lock:
                self._pairs.append((client, upstream))
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if downstream and self.hold_at is not None:
                    room = self.hold_at - self.downstream_bytes
                    if room < len(data):
                        if room > 0:
                            dst.sendall(data[:room])
                            self.downstream_bytes += room
                        self.held.set()
                        self._release.wait()
                        return  # whatever the target sent after the hold point is never delivered
                dst.sendall(data)
                if downstream:
                    self.downstream_bytes += len(data)
        except OSError:
            pass
        finally:
            _abort(src)
            _abort(dst)

    def cut(self) -> None:
        """Drop every connection (RST) and refuse new ones until restore()."""
        self.open = False
        self.drop()

    def drop(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            _abort(a)
            _abort(b)

    def restore(self) -> None:
        self.open = True

    def release_dropping(self) -> None:
        """End a hold by dropping the held connections: the rest of that stream is lost."""
        self.drop()
        self.hold_at = None
        self._release.set()

    def close(self) -> None:
        self._stopped = True
        self.listener.close()
        self.drop()
        self._release.set()


def _abort(sock: socket.socket) -> None:
    try:
        # SO_LINGER 0: close with RST, the way a killed peer's kernel answers.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


@pytest.fixture
def proxy_factory():
    made: list[TcpProxy] = []

    def make(target_port: int) -> TcpProxy:
        proxy = TcpProxy(target_port)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    return last


def greedy_oracle(model_dir: Path, adapter_dir: Path | None, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation from HF transformers (+ PEFT): what a correctly loaded adapter produces."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()
