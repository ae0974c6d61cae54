"""Toy data and toy modules that exercise each extension point of :class:`fusion.trainer.Trainer`.

The data are linearly separable points in ``ehr_emb`` (4 columns); the modules are tiny so that a
fit takes a fraction of a second.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fusion.data import FusionPart
from fusion.trainer import FitStage, PartBatches, task_loss


def toy_part(n=120, seed=0, flip=False, name="train"):
    """A part whose label is ``x0 + 0.5 x1 > 0`` (inverted with ``flip``)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.float32)[:, None]
    y = (1 - y) if flip else y
    return FusionPart(name=name, index=np.arange(n), stay_id=np.arange(n) + 1000, y=y,
                      cxr_present=np.zeros(n, dtype=bool), cxr_masked=np.zeros(n, dtype=bool),
                      ehr_emb=x)


def toy_sources(n=120, flip_val=False):
    """Training and validation batch sources."""
    return (PartBatches(toy_part(n), {"ehr_emb"}),
            PartBatches(toy_part(n // 2, seed=1, flip=flip_val, name="val"), {"ehr_emb"}))


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.dropout = nn.Dropout(0.3)

    def forward(self, batch):
        return {"logits": self.layer(self.dropout(batch["ehr_emb"]))}


class GrowingNet(nn.Module):
    """Adds a head at the end of each epoch in ``grow_at``; the architecture is its extra state."""

    def __init__(self, grow_at=(2,)):
        super().__init__()
        self.grow_at = tuple(grow_at)
        self.base = nn.Linear(4, 1)
        self.dropout = nn.Dropout(0.2)
        self.heads = nn.ModuleList()
        self.initial = {}  # head index -> weight at creation

    def add_head(self):
        head = nn.Linear(4, 1).to(self.base.weight.device)
        self.initial[len(self.heads)] = head.weight.detach().clone()
        self.heads.append(head)

    def forward(self, batch):
        x = self.dropout(batch["ehr_emb"])
        logits = self.base(x)
        for head in self.heads:
            logits = logits + head(x)
        return {"logits": logits}

    def on_train_epoch_end(self, ctx):
        if ctx.epoch in self.grow_at:
            self.add_head()
        ctx.log("heads", len(self.heads))

    def get_extra_state(self):
        return {"heads": len(self.heads)}

    def set_extra_state(self, state):
        while len(self.heads) > state["heads"]:
            del self.heads[len(self.heads) - 1]
        while len(self.heads) < state["heads"]:
            self.add_head()


class BankNet(nn.Module):
    """A neighbour bank built from the training part at fit start, saved as extra state.

    The prediction adds the mean label of the 3 nearest bank rows, scaled by a learned weight.
    """

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.scale = nn.Parameter(torch.ones(1))
        self.register_buffer("bank_x", torch.zeros(0, 4), persistent=False)
        self.register_buffer("bank_y", torch.zeros(0, 1), persistent=False)

    def on_fit_start(self, ctx, train):
        xs, ys = zip(*[(b["ehr_emb"], b["y"]) for b in ctx.batches(train)])
        self.bank_x, self.bank_y = torch.cat(xs), torch.cat(ys)

    def forward(self, batch):
        x = batch["ehr_emb"]
        nearest = torch.cdist(x, self.bank_x).topk(3, largest=False).indices
        neighbours = self.bank_y[nearest].mean(dim=1) - 0.5
        return {"logits": self.layer(x) + self.scale * neighbours}

    def get_extra_state(self):
        return {"bank_x": self.bank_x, "bank_y": self.bank_y}

    def set_extra_state(self, state):
        self.bank_x, self.bank_y = state["bank_x"], state["bank_y"]


class StagedNet(nn.Module):
    """Two branches trained one after the other (``first`` then ``second``)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 1)
        self.second = nn.Linear(4, 1)

    def forward(self, batch):
        x = batch["ehr_emb"]
        return {"logits": self.first(x) + self.second(x), "logits_first": self.first(x)}

    def fit_stages(self):
        return [FitStage("first", trainable=("first",), max_epochs=2,
                         monitor_output="logits_first"),
                FitStage("second", trainable=("second",), max_epochs=3, patience=2)]


class TwoOptimiserNet(nn.Module):
    """Manual optimisation: each branch has its own optimiser, scheduler and loss (as MMTM)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 1)
        self.b = nn.Linear(4, 1)

    def forward(self, batch):
        x = batch["ehr_emb"]
        logits_a, logits_b = self.a(x), self.b(x)
        return {"logits": logits_a + logits_b, "logits_a": logits_a, "logits_b": logits_b}

    def configure_optimizers(self, ctx):
        optimizers = [torch.optim.SGD(self.a.parameters(), lr=0.1, momentum=0.9),
                      torch.optim.SGD(self.b.parameters(), lr=0.2, momentum=0.9)]
        return optimizers, [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)
                            for o in optimizers]

    def training_step(self, batch, ctx):
        total = 0.0
        for key, optimizer in zip(("logits_a", "logits_b"), ctx.optimizers):
            loss = task_loss(self(batch)[key], batch["y"], ctx.task)
            optimizer.zero_grad(set_to_none=True)
            ctx.backward(loss)
            optimizer.step()
            total = total + loss.detach()
        return total


class InnerLoopNet(nn.Module):
    """One inner gradient step on fast weights (``torch.func.functional_call``), as in SMIL."""

    def __init__(self, inner_lr=0.5):
        super().__init__()
        self.inner_lr = inner_lr
        self.layer = nn.Linear(4, 1)
        self.losses = []  # (loss at the slow weights, loss at the fast weights) per step

    def forward(self, batch):
        return {"logits": self.layer(batch["ehr_emb"])}

    def training_step(self, batch, ctx):
        params = dict(self.named_parameters())
        slow = task_loss(torch.func.functional_call(self, params, (batch,))["logits"], batch["y"],
                         ctx.task)
        grads = torch.autograd.grad(slow, list(params.values()), create_graph=True)
        fast = {name: p - self.inner_lr * g for (name, p), g in zip(params.items(), grads)}
        out = torch.func.functional_call(self, fast, (batch,))
        loss = task_loss(out["logits"], batch["y"], ctx.task)
        self.losses.append((float(slow.detach()), float(loss.detach())))
        optimizer = ctx.optimizers[0]
        optimizer.zero_grad(set_to_none=True)
        ctx.backward(loss)
        optimizer.step()
        return {"loss": loss, "out": out}
