"""SigV4 signing of Bedrock calls, with credentials from the AWS chain read off the request path.

The adapter builds each request unsigned; `SigV4Signer` (the `authorize` hook of the provider's
`HttpProvider`) signs its final bytes and headers with botocore's `SigV4Auth`, per call, from
the credentials `AwsCredentials` holds. Those come from botocore's own chain, as every AWS SDK
finds them: the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`),
the shared files and `AWS_PROFILE`, IRSA web identity (`AWS_WEB_IDENTITY_TOKEN_FILE` +
`AWS_ROLE_ARN`), EKS pod identity / ECS container credentials
(`AWS_CONTAINER_CREDENTIALS_FULL_URI` / `_RELATIVE_URI`), then the instance metadata service.

Resolving the chain and refreshing temporary credentials are network calls that botocore makes
synchronously: they run in a worker thread, never on the event loop. The credentials in hand
are read again from botocore at most every REREAD_SECONDS (in the background, while requests
keep signing with the ones held; botocore refreshes temporary credentials 15 minutes before
they expire, so the ones held are always minutes from expiry). Only the first call, with
nothing in hand yet, waits for the chain. botocore is imported here, when a bedrock provider is
built: it is the optional `bedrock` extra.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from sidecar.errors import Outcome, UpstreamError
from sidecar.providers.base import HttpRequest
from sidecar.providers.bedrock import SERVICE, region_of, signs_calls
from sidecar.settings.model import ProviderSettings

log = logging.getLogger("ringside")

REREAD_SECONDS = 60.0  # the credentials held are taken from botocore again after this long
RETRY_SECONDS = 5.0  # after a failed read, the next is not tried before this long


def signer(settings: ProviderSettings) -> SigV4Signer | None:
    """The signing hook of one bedrock provider's calls; None for one with a Bedrock API key
    (`api_key_env`: a bearer header, no signature)."""
    if not signs_calls(settings):
        return None
    region = region_of(settings) or "us-east-1"  # none is refused at load
    return SigV4Signer(AwsCredentials(settings.name), region, SERVICE)


class AwsCredentials:
    """The credentials of one provider's calls, from the AWS chain (see the module)."""

    def __init__(
        self,
        provider: str,
        resolve: Callable[[], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.provider = provider
        self._resolve = resolve or _default_chain
        self._clock = clock
        self._source: Any = None  # botocore Credentials (refreshable or not)
        self._frozen: Any = None  # botocore ReadOnlyCredentials: what requests sign with
        self._read_at = -math.inf
        self._failed_at = -math.inf
        self._failure: UpstreamError | None = None
        self._reading: asyncio.Task[Any] | None = None

    async def current(self) -> Any:
        """The credentials to sign with now; waits only while none are held yet."""
        now = self._clock()
        frozen = self._frozen
        if frozen is not None and now - self._read_at < REREAD_SECONDS:
            return frozen
        if self._reading is None and now - self._failed_at >= RETRY_SECONDS:
            self._reading = asyncio.create_task(self._read())
        if frozen is not None:
            return frozen  # still good: botocore refreshes long before expiry
        if self._reading is None:
            assert self._failure is not None
            raise self._failure
        return await asyncio.shield(self._reading)

    async def _read(self) -> Any:
        try:
            frozen = await asyncio.to_thread(self._read_chain)
        except Exception as exc:
            self._failed_at = self._clock()
            self._failure = no_credentials(self.provider, exc)
            if self._frozen is not None:
                log.warning(
                    "provider %s: reading AWS credentials failed, signing with the ones held: %s",
                    self.provider, exc,
                )  # fmt: skip
                return self._frozen
            raise self._failure from None
        else:
            self._frozen, self._read_at, self._failure = frozen, self._clock(), None
            return frozen
        finally:
            self._reading = None

    def _read_chain(self) -> Any:
        """In a worker thread: the chain resolved once, then its current frozen credentials
        (a refresh, when botocore finds it due, happens in this call)."""
        if self._source is None:
            source = self._resolve()
            if source is None:
                raise LookupError(
                    "no AWS credentials found (environment, shared files, web identity, "
                    "container credentials, instance metadata)"
                )
            self._source = source
        frozen = self._source.get_frozen_credentials()
        if not frozen.access_key or not frozen.secret_key:
            raise LookupError("the AWS credentials found are incomplete")
        return frozen


def _default_chain() -> Any:
    import botocore.session

    return botocore.session.Session().get_credentials()


def no_credentials(provider: str, exc: BaseException) -> UpstreamError:
    """Calls that cannot be signed: the provider is unavailable (escalates), never the
    request's fault."""
    return UpstreamError(
        Outcome.UNAVAILABLE,
        f"provider {provider!r} has no usable AWS credentials: {exc}",
        reason="credentials",
    )


class SigV4Signer:
    """Signs one provider's requests (SigV4, service `bedrock`, the provider's region)."""

    def __init__(self, credentials: AwsCredentials, region: str, service: str) -> None:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        self.credentials = credentials
        self.region = region
        self.service = service
        self._auth = SigV4Auth
        self._request = AWSRequest

    async def __call__(self, request: HttpRequest) -> HttpRequest:
        credentials = await self.credentials.current()
        return self.sign(request, credentials)

    def sign(self, request: HttpRequest, credentials: Any) -> HttpRequest:
        """`request` with its SigV4 headers (X-Amz-Date, Authorization, and
        X-Amz-Security-Token for temporary credentials) over its final URL, headers and body."""
        aws = self._request(
            method=request.method, url=request.url, data=request.body, headers=request.headers
        )
        self._auth(credentials, self.service, self.region).add_auth(aws)
        return HttpRequest(request.url, dict(aws.headers.items()), request.body, request.method)
