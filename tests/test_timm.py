"""timm conventions: preprocessing from the model's data config, checkpoints through timm's
loader, and a stored task written in timm's Hugging Face layout (``local-dir:``)."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from PIL import Image

from taps_cl.bases import Preprocessing, load_base
from taps_cl.cli import main
from taps_cl.config import TrainConfig
from taps_cl.engine import Engine
from taps_cl.images import preprocess
from taps_cl.storage import TaskStore

ARCH = "test_efficientnet"


def test_preprocessing_comes_from_timm_data_config():
    model = timm.create_model(ARCH)
    cfg = timm.data.resolve_model_data_config(model)
    for base in (load_base(f"timm-random:{ARCH}"), load_base(model)):
        prep = base.preprocessing
        assert prep.input_size == cfg["input_size"][-1] and prep.mean == tuple(cfg["mean"])
        assert prep.interpolation == cfg["interpolation"] and prep.crop_pct == cfg["crop_pct"]
    assert load_base(torch.nn.Linear(2, 2)).preprocessing == Preprocessing()
    with pytest.raises(ValueError, match="interpolation"):
        Preprocessing(interpolation="lanczos5")


def test_crop_keeps_the_centre_and_inputs_are_still_checked():
    img = torch.zeros(1, 3, 20, 20)
    img[..., :2, :] = 1.0  # a bright top border that a 0.8 crop cuts off
    prep = Preprocessing(input_size=16, mean=(0, 0, 0), std=(1, 1, 1), crop_pct=0.8)
    out = preprocess(img, prep)
    assert out.shape == (1, 3, 16, 16) and float(out.max()) == 0.0
    with pytest.raises(ValueError, match="must be in"):
        preprocess(img * 4 - 2, prep)  # already-normalised input is refused, as before


@pytest.mark.parametrize("wrap", ["plain", "nested_ema", "ddp_compiled", "safetensors"])
def test_checkpoint_bases_load_through_timm(tmp_path, wrap):
    ref = load_base(f"timm-random:{ARCH}").module
    state = {k: v + 1.0 if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    if wrap == "plain":
        torch.save(state, path)
    elif wrap == "nested_ema":
        torch.save({"state_dict": {}, "state_dict_ema": state, "epoch": 3}, path)
    elif wrap == "ddp_compiled":
        torch.save({"state_dict": {f"module._orig_mod.{k}": v for k, v in state.items()}}, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "ckpt.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    base = load_base(str(path), arch=ARCH)
    for k, v in base.module.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert base.preprocessing == load_base(f"timm-random:{ARCH}").preprocessing


def test_checkpoint_needs_arch_and_arch_needs_a_checkpoint(tmp_path, capsys):
    path = tmp_path / "w.pt"
    torch.save(load_base(f"timm-random:{ARCH}").module.state_dict(), path)
    with pytest.raises(ValueError, match="arch="):
        load_base(str(path))
    with pytest.raises(ValueError, match="checkpoint"):
        load_base(f"timm-random:{ARCH}", arch=ARCH)
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    TaskStore(str(tmp_path / "s.db")).close()
    argv = ["predict", str(image), "--store", str(tmp_path / "s.db"), "--base", str(path)]
    assert main(argv) == 2  # the message names the CLI flag, not the keyword
    assert "--arch" in capsys.readouterr().err


def test_task_exports_to_timm_local_dir_with_same_logits(tmp_path, capsys):
    store = str(tmp_path / "s.db")
    engine = Engine(f"timm-random:{ARCH}", store=store,
                    train=TrainConfig(epochs=1, image_size=32, batch_size=8))  # fmt: skip
    x = torch.randint(0, 256, (18, 3, 20, 20), dtype=torch.uint8)
    engine.add_task((x, torch.arange(18) % 3), name="t", class_names=["a", "b", "c"], quiet=True)
    merged = engine.model("t")
    assert merged.num_classes == 3 and merged.pretrained_cfg["label_names"] == ["a", "b", "c"]
    out = tmp_path / "hf"
    argv = ["export", "t", "--merged", str(out), "--store", store, "--base", f"timm-random:{ARCH}"]
    assert main([*argv, "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["label_names"] == ["a", "b", "c"]
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    cfg = timm.data.resolve_model_data_config(loaded)
    prep = engine.base.preprocessing
    assert cfg["input_size"] == (3, 32, 32) and tuple(cfg["mean"]) == prep.mean
    assert cfg["interpolation"] == prep.interpolation and cfg["crop_pct"] == prep.crop_pct
    inputs = engine.preprocess(x, "t")
    with torch.no_grad():
        assert torch.allclose(loaded(inputs), engine.predict("t", x, logits=True), atol=1e-5)
