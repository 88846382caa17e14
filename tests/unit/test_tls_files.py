"""Certificate files: reloaded when they change and check out, else the current ones stay in service."""

from __future__ import annotations

import logging
import ssl

import grpc
import pytest

from loraplane.tls import CertificateFiles, ClientTlsFiles, server_credentials
from tests.pki import new_cert, new_key, write_pem

pytest.importorskip("cryptography")


class Pair:
    """A CA, and a server certificate and key it signed, written where the files under test live."""

    def __init__(self, name: str):
        self.ca_key, self.key = new_key(), new_key()
        self.ca = new_cert(self.ca_key, f"{name} CA", self.ca_key, f"{name} CA", ca=True)
        self.cert = new_cert(self.key, "localhost", self.ca_key, f"{name} CA", server=True)

    def write(self, cert=None, key=None, ca=None) -> None:
        for path, kw in ((cert, {"cert": self.cert}), (key, {"key": self.key}), (ca, {"cert": self.ca})):
            if path is not None:
                staged = path.with_suffix(".staged")
                write_pem(staged, **kw).replace(path)  # a new inode, as the kubelet's swap gives


@pytest.fixture
def paths(tmp_path):
    return tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.crt"


@pytest.fixture
def files(paths):
    cert, key, ca = paths
    Pair("first").write(cert, key, ca)
    return CertificateFiles(cert, key, ca)


def test_unchanged_files_are_not_reloaded(files):
    assert isinstance(files.initial, grpc.ServerCertificateConfiguration)
    assert [files.fetch() for _ in range(3)] == [None, None, None]
    assert files.watched.reloads == 0


def test_each_rotation_is_one_reload(files, paths, caplog):
    cert, key, ca = paths
    with caplog.at_level(logging.INFO, logger="loraplane.tls"):
        Pair("second").write(cert, key)
        assert isinstance(files.fetch(), grpc.ServerCertificateConfiguration)
        assert files.fetch() is None
        Pair("third").write(ca=ca)  # a new client CA alone
        assert isinstance(files.fetch(), grpc.ServerCertificateConfiguration)
    assert files.watched.reloads == 2
    assert sum("TLS certificate reloaded" in m for m in caplog.messages) == 2


def test_a_missing_file_keeps_the_current_certificate_and_warns_once_each_time(files, paths, caplog):
    cert, key, _ = paths
    pair = Pair("second")
    for round_ in (1, 2):  # a later gap after a good reload is reported again
        key.unlink()
        with caplog.at_level(logging.WARNING, logger="loraplane.tls"):
            assert [files.fetch() for _ in range(3)] == [None, None, None]
        assert sum("keeping the current ones" in m for m in caplog.messages) == round_
        pair.write(cert, key)
        assert isinstance(files.fetch(), grpc.ServerCertificateConfiguration)
        assert files.watched.reloads == round_


def test_a_key_that_does_not_match_is_not_taken(files, paths, caplog):
    cert, key, _ = paths
    new, other = Pair("second"), Pair("other")
    new.write(cert=cert)
    other.write(key=key)  # half a rotation: the certificate is new, the key belongs to something else
    with caplog.at_level(logging.WARNING, logger="loraplane.tls"):
        assert [files.fetch() for _ in range(2)] == [None, None]
    assert len(caplog.records) == 1 and files.watched.reloads == 0
    new.write(key=key)
    assert isinstance(files.fetch(), grpc.ServerCertificateConfiguration)
    assert files.watched.reloads == 1


def test_start_up_needs_every_file_and_a_matching_pair(paths, tmp_path):
    cert, key, ca = paths
    Pair("first").write(cert, key, ca)
    with pytest.raises(FileNotFoundError):
        CertificateFiles(cert, tmp_path / "absent.key")
    with pytest.raises(FileNotFoundError):
        CertificateFiles(cert, key, tmp_path / "absent-ca.crt")
    Pair("other").write(key=key)
    with pytest.raises(ssl.SSLError):
        CertificateFiles(cert, key)


def test_client_files_follow_rotation(paths):
    cert, key, ca = paths
    Pair("first").write(cert, key, ca)
    files = ClientTlsFiles(ca, cert, key)
    assert isinstance(files.initial, grpc.ChannelCredentials)
    assert files.poll() is None
    Pair("second").write(cert, key, ca)
    assert isinstance(files.poll(), grpc.ChannelCredentials)
    assert files.poll() is None
    with pytest.raises(ValueError, match="go together"):
        ClientTlsFiles(ca, cert, None)


def test_no_certificate_means_plaintext(paths):
    cert, key, ca = paths
    Pair("first").write(cert, key, ca)
    assert server_credentials(None, None, None) is None
    assert isinstance(server_credentials(cert, key, ca), grpc.ServerCredentials)
