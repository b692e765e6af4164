"""No adaptation: the deployed model predicts the test images as it is (eval mode, running statistics)."""

from __future__ import annotations

from simlab.adaptation.base import Adaptation, Adapted, plain_predict


class NoAdaptation(Adaptation):
    name = "none"
    help = "evaluate the deployed model as it is"

    def predict(self, model, images, ctx) -> Adapted:
        return Adapted(plain_predict(model, images, ctx), model)
