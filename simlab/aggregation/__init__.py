"""Server-side aggregation on plain numpy models (no Flower): update checks, rules, registry."""

from simlab.aggregation.aggregate import aggregate
from simlab.aggregation.core import (AggregateResult, EmptyAggregation, Rule, check_update, model_nbytes,
                                     update_norm)
from simlab.aggregation.ida import ida_weights
from simlab.aggregation.registry import RULES, AggregationParams, make_rule
from simlab.aggregation.server_opt import (OPTIMIZERS, OptState, ServerOptimizer, ServerOptimizerParams,
                                          make_server_optimizer)

__all__ = ["OPTIMIZERS", "RULES", "AggregateResult", "AggregationParams", "EmptyAggregation", "OptState", "Rule",
           "ServerOptimizer", "ServerOptimizerParams", "aggregate", "check_update", "ida_weights", "make_rule",
           "make_server_optimizer", "model_nbytes", "update_norm"]
