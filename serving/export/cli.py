"""The `python -m serving.export` command line: flags, one call of `exporter.export`, its summary.

Flags live here, not in `exporter`, so that libraries (the registry, tests) can import the exporter
beside other command-line modules without defining `--workdir` twice.
"""

from __future__ import annotations

import sys

from absl import app, flags

from serving.export import compatibility, parity
from serving.export.exporter import export
from trainer import log_filter
from trainer.errors import ConfigError

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run to export.")
_EXPORT_BASE = flags.DEFINE_string("export_base", None, "Model base path; versions go below it.")
_VERSION = flags.DEFINE_integer("version", None, "Version number; default: the next free one.")
_STEP = flags.DEFINE_string(
  "step",
  None,
  "best (by eval.best_metric), latest or a step number; default: best when the run kept one "
  "(checkpoint.keep_best > 0), else latest.",
)
_MAX_NEW_TOKENS = flags.DEFINE_integer(
  "max_new_tokens", 32, "Language models: tokens `generate` emits."
)
_PLATFORMS = flags.DEFINE_list("platforms", ["cpu"], "Platforms to serialize for: cpu, cuda, tpu.")
_CALLING_CONVENTION = flags.DEFINE_integer(
  "calling_convention_version",
  None,
  "XlaCallModule calling convention to serialize with (9 for TF Serving 2.16-2.19); default: JAX's.",
)
_CHECK_TF_SERVING = flags.DEFINE_string(
  "check_tf_serving", None, "A TF Serving release (e.g. 2.19): can it run the export?"
)
_SAVED_MODEL = flags.DEFINE_string(
  "saved_model", None, "With --check_tf_serving alone: the exported version directory to check."
)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  log_filter.quiet_library_info_logs()
  try:
    if _CHECK_TF_SERVING.value and not _WORKDIR.value:
      if not _SAVED_MODEL.value:
        raise ConfigError(
          "--check_tf_serving needs --saved_model=<export dir> (or an export to run)"
        )
      _print_compatibility(_SAVED_MODEL.value, _CHECK_TF_SERVING.value)
      return
    if not _WORKDIR.value or not _EXPORT_BASE.value:
      raise ConfigError("--workdir and --export_base are required")
    result = export(
      _WORKDIR.value,
      _EXPORT_BASE.value,
      step=_STEP.value,
      version=_VERSION.value,
      max_new_tokens=_MAX_NEW_TOKENS.value,
      platforms=tuple(_PLATFORMS.value),
      calling_convention_version=_CALLING_CONVENTION.value,
    )
  except (ConfigError, parity.ParityError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(
    f"exported step {result.step} ({_STEP_REASONS[result.step_reason]}) to {result.path} "
    f"in {result.seconds:.1f} s"
  )
  print(f"signatures: {', '.join(result.signatures)}")
  print(
    "parity (max relative error): " + ", ".join(f"{k} {v:.2e}" for k, v in result.parity.items())
  )
  if _CHECK_TF_SERVING.value:
    _print_compatibility(result.path, _CHECK_TF_SERVING.value)


_STEP_REASONS = {
  "best": "the best checkpoint; --step=latest for the last",
  "latest": "the latest checkpoint",
  "requested": "as requested",
}


def _print_compatibility(path: str, release: str) -> None:
  verdict = compatibility.check_saved_model(path, release)
  print(verdict.message)
  if not verdict.compatible:
    sys.exit(2)
