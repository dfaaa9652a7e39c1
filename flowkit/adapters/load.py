"""Load a model you bring from a local directory, by adapter name (what ``flowkit nll --model DIR
--adapter NAME`` calls).

* ``diffusers``: the directory ``model.save_pretrained(DIR)`` writes, with the scheduler's
  ``scheduler_config.json`` (:func:`flowkit.adapters.load_diffusers`).
* ``edm`` and ``score_sde``: ``DIR/model.pt``, the network saved as TorchScript
  (``torch.jit.save(torch.jit.script(net), "model.pt")`` — loading runs no pickled Python), and
  ``DIR/adapter.json`` with the event ``shape`` and the adapter's settings:
  ``{"shape": [3, 32, 32], "sigma_min": 0.002, "sigma_max": 80}`` for EDM;
  ``{"shape": [...], "sde": "vp", "beta_min": 0.1, "beta_max": 20, "continuous": true}`` (or
  ``"sde": "ve", "sigma_min": …, "sigma_max": …``) for score_sde.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..flow import Flow
from ..paths import VE, VP, SubVP
from .base import AdapterError
from .diffusers import load_diffusers
from .edm import from_edm
from .score_sde import from_score_sde

__all__ = ["ADAPTERS", "load_model"]

#: the adapter names ``load_model`` (and ``flowkit nll --adapter``) accept
ADAPTERS = ("diffusers", "edm", "score_sde")

_SETTINGS = {"edm": {"shape", "sigma_min", "sigma_max"},
             "score_sde": {"shape", "sde", "beta_min", "beta_max", "sigma_min", "sigma_max", "continuous",
                           "num_scales", "t0"}}


def load_model(directory: Union[str, Path], adapter: str, *, device: Union[str, torch.device] = "cpu",
               dtype: Optional[torch.dtype] = None) -> Flow:
    """The Flow of the model saved in ``directory`` for ``adapter`` (module docstring).

    Raises:
        AdapterError: unknown adapter, missing or malformed files, unknown settings.
    """
    if adapter not in ADAPTERS:
        raise AdapterError(f"--adapter: unknown {adapter!r}; choose one of {', '.join(ADAPTERS)}")
    if adapter == "diffusers":
        return load_diffusers(directory, device=device, dtype=dtype)
    root = Path(directory)
    if not root.is_dir():
        raise AdapterError(f"{directory}: not a local directory (models are loaded from local files only)")
    cfg_file, net_file = root / "adapter.json", root / "model.pt"
    for f in (cfg_file, net_file):
        if not f.is_file():
            raise AdapterError(f"{f}: missing; an {adapter} model directory holds model.pt (TorchScript) and "
                               "adapter.json (see flowkit.adapters.load)")
    try:
        cfg: dict[str, Any] = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise AdapterError(f"{cfg_file}: not JSON ({exc})") from None
    unknown = sorted(set(cfg) - _SETTINGS[adapter])
    if unknown or "shape" not in cfg:
        what = f"unknown keys {', '.join(unknown)}" if unknown else "no 'shape'"
        raise AdapterError(f"{cfg_file}: {what}; {adapter} takes {', '.join(sorted(_SETTINGS[adapter]))}")
    try:
        net = torch.jit.load(str(net_file), map_location=device)
    except (RuntimeError, ValueError) as exc:
        raise AdapterError(f"{net_file}: not a TorchScript file ({str(exc).splitlines()[0]}); save the network "
                           "with torch.jit.save(torch.jit.script(net), 'model.pt')") from None
    net = net.to(dtype=dtype).eval() if dtype is not None else net.eval()
    shape = tuple(int(s) for s in cfg["shape"])
    if adapter == "edm":
        return from_edm(net, shape, sigma_min=float(cfg.get("sigma_min", 0.002)),
                        sigma_max=float(cfg.get("sigma_max", 80.0)))
    kind = cfg.get("sde", "vp")
    if kind in ("vp", "subvp"):
        extra = {"t0": float(cfg["t0"])} if "t0" in cfg else {}
        sde = (SubVP if kind == "subvp" else VP)(float(cfg.get("beta_min", 0.1)), float(cfg.get("beta_max", 20.0)),
                                                 **extra)
    elif kind == "ve":
        sde = VE(float(cfg.get("sigma_min", 0.01)), float(cfg.get("sigma_max", 50.0)))
    else:
        raise AdapterError(f"{cfg_file}: sde: unknown {kind!r}; choose one of vp, subvp, ve")
    return from_score_sde(net, sde, shape, continuous=bool(cfg.get("continuous", True)),
                          num_scales=int(cfg.get("num_scales", 1000)))
