"""Block-wise prediction over many blocks equals one single pass over the
whole volume with the same valid-padding network, up to uint8 rounding, for
each method; and an embedding model's affinities for offsets it was never
trained on are the cosines of its embeddings."""

from __future__ import annotations

import dataclasses
import daisy
import numpy as np
import pytest
import torch
from funlib.geometry import Coordinate, Roi
from funlib.persistence import open_ds

from pipeline.config import RunConfig
from pipeline.methods import affinity, build_model, crac, embedding, latent_masks, load_model, save_model
from pipeline.orchestration.job import open_run
from pipeline.orchestration.tasks import blockwise_geometry
from tests.conftest import RAW
from workers.loop import WorkerRun
from workers.predict import predict_roi, setup

MALA = {"name": "mala_unet", "num_fmaps": 4, "fmap_inc_factor": 2, "downsample_factors": [[2, 2, 2], [2, 2, 2]]}
OFFSETS = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, 0, -3]]
ADAPTIVE = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, -6, 0], [-2, 5, -9]]
CRAC = crac.Settings(name="crac", dim=6, entropy=None)
# (settings, the run's offsets, the run's model.representation)
METHODS = {
    "affinity": (affinity.Settings(), None, None),
    # adaptive offsets: the run asks for offsets the model was not trained on,
    # some longer than the network's alignment, one pointing forwards
    "embedding": (embedding.Settings(name="embedding", dim=6, ccm=None, epm=None), ADAPTIVE, None),
    "crac-embedding": (CRAC, ADAPTIVE, None),
    "crac-explicit": (CRAC, None, "explicit"),
    # MaskAggr's affinities and uncertainty: masks centred up to the window's half beyond a block
    "latent_masks": (latent_masks.Settings(name="latent_masks", latent_dim=4, window=(3, 5, 5), levels=1,
                                           decoder_maps=4), None, None),
}


