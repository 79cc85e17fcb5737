"""Llama 3 family bases: scaled RoPE against transformers' own frequencies, the byte-level BPE tokenizer
against tiktoken (Meta's reference) and transformers' converted tokenizer.json, and a Llama-3-shaped HF
folder (tied embeddings, GQA, llama3 RoPE, tokenizer.json) giving transformers' logits."""

from __future__ import annotations

import base64
import json
import random
import shutil
from pathlib import Path

import pytest
import tiktoken
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import adapter
from adapter.bpe_tokenizer import LLAMA3_SPLIT, BPETokenizer, llama3_special_tokens, read_ranks
from adapter.config import ModelArgs, RopeScaling
from adapter.engine import Engine, Settings
from adapter.inspect import main as inspect_main
from adapter.model import rope_frequencies
from adapter.random_model import main as random_model_main
from adapter.random_model import write_random_base
from adapter.tokenizer import open_tokenizer

# rope_theta 500000 and a 16-wide head put the 8 frequencies in all three bands of a 64-token original context
ARGS = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=768, multiple_of=32,
                 rope_theta=500000.0, rope_scaling=RopeScaling("llama3", 8.0, original_max_len=64), max_seq_len=128)
BOS, EOS, EOM, EOT = 512, 513, 520, 521  # 512 ranks, then Llama 3's special tokens at their offsets
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "I'M sure it's fine, they'll say; WE'VE done it, DON'T worry",
    "Numbers: 1234567890 and 3.14159, 42nd, 1,000,000",
    "  leading and   inner   spaces\tand\ttabs  ",
    "lines\n\nand\r\nwindows\r\n\r\nbreaks\n",
    "def square(x):\n    return x ** 2  # comment\n",
    "café naïve über smörgåsbord — “quotes” …",
    "日本語のテキスト、東京。 Ελληνικά, русский, العربية",
    "emoji 🙂🚀 and a family 👨‍👩‍👧 and flags 🇫🇷",
    "special <|eot_id|> in text and <|begin_of_text|> too",
    "",
]


@pytest.fixture(scope="module")
def meta_llama3(tmp_path_factory) -> Path:
    """A Meta-format Llama 3 folder: tiktoken tokenizer.model, GQA, llama3 RoPE scaling."""
    return write_random_base(tmp_path_factory.mktemp("llama3"), ARGS, seed=5, tokenizer="tiktoken")


@pytest.fixture(scope="module")
def reference(meta_llama3) -> tiktoken.Encoding:
    """Meta's own tokenizer for these ranks: tiktoken with Llama 3's split pattern and special tokens."""
    ranks = read_ranks(meta_llama3 / "tokenizer.model")
    specials = {name: len(ranks) + index for index, name in enumerate(llama3_special_tokens())}
    return tiktoken.Encoding("llama3-fixture", pat_str=LLAMA3_SPLIT, mergeable_ranks=ranks, special_tokens=specials)


def hf_rope_config(head_dim: int, theta: float, scaling: dict) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=131072,
                                    rope_parameters={"rope_theta": theta, **scaling})


@pytest.mark.parametrize("theta, scaling", [
    (500000.0, RopeScaling("llama3", 8.0)),  # Llama 3.1 8B/70B/405B
    (500000.0, RopeScaling("llama3", 32.0)),  # Llama 3.2 1B/3B
    (500000.0, RopeScaling("llama3", 8.0, low_freq_factor=2.0, high_freq_factor=3.0, original_max_len=4096)),
    (10000.0, RopeScaling("linear", 4.0)),
])
def test_rope_frequencies_match_transformers(theta, scaling):
    hf_scaling = {"rope_type": scaling.kind, "factor": scaling.factor}
    if scaling.kind == "llama3":
        hf_scaling.update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor,
                          original_max_position_embeddings=scaling.original_max_len)
    expected, _ = ROPE_INIT_FUNCTIONS[scaling.kind](hf_rope_config(128, theta, hf_scaling), "cpu")
    ours = rope_frequencies(128, theta, torch.device("cpu"), scaling)
    torch.testing.assert_close(ours, expected.float(), rtol=1e-6, atol=0)
    plain = rope_frequencies(128, theta, torch.device("cpu"))
    assert not torch.allclose(ours, plain) and torch.equal(ours[0], plain[0]) == (scaling.kind == "llama3")


