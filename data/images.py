"""Decoding one image file into RGB, with a status instead of an exception for bad files.

:func:`open_image` reads the file's bytes once, hashes them (blake2b, 16-byte digest, hex:
the ``image_hash`` column used for exact de-duplication) and decodes them fully, so a file
that is truncated half-way fails here and not later inside a model's batch.

Outcomes (statuses from :mod:`tbps.columns`):

=========================  ============================================================
``ok``                     decoded; ``image`` is an RGB ``PIL.Image``
``missing-image``          no file at the path
``empty-file``             the file has zero bytes
``bad-image``              not an image, truncated, unreadable, a directory, a FIFO, a
                           device, a pseudo-file (``/proc``), or above the size cap
``decompression-bomb``     more pixels than the limit (see below); never decoded
``path-outside-root``      at the moment it was opened, the path no longer named the file
                           the image root check accepted (a symlink swapped in after the
                           dataset was read), or it lies outside the ``root`` given
=========================  ============================================================

Opening (checked on the open descriptor, so what is checked is what is read): the file is
opened with ``O_NOFOLLOW | O_NONBLOCK`` (a symlink as the last component is refused, a FIFO
never blocks), and the descriptor's real path (``/proc/self/fd/N``) must equal the path given:
image paths reach this function already resolved, symlink-free, inside their image root
(:class:`tbps.data.paths.ImageResolver`), so a path that now goes through a symlink at any level
was changed after the check and is refused, never followed out of the root. With ``root`` the
path must also lie inside that directory. Only regular files of at most
:data:`MAX_IMAGE_BYTES` are read, and at most their ``st_size`` bytes (a pseudo-file that
reports size 0 but yields bytes is refused).

A member of a webdataset tar shard is read the same way (:mod:`tbps.data.shards`): its image
path is the tar's path and the member's name (``/data/pool/00003.tar/KEY.jpg``); the tar is
opened and checked as an image file is, and the member's bytes are read at the offset its index
gives. A member the tar does not hold is ``missing-image``; one cut off by a truncated tar, or
above the size cap, is ``bad-image``.

Colour modes are converted, not rejected:

- RGBA, LA, PA and palette images with a transparent colour are composited on **white**
  (a transparent background reads as an empty background rather than black);
- CMYK, YCbCr, LAB, HSV, 1-bit, greyscale and opaque palette images: Pillow's ``convert("RGB")``;
- 16-bit (``I;16*``) and 32-bit integer/float greyscale (``I``, ``F``): scaled to 8 bits by
  the range the values actually use, then greyscale to RGB. The bit depth is the smallest of
  8, 10, 12, 14 and 16 bits that holds the largest value, and the values are divided by
  ``(2**bits - 1) / 255``: a 16-bit file whose values lie in 0-255 is kept as it is (dividing by
  257 made it black), a 12-bit one (0-4095) is divided by about 16, a full 16-bit one by 257;
  larger values are clipped at 16 bits, negative ones at 0, and a float image within 0-1 is
  multiplied by 255. Pillow's plain ``convert`` clips instead, which turns most 16-bit images
  white.

Multi-frame files (GIF, TIFF) give their first frame. EXIF orientation is not applied.

Decompression bombs: with ``max_pixels=None`` the limit is Pillow's own
``PIL.Image.MAX_IMAGE_PIXELS`` (read, never changed), and Pillow's
``DecompressionBombWarning`` is turned into a refusal inside this call only, so anything
above the limit (not only above twice the limit, where Pillow itself raises) is refused.
With ``max_pixels`` given, the header's width x height is compared with it before any pixel
is decoded. tbps never sets ``ImageFile.LOAD_TRUNCATED_IMAGES``; if other code in the same
process does, Pillow pads truncated files and they are not detected.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tbps.columns import (
    STATUS_BAD_IMAGE,
    STATUS_DECOMPRESSION_BOMB,
    STATUS_EMPTY_FILE,
    STATUS_MISSING_IMAGE,
    STATUS_OK,
    STATUS_PATH_OUTSIDE_ROOT,
)
from tbps.data.shards import members_of, split_member
from tbps.files import content_hash

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WIDE_GREY = {"I", "F"}


@dataclass(frozen=True)
class ImageResult:
    """What :func:`open_image` found.

    Attributes:
        image: the decoded RGB image, or ``None`` when the status is not ``ok``.
        status: ``ok`` or a ``STATUS_*`` kind from :mod:`tbps.columns`.
        error: the reason when the status is not ``ok``, else ``None``.
        image_hash: blake2b-128 hex digest of the file's bytes; ``None`` when the file
            could not be read.
    """

    image: Image.Image | None
    status: str
    error: str | None
    image_hash: str | None

    @property
    def ok(self) -> bool:
        """Whether the image decoded."""
        return self.status == STATUS_OK


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB (see the module docstring for the rules)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in _WIDE_GREY:
        grey = np.clip(np.rint(_wide_to_8bit(np.asarray(im, dtype=np.float64), mode)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return im.convert("RGB")


# Bit depths a wide greyscale image is taken to have: the smallest that holds its largest value.
_DEPTHS = (8, 10, 12, 14, 16)


def _wide_to_8bit(arr: np.ndarray, mode: str) -> np.ndarray:
    """A 16/32-bit or float greyscale array scaled into 0-255 by the range it uses (module docstring)."""
    arr = np.nan_to_num(arr, nan=0.0, posinf=65535.0, neginf=0.0).clip(0, 65535)
    top = float(arr.max()) if arr.size else 0.0
    if mode == "F" and top <= 1.0:
        return arr * 255.0  # a float image in 0-1
    bits = next((b for b in _DEPTHS if top <= 2**b - 1), 16)
    return arr / ((2**bits - 1) / 255.0)


# The largest image file read: a bigger file is refused before a byte of it is read (a 1.5 GB
# junk ".jpg" cost 2.1 GB of memory before its decoder gave up). Photographs are far smaller.
MAX_IMAGE_BYTES = 128 << 20


class _NotAnImageFile(Exception):
    """The path names something that must not be read as an image (a FIFO, a device, a huge file)."""


class _NoMember(Exception):
    """A tar shard holds no member of the name a shard member's path gives."""


