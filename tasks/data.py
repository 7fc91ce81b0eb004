"""data: load the source and write the train/val/test splits."""

from __future__ import annotations

from schemas.outputs import DataOutput
from schemas.params import DataParams
from shrinkflow import data
from tasks import Context


def run(params: DataParams, ctx: Context) -> DataOutput:
    splits = data.prepare(params, ctx.seed, ctx.paths.root)
    data.save_splits(splits, ctx.paths.splits)
    return DataOutput(
        source=params.source,
        task=splits.task,
        n_classes=splits.n_classes,
        classes=splits.classes,
        input_shape=splits.input_shape,
        n_train=len(splits.X_train),
        n_val=len(splits.X_val),
        n_test=len(splits.X_test),
        splits=ctx.paths.rel(ctx.paths.splits),
    )
