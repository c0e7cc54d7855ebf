"""TF Serving's REST predict path, reproduced for tests that run without a model server.

(Where `tensorflow_model_server` is on PATH, test_serving.py also sends the
same requests to a real one and compares its answers with this copy's.)

TF Serving turns a JSON body into a PredictRequest (util/json_tensor.cc,
FillPredictRequestFromJson) using the SignatureDef stored in saved_model.pb,
runs the signature, and writes the outputs back as JSON
(MakeJsonFromTensors). The rules followed here are those of that file:

- `signature_name` is optional (empty: `serving_default`); exactly one of
  `instances` (row format) or `inputs` (columnar format) is given.
- Row format: a non-empty list; with one input each element is that input's
  value for one example, otherwise (or if elements are objects) objects keyed
  by input name. Examples are stacked on a new first dimension and must all
  have the same shape.
- A value `{"b64": "..."}` (an object with that single key) is base64-decoded
  into bytes, for string tensors only; a plain JSON string is its UTF-8 bytes.
- Numbers: float tensors take any JSON number; integer tensors only integers.
- Responses: row format gives `{"predictions": [...]}` (one object per example
  when there are several outputs), columnar `{"outputs": {...}}`; string outputs
  are plain strings unless the output's name ends in `_bytes`.

The PredictRequest is the real tensorflow_serving.apis proto, the same type
the warmup records hold, and is run by `run_request` the way TF Serving's
RunPredict does: inputs must match the signature's names and dtypes.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import predict_pb2

DEFAULT_SIGNATURE = "serving_default"


class RequestError(ValueError):
    """What TF Serving answers with HTTP 400 / INVALID_ARGUMENT before running the model."""


def signature_defs(export_path: str) -> dict:
    """The SignatureDefs of saved_model.pb, as TF Serving reads them."""
    sm = saved_model_pb2.SavedModel()
    with open(os.path.join(export_path, "saved_model.pb"), "rb") as f:
        sm.ParseFromString(f.read())
    return dict(sm.meta_graphs[0].signature_def)


def _is_b64(v) -> bool:
    return isinstance(v, dict) and len(v) == 1 and isinstance(v.get("b64"), str)


def _shape(v) -> list[int]:
    shape = []
    while isinstance(v, list):
        shape.append(len(v))
        if not v:
            break
        v = v[0]
    return shape


def _leaf(v, dtype: tf.dtypes.DType):
    if dtype == tf.string:
        if _is_b64(v):
            try:
                return base64.b64decode(v["b64"], validate=True)
            except (binascii.Error, ValueError):
                raise RequestError("Unable to base64 decode") from None
        if isinstance(v, str):
            return v.encode("utf-8")
        raise RequestError(f"JSON Value: {json.dumps(v)} is not of expected type: string")
    if isinstance(v, dict):
        raise RequestError(f"JSON Value: {json.dumps(v)} is not of expected type: {dtype.name}")
    if dtype.is_floating:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RequestError(f"JSON Value: {json.dumps(v)} is not of expected type: "
                               f"{dtype.name}")
        return float(v)
    if dtype.is_integer:
        if isinstance(v, bool) or not isinstance(v, int):
            raise RequestError(f"JSON Value: {json.dumps(v)} is not of expected type: "
                               f"{dtype.name}")
        return v
    raise RequestError(f"conversion to {dtype.name} is not implemented")


def _fill(v, shape: list[int], level: int, dtype, out: list) -> None:
    if not isinstance(v, list):
        if level != len(shape):
            raise RequestError(f"JSON Value found at incorrect level: {level + 1}, "
                               f"expected at level: {len(shape)}")
        out.append(_leaf(v, dtype))
        return
    if level >= len(shape) or len(v) != shape[level]:
        raise RequestError(f"Encountered list at unexpected size or level {level}")
    for e in v:
        _fill(e, shape, level + 1, dtype, out)


def _tensor(value, dtype: tf.dtypes.DType, batch_of: int | None = None) -> tensor_pb2.TensorProto:
    """A JSON value (or a list of per-example values) -> TensorProto of `dtype`."""
    values, shape = [], []
    if batch_of is None:
        shape = _shape(value)
        _fill(value, shape, 0, dtype, values)
    else:
        item_shape = None
        for e in value:
            s = _shape(e)
            if item_shape is not None and s != item_shape:
                raise RequestError(f"Expecting shape {item_shape} but got: {s}")
            item_shape = s
            _fill(e, s, 0, dtype, values)
        shape = [len(value)] + (item_shape or [])
    np_dtype = object if dtype == tf.string else dtype.as_numpy_dtype
    array = np.array(values, dtype=np_dtype).reshape(shape)
    return tf.make_tensor_proto(array, dtype=dtype)


def json_to_request(body: str, sigs: dict) -> tuple[predict_pb2.PredictRequest, str]:
    """Parses a REST predict body into a PredictRequest; returns it and "row" or "columnar"."""
    try:
        doc = json.loads(body)
    except json.JSONDecodeError as e:
        raise RequestError(f"JSON Parse error: {e}") from None
    if not isinstance(doc, dict):
        raise RequestError("JSON Value: Is not object")
    request = predict_pb2.PredictRequest()
    name = doc.get("signature_name", "")
    if not isinstance(name, str):
        raise RequestError("'signature_name' key must be a string value.")
    request.model_spec.signature_name = name
    key = name or DEFAULT_SIGNATURE
    if key not in sigs:
        raise RequestError(f"Serving signature name: \"{key}\" not found in signature def")
    inputs = {alias: tf.dtypes.as_dtype(info.dtype) for alias, info in sigs[key].inputs.items()}
    if "instances" in doc and "inputs" in doc:
        raise RequestError("expecting only one of 'inputs' or 'instances' keys to exist")
    if "instances" in doc:
        inst = doc["instances"]
        if not isinstance(inst, list):
            raise RequestError("Excepting 'instances' to be an list/array")
        if not inst:
            raise RequestError("No values in 'instances' array")
        objects = isinstance(inst[0], dict) and not _is_b64(inst[0])
        if not objects and len(inputs) > 1:
            raise RequestError("instances is a plain list, but expecting list of objects")
        if objects:
            for i, e in enumerate(inst):
                if not isinstance(e, dict) or _is_b64(e) or set(e) != set(inputs):
                    raise RequestError(f"Failed to process element: {i} of 'instances' list. "
                                       f"JSON object must only have keys: "
                                       f"{','.join(sorted(inputs))}")
            for alias, dtype in inputs.items():
                request.inputs[alias].CopyFrom(
                    _tensor([e[alias] for e in inst], dtype, batch_of=len(inst)))
        else:
            alias, dtype = next(iter(inputs.items()))
            if any(isinstance(e, dict) and not _is_b64(e) for e in inst):
                raise RequestError("Expecting value/list but got object")
            request.inputs[alias].CopyFrom(_tensor(inst, dtype, batch_of=len(inst)))
        return request, "row"
    if "inputs" in doc:
        val = doc["inputs"]
        if not isinstance(val, dict) or _is_b64(val):
            if len(inputs) > 1:
                raise RequestError("inputs is a plain value/list, but expecting an object")
            alias, dtype = next(iter(inputs.items()))
            request.inputs[alias].CopyFrom(_tensor(val, dtype))
        else:
            for alias, dtype in inputs.items():
                if alias not in val:
                    raise RequestError(f"Missing named input: {alias} in 'inputs' object.")
                request.inputs[alias].CopyFrom(_tensor(val[alias], dtype))
        return request, "columnar"
    raise RequestError("Missing 'inputs' or 'instances' key")


def run_request(loaded, request: predict_pb2.PredictRequest, sigs: dict) -> dict:
    """Runs a PredictRequest against a loaded SavedModel, checking it like RunPredict.

    Returns:
        {output name: np.ndarray}. Errors raised by the graph itself (e.g.
        undecodable image bytes: InvalidArgumentError) propagate unchanged:
        TF Serving returns them as that request's error status.
    """
    key = request.model_spec.signature_name or DEFAULT_SIGNATURE
    if key not in sigs:
        raise RequestError(f"signature {key!r} not found")
    sig = sigs[key]
    if set(request.inputs) != set(sig.inputs):
        raise RequestError(f"input keys {sorted(request.inputs)} do not match the signature's "
                           f"{sorted(sig.inputs)}")
    feeds = {}
    for alias, proto in request.inputs.items():
        if proto.dtype != sig.inputs[alias].dtype:
            raise RequestError(f"input {alias!r}: dtype {proto.dtype} does not match the "
                               f"signature's {sig.inputs[alias].dtype}")
        feeds[alias] = tf.constant(tf.make_ndarray(proto), dtype=tf.dtypes.as_dtype(proto.dtype))
    out = loaded.signatures[key](**feeds)
    return {k: v.numpy() for k, v in out.items()}


def status_message(error: tf.errors.OpError) -> str:
    """The error text TF Serving returns for a request the graph failed.

    TF Serving answers with Session::Run's status message unchanged (REST:
    `{"error": MESSAGE}`): the failing kernel's message, then the failing
    node ("\\n\\t [[{{node ...}}]]"). Python puts "Graph execution error:"
    and the node's Python definition in front of it and "[Op:...]" after it;
    those are removed here.
    """
    text = error.message
    text = re.sub(r"^Graph execution error:\s*", "", text)
    text = re.sub(r"^Detected at node .*? defined at \(most recent call last\):\n"
                  r"(?:(?:<stack traces unavailable>|  File .*|)\n)*", "", text)
    return re.sub(r"\s*\[Op:[^\]]*\]\s*$", "", text)


def error_json(error: tf.errors.OpError) -> str:
    """The REST response body for a request the graph failed."""
    return json.dumps({"error": status_message(error)})


def _jsonable(a: np.ndarray, as_bytes: bool):
    if a.dtype == object:
        f = (lambda b: {"b64": base64.b64encode(b).decode("ascii")}) if as_bytes else \
            (lambda b: b.decode("utf-8"))
        return np.vectorize(f, otypes=[object])(a).tolist() if a.size else a.tolist()
    return a.tolist()


def outputs_to_json(outputs: dict, fmt: str) -> str:
    """The response body TF Serving writes for these outputs."""
    conv = {k: _jsonable(v, k.endswith("_bytes")) for k, v in sorted(outputs.items())}
    if fmt == "columnar":
        body = {"outputs": conv if len(conv) > 1 else next(iter(conv.values()))}
    else:
        n = len(next(iter(conv.values())))
        if len(conv) > 1:
            body = {"predictions": [{k: v[i] for k, v in conv.items()} for i in range(n)]}
        else:
            body = {"predictions": next(iter(conv.values()))}
    return json.dumps(body)
