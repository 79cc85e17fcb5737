"""Chats of several users decoded together (Engine(batch_chats=N), the app's --concurrency): one batch, a row each
with its own settings, every answer the one it gets alone."""

from __future__ import annotations

import gc
import threading
import weakref
from contextlib import closing

import numpy as np
import pytest

import adapter
from adapter import chat_batcher
from adapter.app_config import load_engines, parse_config
from adapter.engine import Engine, Settings
from tests.app_helpers import QUESTION, demo_files, one_torch_thread  # noqa: F401  (fixture)

# each request its own gate, delta, layers, sampling, seed and length
REQUESTS = [
    ([], QUESTION, Settings(temperature=0.0, max_new_tokens=12)),
    ([], QUESTION, Settings(gate_scale=0.0, delta_scale=0.0, temperature=0.0, max_new_tokens=20)),
    ([("Hi", "Hello.")], "Name a shape.", Settings(temperature=1.0, top_p=0.9, seed=3, max_new_tokens=16)),
    ([], "Count to three.", Settings(gate_scale=1.5, temperature=0.7, seed=11, max_new_tokens=5, gate_layers="top 1")),
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def model(demo_files):
    return adapter.load(demo_files.base, adapter=demo_files.adapter, clip=demo_files.clip,
                        clip_model=str(demo_files.clip_model), device="cpu")


def alone(model, history, message, settings) -> str:
    return list(Engine(model, threading.Lock()).chat(history, message, settings))[-1]


def wait_for(condition, seconds: float = 60) -> None:
    event = threading.Event()
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        event.wait(0.01)
    raise AssertionError("timed out")


def together(engine: Engine, requests) -> list[str]:
    """Every request's final answer, all submitted while the device is busy, so that they queue for one batch."""
    answers: list[str | None] = [None] * len(requests)

    def ask(index, history, message, settings):
        answers[index] = list(engine.chat(history, message, settings))[-1]

    with engine.lock:  # the device is busy: the requests gather, in the order given (threads started at once
        # reached the queue in any order under load, and the batches depend on it)
        threads = [threading.Thread(target=ask, args=(i, *request)) for i, request in enumerate(requests)]
        for count, thread in enumerate(threads, 1):
            thread.start()
            wait_for(lambda: engine.batcher.submitted == count)
    for thread in threads:
        thread.join(timeout=120)
    return answers


def test_waiting_chats_are_one_batch_and_each_answer_is_its_own(model):
    engine = Engine(model, threading.Lock(), batch_chats=4)
    answers = together(engine, REQUESTS)
    assert engine.batcher.batch_sizes[-1] == 4, "the four waiting chats were decoded as one batch"
    assert answers == [alone(model, *request) for request in REQUESTS]
    assert len({answer for answer in answers}) > 1


def test_image_questions_join_the_batch_each_with_its_picture(model):
    """Two pictures and a chat in one batch: rows without a picture get no visual query."""
    red, blue = (np.full((32, 32, 3), colour, dtype=np.uint8) for colour in ([200, 30, 30], [30, 30, 200]))
    greedy = Settings(temperature=0.0, max_new_tokens=10)
    engine = Engine(model, threading.Lock(), batch_chats=3)
    answers: dict[int, str] = {}
    asks = [lambda: engine.ask_image(red, "What colour is it?", greedy),
            lambda: engine.ask_image(blue, "What colour is it?", greedy),
            lambda: engine.chat([], QUESTION, greedy)]
    with engine.lock:
        threads = [threading.Thread(target=lambda i=i, ask=ask: answers.update({i: list(ask())[-1]}))
                   for i, ask in enumerate(asks)]
        for thread in threads:
            thread.start()
        wait_for(lambda: engine.batcher.submitted == 3)
    for thread in threads:
        thread.join(timeout=120)
    single = Engine(model, threading.Lock())
    assert engine.batcher.batch_sizes == [3]
    assert [answers[0], answers[1], answers[2]] == [list(single.ask_image(red, "What colour is it?", greedy))[-1],
                                                    list(single.ask_image(blue, "What colour is it?", greedy))[-1],
                                                    list(single.chat([], QUESTION, greedy))[-1]]


def test_log_probabilities_kept_in_a_batch_are_each_rows_own(model):
    """Rows of one batch asking log-probabilities (a streamed answer's), each with its own count, beside one that
    asks none: each row is told the scores of the tokens it is told, as a decode of its own keeps them."""
    engine = Engine(model, threading.Lock(), batch_chats=3)
    asked = [(REQUESTS[0], 2), (REQUESTS[2], None), (REQUESTS[3], 0)]
    told = [([], None if top is None else []) for _, top in asked]
    answers: dict[int, str] = {}

    def ask(index: int) -> None:
        (history, question, settings), top = asked[index]
        prompt = engine.chat_prompt(history, question, settings)
        answers[index] = list(engine.answer_prompt(prompt, settings, None, *told[index], top or 0))[-1]

    with engine.lock:
        threads = [threading.Thread(target=ask, args=(index,)) for index in range(len(asked))]
        for count, thread in enumerate(threads, 1):
            thread.start()
            wait_for(lambda: engine.batcher.submitted == count)
    for thread in threads:
        thread.join(timeout=120)
    assert engine.batcher.batch_sizes == [3]
    single = Engine(model, threading.Lock())
    for index, ((history, question, settings), top) in enumerate(asked):
        generated, scores = told[index]
        expected_tokens: list[int] = []
        expected_scores = None if top is None else []
        prompt = single.chat_prompt(history, question, settings)
        assert list(single.answer_prompt(prompt, settings, None, expected_tokens, expected_scores,
                                         top or 0))[-1] == answers[index]
        assert generated == expected_tokens
        if top is None:
            assert scores is None
            continue
        assert len(scores) == len(generated) and [t.text for t in scores] == [t.text for t in expected_scores]
        assert [t.logprob for t in scores] == pytest.approx([t.logprob for t in expected_scores], abs=1e-4)
        assert all(len(token.top) == top for token in scores)


def test_a_user_who_leaves_stops_being_shown_and_the_others_finish(model):
    engine = Engine(model, threading.Lock(), batch_chats=2)
    settings = Settings(temperature=1.0, seed=5, max_new_tokens=30)
    with engine.lock:
        leaving = engine.chat([], QUESTION, settings)
        staying = engine.chat([], "Name a colour.", settings)
        results = {}
        thread = threading.Thread(target=lambda: results.update(answer=list(staying)[-1]))
        thread.start()
        first = threading.Thread(target=lambda: results.update(first=next(leaving)))
        first.start()
        wait_for(lambda: engine.batcher.submitted == 2)
    first.join(timeout=60)
    leaving.close()
    thread.join(timeout=120)
    assert results["answer"] == alone(model, [], "Name a colour.", settings)
    assert results["first"] and engine.batcher.batch_sizes == [2]


def test_a_failed_batch_tells_every_user(model, monkeypatch):
    engine = Engine(model, threading.Lock(), batch_chats=2)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(chat_batcher, "stream_batch", broken)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        list(engine.chat([], QUESTION, Settings()))


def test_the_apps_concurrency_is_the_batch_size(demo_files):
    config = parse_config(["--base", str(demo_files.base), "--adapter", str(demo_files.adapter),
                           "--concurrency", "4"], {})
    engine = load_engines(config).default
    assert engine.batcher is not None and engine.batcher.max_rows == 4
    # a decode holds no more KV cache than the Space fit check counts: 4 requests at 2,048 tokens (or the context)
    assert engine.max_cached_tokens == engine.batcher.max_cached_tokens == 4 * min(2048, engine.model.args.max_seq_len)
    assert Engine(engine.model, threading.Lock()).batcher is None, "one at a time by default"
    with pytest.raises(ValueError, match="batch_chats: must be >= 1"):
        Engine(engine.model, batch_chats=0)


def test_a_short_chat_is_not_batched_where_a_long_one_would_cut_its_answer(base_folder):
    """Rows are padded to the longest prompt, which the context then holds for each: a short prompt's answer
    beside a long one ran out of context sooner than alone, cut and said to stop (it waits for the next batch)."""
    model = adapter.load(base_folder, device="cpu", max_seq_len=96)
    limit, eos = model.args.max_seq_len, model.tokenizer.eos_id
    endless = Settings(temperature=0.0, max_new_tokens=60, logit_bias={str(eos): -100})  # runs its whole length
    engine = Engine(model, threading.Lock(), batch_chats=3)
    long_question = "the red star"
    while len(model.tokenizer.encode(engine.chat_prompt([], long_question + " is red", endless), bos=True)) < limit - 6:
        long_question += " is red"
    short = ([], QUESTION, endless)
    requests = [([], long_question, Settings(temperature=0.0, max_new_tokens=5)), short, short]
    answers = together(engine, requests)
    assert engine.batcher.batch_sizes == [1, 2], "the short ones fit beside each other, not beside the long one"
    assert answers == [alone(model, *request) for request in requests]
    longest = len(model.tokenizer.encode(engine.chat_prompt([], long_question, endless), bos=True))
    assert len(model.tokenizer.encode(answers[1], bos=False)) > limit - longest, "more than the long one leaves"


def test_the_tokens_a_row_is_told_stop_at_the_piece_last_read(model):
    """A reader that stops after a piece (a stop string found, a client gone) is told the tokens up to it, as
    alone: the batch decoding ahead of it told every token of the row (usage counted past a stop string)."""
    settings = Settings(temperature=0.0, max_new_tokens=20, logit_bias={str(model.tokenizer.eos_id): -100})
    lone = Engine(model, threading.Lock())
    prompt = lone.chat_prompt([], QUESTION, settings)
    told_alone: list[int] = []
    with closing(lone.answer_prompt(prompt, settings, None, told_alone)) as answers:
        first = next(answers)
    engine = Engine(model, threading.Lock(), batch_chats=2)
    told: list[int] = []
    with closing(engine.answer_prompt(prompt, settings, None, told)) as answers:
        assert next(answers) == first
        wait_for(lambda: engine.batcher.batch_sizes and not engine.lock.locked())  # the batch has decoded ahead
    assert 0 < len(told) == len(told_alone) < 20 and told == told_alone
    whole: list[int] = []
    assert list(engine.answer_prompt(prompt, settings, None, whole))[-1] == alone(model, [], QUESTION, settings)
    assert len(whole) == 20


def test_an_idle_batcher_lets_its_model_go(base_folder):
    """(its thread waited for jobs forever, holding the model of an adapter served no more: a removed or
    replaced adapter's tensors and a thread stayed for good; the compute thread held its last job's too)"""
    model = adapter.load(base_folder, device="cpu", max_seq_len=96)
    engine = Engine(model, threading.Lock(), batch_chats=2)
    engine.batcher.idle_s = 0.5
    settings = Settings(temperature=0.0, max_new_tokens=3)
    first = list(engine.chat([], QUESTION, settings))[-1]
    wait_for(lambda batcher=engine.batcher: batcher._thread is None)
    again = engine.chat([], QUESTION, settings)
    answers = [next(again)]
    thread = engine.batcher._thread  # the next job started one again
    assert [*answers, *again][-1] == first
    wait_for(lambda batcher=engine.batcher: batcher._thread is None)
    thread.join(timeout=60)
    gone = weakref.ref(model)
    del engine, model
    gc.collect()
    assert gone() is None


def test_an_answer_ends_when_its_row_does_not_when_the_batch_does(model, monkeypatch):
    """Every user's stream ended with the batch's longest answer: a 2-token answer beside a 60-token one waited for
    it, and once the long one's user left, its row was decoded to the end (the short one's user had not left)."""
    steps, release = [], threading.Event()

    def held_after_three_steps(*args, **kwargs):
        for pieces in stream_batch(*args, **kwargs):
            if len(steps) == 3:
                release.wait(60)
            steps.append(pieces)
            yield pieces

    stream_batch = chat_batcher.stream_batch
    monkeypatch.setattr(chat_batcher, "stream_batch", held_after_three_steps)
    engine = Engine(model, threading.Lock(), batch_chats=2)
    short = Settings(temperature=0.0, max_new_tokens=2)
    long = Settings(temperature=1.0, seed=1, max_new_tokens=60, logit_bias={model.tokenizer.eos_id: -100})
    results, expected = {}, alone(model, [], QUESTION, short)  # before the batch holds the device
    with engine.lock:
        leaving = engine.chat([], "Name a colour.", long)
        first = threading.Thread(target=lambda: results.update(first=next(leaving)))
        first.start()
        wait_for(lambda: engine.batcher.submitted == 1)
        reader = threading.Thread(target=lambda: results.update(short=list(engine.chat([], QUESTION, short))[-1]))
        reader.start()
        wait_for(lambda: engine.batcher.submitted == 2)
    reader.join(timeout=30)
    assert not reader.is_alive() and len(steps) <= 3, "the short answer ended while the batch went on"
    assert results["short"] == expected
    first.join(timeout=30)
    leaving.close()
    release.set()
    wait_for(lambda: not engine.lock.locked())  # the batch is over
    assert engine.batcher.batch_sizes == [2] and len(steps) < 10, "every row finished or left: the batch stopped"
