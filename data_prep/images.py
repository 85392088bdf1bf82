"""Cheap checks that a file is a decodable image, conversion of odd images to RGB JPEG, and the
resizing of large ones (lg-shard --max-side)."""

import io
import warnings

from PIL import Image

JPEG_QUALITY = 95
RESIZED_QUALITY = 90  # lg-shard --max-side's default JPEG quality: FFCV's for its resized ImageNet
# Start-of-frame markers (they carry the number of colour components); C4, C8 and CC are not frames.
START_OF_FRAME = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def inspect_image(data, full_decode=False):
    """Return (problem, needs_conversion) for the encoded image `data`.

    `problem` is None for a usable image, else why it is not. `needs_conversion` is true for images a
    plain RGB-JPEG pipeline would trip on (CMYK or grayscale JPEGs, PNG data under a .JPEG name); they
    decode, so they are kept as they are unless the caller re-encodes them.

    A well-formed JPEG is accepted from its marker structure alone (`jpeg_structure`), in microseconds
    instead of the millisecond a decode takes. Anything else, including every JPEG the structure walk
    does not accept (truncated, oddly laid out), is fully decoded by PIL, which has the last word.
    """
    if not data:
        return "empty file", False
    if not full_decode and data[:2] == b"\xff\xd8":
        components, complete = jpeg_structure(data)
        if complete and components in (1, 3, 4):
            return None, components != 3
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return None, not (image.format == "JPEG" and image.mode == "RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return f"not a decodable image: {error}", False


def jpeg_structure(data):
    """(colour components, scan complete) of a JPEG, from its marker segments; (None, False) if malformed.

    The walk follows the segment lengths from the start-of-image marker to the first scan, so the EOI
    of an embedded EXIF thumbnail (inside an APP1 segment) cannot pass for the image's own. Inside
    entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so the bytes FF D9 after
    the first scan can only be the end-of-image marker, which a truncated file lacks.
    """
    position, components = 2, None
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None, False
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
        elif marker == 0xDA:  # start of scan
            return components, data.rfind(b"\xff\xd9", position) != -1
        elif 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length field
            position += 2
        else:
            if marker in START_OF_FRAME and position + 9 < len(data):
                components = data[position + 9]
            position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return None, False


def to_rgb_jpeg(data, quality=JPEG_QUALITY):
    """Decode any image PIL reads and encode it as an RGB JPEG."""
    with Image.open(io.BytesIO(data)) as image:
        out = io.BytesIO()
        image.convert("RGB").save(out, format="JPEG", quality=quality)
        return out.getvalue()


def limit_side(data, max_side, quality=RESIZED_QUALITY):
    """`data` re-encoded as an RGB JPEG whose longer side is `max_side` when it is longer than that
    (aspect ratio kept, Lanczos: an antialiased downscale), else None (keep the original bytes)."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if max(width, height) <= max_side:
            return None
        scale = max_side / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        out = io.BytesIO()
        image.convert("RGB").resize(size, Image.Resampling.LANCZOS).save(out, format="JPEG", quality=quality)
        return out.getvalue()
