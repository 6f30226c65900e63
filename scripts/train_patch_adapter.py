#!/usr/bin/env python3
"""The training command: train a patch adapter for your model (training/cli.py has the options).

    python scripts/train_patch_adapter.py --model files --unet flux1-dev.safetensors \
        --clip t5xxl_fp16.safetensors --clip clip_l.safetensors --prompts prompts.txt \
        --out models/elastic_tokens/flux_2p.safetensors --factors 2 --minutes 15

Imports the pack (this folder's parent) as the package ``elastic_tokens`` and runs
``elastic_tokens.training.cli.main``; works the same with ``torchrun``.
"""

import importlib.util
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "elastic_tokens"

if __name__ == "__main__":
    if PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_NAME, PACK_ROOT / "__init__.py",
                                                      submodule_search_locations=[str(PACK_ROOT)])
        sys.modules[PACK_NAME] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    from elastic_tokens.training.cli import main

    main()
