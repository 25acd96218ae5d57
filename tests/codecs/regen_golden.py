"""Rewrite ``golden/<name>.json`` from the current encoders: only for an intended format change.

Usage: ``python tests/codecs/regen_golden.py [name ...]`` (default: every codec here).
"""

import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent


def _suites():
    for path in sorted(HERE.glob("test_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for value in vars(module).values():
            if isinstance(value, type) and value.__name__.startswith("Test"):
                if hasattr(value, "golden_document"):
                    yield value


if __name__ == "__main__":
    wanted = set(sys.argv[1:])
    for suite in _suites():
        if wanted and suite.name not in wanted:
            continue
        path = HERE / "golden" / f"{suite.name}.json"
        path.write_text(json.dumps(suite.golden_document(), indent=1) + "\n")
        print(f"wrote {path}")
