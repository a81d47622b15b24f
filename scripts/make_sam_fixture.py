#!/usr/bin/env python3
"""Make the SAM parity fixture `tests/fixtures/sam_tiny/` with Meta's own modules.

Run by hand (not in CI). Needs PyPI `torch`, `segment-anything` and `safetensors` in a venv
OUTSIDE the repository, e.g.:

    python3 -m venv /work/venv-sam
    /work/venv-sam/bin/pip install torch segment-anything safetensors numpy
    /work/venv-sam/bin/python scripts/make_sam_fixture.py

It builds SAM with the *tiny* preset of `src/sam/config.rs` from Meta's `ImageEncoderViT`,
`PromptEncoder`, `MaskDecoder` and `TwoWayTransformer` (the exact arguments `build_sam.py`
passes, with tiny numbers), fills every tensor with seeded non-trivial random values (normal
std 0.02-0.1, LayerNorm weights around 1, rel-pos tables non-zero), rounds them to f16 so the
file is small (both sides then compute in f32 from the same values), and writes:

- `weights.safetensors`  the state dict under official key names (f16);
- `io.safetensors`       inputs and Meta's outputs (f32):
    images        [2, 3, 256, 256] in [0, 1] (stored as f16)
    embeddings    image_encoder(preprocess(images))               [2, 128, 16, 16]
    low_res       prompt-free single-mask logits                  [2, 1, 64, 64]
    upsampled     low_res bilinearly resized to 256               [2, 1, 256, 256]
    point_coords  [2, 2, 2] input pixels, point_labels [2, 2], boxes [2, 4] xyxy
    prompted_masks [2, 3, 64, 64], prompted_iou [2, 3]  (2 points + 1 box, multimask,
                  one image per decoder call as Meta's decoder requires)
"""
import os
import sys
import types
from functools import partial

import torch
import torch.nn.functional as F

# segment_anything/__init__.py imports the predictor, which imports torchvision for image
# resizing; the modeling code does not need it. Stub it so torchvision is not required.
def _stub(name, **attrs):
    m = types.ModuleType(name)
    m.__path__ = []  # a package, so submodules can be imported
    m.__dict__.update(attrs)
    sys.modules.setdefault(name, m)
    return m


_stub("torchvision")
_stub("torchvision.transforms")
_stub("torchvision.transforms.functional", resize=None, to_pil_image=None)
_stub("torchvision.ops")
_stub("torchvision.ops.boxes", batched_nms=None, box_area=None)

