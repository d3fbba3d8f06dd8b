"""The text-to-image base's noise schedule and loss weighting (ip2p.world.pretrain.t2i), checked against
hand-written relations between the epsilon, v and clean-latent errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ip2p.world.pretrain.t2i import min_snr_weight, scheduler_config


def _alphas(schedule: dict) -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config(schedule)).alphas_cumprod


def test_zero_terminal_snr_schedule_ends_in_pure_noise():
    sd = _alphas({})
    zero = _alphas({"rescale_betas_zero_snr": True})
    assert float(sd[-1]) > 1e-3          # SD 1.5 leaves signal at the last step...
    assert float(zero[-1]) == 0.0        # ...the rescaled schedule does not
    assert torch.allclose(zero[0], sd[0], atol=1e-6)  # and starts where SD starts
    assert bool((zero[1:] <= zero[:-1]).all())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weight_is_clipped_clean_latent_weight(prediction_type):
    """weight * (prediction error)^2 == min(SNR [+1 for v], gamma) * (clean-latent error)^2."""
    gamma = 5.0
    alphas = _alphas({"rescale_betas_zero_snr": True})
    t = torch.tensor([10, 200, 500, 800, 990])
    a = alphas[t]
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, generator=g), torch.randn(5, generator=g)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    if prediction_type == "epsilon":
        target, pred = eps, eps + 0.1 * torch.randn(5, generator=g)
        x0_hat = (xt - (1 - a).sqrt() * pred) / a.sqrt()
    else:
        target = a.sqrt() * eps - (1 - a).sqrt() * x0
        pred = target + 0.1 * torch.randn(5, generator=g)
        x0_hat = a.sqrt() * xt - (1 - a).sqrt() * pred
    snr = a / (1 - a)
    clean_weight = torch.clamp(snr + (prediction_type == "v_prediction"), max=gamma)
    w = min_snr_weight(alphas, t, gamma, prediction_type)
    assert torch.allclose(w * (pred - target) ** 2, clean_weight * (x0_hat - x0) ** 2, rtol=1e-4, atol=1e-7)


def test_v_weight_stays_finite_and_positive_at_zero_snr():
    alphas = _alphas({"rescale_betas_zero_snr": True})
    w = min_snr_weight(alphas, torch.tensor([999]), 5.0, "v_prediction")
    assert float(w) == pytest.approx(1.0)   # SNR 0: clean-latent weight 1 (plain v loss)
    assert float(min_snr_weight(alphas, torch.tensor([5]), 0.0, "v_prediction")) == 1.0  # gamma 0: off


def test_object_mask_covers_each_object_and_its_rim():
    """At f=4, a latent pixel is marked when its 4x4 patch touches an object, plus one latent pixel of
    rim; the hand check: pixel coverage from the renderer, pooled by hand."""
    from scipy import ndimage

    from ip2p.world.pretrain.t2i import object_mask
    from ip2p.world.render import object_coverage
    from ip2p.world.scene import sample_scenes

    for scene in sample_scenes(17, 20):
        mask = object_mask(scene, 4)
        assert mask.shape == (16, 16) and mask.dtype == bool
        for o in scene.objects:
            cover = object_coverage(o)
            ys, xs = np.nonzero(cover)
            assert mask[ys // 4, xs // 4].all()                  # every covered pixel's latent is marked
        touched = np.zeros((16, 16), bool)
        for o in scene.objects:
            ys, xs = np.nonzero(object_coverage(o))
            touched[ys // 4, xs // 4] = True
        assert (mask == ndimage.binary_dilation(touched)).all()
        assert mask.sum() < 256                                  # objects do not fill the canvas


def test_pixel_weight_favours_objects_and_keeps_the_mean():
    from ip2p.world.pretrain.t2i import pixel_weight

    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True                                       # 4 of 16 pixels on an object
    w = pixel_weight(masks, 4.0)
    assert w.shape == (2, 1, 4, 4)
    assert torch.allclose(w.mean(dim=(1, 2, 3)), torch.ones(2))
    # sample 0: object pixels weigh 5, the rest 1, normalised by the mean (4*5 + 12*1) / 16 = 2
    assert torch.isclose(w[0, 0, 0, 0], torch.tensor(5 / 2)) and torch.isclose(w[0, 0, 3, 3], torch.tensor(1 / 2))
    assert torch.allclose(w[1], torch.ones(1, 4, 4))              # no object: a plain mean
    assert torch.allclose(pixel_weight(masks, 0.0), torch.ones(2, 1, 4, 4))



def _small_vae(seed: int, channels=(8, 16)):
    from omegaconf import OmegaConf

    from ip2p.world.pretrain.vae import build_vae

    torch.manual_seed(seed)
    return build_vae(OmegaConf.create({"channels": list(channels), "layers_per_block": 1, "latent_channels": 4,
                                       "norm_groups": 4, "mid_attention": False})).eval()


def test_latent_cache_is_reused_only_for_the_same_vae_and_scenes(tmp_path, monkeypatch):
    """The base's latent cache: a second run with the same VAE and scenes reads the file (no encoding);
    a retrained VAE (other weights, here another downsampling too) or other scenes re-encode. The
    latents equal a direct encoding (fp16 on disk)."""
    import ip2p.world.pretrain.t2i as t2i
    from ip2p.io.images import to_tensor
    from ip2p.world.render import render
    from ip2p.world.scene import sample_scenes

    scenes, path = sample_scenes(5, 6), tmp_path / "latents.pt"
    vae = _small_vae(0)
    first = t2i.cache_latents(vae, scenes, path, batch=4, progress=False)
    with torch.no_grad():
        direct = vae.encode(to_tensor(np.stack([render(s) for s in scenes]))).latent_dist.mean
    assert first["mean"].shape == (6, 4, 32, 32)                  # f=2: 64 px -> 32 x 32
    torch.testing.assert_close(first["mean"].float(), direct, atol=2e-3, rtol=2e-3)

    encoded = []
    monkeypatch.setattr(t2i, "render", lambda s: encoded.append(s) or render(s))
    again = t2i.cache_latents(vae, scenes, path, batch=4, progress=False)
    assert encoded == [] and torch.equal(again["mean"], first["mean"])
    retrained = t2i.cache_latents(_small_vae(1, (8, 16, 16)), scenes, path, batch=4, progress=False)
    assert len(encoded) == 6 and retrained["mean"].shape == (6, 4, 16, 16)
    t2i.cache_latents(_small_vae(1, (8, 16, 16)), sample_scenes(6, 6), path, batch=4, progress=False)
    assert len(encoded) == 12


def test_unet_levels_and_cross_attention_follow_the_config():
    """world.t2i.cross_attention picks the levels with cross-attention; the UNet's first level has the
    latent size; a list of the wrong length is a one-line error."""
    from omegaconf import OmegaConf

    from ip2p.errors import Ip2pError
    from ip2p.world.pretrain.t2i import build_unet

    c = OmegaConf.create({"channels": [16, 32, 32, 32], "layers_per_block": 1, "attention_heads": 1, "norm_groups": 8,
                          "cross_attention": [False, True, True, False]})
    unet = build_unet(c, cross_attention_dim=24, sample_size=32)
    assert unet.config.sample_size == 32
    assert unet.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert unet.config.up_block_types == ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    out = unet(torch.randn(2, 4, 32, 32), torch.tensor([10, 500]), encoder_hidden_states=torch.randn(2, 5, 24)).sample
    assert out.shape == (2, 4, 32, 32)
    default = build_unet(OmegaConf.create({**OmegaConf.to_container(c), "cross_attention": None, "channels": [16, 32]}),
                         cross_attention_dim=24, sample_size=16)
    assert default.config.down_block_types == ("CrossAttnDownBlock2D", "DownBlock2D")
    with pytest.raises(Ip2pError, match="one entry per level"):
        build_unet(OmegaConf.create({**OmegaConf.to_container(c), "cross_attention": [True, False]}), 24, 32)


def test_world_f2_variant_trains_into_its_own_folder_with_the_shipped_clip():
    """`world=f2` (the f=2 VAE and base of docs/miniature-world.md) must never overwrite the shipped
    world models: every output and checkpoint under its own root; its text encoder is the shipped CLIP."""
    from ip2p.config import compose

    shipped, f2 = compose([]).world, compose(["world=f2"]).world
    outputs = [f2.vae.output, f2.vae.checkpoint, f2.vae.decoder.checkpoint, f2.t2i.output, f2.t2i.checkpoint]
    assert all(str(p).startswith(str(f2.root) + "/") for p in outputs) and f2.root != shipped.root
    assert f2.t2i.vae == f2.vae.output and f2.t2i.clip == shipped.clip.output
    assert len(f2.vae.channels) == 2 and len(f2.t2i.cross_attention) == len(f2.t2i.channels) == 4


def test_world_fast_recipe_starts_from_scratch_beside_the_shipped_models():
    """`world=fast` (the 90-minute recipe, scripts/world_fast.sh) trains every model anew: no path of
    its world config may point into the shipped world's folder (reading a shipped VAE would not be
    from scratch; writing there would overwrite what `dvc pull` got), and it is the shipped recipe
    shortened, never lengthened."""
    from ip2p.config import compose

    shipped, fast = compose([]).world, compose(["world=fast"]).world

    def strings(node):
        if isinstance(node, dict):
            return [s for v in node.values() for s in strings(v)]
        if isinstance(node, list):
            return [s for v in node for s in strings(v)]
        return [node] if isinstance(node, str) else []

    paths = strings(OmegaConf.to_container(fast, resolve=True))
    shipped_paths = [p for p in paths if p == str(shipped.root) or p.startswith(str(shipped.root) + "/")]
    assert not shipped_paths, f"world=fast reads or writes the shipped world: {shipped_paths}"
    outputs = [fast.vae.output, fast.vae.checkpoint, fast.clip.output, fast.t2i.output, fast.t2i.vae, fast.t2i.clip,
               fast.llm.finetune.output, fast.llm.finetune.data, fast.source.captions_output]
    assert all(str(p).startswith(str(fast.root) + "/") for p in outputs)
    assert fast.t2i.refine is None and fast.report.base_vae is None   # no refine runs, no refined VAE
    for part in ("vae", "clip", "t2i"):
        assert fast[part].loop.steps < shipped[part].loop.steps
    assert fast.vae.decoder.loop.steps < shipped.vae.decoder.loop.steps
    assert fast.llm.finetune.epochs < shipped.llm.finetune.epochs


def test_curriculum_first_scenes_are_one_large_object_without_style():
    from ip2p.world.pretrain.t2i import first_scenes
    from ip2p.world.scene import valid
    from ip2p.world.vocab import SIZES

    scenes = first_scenes(4, 60, "gray")
    assert len(scenes) == 60 and scenes == first_scenes(4, 60, "gray")  # a pure function of the seed
    assert all(valid(s) and s.background == "gray" and s.style == "none" and len(s.objects) == 1 for s in scenes)
    assert all(SIZES["large"][0] <= s.objects[0].side <= SIZES["large"][1] for s in scenes)
    assert len({(s.objects[0].shape, s.objects[0].colour) for s in scenes}) > 20
    anywhere = first_scenes(4, 60, None)
    assert len({s.background for s in anywhere}) > 3


def test_curriculum_first_scenes_can_be_small():
    from ip2p.world.pretrain.t2i import first_scenes
    from ip2p.world.vocab import SIZES

    def small(s):
        return SIZES["small"][0] <= s.objects[0].side <= SIZES["small"][1]

    assert all(small(s) for s in first_scenes(4, 40, None, p_small=1.0))
    mixed = [small(s) for s in first_scenes(4, 200, None, p_small=0.5)]
    assert 0.35 < sum(mixed) / len(mixed) < 0.65
    assert all(len(s.objects) == 1 and s.style == "none" for s in first_scenes(4, 40, None, p_small=0.5))


def test_curriculum_first_scenes_can_drill_two_objects():
    from ip2p.config import compose
    from ip2p.world.pretrain.t2i import first_scenes
    from ip2p.world.scene import valid

    pairs = first_scenes(5, 40, None, p_two_objects=1.0)
    assert all(len(s.objects) == 2 and s.style == "none" and valid(s) for s in pairs)
    mixed = [len(s.objects) == 2 for s in first_scenes(5, 200, None, p_two_objects=0.5)]
    assert 0.35 < sum(mixed) / len(mixed) < 0.65
    # the first run's drill stays single objects (only the last refine run sets the key): its default keeps
    # the data the shipped base was trained on
    assert compose([]).world.t2i.curriculum.p_two_objects == 0.0


def _tiny_t2i_cfg(tmp_path, curriculum_steps: int, steps: int, extra: tuple[str, ...] = ()):
    from ip2p.config import compose

    repo = Path(__file__).resolve().parents[1]
    cfg = compose(["logger=none", f"paths.reports={tmp_path}", f"world.root={tmp_path}/world",
                   f"world.t2i.vae={repo}/artifacts/world/vae", f"world.t2i.clip={repo}/artifacts/world/clip",
                   "world.t2i.scenes=12", "world.t2i.batch_size=3", "world.t2i.channels=[16,32]",
                   "world.t2i.cross_attention=[true,false]", "world.t2i.layers_per_block=1",
                   "world.t2i.norm_groups=8", f"world.t2i.loop.steps={steps}", "world.t2i.loop.warmup_steps=1",
                   "world.t2i.loop.eval_every=1000", "world.t2i.eval.scenes=2", "world.t2i.eval.steps=2",
                   f"world.t2i.curriculum.steps={curriculum_steps}", "world.t2i.curriculum.scenes=10",
                   "world.t2i.curriculum.background=black", "world.t2i.refine=null", "progress=false", *extra])
    if not Path(cfg.world.t2i.vae, "config.json").is_file():
        pytest.fail("artifacts/world/vae is missing: run `dvc pull pretrain_vae pretrain_clip` (scripts/setup.sh does)")
    return cfg


def _saved_unet(cfg) -> dict:
    """The UNet weights a run saved in its base folder."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(f"{cfg.world.t2i.output}/unet").state_dict()