class _Escaped(Exception):
    """The opened file is not the one the path was checked to name (a symlink), or lies outside the root."""


_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_NOFOLLOW", 0)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root if root.endswith("/") else root + "/")


def _opened_path(fd: int, expected: str) -> str:
    """The real path of an open descriptor (``/proc/self/fd``; elsewhere the path, when its inode matches)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc: the path counts when it is symlink-free and names the opened inode
        st, real = os.fstat(fd), os.path.realpath(expected)
        try:
            there = os.stat(real)
        except OSError:
            return real + " (not found again)"
        return real if (there.st_dev, there.st_ino) == (st.st_dev, st.st_ino) else real + " (another file)"


def _open_checked(path: str, root: str | None) -> int:
    """A descriptor of the regular file at ``path``, opened without following a link and checked on the descriptor.

    Its real path must be the path given (and inside ``root``) and its type a regular file; the
    descriptor is closed when a check fails.
    """
    expected = os.path.abspath(path)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP and os.path.islink(path):
            raise _Escaped(f"is a symlink (to {os.readlink(path)}); image files are opened without following links") from None
        raise
    try:
        real = _opened_path(fd, expected)
        if real != expected:
            raise _Escaped(f"leads through a symlink to {real}; image paths are opened only as resolved inside the image root")
        if root is not None and not _inside(real, root):
            raise _Escaped(f"is outside the image root {root}")
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(st.st_mode):
            raise _NotAnImageFile("not a regular file (a FIFO, socket or device)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_member(tar: str, name: str, root: str | None) -> bytes:
    """The bytes of image member ``name`` of the tar shard ``tar``: one ``pread`` at its indexed offset.

    The tar is opened and checked as an image file is (no link followed, inside ``root``, a
    regular file); the member must be a regular image member of at most :data:`MAX_IMAGE_BYTES`
    whose bytes lie inside the file (a truncated tar cuts its last member off).
    """
    fd = _open_checked(tar, root)
    try:
        where = members_of(fd).get(name)
        if where is None:
            raise _NoMember(f"{tar} holds no member {name!r}")
        offset, size = where
        if size > MAX_IMAGE_BYTES:
            raise _NotAnImageFile(f"{size:,} bytes, above the {MAX_IMAGE_BYTES:,}-byte limit of an image file")
        data = os.pread(fd, size, offset)
        if len(data) < size:
            raise _NotAnImageFile(f"cut off: the tar ends {size - len(data):,} bytes before the end of the member (a truncated tar)")
        return data
    finally:
        os.close(fd)


def _read_regular_file(path: str, root: str | None = None) -> bytes:
    """The bytes of a regular file of at most :data:`MAX_IMAGE_BYTES`, opened without following a link.

    Opened without blocking (a FIFO would wait for a writer forever) and checked on the open
    descriptor, so what is checked is what is read: its real path must be the path given (and
    inside ``root``), its type a regular file, its size under the cap; at most ``st_size`` bytes
    are read.
    """
    try:
        fd = _open_checked(path, root)
    except NotADirectoryError:
        member = split_member(path)
        if member is None:
            raise
        return _read_member(*member, root)
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if st.st_size > MAX_IMAGE_BYTES:
            raise _NotAnImageFile(f"{st.st_size:,} bytes, above the {MAX_IMAGE_BYTES:,}-byte limit of an image file")
        data = fh.read(st.st_size + 1)
        if len(data) > st.st_size:
            raise _NotAnImageFile(f"yields more bytes than its size of {st.st_size:,} (a pseudo-file, or a file being written)")
        return data


def _bad(status: str, error: str, image_hash: str | None = None) -> ImageResult:
    return ImageResult(image=None, status=status, error=error, image_hash=image_hash)


def open_image(path: str | None, max_pixels: int | None = None, *, root: str | None = None) -> ImageResult:
    """Read, hash and fully decode one image file into RGB; never raises for a bad file.

    Args:
        path: the image path as resolved by :class:`tbps.data.paths.ImageResolver` (absolute,
            symlink-free); a path that goes through a symlink when it is opened is refused.
        max_pixels: refuse images with more pixels (width x height) than this, as
            ``decompression-bomb``; ``None`` uses Pillow's ``MAX_IMAGE_PIXELS``.
        root: the image root the opened file must lie in (its real path), or ``None``.

    Returns:
        An :class:`ImageResult` with the RGB image or the status and reason.

    Raises:
        ValueError: ``max_pixels`` is not a positive integer (a programming error, not a
            bad file).
    """
    if max_pixels is not None and (not isinstance(max_pixels, int) or max_pixels <= 0):
        raise ValueError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
    if path is None:
        return _bad(STATUS_MISSING_IMAGE, "no image path")
    try:
        data = _read_regular_file(path, None if root is None else os.path.realpath(root))
    except FileNotFoundError:
        return _bad(STATUS_MISSING_IMAGE, f"{path}: no such file")
    except _NoMember as exc:
        return _bad(STATUS_MISSING_IMAGE, f"{path}: {exc}")
    except _Escaped as exc:
        return _bad(STATUS_PATH_OUTSIDE_ROOT, f"{path}: {exc}")
    except IsADirectoryError:
        return _bad(STATUS_BAD_IMAGE, f"{path}: is a directory, not an image file")
    except _NotAnImageFile as exc:
        return _bad(STATUS_BAD_IMAGE, f"{path}: {exc}")
    except (OSError, ValueError) as exc:  # ValueError: a path with a NUL byte
        return _bad(STATUS_BAD_IMAGE, f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})")
    image_hash = content_hash(data)
    if not data:
        return _bad(STATUS_EMPTY_FILE, f"{path}: the file is empty (0 bytes)", image_hash)
    try:
        with warnings.catch_warnings():
            # Pillow warns between MAX_IMAGE_PIXELS and twice that; here the warning refuses.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if max_pixels is not None:
                pixels = max(1, im.size[0]) * max(1, im.size[1])
                if pixels > max_pixels:
                    return _bad(
                        STATUS_DECOMPRESSION_BOMB,
                        f"{path}: {im.size[0]}x{im.size[1]} = {pixels} pixels exceeds the limit of {max_pixels}",
                        image_hash,
                    )
            im.load()  # decode every pixel now, so truncation is caught here
            rgb = _to_rgb(im)
            rgb.load()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        return _bad(STATUS_DECOMPRESSION_BOMB, f"{path}: {exc}", image_hash)
    except Image.UnidentifiedImageError:
        return _bad(STATUS_BAD_IMAGE, f"{path}: not an image Pillow can identify", image_hash)
    except Exception as exc:  # noqa: BLE001 -- any decoder failure is a bad file, never a crash
        return _bad(STATUS_BAD_IMAGE, f"{path}: cannot be decoded ({type(exc).__name__}: {exc})", image_hash)
    return ImageResult(image=rgb, status=STATUS_OK, error=None, image_hash=image_hash)
