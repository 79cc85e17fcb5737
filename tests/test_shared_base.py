"""Several adapters on one frozen base (`adapter.load_sharing`, what the app does with `--adapter A B`): every
base tensor is the first model's own, and each adapter computes exactly what it computes loaded alone."""

from __future__ import annotations

import pytest
import torch

import adapter
from adapter.config import ModelArgs
from adapter.loading import attach_clip
from adapter.random_demo import write_random_demo
from adapter.random_model import write_random_base
from tests.conftest import TINY, V1, V2, randomize_adapter

TOKENS = torch.tensor([[1, 45, 300, 7, 99, 12]])
PICTURE = torch.zeros(40, 40, 3, dtype=torch.uint8).numpy()


@pytest.fixture(scope="module")
def adapters(base_folder, tmp_path_factory) -> dict:
    """A trained-looking v1 adapter and a v2 one (biases, LoRA, tuned norms) for the `base_folder` base."""
    folder = tmp_path_factory.mktemp("adapters")
    written = {}
    for name, args, seed in (("v1", V1, 1), ("v2", V2, 2)):
        model = randomize_adapter(adapter.load(base_folder, adapter=args, device="cpu"), seed=seed)
        written[name] = adapter.save_adapter(model, folder / name).parent
    return written


def base_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if not model.is_adapter_parameter(n)]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("first_adapter, second_adapter", [("v2", "v1"), ("v1", "v2"), (None, "v2")])
def test_a_sharing_model_reads_the_first_models_tensors_and_answers_as_if_alone(base_folder, adapters, quantize,
                                                                                  first_adapter, second_adapter):
    first = adapter.load(base_folder, adapter=adapters.get(first_adapter), device="cpu", quantize=quantize)
    alone = adapter.load(base_folder, adapter=adapters[second_adapter], device="cpu", quantize=quantize)
    for model in (first, alone):  # on CPUs with AVX512-BF16 bitsandbytes repacks 4-bit weights on a first call
        logits(model)
    before = logits(first)
    second = adapter.load_sharing(first, adapters[second_adapter])

    names = base_names(second)
    assert names == base_names(alone) and len(names) == 3 + 9 * TINY.n_layers
    for name in names:
        assert second.get_parameter(name).data_ptr() == first.get_parameter(name).data_ptr(), name
    assert torch.equal(logits(second), logits(alone))
    assert torch.equal(logits(first), before), "the first model is unchanged"
    assert (second.quantization, second.tokenizer) == (quantize, first.tokenizer)
    # the learned tensors are the second's own: a tuned norm's delta stays with the adapter that tunes it
    learned = dict(second.trainable_parameters())
    assert learned.keys() == dict(alone.trainable_parameters()).keys()
    theirs = dict(first.named_parameters())
    assert all(p.data_ptr() != theirs[n].data_ptr() for n, p in learned.items() if n in theirs)
    assert ("norm.delta" in learned) == (second_adapter == "v2")
    assert ("norm.delta" in dict(first.named_parameters())) == (first_adapter == "v2")


def test_a_fresh_adapter_to_train_can_share_too(base_folder, adapters):
    first = adapter.load(base_folder, adapter=adapters["v1"], device="cpu")
    fresh = adapter.load_sharing(first, V2)
    bare = adapter.load(base_folder, device="cpu")
    assert torch.equal(logits(fresh), logits(bare)), "zero-init: a fresh adapter computes its base"
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {n for n, _ in fresh.named_parameters() if fresh.is_adapter_parameter(n)}


def test_adapters_that_do_not_fit_the_shared_base_are_refused(base_folder, adapters, tmp_path):
    other = write_random_base(tmp_path / "other", ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=512,
                                                           multiple_of=32), seed=0)
    small = adapter.save_adapter(adapter.load(other, adapter=V1, device="cpu"), tmp_path / "small")
    first = adapter.load(base_folder, device="cpu")
    with pytest.raises(ValueError, match=f"{small}.*dim"):
        adapter.load_sharing(first, small.parent)
    with pytest.raises(ValueError, match="clip: this adapter has no visual prompt"):
        adapter.load_sharing(first, adapters["v1"], clip="anything.safetensors")


@pytest.mark.parametrize("clip_quantize", [None, "nf4"])
def test_image_adapters_on_one_base_share_one_clip_tower(base_folder, tmp_path, clip_quantize):
    one = write_random_demo(tmp_path / "one", base=base_folder, seed=0)
    two = write_random_demo(tmp_path / "two", base=base_folder, seed=1)
    towers: dict = {}
    first = adapter.load(base_folder, adapter=one.adapter, device="cpu")
    second = adapter.load_sharing(first, two.adapter)
    for model in (first, second):
        attach_clip(model, one.clip, str(one.clip_model), clip_quantize, towers)
    assert first.image_encoder is second.image_encoder and len(towers) == 1
    alone = adapter.load(base_folder, adapter=two.adapter, device="cpu", clip=one.clip, clip_model=str(one.clip_model),
                         clip_quantize=clip_quantize)
    prompt = adapter.image_question("What is it?")
    answers = [m.generate(prompt, image=PICTURE, temperature=0.0, max_new_tokens=8) for m in (second, alone)]
    assert answers[0] == answers[1]
