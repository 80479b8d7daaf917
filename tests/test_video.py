"""Video input: decoding, sampling, resizing, timestamps and M-RoPE against transformers' Qwen3-VL
pieces, the limits checked before decoding, and videos served through the real servers (the
ensemble, the disaggregated path, the OpenAI endpoint) against transformers' generate."""

import base64
import fractions
import io

import av
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from client import Client, ClientError, Conversation
from qwen3vl_triton.errors import InputError
from qwen3vl_triton.model import mrope
from qwen3vl_triton.serve.repository import Settings
from qwen3vl_triton.serve.server import OpenAIServer, free_ports
from qwen3vl_triton.text.video import VideoLimits, _video_processor_class, probe
from qwen3vl_triton.transfer.sender import Disaggregated
from tests.conftest import SERVER_SETTINGS
from tests.oracle import data_url, image_bytes, openai_to_template, video_bytes, video_data_url

VIDEO = video_bytes(seconds=3.0, fps=30, width=160, height=120)  # 90 frames: 6 kept, 3 frame groups
VIDEO2 = video_bytes(seconds=2.0, fps=25, width=96, height=144, seed=1)
IMAGE = image_bytes(100, 150, 1)
MIXED = [  # a conversation mixing a video and an image
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": [{"type": "video_url", "video_url": {"url": video_data_url(VIDEO)}},
                                 {"type": "text", "text": "What moves in this video?"}]},
    {"role": "assistant", "content": "A red disc crosses from left to right."},
    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(IMAGE)}},
                                 {"type": "text", "text": "Is this picture from the same place?"}]},
]


def _placeholders_marked(ids: np.ndarray, spec) -> np.ndarray:
    """Token ids with every prompt-table id and every image or video pad token as -1."""
    ids = np.asarray(ids, dtype=np.int64).copy()
    ids[(ids >= spec.vocab_size) | (ids == spec.image_token_id) | (ids == spec.video_token_id)] = -1
    return ids


# -- processing, in process ------------------------------------------------------------------------
def test_resize_is_torchvisions_cpu_rule_and_agrees_with_pillows_bicubic():
    """The one primitive given in place of torchvision: a uint8 CPU tensor resized bicubic with
    antialias is torch's native uint8 interpolate (torchvision's resize_image takes that path on CPU
    for BICUBIC: `_do_native_uint8_resize_on_cpu`); other integer dtypes go through float32, clamp
    and round. An independent reference, Pillow's bicubic resize, agrees within one level."""
    from transformers.image_utils import SizeDict
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    # what Qwen3VLVideoProcessor.resize calls after its smart_resize: super().resize(image=, size=, resample=)
    proc = super(Qwen3VLVideoProcessor, _video_processor_class()())
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (4, 3, 90, 160), generator=gen, dtype=torch.uint8)
    out = proc.resize(image=frames, size=SizeDict(height=64, width=96), resample=3)
    assert out.dtype == torch.uint8 and out.shape == (4, 3, 64, 96)
    native = torch.nn.functional.interpolate(frames, size=[64, 96], mode="bicubic", align_corners=False,
                                             antialias=True)
    assert torch.equal(out, native)
    pil = np.stack([np.asarray(Image.fromarray(f.permute(1, 2, 0).numpy()).resize((96, 64), Image.BICUBIC))
                    for f in frames]).transpose(0, 3, 1, 2)
    diff = (out.numpy().astype(int) - pil.astype(int))
    assert np.abs(diff).max() <= 1 and (diff != 0).mean() < 0.01
    wide = frames.to(torch.int16)
    cast = proc.resize(image=wide, size=SizeDict(height=64, width=96), resample=3)
    ref = torch.nn.functional.interpolate(frames.float(), size=[64, 96], mode="bicubic", align_corners=False,
                                          antialias=True).clamp(0, 255).round().to(torch.int16)
    assert cast.dtype == torch.int16 and torch.equal(cast, ref)


