"""`ip2p instructions`: the one parser/validator, grounded template edits, stage accounting, kill and
resume, sharding + merge, and the OpenAI-compatible client against a local HTTP server."""

from __future__ import annotations

import difflib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from ip2p.config import compose
from ip2p.data import instructions
from ip2p.data.backends.template import KINDS, applicable_kinds, load_grammar, template_edit
from ip2p.data.validate import Blocklist, EditValidator, Limits, bare, parse_completion
from ip2p.io import merge

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "data" / "captions.jsonl"


# ------------------------------------------------------------------------------- parser/validator

BAD_COMPLETIONS = [
    (None, "empty"),
    ("", "empty"),
    ("   \n ", "empty"),
    ("make it red", "malformed"),                                      # no separator
    ("make it red %% a red car", "malformed"),                         # separator without its newlines
    ("make it red\n%%\na red car\n%%\na blue car", "malformed"),       # two separators
    ("make it red\nplease\n%%\na red car", "malformed"),               # multi-line instruction
    ("make it red\n%%\na red car\nand more text\nEND", "malformed"),   # multi-line caption
    ("\n%%\na red car\nEND", "empty"),                                 # no instruction
    ("make it red\n%%\n   \nEND", "empty"),                            # no caption
]


@pytest.mark.parametrize("text,reason", BAD_COMPLETIONS)
def test_parser_rejects_malformed_completions(text, reason):
    verdict = parse_completion(text)
    assert verdict.reason == reason and verdict.edit is None and verdict.output is None


def test_parser_accepts_with_or_without_the_stop_sequence():
    for text in ("make it red\n%%\na red car\nEND", " make it red\n%%\na red car", "make it red\r\n%%\r\na red car\nEND\nx"):
        verdict = parse_completion(text)
        assert (verdict.edit, verdict.output, verdict.reason) == ("make it red", "a red car", None)


def test_validator_reasons():
    count_words_as_tokens = lambda texts: [len(t.split()) + 2 for t in texts]  # noqa: E731
    v = EditValidator(Limits(max_edit_words=4, max_output_words=8, max_output_tokens=7),
                      Blocklist(["gore", "blood bath"]), count_words_as_tokens)
    caption = "A blue car on a road."
    table = [
        ("make it red\n%%\na blue car on a road!", "unchanged"),       # same after lower-casing, .!? stripped
        ("make it red\n%%\nA BLUE CAR ON A ROAD", "unchanged"),
        ("please make the car a bright red one\n%%\na red car on a road", "overlong_instruction"),
        ("make it red\n%%\na red car on a long and winding road", "overlong_output"),     # 9 words
        ("make it red\n%%\na red car on a long road", "overlong_output"),                 # 7 words = 9 tokens
    ]
    for text, reason in table:
        assert v.check(caption, text).reason == reason, text
    assert bare(" Hello world!? ") == "hello world"
    assert Blocklist(["sex"]).find("a castle in Essex") is None


# ---------------------------------------------------------------------------------- template edits

WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")
FUNCTION = {"a", "an", "the", "of", "with", "and", "in", "on", "at", "to", "it", "is", "was", "were", "be", "by",
            "during", "under", "day", "one", "instead", "made"}


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def template_wording(grammar) -> set[str]:
    """Every word the instruction templates themselves use (placeholders removed)."""
    found: set[str] = set()

    def walk(node):
        if isinstance(node, str):
            found.update(words(re.sub(r"{\w+}", " ", node)))
        elif isinstance(node, dict):
            for key, value in node.items():
                if key in ("instructions", "specific") or isinstance(value, (dict, list)) and key in ("any", "swap", "add", "with_noun"):
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for kind in KINDS:
        walk(grammar.spec[kind].get("instructions", {}))
    return found | {"a", "an"}  # articles of {a_new}


def related(a: str, b: str) -> bool:
    """Same word, or the same stem ("snowy"/"snow", "wooden"/"wood", "tulips"/"tulip")."""
    short, long_ = sorted((a, b), key=len)
    return a == b or (len(short) >= 3 and long_.startswith(short)) or (len(short) >= 4 and a[:4] == b[:4])


