"""What the api and admin apps share, and the `web.AppKey` it lives under.

`app.py` creates the apps and puts a GatewayState under `STATE`; the handlers in `api/` read it
from `request.app[STATE]`. Both import this module, so neither imports the other's.
"""

from __future__ import annotations

from aiohttp import web

from sidecar.api.body_memory import BodyMemory
from sidecar.api.lane import Lane
from sidecar.runtime import Runtime, RuntimeHolder
from sidecar.settings import Settings


class GatewayState:
    """Mutable state of one running gateway, shared by its api and admin apps."""

    def __init__(
        self, config_path: str, settings: Settings, watch_interval: float = 1.0, workers: int = 1
    ) -> None:
        self.config_path = config_path
        self.workers = workers  # processes serving this config (`serve --workers`)
        self.initial_settings = settings
        self.watch_interval = watch_interval
        self.holder: RuntimeHolder | None = None
        self.draining = False  # SIGTERM: /readyz fails (sidecar/shutdown.py)
        # the shutdown's grace ran out: a request cancelled from now on is ended by the
        # shutdown, and answers so (sidecar/api/request_path.py), not by its client going away
        self.grace_over = False
        self.lane = Lane()  # requests in flight; large bodies' share of the loop (api/lane.py)
        self.body_memory = BodyMemory()  # what large bodies hold (api/body_memory.py)

    @property
    def runtime(self) -> Runtime:
        assert self.holder is not None, "the api app has not started"
        return self.holder.current

    @property
    def settings(self) -> Settings:
        """The Settings in force: the running Runtime's (they change on reload), or before
        start the ones the gateway was created with."""
        return self.initial_settings if self.holder is None else self.holder.current.settings

    @property
    def ready(self) -> bool:
        return self.holder is not None and not self.draining


STATE = web.AppKey("gateway_state", GatewayState)
