"""Networks F(m, t[, cond]) for AGM training: a residual MLP for vectors and a compact UNet for images.

Both take the phase state m = [x | v] (docs/math.md §1.1: [B, 2D] or [B, 2C, H, W]), the time t in [0, 1)
as a [B] tensor (or a 0-dim tensor / float, broadcast over the batch) and optional class labels
cond (long [B]), and return F with x's shape ([B, D] or [B, C, H, W]) in normalized units.
With num_classes set, the class embedding has one extra "null" class (index num_classes) that
cond=None selects, so a class-conditional model also samples unconditionally (classifier-free
style; training drops labels to num_classes now and then). The output layer starts at zero, so a
fresh model returns F = 0. Parameters are float32; both models run under torch.autocast.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F_

from . import checks

_MAX_PERIOD = 10_000.0
_TIME_SCALE = 1000.0


def _check_num_classes(num_classes: object) -> int | None:
    return None if num_classes is None else checks.count("num_classes", num_classes, 1)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of t (scaled by 1000), [B] -> [B, dim] float32: cos and sin at
    dim // 2 log-spaced frequencies from 1 to 1/10000 (an odd dim gets a zero last column).
    """
    half = dim // 2
    steps = torch.arange(half, device=t.device, dtype=torch.float32) / half
    freqs = torch.exp(-math.log(_MAX_PERIOD) * steps)
    angles = _TIME_SCALE * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    return F_.pad(emb, (0, dim - 2 * half))