def test_meta_use_scaled_rope_is_llama3_scaling():
    shape = {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 768}
    assert ModelArgs.from_params(shape).rope_scaling is None
    assert ModelArgs.from_params({**shape, "use_scaled_rope": True}).rope_scaling == RopeScaling("llama3", 8.0)
    scaled = ModelArgs.from_params({**shape, "use_scaled_rope": True, "rope_scaling_factor": 32})
    assert scaled.rope_scaling == RopeScaling("llama3", 32.0)
    assert ModelArgs.from_params(scaled.to_dict()) == scaled  # our own params.json keeps it too
    for dim, layers, factor in ((2048, 16, 32.0), (3072, 28, 32.0), (4096, 32, 8.0), (2048, 8, 8.0)):
        meta = {"dim": dim, "n_layers": layers, "n_heads": 16, "vocab_size": 128256, "use_scaled_rope": True}
        assert ModelArgs.from_params(meta).rope_scaling == RopeScaling("llama3", factor), (dim, layers)
        assert ModelArgs.from_params({**meta, "rope_scaling_factor": 4}).rope_scaling.factor == 4


def test_random_llama3_folder_is_spelled_as_meta_writes_it(tmp_path):
    assert random_model_main([str(tmp_path / "l3"), "--llama3", "--n-kv-heads", "2", "--n-layers", "2"]) == 0
    params = json.loads((tmp_path / "l3" / "params.json").read_text())
    assert params["use_scaled_rope"] is True and params["rope_scaling_factor"] == 8.0
    assert "rope_scaling" not in params and params["rope_theta"] == 500000.0
    model = adapter.load(tmp_path / "l3", device="cpu")
    assert model.args.rope_scaling == RopeScaling("llama3", 8.0) and model.args.kv_heads == 2
    assert isinstance(model.tokenizer, BPETokenizer) and model.tokenizer.n_words == model.args.vocab_size == 768


@pytest.mark.parametrize("text", TEXTS)
def test_tiktoken_ranks_encode_exactly_as_tiktoken(meta_llama3, reference, text):
    tokenizer = open_tokenizer(meta_llama3 / "tokenizer.model")
    expected = reference.encode(text, allowed_special="all")
    assert tokenizer.encode(text, bos=False) == expected
    assert tokenizer.encode(text, bos=True, eos=True) == [BOS, *expected, EOS]
    plain = text.replace("<|eot_id|>", "").replace("<|begin_of_text|>", "")
    assert tokenizer.decode(reference.encode(plain)) == plain


def test_a_large_vocabulary_encodes_as_tiktoken(tmp_path):
    """2000 ranks that are pieces of the very text encoded, added in random order whenever they join two
    known tokens: short tokens often outrank long ones, so pieces meet competing merges that only the rank
    order decides (a trained vocabulary has those too, the small fixture too few)."""
    rng = random.Random(7)
    syllables = ["ka", "ro", "mi", "ten", "su", "é", "日本", "zzu", "aa", "qua", "'s", "x", "ön"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    text = " ".join(rng.choice(words) + rng.choice(["", "", ",", ".\n", " 123", "🙂"]) for _ in range(6000))
    pieces = sorted({word[start:end] for word in (f" {w}".encode() for w in words)
                     for start in range(len(word)) for end in range(start + 2, min(len(word), start + 10) + 1)})
    rng.shuffle(pieces)
    tokens = [bytes([b]) for b in range(256)]
    while len(tokens) < 2000:  # passes in random order; a piece joins once two known tokens make it
        for token in pieces:
            if len(tokens) < 2000 and token not in tokens and any(
                    token[:cut] in tokens and token[cut:] in tokens for cut in range(1, len(token))):
                tokens.append(token)
    path = tmp_path / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    reference = tiktoken.Encoding("large", pat_str=LLAMA3_SPLIT, mergeable_ranks=read_ranks(path),
                                  special_tokens={})
    tokenizer = open_tokenizer(path)
    assert tokenizer.n_words == 2000 + 256
    assert tokenizer.encode(text, bos=False) == reference.encode(text)


def test_tiktoken_special_ids_and_stops(meta_llama3, reference):
    tokenizer = open_tokenizer(meta_llama3 / "tokenizer.model")
    assert (tokenizer.bos_id, tokenizer.eos_id) == (BOS, EOS)
    assert tokenizer.stop_ids == {EOS, EOM, EOT}  # an instruct model ends its turn with <|eot_id|>
    for name in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|eot_id|>",
                 "<|reserved_special_token_0|>", "<|reserved_special_token_245|>"):
        assert tokenizer.backend.token_to_id(name) == reference.encode_single_token(name)
    assert tokenizer.n_words == reference.n_vocab == ARGS.vocab_size


