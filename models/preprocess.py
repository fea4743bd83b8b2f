"""The pedestrian image transform every family uses: resize straight to the model's size, normalise."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


class PedestrianTransform:
    """PIL image -> normalised float tensor (3, height, width): resized straight to the model's size, no crop.

    Pedestrians fill the frame, so the image is resized (bicubic, Pillow's antialiasing) to the
    model's (height, width) without cropping. The output equals torchvision's
    ``Compose([Resize(size, BICUBIC), ToTensor(), Normalize(mean, std)])`` bit for bit; it skips
    the resize when the image already has the size, and does the conversion in a few tensor
    operations, because in ``tbps score`` this runs once per image in the decoding workers.

    Args:
        image_size: (height, width) of the model's input.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
    """

    def __init__(self, image_size: tuple[int, int], mean, std):
        self.height, self.width = int(image_size[0]), int(image_size[1])
        self.stats = ([float(v) for v in mean], [float(v) for v in std])  # as given: (mean, std) per channel
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, im: Image.Image) -> torch.Tensor:
        """One image, resized and normalised: a float32 tensor (3, height, width)."""
        return self.normalise(self.to_uint8(im))

    def to_uint8(self, im: Image.Image) -> torch.Tensor:
        """The part that needs the PIL image: converted to RGB and resized.

        Args:
            im: a PIL image of any mode and size.

        Returns:
            A uint8 tensor (3, height, width).
        """
        if im.mode != "RGB":
            im = im.convert("RGB")
        if im.size != (self.width, self.height):
            im = im.resize((self.width, self.height), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels to the model's input, where they are: the same values as image by image.

        Decoding workers send uint8 (a quarter of the bytes) and the batch is normalised in one
        vectorised pass on the model's device. The divisor is a tensor, not a Python number:
        CUDA turns division by a number into a multiplication by its reciprocal, one bit off.

        Args:
            pixels: uint8 (3, H, W) or a batch (N, 3, H, W), on any device.

        Returns:
            float32 pixels of the same shape, on the same device.
        """
        device = pixels.device
        scale = torch.full((), 255.0, device=device)
        return pixels.float().div_(scale).sub_(self.mean.to(device)).div_(self.std.to(device))

    def __repr__(self) -> str:
        return f"PedestrianTransform(size=({self.height}, {self.width}), bicubic, normalise)"
