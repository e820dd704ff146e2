"""Load and save Llama-layout checkpoints (Hugging Face ``config.json`` + safetensors).

A checkpoint folder holds::

    config.json                      HF LlamaConfig (architectures, sizes, torch_dtype, ...)
    model.safetensors                every tensor, named as in LlamaForCausalLM
  or
    model.safetensors.index.json     {"weight_map": {tensor name: shard file name}}
    model-00001-of-0000N.safetensors ...

Tensor names map one-to-one onto ``LlamaModel.state_dict()`` names
(``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.q_proj.weight``,
..., ``lm_head.weight``, absent when embeddings are tied). Tensors are cast to
the model dtype on load.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llumnix_py.engines.torch_engine.model import LlamaModel, ModelConfig

PathLike = Union[str, os.PathLike]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Tensors some HF checkpoints carry that the model recomputes instead of loading.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_checkpoint(path: PathLike, dtype: Optional[str] = None) -> tuple[ModelConfig, LlamaModel]:
    """Builds a ``LlamaModel`` from a Llama-layout checkpoint folder.

    Args:
        path: folder with ``config.json`` and ``model.safetensors`` (or a
            sharded ``model.safetensors.index.json`` with its shards).
        dtype: override the checkpoint's ``torch_dtype`` ("float32",
            "float64", "bfloat16" or "float16").

    Returns:
        The config and the model with the checkpoint's weights, in eval mode.

    Raises:
        FileNotFoundError: the folder, its config or its weights are missing.
        ValueError: the config is not a Llama config, or a tensor is missing,
            unexpected or of the wrong shape.
    """
    root = Path(path)
    config_path = root / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {root}")
    with open(config_path, encoding="utf-8") as f:
        hf_config = json.load(f)
    if not isinstance(hf_config, dict):
        raise ValueError(f"{config_path} must hold a JSON object")
    cfg = ModelConfig.from_hf_config(hf_config)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    model = LlamaModel(cfg, init_weights=False)
    _load_weights(model, _weight_map(root))
    return cfg, model


def save_checkpoint(model: LlamaModel, path: PathLike) -> None:
    """Writes ``config.json`` and ``model.safetensors`` for ``model`` into ``path``.

    The folder is created if needed; existing files of the same names are
    overwritten. ``load_checkpoint(path)`` gives back identical weights.

    Args:
        model: the model to export.
        path: destination folder.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / CONFIG_FILE, "w", encoding="utf-8") as f:
        json.dump(model.cfg.to_hf_config(), f, indent=2)
        f.write("\n")
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(root / WEIGHTS_FILE), metadata={"format": "pt"})


def _weight_map(root: Path) -> dict[str, Path]:
    """Maps every tensor name in the checkpoint to the file holding it."""
    single, index = root / WEIGHTS_FILE, root / INDEX_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    if not index.is_file():
        raise FileNotFoundError(f"neither {WEIGHTS_FILE} nor {INDEX_FILE} in {root}")
    with open(index, encoding="utf-8") as f:
        data = json.load(f)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no 'weight_map' object")
    out = {}
    for name, shard in weight_map.items():
        shard_path = root / shard
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise ValueError(f"{index}: shard path {shard!r} must stay inside the checkpoint")
        if not shard_path.is_file():
            raise FileNotFoundError(f"{index} names shard {shard!r}, which is missing")
        out[name] = shard_path
    return out


def _by_file(weight_map: dict[str, Path]) -> Iterator[tuple[Path, list[str]]]:
    files: dict[Path, list[str]] = {}
    for name, file in weight_map.items():
        files.setdefault(file, []).append(name)
    yield from files.items()


def _load_weights(model: LlamaModel, weight_map: dict[str, Path]) -> None:
    """Copies every checkpoint tensor into the parameter of the same name.

    When embeddings are tied, a stored ``lm_head.weight`` is ignored (the
    model reuses ``model.embed_tokens.weight``).
    """
    params = dict(model.named_parameters())
    names = {n for n in weight_map if not n.endswith(_IGNORED_SUFFIXES)}
    if model.cfg.tie_word_embeddings:
        names.discard("lm_head.weight")
    missing = sorted(set(params) - names)
    unexpected = sorted(names - set(params))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing tensors {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected tensors "
                         f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for file, file_names in _by_file({n: weight_map[n] for n in names}):
        with safe_open(str(file), framework="pt") as f:
            for name in file_names:
                tensor = f.get_tensor(name)
                param = params[name]
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ValueError(f"tensor {name!r} in {file.name} has shape "
                                     f"{tuple(tensor.shape)}, expected {tuple(param.shape)}")
                with torch.no_grad():
                    param.copy_(tensor.to(param.dtype))
