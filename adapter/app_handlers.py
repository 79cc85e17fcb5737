"""The app's event functions (`Handlers`): each turns the UI's values into an `adapter.engine` call and what it
gives back into what the components show; bad requests become messages for the user, never tracebacks.

app.py lays the components out and wires them to these; keeping them apart leaves each readable on its own.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import gradio as gr
from PIL import Image

from .adapter_download import AdapterDownloads
from .adapter_upload import AdapterUploads
from .added_adapters import AddedAdapters
from .choices import ChoiceEvaluation
from .engine import Engine, Engines, Settings, check_integer, check_system, check_text, gate_scales
from .finetune.records import conversation_record
from .formats.common import WriteFailed, unrecorded_format_note, write_zip
from .hub import repo_id
from .kept_folders import KeptFolders
from .live_training import LiveTraining, TrainProgress, TrainRequest
from .model_card import training_of
from .push import push_model

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .gate_view import PromptShares
    from .next_token import NextTokens
else:
    Figure = Any  # gradio reads the handlers' hints (to pass them their request): they must resolve at run time

# the controls every answering event takes after its own inputs (app.py's `controls`), as the API names them
CONTROLS = ("gate_scale", "delta_scale", "temperature", "top_p", "max_new_tokens", "seed", "adapter", "system",
            "layers")
Handler = TypeVar("Handler", bound=Callable[..., Any])
GATE_LABEL = "Gate scale"
# saved conversations (each a folder of its own, which gradio copies from): the last MAX_SAVED stay, so that a
# long-running server's temporary folder does not grow with every Save
MAX_SAVED = 32
SAVED_CONVERSATIONS = KeptFolders(Path(tempfile.gettempdir()) / "llama-adapter-conversations", MAX_SAVED)
SCORE_HEADERS = ["gate scale", "loss", "perplexity", "token accuracy %", "exact answers"]
CHOICE_HEADERS = ["gate scale", "likeliest choice right %", "per byte %", "P(right choice) %"]
TEXT_HEADERS = ["gate scale", "loss", "perplexity", "token accuracy %", "bits per byte"]
LOSS_COLUMNS = ("step", "loss", "set")  # the Train tab's curves, drawn by the browser
GATE_COLUMNS = ("step", "mean |gate|", "layer")
NEW_ADAPTER = "a new adapter (zero-init gates: the frozen base)"
# Stop cannot reach a run still waiting for the device (gradio cancels only by closing it, which keeps nothing)
NOTHING_TO_STOP = ("No training of yours is under way. One still waiting in the queue starts once the device is free; "
                   "reload the page to drop it.")
RECORD, PICTURE = "conversation.jsonl", "picture.png"  # a conversation saved to train on, and its picture
# a path in the server's temporary folder (an upload, a run's folder) up to the file's own name
CLI_FLAG = re.compile(r"^--([a-z][a-z0-9-]*):")  # a command line's flag that leads a shared check's message: the
# page has no flags, and names its settings as the API does (--prompt-len: -> prompt_len:)
SERVER_FOLDERS = re.compile(re.escape(os.path.join(tempfile.gettempdir(), "")) + r"\S*" + re.escape(os.sep))


def api_inputs(*names: str) -> Callable[[Handler], Handler]:
    """Names for a handler's inputs after its request (its `*controls` among them) on gradio's API: the app's "Use
    via API" page and gradio_client's keywords (`client.predict(..., gate_scale=0, api_name="/chat")`) name them
    so, where gradio would say param_2, param_3, ... Gradio passes them by position, as `*controls` takes them."""

    def named(handler: Handler) -> Handler:
        own = list(inspect.signature(handler).parameters.values())[:2]  # self, request
        handler.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [*own, *(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in names)])
        return handler

    return named


@contextmanager
def user_errors() -> Iterator[None]:
    """A bad request becomes a message for the user (and the API client); the app keeps serving. Files are named
    by their own names: the temporary folders the server put uploads in mean nothing to the user; a leading
    command-line flag by its setting's name. A write that failed (the server's disk full) is said so too. The
    server's log gets a traceback for that alone: gradio printed one for every empty question."""
    try:
        yield
    except (ValueError, FileNotFoundError, WriteFailed) as error:
        text = CLI_FLAG.sub(lambda flag: flag.group(1).replace("-", "_") + ":", SERVER_FOLDERS.sub("", str(error)))
        raise gr.Error(text, print_exception=isinstance(error, WriteFailed)) from None


