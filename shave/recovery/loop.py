"""Recovery: train a compressed IR graph as PyTorch, with or without labels, within a budget.

    g2 = shave.finetune(pruned, train, epochs=3, teacher=original, validation=held_out)
    g3 = shave.finetune(pruned, images, seconds=120, teacher=model, augment=shave.augment())

`data` yields (inputs, labels) batches, or inputs alone when a teacher labels
them (distillation without labels). The loop: AdamW (or SGD with Nesterov
momentum) with weight decay on the weights, a linear warm-up then a cosine
decay over the budget (steps, epochs or seconds, whichever ends first), the
loss `alpha * cross-entropy + (1 - alpha) * T^2 * KL(teacher || student)` at
temperature T (KL alone without labels), plus an optional matching of the
intermediate features that kept their shape. Batch norms train (see
batchnorm.py): the graph's own, and identity ones inserted after convs that
have none, re-estimated at the end and folded back. With `validation`, the
model is scored each epoch (or every `eval_every` steps), the best weights are
kept and `patience` evaluations without improvement stop early. Seeded: the
same data and seed give the same weights. The input graph is not changed.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import PassError
from ..ir import Graph
from ..passes.calibration import check_item
from ..reference.interpreter import IRBatchNorm, from_torch, to_torch
from .augment import ImageAugment
from .batchnorm import insert_batch_norms, recalibrate

log = logging.getLogger("shave.recovery")

OPTIMIZERS = ("adamw", "adam", "sgd")
BATCH_NORM = ("insert", "train", "frozen")
FEATURE_OPS = ("add", "relu", "relu6", "hardswish", "silu", "concat")


def finetune(graph: Graph, data, steps: int | None = None, *, epochs: float | None = None,
             seconds: float | None = None, lr: float | None = None, optimizer: str = "adamw",
             weight_decay: float = 1e-4, momentum: float = 0.9, warmup: float = 0.05,
             schedule: str = "cosine", teacher=None, temperature: float = 4.0, alpha: float = 0.5,
             features=False, feature_weight: float = 1.0, augment: Callable | None = None,
             batch_norm: str = "insert", bn_batches: int = 50, validation=None, eval_every: int | None = None,
             patience: int | None = None, learn_scales: bool = False, seed: int = 0,
             progress: bool | None = None, history: list | None = None) -> Graph:
    """`graph` trained on `data` within a budget; returns a new graph (see the module doc).

    Budget: `steps`, `epochs` (passes over `data`) and/or `seconds`, whichever ends first
    (200 steps if none is given). `lr`: 1e-3 for AdamW/Adam, 1e-2 for SGD by default.
    `teacher`: a Graph or a torch module (not changed) to distil from. `features`: True (match
    the activations both graphs have with the same name and shape) or a list of value names;
    needs a Graph teacher. `augment`: a callable on input batches (e.g. `shave.augment()`),
    applied to what the student and teacher see. `batch_norm`: "insert" (train the graph's batch
    norms and insert identity ones after convs without one, folded back at the end), "train"
    (the graph's own only) or "frozen" (statistics fixed, as in the folded graph). `validation`:
    (inputs, labels) batches scored by top-1 accuracy (%), or a callable `module -> float`,
    higher is better. `learn_scales`: on a fake-quant graph (Quantize(simulate=True)), train the
    quantisation step sizes too (LSQ); `shave.passes.quantize.convert` then uses the learned ones.
    `history`: a list that receives one dict per evaluation and a last one for the result."""
    if not isinstance(graph, Graph):
        raise PassError(f"finetune wants a shave Graph, got {type(graph).__name__}")
    if optimizer not in OPTIMIZERS:
        raise PassError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    if batch_norm not in BATCH_NORM:
        raise PassError(f"unknown batch_norm mode {batch_norm!r}; known: {', '.join(BATCH_NORM)}")
    if schedule not in ("cosine", "constant"):
        raise PassError(f"unknown schedule {schedule!r}; known: cosine, constant")
    for name, v in (("steps", steps), ("epochs", epochs), ("seconds", seconds)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
            raise PassError(f"finetune {name} must be a positive number, got {v!r}")
    if steps is None and epochs is None and seconds is None:
        steps = 200
    if not 0.0 <= alpha <= 1.0 or temperature <= 0:
        raise PassError(f"finetune wants 0 <= alpha <= 1 and temperature > 0, got {alpha!r}, {temperature!r}")
    if features and not isinstance(teacher, Graph):
        raise PassError("finetune features= matches the teacher's activations by name: give the teacher as a Graph")
    lr = lr if lr is not None else (1e-2 if optimizer == "sgd" else 1e-3)
    if augment is not None and not callable(augment):
        raise PassError(f"finetune augment must be a callable on input batches, got {type(augment).__name__}")
    if augment is not None and not isinstance(augment, ImageAugment):
        augment = _with_generator(augment)

    if learn_scales and not any(n.op in ("fake_quant", "fake_quant_channel") for n in graph.nodes):
        raise PassError("finetune learn_scales=True wants a fake-quant graph: run "
                        "shave.passes.Quantize(data, simulate=True) first")
    stream = _Stream(graph, data, teacher is not None)
    feats = _feature_names(graph, teacher, features) if features else []
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        work, inserted = graph, []
        if batch_norm == "insert":
            work, inserted = insert_batch_norms(graph, stream.first_inputs(8))
        student = to_torch(_with_outputs(work, feats), trainable=True, learn_scales=learn_scales)
        teach = _teacher_module(teacher, feats)
        loop = _Loop(student, teach, stream, feats=len(feats), lr=lr, optimizer=optimizer,
                     weight_decay=weight_decay, momentum=momentum, warmup=warmup, schedule=schedule,
                     temperature=temperature, alpha=alpha, feature_weight=feature_weight, augment=augment,
                     generator=gen, frozen_bn=batch_norm == "frozen", n_out=len(graph.outputs))
        scorer = _scorer(graph, validation)
        records = loop.run(steps, epochs, seconds, scorer, eval_every, patience, progress)
        if batch_norm != "frozen":
            recalibrate(student, stream.first_inputs(bn_batches), lambda m, b: m(*b))
        trained = from_torch(student, _with_outputs(work, feats))
        trained.outputs = list(graph.outputs)
        trained.remove_dead()
        if inserted:
            from ..passes.fold_bn import FoldBN

            trained = FoldBN(only=inserted).run(trained).remove_dead()
        final = {"step": loop.step, "epoch": loop.epoch, "seconds": round(time.perf_counter() - loop.t0, 2),
                 "final": True}
        if scorer is not None:
            final["score"] = scorer(to_torch(trained, trainable=False))
            if _world() > 1:
                final["score"] = _all_reduce(final["score"], "mean")
            log.info("recovery done after %d steps, %.0f s: score %.4g", loop.step, final["seconds"], final["score"])
        records.append(final)
    if history is not None:
        history.extend(records)
    return trained


class _Stream:
    """The data as an endless sequence of (epoch, inputs tuple, labels or None), checked item by
    item; a one-shot iterator is read into a list first, so that it can be replayed."""

    def __init__(self, graph: Graph, data, has_teacher: bool):
        if isinstance(data, (torch.Tensor, np.ndarray)):
            data = [data]  # one batched tensor is one batch
        try:
            if iter(data) is data:
                data = list(data)  # a one-shot iterator: kept, so that it can be replayed
        except TypeError:
            raise PassError(f"finetune data must be an iterable of batches, got {type(data).__name__}") from None
        self.graph, self.data, self.has_teacher = graph, data, has_teacher
        self.labelled: bool | None = None
        self.epoch_len = len(data) if hasattr(data, "__len__") else None
        if self.epoch_len == 0:
            raise PassError("finetune data is empty: give at least one batch")

    def parse(self, item, i: int):
        n_in = len(self.graph.inputs)
        labels = None
        if isinstance(item, (tuple, list)):
            if n_in == 1 and len(item) == 2:
                inputs, labels = (item[0],), item[1]
            elif n_in > 1 and len(item) == 2 and isinstance(item[0], (tuple, list)):
                inputs, labels = tuple(item[0]), item[1]
            elif len(item) == n_in and all(isinstance(x, (torch.Tensor, np.ndarray)) for x in item):
                inputs = tuple(item)
            else:
                raise PassError(f"finetune data item {i} is a {type(item).__name__} of {len(item)}: it must "
                                "yield (inputs, labels) pairs, or inputs alone when a teacher labels them")
        else:
            inputs = (item,)
        labelled = labels is not None
        if self.labelled is None:
            self.labelled = labelled
            if not labelled and not self.has_teacher:
                raise PassError(f"finetune data item {i} is a {type(item).__name__}: without a teacher it must "
                                "yield (inputs, labels) pairs (give teacher= to distil without labels)")
        elif labelled != self.labelled:
            raise PassError(f"finetune data item {i} {'has' if labelled else 'lacks'} labels, unlike item 0")
        inputs = tuple(x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x)) for x in inputs)
        inputs = check_item(self.graph, inputs, i, "finetune data")
        if labelled:
            labels = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
            if labels.ndim == 0 or labels.shape[0] != inputs[0].shape[0]:
                raise PassError(f"finetune data item {i}: {tuple(labels.shape)} labels for a batch of "
                                f"{inputs[0].shape[0]} inputs")
            if labels.is_floating_point():
                raise PassError(f"finetune data item {i}: labels must be class indices (integers), got {labels.dtype}")
            labels = labels.long()
        return inputs, labels

    def __iter__(self):
        epoch, index = 0, 0
        while True:
            n = 0
            for item in self.data:
                yield (epoch,) + self.parse(item, index)
                n, index = n + 1, index + 1
            if n == 0:
                raise PassError("finetune data is empty: give at least one batch" if epoch == 0 else
                                "finetune data yielded nothing on its second pass: give a list or a re-iterable "
                                "(e.g. a DataLoader)")
            if self.epoch_len is None:
                self.epoch_len = n
            epoch += 1

    def first_inputs(self, count: int) -> list[tuple]:
        """Up to `count` input tuples from the start of the data (statistics, batch-norm estimates)."""
        out = []
        for _, inputs, _ in self:
            out.append(inputs)
            if len(out) >= count or (self.epoch_len is not None and len(out) >= self.epoch_len):
                break
        return out


def _with_generator(fn):
    """A user's augmentation `fn(x)` or `fn(x, generator)` as the latter."""
    import inspect

    try:
        takes = len([p for p in inspect.signature(fn).parameters.values()
                     if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)])
    except (TypeError, ValueError):
        takes = 1
    return fn if takes >= 2 else (lambda x, generator: fn(x))


