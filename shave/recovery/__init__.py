"""Accuracy recovery after compression: the training loop (`finetune`), batch norms during
recovery, and image augmentation for distillation without labels."""
from .augment import ImageAugment, augment
from .batchnorm import insert_batch_norms, recalibrate
from .loop import finetune

__all__ = ["finetune", "augment", "ImageAugment", "insert_batch_norms", "recalibrate"]
