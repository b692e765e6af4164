"""Server-side aggregation on plain numpy models (no Flower): update checks, rules, registry."""

from simlab.aggregation.aggregate import aggregate
from simlab.aggregation.core import (AggregateResult, EmptyAggregation, Rule, check_update, model_nbytes,
                                     update_norm)
from simlab.aggregation.ida import ida_weights
from simlab.aggregation.registry import RULES, AggregationParams, make_rule

__all__ = ["RULES", "AggregateResult", "AggregationParams", "EmptyAggregation", "Rule", "aggregate",
           "check_update", "ida_weights", "make_rule", "model_nbytes", "update_norm"]
