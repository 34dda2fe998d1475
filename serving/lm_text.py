"""Text in, text out for an exported language model's `generate` (greedy) and `sample`
signatures.

The LMs here are byte-level (trainer.data.text): token ids 0..255 are the UTF-8 bytes of the
text, 256 is BOS, 257 EOS and 258 PAD. As the export's signature docs say, a prompt is the
text's bytes (no BOS), and a continuation ends at its first EOS. `generate` takes `tokens` int32
[batch, prompt_length] and answers `tokens` int32 [batch, max_new_tokens]; `sample` also takes
per-row `temperature`, `top_k` and `seed`. Inputs a signature declares beyond `tokens` are
filled from `Sampling` (or the prompt's length, for `lengths`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from serving.model_client import ClientError, ModelClient, numpy_dtype

GENERATE_SIGNATURE = "generate"
SAMPLE_SIGNATURE = "sample"
BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
_LENGTH_INPUTS = ("lengths", "prompt_lengths")


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How `generate` picks tokens, for exports whose signature takes these inputs: greedy when
  temperature is 0; top_k 0 samples from the whole vocabulary; a fixed seed repeats."""

  temperature: float = 0.0
  top_k: int = 0
  seed: int = 0


def encode_prompt(text: str) -> np.ndarray:
  """The UTF-8 bytes of `text` as int32 token ids. Raises ClientError for an empty prompt."""
  if not text:
    raise ClientError("the prompt is empty; give --text some text to continue")
  return np.array(list(text.encode()), np.int32)


def decode_continuation(tokens) -> str:
  """The text of generated token ids up to the first EOS; BOS, PAD and ids above 255 are
  dropped, and bytes cut in the middle of a UTF-8 character show as U+FFFD."""
  data = bytearray()
  for token in np.asarray(tokens).reshape(-1).tolist():
    if token == EOS_ID:
      break
    if 0 <= token < 256:
      data.append(token)
  return data.decode(errors="replace")


def signature_for(sampling: Sampling, signature_names) -> str:
  """`generate` for greedy decoding, `sample` when `sampling` asks for more. Raises ClientError
  when the export lacks the one needed."""
  greedy = sampling.temperature == 0 and sampling.top_k == 0
  name = (
    GENERATE_SIGNATURE if greedy or SAMPLE_SIGNATURE not in signature_names else SAMPLE_SIGNATURE
  )
  if name not in signature_names:
    raise ClientError(
      f"--text needs a language model with a {name!r} signature; the model has "
      f"{sorted(signature_names)}"
    )
  return name


def generate_inputs(signature_def, prompt: np.ndarray, sampling: Sampling) -> dict:
  """The request for one prompt: `tokens` [1, length], and each other input the signature
  declares, as a scalar or one value per row as its shape says. Raises ClientError for an
  input this client does not know, or sampling asked of a signature without it."""
  names = set(signature_def.inputs)
  if "tokens" not in names:
    raise ClientError(f"the signature takes {sorted(names)}, not tokens")
  values = {"tokens": prompt[None, :]}
  for name in sorted(names - {"tokens"}):
    if name in _LENGTH_INPUTS:
      value = len(prompt)
    elif name in ("temperature", "top_k", "seed"):
      value = getattr(sampling, name)
    else:
      raise ClientError(f"the signature's input {name!r} is not known to this client")
    info = signature_def.inputs[name]
    rank = None if info.tensor_shape.unknown_rank else len(info.tensor_shape.dim)
    values[name] = np.asarray(value if rank == 0 else [value], numpy_dtype(info.dtype))
  asked = {f for f, v in dataclasses.asdict(sampling).items() if v != 0}
  asked.discard("seed")  # A seed alone changes nothing in greedy decoding.
  missing = sorted(asked - names)
  if missing:
    raise ClientError(
      f"this export decodes greedily only (no {', '.join(missing)} input); re-export the "
      "model with a newer serving.export to sample"
    )
  return values


@dataclasses.dataclass(frozen=True)
class Generated:
  version: int  # The model version that answered.
  tokens: list[int]  # What `generate` returned for the prompt.
  text: str  # Their decoded continuation.


def generate_text(
  client: ModelClient, signature_defs: dict, text: str, sampling: Sampling = Sampling()
) -> Generated:
  """Sends `text` as byte tokens to `generate` or `sample` (`signature_for`; `signature_defs`
  from the server's metadata), and decodes the answer. Raises ClientError."""
  name = signature_for(sampling, signature_defs)
  inputs = generate_inputs(signature_defs[name], encode_prompt(text), sampling)
  version, outputs = client.predict(inputs, name)
  if "tokens" not in outputs:
    raise ClientError(f"{name} answered {sorted(outputs)}, not tokens")
  tokens = outputs["tokens"][0].tolist()
  return Generated(version, tokens, decode_continuation(tokens))
