"""The pretraining loop: the learning-rate schedule follows its formula, a run killed after a
checkpoint resumes to exactly the weights (and EMA weights) of an uninterrupted run, unreadable
checkpoints are one-line Ip2pErrors, and a kill during a save never leaves a half-written checkpoint."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from ip2p.errors import Ip2pError
from ip2p.models.ema import ExponentialMovingAverage
from ip2p.world.pretrain.loop import LoopConfig, learning_rate, load_checkpoint, train

REPO = Path(__file__).resolve().parents[1]


def config(**changes) -> LoopConfig:
    base = dict(steps=20, lr=0.05, min_lr=0.005, warmup_steps=3, weight_decay=0.01, ema_decay=0.8,
                grad_clip=1.0, checkpoint_every=5, eval_every=1000, log_every=5, progress=False)
    base.update(changes)
    return LoopConfig(**base)


# ----------------------------------------------------------------------------------- learning rate


def test_learning_rate_warmup_then_cosine():
    c = config(steps=100, lr=1e-3, min_lr=1e-5, warmup_steps=10)
    # linear warmup: step s (0-based) uses lr * (s + 1) / warmup, reaching lr on the last warmup step
    for s in range(10):
        assert learning_rate(s, c) == pytest.approx(1e-3 * (s + 1) / 10, rel=1e-12)
    assert learning_rate(9, c) == pytest.approx(1e-3, rel=1e-12)
    assert learning_rate(10, c) == pytest.approx(1e-3, rel=1e-12)  # the cosine starts at lr
    # half a cosine from lr (step 10) to min_lr (step 100), by hand
    for s in (10, 25, 55, 80, 99):
        t = (s - 10) / 90
        hand = 1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * t)) / 2
        assert learning_rate(s, c) == pytest.approx(hand, rel=1e-12)
    assert learning_rate(55, c) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-12)  # the midpoint
    assert learning_rate(100, c) == pytest.approx(1e-5, rel=1e-12)
    # the last step trained (99) is within a hair of min_lr: (lr - min_lr) * (1 - cos(pi/90)) / 2
    assert learning_rate(99, c) - 1e-5 == pytest.approx((1e-3 - 1e-5) * (1 - math.cos(math.pi / 90)) / 2, rel=1e-9)
    # never below min_lr, non-increasing after warmup
    lrs = [learning_rate(s, c) for s in range(10, 130)]
    assert all(a >= b - 1e-18 for a, b in zip(lrs, lrs[1:]))
    assert min(lrs) == pytest.approx(1e-5, rel=1e-12)


def test_learning_rate_without_warmup():
    c = config(steps=10, lr=0.1, min_lr=0.0, warmup_steps=0)
    assert learning_rate(0, c) == pytest.approx(0.1)
    assert learning_rate(5, c) == pytest.approx(0.05)
    assert learning_rate(10, c) == pytest.approx(0.0, abs=1e-15)


# ------------------------------------------------------------------------------------------ resume


W_TRUE = torch.tensor([[1.5], [-2.0], [0.5], [3.0]])


def batch_loss(model: torch.nn.Module, step: int) -> dict[str, torch.Tensor]:
    """Batch `step` is a pure function of the step: a Generator seeded by it."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 4, generator=g)
    y = x @ W_TRUE + 0.1 * torch.randn(16, 1, generator=g)
    return {"loss": torch.nn.functional.mse_loss(model(x), y)}


def new_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 1)


class Kill(KeyboardInterrupt):
    pass