def settings(gate: float, delta: float, temperature: float, top_p: float, max_new_tokens: float,
             seed: float | None, system: str | None = None, layers: str | None = None) -> Settings:
    return Settings(gate_scale=gate, delta_scale=delta, temperature=temperature, top_p=top_p,
                    max_new_tokens=max_new_tokens, seed=seed, system=system, gate_layers=layers)


def text_of(content: Any) -> str:
    """A Chatbot message's text: a string, or gradio's list of content blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        return str(content.get("text", ""))
    if isinstance(content, Sequence):
        return "".join(text_of(part) for part in content)
    return ""


def to_pairs(history: Sequence[Mapping[str, Any]] | None) -> list[tuple[str, str]]:
    """Chatbot messages -> (user, assistant) turns; a user message without an answer gets ""."""
    pairs: list[tuple[str, str]] = []
    for message in history or ():
        text = text_of(message.get("content"))
        if message.get("role") == "user":
            pairs.append((text, ""))
        elif message.get("role") == "assistant" and pairs:
            pairs[-1] = (pairs[-1][0], pairs[-1][1] + text)
    return pairs


def to_messages(pairs: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    return [message for user, answer in pairs
            for message in ({"role": "user", "content": user}, {"role": "assistant", "content": answer})]


def table(labels: Sequence[Any], answers: Iterator[list[str]]) -> Iterator[list[list[Any]]]:
    """A sweep's rows (gate scale or layers, answer so far) as its answers grow; closing it stops the decode
    under it at once (a caller's frame holding `answers` would keep it decoding)."""
    with closing(answers):
        for row in answers:
            yield [[label, answer] for label, answer in zip(labels, row)]


def next_token_view(found: NextTokens) -> tuple[dict[str, Any], Figure]:
    """The next-token table (a token per row, a gate scale per column, % each) and its plot."""
    return {"headers": found.headers(), "data": found.rows()}, found.figure()


def shares_view(shares: PromptShares) -> tuple[list[tuple[str, float]], Figure | None]:
    """The answer's pieces with their prompt shares (for HighlightedText) and the per-layer bars (none for a
    model without adaption prompts)."""
    return shares.pieces, shares.figure() if shares.layers else None


def picture(path: Path | None) -> Image.Image | None:
    """A file shown as a picture (read here: gradio serves only files under its allowed paths)."""
    return None if path is None else Image.open(path)


def warn_if_blind(engine: Engine, image: Image.Image | None) -> None:
    """An image question put to an adapter that cannot see is answered from the text alone: say so."""
    if image is not None and not engine.can_see_images:
        gr.Warning("This adapter cannot see images: the answer comes from the question alone.")


class Handlers:
    """The event functions; each turns UI values into an engine call and engine errors into messages.

    Every model event takes the six shared controls, then the adapter to answer with (omitted: the first), the
    system prompt (omitted: none) and the adapter layers that speak (omitted: all). gradio passes each its
    request first, whose session says which adapters it may ask (`served`)."""

    def __init__(self, engines: Engines, training: LiveTraining | None = None,
                 uploads: AdapterUploads | None = None) -> None:
        self.engines, self.training, self.uploads = engines, training, uploads
        self.downloads = AdapterDownloads()

    def served(self, request: gr.Request | None) -> Engines:
        """The adapters `request`'s session may ask: all that are served, but others' private ones
        (`--private-adapters`)."""
        return self.engines.seen_by(getattr(request, "session_hash", None))

    def resolve(self, request: gr.Request, gate: float, delta: float, temperature: float, top_p: float,
                max_new_tokens: float, seed: float | None, adapter: str | None = None, system: str | None = None,
                layers: str | None = None) -> tuple[Engine, Settings]:
        """The chosen adapter's engine and the request's settings, both checked."""
        return self.served(request).get(adapter), settings(gate, delta, temperature, top_p, max_new_tokens, seed,
                                                           system, layers)

    @api_inputs("message", "history", *CONTROLS)
    def chat(self, request: gr.Request, message: str, history: list, *controls: Any) -> Iterator[list[dict[str, str]]]:
        with user_errors():
            pairs = to_pairs(history)
            engine, choice = self.resolve(request, *controls)
            with closing(engine.chat(pairs, message, choice)) as answers:
                yield to_messages(pairs + [(message.strip(), "")])  # the question shows before the first token
                for answer in answers:
                    yield to_messages(pairs + [(message.strip(), answer)])

    def retry(self, request: gr.Request, history: list, *controls: Any) -> Iterator[list[dict[str, str]]]:
        pairs = to_pairs(history)
        if not pairs:
            yield history
            return
        yield from self.chat(request, pairs[-1][0], to_messages(pairs[:-1]), *controls)

    @staticmethod
    def give_back(asked: str, typed: str, history: list) -> Any:
        """The message box after an answer ended in an error or was stopped: the question asked where it never
        reached the chat (refused: too long, empty) and nothing new was typed; else the box as it is (Stop,
        Clear and Undo also end an answer, and Undo puts the question back itself)."""
        pairs = to_pairs(history)
        reached = bool(pairs) and pairs[-1][0] == (asked or "").strip()
        return asked if asked and not typed and not reached else gr.skip()

    def undo(self, history: list) -> tuple[list[dict[str, str]], str]:
        pairs = to_pairs(history)
        if not pairs:
            return [], ""
        return to_messages(pairs[:-1]), pairs[-1][0]

    def save_conversation(self, history: list | None, system: str | None = None) -> str:
        """The conversation as one fine-tuning record in the chat `messages` layout (its system prompt first, if
        any; a question not yet answered left out), in a .jsonl file: its answers can be corrected and the file
        trained on in the Train tab or by adapter.finetune."""
        with user_errors():
            record = conversation_record([(user, answer) for user, answer in to_pairs(history) if answer],
                                         check_system(system))
            path = SAVED_CONVERSATIONS.new("conversation-") / RECORD
            path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
            return str(path)

    @staticmethod
    def save_image_conversation(image: Image.Image | None, asked: str, answer: str, conversation: list | None,
                                system: str | None = None) -> str:
        """The conversation about the picture as one fine-tuning record in LLaVA's layout (the turns before, then
        the question last asked and its answer), zipped beside the picture it names: unzipped, the record and the
        picture the Train tab's vision mode (or adapter.finetune --image-folder) trains on."""
        with user_errors():
            if image is None:
                raise ValueError("image: upload the picture the conversation is about first")
            turns = [*to_pairs(conversation), *([(asked, answer)] if asked and answer else [])]
            record = conversation_record([(user, said) for user, said in turns if said], check_system(system), PICTURE)
            folder = SAVED_CONVERSATIONS.new("conversation-")
            (folder / RECORD).write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
            image.convert("RGB").save(folder / PICTURE)
            return str(write_zip(folder / "conversation.zip", "conversation", [folder / RECORD, folder / PICTURE]))

    def chat_shares(self, request: gr.Request, history: list,
                    *controls: Any) -> tuple[list[tuple[str, float]], Figure | None]:
        """The last answer's tokens coloured by their prompt share, and the share per adapter layer."""
        pairs = to_pairs(history)
        if not pairs or not pairs[-1][1]:
            return [], None
        with user_errors():
            engine, choice = self.resolve(request, *controls)
            prompt = engine.chat_prompt(pairs[:-1], pairs[-1][0], choice)
            return shares_view(engine.token_shares(prompt, pairs[-1][1], choice))

    @api_inputs("image", "question", *CONTROLS, "conversation")
    def ask_image(self, request: gr.Request, image: Image.Image | None, question: str, *rest: Any) -> Iterator[str]:
        """The image events take, after the controls, the conversation about the picture so far (trailing: an API
        client asking one question leaves it out)."""
        *controls, conversation = rest
        with user_errors():
            engine, choice = self.resolve(request, *controls)
            answers = engine.ask_image(image, question, choice, to_pairs(conversation))
            warn_if_blind(engine, image)
            yield from answers

    @staticmethod
    def next_image_turn(asked: str, answer: str, conversation: list, question: str) -> tuple[list, str, str]:
        """Before a question about the picture: a new question makes the last one and its answer part of the
        conversation; the same question again is answered again in the same conversation (e.g. at another gate)."""
        pairs = to_pairs(conversation)
        if asked and answer and question.strip() != asked:
            pairs.append((asked, answer))
        return to_messages(pairs), "", question.strip()

    def image_shares(self, request: gr.Request, image: Image.Image | None, question: str, answer: str,
                     *rest: Any) -> tuple[list[tuple[str, float]], Figure | None]:
        *controls, conversation = rest
        if not answer:
            return [], None
        with user_errors():
            engine, choice = self.resolve(request, *controls)
            prompt = engine.image_prompt(question, choice, to_pairs(conversation))
            return shares_view(engine.token_shares(prompt, answer, choice, image))

    @api_inputs("question", *CONTROLS)
    def compare(self, request: gr.Request, question: str, *controls: Any) -> Iterator[tuple[str, str]]:
        with user_errors():
            engine, choice = self.resolve(request, *controls)
            yield from engine.compare(question, choice)

    @api_inputs("question", *CONTROLS)
    def every_adapter(self, request: gr.Request, question: str, *controls: Any) -> Iterator[list[list[str]]]:
        """The question asked of every adapter this session may ask, one after another, each in its own prompt
        format at the settings above (the adapter menu's choice aside): a row per adapter, its answer growing. A
        setting one adapter cannot take (a system prompt for an Alpaca one, layers it has not) is its row's answer."""
        with user_errors():
            check_text(question, "question")
        rows = [[name, ""] for name in self.served(request).names]
        for row in rows:
            try:
                engine, choice = self.resolve(request, *controls[:6], row[0], *controls[7:])
                for answers in engine.sweep(question, [choice.gate_scale], choice):
                    row[1] = answers[0]
                    yield [list(r) for r in rows]
            except ValueError as error:
                row[1] = f"(not asked: {SERVER_FOLDERS.sub('', str(error))})"
                yield [list(r) for r in rows]

    @api_inputs("question", "scales", *CONTROLS)
    def sweep(self, request: gr.Request, question: str, scales: str, *controls: Any) -> Iterator[list[list[Any]]]:
        with user_errors():
            values = gate_scales(scales)
            engine, choice = self.resolve(request, *controls)
            yield from table(values, engine.sweep(question, values, choice))

    @api_inputs("image", "question", "scales", *CONTROLS, "conversation")
    def sweep_image(self, request: gr.Request, image: Image.Image | None, question: str, scales: str,
                    *rest: Any) -> Iterator[list[list[Any]]]:
        *controls, conversation = rest
        with user_errors():
            values = gate_scales(scales)
            engine, choice = self.resolve(request, *controls)
            answers = engine.sweep_image(image, question, values, choice, to_pairs(conversation))
            warn_if_blind(engine, image)
            yield from table(values, answers)

    @api_inputs("question", *CONTROLS)
    def layer_sweep(self, request: gr.Request, question: str, *controls: Any) -> Iterator[list[list[Any]]]:
        with user_errors():
            engine, choice = self.resolve(request, *controls)
            yield from table(*engine.layer_sweep(question, choice))

    @api_inputs("image", "question", *CONTROLS, "conversation")
    def layer_sweep_image(self, request: gr.Request, image: Image.Image | None, question: str,
                          *rest: Any) -> Iterator[list[list[Any]]]:
        *controls, conversation = rest
        with user_errors():
            engine, choice = self.resolve(request, *controls)
            labels, answers = engine.layer_sweep_image(image, question, choice, to_pairs(conversation))
            warn_if_blind(engine, image)
            yield from table(labels, answers)

    @api_inputs("question", "scales", *CONTROLS)
    def next_tokens(self, request: gr.Request, question: str, scales: str,
                    *controls: Any) -> tuple[dict[str, Any], Figure]:
        with user_errors():
            engine, choice = self.resolve(request, *controls)
            return next_token_view(engine.next_tokens(question, scales, choice))

    @api_inputs("image", "question", "scales", *CONTROLS, "conversation")
    def next_tokens_image(self, request: gr.Request, image: Image.Image | None, question: str, scales: str,
                          *rest: Any) -> tuple[dict[str, Any], Figure]:
        *controls, conversation = rest
        with user_errors():
            engine, choice = self.resolve(request, *controls)
            found = engine.next_tokens_image(image, question, scales, choice, to_pairs(conversation))
            warn_if_blind(engine, image)
            return next_token_view(found)

    @api_inputs("data", "scales", "exact", *CONTROLS[:-1], "images", "layers")
    def score(self, request: gr.Request, data: str | None, scales: str, exact: bool,
              *rest: Any) -> tuple[list[list[Any]], Figure]:
        """The score table (one row per gate scale) and its plot. After the controls (the system prompt last) come
        the uploaded pictures of image records and then the layers (trailing inputs, so API clients that score
        text records with every layer may leave them out)."""
        from .evaluate import figure

        *controls, images, layers = rest
        with user_errors():
            engine, choice = self.resolve(request, *controls, layers=layers)
            result = engine.score(data, scales, choice, exact, images)
        if isinstance(result, ChoiceEvaluation):
            rows = [[s.gate_scale, round(100 * s.accuracy, 1), round(100 * s.accuracy_per_byte, 1),
                     round(100 * s.right_probability, 1)] for s in result.scores]
            return {"headers": CHOICE_HEADERS, "data": rows}, figure([result])
        text = result.text_bytes is not None
        rows = [[s.gate_scale, round(s.loss, 4), round(s.perplexity, 3), round(100 * s.token_accuracy, 1),
                 round(result.bits_per_byte(s), 4) if text else "" if s.exact is None else f"{s.exact} / "
                 f"{result.examples}"] for s in result.scores]
        return {"headers": TEXT_HEADERS if text else SCORE_HEADERS, "data": rows}, figure([result])

    def gates(self, request: gr.Request, scale: float, adapter: str | None = None, layers: str | None = None) -> Figure:
        with user_errors():
            return self.served(request).get(adapter).gate_heatmap(scale, layers)

    def training_plot(self, request: gr.Request, adapter: str | None = None) -> dict[str, Any]:
        """The chosen adapter's `gates.png` (hidden when it has none)."""
        with user_errors():
            plot = self.served(request).get(adapter).training_plot()
        return gr.update(value=picture(plot), visible=plot is not None)

    def gate_slider(self, request: gr.Request, adapter: str | None = None) -> dict[str, Any]:
        """The gate slider's label for the chosen adapter (one without prompts has no gates to scale)."""
        with user_errors():
            return gr.update(label=gate_label(self.served(request).get(adapter)))

    def model_info(self, request: gr.Request, adapter: str | None = None) -> dict[str, Any]:
        served = self.served(request)
        with user_errors():
            info = served.get(adapter).model_info()
        return {**info, "adapters_served": served.names}

    def adapter_menus(self, request: gr.Request) -> tuple[dict[str, Any], ...]:
        """The adapter menus (the two at the top, and the Train tab's Start from when there is one) offering what
        is served now to this session, adapters trained or uploaded since the app started included."""
        return menu_updates(self.served(request), self.training is not None)

    def serve_upload(self, request: gr.Request, upload: str | None, named: str = "") -> tuple[Any, ...]:
        """Serve an uploaded adapter (or one named on the hub or an official release) beside the others
        (adapter.adapter_upload): a line saying what it is, and the adapter menus offering it, the top one (and
        the image tab's, if it sees) choosing it."""
        with user_errors():
            name = self.uploads.serve(upload, named, request.session_hash)
        served = self.served(request)
        engine = served.get(name)
        args = engine.model.adapter_args
        kind = ", ".join(filter(None, [f"{args.prompt_len} prompt tokens on {args.prompt_layers} layers"
                                       if args.has_prompts else "", *args.v2_parts,
                                       f"a {args.visual} visual prompt" if args.visual != "none" else ""]))
        scale = "the gate slider moves" if engine.has_gates else "the delta scale (Advanced; it has no gates) moves"
        status = (f"Served as **{name}** ({engine.model.adapter_format} format: {kind}), chosen in the adapter menu "
                  f"above{' and in the Image tab' if engine.can_see_images else ''}; {scale} between the frozen "
                  "base (0) and it (1).")
        return status, *menu_updates(served, self.training is not None, name)

    def remove_adapter(self, request: gr.Request, adapter: str | None) -> tuple[Any, ...]:
        """Serve the chosen adapter no more, if it was trained or uploaded here (those served from the start
        stay): a line saying so, and the menus without it, back on the first adapter (the image tab's on the
        first that sees)."""
        with user_errors():
            name = adapter or self.engines.names[0]
            self.served(request).get(name)  # another session's private adapter is not served to this one
            if not any(added.remove(name) for added in self.added()):
                raise ValueError(f"adapter: {name} was served from the start; only adapters trained or uploaded "
                                 "here can be removed")
        served = self.served(request)
        return (f"**{name}** is served no more; its files are removed.",
                *menu_updates(served, self.training is not None, served.names[0], served.for_images))

    def forget_session(self, request: gr.Request) -> None:
        """A page was closed: its stopped run is resumed no more, and (private adapters) the adapters it trained or
        uploaded are served no more and its API key reaches nothing more."""
        for added in self.added():
            added.forget(request.session_hash)
        if self.training is not None:
            self.training.forget(request.session_hash)
        self.engines.revoke_key(request.session_hash)

    def api_key(self, request: gr.Request) -> str:
        """This session's key to the OpenAI-compatible API beside the app: with it, API requests reach the adapters
        the session trains or uploads (`--private-adapters`) as well as everyone's, until its page is closed."""
        headers = request.headers
        address = f"{headers.get('x-forwarded-proto', 'http')}://{headers.get('x-forwarded-host', headers['host'])}"
        return (f"`base_url`: `{address}/v1` · `api_key`: `{self.engines.api_key(request.session_hash)}` (it reaches "
                "the adapters this page trains or uploads, besides everyone's, until the page is closed or reloaded)")

    def added(self) -> list[AddedAdapters]:
        """Those trained and those uploaded here (where the app lets users add adapters)."""
        return [added for added in (self.uploads and self.uploads.uploaded, self.training and self.training.trained)
                if added is not None]

    def download_adapter(self, request: gr.Request, to: str, adapter: str | None = None) -> str:
        """The chosen adapter (omitted: the first) written in format `to`, as `python -m adapter.convert` writes
        it: the file to download, with convert's warning where the format loses how the adapter is asked."""
        with user_errors():
            engine = self.served(request).get(adapter)
            path = self.downloads.write(engine.model, adapter or self.engines.names[0], to)
        note = unrecorded_format_note(engine.model, to)
        if note:
            gr.Warning(note)
        return str(path)

    def push_adapter(self, request: gr.Request, repo: str, token: str, private: bool,
                     adapter: str | None = None) -> str:
        """The chosen adapter (omitted: the first) pushed to the hub repository `repo` with the user's own `token`,
        never the server's (on a Space, that would let every visitor write as its owner), with a card (and, for one
        trained in the Train tab, its run's): a line linking the commit."""
        with user_errors():
            name = adapter or self.engines.names[0]
            engine = self.served(request).get(adapter)
            if engine.model.adapter_args.learns_nothing:
                raise ValueError(f"adapter: {name} is the frozen base without an adapter; there is nothing to push")
            repo = repo_id(repo or "", "repo")
            if not (token or "").strip():
                raise ValueError(f"token: give a Hugging Face token that may write to {repo} "
                                 "(huggingface.co/settings/tokens); it is used for this push alone and not kept")
            run = training_of(Path(engine.adapter)) if engine.adapter else None
            url = push_model(engine.model, engine.base, repo, run, private=bool(private), token=token.strip())
        return (f"Pushed **{name}** to [{repo}](https://huggingface.co/{repo}) ([the commit]({url})): served "
                f"anywhere on this base with `--adapter hf:{repo}`, on a Space of yours by `python -m adapter.space`.")

    def train(self, data: str | None, mode: str, epochs: float, batch_size: float, lr: float, prompt_len: float,
              prompt_layers: float, lora_rank: float, prompt_format: str, seed: float, start_from: str | None,
              images: list[str] | None, keep_best: bool, early_stop: float,
              request: gr.Request) -> Iterator[tuple[Any, ...]]:
        """Train an adapter on the served base (adapter.live_training), a new one or (`start_from`) a served one
        further, on records and the pictures image records name: its status, loss and gates as it goes, then the
        zip of it and the adapter menus offering it, the top one choosing it. `keep_best`: the adapter of the lowest
        validation loss is served; `early_stop`: validations without a lower loss that end the run (0: never)."""
        with user_errors():
            asked = TrainRequest(data=data, mode=mode, epochs=check_integer("epochs", epochs),
                                 batch_size=check_integer("batch_size", batch_size),
                                 lr=float("nan") if lr is None else float(lr),  # an emptied box: refused by name
                                 prompt_len=check_integer("prompt_len", prompt_len),
                                 prompt_layers=check_integer("prompt_layers", prompt_layers),
                                 lora_rank=check_integer("lora_rank", lora_rank), prompt_format=prompt_format,
                                 seed=check_integer("seed", seed), start_from=start_from or None,
                                 images=tuple(images or ()), keep_best=bool(keep_best),
                                 early_stop=check_integer("early_stop", early_stop or 0))
            yield from self._follow(self.training.run(asked, request.session_hash), request)

    def resume_training(self, request: gr.Request) -> Iterator[tuple[Any, ...]]:
        """Continue this page's last run, stopped, to its end (the adapter it would have given had it never
        stopped), served in the stopped one's place: the Train tab's outputs as `train` gives them."""
        with user_errors():
            yield from self._follow(self.training.resume(request.session_hash), request)

    def _follow(self, runs: Iterator[TrainProgress], request: gr.Request) -> Iterator[tuple[Any, ...]]:
        with closing(runs):  # a closed page stops the run
            for progress in runs:
                yield training_view(progress, self.served(request))

    def stop_training(self, request: gr.Request) -> None:
        """Stop this page's run after its step under way; what it learnt so far is kept and served."""
        if not self.training.stop(request.session_hash):
            gr.Info(NOTHING_TO_STOP)


def training_view(progress: TrainProgress, engines: Engines) -> tuple[Any, ...]:
    """The Train tab's outputs: status, loss and gate curves, and once the run has ended its zip and the adapter
    menus offering it (until then those are left as they are)."""
    import pandas as pd

    curves = (pd.DataFrame(progress.loss_points(), columns=list(LOSS_COLUMNS)),
              pd.DataFrame(progress.gate_points(), columns=list(GATE_COLUMNS)))
    if progress.name is None:
        return progress.status(), *curves, None, gr.update(), gr.update(), gr.update()
    return progress.status(), *curves, str(progress.archive), *menu_updates(engines, True, progress.name)


def menu_updates(engines: Engines, training: bool, chosen: str | None = None,
                 image_chosen: str | None = None) -> tuple[dict[str, Any], ...]:
    """Updates of the adapter menus offering what `engines` serve: the two at the top, `chosen` picked in the
    first (and in the image tab's when it sees, or `image_chosen` there), and with `training` the Train tab's
    Start from."""
    names = engines.names
    offered = dict(choices=names, visible=len(names) > 1)
    picked = {} if chosen is None else dict(value=chosen)
    if image_chosen is None and chosen is not None and engines.get(chosen).can_see_images:
        image_chosen = chosen
    image_picked = {} if image_chosen is None else dict(value=image_chosen)
    tops = (gr.update(**offered, **picked), gr.update(**offered, **image_picked))
    return (*tops, gr.update(choices=start_choices(names))) if training else tops


def start_choices(names: list[str]) -> list[tuple[str, str]]:
    """The Train tab's Start from menu: a new adapter ("") or a served one by name."""
    return [(NEW_ADAPTER, "")] + [(name, name) for name in names]


def gate_label(engine: Engine) -> str:
    """'Gate scale', or what to move instead for an adapter without adaption prompts (a LoRA, the V2 dialog)."""
    if engine.has_gates:
        return GATE_LABEL
    if not engine.model.adapter_args.has_deltas:
        return f"{GATE_LABEL} (no adapter: the frozen base answers)"
    return f"{GATE_LABEL} (this adapter has no adaption prompts, so no gates: the delta scale in Advanced blends it)"
