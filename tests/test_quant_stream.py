"""Loading straight into packed layers: from FP checkpoints (any dtype, sharded) and packed files."""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from qsched.errors import QSchedError
from qsched.prepare import ModelOptions, prepare_pipeline
from qsched.quant import parse_preset, quantize, save_packed
from qsched.quant.packed_modules import PackedLayer
from qsched.quant.stream import component_source, load_quantized, pack_model
from qsched.quant.tensor_files import iter_tensors, read_header

DENOISER = {"lcm": "unet", "sdxl-turbo": "unet", "flux-schnell": "transformer"}


def reference(folder: Path, attr: str, preset: str, *, backend: str) -> torch.nn.Module:
    pipe = DiffusionPipeline.from_pretrained(folder)
    model = getattr(pipe, attr)
    quantize(model, parse_preset(preset), backend=backend)
    return model


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("family", sorted(DENOISER))
def test_streamed_denoiser_equals_packing_the_loaded_model(tiny_pipeline_path: Callable[[str], Path], family: str) -> None:
    folder, attr = tiny_pipeline_path(family), DENOISER[family]
    for preset in ("w4a8", "w8a8"):
        streamed, report = load_quantized(component_source(folder, attr), parse_preset(preset))
        packed = reference(folder, attr, preset, backend="packed")
        assert_same_state(streamed, packed)
        assert report.backend == "packed" and report.quantized_params > 0
        fake = reference(folder, attr, preset, backend="fake")
        for name, module in streamed.named_modules():
            if isinstance(module, PackedLayer):
                assert torch.equal(module.weight, fake.get_submodule(name).weight), name


