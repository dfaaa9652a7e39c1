"""``flowkit`` command line: list, check, train, sample, nll, compare.

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

    out = Path(args.out)
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


def _check_out(out: Path) -> None:
    """``--out`` of ``sample``: a .png or .npy file whose directory can be written."""
    if out.suffix not in (".png", ".npy"):
        raise ArgumentError(f"--out {out}: must end in .png (also writes .npy) or .npy, got "
                            f"{out.suffix or 'no suffix'}")
    if out.is_dir():
        raise ArgumentError(f"--out {out} is a directory; give a file name ending in .png or .npy")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArgumentError(f"--out {out}: cannot create directory {out.parent} ({exc.strerror or exc})") from None
    try:  # write access as the file system sees it (os.access says yes to root on /proc)
        fd, probe = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ArgumentError(f"--out {out}: cannot write in {out.parent} ({exc.strerror or exc})") from None


def _write_output(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` then rename onto ``path``: a full disk leaves no truncated output."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except OSError as exc:
        detail = exc.strerror or str(exc)
        raise ArgumentError(f"--out {path}: could not write it ({detail}); nothing was left there") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cmd_sample(args) -> int:
    out = Path(args.out)
    _check_count("--n", args.n)  # every argument before any work
    _check_run(args.run)
    if not math.isfinite(args.guidance):
        raise ArgumentError(f"--guidance must be a finite number, got {args.guidance}")
    cond = _parse_cond(args.cond)
    _check_device(args.device)
    _check_out(out)  # last: it creates the output's directory
    import numpy as np
    import flowkit
    from flowkit.plotting import plot_samples

    built, step = flowkit.load_run(args.run, args.overrides, ema=not args.no_ema, device=args.device)
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


def _cmd_nll(args) -> int:
    _check_count("--n", args.n)
    _check_count("--batch-size", args.batch_size)
    _check_run(args.run)
    _check_device(args.device)
    import flowkit
    from dataclasses import replace

    overrides = list(args.overrides)
    built, step = flowkit.load_run(args.run, overrides, ema=not args.no_ema, device=args.device)
    cfg = built.eval
    if args.n:
        cfg = replace(cfg, n=args.n)
    if args.batch_size:
        cfg = replace(cfg, batch_size=args.batch_size)
    res = flowkit.evaluate_model(built.objective, built.dataset, built.sampler, cfg, conditional=built.conditional,
                                 device=args.device, progress=not args.json).metrics
    res["step"] = step
    if args.json:
        print(json.dumps(res))
    else:
        bpd = f", {res['bpd']:.4f} bits/dim" if res["bpd"] is not None else ""
        print(f"test NLL {res['nll']:.4f} ± {res['nll_sem']:.4f} nats{bpd} on {res['n']} points "
              f"(mean NFE {res['nfe']:.1f}, {res['divergence']} trace, rtol={res['rtol']:g}, step {step})")
        if "energy_distance" in res:
            print(f"samples: energy distance {res['energy_distance']:.4f}, sliced W2 {res['sliced_w2']:.4f} "
                  f"(NFE {res['sample_nfe']})")
    return 0


def _cmd_compare(args) -> int:
    from flowkit.compare import compare

    _check_count("--samples", args.samples)
    rows = compare(args.recipes, args.out, overrides=args.set or [], objectives=args.objectives,
                   samples=args.samples, overwrite=args.overwrite)
    print((Path(args.out) / "compare.md").read_text())
    print(f"wrote {args.out}/compare.md, compare.csv and samples.png")
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
    s.set_defaults(fn=_cmd_sample)

    n = sub.add_parser("nll", help="test negative log-likelihood of a trained run")
    n.add_argument("run")
    n.add_argument("overrides", nargs="*", help="e.g. eval.divergence=hutchinson eval.rtol=1e-6")
    n.add_argument("--n", type=int, default=None)
    n.add_argument("--batch-size", type=int, default=None)
    n.add_argument("--json", action="store_true", help="print one JSON line")
    n.add_argument("--no-ema", action="store_true")
    n.add_argument("--device", default="cpu")
    n.set_defaults(fn=_cmd_nll)
    m = sub.add_parser("compare", help="train several recipes and evaluate them alike")
    m.add_argument("recipes", nargs="+", help="recipe files (or one base recipe with --objectives)")
    m.add_argument("--objectives", help="comma-separated objectives to swap into one base recipe")
    m.add_argument("--set", nargs="*", help="overrides applied to every run, e.g. train.steps=500")
    m.add_argument("--out", required=True)
    m.add_argument("--samples", type=int, default=2000)
    m.add_argument("--overwrite", action="store_true", help="train again runs that --out already holds")
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

    kept = "; the last checkpoint is intact (use --resume)" if args.command == "train" else ""
    previous = _install_sigterm()
    try:
        return args.fn(args)
    except RecipeError as exc:
        print(f"flowkit {args.command}: {exc}", file=sys.stderr)
        return 2
    except (RunDirectoryError, RegistryError, ArgumentError, LaunchError) as exc:
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
