r"""A diffusers model (``UNet2DModel`` or any ``ModelMixin``) with its DDPM scheduler, as a flowkit Flow.

A diffusers model is called as ``model(x, timestep).sample`` and was trained on the discrete
timesteps of its scheduler (``DDPMScheduler``: ``num_train_timesteps``, ``beta_schedule``,
``prediction_type``). :func:`from_diffusers` maps those timesteps exactly onto the continuous
:class:`~flowkit.adapters.ddpm.DDPMPath` (``ᾱ`` exact at every timestep, interpolated between
them; timestep ``n`` at ``t = (n + 1)/N``, the model fed the fractional timestep ``N t − 1``),
converts the prediction (``epsilon``, ``v_prediction``, ``sample``) to the score
(:mod:`flowkit.adapters.base`) and returns the probability-flow :class:`~flowkit.flow.Flow`
on ``[t0, t1] = [1/N, 1]`` (first to last timestep) with the prior ``N(0, I)``.

A model with a learned variance (``variance_type: learned`` / ``learned_range``; improved DDPM)
outputs ``2C`` channels; the first ``C`` are the prediction and are used.

``diffusers`` is an optional extra (``pip install flowkit[diffusers]``): only
:func:`load_diffusers` imports it, and :func:`from_diffusers` works with any module that has
the same call signature. Models load from a local directory only (``from_pretrained(...,
local_files_only=True)``): nothing is downloaded at run time.

References:
    von Platen et al. (2022). Diffusers: State-of-the-art diffusion models.
    Salimans, Ho (2022). Progressive Distillation for Fast Sampling of Diffusion Models. ICLR
    (``v``-prediction).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import Tensor

from ..flow import Flow, Prior
from .base import AdapterError, from_prediction
from .ddpm import DDPMPath, ScheduleError

__all__ = ["from_diffusers", "load_diffusers", "scheduler_config", "PREDICTION_TYPES", "require_diffusers"]

#: diffusers' ``prediction_type`` → flowkit's prediction name
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}

_INSTALL = "pip install flowkit[diffusers]  (or: pip install diffusers)"


def require_diffusers() -> Any:
    """Import ``diffusers`` or raise :class:`AdapterError` saying how to install it."""
    try:
        import diffusers
    except ImportError as exc:
        raise AdapterError(f"the diffusers adapter needs the optional package diffusers: {_INSTALL} "
                           f"({exc})") from None
    return diffusers


def scheduler_config(source: Union[Mapping[str, Any], str, Path, Any]) -> dict[str, Any]:
    """A scheduler's config as a dict, from a dict, a scheduler object (``.config``), a
    ``scheduler_config.json`` file or a directory holding one (itself or its ``scheduler/``).

    Raises:
        AdapterError: no such file, or not JSON.
    """
    if isinstance(source, Mapping):
        return dict(source)
    if hasattr(source, "config") and isinstance(getattr(source, "config"), Mapping):
        return dict(source.config)
    path = Path(source)
    candidates = [path] if path.is_file() else [path / "scheduler_config.json",
                                                path / "scheduler" / "scheduler_config.json",
                                                path.parent / "scheduler" / "scheduler_config.json"]
    for file in candidates:
        if file.is_file():
            try:
                return json.loads(file.read_text())
            except (OSError, ValueError) as exc:
                raise AdapterError(f"{file}: not a readable JSON scheduler config ({exc})") from None
    raise AdapterError(f"{path}: no scheduler_config.json (looked in {', '.join(str(c) for c in candidates)}); "
                       "save the scheduler beside the model (scheduler.save_pretrained(DIR)) or pass its config")


def _model_output(model: Callable[..., Any]) -> Callable[[Tensor, Tensor], Tensor]:
    """``model(x, timestep)`` → the prediction tensor (``.sample`` of a diffusers output, the first
    element of a tuple, or the tensor itself), its first ``C`` channels if it learned a variance."""

    def call(x: Tensor, timestep: Tensor) -> Tensor:
        out = model(x, timestep)
        out = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(out, Tensor) and out.dim() > 1 and x.dim() > 1 and out.shape[1] == 2 * x.shape[1] \
                and out.shape[2:] == x.shape[2:]:
            out = out[:, : x.shape[1]]  # learned variance: [prediction, variance] along channels
        return out

    return call


def from_diffusers(model: Callable[..., Any], scheduler: Union[Mapping[str, Any], str, Path, Any],
                   shape: Optional[tuple[int, ...]] = None, *, t0: Optional[float] = None,
                   prior: Optional[Prior] = None) -> Flow:
    """The probability-flow :class:`~flowkit.flow.Flow` of a diffusers-style model.

    Args:
        model: called as ``model(x, timestep)`` with ``timestep`` a ``[B]`` float tensor; returns an
            object with ``.sample`` (diffusers), a tuple, or a tensor.
        scheduler: its ``DDPMScheduler`` (or its config: dict, ``scheduler_config.json``, directory).
        shape: event shape; default ``(in_channels, sample_size, sample_size)`` from ``model.config``.
        t0: data-end time (default the first timestep, ``1/N``).
        prior: density at ``t = 1`` (default ``N(0, I)``).

    Returns:
        The flow; ``flow.path`` is the :class:`~flowkit.adapters.ddpm.DDPMPath`.

    Raises:
        AdapterError: unknown ``prediction_type`` or ``beta_schedule``, zero terminal SNR, no shape.

    Example:
        >>> from flowkit.likelihood import flow_log_likelihood
        >>> from flowkit.flow import StandardNormal
        >>> cfg = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}
        >>> path = DDPMPath.from_config(cfg)
        >>> def unet(x, timestep):  # the exact ε̂ for N(0, I) data, at fractional timesteps
        ...     return path.sigma(path.time(timestep))[:, None] * x
        >>> flow = from_diffusers(unet, cfg, (2,))
        >>> x = torch.randn(4, 2, dtype=torch.float64)
        >>> bool((flow_log_likelihood(flow, x).log_prob - StandardNormal((2,)).log_prob(x)).abs().max() < 1e-4)
        True
    """
    cfg = scheduler_config(scheduler)
    kind = cfg.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise AdapterError(f"scheduler prediction_type: unknown {kind!r}; choose one of {', '.join(PREDICTION_TYPES)}")
    try:
        path = DDPMPath.from_config(cfg, t0=t0)
    except ScheduleError as exc:
        raise AdapterError(f"scheduler config: {exc}") from None
    if shape is None:
        mc = getattr(model, "config", None)
        size = getattr(mc, "sample_size", None) if mc is not None else None
        channels = getattr(mc, "in_channels", None) if mc is not None else None
        if size is None or channels is None:
            raise AdapterError("shape: the model's config has no in_channels/sample_size; pass shape=(C, H, W)")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        shape = (int(channels), int(h), int(w))
    return from_prediction(_model_output(model), path, shape, prediction=PREDICTION_TYPES[kind],
                           label=path.timestep, prior=prior)


def load_diffusers(directory: Union[str, Path], *, device: Union[str, torch.device] = "cpu",
                   dtype: Optional[torch.dtype] = None, t0: Optional[float] = None) -> Flow:
    """Load a diffusers model and its scheduler config from a **local** directory, as a Flow.

    ``directory`` is what ``model.save_pretrained(DIR)`` writes (``config.json`` + weights), with
    ``scheduler_config.json`` beside it or in a sibling ``scheduler/`` (the pipeline layout
    ``DIR/unet`` + ``DIR/scheduler``: pass ``DIR/unet`` or ``DIR``). The model class is
    ``config.json``'s ``_class_name`` (any diffusers ``ModelMixin``).

    Args:
        directory: the local directory.
        device, dtype: where and in which precision to hold the model.
        t0: data-end time (default the first timestep).

    Raises:
        AdapterError: diffusers missing, not a local directory (e.g. a hub name: nothing is
            downloaded at run time), no model config, or an unusable scheduler config.
    """
    diffusers = require_diffusers()
    root = Path(directory)
    if not root.is_dir():
        raise AdapterError(f"{directory}: not a local directory; flowkit loads models from local files only "
                           "(no network at run time): download it first, e.g. `huggingface-cli download NAME "
                           "--local-dir DIR`, and pass DIR")
    model_dir = root if (root / "config.json").is_file() else root / "unet"
    if not (model_dir / "config.json").is_file():
        raise AdapterError(f"{directory}: no config.json (what model.save_pretrained(DIR) writes), "
                           f"nor {root / 'unet' / 'config.json'}")
    try:
        name = json.loads((model_dir / "config.json").read_text()).get("_class_name", "UNet2DModel")
    except ValueError as exc:
        raise AdapterError(f"{model_dir / 'config.json'}: not JSON ({exc})") from None
    cls = getattr(diffusers, str(name), None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise AdapterError(f"{model_dir / 'config.json'}: _class_name {name!r} is not a diffusers model class")
    try:
        extra = {} if dtype is None else {"torch_dtype": dtype}
        model = cls.from_pretrained(str(model_dir), local_files_only=True, **extra)
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{model_dir}: cannot load the model ({str(exc).splitlines()[0]})") from None
    model = model.to(device=device).eval()
    model.requires_grad_(False)
    return from_diffusers(model, scheduler_config(model_dir), t0=t0)