def test_resume_is_exact(tmp_path):
    c = config()
    # one uninterrupted run
    model_a = new_model(0)
    steps_a = []

    def loss_a(step):
        steps_a.append(step)
        return batch_loss(model_a, step)

    ema_a = train("a", model_a, loss_a, c, tmp_path / "a.pt")
    assert steps_a == list(range(20))

    # the same run, killed at step 12 (after the checkpoint at 10), then started again
    model_b = new_model(0)
    steps_b = []

    def loss_b(step):
        if step == 12:
            raise Kill()
        steps_b.append(step)
        return batch_loss(model_b, step)

    with pytest.raises(Kill):
        train("b", model_b, loss_b, c, tmp_path / "b.pt")
    assert steps_b == list(range(12))

    model_c = new_model(123)  # a fresh process: different initial weights, all restored from the checkpoint
    steps_c = []

    def loss_c(step):
        steps_c.append(step)
        return batch_loss(model_c, step)

    ema_c = train("c", model_c, loss_c, c, tmp_path / "b.pt")
    assert steps_c == list(range(10, 20))  # resumed after the last checkpoint, not from 0 or 12

    for p, q in zip(model_a.state_dict().values(), model_c.state_dict().values()):
        assert torch.equal(p, q)
    for p, q in zip(ema_a.state_dict().values(), ema_c.state_dict().values()):
        assert torch.equal(p, q)
    assert int(ema_c.num_updates) == 20
    # the run actually learned something and the EMA differs from the raw weights (else the check is empty)
    assert not torch.equal(ema_a.model.weight, model_a.weight)
    assert batch_loss(model_a, 999)["loss"] < batch_loss(new_model(0), 999)["loss"]


def test_resume_is_exact_when_the_loss_and_the_evaluation_draw_from_the_global_generator(tmp_path):
    """A VAE's posterior sample or dropout draws from torch's global generator, which no batch seed
    holds; an evaluation at a checkpoint step may draw from it too. Resumed in a fresh process (another
    global seed), the run still ends bit for bit where an uninterrupted one does."""
    c = config(eval_every=5)

    def run(path: Path, seed: int, kill_at: int | None = None) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = torch.nn.Linear(4, 1)
        torch.nn.init.constant_(model.weight, 0.1)
        torch.nn.init.zeros_(model.bias)

        def loss(step):
            if step == kill_at:
                raise Kill()
            noisy = model.weight + 0.05 * torch.randn_like(model.weight)  # a posterior-like draw
            g = torch.Generator().manual_seed(1000 + step)
            x = torch.randn(16, 4, generator=g)
            return {"loss": torch.nn.functional.mse_loss(x @ noisy.T + model.bias, x @ W_TRUE)}

        def evaluate(ema_model, step):
            return {"draw": float(torch.rand(()))}  # consumes the global generator at steps 5, 10, ...

        try:
            train("g", model, loss, c, path, evaluate=evaluate)
        except Kill:
            pass
        return model

    whole = run(tmp_path / "a.pt", seed=0)
    run(tmp_path / "b.pt", seed=0, kill_at=12)
    state = torch.load(tmp_path / "b.pt", weights_only=True)
    del state["rng"]  # a checkpoint without the generator's state (as written before it was saved)
    torch.save(state, tmp_path / "c.pt")
    resumed = run(tmp_path / "b.pt", seed=999)
    assert torch.equal(whole.weight, resumed.weight) and torch.equal(whole.bias, resumed.bias)
    # the older checkpoint still resumes, but draws other noise: the check above is not empty
    older = run(tmp_path / "c.pt", seed=999)
    assert not torch.equal(whole.weight, older.weight)


def test_ema_follows_its_formula_in_the_loop(tmp_path):
    """The EMA the loop returns is the hand recursion ema <- d_n ema + (1 - d_n) w_n over the weights after
    each step, d_n = min(decay, (1 + n) / (10 + n)) (warmup on), starting from the initial weights."""
    c = config(steps=6, checkpoint_every=100, ema_decay=0.9, grad_clip=0.0)
    model = new_model(1)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    weights = []

    def loss(step):
        if step > 0:
            weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return batch_loss(model, step)

    ema = train("e", model, loss, c, tmp_path / "e.pt")
    weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    assert len(weights) == 6
    hand = {k: v.clone() for k, v in init.items()}
    for n, w in enumerate(weights, start=1):
        d = min(0.9, (1 + n) / (10 + n))
        for k in hand:
            hand[k] = d * hand[k] + (1 - d) * w[k]
    for k, v in ema.model.state_dict().items():
        torch.testing.assert_close(v, hand[k], rtol=0, atol=1e-6)


