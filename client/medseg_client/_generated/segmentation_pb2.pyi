from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_UINT16: _ClassVar[DType]
    DTYPE_INT16: _ClassVar[DType]
    DTYPE_UINT32: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]

class PromptKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROMPT_KIND_UNSPECIFIED: _ClassVar[PromptKind]
    PROMPT_KIND_BOX: _ClassVar[PromptKind]
    PROMPT_KIND_POINT: _ClassVar[PromptKind]
    PROMPT_KIND_MASK: _ClassVar[PromptKind]

class MaskEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MASK_ENCODING_UNSPECIFIED: _ClassVar[MaskEncoding]
    MASK_ENCODING_BITS: _ClassVar[MaskEncoding]
    MASK_ENCODING_PNG: _ClassVar[MaskEncoding]
    MASK_ENCODING_COCO_RLE: _ClassVar[MaskEncoding]
DTYPE_UNSPECIFIED: DType
DTYPE_UINT8: DType
DTYPE_INT8: DType
DTYPE_UINT16: DType
DTYPE_INT16: DType
DTYPE_UINT32: DType
DTYPE_INT32: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
PROMPT_KIND_UNSPECIFIED: PromptKind
PROMPT_KIND_BOX: PromptKind
PROMPT_KIND_POINT: PromptKind
PROMPT_KIND_MASK: PromptKind
MASK_ENCODING_UNSPECIFIED: MaskEncoding
MASK_ENCODING_BITS: MaskEncoding
MASK_ENCODING_PNG: MaskEncoding
MASK_ENCODING_COCO_RLE: MaskEncoding

class RawArray(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Window(_message.Message):
    __slots__ = ("center", "width")
    CENTER_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    center: float
    width: float
    def __init__(self, center: _Optional[float] = ..., width: _Optional[float] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "raw", "window", "slice_index")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    SLICE_INDEX_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawArray
    window: Window
    slice_index: int
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawArray, _Mapping]] = ..., window: _Optional[_Union[Window, _Mapping]] = ..., slice_index: _Optional[int] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x0", "y0", "x1", "y1")
    X0_FIELD_NUMBER: _ClassVar[int]
    Y0_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    x0: float
    y0: float
    x1: float
    y1: float
    def __init__(self, x0: _Optional[float] = ..., y0: _Optional[float] = ..., x1: _Optional[float] = ..., y1: _Optional[float] = ...) -> None: ...

class Point(_message.Message):
    __slots__ = ("x", "y", "positive")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    positive: bool
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ..., positive: _Optional[bool] = ...) -> None: ...

class LowResLogits(_message.Message):
    __slots__ = ("height", "width", "data")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    data: bytes
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("box", "points", "mask_input")
    BOX_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    MASK_INPUT_FIELD_NUMBER: _ClassVar[int]
    box: Box
    points: _containers.RepeatedCompositeFieldContainer[Point]
    mask_input: LowResLogits
    def __init__(self, box: _Optional[_Union[Box, _Mapping]] = ..., points: _Optional[_Iterable[_Union[Point, _Mapping]]] = ..., mask_input: _Optional[_Union[LowResLogits, _Mapping]] = ...) -> None: ...

class Mask(_message.Message):
    __slots__ = ("height", "width", "encoding", "data", "predicted_iou", "area", "low_res_logits")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_IOU_FIELD_NUMBER: _ClassVar[int]
    AREA_FIELD_NUMBER: _ClassVar[int]
    LOW_RES_LOGITS_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    encoding: MaskEncoding
    data: bytes
    predicted_iou: float
    area: int
    low_res_logits: LowResLogits
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., encoding: _Optional[_Union[MaskEncoding, str]] = ..., data: _Optional[bytes] = ..., predicted_iou: _Optional[float] = ..., area: _Optional[int] = ..., low_res_logits: _Optional[_Union[LowResLogits, _Mapping]] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class SegmentRequest(_message.Message):
    __slots__ = ("model", "image", "image_id", "prompts", "encoding", "return_low_res_logits")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOW_RES_LOGITS_FIELD_NUMBER: _ClassVar[int]
    model: str
    image: Image
    image_id: str
    prompts: _containers.RepeatedCompositeFieldContainer[Prompt]
    encoding: MaskEncoding
    return_low_res_logits: bool
    def __init__(self, model: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., image_id: _Optional[str] = ..., prompts: _Optional[_Iterable[_Union[Prompt, _Mapping]]] = ..., encoding: _Optional[_Union[MaskEncoding, str]] = ..., return_low_res_logits: _Optional[bool] = ...) -> None: ...

class SegmentResponse(_message.Message):
    __slots__ = ("masks", "model", "image_id", "height", "width")
    MASKS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    masks: _containers.RepeatedCompositeFieldContainer[Mask]
    model: ModelRef
    image_id: str
    height: int
    width: int
    def __init__(self, masks: _Optional[_Iterable[_Union[Mask, _Mapping]]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., image_id: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class EmbedImageRequest(_message.Message):
    __slots__ = ("model", "image")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    model: str
    image: Image
    def __init__(self, model: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ...) -> None: ...

class EmbedImageResponse(_message.Message):
    __slots__ = ("image_id", "model", "height", "width", "cached")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    model: ModelRef
    height: int
    width: int
    cached: bool
    def __init__(self, image_id: _Optional[str] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., cached: _Optional[bool] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "input_size", "prompt_kinds", "required_prompt_kinds", "description", "is_default")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_KINDS_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_PROMPT_KINDS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    input_size: int
    prompt_kinds: _containers.RepeatedScalarFieldContainer[PromptKind]
    required_prompt_kinds: _containers.RepeatedScalarFieldContainer[PromptKind]
    description: str
    is_default: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., input_size: _Optional[int] = ..., prompt_kinds: _Optional[_Iterable[_Union[PromptKind, str]]] = ..., required_prompt_kinds: _Optional[_Iterable[_Union[PromptKind, str]]] = ..., description: _Optional[str] = ..., is_default: _Optional[bool] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
