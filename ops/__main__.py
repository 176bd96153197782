"""``python -m ops``: the operator CLI (ops/cli.py)."""
from __future__ import annotations

from ops.cli import main

main()
