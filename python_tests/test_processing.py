"""Image tiling, normalisation, video sampling, prompt expansion and LongVITAProcessor, on real photos
(scikit-image) and videos/GIFs/frame folders encoded from them. CPU only, no ../shared access."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from vita_ext.processing import (IMAGENET_MEAN, IMAGENET_STD, LongVITAProcessor, LongVITATokenizer, MediaSpec,
                                 VideoSource, apply_chat_template, candidate_grids, default_tokenizer_path,
                                 dynamic_tiles, expand_media_tokens, expand_to_square, image_to_tensor,
                                 insert_media_tags, load_image, load_video_frames, normalize, sample_indices,
                                 tokens_per_tile, video_frames_to_tensor, video_to_tensor)

skdata = pytest.importorskip("skimage.data")
av = pytest.importorskip("av")
BICUBIC = Image.Resampling.BICUBIC
MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)
STD = np.array(IMAGENET_STD, dtype=np.float32)


@pytest.fixture(scope="module")
def tok():
    return LongVITATokenizer.from_pretrained(default_tokenizer_path())


@pytest.fixture(scope="module")
def proc(tok):
    return LongVITAProcessor(tokenizer=tok, image_size=448)


@pytest.fixture(scope="module")
def tiny(tok):
    """56-px tiles: T = 4 tokens per tile, so layouts are short enough to write out."""
    return LongVITAProcessor(tokenizer=tok, image_size=56, patch_size=14)


def photo(name):
    return Image.fromarray(getattr(skdata, name)())


def expected_pixel(v):
    """Long-VITA's normalisation of one uint8 value per channel, in float32 and in that order."""
    x = np.asarray(v, dtype=np.float32) * np.float32(1.0) / np.float32(255.0)
    return (x - MEAN) / STD


# ---- images ------------------------------------------------------------------------------------
def test_candidate_grids():
    grids = candidate_grids(1, 12)
    brute = {(i, j) for i in range(1, 13) for j in range(1, 13) if i * j <= 12}
    assert set(grids) == brute and len(grids) == 35
    assert [i * j for i, j in grids] == sorted(i * j for i, j in grids)
    assert set(candidate_grids(4, 6)) == {(i, j) for i in range(1, 7) for j in range(1, 7) if 4 <= i * j <= 6}


