"""What the training stack prints that tells a lora-farm user nothing, kept out of train.log and
the demo's output. Call ``quiet_library_noise()`` before torch, diffusers or transformers load."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_library_noise() -> None:
    """- torchao's optional C kernels (mxfp8, cutlass), built for another torch, and torch's note
      that torchao registers enums the old way (peft imports torchao wherever it is installed);
    - diffusers looking for torchao classes that 0.18 dropped, to unpickle torchao checkpoints;
    - transformers' image processors falling back to PIL without torchvision;
    - the download, load and save progress bars (``\\r`` lines in a log file; diffusers' own is
      turned off where the image trainer loads a model, ``trainers.image_model``);
    - deprecation notices the libraries trigger in each other (peft in transformers on every
      load, diffusers' Chroma transformer in diffusers)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer",
                 "transformers.utils.import_utils"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in (".*is_gradient_checkpointing.*", ".*`FluxPosEmbed` is deprecated.*"):
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
