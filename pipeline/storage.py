"""Access to object storage and local files through fsspec, with retries for transient errors.

One `StorageConfig` travels with every Ray task that touches storage: the credentials and
endpoint it names take precedence; what it leaves unset comes from the environment and the
backend's default chain (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION,
~/.aws, instance metadata), exactly as s3fs itself resolves them. Workers inherit the
environment of the process that started Ray, so export credentials before `ray.init`.

Retries exist because a job over millions of objects meets dropped connections, timeouts
and throttling as a matter of course, and one of them must not fail an image (or a job).
Errors that another attempt cannot fix (a missing object, a denied request, a malformed
request, corrupt data) are never retried: retrying them only delays the error report.
"""

from __future__ import annotations

import dataclasses
import errno
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import botocore.exceptions
import fsspec

T = TypeVar("T")

_S3_PROTOCOLS = ("s3", "s3a")
_GCS_PROTOCOLS = ("gs", "gcs")
_LOCAL_PROTOCOLS = (None, "file", "local")

# Subclasses of OSError that name a permanent condition of the object itself.
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
# errno values s3fs gives to S3 errors that describe a bad request, not a bad moment
# (InvalidRange, InvalidArgument, MethodNotAllowed, redirects to another region, ...).
_PERMANENT_ERRNOS = frozenset(
    {errno.EINVAL, errno.ENAMETOOLONG, errno.EMSGSIZE, errno.EPERM, errno.ENOSYS, errno.ENOTEMPTY,
     getattr(errno, "EREMCHG", errno.ENOENT)}
)
# Network failures below s3fs: botocore's and aiohttp's own types, not always OSError.
_TRANSIENT_TYPES = (
    ConnectionError,
    TimeoutError,
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.ConnectionError,
    botocore.exceptions.IncompleteReadError,
    aiohttp.ClientError,
)
# S3 error codes that mean "try again later" whatever their HTTP status.
_TRANSIENT_S3_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError", "ServiceUnavailable"}
)


@dataclass(frozen=True)
class StorageConfig:
    """Where and how to reach storage; unset fields fall back to the environment."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:PORT for S3-compatible stores
    key: str | None = None  # access key; None = from the environment / default chain
    secret: str | None = None
    region: str | None = None
    anon: bool = False
    retries: int = 4  # attempts for transient errors
    retry_wait: float = 0.5  # seconds, doubled after each failed attempt

    def public(self) -> dict[str, Any]:
        """The settings as written into archives, summaries and reports: never the credentials."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("key", "secret")}

    def fsspec_options(self, url: str) -> dict[str, Any]:
        """fsspec storage_options for this URL's protocol; only what is set, so defaults apply."""
        protocol = fsspec.core.split_protocol(url)[0]
        if protocol in _LOCAL_PROTOCOLS:
            return {}
        if protocol in _S3_PROTOCOLS:
            return self._s3_options()
        if protocol in _GCS_PROTOCOLS:
            return self._gcs_options()
        return self._generic_options()

    def _s3_options(self) -> dict[str, Any]:
        options = self._credential_options()
        if self.region:
            options["client_kwargs"] = {"region_name": self.region}  # s3fs takes no region= argument
        return options

    def _gcs_options(self) -> dict[str, Any]:
        # gcsfs spells anonymous access token="anon" and has no key/secret pair.
        options: dict[str, Any] = {"endpoint_url": self.endpoint_url} if self.endpoint_url else {}
        if self.anon:
            options["token"] = "anon"
        return options

    def _generic_options(self) -> dict[str, Any]:
        """The fields under the names most fsspec backends use, passed through as they are."""
        options = self._credential_options()
        if self.region:
            options["region"] = self.region
        return options

    def _credential_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            name: value
            for name, value in (("endpoint_url", self.endpoint_url), ("key", self.key), ("secret", self.secret))
            if value is not None
        }
        if self.anon:
            options["anon"] = True
        return options


def filesystem(url: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem serving a URL a person wrote, and the path within it (protocol stripped).

    The URL is an fsspec URL: ``simplecache::s3://...`` is a chain of filesystems. Never
    use this on a URL built from a listed path: an object named ``a::b.png`` would be read
    as another object (:func:`literal_filesystem`).
    """
    return fsspec.core.url_to_fs(url, **storage.fsspec_options(url))


def literal_filesystem(url: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of a URL that names one object of one filesystem, as a
    listing produced it (``fs.unstrip_protocol(path)`` or a local path): ``::`` in it is
    part of a name, never a chain, so ``/in/a::b.png`` is that file, not ``/in/a``."""
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    cls = fsspec.get_filesystem_class(protocol)
    options = {**cls._get_kwargs_from_urls(url), **storage.fsspec_options(url)}
    return fsspec.filesystem(protocol, **options), cls._strip_protocol(url)


def read_bytes(url: str, storage: StorageConfig) -> bytes:
    """A whole object's bytes (its URL as a person wrote it: :func:`filesystem`), retried on
    transient errors."""
    fs, path = filesystem(url, storage)
    return with_retries(lambda: fs.cat_file(path), storage, f"read {url}")


def with_retries(fn: Callable[[], T], storage: StorageConfig, what: str) -> T:
    """Call fn, retrying transient errors with exponential backoff; permanent ones raise at once.

    `storage.retries` is the number of attempts in all; the last error is raised with a note
    saying what was attempted and how often.
    """
    attempts = max(1, storage.retries)
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as error:
            if attempt >= attempts or not is_transient(error):
                if attempt > 1:
                    error.add_note(f"{what}: gave up after {attempt} attempts")
                raise
        time.sleep(storage.retry_wait * 2 ** (attempt - 1))
        attempt += 1


def is_transient(error: BaseException) -> bool:
    """Whether another attempt might succeed: network trouble, timeouts, throttling, 5xx."""
    if isinstance(error, _PERMANENT_OS_ERRORS):
        return False
    if isinstance(error, botocore.exceptions.ClientError):
        return _client_error_is_transient(error)
    if isinstance(error, _TRANSIENT_TYPES):
        return True
    if isinstance(error, OSError):
        # s3fs turns unrecognised S3 errors into OSError(EIO) caused by the ClientError.
        if isinstance(error.__cause__, botocore.exceptions.ClientError):
            return _client_error_is_transient(error.__cause__)
        return error.errno not in _PERMANENT_ERRNOS
    return False


def _client_error_is_transient(error: botocore.exceptions.ClientError) -> bool:
    response = error.response or {}
    code = response.get("Error", {}).get("Code", "")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return code in _TRANSIENT_S3_CODES or status >= 500 or status == 429