def check_grounded(caption: str, edit: str, output: str, wording: set[str]) -> None:
    inp, out, ins = words(caption), words(output), words(edit)
    # 1. Nothing in the instruction comes from nowhere: each word is template wording, or names
    #    something in the input (what is changed) or in the output (what it becomes).
    for w in ins:
        assert w in wording or any(related(w, x) for x in inp + out), (w, caption, edit, output)
    # 2. The caption changed, and the instruction names (a word of) what changed.
    changed = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=inp, b=out, autojunk=False).get_opcodes():
        if op != "equal":
            changed += inp[i1:i2] + out[j1:j2]
    changed = [w for w in changed if w not in FUNCTION]
    assert changed, (caption, output)
    assert any(related(w, c) for w in ins for c in changed), (caption, edit, output, changed)
    assert bare(output) != bare(caption)


HAND_TABLE = [
    # caption, kinds that must apply, kinds that must not, words a swap/removal may touch
    ("a dog chasing a ball in the park", {"replace", "add", "style"}, {"colour", "material", "remove"}, {"dog"}),
    ("a red kite flying over a green field", {"colour"}, {"material"}, {"red", "green", "kite"}),
    ("a cat sleeping on a wooden chair", {"material", "replace"}, {"colour"}, {"wooden", "cat", "chair"}),
    ("a man holding an umbrella in the rain", {"remove", "weather", "replace"}, {"colour"}, {"umbrella", "man", "rain"}),
    ("a quiet street at night", {"time"}, {"colour", "replace", "remove"}, {"night"}),
    ("a bowl of soup with bread and cheese", {"remove"}, {"colour", "material"}, {"bread", "cheese", "soup"}),
    ("oil painting of a lighthouse in winter", {"style", "season", "replace"}, {"colour"},
     {"oil", "painting", "winter", "lighthouse"}),
    ("a snowy owl on a branch", {"add", "replace"}, {"colour", "weather"}, {"owl"}),  # "snowy owl" is a bird
]


@pytest.fixture(scope="module")
def grammar():
    return load_grammar()


@pytest.mark.parametrize("caption,must,must_not,touchable", HAND_TABLE)
def test_template_edits_only_what_the_caption_mentions(grammar, caption, must, must_not, touchable):
    import random

    kinds = set(applicable_kinds(caption, grammar))
    assert must <= kinds and not (must_not & kinds), kinds
    wording = template_wording(grammar)
    for kind in kinds:
        for seed in range(6):
            edit = template_edit(caption, random.Random(seed), grammar, {}, kind=kind)
            check_grounded(caption, edit.edit, edit.output, wording)
            removed = [w for w in words(caption) if w not in words(edit.output)]
            if kind in ("colour", "material", "replace", "remove"):  # they take out words the caption has
                assert removed and set(removed) & touchable, (kind, edit)


def test_template_edits_of_shipped_captions_are_grounded_and_varied(grammar):
    import random

    from ip2p.io import stable_seed

    cfg = compose([])
    weights = dict(cfg.instructions.kinds)
    wording = template_wording(grammar)
    captions = [json.loads(line) for line in SHIPPED.read_text().splitlines()]
    used_templates, used_kinds = Counter(), Counter()
    for record in captions:
        for kind in applicable_kinds(record["caption"], grammar):
            edit = template_edit(record["caption"], random.Random(stable_seed(0, record["id"], kind)), grammar, {}, kind)
            check_grounded(record["caption"], edit.edit, edit.output, wording)
        edit = template_edit(record["caption"], random.Random(stable_seed(0, record["id"])), grammar, weights)
        used_templates[edit.template] += 1
        used_kinds[edit.kind] += 1
    assert set(used_kinds) == set(KINDS)
    assert len(used_templates) >= 40                     # many phrasings, none dominating
    assert max(used_templates.values()) < 0.1 * len(captions)


