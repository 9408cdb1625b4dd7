"""NLD-VLM inputs: the preprocessing rules and grid table of spec vlm-tp-quant 1.4, bad images
with clear errors (API and server; the server keeps serving), image_url parts through the
``openai`` client in every mode, and ``trimode generate --image``."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_utils import running
from trimode import LLM, SamplingParams
from trimode.multimodal.image import ImageError, ImageLimits, load_image
from trimode.multimodal.preprocess import (CLIP_MEAN, CLIP_STD, grid_size, image_token_ids,
                                           preprocess)
from trimode.checkpoint.tiny_vlm import write_tiny_vlm
from vlm_utils import random_image

GRID = [((1400, 1400), (50, 50)), ((1540, 1540), (50, 50)), ((28, 28), (1, 1)),
        ((29, 28), (2, 1)), ((50, 100), (2, 4)), ((1500, 3000), (25, 50)),
        ((1401, 1401), (50, 50)), ((3080, 770), (50, 13))]
TOKENS = [((28, 28), 3), ((28, 56), 4), ((56, 28), 5), ((1540, 1540), 2551)]


@pytest.mark.parametrize("size,grid", GRID)
def test_grid_table(size, grid):
    assert grid_size(*size) == grid


@pytest.mark.parametrize("size,count", TOKENS)
def test_token_counts(size, count):
    ids = image_token_ids(*grid_size(*size))
    assert len(ids) == count
    assert ids[0] == 18 and ids[-1] == 21 and ids.count(19) == grid_size(*size)[0] * grid_size(*size)[1]


def test_token_block_layout():
    assert image_token_ids(2, 3) == [18, 19, 19, 19, 20, 19, 19, 19, 21]


def test_preprocess_rounds_up_resizes_bicubic_and_normalises():
    import cv2

    img = random_image(0, 50, 100)
    x = preprocess(img)
    assert x.pixel_values.shape == (3, 56, 112) and (x.rows, x.cols) == (2, 4)
    want = cv2.resize(np.asarray(img, np.float32), (112, 56), interpolation=cv2.INTER_CUBIC)
    want = (want / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    assert np.abs(x.pixel_values.permute(1, 2, 0).numpy() - want).max() < 1e-5
    big = preprocess(random_image(1, 1540, 700))
    assert big.pixel_values.shape[1:] == (1400, 644)  # 700*1400/1540 = 636.4 -> 636 -> 644


def test_alpha_onto_white_and_no_exif_rotation():
    rgba = Image.new("RGBA", (28, 28), (10, 20, 30, 0))
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    x = preprocess(load_image(rgba))
    white = (1 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    assert np.allclose(x.pixel_values[:, 0, 0].numpy(), white, atol=1e-5)
    img = random_image(2, 28, 56)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees": the remote loader ignores it
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (56, 28)


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def data_url(img) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


BAD = {
    "truncated": lambda: "data:image/png;base64," + base64.b64encode(
        png_bytes(random_image(3))[:300]).decode(),
    "not an image": lambda: "data:image/png;base64," + base64.b64encode(b"hello").decode(),
    "zero": lambda: Image.new("RGB", (0, 0)),
    "huge side": lambda: data_url(Image.new("L", (20_000, 2))),
    "remote": lambda: "https://example.com/cat.png",
    "missing file": lambda: "/nonexistent/cat.png",
}
WHY = {"truncated": "cannot decode", "not an image": "cannot decode", "zero": "0x0",
       "huge side": "at most 10000", "remote": "remote URLs", "missing file": "cannot read"}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_images_give_clear_errors(kind):
    with pytest.raises(ImageError, match=WHY[kind]):
        load_image(BAD[kind](), ImageLimits(), "messages[0].content[0]")


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return write_tiny_vlm(tmp_path_factory.mktemp("vlm_inputs"), seed=4)[0]


@pytest.fixture(scope="module")
def vlm_llm(vlm_dir):
    return LLM(str(vlm_dir))


def test_too_many_images_and_paths(vlm_llm, tmp_path):
    path = tmp_path / "cat.png"
    random_image(5).save(path)
    part = {"type": "image_url", "image_url": {"url": str(path)}}
    with pytest.raises(ImageError, match="at most 8"):
        vlm_llm.chat([{"role": "user", "content": [part] * 9}])
    one = vlm_llm.chat([{"role": "user", "content": [part, {"type": "text", "text": "w5"}]}],
                       SamplingParams(max_tokens=4))[0]
    pil = vlm_llm.chat([{"role": "user", "content": [{"type": "image", "image": Image.open(path)},
                                                     {"type": "text", "text": "w5"}]}],
                       SamplingParams(max_tokens=4))[0]
    assert one.token_ids == pil.token_ids and one.prompt_token_ids.count(19) == 12


@pytest.fixture(scope="module")
def vlm_server(vlm_dir):
    from trimode.engine import AsyncEngine
    from trimode.entrypoints.server.app import ServerConfig, build_app

    llm = LLM(str(vlm_dir))
    engine = AsyncEngine(llm)
    config = ServerConfig(model_name="tiny-vlm", mode="ar", max_tokens=8, temperature=0.0)
    app = build_app(engine, llm.tokenizer, llm.config.vocab_size, config, vision=llm.config.vision)
    with running(app) as url:
        yield url
    engine.shutdown()


def image_message(url: str, text: str = "w5 w6") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear_spec", "quadratic_spec"])
def test_openai_client_image_every_mode_equals_offline(vlm_server, vlm_llm, mode):
    from openai import OpenAI

    client = OpenAI(base_url=vlm_server + "/v1", api_key="none", max_retries=0, timeout=60)
    messages = image_message(data_url(random_image(6)))
    knobs = {"block_length": 4} if mode != "ar" else {}
    reply = client.chat.completions.create(model="tiny-vlm", messages=messages, max_tokens=8,
                                           temperature=0, extra_body={"mode": mode, **knobs})
    offline = vlm_llm.chat(messages, SamplingParams(mode=mode, max_tokens=8, **knobs,
                                                    threshold=0.9 if mode == "diffusion" else None))[0]
    assert reply.choices[0].message.content == offline.text
    assert reply.usage.prompt_tokens == len(offline.prompt_token_ids)


def test_server_bad_images_400_and_keeps_serving(vlm_server):
    url = vlm_server + "/v1/chat/completions"
    cases = {k: BAD[k]() for k in ("truncated", "not an image", "huge side", "remote")}
    cases["local file"] = __file__  # the server never reads its own files for a client
    cases["too many"] = None
    for kind, source in cases.items():
        messages = image_message(source) if source else \
            [{"role": "user", "content": [image_message(data_url(random_image(1)))[0]["content"][0]] * 9}]
        r = httpx.post(url, json={"messages": messages, "max_tokens": 4}, timeout=60)
        assert r.status_code == 400, (kind, r.text)
        assert r.json()["error"]["param"] == "messages", (kind, r.text)
        why = {"too many": "at most 8", "local file": "only data:image"}.get(kind) or WHY[kind]
        assert why in r.json()["error"]["message"], (kind, r.text)
    r = httpx.post(url, json={"messages": image_message(data_url(random_image(2))),
                              "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_text_only_server_refuses_images(tiny):
    from trimode.engine import AsyncEngine
    from trimode.entrypoints.server.app import ServerConfig, build_app

    llm = LLM(str(tiny[0]))
    engine = AsyncEngine(llm)
    app = build_app(engine, llm.tokenizer, llm.config.vocab_size, ServerConfig(model_name="t"))
    with running(app) as url:
        r = httpx.post(url + "/v1/chat/completions", timeout=60,
                       json={"messages": image_message(data_url(random_image(1))), "max_tokens": 2})
        assert r.status_code == 400 and "text only" in r.json()["error"]["message"]
    engine.shutdown()


def test_cli_generate_with_images(vlm_dir, vlm_llm, tmp_path, capsys):
    from trimode.entrypoints.cli.main import main

    paths = []
    for i in range(2):
        paths.append(tmp_path / f"im{i}.png")
        random_image(20 + i, 40 + 20 * i, 60).save(paths[-1])
    with pytest.raises(SystemExit) as done:
        main(["generate", "--model", str(vlm_dir), "--image", str(paths[0]), "--image",
              str(paths[1]), "--mode", "linear_spec", "--max-tokens", "6", "w5 w6"])
    out = capsys.readouterr()
    assert done.value.code == 0, out.err
    parts = [{"type": "image_url", "image_url": {"url": str(p)}} for p in paths]
    offline = vlm_llm.chat([{"role": "user", "content": parts + [{"type": "text", "text": "w5 w6"}]}],
                           SamplingParams(mode="linear_spec", max_tokens=6))[0]
    assert out.out.strip() == offline.text.strip() and offline.text.strip()
    with pytest.raises(SystemExit) as done:
        main(["generate", "--model", str(vlm_dir), "--image", str(tmp_path / "nope.png"), "w5"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "nope.png" in err and "Traceback" not in err
