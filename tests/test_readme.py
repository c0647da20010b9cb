"""Every ```python block of README.md runs as written, top to bottom, in one
interpreter namespace (as a reader pasting them in order would)."""

from __future__ import annotations

import pathlib
import re
import traceback

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[tuple[int, str]]:
  """``(first line number in README.md, source)`` of each python block."""
  return [(text.count("\n", 0, m.start(1)) + 1, m.group(1))
          for m in BLOCK.finditer(text)]


def test_python_blocks_are_found():
  blocks = python_blocks("x\n```python\na = 1\n```\n```bash\nls\n```\n"
                         "```python\nb = a\n```\n")
  assert blocks == [(3, "a = 1\n"), (9, "b = a\n")]


def test_every_python_block_of_the_readme_runs_in_order():
  blocks = python_blocks(README.read_text())
  assert len(blocks) >= 5
  namespace = {"__name__": "readme"}
  for number, (first_line, source) in enumerate(blocks, start=1):
    code = compile(source, f"README.md:block{number}", "exec")
    try:
      exec(code, namespace)  # pylint: disable=exec-used
    except Exception as err:  # pylint: disable=broad-except
      frames = [f for f in traceback.extract_tb(err.__traceback__)
                if f.filename == f"README.md:block{number}"]
      line = frames[-1].lineno if frames else 1
      raise AssertionError(
          f"README.md python block {number} fails at README line "
          f"{first_line + line - 1} (line {line} of the block): "
          f"{type(err).__name__}: {err}") from err
