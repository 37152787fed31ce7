"""The ResultStore deployment: the one place that opens the result store (its migrations run there, once)
and sweeps it (the age limit), serving the store operations to every ingress replica.

Bound only where retention is enabled, with one replica. Images (up to ~30 MB) go over the handle as
encoded bytes. Its health check ignores the database: a store that is briefly down is reopened on a
later call (REOPEN_AFTER_S) while removals go on unretained, and a new replica would not bring it back;
the replica is unhealthy only when its sweeper has stopped.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.config import RetentionSettings
from serve.handles import answer_or_cancel
from serve.local_ray import keep_replica_grpc_on_loopback
from serve.retention.keeper import LocalStoreClient
from serve.retention.objects import ObjectMissing
from serve.retention.store import ResultNotFound, RetentionStore

# A store call unanswered this long is cancelled (503 retention-unavailable); a save is given up sooner, at
# retention.save_timeout_s (serve.retention.keeper.Retention.keep).
CALL_TIMEOUT_S = 60.0


# the store's operations a handle may call (ResultStore.operation)
STORE_OPERATIONS = frozenset(
    name for name, method in inspect.getmembers(LocalStoreClient, inspect.iscoroutinefunction)
    if not name.startswith("_")
)  # fmt: skip
MISS_ERRORS = (ResultNotFound, ObjectMissing)  # what a store operation raises for no such result or image
MISSES = {error.__name__: error for error in MISS_ERRORS}


@dataclass(frozen=True)
class Missing:
    """A store operation that found no such result (or image), answered as a value: raised in the replica, every
    404 of the result routes was a Ray ERROR with a traceback in its log and a count in Ray's
    ray_serve_deployment_error_counter_total, as many as anyone with a feedback key cared to ask for."""

    error: str  # a MISSES key
    args: tuple

    def raised(self) -> Exception:
        return MISSES[self.error](*self.args)


# one replica: the migrations run once and one sweeper enforces the age limit (not listed in the Serve config,
# which may only name deployments every app has; these are its settings)
@serve.deployment(name="ResultStore", num_replicas=1, max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.5})
class ResultStore(LocalStoreClient):
    def __init__(self, settings: dict):
        """`settings`: serve.config.RetentionSettings, as JSON."""
        keep_replica_grpc_on_loopback()
        retention = RetentionSettings.model_validate(settings)
        super().__init__(lambda: RetentionStore.from_settings(retention))

    async def operation(self, name: str, *args, **kwargs):
        """A store operation by name, HandleStoreClient's one entry point; a miss is a Missing."""
        if name not in STORE_OPERATIONS:
            raise AttributeError(f"no store operation {name!r}")
        try:
            return await getattr(self, name)(*args, **kwargs)
        except MISS_ERRORS as miss:
            return Missing(type(miss).__name__, miss.args)

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
        self._operation = handle.operation  # a handle method is a new handle: made once

    def __getattr__(self, name: str):
        """Each store method's caller, made on first use and kept; a Missing answer is raised here as its error."""
        if name not in STORE_OPERATIONS:
            raise AttributeError(name)

        async def call(*args, **kwargs):
            answer = await answer_or_cancel(self._operation.remote(name, *args, **kwargs), self.timeout_s)
            if isinstance(answer, Missing):
                raise answer.raised()
            return answer

        setattr(self, name, call)
        return call
