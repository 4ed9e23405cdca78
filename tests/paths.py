"""Where the tests find the repository's files, wherever a test module sits under tests/."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: examples/, src/, tests/
EXAMPLES = ROOT / "examples"
