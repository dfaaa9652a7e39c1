"""Train the 8×8-digits classifier whose features give flowkit's feature-space distance.

Trains :class:`flowkit.metrics.DigitsClassifier` on the training split of flowkit's
``digits`` dataset (1,438 images; the 359 test images are never seen), on dequantised
images ``(k + u) / 17`` — the same form flowkit's models are scored in — with Adam, and
writes the weights to ``flowkit/assets/digits_classifier.pt`` (a plain ``state_dict``,
loaded with ``torch.load(weights_only=True)``) and its test accuracy to
``bench/results/digits_classifier.{md,json}``. Deterministic (seeded, one thread).

    python bench/train_digits_classifier.py            # ~20 s on one CPU core
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchinfo import cpu_name  # noqa: E402
from flowkit.data_real import Digits, dequantise  # noqa: E402
from flowkit.metrics import DIGITS_CLASSIFIER_FILE, DigitsClassifier  # noqa: E402

EPOCHS, BATCH, LR, SEED = 60, 32, 3e-3, 0


def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor, seed: int) -> float:
    x = dequantise(images, 17, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return float((model(x).argmax(1) == labels).float().mean())


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    data = Digits()
    model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS)
    g = torch.Generator().manual_seed(SEED)
    start = time.perf_counter()
    n = len(data.train)
    for epoch in range(EPOCHS):
        model.train()
        for idx in torch.randperm(n, generator=g).split(BATCH):
            x = dequantise(data.train[idx], 17, g)
            loss = F.cross_entropy(model(x), data.train_labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    seconds = time.perf_counter() - start
    train_acc = accuracy(model, data.train, data.train_labels, 1)
    test_acc = accuracy(model, data.test, data.test_labels, 1)
    DIGITS_CLASSIFIER_FILE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), DIGITS_CLASSIFIER_FILE)
    size = DIGITS_CLASSIFIER_FILE.stat().st_size
    params = sum(p.numel() for p in model.parameters())
    result = {"train_accuracy": train_acc, "test_accuracy": test_acc, "test_images": len(data.test),
              "parameters": params, "file_bytes": size, "epochs": EPOCHS, "batch": BATCH, "lr": LR,
              "seconds": round(seconds, 1), "cpu": cpu_name(), "torch": torch.__version__,
              "python": platform.python_version()}
    out = ROOT / "bench/results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "digits_classifier.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "digits_classifier.md").write_text(
        "# Digits classifier (bench/train_digits_classifier.py)\n\n"
        f"{cpu_name()}, torch {torch.__version__}, 1 thread (machine shared with other jobs).\n\n"
        f"`flowkit/metrics.py` DigitsClassifier, {params:,} parameters ({size / 1024:.0f} KiB), "
        f"{EPOCHS} epochs of Adam {LR:g} (cosine), batch {BATCH}, on the {n} training images "
        f"dequantised as flowkit scores them.\n\n"
        f"| split | accuracy |\n|---|---|\n| train ({n}) | {train_acc:.4f} |\n| test ({len(data.test)}) | {test_acc:.4f} |\n\n"
        f"Trained in {seconds:.1f} s. Its 32 penultimate activations are the features of the digits' "
        "Fréchet distance (`feature_fd`) in `flowkit compare` and `flowkit nll`.\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
