"""Every benchmark in one run, ours beside the reference, into one JSON and one markdown table.

  python bench/run_all.py --profile cpu      # the miniature world's models, 64 px (scripts/setup.sh pulls them)
  python bench/run_all.py --profile gpu      # Stable Diffusion 1.5 sizes, random weights, fp16 / bf16

Each script runs in its own process (so one's memory and compiled kernels do not touch the next)
and interleaves ours and its reference round by round; this file only chooses their arguments,
collects their JSON and writes bench/results/all_<machine>_<date>.{json,md} (machine: cpu<cores>, or
the card such as h100). Compare the ratio column across machines, not the seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Runs per profile: label -> (script, its arguments). cpu: what the miniature experiment runs
# (docs/miniature.md), float32 and with the UNet under bfloat16 autocast (`autocast`, the reference
# stays float32); gpu: the paper's sizes (512 px edits and synthesis, 256 px training at batch 32).
MINI_EDIT = ["--preset", "mini", "--resolution", "64", "--steps", "20", "--repeats", "3"]
MINI_SYNTHESIS = ["--preset", "mini", "--steps", "20", "--samples-per-batch", "1", "8", "--variants", "plain",
                  "official", "--repeats", "3"]
MINI_TRAIN = ["--preset", "mini", "--resolution", "64", "--batch-size", "32", "--steps", "3", "--repeats", "3"]
PROFILES = {
    "cpu": {
        "edit_speed": ("edit_speed", MINI_EDIT),
        "edit_speed_bf16": ("edit_speed", [*MINI_EDIT, "--autocast", "bfloat16"]),
        "synthesis_speed": ("synthesis_speed", MINI_SYNTHESIS),
        "synthesis_speed_bf16": ("synthesis_speed", [*MINI_SYNTHESIS, "--autocast", "bfloat16"]),
        "train_speed": ("train_speed", [*MINI_TRAIN, "--precision", "fp32"]),
        "train_speed_bf16": ("train_speed", [*MINI_TRAIN, "--precision", "bf16"]),
    },
    "gpu": {
        "edit_speed": ("edit_speed", ["--preset", "sd15-random", "--dtype", "float16", "--steps", "20", "100"]),
        "synthesis_speed": ("synthesis_speed", ["--preset", "sd15-random", "--dtype", "float16", "--steps", "20",
                                                "--samples-per-batch", "1", "8", "--variants", "plain", "official"]),
        "train_speed": ("train_speed", ["--preset", "sd15-random", "--precision", "bf16", "--resolution", "256",
                                        "--batch-size", "32", "--steps", "10"]),
    },
}


def run_script(name: str, args: list[str], device: str) -> dict:
    """One benchmark script in a fresh process; its JSON document."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        command = [sys.executable, str(HERE / f"{name}.py"), *args, "--device", device, "--out", str(out)]
        print("$", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def ours_note(autocast: str | None) -> str:
    return f", ours under {autocast} autocast" if autocast else ""


def edit_rows(doc: dict) -> list[dict]:
    note = ours_note(doc["ours_speed"].get("autocast"))
    return [{"what": f"edit, {r['steps']} steps ({doc['resolution']} px){note}", "ours_s": r["ours_median_s"],
             "reference_s": r["diffusers_median_s"], "reference": "diffusers StableDiffusionInstructPix2PixPipeline"}
            for r in doc["runs"]]


def synthesis_rows(doc: dict) -> list[dict]:
    timing = next(v for k, v in doc.items() if k.startswith("timing_"))
    rows = []
    for samples in doc["samples_per_batch"]:
        ours, plain = timing.get(f"S{samples}_official"), timing.get(f"S{samples}_plain")
        if ours and plain:
            rows.append({"what": f"P2P synthesis, s per candidate, {samples}/batch, {doc['steps']} steps"
                                 f"{ours_note(doc.get('ours_autocast'))}",
                         "ours_s": ours["s_per_candidate"], "reference_s": plain["s_per_candidate"],
                         "reference": "diffusers StableDiffusionPipeline, same batch, no attention control"})
    return rows


def train_rows(doc: dict) -> list[dict]:
    what = f"training step, batch {doc['batch_size']}, {doc['resolution']} px, {doc['precision']}"
    rows = [{"what": what + ", cached latents", "ours_s": doc["ours_cached_latents"]["step_s_median"],
             "reference_s": doc["ours"]["step_s_median"],
             "reference": "a step that encodes every batch (diffusers' train_instruct_pix2pix.py does)"}]
    rows.append({"what": what + ", cached latents vs the floor", "ours_s": doc["ours_cached_latents"]["step_s_median"],
                 "reference_s": doc["unet_only"]["step_s_median"],
                 "reference": "UNet only: forward, MSE, backward, AdamW on ready latents"})
    return rows


def machine_name(docs: dict) -> str:
    gpu = next((d.get("gpu") for d in docs.values() if d.get("gpu")), None)
    if gpu:
        return gpu
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"


def table(rows: list[dict], machine: str) -> str:
    lines = [f"Measured on {machine}. Ratio = ours / reference (below 1: ours is faster).", "",
             "| what | ours (s) | reference (s) | ratio | reference is |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['ours_s']:.4g} | {r['reference_s']:.4g} | {r['ratio']:.2f} | {r['reference']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    ap.add_argument("--device", default=None, help="default: cuda for the gpu profile, else cpu")
    ap.add_argument("--tag", default=None, help="machine tag in the file names (default: cpu<cores> or the card)")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    args = ap.parse_args()
    device = args.device or ("cuda" if args.profile == "gpu" else "cpu")

    docs = {label: run_script(script, script_args, device) for label, (script, script_args) in PROFILES[args.profile].items()}
    rows = []
    for label, (script, _) in PROFILES[args.profile].items():
        rows += {"edit_speed": edit_rows, "synthesis_speed": synthesis_rows, "train_speed": train_rows}[script](docs[label])
    for r in rows:
        r["ratio"] = r["ours_s"] / r["reference_s"]
    machine = machine_name(docs)
    card = re.search(r"\b([A-Z]\d{2,4})\b", machine)  # "NVIDIA H100 80GB HBM3" -> h100
    tag = args.tag or (card.group(1).lower() if card else f"cpu{os.cpu_count()}")
    stem = Path(args.out_dir) / f"all_{tag}_{datetime.date.today().isoformat()}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    summary = {"machine": machine, "profile": args.profile, "device": device, "rows": rows, "scripts": docs}
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    stem.with_suffix(".md").write_text(table(rows, machine))
    print(table(rows, machine))
    print(f"-> {stem}.json, {stem}.md")


if __name__ == "__main__":
    main()