def test_finished_run_does_not_train_again(tmp_path):
    c = config(steps=8, checkpoint_every=3)
    model = new_model(2)
    ema = train("f", model, lambda s: batch_loss(model, s), c, tmp_path / "f.pt")

    def forbidden(step):
        raise AssertionError(f"step {step} trained again")

    again = new_model(3)
    ema2 = train("f", again, forbidden, c, tmp_path / "f.pt")
    assert torch.equal(again.weight, model.weight) and torch.equal(again.bias, model.bias)
    assert torch.equal(ema2.model.weight, ema.model.weight)


def test_a_checkpoint_of_another_recipe_starts_over(tmp_path):
    """Changing a stage's recipe (its learning rate, its scene mix) and rerunning must not resume the
    weights the old recipe made: DVC reruns the stage, and its checkpoint is still lying there."""
    c = config(steps=8, checkpoint_every=3)
    path = tmp_path / "r.pt"
    model = new_model(2)
    train("r", model, lambda s: batch_loss(model, s), c, path, recipe="lr=0.05")
    steps = []

    def counted(m):
        def loss(step):
            steps.append(step)
            return batch_loss(m, step)
        return loss

    same = new_model(2)
    train("r", same, counted(same), c, path, recipe="lr=0.05")
    assert steps == []  # the same recipe, finished: nothing to do
    other = new_model(2)
    train("r", other, counted(other), c, path, recipe="lr=0.01")
    assert steps == list(range(8))  # another recipe: from the start
    assert torch.load(path, weights_only=True)["recipe"] == "lr=0.01"
    # a checkpoint written before recipes were saved resumes as it always did
    state = torch.load(path, weights_only=True)
    del state["recipe"]
    torch.save(state, path)
    steps.clear()
    again = new_model(2)
    train("r", again, counted(again), c, path, recipe="lr=0.05")
    assert steps == []


def test_recipe_ignores_where_and_how_often_but_not_what():
    from omegaconf import OmegaConf

    from ip2p.world.pretrain.loop import recipe_of

    base = OmegaConf.create({"seed": 1, "output": "a", "checkpoint": "a.pt", "decoder": {"checkpoint": "d.pt", "lr": 1},
                             "loop": {"lr": 0.1, "steps": 10, "eval_every": 5, "checkpoint_every": 5, "log_every": 1}})

    def changed(**dotted):
        cfg = base.copy()
        for key, value in dotted.items():
            OmegaConf.update(cfg, key.replace("__", "."), value)
        return recipe_of(cfg)

    assert changed(output="b", checkpoint="b.pt", loop__eval_every=7, loop__log_every=3,
                   decoder__checkpoint="e.pt") == recipe_of(base)
    assert changed(loop__lr=0.2) != recipe_of(base)
    assert changed(seed=2) != recipe_of(base)
    assert changed(decoder__lr=2) != recipe_of(base)
    assert recipe_of(OmegaConf.merge(base, {"decoder": {"lr": 2}}), ("decoder",)) == recipe_of(base, ("decoder",))


# ------------------------------------------------------------------------------- corrupt checkpoint


def _train_once(path: Path):
    model = new_model(0)
    return train("x", model, lambda s: batch_loss(model, s), config(steps=3), path)


def _assert_one_line_error(path: Path):
    model = new_model(0)
    with pytest.raises(Ip2pError) as info:
        train("x", model, lambda s: batch_loss(model, s), config(steps=3), path)
    msg = str(info.value)
    assert msg and "\n" not in msg, msg
    assert str(path) in msg


def test_garbage_checkpoint_is_one_line_error(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"this is not a checkpoint\n" * 10)
    _assert_one_line_error(path)


