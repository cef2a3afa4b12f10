"""Paper analyses composed from the library: each module has a Config, run(cfg) and plot(result).

``COMMANDS`` lists the analyses that the ``contrans`` command exposes as subcommands.
"""

from __future__ import annotations

COMMANDS: dict = {}
