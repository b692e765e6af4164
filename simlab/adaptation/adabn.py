"""AdaBN (Li et al. 2018, "Adaptive Batch Normalization for practical domain adaptation") as a
test-time adaptation: before a test set is predicted, every BatchNorm layer's running statistics are
replaced by the statistics of that test set's images (:func:`simlab.models.norm.adapt_batchnorm`:
the cumulative average over batches of ``evaluation.batch_size``). No label, no gradient, no weight
changes; the prediction then uses the new running statistics in eval mode."""

from __future__ import annotations

from simlab.adaptation.base import Adaptation, Adapted, plain_predict
from simlab.models.norm import adapt_batchnorm


class AdaBN(Adaptation):
    name = "adabn"
    help = "re-estimate the BatchNorm statistics on each test set's images first (AdaBN, no labels)"

    def predict(self, model, images, ctx) -> Adapted:
        adapted = adapt_batchnorm(model, images, ctx.batch_size, ctx.device)
        return Adapted(plain_predict(adapted, images, ctx), adapted)
