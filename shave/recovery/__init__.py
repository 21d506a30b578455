"""Accuracy recovery after compression: the training loop (`finetune`), batch norms during
recovery, and image augmentation for distillation without labels."""
from .augment import ImageAugment, augment
from .batchnorm import insert_batch_norms, recalibrate, recalibrate_batch_norms
from .loop import finetune
from .recover_pass import Finetune

__all__ = ["finetune", "Finetune", "augment", "ImageAugment", "insert_batch_norms", "recalibrate", "recalibrate_batch_norms"]
