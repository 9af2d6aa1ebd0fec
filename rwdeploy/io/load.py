"""Load a model file of any accepted kind into an nn.Module with its input shape.

Accepted, in order of preference:
  * a `torch.export` program (`.pt2`), with the quantization spec of a quantized model when it
    carries one (`rwdeploy.quant.program`);
  * an rwdeploy checkpoint (zoo name + state_dict + input shape + masks), weights only;
  * a plain state_dict together with a zoo name (`arch=`);
  * a whole pickled nn.Module, only with `trust_pickle=True`, because unpickling runs code.
"""
from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rwdeploy import models
from rwdeploy.errors import ModelFileError, OptionError
from rwdeploy.io.checkpoint import Checkpoint
from rwdeploy.quant.program import QUANT_FILE, quant_metadata

PICKLE_WARNING = (
    "unpickling a whole module runs arbitrary code from the file; "
    "pass --trust-pickle only for files you made yourself, or save a state_dict / .pt2 instead"
)


@dataclass
class LoadedModel:
    module: nn.Module
    input_shape: tuple[int, ...]
    source: str  # 'pt2' | 'checkpoint' | 'state_dict' | 'pickle' | 'zoo'
    path: Path | None = None
    arch: str | None = None
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def example_input(self, batch: int | None = None, seed: int = 0) -> torch.Tensor:
        shape = self.input_shape if batch is None else (batch, *self.input_shape[1:])
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    def check_input(self) -> torch.Tensor:
        """Run the model once on the example input; a shape it cannot take is an OptionError."""
        x = self.example_input()
        try:
            with torch.no_grad():
                self.module(x)
        except (RuntimeError, ValueError, TypeError, AssertionError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            where = self.path or f"zoo:{self.arch}"
            raise OptionError(
                f"{where}: input shape {'x'.join(map(str, self.input_shape))} does not fit the model ({first})",
                hint="pass the right --input-shape",
            ) from None
        return x


def _is_export_archive(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("serialized_exported_program.json") or n.endswith("models/model.json")
                       for n in zf.namelist())
    except zipfile.BadZipFile:
        return False


def _load_pt2(path: Path, input_shape: tuple[int, ...] | None) -> LoadedModel:
    extra_files = {QUANT_FILE: ""}  # filled in from the archive (a quantized program's spec)
    try:
        ep = torch.export.load(str(path), extra_files=extra_files)
    except Exception as err:  # torch raises many kinds for a damaged archive
        raise ModelFileError(f"{path}: not a readable torch.export program ({type(err).__name__}: {err})",
                             hint="re-export it with torch.export.save") from None
    shape = input_shape
    if shape is None:
        args = getattr(ep, "example_inputs", None)
        if args and args[0] and isinstance(args[0][0], torch.Tensor):
            shape = tuple(args[0][0].shape)
        else:
            placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"
                            and n.name not in ep.graph_signature.inputs_to_parameters
                            and n.name not in ep.graph_signature.inputs_to_buffers]
            meta = placeholders[0].meta.get("val") if placeholders else None
            if meta is not None and all(isinstance(d, int) for d in meta.shape):
                shape = tuple(meta.shape)
    if shape is None:
        raise OptionError(f"{path}: the program records no static input shape", hint="pass --input-shape, e.g. 1,3,32,32")
    return LoadedModel(ep.module(), tuple(shape), "pt2", path, metadata=quant_metadata(extra_files, ep, path))


def _build_zoo(arch: str, state: dict[str, torch.Tensor], arch_kwargs: dict[str, Any], path: Path) -> nn.Module:
    kwargs = dict(arch_kwargs)
    if "num_classes" not in kwargs:
        # Infer the class count from the last 2-D weight so a 100-class state_dict loads as such.
        last = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
        if last:
            kwargs["num_classes"] = int(last[-1].shape[0])
    module = models.create(arch, **kwargs)
    missing, unexpected = [], []
    own = module.state_dict()
    for k in own:
        if k not in state:
            missing.append(k)
    for k, v in state.items():
        if k not in own:
            unexpected.append(k)
        elif tuple(own[k].shape) != tuple(v.shape):
            raise ModelFileError(
                f"{path}: tensor {k} has shape {tuple(v.shape)} but {arch} expects {tuple(own[k].shape)}",
                hint="check --arch, or pass the architecture's options",
            )
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ModelFileError(f"{path}: state_dict does not fit {arch} ({what})", hint="check --arch")
    module.load_state_dict(state)
    return module.eval()


