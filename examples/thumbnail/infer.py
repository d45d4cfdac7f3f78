"""An image model with Pillow: a file in, a file out, numeric and choice options."""

from PIL import Image, ImageEnhance, ImageOps

import cog

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class Model(cog.Model):
    """Make a thumbnail: resize to a width, adjust the contrast, optionally in grayscale."""

    @cog.input("image", type=cog.Path, help="The image (any format Pillow reads)")
    @cog.input("width", type=int, default=64, min=8, max=1024, help="Width in pixels")
    @cog.input("contrast", type=float, default=1.0, min=0.0, max=3.0, help="1.0 keeps it")
    @cog.input(
        "resample",
        type=str,
        default="lanczos",
        options=["nearest", "bilinear", "bicubic", "lanczos"],
        help="Resampling filter",
    )
    @cog.input("grayscale", type=bool, default=False, help="Drop the colours")
    def run(self, image, width, contrast, resample, grayscale):
        with Image.open(image) as source:
            picture = ImageOps.exif_transpose(source).convert("RGB")
        height = max(1, round(picture.height * width / picture.width))
        picture = picture.resize((width, height), RESAMPLING[resample])
        if grayscale:
            picture = ImageOps.grayscale(picture)
        if contrast != 1.0:
            picture = ImageEnhance.Contrast(picture).enhance(contrast)
        # The request's temporary directory is removed after the response: no leftovers.
        output = image.with_name(f"{image.stem}-thumbnail.png")
        picture.save(output, format="PNG")
        return output
