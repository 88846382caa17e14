"""S3 for tests: moto's server mode on 127.0.0.1, real HTTP, fake credentials.

Usage in a test module (bound by assignment, so test parameters named `s3` do not trip ruff's F811):

    from tests import s3_fixture
    moto_server, s3 = s3_fixture.moto_server, s3_fixture.s3

    def test_x(s3, tmp_path):
        uri = s3.upload_dir("adapters/a1", adapter_dir)             # -> "s3://<bucket>/adapters/a1"
        config = SourceConfig(s3_endpoint_url=s3.endpoint_url)      # credentials come from the env
        ...

`moto_server` runs once per session; `s3` gives each test its own fresh bucket and sets fake
AWS credentials in the environment (no profile, no shared files, no instance-metadata lookups).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

FAKE_KEY = "AKIAFIXTUREFIXTURE00"
FAKE_SECRET = "fixture-secret-key-never-real-0123456789"
REGION = "us-east-1"


def isolate_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake credentials in the env; nothing read from ~/.aws, nothing asked of 169.254.169.254."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config-absent"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials-absent"))


@dataclass
class S3Fixture:
    endpoint_url: str
    bucket: str

    @property
    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION,
                            aws_access_key_id=FAKE_KEY, aws_secret_access_key=FAKE_SECRET)

    def put(self, key: str, data: bytes) -> dict:
        return self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def upload_dir(self, prefix: str, directory: Path) -> str:
        """Upload every file under `directory` below `prefix`; return the s3:// URI of the prefix."""
        directory = Path(directory)
        client = self.client
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                client.put_object(Bucket=self.bucket, Key=f"{prefix}/{path.relative_to(directory).as_posix()}",
                                  Body=path.read_bytes())
        return f"s3://{self.bucket}/{prefix}"

    def enable_versioning(self) -> None:
        self.client.put_bucket_versioning(Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"})


@pytest.fixture(scope="session")
def moto_server():
    """The endpoint URL of a moto S3 server on a free loopback port, for the whole session."""
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request at INFO even with verbose=False; failures show up in the tests anyway.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(moto_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Fixture:
    """A fresh bucket on the moto server, with fake AWS credentials in the environment."""
    isolate_aws(monkeypatch, tmp_path)
    fixture = S3Fixture(endpoint_url=moto_server, bucket=f"loraplane-{uuid.uuid4().hex[:12]}")
    fixture.client.create_bucket(Bucket=fixture.bucket)
    return fixture
