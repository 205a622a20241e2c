"""What a row means: its text cut into segments, each either prompt (no loss) or completion (loss).

    alpaca    instruction / input / output, in the Stanford Alpaca prompt; the output is the completion
    chat      a list of messages (role + content, or ShareGPT's from + value) rendered with the
              tokenizer's chat template, or a built-in one when it has none; assistant turns are
              the completions. A transcript stored as one string is split at the turn markers.
    text      one text field, all of it trained on (continued pre-training)
    template  data.prompt_template and data.completion_template, Python format strings over the
              row's fields, e.g. "Question: {question}\\nAnswer: " and "{answer}"

A problem with a row raises RowError naming the field; the tokenizer stage adds the file and row.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path

from fsdpqlora.config import Config
from fsdpqlora.errors import ConfigError

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

# For tokenizers without a chat template (every base model's): Zephyr's layout, whose turns end with
# the tokenizer's own EOS, so a model trained on it stops where generation stops, and no token has to
# be added to a vocabulary whose embeddings are frozen.
BUILTIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)
ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}


class RowError(Exception):
    """A row the format cannot use; `field` names what is wrong with it."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field '{field}': {problem}")
        self.field = field


@dataclass(frozen=True)
class Segment:
    text: str
    is_completion: bool


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    if input_text:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT.format(instruction=instruction)


def _has(fields: dict) -> str:
    return f"the row has {', '.join(map(repr, fields))}" if fields else "the row is empty"


def _text_field(fields: dict, name: str, needs: str, optional: bool = False) -> str:
    value = fields.get(name)
    if value is None:
        if optional:
            return ""
        raise RowError(name, f"null ({needs})" if name in fields else f"missing ({needs}); {_has(fields)}")
    if not isinstance(value, str):
        raise RowError(name, f"must be a string, got {type(value).__name__}")
    return value


class Alpaca:
    # The tokenizer stage adds BOS (where the tokenizer uses one) before the prompt and EOS after
    # the completion.
    adds_bos = adds_eos = True
    needs = "the alpaca format needs instruction and output; input is optional"

    def segments(self, fields: dict) -> list[Segment]:
        instruction = _text_field(fields, "instruction", self.needs)
        input_text = _text_field(fields, "input", self.needs, optional=True)
        output = _text_field(fields, "output", self.needs)
        return [Segment(alpaca_prompt(instruction, input_text), False), Segment(output, True)]

    def generation_prompt(self, instruction: str) -> str:
        return alpaca_prompt(instruction)


class Text:
    adds_bos = adds_eos = True

    def __init__(self, field: str):
        self.field = field

    def segments(self, fields: dict) -> list[Segment]:
        return [Segment(_text_field(fields, self.field, f"the text format reads data.text_field={self.field}"), True)]

    def generation_prompt(self, text: str) -> str:
        return text


class Template:
    adds_bos = adds_eos = True

    def __init__(self, prompt: str, completion: str):
        # "\n" typed on a command line reaches us as a backslash and an n
        self.prompt, self.completion = (t.replace("\\n", "\n").replace("\\t", "\t") for t in (prompt, completion))
        self.fields = list(dict.fromkeys(template_fields(prompt) + template_fields(completion)))

    def segments(self, fields: dict) -> list[Segment]:
        values = {}
        for name in self.fields:
            value = fields.get(name)
            if value is None:
                raise RowError(name, f"{'null' if name in fields else 'missing'} (the template uses {', '.join(self.fields)})")
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise RowError(name, f"must be a string or a number, got {type(value).__name__}")
            values[name] = value
        return [Segment(self.prompt.format(**values), False), Segment(self.completion.format(**values), True)]

    def generation_prompt(self, text: str) -> str:
        prompt_fields = template_fields(self.prompt)
        return self.prompt.format(**{prompt_fields[0]: text}) if len(prompt_fields) == 1 else text


