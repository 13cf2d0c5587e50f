"""Image folders as calibration/evaluation data: `Preprocess` and the "images" reader.

A folder either holds image files directly (no labels) or one sub-folder per class (label = index of the
class folder in sorted order). Files are listed up front, but decoded one batch at a time, so a folder of
any size never holds more than one batch of decoded images in memory.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from onnxmpq.errors import OnnxmpqError
from onnxmpq.types import Batch, InputSpec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DECODERS = ("JPEG", "PNG", "BMP", "WEBP")  # the Pillow plugins tried, whatever a file's name says
MAX_PIXELS = 64 * 2 ** 20                   # 67 MP: larger than a 48 MP camera frame
METADATA_KEY = "onnxmpq.preprocess"
_CHOICES = {
    "resize": ("stretch", "shorter", "none"),
    "crop": ("center", "none"),
    "layout": ("NCHW", "NHWC"),
    "channel_order": ("RGB", "BGR", "L"),
}


def _field_error(name: str, problem: str) -> OnnxmpqError:
    return OnnxmpqError(
        f"Preprocess.{name} {problem}.",
        f"fix the {name!r} field (in code, or in the model metadata key {METADATA_KEY!r}).",
    )


def _floats(name: str, values: object) -> tuple[float, ...]:
    """Coerces a number or a sequence of numbers to a non-empty tuple of finite floats."""
    seq = values if isinstance(values, (list, tuple)) else (values,)
    try:
        out = tuple(float(v) for v in seq)
    except (TypeError, ValueError):
        raise _field_error(name, f"must be a number or a list of numbers, got {values!r}") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise _field_error(name, f"must be a non-empty list of finite numbers, got {values!r}")
    return out


@dataclass(frozen=True)
class Preprocess:
    """How image files become model input tensors.

    Steps, in order: decode and convert to `channel_order`; resize and crop to `size`; then, for float
    model inputs, `(pixel * scale - mean) / std` per channel; finally transpose to `layout` and cast to
    the model input's dtype. Integer model inputs (e.g. uint8) get the raw pixel values: scale, mean and
    std are not applied to them.

    Attributes:
        size: target (height, width); None takes it from the model input's static spatial dims.
        resize: "stretch" resizes to `size` ignoring the aspect ratio; "shorter" scales (keeping the
            aspect ratio) so that the image covers `size`, i.e. its shorter side matches, then crops;
            "none" keeps the decoded size (then `crop` may cut `size` out of a larger image).
            Resampling is bilinear; an image already of the target size is left untouched.
        crop: "center" cuts a `size` window out of the middle (offsets rounded down); "none" requires
            the image to have exactly `size` after resizing. Ignored with resize="stretch".
        scale: pixel values (0..255) are multiplied by it before mean/std; must be > 0.
        mean: per-channel mean subtracted after scaling; one value or one per channel.
        std: per-channel divisor applied after the mean; one value or one per channel; all > 0.
        layout: "NCHW" (channels first) or "NHWC" (channels last).
        channel_order: "RGB", "BGR" or "L" (grayscale, one channel). With "L", mean/std may be given
            as three equal values (the defaults), which count as one.
    """

    size: tuple[int, int] | None = None
    resize: str = "stretch"
    crop: str = "center"
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    layout: str = "NCHW"
    channel_order: str = "RGB"

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                listed = ", ".join(repr(a) for a in allowed)
                raise _field_error(name, f"must be one of {listed}, got {value!r}")
        self._check_size()
        scale = _floats("scale", self.scale)
        if len(scale) != 1 or scale[0] <= 0:
            raise _field_error("scale", f"must be one number > 0, got {self.scale!r}")
        object.__setattr__(self, "scale", scale[0])
        for name in ("mean", "std"):
            object.__setattr__(self, name, self._channel_values(name))
        if any(s <= 0 for s in self.std):
            raise _field_error("std", f"must be > 0 for every channel, got {self.std!r}")

    def _check_size(self) -> None:
        if self.size is None:
            return
        size = self.size
        ok = isinstance(size, (list, tuple)) and len(size) == 2
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
        if not ok:
            raise _field_error("size", f"must be None or (height, width) with two integers > 0, got {size!r}")
        object.__setattr__(self, "size", (int(size[0]), int(size[1])))

    def _channel_values(self, name: str) -> tuple[float, ...]:
        values = _floats(name, getattr(self, name))
        channels = self.channels
        if channels == 1 and len(values) > 1 and len(set(values)) == 1:
            values = values[:1]
        if len(values) not in (1, channels):
            raise _field_error(
                name, f"needs 1 or {channels} values for channel_order {self.channel_order!r}, got {len(values)}"
            )
        return values

    @property
    def channels(self) -> int:
        """Number of channels the decoded images have: 1 for "L", else 3."""
        return 1 if self.channel_order == "L" else 3

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> Preprocess | None:
        """Reads the preprocessing stored in the model metadata under "onnxmpq.preprocess".

        Args:
            metadata: the model's metadata_props as a mapping.

        Returns:
            The Preprocess the JSON object describes (same field names, lists for tuples), or None when
            the key is absent.

        Raises:
            OnnxmpqError: the value is not a JSON object, has unknown keys, or a field is invalid.
        """
        raw = metadata.get(METADATA_KEY)
        if raw is None:
            return None
        hint = 'store a JSON object such as {"size": [224, 224], "mean": [0.485, 0.456, 0.406]}.'
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise OnnxmpqError(f"model metadata {METADATA_KEY!r} is not valid JSON: {exc}.", hint) from None
        if not isinstance(data, dict):
            raise OnnxmpqError(f"model metadata {METADATA_KEY!r} must be a JSON object, got {raw!r}.", hint)
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise OnnxmpqError(
                f"model metadata {METADATA_KEY!r} has unknown field(s) {', '.join(unknown)}.",
                f"use only: {', '.join(known)}.",
            )
        return cls(**data)


def _fail(path: Path, problem: str, hint: str) -> OnnxmpqError:
    return OnnxmpqError(f"image {str(path)!r} {problem}.", hint)


def _decode(path: Path, mode: str) -> Image.Image:
    """Opens one image file with the DECODERS plugins only and converts it to `mode` ("RGB" or "L").

    Pillow would otherwise try every plugin it has, some of which shell out (EPS goes to Ghostscript);
    an image whose header claims more than MAX_PIXELS pixels is refused before its pixels are decoded,
    and a PNG text chunk that inflates past Pillow's MAX_TEXT_CHUNK is refused by Pillow (ValueError).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=DECODERS) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise _fail(path, f"claims {image.width}x{image.height} pixels, more than onnxmpq decodes "
                                f"({MAX_PIXELS:,})", "downscale the image or remove it.")
                return image.convert(mode)
    except UnidentifiedImageError:
        raise _fail(path, "is not a JPEG, PNG, BMP or WebP image (the only formats onnxmpq decodes)",
                    "convert it to PNG or JPEG, or remove it from the folder.") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _fail(path, f"is too large to decode ({exc})", "downscale the image or remove it.") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise _fail(path, f"cannot be decoded ({type(exc).__name__}: {exc})",
                    "remove or replace the broken file.") from None


