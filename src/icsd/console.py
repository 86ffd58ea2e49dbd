"""A quiet console: icsd's own progress bars and closing lines stay, the libraries' chatter goes.

transformers, diffusers, huggingface_hub and sentence-transformers print warnings (torchvision
notices, deprecations), "Loading weights" and "Writing model shards" bars from their internals.
Set ``ICSD_VERBOSE=1`` to see them again.
"""

from __future__ import annotations

import logging
import os
import warnings

NOISY = ("transformers", "diffusers", "huggingface_hub", "sentence_transformers", "accelerate", "webdataset", "timm")


def quiet_libraries() -> None:
    """Silence library warnings and internal progress bars (unless ``ICSD_VERBOSE`` is set)."""
    if os.environ.get("ICSD_VERBOSE"):
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # huggingface_hub's switch; transformers and diffusers read it for their own tqdm bars too.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module=rf"{name}(\..*)?$")
    warnings.filterwarnings("ignore", message=r".*torchvision.*")
    warnings.filterwarnings("ignore", message=r".*TypedStorage is deprecated.*")
