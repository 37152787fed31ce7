"""Live settings: a deployment's Serve `user_config`, applied by `reconfigure` (docs/configuration.md).

Ray Serve 2.60 takes a `reconfigure` that raises for a replica that failed to start: it stops the running
replica (its loaded model with it), retries, and ends DEPLOY_FAILED with no replica left. So only the first
reconfigure (right after the constructor: a bad config must not start) raises on an invalid value. A later
one is refused: the replica keeps serving with its previous settings, logs an ERROR, counts it
(serve.metrics.LIVE_REFUSALS) and reports it (`refused_live`) until a valid value comes. The invalid value
stays Serve's target, though: a replica started meanwhile (a crash's replacement, a new node, autoscaling)
gets it first and fails its start, so the fix is to deploy a valid value, soon.
"""

from __future__ import annotations

import logging
from typing import Any

from serve.config import invalid_because
from serve.metrics import live_refusals

logger = logging.getLogger("ray.serve")


class LiveSettings:
    """Base of a deployment with live settings: it defines `parse_live` (validate a user_config, changing
    nothing; ValueError when invalid) and `apply_live` (use what parse_live returned)."""

    live_name: str  # the deployment's name, in logs, metrics and /readyz
    refused_live: dict | None = None  # the last refused user_config and why, while the previous one is in use
    _live_applied = False

    def parse_live(self, user_config: dict) -> Any:
        raise NotImplementedError

    def apply_live(self, parsed: Any) -> None:
        raise NotImplementedError

    def reconfigure(self, user_config: dict) -> None:
        """Serve's live update: see the module's docstring for what an invalid value does."""
        try:
            parsed = self.parse_live(user_config)
        except ValueError as exc:
            if not self._live_applied:
                raise
            self._refuse(user_config, invalid_because(exc))
            return
        self.apply_live(parsed)
        self._live_applied = True
        self.refused_live = None

    def _refuse(self, user_config: dict, why: str) -> None:
        self.refused_live = {"deployment": self.live_name, "user_config": user_config, "error": why}
        logger.error(
            "%s: refused the new live settings (user_config %s): %s; still serving with the previous ones, but "
            "any replica started before a valid user_config is deployed will fail its start",
            self.live_name, user_config, why,
        )  # fmt: skip
        live_refusals().inc()  # Ray labels it with the deployment (and replica, application) itself
