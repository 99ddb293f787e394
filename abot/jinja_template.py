"""Hugging Face chat templates: Jinja rendered as transformers renders it, then tokenized with the assistant mask.

Rendering follows transformers' `apply_chat_template` (5.x, utils/chat_template_utils.py): an immutable
sandboxed environment with `trim_blocks` and `lstrip_blocks`, loop controls, `raise_exception(msg)`,
`strftime_now(fmt)`, and a `tojson` that keeps non-ASCII text (ensure_ascii=False); in scope are `messages`,
`add_generation_prompt` and the tokenizer's named special tokens (`bos_token`, `eos_token`, ...). The text is
then encoded without adding special tokens (transformers' add_special_tokens=False): a template that writes
`bos_token` itself gets exactly one BOS, and one that does not gets none.

The assistant mask (1 on each assistant message's content and its end-of-turn marker, as abot's own template)
comes from the template itself. For assistant message i, the text of messages[:i] with the generation prompt
is where the reply starts, and the text of messages[:i + 1] without trailing whitespace is where it ends.
When the full conversation renders an earlier turn differently (Qwen3 writes an empty think block only in
the last turns), the turn ends instead at the first end-of-turn marker after its start: the text a template
writes after an assistant message, found once by rendering a probe conversation. Character spans become
tokens through the tokenizer's offsets: a token is masked when it starts inside a span.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, Callable, Mapping, Sequence

from abot.chat_template import ChatTemplate, Rendered
from abot.errors import AbotError

TextOf = Callable[[Sequence[Mapping[str, Any]], bool], str]  # (messages, add_generation_prompt) -> text
PROBE = ({"role": "user", "content": "abot-probe-question"}, {"role": "assistant", "content": "abot-probe-answer"})


def _raise_exception(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' `tojson`: plain json.dumps, non-ASCII kept (Jinja's own escapes HTML characters)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=1)
def environment():
    """The Jinja environment transformers renders chat templates in (sandboxed: templates are untrusted)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


def compile_template(source: str, name: str):
    """Jinja source -> a template; AbotError naming the template when it does not parse."""
    import jinja2

    try:
        return environment().from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise AbotError(f"chat template {name}: not valid Jinja (line {err.lineno}: {err.message})") from None


def render_text(template, name: str, variables: Mapping[str, Any], messages: Sequence[Mapping[str, Any]],
                add_generation_prompt: bool) -> str:
    """The template's text for `messages`; AbotError naming the template when it refuses them."""
    import jinja2

    try:
        return template.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                               **variables)
    except jinja2.exceptions.TemplateError as err:
        raise AbotError(f"chat template {name} refused the conversation: {err}") from None


def end_of_turn_text(text_of: TextOf) -> str:
    """What the template writes right after an assistant message ("<|im_end|>", "<|eot_id|>"); "" if nothing."""
    try:
        before, after = text_of(PROBE[:1], True), text_of(PROBE, False)
    except AbotError:
        return ""
    tail = after[len(before):] if after.startswith(before) else after
    answer = PROBE[1]["content"]
    at = tail.rfind(answer)
    return tail[at + len(answer):].strip() if at >= 0 else ""


def assistant_spans(text_of: TextOf, messages: Sequence[Mapping[str, Any]], full: str, end_marker: str,
                    name: str) -> list[tuple[int, int]]:
    """Character spans of `full` (the rendered conversation) that are assistant content and end markers."""
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = text_of(messages[:i], True)
        start = len(prompt)
        if not full.startswith(prompt):
            raise AbotError(f"chat template {name}: the conversation up to message {i} with the generation prompt "
                            "is not the start of the whole conversation, so the assistant mask cannot be found")
        upto = text_of(messages[:i + 1], False).rstrip()
        if len(upto) > start and full.startswith(upto):
            spans.append((start, len(upto)))
        elif end_marker and (at := full.find(end_marker, start)) >= 0:
            spans.append((start, at + len(end_marker)))
        else:
            raise AbotError(f"chat template {name}: cannot find where assistant message {i} ends in the rendered "
                            "conversation (no end-of-turn marker)")
    return spans


def token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token whose first character lies inside one of `spans`, else 0."""
    return [1 if any(s <= begin < e for s, e in spans) else 0 for begin, _ in offsets]


def jinja_chat_template(source: str, name: str, variables: Mapping[str, Any],
                        token_to_id: Callable[[str], int | None]) -> ChatTemplate:
    """A `ChatTemplate` from Jinja source; its render needs a tokenizer with `encode_offsets(text)`."""
    template = compile_template(source, name)
    text_of: TextOf = functools.partial(render_text, template, name, dict(variables))
    end_marker = end_of_turn_text(text_of)
    end_id = token_to_id(end_marker) if end_marker else None
    end_ids = () if end_id is None else (end_id,)

    def render(messages, add_generation_prompt, tokenizer) -> Rendered:
        full = text_of(messages, add_generation_prompt)
        ids, offsets = tokenizer.encode_offsets(full)
        return Rendered(ids, token_mask(offsets, assistant_spans(text_of, messages, full, end_marker, name)))

    return ChatTemplate(name, render, stop_ids=end_ids, end_of_turn_ids=end_ids)


def missing_template(name: str) -> ChatTemplate:
    """The template of a tokenizer that has none: rendering says so (pre-training never renders)."""
    def render(messages, add_generation_prompt, tokenizer) -> Rendered:
        raise AbotError(f"{name}: the tokenizer has no chat template (no chat_template.jinja, no chat_template in "
                        "tokenizer_config.json); SFT, DPO and abot chat need one: add it to the folder")

    return ChatTemplate(name, render, stop_ids=(), end_of_turn_ids=())