from safetensors.torch import save_file  # noqa: E402
from segment_anything.modeling import (  # noqa: E402
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

# Must equal SamConfig::tiny() in src/sam/config.rs.
TINY = dict(
    image_size=256,
    patch_size=16,
    encoder_embed_dim=192,
    encoder_depth=6,
    encoder_num_heads=3,
    encoder_global_attn_indexes=[2, 5],
    window_size=8,
    prompt_embed_dim=128,
    mask_in_chans=16,
    decoder_depth=2,
    decoder_mlp_dim=512,
    decoder_num_heads=4,
    num_multimask_outputs=3,
    iou_head_depth=3,
    iou_head_hidden_dim=128,
)


def build_tiny(c):
    g = c["image_size"] // c["patch_size"]
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=c["encoder_depth"],
            embed_dim=c["encoder_embed_dim"],
            img_size=c["image_size"],
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=c["encoder_num_heads"],
            patch_size=c["patch_size"],
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=c["encoder_global_attn_indexes"],
            window_size=c["window_size"],
            out_chans=c["prompt_embed_dim"],
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=c["prompt_embed_dim"],
            image_embedding_size=(g, g),
            input_image_size=(c["image_size"], c["image_size"]),
            mask_in_chans=c["mask_in_chans"],
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=c["num_multimask_outputs"],
            transformer=TwoWayTransformer(
                depth=c["decoder_depth"],
                embedding_dim=c["prompt_embed_dim"],
                mlp_dim=c["decoder_mlp_dim"],
                num_heads=c["decoder_num_heads"],
            ),
            transformer_dim=c["prompt_embed_dim"],
            iou_head_depth=c["iou_head_depth"],
            iou_head_hidden_dim=c["iou_head_hidden_dim"],
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def randomise(model, gen):
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("norm1.weight") or ".norm" in name and name.endswith(".weight") \
                    or name.endswith(("neck.1.weight", "neck.3.weight", "output_upscaling.1.weight",
                                      "mask_downscaling.1.weight", "mask_downscaling.4.weight")):
                v = 1.0 + 0.1 * torch.randn(t.shape, generator=gen)
            elif "positional_encoding_gaussian_matrix" in name:
                v = torch.randn(t.shape, generator=gen)
            elif name.endswith("bias"):
                v = 0.02 * torch.randn(t.shape, generator=gen)
            elif "embed" in name and t.dim() == 2 or "tokens" in name:
                v = 0.5 * torch.randn(t.shape, generator=gen)
            else:
                fan_in = t[0].numel() if t.dim() > 1 else t.numel()
                std = min(0.1, max(0.02, 1.0 / fan_in ** 0.5))
                v = std * torch.randn(t.shape, generator=gen)
            # f16-exact values: the fixture is stored in f16, both sides compute in f32.
            t.copy_(v.half().float())


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = os.path.join(root, "tests", "fixtures", "sam_tiny")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234)
    sam = build_tiny(TINY).eval()
    randomise(sam, gen)
    sd = {k: v.contiguous() for k, v in sam.state_dict().items()}
    s = TINY["image_size"]
    images = torch.rand((2, 3, s, s), generator=gen).half().float()
    coords = torch.tensor([[[60.0, 80.0], [200.0, 150.0]], [[30.0, 220.0], [128.0, 128.0]]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    boxes = torch.tensor([[40.0, 50.0, 210.0, 190.0], [10.0, 100.0, 250.0, 240.0]])
    with torch.no_grad():
        x = (images * 255.0 - sam.pixel_mean) / sam.pixel_std
        emb = sam.image_encoder(x)
        pe = sam.prompt_encoder.get_dense_pe()
        # Prompt-free: no sparse prompts, dense = no_mask_embed, single-mask output.
        sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
        low = []
        pm, pi = [], []
        for i in range(2):
            sp = torch.empty((1, 0, TINY["prompt_embed_dim"]))
            m, _ = sam.mask_decoder(emb[i : i + 1], pe, sp, dense, multimask_output=False)
            low.append(m)
            sp, dn = sam.prompt_encoder(
                points=(coords[i : i + 1], labels[i : i + 1]), boxes=boxes[i : i + 1], masks=None
            )
            m, iou = sam.mask_decoder(emb[i : i + 1], pe, sp, dn, multimask_output=True)
            pm.append(m)
            pi.append(iou)
        low = torch.cat(low)
        up = F.interpolate(low, (s, s), mode="bilinear", align_corners=False)
    save_file({k: v.half() for k, v in sd.items()}, os.path.join(out, "weights.safetensors"))
    io = {
        "images": images,
        "embeddings": emb,
        "low_res": low,
        "upsampled": up,
        "point_coords": coords,
        "point_labels": labels,
        "boxes": boxes,
        "prompted_masks": torch.cat(pm),
        "prompted_iou": torch.cat(pi),
    }
    io = {k: v.contiguous().float() for k, v in io.items()}
    io["images"] = io["images"].half()  # f16-exact already; halves the file
    save_file(io, os.path.join(out, "io.safetensors"))
    n = sum(p.numel() for p in sam.parameters())
    print(f"torch {torch.__version__}; tiny SAM parameters(): {n}")
    for k, v in io.items():
        print(f"{k:16s} {list(v.shape)}  max|x| {v.abs().max().item():.4f}")


if __name__ == "__main__":
    main()
