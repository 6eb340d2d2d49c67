"""Train the digits classifier that the metrics use, on the train split, and write it as safetensors.

    python benchmarks/train_digits_classifier.py --output outputs/digits_classifier.safetensors

It writes only to `--output` (never over the classifier shipped in the package, which every metric
reads; copy a new one there by hand to re-ship it) and refuses to overwrite an existing file.
"""

import argparse
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffusers_fastgen.evaluation.classifier import CLASSIFIER_PATH, DigitsClassifier
from diffusers_fastgen.training.data import load_digits_arrays


def shift_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translations of up to 1 pixel (zero = -1 background padding)."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[..., dy:dy + 8, dx:dx + 8]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--output", default="outputs/digits_classifier.safetensors",
                        help="where to write the weights (an existing file is not overwritten)")
    args = parser.parse_args()
    if os.path.exists(args.output) or os.path.abspath(args.output) == os.path.abspath(CLASSIFIER_PATH):
        parser.error(f"--output {args.output!r} exists (or is the shipped classifier); choose a new path.")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x_train, y_train = map(torch.from_numpy, load_digits_arrays("train"))
    x_test, y_test = map(torch.from_numpy, load_digits_arrays("held_out"))
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    for epoch in range(args.epochs):
        model.train()
        for idx in torch.randperm(len(y_train), generator=g).split(64):
            loss = F.cross_entropy(model(shift_augment(x_train[idx], g)), y_train[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        train_acc = (model(x_train).argmax(1) == y_train).float().mean().item()
    print(f"held-out accuracy {acc:.4f} ({len(y_test)} images), train accuracy {train_acc:.4f}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.output)
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
