"""Open Inference Protocol (KServe v2) bodies, including Triton's binary tensor data extension.

A request may be JSON alone, or JSON followed by raw tensor bytes, with the JSON's length in the
`Inference-Header-Content-Length` header; each input carried in binary names its byte count in
`parameters.binary_data_size`. BYTES elements are a 4-byte little-endian length, then the bytes.
An input may instead lie in a registered system shared memory region, and an output be written to one
(server/shared_memory.py).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import numpy as np

from server.errors import InvalidRequest
from server.jsonout import dumps
from server.shared_memory import SharedMemoryRegistry, Target, target

HEADER_LENGTH = "inference-header-content-length"


@dataclass
class InferRequest:
    id: str | None
    texts: list[str]
    binary_output: bool
    parameters: dict
    targets: dict[str, Target]  # outputs to write to shared memory, by name


def decode_bytes_tensor(raw: bytes, count: int) -> list[str]:
    """`count` UTF-8 strings from Triton's BYTES serialisation (4-byte little-endian length, then the bytes)."""
    texts, offset = [], 0
    for i in range(count):
        if offset + 4 > len(raw):
            raise InvalidRequest(f"binary BYTES data ends before element {i}")
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise InvalidRequest(f"binary BYTES element {i} runs past the data")
        texts.append(utf8_element(raw[offset:offset + n], i))
        offset += n
    if offset != len(raw):
        raise InvalidRequest(f"binary BYTES data has {len(raw) - offset} bytes beyond {count} elements")
    return texts


def utf8_element(value: bytes, i: int) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"element {i} is not valid UTF-8") from None


def _no_data(tensor: dict) -> str:
    """Why an input tensor has no values: no 'data' and no binary data, or a 'data' that is not a list."""
    name = tensor.get("name")
    if "data" in tensor:
        return f"input {name!r}: 'data' must be a list of the shape's elements, got {type(tensor['data']).__name__}"
    return f"input {name!r} has neither 'data' nor binary data"


MAX_NESTING = 32  # 'data' nested deeper than any tensor here (a list of rows of values) is refused, not recursed into


def _flatten(data, depth: int = 0) -> list:
    if isinstance(data, list):
        if depth >= MAX_NESTING:
            raise InvalidRequest(f"'data' is nested more than {MAX_NESTING} lists deep")
        return [x for item in data for x in _flatten(item, depth + 1)]
    return [data]


