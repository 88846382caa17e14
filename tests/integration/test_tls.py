"""TLS and mTLS on both servers and on the data plane's link to the control plane.

Certificates are made at test time: a CA, a server certificate for 127.0.0.1/localhost, a client
certificate, and a rogue CA with its own client certificate that nothing should trust.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplane.cli import main
from loraplane.client import Client
from loraplane.errors import LoraplaneError
from tests.pki import new_cert, new_key, write_pem

S = grpc.StatusCode
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_client_cert: Path
    rogue_client_key: Path

    def client_pair(self, rogue: bool = False) -> tuple[bytes, bytes]:
        """(private key, certificate chain), as loraplane.Client takes them."""
        if rogue:
            return self.rogue_client_key.read_bytes(), self.rogue_client_cert.read_bytes()
        return self.client_key.read_bytes(), self.client_cert.read_bytes()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    pytest.importorskip("cryptography")
    d = tmp_path_factory.mktemp("pki")
    ca_key, rogue_key = new_key(), new_key()
    ca = new_cert(ca_key, "loraplane test CA", ca_key, "loraplane test CA", ca=True)
    rogue = new_cert(rogue_key, "rogue CA", rogue_key, "rogue CA", ca=True)
    server_key, client_key, rogue_client_key = new_key(), new_key(), new_key()
    return Pki(
        ca=write_pem(d / "ca.pem", cert=ca),
        server_cert=write_pem(d / "server.pem", cert=new_cert(server_key, "localhost", ca_key, "loraplane test CA",
                                                        server=True)),
        server_key=write_pem(d / "server.key", key=server_key),
        client_cert=write_pem(d / "client.pem", cert=new_cert(client_key, "data-plane", ca_key, "loraplane test CA")),
        client_key=write_pem(d / "client.key", key=client_key),
        rogue_ca=write_pem(d / "rogue-ca.pem", cert=rogue),
        rogue_client_cert=write_pem(d / "rogue-client.pem", cert=new_cert(rogue_client_key, "intruder", rogue_key,
                                                                    "rogue CA")),
        rogue_client_key=write_pem(d / "rogue-client.key", key=rogue_client_key),
    )


def refused(call, code=S.UNAVAILABLE) -> LoraplaneError:
    with pytest.raises(LoraplaneError) as e:
        call()
    assert e.value.code == code, e.value
    return e.value


def health_over_tls(address: str, pki: Pki, client_cert: bool = False) -> int:
    key, chain = pki.client_pair() if client_cert else (None, None)
    creds = grpc.ssl_channel_credentials(pki.ca.read_bytes(), key, chain)
    with grpc.secure_channel(address, creds) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_control_plane_server_tls(cp_factory, pki, good_adapter, capsys):
    cp = cp_factory(tls_cert=pki.server_cert, tls_key=pki.server_key)
    ca = pki.ca.read_bytes()
    with Client(cp.address, cp.token, tls=True, root_certificates=ca, timeout=10) as c:
        assert c.create_adapter("secure", str(good_adapter), wait=True).state == 4
        assert [a.name for a in c.list_adapters()] == ["secure"]
        assert c.resolve_adapter("secure").name == "secure"
    assert health_over_tls(cp.address, pki) == health_pb2.HealthCheckResponse.SERVING
    # Plaintext, or TLS that trusts another CA, gets nowhere (and sends no token in the clear).
    for client in (Client(cp.address, cp.token, timeout=5),
                   Client(cp.address, cp.token, tls=True, root_certificates=pki.rogue_ca.read_bytes(), timeout=5)):
        with client as c:
            refused(lambda c=c: c.list_adapters_page())
    # The admin token is still required over TLS.
    with Client(cp.address, None, tls=True, root_certificates=ca, timeout=10) as c:
        refused(lambda: c.list_adapters_page(), S.UNAUTHENTICATED)
    # The CLI's --ca-cert path.
    code = main(["adapters", "--address", cp.address, "--token", cp.token, "--ca-cert", str(pki.ca), "--json", "list"])
    assert code == 0 and '"secure"' in capsys.readouterr().out


def test_control_plane_mutual_tls(cp_factory, pki, good_adapter):
    cp = cp_factory(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca)
    ca = pki.ca.read_bytes()
    with Client(cp.address, cp.token, root_certificates=ca, client_cert=pki.client_pair(), timeout=10) as c:
        assert c.create_adapter("mutual", str(good_adapter), wait=True).state == 4
    for client_cert in (None, pki.client_pair(rogue=True)):
        with Client(cp.address, cp.token, root_certificates=ca, client_cert=client_cert, timeout=5) as c:
            refused(lambda c=c: c.get_adapter("mutual"))
    assert health_over_tls(cp.address, pki, client_cert=True) == health_pb2.HealthCheckResponse.SERVING


def test_cli_mutual_tls_flags(cp_factory, pki, good_adapter, capsys):
    cp = cp_factory(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca)
    with Client(cp.address, cp.token, root_certificates=pki.ca.read_bytes(), client_cert=pki.client_pair(),
                timeout=10) as c:
        c.create_adapter("cli-mtls", str(good_adapter), wait=True)
    capsys.readouterr()
    base = ["adapters", "--address", cp.address, "--token", cp.token, "--ca-cert", str(pki.ca), "--timeout", "5"]
    assert main([*base, "--client-cert", str(pki.client_cert), "--client-key", str(pki.client_key),
                 "--json", "get", "cli-mtls"]) == 0
    assert '"cli-mtls"' in capsys.readouterr().out
    # Without a client certificate, or with one from another CA, the handshake fails: a clear error, no trace.
    for pair in ([], ["--client-cert", str(pki.rogue_client_cert), "--client-key", str(pki.rogue_client_key)]):
        assert main([*base, *pair, "get", "cli-mtls"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
    # Flags that cannot work are refused before any connection.
    assert main([*base, "--client-cert", str(pki.client_cert), "get", "cli-mtls"]) == 2
    assert "--client-cert and --client-key go together" in capsys.readouterr().err
    assert main([*base, "--client-cert", str(pki.client_cert), "--client-key", str(pki.client_key) + ".missing",
                 "get", "cli-mtls"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_data_plane_tls_both_ways(cp_factory, dp_factory, pki, good_adapter):
    """Client -(mTLS)-> data plane -(mTLS)-> control plane: the adapter arrives over TLS and serves."""
    cp = cp_factory(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca)
    ca = pki.ca.read_bytes()
    with Client(cp.address, cp.token, root_certificates=ca, client_cert=pki.client_pair(), timeout=10) as c:
        version = c.create_adapter("tls-adapter", str(good_adapter), wait=True).version
    dp = dp_factory(cp.address, control_plane_ca=pki.ca, control_plane_client_cert=pki.client_cert,
                    control_plane_client_key=pki.client_key, tls_cert=pki.server_cert, tls_key=pki.server_key,
                    tls_client_ca=pki.ca)
    with Client(dp.address, root_certificates=ca, client_cert=pki.client_pair(), timeout=30) as c:
        text, last = c.generate_text([1, 2, 3], "tls-adapter", max_tokens=4, ignore_eos=True)
        assert last.adapter_version == version and last.usage.completion_tokens == 4
    assert health_over_tls(dp.address, pki, client_cert=True) == health_pb2.HealthCheckResponse.SERVING
    for client in (Client(dp.address, timeout=5), Client(dp.address, root_certificates=ca, timeout=5),
                   Client(dp.address, root_certificates=ca, client_cert=pki.client_pair(rogue=True), timeout=5)):
        with client as c:
            refused(lambda c=c: c.get_model_info())



def plaintext_health(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=10).status


@pytest.mark.parametrize("plane", ["control", "data"])
def test_plaintext_health_port_beside_a_tls_port(cp_factory, dp_factory, pki, plane):
    """What the kubelet needs under TLS: its gRPC probes speak plaintext, to a port that answers health only."""
    tls = dict(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca, health_listen="127.0.0.1:0")
    if plane == "control":
        server = cp_factory(**tls)
        other = ("/loraplane.v1.AdapterRegistryService/ListAdapters", b"")
    else:
        server = dp_factory(cp_factory().address, **tls)
        other = ("/loraplane.v1.GenerationService/GetModelInfo", b"")
    grpc_server = server.plane.grpc
    port = grpc_server.health_port
    assert port and port != server.plane.port
    deadline = time.monotonic() + 10  # the control plane turns ready once its first Redis ping answers
    while plaintext_health(port, "readiness") != health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
        time.sleep(0.05)
    for service in ("", "liveness", "readiness", "startup"):
        assert plaintext_health(port, service) == health_pb2.HealthCheckResponse.SERVING
    assert health_over_tls(server.address, pki, client_cert=True) == health_pb2.HealthCheckResponse.SERVING
    # Nothing but health there: no other service, and no reflection to list them.
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for method in (other[0], "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"):
            with pytest.raises(grpc.RpcError) as e:
                channel.unary_unary(method)(other[1], timeout=10)
            assert e.value.code() == S.UNIMPLEMENTED
    # The statuses are shared: readiness drops on both ports together.
    server.thread.call(grpc_server.set_serving(False))
    assert plaintext_health(port, "readiness") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert plaintext_health(port, "liveness") == health_pb2.HealthCheckResponse.SERVING
    server.thread.call(grpc_server.set_serving(True))
    assert plaintext_health(port, "readiness") == health_pb2.HealthCheckResponse.SERVING


def test_health_listen_must_be_an_address(base_model, pki):
    from control_plane.config import ControlPlaneConfig

    for bad in ("", "8081", "host:", "host:99999"):
        with pytest.raises(ValueError, match="health_listen"):
            ControlPlaneConfig(base_model=str(base_model), health_listen=bad)

def test_data_plane_refuses_a_control_plane_it_cannot_verify(cp_factory, dp_factory, pki, good_adapter):
    cp = cp_factory(tls_cert=pki.server_cert, tls_key=pki.server_key)
    with Client(cp.address, cp.token, root_certificates=pki.ca.read_bytes(), timeout=10) as c:
        c.create_adapter("unverified", str(good_adapter), wait=True)
    for ca in (pki.rogue_ca, None):  # another CA, or plaintext against a TLS server
        dp = dp_factory(cp.address, control_plane_ca=ca)
        with dp.client(timeout=30) as c:
            err = refused(lambda c=c: c.generate_text([1, 2, 3], "unverified", max_tokens=2))
            assert err.reason_name == "CONTROL_PLANE_UNAVAILABLE"
            assert c.generate_text([1, 2, 3], max_tokens=2)[1].usage.completion_tokens == 2  # base model still serves
        assert dp.plane.fetcher.fetches == 0


# gRPC reads its default trust store once per process, from GRPC_DEFAULT_SSL_ROOTS_FILE_PATH when set:
# a child process with the test CA there stands for a control plane behind a public certificate. It
# goes from the data plane's flags to the channel the data plane would fetch through.
_RESOLVE_WITH_SYSTEM_ROOTS = """
import argparse, asyncio, sys
from data_plane.lora.fetcher import Fetcher
from data_plane.server.config import add_arguments, from_args

