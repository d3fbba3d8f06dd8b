"""The one parser and validator of generated edits, and the text checks the caption stage shares.

Every instruction backend (template, local LM, OpenAI-compatible endpoint) hands back a completion
in the paper's format, and this module alone decides whether it becomes a training pair:

    prompt     = caption + "\\n##\\n"
    completion = edit + "\\n%%\\n" + edited caption + "\\nEND"

Rejection reasons (counted by the stage): malformed (no or several separators, a multi-line part),
empty, unchanged (edited caption equals the input after lower-casing and stripping ".!?", as the
paper does), overlong_instruction / overlong_output (word or CLIP-token limits), blocklisted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ip2p.errors import Ip2pError
from ip2p.models.llm_format import END, PROMPT_SUFFIX, SEPARATOR, format_completion, format_prompt  # noqa: F401

# Rejection reasons of the validator, in the order they are checked.
MALFORMED, EMPTY, UNCHANGED = "malformed", "empty", "unchanged"
OVERLONG_INSTRUCTION, OVERLONG_OUTPUT, BLOCKLISTED = "overlong_instruction", "overlong_output", "blocklisted"

TokenCounter = Callable[[Sequence[str]], list[int]]


def few_shot_prefix(examples: Iterable[dict]) -> str:
    """Human examples written as complete prompt+completion blocks, one after another."""
    return "".join(format_prompt(e["input"]) + format_completion(e["edit"], e["output"]) + "\n\n" for e in examples)


def load_human_examples(path: str | Path, rejected: "Counter | None" = None) -> list[dict]:
    """Human-written examples {"input", "edit", "output"} (the paper's released format); lines that are
    unreadable or lack a non-empty string field are counted in `rejected`, not returned."""
    from collections import Counter

    from ip2p.io import read_jsonl

    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise Ip2pError(f"human examples not found: '{path}' (JSONL with keys input, edit, output)")
    rejected = rejected if rejected is not None else Counter()
    examples = []
    for record in read_jsonl(path, rejected):
        fields = [record.get(k) for k in ("input", "edit", "output")]
        if all(isinstance(f, str) and f.strip() and "\n" not in f.strip() for f in fields):
            examples.append({k: " ".join(f.split()) for k, f in zip(("input", "edit", "output"), fields)})
        else:
            rejected["missing_field"] += 1
    return examples


def pick_examples(examples: list[dict], k: int, seed: int) -> list[dict]:
    """A fixed seeded choice of k examples (the same prefix for every prompt: cache friendly)."""
    from ip2p.io import stable_seed

    ranked = sorted(examples, key=lambda e: stable_seed(seed, "few-shot", e["input"], e["edit"]))
    return ranked[:k]


def normalise_caption(text: str) -> str:
    """Key for de-duplication: lower case, punctuation removed, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


def bare(text: str) -> str:
    """The paper's comparison key: lower case, surrounding whitespace and ".!?" stripped."""
    return text.lower().strip().strip(".!?").strip()


def word_count(text: str) -> int:
    return len(text.split())


class Blocklist:
    """Words or phrases matched case-insensitively on word boundaries ("sex" does not match "Essex")."""

    def __init__(self, terms: Iterable[str]):
        self.terms = sorted({" ".join(t.lower().split()) for t in terms if t and t.strip()})
        alternatives = "|".join(r"\s+".join(map(re.escape, t.split())) for t in self.terms)
        self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE) if self.terms else None

    def find(self, text: str) -> str | None:
        """The first blocklisted term in `text`, or None."""
        if self._pattern is None:
            return None
        match = self._pattern.search(text)
        return match.group(0).lower() if match else None

    def __len__(self) -> int:
        return len(self.terms)


def builtin_blocklist_path() -> Path:
    return Path(str(resources.files("ip2p").joinpath("assets/blocklist.txt")))


