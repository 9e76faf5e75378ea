"""The model folder's check before the port opens: weight files that are not safetensors (a Git LFS pointer, empty,
truncated, random bytes), a weight missing or of a shape config.json does not imply, a tokenizer.json the tokenizers
library cannot load and Matryoshka sizes past the output are refused with one line, not left to the load (after
which the server stays unready for good)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from models.checks import check_model_settings
from models.config import ModelFolderError, default_model_path
from models.folder import read_model_folder

LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db\nsize 90868376\n"


def _folder(root: Path, name: str, weights: bytes | None = None, tokenizer: str | None = None) -> Path:
    """The embedded model's folder, linked file by file, with its model.safetensors or tokenizer.json replaced."""
    src, dst = default_model_path(), root / name
    dst.mkdir()
    for item in src.iterdir():
        if (item.name == "model.safetensors" and weights is not None) or (item.name == "tokenizer.json" and tokenizer is not None):
            continue
        (dst / item.name).symlink_to(item, target_is_directory=item.is_dir())
    if weights is not None:
        (dst / "model.safetensors").write_bytes(weights)
    if tokenizer is not None:
        (dst / "tokenizer.json").write_text(tokenizer)
    return dst


def _truncated() -> bytes:
    data = (default_model_path() / "model.safetensors").read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize("case,weights,needle", [
    ("lfs", LFS, "is a Git LFS pointer, not the weights: run `git lfs pull`"),
    ("empty", b"", "model.safetensors is empty"),
    ("truncated", None, "is not a readable safetensors file (truncated or corrupt?)"),
    ("random", os.urandom(5000), "is not a readable safetensors file"),
])
def test_weight_files_that_are_not_safetensors_are_refused(tmp_path, case, weights, needle):
    folder = _folder(tmp_path, case, _truncated() if weights is None else weights)
    with pytest.raises(ModelFolderError) as err:
        read_model_folder(folder)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def minilm_tensors():
    return load_file(str(default_model_path() / "model.safetensors"))


def test_a_missing_weight_is_refused_before_loading(tmp_path, minilm_tensors):
    tensors = {k: v for k, v in minilm_tensors.items() if k != "encoder.layer.3.attention.output.LayerNorm.bias"}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    folder = _folder(tmp_path, "missing", (tmp_path / "w.safetensors").read_bytes())
    with pytest.raises(ModelFolderError, match=r"^model.path: weight 'encoder.layer.3.attention.output.LayerNorm.bias' "
                                               r"is missing from model.safetensors$"):
        check_model_settings(read_model_folder(folder), "cpu", "float32")


def test_a_weight_of_the_wrong_shape_is_refused_before_loading(tmp_path, minilm_tensors):
    tensors = dict(minilm_tensors)
    tensors["encoder.layer.2.attention.self.query.weight"] = tensors["encoder.layer.2.attention.self.query.weight"][:10]
    save_file(tensors, str(tmp_path / "w.safetensors"))
    folder = _folder(tmp_path, "wrongshape", (tmp_path / "w.safetensors").read_bytes())
    with pytest.raises(ModelFolderError, match=r"^reranker.path: the weights in model.safetensors do not fit config.json "
                                               r"\(hidden_size 384, 6 layers\): layers.2.qkv.weight is \[778, 384\] in "
                                               r"the files, \[1152, 384\] by config.json$"):
        check_model_settings(read_model_folder(folder), "cpu", "float32", section="reranker")


def test_the_embedded_model_passes_the_check():
    check_model_settings(read_model_folder(default_model_path()), "cpu", "float32", matryoshka_dimensions=[128, 384])


@pytest.mark.parametrize("text", ["{}", "not json", '{"version": "1.0", "model": {"type": "Nope"}}'])
def test_a_tokenizer_json_the_tokenizers_library_cannot_load_is_refused(tmp_path, text):
    folder = _folder(tmp_path, "badtok", tokenizer=text)
    with pytest.raises(ModelFolderError, match="tokenizer.json is not a tokenizer the tokenizers library can load") as err:
        read_model_folder(folder)
    assert "\n" not in str(err.value)


def test_a_file_or_a_hub_id_in_place_of_the_folder_is_named(tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelFolderError, match=r"model.safetensors is a file, not a model folder"):
        read_model_folder(tmp_path / "model.safetensors")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelFolderError, match=r"model folder BAAI/bge-small-en-v1.5 does not exist; .* nothing is "
                                               r"downloaded, a local folder is needed \(e.g. `huggingface-cli download "
                                               r"BAAI/bge-small-en-v1.5 --local-dir bge-small-en-v1.5`"):
        read_model_folder("BAAI/bge-small-en-v1.5")
    with pytest.raises(ModelFolderError, match=r"^model folder /nonexistent/model does not exist$"):
        read_model_folder("/nonexistent/model")


def test_matryoshka_sizes_past_the_output_are_refused_before_loading():
    folder = read_model_folder(default_model_path())
    with pytest.raises(ModelFolderError, match=r"^model.matryoshka_dimensions=\[1000, 384\]: each must be from 1 to the "
                                               r"model's 384-dim output$"):
        check_model_settings(folder, "cpu", "float32", matryoshka_dimensions=[1000, 384])
