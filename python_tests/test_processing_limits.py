"""Input processing under hostile or odd input (issue 11): bounded work for any tile/frame request,
high-bit-depth images scaled instead of clipped, decompression bombs and truncated videos reported,
non-UTF-8 text refused, and the context length checked before any pixel is decoded."""
import os
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from vita_ext.processing import LongVITAProcessor, LongVITATokenizer, VideoSource, candidate_grids, load_image
from vita_ext.processing.image import MAX_TILES
from vita_ext.processing.video import MAX_FRAMES, VideoWarning, sample_indices

av = pytest.importorskip("av")


@pytest.fixture(scope="module")
def proc():
    return LongVITAProcessor(LongVITATokenizer.default(), image_size=56, patch_size=14)


def _internvl_grids(min_num, max_num):
    """InternVL's own construction (cubic in max_num): the order the fast one must reproduce."""
    ratios = set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                 if min_num <= i * j <= max_num)
    return sorted(ratios, key=lambda x: x[0] * x[1])


# ------------------------------------------------------------------------- item 4: bounded work
def test_candidate_grids_same_order_as_internvl_and_fast():
    for max_num in range(1, 41):
        for min_num in range(1, max_num + 1, 3):
            assert candidate_grids(min_num, max_num) == _internvl_grids(min_num, max_num), (min_num, max_num)
    assert candidate_grids(1, 97) == _internvl_grids(1, 97)
    t0 = time.perf_counter()
    assert len(candidate_grids(1, MAX_TILES)) > 30000
    assert time.perf_counter() - t0 < 10  # O(n log n): ~0.1 s (the cubic loop did not finish in 120 s at 100000)
    with pytest.raises(ValueError, match=f"max_tiles <= {MAX_TILES}, received 1, 100000"):
        candidate_grids(1, 100000)


def test_processor_refuses_huge_tile_and_frame_counts(proc, tmp_path):
    Image.new("RGB", (60, 40), (10, 20, 30)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=rf"max_tiles: expected an integer in \[1, {MAX_TILES}\], received 100000"):
        proc("<image>", images=[tmp_path / "a.png"], max_tiles=100000)
    with pytest.raises(ValueError, match=rf"max_frames: expected an integer in \[1, {MAX_FRAMES}\], received 1000000000"):
        proc("<video>", videos=[[Image.new("RGB", (8, 8))]], max_frames=10**9)
    with pytest.raises(ValueError, match="max_frames: expected 1 <= max_frames"):
        VideoSource([Image.new("RGB", (8, 8))], 0)


def test_frame_sampling_is_linear_in_the_video_not_in_max_frames():
    t0 = time.perf_counter()
    got = sample_indices(900, 30.0, 10**9)  # a 30 s video asked for a billion frames: 276 s before
    assert time.perf_counter() - t0 < 1 and got == list(range(0, 900, 30))
    assert sample_indices(3, 0.5, 8) == [0, 0, 1, 1, 2, 2]  # slow videos still repeat frames
    for n, fps, mf, mfps in [(40, 10, 128, 1.0), (1000, 24, 7, 2.0), (17, 3.3, 100, 0.7), (5, 0.1, 64, 1.0)]:
        step = max(fps / mfps, n / (mf + 1))
        assert sample_indices(n, fps, mf, mfps) == [int(k * step) for k in range(mf) if int(k * step) < n]
    with pytest.raises(ValueError, match="fps: expected a positive frame rate"):
        sample_indices(10, float("nan"), 8)


def test_context_length_is_checked_before_decoding(proc, tmp_path):
    frames = [Image.new("RGB", (8, 8), (i, i, i)) for i in range(50)]
    out = proc("<video>", videos=[frames], max_length=400)  # 50 frames x (4 + 2) tokens + text fits
    assert out["pixel_values"].shape[0] == 50
    with pytest.raises(ValueError, match=r"the input would be \d+ tokens .* 50 tile\(s\)/frame\(s\) of 4\), more than "
                                         r"the limit of 100"):
        proc("<video>", videos=[frames], max_length=100)


# ---------------------------------------------------------- items 9, 10: odd and hostile images
def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    rgb = np.asarray(load_image(tmp_path / "g16.png"))
    want = np.rint(ramp / 257.0).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], want) and np.array_equal(rgb[..., 1], want)
    assert abs(rgb.mean() - 127) < 1  # a ramp; Pillow's convert("RGB") clips it to 255 almost everywhere
    float_image = Image.fromarray((ramp / 65535.0).astype(np.float32))  # mode F in [0, 1]
    assert np.abs(np.asarray(load_image(float_image))[..., 0].astype(int) - want).max() <= 1
    Image.fromarray(np.full((4, 4), 200, np.uint8)).save(tmp_path / "g8.png")  # 8-bit: unchanged
    assert (np.asarray(load_image(tmp_path / "g8.png")) == 200).all()


def _png_header_only(path, width, height):
    """A PNG that claims width x height (1-bit) and holds one empty row: enough to trip Pillow's
    decompression-bomb check without allocating anything."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) +
                     chunk(b"IEND", b""))


def test_decompression_bomb_is_a_clear_error(proc, tmp_path):
    _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(ValueError, match=r"cannot read image .*bomb.png: DecompressionBombError: Image size \(400000000 pixels\) exceeds"):
        proc("<image>", images=[tmp_path / "bomb.png"])
    with pytest.raises(ValueError, match="cannot read image .*bomb.png"):
        load_image(tmp_path / "bomb.png")


def test_truncated_video_warns(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as c:  # the frame table first
        s = c.add_stream("mpeg4", rate=10)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        for _ in range(40):
            for p in s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 255, (64, 64, 3), np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    data = path.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[:len(data) // 2])
    source = VideoSource(tmp_path / "cut.mp4", 128, 10.0)
    assert len(source) == 40  # the header still says 40
    with pytest.warns(VideoWarning, match=r"cut.mp4: decoded \d+ of the 40 sampled frames"):
        n = sum(1 for _ in source.frames())
    assert 0 < n < 40
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an intact video says nothing
        assert sum(1 for _ in VideoSource(path, 128, 10.0).frames()) == 40


def test_non_utf8_text_is_refused(proc):
    text = b"caf\xe9 <image>".decode("utf-8", "surrogateescape")  # what a Latin-1 shell passes
    with pytest.raises(ValueError, match=r"the text is not valid UTF-8: byte b'\\xe9' at character 3"):
        proc(text, images=[Image.new("RGB", (8, 8))])
    with pytest.raises(ValueError, match="not valid UTF-8"):
        proc.encode_conversation([{"role": "user", "content": text}, {"role": "assistant", "content": "x"}])


@pytest.mark.parametrize("payload", [b"", b"GIF89a" + os.urandom(40), b"\x89PNG\r\n\x1a\n" + os.urandom(60),
                                     b"\xff\xd8\xff\xe0" + os.urandom(100), b"BM" + os.urandom(60)])
def test_random_bytes_behind_image_magic_are_one_error(proc, tmp_path, payload):
    (tmp_path / "x.img").write_bytes(payload)
    with pytest.raises(ValueError, match="cannot read image .*x.img"):
        proc("<image>", images=[tmp_path / "x.img"])
    assert torch.is_tensor(proc("no media")["input_ids"])