class Chat:
    """Messages rendered with a chat template. The completions are found by rendering the
    conversation up to each assistant turn: the text between the prompt for that turn (rendered with
    the generation prompt) and the conversation through that turn is the assistant's, end-of-turn
    marker included, so the model learns to end its turns."""

    def __init__(self, field: str, template: str, builtin: bool, tokenizer, markers: dict[str, str] | None = None):
        self.field, self.template, self.tokenizer = field, template, tokenizer
        # A template of the tokenizer writes its own BOS where it wants one; the built-in one writes
        # none, so the tokenizer stage adds it as it does for the other formats. Templates end
        # each turn themselves.
        self.adds_bos, self.adds_eos = builtin, False
        self.turns = _turn_splitter(markers) if markers else None

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def messages(self, fields: dict) -> list[dict]:
        value = fields.get(self.field)
        if isinstance(value, str) and self.turns is not None:
            value = self.turns(value, self.field)
        if value is None and self.field in fields:
            raise RowError(self.field, "null (the chat format reads data.messages_field)")
        if value is None:
            # another field that holds messages, e.g. ShareGPT's `conversations`
            found = [k for k, v in fields.items() if isinstance(v, list) and v and all(isinstance(m, dict) for m in v)]
            hint = f"; set data.messages_field={found[0]}" if found else ""
            raise RowError(self.field, f"missing (the chat format reads data.messages_field); {_has(fields)}{hint}")
        if not isinstance(value, list):
            hint = "; set data.user_marker and data.assistant_marker to split transcripts" if isinstance(value, str) else ""
            raise RowError(self.field, f"must be a list of messages, got {type(value).__name__}{hint}")
        messages = []
        for number, message in enumerate(value, start=1):
            if not isinstance(message, dict):
                raise RowError(self.field, f"message {number} is not an object")
            role = message.get("role", message.get("from"))
            content = message.get("content", message.get("value"))
            if role not in ROLES:
                raise RowError(self.field, f"message {number} has role {role!r}; roles are system, user, assistant (or human, gpt)")
            if not isinstance(content, str):
                raise RowError(self.field, f"message {number} content must be a string, got {type(content).__name__}")
            messages.append({"role": ROLES[role], "content": content})
        if not any(m["role"] == "assistant" for m in messages):
            raise RowError(self.field, "has no assistant message, so nothing to learn")
        return messages

    def segments(self, fields: dict) -> list[Segment]:
        messages = self.messages(fields)
        try:
            whole = self.render(messages, add_generation_prompt=False)
            segments, done = [], 0
            for turn, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                prompt = self.render(messages[:turn], add_generation_prompt=True)
                through = self.render(messages[: turn + 1], add_generation_prompt=False)
                if not (whole.startswith(prompt) and whole.startswith(through) and done <= len(prompt) <= len(through)):
                    raise RowError(
                        self.field,
                        f"the chat template renders message {turn + 1} differently inside the whole conversation, "
                        "so the assistant's tokens cannot be found; choose another data.chat_template",
                    )
                segments += [Segment(whole[done : len(prompt)], False), Segment(whole[len(prompt) : len(through)], True)]
                done = len(through)
        except RowError:
            raise
        except Exception as exc:  # the template's raise_exception(), e.g. roles that do not alternate
            raise RowError(self.field, f"the chat template refuses it ({type(exc).__name__}: {exc})") from None
        segments.append(Segment(whole[done:], False))
        return [s for s in segments if s.text]

    def generation_prompt(self, instruction: str) -> str:
        return self.render([{"role": "user", "content": instruction}], add_generation_prompt=True)


def _turn_splitter(markers: dict[str, str]):
    """Split a transcript like "### Human: Hi### Assistant: Hello" where its markers (role ->
    marker) start the turns; text before the first marker is a system message."""
    role_of = {marker: role for role, marker in markers.items()}
    pattern = re.compile("(" + "|".join(re.escape(m) for m in sorted(role_of, key=len, reverse=True)) + ")")

    def split(text: str, field: str) -> list[dict]:
        parts = pattern.split(text)
        turns = [{"role": "system", "content": parts[0].strip()}] if parts[0].strip() else []
        return turns + [
            {"role": role_of[marker], "content": content.strip()} for marker, content in zip(parts[1::2], parts[2::2], strict=True)
        ]

    return split


def template_fields(template: str, key: str = "template") -> list[str]:
    """The named fields of a format string, in order of first use. Raises ConfigError when the
    string is not a valid format string or uses positional fields."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ConfigError(f"{key}={template!r}: not a valid template ({exc})") from None
    if any(not name or name.isdigit() or "." in name or "[" in name for name in names):
        raise ConfigError(f"{key}={template!r}: template fields must be plain names, e.g. {{question}}")
    return list(dict.fromkeys(names))


def chat_template_of(cfg: Config, tokenizer) -> tuple[str, bool]:
    """(template, is_builtin) for data.chat_template: auto (the tokenizer's, or the built-in when it
    has none), builtin, or the path of a Jinja file."""
    choice = cfg.data.chat_template
    if choice == "auto":
        own = getattr(tokenizer, "chat_template", None)
        return (own, False) if isinstance(own, str) and own else (BUILTIN_CHAT_TEMPLATE, True)
    if choice == "builtin":
        return BUILTIN_CHAT_TEMPLATE, True
    path = Path(choice).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.chat_template={choice!r}: not auto, builtin, or an existing Jinja file")
    return path.read_text(encoding="utf-8"), False


def make_format(cfg: Config, tokenizer):
    d = cfg.data
    if d.format == "alpaca":
        return Alpaca()
    if d.format == "text":
        return Text(d.text_field)
    if d.format == "template":
        return Template(d.prompt_template, d.completion_template)
    template, builtin = chat_template_of(cfg, tokenizer)
    markers = {"user": d.user_marker, "assistant": d.assistant_marker} if d.user_marker else None
    return Chat(d.messages_field, template, builtin, tokenizer, markers)