def _batch_time(t: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """t as a float32 [batch] tensor on `device` (a 0-dim t or float is broadcast)."""
    if not isinstance(t, torch.Tensor):
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"t must be a tensor or a float, got {type(t).__name__}")
        t = torch.tensor(float(t))
    if not t.is_floating_point():
        raise TypeError(f"t must be a float tensor, got dtype {t.dtype}")
    if t.dim() == 0:
        t = t.expand(batch)
    if tuple(t.shape) != (batch,):
        raise ValueError(f"t must have shape [{batch}] (one time per row) or be 0-dim, got {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.float32)


def _class_index(cond: torch.Tensor | None, num_classes: int | None, batch: int,
                 device: torch.device) -> torch.Tensor | None:
    """Labels long [batch] for the class embedding (None -> the null class num_classes)."""
    if num_classes is None:
        if cond is not None:
            raise ValueError("cond must be None for a model built without num_classes")
        return None
    if cond is None:
        return torch.full((batch,), num_classes, dtype=torch.long, device=device)
    if not isinstance(cond, torch.Tensor) or cond.is_floating_point() or cond.dtype == torch.bool:
        raise TypeError(f"cond must be an integer tensor of labels in 0..{num_classes} or None, got "
                        f"{cond.dtype if isinstance(cond, torch.Tensor) else type(cond).__name__}")
    if tuple(cond.shape) != (batch,):
        raise ValueError(f"cond must have shape [{batch}], got {tuple(cond.shape)}")
    return cond.to(device=device, dtype=torch.long)


class _MLPBlock(nn.Module):
    """h + Linear(SiLU(Linear(SiLU(LayerNorm(h))) + emb))."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        z = self.fc1(F_.silu(self.norm(h))) + emb
        return h + self.fc2(F_.silu(z))


def _conditioning(net: nn.Module, t: torch.Tensor | float, cond: torch.Tensor | None, m: torch.Tensor,
                  dim: int) -> torch.Tensor:
    """The per-sample embedding of a model: net.time(sinusoidal t of width dim), plus
    net.label(class) when the model has classes (cond None -> the null class)."""
    batch = m.shape[0]
    emb = net.time(timestep_embedding(_batch_time(t, batch, m.device), dim))
    labels = _class_index(cond, net.num_classes, batch, m.device)
    return emb if labels is None else emb + net.label(labels)


class ResMLP(nn.Module):
    """Residual MLP for vector data: m [B, 2 dim], t [B] -> F [B, dim].

    Args: dim (D, the data dimension), hidden (width), depth (residual blocks), time_dim (size of
    the sinusoidal time embedding), num_classes (None: unconditional).
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 4, time_dim: int = 64,
                 num_classes: int | None = None) -> None:
        super().__init__()
        self.dim = checks.count("dim", dim, 1)
        hidden, depth = checks.count("hidden", hidden, 1), checks.count("depth", depth, 1)
        self.time_dim = checks.count("time_dim", time_dim, 2)
        self.num_classes = _check_num_classes(num_classes)
        self.x_shape = (self.dim,)
        self.inp = nn.Linear(2 * self.dim, hidden)
        self.time = nn.Sequential(nn.Linear(self.time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label = None if self.num_classes is None else nn.Embedding(self.num_classes + 1, hidden)
        self.blocks = nn.ModuleList(_MLPBlock(hidden) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, self.dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, m: torch.Tensor, t: torch.Tensor | float,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.shape[1] != 2 * self.dim:
            raise ValueError(f"m must have shape [B, {2 * self.dim}] (= [x | v]), got "
                             f"{tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__}")
        emb = _conditioning(self, t, cond, m, self.time_dim)
        h = self.inp(m.float())
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F_.silu(self.out_norm(h)))


def _groups(channels: int) -> int:
    """GroupNorm groups: the largest of 8, 4, 2, 1 dividing `channels`."""
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + time/class embedding, GroupNorm-SiLU-dropout-conv, plus a (1x1) skip."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        z = self.conv1(F_.silu(self.norm1(h))) + self.emb(emb)[:, :, None, None]
        z = self.conv2(self.drop(F_.silu(self.norm2(z))))
        return self.skip(h) + z


class UNet(nn.Module):
    """Compact UNet for images: m [B, 2C, H, W], t [B] -> F [B, C, H, W].

    Args: channels (C), base (channels at full resolution), mults (per-level channel multipliers;
    each level after the first halves H and W, so H and W must be divisible by 2^(len(mults) - 1)),
    num_res (residual blocks per level on the way down; one more on the way up), num_classes
    (None: unconditional), dropout (inside the residual blocks).
    """

    def __init__(self, channels: int, base: int = 32, mults: tuple[int, ...] = (1, 2), num_res: int = 1,
                 num_classes: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.channels, base = checks.count("channels", channels, 1), checks.count("base", base, 1)
        num_res = checks.count("num_res", num_res, 1)
        mults = tuple(mults) if isinstance(mults, (tuple, list)) else mults
        if not isinstance(mults, tuple) or not mults or not all(
                isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in mults):
            raise ValueError(f"mults must be a non-empty tuple of positive ints, got {mults!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        self.num_classes = _check_num_classes(num_classes)
        self.mults, self.base = mults, base
        emb_dim = 4 * base
        self.time = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label = None if self.num_classes is None else nn.Embedding(self.num_classes + 1, emb_dim)
        self.inp = nn.Conv2d(2 * self.channels, base, 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips, ch = [base], base
        for level, mult in enumerate(mults):
            for _ in range(num_res):
                self.down.append(_ResBlock(ch, base * mult, emb_dim, dropout))
                ch = base * mult
                skips.append(ch)
            if level < len(mults) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid = nn.ModuleList([_ResBlock(ch, ch, emb_dim, dropout), _ResBlock(ch, ch, emb_dim, dropout)])
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for _ in range(num_res + 1):
                self.up.append(_ResBlock(ch + skips.pop(), base * mult, emb_dim, dropout))
                ch = base * mult
            if level > 0:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.num_res = num_res
        self.out_norm = nn.GroupNorm(_groups(ch), ch)
        self.out = nn.Conv2d(ch, self.channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, m: torch.Tensor, t: torch.Tensor | float,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        factor = 2 ** (len(self.mults) - 1)
        if not isinstance(m, torch.Tensor) or m.dim() != 4 or m.shape[1] != 2 * self.channels:
            raise ValueError(f"m must have shape [B, {2 * self.channels}, H, W] (= [x | v]), got "
                             f"{tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__}")
        if m.shape[2] % factor or m.shape[3] % factor:
            raise ValueError(f"m's H and W must be divisible by {factor} (mults={self.mults}), got "
                             f"{tuple(m.shape[2:])}")
        emb = _conditioning(self, t, cond, m, self.base)
        h = self.inp(m.float())
        hs = [h]
        blocks = iter(self.down)
        for level in range(len(self.mults)):
            for _ in range(self.num_res):
                h = next(blocks)(h, emb)
                hs.append(h)
            if level < len(self.mults) - 1:
                h = self.downsample[level](h)
                hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        blocks = iter(self.up)
        for i, level in enumerate(reversed(range(len(self.mults)))):
            for _ in range(self.num_res + 1):
                h = next(blocks)(torch.cat([h, hs.pop()], dim=1), emb)
            if level > 0:
                h = self.upsample[i](F_.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(F_.silu(self.out_norm(h)))


def make_model(name: str, x_shape: tuple[int, ...], num_classes: int | None = None, **kwargs) -> nn.Module:
    """The network for data of shape x_shape: "mlp" (x_shape (D,)), "unet" (x_shape (C, H, W)) or
    "auto" (mlp for 1-D, unet for 3-D). kwargs go to ResMLP / UNet; the UNet's mults default to
    (1, 2) for H, W <= 16 and (1, 2, 2) above.
    """
    if not isinstance(x_shape, (tuple, list, torch.Size)) or not x_shape or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in x_shape):
        raise ValueError(f"x_shape must be a non-empty tuple of positive ints, got {x_shape!r}")
    x_shape = tuple(x_shape)
    if name == "auto":
        if len(x_shape) not in (1, 3):
            raise ValueError(f"model 'auto' needs x_shape (D,) or (C, H, W), got {x_shape}")
        name = "mlp" if len(x_shape) == 1 else "unet"
    if name == "mlp":
        if len(x_shape) != 1:
            raise ValueError(f"model 'mlp' needs x_shape (D,), got {x_shape}")
        return ResMLP(x_shape[0], num_classes=num_classes, **kwargs)
    if name == "unet":
        if len(x_shape) != 3:
            raise ValueError(f"model 'unet' needs x_shape (C, H, W), got {x_shape}")
        kwargs.setdefault("mults", (1, 2) if max(x_shape[1:]) <= 16 else (1, 2, 2))
        model = UNet(x_shape[0], num_classes=num_classes, **kwargs)
        factor = 2 ** (len(model.mults) - 1)
        if x_shape[1] % factor or x_shape[2] % factor:
            raise ValueError(f"model 'unet' with mults={model.mults} needs H and W divisible by {factor}, "
                             f"got x_shape {x_shape}")
        return model
    raise ValueError(f"name must be 'mlp', 'unet' or 'auto', got {name!r}")
