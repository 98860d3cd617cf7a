"""cxr.images.decode on real files written with Pillow: every mode, EXIF rotation, pad/crop, bad input."""
import numpy as np
import pytest
from PIL import Image

from cxr.images import DecodeError, decode, square

ORIENTATION = 0x0112


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def _uniform(mode, size, color):
    return Image.new(mode, size, color)


# --- modes ---------------------------------------------------------------------------------------

def test_mode_L_keeps_values(tmp_path):
    arr = np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)
    p = _save(Image.fromarray(arr, "L"), tmp_path / "l.png")
    out = decode(p, 32)
    assert out.dtype == np.uint8 and out.shape == (32, 32)
    np.testing.assert_array_equal(out, arr)


def test_mode_LA_transparent_pixels_become_black(tmp_path):
    img = Image.new("LA", (32, 32), (200, 255))
    img.paste((200, 0), (16, 0, 32, 32))          # right half fully transparent
    out = decode(_save(img, tmp_path / "la.png"), 32)
    assert (out[:, :16] == 200).all()
    assert (out[:, 16:] == 0).all()


def test_mode_RGB_luminance(tmp_path):
    img = Image.new("RGB", (32, 32), (255, 0, 0))
    img.paste((0, 0, 255), (0, 16, 32, 32))
    out = decode(_save(img, tmp_path / "rgb.png"), 32)
    # ITU-R 601-2 luma: 0.299 R + 0.587 G + 0.114 B
    assert abs(int(out[0, 0]) - 76) <= 1
    assert abs(int(out[31, 0]) - 29) <= 1


def test_mode_RGBA_transparent_pixels_become_black(tmp_path):
    img = Image.new("RGBA", (32, 32), (255, 255, 255, 255))
    img.paste((255, 255, 255, 0), (0, 0, 32, 16))   # top half transparent white
    out = decode(_save(img, tmp_path / "rgba.png"), 32)
    assert (out[:16] == 0).all()
    assert (out[16:] == 255).all()


def test_mode_P_without_transparency(tmp_path):
    img = Image.new("P", (32, 32), 0)
    img.putpalette([0, 0, 0, 255, 255, 255, 128, 128, 128] + [0] * (256 * 3 - 9))
    img.paste(1, (0, 0, 16, 32))
    img.paste(2, (16, 0, 32, 32))
    p = _save(img, tmp_path / "p.png")
    with Image.open(p) as check:
        assert check.mode == "P" and "transparency" not in check.info
    out = decode(p, 32)
    assert (out[:, :16] == 255).all()
    assert (out[:, 16:] == 128).all()


def test_mode_P_with_transparency(tmp_path):
    img = Image.new("P", (32, 32), 1)
    img.putpalette([255, 255, 255, 200, 200, 200] + [0] * (256 * 3 - 6))
    img.paste(0, (0, 0, 32, 8))                    # index 0 (white) is the transparent one
    p = _save(img, tmp_path / "pt.png", transparency=0)
    with Image.open(p) as check:
        assert check.mode == "P" and "transparency" in check.info
    out = decode(p, 32)
    assert (out[:8] == 0).all(), "transparent palette entry must become black, not white"
    assert (out[8:] == 200).all()


def test_16bit_png_is_stretched_to_full_range(tmp_path):
    # values 1000..3000: convert('L') would saturate these to 255 (or squash them to ~4..12)
    ramp = np.linspace(1000, 3000, 64 * 64).reshape(64, 64).astype(np.uint16)
    p = _save(Image.fromarray(ramp), tmp_path / "i16.png")
    with Image.open(p) as check:
        assert check.mode.startswith("I;16")
    out = decode(p, 64)
    assert out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255
    assert len(np.unique(out)) > 200
    assert (np.diff(out.astype(int).ravel()) >= 0).all(), "ordering of intensities must be preserved"


def test_16bit_constant_image_is_black_not_an_error(tmp_path):
    p = _save(Image.fromarray(np.full((16, 16), 4000, np.uint16)), tmp_path / "flat16.png")
    out = decode(p, 16)
    assert out.shape == (16, 16) and out.dtype == np.uint8


def test_cmyk_jpeg(tmp_path):
    img = Image.new("CMYK", (32, 32), (0, 0, 0, 0))         # white
    img.paste((0, 0, 0, 255), (0, 0, 32, 16))              # black top half
    p = _save(img, tmp_path / "cmyk.jpg", quality=95)
    with Image.open(p) as check:
        assert check.mode == "CMYK"
    out = decode(p, 32)
    assert out[:12].mean() < 20
    assert out[20:].mean() > 235


# --- EXIF orientation ----------------------------------------------------------------------------

def _marker_jpeg(path, orientation=None):
    """80 wide x 40 tall, black, with a bright 10x10 marker in the top-left corner."""
    arr = np.zeros((40, 80), np.uint8)
    arr[:10, :10] = 255
    img = Image.fromarray(arr, "L")
    kw = {"quality": 95}
    if orientation is not None:
        exif = img.getexif()
        exif[ORIENTATION] = orientation
        kw["exif"] = exif.tobytes()
    img.save(path, **kw)
    return path


