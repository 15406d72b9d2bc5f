"""A moto S3 server on loopback, one per test session, for every test that needs object storage.

Tests and Ray workers reach it through the same code path as production (s3fs with an
endpoint_url). Credentials are fake and exported in os.environ for the session, because Ray
workers take their environment from the process that calls ray.init (see tests/ray_fixture.py).
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from pipeline.storage import StorageConfig

REGION = "us-east-1"  # the one region where create_bucket needs no LocationConstraint
FAKE_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",  # no 1-second probe of a metadata service per client
}
# Settings of the developer's machine that would point boto at real accounts.
SHADOWING_ENVIRONMENT = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL")


@dataclass
class S3Server:
    """A running moto server: its endpoint, a StorageConfig for it and helpers to fill it."""

    endpoint_url: str
    storage: StorageConfig
    client: Any  # boto3 S3 client
    _names: Iterator[int] = field(default_factory=itertools.count)

    def make_bucket(self, files: Mapping[str, bytes] | None = None) -> str:
        """A new, uniquely named bucket holding files (object key -> bytes); returns "s3://name"."""
        name = f"test-bucket-{next(self._names)}"
        self.client.create_bucket(Bucket=name)
        for key, data in (files or {}).items():
            self.client.put_object(Bucket=name, Key=key, Body=data)
        return f"s3://{name}"

    def put(self, url: str, data: bytes) -> None:
        """Upload bytes to "s3://bucket/key"."""
        bucket, _, key = url.removeprefix("s3://").partition("/")
        self.client.put_object(Bucket=bucket, Key=key, Body=data)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """The session's moto server, with fake AWS credentials in os.environ until the end."""
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    with pytest.MonkeyPatch.context() as environment:
        for name in SHADOWING_ENVIRONMENT:
            environment.delenv(name, raising=False)
        for name, value in FAKE_ENVIRONMENT.items():
            environment.setenv(name, value)
        server.start()
        try:
            endpoint_url = f"http://127.0.0.1:{port}"
            storage = StorageConfig(
                endpoint_url=endpoint_url,
                key=FAKE_ENVIRONMENT["AWS_ACCESS_KEY_ID"],
                secret=FAKE_ENVIRONMENT["AWS_SECRET_ACCESS_KEY"],
                region=REGION,
                retry_wait=0.05,  # tests meet only permanent errors; keep any retry short
            )
            client = boto3.client("s3", endpoint_url=endpoint_url, region_name=REGION)
            yield S3Server(endpoint_url=endpoint_url, storage=storage, client=client)
        finally:
            server.stop()