def _feature_names(graph: Graph, teacher: Graph, features) -> list[str]:
    if features is True:
        names = [n.name for n in graph.nodes if n.op in FEATURE_OPS and n.name not in graph.outputs
                 and any(t.name == n.name and t.type == n.type for t in teacher.nodes)]
        step = max(1, len(names) // 8)
        return names[::-1][::step][:8][::-1]  # at most 8, spread over the depth, the deepest kept
    names = [features] if isinstance(features, str) else list(features)
    for name in names:
        try:
            ts, tt = graph.type_of(name), teacher.type_of(name)
        except KeyError:
            raise PassError(f"finetune feature {name!r} is not a value of both the graph and the teacher") from None
        if ts != tt:
            raise PassError(f"finetune feature {name!r} is {ts} in the graph but {tt} in the teacher")
    return names


def _with_outputs(graph: Graph, extra: list[str]) -> Graph:
    if not extra:
        return graph
    g = graph.copy()
    g.outputs = list(graph.outputs) + list(extra)
    return g


def _teacher_module(teacher, feats):
    if teacher is None:
        return None
    if isinstance(teacher, Graph):
        return to_torch(_with_outputs(teacher, feats), trainable=False)
    if not isinstance(teacher, torch.nn.Module):
        raise PassError(f"finetune teacher must be a Graph or a torch module, got {type(teacher).__name__}")
    if teacher.training:
        teacher = copy.deepcopy(teacher).eval()  # the user's module keeps its mode
    return teacher


def _scorer(graph: Graph, validation):
    """validation -> module -> float (higher is better), or None."""
    if validation is None:
        return None
    if callable(validation):
        def call(module):
            score = validation(module)
            if not isinstance(score, (int, float, np.floating)) or isinstance(score, bool) or math.isnan(score):
                raise PassError(f"finetune validation returned {score!r}; it must return a number (higher is better)")
            return float(score)
        return call
    batches = _Stream(graph, validation, has_teacher=False)
    items = []
    for epoch, inputs, labels in batches:
        if epoch > 0:
            break
        items.append((inputs, labels))

    def accuracy(module):
        correct = total = 0
        with torch.no_grad():
            for inputs, labels in items:
                out = module(*inputs)
                out = out[0] if isinstance(out, tuple) else out
                correct += int((out.argmax(1) == labels).sum())
                total += labels.numel()
        return 100.0 * correct / total
    return accuracy


def _world() -> int:
    """The number of processes training together (torch.distributed), 1 when not distributed."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(value: float, op: str) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return float(t) / (dist.get_world_size() if op == "mean" else 1)


class _Loop:
    """The training loop. Under torch.distributed with several processes the student trains
    wrapped in DistributedDataParallel (each process gives its own shard of every global batch),
    batch norms use the global batch's statistics, and the processes agree on the validation score
    (averaged) and on when the time budget ends (the slowest decides)."""

    def __init__(self, student, teacher, stream, *, feats, lr, optimizer, weight_decay, momentum, warmup,
                 schedule, temperature, alpha, feature_weight, augment, generator, frozen_bn, n_out):
        self.student, self.teacher, self.stream = student, teacher, stream
        self.world = _world()
        self.model = student
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(student)
        self.feats, self.n_out = feats, n_out
        self.lr, self.warmup, self.schedule = lr, warmup, schedule
        self.temperature, self.alpha, self.feature_weight = temperature, alpha, feature_weight
        self.augment, self.generator, self.frozen_bn = augment, generator, frozen_bn
        decay = [p for p in student.parameters() if p.requires_grad and p.ndim > 1]
        rest = [p for p in student.parameters() if p.requires_grad and p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
        if optimizer == "sgd":
            self.opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
        else:
            cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
            self.opt = cls(groups, lr=lr)
        self.step = self.epoch = 0
        self.t0 = time.perf_counter()

    def train_mode(self):
        self.model.train()
        if self.frozen_bn:
            for m in self.student.modules():
                if isinstance(m, IRBatchNorm):
                    m.eval()

    def rate(self, done: float) -> float:
        if done < self.warmup:
            return self.lr * (done + 1e-3) / self.warmup
        if self.schedule == "constant":
            return self.lr
        t = (done - self.warmup) / max(1e-9, 1 - self.warmup)
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    def loss(self, inputs, labels):
        if self.augment is not None:
            inputs = tuple(self.augment(x, self.generator) if x.is_floating_point() else x for x in inputs)
        outs = self.model(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        logits = outs[0]
        loss = F.cross_entropy(logits, labels) if labels is not None else logits.new_zeros(())
        if self.teacher is not None:
            with torch.no_grad():
                t_outs = self.teacher(*inputs)
            t_outs = t_outs if isinstance(t_outs, tuple) else (t_outs,)
            T = self.temperature
            kd = F.kl_div(F.log_softmax(logits / T, 1), F.softmax(t_outs[0] / T, 1),
                          reduction="batchmean") * T * T
            loss = self.alpha * loss + (1 - self.alpha) * kd if labels is not None else kd
            for s, t in zip(outs[self.n_out:], t_outs[self.n_out:]):
                loss = loss + self.feature_weight * F.mse_loss(s, t) / (t.var() + 1e-6) / max(1, self.feats)
        return loss

    def run(self, steps, epochs, seconds, scorer, eval_every, patience, progress) -> list[dict]:
        records: list[dict] = []
        best, best_state, stale = -math.inf, None, 0

        def evaluate(loss):
            nonlocal best, best_state, stale
            self.student.eval()
            score = scorer(self.student)
            if self.world > 1:
                score = _all_reduce(score, "mean")
            self.train_mode()
            rec = {"step": self.step, "epoch": self.epoch, "seconds": round(time.perf_counter() - self.t0, 2),
                   "loss": loss, "score": score}
            records.append(rec)
            log.info("recovery step %d (epoch %d): score %.4g", self.step, self.epoch, score)
            if score > best:
                best, best_state, stale = score, copy.deepcopy(self.student.state_dict()), 0
            else:
                stale += 1
            return score

        def total_steps():
            limits = [s for s in (steps, epochs * self.stream.epoch_len if epochs and self.stream.epoch_len else None)
                      if s]
            return int(min(limits)) if limits else None

        self.train_mode()
        if scorer is not None:
            evaluate(None)
        bar = tqdm(total=total_steps(), desc="recovery", unit="step", leave=False,
                   disable=None if progress is None else not progress)
        running = None
        last_epoch = 0
        for epoch, inputs, labels in self.stream:
            if epoch != last_epoch:
                last_epoch, self.epoch = epoch, epoch
                if scorer is not None and eval_every is None:
                    evaluate(running)
                    bar.set_postfix(loss=f"{running:.3f}", score=f"{records[-1]['score']:.4g}", best=f"{best:.4g}")
                if patience is not None and stale >= patience:
                    log.info("recovery stopped early: %d evaluations without improvement", stale)
                    break
            total = total_steps()
            if bar.total is None and total is not None:
                bar.total = total
            elapsed = time.perf_counter() - self.t0
            done = max(self.step / total if total else 0.0, elapsed / seconds if seconds else 0.0,
                       epoch / epochs if epochs else 0.0)
            if seconds and self.world > 1:
                done = _all_reduce(done, "max")
            if done >= 1.0:
                break
            if seconds and self.step == 10 and bar.total is None:
                bar.total = int(seconds / elapsed * 10)
            for g in self.opt.param_groups:
                g["lr"] = self.rate(done)
            loss = self.loss(inputs, labels)
            if not torch.isfinite(loss):
                raise PassError(f"finetune loss became {float(loss)} at step {self.step}: lower the learning rate "
                                f"(lr={self.lr})")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.step += 1
            value = loss.item()
            running = value if running is None else 0.9 * running + 0.1 * value
            bar.update(1)
            if self.step % 10 == 0:
                bar.set_postfix(loss=f"{running:.3f}", **({"best": f"{best:.4g}"} if records else {}))
            if scorer is not None and eval_every and self.step % eval_every == 0:
                evaluate(running)
                if patience is not None and stale >= patience:
                    log.info("recovery stopped early: %d evaluations without improvement", stale)
                    break
        bar.close()
        if scorer is not None:
            if not records or records[-1]["step"] != self.step:
                evaluate(running)
            self.student.load_state_dict(best_state)
        self.student.eval()
        return records
