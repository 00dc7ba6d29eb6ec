"""Training throughput on this machine: iterations/s and tiles/s at batch 128 for each backbone and input
size of the DPA's paper network (residual18), FLOPs per tile, and the projected wall time of the paper's
progressive schedule. Prints JSON and writes
benchmarks/results/train_<device>.json.

vgg19 runs with RANDOM weights here (timing does not depend on the weights; no download needed).

    .venv/bin/python benchmarks/bench_train.py [--iterations 2] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from wsi_ad.detectors.dpa.config import PAPER_ITERATIONS, DPAConfig
from wsi_ad.detectors.dpa.networks import build_autoencoder
from wsi_ad.detectors.dpa.schedule import phase_loss, progressive_phases
from wsi_ad.features.backbones import build_backbone
from wsi_ad.features.perceptual import PerceptualLoss

SIZES = (16, 32, 64)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations per size (after 1 warm-up)")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    b = args.batch_size
    results = {"device": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "batch_size": b,
               "model": "paper: residual18, 64 px, 4x8x8 bottleneck, 4 channels (configs/camelyon16_paper.yaml)",
               "note": "vgg19 timed with random weights; one training iteration = AE forward/backward + "
                       "backbone forward on input and reconstruction + Adam step", "backbones": {}}
    for name in ("efficientnet_lite0", "vgg19"):
        extractor = build_backbone(name, SIZES, pretrained=(name != "vgg19")).to(device)
        stats = {s: (torch.zeros(extractor(torch.zeros(1, 3, s, s, device=device), s).shape[1]),
                     torch.ones(extractor(torch.zeros(1, 3, s, s, device=device), s).shape[1])) for s in SIZES}
        loss = PerceptualLoss(extractor, stats).to(device)
        paper = DPAConfig()
        model = build_autoencoder(paper.architecture, paper.autoencoder_config()).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        per_size = {}
        for size in SIZES:
            x = torch.rand(b, 3, 64, 64, device=device) * 2 - 1

            def step(model=model, loss=loss, x=x, size=size, opt=opt):
                value = phase_loss(model, loss, x, size, 1.0).mean()
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()

            with FlopCounterMode(display=False) as counter:
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.iterations):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            sec = (time.perf_counter() - t0) / args.iterations
            per_size[size] = {"s_per_iteration": round(sec, 3), "iterations_per_s": round(1 / sec, 3),
                              "tiles_per_s": round(b / sec, 1),
                              "gflops_per_tile_train_step": round(counter.get_total_flops() / b / 1e9, 4)}
        stages = progressive_phases(PAPER_ITERATIONS, 16, 64)
        # transitions run both the new and the previous size's loss: charge the new size plus the halved one
        projected = sum(st.iterations * (per_size[st.size]["s_per_iteration"]
                                         + (per_size[st.size // 2]["s_per_iteration"] * 0.5 if st.kind == "trns" else 0))
                        for st in stages)
        results["backbones"][name] = {"per_input_size": per_size, "paper_schedule_iterations": sum(PAPER_ITERATIONS.values()),
                                      "projected_paper_schedule_hours": round(projected / 3600, 2)}
        print(name, json.dumps(per_size), flush=True)
    text = json.dumps(results, indent=2)
    print(text)
    out = Path(__file__).parent / "results" / f"train_{device.type}.json"
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