def load_blocklist(file: str | None, words: Iterable[str] | None = None) -> Blocklist:
    """`file`: "builtin" (the packaged list), a path to a words file (one term a line, # comments),
    or null for none; `words`: extra terms from the config."""
    terms = list(words or [])
    if file:
        path = builtin_blocklist_path() if file == "builtin" else Path(str(file)).expanduser()
        if not path.is_file():
            raise Ip2pError(f"blocklist file not found: '{file}'")
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                terms.append(line)
    return Blocklist(terms)


def load_token_counter(tokenizer: str | None, model_cfg, cache_dir: str | Path) -> TokenCounter:
    """Count CLIP tokens (with start/end tokens, as the text encoder sees them).

    `tokenizer`: null = the CLIP tokenizer of the model preset (`model.clip`: the tiny one, or e.g.
    openai/clip-vit-large-patch14, whose tokenizer Stable Diffusion 1.5 shares); otherwise a folder or
    hub id holding a tokenizer (a diffusers pipeline folder works: its tokenizer/ subfolder is used).
    """
    from transformers import AutoTokenizer

    from ip2p.config import first_line
    from ip2p.models.loader import resolve_source

    source = tokenizer if tokenizer else resolve_source(model_cfg["clip"], "clip", model_cfg, cache_dir)
    source = str(source)
    kwargs = {}
    if (Path(source).expanduser() / "tokenizer").is_dir():
        kwargs["subfolder"] = "tokenizer"
    try:
        tok = AutoTokenizer.from_pretrained(str(Path(source).expanduser()) if Path(source).expanduser().exists()
                                            else source, **kwargs)
    except (OSError, ValueError) as err:
        raise Ip2pError(f"cannot load the tokenizer '{source}' for counting caption tokens: {first_line(err)}") from err

    def count(texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in tok(list(texts), add_special_tokens=True, truncation=False)["input_ids"]]

    return count


@dataclass(frozen=True)
class Limits:
    max_edit_words: int | None = 24
    max_output_words: int | None = 60
    max_output_tokens: int | None = 77


@dataclass(frozen=True)
class Verdict:
    """A parsed completion: (edit, output) when `reason` is None, otherwise why it was rejected."""

    edit: str | None
    output: str | None
    reason: str | None

    @property
    def ok(self) -> bool:
        return self.reason is None


def parse_completion(text: str | None) -> Verdict:
    """Split a completion into (edit, edited caption); only the format is checked here."""
    if text is None or not text.strip():
        return Verdict(None, None, EMPTY)
    body = text.replace("\r\n", "\n")
    if END in body:  # the stop sequence may or may not have been stripped by the generator
        body = body[: body.index(END)]
    parts = body.split(SEPARATOR)
    if len(parts) != 2:
        return Verdict(None, None, MALFORMED)
    edit, output = parts[0].strip(), parts[1].strip()
    if "\n" in edit or "\n" in output:
        return Verdict(None, None, MALFORMED)
    if not edit or not output:
        return Verdict(None, None, EMPTY)
    return Verdict(edit, output, None)


class EditValidator:
    """Parse + check one completion for one input caption."""

    def __init__(self, limits: Limits, blocklist: Blocklist, count_tokens: TokenCounter | None = None):
        self.limits = limits
        self.blocklist = blocklist
        self.count_tokens = count_tokens

    def check(self, caption: str, completion: str | None) -> Verdict:
        parsed = parse_completion(completion)
        if not parsed.ok:
            return parsed
        edit, output = parsed.edit, parsed.output
        reason = None
        lim = self.limits
        if bare(output) == bare(caption):
            reason = UNCHANGED
        elif lim.max_edit_words is not None and word_count(edit) > lim.max_edit_words:
            reason = OVERLONG_INSTRUCTION
        elif lim.max_output_words is not None and word_count(output) > lim.max_output_words:
            reason = OVERLONG_OUTPUT
        elif (lim.max_output_tokens is not None and self.count_tokens is not None
              and self.count_tokens([output])[0] > lim.max_output_tokens):
            reason = OVERLONG_OUTPUT
        elif self.blocklist.find(edit) or self.blocklist.find(output):
            reason = BLOCKLISTED
        return Verdict(edit, output, reason) if reason is None else Verdict(None, None, reason)
