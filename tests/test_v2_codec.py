"""The Open Inference Protocol wire format (serving/v2_codec.py) against tritonclient's own encoder
and decoder: the request bodies here are built by ``tritonclient.http`` exactly as it sends them,
and our responses are read back with its ``InferResult``."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from serving.v2_codec import ProtocolError, encode_response, parse_request, serialize_bytes

th = pytest.importorskip("tritonclient.http", reason="the protocol tests need tritonclient[http] (the dev extra)")
from tritonclient.http._utils import _get_inference_request  # noqa: E402 - the body tritonclient.infer sends


def _body(inputs, outputs=None, parameters=None) -> tuple[bytes, str | None]:
    body, json_size = _get_inference_request(inputs, "", outputs, 0, False, False, 0, None, parameters)
    return body, None if json_size is None else str(json_size)


def _input(name, array, datatype, binary=True):
    t = th.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array, binary_data=binary)
    return t


@pytest.mark.parametrize("binary", [True, False])
def test_fp32_and_uint8_tensors_round_trip(binary):
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    body, hlen = _body([_input("input", x, "FP32", binary)])
    assert (hlen is not None) == binary
    req = parse_request(body, hlen)
    (t,) = req.inputs
    assert (t.name, t.datatype, t.shape) == ("input", "FP32", (2, 3, 4, 4))
    np.testing.assert_array_equal(t.data, x)  # bit for bit, binary or JSON

    u = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    (t,) = parse_request(*_body([_input("pixels", u, "UINT8", binary)])).inputs
    np.testing.assert_array_equal(t.data, u)


def test_bytes_elements_binary_and_json():
    items = [b"\x89PNG\r\n\x1a\nabc", b"", b"\xff\xd8\xff" + bytes(range(256))]
    (t,) = parse_request(*_body([_input("image", np.array(items, dtype=object), "BYTES")])).inputs
    assert t.data == items
    # JSON BYTES are strings (the service reads images sent so as base64)
    (t,) = parse_request(*_body([_input("image", np.array(["aGk=", "eA=="], dtype=object), "BYTES", False)])).inputs
    assert t.data == ["aGk=", "eA=="]


def test_requested_outputs_and_parameters():
    x = np.zeros((1, 3), np.float32)
    outs = [th.InferRequestedOutput("probabilities", binary_data=False),
            th.InferRequestedOutput("logits", class_count=3)]
    req = parse_request(*_body([_input("input", x, "FP32")], outs, {"tta": "center"}))
    assert [(o.name, o.binary, o.classification) for o in req.outputs] == [("probabilities", False, 0),
                                                                           ("logits", True, 3)]
    assert req.parameters == {"tta": "center"}
    req = parse_request(*_body([_input("input", x, "FP32")]))  # no outputs: tritonclient asks for binary
    assert req.outputs is None and req.binary_output


def test_response_read_back_by_tritonclient():
    probs = np.random.default_rng(1).random((3, 10)).astype(np.float32)
    strings = np.array([[b"0.500000:3:three", b"0.250000:1:one"]] * 3, dtype=object)
    for binary in (True, False):
        body, headers = encode_response("m", "1", "req-7", [("probabilities", "FP32", probs, binary),
                                                           ("classes", "BYTES", strings, binary)])
        hlen = headers.get("Inference-Header-Content-Length")
        assert (hlen is not None) == binary
        result = th.InferResult.from_response_body(body, header_length=None if hlen is None else int(hlen))
        np.testing.assert_array_equal(result.as_numpy("probabilities"), probs)
        got = [[x.decode() if isinstance(x, bytes) else x for x in row] for row in result.as_numpy("classes")]
        assert got == [[x.decode() for x in row] for row in strings]  # JSON BYTES come back as str
        assert result.get_response()["id"] == "req-7" and result.get_response()["model_name"] == "m"


def test_bytes_serialization_by_hand():
    assert serialize_bytes([b"ab", b""]) == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"


def _raw(obj, binary: bytes = b"") -> tuple[bytes, str | None]:
    head = json.dumps(obj).encode()
    return head + binary, str(len(head)) if binary else None


FP = {"name": "input", "datatype": "FP32", "shape": [1, 2]}


@pytest.mark.parametrize("body, hlen, fragment", [
    (b"{not json", None, "not valid JSON"),
    (b"[1, 2]", None, "must be a JSON object"),
    (*_raw({"inputs": []}), "non-empty 'inputs'"),
    (*_raw({"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}), "name must be"),
    (*_raw({"inputs": [FP | {"datatype": "FLOAT"}]}), "datatype 'FLOAT'"),
    (*_raw({"inputs": [FP | {"shape": [1, -2], "data": [1]}]}), "non-negative integers"),
    (*_raw({"inputs": [FP | {"data": [1.0, 2.0, 3.0]}]}), "3 data elements for shape [1, 2]"),
    (*_raw({"inputs": [FP | {"data": ["a", "b"]}]}), "data is not FP32"),
    (*_raw({"inputs": [FP]}), "neither data nor"),
    (*_raw({"inputs": [FP | {"parameters": {"binary_data_size": 7}}]}, b"\0" * 7), "needs 8"),
    (*_raw({"inputs": [FP | {"parameters": {"binary_data_size": 16}}]}, b"\0" * 8), "runs past"),
    (*_raw({"inputs": [FP | {"parameters": {"binary_data_size": 8}}]}, b"\0" * 9), "not claimed"),
    (*_raw({"inputs": [FP | {"parameters": {"shared_memory_region": "r"}}]}), "shared-memory"),
    (*_raw({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 9}}]},
           struct.pack("<I", 5) + b"abcde"), "ends before element 1"),
    (*_raw({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}}]},
           struct.pack("<I", 9) + b"ab"), "claims 9 bytes"),
    (*_raw({"inputs": [FP | {"data": [1, 2]}, FP | {"data": [1, 2]}]}), "input names repeat"),
    (*_raw({"inputs": [FP | {"data": [1, 2]}], "outputs": [{"name": "a"}, {"name": "a"}]}), "output names repeat"),
    (*_raw({"inputs": [FP | {"data": [1, 2]}], "outputs": [{"name": "a", "parameters": {"classification": -1}}]}),
     "classification must be"),
    (b'{"inputs": []}', "99", "not a length within"),
    (*_raw({"inputs": [FP | {"shape": [100000, 100000], "data": [1]}]}), "more than"),
])
def test_malformed_requests_name_the_problem(body, hlen, fragment):
    with pytest.raises(ProtocolError) as e:
        parse_request(body, hlen)
    assert fragment in str(e.value) and 400 <= e.value.status < 500
