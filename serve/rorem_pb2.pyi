from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class RemoveRequest(_message.Message):
    __slots__ = ("image", "mask", "seed", "output_format", "quality", "dilate", "gate", "gate_threshold", "max_attempts", "retain", "timeout_s")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    DILATE_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    GATE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    RETAIN_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    mask: bytes
    seed: int
    output_format: str
    quality: int
    dilate: int
    gate: str
    gate_threshold: float
    max_attempts: int
    retain: bool
    timeout_s: float
    def __init__(self, image: _Optional[bytes] = ..., mask: _Optional[bytes] = ..., seed: _Optional[int] = ..., output_format: _Optional[str] = ..., quality: _Optional[int] = ..., dilate: _Optional[int] = ..., gate: _Optional[str] = ..., gate_threshold: _Optional[float] = ..., max_attempts: _Optional[int] = ..., retain: _Optional[bool] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class RemoveReply(_message.Message):
    __slots__ = ("image", "media_type", "seed", "bucket", "batch_size", "score", "attempts", "gate", "request_id", "result_id", "buckets")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_ID_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    media_type: str
    seed: int
    bucket: int
    batch_size: int
    score: float
    attempts: int
    gate: str
    request_id: str
    result_id: str
    buckets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, image: _Optional[bytes] = ..., media_type: _Optional[str] = ..., seed: _Optional[int] = ..., bucket: _Optional[int] = ..., batch_size: _Optional[int] = ..., score: _Optional[float] = ..., attempts: _Optional[int] = ..., gate: _Optional[str] = ..., request_id: _Optional[str] = ..., result_id: _Optional[str] = ..., buckets: _Optional[_Iterable[int]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("source", "mask", "edited", "dilate", "gate_threshold", "timeout_s")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    EDITED_FIELD_NUMBER: _ClassVar[int]
    DILATE_FIELD_NUMBER: _ClassVar[int]
    GATE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    source: bytes
    mask: bytes
    edited: bytes
    dilate: int
    gate_threshold: float
    timeout_s: float
    def __init__(self, source: _Optional[bytes] = ..., mask: _Optional[bytes] = ..., edited: _Optional[bytes] = ..., dilate: _Optional[int] = ..., gate_threshold: _Optional[float] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class ScoreReply(_message.Message):
    __slots__ = ("score", "threshold", "passed", "bucket", "request_id")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    score: float
    threshold: float
    passed: bool
    bucket: int
    request_id: str
    def __init__(self, score: _Optional[float] = ..., threshold: _Optional[float] = ..., passed: _Optional[bool] = ..., bucket: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...