def test_video_patches_timestamps_and_prompt_equal_transformers(preprocessor, oracle, spec):
    """A 3 s video with an image and text: the patches of each frame group, the grid, the
    timestamps and every token of the prompt equal what transformers' Qwen3-VL pieces give."""
    prompt = preprocessor("What moves here?", [IMAGE], [VIDEO])
    ref = oracle.inputs("What moves here?", [IMAGE], [VIDEO])
    assert prompt.video_grid_thw.tolist() == ref.video_grid_thw.tolist() == [[3, 8, 10]]
    # the prompt table's blocks: the image, then one per frame group, each with its own patches
    assert prompt.image_grid_thw.tolist() == [ref.image_grid_thw[0].tolist()] + [[1, 8, 10]] * 3
    image_patches = int(ref.image_grid_thw[0].prod())
    assert np.array_equal(prompt.pixel_values[:image_patches], ref.pixel_values.numpy())
    assert np.array_equal(prompt.pixel_values[image_patches:], ref.pixel_values_videos.numpy())
    # 2 fps of a 30 fps clip: frames 0, 18, 36, 53, 71, 89 -> groups at (0 + 18) / 2 / 30 s, ...
    expected = [round(t, 1) for t in oracle.video_timestamps(VIDEO)]
    assert prompt.video_timestamps == [expected] == [[0.3, 1.5, 2.7]]
    for t in expected:
        assert f"<{t:.1f} seconds>" in ref.text
    assert prompt.input_ids.size == ref.input_ids.shape[1]
    assert np.array_equal(_placeholders_marked(prompt.input_ids, spec), _placeholders_marked(ref.input_ids[0], spec))
    # each placeholder run is as long as its block's tokens, in prompt order
    tokens = [int(np.prod(g)) // spec.spatial_merge_size ** 2 for g in prompt.image_grid_thw]
    assert sorted(prompt.input_ids[prompt.input_ids >= spec.vocab_size] - spec.vocab_size) == list(range(sum(tokens)))


def test_video_mrope_equals_transformers_get_rope_index(preprocessor, oracle, spec):
    """The M-RoPE positions of a prompt with an image and two videos equal get_rope_index's (each
    frame group positioned as an image of its own, after its timestamp text)."""
    prompt = preprocessor("Compare them.", [IMAGE], [VIDEO, VIDEO2])
    ours, delta = mrope.position_ids(prompt.input_ids, prompt.image_grid_thw, spec)
    ref = oracle.inputs("Compare them.", [IMAGE], [VIDEO, VIDEO2])
    pos, deltas = oracle.model.model.get_rope_index(ref.input_ids, ref.mm_token_type_ids, ref.image_grid_thw,
                                                    ref.video_grid_thw.clone())
    assert np.array_equal(ours, pos[:, 0].numpy())
    assert delta == int(deltas[0, 0])


def test_only_the_kept_frames_are_converted_and_decoding_stops_after_the_last(preprocessor, monkeypatch):
    """read_video_pyav converts the kept frames only, and stops decoding after the last kept frame."""
    converted = []
    original = av.VideoFrame.to_ndarray

    def counting(frame, *a, **kw):
        converted.append(frame.pts)
        return original(frame, *a, **kw)

    monkeypatch.setattr(av.VideoFrame, "to_ndarray", counting)
    frames, meta = preprocessor.videos.decode(VIDEO, "video[0]")
    assert len(converted) == len(meta.frames_indices) == frames.shape[0] == 6


def _written(path_or_buf, frames=3, rate=30, size=(64, 64), codec="libx264", fmt="mp4", **options):
    with av.open(path_or_buf, "w", format=fmt, options=options) as out:
        s = out.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        out.start_encoding()  # the header, even with no frame to follow
        for i in range(frames):
            img = np.full((size[1], size[0], 3), 40 * i % 256, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


def bad_videos(tmp_path) -> dict[str, tuple[bytes, str]]:
    """name -> (an encoded video that must be refused, a piece of its error)."""
    faststart = tmp_path / "faststart.mp4"  # moov first: a file cut in its frames still opens
    _written(str(faststart), frames=90, size=(160, 120), movflags="faststart")
    hour = io.BytesIO()  # three frames half an hour apart: 1.5 hours declared
    _written(hour, frames=3, rate=fractions.Fraction(1, 1800))
    empty = io.BytesIO()
    _written(empty, frames=0)
    y4m = b"YUV4MPEG2 W10000 H10000 F30:1 Ip A1:1 C420jpeg\nFRAME\n" + bytes(1000)  # declares 10000x10000
    return {
        "truncated": (VIDEO[:len(VIDEO) // 2], "cannot be decoded: not a complete video file"),
        "truncated in its frames": (faststart.read_bytes()[:faststart.stat().st_size * 2 // 3], "truncated"),
        "wrong container": (b"this is a text file, not a video\n" * 20, "cannot be decoded"),
        "an image": (IMAGE, "is an image (png), not a video"),
        "zero frames": (empty.getvalue(), "has no video stream"),
        "10000x10000 frames": (y4m, "has 10000x10000 = 100000000 pixels per frame, above the limit of 8294400"),
        "a claimed hour": (hour.getvalue(), "seconds, above the limit of 600"),
    }


def test_bad_videos_are_refused_by_name_before_their_frames_are_decoded(preprocessor, tmp_path, monkeypatch):
    cases = bad_videos(tmp_path)
    original, converted = av.VideoFrame.to_ndarray, []

    def counting(frame, *a, **kw):
        converted.append(frame.pts)
        return original(frame, *a, **kw)

    monkeypatch.setattr(av.VideoFrame, "to_ndarray", counting)
    for name, (raw, why) in cases.items():
        converted.clear()
        with pytest.raises(InputError) as err:
            preprocessor("Describe.", [], [raw])
        assert err.value.input == "video[0]" and why in str(err.value), (name, str(err.value))
        # only a file cut within its frames is found out by decoding them; the others before any frame
        assert (converted != []) == (name == "truncated in its frames"), name
    with pytest.raises(InputError, match=r"video\[0\]: keeps 6 frames of 160x120 = 115200 pixels, above"):
        preprocessor.videos.limits = VideoLimits(pixels=100_000)
        try:
            preprocessor("Describe.", [], [VIDEO])
        finally:
            preprocessor.videos.limits = preprocessor.limits.video
    with pytest.raises(InputError, match=r"video\[0\]: has 90 frames, above the limit of 60"):
        probe(VIDEO, "video[0]", VideoLimits(frames=60))
    with pytest.raises(InputError, match=r"video: 3 videos given, at most 2"):
        preprocessor("Describe.", [], [VIDEO] * 3)


# -- served ----------------------------------------------------------------------------------------
pytestmark_server = pytest.mark.server


@pytest.fixture(scope="module")
def api(server, tmp_path_factory):
    srv = OpenAIServer(server.grpc_url, "127.0.0.1", free_ports(1)[0], Settings(**SERVER_SETTINGS),
                       log_file=tmp_path_factory.mktemp("openai-video") / "openai.log").start()
    yield srv
    srv.stop()


@pytestmark_server
def test_a_video_with_text_is_served_as_transformers_generates(server, oracle):
    import json
    import urllib.request

    from qwen3vl_triton.clients.qwen3vl import Qwen3VLRequest

    ids = oracle.generate("What moves in this video?", [], 24, videos=[VIDEO])
    prompt_tokens = oracle.inputs("What moves in this video?", [], [VIDEO]).input_ids.shape[1]
    with Client(server.grpc_url, "grpc") as c:
        oracle.assert_served("".join(c.generate("What moves in this video?", [], 24, videos=[VIDEO])), ids)
    # HTTP generate (the video as base64): the text and the prompt's length, video tokens included
    body = Qwen3VLRequest("What moves in this video?", [], 24, videos=[VIDEO]).json_body()
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/qwen3vl/generate",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        out = json.loads(resp.read())
    oracle.assert_served(out["text_output"], ids)
    assert out["prompt_tokens"] == prompt_tokens > 60  # three frame groups of 20 tokens, timestamps, text


@pytestmark_server
def test_a_conversation_mixing_a_video_and_an_image_through_every_path(server, api, oracle):
    ids = oracle.generate_messages(MIXED, 24)
    expected = oracle.text(ids)
    ref = oracle.conversation_inputs(*openai_to_template(MIXED))
    # the ensemble, over gRPC, with the client library's conversation
    conv = Conversation([MIXED[0]])
    conv.user("What moves in this video?", videos=[VIDEO]).assistant(MIXED[2]["content"])
    conv.user("Is this picture from the same place?", images=[IMAGE])
    assert conv.messages[1]["content"][0]["video_url"]["url"].startswith("data:video/mp4;base64,")
    with Client(server.grpc_url, "grpc") as c:
        oracle.assert_served("".join(c.chat(conv.messages, 24)), ids)
    # the disaggregated path: encode on this server, the table to its language model
    with Disaggregated(server.grpc_url, server.grpc_url) as d:
        oracle.assert_served("".join(d.generate(messages=MIXED, max_tokens=24)), ids)
    # the OpenAI endpoint, with the official client: the text and the prompt's exact token count
    with openai.OpenAI(base_url=f"http://{api.url}/v1", api_key="none", max_retries=0, timeout=120) as oai:
        out = oai.chat.completions.create(model="qwen3vl", messages=MIXED, max_tokens=24)
    assert out.choices[0].message.content == expected
    assert out.usage.prompt_tokens == ref.input_ids.shape[1]
    assert out.usage.completion_tokens == len(ids)


@pytestmark_server
def test_bad_videos_get_one_clear_error_each_and_the_server_keeps_serving(server, api, tmp_path, oracle):
    with Client(server.grpc_url, "grpc") as c:
        for name, (raw, why) in bad_videos(tmp_path).items():
            with pytest.raises(ClientError) as err:
                "".join(c.generate("Describe.", [], 8, videos=[raw]))
            assert err.value.error.input == "video[0]" and why in str(err.value), (name, str(err.value))
        ids = oracle.generate("What moves in this video?", [], 16, videos=[VIDEO])
        oracle.assert_served("".join(c.generate("What moves in this video?", [], 16, videos=[VIDEO])), ids)
    # the OpenAI endpoint: a 400 naming the part
    bad = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(VIDEO[:500]).decode()}},
        {"type": "text", "text": "Describe."}]}]
    with openai.OpenAI(base_url=f"http://{api.url}/v1", api_key="none", max_retries=0, timeout=120) as oai:
        with pytest.raises(openai.BadRequestError) as err:
            oai.chat.completions.create(model="qwen3vl", messages=bad, max_tokens=8)
        assert "messages[0].content[0].video_url" in str(err.value) and "cannot be decoded" in str(err.value)
        remote = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "https://x.invalid/a.mp4"}}]}]
        with pytest.raises(openai.BadRequestError, match="remote URLs are not fetched"):
            oai.chat.completions.create(model="qwen3vl", messages=remote, max_tokens=8)
