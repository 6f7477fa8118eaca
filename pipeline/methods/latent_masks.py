"""Latent single-instance masks (methods notes section C, Bailoni et al.).

For every voxel, the network predicts a latent code (`latent_dim`, Q = 32)
of the binary mask of its own object over a window around it; one tiny
decoder shared by every voxel and level turns a code into the mask. Heads
on the finest output and on `levels - 1` coarser decoder levels (1/2,
1/4, ... of the resolution) predict masks of the same window size, so a
coarse mask covers more space. At predict time MaskAggr
(`mask_aggregation.py`) turns every mask that holds a pair into an
affinity for any offset within the windows' reach, and their disagreement
into an uncertainty.

Training decodes only sampled voxels (`samples_per_level` per batch and
level, on a strided grid with a random offset): the target of voxel u is
the window's voxels with u's label, empty where u lies within
`boundary_margin` voxels (of the finest level) of a voxel of another
label; voxels of label 0 or
unannotated are not sampled, and window voxels outside the crop or
unannotated are ignored. The loss is the Sørensen-Dice loss over all of a
level's decoded masks together (one mask alone with an empty target would
give no gradient). Optional affinity heads beside the masks (the paper's
SNB + ENB model) train with the affinity method's loss. Data with
background: the foreground head every method offers.

Representations (the run config's `model.representation`): "maskaggr"
(the paper's MaskAggr over every mask and level, with the `uncertainty`
output, one channel per offset: the masks' weighted variance), "centre_mask"
(the published code's: the finest mask centred at the pair's first voxel
alone), and with affinity heads "affinities" (the heads' own).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from networks.losses import WeightedMSELoss
from pipeline.methods.base import ForegroundSettings, MethodModel, MethodStep, Progress, StepOutput, TrainingBatch, foreground_loss
from pipeline.methods.embedding import nearest_downsample
from pipeline.methods.mask_aggregation import aggregate_masks, mask_reach, window_positions
from pipeline.schema import Strict

MASKAGGR, CENTRE, AFFINITIES = "maskaggr", "centre_mask", "affinities"
# float32 activations of one decoder call on a CPU (4 MB)
DECODE_CACHE_FLOATS = 1 << 20
OddSize = Annotated[int, Field(ge=1, le=15)]


class Settings(Strict):
    name: Literal["latent_masks"]
    latent_dim: Annotated[int, Field(ge=1)] = 32
    # the mask window (z, y, x), odd sizes; the notes' 5 x 7 x 7 for 3D
    # networks, (1, 7, 7) for 2D ones; null: by the network's offsets
    window: tuple[OddSize, OddSize, OddSize] | None = None
    # heads on the finest output and levels - 1 coarser decoder levels
    levels: Annotated[int, Field(ge=1, le=4)] = 2
    samples_per_level: Annotated[int, Field(ge=1)] = 120
    # voxels of the finest level: a centre this close to another label gets
    # an empty target (`level_margin` on the coarser levels)
    boundary_margin: Annotated[int, Field(ge=0)] = 2
    decoder_maps: Annotated[int, Field(ge=1)] = 16
    # affinity heads at the training offsets beside the masks (SNB + ENB)
    affinity_heads: bool = False
    foreground: ForegroundSettings | None = None

    @model_validator(mode="after")
    def _odd(self) -> Settings:
        if self.window is not None and any(s % 2 == 0 for s in self.window):
            raise ValueError(f"method.window: odd sizes (a centre voxel), not {list(self.window)}")
        return self


class MaskDecoder(nn.Module):
    """The notes' tiny decoder: Linear Q -> maps x window, one residual
    block of two 3x3x3 convolutions (3x3 in-plane for a window of depth
    1), a 1x1x1 convolution to one channel, a sigmoid. (N, Q) codes ->
    (N, K) masks, K the window's voxels in `window_positions` order."""

    def __init__(self, latent_dim: int, window: tuple[int, int, int], maps: int):
        super().__init__()
        self.window, self.maps = tuple(window), maps
        kernel = tuple(3 if s > 1 else 1 for s in window)
        padding = tuple(k // 2 for k in kernel)
        self.expand = nn.Linear(latent_dim, maps * math.prod(window))
        self.conv1 = nn.Conv3d(maps, maps, kernel, padding=padding)
        self.conv2 = nn.Conv3d(maps, maps, kernel, padding=padding)
        self.out = nn.Conv3d(maps, 1, 1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.expand(codes)).view(len(codes), self.maps, *self.window)
        x = F.relu(x + self.conv2(F.relu(self.conv1(x))))
        return torch.sigmoid(self.out(x)).flatten(1)


class Model(MethodModel):
    def __init__(self, backbone: nn.Module, offsets, settings: Settings):
        super().__init__(backbone, offsets, settings.foreground)
        self.settings = settings
        self.planar = all(o[0] == 0 for o in self.offsets)
        self.window = tuple(settings.window or ((1, 7, 7) if self.planar else (5, 7, 7)))
        if self.planar and self.window[0] != 1:
            raise ValueError(f"method.window: a 2D network's masks are in-plane (depth 1), not {list(self.window)}")
        coarse = tuple(getattr(backbone, "level_factors", ()))
        if settings.levels - 1 > len(coarse):
            raise ValueError(f"method.levels: {settings.levels} levels, but the backbone has {len(coarse)} coarser "
                             f"decoder levels{'' if coarse else ' (a residual_unet has them)'}")
        self.factors = ((1, 1, 1), *coarse[: settings.levels - 1])
        for factor in self.factors[1:]:
            if any(c % f for c, f in zip(backbone.spec.crop, factor)):
                raise ValueError(f"method.levels: the backbone's crop {tuple(backbone.spec.crop)} must be a "
                                 f"multiple of each level's downsampling, here {factor}")
        widths = (backbone.out_channels, *getattr(backbone, "level_widths", ())[: settings.levels - 1])
        self.latent = nn.ModuleList(nn.Conv3d(w, settings.latent_dim, 1) for w in widths)
        self.decoder = MaskDecoder(settings.latent_dim, self.window, settings.decoder_maps)
        self.head = nn.Conv3d(backbone.out_channels, len(self.offsets), 1) if settings.affinity_heads else None
        self.representations = (MASKAGGR, CENTRE) + ((AFFINITIES,) if self.head is not None else ())
        self.representation = MASKAGGR

    def codes(self, raw: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(latent codes (B, Q, ...) per level, finest first; the finest features)."""
        features = self.backbone(raw, levels=True) if len(self.factors) > 1 else [self.backbone(raw)]
        return [head(f) for head, f in zip(self.latent, features)], features[0]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Every voxel's mask: (B, Q, z, y, x) codes -> (B, K, z, y, x)."""
        flat = codes.movedim(1, -1).reshape(-1, codes.shape[1])
        # on a CPU, as many codes per call as keep the decoder's maps x
        # window activations in cache (about 4 MB): 4.5x faster than 32768
        # codes a call, whose 170 MB went through memory (docs/latent_masks.md);
        # a GPU wants large calls
        activations = self.decoder.maps * math.prod(self.window)
        chunk = (1 << 15) if codes.is_cuda else max(1, DECODE_CACHE_FLOATS // activations)
        masks = torch.cat([self.decoder(flat[i : i + chunk]) for i in range(0, len(flat), chunk)]) if len(flat) else \
            flat.new_zeros((0, len(window_positions(self.window))))
        return masks.view(*codes.shape[:1], *codes.shape[2:], -1).movedim(-1, 1)

    def forward(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        codes, features = self.codes(raw)
        outputs = self.foreground_outputs(features)
        if self.representation == AFFINITIES:
            return {"affinities": torch.sigmoid(self.head(features)), **outputs}
        return {**{f"latent_{level}": c for level, c in enumerate(codes)}, **outputs}

    def affinities(self, outputs: dict[str, torch.Tensor], offsets) -> torch.Tensor:
        return self.predict(outputs, offsets)["affs"]

    def predict(self, outputs: dict[str, torch.Tensor], offsets) -> dict[str, torch.Tensor]:
        if self.representation == AFFINITIES:
            channels = [self.offsets.index(tuple(o)) for o in offsets]
            return {"affs": outputs["affinities"][:, channels]}
        centre_only = self.representation == CENTRE
        # the published code's variant reads the finest level alone: the others are not decoded
        factors = self.factors[:1] if centre_only else self.factors
        levels = [(self.decode(outputs[f"latent_{level}"]), factor) for level, factor in enumerate(factors)]
        mean, variance = aggregate_masks(levels, self.window, offsets, centre_only=centre_only)
        return {"affs": mean} if self.representation == CENTRE else {"affs": mean, "uncertainty": variance}

    def reach(self, offsets) -> tuple[int, int, int]:
        return (0, 0, 0) if self.representation == AFFINITIES else mask_reach(self.window, list(self.factors))

    def offsets_error(self, offsets) -> str | None:
        if self.representation == AFFINITIES:
            missing = [list(o) for o in offsets if tuple(o) not in self.offsets]
            return f"the affinity heads give only the training offsets, not {missing}" if missing else None
        if self.planar and any(o[0] for o in offsets):
            return "a 2D latent-mask model gives in-plane offsets only"
        # a pair is held by a mask whose window holds both voxels: window - 1
        # voxels apart at most, on the coarsest level; from its centre, half that
        if self.representation == CENTRE:
            span = [s // 2 for s in self.window]
        else:
            span = [max((s - 1) * f[axis] for f in self.factors) for axis, s in enumerate(self.window)]
        far = [list(o) for o in offsets if any(abs(x) > s for x, s in zip(o, span))]
        if far:
            return (f"offsets {far} reach beyond the masks' windows ({span} voxels per axis for the "
                    f"{self.representation} representation)")
        return None

    def outputs(self, offsets) -> dict[str, tuple[int, str]]:
        derived = {"uncertainty": (len(offsets), "float16")} if self.representation == MASKAGGR else {}
        return {**derived, **super().outputs(offsets)}

    def needed_outputs(self) -> tuple[str, ...]:
        return ("uncertainty",) * (self.representation == MASKAGGR) + super().needed_outputs()


def sample_centres(labels: torch.Tensor, annotated: torch.Tensor, count: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """About `count` voxels (b, z, y, x) of a batch's (B, z, y, x) labels,
    on a strided grid with a random offset per axis, of those with a label
    and annotated: (N, 4) long."""
    shape = labels.shape[1:]
    extent = [s for s in shape if s > 1]
    per_item = max(1, count // labels.shape[0])
    stride = max(1, round((math.prod(extent) / per_item) ** (1 / max(1, len(extent)))))
    grid = [torch.arange(int(torch.randint(0, min(stride, s), (), generator=generator)), s, stride) if s > 1
            else torch.arange(1) for s in shape]
    points = torch.cartesian_prod(torch.arange(labels.shape[0]), *grid).reshape(-1, 4).to(labels.device)
    chosen = (labels[tuple(points.T)] != 0) & (annotated[tuple(points.T)] != 0)
    return points[chosen]


def level_margin(margin: int, window, factor) -> tuple[int, int, int]:
    """The boundary margin (voxels of the finest level) in a level's
    voxels, per axis, at least one where it is not 0; none along an axis
    the window does not extend. In the level's own voxels, the 1/4 level's
    margin of 2 was 8 pixels: on the nuclei nearly every centre's target
    was empty there (the smoke run of docs/latent_masks.md)."""
    return tuple(-(-margin // f) if s > 1 else 0 for s, f in zip(window, factor))


def target_masks(labels: torch.Tensor, annotated: torch.Tensor, centres: torch.Tensor, window, margin
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, valid), each (N, K) for (N, 4) `centres` of (B, z, y, x)
    labels: the window's voxels that carry the centre's label, all 0 where
    a voxel within `margin` (z, y, x voxels) of the centre inside the crop
    carries another label (0 included); valid: the window voxels inside
    the crop and annotated."""
    positions = torch.tensor(window_positions(window), device=labels.device)
    near = torch.cartesian_prod(*(torch.arange(-r, r + 1, device=labels.device) for r in margin)).reshape(-1, 3)
    own = labels[tuple(centres.T)]

    def gather(deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # (labels, inside the crop, inside and annotated) at centre + each delta
        at = centres[:, None, 1:] + deltas[None]
        inside = ((at >= 0) & (at < torch.tensor(labels.shape[1:], device=labels.device))).all(-1)
        at = torch.where(inside[..., None], at, 0)
        index = (centres[:, None, 0].expand(-1, len(deltas)), at[..., 0], at[..., 1], at[..., 2])
        return labels[index], inside, inside & (annotated[index] != 0)

    values, inside, valid = gather(positions)
    around, _, around_known = gather(near)
    at_boundary = ((around != own[:, None]) & around_known).any(dim=1)
    targets = (values == own[:, None]) & inside & ~at_boundary[:, None]
    return targets.float(), valid


def dice_loss(prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sørensen-Dice loss, 1 - 2 sum(p t) / (sum(p^2) + sum(t^2)), over
    every valid value of all the masks together."""
    v = valid.to(prediction.dtype)
    p, t = prediction * v, target * v
    return 1 - 2 * (p * t).sum() / ((p * p).sum() + (t * t).sum()).clamp(min=1e-6)


class TrainingStep(MethodStep):
    """Terms: masks_0 (finest), masks_1, ... (one Dice loss per level),
    with affinity heads affinity, with a foreground head foreground."""

    def __init__(self, model: Model, settings: Settings):
        super().__init__(model)
        self.settings = settings
        self.mse = WeightedMSELoss()

    def forward(self, batch: TrainingBatch, progress: Progress) -> StepOutput:
        s, model = self.settings, self.model
        codes, features = model.codes(batch.raw)
        losses, metrics = {}, {}
        for level, (code, factor) in enumerate(zip(codes, model.factors)):
            labels = nearest_downsample(batch.labels, factor) if factor != (1, 1, 1) else batch.labels
            annotated = nearest_downsample(batch.labels_mask, factor) if factor != (1, 1, 1) else batch.labels_mask
            centres = sample_centres(labels, annotated, s.samples_per_level)
            if not len(centres):
                # nothing labelled at this level in this batch: a term without gradient
                losses[f"masks_{level}"] = code.sum() * 0
                continue
            margin = level_margin(s.boundary_margin, model.window, factor)
            targets, valid = target_masks(labels, annotated, centres, model.window, margin)
            masks = model.decoder(code.movedim(1, -1)[tuple(centres.T)])
            losses[f"masks_{level}"] = dice_loss(masks, targets, valid)
            metrics[f"empty_targets_{level}"] = float((targets.sum(1) == 0).float().mean())
        snapshot = {}
        if model.head is not None:
            prediction = torch.sigmoid(model.head(features))
            losses["affinity"] = self.mse(prediction, batch.affs, batch.affs_mask)
            snapshot["prediction"] = prediction
        if model.foreground is not None:
            losses["foreground"] = foreground_loss(model.foreground(features), batch.labels, batch.labels_mask,
                                                   s.foreground)
        return StepOutput(losses, snapshot, metrics)
