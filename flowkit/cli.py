"""``flowkit`` command line: list, check, train, sample, nll, compare.

``flowkit nll`` scores a trained run, or a model you bring (``--model DIR --adapter
diffusers|edm|score_sde --data RECIPE``: bits/dim with dequantisation bounds and their
standard errors, :mod:`flowkit.dequantise`); ``--save-points`` writes every point's
log-likelihood, NFE and latent. Under ``accelerate launch --multi_gpu --num_processes P -m
flowkit.cli nll ...`` the test batches are dealt to the ``P`` processes, each solves its own
with its own adaptive steps (no DDP wrapper, nothing collective inside a solve), and the
per-point results are gathered in order: the numbers of one process.

User errors (bad recipe, bad argument, missing or busy run directory, unreadable
checkpoint, full disk) print one clear message and exit with status 2, a diverged run with
3 — no traceback. Ctrl-C exits with 130 and SIGTERM (what schedulers send) with 143, both
leaving the last checkpoint intact.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

__all__ = ["main"]


def _cmd_list(args) -> int:
    import flowkit
    from flowkit.registry import all_registries

    for kind, registry in all_registries().items():
        if not len(registry):
            continue
        for name in registry.names():
            print(f"{kind:<10} {name:<22} {registry.describe(name)}")
    return 0


def _cmd_check(args) -> int:
    import flowkit

    recipe = flowkit.load_recipe(args.recipe, args.overrides)
    flowkit.validate(recipe, str(args.recipe))
    parts = ", ".join(f"{k}={recipe[k]['name'] if isinstance(recipe[k], dict) else recipe[k]}"
                      for k in ("data", "dynamics", "objective", "sampler") if k in recipe)
    print(f"{args.recipe}: ok ({parts})")
    return 0


class ArgumentError(ValueError):
    """A command-line argument that cannot work; the message names it."""


class _Terminated(BaseException):
    """Raised by the SIGTERM handler so that a terminated command unwinds like Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def _cmd_train(args) -> int:
    import flowkit

    out = Path(args.out).expanduser()  # `--out=~/x` reaches us unexpanded (bash expands ~ only at a word's start)
    # On --resume the file is compared with the run's saved recipe: settings that may change
    # take effect, the others are refused with the differing keys.
    if args.resume and not Path(args.recipe).is_file() and (out / "recipe.yaml").is_file():
        raise ArgumentError(f"{args.recipe}: no such file; to continue the run with its own recipe, "
                            f"pass {out / 'recipe.yaml'}")
    recipe = flowkit.load_recipe(args.recipe)
    result = flowkit.train(recipe, out, overrides=args.overrides, resume=args.resume, overwrite=args.overwrite,
                           source=str(args.recipe), progress=not args.no_progress)
    last = {k: round(v, 5) if isinstance(v, float) else v for k, v in result.last_metrics.items()
            if k in ("step", "loss", "nll", "nfe", "nfe_backward", "it_per_s")}
    budget = "" if result.stopped_by == "steps" else f" (stopped by train.{result.stopped_by})"
    print(f"trained {out} to step {result.step}{budget}: {last}")
    return 0


def _parse_cond(value: Optional[str]):
    """``--cond 3`` (a class label) or ``--cond 0.5,1.0`` (a vector)."""
    if value is None:
        return None
    import torch

    try:
        return torch.tensor(int(value))
    except ValueError:
        pass
    try:
        vector = [float(v) for v in value.split(",")]
    except ValueError:
        raise ArgumentError(f"--cond {value}: expected a class label (an integer) or comma-separated "
                            "numbers") from None
    if not all(math.isfinite(v) for v in vector):
        raise ArgumentError(f"--cond {value}: every number must be finite")
    return torch.tensor(vector)


def _check_device(device: str) -> None:
    """``--device``: a device torch knows and this machine has."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ArgumentError(f"--device {device}: not a device torch knows (e.g. cpu, cuda, cuda:1, mps)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError(f"--device {device}: this machine has no CUDA device; use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ArgumentError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices")
    if parsed.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ArgumentError(f"--device {device}: MPS is not available here; use --device cpu")


def _check_run(run: str) -> None:
    path = Path(run)
    if not path.exists():
        raise ArgumentError(f"run directory {run} does not exist")
    if not path.is_dir():
        raise ArgumentError(f"{run} is a file, not a run directory (give the directory passed to train --out)")


def _check_count(name: str, value: Optional[int]) -> None:
    if value is not None and value <= 0:
        raise ArgumentError(f"{name} must be a positive integer, got {value}")


#: output files checked by :func:`_check_output_file`: suffix -> what it holds ("" for nothing to add)
SAMPLE_SUFFIXES = {".png": "also writes .npy", ".npy": ""}
POINTS_SUFFIXES = {".npz": "numpy", ".pt": "torch"}


def _checkpoints(run: str) -> tuple[Path, str]:
    """A run's checkpoints directory, which no output file may land in."""
    return Path(run) / "checkpoints", "the run's checkpoints"


