#!/usr/bin/env python3
"""PyTorch side of `gps-seg bench infer --compare`: the prompt-free SAM forward with Meta's own
modules (segment-anything) on the weights and images gps-seg wrote, timed eagerly, and the same
model exported with torch's own ONNX exporter, so that ONNX Runtime can run both graphs.

Input: a safetensors file with checkpoint-named weights (gps-seg's names are Meta's), a raw
little-endian f32 file of N×3×S×S images in [0, 1]. Output: the eager logits as raw f32
(N×1×S×S), torch's ONNX file (input `image`, output `mask_logits`, in-graph normalisation, the
same signature as gps-seg's export) and one JSON line with the timings.

Not a CI dependency; run with the venv holding torch + segment-anything + safetensors, e.g.
    VENV/bin/python scripts/bench_torch_infer.py --model tiny --image-size 256 --batch 4 \
        --weights w.safetensors --images x.f32 --logits-out y.f32 --onnx-out torch.onnx
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_torch import PRESETS, build, forward_prompt_free  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


class PromptFree(torch.nn.Module):
    """image [N,3,S,S] in [0,1] → mask_logits [N,1,S,S] (Meta's modules, no prompt)."""

    def __init__(self, sam):
        super().__init__()
        self.sam = sam

    def forward(self, image):
        return forward_prompt_free(self.sam, image)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--logits-out", required=True)
    ap.add_argument("--onnx-out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    s, n = a.image_size, a.batch

    sam = build(PRESETS[a.model], s).eval()
    state = load_file(a.weights)
    missing, unexpected = sam.load_state_dict(state, strict=False)
    # Meta's module also holds pixel_mean/std buffers, which gps-seg's checkpoints do not.
    missing = [m for m in missing if m not in ("pixel_mean", "pixel_std")]
    if missing or unexpected:
        sys.exit(f"weights do not match Meta's module: missing {missing}, unexpected {unexpected}")
    x = torch.from_numpy(np.fromfile(a.images, dtype="<f4").reshape(n, 3, s, s).copy())
    model = PromptFree(sam).eval()

    rounds = []
    with torch.inference_mode():
        y = model(x)  # warm-up
        for _ in range(max(a.rounds, 1)):
            t0 = time.perf_counter()
            for _ in range(max(a.iters, 1)):
                model(x)
            rounds.append((time.perf_counter() - t0) / max(a.iters, 1))
    y.numpy().astype("<f4").tofile(a.logits_out)

    exporter = None
    if a.onnx_out:
        kw = dict(input_names=["image"], output_names=["mask_logits"], opset_version=17)
        try:
            torch.onnx.export(model, (x,), a.onnx_out, dynamo=False, **kw)
            exporter = "torchscript"
        except Exception as e:  # the TorchScript exporter may be gone in newer torch
            print(f"TorchScript exporter failed ({e}); trying dynamo", file=sys.stderr)
            torch.onnx.export(model, (x,), a.onnx_out, dynamo=True, external_data=False, **kw)
            exporter = "dynamo"

    print(json.dumps({
        "torch_version": torch.__version__.split("+")[0],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "seconds_per_batch": rounds,
        "exporter": exporter,
    }))


if __name__ == "__main__":
    main()
