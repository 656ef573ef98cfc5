"""Pictures of image models: sample grids, the reveal process, inpainting; PNG without dependencies.

    write_png(path, rgb)                 rgb [H, W, 3] uint8
    render(ids, tokenizer)               token rows [B, N] (mask id allowed) -> [B, H, W, 3] uint8
    tile(images, cols)                   [B, H, W, 3] -> one grid image
    sample_grid / trace_strip / inpaint  what `md4 sample` writes for an image model

Masked pixels (any channel still masked) are drawn in MASK_COLOR. Binarized images (V = 2) show
0 as black and 1 as white.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from md4 import guidance
from md4.errors import UserError
from md4.trace import Recorder

MASK_COLOR = (230, 60, 60)
PAD = 2


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an 8-bit RGB image [H, W, 3] as PNG (png_bytes)."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise UserError(f"Cannot write {path}: the folder {path.parent} does not exist.")
    path.write_bytes(png_bytes(rgb))
    return path


def png_bytes(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB image [H, W, 3] as PNG file bytes (filter 0 on every row, zlib level 9)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected [H, W, 3], got {rgb.shape}")
    H, W, _ = rgb.shape
    rows = np.concatenate([np.zeros((H, 1), np.uint8), rgb.reshape(H, W * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)) + chunk(b"IEND", b""))


def render(ids: torch.Tensor | np.ndarray, tokenizer, scale: int = 1) -> np.ndarray:
    """Token rows [B, N] -> RGB images [B, H*scale, W*scale, 3] uint8; masked pixels in MASK_COLOR."""
    x = tokenizer.decode(ids if ids.ndim == 2 else ids[None])  # [B, H, W, C], mask id where masked
    masked = (x == tokenizer.mask_id).any(-1)
    values = np.where(x == tokenizer.mask_id, 0, x) * (255 // (tokenizer.levels - 1))
    rgb = np.repeat(values, 3, axis=-1) if tokenizer.channels == 1 else values[..., :3]
    rgb = np.where(masked[..., None], np.array(MASK_COLOR), rgb).astype(np.uint8)
    return rgb.repeat(scale, axis=1).repeat(scale, axis=2)


def tile(images: np.ndarray, cols: int, pad: int = PAD, fill: int = 255) -> np.ndarray:
    """[B, H, W, 3] -> one [rows*(H+pad)+pad, cols*(W+pad)+pad, 3] grid, row-major."""
    B, H, W, _ = images.shape
    rows = -(-B // cols)
    out = np.full((rows * (H + pad) + pad, cols * (W + pad) + pad, 3), fill, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        out[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = img
    return out


def default_scale(tokenizer) -> int:
    """Enlarge small images so a grid is readable: about 56 pixels a side at least."""
    return max(1, 56 // tokenizer.height)


def sample_grid(model, num: int, path: str | Path, steps: int | None = None, grid: str | None = None,
                labels=None, guidance_weight: float = 0.0, seed: int = 0, cols: int | None = None,
                trace: str | Path | None = None, frames: int = 10, progress: bool = True) -> dict:
    """Sample `num` images (model: md4.Pretrained of an image dataset) and write a PNG grid; with
    `trace`, also a strip per sample of `frames` states from all-masked to done. Returns paths
    and the samples [num, N]."""
    tok = model.tokenizer
    if labels is not None and torch.as_tensor(labels).ndim == 0:
        labels = torch.full((num,), int(labels), dtype=torch.long)
    recorder = Recorder(index=None) if trace else None
    g = torch.Generator(model.device).manual_seed(seed)
    x = model.method.sample(model.denoiser(labels, guidance_weight), num, model.length,
                               steps=steps or model.config.sample.steps, grid=grid or model.config.sample.grid,
                               generator=g, device=model.device, progress=progress, callback=recorder)
    scale = default_scale(tok)
    cols = cols or (10 if labels is not None and num % 10 == 0 else int(np.ceil(np.sqrt(num))))
    out = {"grid": write_png(path, tile(render(x.cpu(), tok, scale), cols)), "samples": x.cpu()}
    if trace:
        states = list(recorder.states)  # all masked, then after every step that changed something
        if not torch.equal(states[-1], x.cpu()):
            states.append(x.cpu())  # the result
        pick = np.unique(np.linspace(0, len(states) - 1, frames).round().astype(int))
        strip = [render(states[i], tok, scale) for i in pick]  # each [num, H, W, 3]
        rows = np.stack(strip, axis=1).reshape(-1, *strip[0].shape[1:])  # sample-major: one row per sample
        out["trace"] = write_png(trace, tile(rows, len(pick)))
        out["trace_steps"] = [int(i) for i in pick]
    return out


REGIONS = ("center", "top", "bottom", "left", "right")


def region_mask(tokenizer, region: str) -> torch.Tensor:
    """[N] bool, True where pixels are KNOWN (kept), False in the region to fill."""
    if region not in REGIONS:
        raise UserError(f"Unknown inpainting region {region!r}; choose one of {', '.join(REGIONS)}.")
    H, W, C = tokenizer.shape
    hole = np.zeros((H, W), bool)
    if region == "center":
        hole[H // 4: H - H // 4, W // 4: W - W // 4] = True
    elif region == "top":
        hole[: H // 2] = True
    elif region == "bottom":
        hole[H // 2:] = True
    elif region == "left":
        hole[:, : W // 2] = True
    else:
        hole[:, W // 2:] = True
    return torch.from_numpy(np.repeat(~hole[..., None], C, axis=-1).reshape(-1))


def inpaint(model, images: torch.Tensor, path: str | Path, region: str = "center", labels=None,
            guidance_weight: float = 0.0, steps: int | None = None, grid: str | None = None, seed: int = 0,
            progress: bool = True) -> dict:
    """Mask `region` of real images [B, N] and fill it; write a PNG whose rows are: original,
    masked input, completion (one column per image). Known pixels are kept exactly."""
    tok = model.tokenizer
    images = images.long().to(model.device)
    keep = region_mask(tok, region).to(model.device).expand_as(images)
    g = torch.Generator(model.device).manual_seed(seed)
    filled = guidance.infill(model.method, model.denoiser(labels, guidance_weight), images, keep,
                             steps=steps or model.config.sample.steps, grid=grid or model.config.sample.grid,
                             generator=g, progress=progress)
    masked = torch.where(keep, images, torch.full_like(images, tok.mask_id))
    scale = default_scale(tok)
    panels = [render(v.cpu(), tok, scale) for v in (images, masked, filled)]
    picture = tile(np.concatenate(panels), len(images))
    return {"inpaint": write_png(path, picture), "completions": filled.cpu(), "known_mask": keep.cpu()}