parser = argparse.ArgumentParser()
add_arguments(parser)
config = from_args(parser.parse_args(["--model", "unused", "--device", "cpu", "--control-plane", sys.argv[1],
                                      *sys.argv[3:]]))

async def main():
    fetcher = Fetcher(config.fetcher_config())
    try:
        print((await fetcher.resolve(sys.argv[2])).version)
    finally:
        await fetcher.close()

asyncio.run(main())
"""


def test_control_plane_tls_verifies_against_the_systems_roots(cp_factory, dp_factory, pki, good_adapter):
    cp = cp_factory(tls_cert=pki.server_cert, tls_key=pki.server_key)
    with Client(cp.address, cp.token, root_certificates=pki.ca.read_bytes(), timeout=10) as c:
        version = c.create_adapter("public", str(good_adapter), wait=True).version
    # The test CA is in no system trust store: --control-plane-tls refuses the certificate.
    dp = dp_factory(cp.address, control_plane_tls=True)
    with dp.client(timeout=30) as c:
        err = refused(lambda: c.generate_text([1, 2, 3], "public", max_tokens=2))
        assert err.reason_name == "CONTROL_PLANE_UNAVAILABLE"
    assert dp.plane.fetcher.fetches == 0
    # With the test CA as the system's roots, the same setting resolves over TLS.
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(pki.ca), "PYTHONPATH": str(root)}
    def resolve(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _RESOLVE_WITH_SYSTEM_ROOTS, cp.address, "public", *flags],
                              env=env, cwd=root, capture_output=True, text=True, timeout=60)

    out = resolve("--control-plane-tls")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == version
    assert "CONTROL_PLANE_UNAVAILABLE" in resolve().stderr  # plaintext, without the flag


def test_tls_settings_that_would_silently_weaken_are_refused(base_model, pki):
    from control_plane.config import ControlPlaneConfig
    from data_plane.server.config import DataPlaneConfig

    with pytest.raises(ValueError):
        ControlPlaneConfig(base_model=str(base_model), tls_client_ca=pki.ca)
    with pytest.raises(ValueError):
        ControlPlaneConfig(base_model=str(base_model), tls_cert=pki.server_cert)
    common = dict(model=str(base_model), control_plane="127.0.0.1:1", device="cpu")
    for bad in (dict(tls_client_ca=pki.ca),  # mTLS asked for, but no server certificate: would run plaintext
                dict(tls_key=pki.server_key),
                dict(control_plane_client_cert=pki.client_cert),
                dict(control_plane_tls="no")):  # a string, truthy: it would have turned TLS on
        with pytest.raises(ValueError):
            DataPlaneConfig(**common, **bad)


def _health(address: str, ca: bytes, client_pair: tuple[bytes, bytes] | None = None) -> int:
    """Liveness (SERVING from the moment the port is up) over a new connection, trusting only `ca`."""
    key, chain = client_pair or (None, None)
    # A private subchannel pool: a new channel must not reuse a connection (and its handshake) from before.
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.secure_channel(address, grpc.ssl_channel_credentials(ca, key, chain), options) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="liveness"),
                                                          timeout=5).status


def _move_in(path: Path, data: bytes) -> None:
    """Replace a file the way the kubelet updates a mounted Secret: write beside it, then rename over it."""
    staged = path.with_suffix(".staged")
    staged.write_bytes(data)
    staged.replace(path)


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_a_rotated_certificate_is_served_without_a_restart(cp_factory, pki, tmp_path, mutual):
    from cryptography.hazmat.primitives import serialization

    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(pki.server_cert.read_bytes())
    key.write_bytes(pki.server_key.read_bytes())
    cp = cp_factory(tls_cert=cert, tls_key=key, tls_client_ca=pki.ca if mutual else None)
    old_ca, client = pki.ca.read_bytes(), pki.client_pair() if mutual else None
    assert _health(cp.address, old_ca, client) == SERVING

    # Mid-rotation the key is gone for a moment: new connections still get the current certificate.
    key.unlink()
    assert _health(cp.address, old_ca, client) == SERVING

    # The new pair comes from another CA, so which certificate a handshake got is unambiguous.
    ca_key, server_key = new_key(), new_key()
    new_ca = new_cert(ca_key, "rotated CA", ca_key, "rotated CA", ca=True).public_bytes(serialization.Encoding.PEM)
    rotated = new_cert(server_key, "localhost", ca_key, "rotated CA", server=True)
    _move_in(cert, rotated.public_bytes(serialization.Encoding.PEM))
    _move_in(key, server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    assert _health(cp.address, new_ca, client) == SERVING
    with pytest.raises(grpc.RpcError) as e:
        _health(cp.address, old_ca, client)
    assert e.value.code() == S.UNAVAILABLE
    if mutual:  # the client CA did not change: a client without a certificate is still refused
        with pytest.raises(grpc.RpcError) as e:
            _health(cp.address, new_ca)
        assert e.value.code() == S.UNAVAILABLE


def test_the_data_planes_channel_follows_its_rotated_tls_files(cp_factory, pki, tmp_path, good_adapter):
    import asyncio
    import hashlib

    from data_plane.lora.fetcher import Fetcher, FetcherConfig
    from loraplane.tls import ClientTlsFiles
    from loraplane.v1 import errors_pb2 as R

    cp = cp_factory(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca)
    with Client(cp.address, cp.token, root_certificates=pki.ca.read_bytes(), client_cert=pki.client_pair(),
                timeout=10) as c:
        c.create_adapter("rotating", str(good_adapter), wait=True)
    # Start with the wrong trust and identity, as an expired or superseded pair would be.
    ca, cert, key = tmp_path / "ca.crt", tmp_path / "tls.crt", tmp_path / "tls.key"
    for path, source in ((ca, pki.rogue_ca), (cert, pki.rogue_client_cert), (key, pki.rogue_client_key)):
        path.write_bytes(source.read_bytes())

    async def run():
        fetcher = Fetcher(FetcherConfig(cp.address, tls_files=ClientTlsFiles(ca, cert, key), retries=0,
                                        timeout_s=5))
        try:
            with pytest.raises(LoraplaneError) as e:
                await fetcher.resolve("rotating")
            assert e.value.reason == R.ERROR_REASON_CONTROL_PLANE_UNAVAILABLE
            for path, source in ((ca, pki.ca), (cert, pki.client_cert), (key, pki.client_key)):
                _move_in(path, source.read_bytes())
            manifest = await fetcher.resolve("rotating")  # the same Fetcher: no restart
            data = await fetcher.fetch(manifest.name, manifest.version)
            assert "sha256:" + hashlib.sha256(data).hexdigest() == manifest.version
        finally:
            await fetcher.close()

    asyncio.run(run())