@pytest.mark.parametrize("size, grid", [
    ((512, 512), (1, 1)),    # astronaut: square, area below 0.5*448^2*4 -> no bigger square
    ((451, 300), (3, 2)),    # chelsea
    ((600, 400), (3, 2)),    # coffee: aspect 1.5 exactly
    ((448, 448), (1, 1)),
    ((896, 448), (2, 1)),    # tie with (4, 2) lost: area 401408 <= 802816
    ((1792, 896), (4, 2)),   # tie with (2, 1) won by the area rule
    ((896, 896), (2, 2)),    # ties (1,1),(2,2),(3,3): area 802816 > 401408 but <= 903168
    ((1344, 1344), (3, 3)),
    ((1000, 100), (10, 1)),
    ((100, 1000), (1, 10)),
    ((3000, 100), (12, 1)),  # wider than any grid: the widest
    ((500, 300), (3, 2)),    # 5:3 -> 1.5 (diff 0.167) beats 2.0; (5, 3) would need 15 tiles
])
def test_dynamic_tiles_grid(size, grid):
    image = photo("coffee").resize(size, BICUBIC)
    tiles, got = dynamic_tiles(image, 448, 12)
    assert got == grid
    n = grid[0] * grid[1]
    assert len(tiles) == (n + 1 if n > 1 else n)
    assert all(t.size == (448, 448) for t in tiles)


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
def test_tile_pixels_independent(name):
    image = photo(name)
    tiles, (cols, rows) = dynamic_tiles(image, 448, 12)
    resized = np.asarray(image.resize((448 * cols, 448 * rows), BICUBIC))
    body = tiles[1:] if len(tiles) > 1 else tiles
    for k, tile in enumerate(body):
        r, c = divmod(k, cols)
        assert np.array_equal(np.asarray(tile), resized[448 * r:448 * (r + 1), 448 * c:448 * (c + 1)])
    if len(tiles) > 1:
        assert np.array_equal(np.asarray(tiles[0]), np.asarray(image.resize((448, 448), BICUBIC)))
    pixels, grid = image_to_tensor(image)
    assert grid == (cols, rows) and pixels.dtype == torch.float32 and pixels.shape == (len(tiles), 3, 448, 448)
    rng = np.random.default_rng(0)
    for _ in range(20):
        t, y, x = rng.integers(len(tiles)), rng.integers(448), rng.integers(448)
        want = expected_pixel(np.asarray(tiles[t])[y, x])
        assert np.array_equal(pixels[t, :, y, x].numpy(), want)
        f64 = (np.asarray(tiles[t])[y, x] / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
        assert np.allclose(pixels[t, :, y, x].numpy(), f64, atol=1e-6)


def test_normalize_formula_all_values():
    values = np.arange(256, dtype=np.uint8)
    tile = Image.fromarray(np.stack([values, values[::-1], values], -1).reshape(16, 16, 3))
    out = normalize([tile])
    assert out.shape == (1, 3, 16, 16)
    arr = np.asarray(tile)
    assert np.array_equal(out[0].permute(1, 2, 0).numpy(), expected_pixel(arr))
    assert normalize([tile], dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"tiles\[1\]: expected size"):
        normalize([tile, tile.resize((8, 8))])


def test_load_image_modes_and_errors(tmp_path):
    gray = photo("camera")
    gray.save(tmp_path / "gray.png")
    rgba = photo("astronaut").convert("RGBA")
    rgba.save(tmp_path / "rgba.png")
    for p in ("gray.png", "rgba.png"):
        assert load_image(tmp_path / p).mode == "RGB"
    assert np.array_equal(np.asarray(load_image(tmp_path / "gray.png"))[..., 1], np.asarray(gray))
    (tmp_path / "garbage.png").write_bytes(os.urandom(2000))
    with pytest.raises(ValueError, match="cannot read image .*garbage.png: "):
        load_image(tmp_path / "garbage.png")
    full = (tmp_path / "gray.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match="cannot read image .*cut.png"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")


def test_expand_to_square():
    image = photo("chelsea").crop((0, 0, 11, 4))
    sq = expand_to_square(image, (123, 116, 103))
    assert sq.size == (11, 11)
    arr = np.asarray(sq)
    assert np.array_equal(arr[3:7], np.asarray(image))       # (11 - 4) // 2 = 3 rows above
    assert (arr[:3] == (123, 116, 103)).all() and (arr[7:] == (123, 116, 103)).all()
    tall = expand_to_square(image.transpose(Image.Transpose.TRANSPOSE))
    assert np.array_equal(np.asarray(tall)[:, 3:7], np.asarray(image.transpose(Image.Transpose.TRANSPOSE)))
    assert expand_to_square(image.crop((0, 0, 4, 4))).size == (4, 4)


# ---- prompt --------------------------------------------------------------------------------------
def test_chat_template_and_tags():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "<image>\nQ"}]
    assert apply_chat_template(messages) == \
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<image>\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert apply_chat_template(messages[1:], add_generation_prompt=False) == \
        "<|im_start|>user\n<image>\nQ<|im_end|>\n"
    with pytest.raises(ValueError, match=r"messages\[0\]\['role'\]"):
        apply_chat_template([{"role": "tool", "content": "x"}])
    assert insert_media_tags("Q", 2, 1) == "<image>\n<image>\n<video>Q"
    assert insert_media_tags("Q", 0, 0) == "Q"
    assert insert_media_tags("A <video> B", 2, 1) == "A <video> B"
    assert tokens_per_tile(448, 14) == 256 and tokens_per_tile(56, 14) == 4
    with pytest.raises(ValueError, match="even number of patches"):
        tokens_per_tile(42, 14)