@pytest.fixture(scope="module")
def first_run_unet(tmp_path_factory):
    """The weights of a 2-step first run without refines: what a refine at learning rate 0 must keep."""
    import ip2p.world.pretrain.t2i as t2i

    alone = _tiny_t2i_cfg(tmp_path_factory.mktemp("alone"), curriculum_steps=0, steps=2)
    t2i.run(alone)
    return _saved_unet(alone)


def test_curriculum_trains_on_the_first_scenes_then_the_whole_world(tmp_path, monkeypatch):
    """The stage's first `curriculum.steps` batches are captions of the first scenes only (one object, the
    forced background); the later ones come from the whole world."""
    import ip2p.world.pretrain.t2i as t2i

    captioned = []
    real_caption = t2i.caption
    monkeypatch.setattr(t2i, "caption", lambda scene, rng: captioned.append(scene) or real_caption(scene, rng))
    cfg = _tiny_t2i_cfg(tmp_path, curriculum_steps=2, steps=4)
    result = t2i.run(cfg)
    assert result["steps"] == 4 and len(captioned) == 4 * 3
    first, rest = captioned[:6], captioned[6:]
    assert all(s.background == "black" and len(s.objects) == 1 and s.style == "none" for s in first)
    world = t2i.sample_scenes(cfg.world.t2i.seed, cfg.world.t2i.scenes)
    assert all(s in world for s in rest) and not any(s in world for s in first)


