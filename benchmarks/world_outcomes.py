"""Print the measured outcomes (a)-(e) of training on the shapes world: python benchmarks/world_outcomes.py

The same as `python -m dreambooth.world.outcomes`; the tests in tests/world/test_world_outcomes.py hold the
same measures to their bounds.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreambooth.world.outcomes import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
