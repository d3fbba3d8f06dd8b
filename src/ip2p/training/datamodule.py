"""Training data: our Parquet dataset or the officially released folder layout, as (input, edited, text).

Both images of a pair get the same augmentation: resize (short side to a size drawn from
[resize_min, resize_max]), random crop to `resolution`, random horizontal flip. Images -> [-1, 1].

Data order is a pure function of (seed, position in the stream): the sampler walks an endless stream
of seeded per-epoch permutations, and every random choice for an item (released seed, crop, flip)
comes from a generator seeded by its stream position. A run resumed at optimizer step s restarts the
stream at s x accumulate x batch_size and therefore sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytorch_lightning as pl
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from ip2p.io.images import decode_dataset_image, pil_to_tensor, resize_short_side, to_rgb
from ip2p.config import first_line
from ip2p.errors import Ip2pError
from ip2p.io.stage import stable_seed
from ip2p.training.latent_cache import LatentCache, NotSquareError, build_latent_cache

log = logging.getLogger(__name__)

PARQUET_COLUMNS = ("id", "pair_id", "input_image", "edited_image", "edit_prompt")
DRAW_UNITS = ("pair", "row")


@dataclass
class Pair:
    input: Image.Image
    edited: Image.Image
    prompt: str
    id: str


# ---------------------------------------------------------------------------------------------------
# Sources: row i -> Pair
# ---------------------------------------------------------------------------------------------------

def load_parquet_split(dataset_dir: str | Path, split: str, cache_dir: str | Path | None, progress: bool = False):
    """<dataset_dir>/<split>/part-*.parquet (the dataset stage's output, read by its own `load_split`)
    -> a memory-mapped `datasets.Dataset` of the four columns training needs, images left undecoded."""
    import datasets

    from ip2p.io.dataset import load_split

    if not progress:
        datasets.disable_progress_bars()
    try:
        ds = load_split(dataset_dir, split, str(cache_dir) if cache_dir else None)
    except Ip2pError:
        raise
    except Exception as err:  # pyarrow/datasets raise many types for a broken or foreign file
        raise Ip2pError(f"cannot read the {split} split of '{dataset_dir}': {first_line(err)}") from err
    ds = ds.select_columns(list(PARQUET_COLUMNS))
    for column in ("input_image", "edited_image"):
        if isinstance(ds.features[column], datasets.Image):
            ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds


class ParquetSource:
    """Rows of our dataset stage's output (artifacts/dataset/<split>/part-*.parquet).

    unit="pair" (the original's dataset): item i is the i-th caption pair and one of its surviving
    candidates is drawn per visit, so every caption pair is seen equally often however many of its
    candidates the filter kept. unit="row": item i is row i (a pair with 4 kept candidates is seen 4x
    as often as one with 1)."""

    def __init__(self, table, unit: str):
        if unit not in DRAW_UNITS:
            raise Ip2pError(f"train.data.draw_by must be one of {', '.join(DRAW_UNITS)} (got '{unit}')")
        self.table = table
        if unit == "row":
            self.groups = [[i] for i in range(len(table))]
        else:
            rows_of: dict[str, list[int]] = {}
            for i, pair_id in enumerate(table["pair_id"]):
                rows_of.setdefault(str(pair_id), []).append(i)
            self.groups = [rows_of[k] for k in sorted(rows_of)]

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def num_rows(self) -> int:
        return len(self.table)

    @cached_property
    def num_pairs(self) -> int:
        """Distinct caption pairs, whichever unit an item is (read once: the run's log and its report ask)."""
        return len(set(self.table["pair_id"]))

    def pick(self, index: int, generator: torch.Generator) -> int:
        """The row visited for item `index` (one draw from `generator` when the pair has several rows)."""
        rows = self.groups[int(index)]
        return rows[int(torch.randint(len(rows), (), generator=generator))] if len(rows) > 1 else rows[0]

    def load(self, index: int, generator: torch.Generator) -> Pair:
        row = self.table[self.pick(index, generator)]
        row_id = str(row["id"])
        return Pair(decode_dataset_image(row["input_image"], "input_image", row_id),
                    decode_dataset_image(row["edited_image"], "edited_image", row_id), str(row["edit_prompt"]), row_id)


def released_entries(root: str | Path, split: str, fractions: tuple[float, float, float]) -> list[tuple[str, list]]:
    """seeds.json of the released dataset, folders sorted, then cut 90/5/5 (train/val/test) like the original
    (`released_split_of`, which `ip2p filter` uses too when it imports the release)."""
    from ip2p.io.dataset import released_split_of

    root = Path(root)
    seeds_file = root / "seeds.json"
    if not seeds_file.is_file():
        raise Ip2pError(f"'{root}' is not a released InstructPix2Pix dataset: seeds.json is missing")
    try:
        entries = json.loads(seeds_file.read_text(encoding="utf-8"))
        entries = sorted(((str(name), list(seeds)) for name, seeds in entries), key=lambda e: e[0])
    except (ValueError, TypeError) as err:
        raise Ip2pError(f"'{seeds_file}' is not a list of [folder, [seeds...]] ({err})") from err
    if abs(sum(fractions) - 1.0) > 1e-6 or len(fractions) != 3:
        raise Ip2pError(f"train.data.released_splits must be three fractions summing to 1 (got {list(fractions)})")
    split_of = released_split_of([name for name, _ in entries], fractions)
    return [e for e in entries if split_of[e[0]] == split and e[1]]


class ReleasedSource:
    """The official layout: <root>/<folder>/prompt.json, {seed}_0.jpg, {seed}_1.jpg; one of the folder's
    seeds drawn per visit (uniformly, as the original)."""

    def __init__(self, root: str | Path, split: str, fractions: tuple[float, float, float]):
        self.root = Path(root)
        self.entries = released_entries(root, split, fractions)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def num_rows(self) -> int:
        return sum(len(seeds) for _, seeds in self.entries)

    @property
    def num_pairs(self) -> int:
        return len(self.entries)

    def load(self, index: int, generator: torch.Generator) -> Pair:
        folder, seeds = self.entries[int(index)]
        seed = seeds[int(torch.randint(len(seeds), (), generator=generator))]
        path = self.root / folder
        try:
            prompt = json.loads((path / "prompt.json").read_text(encoding="utf-8"))["edit"]
        except (OSError, ValueError, KeyError) as err:
            raise Ip2pError(f"released pair '{folder}': cannot read prompt.json ({type(err).__name__})") from err
        images = []
        for suffix in ("0", "1"):
            file = path / f"{seed}_{suffix}.jpg"
            try:
                with Image.open(file) as img:
                    img.load()
                    images.append(to_rgb(img))
            except (OSError, UnidentifiedImageError) as err:
                raise Ip2pError(f"released pair '{folder}': cannot read {file.name} ({type(err).__name__})") from err
        return Pair(images[0], images[1], str(prompt), f"{folder}-{seed}")


# ---------------------------------------------------------------------------------------------------
# Augmentation and the torch Dataset
# ---------------------------------------------------------------------------------------------------

def draw_short_side(generator: torch.Generator, resize_min: int, resize_max: int) -> int:
    return int(torch.randint(resize_min, resize_max + 1, (), generator=generator))


def draw_crop_and_flip(generator: torch.Generator, free_x: int, free_y: int, flip: bool) -> tuple[int, int, bool]:
    """(left, top, mirrored): the draws after the short side, in this order (the latent cache repeats them)."""
    left = int(torch.randint(free_x + 1, (), generator=generator))
    top = int(torch.randint(free_y + 1, (), generator=generator))
    mirrored = flip and float(torch.rand((), generator=generator)) < 0.5
    return left, top, mirrored


def augment_pair(inp: Image.Image, edited: Image.Image, resolution: int, resize_min: int, resize_max: int,
                 flip: bool, generator: torch.Generator | None) -> tuple[Image.Image, Image.Image]:
    """The same resize, crop and flip for both images. generator=None: resize to `resolution`,
    centre crop, no flip (validation)."""
    short = resolution if generator is None else draw_short_side(generator, resize_min, resize_max)
    inp = resize_short_side(inp, short)
    edited = resize_short_side(edited, short, size_of=inp)
    free_x, free_y = inp.width - resolution, inp.height - resolution
    if generator is None:
        left, top, mirrored = free_x // 2, free_y // 2, False
    else:
        left, top, mirrored = draw_crop_and_flip(generator, free_x, free_y, flip)
    box = (left, top, left + resolution, top + resolution)
    inp, edited = inp.crop(box), edited.crop(box)
    if mirrored:
        inp = inp.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        edited = edited.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return inp, edited


class EditPairDataset(Dataset):
    """Key (index, stream position) -> {"input", "edited": [3, R, R] in [-1, 1], "input_ids": [77], ...}."""

    def __init__(self, source, tokenizer, resolution: int, resize_min: int, resize_max: int, flip: bool,
                 augment: bool, seed: int):
        self.source = source
        self.tokenizer = tokenizer
        self.resolution = int(resolution)
        self.resize_min, self.resize_max = int(resize_min), int(resize_max)
        self.flip = bool(flip)
        self.augment = bool(augment)
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.source)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def __getitem__(self, key) -> dict:
        index, position = key if isinstance(key, tuple) else (key, key)
        if self.augment:
            generator = torch.Generator().manual_seed(stable_seed(self.seed, "train-item", position))
        else:  # validation: the same choices at every evaluation
            generator = torch.Generator().manual_seed(stable_seed(self.seed, "val-item", index))
        pair = self.source.load(index, generator)
        inp, edited = augment_pair(pair.input, pair.edited, self.resolution, self.resize_min, self.resize_max,
                                   self.flip, generator if self.augment else None)
        return {"input": pil_to_tensor([inp])[0], "edited": pil_to_tensor([edited])[0],
                "input_ids": self.tokenize([pair.prompt])[0], "prompt": pair.prompt, "id": pair.id,
                "index": int(index), "position": int(position)}


class CachedPairDataset(Dataset):
    """EditPairDataset's items from the latent cache (ip2p.training.latent_cache): the same row and the
    same mirror choice for every key (the same generator draws, in the same order), latents instead of
    images: {"latent_mean", "latent_logvar", "condition": [C, h, w], "text_embeds": [L, D], ...}."""

    def __init__(self, source: "ParquetSource", cache, resize_min: int, resize_max: int, flip: bool, augment: bool,
                 seed: int):
        if len(cache) != len(source.table):
            raise Ip2pError(f"the latent cache holds {len(cache)} rows, the split {len(source.table)}")
        self.source, self.cache = source, cache
        self.resize_min, self.resize_max = int(resize_min), int(resize_max)
        self.flip, self.augment, self.seed = bool(flip), bool(augment), int(seed)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key) -> dict:
        index, position = key if isinstance(key, tuple) else (key, key)
        if self.augment:
            generator = torch.Generator().manual_seed(stable_seed(self.seed, "train-item", position))
        else:
            generator = torch.Generator().manual_seed(stable_seed(self.seed, "val-item", index))
        row = self.source.pick(index, generator)
        mirrored = False
        if self.augment:  # square rows at resize_min = resize_max = resolution: no crop is left to draw
            draw_short_side(generator, self.resize_min, self.resize_max)
            _, _, mirrored = draw_crop_and_flip(generator, 0, 0, self.flip)
        table_row = self.source.table[row]
        return {**self.cache.row(row, mirrored), "prompt": str(table_row["edit_prompt"]), "id": str(table_row["id"]),
                "index": int(index), "position": int(position)}


def cache_problem(data_cfg: Mapping[str, Any]) -> str | None:
    """Why this data cannot train from cached latents (None: it can)."""
    if data_cfg.get("format", "parquet") != "parquet":
        return "the released format trains from images"
    if not int(data_cfg["resize_min"]) == int(data_cfg["resize_max"]) == int(data_cfg["resolution"]):
        return "random resized crops (resize_min, resize_max > resolution) need the images"
    return None


# ---------------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------------

class StreamSampler(Sampler):
    """Endless and resumable. Global stream position k -> epoch k // n, item perm_epoch[k % n], with
    perm_epoch a permutation seeded by (seed, epoch). Rank r of W reads positions r, r + W, r + 2W, ...
    from its local position `start` on. Yields (index, position) keys. No __len__: training runs by steps."""

    def __init__(self, num_items: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        if num_items < 1:
            raise Ip2pError("the training split is empty")
        self.num_items, self.seed = int(num_items), int(seed)
        self.rank, self.world_size, self.start = int(rank), int(world_size), int(start)

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(stable_seed(self.seed, "epoch", epoch))
        return torch.randperm(self.num_items, generator=g)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        local, perm_epoch, perm = self.start, None, None
        while True:
            position = local * self.world_size + self.rank
            epoch, offset = divmod(position, self.num_items)
            if epoch != perm_epoch:
                perm, perm_epoch = self.permutation(epoch), epoch
            yield int(perm[offset]), position
            local += 1


class ShardSampler(Sampler):
    """Validation: items rank, rank + W, ... in order, as (index, index) keys.

    Every rank gets the same number of items (the list wraps around, as DistributedSampler pads):
    a rank without validation batches would skip the synced val/loss reduction and hang the others."""

    def __init__(self, num_items: int, rank: int = 0, world_size: int = 1):
        per_rank = -(-num_items // world_size) if num_items else 0
        padded = [i % num_items for i in range(per_rank * world_size)]
        self.indices = padded[rank::world_size]

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter((i, i) for i in self.indices)


def collate(items: list[dict]) -> dict:
    batch = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], int):
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            batch[key] = values
    return batch


def open_source(data_cfg: Mapping[str, Any], split: str, progress: bool = False):
    """The split's rows (ParquetSource or ReleasedSource) as `train.data` describes them."""
    if data_cfg.get("format", "parquet") == "released":
        return ReleasedSource(Path(data_cfg["dir"]), split, tuple(float(f) for f in data_cfg["released_splits"]))
    return ParquetSource(load_parquet_split(data_cfg["dir"], split, data_cfg.get("cache_dir"), progress),
                         str(data_cfg["draw_by"]))


def check_data(data_cfg: Mapping[str, Any], progress: bool = False) -> None:
    """Open both splits and read the first pair of each: a missing, empty or unreadable dataset fails in
    one line here, before `ip2p train` decides where to resume (which may move checkpoints aside)."""
    fmt = data_cfg.get("format", "parquet")
    if fmt not in ("parquet", "released"):
        raise Ip2pError(f"train.data.format must be parquet or released (got '{fmt}')")
    for split in ("train", "val"):
        source = open_source(data_cfg, split, progress)
        if split == "train" and len(source) == 0:
            raise Ip2pError(f"no training pairs in '{data_cfg['dir']}' (run the filter stage first, "
                            "or set train.data.dir)")
        if len(source):
            source.load(0, torch.Generator().manual_seed(0))  # its own generator: the data order is untouched


# ---------------------------------------------------------------------------------------------------
# LightningDataModule
# ---------------------------------------------------------------------------------------------------

class EditDataModule(pl.LightningDataModule):
    """`data_cfg` is `train.data` (see conf/train/default.yaml)."""

    def __init__(self, data_cfg: Mapping[str, Any], tokenizer, batch_size: int, val_batch_size: int,
                 accumulate_grad_batches: int, seed: int, progress: bool = False, components=None):
        super().__init__()
        self.cfg = dict(data_cfg)
        self.tokenizer = tokenizer
        self.components = components  # VAE and text encoder, for the latent cache
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size)
        self.accumulate = int(accumulate_grad_batches)
        self.seed = int(seed)
        self.progress = bool(progress)
        self.datasets: dict[str, Dataset] = {}
        self.image_datasets: dict[str, EditPairDataset] = {}
        self.cached = self._use_cache()
        fmt = self.cfg.get("format", "parquet")
        if fmt not in ("parquet", "released"):
            raise Ip2pError(f"train.data.format must be parquet or released (got '{fmt}')")
        if int(self.cfg["resize_min"]) < int(self.cfg["resolution"]) or \
                int(self.cfg["resize_max"]) < int(self.cfg["resize_min"]):
            raise Ip2pError("train.data needs resolution <= resize_min <= resize_max "
                            f"(got {self.cfg['resolution']}, {self.cfg['resize_min']}, {self.cfg['resize_max']})")

    def _use_cache(self) -> bool:
        """train.data.cache_latents: true (required), false, or auto (when the data allows it)."""
        wanted = str(self.cfg.get("cache_latents", "false")).lower()
        if wanted not in ("true", "false", "auto"):
            raise Ip2pError(f"train.data.cache_latents must be true, false or auto (got '{wanted}')")
        if wanted == "false":
            return False
        problem = cache_problem(self.cfg)
        if problem and wanted == "true":
            raise Ip2pError(f"train.data.cache_latents=true: {problem}; set it to auto or false")
        if problem:
            log.info("training from images, not cached latents: %s", problem)
        if not problem and self.components is None:
            raise Ip2pError("cached latents need the VAE and text encoder (EditDataModule(components=...))")
        return not problem

    def prepare_data(self) -> None:
        """Once per node: build the memory-mapped arrow cache of the parquet splits."""
        if self.cfg.get("format", "parquet") == "parquet":
            for split in ("train", "val"):
                load_parquet_split(self.cfg["dir"], split, self.cfg.get("cache_dir"), self.progress)

    def _source(self, split: str):
        return open_source(self.cfg, split, self.progress)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        c = self.cfg
        for split in ("train", "val"):
            source = self._source(split)
            self.image_datasets[split] = EditPairDataset(
                source, self.tokenizer, c["resolution"], c["resize_min"], c["resize_max"],
                c["flip"], augment=(split == "train"), seed=self.seed)
            self.datasets[split] = self.image_datasets[split]
            if self.cached and len(source.table):
                self._cache_split(split, source)
        if len(self.datasets["train"]) == 0:
            raise Ip2pError(f"no training pairs in '{self.cfg['dir']}' (run the filter stage first, "
                            "or set train.data.dir)")

    def _cache_split(self, split: str, source: "ParquetSource") -> None:

        c = self.cfg
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        for module in (self.components.vae, self.components.text_encoder):
            module.to(device)  # encode where training runs (the module keeps them there)
        try:
            folder = build_latent_cache(c["latent_cache_dir"], c["dir"], split, source.table, self.components,
                                        int(c["resolution"]), bool(c["flip"]) and split == "train",
                                        int(c.get("cache_batch_size", 32)), str(c.get("cache_dtype", "float32")),
                                        self.progress)
        except NotSquareError as err:
            if str(c.get("cache_latents")).lower() == "true":
                raise
            log.info("training from images, not cached latents: %s", err)
            self.cached = False
            self.datasets = dict(self.image_datasets)
            return
        self.datasets[split] = CachedPairDataset(source, LatentCache(folder), c["resize_min"], c["resize_max"],
                                                 c["flip"], augment=(split == "train"), seed=self.seed)

    @property
    def rows(self) -> dict[str, int]:
        """Kept candidates (dataset rows) per split."""
        return {split: ds.source.num_rows for split, ds in self.datasets.items()}

    @property
    def pairs(self) -> dict[str, int]:
        """Caption pairs per split (with draw_by=pair, the items of one pass)."""
        return {split: ds.source.num_pairs for split, ds in self.datasets.items()}

    def _loader(self, dataset, batch_size: int, sampler) -> DataLoader:
        workers = int(self.cfg.get("num_workers", 0))
        pin = bool(self.trainer is not None and self.trainer.accelerator is not None
                   and type(self.trainer.accelerator).__name__ == "CUDAAccelerator")
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=pin, collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world, step = (trainer.global_rank, trainer.world_size, trainer.global_step) if trainer else (0, 1, 0)
        # Resume: the micro-batches already consumed by this rank, so the stream continues where it stopped.
        start = step * self.accumulate * self.batch_size
        sampler = StreamSampler(len(self.datasets["train"]), self.seed, rank, world, start)
        return self._loader(self.datasets["train"], self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        sampler = ShardSampler(len(self.datasets["val"]), rank, world)
        return self._loader(self.datasets["val"], self.val_batch_size, sampler)

    def fixed_pairs(self, count: int) -> dict | None:
        """The first `count` validation pairs (no augmentation), as one batch: the sample grid's inputs."""
        ds = self.image_datasets.get("val")  # images, also when training reads cached latents
        if ds is None or len(ds) == 0 or count < 1:
            return None
        return collate([ds[(i, i)] for i in range(min(count, len(ds)))])