# ------------------------------------------------------------------------------------------- stage


def stage_cfg(tmp_path: Path, cache_dir: Path, captions_file: Path, *overrides: str):
    return compose([f"paths.cache={cache_dir}", f"paths.artifacts={tmp_path / 'artifacts'}",
                    f"paths.reports={tmp_path / 'reports'}", "progress=false",
                    f"instructions.input={captions_file}", *overrides])


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_captions(path: Path, n: int) -> Path:
    lines = SHIPPED.read_text().splitlines()[:n]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_stage_counts_every_input_and_rejection(tmp_path, cache_dir):
    source = tmp_path / "captions.jsonl"
    good = SHIPPED.read_text().splitlines()[:30]
    extra = ['{"id": "cap-0001", "caption": "a duplicate id"}', '{"caption": "no id"}', "{not json",
             '{"id": "x1", "caption": "   "}']
    source.write_text("\n".join(good + extra) + "\n")
    # A tight instruction limit makes the validator reject some template edits, even after retries.
    cfg = stage_cfg(tmp_path, cache_dir, source, "instructions.validate.max_edit_words=4", "instructions.retries=2")
    out = instructions.run(cfg)
    accepted = read_lines(out)
    rejected = read_lines(tmp_path / "artifacts" / "instructions.rejected.jsonl")
    summary = json.loads((tmp_path / "reports" / "instructions.json").read_text())
    assert accepted and rejected
    assert {r["id"] for r in accepted}.isdisjoint(r["id"] for r in rejected)
    assert sorted(r["caption_id"] for r in accepted + rejected) == sorted(json.loads(g)["id"] for g in good)
    for r in accepted:
        assert set(r) == {"id", "caption_id", "input", "edit", "output", "backend"}
        assert r["id"] == f"{r['caption_id']}-e0" and r["backend"] == "template"
        assert len(r["edit"].split()) <= 4 and bare(r["output"]) != bare(r["input"])
    for r in rejected:
        assert r["attempts"] == ["overlong_instruction"] * 3 and r["reason"] == "overlong_instruction"
    assert summary["rejected"] == {"overlong_instruction": len(rejected), "input_duplicate_id": 1,
                                   "input_missing_field": 2, "input_malformed_json": 1}
    assert summary["records_out"] == len(accepted)
    assert summary["records_in"] == summary["records_out"] + summary["rejected_total"] == 34


