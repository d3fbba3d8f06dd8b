"""`ip2p finetune-llm` on the tiny LM, the loss it reports, and the `hf` instruction backend."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ip2p.config import compose
from ip2p.data import finetune_llm, instructions
from ip2p.data.backends.base import Request
from ip2p.data.backends.hf import Decoding, FrequencyPenalty, HFBackend
from ip2p.data.finetune_llm import IGNORE, completion_loss, encode_example, split_examples
from ip2p.data.validate import load_human_examples
from ip2p.models.tiny_llm import load_llm

REPO = Path(__file__).resolve().parents[1]
HUMAN = REPO / "data" / "human_edits.jsonl"


def tiny_lm_folder(cache_dir):
    from ip2p.models.tiny_llm import tiny_llm_dir

    return tiny_llm_dir(cache_dir, compose([]).model.llm_build)


@pytest.fixture(scope="module")
def tiny_lm(cache_dir):
    cfg = compose([f"paths.cache={cache_dir}"])
    return load_llm("tiny", cfg.model, cache_dir)


def test_tiny_lm_is_a_saved_gpt2_with_a_trained_byte_level_tokenizer(tiny_lm, cache_dir):
    model, tokenizer = tiny_lm
    assert type(model).__name__ == "GPT2LMHeadModel" and tokenizer.is_fast
    assert (tiny_lm_folder(cache_dir) / "model.safetensors").is_file()
    text = "a red kite flying over a green field\n##\nmake the kite yellow\n%%\na yellow kite\nEND"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text                         # byte-level: lossless round trip
    assert len(ids) < len(text) / 2                              # merges were learned on our text
    assert tokenizer.convert_ids_to_tokens(tokenizer(" kite", add_special_tokens=False)["input_ids"]) == ["Ġkite"]


def test_encoding_puts_the_loss_on_the_completion_only(tiny_lm):
    _, tokenizer = tiny_lm
    example = {"input": "a dog in a park", "edit": "make it a cat", "output": "a cat in a park"}
    enc = encode_example(tokenizer, example, max_length=256)
    labelled = [t for t, l in zip(enc["input_ids"], enc["labels"]) if l != IGNORE]
    assert enc["labels"][: enc["labels"].index(labelled[0])] == [IGNORE] * enc["labels"].index(labelled[0])
    assert tokenizer.decode(labelled) == "make it a cat\n%%\na cat in a park\nEND" + tokenizer.eos_token
    assert tokenizer.decode(enc["input_ids"][: len(enc["input_ids"]) - len(labelled)]) == "a dog in a park\n##\n"


def test_completion_loss_matches_a_hand_computation(tiny_lm):
    model, tokenizer = tiny_lm
    examples = load_human_examples(HUMAN)[:3]
    total, count = 0.0, 0
    for e in examples:  # one example at a time, no padding, explicit log-softmax
        enc = encode_example(tokenizer, e, 256)
        logits = model(input_ids=torch.tensor([enc["input_ids"]])).logits[0]
        logp = torch.log_softmax(logits.double(), dim=-1)
        for t in range(1, len(enc["input_ids"])):
            if enc["labels"][t] != IGNORE:
                total -= logp[t - 1, enc["labels"][t]].item()
                count += 1
    assert completion_loss(model, tokenizer, examples, batch_size=2) == pytest.approx(total / count, rel=1e-5)


def test_finetuning_lowers_the_heldout_loss(tmp_path, cache_dir, tiny_lm, capsys):
    cfg = compose([f"paths.cache={cache_dir}", f"paths.artifacts={tmp_path / 'artifacts'}",
                   f"paths.reports={tmp_path / 'reports'}", f"paths.data={REPO / 'data'}", "progress=false",
                   "llm_finetune.accelerator=cpu"])
    _, heldout = split_examples(load_human_examples(HUMAN), float(cfg.llm_finetune.heldout_fraction), int(cfg.seed))
    assert len(heldout) == 20
    base_model, tokenizer = tiny_lm
    before = completion_loss(base_model, tokenizer, heldout)

    out = finetune_llm.run(cfg)
    assert out == tmp_path / "artifacts" / "llm"
    tuned, tuned_tokenizer = load_llm(str(out), cfg.model, cache_dir)   # plain from_pretrained folder
    after = completion_loss(tuned, tuned_tokenizer, heldout)
    assert after < before - 0.1
    report = json.loads((tmp_path / "reports" / "finetune_llm.json").read_text())
    assert report["heldout_loss_before"] == pytest.approx(before, abs=1e-4)
    assert report["heldout_loss_after"] == pytest.approx(after, abs=1e-4)
    assert report["train_examples"] + report["heldout_examples"] == report["records_out"] == 201
    assert report["optimizer_steps"] == -(-181 // int(cfg.llm_finetune.batch_size))  # one epoch

    capsys.readouterr()
    finetune_llm.run(cfg)
    assert "nothing to do" in capsys.readouterr().out

    # The tuned folder drives the hf instruction backend; every caption is accounted for.
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(line + "\n" for line in (REPO / "data" / "captions.jsonl").read_text().splitlines()[:6]))
    hf_cfg = compose([f"paths.cache={cache_dir}", f"paths.artifacts={tmp_path / 'artifacts'}",
                      f"paths.reports={tmp_path / 'reports'}", "progress=false", "instructions=hf",
                      f"instructions.input={captions}", f"instructions.model={out}", "instructions.batch_size=3",
                      "instructions.retries=1", "instructions.decoding.max_new_tokens=40", "device=cpu"])
    result = instructions.run(hf_cfg)
    accepted = [json.loads(line) for line in result.read_text().splitlines()]
    rejected = [json.loads(line) for line in result.with_name("instructions.rejected.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "reports" / "instructions.json").read_text())
    assert summary["records_in"] == 6 == len(accepted) + len(rejected)
    assert summary["records_out"] == len(accepted) and summary["rejected_total"] == len(rejected)
    assert all(r["backend"] == f"hf:{out}" for r in accepted + rejected)
    known = {"malformed", "empty", "unchanged", "overlong_instruction", "overlong_output", "blocklisted"}
    assert all(set(r["attempts"]) <= known and len(r["attempts"]) == 2 for r in rejected)


def test_finetune_progress_reaches_a_redirected_log(tmp_path, cache_dir, tiny_lm, capsys):
    """A log file is not a terminal: Lightning's default Rich bar prints only its last frame there, when
    the run ends, so a cluster job's log showed no progress for hours; the tqdm bar writes every step."""
    cfg = compose([f"paths.cache={cache_dir}", f"paths.artifacts={tmp_path}", f"paths.reports={tmp_path}",
                   f"paths.data={REPO / 'data'}", "progress=true", "llm_finetune.accelerator=cpu"])
    finetune_llm.run(cfg)
    captured = capsys.readouterr()
    steps = -(-181 // int(cfg.llm_finetune.batch_size))
    # frames while it runs (Rich, redirected, prints only the finished bar), each with its rate (the
    # unit's name varies: Gradio's tqdm tracking, once an app test ran, reports "steps")
    assert f"| 1/{steps} [" in captured.out and f"| {steps}/{steps} [" in captured.out
    assert re.search(r"\| 1/%d \[[0-9:]+<[0-9:?]+, +[0-9.]+\w+/s" % steps, captured.out), captured.out[-2000:]


def test_hf_backend_samples_reproducibly_per_batch(tiny_lm):
    model, tokenizer = tiny_lm
    from ip2p.config import compose

    settings = {**compose(["instructions=hf"]).instructions.decoding, "max_new_tokens": 12}
    backend = HFBackend(model, tokenizer, "hf:tiny", Decoding.from_config(settings), batch_size=3)
    requests = [Request(f"r{i}", caption, seed=100 + i) for i, caption in
                enumerate(["a cat on a mat", "a red kite flying over a green field", "a boat"])]
    first = backend.complete(requests)
    assert len(first) == 3 and all(isinstance(t, str) for t in first)
    assert backend.complete(requests) == first                           # same batch, same seeds: same text
    other = backend.complete([Request(r.id, r.caption, r.seed + 1) for r in requests])
    assert other != first


def test_frequency_penalty_is_openais_additive_rule():
    prompt_length = 2
    input_ids = torch.tensor([[5, 6, 1, 1, 3], [7, 7, 2, 0, 0]])            # [B=2, prompt 2 + 3 generated]
    scores = torch.zeros(2, 8)
    out = FrequencyPenalty(0.1, prompt_length)(input_ids, scores.clone())
    expected = torch.zeros(2, 8)
    for b in range(2):
        for token in input_ids[b, prompt_length:].tolist():   # counts over generated tokens only
            expected[b, token] -= 0.1
    assert torch.allclose(out, expected)
    assert out[0, 5] == 0 and out[1, 7] == 0                  # prompt tokens are not penalised


def test_epoch_order_is_the_shuffled_loaders_order_computed_per_epoch():
    """EpochOrder gives, for each epoch on its own, the order a DataLoader(shuffle=True, seeded generator)
    gives when run epoch after epoch (so resuming changes nothing, and old runs keep their order)."""
    from torch.utils.data import DataLoader

    from ip2p.data.finetune_llm import EpochOrder

    items = list(range(23))
    plain = DataLoader(items, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(7))
    expected = [[int(i) for b in plain for i in b] for _ in range(3)]
    sampler = EpochOrder(len(items), 7)
    ours = DataLoader(items, batch_size=5, sampler=sampler, generator=torch.Generator())
    for epoch in (2, 0, 1):  # any epoch, in any order
        sampler.set_epoch(epoch)
        assert [int(i) for b in ours for i in b] == expected[epoch]


def test_a_killed_finetune_resumes_at_the_last_epoch_to_the_same_weights(tmp_path, cache_dir, tiny_lm, monkeypatch):
    def config(name: str, epochs: int):
        return compose([f"paths.cache={cache_dir}", f"paths.artifacts={tmp_path / name}",
                        f"paths.reports={tmp_path / name / 'reports'}", f"paths.data={REPO / 'data'}",
                        "progress=false", "llm_finetune.accelerator=cpu", f"llm_finetune.epochs={epochs}"])

    straight = finetune_llm.run(config("straight", 2))
    # killed at the first step of its second epoch: the first epoch's checkpoint must be on disk
    real_module = finetune_llm._lightning_module

    class Killed(Exception):
        pass

    def killed_in_second_epoch(*args, **kwargs):
        module = real_module(*args, **kwargs)
        step = module.training_step

        def training_step(batch, *rest):
            if module.current_epoch == 1:
                raise Killed
            return step(batch, *rest)

        module.training_step = training_step
        return module

    monkeypatch.setattr(finetune_llm, "_lightning_module", killed_in_second_epoch)
    with pytest.raises(Killed):
        finetune_llm.run(config("killed", 2))
    checkpoints = tmp_path / "killed" / "llm.checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["epoch"] == 0
    assert not (tmp_path / "killed" / "llm").exists()
    assert not (tmp_path / "killed" / "checkpoints").exists()  # no stray default checkpoints
    monkeypatch.setattr(finetune_llm, "_lightning_module", real_module)
    resumed = finetune_llm.run(config("killed", 2))
    assert not checkpoints.exists()  # the finished model replaces them
    a = load_llm(str(straight), compose([]).model, cache_dir)[0].state_dict()
    b = load_llm(str(resumed), compose([]).model, cache_dir)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((tmp_path / "killed" / "reports" / "finetune_llm.json").read_text())
    assert report["optimizer_steps"] == json.loads(
        (tmp_path / "straight" / "reports" / "finetune_llm.json").read_text())["optimizer_steps"]


def test_lr_schedules_warm_up_then_hold_or_decay_to_zero():
    from ip2p.data.finetune_llm import lr_factor

    # warm-up 10 steps, 110 in all: decay runs over steps 10..110
    assert [lr_factor(s, 10, 110, "linear") for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_factor(60, 10, 110, "constant") == 1.0
    assert lr_factor(60, 10, 110, "linear") == pytest.approx(0.5)
    assert lr_factor(35, 10, 110, "linear") == pytest.approx(0.75)
    assert lr_factor(35, 10, 110, "cosine") == pytest.approx(0.5 * (1 + 2 ** -0.5))  # cos(pi / 4)
    assert lr_factor(110, 10, 110, "cosine") == pytest.approx(0.0)
    assert lr_factor(0, 0, 100, "linear") == 1.0  # no warm-up: the full rate at once


def test_an_unknown_lr_schedule_fails_before_anything_loads(tmp_path):
    from ip2p.errors import Ip2pError

    cfg = compose([f"paths.artifacts={tmp_path}", "llm_finetune.lr_schedule=exponential",
                   f"llm_finetune.data={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(Ip2pError, match="lr_schedule 'exponential'"):
        finetune_llm.run(cfg)


def test_only_a_decaying_schedule_ties_a_checkpoint_to_its_number_of_epochs():
    from omegaconf import OmegaConf

    cfg = compose([])
    train = [{"input": "a", "edit": "b", "output": "c"}]
    finger = lambda **kw: finetune_llm.recipe_fingerprint(OmegaConf.merge(cfg.llm_finetune, kw), cfg, train)  # noqa: E731
    assert finger(epochs=1) == finger(epochs=3)  # constant: a longer run continues a shorter one
    assert finger(epochs=1, lr_schedule="linear") != finger(epochs=3, lr_schedule="linear")
    assert finger(epochs=1) != finger(epochs=1, lr_schedule="linear")