def test_truncated_checkpoint_is_one_line_error(tmp_path):
    path = tmp_path / "t.pt"
    _train_once(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _assert_one_line_error(path)


def test_empty_checkpoint_is_one_line_error(tmp_path):
    path = tmp_path / "e.pt"
    path.write_bytes(b"")
    _assert_one_line_error(path)


def test_checkpoint_of_another_model_is_one_line_error(tmp_path):
    path = tmp_path / "other.pt"
    other = torch.nn.Linear(4, 3)  # load_state_dict's size-mismatch message spans several lines
    train("o", other, lambda s: {"loss": other(torch.ones(2, 4)).pow(2).mean()}, config(steps=2), path)
    _assert_one_line_error(path)


def test_checkpoint_missing_a_part_is_one_line_error(tmp_path):
    path = tmp_path / "part.pt"
    torch.save({"model": new_model(0).state_dict(), "step": 3}, path)
    _assert_one_line_error(path)


def test_checkpoint_missing_the_step_is_one_line_error(tmp_path):
    path = tmp_path / "nostep.pt"
    model = new_model(0)
    opt = torch.optim.AdamW(model.parameters())
    ema = ExponentialMovingAverage(model, decay=0.8, warmup=True)
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict()}, path)
    _assert_one_line_error(path)


def test_logged_loss_after_resume_is_a_mean(tmp_path):
    c = config(steps=20, log_every=8, checkpoint_every=5)
    logged = []

    def run(kill_at=None):
        model = new_model(0)

        def loss(step):
            if step == kill_at:
                raise Kill()
            return {"loss": model(torch.zeros(1, 4)).sum() * 0 + 1.0}  # the loss is 1 at every step

        try:
            train("m", model, loss, c, tmp_path / "m.pt", log_metrics=lambda m, s: logged.append((s, m)))
        except Kill:
            pass

    run(kill_at=6)  # checkpoint at 5, killed before the first log
    assert logged == []
    run()
    losses = {s: m["train/loss"] for s, m in logged if "train/loss" in m}
    assert sorted(losses) == [8, 16, 20]
    for s, v in losses.items():
        assert v == pytest.approx(1.0), (s, v)


# --------------------------------------------------------------------------------- kill during save


CHILD = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from ip2p.world.pretrain.loop import LoopConfig, train
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 1024)  # ~4M params: model + EMA + 2 Adam moments ~ 67 MB per checkpoint
    x = torch.ones(1, 1024)
    c = LoopConfig(steps=100000, lr=1e-4, min_lr=1e-5, warmup_steps=1, weight_decay=0.0, ema_decay=0.9,
                   grad_clip=0.0, checkpoint_every=1, eval_every=10**9, log_every=10**9, progress=False)
    print("ready", flush=True)
    train("kill", model, lambda s: {"loss": model(x).square().mean()}, c, Path(sys.argv[1]))
""")


def _run_and_kill(path: Path, saves_before_kill: int, timeout: float = 60.0) -> bool:
    """Train in a child that saves a big checkpoint every step, and SIGKILL it while a save is in progress,
    once `saves_before_kill` checkpoints have landed. A save is seen in progress when a temp file lies
    beside the checkpoint, or when the checkpoint itself is shorter than a whole one (written in place).
    If neither is ever seen, kill it after a while anyway: saving is most of what the child does.
    Returns whether the kill happened during an observed save."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == b"ready", proc.stderr.read().decode()
        deadline = time.monotonic() + timeout
        landed, last_mtime, full_size, first_seen, mid_write = 0, None, 0, None, False
        while True:
            assert time.monotonic() < deadline, "the child never got going"
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                st = path.stat()
            except FileNotFoundError:
                st = None
            if st is not None and st.st_mtime_ns != last_mtime:
                landed, last_mtime = landed + 1, st.st_mtime_ns
                first_seen = first_seen or time.monotonic()
            if landed >= saves_before_kill:
                temp = any(p.name.startswith(f".{path.name}.") for p in path.parent.iterdir())
                partial = st is not None and 0 < full_size and st.st_size < full_size
                if temp or partial:
                    mid_write = True
                    break
                if first_seen is not None and time.monotonic() - first_seen > 10.0:
                    break
            if st is not None:
                full_size = max(full_size, st.st_size)
            time.sleep(0.0002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    return mid_write


def _loads(path: Path) -> int:
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 1024)
    opt = torch.optim.AdamW(model.parameters())
    ema = ExponentialMovingAverage(model, decay=0.9, warmup=True)
    return load_checkpoint(path, model, ema, opt)


