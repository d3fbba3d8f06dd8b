"""The offline `template` backend: grounded, rule-based edits from a curated grammar.

Each caption gets one edit drawn (with a per-record seed) from the kinds that apply to it:

    colour / material   swap a colour or material word the caption has ("make the kite yellow")
    replace             swap a listed object for another of its category ("turn the dog into a wolf")
    remove              drop a "with ..." / "holding ..." phrase ("remove the balloon")
    add                 add an object that is not there yet ("add a rainbow")
    style               swap the medium the caption names, or render it as one ("make it a pencil sketch")
    season/time/weather swap the word the caption has, or add one when it has none ("make it snow")

Vocabularies and instruction phrasings live in src/ip2p/assets/edit_grammar.yaml (or the file named
by `instructions.grammar`), kind weights in conf/instructions/template.yaml.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from ip2p.data.backends.base import Request
from ip2p.data.validate import format_completion
from ip2p.config import first_line
from ip2p.errors import Ip2pError

KINDS = ("colour", "material", "replace", "remove", "add", "style", "season", "time", "weather")
WORD = re.compile(r"[A-Za-z0-9]+(?:['’-][A-Za-z0-9]+)*")
TOKEN = re.compile(r"[A-Za-z0-9]+(?:['’-][A-Za-z0-9]+)*|[^\sA-Za-z0-9]")


@dataclass(frozen=True)
class TemplateEdit:
    kind: str
    template: str  # the instruction template used (for phrasing statistics)
    edit: str
    output: str


# ------------------------------------------------------------------------------------ text helpers


def phrase_regex(phrases: Sequence[str]) -> re.Pattern | None:
    """Whole-word, case-insensitive match of any phrase; longer phrases first."""
    phrases = sorted({p.lower() for p in phrases if p}, key=len, reverse=True)
    if not phrases:
        return None
    alts = "|".join(r"\s+".join(map(re.escape, p.split())) for p in phrases)
    return re.compile(rf"(?<![\w'’-])(?:{alts})(?![\w'’-])", re.IGNORECASE)


def find_all(pattern: re.Pattern | None, text: str) -> list[tuple[int, int, str]]:
    return [] if pattern is None else [(m.start(), m.end(), m.group(0)) for m in pattern.finditer(text)]


def article(word: str) -> str:
    w = word.lower()
    vowel = w[:1] in "aeiou" and not w.startswith(("uni", "use", "usu", "eu", "one", "ur"))
    return "an" if vowel or w.startswith(("hour", "honest", "heir")) else "a"


def with_article(word: str, plural: bool = False) -> str:
    return word if plural else f"{article(word)} {word}"


def pluralise(word: str) -> str:
    head, _, last = word.rpartition(" ")
    if last.endswith(("s", "x", "z", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and last[-2:-1] not in tuple("aeiou"):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}".strip()


def _match_case(new: str, old: str) -> str:
    return new[:1].upper() + new[1:] if old[:1].isupper() else new


def substitute(text: str, start: int, end: int, new: str) -> str:
    """Replace text[start:end] by `new` (keeping a leading capital) and fix an "a"/"an" right before it."""
    new = _match_case(new, text[start:end])
    before = text[:start]
    m = re.search(r"(?<![\w'’-])(a|an)(\s+)$", before, re.IGNORECASE)
    if m and new:
        art = article(new)
        art = art[:1].upper() + art[1:] if m.group(1)[:1].isupper() else art
        before = before[: m.start(1)] + art + m.group(2)
    return before + new + text[end:]


def strip_end(text: str) -> str:
    return text.rstrip().rstrip(".!?").rstrip()


def lower_first(text: str) -> str:
    """Lower-case the first letter, but keep acronyms ("NYC skyline") as written."""
    first = text.split()[0] if text.split() else ""
    return text if len(first) > 1 and first.isupper() else text[:1].lower() + text[1:]


def overlaps(span: tuple[int, int], spans: Sequence[tuple[int, int, str]]) -> bool:
    return any(span[0] < e and s < span[1] for s, e, _ in spans)


# ----------------------------------------------------------------------------------------- grammar


class Grammar:
    """The edit grammar file, with its phrase matchers compiled once."""

    def __init__(self, spec: Mapping[str, Any]):
        try:
            self.spec = spec
            self.stops = {w.lower() for w in spec["phrase_stops"]}
            self.stop_verbs = {w.lower() for w in spec["stop_verbs"]}
            self.ing_nouns = {w.lower() for w in spec["ing_nouns"]}
            col, mat, sty = spec["colour"], spec["material"], spec["style"]
            self.colour_re = phrase_regex(col["words"])
            self.colour_exclude = phrase_regex(col.get("exclude", []))
            self.material_words = {k.lower(): v for k, v in mat["words"].items()}
            self.material_re = phrase_regex(list(self.material_words))
            self.material_exclude = phrase_regex(mat.get("exclude", []))
            self.media_re = phrase_regex(sty["media"])
            self.modifiers = {w.lower() for w in col["words"]} | set(self.material_words)
            # replace: surface form -> (category, singular, is_plural)
            self.objects: dict[str, tuple[str, str, bool]] = {}
            self.replacements: dict[str, list[tuple[str, str]]] = {}
            for name, cat in spec["replace"]["categories"].items():
                words = [self._forms(w) for w in cat["words"]]
                for singular, plural in words:
                    self.objects.setdefault(singular.lower(), (name, singular, False))
                    if plural != singular:
                        self.objects.setdefault(plural.lower(), (name, singular, True))
                self.replacements[name] = [self._forms(w) for w in cat.get("replacements", cat["words"])]
            self.objects_re = phrase_regex(list(self.objects))
            self.season_re = phrase_regex(spec["season"]["words"])
            self.season_exclude = phrase_regex(spec["season"].get("exclude", []))
            self.time_re = phrase_regex(spec["time"]["words"])
            self.time_exclude = phrase_regex(spec["time"].get("exclude", []))
            self.weather_forms = [(a, n) for a, n in spec["weather"]["forms"]]
            surfaces = [a for a, _ in self.weather_forms] + [n for _, n in self.weather_forms if n]
            self.weather_re = phrase_regex(surfaces)
            self.weather_exclude = phrase_regex(spec["weather"].get("exclude", []))
            self.remove_verbs = {w.lower() for w in spec["remove"]["verbs"]}
            self.remove_max_words = int(spec["remove"]["max_phrase_words"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise Ip2pError(f"the edit grammar is missing or has a bad entry: {err!r}") from err

    @staticmethod
    def _forms(entry: str) -> tuple[str, str]:
        singular, _, plural = entry.partition("/")
        return singular.strip(), (plural.strip() or pluralise(singular.strip()))

    def templates(self, *path: str) -> list[str]:
        node: Any = self.spec
        for key in path:
            node = node.get(key, []) if isinstance(node, Mapping) else []
        return list(node or [])


def builtin_grammar_path() -> Path:
    return Path(str(resources.files("ip2p").joinpath("assets/edit_grammar.yaml")))


class _WordsLoader(yaml.SafeLoader):
    """YAML 1.1 reads on/off/yes/no as booleans; in a word list they are words."""


_WordsLoader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_WordsLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|false)$"), list("tf"))


def load_grammar(path: str | None = None) -> Grammar:
    path = Path(str(path)).expanduser() if path else builtin_grammar_path()
    if not path.is_file():
        raise Ip2pError(f"edit grammar file not found: '{path}'")
    try:
        spec = yaml.load(path.read_text(encoding="utf-8"), Loader=_WordsLoader)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as err:
        raise Ip2pError(f"cannot read the edit grammar '{path}': {first_line(err)}") from err
    return Grammar(spec)


# ------------------------------------------------------------------------------- edit candidates
# Each kind returns a list of options; an option draws its details with the rng and returns an edit.

Option = Callable[[random.Random], TemplateEdit]


def _choose_template(rng: random.Random, kind: str, templates: list[str], values: dict) -> TemplateEdit:
    usable = [t for t in templates if all(values.get(k) for k in re.findall(r"{(\w+)}", t))]
    template = rng.choice(usable)
    return TemplateEdit(kind, template, template.format(**values), values["_output"])


def _noun_after(g: Grammar, text: str, end: int) -> str | None:
    """The head of the noun phrase that starts right after a modifier ("red double decker bus" -> bus)."""
    words = []
    for m in TOKEN.finditer(text, end):
        word = m.group(0)
        if not WORD.fullmatch(word) or text[end:m.start()].strip():
            break  # punctuation ends the phrase
        lower = word.lower()
        if lower in g.stops or lower in g.stop_verbs or (lower.endswith("ing") and lower not in g.ing_nouns):
            break
        words.append(word)
        end = m.end()
        if len(words) == 3:
            break
    return words[-1].lower() if words and words[-1].isalpha() else None


def _swap_options(g: Grammar, caption: str, kind: str, matches, replacements: list[str], extra=None) -> list[Option]:
    options = []
    for start, end, old in matches:
        def option(rng, start=start, end=end, old=old):
            same = {old.lower()} | ({"grey", "gray"} if old.lower() in ("grey", "gray") else set())
            new = rng.choice([r for r in replacements if r.lower() not in same])
            values = {"old": old.lower(), "new": new, "noun": _noun_after(g, caption, end),
                      "_output": substitute(caption, start, end, new)}
            if extra:
                values.update(extra(old.lower(), new))
            return _choose_template(rng, kind, g.templates(kind, "instructions", "with_noun")
                                    + g.templates(kind, "instructions", "any"), values)
        options.append(option)
    return options


def colour_options(g: Grammar, caption: str) -> list[Option]:
    excluded = find_all(g.colour_exclude, caption)
    matches = [m for m in find_all(g.colour_re, caption) if not overlaps(m[:2], excluded)]
    return _swap_options(g, caption, "colour", matches, g.spec["colour"]["replacements"])


def material_options(g: Grammar, caption: str) -> list[Option]:
    excluded = find_all(g.material_exclude, caption)
    matches = [m for m in find_all(g.material_re, caption) if not overlaps(m[:2], excluded)]
    substances = lambda old, new: {"old_substance": g.material_words[old],  # noqa: E731
                                   "new_substance": g.material_words.get(new, new)}
    return _swap_options(g, caption, "material", matches, g.spec["material"]["replacements"], substances)


def replace_options(g: Grammar, caption: str) -> list[Option]:
    present = {w.lower() for w in WORD.findall(caption)}
    options = []
    for start, end, old in find_all(g.objects_re, caption):
        category, singular, plural = g.objects[" ".join(old.lower().split())]

        def option(rng, start=start, end=end, old=old, category=category, singular=singular, plural=plural):
            choices = [(s, p) for s, p in g.replacements[category]
                       if s.lower() != singular.lower() and s.split()[-1].lower() not in present]
            new_singular, new_plural = rng.choice(choices)
            new = new_plural if plural else new_singular
            values = {"old": " ".join(old.lower().split()), "new": new, "a_new": with_article(new, plural),
                      "_output": substitute(caption, start, end, new)}
            return _choose_template(rng, "replace", g.templates("replace", "instructions"), values)

        options.append(option)
    return options


def add_options(g: Grammar, caption: str) -> list[Option]:
    present = {w.lower() for w in WORD.findall(caption)}
    objects = [o for o in g.spec["add"]["objects"] if o.split()[-1].lower() not in present]
    if not objects:
        return []

    def option(rng):
        obj = rng.choice(objects)
        joiner = " and " if re.search(r"\bwith\b", caption, re.IGNORECASE) else " with "
        values = {"obj": obj, "_output": strip_end(caption) + joiner + obj}
        return _choose_template(rng, "add", g.templates("add", "instructions"), values)

    return [option]


def style_options(g: Grammar, caption: str) -> list[Option]:
    styles = g.spec["style"]["styles"]
    media = find_all(g.media_re, caption)
    if media:
        start, end, old = media[0]

        def swap(rng):
            new = rng.choice([s for s in styles if s.lower() != old.lower()])
            values = {"old": old.lower(), "a_old": with_article(old.lower()), "new": new,
                      "a_new": with_article(new), "_output": substitute(caption, start, end, new)}
            return _choose_template(rng, "style", g.templates("style", "instructions", "swap"), values)

        return [swap]

    def add(rng):
        new = rng.choice(styles)
        values = {"new": new, "a_new": with_article(new), "_output": f"{with_article(new)} of {lower_first(caption)}"}
        return _choose_template(rng, "style", g.templates("style", "instructions", "add"), values)

    return [add]


def _scene_options(g: Grammar, caption: str, kind: str, pattern, exclude, words: list[str],
                   suffix: Callable[[str], str], specific: Callable[[str], list[str]] = lambda new: [],
                   swap_choices: Callable[[str], list[str]] | None = None,
                   swap_word: Callable[[str, str], str] = lambda old, new: new,
                   label: Callable[[str], str] = lambda word: word) -> list[Option]:
    """Season, time of day, weather: swap the word the caption has, or add one when it has none."""
    found = find_all(pattern, caption)
    excluded = find_all(exclude, caption)
    usable = [m for m in found if not overlaps(m[:2], excluded)]
    anyt = g.templates(kind, "instructions", "any")
    if usable:
        start, end, old = usable[0]

        def swap(rng):
            old_label = label(old.lower())
            choices = swap_choices(old.lower()) if swap_choices else words
            new = rng.choice([w for w in choices if w != old_label])
            values = {"old": old_label, "new": new, "a_new": with_article(new),
                      "_output": substitute(caption, start, end, swap_word(old.lower(), new))}
            return _choose_template(rng, kind, anyt + g.templates(kind, "instructions", "swap") + specific(new), values)

        return [swap]
    if found:  # only excluded mentions ("summer fair"): adding another season would contradict it
        return []

    def add(rng):
        new = rng.choice(words)
        values = {"new": new, "a_new": with_article(new), "_output": strip_end(caption) + " " + suffix(new).strip()}
        return _choose_template(rng, kind, anyt + specific(new), values)

    return [add]


def season_options(g: Grammar, caption: str) -> list[Option]:
    s = g.spec["season"]
    return _scene_options(g, caption, "season", g.season_re, g.season_exclude, list(s["words"]),
                          lambda new: s["suffix"].format(new=new))


def time_options(g: Grammar, caption: str) -> list[Option]:
    t = g.spec["time"]
    words = list(t["words"])
    # "at night" -> "in the morning": swap the whole phrase when the caption uses one of ours.
    phrase_of = {str(t["suffixes"][w]).lower(): w for w in words}
    excluded = find_all(g.time_exclude, caption)
    phrases = [m for m in find_all(phrase_regex(list(phrase_of)), caption) if not overlaps(m[:2], excluded)]
    if phrases:
        start, end, old = phrases[0]
        old_word = phrase_of[" ".join(old.lower().split())]

        def swap(rng):
            new = rng.choice([w for w in words if w != old_word])
            values = {"old": old_word, "new": new, "a_new": with_article(new),
                      "_output": substitute(caption, start, end, t["suffixes"][new])}
            return _choose_template(rng, "time", g.templates("time", "instructions", "any")
                                    + g.templates("time", "instructions", "swap"), values)

        return [swap]
    return _scene_options(g, caption, "time", g.time_re, g.time_exclude, words, lambda new: t["suffixes"][new])


def weather_options(g: Grammar, caption: str) -> list[Option]:
    w = g.spec["weather"]
    adjectives = [a for a, _ in g.weather_forms]
    noun_of = {a: n for a, n in g.weather_forms}
    adjective_of = {n: a for a, n in g.weather_forms if n}

    def label(word):  # the adjective names a weather in instructions
        return adjective_of.get(word, word)

    def swap_choices(old):  # a noun ("rain") can only become a weather that has a noun
        return [a for a in adjectives if noun_of[a]] if old in adjective_of else adjectives

    def swap_word(old, new):
        return noun_of[new] if old in adjective_of else new

    specific = lambda new: list(w["instructions"].get("specific", {}).get(new, []))  # noqa: E731
    return _scene_options(g, caption, "weather", g.weather_re, g.weather_exclude, adjectives,
                          lambda new: w["suffixes"][new], specific, swap_choices, swap_word, label)


def _verb_form(g: Grammar, word: str) -> bool:
    return (word in g.stop_verbs or (word.endswith("ing") and word not in g.ing_nouns)
            or (word.endswith("ed") and len(word) > 4))


def _scan_phrase(g: Grammar, tokens: list[re.Match], i: int) -> tuple[int, str]:
    """End (exclusive) of the noun phrase starting at token i, and what follows it:
    "end", "comma", "and", "prep" (a preposition), "verb" (a verb form: the phrase is not removable)."""
    j, words = i, 0
    while j < len(tokens):
        word = tokens[j].group(0)
        lower = word.lower()
        if word == ",":
            return j, "comma"
        if not WORD.fullmatch(word):
            return j, "prep"  # other punctuation ends the phrase like a preposition
        if lower == "and":
            return j, "and"
        if lower in g.stop_verbs:
            return j, "verb"
        if lower in g.stops and lower not in ("a", "an", "the", "of"):
            return j, "prep"
        if (_verb_form(g, lower) and j > i) or lower in g.remove_verbs:
            return j, "verb"
        words += 1
        if words > g.remove_max_words:
            return j, "verb"  # too long to be sure what it is
        j += 1
    return j, "end"


def _head(g: Grammar, tokens: list[re.Match], i: int, j: int) -> str | None:
    words = [t.group(0).lower() for t in tokens[i:j]]
    if "of" in words:
        words = words[: words.index("of")]
    words = [w for w in words if w not in ("a", "an", "the")]
    head = words[-1] if words else None
    if head in g.modifiers:  # "with red and gold leaves": "red" is not a thing to remove
        return None
    return head if head and head.isalpha() and len(head) >= 3 else None


def remove_options(g: Grammar, caption: str) -> list[Option]:
    tokens = list(TOKEN.finditer(caption))
    cuts: list[tuple[str, str]] = []  # (head noun, output)

    def cut(a: int, b: int) -> str:
        return " ".join((caption[:a].rstrip() + " " + caption[b:].lstrip()).split()).replace(" ,", ",")

    for k, tok in enumerate(tokens):
        lower = tok.group(0).lower()
        if k == 0 or k + 1 >= len(tokens):
            continue
        previous = tokens[k - 1].group(0).lower()
        if lower == "with" and not _verb_form(g, previous):  # "topped with an egg": not a removable phrase
            i = k + 1
            j, after = _scan_phrase(g, tokens, i)
            head = _head(g, tokens, i, j)
            if head is None or j == i:
                continue
            if after in ("end", "prep"):
                cuts.append((head, cut(tok.start(), tokens[j - 1].end())))
            elif after in ("and", "comma") and j + 1 < len(tokens):
                cuts.append((head, cut(tokens[i].start(), tokens[j + 1].start())))  # "with A and B" -> "with B"
                if after == "and":
                    j2, after2 = _scan_phrase(g, tokens, j + 1)
                    head2 = _head(g, tokens, j + 1, j2)
                    if head2 and j2 > j + 1 and after2 in ("end", "prep"):
                        cuts.append((head2, cut(tokens[j - 1].end(), tokens[j2 - 1].end())))
        elif lower in g.remove_verbs:
            i = k + 1
            j, after = _scan_phrase(g, tokens, i)
            head = _head(g, tokens, i, j)
            if head and j > i and after in ("end", "prep", "comma"):
                cuts.append((head, cut(tok.start(), tokens[j - 1].end())))
    options = []
    for head, output in cuts:
        def option(rng, head=head, output=output):
            values = {"old": head, "_output": output}
            return _choose_template(rng, "remove", g.templates("remove", "instructions"), values)
        options.append(option)
    return options


KIND_OPTIONS: dict[str, Callable[[Grammar, str], list[Option]]] = {
    "colour": colour_options, "material": material_options, "replace": replace_options, "remove": remove_options,
    "add": add_options, "style": style_options, "season": season_options, "time": time_options,
    "weather": weather_options,
}


def applicable_kinds(caption: str, grammar: Grammar) -> list[str]:
    return [kind for kind in KINDS if KIND_OPTIONS[kind](grammar, caption)]


def template_edit(caption: str, rng: random.Random, grammar: Grammar, weights: Mapping[str, float],
                  kind: str | None = None) -> TemplateEdit | None:
    """One edit for `caption`: a kind by weight among those that apply (or the given kind), then one of
    its options and one of its phrasings. None when nothing applies."""
    by_kind = {k: KIND_OPTIONS[k](grammar, caption) for k in ([kind] if kind else KINDS)
               if (kind or float(weights.get(k, 0)) > 0)}
    by_kind = {k: v for k, v in by_kind.items() if v}
    if not by_kind:
        return None
    kinds = list(by_kind)
    chosen = kind or rng.choices(kinds, weights=[float(weights[k]) for k in kinds])[0]
    return rng.choice(by_kind[chosen])(rng)


class TemplateBackend:
    """Backend protocol: `name`, `batch_size`, `complete(requests) -> completions`, `close()`."""

    def __init__(self, grammar: Grammar, weights: Mapping[str, float], batch_size: int = 64):
        unknown = set(weights) - set(KINDS)
        if unknown:
            raise Ip2pError(f"unknown edit kinds in instructions.kinds: {sorted(unknown)} (known: {list(KINDS)})")
        self.grammar, self.weights, self.batch_size = grammar, dict(weights), batch_size
        self.name = "template"

    @classmethod
    def from_config(cls, cfg) -> "TemplateBackend":
        icfg = cfg.instructions
        return cls(load_grammar(icfg.grammar), {k: float(v) for k, v in icfg.kinds.items()}, int(icfg.batch_size))

    def complete(self, requests: Sequence[Request]) -> list[str | None]:
        out = []
        for req in requests:
            edit = template_edit(req.caption, random.Random(req.seed), self.grammar, self.weights)
            out.append(None if edit is None else format_completion(edit.edit, edit.output))
        return out

    def close(self) -> None:
        pass
