"""Validation: ``eval.steps`` batches of the validation split on every rank, no gradients and no
swapping (nothing is saved for backward), loss and accuracy summed over every rank in one allreduce;
perplexity for language models."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Iterable

import torch

from .loss import StepLoss, read_output


def evaluate(model: Any, batches: Iterable[Any], step_loss: StepLoss, device: torch.device, backend: Any,
             autocast: Any = None) -> Dict[str, float]:
    """Mean loss over every rank's validation batches, with accuracy (classify, lm, segment) and
    perplexity (lm); the model is put back into training mode."""
    task = step_loss.task
    loss_sum, correct, count, batches_seen = 0.0, 0.0, 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), (torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()):
            for inputs, targets in batches:
                inputs, targets = inputs.to(device), targets.to(device)
                output = step_loss.forward(model, inputs, targets)  # any library's output, as in training
                loss_sum += float(step_loss.loss(output, targets))
                batches_seen += 1
                if task != "regress" and step_loss.user_loss is None:
                    predicted = read_output(output).logits.argmax(-1 if task == "lm" else 1)
                    correct += float((predicted == targets).sum())
                    count += targets.numel()
    finally:
        model.train(was_training)
    totals = backend.allreduce(torch.tensor([loss_sum, correct, count, float(batches_seen)], device=device),
                               op="sum").tolist()
    loss = totals[0] / max(1.0, totals[3])
    result = {"eval_loss": loss}
    if task != "regress" and totals[2]:
        result["eval_accuracy"] = totals[1] / totals[2]
    if task == "lm":
        result["eval_perplexity"] = math.exp(min(loss, 50.0))
    return result