def test_kill_during_first_save_leaves_no_checkpoint(tmp_path):
    path = tmp_path / "ck.pt"
    _run_and_kill(path, saves_before_kill=0)
    # either nothing (killed during the very first save) or a whole checkpoint
    assert not path.exists() or _loads(path) >= 1


def test_kill_during_a_later_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ck.pt"
    _run_and_kill(path, saves_before_kill=2)
    assert path.exists()
    step = _loads(path)
    assert step >= 2


# ----------------------------------------------------------------------------------- VAE decoder phase

def test_vae_decoder_phase_trains_the_decoder_and_keeps_the_latents_bit_for_bit(tmp_path):
    """The world VAE's second phase (as SD's ft-MSE VAE): the decoder learns, the encoder (so every
    latent any later model was trained on) stays exactly as it was, and a killed phase resumes."""
    import numpy as np
    from omegaconf import OmegaConf

    from ip2p.io.images import to_tensor
    from ip2p.world.pretrain import vae as vae_stage
    from ip2p.world.render import render
    from ip2p.world.scene import sample_scenes

    loop = dict(steps=4, lr=1e-3, min_lr=1e-4, warmup_steps=1, weight_decay=0.0, ema_decay=0.5, grad_clip=1.0,
                checkpoint_every=2, eval_every=1000, log_every=2)
    c = OmegaConf.create({"channels": [8, 16], "layers_per_block": 1, "latent_channels": 4, "norm_groups": 4,
                          "mid_attention": False, "p_crop_object": 0.8, "detail_weight": 9.0,
                          "decoder": {"checkpoint": str(tmp_path / "dec.pt"), "seed": 5, "batch_size": 2,
                                      "crop": 64, "loop": loop}})
    torch.manual_seed(0)
    model = vae_stage.build_vae(c)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = to_tensor(np.stack([render(s) for s in sample_scenes(3, 2)]))
    with torch.no_grad():
        latents_before = model.encode(x).latent_dist.mean
    eval_scenes = sample_scenes(4, 2)
    tuned = vae_stage.finetune_decoder(model, c, eval_scenes, progress=False)
    after = tuned.state_dict()
    for name, tensor in after.items():
        if name.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(tensor, before[name]), name
    assert any(not torch.equal(after[n], before[n]) for n in after if n.startswith("decoder."))
    with torch.no_grad():
        diff = (tuned.encode(x).latent_dist.mean - latents_before).abs().max()
        assert diff < 1e-4, diff  # the same weights; CPU kernels may sum in another order
    # a resumed phase (its checkpoint says done) returns the same decoder without training again
    again = vae_stage.finetune_decoder(vae_stage.build_vae(c), c, eval_scenes, progress=False)
    for name, tensor in again.state_dict().items():
        if name.startswith("decoder."):
            assert torch.equal(tensor, after[name]), name


# ----------------------------------------------------------------------------------- VAE refine stage

def test_outline_band_is_the_ring_around_each_object_and_the_seam_between_touching_ones():
    """A k x k square on whole pixels: its outline band (1 px each side) is the square grown by one pixel
    on each side without the four corners (4-connected dilation) less the square shrunk by one:
    (k + 2)^2 - 4 - (k - 2)^2 = 8k - 4 pixels. Two squares that touch keep the seam between them."""
    from ip2p.world.pretrain.vae_refine import outline_band
    from ip2p.world.scene import Obj, Scene

    k = 10
    one = Scene((Obj("square", "red", float(k), 20.0, 20.0),), "gray")   # box 15..25: whole pixels
    band = outline_band(one, 1)
    assert band.sum() == 8 * k - 4
    assert band[15, 15] == 1 and band[14, 20] == 1 and band[14, 14] == 0 and band[20, 20] == 0
    # side by side: left square covers x 15..25, the right one 25..35; both outlines run along x = 25
    two = Scene((Obj("square", "red", float(k), 20.0, 20.0), Obj("square", "blue", float(k), 30.0, 20.0)), "gray")
    seam = outline_band(two, 1)
    # the last pixel of the left, the first of the right: 5 px deep inside the two squares' 10 x 20 union
    assert seam[20, 24] == 1 and seam[20, 25] == 1
    assert seam.sum() == 2 * (8 * k - 4) - 2 * k   # each ring's outer column at the seam is the other's inner one


