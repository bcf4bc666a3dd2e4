"""Sample prompts in kohya's formats, and sampling with tiny SD1.5 / SDXL models that leaves training untouched."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from kohya_backend.errors import ConfigError, ModelError
from kohya_backend.train.sample import (
    SAMPLERS,
    SamplePrompt,
    generate_samples,
    load_sample_prompts,
    make_sample_scheduler,
    parse_sample_prompts,
)

# diffusers' k-schedulers trip numpy 2 deprecation warnings thousands of times per run
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SPECIAL = ["<|startoftext|>", "<|endoftext|>"]
VOCAB = [*LETTERS, *(c + "</w>" for c in LETTERS), "!", "!</w>", "ca", "cat</w>", *SPECIAL]


def _tokenizer(folder: Path, pad: str = "<|endoftext|>") -> CLIPTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(VOCAB)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77, pad_token=pad)


def _text_encoder(hidden: int, projection: int | None = None) -> torch.nn.Module:
    config = CLIPTextConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        bos_token_id=VOCAB.index("<|startoftext|>"),
        eos_token_id=VOCAB.index("<|endoftext|>"),
        pad_token_id=VOCAB.index("<|endoftext|>"),
    )
    torch.manual_seed(0)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        layers_per_block=1,
    )


def _unet(sdxl: bool) -> UNet2DConditionModel:
    torch.manual_seed(0)
    common = {
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "sample_size": 32,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    }
    if not sdxl:
        return UNet2DConditionModel(cross_attention_dim=32, **common)
    return UNet2DConditionModel(
        cross_attention_dim=32 + 64,  # TE1 hidden + TE2 hidden, as SDXL concatenates them
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,  # TE2 projection + six time ids
        use_linear_projection=True,
        attention_head_dim=(2, 4),
        **common,
    )


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("tok")
    return {
        "family": "sd_1_5",
        "unet": _unet(sdxl=False),
        "vae": _vae(),
        "text_encoders": [_text_encoder(32)],
        "tokenizers": [_tokenizer(folder)],
    }


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("tok")
    return {
        "family": "sd_xl",
        "unet": _unet(sdxl=True),
        "vae": _vae(),
        "text_encoders": [_text_encoder(32), _text_encoder(64, projection=32)],
        "tokenizers": [_tokenizer(folder / "one"), _tokenizer(folder / "two", pad="!")],
    }


PROMPT_FILE = """# kohya sample prompts
a cat --n dog --w 64 --h 64 --d 1 --s 2 --l 5.5

