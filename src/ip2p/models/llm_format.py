"""The instruction LM's text format (the paper's GPT-3 fine-tuning format, docs/method.md section 1):

    prompt     = caption + "\\n##\\n"
    completion = edit + "\\n%%\\n" + edited caption + "\\nEND"

Shared by the LM's tokenizer (its markers get merges of their own), fine-tuning, generation and the
validator that parses completions back.
"""

from __future__ import annotations

PROMPT_SUFFIX = "\n##\n"
SEPARATOR = "\n%%\n"
END = "\nEND"


def format_prompt(caption: str) -> str:
    return caption + PROMPT_SUFFIX


def format_completion(edit: str, output: str) -> str:
    return edit + SEPARATOR + output + END