def test_fp16_bf16_and_sharded_checkpoints_load_the_same(tiny_pipeline_path: Callable[[str], Path], tmp_path: Path) -> None:
    folder = tiny_pipeline_path("lcm")
    recipe = parse_preset("w4a8")
    for dtype, variant in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        target = tmp_path / variant
        DiffusionPipeline.from_pretrained(folder).unet.to(dtype).save_pretrained(target, variant=variant, max_shard_size="20KB")
        assert len(list(target.glob("*.safetensors"))) > 3  # really sharded
        (target / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
        source = component_source(target, "unet")
        object.__setattr__(source, "folder", target)  # the folder holds the component itself
        streamed, _ = load_quantized(source, recipe, variant=variant)
        want = DiffusionPipeline.from_pretrained(folder).unet.to(dtype).float()  # same rounding as the file
        pack_model(want, recipe)
        assert_same_state(streamed, want)
        streamed16, _ = load_quantized(source, recipe, variant=variant, dtype=torch.bfloat16)
        assert streamed16.conv_in.weight.dtype == torch.bfloat16
        assert next(m for m in streamed16.modules() if isinstance(m, PackedLayer)).weight_scale.dtype == torch.float32


def test_packed_file_round_trip_and_refusals(tiny_pipeline_path: Callable[[str], Path], tmp_path: Path) -> None:
    folder = tiny_pipeline_path("lcm")
    recipe = parse_preset("w4a8")
    source = component_source(folder, "unet")
    packed, _ = load_quantized(source, recipe)
    old = os.umask(0o022)
    try:
        path = save_packed(packed, tmp_path / "unet.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # the umask applies, as to every output
    fake_path = save_packed(reference(folder, "unet", "w4a8", backend="fake"), tmp_path / "fake.safetensors")
    # one format whichever path wrote it
    mine, theirs = read_header(path), read_header(fake_path)
    assert {k: json.loads(v) if k in ("layers", "recipe", "model_config") else v for k, v in mine.metadata.items()} == \
        {k: json.loads(v) if k in ("layers", "recipe", "model_config") else v for k, v in theirs.metadata.items()}
    a, b = dict(iter_tensors([mine])), dict(iter_tensors([theirs]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    loaded, _ = load_quantized(source, recipe, packed=path)
    assert_same_state(loaded, packed)
    with pytest.raises(QSchedError, match="holds recipe 'w4a8', not the requested 'w8a8'"):
        load_quantized(source, parse_preset("w8a8"), packed=path)
    other = tiny_pipeline_path("sdxl-turbo")
    with pytest.raises(QSchedError, match="another model configuration"):
        load_quantized(component_source(other, "unet"), recipe, packed=path)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(QSchedError, match="truncated"):
        load_quantized(source, recipe, packed=cut)
    with pytest.raises(QSchedError, match="not a qsched packed checkpoint"):
        load_quantized(source, recipe, packed=next((folder / "unet").glob("*.safetensors")))


def test_checkpoints_that_do_not_fit_the_config_are_refused(tiny_pipeline_path: Callable[[str], Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    original = tiny_pipeline_path("lcm")
    recipe = parse_preset("w8a8")

    def broken(change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
        folder = tmp_path / f"broken{len(list(tmp_path.iterdir()))}"
        shutil.copytree(original, folder)
        weights = next((folder / "unet").glob("*.safetensors"))
        tensors = load_file(str(weights))
        change(tensors)
        save_file(tensors, str(weights))
        return folder

    extra = broken(lambda t: t.__setitem__("surprise.weight", torch.zeros(2)))
    with pytest.raises(QSchedError, match="'surprise.weight', which the model .* does not have"):
        load_quantized(component_source(extra, "unet"), recipe)
    missing = broken(lambda t: t.pop("conv_out.weight"))
    with pytest.raises(QSchedError, match="lacks 1 tensor.*conv_out.weight"):
        load_quantized(component_source(missing, "unet"), recipe)
    key = "down_blocks.0.resnets.0.conv1.weight"
    shape = broken(lambda t: t.__setitem__(key, torch.zeros(1, 1, 1, 1)))
    with pytest.raises(QSchedError, match=f"shape mismatch for '{key}'"):
        load_quantized(component_source(shape, "unet"), recipe)


def test_text_encoder_and_vae_weights_only(tiny_pipeline_path: Callable[[str], Path]) -> None:
    folder = tiny_pipeline_path("sdxl-turbo")
    options = ModelOptions(quantize_modules=("denoiser", "text_encoder", "text_encoder_2", "vae"))
    prepared = prepare_pipeline(folder, recipe=parse_preset("w4a8"), options=options)
    assert set(prepared.module_reports) == {"text_encoder", "text_encoder_2", "vae"}
    pipe = prepared.pipe
    for name in ("text_encoder", "text_encoder_2", "vae"):
        layers = [m for m in getattr(pipe, name).modules() if isinstance(m, PackedLayer)]
        assert layers and all(m.input_quantizer is None for m in layers), name  # weights only
        assert prepared.module_reports[name].recipe.act_bits == 16
    fake = prepare_pipeline(folder, recipe=parse_preset("w4a8"), options=options.replace(backend="fake"))
    kwargs = dict(num_inference_steps=2, guidance_scale=0.0, height=32, width=32, output_type="np")
    a = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = fake.pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.array_equal(a, b)
    with pytest.raises(QSchedError, match="no component 'tokenizer_3'"):
        prepare_pipeline(folder, recipe=parse_preset("w4a8"), options=ModelOptions(quantize_modules=("denoiser", "tokenizer_3")))


@pytest.mark.parametrize("preset", ["w4a8", "w4a4"])
def test_builtin_images_of_packed_execution_equal_fake_quantization(preset: str) -> None:
    """Bound from the issue: max abs pixel difference <= 1/255; the dequantized weights are
    bit-identical, so the images are expected to be equal to the bit."""
    from qsched.generate import sample

    images = {}
    for backend in ("packed", "fake"):
        prepared = prepare_pipeline("builtin", recipe=parse_preset(preset), options=ModelOptions(backend=backend))
        images[backend] = np.stack([np.asarray(im, dtype=np.float64) / 255 for im in
                                    sample(prepared, ["a pair of sandals", "a photo of a dress"], [0, 1], seed=0)])
    assert np.abs(images["packed"] - images["fake"]).max() <= 1 / 255
    assert np.array_equal(images["packed"], images["fake"])


def test_a_model_that_cannot_fit_is_refused_before_reading(tiny_pipeline_path: Callable[[str], Path],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import qsched.quant.stream as stream

    assert stream.available_memory(torch.device("cpu")) > 0
    read = []
    monkeypatch.setattr(stream, "iter_tensors", lambda files: read.append(files) or iter(()))
    monkeypatch.setattr(stream, "available_memory", lambda device: 1000)
    with pytest.raises(QSchedError, match=r"needs about 0\.\d GB on cpu .* only 0\.0 GB are available"):
        load_quantized(component_source(tiny_pipeline_path("lcm"), "unet"), parse_preset("w4a8"))
    assert not read


def test_t5_text_encoder_streams_with_tied_embeddings(tiny_pipeline_path: Callable[[str], Path]) -> None:
    folder = tiny_pipeline_path("flux-schnell")
    options = ModelOptions(quantize_modules=("denoiser", "text_encoder_2"))
    packed = prepare_pipeline(folder, recipe=parse_preset("w4a8"), options=options).pipe.text_encoder_2
    fake = prepare_pipeline(folder, recipe=parse_preset("w4a8"), options=options.replace(backend="fake")).pipe.text_encoder_2
    assert packed.shared.weight.data_ptr() == packed.encoder.embed_tokens.weight.data_ptr()  # tied after loading
    layers = {n: m for n, m in packed.named_modules() if isinstance(m, PackedLayer)}
    assert layers and all(torch.equal(m.weight, fake.get_submodule(n).weight) for n, m in layers.items())
    ids = torch.randint(3, 20, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # same weights; the embeddings agree to float rounding (see docs/quantization.md)
        torch.testing.assert_close(packed(ids)[0], fake(ids)[0], rtol=1e-5, atol=1e-5)
