"""vLLM's tokenizer endpoints beside the OpenAI-compatible API, for clients that count and cut tokens with the served
model's own tokenizer rather than a copy of it (lm-evaluation-harness's `local-completions` uses them whenever a
server answers them: its `tokenizer_backend=remote`).

`POST /tokenize` `{"prompt": text, "add_special_tokens": true}` (or a chat's `{"messages": [...]}`, written in the
adapter's prompt format as a chat completion writes it) -> `{"count", "max_model_len", "tokens", "token_strs"}`
(special tokens written in the text, such as `</s>`, are read as their ids; `add_special_tokens` puts BOS in
front); `POST /detokenize` `{"tokens": [...]}` -> `{"prompt": text}`; `GET /tokenizer_info` -> the tokenizer's
kind, BOS/EOS/pad token texts and the model's context. `model` may name a served adapter; they share one base, so
one tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request

from .engine import Engine, Engines
from .openai_api import RequestError, answered_json, read_messages, served
from .prompt_ids import checked_ids, is_token_ids
from .tokenizer import lone_surrogate


def add_tokenizer_routes(router: APIRouter, view: Callable[[Request], Engines]) -> None:
    """/tokenize, /detokenize and /tokenizer_info on `router` (at the server's root, as vLLM serves them), for the
    adapters `view(request)` says a request may name."""
    def model_of(request: Request, body: Any):
        return served(view(request), body)[1].model

    @router.post("/tokenize")
    async def tokenize(request: Request):
        def tokens(body: Any) -> dict[str, Any]:
            engine = served(view(request), body)[1]
            model, text = engine.model, chat_text(engine, body) if "messages" in body else body.get("prompt")
            if not isinstance(text, str):
                raise RequestError(f"prompt: expected a text, got {type(text).__name__}", "prompt")
            if (problem := lone_surrogate(text)) is not None:
                raise RequestError(f"prompt: {problem}", "prompt")
            special = body.get("add_special_tokens", True)
            if not isinstance(special, bool):
                raise RequestError(f"add_special_tokens: expected true or false, got {special!r}",
                                   "add_special_tokens")
            ids = model.tokenizer.encode(text, bos=special, eos=False)
            return {"count": len(ids), "max_model_len": model.args.max_seq_len, "tokens": ids,
                    "token_strs": [model.tokenizer.token_text(token) for token in ids]}

        return await answered_json(request, tokens)

    def chat_text(engine: Engine, body: dict) -> str:
        """A chat-completions conversation (`messages`) written as the adapter's prompt format writes it, every
        turn kept (a chat completion drops the oldest that leave the answer no room)."""
        system, history, question, image = read_messages(body["messages"])
        if image is not None:
            raise RequestError("messages: a picture speaks through the adapter's prompts, not as tokens; tokenize "
                               "the conversation without it", "messages")
        try:
            return engine.prompts.chat(history, question, system)
        except ValueError as error:
            raise RequestError(str(error), "messages") from None

    @router.post("/detokenize")
    async def detokenize(request: Request):
        def text(body: Any) -> dict[str, Any]:
            model, ids = model_of(request, body), body.get("tokens")
            if not is_token_ids(ids):
                raise RequestError(f"tokens: expected a list of token ids, got {ids!r:.80}", "tokens")
            try:
                return {"prompt": model.tokenizer.decode(checked_ids(ids, model.args.vocab_size, "tokens"))}
            except ValueError as error:
                raise RequestError(str(error), "tokens") from None

        return await answered_json(request, text)

    @router.get("/tokenizer_info")
    def tokenizer_info(request: Request) -> dict[str, Any]:
        model = view(request).default.model
        tokenizer = model.tokenizer

        def text_of(token: int) -> str | None:
            return tokenizer.token_text(token) if 0 <= token < tokenizer.n_words else None

        return {"tokenizer_class": tokenizer.kind, "bos_token": text_of(tokenizer.bos_id),
                "eos_token": text_of(tokenizer.eos_id), "pad_token": text_of(tokenizer.pad_id),
                "model_max_length": model.args.max_seq_len, "vocab_size": tokenizer.n_words}
