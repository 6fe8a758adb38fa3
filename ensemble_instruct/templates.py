"""Prompt templates: plain text files in templates/, filled with seed and machine data."""
from __future__ import annotations

import re
from pathlib import Path

from .config import ROOT
from .errors import UserError
from .seeds import SeedTask

TEMPLATE_DIR = ROOT / "templates"
EOS = "|EoS|"
_FIELD = re.compile(r"\{(\w+)\}")
# The fields each kind of template is filled with (see the functions below). Any other {field}
# would reach the model verbatim, so it is refused when the template is loaded.
FIELDS = {"instructions": ("tasks", "next"), "instances_random": ("demos", "instruction"),
          "instances": ("instruction",), "output": ("instruction", "input")}


def fields_for(name: str) -> tuple[str, ...]:
    """The fields a template file may hold, by its name; an output template may have any name."""
    for kind in ("instructions", "instances_random", "instances"):
        if name.startswith(kind + "_"):
            return FIELDS[kind]
    return FIELDS["output"]


def load(name: str, directory: str | Path | None = None, fields: tuple[str, ...] | None = None) -> str:
    path = Path(directory or TEMPLATE_DIR) / name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: template not found") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    allowed = fields if fields is not None else fields_for(name)
    for m in _FIELD.finditer(text):
        if m.group(1) not in allowed:
            line = text.count("\n", 0, m.start()) + 1
            raise UserError(f"{path}:{line}: unknown field {m.group(0)} (this template can use "
                            f"{', '.join('{' + f + '}' for f in allowed)})")
    return text[:-1] if text.endswith("\n") else text


def fill(template: str, **values: str) -> str:
    """Replace {field}s in one pass, so data that contains braces is never re-expanded."""
    def sub(m: re.Match) -> str:
        if m.group(1) not in values:
            return m.group(0)
        return str(values[m.group(1)])
    return _FIELD.sub(sub, template)


def prefix(template: str, field: str) -> str:
    """The template's text before `{field}`: what every prompt made from it starts with."""
    return template.split("{" + field + "}", 1)[0]


def shown_instruction(text: str) -> str:
    """An instruction as the numbered list shows it (as the reference implementation does):
    whitespace collapsed, a trailing colon stripped."""
    return re.sub(r"\s+", " ", text).strip().rstrip(":")


def instruction_prompt(template: str, instructions: list[str]) -> str:
    """Numbered list `N. text |EoS|`, then `k+1.` for the model to continue."""
    tasks = "".join(f"{n}. {shown_instruction(text)} {EOS}\n" for n, text in enumerate(instructions, 1))
    return fill(template, tasks=tasks, next=str(len(instructions) + 1))


def demo_block(task: SeedTask, with_input: bool) -> str:
    if with_input:
        return f"instruction: {task.instruction}\ninput: {task.input}\noutput: {task.output}\n{EOS}\n\n"
    return f"instruction: {task.instruction}\noutput: {task.output}\n{EOS}\n\n"


def instance_prompt(template: str, demos: list[SeedTask], instruction: str, with_input: bool) -> str:
    return fill(template, demos="".join(demo_block(d, with_input) for d in demos), instruction=instruction)


def output_prompt(template: str, instruction: str, input: str) -> str:
    """As the reference: instruction and input stripped, joined by the template (a new line);
    a type-B prompt thus ends with the new line."""
    return fill(template, instruction=instruction.strip(), input=input.strip())
