"""Opt-in retention of removal results and the human verdicts on them (the feedback loop).

objects: content-addressed bytes (a local folder or an S3-compatible bucket); db: the metadata
tables and their migrations; store: RetentionStore, what the service and `training export-labels`
use. Nothing here imports Ray or the web framework.
"""

from serve.retention.objects import LocalObjectStore, ObjectMissing, ObjectStore, S3ObjectStore, object_key
from serve.retention.store import Feedback, RetentionStore, StoredResult

__all__ = [
    "Feedback",
    "LocalObjectStore",
    "ObjectMissing",
    "ObjectStore",
    "RetentionStore",
    "S3ObjectStore",
    "StoredResult",
    "object_key",
]
