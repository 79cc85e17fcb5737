"""Prompt formats: Llama 3 Instruct's chat format written token for token as transformers' chat template
writes it, Llama 2 Chat's as Meta's chat code encodes it and Mistral Instruct's as mistral-common does,
training examples that end as those models end a turn, and an adapter that records its format and is asked in
it by the app, `generate --template auto` and `inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.convert_slow_tokenizer import TikTokenConverter

import adapter
from adapter.app_config import load_engines, parse_config
from adapter.bpe_tokenizer import llama3_special_tokens
from adapter.config import ModelArgs
from adapter.convert import convert
from adapter.engine import Engine, Settings
from adapter.finetune import TrainConfig, train
from adapter.finetune.encode import IGNORE_INDEX, encode_example
from adapter.finetune.records import Example, read_records
from adapter.formats.native import save_adapter
from adapter.generate import main as generate_main
from adapter.inspect import main as inspect_main
from adapter.prompts import PROMPT_FORMATS, STOP_STRINGS, apply_template, format_named
from adapter.random_model import train_tokenizer, write_random_base
from adapter.tokenizer import open_tokenizer

from .finetune_helpers import alpaca_records, one_thread_and_own_rng, tiny_config, write_json, write_jsonl  # noqa: F401

LLAMA3 = PROMPT_FORMATS["llama3"]
LLAMA2 = PROMPT_FORMATS["llama2"]
MISTRAL_TOKENS = ("[INST]", "[/INST]")  # Mistral's tokenizer V3 has them as control tokens 3 and 4
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=768, multiple_of=32, max_seq_len=256)
EOT = 512 + 9  # <|eot_id|>: the 10th special token after the 512 ranks
# Llama 3 Instruct's chat template as its tokenizer_config.json ships it (a fact about that model: the reference)
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Llama 3.1 Instruct's chat template (as its tokenizer_config.json ships it, less the tool-calling branches): an
# always-there system turn opened by the knowledge cutoff and the date, 3.3's too; Llama 3.2's renders the date
# with strftime_now, which transformers gives today's date
LLAMA31_CHAT_TEMPLATE = (
    "{{- bos_token }}\n{%- if not date_string is defined %}\n    {%- set date_string = \"26 Jul 2024\" %}\n"
    "{%- endif %}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim"
    " %}\n    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n{{- system_message }}\n{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
    "message['content'] | trim + '<|eot_id|>' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n")
# Llama 3.2 Instruct's: the same, dated with the day it renders on
LLAMA32_CHAT_TEMPLATE = LLAMA31_CHAT_TEMPLATE.replace(
    '{%- set date_string = "26 Jul 2024" %}',
    '{%- if strftime_now is defined %}{%- set date_string = strftime_now("%d %b %Y") %}{%- else %}'
    '{%- set date_string = "26 Jul 2024" %}{%- endif %}')
CONVERSATIONS = [
    [("Name a colour.", None)],
    [("  What is\nthe star?  ", " A red one. \n"), ("And the circle?", None)],
    [("Hi", "Hello!"), ("Count: 1, 2, 3", "4, 5"), ("<|eot_id|> is a token; say it", None)],
]


@pytest.fixture(scope="module")
def llama3_base(tmp_path_factory) -> Path:
    return write_random_base(tmp_path_factory.mktemp("llama3_base"), ARGS, seed=3, tokenizer="tiktoken")


@pytest.fixture(scope="module")
def reference(llama3_base, tmp_path_factory) -> transformers.PreTrainedTokenizerFast:
    """transformers' tokenizer for the base's tiktoken file, with Llama 3 Instruct's chat template."""
    folder = tmp_path_factory.mktemp("reference")
    converter = TikTokenConverter(vocab_file=str(llama3_base / "tokenizer.model"),
                                  extra_special_tokens=llama3_special_tokens())
    converter.converted().save(str(folder / "tokenizer.json"))
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                                bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                                chat_template=LLAMA3_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def reference31(reference, tmp_path_factory) -> transformers.PreTrainedTokenizerFast:
    """The same tokenizer with Llama 3.1 Instruct's chat template."""
    folder = tmp_path_factory.mktemp("reference31")
    reference.save_pretrained(str(folder))
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(folder), chat_template=LLAMA31_CHAT_TEMPLATE)


def messages(turns) -> list[dict]:
    said = []
    for user, answer in turns:
        said.append({"role": "user", "content": user})
        if answer is not None:
            said.append({"role": "assistant", "content": answer})
    return said


