#!/usr/bin/env python3
"""PyTorch side of `gps-seg bench train --compare`: one SAM training-step benchmark row with
Meta's own modules (segment-anything), printed as one JSON line.

Modes (same loss, shapes and optimiser settings as `src/train/bench.rs`):
- full: every parameter trains, AdamW(lr 1e-4, weight_decay 0.01);
- gps:  the GPS reference implementation's dense masked step: under the `sam` policy
        (`src/gps/policy.rs`) the image encoder's weight matrices (patch embedding, qkv, proj,
        MLP, neck convs) are selected with K = 1 random entry per output row; backward computes
        their dense gradients, which are then zeroed outside the selection; encoder biases,
        the prompt encoder and the mask decoder train fully; norms, pos_embed and rel-pos
        tables are frozen; Adam(lr 1e-4).

Random weights (PyTorch default init), random images and masks. Not a CI dependency; run with
the venv holding torch + segment-anything, e.g.
    /work/venv-sam/bin/python scripts/bench_torch.py --model tiny --batch 4 --mode gps
"""
import argparse
import fnmatch
import json
import os
import resource
import sys
import time
import types
from functools import partial


def _stub(name, **attrs):
    m = types.ModuleType(name)
    m.__path__ = []
    m.__dict__.update(attrs)
    sys.modules.setdefault(name, m)
    return m


# segment_anything/__init__ imports torchvision via the predictor; the modeling code doesn't.
_stub("torchvision")
_stub("torchvision.transforms")
_stub("torchvision.transforms.functional", resize=None, to_pil_image=None)
_stub("torchvision.ops")
_stub("torchvision.ops.boxes", batched_nms=None, box_area=None)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from segment_anything.modeling import (  # noqa: E402
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

# Must equal the presets of src/sam/config.rs.
PRESETS = {
    "tiny": dict(embed=192, depth=6, heads=3, glob=[2, 5], window=8, out=128,
                 dec_mlp=512, dec_heads=4, iou_hidden=128),
    "vit_b": dict(embed=768, depth=12, heads=12, glob=[2, 5, 8, 11], window=14, out=256,
                  dec_mlp=2048, dec_heads=8, iou_hidden=256),
    "vit_l": dict(embed=1024, depth=24, heads=16, glob=[5, 11, 17, 23], window=14, out=256,
                  dec_mlp=2048, dec_heads=8, iou_hidden=256),
}

SELECTED = ["patch_embed.proj.weight", "blocks.*.attn.qkv.weight", "blocks.*.attn.proj.weight",
            "blocks.*.mlp.lin1.weight", "blocks.*.mlp.lin2.weight", "neck.0.weight",
            "neck.2.weight"]
FROZEN = ["*norm*", "neck.1.*", "neck.3.*", "pos_embed", "*rel_pos*"]


def build(p, size):
    g = size // 16
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=p["depth"], embed_dim=p["embed"], img_size=size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=p["heads"],
            patch_size=16, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=p["glob"], window_size=p["window"], out_chans=p["out"]),
        prompt_encoder=PromptEncoder(
            embed_dim=p["out"], image_embedding_size=(g, g),
            input_image_size=(size, size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=p["out"],
                                          mlp_dim=p["dec_mlp"], num_heads=p["dec_heads"]),
            transformer_dim=p["out"], iou_head_depth=3, iou_head_hidden_dim=p["iou_hidden"]),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def forward_prompt_free(sam, images01):
    s = images01.shape[-1]
    x = (images01 * 255.0 - sam.pixel_mean) / sam.pixel_std
    emb = sam.image_encoder(x)
    pe = sam.prompt_encoder.get_dense_pe()
    _, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
    sp = torch.empty((1, 0, emb.shape[1]))
    # Meta's decoder takes one image per call.
    low = torch.cat([sam.mask_decoder(emb[i:i + 1], pe, sp, dense, multimask_output=False)[0]
                     for i in range(emb.shape[0])])
    return F.interpolate(low, (s, s), mode="bilinear", align_corners=False)


def gps_roles(sam, gen):
    """(trainable params, {param: mask}) under the sam policy with K = 1 random per row."""
    params, masks = [], {}
    for name, p in sam.named_parameters():
        if name.startswith("image_encoder."):
            n = name[len("image_encoder."):]
            if any(fnmatch.fnmatchcase(n, pat) for pat in SELECTED):
                rows = p.shape[0]
                cols = p[0].numel()
                m = torch.zeros(rows, cols)
                m[torch.arange(rows), torch.randint(cols, (rows,), generator=gen)] = 1.0
                masks[p] = m.reshape(p.shape)
                params.append(p)
            elif any(fnmatch.fnmatchcase(n, pat) for pat in FROZEN):
                p.requires_grad_(False)
            elif n.endswith(".bias"):
                params.append(p)
            else:
                p.requires_grad_(False)
        else:
            params.append(p)
    return params, masks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--mode", default="gps", choices=["full", "gps"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    sam = build(PRESETS[a.model], a.image_size).train()
    total = sum(p.numel() for p in sam.parameters())
    if a.mode == "full":
        params, masks = list(sam.parameters()), {}
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
        trainable = total
    else:
        params, masks = gps_roles(sam, gen)
        opt = torch.optim.Adam(params, lr=1e-4)
        trainable = sum(int(m.sum()) for m in masks.values()) + sum(
            p.numel() for p in params if p not in masks)
    s = a.image_size
    x = torch.rand((a.batch, 3, s, s), generator=gen)
    t = (torch.rand((a.batch, 1, s, s), generator=gen) < 0.3).float()

    def step():
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        y = forward_prompt_free(sam, x)
        loss = F.binary_cross_entropy_with_logits(y, t)
        loss.backward()
        for p, m in masks.items():
            p.grad.mul_(m)
        opt.step()
        return (time.perf_counter() - t0) * 1e3, loss.item()

    step()  # warm-up
    ms, last = [], None
    for _ in range(max(1, a.iters)):
        dt, last = step()
        ms.append(dt)
    print(json.dumps(dict(
        torch_version=torch.__version__.split("+")[0],
        threads=torch.get_num_threads(),
        step_ms=ms,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        trainable=trainable,
        total=total,
        last_loss=last,
        pid=os.getpid(),
    )))


if __name__ == "__main__":
    main()