def _refine_cfg(tmp_path, train_encoder: bool):
    from ip2p.config import compose

    return compose(["progress=false", "logger=none", f"paths.reports={tmp_path / 'reports'}",
                    f"world.vae_refine.source={tmp_path / 'vae'}", f"world.vae_refine.output={tmp_path / 'out'}",
                    f"world.vae_refine.checkpoint={tmp_path / 'refine.pt'}",
                    f"world.vae_refine.train_encoder={str(train_encoder).lower()}",
                    "world.vae_refine.batch_size=2", "world.vae_refine.eval_scenes=2", "world.vae_refine.loop.steps=4",
                    "world.vae_refine.loop.checkpoint_every=2", "world.vae_refine.loop.warmup_steps=1",
                    "world.vae_refine.loop.log_every=2", "world.vae_refine.loop.ema_decay=0.5"])


@pytest.mark.parametrize("train_encoder", [False, True])
def test_refine_vae_stage_continues_the_vae_and_says_how_far_the_latents_moved(tmp_path, train_encoder):
    """`ip2p refine-vae`: the decoder always learns; the encoder only with train_encoder (without it the
    latents the base was trained on stay as they were: drift 0). The saved folder loads through the
    loader, keeps the source's latent scale, and a finished run does not train again."""
    import json

    from omegaconf import OmegaConf

    from ip2p.models.loader import load_vae
    from ip2p.world.pretrain import vae as vae_stage
    from ip2p.world.pretrain import vae_refine

    torch.manual_seed(0)
    source = vae_stage.build_vae(OmegaConf.create({"channels": [8, 16], "layers_per_block": 1, "latent_channels": 4,
                                                   "norm_groups": 4, "mid_attention": False}))
    source.register_to_config(scaling_factor=0.37)
    source.save_pretrained(tmp_path / "vae")
    before = {k: v.clone() for k, v in source.state_dict().items()}
    cfg = _refine_cfg(tmp_path, train_encoder)
    result = vae_refine.run(cfg)
    refined = load_vae(str(tmp_path / "out"))
    after = refined.state_dict()
    encoder = [n for n in after if n.startswith(("encoder.", "quant_conv."))]
    changed = [n for n in encoder if not torch.equal(after[n], before[n])]
    assert bool(changed) == train_encoder, changed
    assert any(not torch.equal(after[n], before[n]) for n in after if n.startswith("decoder."))
    assert refined.config.scaling_factor == pytest.approx(0.37)
    assert (result["latent_drift"] > 0) == train_encoder and result["latent_drift"] < 0.5, result
    assert json.loads((tmp_path / "reports" / "refine_vae.json").read_text())["steps"] == 4
    again = vae_refine.run(cfg)   # the checkpoint says done: the same weights, no training
    assert all(torch.equal(t, load_vae(str(tmp_path / "out")).state_dict()[n]) for n, t in after.items())
    assert again["psnr"] == pytest.approx(result["psnr"])


def test_refine_vae_scene_mix_overrides_only_what_it_names():
    """world.vae_refine.scenes: null keys keep the world's distribution (the same draws as sample_scene's
    default); a named share changes what the batches hold."""
    import numpy as np
    from omegaconf import OmegaConf

    from ip2p.world.pretrain.vae_refine import scene_distribution
    from ip2p.world.scene import SceneDistribution, sample_scene
    from ip2p.world.vocab import SIZES

    assert scene_distribution(OmegaConf.create({"p_two_objects": None, "p_small": None, "p_style": None})) \
        == SceneDistribution()
    mix = scene_distribution(OmegaConf.create({"p_two_objects": 1.0, "p_small": 1.0,
                                               "p_style": {"snowy": 1.0}}))
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, mix) for _ in range(20)]
    assert all(s.style == "snowy" and len(s.objects) == 2 for s in scenes)
    assert all(o.side <= SIZES["small"][1] for s in scenes for o in s.objects)