def _layout(tok, T, grid=None, frames=None):
    if frames is not None:
        return [tok.vid_start_id, *[tok.vid_context_id] * T, tok.vid_end_id] * frames
    ids = [tok.img_start_id, *[tok.img_context_id] * T, tok.img_end_id]
    if grid is not None:
        for _ in range(grid[1]):
            ids += [198] + [tok.patch_start_id, *[tok.patch_context_id] * T, tok.patch_end_id] * grid[0]
    return ids


def _check_positions(tok, out, T):
    """context_positions: every CONTEXT token, ascending; tile k owns one contiguous run of T of them,
    framed by the matching start/end tokens."""
    ids, pos = out["input_ids"][0], out["context_positions"]
    tiles = out["pixel_values"].shape[0]
    assert pos.dtype == torch.long and pos.shape == (tiles * T,)
    is_ctx = torch.isin(ids, torch.tensor(tok.context_token_ids))
    assert torch.equal(torch.nonzero(is_ctx).flatten(), pos)
    frame = {tok.img_context_id: (tok.img_start_id, tok.img_end_id),
             tok.patch_context_id: (tok.patch_start_id, tok.patch_end_id),
             tok.vid_context_id: (tok.vid_start_id, tok.vid_end_id)}
    for k in range(tiles):
        run = pos[k * T:(k + 1) * T]
        assert torch.equal(run, torch.arange(run[0], run[0] + T))
        ctx = int(ids[run[0]])
        assert (ids[run] == ctx).all() and (int(ids[run[0] - 1]), int(ids[run[-1] + 1])) == frame[ctx]


def test_expand_one_tile_and_seven_tiles(tok, tiny):
    T = 4
    head, tail = tok.encode("<|im_start|>user\n"), tok.encode("\nWhat?<|im_end|>\n<|im_start|>assistant\n")
    one = tiny("<image>\nWhat?", images=[photo("astronaut").resize((60, 60), BICUBIC)])  # area < 2 * 56^2
    assert one["input_ids"][0].tolist() == head + _layout(tok, T) + tail
    assert one["pixel_values"].shape == (1, 3, 56, 56)
    seven = tiny("<image>\nWhat?", images=[photo("chelsea").resize((600, 400), BICUBIC)])
    assert seven["input_ids"][0].tolist() == head + _layout(tok, T, grid=(3, 2)) + tail
    assert seven["pixel_values"].shape == (7, 3, 56, 56)
    for out in (one, seven):
        _check_positions(tok, out, T)
        assert out["context_positions"].numel() == out["pixel_values"].shape[0] * T


def test_expand_two_images_and_video_in_text_order(tok, tiny):
    T = 4
    frames = [photo("coffee").crop((10 * k, 0, 10 * k + 300, 200)) for k in range(12)]
    imgs = [photo("chelsea").resize((600, 400), BICUBIC), photo("astronaut").resize((50, 50), BICUBIC)]
    out = tiny("A <video> B <image> C <image>", images=imgs, videos=[frames], max_frames=16)
    want = (tok.encode("<|im_start|>user\nA ") + _layout(tok, T, frames=12) + tok.encode(" B ")
            + _layout(tok, T, grid=(3, 2)) + tok.encode(" C ") + _layout(tok, T)
            + tok.encode("<|im_end|>\n<|im_start|>assistant\n"))
    assert out["input_ids"][0].tolist() == want
    assert out["pixel_values"].shape == (12 + 7 + 1, 3, 56, 56)
    _check_positions(tok, out, T)
    assert torch.equal(out["pixel_values"][:12], video_frames_to_tensor(frames, 56))
    assert torch.equal(out["pixel_values"][12:19], image_to_tensor(imgs[0], 56)[0])
    assert torch.equal(out["pixel_values"][19:], image_to_tensor(imgs[1], 56)[0])


