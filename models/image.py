"""Image preprocessing for the BLIP vision model: decode, RGB, bicubic resize, rescale, normalise.

Ported from transformers' BLIP image processor with its PIL backend (`BlipImageProcessorPil`,
models/blip/image_processing_pil_blip.py, and `image_transforms.convert_to_rgb`), which
reproduces LAVIS's `BlipImageEvalProcessor`, the preprocessing InstructBLIP was trained with:

    image (any Pillow mode, any size)
    -> RGB: transparency composited onto white       PIL, H x W x 3 uint8
    -> resize to size x size, bicubic (PIL)           no crop: the aspect ratio is not kept
    -> / 255, then (x - mean) / std per channel       (3, size, size) float32

Notes:
- The resize is Pillow's bicubic (antialiased when shrinking). transformers 5's default
  `BlipImageProcessor` resizes with torchvision tensors when torchvision is installed, which
  differs by up to a few grey levels; LAVIS resized PIL images, so Pillow is the reference here.
- Transparent pixels become white, as in transformers' `convert_to_rgb`. LAVIS's
  `Image.convert("RGB")` drops the alpha channel instead (whatever colour sits under it): the two
  agree on every image without transparency.
- mean/std are OpenAI CLIP's statistics, which BLIP-2/InstructBLIP reuse for EVA-CLIP.
- A 16-bit greyscale image (Pillow mode I;16, a 16-bit PNG) is scaled to 8 bits first. Pillow's
  convert("RGB"), which the references call, clips its 0..65535 values at 255 instead: a nearly
  white image, trained on without a word.
- An image over Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`) is a bad image
  like an undecodable one (ValueError), not an error that would stop a run mid-epoch.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, compositing any transparency (an alpha band, or a palette/greyscale transparency key)
    onto a white background, as transformers' convert_to_rgb; 16-bit greyscale scaled to 8 bits."""
    if image.mode.startswith("I;16"):  # I;16, I;16L, I;16B: the top byte of each 16-bit value
        image = Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8))  # (H, W) uint8: mode L
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")  # a no-op copy for RGB; L, P, CMYK ... go through Pillow


def load_image(path, name: str | None = None) -> Image.Image:
    """Decode an image file into an RGB PIL image; the error names the file. `path` may also be a
    binary file object holding a whole encoded image (the bytes of a dataset row or a tar member),
    which `name` then names in errors."""
    where = name if name is not None else ("bytes" if hasattr(path, "read") else path)
    try:
        with Image.open(path) as image:
            image.load()  # decode now, inside the try: Image.open reads only the header
            return to_rgb(image)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"no image file at {where}") from error
    except (UnidentifiedImageError, OSError) as error:  # not an image, or a truncated/corrupt one
        raise ValueError(f"cannot decode the image {where}: {error}") from error
    except Image.DecompressionBombError as error:  # not an OSError: it would stop a run mid-epoch
        raise ValueError(f"the image {where} is too large to decode safely ({error}); resize it, or raise "
                         "PIL.Image.MAX_IMAGE_PIXELS if it is trusted") from error


def preprocess_images(
    images: list,
    size: int,
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
    std: tuple[float, float, float] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """Paths or PIL images -> pixel_values (B, 3, size, size) float32 for BlipVisionModel
    (size = its config.image_size)."""
    if not images:
        raise ValueError("preprocess_images needs at least one image")
    batch = []
    for image in images:
        if isinstance(image, (str, Path)):
            image = load_image(image)
        elif isinstance(image, Image.Image):
            image = to_rgb(image)
        else:
            raise TypeError(f"preprocess_images takes paths or PIL images, got a {type(image).__name__}")
        # PIL sizes are (width, height); BICUBIC is BlipImageProcessor's resample=3
        image = image.resize((size, size), resample=Image.BICUBIC)
        batch.append(torch.from_numpy(np.array(image)))  # (size, size, 3) uint8
    pixels = torch.stack(batch).permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)
    # / 255 in float64 then float32, as the reference's rescale: the same float32 values
    pixels = (pixels.double() * (1 / 255)).float()
    mean = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]  # (3,) -> (1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32)[None, :, None, None]
    return (pixels - mean) / std
