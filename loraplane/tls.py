"""TLS from files that are re-read when they change, so a rotated certificate needs no restart.

cert-manager renews a certificate well before it expires and rewrites the Secret; the kubelet then
swaps the mounted files in place. A process that read them once at start would keep presenting the
old certificate until it expired.

- Servers: gRPC asks `CertificateFiles.fetch` before every new connection's handshake, and it
  answers with a new configuration only when a file's mtime, size or inode moved.
- Clients (the data plane's channel to the control plane): `ClientTlsFiles.poll` hands the owner
  of a channel new credentials to build a new one from.

Both check a new set before taking it (the key matches the certificate, the CA parses): gRPC would
otherwise keep the old certificate, log the failure only in its core, and never look again.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

import grpc

logger = logging.getLogger(__name__)
T = TypeVar("T")
_NOT_YET = object()


def files_stamp(paths) -> tuple:
    """What changes when any of `paths` is rewritten or replaced. OSError when one is missing."""
    # stat follows the kubelet's ..data symlink, so an atomic Secret update changes the stamp.
    return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in (Path(p).stat() for p in paths))


def check_pem(cert: Path | None, key: Path | None, ca: Path | None) -> None:
    """ssl.SSLError (an OSError) unless the key matches the certificate and the CA parses."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cert:
        ctx.load_cert_chain(cert, key)
    if ca:
        ctx.load_verify_locations(cafile=ca)


class WatchedFiles(Generic[T]):
    """`load()` of some files, done again when they change. Never raises after the first load."""

    def __init__(self, paths: tuple[Path, ...], load: Callable[[], T], what: str):
        self.paths, self._load, self.what = paths, load, what
        self._stamp = files_stamp(paths)  # start-up errors (a missing file) propagate: nothing to serve yet
        self.initial = load()
        self._failed: object = _NOT_YET
        self.reloads = 0

    def poll(self) -> T | None:
        """A new load when the files changed since the last one, else None (keep the current).

        Files caught mid-rotation (missing, unreadable, a key that does not match yet) keep the
        current value in service, with one warning per state of the files; the next poll tries again.
        """
        try:
            stamp = files_stamp(self.paths)
        except OSError as e:
            return self._keep_current(None, e)
        if stamp == self._stamp:
            return None
        try:
            value = self._load()
            if files_stamp(self.paths) != stamp:
                raise OSError("the files changed while they were read")
        except OSError as e:
            return self._keep_current(stamp, e)
        self._stamp, self._failed = stamp, _NOT_YET
        self.reloads += 1
        logger.info("%s reloaded from %s", self.what, ", ".join(str(p) for p in self.paths))
        return value

    def _keep_current(self, stamp: tuple | None, error: OSError) -> None:
        # stamp None: a file is missing; else the stamp of files that exist but would not load.
        if stamp != self._failed:
            logger.warning("%s files changed but could not be loaded (%s); keeping the current ones",
                           self.what, error)
        self._failed = stamp
        return None


class CertificateFiles:
    """A server's certificate chain, key and (for mTLS) client CA, as files on disk."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None):
        self.cert, self.key, self.client_ca = Path(cert), Path(key), Path(client_ca) if client_ca else None
        self._lock = threading.Lock()  # gRPC may call fetch from several handshakes at once
        paths = tuple(p for p in (self.cert, self.key, self.client_ca) if p)
        self.watched = WatchedFiles(paths, self._load, "TLS certificate")
        self.initial = self.watched.initial

    def _load(self) -> grpc.ServerCertificateConfiguration:
        check_pem(self.cert, self.key, self.client_ca)
        ca = self.client_ca.read_bytes() if self.client_ca else None
        return grpc.ssl_server_certificate_configuration([(self.key.read_bytes(), self.cert.read_bytes())],
                                                         root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            return self.watched.poll()


class ClientTlsFiles:
    """A client's trust and identity as files: the CA to verify the server with (None: the system's
    roots) and, for mTLS, a certificate and its key."""

    def __init__(self, ca: Path | None = None, cert: Path | None = None, key: Path | None = None):
        if bool(cert) != bool(key):
            raise ValueError("a client certificate and its key go together")
        self.ca, self.cert, self.key = (Path(p) if p else None for p in (ca, cert, key))
        paths = tuple(p for p in (self.ca, self.cert, self.key) if p)
        self.watched = WatchedFiles(paths, self._load, "control-plane TLS")
        self.initial = self.watched.initial

    def _load(self) -> grpc.ChannelCredentials:
        check_pem(self.cert, self.key, self.ca)
        ca, key, chain = (p.read_bytes() if p else None for p in (self.ca, self.key, self.cert))
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=chain)

    def poll(self) -> grpc.ChannelCredentials | None:
        """New credentials when the files changed (and check out), else None."""
        return self.watched.poll()


def server_credentials(cert: Path | None, key: Path | None, client_ca: Path | None):
    """Plaintext (None) without a certificate; otherwise TLS, mutual when client_ca is set, that follows
    the files as they are rotated. One call per port: gRPC takes the initial configuration once."""
    if not cert:
        return None
    files = CertificateFiles(cert, key, client_ca)
    return grpc.dynamic_ssl_server_credentials(files.initial, files.fetch,
                                               require_client_authentication=bool(client_ca))