def load_model(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    trust_pickle: bool = False,
) -> LoadedModel:
    """Load `path` (see module doc). Raises `ModelFileError`/`OptionError` with one-line messages."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such file", hint="check the path")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a folder, not a model file", hint="pass a .pt2 or .pt file")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path}: file is empty", hint="the file was truncated; write it again")
    if arch is not None:
        models.entry(arch)  # unknown names fail early with the list of known ones

    if _is_export_archive(path):
        return _load_pt2(path, input_shape)

    try:
        with warnings.catch_warnings():
            # torch warns about odd pickle protocols before failing on them; the error says it all.
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            if not trust_pickle:
                raise ModelFileError(f"{path}: holds a pickled Python object, not weights",
                                     hint=PICKLE_WARNING) from None
            return _load_pickle(path, input_shape)
        raise ModelFileError(f"{path}: corrupt or not a PyTorch file ({err})",
                             hint="pass a .pt2 program, an rwdeploy checkpoint or a state_dict") from None
    except Exception as err:  # the unpickler raises anything from IndexError to KeyError on junk
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelFileError(f"{path}: truncated, corrupt or not a PyTorch file ({msg})",
                             hint="pass a .pt2 program, an rwdeploy checkpoint or a state_dict") from None

    if Checkpoint.is_checkpoint(obj):
        try:
            ckpt = Checkpoint.from_dict(obj)
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFileError(f"{path}: damaged rwdeploy checkpoint (field {err})") from None
        name = arch or ckpt.arch
        module = _build_zoo(name, ckpt.state_dict, ckpt.arch_kwargs, path)
        return LoadedModel(module, input_shape or ckpt.input_shape, "checkpoint", path, name,
                           ckpt.masks, ckpt.metadata)

    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if arch is None:
            raise OptionError(f"{path}: is a plain state_dict", hint="name its architecture with --arch, e.g. --arch resnet20")
        module = _build_zoo(arch, obj, {}, path)
        return LoadedModel(module, input_shape or models.input_shape(arch), "state_dict", path, arch)

    if isinstance(obj, nn.Module):  # only reachable if torch ever allow-lists modules
        return _as_pickle_result(obj, path, input_shape)
    raise ModelFileError(f"{path}: not a model file rwdeploy understands (found {type(obj).__name__})",
                         hint="pass a .pt2 program, an rwdeploy checkpoint or a state_dict with --arch")


def _load_pickle(path: Path, input_shape: tuple[int, ...] | None) -> LoadedModel:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ModelFileError(f"{path}: could not unpickle ({type(err).__name__}: {err})") from None
    if not isinstance(obj, nn.Module):
        raise ModelFileError(f"{path}: the pickle holds a {type(obj).__name__}, not an nn.Module")
    return _as_pickle_result(obj, path, input_shape)


def _as_pickle_result(obj: nn.Module, path: Path, input_shape: tuple[int, ...] | None) -> LoadedModel:
    if input_shape is None:
        raise OptionError(f"{path}: a pickled module records no input shape", hint="pass --input-shape, e.g. 1,3,32,32")
    return LoadedModel(obj.eval(), input_shape, "pickle", path)


def load_zoo(name: str, *, input_shape: tuple[int, ...] | None = None, **kwargs: Any) -> LoadedModel:
    """A freshly built zoo network (random weights) as a LoadedModel."""
    module = models.create(name, **kwargs)
    return LoadedModel(module, input_shape or models.input_shape(name), "zoo", None, name)