def test_expand_256_tokens_per_tile(tok, proc):
    out = proc("<image>\nDescribe.", images=[photo("coffee")])
    ids = out["input_ids"][0].tolist()
    assert ids[:3] == tok.encode("<|im_start|>user\n")
    assert ids[-3:] == tok.encode("<|im_start|>assistant\n")
    assert out["pixel_values"].shape == (7, 3, 448, 448) and out["pixel_values"].dtype == torch.float32
    assert out["context_positions"].numel() == 7 * 256
    assert ids.count(tok.img_context_id) == 256 and ids.count(tok.patch_context_id) == 6 * 256
    assert ids.count(tok.patch_start_id) == ids.count(tok.patch_end_id) == 6
    assert ids.count(198) == 2 + 4  # two grid rows + "user\n", "<image>\n", "<|im_end|>\n", "assistant\n"
    _check_positions(tok, out, 256)
    assert torch.equal(out["pixel_values"], image_to_tensor(photo("coffee"))[0])


def test_tag_count_mismatch(tok, tiny):
    with pytest.raises(ValueError, match=r"2 <image> tag\(s\) but 1 image\(s\)"):
        tiny("<image><image>", images=[photo("astronaut")])
    with pytest.raises(ValueError, match=r"0 <image> tag\(s\) but 1 image\(s\)"):
        tiny("no tag", images=[photo("astronaut")])
    with pytest.raises(ValueError, match=r"1 <video> tag\(s\) but 0 video\(s\)"):
        tiny("<video>")
    with pytest.raises(ValueError, match="reserved vision token"):
        tiny("<IMG_CONTEXT> hi")
    with pytest.raises(ValueError, match="do not match the tags"):
        expand_media_tokens(tok.encode("<image>"), [MediaSpec("video", 2)], tok, 4)
    with pytest.raises(ValueError, match="one PIL image"):
        tiny("<video>", videos=[photo("astronaut")])


def test_text_only(tok, proc):
    out = proc("Hello", chat=False)
    assert out["input_ids"].tolist() == [tok.encode("Hello")]
    assert out["pixel_values"].shape == (0, 3, 448, 448) and out["context_positions"].shape == (0,)
    assert proc.decode(proc("Hi")["input_ids"]) == "user\nHi\nassistant\n"


# ---- video ---------------------------------------------------------------------------------------
def pan_frames(n=40, w=256, h=192, step=4):
    """A horizontal pan across the astronaut photo: frame k is the window at x = step * k."""
    img = skdata.astronaut()
    return [np.ascontiguousarray(img[100:100 + h, step * k:step * k + w]) for k in range(n)]


def write_video(path, frames, fps=10, codec="mpeg4"):
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        s.options = {"qscale": "2"} if codec == "mpeg4" else {}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.fixture(scope="module")
def pan():
    return pan_frames()


@pytest.fixture(scope="module")
def mp4(pan, tmp_path_factory):
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    return write_video(tmp_path_factory.mktemp("v") / "pan.mp4", pan, codec=codec)


def identify(frame, originals):
    """Index of the original frame closest to a decoded (lossy) frame."""
    arr = np.asarray(frame, dtype=np.float32)
    return int(np.argmin([np.mean((arr - o) ** 2) for o in originals]))


def formula(n, fps, max_frames, max_fps):
    step = max(fps / max_fps, n / (max_frames + 1))
    return [int(k * step) for k in range(max_frames) if int(k * step) < n]


@pytest.mark.parametrize("max_frames, max_fps", [(128, 1.0), (2, 1.0), (8, 4.0), (4096, 2.0), (3, 0.5)])
def test_video_file_sampling(mp4, pan, max_frames, max_fps):
    src = VideoSource(mp4, max_frames, max_fps)
    assert (src.kind, src.n_frames, src.fps) == ("file", 40, 10.0)
    assert src.indices == formula(40, 10.0, max_frames, max_fps) == sample_indices(40, 10.0, max_frames, max_fps)
    frames = load_video_frames(mp4, max_frames, max_fps)
    assert [identify(f, pan) for f in frames] == src.indices
    assert all(f.mode == "RGB" and f.size == (256, 192) for f in frames)


