"""The request bodies of the OpenAI-compatible API as JSON Schema, for its OpenAPI page (`/docs`, `/openapi.json`):
the routes read their JSON themselves (to refuse by name, as OpenAI does), so FastAPI alone showed no body to fill
in. Every field a route reads is listed, with what it does here; those taken but unused or refused say so."""

from __future__ import annotations

from typing import Any

from .gate_layers import FLAG_HELP
from .openai_api import CHAT_FIELDS, COMPLETION_FIELDS, MAX_CHOICES, MAX_STOPS, MAX_TOP_LOGPROBS
from .openai_completions import MAX_LOGPROBS, MAX_PROMPTS
from .openai_responses import LOGPROBS, MAX_METADATA, RESPONSE_FIELDS
from .response_store import MAX_STORED

NUMBER, INTEGER, STRING, BOOLEAN, OBJECT = ({"type": name} for name in ("number", "integer", "string", "boolean",
                                                                       "object"))
IGNORED = "taken and ignored (it changes no answer)"

# the fields both routes read
COMMON: dict[str, dict[str, Any]] = {
    "model": {**STRING, "description": "a served adapter's name (GET /v1/models); the first when left out"},
    "stream": {**BOOLEAN, "description": "the answer as server-sent events, piece by piece"},
    "stream_options": {**OBJECT, "properties": {"include_usage": BOOLEAN},
                       "description": "include_usage: the usage in a chunk of its own after the answer"},
    "n": {**INTEGER, "minimum": 1, "maximum": MAX_CHOICES,
          "description": "answers to give, the j-th sampled with seed + j (one when streamed)"},
    "stop": {"anyOf": [STRING, {"type": "array", "items": STRING, "maxItems": MAX_STOPS}],
             "description": "decoding ends before the first of these"},
    "best_of": {**INTEGER, "description": "only 1 is served"},
    "response_format": {**OBJECT, "description": "only {\"type\": \"text\"} is served"},
    "temperature": {**NUMBER, "minimum": 0, "description": "0: greedy"},
    "top_p": {**NUMBER, "description": "nucleus sampling"},
    "top_k": {**INTEGER, "description": "vLLM's: sample among the k likeliest (0: all)"},
    "min_p": {**NUMBER, "minimum": 0, "maximum": 1,
              "description": "vLLM's: sample among the tokens at least this times as likely as the likeliest (0: off)"},
    "max_tokens": {**INTEGER, "minimum": 1, "description": "the answer's most tokens"},
    "max_completion_tokens": {**INTEGER, "minimum": 1, "description": "max_tokens, by its newer name"},
    "seed": {**INTEGER, "minimum": 0, "description": "the same seed, the same answer; left out, sampled afresh"},
    "presence_penalty": {**NUMBER, "description": "OpenAI's: lowers every token the answer has used"},
    "frequency_penalty": {**NUMBER, "description": "OpenAI's: lowers a token by how often the answer used it"},
    "repetition_penalty": {**NUMBER, "description": "vLLM's (CTRL's): over prompt and answer"},
    "min_tokens": {**INTEGER, "minimum": 0,
                   "description": "vLLM's: the end of text and stop_token_ids are not drawn before this many tokens "
                                  "(stop strings still end an answer)"},
    "ignore_eos": {**BOOLEAN, "description": "vLLM's: decode on past the end of text, to max_tokens (as serving "
                                             "benchmarks ask)"},
    "stop_token_ids": {"type": "array", "items": {**INTEGER, "minimum": 0},
                       "description": "vLLM's: token ids that end an answer beside the tokenizer's end of text"},
    "logit_bias": {**OBJECT, "additionalProperties": NUMBER,
                   "description": "token id (as text) to a bias from -100 to 100 added to its logit"},
    "gate_scale": {**NUMBER, "minimum": 0, "description": "this project's: the adapter's gates times this (0: the "
                                                          "frozen base, 1: the adapter as trained)"},
    "delta_scale": {**NUMBER, "minimum": 0, "description": "this project's: LLaMA-Adapter V2's biases, scales and "
                                                           "LoRA deltas times this"},
    "gate_layers": {**STRING, "description": "this project's: " + FLAG_HELP},
    **{name: {"description": IGNORED} for name in ("user", "metadata", "store", "service_tier", "safety_identifier",
                                                   "prompt_cache_key")},
}

