"""A fake of Forge Classic's `modules` (names as in tests/host/facts/classic.json): A1111's fake with Classic's
txt2img (no scheduler field) and script callbacks (no name keyword); the rest falls back to tests/host/fake_webui."""

import os

__path__.append(os.path.join(os.path.dirname(__file__), "..", "..", "fake_webui", "modules"))