def _center_crop(image: Image.Image, size: tuple[int, int], path: Path) -> Image.Image:
    height, width = size
    if image.width < width or image.height < height:
        raise _fail(
            path,
            f"is {image.height}x{image.width}, smaller than the {height}x{width} crop",
            "use resize='stretch' or 'shorter', or a smaller size.",
        )
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def _resize(image: Image.Image, pre: Preprocess, size: tuple[int, int], path: Path) -> Image.Image:
    """Applies `pre.resize` and `pre.crop` so that the image becomes `size` = (height, width)."""
    height, width = size
    if pre.resize == "stretch" and image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    elif pre.resize == "shorter":
        factor = max(height / image.height, width / image.width)
        new = (max(width, round(image.width * factor)), max(height, round(image.height * factor)))
        if new != image.size:
            image = image.resize(new, Image.Resampling.BILINEAR)
    if pre.crop == "center" and image.size != (width, height):
        image = _center_crop(image, size, path)
    if image.size != (width, height):
        raise _fail(
            path,
            f"is {image.height}x{image.width} after resize={pre.resize!r}, crop={pre.crop!r}; "
            f"expected {height}x{width}",
            "use crop='center' or resize='stretch'.",
        )
    return image


def load_image(path: Path, pre: Preprocess, size: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """Decodes and preprocesses one image into a (C, H, W) or (H, W, C) array of `dtype`.

    Args:
        path: the image file.
        pre: the preprocessing to apply.
        size: target (height, width).
        dtype: the model input's dtype; float dtypes get scale/mean/std, integer dtypes raw pixels.

    Returns:
        One sample, without the batch axis.
    """
    image = _resize(_decode(path, "L" if pre.channel_order == "L" else "RGB"), pre, size, path)
    pixels = np.asarray(image, dtype=np.float64)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pre.channel_order == "BGR":
        pixels = pixels[:, :, ::-1]
    if np.issubdtype(dtype, np.floating):
        pixels = (pixels * pre.scale - np.asarray(pre.mean)) / np.asarray(pre.std)
    if pre.layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels, dtype=dtype)


