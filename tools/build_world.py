"""Rebuild the shapes world's base model and evaluator (dreambooth/resources/world): python tools/build_world.py

The same as `python -m dreambooth.world.build`; `--quick` builds a few steps of each training only,
`--evaluator-only` retrains the evaluator from the base model already in the output folder.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreambooth.world.build import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
