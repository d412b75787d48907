"""A fake of SD.Next's `modules` package (names as in tests/host/facts/sdnext.json).

Modules SD.Next shares with A1111 unchanged for the adapter (paths, call_queue) come from the fake A1111 next
door: this package's search path falls back to tests/host/fake_webui/modules.
"""

import os

__path__.append(os.path.join(os.path.dirname(__file__), "..", "..", "fake_webui", "modules"))
