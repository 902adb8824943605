"""Text in and out of the server: incremental detokenization with stop strings, and chat prompts.

Detokenizing token by token is not `decode([t])`: byte-level BPE splits a UTF-8 character over
several tokens and SentencePiece-style tokenizers drop a leading space when a token is decoded
alone. `TextStream` decodes a short window of recent tokens and releases only text that is
final: no trailing replacement character (an unfinished UTF-8 sequence), and nothing that could
still turn into the start of a stop string. A stop string ends the text just before it.

Chat prompts come from a Jinja chat template, as in transformers: the tokenizer's own
(`chat_template` of an HF tokenizer) or one given with `--chat-template`. A checkpoint whose
tokenizer has neither is refused for chat (see `ChatFormatter`): our own BPE models are trained
on plain text with no chat format, and a made-up template would produce a prompt the model has
never seen while looking like it works.
"""
from __future__ import annotations

from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmstack.data import EOT, Tokenizer
from llmstack.errors import UserError


class ChatTemplateError(UserError):
    pass


class TextStream:
    """Turns generated token ids into text deltas; `stopped` once a stop string appeared."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] decode to text already counted
        self.read_offset = 0
        self.text = ""  # final text so far (before any stop string)
        self.sent = 0  # characters of self.text already handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append one token; return the text that became final (possibly "")."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._append(full[len(prefix):])
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """No more tokens: whatever is still held back (an unfinished character, a partial stop) is final."""
        if not self.stopped:
            prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
            full = self.tokenizer.decode(self.ids[self.prefix_offset:])
            if len(full) > len(prefix):
                self._append(full[len(prefix):])
        return self._release(final=True)

    def _append(self, delta: str) -> None:
        if self.stopped:
            return
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, len(self.text) - longest + 1)
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def _release(self, *, final: bool) -> str:
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._partial_stop_len()
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out

    def _partial_stop_len(self) -> int:
        """Length of the longest end of the text that is the beginning of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best


def _read_template(source: str | Path) -> str:
    path = Path(source)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ChatTemplateError(f"--chat-template {path}: cannot read it ({e.__class__.__name__})") from None


class ChatFormatter:
    """Renders `messages` to a prompt string with a Jinja chat template (transformers' conventions:
    `messages`, `add_generation_prompt`, `bos_token`, `eos_token`), in a sandbox."""

    def __init__(self, tokenizer: Tokenizer, template_file: str | Path | None = None):
        self.source = None
        template = None
        if template_file is not None:
            template, self.source = _read_template(template_file), f"--chat-template {template_file}"
        elif tokenizer.kind == "hf" and getattr(tokenizer._tok, "chat_template", None):
            template, self.source = tokenizer._tok.chat_template, "the tokenizer's chat template"
        self.bos = self.eos = ""
        if tokenizer.kind == "hf":
            self.bos = tokenizer._tok.bos_token or ""
            self.eos = tokenizer._tok.eos_token or ""
        elif tokenizer.kind == "bpe":  # our BPE: end-of-text separates (so also starts) every document
            self.bos = self.eos = EOT
        self._template = None
        if template is not None:
            def raise_exception(message):
                raise jinja2.TemplateError(message)
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            try:
                self._template = env.from_string(template)
            except jinja2.TemplateError as e:
                raise ChatTemplateError(f"{self.source}: not a valid Jinja template: {e}") from None

    @property
    def available(self) -> bool:
        return self._template is not None

    def render(self, messages: list[dict]) -> str:
        """The prompt for `messages` ([{"role", "content"}]) ending where the assistant's reply starts.
        Raises ChatTemplateError when there is no template or the template rejects the messages."""
        if self._template is None:
            raise ChatTemplateError("this model has no chat template (its tokenizer defines none and the server was "
                                    "started without --chat-template FILE); use /v1/completions with a plain prompt")
        try:
            return self._template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos,
                                         eos_token=self.eos)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template: {e}") from None
