"""An `/encode` request's one upload, decoded on its batch's thread right before the encode (`batcher.Deferred`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from service import imaging


@dataclass
class Upload:
    """One uploaded image, made the model's input (decoded, converted, resized: `imaging.prepare_upload`) when called, on
    the thread of the batch it joined. A batch's uploads are made `together`, one after another. An upload that cannot
    be made fails alone: its row in the batch is zeros, computed and dropped, and its request gets the error instead
    (`failure`: an `imaging.ImageError`, answered 422), while the batch's other requests get their rows."""

    image: Image.Image  # its header read by `imaging.open_upload`, which bounded its pixels
    shape: tuple[int, int, int]  # the model's input, (C, H, W)
    invert: bool | None
    digit: bool
    max_pixels: int
    _failure: Exception | None = field(default=None, init=False)

    def __len__(self) -> int:
        return 1

    def __call__(self) -> torch.Tensor:
        return torch.from_numpy(self._made()[None])

    @classmethod
    def together(cls, uploads: Sequence[Upload]) -> torch.Tensor:
        return torch.from_numpy(np.stack([upload._made() for upload in uploads]))

    def failure(self) -> Exception | None:
        """What making this upload raised, once it was made."""
        return self._failure

    def _made(self) -> np.ndarray:
        try:
            return imaging.prepare_upload(
                self.image, self.shape, max_pixels=self.max_pixels, invert=self.invert, digit=self.digit
            )
        except Exception as exc:  # the upload's own failure: its request's answer, not its batch's
            self._failure = exc
            return np.zeros(self.shape, dtype=np.float32)