def write_tokenizer_json(meta_llama3: Path, folder: Path) -> Path:
    """tokenizer.json as transformers converts Meta's tiktoken file (its TikTokenConverter)."""
    folder.mkdir(parents=True, exist_ok=True)
    converter = TikTokenConverter(vocab_file=str(meta_llama3 / "tokenizer.model"),
                                  extra_special_tokens=llama3_special_tokens())
    converter.converted().save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def test_converted_tokenizer_json_encodes_as_tiktoken(meta_llama3, reference, tmp_path):
    tokenizer = open_tokenizer(write_tokenizer_json(meta_llama3, tmp_path))
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.stop_ids) == (BOS, EOS, {EOS, EOM, EOT})
    for text in TEXTS:
        assert tokenizer.encode(text, bos=False) == reference.encode(text, allowed_special="all"), text


def test_tokenizer_json_takes_bos_eos_and_stops_from_its_folder(meta_llama3, tmp_path):
    path = write_tokenizer_json(meta_llama3, tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>"}}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, EOM, EOT]}))
    instruct = open_tokenizer(path)
    assert (instruct.bos_id, instruct.eos_id, instruct.stop_ids) == (BOS, EOT, {EOS, EOM, EOT})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "eos_token": None}))
    (tmp_path / "generation_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": EOM}))
    plain = open_tokenizer(path)
    assert (plain.bos_id, plain.eos_id) == (-1, EOM)
    assert plain.encode("Hello", bos=True) == instruct.encode("Hello", bos=False)


def test_every_tokenizer_refuses_half_a_character_by_name(meta_llama3, base_folder, tmp_path):
    """A lone surrogate (JSON's "\\ud800", a command line's undecodable byte) reached sentencepiece and tokenizers,
    which raised from deep inside ("Unable to cast Python instance", "TextInputSequence must be str")."""
    kinds = {"SentencePiece": base_folder / "tokenizer.model", "tiktoken": meta_llama3 / "tokenizer.model",
             "tokenizer.json": write_tokenizer_json(meta_llama3, tmp_path)}
    for kind, path in kinds.items():
        tokenizer = open_tokenizer(path)
        assert tokenizer.encode("caf\u00e9 \U0001f600", bos=False), kind  # whole characters, any plane, are text
        # a pair of halves is not the character they spell either: each is refused
        for text, half in (("a\ud800", "ud800"), ("\udcff b", "udcff"), ("\ud83d\ude00", "ud83d")):
            with pytest.raises(ValueError, match=f"^text: holds '\\\\{half}', half of a character"):
                tokenizer.encode(text)


def test_each_tokenizer_gives_the_bytes_each_token_adds(meta_llama3, reference, base_folder, tmp_path):
    """(The API's `bytes` of a token, joined by clients to spell characters split over tokens: a byte token's own
    bytes, where its text names them, "<0xC3>", or stands in for them, "\ufffd".)"""
    for path in (meta_llama3 / "tokenizer.model", write_tokenizer_json(meta_llama3, tmp_path)):
        tokenizer = open_tokenizer(path)
        assert [tokenizer.token_bytes(i) for i in range(512)] == \
            [reference.decode_single_token_bytes(i) for i in range(512)], path.name
        assert any("\ufffd" in tokenizer.token_text(i) for i in range(512))  # some hold part of a character
        for text in TEXTS:  # (special tokens written in a text: their names)
            assert b"".join(tokenizer.token_bytes(i) for i in tokenizer.encode(text, bos=False)) == text.encode()
    sentencepiece = open_tokenizer(base_folder / "tokenizer.model")
    text = "caf\u00e9 na\u00efve \U0001f642 \u65e5\u672c"
    ids = sentencepiece.encode(text, bos=False)
    assert any(sentencepiece.token_text(i).startswith("<0x") for i in ids)  # byte-fallback pieces among them
    assert b"".join(sentencepiece.token_bytes(i) for i in ids) == (" " + text).encode()