def _check_output_file(flag: str, path: str | Path, suffixes: dict[str, str],
                       protected: Optional[tuple[Path, str]] = None) -> Path:
    """An output file argument (``sample --out``, ``nll --save-points``), checked before any work.

    Its suffix is one of ``suffixes``; it is not an existing directory or other non-file; it does
    not lie inside ``protected`` (a directory flowkit never writes into, and what it holds: a
    run's checkpoints, a model you bring); its directory exists (or is created here) and takes a
    new file. Each failure is an :class:`ArgumentError` naming ``flag``.

    Returns:
        ``path`` as a :class:`~pathlib.Path` (messages name it as given).
    """
    out = Path(path).expanduser()  # `--out=~/x` reaches us unexpanded (bash expands ~ only at a word's start)
    endings = " or ".join(f"{s} ({what})" if what else s for s, what in suffixes.items())
    if out.suffix not in suffixes:
        raise ArgumentError(f"{flag} {path}: must end in {endings}, got {out.suffix or 'no suffix'}")
    plain = " or ".join(suffixes)
    if protected is not None:
        folder, what = protected
        guarded = folder.expanduser().resolve()
        if guarded == out.resolve() or guarded in out.resolve().parents:
            raise ArgumentError(f"{flag} {path}: inside {folder}, {what}, which flowkit never writes into; "
                                "give a path outside it")
    if out.is_dir():
        raise ArgumentError(f"{flag} {path} is a directory; give a file name ending in {plain}")
    if out.exists() and not out.is_file():
        raise ArgumentError(f"{flag} {path} exists and is not a regular file; give a file name ending in {plain}")
    existing = next((p for p in (out.parent, *out.parent.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ArgumentError(f"{flag} {path}: {existing} is a file, not a directory; give a path in a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArgumentError(f"{flag} {path}: cannot create directory {out.parent} ({exc.strerror or exc})") from None
    try:  # write access as the file system sees it (os.access says yes to root on /proc)
        fd, probe = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ArgumentError(f"{flag} {path}: cannot write in {out.parent} ({exc.strerror or exc})") from None
    return out


def _write_output(path: Path, write: Callable[[Path], Any], flag: str = "--out") -> None:
    """``write(tmp)`` then rename onto ``path``: a full disk leaves no truncated output; an error
    names ``flag``, the argument that chose ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except OSError as exc:
        detail = exc.strerror or str(exc)
        raise ArgumentError(f"{flag} {path}: could not write it ({detail}); nothing was left there") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


#: the samplers of ``--nfe`` when ``--samplers`` is not given (those a model cannot run are listed as skipped)
DEFAULT_NFE_SAMPLERS = "euler,ddim,dpmpp_2m,unipc,edm_heun,flow_map"


def _nfe_lists(args) -> tuple[list[int], list[str]]:
    """``--nfe`` and ``--samplers`` of ``sample`` and ``compare``, checked before any work."""
    from flowkit.nfe_sweep import parse_nfes, parse_samplers

    if args.samplers is not None and args.nfe is None:
        raise ArgumentError("--samplers goes with --nfe (the budgets to sample at), e.g. --nfe 1,2,4,8")
    try:
        return parse_nfes(args.nfe), parse_samplers(args.samplers or DEFAULT_NFE_SAMPLERS)
    except ValueError as exc:
        raise ArgumentError(str(exc)) from None


def _sample_nfe(args, out: Path) -> int:
    """``flowkit sample RUN --nfe 1,2,4 [--samplers a,b]``: quality against NFE of one run."""
    from flowkit.nfe_sweep import sweep_runs

    nfes, samplers = _nfe_lists(args)
    _check_count("--seeds", args.seeds)
    if args.overrides or args.cond is not None or args.guidance:
        raise ArgumentError("--nfe samples with the samplers of --samplers at each budget; leave out the "
                            "sampler overrides, --cond and --guidance")
    if out.suffix != ".png":
        raise ArgumentError(f"--out {out}: with --nfe give the plot's file name, ending in .png "
                            "(the table goes next to it as .md, .csv and .json)")
    _check_device(args.device)
    out = _check_output_file("--out", out, {".png": "the plot"}, protected=_checkpoints(args.run))
    prefix = out.with_suffix("")
    _, paths = sweep_runs({Path(args.run).name: args.run}, samplers, nfes, prefix, n=args.n,
                          seeds=tuple(range(args.seed, args.seed + args.seeds)), device=args.device,
                          ema=not args.no_ema)
    print(prefix.with_suffix(".md").read_text())
    print(f"wrote {', '.join(map(str, paths))}")
    return 0


def _cmd_sample(args) -> int:
    out = Path(args.out)
    _check_count("--n", args.n)  # every argument before any work
    _check_run(args.run)
    if args.nfe is not None or args.samplers is not None:
        if args.nfe is None:
            raise ArgumentError("--samplers goes with --nfe (the budgets to sample at), e.g. --nfe 1,2,4,8")
        return _sample_nfe(args, out)
    if not math.isfinite(args.guidance):
        raise ArgumentError(f"--guidance must be a finite number, got {args.guidance}")
    cond = _parse_cond(args.cond)
    _check_device(args.device)
    if out.suffix == ".png" and out.with_suffix(".npy").expanduser().is_dir():
        raise ArgumentError(f"--out {out}: the samples also go to {out.with_suffix('.npy')}, which is a directory; "
                            "give another file name")
    # last: it creates the output's directory
    out = _check_output_file("--out", out, SAMPLE_SUFFIXES, protected=_checkpoints(args.run))
    import numpy as np
    import flowkit
    from flowkit.plotting import plot_samples

    built, step = flowkit.load_run(args.run, args.overrides, ema=not args.no_ema, device=args.device)
    if getattr(type(built.objective), "variational", False):  # declared: it samples itself, no flow
        return _sample_variational(args, built, step, out)
    if cond is not None and not built.conditional:
        raise ArgumentError(f"--cond {args.cond}: the model of {args.run} takes no condition (its dynamics "
                            "set neither num_classes nor cond_dim); leave --cond out")
    flow = built.objective.flow()
    if cond is not None:
        cond = cond.expand(args.n, *cond.shape) if cond.dim() else cond.expand(args.n)
    sampler = built.sampler
    if args.guidance:
        base = sampler
        sampler = lambda f, x, cond=None: base(f, x, cond=cond, guidance=args.guidance)  # noqa: E731
    res = flowkit.generate(flow, sampler, args.n, cond=cond, seed=args.seed, device=args.device)
    x = res.x.cpu()

    def save_array(path: Path) -> None:
        with open(path, "wb") as fh:
            np.save(fh, x.numpy())

    if out.suffix == ".png":
        if x[0].numel() == 2:
            data, _ = built.dataset.test_set(args.n, seed=built.eval.seed)
            _write_output(out, lambda p: plot_samples(x, p, data=data,
                                                      title=f"{Path(args.run).name} step {step} (NFE {res.nfe})"))
        else:
            from flowkit.plotting import plot_image_grid

            _write_output(out, lambda p: plot_image_grid(x, p, dataset=built.dataset))
    _write_output(out.with_suffix(".npy"), save_array)
    print(f"wrote {args.n} samples to {out} (NFE {res.nfe}, sampler {getattr(built.sampler, 'name', '?')})")
    return 0


def _sample_variational(args, built, step: int, out: Path) -> int:
    """``flowkit sample`` of a variational model (``vae``): decoder means of prior draws; with a .png
    (image data), also ``<out stem>_reconstructions.png``: test images above their reconstructions."""
    import numpy as np
    from flowkit.evaluate import variational_pictures
    from flowkit.plotting import plot_image_grid

    if args.cond is not None or args.guidance:
        raise ArgumentError(f"--cond / --guidance: the model of {args.run} ({built.recipe['objective']['name']}) "
                            "takes no condition and has no sampler to guide; leave them out")
    if out.suffix == ".png" and len(tuple(built.dataset.shape)) != 3:
        raise ArgumentError(f"--out {out}: pictures of a variational model need image data; give a .npy file")
    x, pairs = variational_pictures(built.objective, built.dataset, args.n, seed=args.seed)

    def save_array(path: Path) -> None:
        with open(path, "wb") as fh:
            np.save(fh, x.numpy())

    recon = out.with_name(f"{out.stem}_reconstructions.png")
    if out.suffix == ".png":
        _write_output(out, lambda p: plot_image_grid(x, p, dataset=built.dataset))
        _write_output(recon, lambda p: plot_image_grid(pairs, p, dataset=built.dataset))
    _write_output(out.with_suffix(".npy"), save_array)
    also = f" and test images with their reconstructions to {recon}" if out.suffix == ".png" else ""
    print(f"wrote {args.n} prior samples (decoder means) to {out}{also} (step {step}; a variational model, "
          "no sampler)")
    return 0


def _save_records(path: Path, records: dict[str, Any]) -> None:
    """Per-point arrays to ``.npz`` or ``.pt`` (atomically, like every output)."""
    import numpy as np
    import torch

    def write(tmp: Path) -> None:
        if path.suffix == ".npz":
            with open(tmp, "wb") as fh:
                np.savez(fh, **{k: np.asarray(v) for k, v in records.items()})
        else:
            torch.save({k: torch.as_tensor(np.asarray(v)) if not isinstance(v, str) else v
                        for k, v in records.items()}, tmp)

    _write_output(path, write, "--save-points")


def _processes(device: str):
    """``(accelerator, sharding)`` when a launcher started several processes, else ``(None, None)``.

    Under ``accelerate launch --multi_gpu --num_processes P -m flowkit.cli nll ...`` the processes
    join one job (gloo on CPUs, as :func:`flowkit.trainer.train` does) and each solves its share
    of the test batches (:class:`flowkit.evaluate.Sharding`).
    """
    from flowkit.rundir import launcher_processes

    if launcher_processes() is None:
        return None, None
    import torch
    from accelerate import Accelerator
    from flowkit.evaluate import accelerate_sharding
    from flowkit.trainer import check_launch

    accelerator = Accelerator(cpu=device == "cpu" or not torch.cuda.is_available())
    check_launch(accelerator)
    return accelerator, accelerate_sharding(accelerator)


def _cmd_nll(args) -> int:
    _check_count("--n", args.n)
    _check_count("--batch-size", args.batch_size)
    _check_count("--draws", args.draws)
    if args.model is not None or args.adapter is not None:
        return _nll_adapter(args)
    if args.run is None:
        raise ArgumentError("give a run directory (flowkit nll RUN), or a model you bring: --model DIR "
                            "--adapter diffusers|edm|score_sde --data RECIPE")
    given = [flag for flag, value in (("--data", args.data), ("--dequantise", args.dequantise),
                                      ("--scale", args.scale), ("--divergence", args.divergence),
                                      ("--float64", args.float64 or None), ("--importance-weighted",
                                      args.importance_weighted or None)) if value is not None]
    if given:
        raise ArgumentError(f"{', '.join(given)}: options of a model brought with --model/--adapter; a trained run "
                            "takes its data and evaluation settings from its recipe (override them as eval.KEY=VALUE)")
    _check_run(args.run)
    _check_device(args.device)
    points_path = None if args.save_points is None else _check_output_file("--save-points", args.save_points,
                                                                          POINTS_SUFFIXES,
                                                                          protected=_checkpoints(args.run))
    import flowkit
    from dataclasses import replace

    accelerator, sharding = _processes(args.device)
    main = accelerator is None or accelerator.is_main_process
    device = args.device if accelerator is None or accelerator.device.type == "cpu" else str(accelerator.device)
    if accelerator is not None and main:
        from flowkit.trainer import describe_processes

        print(f"flowkit nll: {describe_processes(accelerator)}, each solving its share of the test batches")
    overrides = list(args.overrides)
    built, step = flowkit.load_run(args.run, overrides, ema=not args.no_ema, device=device)
    variational = getattr(type(built.objective), "variational", False)
    if not variational:  # a variational model's number is its IWAE bound; others need a density
        from flowkit.objectives import require_density

        require_density(built.objective, by="flowkit nll")
    elif accelerator is not None or points_path is not None:
        raise ArgumentError(f"{'--save-points' if points_path else 'accelerate launch'}: the model of {args.run} is "
                            "variational (bounds, not a flow solve per point); run flowkit nll in one process without it")
    cfg = built.eval
    if args.n:
        cfg = replace(cfg, n=args.n)
    if args.batch_size:
        cfg = replace(cfg, batch_size=args.batch_size)
    if not main:  # sample metrics once, on the main process
        cfg = replace(cfg, metrics=False)
    res = flowkit.evaluate_model(built.objective, built.dataset, built.sampler, cfg, conditional=built.conditional,
                                 device=device, progress=not args.json and main, sharding=sharding,
                                 points=points_path is not None).metrics
    if not main:
        return 0
    res["step"] = step
    found = res.pop("points", None)
    if points_path is not None:
        records = {"index": found.index.numpy(), "log_prob": found.log_likelihood.numpy(),
                   "nfe": found.nfe.numpy(), "latent": found.latent.double().numpy(), "process": found.process.numpy()}
        if res["bpd"] is not None:
            from flowkit.likelihood import bits_per_dim

            records["bpd"] = bits_per_dim(-found.log_likelihood, _event_dim(found), built.dataset.log_scale).numpy()
        _save_records(points_path, records)
        res["points_file"] = str(points_path)
    if accelerator is not None:
        res["processes"] = accelerator.num_processes
    if args.json:
        print(json.dumps(res))
    elif variational:  # declared: its bounds, not a flow NLL
        bpd = f", {res['bpd']:.4f} bits/dim" if res["bpd"] is not None else ""
        print(f"test negative ELBO {res['neg_elbo']:.4f} ± {res['neg_elbo_sem']:.4f} nats (recon {res['recon']:.4f}, "
              f"KL {res['kl']:.4f}); IWAE NLL (k={res['iwae_k']}) {res['nll']:.4f} ± {res['nll_sem']:.4f} nats{bpd} "
              f"on {res['n']} points (step {step})")
    else:
        bpd = f", {res['bpd']:.4f} bits/dim" if res["bpd"] is not None else ""
        print(f"test NLL {res['nll']:.4f} ± {res['nll_sem']:.4f} nats{bpd} on {res['n']} points "
              f"(mean NFE {res['nfe']:.1f}, {res['divergence']} trace, rtol={res['rtol']:g}, step {step})")
        if "energy_distance" in res:
            print(f"samples (NFE {res['sample_nfe']}) against as many test points: energy distance "
                  f"{res['energy_distance']:.4g} (V-statistic, >= 0; 0 only for identical samples), "
                  f"MMD {res['mmd']:.4g} (mean of RBF kernels at 1/16, 1/4, 1 x h, h = {res['mmd_bandwidth']:.3g} "
                  f"the data's median distance), sliced W2 {res['sliced_w2']:.4g}")
        if "feature_fd" in res:
            print(f"samples: Frechet distance of {res['feature_space']} features {res['feature_fd']:.4g}")
    if points_path is not None and not args.json:
        print(f"wrote per-point log-likelihood, NFE and latent of {res['n']} points to {points_path}")
    return 0


def _event_dim(points) -> int:
    """Dimensions per point of per-point results (their latent's event size)."""
    return math.prod(points.latent.shape[1:])


def _nll_adapter(args) -> int:
    """``flowkit nll --model DIR --adapter NAME --data RECIPE``: bits/dim of a model brought from
    elsewhere on the recipe's quantised test images (:mod:`flowkit.dequantise`)."""
    missing = [flag for flag, value in (("--model DIR", args.model), ("--adapter NAME", args.adapter),
                                        ("--data RECIPE", args.data)) if value is None]
    if missing:
        raise ArgumentError(f"{', '.join(missing)}: a model you bring needs --model (its directory), --adapter "
                            "(diffusers, edm or score_sde) and --data (a recipe whose data section names the "
                            "quantised images)")
    if args.run is not None:
        raise ArgumentError(f"{args.run}: give a run directory or --model, not both")
    if args.overrides:
        raise ArgumentError(f"{' '.join(args.overrides)}: overrides apply to a trained run's recipe; with --model "
                            "use the flags (--dequantise, --draws, --divergence, --rtol, ...)")
    if args.draws is not None and args.draws < 2 and args.importance_weighted:
        raise ArgumentError("--importance-weighted needs --draws 2 or more (one draw is the plain bound)")
    for flag, value in (("--rtol", args.rtol), ("--atol", args.atol)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ArgumentError(f"{flag} must be a finite number > 0, got {value}")
    _check_device(args.device)
    points_path = None if args.save_points is None else _check_output_file(
        "--save-points", args.save_points, POINTS_SUFFIXES, protected=(Path(args.model), "the model's directory"))
    import torch
    import flowkit
    from flowkit.adapters import load_model
    from flowkit.data_real import QuantisedImages
    from flowkit.dequantise import DiscreteLikelihood, Quantisation, discrete_log_likelihood, point_records
    from flowkit.evaluate import _batch_seed, gather_rows, shard_batches
    from flowkit.recipe import build_data
    from flowkit.solvers import SolverSpec

    dataset = build_data(flowkit.load_recipe(args.data), str(args.data))
    if not isinstance(dataset, QuantisedImages) or getattr(dataset, "binarize", False):
        raise ArgumentError(f"--data {args.data}: bits/dim of a brought model need quantised images stored as "
                            f"integer levels (data: {{name: digits}}); {type(dataset).__name__} "
                            f"{'is binarised' if getattr(dataset, 'binarize', False) else 'is not'}")
    accelerator, _ = _processes(args.device)
    main = accelerator is None or accelerator.is_main_process
    device = args.device if accelerator is None or accelerator.device.type == "cpu" else str(accelerator.device)
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    if accelerator is not None and main:
        from flowkit.trainer import describe_processes

        print(f"flowkit nll: {describe_processes(accelerator)}, each solving its share of the test batches")
    dtype = torch.float64 if args.float64 else torch.float32
    flow = load_model(args.model, args.adapter, device=device, dtype=dtype)
    scale = args.scale or "centred"
    quant = (Quantisation.centred if scale == "centred" else Quantisation.partition)(dataset.levels, -1.0, 1.0)
    k = dataset.test[: args.n] if args.n else dataset.test
    batch = args.batch_size or 256
    solver = SolverSpec("dopri5", rtol=args.rtol or 1e-5, atol=args.atol or 1e-5)
    method, draws = args.dequantise or "uniform", args.draws or 1
    rows: dict[str, list] = {"index": [], "values": [], "nfe": [], "latent": []}
    for b, start, stop in shard_batches(k.shape[0], batch, rank, world):
        generator = torch.Generator(device=device).manual_seed(_batch_seed(args.seed, b))
        part = discrete_log_likelihood(flow, k[start:stop].to(device), quant, method=method, draws=draws,
                                       importance_weighted=args.importance_weighted, generator=generator,
                                       dtype=dtype, estimator=args.divergence or "exact", solver=solver)
        rows["index"].append(torch.arange(start, stop))
        rows["values"].append(part.values.T.contiguous())
        rows["nfe"].append(part.nfe.double().mean().expand(stop - start).clone())
        rows["latent"].append(part.z.detach().double().cpu())
    empty = {"index": torch.zeros(0, dtype=torch.long), "values": torch.zeros(0, draws, dtype=torch.float64),
             "nfe": torch.zeros(0, dtype=torch.float64), "latent": torch.zeros(0, *k.shape[1:], dtype=torch.float64)}
    mine = {key: torch.cat(v) if v else empty[key] for key, v in rows.items()}
    parts = [mine] if accelerator is None else gather_rows(accelerator, mine)
    if not main:
        return 0
    merged = {key: torch.cat([p[key] for p in parts]) for key in mine}
    order = torch.argsort(merged["index"])
    merged = {key: v[order] for key, v in merged.items()}
    values = merged["values"].T
    log_prob = (torch.logsumexp(values, 0) - math.log(draws)) if args.importance_weighted else values.mean(0)
    result = DiscreteLikelihood(values, log_prob, merged["nfe"], merged["latent"], math.prod(k.shape[1:]), method,
                                args.importance_weighted)
    summary = result.summary()
    out = {"bpd": summary.bpd, "bpd_se": summary.se, "bpd_se_data": summary.se_data,
           "bpd_se_noise": summary.se_noise, "n": summary.points, "draws": summary.draws, "method": method,
           "scale": scale, "importance_weighted": args.importance_weighted, "adapter": args.adapter,
           "divergence": args.divergence or "exact", "rtol": solver.rtol, "atol": solver.atol,
           "nfe": float(merged["nfe"].mean()), "processes": world}
    if points_path is not None:
        records = {**point_records(result, merged["index"]), "method": method}
        records["nfe"] = merged["nfe"].numpy()
        _save_records(points_path, records)
        out["points_file"] = str(points_path)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.model} ({args.adapter}) on {args.data}: {summary} [{method} dequantisation, {scale} levels, "
              f"{out['divergence']} trace, rtol={solver.rtol:g}, mean NFE {out['nfe']:.1f}]")
        if points_path is not None:
            print(f"wrote per-point log-likelihood, bits/dim, NFE and latent of {summary.points} points to {points_path}")
    return 0


def _cmd_compare(args) -> int:
    from flowkit.compare import compare, parse_budget

    nfe_lists = _nfe_lists(args) if args.nfe is not None or args.samplers is not None else None
    _check_count("--samples", args.samples)
    _check_count("--seeds", args.seeds)
    _check_count("--jobs", args.jobs)
    if args.curve_points is not None and args.curve_points < 0:
        raise ArgumentError(f"--curve-points must be 0 or more, got {args.curve_points}")
    try:
        budget = parse_budget(args.budget) if args.budget else None
    except ValueError as exc:
        raise ArgumentError(str(exc)) from None
    rows = compare(args.recipes, args.out, overrides=args.set or [], objectives=args.objectives, budget=budget,
                   seeds=args.seeds, jobs=args.jobs, curve_points=args.curve_points, samples=args.samples,
                   overwrite=args.overwrite)
    print((Path(args.out) / "compare.md").read_text())
    if nfe_lists is not None:
        from flowkit.nfe_sweep import sweep_runs

        runs = {r["run"] if r.get("seed") is None else f"{r['run']} seed{r['seed']}": r["run_dir"]
                for r in rows if r.get("status") == "ok"}
        if runs:
            sweep_runs(runs, nfe_lists[1], nfe_lists[0], Path(args.out) / "nfe", n=args.samples, seeds=(0, 1, 2))
            print((Path(args.out) / "nfe.md").read_text())
    written = [p for p in ("compare.md", "compare.csv", "compare_summary.csv", "compare.json", "curves_time.png",
                           "curves_evaluations.png", "samples.png", "nfe.md", "nfe.csv", "nfe.json", "nfe.png")
               if (Path(args.out) / p).is_file()]
    print(f"wrote {', '.join(f'{args.out}/{p}' for p in written)}")
    return 0 if any(r.get("status") == "ok" for r in rows) else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowkit", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="every registered component, one line each").set_defaults(fn=_cmd_list)

    c = sub.add_parser("check", help="validate a recipe without training")
    c.add_argument("recipe")
    c.add_argument("overrides", nargs="*", help="dotted overrides key.path=value")
    c.set_defaults(fn=_cmd_check)

    t = sub.add_parser("train", help="train a recipe")
    t.add_argument("recipe")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=2000")
    t.add_argument("--out", required=True, help="run directory")
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    mode.add_argument("--overwrite", action="store_true",
                      help="replace the run in --out (its recipe, metrics, checkpoints and samples)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=_cmd_train)

    s = sub.add_parser("sample", help="draw samples from a trained run")
    s.add_argument("run")
    s.add_argument("overrides", nargs="*", help="e.g. sampler.name=rk4 sampler.steps=20")
    s.add_argument("--n", type=int, default=2000)
    s.add_argument("--out", required=True, help=".png (also writes .npy) or .npy")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--cond", help="class label or comma-separated vector")
    s.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance scale w")
    s.add_argument("--no-ema", action="store_true")
    s.add_argument("--device", default="cpu")
    s.add_argument("--nfe", help="comma-separated NFE budgets: write sample quality against NFE (OUT.png and the "
                   "table as OUT.md/.csv/.json) instead of samples")
    s.add_argument("--samplers", help=f"comma-separated samplers for --nfe (default {DEFAULT_NFE_SAMPLERS})")
    s.add_argument("--seeds", type=int, default=3, help="--nfe: seeds from --seed on (mean ± standard error)")
    s.set_defaults(fn=_cmd_sample)

    n = sub.add_parser("nll", help="test negative log-likelihood of a trained run, or of a model you bring "
                       "(--model DIR --adapter NAME --data RECIPE); shards under accelerate launch")
    n.add_argument("run", nargs="?", help="run directory (or use --model)")
    n.add_argument("overrides", nargs="*", help="e.g. eval.divergence=hutchinson eval.rtol=1e-6")
    n.add_argument("--n", type=int, default=None)
    n.add_argument("--batch-size", type=int, default=None)
    n.add_argument("--json", action="store_true", help="print one JSON line")
    n.add_argument("--no-ema", action="store_true")
    n.add_argument("--device", default="cpu")
    n.add_argument("--save-points", help="per-point log-likelihood, NFE and latent to a .npz or .pt file")
    brought = n.add_argument_group("a model you bring (flowkit.adapters, flowkit.dequantise)")
    brought.add_argument("--model", help="local directory of the model")
    brought.add_argument("--adapter", choices=["diffusers", "edm", "score_sde"])
    brought.add_argument("--data", help="recipe whose data section gives the quantised test images")
    brought.add_argument("--dequantise", choices=["uniform", "truncated_normal"], help="default uniform")
    brought.add_argument("--draws", type=int, default=None, help="dequantisation (and probe) draws per point")
    brought.add_argument("--importance-weighted", action="store_true", help="the importance-weighted bound")
    brought.add_argument("--scale", choices=["centred", "partition"],
                         help="levels in [-1, 1]: centred on 2k/(K-1) - 1 (DDPM; default) or bins partitioning it")
    brought.add_argument("--divergence", choices=["exact", "hutchinson"], help="default exact")
    brought.add_argument("--rtol", type=float, default=None, help="default 1e-5")
    brought.add_argument("--atol", type=float, default=None, help="default 1e-5")
    brought.add_argument("--seed", type=int, default=0, help="seed of dequantisation noise and probes")
    brought.add_argument("--float64", action="store_true", help="run the model in float64")
    n.set_defaults(fn=_cmd_nll)
    m = sub.add_parser("compare", help="train several recipes and evaluate them alike")
    m.add_argument("recipes", nargs="+", help="recipe files (or one base recipe with --objectives)")
    m.add_argument("--objectives", help="comma-separated objectives to swap into one base recipe")
    m.add_argument("--set", nargs="*", help="overrides applied to every run, e.g. train.steps=500")
    m.add_argument("--out", required=True)
    m.add_argument("--samples", type=int, default=2000, help="samples per run for the sample metrics")
    m.add_argument("--budget", help="the same budget for every run: steps=N, seconds=S (of training) or "
                   "evaluations=E (network evaluations of the training loss)")
    m.add_argument("--seeds", type=int, default=None,
                   help="train every configuration with train.seed = 0 .. N-1; the table gives mean ± SE and paired tests")
    m.add_argument("--jobs", type=int, default=None,
                   help="runs at a time, each in its own process on its own cores (default: one per CPU)")
    m.add_argument("--curve-points", type=int, default=8,
                   help="periodic evaluations per run, evenly spaced over the budget, for the curves (0: none)")
    m.add_argument("--overwrite", action="store_true", help="train again runs that --out already holds")
    m.add_argument("--nfe", help="comma-separated NFE budgets: also write sample quality against NFE of every run "
                   "(nfe.md/.csv/.json/.png in --out)")
    m.add_argument("--samplers", help=f"comma-separated samplers for --nfe (default {DEFAULT_NFE_SAMPLERS})")
    m.set_defaults(fn=_cmd_compare)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    # overrides may also come after the flags: `train R --out D train.steps=5`
    extra = [a for a in rest if "=" in a and not a.startswith("-")]
    if len(extra) != len(rest) or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if extra:
        args.overrides = list(getattr(args, "overrides", [])) + extra
    from flowkit.checkpoint import RunDirectoryError
    from flowkit.flow import FieldError, NonFiniteFieldError
    from flowkit.solvers import SolverError
    from flowkit.recipe import RecipeError
    from flowkit.registry import RegistryError
    from flowkit.trainer import LaunchError, TrainingDiverged
    from flowkit.adapters import AdapterError

    kept = "; the last checkpoint is intact (use --resume)" if args.command == "train" else ""
    previous = _install_sigterm()
    try:
        return args.fn(args)
    except RecipeError as exc:
        print(f"flowkit {args.command}: {exc}", file=sys.stderr)
        return 2
    except (RunDirectoryError, RegistryError, ArgumentError, LaunchError, AdapterError) as exc:
        print(f"flowkit {args.command}: {exc}", file=sys.stderr)
        return 2
    except (TrainingDiverged, NonFiniteFieldError) as exc:  # a model that went non-finite
        print(f"flowkit {args.command}: {exc}", file=sys.stderr)
        return 3
    except (FieldError, SolverError) as exc:  # e.g. an override that makes the model's output the wrong shape
        print(f"flowkit {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flowkit {args.command}: interrupted{kept}", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"flowkit {args.command}: terminated{kept}", file=sys.stderr)
        return 128 + int(signal.SIGTERM)
    except BrokenPipeError:  # `flowkit list | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at interpreter exit
        return 0
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"flowkit {args.command}: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _install_sigterm() -> object:
    """Handle SIGTERM like Ctrl-C (main thread only); returns the handler to restore."""
    try:
        return signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        return None


if __name__ == "__main__":
    sys.exit(main())
