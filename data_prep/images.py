"""Cheap checks that a file is a decodable image, and conversion of odd images to RGB JPEG."""
import io
import warnings

from PIL import Image

JPEG_QUALITY = 95


def inspect_image(data, full_decode=False):
    """Return (problem, needs_conversion) for the encoded image `data`.

    `problem` is None for a usable image, else why it is not. `needs_conversion` is true for images a
    plain RGB-JPEG pipeline would trip on (CMYK or grayscale JPEGs, PNG data under a .JPEG name); PIL
    decodes them, so they are kept as they are unless the caller re-encodes them.

    Without `full_decode` a JPEG is checked structurally, which costs microseconds instead of a
    millisecond: PIL parses its headers, and the scan data must end in an EOI marker, which is what
    truncated and empty files lack. Other formats are fully decoded (rare in ImageNet).
    """
    if not data:
        return "empty file", False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image_format, mode = image.format, image.mode
                if full_decode or image_format != "JPEG":
                    image.load()
                elif not jpeg_scan_is_complete(data):
                    return "truncated JPEG (no end-of-image marker after the scan data)", False
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return f"not a decodable image: {error}", False
    return None, not (image_format == "JPEG" and mode == "RGB")


def jpeg_scan_is_complete(data):
    """True if the JPEG's marker segments lead to a scan and an EOI marker follows it.

    The walk skips the APPn segments, so the EOI of an embedded EXIF thumbnail cannot pass for the
    image's own. Inside entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so the
    bytes FF D9 after the first scan can only be the end-of-image marker.
    """
    if data[:2] != b"\xff\xd8":
        return False
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return False
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
        elif marker == 0xDA:  # start of scan
            return data.rfind(b"\xff\xd9", position) != -1
        elif 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length field
            position += 2
        else:
            position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
    return False


def to_rgb_jpeg(data, quality=JPEG_QUALITY):
    """Decode any image PIL reads and encode it as an RGB JPEG."""
    with Image.open(io.BytesIO(data)) as image:
        out = io.BytesIO()
        image.convert("RGB").save(out, format="JPEG", quality=quality)
        return out.getvalue()

