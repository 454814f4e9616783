"""Put the checkout that holds these scripts first on ``sys.path``, so that they measure its ``mugs``.

Without it a script imports whichever ``mugs`` is installed, and a before/after comparison that runs
the same script from two worktrees silently measures one tree twice. ``_common`` imports this before
it imports ``mugs``.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if sys.path[:1] != [str(ROOT)]:
    sys.path.insert(0, str(ROOT))
