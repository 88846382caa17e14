"""TLS from files that are re-read when they change, so a rotated certificate needs no restart.

cert-manager renews a certificate well before it expires and rewrites the Secret; the kubelet then
swaps the mounted files in place. A process that read them once at start would keep presenting the
old certificate until it expired.

- Servers: gRPC asks `CertificateFiles.fetch` before every new connection's handshake, and it
  answers with a new configuration only when a file's mtime, size or inode moved.
- Clients (the data plane's channel to the control plane): `ClientTlsFiles.stamp` tells the owner
  of a channel when to build a new one from `ClientTlsFiles.credentials`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

logger = logging.getLogger(__name__)
_NOT_YET = object()


def files_stamp(paths) -> tuple:
    """What changes when any of `paths` is rewritten or replaced. OSError when one is missing."""
    # stat follows the kubelet's ..data symlink, so an atomic Secret update changes the stamp.
    return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in (Path(p).stat() for p in paths))


class CertificateFiles:
    """The server's certificate chain, key and (for mTLS) client CA, as files on disk."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None):
        self.paths = tuple(Path(p) for p in (cert, key, client_ca) if p is not None)
        self.cert, self.key, self.client_ca = Path(cert), Path(key), client_ca and Path(client_ca)
        self._lock = threading.Lock()  # gRPC may call fetch from several handshakes at once
        self._stamp = self._read_stamp()  # start-up errors (a missing file) propagate: nothing to serve yet
        self.initial = self._load()
        self._failed_stamp: object = _NOT_YET
        self.reloads = 0

    def _read_stamp(self) -> tuple:
        return files_stamp(self.paths)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        ca = self.client_ca.read_bytes() if self.client_ca else None
        return grpc.ssl_server_certificate_configuration([(self.key.read_bytes(), self.cert.read_bytes())],
                                                         root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration when the files changed since the last load, else None (keep the current).

        Never raises: a file caught mid-rotation (missing or unreadable) keeps the current certificate
        in service, and the next connection tries again. A file still being written changes again when
        it is done, and is loaded then.
        """
        with self._lock:
            try:
                stamp = self._read_stamp()
            except OSError as e:
                return self._keep_current(None, e)
            if stamp == self._stamp:
                return None
            try:
                config = self._load()
            except OSError as e:
                return self._keep_current(stamp, e)
            self._stamp = stamp
            self.reloads += 1
            logger.info("TLS certificate reloaded from %s", ", ".join(str(p) for p in self.paths))
            return config

    def _keep_current(self, stamp: tuple | None, error: OSError) -> None:
        # stamp None: a file is missing; else the stamp of files that exist but would not read.
        if stamp != self._failed_stamp:  # once per state of the files, not once per connection
            logger.warning("TLS files changed but could not be read (%s); still serving the previous "
                           "certificate", error)
        self._failed_stamp = stamp
        return None


def server_credentials(cert: Path | None, key: Path | None, client_ca: Path | None):
    """Plaintext (None) without a certificate; otherwise TLS, mutual when client_ca is set, that follows
    the files as they are rotated."""
    if not cert:
        return None
    files = CertificateFiles(cert, key, client_ca)
    return grpc.dynamic_ssl_server_credentials(files.initial, files.fetch,
                                               require_client_authentication=client_ca is not None)


@dataclass(frozen=True)
class ClientTlsFiles:
    """A client's trust and identity as files: the CA to verify the server with (None: the system's
    roots) and, for mTLS, a certificate and its key."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("a client certificate and its key go together")

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(Path(p) for p in (self.ca, self.cert, self.key) if p)

    def stamp(self) -> tuple | None:
        """files_stamp of the files, or None while one is missing (mid-rotation)."""
        try:
            return files_stamp(self.paths)
        except OSError:
            return None

    def credentials(self) -> grpc.ChannelCredentials:
        """Read now; OSError if a file cannot be read."""
        ca = Path(self.ca).read_bytes() if self.ca else None
        key = Path(self.key).read_bytes() if self.key else None
        chain = Path(self.cert).read_bytes() if self.cert else None
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=chain)