def json_document(raw: bytes):
    """A KServe/Triton JSON body, or InvalidRequest (a 400, never a 500) for anything json.loads refuses."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError, bad UTF-8, an integer past Python's 4,300 digits; nesting
        raise InvalidRequest("request body is not valid JSON (or nested too deeply, or an integer of over 4,300 digits)") from None


def _split(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """(the JSON document, the binary tensor bytes after it) of an infer request."""
    if header_length is not None:
        if not (header_length.isascii() and header_length.isdigit() and len(header_length) <= 20) \
                or int(header_length) > len(body):
            raise InvalidRequest(f"{HEADER_LENGTH}={header_length[:40]!r} does not fit a body of {len(body)} bytes")
        json_part, binary = body[: int(header_length)], body[int(header_length):]
    else:
        json_part, binary = body, b""
    doc = json_document(json_part)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise InvalidRequest("request must be a JSON object with a non-empty 'inputs' list")
    return doc, binary


def _params(holder: dict, what: str) -> dict:
    """A `parameters` member: absent, null, or an object (anything else is a 400, not a TypeError)."""
    params = holder.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidRequest(f"{what}: 'parameters' must be an object")
    return params


def texts_count(shape) -> int:
    """How many texts a BYTES input of `shape` holds: [n] or [n, 1]; InvalidRequest otherwise."""
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape) or len(shape) not in (1, 2) \
            or (len(shape) == 2 and shape[1] != 1):
        raise InvalidRequest(f"input shape must be [n] or [n, 1], got {shape!r}")
    return shape[0]


def parse_infer(body: bytes, header_length: str | None, shm: SharedMemoryRegistry) -> InferRequest:
    """Parse an infer request whose single BYTES input holds the texts to embed."""
    doc, binary = _split(body, header_length)
    if len(doc["inputs"]) != 1:
        raise InvalidRequest(f"expected exactly one input (BYTES texts), got {len(doc['inputs'])}")
    tensor = doc["inputs"][0]
    if not isinstance(tensor, dict):
        raise InvalidRequest("each input must be an object with name, shape, datatype, data")
    if tensor.get("name") != "text":
        raise InvalidRequest(f"unexpected inference input {tensor.get('name')!r}: the model's input is 'text'")
    if tensor.get("datatype") != "BYTES":
        raise InvalidRequest(f"input {tensor.get('name')!r} must have datatype BYTES, not {tensor.get('datatype')!r}")
    count = texts_count(tensor.get("shape"))
    params = _params(tensor, "input")
    where = target(params, f"input {tensor.get('name')!r}")
    if where is not None:
        if binary:
            raise InvalidRequest(f"{len(binary)} binary bytes follow the JSON header, but the input is in shared memory")
        texts = decode_bytes_tensor(shm.read(where, f"input {tensor.get('name')!r}"), count)
    elif "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or size != len(binary):
            raise InvalidRequest(f"binary_data_size={size!r} but {len(binary)} bytes follow the JSON header")
        texts = decode_bytes_tensor(binary, count)
    else:
        data = tensor.get("data")
        if not isinstance(data, list):
            raise InvalidRequest(_no_data(tensor))
        flat = _flatten(data)
        if len(flat) != count:
            raise InvalidRequest(f"shape says {count} elements, data holds {len(flat)}")
        if not all(isinstance(x, str) for x in flat):
            raise InvalidRequest("BYTES data must be strings")
        texts = flat
    outputs, request_params, binary_output, targets = _outputs(doc, shm)
    for out in outputs:
        if out.get("name") != "embedding":
            raise InvalidRequest("the only output is 'embedding'")
    return InferRequest(_request_id(doc), texts, binary_output, request_params, targets)


def _request_id(doc: dict) -> str | None:
    """The request's `id`: a string (the protocol's type; a number is taken as its text), echoed in the answer."""
    request_id = doc.get("id")
    if request_id is not None and (not isinstance(request_id, (str, int)) or isinstance(request_id, bool)):
        raise InvalidRequest("'id' must be a string")
    if isinstance(request_id, str) and not request_id.isascii():
        try:
            request_id.encode()
        except UnicodeEncodeError:  # a lone surrogate (JSON's "\ud800"): no answer could echo it
            raise InvalidRequest("'id' holds a lone UTF-16 surrogate, which is no text") from None
    return None if request_id is None else str(request_id)


# Triton's classification extension (an output's `classification` parameter, tritonclient's class_count): not served;
# refused rather than answered with the full tensor a client would read as top-k labels.
CLASSIFICATION_REFUSED = "the classification extension (an output's 'classification' parameter) is not supported"


def _outputs(doc: dict, shm: SharedMemoryRegistry) -> tuple[list[dict], dict, bool, dict[str, Target]]:
    """(requested outputs, request parameters, binary output?, shared memory targets by output name); each
    target is checked against its region now, before any work is done."""
    outputs = doc.get("outputs") or []
    request_params = doc.get("parameters") or {}
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs) or not isinstance(request_params, dict):
        raise InvalidRequest("'outputs' must be a list of objects and 'parameters' an object")
    binary_output = bool(request_params.get("binary_data_output", False)) or any(
        bool(_params(out, "output").get("binary_data", False)) for out in outputs)
    targets = {}
    for out in outputs:
        what = f"output {out.get('name')!r}"
        if "classification" in _params(out, what):
            raise InvalidRequest(CLASSIFICATION_REFUSED)
        where = target(_params(out, what), what)
        if where is not None:
            shm.check(where, what)
            targets[str(out.get("name"))] = where
    return outputs, request_params, binary_output, targets


# Numeric KServe datatypes and their little-endian numpy types.
NUMPY_TYPES = {"BOOL": "?", "INT8": "i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "UINT8": "u1", "UINT16": "<u2",
               "UINT32": "<u4", "UINT64": "<u8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}


@dataclass
class TensorRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[str]  # requested output names; empty: all
    binary_output: bool
    targets: dict[str, Target]  # outputs to write to shared memory, by name


def _numeric_type(name, datatype, shape) -> tuple[np.dtype, int]:
    """(numpy dtype, element count) of a numeric input; InvalidRequest for another datatype or a bad shape."""
    if not isinstance(datatype, str) or datatype not in NUMPY_TYPES:
        raise InvalidRequest(f"input {name!r}: datatype {datatype!r} is not a numeric type ({', '.join(NUMPY_TYPES)})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidRequest(f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    return np.dtype(NUMPY_TYPES[datatype]), math.prod(shape)  # Python ints: no int64 overflow


def numeric_from_bytes(name: str, datatype: str, shape: list[int], raw: bytes) -> np.ndarray:
    """A numeric input from its little-endian bytes (gRPC's raw_input_contents), as an array of its shape."""
    dtype, count = _numeric_type(name, datatype, shape)
    if len(raw) != count * dtype.itemsize:
        raise InvalidRequest(f"input {name!r}: {len(raw)} bytes do not hold {count} {datatype} values")
    return _shaped(name, datatype, shape, lambda: np.frombuffer(raw, dtype, count))


def _numeric(tensor: dict, binary: bytes, offset: int, shm: SharedMemoryRegistry) -> tuple[np.ndarray, int]:
    """One numeric input as an array of its shape; returns it and the binary offset after it."""
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    dtype, count = _numeric_type(name, datatype, shape)
    params = _params(tensor, f"input {name!r}")
    where = target(params, f"input {name!r}")
    if where is not None:
        return numeric_from_bytes(name, datatype, shape, shm.read(where, f"input {name!r}")), offset
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or size != count * dtype.itemsize or offset + size > len(binary):
            raise InvalidRequest(f"input {name!r}: binary_data_size={size!r} does not hold {count} {datatype} values "
                                 f"within the {len(binary) - offset} binary bytes left")
        return _shaped(name, datatype, shape, lambda: np.frombuffer(binary, dtype, count, offset)), offset + size
    data = tensor.get("data")
    if not isinstance(data, list):
        raise InvalidRequest(_no_data(tensor))
    flat = _flatten(data)
    if len(flat) != count:
        raise InvalidRequest(f"input {name!r}: shape {shape} says {count} elements, data holds {len(flat)}")
    integral = dtype.kind in "iu"
    for x in flat:
        if isinstance(x, bool) != (datatype == "BOOL") or not isinstance(x, (int, float)) or (integral and not isinstance(x, int)):
            raise InvalidRequest(f"input {name!r}: {x!r} is not a {datatype} value")
    return _shaped(name, datatype, shape, lambda: np.asarray(flat, dtype=dtype)), offset


def _shaped(name, datatype: str, shape: list[int], flat) -> np.ndarray:
    """flat() reshaped to `shape`; a value out of range, or a dimension numpy cannot hold (an empty [0, 2**70]), is a 400."""
    try:
        return flat().reshape(shape)
    except (OverflowError, ValueError):
        raise InvalidRequest(f"input {name!r}: a value is out of the {datatype} range, or shape {shape} is too large") from None


def parse_tensors(body: bytes, header_length: str | None, shm: SharedMemoryRegistry) -> TensorRequest:
    """Parse an infer request of numeric tensors (JSON data or Triton binary data), by input name."""
    doc, binary = _split(body, header_length)
    inputs, offset = {}, 0
    for tensor in doc["inputs"]:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise InvalidRequest("each input must be an object with name, shape, datatype, data")
        if tensor["name"] in inputs:
            raise InvalidRequest(f"input {tensor['name']!r} is given twice")
        inputs[tensor["name"]], offset = _numeric(tensor, binary, offset, shm)
    if offset != len(binary):
        raise InvalidRequest(f"{len(binary) - offset} binary bytes follow the JSON header beyond the inputs' data")
    outputs, _, binary_output, targets = _outputs(doc, shm)
    return TensorRequest(_request_id(doc), inputs,
                         [str(o.get("name")) for o in outputs], binary_output, targets)


def fp32_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype="<f4").tobytes()