cat on a mat --w 70 --h 80 --d 3 --s 2 --ss euler_a
"""


def test_parse_kohya_prompt_lines() -> None:
    prompts = parse_sample_prompts(PROMPT_FILE, default_size=(512, 768))
    assert prompts == [
        SamplePrompt(prompt="a cat", negative="dog", width=64, height=64, seed=1, scale=5.5, steps=2),
        # sizes round down to a multiple of 8, like kohya's sampler
        SamplePrompt(prompt="cat on a mat", width=64, height=80, seed=3, steps=2, sampler="euler_a"),
    ]
    plain = parse_sample_prompts("a dog", default_size=(512, 768))[0]
    assert (plain.width, plain.height, plain.seed, plain.scale, plain.steps) == (512, 768, None, 7.5, 20)
    assert parse_sample_prompts("x --s 5000 --W 32", default_size=(512, 512))[0].steps == 1000
    assert parse_sample_prompts("x --W 32", default_size=(512, 512))[0].width == 64


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        ("ok\n\na cat --q 3", "unknown or empty option", 3),
        ("a cat --w wide", "bad value", 1),
        ("--w 64", "prompt text before the options is empty", 1),
    ],
)
def test_bad_prompt_lines_name_the_line(text: str, message: str, line: int) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_sample_prompts(text, default_size=(512, 512))
    assert info.value.issues[0].line == line
    assert info.value.issues[0].key == "sample_prompts"


def test_json_and_toml_prompt_files(tmp_path: Path) -> None:
    json_file = tmp_path / "prompts.json"
    json_file.write_text(
        json.dumps(
            [{"prompt": "a cat", "negative_prompt": "dog", "width": 64, "sample_steps": 3, "seed": 9}]
        ),
        encoding="utf-8",
    )
    assert load_sample_prompts(json_file, default_size=(512, 512)) == [
        SamplePrompt(prompt="a cat", negative="dog", width=64, height=512, seed=9, steps=3)
    ]
    toml_file = tmp_path / "prompts.toml"
    toml_file.write_text(
        '[prompt]\nnegative_prompt = "blurry"\nwidth = 128\nheight = 64\nscale = 4.0\n\n'
        '[[prompt.subset]]\nprompt = "a cat"\nseed = 1\n\n'
        '[[prompt.subset]]\nprompt = "a dog"\nwidth = 64\nsample_sampler = "ddim"\n',
        encoding="utf-8",
    )
    assert load_sample_prompts(toml_file, default_size=(512, 512)) == [
        SamplePrompt(prompt="a cat", negative="blurry", width=128, height=64, seed=1, scale=4.0),
        SamplePrompt(prompt="a dog", negative="blurry", width=64, height=64, scale=4.0, sampler="ddim"),
    ]
    with pytest.raises(ConfigError, match="no 'prompt' text"):
        parse_sample_prompts('[{"negative_prompt": "x"}]', default_size=(512, 512))
    with pytest.raises(ConfigError, match="cannot read"):
        load_sample_prompts(tmp_path / "missing.txt", default_size=(512, 512))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_kohya_sampler_name_builds_a_scheduler(name: str) -> None:
    needs_scipy = name in ("lms", "k_lms") and importlib.util.find_spec("scipy") is None
    if needs_scipy:
        with pytest.raises(ConfigError, match="needs a package"):
            make_sample_scheduler(name)
        return
    scheduler = make_sample_scheduler(name, "v_prediction")
    assert type(scheduler).__name__ == SAMPLERS[name].scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.beta_schedule == "scaled_linear"
    scheduler.set_timesteps(4)
    if name.startswith("dpmsolver"):
        assert scheduler.config.algorithm_type == name


def test_unknown_sampler_gets_a_suggestion() -> None:
    with pytest.raises(ConfigError, match="did you mean euler_a"):
        make_sample_scheduler("euler-a")


def _random_streams() -> tuple[list[float], float, float]:
    return torch.rand(2).tolist(), random.random(), float(np.random.rand())


def test_sd15_samples_are_written_and_training_state_is_untouched(sd15: dict, tmp_path: Path) -> None:
    lora = torch.nn.Dropout(0.1)  # stands in for the network being trained: only its train flag matters here
    sd15["unet"].train()
    sd15["unet"].time_embedding.eval()  # a submodule in its own mode keeps it
    lora.train()
    prompts = parse_sample_prompts(PROMPT_FILE, default_size=(64, 64))
    torch.manual_seed(42)
    random.seed(42)
    np.random.seed(42)
    paths = generate_samples(
        **sd15,
        prompts=prompts,
        sampler="ddim",
        out_dir=tmp_path / "sample",
        step=12,
        epoch=2,
        device="cpu",
        dtype=torch.float32,
        file_prefix="demo",
        clip_skip=2,
        network=lora,
    )
    after = _random_streams()
    torch.manual_seed(42)
    random.seed(42)
    np.random.seed(42)
    assert after == _random_streams()  # sampling drew nothing from training's random streams
    assert [p.name for p in paths] == ["demo_e000002_s00000012_00.png", "demo_e000002_s00000012_01.png"]
    assert [Image.open(p).size for p in paths] == [(64, 64), (64, 80)]
    info = Image.open(paths[1]).text["parameters"]
    assert info.startswith("cat on a mat\nSteps: 2, Sampler: euler_a, CFG scale: 7.5, Seed: 3, Size: 64x80")
    assert sd15["unet"].training and not sd15["unet"].time_embedding.training
    assert lora.training  # the network went to eval for sampling and came back
    assert sd15["vae"].training  # a freshly built module is in train mode, and is again after sampling
    assert not any(p.exists() for p in (tmp_path / "sample").glob(".*.tmp"))


def test_same_seed_gives_the_same_image(sd15: dict, tmp_path: Path) -> None:
    prompts = [SamplePrompt(prompt="a cat", width=64, height=64, seed=7, steps=2)]
    first = generate_samples(
        **sd15,
        prompts=prompts,
        sampler="euler_a",
        out_dir=tmp_path / "a",
        step=1,
        epoch=1,
        device="cpu",
        dtype=torch.float32,
    )
    second = generate_samples(
        **sd15,
        prompts=prompts,
        sampler="euler_a",
        out_dir=tmp_path / "b",
        step=1,
        epoch=1,
        device="cpu",
        dtype=torch.float32,
    )
    other = generate_samples(
        **sd15,
        prompts=[SamplePrompt(prompt="a cat", width=64, height=64, seed=8, steps=2)],
        sampler="euler_a",
        out_dir=tmp_path / "c",
        step=1,
        epoch=1,
        device="cpu",
        dtype=torch.float32,
    )
    pixels = [np.asarray(Image.open(p[0])) for p in (first, second, other)]
    assert np.array_equal(pixels[0], pixels[1])
    assert not np.array_equal(pixels[0], pixels[2])


def test_sdxl_samples_under_bf16_autocast(sdxl: dict, tmp_path: Path) -> None:
    sdxl["unet"].train()
    state = torch.get_rng_state()
    paths = generate_samples(
        **sdxl,
        prompts=[SamplePrompt(prompt="a cat", negative="dog", width=64, height=64, seed=1, steps=2)],
        sampler="dpmsolver++",
        out_dir=tmp_path,
        step=3,
        epoch=1,
        device="cpu",
        dtype=torch.bfloat16,
    )
    assert [p.name for p in paths] == ["sample_e000001_s00000003_00.png"]
    image = np.asarray(Image.open(paths[0]))
    assert image.shape == (64, 64, 3)
    assert torch.equal(state, torch.get_rng_state())
    assert sdxl["unet"].training
    assert sdxl["vae"].dtype == torch.float32  # the VAE is not cast: it decodes in its own precision


def test_wrong_component_count_is_a_model_error(sd15: dict, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="SDXL needs 2 text encoder"):
        generate_samples(
            **{**sd15, "family": "sd_xl"},
            prompts=[SamplePrompt(prompt="a cat", width=64, height=64, steps=1)],
            sampler="ddim",
            out_dir=tmp_path,
            step=0,
            epoch=0,
            device="cpu",
            dtype=torch.float32,
        )
    assert (
        generate_samples(
            **sd15,
            prompts=[],
            sampler="ddim",
            out_dir=tmp_path,
            step=0,
            epoch=0,
            device="cpu",
            dtype=torch.float32,
        )
        == []
    )


def test_clip_skip_changes_the_sd15_conditioning(sd15: dict, tmp_path: Path) -> None:
    prompts = [SamplePrompt(prompt="a cat", negative="dog", width=64, height=64, seed=5, steps=2)]
    images = []
    for skip in (None, 1, 2):
        paths = generate_samples(
            **sd15,
            prompts=prompts,
            sampler="ddim",
            out_dir=tmp_path / str(skip),
            step=1,
            epoch=1,
            device="cpu",
            dtype=torch.float32,
            clip_skip=skip,
        )
        images.append(np.asarray(Image.open(paths[0])))
    assert np.array_equal(images[0], images[1])  # kohya's clip_skip 1 is the last layer, the default
    assert not np.array_equal(images[0], images[2])
