"""Top-1 of a classifier on a labelled split, every rank its share of the shards; and the periodic
measurement during supervised training (finetune.eval_every), with the best and the last result.

The live model is measured as a LiveCopy (pretrain.evaluation.live_copy), as the kNN monitor measures
its encoder, so a run with measurements ends with the weights of a run without them.
"""

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from pretrain.core.distributed import is_distributed, rank, world_size
from pretrain.core.files import save_atomic, write_json_atomic
from pretrain.data.loader import make_loader
from pretrain.data.manifest import Manifest
from pretrain.data.views import normalize
from pretrain.evaluation.live_copy import LiveCopy

log = logging.getLogger("lg-pretrain")


@torch.no_grad()
def top1_counts(models, manifest, batch_size, img_size, num_workers, device, bf16=False):
    """[correct of each model ..., images seen] on `manifest` (summed over the ranks): one pass over the
    split in epoch mode, each rank reading the shards r, r + world, ..."""
    manifest = manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)
    readers = min(world_size(), len(manifest.shards))  # a rank without a shard only adds zeros
    counts = torch.zeros(len(models) + 1, dtype=torch.float64, device=device)
    if rank() < readers:
        loader = make_loader(
            manifest,
            batch_size,
            view="eval",
            img_size=img_size,
            mode="epoch",
            num_workers=min(num_workers, len(manifest.shards) // readers),
            rank=rank(),
            world_size=readers,
        )
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")
        for batch in tqdm(
            loader.epoch(0), total=loader.num_batches(0), desc="val", unit="batch", disable=rank() > 0
        ):
            kept = ~batch["replaced"]  # samples that did not decode are left out, not counted as copies
            images, labels = normalize(batch["images"][kept], device), batch["labels"][kept].to(device)
            with autocast:
                for index, model in enumerate(models):
                    counts[index] += int((model(images).argmax(dim=1) == labels).sum())
            counts[-1] += len(labels)
    if is_distributed():
        dist.all_reduce(counts)
    return counts.tolist()


def score(record):
    """A measurement's score: the better of the model's top-1 and its EMA's."""
    return max(record["top1"], record.get("top1_ema", -1))


def best_record(history):
    """The best-scoring measurement of a history (val_history.json), or None."""
    return max(history, key=score, default=None)


class ValMonitor:
    """Every finetune.eval_every epochs: top-1 on finetune.val of the model (and of its EMA when the
    objective keeps one), to TensorBoard (eval/val_top1, eval/val_top1_ema), the console and
    RUN_DIR/val_history.json; with finetune.keep_best the best weights (the EMA's when they score higher)
    go to RUN_DIR/classifier_best.pth, a timm state_dict as classifier.pth."""

    def __init__(self, config, objective, device):
        self.config, self.objective, self.device = config, objective, device
        self.run_dir = Path(config.run.dir)
        Manifest.load(
            config.finetune.val
        ).check_shards()  # a wrong path fails now, not at the first measurement
        self.live_copy = LiveCopy(objective.make_classifier, device)
        self.history = []  # {"step", "epoch", "top1"[, "top1_ema"]}

    def state_dict(self):
        return {"history": self.history}

    def load_state_dict(self, state):
        self.history = list(state.get("history", []))

    @property
    def best(self):
        return best_record(self.history)

    def measure(self, step, epoch):
        """Measure, record and report; every rank must call it (it gathers). Returns the record."""
        models = [self.live_copy.refresh(self.objective.encoder)] + (
            [self.objective.ema.module] if getattr(self.objective, "ema", None) else []
        )
        c = self.config
        *correct, seen = top1_counts(
            models,
            c.finetune.val,
            c.deepspeed.micro_batch_size,
            c.data.img_size,
            c.data.num_workers,
            self.device,
            bf16=c.deepspeed.precision != "fp32",
        )
        record = {"step": step, "epoch": round(epoch, 3), "top1": round(100 * correct[0] / max(seen, 1), 2)}
        if len(correct) > 1:
            record["top1_ema"] = round(100 * correct[1] / max(seen, 1), 2)
        previous = self.best
        self.history.append(record)
        if rank() == 0:
            self._report(record, previous, models)
        return record

    def _report(self, record, previous, models):
        best = previous is None or score(record) > score(previous)
        log.info(
            "step %d  val top-1 %.2f %%%s%s",
            record["step"],
            record["top1"],
            f" (EMA {record['top1_ema']:.2f} %)" if "top1_ema" in record else "",
            "  best so far" if best else "",
        )
        write_json_atomic(self.run_dir / "val_history.json", self.history)
        if best and self.config.finetune.keep_best:
            model = models[1] if record.get("top1_ema", -1) > record["top1"] else models[0]
            save_atomic(
                self.objective.classifier_state(model.state_dict()), self.run_dir / "classifier_best.pth"
            )
