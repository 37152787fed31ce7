"""The ResultStore deployment: the one place that opens the result store (its migrations run there, once)
and sweeps it (the age limit), serving the store operations to every ingress replica.

Bound only where retention is enabled, with one replica. Images (up to ~30 MB) go over the handle as
encoded bytes. Its health check ignores the database: a store that is briefly down is reopened on a
later call (REOPEN_AFTER_S) while removals go on unretained, and a new replica would not bring it back;
the replica is unhealthy only when its sweeper has stopped.
"""

from __future__ import annotations

import inspect

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.config import RetentionSettings
from serve.handles import answer_or_cancel
from serve.local_ray import keep_replica_grpc_on_loopback
from serve.retention.keeper import LocalStoreClient
from serve.retention.store import RetentionStore

# A store call unanswered this long is cancelled (503 retention-unavailable); a save is given up sooner, at
# retention.save_timeout_s (serve.retention.keeper.Retention.keep).
CALL_TIMEOUT_S = 60.0


# one replica: the migrations run once and one sweeper enforces the age limit (not listed in the Serve config,
# which may only name deployments every app has; these are its settings)
@serve.deployment(name="ResultStore", num_replicas=1, max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.5})
class ResultStore(LocalStoreClient):
    def __init__(self, settings: dict):
        """`settings`: serve.config.RetentionSettings, as JSON."""
        keep_replica_grpc_on_loopback()
        retention = RetentionSettings.model_validate(settings)
        super().__init__(lambda: RetentionStore.from_settings(retention))

    def check_health(self) -> None:
        if not self.sweeper.is_alive():
            raise RuntimeError("the retention sweeper stopped")

    def __del__(self) -> None:
        self.close()


class HandleStoreClient:
    """The ResultStore deployment behind a handle, with LocalStoreClient's async methods (what
    serve.retention.keeper.Retention calls). A call nobody waits for any more is cancelled in Serve."""

    def __init__(self, handle: DeploymentHandle, timeout_s: float = CALL_TIMEOUT_S):
        self.handle = handle
        self.timeout_s = timeout_s

    def __getattr__(self, name: str):
        """Each store method's caller, made on first use and kept (a handle method is a new handle)."""
        if name.startswith("_") or not inspect.iscoroutinefunction(getattr(LocalStoreClient, name, None)):
            raise AttributeError(name)
        method = getattr(self.handle, name)

        async def call(*args, **kwargs):
            return await answer_or_cancel(method.remote(*args, **kwargs), self.timeout_s)

        setattr(self, name, call)
        return call
