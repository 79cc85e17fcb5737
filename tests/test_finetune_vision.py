"""--mode vision: training the visual prompt on LLaVA-style image conversations, the CLIP tower frozen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import adapter
from adapter.finetune import train, trainer
from adapter.finetune.config import TrainConfig
from adapter.visual import load_image_encoder
from tests.finetune_helpers import one_thread_and_own_rng, tiny_config  # noqa: F401  (fixture)
from tests.test_visual import CLIP_CONFIG, clip_files  # noqa: F401  (fixture)

COLOURS = {"red": (220, 20, 30), "blue": (20, 40, 220), "green": (20, 180, 40), "yellow": (230, 210, 20)}


@pytest.fixture()
def image_data(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    records = []
    for index, (name, rgb) in enumerate(COLOURS.items()):
        Image.new("RGB", (40, 40), rgb).save(folder / f"{name}.png")
        records.append({"image": f"{name}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the picture?"}, {"from": "gpt", "value": name}]})
    data = tmp_path / "llava.json"
    data.write_text(json.dumps(records * 4))
    return data, folder


def test_vision_mode_trains_the_visual_prompt_and_nothing_frozen(base_folder, clip_files, image_data, tmp_path):
    config_json, weights, _ = clip_files
    data, folder = image_data
    config = tiny_config(base_folder, data, tmp_path / "run", mode="vision", image_folder=str(folder),
                         clip=str(weights), clip_model=str(config_json), visual="v1", epochs=6)
    result = train(config)
    assert result.train_losses[-1] < result.train_losses[0]
    model = adapter.load(base_folder, adapter=result.adapter, clip=weights, clip_model=str(config_json), device="cpu")
    assert model.adapter_args.visual == "v1" and model.adapter_args.clip_dim == CLIP_CONFIG["embed_dim"]
    fresh = adapter.load(base_folder, adapter=model.adapter_args, device="cpu")
    assert not torch.equal(model.visual_prompt.proj.weight, fresh.visual_prompt.proj.weight) or \
        not torch.equal(model.visual_prompt.norm.weight, fresh.visual_prompt.norm.weight), "the visual prompt learned"
    base = adapter.load(base_folder, device="cpu")
    for name, value in base.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    tower = load_image_encoder(weights, str(config_json))
    for name, value in tower.state_dict().items():
        assert torch.equal(model.image_encoder.state_dict()[name], value), name


def test_vision_mode_needs_a_clip_tower(base_folder, tmp_path):
    with pytest.raises(ValueError, match="--clip: --mode vision needs the CLIP tower"):
        TrainConfig(base=str(base_folder), data="x.json", out=str(tmp_path), mode="vision")


def test_visual_lr_sets_the_visual_prompts_own_step_size(base_folder, clip_files, image_data, tmp_path, monkeypatch):
    config_json, weights, _ = clip_files
    data, folder = image_data
    initial = {}
    real = trainer.build_optimizer

    def build_optimizer(model, *args, **kwargs):
        initial.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(trainer, "build_optimizer", build_optimizer)
    config = tiny_config(base_folder, data, tmp_path / "run", mode="vision", image_folder=str(folder),
                         clip=str(weights), clip_model=str(config_json), visual="v1", epochs=2, visual_lr=1e-9)
    model = adapter.load(base_folder, adapter=train(config).adapter, clip=weights, clip_model=str(config_json),
                         device="cpu")
    trained = dict(model.named_parameters())
    moved = {n: float((trained[n].detach() - initial[n]).abs().max()) for n in initial}
    visual = [n for n in moved if n.startswith("visual_prompt.")]
    assert visual and all(moved[n] < 1e-6 for n in visual), "the visual prompt moved by about visual_lr per step"
    assert moved["adapter_query.weight"] > 1e-4, "the rest at the full lr"
    with pytest.raises(ValueError, match="--visual-lr: must be positive, got -0.1"):
        TrainConfig(base="b", data="d", out="o", mode="vision", clip="c", visual_lr=-0.1)


def test_a_clip_config_named_relative_to_the_run_is_found_from_anywhere(base_folder, clip_files, image_data, tmp_path,
                                                                         monkeypatch):
    """The adapter reads a relative clip_model relative to its own folder, so the run writes the config beside
    the adapter and records its name."""
    config_json, weights, _ = clip_files
    data, folder = image_data
    monkeypatch.chdir(config_json.parent)
    config = tiny_config(base_folder, data, tmp_path / "run", mode="vision", image_folder=str(folder),
                         clip=str(weights), clip_model=config_json.name, visual="v1", epochs=1)
    result = train(config)
    monkeypatch.chdir(tmp_path)
    model = adapter.load(base_folder, adapter=result.adapter, clip=weights, device="cpu")
    copied = Path(model.adapter_args.clip_model)
    assert copied.parent == Path(result.adapter).parent and copied.read_bytes() == config_json.read_bytes()
    assert model.image_encoder.output_dim == CLIP_CONFIG["embed_dim"]