def test_video_sampling_examples():
    assert sample_indices(40, 10.0, 128) == [0, 10, 20, 30]
    assert sample_indices(40, 10.0, 2) == [0, 13]
    assert sample_indices(40, 10.0, 8, 4.0) == [0, 4, 8, 13, 17, 22, 26, 31]  # step 40 / 9
    assert sample_indices(3, 0.5, 8) == [0, 0, 1, 1, 2, 2]  # slower than max_fps: frames repeat
    with pytest.raises(ValueError, match="max_frames/max_fps"):
        sample_indices(40, 10.0, 0)


def test_repeated_indices_repeat_frames(tmp_path, pan):
    """A video slower than max_fps gets repeated indices; the frame is repeated, as in Long-VITA."""
    path = write_video(tmp_path / "slow.mkv", pan[:6], fps=2)
    frames = load_video_frames(path, 8, max_fps=4.0)  # step = max(2 / 4, 6 / 9) = 0.667 -> repeats
    idx = sample_indices(6, 2.0, 8, 4.0)
    assert idx == formula(6, 2.0, 8, 4.0) and len(set(idx)) < len(idx)
    assert [identify(f, pan[:6]) for f in frames] == idx


def test_video_without_frame_count(tmp_path, pan):
    path = write_video(tmp_path / "pan.mkv", pan)
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0  # Matroska stores no count: packets are counted
    src = VideoSource(path, 128)
    assert (src.n_frames, src.fps, src.indices) == (40, 10.0, [0, 10, 20, 30])
    assert [identify(f, pan) for f in src.frames()] == [0, 10, 20, 30]


