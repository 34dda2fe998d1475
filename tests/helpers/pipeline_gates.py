"""A gate config for pipeline tests: the smoke gate without its served-latency checks (those
have their own tests, test_gate.py), with an accuracy floor of the test's choosing."""

FAST_GATE = (
  "from configs.gates import smoke\n"
  "def get_gate_config():\n"
  "  c = smoke.get_gate_config()\n"
  "  c.served.enabled = False  # The served path has its own tests (test_gate.py).\n"
  "  c.quality.floors = {'accuracy': FLOOR}\n"
  "  c.quality.max_class_regression = CLASS\n"
  "  return c\n"
)


def write_gate(path, floor: float, max_class_regression: float = 0.3) -> str:
  """Writes the fast gate with accuracy floor `floor` (and the smoke gate's per-class bound
  unless given) to `path` (a pathlib.Path); returns it as a string."""
  text = FAST_GATE.replace("FLOOR", str(floor))
  path.write_text(text.replace("CLASS", str(max_class_regression)))
  return str(path)