def test_bad_tokenizer_files_are_named(meta_llama3, tmp_path):
    lines = (meta_llama3 / "tokenizer.model").read_text().splitlines()
    cases = {
        "line 3: expected '<base64 bytes> <rank>'": [*lines[:2], "not base64!! 2", *lines[3:]],
        "line 2: token b'!' appears twice": [lines[0], lines[0].split()[0] + " 1", *lines[2:]],
        "the ranks are not 0..511": [*lines[:-1], lines[-1].split()[0] + " 900"],
        "1 single byte\\(s\\) have no rank \\(e.g. 0x26\\)": [*lines[:5], "enp6eg== 5", *lines[6:]],  # b'zzzz' for b'&'
    }
    for message, content in cases.items():
        bad = tmp_path / "tokenizer.model"
        bad.write_text("\n".join(content) + "\n")
        with pytest.raises(ValueError, match=f"tokenizer: {bad}:? {message}"):
            open_tokenizer(bad)
    broken = tmp_path / "tokenizer.json"
    broken.write_text('{"model": {"type": "BPE"')
    with pytest.raises(ValueError, match=f"tokenizer: {broken} is not a readable tokenizer.json"):
        open_tokenizer(broken)
    no_eos = tmp_path / "no_eos" / "tokenizer.json"
    no_eos.parent.mkdir()
    from tokenizers import Tokenizer, models
    Tokenizer(models.BPE({"a": 0, "b": 1}, [])).save(str(no_eos))
    with pytest.raises(ValueError, match="no end-of-text token"):
        open_tokenizer(no_eos)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    shutil.copy(meta_llama3 / "tokenizer.model", tmp_path / "tokenizer.model")
    write_tokenizer_json(meta_llama3, tmp_path)
    with pytest.raises(ValueError, match="tokenizer_config.json: expected a JSON object"):
        open_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="needs tokenizer.model or tokenizer.json"):
        open_tokenizer(tmp_path / "missing" / "tokenizer.model")


