"""tmuxi: the shared core of the tmux integration system.

Imported by the Lambda functions (``functions/``), the tmux host (``tmux_host/``) and the local stack
(``local/``). One copy of each piece of logic lives here.
"""
from __future__ import annotations

__version__ = "0.1.0"