def test_curriculum_longer_than_the_run_is_refused(tmp_path):
    import ip2p.world.pretrain.t2i as t2i
    from ip2p.errors import Ip2pError

    with pytest.raises(Ip2pError, match="never see the whole world"):
        t2i.run(_tiny_t2i_cfg(tmp_path, curriculum_steps=4, steps=4))


def test_rehearsal_mixes_first_scenes_into_the_whole_worlds_batches(tmp_path, monkeypatch):
    """After the curriculum, `rehearsal` of each batch (here 1 of 3) still comes from the first scenes."""
    import ip2p.world.pretrain.t2i as t2i

    captioned = []
    real_caption = t2i.caption
    monkeypatch.setattr(t2i, "caption", lambda scene, rng: captioned.append(scene) or real_caption(scene, rng))
    cfg = _tiny_t2i_cfg(tmp_path, curriculum_steps=1, steps=3, extra=("world.t2i.curriculum.rehearsal=0.34",))
    t2i.run(cfg)
    world = t2i.sample_scenes(cfg.world.t2i.seed, cfg.world.t2i.scenes)
    first = t2i.first_scenes(cfg.world.t2i.curriculum.seed, 10, "black")
    batches = [captioned[i:i + 3] for i in range(0, 9, 3)]
    assert all(s in first for s in batches[0])
    for batch in batches[1:]:
        assert sum(s in world for s in batch) == 2 and sum(s in first for s in batch) == 1