def template_ids(reference, said: list[dict], add_generation_prompt: bool) -> list[int]:
    ids = reference.apply_chat_template(said, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("turns", CONVERSATIONS)
def test_llama3_prompts_are_the_chat_templates_tokens(llama3_base, reference, turns):
    tokenizer = open_tokenizer(llama3_base / "tokenizer.model")
    *history, (message, _) = turns
    prompt = LLAMA3.chat(history, message)
    assert tokenizer.encode(prompt, bos=True) == template_ids(reference, messages(turns), True)
    if len(turns) == 1:
        assert LLAMA3.instruction(message) == prompt


@pytest.mark.parametrize("system", [None, " Answer in one word.\nNo more. "])
@pytest.mark.parametrize("turns", CONVERSATIONS)
def test_llama31_prompts_are_its_chat_templates_tokens_dated_system_turn_and_all(llama3_base, reference31, turns,
                                                                                 system):
    tokenizer = open_tokenizer(llama3_base / "tokenizer.model")
    llama31 = PROMPT_FORMATS["llama3.1"]
    *history, (message, answer) = turns
    said = ([{"role": "system", "content": system}] if system else []) + messages(turns)
    prompt = llama31.chat(history, message, system)
    assert tokenizer.encode(prompt, bos=True) == template_ids(reference31, said, True)
    assert "Today Date: 26 Jul 2024\n\n" in prompt and prompt.count("<|start_header_id|>system") == 1
    assert llama31.instruction("Add.", "1 2", system) == llama31.chat((), "Add.\n\n1 2", system)
    example = Example(llama31.chat(history, message, system), llama31.answer(" The star. "))
    encoded, _ = encode_example(example, tokenizer, 256, llama31.answer_end_id(tokenizer))
    said.append({"role": "assistant", "content": " The star. "})
    assert encoded.tokens == template_ids(reference31, said, False), "a training example: the whole conversation"


@pytest.mark.parametrize("turns", CONVERSATIONS)
def test_a_system_prompt_is_written_as_each_chat_formats_reference_writes_it(llama3_base, reference, base_folder,
                                                                              turns):
    system = " Answer in one word.\nNo more. "
    *history, (message, _) = turns
    llama3 = open_tokenizer(llama3_base / "tokenizer.model")
    assert llama3.encode(LLAMA3.chat(history, message, system), bos=True) == \
        template_ids(reference, [{"role": "system", "content": system}, *messages(turns)], True)
    llama2 = open_tokenizer(base_folder / "tokenizer.model")
    assert llama2.encode(LLAMA2.chat(history, message, system), bos=True) == \
        meta_llama2_chat_tokens(llama2.processor, turns, system)
    assert LLAMA2.instruction("Add.", "1 2", system) == LLAMA2.chat((), "Add.\n\n1 2", system)
    with pytest.raises(ValueError, match="system: the alpaca prompt format has no system prompt"):
        PROMPT_FORMATS["alpaca"].chat(history, message, system)


def test_a_llama3_training_example_is_the_whole_conversation_ending_at_eot(llama3_base, reference):
    tokenizer = open_tokenizer(llama3_base / "tokenizer.model")
    history = [("Hi", "Hello!")]
    question, answer = "  Which shape is red? ", "\nThe star.  "
    example = Example(LLAMA3.chat(history, question), LLAMA3.answer(answer))
    encoded, truncated = encode_example(example, tokenizer, 256, LLAMA3.answer_end_id(tokenizer))
    said = messages([*history, (question, answer)])
    assert not truncated and encoded.tokens == template_ids(reference, said, False)
    assert encoded.tokens[-1] == EOT != tokenizer.eos_id
    prompt_len = len(template_ids(reference, said[:-1], True))
    assert encoded.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert encoded.labels[prompt_len:] == encoded.tokens[prompt_len:]
    assert tokenizer.decode(encoded.tokens[prompt_len:-1]) == "The star."


def meta_llama2_chat_tokens(processor, turns, system: str | None = None) -> list[int]:
    """Meta's Llama 2 chat code (llama/generation.py, chat_completion): a system message joins the first user
    message between B_SYS and E_SYS, each answered turn is encoded on its own between BOS and EOS, then the
    open question after a BOS."""
    if system is not None:
        (user, answer), *rest = turns
        turns = [("<<SYS>>\n" + system + "\n<</SYS>>\n\n" + user, answer), *rest]
    ids = []
    for user, answer in turns:
        if answer is None:
            return ids + [processor.bos_id()] + processor.EncodeAsIds(f"[INST] {user.strip()} [/INST]")
        ids += [processor.bos_id(), *processor.EncodeAsIds(f"[INST] {user.strip()} [/INST] {answer.strip()} "),
                processor.eos_id()]
    return ids


@pytest.mark.parametrize("turns", CONVERSATIONS)
def test_llama2_prompts_are_metas_chat_tokens(base_folder, turns):
    tokenizer = open_tokenizer(base_folder / "tokenizer.model")
    *history, (message, _) = turns
    assert tokenizer.encode(LLAMA2.chat(history, message), bos=True) == meta_llama2_chat_tokens(tokenizer.processor,
                                                                                               turns)
    answered = [*history, (message, " The star. ")]
    example = Example(LLAMA2.chat(history, message), LLAMA2.answer(" The star. "))
    encoded, _ = encode_example(example, tokenizer, 512, LLAMA2.answer_end_id(tokenizer))
    assert encoded.tokens == meta_llama2_chat_tokens(tokenizer.processor, answered)
    prompt_len = len(tokenizer.encode(example.prompt))
    assert tokenizer.decode(encoded.tokens[prompt_len:]) == "The star."
    assert encoded.labels == [IGNORE_INDEX] * prompt_len + encoded.tokens[prompt_len:]


@pytest.fixture(scope="module")
def mistral_v3_base(base_folder, tmp_path_factory) -> Path:
    """The random base with a SentencePiece tokenizer like Mistral's V3: [INST] and [/INST] as control tokens."""
    return mistral_base(base_folder, tmp_path_factory.mktemp("mistral-v3") / "base", control=True)


@pytest.fixture(scope="module")
def mistral_v1_base(base_folder, tmp_path_factory) -> Path:
    """The random base with a SentencePiece tokenizer like Mistral's V1 ([INST] written as text)."""
    return mistral_base(base_folder, tmp_path_factory.mktemp("mistral-v1") / "base", control=False)


def mistral_base(base_folder: Path, folder: Path, control: bool) -> Path:
    """A copy of the random base whose tokenizer keeps whitespace as Mistral's does (no folding of runs of spaces
    or newlines, which would hide what a format strips), with the tokenizer also under mistral-common's name."""
    import shutil

    shutil.copytree(base_folder, folder)
    train_tokenizer(folder / "tokenizer.model", control_symbols=MISTRAL_TOKENS if control else (), keep_spaces=True)
    shutil.copy(folder / "tokenizer.model", folder / f"tokenizer.model.{'v3' if control else 'v1'}")
    return folder


def mistral_common_tokens(folder: Path, turns, system: str | None = None, control: bool = False) -> list[int]:
    """The tokens mistral-common itself (Mistral's reference) encodes the conversation `turns` to, with the
    tokenizer of `folder`: the last turn's answer None for a prompt, given for a training sequence."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tokenizer = MistralTokenizer.from_file(str(folder / f"tokenizer.model.{'v3' if control else 'v1'}"))
    messages = [] if system is None else [SystemMessage(content=system)]
    for user, answer in turns:
        messages.append(UserMessage(content=user))
        if answer is not None:
            messages.append(AssistantMessage(content=answer))
    if turns[-1][1] is None:
        return tokenizer.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
    prompt = tokenizer.encode_chat_completion(ChatCompletionRequest(messages=messages[:-1])).tokens
    return prompt + tokenizer.instruct_tokenizer.encode_assistant_message(messages[-1], False)


@pytest.mark.parametrize("turns", [*CONVERSATIONS, [("Indent this:\n    x = 1\n", "  Done:\n    x = 1\n  "),
                                                   ("  Now y? ", None)]])
@pytest.mark.parametrize("name", ["mistral", "mistral-v3"])
def test_mistral_prompts_are_mistral_commons_tokens(mistral_v1_base, mistral_v3_base, turns, name):
    """Checked against mistral-common itself; messages, answers and system prompts were stripped, which it does not
    do (an answer loses its trailing spaces alone): indented code in a history or in training data read otherwise."""
    control = name == "mistral-v3"
    folder = mistral_v3_base if control else mistral_v1_base
    tokenizer = open_tokenizer(folder / "tokenizer.model")
    written = PROMPT_FORMATS[name]
    written.check(tokenizer)
    *history, (message, _) = turns
    for system in (None, " Answer in one word.\nNo more. "):
        assert tokenizer.encode(written.chat(history, message, system), bos=True) == \
            mistral_common_tokens(folder, turns, system, control)
    assert written.instruction("Add.", "1 2", "Be brief.") == written.chat((), "Add.\n\n1 2", "Be brief.")
    example = Example(written.chat(history, message), written.answer(" The star. "))
    encoded, _ = encode_example(example, tokenizer, 512, written.answer_end_id(tokenizer))
    assert encoded.tokens == mistral_common_tokens(folder, [*history, (message, " The star. ")], control=control)
    prompt_len = len(tokenizer.encode(example.prompt))
    assert tokenizer.decode(encoded.tokens[prompt_len:]).strip() == "The star."
    assert encoded.labels == [IGNORE_INDEX] * prompt_len + encoded.tokens[prompt_len:]


def test_each_mistral_format_needs_its_own_tokenizer(llama3_base, mistral_v1_base, mistral_v3_base):
    v1, v3 = (open_tokenizer(folder / "tokenizer.model") for folder in (mistral_v1_base, mistral_v3_base))
    with pytest.raises(ValueError, match=r"prompt format mistral: tokenizer .*tokenizer.model has \[INST\] and "
                                         r"\[/INST\] tokens .*use 'mistral-v3'"):
        PROMPT_FORMATS["mistral"].check(v3)
    with pytest.raises(ValueError, match=r"prompt format mistral-v3: tokenizer .*tokenizer.model has no \[INST\] "
                                         r"and \[/INST\] tokens .*use 'mistral'"):
        PROMPT_FORMATS["mistral-v3"].check(v1)
    with pytest.raises(ValueError, match="prompt format mistral: tokenizer .* does not read '</s>' as its EOS id"):
        PROMPT_FORMATS["mistral"].check(open_tokenizer(llama3_base / "tokenizer.model"))
    assert v3.encode("say [INST] and [/INST]", bos=False) == [*v3.processor.EncodeAsIds("say "), 3,
                                                              *v3.processor.EncodeAsIds(" and "), 4]


def test_sentencepiece_reads_bos_and_eos_written_in_text(base_folder):
    tokenizer = open_tokenizer(base_folder / "tokenizer.model")
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    sp = tokenizer.processor
    assert tokenizer.encode("a star</s><s>a circle", bos=False) == [*sp.EncodeAsIds("a star"), eos, bos,
                                                                   *sp.EncodeAsIds("a circle")]
    assert tokenizer.encode("no specials here, <s > nor </ s>", bos=False) == sp.EncodeAsIds(
        "no specials here, <s > nor </ s>")
    assert tokenizer.decode(tokenizer.encode("a star</s><s>a circle", bos=False)) == sp.DecodeIds(
        sp.EncodeAsIds("a star")) + " " + sp.DecodeIds(sp.EncodeAsIds("a circle"))


def test_each_chat_format_needs_its_own_tokenizer(llama3_base, base_folder):
    with pytest.raises(ValueError, match="prompt format llama2: tokenizer .*tokenizer.model does not read '</s><s>' "
                                         "as its EOS and BOS ids .*needs LLaMA 1/2's SentencePiece tokenizer"):
        LLAMA2.check(open_tokenizer(llama3_base / "tokenizer.model"))
    LLAMA2.check(open_tokenizer(base_folder / "tokenizer.model"))
    LLAMA3.check(open_tokenizer(llama3_base / "tokenizer.model"))


def test_records_are_written_in_the_runs_format(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [
        {"instruction": "Add them.", "input": "2 and 3", "output": " 5 "},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                           {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye!"}]}])
    (single,), (first, second) = read_records(data, prompt_format=LLAMA3)
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    user, assistant = header.format("user"), header.format("assistant")
    assert single == Example(f"{user}Add them.\n\n2 and 3<|eot_id|>{assistant}", "5")
    assert first == Example(f"{user}Hi<|eot_id|>{assistant}", "Hello")
    assert second.prompt == f"{user}Hi<|eot_id|>{assistant}Hello<|eot_id|>{user}Bye<|eot_id|>{assistant}"
    (alpaca,), _ = read_records(data)
    assert alpaca == Example(adapter.alpaca("Add them.", "2 and 3"), " 5 ")
    with pytest.raises(ValueError, match=":1: system: the alpaca prompt format has no system prompt"):
        read_records(write_jsonl(tmp_path / "system.jsonl", [{"instruction": "Hi", "output": "Hello",
                                                              "system": "Be brief."}]))
    system = write_jsonl(tmp_path / "systems.jsonl", [
        {"instruction": "Hi", "output": "Hello", "system": "Be brief."},
        {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Bye"},
                           {"from": "gpt", "value": "Bye!"}]}])
    (brief,), (kind, kinder) = read_records(system, prompt_format=LLAMA3)
    assert brief.prompt == LLAMA3.instruction("Hi", system="Be brief.")
    assert kinder.prompt == LLAMA3.chat([("Hi", "Hello")], "Bye", "Be kind.") and kind.response == "Hello"
    twice = write_jsonl(tmp_path / "twice.jsonl", [{"system": "A", "conversations": [
        {"from": "system", "value": "B"}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}])
    with pytest.raises(ValueError, match=":1: two system prompts: 'system' and conversations\\[0\\]"):
        read_records(twice, prompt_format=LLAMA3)
    (single,), (first, second) = read_records(data, prompt_format=LLAMA2)
    assert single == Example("[INST] Add them.\n\n2 and 3 [/INST]", " 5 ")
    assert second == Example("[INST] Hi [/INST] Hello </s><s>[INST] Bye [/INST]", " Bye! ")
    (single,), (first, second) = read_records(data, prompt_format=PROMPT_FORMATS["mistral"])
    assert single == Example("[INST] Add them.\n\n2 and 3 [/INST]", "  5 ")  # as given: mistral-common's V1
    assert second == Example("[INST] Hi [/INST] Hello</s>[INST] Bye [/INST]", " Bye!")
    assert read_records(data, prompt_format=PROMPT_FORMATS["mistral-v3"])[0][0].response == " 5"  # V3: rstrip(" ")
    (_, kinder) = read_records(system, prompt_format=PROMPT_FORMATS["mistral-v3"])[1]
    assert kinder == Example("[INST]Hi[/INST]Hello</s>[INST]Be kind.\n\nBye[/INST]", "Bye!")


def test_the_v2_dialog_format_is_the_official_demos_conversation():
    """llama_adapter_v2_chat65b's chat_demo asks with FastChat's "v1" conversation: the system text, `###`, a
    one-shot exchange, then `Human: ...###Assistant: ...###` turns, the open one ending `Assistant:`."""
    dialog = PROMPT_FORMATS["v2-dialog"]
    opening = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
               "helpful, detailed, and polite answers to the human's questions.###Human: What are the key "
               "differences between renewable and non-renewable energy sources?###Assistant: Renewable energy "
               "sources are those that can be replenished naturally")
    prompt = dialog.chat([(" Hi ", " Hello! ")], "Bye")
    assert prompt.startswith(opening)
    assert prompt.endswith("economic and social instability.\n###Human: Hi###Assistant: Hello!###Human: Bye"
                           "###Assistant:")
    assert prompt.count("###") == 6
    assert dialog.chat((), "Hi", " Be brief. ").startswith("Be brief.###Human: What are the key differences")
    assert dialog.instruction("Add.", "1 2") == dialog.chat((), "Add.\n\n1 2")
    assert dialog.stop_strings == ("###",) and dialog.answer(" The star. ") == " The star."


def test_formats_and_templates_by_name():
    assert LLAMA3.stop_strings == () and PROMPT_FORMATS["alpaca"].stop_strings == STOP_STRINGS
    assert apply_template("auto", "Hi", model_format="llama3") == LLAMA3.instruction("Hi")
    assert apply_template("auto", "Hi") == apply_template("chat", "Hi") == adapter.alpaca("Hi")
    assert apply_template("llama3", "Add.", "1 2") == LLAMA3.instruction("Add.", "1 2")
    with pytest.raises(ValueError, match="prompt_format: unknown prompt format 'vicuna'"):
        format_named("vicuna")
    with pytest.raises(ValueError, match="template: unknown template 'vicuna'"):
        apply_template("vicuna", "Hi")
    with pytest.raises(ValueError, match=r"template: unknown template \{'name': 'llama3'\}"):
        apply_template({"name": "llama3"}, "Hi")  # "unhashable type: 'dict'"


def test_llama3_needs_a_tokenizer_with_its_tokens(base_folder):
    model = adapter.load(base_folder, device="cpu")  # LLaMA 1/2's SentencePiece
    path = model.tokenizer.path
    with pytest.raises(ValueError, match=f"prompt format llama3: tokenizer {path} has no <\\|start_header_id\\|> "
                                         "token .*needs a Llama 3 tokenizer"):
        Engine(model, prompt_format="llama3")
    with pytest.raises(ValueError, match="prompt format llama3"):
        model.generate("Hi", template="llama3", max_new_tokens=2)


def test_an_adapter_records_its_format_and_is_asked_in_it(llama3_base, tmp_path, capsys):
    data = write_json(tmp_path / "data.json", alpaca_records(16))
    config = tiny_config(llama3_base, data, tmp_path / "run", prompt_format="llama3", prompt_layers=2, max_steps=2,
                         export="official-v1")
    result = train(config)
    assert ("note: the official-v1 format does not record the prompt format; ask this adapter in llama3 (e.g. "
            "generate --template llama3)") in capsys.readouterr().err
    with safe_open(result.adapter, "pt") as handle:
        assert handle.metadata()["prompt_format"] == "llama3"
    assert json.loads((result.adapter.parent / "adapter.json").read_text())["prompt_format"] == "llama3"
    model = adapter.load(llama3_base, adapter=result.adapter, device="cpu")
    assert model.prompt_format == "llama3"

    engine = Engine(model, max_new_tokens=8)
    assert engine.chat_prompt([("Hi", "Hello!")], "Bye", Settings()) == LLAMA3.chat([("Hi", "Hello!")], "Bye")
    assert engine.image_prompt("What is it?") == LLAMA3.instruction("What is it?")
    assert engine.model_info()["prompt_format"] == "llama3"
    as_alpaca = Engine(model, max_new_tokens=8, prompt_format="alpaca")
    assert as_alpaca.chat_prompt([], "Bye", Settings()) == adapter.alpaca("Bye")
    brief = Settings(system="Answer in one word.", temperature=0.0, max_new_tokens=4)
    assert engine.chat_prompt([("Hi", "Hello!")], "Bye", brief) == \
        LLAMA3.chat([("Hi", "Hello!")], "Bye", "Answer in one word.")
    assert list(engine.sweep("Bye", "0, 1", brief))[-1] == \
        [model.generate(LLAMA3.instruction("Bye", system="Answer in one word."), gate_scale=gate, temperature=0.0,
                        max_new_tokens=4) for gate in (0.0, 1.0)]
    with pytest.raises(ValueError, match="system: the alpaca prompt format has no system prompt"):
        as_alpaca.chat([], "Bye", brief)

    greedy = ["--base", str(llama3_base), "--adapter", str(result.adapter), "--temperature", "0",
              "--max-new-tokens", "6"]
    assert generate_main([*greedy, "--prompt", "Name a colour."]) == 0
    auto = capsys.readouterr().out
    assert generate_main([*greedy, "--template", "none", "--prompt", LLAMA3.instruction("Name a colour.")]) == 0
    assert capsys.readouterr().out == auto
    assert auto == model.generate(LLAMA3.instruction("Name a colour."), temperature=0.0, max_new_tokens=6) + "\n"
    assert generate_main([*greedy, "--prompt", "Name a colour.", "--system", "Be brief."]) == 0
    assert capsys.readouterr().out == model.generate("Name a colour.", template="auto", system="Be brief.",
                                                     temperature=0.0, max_new_tokens=6) + "\n"
    assert generate_main([*greedy, "--prompt", "Hi", "--system", "Be brief.", "--template", "alpaca"]) == 2
    assert "error: --system: the alpaca prompt format has no system prompt" in capsys.readouterr().err

    assert inspect_main([str(result.adapter)]) == 0
    assert "  prompt format llama3\n" in capsys.readouterr().out

    copy = convert(result.adapter, tmp_path / "copy", "native", llama3_base)
    assert adapter.load(llama3_base, adapter=copy, device="cpu").prompt_format == "llama3"
    assert capsys.readouterr().err == ""
    official = convert(result.adapter, tmp_path / "llama_adapter_len4_layer2.pth", "official-v1", llama3_base)
    assert capsys.readouterr().err == ("note: the official-v1 format does not record the prompt format; ask this "
                                       "adapter in llama3 (e.g. generate --template llama3)\n")
    assert adapter.load(llama3_base, adapter=official, device="cpu").prompt_format == "alpaca"


def test_alpaca_adapters_are_written_as_before_and_bad_formats_are_named(base_folder, tmp_path):
    model = adapter.load(base_folder, adapter=adapter.AdapterArgs(prompt_len=2, prompt_layers=2), device="cpu")
    path = save_adapter(model, tmp_path / "alpaca.safetensors")
    with safe_open(path, "pt") as handle:
        assert "prompt_format" not in handle.metadata()  # byte for byte as files written before formats
    assert adapter.load(base_folder, adapter=path, device="cpu").prompt_format == "alpaca"
    bad = tmp_path / "bad.safetensors"  # (save_adapter refuses metadata replacing its own fields)
    with safe_open(path, "pt") as handle:
        save_file({name: handle.get_tensor(name) for name in handle.keys()}, bad,
                  metadata={**handle.metadata(), "prompt_format": "vicuna"})
    with pytest.raises(ValueError, match=f"{bad}: bad adapter metadata .*unknown prompt format 'vicuna'"):
        adapter.load(base_folder, adapter=bad, device="cpu")


def test_finetune_refuses_llama3_on_a_sentencepiece_base_before_writing(base_folder, tmp_path):
    data = write_json(tmp_path / "data.json", alpaca_records(8))
    with pytest.raises(ValueError, match="prompt format llama3: tokenizer .* has no <\\|start_header_id\\|>"):
        train(tiny_config(base_folder, data, tmp_path / "run", prompt_format="llama3"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="--prompt-format: must be one of "
                                         "\\('alpaca', 'llama2', 'llama3', 'llama3.1', 'llama3.2', 'mistral', "
                                         "'mistral-v3', 'v2-dialog'\\), got 'chatml'"):
        tiny_config(base_folder, data, tmp_path / "run", prompt_format="chatml")


def test_a_checkpoint_from_before_formats_resumes_as_alpaca(tmp_path):
    config = TrainConfig(base="b", data="d", out="o")
    saved = {k: v for k, v in config.to_dict().items() if k != "prompt_format"}
    assert config.changed_since(saved) == []
    llama3 = TrainConfig(base="b", data="d", out="o", prompt_format="llama3")
    assert llama3.changed_since(saved) == ["--prompt-format"]


def test_the_apps_prompt_format_flag(tmp_path):
    assert parse_config([]).prompt_format == "auto"
    assert parse_config([], {"ADAPTER_PROMPT_FORMAT": "llama3"}).prompt_format == "llama3"
    with pytest.raises(ValueError, match="--prompt-format: must be one of "
                                         "\\('auto', 'alpaca', 'llama2', 'llama3', 'llama3.1', 'llama3.2', 'mistral', "
                                         "'mistral-v3', 'v2-dialog'\\), got 'x'"):
        parse_config(["--prompt-format", "x"])


def test_the_app_refuses_a_format_its_base_cannot_write(base_folder):
    config = parse_config(["--base", str(base_folder), "--prompt-format", "llama3", "--device", "cpu"])
    with pytest.raises(ValueError, match="^--prompt-format: prompt format llama3: tokenizer .* has no "):
        load_engines(config)
    engines = load_engines(parse_config(["--base", str(base_folder), "--device", "cpu"]))
    assert engines.default.prompts.name == "alpaca"


def test_the_apps_system_flag_starts_every_request_with_it(llama3_base, base_folder):
    from gradio_client import Client

    from .app_helpers import GREEDY, controls, running_app

    with pytest.raises(ValueError, match="^--system: adapter none: the alpaca prompt format has no system"):
        load_engines(parse_config(["--base", str(base_folder), "--system", "Be brief.", "--device", "cpu"]))
    with pytest.raises(ValueError, match="--system: 5,000 characters is too long"):
        parse_config(["--system", "x" * 5000])
    flags = ["--base", str(llama3_base), "--prompt-format", "llama3"]
    with running_app([*flags, "--system", "Answer in one word."]) as app:
        engine = app.engines.default
        asked, generate = [], engine._generate
        engine._generate = lambda prompts, *rest: asked.append(prompts) or generate(prompts, *rest)
        answer = Client(app.url, verbose=False).predict("Name a colour.", *controls(), api_name="/compare")
        assert asked == [[LLAMA3.instruction("Name a colour.", system="Answer in one word.")] * 2]
        assert answer == list(engine.compare("Name a colour.", Settings(**GREEDY, system="Answer in one word.")))[-1]


@pytest.mark.parametrize("flags, message", [
    (["--template", "chat", "--input", "x"], "--input: the 'chat' template takes no input"),
    (["--template", "none", "--system", "x"], "--system: 'none' takes no system prompt"),
    (["--template", "alpaca", "--system", "x"], "--system: the alpaca prompt format has no system prompt"),
])
def test_generate_names_the_flag_a_template_has_no_place_for(base_folder, capsys, flags, message):
    assert generate_main(["--base", str(base_folder), "--prompt", "Hi", "--max-new-tokens", "2", *flags]) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")


# Llama 2 Chat's template as its HF folders ship it (abridged: the markers and the turns), and Mistral
# Instruct's, whose [INST] turns have no <<SYS>> block
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = '<<SYS>>\\n' + messages[0]['content'] + "
    "'\\n<</SYS>>\\n\\n' %}{% endif %}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + message['content'].strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
    "message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")


def with_chat_template(source: Path, folder: Path, template: str, where: str) -> Path:
    """A copy of a base folder with `template` where HF folders keep one: tokenizer_config.json's
    "chat_template" (a text, or a list of named ones) or chat_template.jinja."""
    import shutil

    shutil.copytree(source, folder)
    if where == "jinja":
        (folder / "chat_template.jinja").write_text(template)
    else:
        value = template if where == "config" else [{"name": "tool_use", "template": "{{ tools }}"},
                                                    {"name": "default", "template": template}]
        (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": value}))
    return folder


@pytest.mark.parametrize("where", ["config", "list", "jinja"])
def test_a_bare_base_is_asked_as_its_chat_template_asks(llama3_base, reference, tmp_path, where, capsys):
    folder = with_chat_template(llama3_base, tmp_path / "instruct", LLAMA3_CHAT_TEMPLATE, where)
    model = adapter.load(folder, device="cpu")
    assert (model.prompt_format, model.base_prompt_format) == ("llama3", "llama3")
    engine = Engine(model, max_new_tokens=8)
    said = [{"role": "user", "content": "Name a colour."}]
    assert model.tokenizer.encode(engine.chat_prompt([], "Name a colour.", Settings()), bos=True) == \
        template_ids(reference, said, True), "asked exactly as transformers' apply_chat_template asks"
    assert adapter.load_sharing(model, None).prompt_format == "llama3"
    fresh = adapter.load_sharing(model, adapter.AdapterArgs(prompt_len=2, prompt_layers=1))
    assert fresh.prompt_format == "alpaca", "an adapter is asked in its own format, not the base's"
    assert adapter.load_sharing(model, save_adapter(fresh, tmp_path / "alpaca")).prompt_format == "alpaca"
    assert inspect_main([str(folder)]) == 0
    assert "  prompt format without an adapter: llama3 (its chat template's)\n" in capsys.readouterr().out


def test_llama32_dates_its_system_turn_with_today_as_its_template_does(llama3_base, reference31, tmp_path,
                                                                      monkeypatch):
    import datetime

    llama32 = PROMPT_FORMATS["llama3.2"]
    before = datetime.date.today().strftime("%d %b %Y")
    date = llama32.date()
    assert date in (before, datetime.date.today().strftime("%d %b %Y")), "transformers' strftime_now('%d %b %Y')"
    monkeypatch.setattr("adapter.prompts.time.strftime", lambda pattern: "04 Dec 2026")
    folder = with_chat_template(llama3_base, tmp_path / "instruct32", LLAMA32_CHAT_TEMPLATE, "config")
    model = adapter.load(folder, device="cpu")
    assert (model.prompt_format, model.base_prompt_format) == ("llama3.2", "llama3.2")
    said = [("Hi", "Hello!"), ("Name a colour.", None)]
    prompt = Engine(model, max_new_tokens=8).chat_prompt(said[:1], "Name a colour.", Settings())
    assert "Today Date: 04 Dec 2026\n\n" in prompt
    ids = reference31.apply_chat_template(messages(said), add_generation_prompt=True, tokenize=True,
                                          chat_template=LLAMA32_CHAT_TEMPLATE, date_string="04 Dec 2026")
    assert model.tokenizer.encode(prompt, bos=True) == list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_a_bare_llama31_instruct_is_asked_with_its_dated_system_turn(llama3_base, reference31, tmp_path, capsys):
    folder = with_chat_template(llama3_base, tmp_path / "instruct31", LLAMA31_CHAT_TEMPLATE, "config")
    model = adapter.load(folder, device="cpu")
    assert (model.prompt_format, model.base_prompt_format) == ("llama3.1", "llama3.1")
    prompt = Engine(model, max_new_tokens=8).chat_prompt([("Hi", "Hello!")], "Name a colour.", Settings())
    assert model.tokenizer.encode(prompt, bos=True) == template_ids(reference31, messages(
        [("Hi", "Hello!"), ("Name a colour.", None)]), True)
    assert inspect_main([str(folder)]) == 0
    assert "  prompt format without an adapter: llama3.1 (its chat template's)\n" in capsys.readouterr().out


def test_other_chat_templates_and_none_leave_a_bare_base_in_alpaca(base_folder, tmp_path, capsys):
    llama2 = adapter.load(with_chat_template(base_folder, tmp_path / "chat", LLAMA2_CHAT_TEMPLATE, "config"),
                          device="cpu")
    assert llama2.prompt_format == "llama2"
    assert adapter.load(base_folder, device="cpu").prompt_format == "alpaca"
    unwritable = with_chat_template(base_folder, tmp_path / "l3-template", LLAMA3_CHAT_TEMPLATE, "config")
    assert adapter.load(unwritable, device="cpu").prompt_format == "alpaca", "its SentencePiece cannot write llama3"
    assert inspect_main([str(unwritable)]) == 0
    assert "prompt format without an adapter: alpaca (no chat template in a format its tokenizer writes)" in \
        capsys.readouterr().out
    # Mistral Small 3's (and later) [INST] template opens with a [SYSTEM_PROMPT] turn no format here writes: it was
    # taken for Mistral 7B's, its default system prompt lost, a given one moved into the user's turn
    small3 = "{{ bos_token }}[SYSTEM_PROMPT]{{ system_message }}[/SYSTEM_PROMPT]" + MISTRAL_CHAT_TEMPLATE
    assert adapter.load(with_chat_template(base_folder, tmp_path / "small3", small3, "config"),
                        device="cpu").prompt_format == "alpaca"
    broken = with_chat_template(base_folder, tmp_path / "broken", "", "config")
    (broken / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken/tokenizer_config.json: cannot read JSON"):
        adapter.load(broken, device="cpu")


@pytest.mark.parametrize("name", ["mistral", "mistral-v3"])
def test_a_bare_mistral_instruct_is_asked_in_the_format_its_tokenizer_writes(mistral_v1_base, mistral_v3_base, name,
                                                                             tmp_path, capsys):
    control = name == "mistral-v3"
    folder = with_chat_template(mistral_v3_base if control else mistral_v1_base, tmp_path / "instruct",
                                MISTRAL_CHAT_TEMPLATE, "config")
    model = adapter.load(folder, device="cpu")
    assert (model.prompt_format, model.base_prompt_format) == (name, name)
    prompt = Engine(model, max_new_tokens=8).chat_prompt([("Hi", "Hello!")], "Name a colour.", Settings())
    assert model.tokenizer.encode(prompt, bos=True) == mistral_common_tokens(
        folder, [("Hi", "Hello!"), ("Name a colour.", None)], control=control)
    assert inspect_main([str(folder)]) == 0
    assert f"  prompt format without an adapter: {name} (its chat template's)\n" in capsys.readouterr().out