def place_outputs(shm: SharedMemoryRegistry, targets: dict[str, Target], outputs: dict[str, np.ndarray]) -> dict[str, dict]:
    """Write each output that has a shared memory target there (FP32); its response parameters, by name."""
    return {name: shm.write(t, fp32_bytes(outputs[name]), f"output {name!r}") for name, t in targets.items() if name in outputs}


def encode_tensors(model: str, request_id: str | None, outputs: dict[str, np.ndarray], binary: bool,
                   placed: dict[str, dict] | None = None) -> tuple[bytes, dict]:
    """(body, extra headers) for FP32 outputs by name, in JSON or as binary tensor data; an output in `placed`
    (written to shared memory) carries its parameters and no data."""
    docs, raws = [], []
    for name, array in outputs.items():
        out: dict = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
        if placed and name in placed:
            out["parameters"] = placed[name]
        elif binary:
            raw = fp32_bytes(array)
            out["parameters"] = {"binary_data_size": len(raw)}
            raws.append(raw)
        else:
            out["data"] = array.reshape(-1)
        docs.append(out)
    doc: dict = {"model_name": model, "model_version": "1", "outputs": docs}
    if request_id is not None:
        doc["id"] = request_id
    head = dumps(doc)
    if not raws:
        return head, {"content-type": "application/json"}
    return head + b"".join(raws), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


def model_config(metadata: dict) -> dict:
    """Triton's model configuration (its JSON form) of a served model, from its KServe metadata; what
    tritonclient's get_model_config and perf_analyzer read. max_batch_size 0: the shapes are the whole shapes."""
    def tensors(side: str) -> list[dict]:
        return [{"name": t["name"], "data_type": "TYPE_STRING" if t["datatype"] == "BYTES" else "TYPE_" + t["datatype"],
                 "dims": t["shape"]} for t in metadata[side]]
    return {"name": metadata["name"], "platform": metadata["platform"], "max_batch_size": 0,
            "input": tensors("inputs"), "output": tensors("outputs")}