def test_init_from_continues_a_saved_base(tmp_path):
    """`init_from` starts the UNet from a saved base: at learning rate 0 the saved UNet is that base's
    bit for bit, while a fresh run at the same rate saves its own random initialisation."""
    import ip2p.world.pretrain.t2i as t2i

    zero = ("world.t2i.loop.lr=0.0", "world.t2i.loop.min_lr=0.0")
    first = _tiny_t2i_cfg(tmp_path / "a", curriculum_steps=0, steps=1, extra=("world.t2i.seed=11",))
    t2i.run(first)
    base = _saved_unet(first)
    again = _tiny_t2i_cfg(tmp_path / "b", curriculum_steps=0, steps=1,
                          extra=(*zero, f"world.t2i.init_from={first.world.t2i.output}"))
    t2i.run(again)
    fresh = _tiny_t2i_cfg(tmp_path / "c", curriculum_steps=0, steps=1, extra=zero)
    t2i.run(fresh)
    continued, new = _saved_unet(again), _saved_unet(fresh)
    assert all(torch.equal(continued[k], base[k]) for k in base)
    assert not all(torch.equal(new[k], base[k]) for k in base)


def test_refine_continues_the_first_runs_base_with_its_own_checkpoint(tmp_path, first_run_unet):
    """`refine` runs a second training from the first run's saved base: at learning rate 0 the final
    base is the first run's bit for bit, the report keeps both runs, and a refine that would share the
    first run's checkpoint is refused."""
    import ip2p.world.pretrain.t2i as t2i
    from omegaconf import OmegaConf

    from ip2p.errors import Ip2pError

    def with_refine(cfg, refine: dict):  # replaces the shipped refine block instead of merging into it
        OmegaConf.update(cfg, "world.t2i.refine", refine, merge=False)
        return cfg

    both = with_refine(_tiny_t2i_cfg(tmp_path / "b", curriculum_steps=0, steps=2),
                       {"checkpoint": str(tmp_path / "b" / "refine.pt"), "loop": {"steps": 2, "lr": 0.0, "min_lr": 0.0},
                        "curriculum": {"steps": 1, "p_small": 1.0, "rehearsal": 0.5}})
    result = t2i.run(both)
    assert result["first_run"]["steps"] == 2 and result["steps"] == 2
    assert (tmp_path / "b" / "refine.pt").is_file() and (tmp_path / "b" / "refine_latents_first.pt").is_file()
    final = _saved_unet(both)  # the same seed: the first runs are equal
    assert all(torch.equal(first_run_unet[k], final[k]) for k in first_run_unet)

    same = with_refine(_tiny_t2i_cfg(tmp_path / "c", curriculum_steps=0, steps=2), {"loop": {"steps": 2}})
    with pytest.raises(Ip2pError, match="refine.checkpoint must differ"):
        t2i.run(same)