def test_gif(tmp_path):
    frames = [Image.fromarray(f) for f in pan_frames(25, 96, 64, 16)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    src = VideoSource(tmp_path / "a.gif", 128)
    assert (src.kind, src.n_frames, src.fps, src.indices) == ("gif", 25, 10.0, [0, 10, 20])
    with Image.open(tmp_path / "a.gif") as im:  # independent decode of the same GIF frames
        ref = []
        for k in range(25):
            im.seek(k)
            ref.append(np.asarray(im.convert("RGB"), dtype=np.float32))
    got = load_video_frames(tmp_path / "a.gif", 128)
    assert [identify(f, ref) for f in got] == [0, 10, 20]
    assert np.array_equal(np.asarray(got[1], dtype=np.float32), ref[10])
    frames[0].save(tmp_path / "b.gif", save_all=True, append_images=frames[1:4], duration=[500, 500, 1000, 0])
    assert VideoSource(tmp_path / "b.gif", 8).fps == pytest.approx(4000 / 2100)


def test_frame_directory(tmp_path):
    frames = [Image.fromarray(f) for f in pan_frames(12, 64, 48, 20)]
    for k, f in enumerate(frames, start=1):
        f.save(tmp_path / f"frame{k}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    src = VideoSource(tmp_path, 5)
    assert src.kind == "dir" and src.n_frames == 12 and src.indices == [0, 2, 4, 6, 8]
    got = load_video_frames(tmp_path, 5)
    for g, k in zip(got, [1, 3, 5, 7, 9]):  # natural order: frame2 before frame10
        assert np.array_equal(np.asarray(g), np.asarray(frames[k - 1]))
    assert len(load_video_frames(tmp_path, 100)) == 12
    assert VideoSource(frames, 5).indices == [0, 2, 4, 6, 8]


def test_video_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        VideoSource(tmp_path / "nope.mp4", 8)
    (tmp_path / "bad.mp4").write_bytes(os.urandom(5000))
    with pytest.raises(ValueError, match="cannot read video .*bad.mp4"):
        load_video_frames(tmp_path / "bad.mp4", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot read video .*empty: the video has no frames"):
        VideoSource(tmp_path / "empty", 8)
    import wave

    with wave.open(str(tmp_path / "sound.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000), w.writeframes(b"\0\1" * 800)
    with pytest.raises(ValueError, match="cannot read video .*sound.wav: no video stream"):
        VideoSource(tmp_path / "sound.wav", 8)
    with pytest.raises(ValueError, match="no frames"):
        VideoSource([], 8)


def test_video_frames_to_tensor_pads_with_mean(pan):
    frame = Image.fromarray(pan[0])  # 256 x 192: 32 rows of padding above and below
    out = video_frames_to_tensor([frame], 448)
    assert out.shape == (1, 3, 448, 448)
    square = Image.new("RGB", (256, 256), (123, 116, 103))
    square.paste(frame, (0, 32))
    ref = np.asarray(square.resize((448, 448), BICUBIC))
    assert np.array_equal(out[0].permute(1, 2, 0).numpy(), expected_pixel(ref))
    assert np.allclose(out[0, :, 0, 0].numpy(), expected_pixel(np.array([123, 116, 103], np.uint8)))


def test_video_to_tensor_streams(mp4):
    a = video_to_tensor(mp4, 128, image_size=56)
    b = video_frames_to_tensor(load_video_frames(mp4, 128), 56)
    assert a.shape == (4, 3, 56, 56) and torch.equal(a, b)


# ---- processor -----------------------------------------------------------------------------------
def test_processor_video_file_and_image_path(tok, tiny, mp4, tmp_path):
    photo("chelsea").save(tmp_path / "cat.png")
    out = tiny("<image>\n<video>Compare.", images=[tmp_path / "cat.png"], videos=[mp4])
    ids = out["input_ids"][0].tolist()
    assert ids.count(tok.vid_start_id) == 4 and ids.count(tok.vid_context_id) == 4 * 4
    assert out["pixel_values"].shape == (7 + 4, 3, 56, 56)
    _check_positions(tok, out, 4)
    assert torch.equal(out["pixel_values"][7:], video_to_tensor(mp4, 128, image_size=56))
    fewer = tiny("<video>", videos=[str(mp4)], max_frames=2)
    assert fewer["pixel_values"].shape[0] == 2  # step = max(10, 40 / 3): indices 0, 13
    bf16 = LongVITAProcessor(tokenizer=tok, image_size=56, pixel_dtype=torch.bfloat16)("<video>", videos=[mp4])
    assert bf16["pixel_values"].dtype == torch.bfloat16
    assert torch.equal(bf16["pixel_values"], video_to_tensor(mp4, 128, image_size=56).to(torch.bfloat16))


def test_video_frame_labels(tok, tmp_path):
    """A model's own frame numbering (the digits model's "{:03d}"): the label's tokens go before each
    frame's <vid>, unsupervised; without it the layout is Long-VITA's (no label)."""
    frames = [photo("coffee").crop((10 * k, 0, 10 * k + 300, 200)) for k in range(11)]
    plain = LongVITAProcessor(tokenizer=tok, image_size=56)
    numbered = LongVITAProcessor(tokenizer=tok, image_size=56, video_frame_label="{:03d}")
    a, b = plain("<video>Q", videos=[frames]), numbered("<video>Q", videos=[frames])
    head, tail = tok.encode("<|im_start|>user\n"), tok.encode("Q<|im_end|>\n<|im_start|>assistant\n")
    want = [t for k in range(11) for t in tok.encode(f"{k + 1:03d}") + _layout(tok, 4, frames=1)]
    assert b["input_ids"][0].tolist() == head + want + tail
    assert a["input_ids"][0].tolist() == head + _layout(tok, 4, frames=11) + tail
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    _check_positions(tok, b, 4)
    conv = numbered.encode_conversation([{"role": "user", "content": "<video>Read."},
                                         {"role": "assistant", "content": "7"}], videos=[frames[:3]])
    ids, labels = conv["input_ids"][0].tolist(), conv["labels"][0].tolist()
    assert [i for i, l in zip(ids, labels) if l != -100] == tok.encode("7<|im_end|>\n")
    from vita_ext.processing.prompt import expanded_length

    media = [MediaSpec("video", 11)]
    n = expanded_length(tok.encode("<|im_start|>user\n<video>Q<|im_end|>\n<|im_start|>assistant\n"), media, 4,
                        tok.image_token_id, tok.video_token_id, lambda k: len(tok.encode(f"{k:03d}")))
    assert n == len(b["input_ids"][0])


def test_processor_config_file(tok, tmp_path):
    """processor_config.json in a checkpoint sets the processor (kwargs still win); bad files and
    labels are errors that name the problem."""
    import json

    (tmp_path / "config.json").write_text(json.dumps({"visual": {"image_size": 28, "patch_size": 14}}))
    assert LongVITAProcessor.from_pretrained(tmp_path, tokenizer=tok).video_frame_label is None
    settings = {"max_tiles": 1, "max_frames": 256, "video_frame_label": "{:03d}"}
    (tmp_path / "processor_config.json").write_text(json.dumps(settings))
    p = LongVITAProcessor.from_pretrained(tmp_path, tokenizer=tok)
    assert (p.image_size, p.max_tiles, p.max_frames, p.video_frame_label) == (28, 1, 256, "{:03d}")
    assert LongVITAProcessor.from_pretrained(tmp_path, tokenizer=tok, max_frames=8).max_frames == 8
    (tmp_path / "again").mkdir()
    p.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "processor_config.json").read_text())["video_frame_label"] == "{:03d}"
    out = p("<image>", images=[photo("coffee")])  # max_tiles 1: one tile whatever the size
    assert out["pixel_values"].shape == (1, 3, 28, 28)
    (tmp_path / "processor_config.json").write_text(json.dumps({"max_frame": 3}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['max_frame'\]"):
        LongVITAProcessor.from_pretrained(tmp_path, tokenizer=tok)
    (tmp_path / "processor_config.json").write_text("[1]")
    with pytest.raises(ValueError, match="expected a JSON object, received list"):
        LongVITAProcessor.from_pretrained(tmp_path, tokenizer=tok)
    with pytest.raises(ValueError, match="video_frame_label: expected a str.format pattern.*'{name}'"):
        LongVITAProcessor(tokenizer=tok, video_frame_label="{name}")
    with pytest.raises(ValueError, match=r"special token\(s\) \['<vid>'\]"):
        LongVITAProcessor(tokenizer=tok, video_frame_label="<vid>{}")


def test_processor_max_tiles_override(tiny):
    # aspect 1.5, grids up to 4 tiles: (1,1), (2,1) and (2,2) all differ by 0.5; the big image takes (2,2)
    out = tiny("<image>", images=[photo("coffee")], max_tiles=4)
    assert out["pixel_values"].shape[0] == 5
    assert out["input_ids"][0].tolist().count(198) == 2 + 3  # 2 grid rows + 3 ChatML newlines


def _runs(mask):
    runs, start = [], None
    for i, m in enumerate(mask + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_encode_conversation_labels(tok, tiny):
    messages = [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "<image>\nWhat animal is this?"},
        {"role": "assistant", "content": "A cat, lying down. 猫"},
        {"role": "user", "content": "Its colour?"},
        {"role": "assistant", "content": "Orange and grey 😀"},
    ]
    out = tiny.encode_conversation(messages, images=[photo("chelsea")])
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert labels.shape == ids.shape and labels.dtype == torch.long
    # Same tokens as inference on the same ChatML text.
    same = tiny(apply_chat_template(messages, add_generation_prompt=False), images=[photo("chelsea")], chat=False)
    assert torch.equal(ids, same["input_ids"][0]) and torch.equal(out["pixel_values"], same["pixel_values"])
    assert torch.equal(out["context_positions"], same["context_positions"])
    supervised = (labels != -100).tolist()
    assert torch.equal(labels[labels != -100], ids[labels != -100])
    runs = _runs(supervised)
    assert [tok.decode(ids[a:b].tolist()) for a, b in runs] == [
        "A cat, lying down. 猫<|im_end|>\n", "Orange and grey 😀<|im_end|>\n"]
    for a, _ in runs:  # the header right before each run is unsupervised
        assert tok.decode(ids[a - 3:a].tolist()) == "<|im_start|>assistant\n"
    assert not torch.isin(ids[labels != -100], torch.tensor(tok.context_token_ids)).any()


def test_encode_conversation_strict(tiny):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\nHello"}]
    with pytest.raises(ValueError, match="piecewise tokenization differs"):
        tiny.encode_conversation(messages)
    loose = tiny.encode_conversation(messages, strict=False)
    assert loose["labels"][0, -4:].tolist() == loose["input_ids"][0, -4:].tolist()
    assert tiny.encode_conversation(messages[:1])["labels"].eq(-100).all()


def test_from_pretrained(tok, tmp_path):
    import json
    import warnings

    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"visual": {"image_size": 56, "patch_size": 14},
                                                      "hidden_size": 64}))
    p = LongVITAProcessor.from_pretrained(tmp_path, max_frames=7)
    assert (p.image_size, p.patch_size, p.tokens_per_tile, p.max_frames) == (56, 14, 4, 7)
    assert p.tokenizer.encode("<video>") == [tok.video_token_id]
    bare = tmp_path / "bare"
    bare.mkdir()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        q = LongVITAProcessor.from_pretrained(bare)
    assert any("packaged" in str(x.message) for x in w)
    assert (q.image_size, q.tokens_per_tile) == (448, 256)
    with pytest.raises(FileNotFoundError):
        LongVITAProcessor.from_pretrained(tmp_path / "missing")


def test_processor_errors(tiny, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff" + os.urandom(300))
    with pytest.raises(ValueError, match="cannot read image .*bad.jpg"):
        tiny("<image>", images=[tmp_path / "bad.jpg"])
    with pytest.raises(FileNotFoundError, match="gone.png"):
        tiny("<image>", images=[tmp_path / "gone.png"])
    with pytest.raises(FileNotFoundError, match="gone.mp4"):
        tiny("<video>", videos=[tmp_path / "gone.mp4"])


def test_expanded_length(tok):
    from vita_ext.processing.prompt import expanded_length

    ids = tok.encode("a<image>b<video>c<image>")
    media = [MediaSpec("image", 7, (3, 2)), MediaSpec("video", 5), MediaSpec("image", 1, (1, 1))]
    for T in (4, 256):
        want = len(expand_media_tokens(ids, media, tok, T).input_ids)
        assert expanded_length(ids, media, T, tok.image_token_id, tok.video_token_id) == want


def test_default_tokenizer_is_shared():
    assert LongVITATokenizer.default() is LongVITATokenizer.default()
    assert LongVITAProcessor().tokenizer is LongVITATokenizer.default()


def test_vision_tokens_in_assistant_are_unsupervised(tok, tiny):
    messages = [{"role": "user", "content": "Draw."}, {"role": "assistant", "content": "Here <image> done"}]
    out = tiny.encode_conversation(messages, images=[photo("coffee")])
    ids, labels = out["input_ids"][0], out["labels"][0]
    runs = _runs((labels != -100).tolist())
    assert [tok.decode(ids[a:b].tolist()) for a, b in runs] == ["Here ", " done<|im_end|>\n"]
    vision = ids[runs[0][1]:runs[1][0]]
    assert vision[0] == tok.img_start_id and vision[-1] == tok.patch_end_id and len(vision) == 2 + 4 + 2 * (1 + 3 * 6)
