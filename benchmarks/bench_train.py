"""Side-by-side training benchmark: our Trainer against the plain loop every peer starts from.

The reference loop is the diffusers DreamBooth example's: VAE-encode and text-encode every step, AdamW, plain MSE,
`zero_grad(set_to_none=True)`, frozen parts in the mixed-precision dtype. Both run on the same model weights,
images, captions, resolution, batch, optimizer, precision and seed, each in its own process (so peak RSS is its
own), alternating ours / reference in one invocation.

    python benchmarks/bench_train.py --preset tiny       # CI smoke check, seconds
    python benchmarks/bench_train.py --preset cpu-real   # real SD1.5 architecture, random weights, 512 px
    python benchmarks/bench_train.py --preset cuda       # adds SDXL 1024 LoRA; needs a GPU

Reported per case: median seconds per optimizer step after warm-up, time from process start to the first
finished step, peak RSS (and peak VRAM on CUDA), and ours / reference ratios. `--results FILE` appends the table
with date, machine, command and dependency versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Case:
    name: str
    family: str
    real: bool  # real architecture (random weights) rather than the tiny test model
    method: str  # 'lora' or 'dreambooth'
    resolution: int
    steps: int
    warmup: int = 1
    lora_rank: int = 4
    precision: str = "bf16"
    device: str = "cpu"


PRESETS: dict[str, list[Case]] = {
    "tiny": [Case("tiny-sd1-lora", "sd1", False, "lora", 64, 6, lora_rank=4),
             Case("tiny-sd1-dreambooth", "sd1", False, "dreambooth", 64, 6)],
    "cpu-real": [Case("sd15-512-lora-r4", "sd1", True, "lora", 512, 4),
                 Case("sd15-512-dreambooth", "sd1", True, "dreambooth", 512, 4)],
    "cuda": [Case("sd15-512-dreambooth-cuda", "sd1", True, "dreambooth", 512, 20, warmup=3, device="cuda"),
             Case("sdxl-1024-lora-cuda", "sdxl", True, "lora", 1024, 20, warmup=3, device="cuda")],
}

CAPTION = "photo of sks dog"
LEARNING_RATE = {"lora": 1e-4, "dreambooth": 2e-6}


@dataclass
class RunResult:
    step_times: list[float] = field(default_factory=list)
    first_step_s: float = 0.0
    peak_rss_gib: float = 0.0
    peak_vram_gib: float | None = None


# --- shared setup ----------------------------------------------------------------------------------

def build_components(case: Case) -> Any:
    from dreambooth.models.loading import shipped_configs
    from dreambooth.models.tiny import build_models, tiny_components

    if not case.real:
        return tiny_components(case.family, seed=0)
    import torch

    from dreambooth.models.components import Components, make_noise_scheduler
    from dreambooth.models.tokenizer import load_clip_tokenizer

    torch.manual_seed(0)
    unet, vae, encoders = build_models(shipped_configs(case.family))
    pads = ["<|endoftext|>"] if case.family == "sd1" else ["<|endoftext|>", "!"]
    scheduler = make_noise_scheduler(case.family)
    return Components(family=case.family, unet=unet, vae=vae, text_encoders=encoders,
                      tokenizers=[load_clip_tokenizer(p) for p in pads[:len(encoders)]],
                      noise_scheduler=scheduler, prediction_type=scheduler.config.prediction_type)


def write_images(folder: Path, resolution: int, count: int = 4) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text(CAPTION)


def prepare(case: Case, workdir: Path) -> Path:
    """Create the model folder and images both contenders train on; returns the data root."""
    from dreambooth.config import Concept, TrainingConfig
    from dreambooth.models.components import save_components
    from dreambooth.store import Layout, ModelStore

    layout = Layout.under(workdir / "models").ensure()
    model = ModelStore(layout).model("bench")
    save_components(build_components(case), model.working)
    write_images(workdir / "images", case.resolution)
    config = TrainingConfig(
        model_family=case.family, method=case.method, max_train_steps=case.steps, train_batch_size=1,
        learning_rate=LEARNING_RATE[case.method], lr_scheduler="constant", optimizer="adamw",
        mixed_precision=case.precision, train_text_encoder=False, with_prior_preservation=False,
        resolution=case.resolution, enable_bucketing=False, lora_rank=case.lora_rank,
        lora_alpha=float(case.lora_rank), save_on_end=False, log_every_n_steps=1, seed=0,
        concepts=[Concept(instance_data_dir=str(workdir / "images"), instance_prompt=CAPTION)])
    model.save_config(config)
    return workdir


# --- the reference loop (what the diffusers DreamBooth / LoRA examples do) ------------------------

def reference_run(case: Case, workdir: Path, on_step: Any) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from dreambooth.models.components import load_components

    device = torch.device(case.device)
    weight_dtype = torch.bfloat16 if case.precision == "bf16" else torch.float32
    parts = load_components(workdir / "models" / "dreambooth" / "bench" / "working")
    unet, vae, text_encoder, tokenizer = parts.unet, parts.vae, parts.text_encoders[0], parts.tokenizers[0]
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    vae.to(device, weight_dtype)
    text_encoder.to(device, weight_dtype)
    if case.method == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.to(device, weight_dtype)
        unet.add_adapter(LoraConfig(r=case.lora_rank, lora_alpha=case.lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        for param in unet.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    else:
        unet.to(device)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE[case.method], weight_decay=1e-2)
    scheduler = parts.noise_scheduler
    images = sorted((workdir / "images").glob("*.png"))
    torch.manual_seed(0)
    unet.train()
    for step in range(case.steps):
        image = Image.open(images[step % len(images)]).convert("RGB")
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        with torch.autocast(device.type, dtype=weight_dtype, enabled=case.precision != "no"):
            latents = vae.encode(pixels.to(device, weight_dtype)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            ids = tokenizer(CAPTION, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(device)
            hidden = text_encoder(ids)[0]
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (1,), device=device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            prediction = unet(noisy, timesteps, hidden).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        on_step(step, float(loss))


# --- ours -------------------------------------------------------------------------------------------

def ours_run(case: Case, workdir: Path, on_step: Any) -> None:
    from dreambooth.config import load
    from dreambooth.host.embedded import EmbeddedHost
    from dreambooth.store import Layout
    from dreambooth.train.events import TrainCallbacks
    from dreambooth.train.trainer import Trainer

    layout = Layout.under(workdir / "models")
    config = load(layout.dreambooth_dir / "bench" / "db_config.json")

    class StepClock(TrainCallbacks):
        def on_progress(self, progress: Any) -> None:
            on_step(progress.step, None)

    Trainer(config, EmbeddedHost(layout), StepClock(), None).run()


# --- worker / parent --------------------------------------------------------------------------------

def worker(kind: str, case: Case, workdir: Path, started: float) -> RunResult:
    import torch

    result = RunResult()
    last = [time.time()]

    def on_step(step: int, loss: float | None) -> None:
        now = time.time()
        if not result.first_step_s:
            result.first_step_s = now - started
        else:
            result.step_times.append(now - last[0])
        last[0] = now

    torch.set_num_threads(os.cpu_count() or 1)
    (reference_run if kind == "ref" else ours_run)(case, workdir, on_step)
    result.step_times = result.step_times[max(case.warmup - 1, 0):]
    result.peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if torch.cuda.is_available():
        result.peak_vram_gib = torch.cuda.max_memory_allocated() / 2**30
    return result


def run_worker(kind: str, case: Case, workdir: Path) -> RunResult:
    started = time.time()
    command = [sys.executable, __file__, "--worker", kind, "--case", json.dumps(asdict(case)),
               "--workdir", str(workdir), "--started", repr(started)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return RunResult(**json.loads(output.strip().splitlines()[-1]))


def summarise(case: Case, runs: dict[str, list[RunResult]]) -> dict[str, Any]:
    def median_of(kind: str, attr: str) -> float:
        values = [getattr(r, attr) for r in runs[kind]]
        return statistics.median(values)

    step = {k: statistics.median([t for r in runs[k] for t in r.step_times]) for k in runs}
    row = {"case": case.name, "ours_s_step": step["ours"], "ref_s_step": step["ref"],
           "step_ratio": step["ours"] / step["ref"],
           "ours_first_s": median_of("ours", "first_step_s"), "ref_first_s": median_of("ref", "first_step_s"),
           "ours_rss_gib": median_of("ours", "peak_rss_gib"), "ref_rss_gib": median_of("ref", "peak_rss_gib")}
    row["first_ratio"] = row["ours_first_s"] / row["ref_first_s"]
    if runs["ours"][0].peak_vram_gib is not None:
        row["ours_vram_gib"] = median_of("ours", "peak_vram_gib")
        row["ref_vram_gib"] = median_of("ref", "peak_vram_gib")
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| case | ours s/step | ref s/step | ratio | ours first step s | ref first step s | ratio "
            "| ours peak RSS GiB | ref peak RSS GiB |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['case']} | {r['ours_s_step']:.3f} | {r['ref_s_step']:.3f} | {r['step_ratio']:.2f} "
                     f"| {r['ours_first_s']:.1f} | {r['ref_first_s']:.1f} | {r['first_ratio']:.2f} "
                     f"| {r['ours_rss_gib']:.2f} | {r['ref_rss_gib']:.2f} |")
    return "\n".join(lines)


def versions() -> str:
    from importlib.metadata import version

    names = ("torch", "diffusers", "transformers", "accelerate", "peft")
    return ", ".join(f"{n} {version(n)}" for n in names)


def append_results(path: Path, preset: str, text: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.system()}"
    block = (f"\n## {stamp}: preset {preset}\n\nMachine: {machine}. Versions: {versions()}.\n"
             f"Command: `python benchmarks/bench_train.py --preset {preset}`\n\n{text}\n")
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(block)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--repeats", type=int, default=1, help="alternating ours/reference pairs per case")
    parser.add_argument("--results", type=Path, help="append the table to this Markdown file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = worker(args.worker, Case(**json.loads(args.case)), Path(args.workdir), args.started)
        print(json.dumps(asdict(result)))
        return 0
    rows = []
    for case in PRESETS[args.preset]:
        with tempfile.TemporaryDirectory(prefix="db-bench-") as tmp:
            workdir = prepare(case, Path(tmp))
            runs: dict[str, list[RunResult]] = {"ours": [], "ref": []}
            for _ in range(args.repeats):
                for kind in ("ref", "ours"):
                    runs[kind].append(run_worker(kind, case, workdir))
            rows.append(summarise(case, runs))
            print(table(rows[-1:]), flush=True)
    text = table(rows)
    print("\n" + text)
    if args.results:
        append_results(args.results, args.preset, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
