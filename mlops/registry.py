r"""The model registry: MLflow Model Registry versions and aliases, tied to TF Serving's version
directories and labels.

  python -m mlops.registry register --workdir=RUN --export_base=runs/models/digits \
      [--name=digits] [--step=best]
  python -m mlops.registry promote --name=digits --version=3 --alias=production \
      [--model_config_file=runs/models/models.config] [--server=127.0.0.1:8500] [--reason=...]
      [--force]
  python -m mlops.registry rollback --name=digits --alias=production [--server=...]
  python -m mlops.registry list --name=digits
  python -m mlops.registry lineage digits@production [--json]     # or digits/3

Registry version N is the directory `<export_base>/N` (see registry_register.py); an alias move
is one audited transaction (registry_promote.py). Bad input: one `error:` line, exit 1.
"""

from __future__ import annotations

import argparse
import os
import sys

from mlops import registry_audit, registry_serving
from mlops.registry_store import RegistryError

COMMANDS = ("register", "promote", "rollback", "list", "lineage")


def parser() -> argparse.ArgumentParser:
  root = argparse.ArgumentParser(
    prog="python -m mlops.registry", description=__doc__.split("\n")[0]
  )
  commands = root.add_subparsers(dest="command", required=True)
  register = commands.add_parser("register", help="export (when needed) and register a run")
  register.add_argument("--workdir", required=True, help="The training run.")
  register.add_argument("--export_base", required=True, help="Where version directories go.")
  register.add_argument("--step", default="best", help="latest, best or a step number.")
  promote = commands.add_parser("promote", help="point an alias (and its label) at a version")
  promote.add_argument("--version", type=int, required=True)
  promote.add_argument(
    "--force",
    action="store_true",
    help="Move canary/production without a passing gate (audited as forced).",
  )
  rollback = commands.add_parser("rollback", help="move an alias back to its previous version")
  for sub in (promote, rollback):
    sub.add_argument("--alias", required=True, help="e.g. staging, canary, production.")
    sub.add_argument("--model_config_file", help="TF Serving model config whose label moves too.")
    sub.add_argument("--server", help="host:port of a model server to reload and wait for.")
    sub.add_argument("--reason", default="", help="Why, for the audit log.")
  commands.add_parser("list", help="versions, aliases, gate verdicts, labels")
  lineage = commands.add_parser("lineage", help="the chain from the data to the served label")
  lineage.add_argument("reference", help="name@alias or name/version")
  lineage.add_argument("--json", action="store_true")
  for sub in commands.choices.values():
    sub.add_argument("--name", default="digits", help="Registered model name.")
  return root


def main(argv: list[str] | None = None) -> None:
  args = parser().parse_args(argv)
  from trainer import log_filter
  from trainer.errors import ConfigError

  log_filter.quiet_library_info_logs()
  try:
    _run(args)
  except (RegistryError, ConfigError, TimeoutError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def _run(args: argparse.Namespace) -> None:
  from mlops import registry_promote, registry_store

  client = registry_store.client()
  if args.command == "register":
    from mlops import registry_register

    result = registry_register.register(
      client, args.workdir, args.export_base, args.name, args.step
    )
    how = "exported and registered" if result.exported else "registered the existing export"
    print(f"{how} {result.name} version {result.version}: {result.path}")
  elif args.command in ("promote", "rollback"):
    where = {
      "model_config_file": args.model_config_file,
      "server": args.server,
      "reason": args.reason,
    }
    if args.command == "promote":
      begin = registry_promote.promote(
        client, args.name, args.version, args.alias, force=args.force, **where
      )
    else:
      begin = registry_promote.rollback(client, args.name, args.alias, **where)
    forced = " (forced past the gate)" if begin["forced"] else ""
    print(
      f"{begin['name']}@{begin['alias']}: {begin['from']} -> {begin['to']} ({begin['kind']}){forced}"
    )
    if begin["model_config_file"]:
      print(f"model config: {begin['model_config_file']} labels {begin['alias']}={begin['to']}")
  elif args.command == "list":
    print(list_text(client, args.name))
  else:
    from mlops import lineage

    print(lineage.render(client, args.reference, as_json=args.json))


def list_text(client, name: str) -> str:
  """The versions of `name`: state, aliases, gate verdict, where each is labelled; and each
  alias's agreement with the model config file it was last written to. Recovers interrupted
  moves first, so what it prints is a consistent state."""
  from mlops import registry_promote
  from mlops.registry_store import versions_of

  export_base = registry_promote.export_base_of(client, name)
  with registry_audit.locked(export_base):
    registry_promote.recover(client, export_base)
  aliases = dict(client.get_registered_model(name).aliases)
  config_labels = config_file_labels(export_base, name)
  lines = [f"{name} (versions in {export_base})", "version  state        gate   aliases"]
  for version in versions_of(client, name):
    number = int(version.version)
    named = sorted(a for a, v in aliases.items() if int(v) == number)
    state = version.tags.get("registry.state", "?")
    if state == "ready" and not os.path.isdir(version.source):
      state = "dir-missing"
    gate = version.tags.get("gate.verdict", "none")
    lines.append(f"{number:<8} {state:<12} {gate:<6} {', '.join(named) or '-'}")
  for path, labels in sorted(config_labels.items()):
    for label, version in sorted(labels.items()):
      agrees = "agrees" if str(aliases.get(label)) == str(version) else "DISAGREES with MLflow"
      lines.append(f"label {label}={version} in {path} ({agrees})")
  return "\n".join(lines)


def config_file_labels(export_base: str, name: str) -> dict[str, dict[str, int]]:
  """{model config file: the labels it gives `name` now}, over the files the audit log names."""
  files = {r.get("model_config_file") for r in registry_audit.read(export_base)}
  found = {}
  for path in sorted(p for p in files if p):
    text = registry_serving.read_text(path)
    if text is not None:
      found[path] = registry_serving.labels(text, path, name)
  return found


if __name__ == "__main__":
  from serving import native_logs

  # Only `register` (which exports) starts TensorFlow, so only it needs TensorFlow's start-up
  # lines filtered; the label moves, list and lineage speak TF Serving's protocol through
  # serving.api_protos and start in a few seconds.
  native_logs.quiet_native_logs(sys.argv, import_tensorflow="register" in sys.argv[1:2])
  main()
