"""CertificateFiles: reload when the files change, keep the current certificate when they cannot be read."""

from __future__ import annotations

import logging

import grpc
import pytest

from loraplane.tls import CertificateFiles, server_credentials


@pytest.fixture
def files(tmp_path):
    # gRPC checks PEM only at handshake time; these tests are about when the files are re-read.
    cert, key, ca = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.crt"
    cert.write_bytes(b"cert-1")
    key.write_bytes(b"key-1")
    ca.write_bytes(b"ca-1")
    return cert, key, ca


def test_unchanged_files_are_not_reloaded(files):
    f = CertificateFiles(*files)
    assert isinstance(f.initial, grpc.ServerCertificateConfiguration)
    assert [f.fetch() for _ in range(3)] == [None, None, None]
    assert f.reloads == 0


def test_each_change_to_any_file_is_one_reload(files):
    cert, key, ca = files
    f = CertificateFiles(cert, key, ca)
    for i, path in enumerate((cert, key, ca), start=1):
        path.write_bytes(path.read_bytes() + b"-rotated")  # a new size, whatever the clock's resolution
        assert isinstance(f.fetch(), grpc.ServerCertificateConfiguration)
        assert f.fetch() is None
        assert f.reloads == i


def test_a_missing_file_keeps_the_current_certificate_and_warns_once(files, caplog):
    cert, key, _ = files
    f = CertificateFiles(cert, key)
    key.unlink()
    with caplog.at_level(logging.WARNING, logger="loraplane.tls"):
        assert [f.fetch() for _ in range(3)] == [None, None, None]
    assert len(caplog.records) == 1 and "still serving the previous certificate" in caplog.messages[0]
    assert f.reloads == 0
    key.write_bytes(b"key-2")
    assert isinstance(f.fetch(), grpc.ServerCertificateConfiguration)
    assert f.reloads == 1


def test_start_up_needs_every_file(files, tmp_path):
    cert, key, _ = files
    with pytest.raises(FileNotFoundError):
        CertificateFiles(cert, tmp_path / "absent.key")
    with pytest.raises(FileNotFoundError):
        CertificateFiles(cert, key, tmp_path / "absent-ca.crt")


def test_no_certificate_means_plaintext(files):
    cert, key, ca = files
    assert server_credentials(None, None, None) is None
    assert isinstance(server_credentials(cert, key, ca), grpc.ServerCredentials)