def blockwise_run(tmp_path, method: str):
    torch.manual_seed(0)
    settings, run_offsets, representation = METHODS[method]
    checkpoint = tmp_path / "net.pt"
    model = build_model(settings, MALA, OFFSETS)
    head = getattr(model, "embed", None) or (model.latent[0] if hasattr(model, "latent") else None)
    if head is not None:
        # an untrained network's features barely vary around their mean, so
        # all cosines are about 1 and all masks alike; a head centred on that
        # mean spreads them (and for the masks, a decoder whose logits vary)
        raw = open_ds(RAW)
        crop = torch.from_numpy(raw[Roi((500, 300, 200), (760, 760, 760))].astype(np.float32) / 255.0)[None, None]
        with torch.no_grad():
            features = model.backbone(crop)
            head.bias.data = -head.weight.data.flatten(1) @ features.mean(dim=(0, 2, 3, 4))
            if head is not getattr(model, "embed", None):
                _spread_masks(model, head(features))
    save_model(checkpoint, settings, MALA, OFFSETS, model.state_dict())
    # an ROI that is not a multiple of the block, so edge blocks overhang
    config = RunConfig(
        run_dir=str(tmp_path / "run"),
        raw=str(RAW),
        roi={"offset": [500, 300, 200], "shape": [300, 540, 460]},
        model={"checkpoint": str(checkpoint), "offsets": run_offsets, "representation": representation},
        predict={"device": "cpu", "output_shape": [8, 16, 16], "extra_outputs": ["embedding"] if run_offsets else []},
        postprocess={"block_shape": [300, 540, 460], "context": [10, 10, 10]},
    )
    layout, run_dir = open_run(config)
    with setup(WorkerRun(config, layout, run_dir)) as process_block:
        task = daisy.Task(
            "predict", *blockwise_geometry(layout, layout.predict_output, layout.predict_read_context),
            process_function=process_block, read_write_conflict=False, fit="overhang", max_retries=0,
        )
        assert daisy.run_blockwise([task], multiprocessing=False, progress=False, summary=False)
    n_blocks = int(np.prod([-(-s // b) for s, b in zip(layout.roi.shape, layout.predict_output)]))
    assert n_blocks >= 20
    model = load_model(checkpoint)
    if representation is not None:
        model.representation = representation
    return model, layout, run_dir


def _spread_masks(model, codes: torch.Tensor) -> None:
    """Scale and centre the mask decoder's last layer so that its logits
    vary across `codes` (B, Q, ...) with a spread of about 2 per position."""
    decoder = model.decoder
    x = torch.relu(decoder.expand(codes.movedim(1, -1).reshape(-1, codes.shape[1]) * 100))
    x = x.view(len(x), decoder.maps, *decoder.window)
    x = torch.relu(x + decoder.conv2(torch.relu(decoder.conv1(x))))
    decoder.expand.weight.data *= 100
    decoder.out.weight.data *= 2 / float(decoder.out(x).flatten(1).std(0).mean())
    decoder.out.bias.data -= float(decoder.out(x).mean())


@pytest.mark.parametrize("method", list(METHODS))
def test_blockwise_prediction_equals_single_pass(tmp_path, method):
    model, layout, run_dir = blockwise_run(tmp_path, method)
    vs = layout.voxel_size
    # one block over the whole ROI (rounded up to a valid shape)
    whole = Coordinate(model.geometry.valid_output_shape(layout.roi.shape / vs + layout.predict_margin / vs * 2))
    single = predict_roi(model, open_ds(RAW), Roi(layout.roi.offset, whole * vs - layout.predict_margin * 2), layout, "cpu")
    inside = (slice(None), *(slice(0, s) for s in layout.roi.shape / vs))
    for name in ("affs", *(e[0] for e in layout.extras)):
        blockwise = open_ds(run_dir.volumes / name)[layout.roi]
        expected = single[name][inside]
        assert blockwise.shape == expected.shape
        difference = np.abs(blockwise.astype(np.float64) - expected.astype(np.float64))
        if name == "affs":  # uint8: float noise shows only where it flips a rounding
            assert difference.max() <= 1 and (difference > 0).mean() < 0.01, "block-wise affs differ beyond rounding"
        else:  # float16 embedding
            assert difference.max() <= 1e-3, f"block-wise {name} differs beyond rounding"
        # float64: a float16 sum overflows to inf, which would pass any bound
        assert blockwise.astype(np.float64).std() > (1 if name == "affs" else 0.01)  # the network says something


def test_adaptive_offsets_are_the_cosines_of_the_embedding(tmp_path):
    model, layout, run_dir = blockwise_run(tmp_path, "embedding")
    assert layout.offsets == tuple(tuple(o) for o in METHODS["embedding"][1])
    # reach (2, 6, 9) voxels, rounded up to the alignment (4, 4, 4)
    assert layout.predict_margin == Coordinate(4, 8, 12) * layout.voxel_size
    # the embedding around a window inside the ROI, wide enough for every
    # offset's partner and on the network's 4-voxel grid of the run's blocks
    # (a valid network is translation-equivariant in such steps only)
    window = Roi((700, 460, 440), (60, 120, 140))
    grown = window.grow(Coordinate(40, 80, 120), Coordinate(40, 80, 120))
    assert all(o % 40 == 0 for o in grown.offset - layout.roi.offset)
    whole = Coordinate(model.geometry.valid_output_shape(grown.shape / layout.voxel_size))
    around = Roi(grown.offset, whole * layout.voxel_size)
    no_margin = dataclasses.replace(layout, predict_margin=Coordinate(0, 0, 0), extras=(("embedding", 6, "float32"),))
    e = predict_roi(model, open_ds(RAW), around, no_margin, "cpu")["embedding"].astype(np.float64)
    affs = open_ds(run_dir.volumes / "affs")[window] / 255.0
    at = layout.window(window, around)
    for c, offset in enumerate(layout.offsets):
        # each voxel's embedding with its partner's, clamped at 0
        expected = np.zeros(affs.shape[1:])
        for i in np.ndindex(*affs.shape[1:]):
            here = tuple(s.start + k for s, k in zip(at, i))
            there = tuple(h + o for h, o in zip(here, offset))
            expected[i] = max(0.0, float(np.dot(e[(slice(None), *here)], e[(slice(None), *there)])))
        np.testing.assert_allclose(affs[c], expected, atol=1 / 255 + 1e-6)
    assert affs[3:].std() > 0.01


def test_mirrored_raw_beyond_the_volume_is_the_whole_volume_mirrored():
    """`predict.outside: mirror` reads what np.pad(reflect) of the whole
    volume holds there, whichever block asks: blocks stay equal to one pass."""
    from workers.predict import read_raw

    raw = open_ds(RAW)
    vs = raw.voxel_size
    whole = raw[raw.roi]
    margin = 30
    padded = np.pad(whole, margin, mode="reflect")
    for begin in [(-100, -200, -150), (1400, 2300, -100), (500, 1000, 1000)]:
        roi = Roi(raw.roi.begin + Coordinate(begin), (200, 300, 250))
        start = [(b - o) // v + margin for b, o, v in zip(roi.begin, raw.roi.begin, vs)]
        expected = padded[tuple(slice(s, s + n // v) for s, n, v in zip(start, roi.shape, vs))]
        np.testing.assert_array_equal(read_raw(raw, roi, "raw", "mirror"), expected)
        zero = read_raw(raw, roi, "raw", "zero")
        assert zero.shape == expected.shape


def test_affinities_quantised_on_the_device_equal_as_uint8():
    """The predict step rounds to uint8 in torch (on the GPU, a quarter of
    the bytes to copy back); given affinities are rounded by `as_uint8` in
    numpy. Both must agree, at exact halves (round half to even) too."""
    from pipeline.storage.volumes import as_uint8
    from workers.predict import _stored

    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.uniform(-0.5, 1.5, 100_000),
        (np.arange(511) / 510),  # k + 0.5 steps of 1/255
        np.nextafter(np.arange(511) / 510, 2), np.nextafter(np.arange(511) / 510, -1),
    ]).astype(np.float32)
    expected = as_uint8(values)
    assert (expected % 2 == 1).any() and len(np.unique(expected)) == 256
    np.testing.assert_array_equal(_stored(torch.from_numpy(values), "uint8"), expected)
    np.testing.assert_array_equal(_stored(torch.from_numpy(values).to(torch.bfloat16), "uint8"),
                                  as_uint8(torch.from_numpy(values).to(torch.bfloat16).float().numpy()))
