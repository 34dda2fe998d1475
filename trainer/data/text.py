"""Text for language models: a byte-level tokenizer and documents packed into fixed-length rows.

With no files given, the corpus is the Python standard library's own source code (found through
`sysconfig`): real text that every machine has, with no download. Users point
`config.data.files` at text files (`*.txt`, any UTF-8 or bytes) or at ArrayRecord files of token
ids (one document per record, written by `write_token_array_record`).

Packing: documents become `[BOS] bytes [EOS]` and are concatenated into one stream that is cut
into rows of `seq_len + 1` tokens overlapping by one. Each row carries per-token segment ids (the
document a token belongs to) and positions (its offset in that document), so attention never
crosses a document boundary, and a loss mask drops the targets that would predict the next
document's first token from the previous one's last.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig

import ml_collections
import numpy as np
from flax import serialization

from trainer.data.dataset import LANGUAGE_MODEL, Dataset, DataSpec
from trainer.errors import ConfigError

# The token contract (training, `generate`, clients): ids 0..255 are the bytes of UTF-8 text;
# BOS starts every document and EOS ends it. Decoding ends a continuation at EOS. PAD fills the
# right end of the shorter prompts in a batch sent to an exported `generate`.
BYTE_VOCAB = 256
BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
VOCAB_SIZE = 259


def encode(text: str | bytes) -> np.ndarray:
  """Byte-level token ids of `text` (UTF-8 for str), without BOS/EOS."""
  data = text.encode("utf-8") if isinstance(text, str) else text
  return np.frombuffer(data, np.uint8).astype(np.int32)


def decode(ids: np.ndarray | list[int]) -> str:
  """Text of token ids; special tokens are dropped, invalid UTF-8 is replaced."""
  data = bytes(int(i) for i in np.asarray(ids).reshape(-1) if 0 <= int(i) < BYTE_VOCAB)
  return data.decode("utf-8", errors="replace")


def stdlib_source_files() -> list[str]:
  """The standard library's .py files (third-party site-packages excluded), sorted."""
  root = sysconfig.get_paths()["stdlib"]
  paths = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
  return sorted(p for p in paths if "site-packages" not in p.split(os.sep))


def write_token_array_record(path: str, documents: list[np.ndarray]) -> None:
  """Writes one document of token ids per record, in the format `load_documents` reads."""
  from array_record.python import array_record_module

  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  try:
    for tokens in documents:
      writer.write(serialization.msgpack_serialize({"tokens": np.asarray(tokens, np.int32)}))
  finally:
    writer.close()


def load_documents(files: list[str], max_bytes: int) -> list[np.ndarray]:
  """Token ids of each document in `files` (text, or ArrayRecord of token ids)."""
  documents, total = [], 0
  for path in files:
    if path.endswith(".array_record"):
      new = _array_record_documents(path)
    else:
      with open(path, "rb") as f:
        new = [encode(f.read())]
    documents.extend(new)
    total += sum(d.size for d in new)
    if max_bytes and total >= max_bytes:
      break
  return [d for d in documents if d.size]


def _array_record_documents(path: str) -> list[np.ndarray]:
  import grain

  try:
    records = grain.sources.ArrayRecordDataSource([path])
    documents = [
      np.asarray(serialization.msgpack_restore(records[i])["tokens"], np.int32)
      for i in range(len(records))
    ]
  except Exception as e:  # array_record raises bare RuntimeErrors on bad files.
    raise ConfigError(f"cannot read token ids from ArrayRecord file {path}: {e}") from e
  for tokens in documents:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= BYTE_VOCAB):
      raise ConfigError(
        f"{path} holds token id {int(tokens.max())} outside the byte vocabulary [0, 256); "
        "documents must be byte-level ids (BOS/EOS are added by the packer)"
      )
  return documents


class PackedTextSource:
  """Random-access packed rows over a token stream; see the module docstring."""

  def __init__(self, documents: list[np.ndarray], seq_len: int):
    pieces, starts, offset = [], [], 0
    for tokens in documents:
      starts.append(offset)
      pieces.append(np.concatenate([[BOS_ID], tokens, [EOS_ID]]).astype(np.uint16))
      offset += pieces[-1].size
    self.stream = np.concatenate(pieces) if pieces else np.zeros(0, np.uint16)
    self.doc_starts = np.asarray(starts, np.int64)
    self.seq_len = seq_len
    self.num_rows = max((self.stream.size - 1) // seq_len, 0)

  def __len__(self) -> int:
    return self.num_rows

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[0] for k, v in self.take(np.array([index])).items()}

  def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Rows `indices`, stacked: each array is (len(indices), seq_len)."""
    starts = np.asarray(indices, np.int64)[:, None] * self.seq_len
    span = starts + np.arange(self.seq_len + 1)  # (rows, seq_len + 1) stream offsets
    tokens = self.stream[span].astype(np.int32)
    doc = np.searchsorted(self.doc_starts, span, side="right") - 1
    positions = span - self.doc_starts[doc]
    segment_ids = (doc - doc[:, :1] + 1).astype(np.int32)  # 1, 2, ... within a row; 0 = padding.
    return {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "positions": positions[:, :-1].astype(np.int32),
      "segment_ids": segment_ids[:, :-1],
      "loss_mask": (doc[:, :-1] == doc[:, 1:]).astype(np.int32),
    }


def load_text_dataset(config: ml_collections.ConfigDict) -> Dataset:
  """Packed train/validation/test rows from `config.data.files` (or the standard library's
  sources). Every `eval_every_documents`-th document is held out, whatever the seed; held-out
  documents alternate between validation and test."""
  if config.seq_len < 2:
    raise ConfigError(f"config.data.seq_len={config.seq_len} must be >= 2")
  documents = load_documents(_text_files(config), config.max_bytes)
  every = config.eval_every_documents
  held_out = documents[::every]
  split_documents = {
    "train": [d for i, d in enumerate(documents) if i % every],
    "validation": held_out[::2],
    "test": held_out[1::2],
  }
  splits = {name: PackedTextSource(docs, config.seq_len) for name, docs in split_documents.items()}
  if min(len(s) for s in splits.values()) == 0:
    rows = ", ".join(f"{len(s)} {name}" for name, s in splits.items())
    raise ConfigError(
      f"{len(documents)} documents ({sum(d.size for d in documents)} bytes) from "
      f"{config.files or 'the standard library'} make {rows} rows of "
      f"config.data.seq_len={config.seq_len} (every config.data.eval_every_documents={every}th "
      "document is held out, alternately for validation and test); give more text, a shorter "
      "seq_len or a smaller eval_every_documents"
    )
  spec = DataSpec(
    kind=LANGUAGE_MODEL,
    input_shape=(config.seq_len,),
    input_dtype="int32",
    num_classes=VOCAB_SIZE,
    fingerprints={
      name: "sha256:" + hashlib.sha256(s.stream.tobytes()).hexdigest() for name, s in splits.items()
    },
  )
  return Dataset(
    train=splits["train"], validation=splits["validation"], test=splits["test"], spec=spec
  )


def _text_files(config: ml_collections.ConfigDict) -> list[str]:
  if not config.files:
    return stdlib_source_files()
  files = sorted(glob.glob(os.path.expanduser(config.files)))
  if not files:
    raise ConfigError(
      f"config.data.files={config.files!r} matches no file; check the path (globs are allowed)"
    )
  for path in files:
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
      raise ConfigError(f"config.data.files: {path} is not a readable file")
  return files