def _list_images(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def has_images(root: Path) -> bool:
    """True when `root` holds image files directly or in its immediate sub-folders."""
    return bool(_list_images(root)) or any(_list_images(d) for d in _class_folders(root))


def _take_balanced(per_class: Sequence[Sequence[Path]], limit: int | None) -> list[int]:
    """How many files to take from each class so that `limit` is spread round-robin over the classes."""
    if limit is None:
        return [len(files) for files in per_class]
    take, left = [0] * len(per_class), limit
    while left > 0:
        before = left
        for c, files in enumerate(per_class):
            if left > 0 and take[c] < len(files):
                take[c] += 1
                left -= 1
        if left == before:
            break
    return take


def _image_spec(inputs: Sequence[InputSpec], root: Path) -> InputSpec:
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        found = ", ".join(f"{s.name} (rank {len(s.shape)})" for s in inputs)
        raise OnnxmpqError(
            f"image folder {str(root)!r} needs a model with exactly one rank-4 input; the model has: {found}.",
            "for other models save the inputs as .npz (one array per input name).",
        )
    return inputs[0]


def _target_size(spec: InputSpec, pre: Preprocess) -> tuple[int, int]:
    """Checks the channel dim of `spec` against `pre` and returns the target (height, width)."""
    shape = tuple(spec.shape)
    channel_axis, spatial = (1, shape[2:4]) if pre.layout == "NCHW" else (3, shape[1:3])
    channels = shape[channel_axis]
    if channels is not None and channels != pre.channels:
        other = shape[3] if pre.layout == "NCHW" else shape[1]
        hint = "set layout='NHWC'." if pre.layout == "NCHW" and other == pre.channels else (
            "set layout='NCHW'." if other == pre.channels else "set channel_order ('L' = 1 channel, else 3)."
        )
        raise OnnxmpqError(
            f"model input {spec.name!r} with shape {shape} has {channels} channels in {pre.layout} layout, "
            f"but channel_order {pre.channel_order!r} gives {pre.channels}.",
            hint,
        )
    if pre.size is not None:
        return pre.size
    height, width = spatial
    if height is None or width is None:
        raise OnnxmpqError(
            f"model input {spec.name!r} has dynamic spatial dims {shape}, so the image size is unknown.",
            "set Preprocess.size=(height, width).",
        )
    return (int(height), int(width))


@dataclass(frozen=True)
class ImageFolderReader:
    """Streams an image folder as batches of one rank-4 model input (plus labels with class folders).

    Attributes:
        root: the folder.
        files: the image files to read, in order (class folders sorted, then files sorted).
        labels: class index per file, or None when the images sit directly in `root`.
        classes: class folder names in label order (empty without class folders).
        spec: the model input the images feed.
        preprocess: how files become tensors.
        size: the target (height, width).
    """

    root: Path
    files: tuple[Path, ...]
    labels: tuple[int, ...] | None
    classes: tuple[str, ...]
    spec: InputSpec
    preprocess: Preprocess
    size: tuple[int, int]

    @classmethod
    def open(cls, source: Path, inputs: Sequence[InputSpec], *, limit: int | None = None,
             preprocess: Preprocess | None = None, labels_key: str = "labels") -> ImageFolderReader:
        """Lists the images of `source`; with `limit`, spreads the samples evenly over the classes."""
        root = Path(source)
        if not root.is_dir():
            raise OnnxmpqError(f"image folder {str(root)!r} does not exist or is not a folder.",
                               "pass a folder of images, or one with a sub-folder per class.")
        spec, pre = _image_spec(inputs, root), preprocess or Preprocess()
        size = _target_size(spec, pre)
        direct, folders = _list_images(root), _class_folders(root)
        per_class = [_list_images(d) for d in folders]
        if direct and any(per_class):
            raise OnnxmpqError(f"image folder {str(root)!r} has images both directly inside and in sub-folders.",
                               "keep either one sub-folder per class, or all images directly in the folder.")
        if not direct and not any(per_class):
            raise OnnxmpqError(
                f"image folder {str(root)!r} has no image files ({', '.join(IMAGE_SUFFIXES)}), "
                "neither directly nor in sub-folders.", "point to a folder that holds images.")
        files: tuple[Path, ...]
        labels: tuple[int, ...] | None
        classes: tuple[str, ...]
        if direct:
            files, labels, classes = tuple(direct[:limit]), None, ()
        else:
            take = _take_balanced(per_class, limit)
            files = tuple(f for c, fs in enumerate(per_class) for f in fs[: take[c]])
            labels = tuple(c for c, n in enumerate(take) for _ in range(n))
            classes = tuple(d.name for d in folders)
        return cls(root, files, labels, classes, spec, pre, size)

    def __len__(self) -> int:
        return len(self.files)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Yields batches of `batch_size` images, decoding each batch only when it is requested."""
        dtype = np.dtype(self.spec.dtype)
        for start in range(0, len(self.files), batch_size):
            chunk = self.files[start : start + batch_size]
            arrays = np.stack([load_image(p, self.preprocess, self.size, dtype) for p in chunk])
            labels = None
            if self.labels is not None:
                labels = np.asarray(self.labels[start : start + batch_size], dtype=np.int64)
            yield Batch({self.spec.name: arrays}, labels)
