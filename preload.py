"""Command-line flags of the extension, added by the web UI before it parses its arguments."""

from __future__ import annotations

import argparse
import os


def preload(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dreambooth-models-path", type=str, default=None,
                        help="Folder holding the DreamBooth extension's models (default: <models>/dreambooth).")
    parser.add_argument("--dreambooth-data-roots", type=str, default=None,
                        help="Folders (separated by '" + os.pathsep + "') the /dreambooth/ REST API may read "
                             "training images from and write class images into; default: any folder for "
                             "reading, only the models folder for writing.")