def cli(*args: str, cwd: Path, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "ip2p.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def test_kill_and_resume_gives_byte_identical_files(tmp_path, cache_dir):
    source = write_captions(tmp_path / "captions.jsonl", 60)
    common = ["instructions.validate.max_edit_words=5", "instructions.batch_size=1"]
    reference = instructions.run(stage_cfg(tmp_path / "ref", cache_dir, source, *common))

    work = tmp_path / "killed"
    partial = work / "artifacts" / "instructions.jsonl.partial"
    rejected_partial = work / "artifacts" / "instructions.rejected.jsonl.partial"
    proc = cli("instructions", f"paths.cache={cache_dir}", f"paths.artifacts={work / 'artifacts'}",
               f"paths.reports={work / 'reports'}", "progress=false", f"instructions.input={source}",
               "instructions.delay_s=0.1", *common, cwd=tmp_path)
    deadline = time.time() + 120
    lines = 0
    while time.time() < deadline and proc.poll() is None:
        lines = sum(p.read_bytes().count(b"\n") for p in (partial, rejected_partial) if p.exists())
        if lines >= 10:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[0].decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sum(p.read_bytes().count(b"\n") for p in (partial, rejected_partial))
    assert 10 <= done_before < 60 and not (work / "artifacts" / "instructions.jsonl").exists()

    resumed = instructions.run(stage_cfg(work, cache_dir, source, *common))
    assert resumed.read_bytes() == reference.read_bytes()
    ref_rejected = reference.with_name("instructions.rejected.jsonl")
    assert resumed.with_name("instructions.rejected.jsonl").read_bytes() == ref_rejected.read_bytes()
    summary = json.loads((work / "reports" / "instructions.json").read_text())
    ref_summary = json.loads((tmp_path / "ref" / "reports" / "instructions.json").read_text())
    assert {k: v for k, v in summary.items() if k != "seconds"} == {k: v for k, v in ref_summary.items() if k != "seconds"}


def test_rerunning_a_finished_shard_does_nothing(tmp_path, cache_dir, capsys):
    source = write_captions(tmp_path / "captions.jsonl", 5)
    cfg = stage_cfg(tmp_path, cache_dir, source)
    out = instructions.run(cfg)
    stamp = out.stat().st_mtime_ns
    capsys.readouterr()
    instructions.run(cfg)
    assert "nothing to do" in capsys.readouterr().out and out.stat().st_mtime_ns == stamp


def test_multirun_shards_then_merge_equal_an_unsharded_run(tmp_path, cache_dir):
    source = write_captions(tmp_path / "captions.jsonl", 40)
    common = [f"paths.cache={cache_dir}", "progress=false", f"instructions.input={source}",
              "instructions.validate.max_edit_words=5"]
    whole = instructions.run(compose(common + [f"paths.artifacts={tmp_path / 'whole'}",
                                               f"paths.reports={tmp_path / 'whole-reports'}"]))
    sharded = [f"paths.artifacts={tmp_path / 'sharded'}", f"paths.reports={tmp_path / 'reports'}"]
    proc = cli("instructions", "-m", "shard.count=2", "shard.index=0,1", *common, *sharded, cwd=tmp_path)
    output = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, output[-3000:]
    assert (tmp_path / "sharded" / "instructions.shard-00001-of-00002.jsonl").exists()
    merged = merge.run(compose(common + sharded + ["merge.stage=instructions"]))
    assert merged == tmp_path / "sharded" / "instructions.jsonl"
    shards = [read_lines(tmp_path / "sharded" / f"instructions.shard-0000{i}-of-00002.jsonl") for i in range(2)]
    assert read_lines(merged) == shards[0] + shards[1]                      # shard order
    assert sorted(merged.read_text().splitlines()) == sorted(whole.read_text().splitlines())
    for name in ("instructions.rejected.jsonl",):
        assert sorted((tmp_path / "sharded" / name).read_text().splitlines()) == \
            sorted((tmp_path / "whole" / name).read_text().splitlines())
    total = json.loads((tmp_path / "reports" / "instructions.json").read_text())
    single = json.loads((tmp_path / "whole-reports" / "instructions.json").read_text())
    for key in ("records_in", "records_out", "rejected_total", "rejected"):
        assert total[key] == single[key]


def test_merge_refuses_missing_shards(tmp_path, cache_dir):
    from ip2p.errors import Ip2pError

    art = tmp_path / "artifacts"
    art.mkdir()
    (art / "instructions.shard-00000-of-00003.jsonl").write_text('{"id": "a"}\n')
    (art / "instructions.shard-00002-of-00003.jsonl").write_text('{"id": "c"}\n')
    (art / "instructions.shard-00001-of-00003.jsonl.partial").write_text('{"id": "b"}\n')
    cfg = compose([f"paths.artifacts={art}", f"paths.reports={tmp_path / 'reports'}", "merge.stage=instructions"])
    with pytest.raises(Ip2pError, match=r"shards \[1\] of 3 are missing \(unfinished: \[1\]"):
        merge.run(cfg)
    assert not (art / "instructions.jsonl").exists()


# ---------------------------------------------------------------------- OpenAI-compatible client

SECRET = "sk-test-DO-NOT-LEAK-123456"


class FakeEndpoint:
    """A local OpenAI-compatible server: canned answers chosen by the caption, with failure modes."""

    def __init__(self, delay_s: float = 0.1):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.delay_s = delay_s
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        self.in_flight = self.max_in_flight = 0
        self.failed_once: set[str] = set()
        self.lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with endpoint.lock:
                    endpoint.requests.append(body)
                    endpoint.auth.append(self.headers.get("Authorization"))
                    endpoint.in_flight += 1
                    endpoint.max_in_flight = max(endpoint.max_in_flight, endpoint.in_flight)
                try:
                    time.sleep(endpoint.delay_s)
                    status, payload = endpoint.answer(self.path, body)
                finally:
                    with endpoint.lock:
                        endpoint.in_flight -= 1
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def answer(self, path: str, body: dict):
        chat = path.endswith("/chat/completions")
        caption = body["messages"][-1]["content"] if chat else body["prompt"].rsplit("\n\n", 1)[-1][: -len("\n##\n")]
        with self.lock:
            first_time = caption not in self.failed_once
            self.failed_once.add(caption)
        if "rate limited" in caption and first_time:
            return 429, {"error": {"message": "slow down"}}
        if "server error" in caption and first_time:
            return 503, {"error": {"message": "overloaded"}}
        if "unauthorized" in caption:
            return 401, {"error": {"message": f"Incorrect API key provided: {SECRET}"}}
        if "always failing" in caption:
            return 500, {"error": {"message": "down"}}
        if "bad json" in caption:
            return 200, b"<html>oops</html>"
        if "malformed" in caption:
            text = "make it snowy but forget the separator"
        elif "unchanged" in caption:
            text = f"make it the same\n%%\n{caption}."
        else:
            text = f"make it snowy\n%%\n{caption} in the snow"
        choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        return 200, {"choices": [choice]}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    server = FakeEndpoint()
    yield server
    server.close()


OPENAI_CAPTIONS = ["a cat on a wall", "a rate limited dog in a park", "a server error horse on a hill",
                   "a malformed boat on a lake", "an unchanged tree in a field", "a bad json car on a road",
                   "a house by the sea", "a bird on a branch"]


def openai_cfg(tmp_path, cache_dir, endpoint, captions_file, *overrides):
    """Outputs under tmp_path; the response cache beside the captions file (shared by reruns)."""
    return stage_cfg(tmp_path, cache_dir, captions_file, "instructions=openai", f"instructions.input={captions_file}",
                     f"instructions.base_url={endpoint.base_url}", "instructions.api_key_env=IP2P_TEST_API_KEY",
                     "instructions.concurrency=2", "instructions.batch_size=8", "instructions.retries=1",
                     "instructions.backoff_s=0.001", f"instructions.cache_dir={captions_file.parent / 'http-cache'}",
                     *overrides)


def test_openai_client_retries_caches_bounds_concurrency_and_hides_the_key(tmp_path, cache_dir, endpoint,
                                                                          monkeypatch, caplog, capsys):
    import logging

    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("IP2P_TEST_API_KEY", SECRET)
    source = tmp_path / "captions.jsonl"
    source.write_text("".join(json.dumps({"id": f"o{i}", "caption": c}) + "\n" for i, c in enumerate(OPENAI_CAPTIONS)))
    out = instructions.run(openai_cfg(tmp_path / "run1", cache_dir, endpoint, source))

    accepted = {r["input"]: r for r in read_lines(out)}
    rejected = {r["input"]: r for r in read_lines(out.with_name("instructions.rejected.jsonl"))}
    good = [c for c in OPENAI_CAPTIONS if not any(k in c for k in ("malformed", "unchanged", "bad json"))]
    assert sorted(accepted) == sorted(good)                  # includes the 429'd and the 503'd caption
    assert accepted["a cat on a wall"]["output"] == "a cat on a wall in the snow"
    assert accepted["a cat on a wall"]["backend"] == "openai:Qwen/Qwen2.5-7B-Instruct"
    assert {c: r["attempts"] for c, r in rejected.items()} == {
        "a malformed boat on a lake": ["malformed", "malformed"],
        "an unchanged tree in a field": ["unchanged", "unchanged"],
        "a bad json car on a road": ["empty", "empty"]}
    # one request per attempt, plus one for each 429 and 503 that was retried
    assert len(endpoint.requests) == len(good) + 2 + 3 * 2
    assert 2 == endpoint.max_in_flight                       # concurrent, and never more than the bound
    assert endpoint.auth == [f"Bearer {SECRET}"] * len(endpoint.requests)
    body = endpoint.requests[0]
    assert {k: body[k] for k in ("temperature", "top_p", "max_tokens", "frequency_penalty", "stop")} == {
        "temperature": 0.7, "top_p": 1.0, "max_tokens": 256, "frequency_penalty": 0.1, "stop": ["\nEND"]}
    assert len(body["messages"]) == 1 + 2 * 8 + 1 and body["messages"][2]["content"].endswith("\nEND")
    seeds = {(r["messages"][-1]["content"], r["seed"]) for r in endpoint.requests}
    assert len({s for c, s in seeds if "malformed" in c}) == 2  # a retry is a new seed, not a cached repeat

    # A second run (fresh outputs, same cache) asks the server nothing and writes the same bytes.
    before = len(endpoint.requests)
    out2 = instructions.run(openai_cfg(tmp_path / "run2", cache_dir, endpoint, source))
    assert len(endpoint.requests) == before
    assert out2.read_bytes() == out.read_bytes()

    # The key is nowhere but in the Authorization header.
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any("http-cache" in str(p) for p in written)
    for path in written:
        assert SECRET not in path.read_text(encoding="utf-8", errors="replace"), path
    captured = capsys.readouterr()
    assert SECRET not in caplog.text + captured.out + captured.err


def test_openai_http_errors_are_one_line_and_redacted(tmp_path, endpoint):
    from ip2p.data.backends.base import Request
    from ip2p.data.backends.openai_compat import HttpPolicy, OpenAIBackend, ResponseCache
    from ip2p.errors import Ip2pError

    def backend(policy):
        return OpenAIBackend(endpoint.base_url, "m", "completions", {"temperature": 0.7}, [], "", SECRET, policy,
                             ResponseCache(None), batch_size=4)

    with pytest.raises(Ip2pError) as err:
        backend(HttpPolicy(concurrency=1, retries=3, backoff_s=0.001)).complete([Request("u", "an unauthorized cat", 1)])
    assert "HTTP 401" in str(err.value) and SECRET not in str(err.value) and "\n" not in str(err.value)
    assert len(endpoint.requests) == 1                        # a 401 is not retried

    flaky = backend(HttpPolicy(concurrency=1, retries=2, backoff_s=0.001))
    with pytest.raises(Ip2pError, match=r"failed after 3 tries \(HTTP 500\)"):
        flaky.complete([Request("f", "an always failing cat", 1)])
    assert len(endpoint.requests) == 1 + 3


def test_openai_completions_endpoint_uses_the_fine_tuning_format(tmp_path, cache_dir, endpoint, monkeypatch):
    monkeypatch.delenv("IP2P_TEST_API_KEY", raising=False)
    source = tmp_path / "captions.jsonl"
    source.write_text(json.dumps({"id": "c1", "caption": "a house by the sea"}) + "\n")
    out = instructions.run(openai_cfg(tmp_path, cache_dir, endpoint, source, "instructions.endpoint=completions",
                                      "instructions.few_shot=2"))
    assert read_lines(out)[0]["output"] == "a house by the sea in the snow"
    prompt = endpoint.requests[0]["prompt"]
    assert prompt.endswith("\n\na house by the sea\n##\n") and prompt.count("\nEND\n\n") == 2
    assert endpoint.auth == [None]                            # no key in the environment: no header


def test_openai_without_sent_seed_still_asks_again_for_a_retry_or_another_edit(tmp_path, endpoint):
    """With send_seed=false the request body is the same for every attempt and every edit of one caption;
    the response cache must not hand the first answer back to them (a retry would repeat its rejection,
    and edits_per_caption > 1 would give identical pairs)."""
    from ip2p.data.backends.base import Request
    from ip2p.data.backends.openai_compat import HttpPolicy, OpenAIBackend, ResponseCache

    backend = OpenAIBackend(endpoint.base_url, "m", "chat", {"temperature": 0.7}, [], "", None,
                            HttpPolicy(concurrency=1), ResponseCache(tmp_path / "cache"), send_seed=False)
    backend.complete([Request("c1-e0", "a cat on a wall", 11), Request("c1-e1", "a cat on a wall", 22)])
    backend.complete([Request("c1-e0", "a cat on a wall", 33, attempt=1)])  # a retry: a new seed
    assert len(endpoint.requests) == 3 and all("seed" not in r for r in endpoint.requests)
    backend.complete([Request("c1-e0", "a cat on a wall", 11)])  # the same record and attempt: cached
    assert len(endpoint.requests) == 3


def test_openai_dropped_connection_is_retried_and_a_bad_url_is_one_line(tmp_path):
    """A connection that dies mid-response is retried like a timeout; a base_url without a scheme is a
    one-line Ip2pError, not a traceback from requests."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from ip2p.data.backends.base import Request
    from ip2p.data.backends.openai_compat import HttpPolicy, OpenAIBackend, ResponseCache
    from ip2p.errors import Ip2pError

    calls = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            calls.append(self.path)
            data = json.dumps({"choices": [{"text": "make it snowy\n%%\na snowy cat"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            # first answer: promise more bytes than are sent, then hang up (HTTP/1.0 closes the connection)
            self.send_header("Content-Length", str(len(data) + (50 if len(calls) == 1 else 0)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        backend = OpenAIBackend(url, "m", "completions", {}, [], "", SECRET, HttpPolicy(concurrency=1, backoff_s=0.001),
                                ResponseCache(None))
        assert backend.complete([Request("a", "a cat", 1)]) == ["make it snowy\n%%\na snowy cat"]
        assert len(calls) == 2
    finally:
        server.shutdown()
        server.server_close()

    no_scheme = OpenAIBackend("localhost:8000/v1", "m", "chat", {}, [], "", SECRET, HttpPolicy(concurrency=1),
                              ResponseCache(None))
    with pytest.raises(Ip2pError) as err:
        no_scheme.complete([Request("a", "a cat", 1)])
    assert "localhost:8000/v1" in str(err.value) and "\n" not in str(err.value) and SECRET not in str(err.value)


def test_no_captions_to_instruct_stops_the_chain(tmp_path, cache_dir):
    """An empty or unusable captions file used to exit 0 with an empty instructions file. (Captions whose
    every completion is rejected still give the two files and the report; synthesis then stops, with
    reports/instructions.json saying why.)"""
    from ip2p.errors import Ip2pError

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(Ip2pError, match=r"^instructions: no captions to instruct from '.*empty.jsonl' \(0 records in\)$"):
        instructions.run(stage_cfg(tmp_path, cache_dir, empty))
    junk = tmp_path / "junk.jsonl"
    junk.write_bytes(b"\xff\xfe\x00garbage\n{not json\n")
    with pytest.raises(Ip2pError, match=r"no captions to instruct from .* \(2 records in; rejected: input_"):
        instructions.run(stage_cfg(tmp_path, cache_dir, junk))
    assert not list((tmp_path / "artifacts").glob("instructions*.jsonl"))
    assert not (tmp_path / "reports" / "instructions.json").exists()


def test_merge_refuses_shards_that_hold_no_record(tmp_path):
    from ip2p.errors import Ip2pError

    art = tmp_path / "artifacts"
    art.mkdir()
    for i in range(2):
        (art / f"instructions.shard-{i:05d}-of-00002.jsonl").write_text("")
    cfg = compose([f"paths.artifacts={art}", f"paths.reports={tmp_path / 'reports'}", "merge.stage=instructions"])
    with pytest.raises(Ip2pError, match=r"merge: the 2 shards of instructions.jsonl hold no record"):
        merge.run(cfg)
    assert not (art / "instructions.jsonl").exists()