@pytest.fixture(scope="module")
def hf_llama3(meta_llama3, tmp_path_factory) -> tuple[Path, transformers.LlamaForCausalLM]:
    """A Llama 3.2-shaped HF folder saved by transformers itself: tied embeddings (no lm_head.weight),
    GQA, llama3 RoPE, tokenizer.json with an instruct model's sidecar files."""
    folder = tmp_path_factory.mktemp("hf_llama3")
    scaling = ARGS.rope_scaling
    config = transformers.LlamaConfig(
        hidden_size=ARGS.dim, intermediate_size=ARGS.ffn_hidden_dim, num_hidden_layers=ARGS.n_layers,
        num_attention_heads=ARGS.n_heads, num_key_value_heads=ARGS.kv_heads, vocab_size=ARGS.vocab_size,
        rms_norm_eps=ARGS.norm_eps, max_position_embeddings=ARGS.max_seq_len, tie_word_embeddings=True,
        bos_token_id=BOS, eos_token_id=[EOS, EOM, EOT],
        rope_parameters={"rope_type": "llama3", "rope_theta": ARGS.rope_theta, "factor": scaling.factor,
                         "low_freq_factor": scaling.low_freq_factor, "high_freq_factor": scaling.high_freq_factor,
                         "original_max_position_embeddings": scaling.original_max_len})
    torch.manual_seed(11)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2 if param.ndim > 1 else 1.0)  # weights that make every module matter
    model.save_pretrained(folder)
    write_tokenizer_json(meta_llama3, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    return folder, model


def test_hf_llama3_folder_gives_transformers_logits(hf_llama3):
    folder, reference = hf_llama3
    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert "lm_head.weight" not in weights.keys()  # tied: the output reads the embeddings
    model = adapter.load(folder, device="cpu")
    assert isinstance(model.tokenizer, BPETokenizer) and model.tokenizer.path == folder / "tokenizer.json"
    assert (model.tokenizer.bos_id, model.tokenizer.eos_id) == (BOS, EOT)
    assert model.args.rope_scaling == ARGS.rope_scaling and model.args.kv_heads == ARGS.kv_heads
    assert model.output.weight is model.tok_embeddings.weight  # one matrix in memory, as in the checkpoint
    tokens = torch.tensor([model.tokenizer.encode("The red circle 日本 123 is above the star. " * 6)])
    assert tokens.shape[1] > ARGS.rope_scaling.original_max_len  # past the original context, all bands matter
    with torch.no_grad():
        expected = reference(tokens).logits
        ours = model(tokens)
    assert float((ours - expected).abs().max()) < 1e-4


def test_generation_ends_at_eot(hf_llama3, monkeypatch):
    model = adapter.load(hf_llama3[0], device="cpu")
    prompt_ids = model.tokenizer.encode("Hello there")
    with torch.no_grad():
        ids = list(prompt_ids)
        for _ in range(3):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    greedy = ids[len(prompt_ids):]
    original, calls = model.step, {"n": 0}

    def step(tokens, cache, **options):
        logits = original(tokens, cache, **options)
        calls["n"] += 1
        if calls["n"] == 4:  # the 4th token: <|eot_id|>, as an instruct model ends its turn
            logits[:, EOT] = 1e9
        return logits

    monkeypatch.setattr(model, "step", step)
    answer = model.generate("Hello there", temperature=0.0, max_new_tokens=8)
    assert answer == model.tokenizer.decode(greedy)
    assert "<|eot_id|>" not in answer and calls["n"] == 4


def test_inspect_names_the_scaling_tokenizer_and_stops(meta_llama3, hf_llama3, capsys):
    assert inspect_main([str(meta_llama3)]) == 0
    out = capsys.readouterr().out
    assert "vocab 768, rope theta 500000, llama3 scaling x8" in out
    stops = [EOS, EOM, EOT]
    assert f"tokenizer tokenizer.model (byte-level BPE, tiktoken ranks, 768 pieces, stops at ids {stops})" in out
    assert inspect_main([str(hf_llama3[0])]) == 0
    assert "tokenizer tokenizer.json (BPE, HF tokenizer.json, 768 pieces" in capsys.readouterr().out


def test_tied_head_stays_one_tensor_quantized_and_shared(hf_llama3, tmp_path):
    """nf4 layers keep the tied head in the model dtype, still one tensor, with the logits of the same
    weights saved untied; a second adapter on the same base (load_sharing) reads that tensor too."""
    folder = hf_llama3[0]
    untied = tmp_path / "untied"
    shutil.copytree(folder, untied)
    config = json.loads((folder / "config.json").read_text())
    (untied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    state = load_file(folder / "model.safetensors")
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()}, untied / "model.safetensors")
    model = adapter.load(folder, device="cpu", quantize="nf4")
    separate = adapter.load(untied, device="cpu", quantize="nf4")
    assert model.output.weight is model.tok_embeddings.weight
    assert separate.output.weight.data_ptr() != separate.tok_embeddings.weight.data_ptr()
    tokens = torch.tensor([model.tokenizer.encode("The red circle is above the star.")])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), separate(tokens), rtol=0, atol=1e-5)
    other = adapter.load_sharing(model, adapter.AdapterArgs(prompt_len=2, prompt_layers=1))
    assert other.output.weight is model.tok_embeddings.weight


def test_meta_file_with_one_tensor_for_head_and_embeddings_loads_it_once(meta_llama3, tmp_path):
    state = torch.load(meta_llama3 / "consolidated.00.pth", weights_only=True)
    folders = {}
    for kind in ("tied", "copied"):
        folder = folders[kind] = tmp_path / kind
        shutil.copytree(meta_llama3, folder)
        embeddings = state["tok_embeddings.weight"]
        torch.save({**state, "output.weight": embeddings if kind == "tied" else embeddings.clone()},
                   folder / "consolidated.00.pth")
    tied, copied = (adapter.load(folders[kind], device="cpu") for kind in ("tied", "copied"))
    assert tied.output.weight is tied.tok_embeddings.weight
    assert copied.output.weight.data_ptr() != copied.tok_embeddings.weight.data_ptr()
    tokens = torch.tensor([tied.tokenizer.encode("The red circle is above the star.")])
    with torch.no_grad():
        assert torch.equal(tied(tokens), copied(tokens))


def test_the_app_engine_answers_with_a_llama3_base_and_names_it(hf_llama3):
    engine = Engine(adapter.load(hf_llama3[0], device="cpu"))
    info = engine.model_info()
    assert (info["tokenizer"], info["rope_scaling"]) == ("BPE, HF tokenizer.json, 768 pieces", "llama3 x8")
    *_, answer = engine.chat([], "Hello", Settings(temperature=0.0, max_new_tokens=6))
    assert answer.strip()
    assert answer == engine.model.generate(adapter.prompts.chat((), "Hello"), temperature=0.0, max_new_tokens=6,
                                           stop=list(adapter.prompts.STOP_STRINGS))
