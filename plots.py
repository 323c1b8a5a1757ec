"""PNG output with Pillow alone: image grids and small line charts (no matplotlib).

Usage:
    save_grid(images, "samples.png", nrow=10)              # images (n, C, H, W) in [-1, 1]
    plot_panels("curve.png", [{"title": "FID", "series": [{"x": xs, "y": ys}]}])
"""
import torch
from PIL import Image, ImageDraw

import data
import ddp


def save_grid(images: torch.Tensor, path: str, nrow: int, scale: int = 3) -> None:
    """images (n, C, H, W) in [-1, 1] -> a PNG with `nrow` images per row."""
    x = data.to_uint8(images)                                           # (n, C, H, W)
    n, C, H, W = x.shape
    rows = (n + nrow - 1) // nrow
    canvas = torch.full((C, rows * (H + 2) + 2, nrow * (W + 2) + 2), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        canvas[:, 2 + r * (H + 2):2 + r * (H + 2) + H, 2 + col * (W + 2):2 + col * (W + 2) + W] = x[i]
    arr = canvas.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if C == 1 else arr)
    if ddp.DIST.main:                                                 # rank 0 writes in a torchrun job
        img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def plot_panels(path: str, panels: list[dict], title: str = "", size: tuple = (300, 200)) -> None:
    """Line plots drawn with Pillow, one panel each, side by side.

    panel = {"title": str, "series": [{"x": [...], "y": [...], "color": (r, g, b),
             "dashed": bool, "band": (lo list, hi list) or None, "label": str}]}"""
    W, H = size
    ml, mr, mt, mb = 46, 10, 22, 22                                       # margins: left, right, top, bottom
    img = Image.new("RGB", (W * len(panels), H + (18 if title else 0)), "white")
    d = ImageDraw.Draw(img)
    if title:
        d.text((6, 2), title, fill="black")
    for p_i, panel in enumerate(panels):
        ox, oy = p_i * W, 18 if title else 0
        xs = [x for s in panel["series"] for x in s["x"]]
        ys = [y for s in panel["series"] for y in s["y"] if y == y]
        ys += [v for s in panel["series"] if s.get("band") for part in s["band"] for v in part]
        if not xs or not ys:
            continue
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y0, y1 = min(ys), max(ys)
        pad = (y1 - y0) * 0.05 or abs(y0) * 0.05 or 1.0
        y0, y1 = y0 - pad, y1 + pad
        px = lambda x: ox + ml + (x - x0) / (x1 - x0) * (W - ml - mr)
        py = lambda y: oy + mt + (y1 - y) / (y1 - y0) * (H - mt - mb)
        d.rectangle([ox + ml, oy + mt, ox + W - mr, oy + H - mb], outline=(160, 160, 160))
        d.text((ox + ml, oy + 6), panel["title"], fill="black")
        d.text((ox + 2, oy + mt - 4), f"{y1:.3g}", fill=(90, 90, 90))
        d.text((ox + 2, oy + H - mb - 8), f"{y0:.3g}", fill=(90, 90, 90))
        d.text((ox + ml, oy + H - mb + 4), f"{x0:g}", fill=(90, 90, 90))
        d.text((ox + W - mr - 24, oy + H - mb + 4), f"{x1:g}", fill=(90, 90, 90))
        for s in panel["series"]:
            if s.get("band"):
                lo, hi = s["band"]
                poly = [(px(x), py(v)) for x, v in zip(s["x"], hi)] + [(px(x), py(v)) for x, v in reversed(list(zip(s["x"], lo)))]
                d.polygon(poly, fill=tuple(int(255 - (255 - c) * 0.25) for c in s["color"]))
            pts = [(px(x), py(y)) for x, y in zip(s["x"], s["y"]) if y == y]
            for k, (a, b) in enumerate(zip(pts, pts[1:])):
                if not s.get("dashed") or k % 2 == 0:
                    d.line([a, b], fill=s["color"], width=2)
            if len(pts) == 1 or s.get("dashed"):
                for x, y in pts:
                    d.ellipse([x - 2, y - 2, x + 2, y + 2], outline=s["color"])
    if ddp.DIST.main:
        img.save(path)


def plot_training(history: list[dict], path: str, name: str) -> None:
    """The policy stage's curves per iteration: reward, D's accuracy and steps, approx_kl, the residual's size,
    and the training-set Fréchet distance on every network (the FID network, featnet2, the SSL judge)."""
    panels = []
    for key, color in (("reward", (200, 60, 30)), ("d_acc", (30, 90, 200)), ("d_steps", (30, 90, 200)),
                       ("approx_kl", (120, 60, 160)), ("residual_rms", (120, 60, 160)), ("train_fid", (20, 140, 60)),
                       ("train_fid2", (20, 140, 60)), ("train_fd_ssl", (20, 140, 60))):
        pts = [(r["iter"], r[key]) for r in history if key in r]
        panels.append({"title": key, "series": [{"x": [p[0] for p in pts], "y": [p[1] for p in pts], "color": color}]})
    plot_panels(path, panels, title=f"{name}: per PPO iteration (train_fid vs training-set statistics)")