def _bright_block(out, block=10):
    """(row, col) of the brightest block x block tile."""
    h, w = out.shape
    tiles = out.reshape(h // block, block, w // block, block).mean(axis=(1, 3))
    r, c = np.unravel_index(np.argmax(tiles), tiles.shape)
    return int(r) * block, int(c) * block


def test_no_exif_control(tmp_path):
    out = decode(_marker_jpeg(tmp_path / "plain.jpg"), 80)
    # landscape 80x40 padded: content rows 20..59, marker at its top-left
    assert _bright_block(out) == (20, 0)
    assert (out[:20] == 0).all() and (out[60:] == 0).all()


def test_exif_orientation_6_rotates_clockwise(tmp_path):
    out = decode(_marker_jpeg(tmp_path / "o6.jpg", 6), 80)
    # displayed 40 wide x 80 tall, centred in columns 20..59; top-left marker -> top-right
    assert (out[:, :20] == 0).all() and (out[:, 60:] == 0).all()
    assert _bright_block(out) == (0, 50)
    assert out[0:10, 50:60].mean() > 200


def test_exif_orientation_8_rotates_counterclockwise(tmp_path):
    out = decode(_marker_jpeg(tmp_path / "o8.jpg", 8), 80)
    # top-left marker -> bottom-left of the portrait content (columns 20..59)
    assert (out[:, :20] == 0).all() and (out[:, 60:] == 0).all()
    assert _bright_block(out) == (70, 20)
    assert out[70:80, 20:30].mean() > 200


# --- pad vs crop ---------------------------------------------------------------------------------

def _bands(path):
    """40 wide x 20 tall: columns 0-9 = 50, 10-29 = 150, 30-39 = 250."""
    arr = np.full((20, 40), 150, np.uint8)
    arr[:, :10] = 50
    arr[:, 30:] = 250
    Image.fromarray(arr, "L").save(path)
    return path


def test_pad_letterboxes_centred_with_black(tmp_path):
    out = decode(_bands(tmp_path / "b.png"), 40, mode="pad")
    assert out.shape == (40, 40)
    assert (out[:10] == 0).all() and (out[30:] == 0).all()     # black borders top and bottom
    np.testing.assert_array_equal(out[10:30, :10], 50)          # all content kept, centred
    np.testing.assert_array_equal(out[10:30, 10:30], 150)
    np.testing.assert_array_equal(out[10:30, 30:], 250)


def test_crop_keeps_the_centre(tmp_path):
    out = decode(_bands(tmp_path / "b.png"), 40, mode="crop")
    assert out.shape == (40, 40)
    np.testing.assert_array_equal(out, 150)                    # centre 20x20 only, scaled up


def test_square_tall_pad_and_crop():
    tall = np.full((30, 10), 200, np.uint8)
    tall[:10] = 10
    padded = square(tall, 30, "pad")
    assert (padded[:, :10] == 0).all() and (padded[:, 20:] == 0).all()
    assert (padded[:10, 10:20] == 10).all() and (padded[10:, 10:20] == 200).all()
    cropped = square(tall, 10, "crop")                         # rows 10..19
    np.testing.assert_array_equal(cropped, 200)


@pytest.mark.parametrize("size", [24, 57])
@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_output_always_uint8_square(tmp_path, size, mode):
    files = [
        _save(Image.new("L", (31, 17), 90), tmp_path / "a.png"),
        _save(Image.new("RGB", (17, 45), (10, 200, 30)), tmp_path / "b.jpg"),
        _save(Image.new("RGBA", (300, 200), (10, 20, 30, 128)), tmp_path / "c.png"),
        _save(Image.fromarray(np.arange(50 * 20, dtype=np.uint16).reshape(20, 50) * 50), tmp_path / "d.png"),
        _save(Image.new("CMYK", (40, 10), (10, 20, 30, 40)), tmp_path / "e.jpg"),
        _save(Image.new("1", (13, 13), 1), tmp_path / "f.bmp"),
    ]
    for f in files:
        out = decode(f, size, mode=mode)
        assert out.dtype == np.uint8, f
        assert out.shape == (size, size), f


# --- bad input -----------------------------------------------------------------------------------

def _reason(path, **kw):
    with pytest.raises(DecodeError) as info:
        decode(path, 32, **kw)
    return info.value.reason


def test_empty_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    assert _reason(p) == "empty_file"


def test_text_named_png(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not an image\n" * 10)
    assert _reason(p) == "not_an_image"


def test_missing_file(tmp_path):
    assert _reason(tmp_path / "nope.png") == "unreadable"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(tmp_path, fmt):
    noise = np.random.default_rng(0).integers(0, 256, (128, 128), dtype=np.uint8)
    full = tmp_path / f"full.{fmt.lower()}"
    Image.fromarray(noise).save(full, format=fmt)
    data = full.read_bytes()
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(data[: len(data) // 2])
    assert _reason(cut) == "unreadable"


def test_decompression_bomb_is_refused(tmp_path):
    p = _save(Image.new("L", (3000, 3000), 0), tmp_path / "big.png")
    err = None
    with pytest.raises(DecodeError) as info:
        decode(p, 32, max_pixels=1_000_000)
    err = info.value
    assert err.reason == "decompression_bomb"
    assert "9000000 pixels" in str(err) and "max_pixels" in str(err)
    # under the limit the same file decodes
    assert decode(p, 32, max_pixels=10_000_000).shape == (32, 32)
