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
    the thread of the batch it joined. A batch's uploads are made `together` (`imaging.prepare_uploads`: stage by stage,
    a batch of 8 digits in 70 us each against 120 one by one). An upload that cannot be made fails alone: its row in
    the batch is zeros, computed and dropped, and its request gets the error instead (`failure`: an
    `imaging.ImageError`, answered 422), while the batch's other requests get their rows."""

    image: Image.Image  # its header read by `imaging.open_upload`, which bounded its pixels
    shape: tuple[int, int, int]  # the model's input, (C, H, W)
    invert: bool | None
    digit: bool
    max_pixels: int
    _failure: Exception | None = field(default=None, init=False)

    def __len__(self) -> int:
        return 1

    def __call__(self) -> torch.Tensor:
        return self.together([self])

    @classmethod
    def together(cls, uploads: Sequence[Upload]) -> torch.Tensor:
        rows = np.empty((len(uploads), *uploads[0].shape), dtype=np.float32)
        # A request's `invert` is its own; a batch's requests almost always leave it to the border (None).
        for invert in {upload.invert for upload in uploads}:
            indices = [i for i, upload in enumerate(uploads) if upload.invert == invert]
            first = uploads[indices[0]]
            made = imaging.prepare_uploads(
                [uploads[i].image for i in indices], first.shape, max_pixels=first.max_pixels, invert=invert,
                digit=first.digit,
            )
            for i, array in zip(indices, made, strict=True):
                if isinstance(array, Exception):  # the upload's own failure: its request's answer, not its batch's
                    uploads[i]._failure = array
                    rows[i] = 0
                else:
                    rows[i] = array
        return torch.from_numpy(rows)

    def failure(self) -> Exception | None:
        """What making this upload raised, once it was made."""
        return self._failure
