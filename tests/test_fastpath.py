"""The speed-ups keep results: channels_last per family, the driver's config-only model, JPEG drafts, column moves."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from latentcache.encode import EncodeSpec, LatentEncoder
from latentcache.fastpath import use_channels_last
from latentcache.models import FAMILIES, ModelSpec, load_vae
from latentcache.preprocess import ImageError, PreprocessSpec, draft_request, preprocess_image
from latentcache.rows import PIXEL_SCHEMA, binary_rows, carry, scatter_rows, stack_binary
from latentcache.samples import encode_image, make_vae, natural_image
from latentcache.startup import model_view

SIZE = 64


def tiny_model(root, family: str):
    """A small random model of a registered family: samples.make_vae's, or test_families' for the newer ones."""
    from .test_families import MODELS, make_model

    if family in ("kl", "tiny", "vq"):
        return make_vae(root / family, kind=family)
    matching = [name for name, (cls, _) in MODELS.items() if cls == FAMILIES[family].class_name]
    assert matching, f"no tiny model of family {family} to check channels_last and the driver's view with"
    return make_model(root, matching[0])


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fastpath-models")
    return {name: tiny_model(root, name) for name in FAMILIES}


def pixel_table(images: list[np.ndarray], errors: dict[int, str] | None = None) -> pa.Table:
    n = len(images)
    raw = pa.table(
        {
            "key": [f"k{i}" for i in range(n)],
            "shard": ["s"] * n,
            "index": list(range(n)),
            "error": pa.array([(errors or {}).get(i) for i in range(n)], pa.string()),
        }
    )
    chw = [np.ascontiguousarray(img.transpose(2, 0, 1)) for img in images]
    return carry(
        raw,
        PIXEL_SCHEMA,
        {"pixels": [p.tobytes() for p in chw], "height": [p.shape[1] for p in chw], "width": [p.shape[2] for p in chw]},
    )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_channels_last_gives_the_same_latents_for_every_family(family, family_models):
    """channels_last is the CPU default only because this holds for every registered family."""
    rng = np.random.default_rng(1)
    table = pixel_table([np.asarray(natural_image(rng, SIZE, SIZE)) for _ in range(3)])
    model = ModelSpec(model=str(family_models[family]))
    spec = dict(store_dtype="fp32", vq_output="both" if family == "vq" else "latent")
    default = LatentEncoder(model=model, spec=EncodeSpec(**spec))
    contiguous = LatentEncoder(model=model, spec=EncodeSpec(no_channels_last=True, **spec))
    video = any(p.dim() > 4 for p in contiguous.vae.parameters())  # 3D convolutions: no channels_last layout
    assert default.channels_last is not video and not contiguous.channels_last
    got, want = default(table), contiguous(table)
    a = np.frombuffer(b"".join(got.column("latent").to_pylist()), np.float32)
    b = np.frombuffer(b"".join(want.column("latent").to_pylist()), np.float32)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
    if family == "vq":  # codebook picks agree except where two codes are equally near (none in this sample)
        assert got.column("codes").to_pylist() == want.column("codes").to_pylist()


def test_channels_last_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_channels_last(EncodeSpec(), cpu) and not use_channels_last(EncodeSpec(no_channels_last=True), cpu)
    assert not use_channels_last(EncodeSpec(), cuda) and use_channels_last(EncodeSpec(channels_last=True), cuda)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_driver_view_has_the_loaded_models_config_without_its_weights(family, family_models):
    spec = ModelSpec(model=str(family_models[family]))
    view, view_family = model_view(spec)
    loaded, loaded_family = load_vae(spec)
    assert view_family == loaded_family
    assert {k: v for k, v in view.config.items() if k != "_name_or_path"} == {
        k: v for k, v in loaded.config.items() if k != "_name_or_path"
    }
    has_buffers = any(True for _ in loaded.buffers())  # values the latent convention reads: only a load has them
    devices = {p.device.type for p in view.parameters()}
    assert devices == ({"cpu"} if has_buffers else {"meta"})
    assert has_buffers is (family == "flux2")  # the one registered family whose config is not enough


def test_driver_view_falls_back_to_a_load_where_only_a_load_can_tell(tmp_path, family_models):
    single = tmp_path / "vae.safetensors"
    single.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="cannot load VAE"):
        model_view(ModelSpec(model=str(single)))


# ---- JPEG drafts ---------------------------------------------------------------------------


def jpeg(height: int, width: int, *, seed: int = 0, orientation: int | None = None) -> bytes:
    img = natural_image(np.random.default_rng(seed), height, width)
    if orientation is None:
        return encode_image(img, "jpg")
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, exif=exif)
    return buf.getvalue()


def test_draft_decodes_big_jpegs_close_to_full_decoding():
    data = jpeg(4 * SIZE + 8, 5 * SIZE)
    full, full_meta = preprocess_image(data, PreprocessSpec(resolution=SIZE))
    fast, fast_meta = preprocess_image(data, PreprocessSpec(resolution=SIZE, jpeg_draft=True))
    assert fast.shape == full.shape == (3, SIZE, SIZE)
    assert (fast_meta.original_height, fast_meta.original_width) == (4 * SIZE + 8, 5 * SIZE)
    assert fast_meta == full_meta
    diff = np.abs(fast.astype(float) - full.astype(float))
    assert diff.mean() < 4 and not np.array_equal(fast, full)  # a different filter, the same picture


def test_draft_leaves_small_images_and_other_formats_alone():
    small = jpeg(SIZE + SIZE // 2, SIZE * 2)  # shorter side < 2x the target: libjpeg's scale 1 only
    png = encode_image(natural_image(np.random.default_rng(2), 4 * SIZE, 4 * SIZE), "png")
    for data in (small, png):
        full = preprocess_image(data, PreprocessSpec(resolution=SIZE))
        fast = preprocess_image(data, PreprocessSpec(resolution=SIZE, jpeg_draft=True))
        assert np.array_equal(full[0], fast[0]) and full[1] == fast[1]


def test_draft_follows_exif_rotation_and_applies_min_size_to_the_original():
    data = jpeg(3 * SIZE, 8 * SIZE, orientation=6)  # stored 8S wide x 3S high, shown 3S wide x 8S high
    img = Image.open(io.BytesIO(data))
    assert draft_request(img, SIZE, SIZE) == (SIZE * 8 // 3 + 1, SIZE)  # (width, height) in the file's frame
    pixels, meta = preprocess_image(data, PreprocessSpec(resolution=SIZE, jpeg_draft=True))
    assert (meta.original_height, meta.original_width) == (8 * SIZE, 3 * SIZE) and pixels.shape == (3, SIZE, SIZE)
    with pytest.raises(ImageError, match=f"{3 * SIZE}x{8 * SIZE}, smaller than --min-size"):
        preprocess_image(data, PreprocessSpec(resolution=SIZE, jpeg_draft=True, min_size=4 * SIZE))


# ---- whole-column moves --------------------------------------------------------------------


def test_column_moves_round_trip_rows_with_nulls_and_chunks():
    arr = np.arange(5 * 6, dtype=np.float16).reshape(5, 2, 3)
    packed = binary_rows(arr)
    assert packed.to_pylist() == [row.tobytes() for row in arr]
    placed = scatter_rows(packed, np.array([4, 0, 2, 6, 5]), 8)
    assert placed.to_pylist() == [
        arr[1].tobytes(),
        None,
        arr[2].tobytes(),
        None,
        arr[0].tobytes(),
        arr[4].tobytes(),
        arr[3].tobytes(),
        None,
    ]
    chunked = pa.chunked_array([placed.slice(0, 3), placed.slice(3)])
    back = stack_binary(chunked, np.array([4, 2, 5]), (2, 3), np.float16)
    np.testing.assert_array_equal(back, arr[[0, 2, 4]])
    back[0] = 0  # writable: torch.from_numpy needs no copy and warns about nothing


def test_encoder_keeps_error_rows_in_place(family_models):
    rng = np.random.default_rng(3)
    images = [np.asarray(natural_image(rng, SIZE, SIZE)) for _ in range(4)]
    table = pixel_table(images, errors={1: "cannot decode image"})
    out = LatentEncoder(model=ModelSpec(model=str(family_models["kl"])), spec=EncodeSpec(store_dtype="fp32"))(table)
    alone = LatentEncoder(model=ModelSpec(model=str(family_models["kl"])), spec=EncodeSpec(store_dtype="fp32"))(
        pixel_table([images[3]])
    )
    assert out.column("error").to_pylist() == [None, "cannot decode image", None, None]
    assert out.column("latent")[1].as_py() is None and out.column("latent_shape")[1].as_py() is None
    np.testing.assert_allclose(
        np.frombuffer(out.column("latent")[3].as_py(), np.float32),
        np.frombuffer(alone.column("latent")[0].as_py(), np.float32),
        rtol=1e-4,
        atol=1e-5,
    )
    assert out.column("store_dtype").to_pylist() == ["fp32", None, "fp32", "fp32"]


# ---- allocator ------------------------------------------------------------------------------


def test_allocator_choice(monkeypatch, tmp_path):
    from latentcache import allocator

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert allocator.worker_env("system") == {}
    lib = tmp_path / "libfakemalloc.so"
    lib.write_bytes(b"")
    assert allocator.worker_env(str(lib)) == {"LD_PRELOAD": str(lib)}
    assert allocator.worker_env(str(tmp_path / "missing.so")) == {}
    monkeypatch.setenv("LD_PRELOAD", "/opt/other.so")
    assert allocator.worker_env(str(lib))["LD_PRELOAD"] == f"{lib} /opt/other.so"
    found = allocator.preload_path("auto")
    assert found is None or any(found.endswith(name) for name in allocator.LIBRARIES.values())
    env = allocator.worker_env("auto")
    if found and "jemalloc" in found:
        assert env["MALLOC_CONF"] == allocator.JEMALLOC_CONF
