"""Fake SD.Next installer module: its version dict (git fills commit and updated; 'unknown' without git)."""

version = {"app": "sd.next", "updated": "2026-07-23", "commit": "058a7f0", "branch": "master", "url": "unknown",
           "kanvas": "unknown"}
