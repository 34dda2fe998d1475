"""The tf.Example features a Classify/Regress signature parses, and plain words for TF's errors.

A REST `:classify` body is JSON: `3` becomes an int64 feature, `3.0` a float one (TF Serving's
rule). A model that parses a float feature then fails inside its graph with "Graph execution
error ... Data type: int64 but expected type: float". Reading the feature types the signature's
ParseExample op declares lets the server convert JSON integers into a float feature (a float
holds them) and name a real mismatch (strings into a float feature) before running anything.
"""

from __future__ import annotations

import re

# tensorflow.DataType -> the tf.train.Feature field holding it, and the word errors use.
_KIND_OF_DTYPE = {1: "float_list", 9: "int64_list", 7: "bytes_list"}
KIND_NAMES = {"float_list": "float", "int64_list": "int64", "bytes_list": "bytes"}
HOW_TO_SEND = {
  "float_list": "send numbers (JSON 0.5 or 3; gRPC: float_list)",
  "int64_list": "send integers without a decimal point (JSON 3; gRPC: int64_list)",
  "bytes_list": 'send strings (JSON "text" or {"b64": "..."}; gRPC: bytes_list)',
}
_PARSE_OPS = ("ParseExampleV2",)
# ParseExampleV2(serialized, names, sparse_keys, dense_keys, ragged_keys, dense_defaults...).
_KEY_INPUTS = (("sparse_types", 2), ("Tdense", 3), ("ragged_value_types", 4))
_TYPE_MISMATCH = re.compile(
  r"Key: (?P<key>[^,]+), Index: (?P<index>\d+)\.\s+Data types don't match\. "
  r"Data type: (?P<given>\w+) but expected type: (?P<expected>\w+)"
)
_MISSING = re.compile(
  r"Feature: (?P<key>\S+) \(data type: (?P<expected>\w+)\) is required but could"
)
_OTHER_FEATURE_ERROR = re.compile(r"Name: [^,]*, Key: (?P<key>[^,]+), Index: \d+\.\s+(?P<what>.*)")


def parsed_features(graph) -> dict[str, str]:
  """{feature name: "float_list" | "int64_list" | "bytes_list"} of every ParseExampleV2 op in a
  signature's graph (its function library included); empty when it parses none."""
  graph_def = graph.as_graph_def()
  features: dict[str, str] = {}
  for nodes in [graph_def.node, *(f.node_def for f in graph_def.library.function)]:
    by_name = {node.name: node for node in nodes}
    for node in nodes:
      if node.op in _PARSE_OPS:
        features.update(_node_features(node, by_name))
  return features


def _node_features(node, by_name) -> dict[str, str]:
  from tensorflow.python.framework import tensor_util

  features = {}
  for types_attr, input_index in _KEY_INPUTS:
    if input_index >= len(node.input):
      continue
    source = by_name.get(node.input[input_index].split(":")[0])
    if source is None or source.op != "Const":
      continue  # Keys computed at run time: unknown here.
    keys = tensor_util.MakeNdarray(source.attr["value"].tensor).reshape(-1)
    types = node.attr[types_attr].list.type
    for key, dtype in zip(keys, types, strict=True):
      kind = _KIND_OF_DTYPE.get(dtype)
      if kind is not None:
        features[key.decode() if isinstance(key, bytes) else str(key)] = kind
  return features


def explain_parse_error(message: str) -> str | None:
  """A one-line explanation of TensorFlow's error for an Example the graph could not parse, or
  None when `message` is not such an error."""
  match = _TYPE_MISMATCH.search(message)
  if match:
    expected = {"string": "bytes_list", "float": "float_list", "int64": "int64_list"}.get(
      match["expected"]
    )
    fix = f"; {HOW_TO_SEND[expected]}" if expected else ""
    return (
      f"feature '{match['key']}' of example {match['index']} holds {match['given']} values but "
      f"the signature parses it as {match['expected']}{fix}"
    )
  match = _MISSING.search(message)
  if match:
    return (
      f"feature '{match['key']}' ({match['expected']}) is required but an example lacks it; "
      "give it in every example (or in the context)"
    )
  match = _OTHER_FEATURE_ERROR.search(message)
  if match and "Graph execution error" in message:
    return f"feature '{match['key']}': {match['what'].strip()}"
  return None