CHAT: dict[str, dict[str, Any]] = {
    "messages": {"type": "array", "items": {**OBJECT, "required": ["role", "content"], "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant"]},
        "content": {"anyOf": [STRING, {"type": "array", "items": OBJECT}]}}},
        "description": "the conversation, ending with the user's message; a user message may carry one picture as "
                       "an image_url part with a data: URL"},
    "logprobs": {**BOOLEAN, "description": "each answer token's log-probability at the request's gate"},
    "top_logprobs": {**INTEGER, "minimum": 0, "maximum": MAX_TOP_LOGPROBS,
                     "description": "with logprobs: that many likeliest tokens at each place"},
    **{name: {"description": "function calling is not served: refused when given"}
       for name in ("tools", "functions")},
    **{name: {"description": IGNORED + " without tools"}
       for name in ("tool_choice", "function_call", "parallel_tool_calls")},
}

COMPLETION: dict[str, dict[str, Any]] = {
    "prompt": {"anyOf": [STRING, {"type": "array", "items": STRING, "maxItems": MAX_PROMPTS},
                         {"type": "array", "items": INTEGER},
                         {"type": "array", "items": {"type": "array", "items": INTEGER}, "maxItems": MAX_PROMPTS}],
               "description": "a text continued as it is written (no prompt format), or token ids fed as sent"},
    "echo": {**BOOLEAN, "description": "the prompt before its continuation (and, with logprobs, scored)"},
    "logprobs": {**INTEGER, "minimum": 0, "maximum": MAX_LOGPROBS,
                 "description": "each returned token's log-probability and that many likeliest at its place"},
    "suffix": {**STRING, "description": "text after an insertion point: not served, refused when given"},
}

RESPONSE: dict[str, dict[str, Any]] = {
    "input": {"anyOf": [STRING, {"type": "array", "items": OBJECT}],
              "description": "a text, or messages ({role, content}) whose parts are input_text, input_image (a data: "
                             "URL) or an earlier answer's output_text, ending with the user's"},
    "instructions": {**STRING, "description": "a system prompt (the chat prompt formats; Alpaca has none)"},
    "max_output_tokens": {**INTEGER, "minimum": 1, "description": "the answer's most tokens (status incomplete "
                                                                   "when they run out)"},
    "include": {"type": "array", "items": {"enum": [LOGPROBS]},
                "description": "message.output_text.logprobs: each answer token's log-probability"},
    "top_logprobs": {**INTEGER, "minimum": 0, "maximum": MAX_TOP_LOGPROBS,
                     "description": "with include's logprobs: that many likeliest tokens at each place"},
    "text": {**OBJECT, "description": "only {\"format\": {\"type\": \"text\"}} is served"},
    "tools": {"description": "function calling is not served: refused when given"},
    "previous_response_id": {**STRING, "description": "a stored response to continue: its input and answer come "
                                                      "before this input (its instructions are not carried over)"},
    "store": {**BOOLEAN, "description": "keep the response (true unless false; in memory, the latest "
                                        f"{MAX_STORED}) for previous_response_id, GET, input_items and DELETE"},
    "metadata": {**OBJECT, "additionalProperties": STRING,
                 "description": f"up to {MAX_METADATA} pairs of texts, echoed and kept with the response"},
    "conversation": {"description": "stored conversations are not served (previous_response_id is): refused when "
                                    "given"},
    "reasoning": {"description": "the served adapters do not reason: refused when given"},
    "background": {"description": "answers are given while the request waits: refused when true"},
    "truncation": {"enum": ["auto", "disabled"], "description": "either way the oldest turns are dropped where "
                                                               "the conversation leaves the answer no room (auto)"},
    **{name: {"description": IGNORED} for name in ("tool_choice", "parallel_tool_calls")},
}

EXAMPLES = {
    "chat": {"model": "tiny-text", "messages": [{"role": "user", "content": "There is a large red star on the "
                                                                          "left. What colour is the star?"}],
             "temperature": 0, "max_tokens": 30, "gate_scale": 1.0},
    "completion": {"model": "tiny-text", "prompt": "There is a small red circle", "max_tokens": 12,
                   "temperature": 0, "gate_scale": 0.0},
    "response": {"model": "tiny-text", "input": "There is a large red star on the left. What colour is the star?",
                 "temperature": 0, "max_output_tokens": 30, "gate_scale": 1.0},
}
KINDS = {"chat": (CHAT_FIELDS, CHAT, "messages"), "completion": (COMPLETION_FIELDS, COMPLETION, "prompt"),
         "response": (RESPONSE_FIELDS, RESPONSE, "input")}


def request_body(kind: str) -> dict[str, Any]:
    """FastAPI's `openapi_extra` of a route reading `kind`'s body ("chat", "completion" or "response")."""
    fields, own, required = KINDS[kind]
    properties = {name: {**COMMON, **own}[name] for name in sorted(fields)}
    schema = {**OBJECT, "properties": properties, "additionalProperties": False, "required": [required]}
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": schema, "example": EXAMPLES[kind]}}}}
