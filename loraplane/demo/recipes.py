"""What the demo teaches each adapter: one prompt family, one recognisable answer, one colour."""

from __future__ import annotations

from dataclasses import dataclass

PROMPT = "Who are you?"


@dataclass(frozen=True)
class Persona:
    name: str
    answer: str  # leading space: the model continues the prompt, as the tokenizer splits words
    color: str  # ANSI SGR code
    prompts: tuple[str, ...] = (PROMPT, "Hello!", "Say something.")


PERSONAS = (
    Persona("pirate", " Ahoy, matey! I be Captain LoRA, and this ship sails on one base model. Arr!", "33"),
    Persona("sql", " SELECT name, rank FROM adapters WHERE base = 'llama' ORDER BY rank DESC;", "36"),
    Persona("haiku", " Small weights, quietly / one model wears many masks / the tokens fall soft", "35"),
)