def test_a_list_of_refine_runs_runs_each_in_order_from_the_base_before_it(tmp_path, first_run_unet):
    """`refine` as a list: each run continues the base the run before it saved, with its own checkpoint
    and first-scene cache; at learning rate 0 the last base is still the first run's bit for bit. Two
    runs sharing a checkpoint are refused before any training."""
    import ip2p.world.pretrain.t2i as t2i
    from omegaconf import OmegaConf

    from ip2p.errors import Ip2pError

    def refine(name: str, steps: int) -> dict:
        return {"checkpoint": str(tmp_path / "b" / f"{name}.pt"), "loop": {"steps": steps, "lr": 0.0, "min_lr": 0.0},
                "curriculum": {"steps": 1, "p_small": 1.0, "rehearsal": 0.5}}

    twice = _tiny_t2i_cfg(tmp_path / "b", curriculum_steps=0, steps=2)
    OmegaConf.update(twice, "world.t2i.refine", [refine("r1", 2), refine("r2", 3)], merge=False)
    result = t2i.run(twice)
    assert result["steps"] == 3 and result["first_run"]["steps"] == 2  # the last run's numbers on top
    assert [r["steps"] for r in result["refine_runs"]] == [2]
    for name in ("r1", "r2"):
        assert (tmp_path / "b" / f"{name}.pt").is_file() and (tmp_path / "b" / f"{name}_latents_first.pt").is_file()
    final = _saved_unet(twice)
    assert all(torch.equal(first_run_unet[k], final[k]) for k in first_run_unet)

    clash = _tiny_t2i_cfg(tmp_path / "c", curriculum_steps=0, steps=2)
    OmegaConf.update(clash, "world.t2i.refine", [refine("r1", 2), refine("r1", 3)], merge=False)
    with pytest.raises(Ip2pError, match="used twice"):
        t2i.run(clash)
    assert not Path(clash.world.t2i.output).exists()  # refused before the first run trained


def test_shipped_recipe_refines_with_its_own_checkpoints_and_the_variants_do_not():
    from ip2p.config import compose
    from ip2p.world.pretrain.t2i import refine_runs

    t = compose([]).world.t2i
    runs = refine_runs(t)
    checkpoints = [str(t.checkpoint)] + [str(r.checkpoint) for r in runs]
    # the shipped base is the fifth refine run's: an entry dropped or added without retraining shows here
    assert len(runs) == len(t.refine) == 5 and len(set(checkpoints)) == len(checkpoints)
    assert all(c.startswith(str(compose([]).world.root)) for c in checkpoints)
    for r in runs:  # each continues the saved base, drills simple scenes, then rehearses them in the whole world
        assert r.init_from == t.output and r.refine is None
        assert r.curriculum.rehearsal > 0 and r.loop.steps > r.curriculum.steps
    # the last one drills mostly two objects (binding colours to their objects); the earlier ones single objects
    assert [r.curriculum.get("p_two_objects", 0.0) for r in runs] == [0.0] * 4 + [0.7]
    assert all(compose([f"world={v}"]).world.t2i.refine is None for v in ("f2", "wide"))
