"""The edge's speculation controller: when to stop drafting (see PAPER.md, "Intelligent speculation controller")."""

from wisp_edge.controller.features import FEATURE_NAMES, BlockFeatures, distribution_stats
from wisp_edge.controller.predictor import (ConfidencePolicy, EntropyPolicy, PredictorPolicy, RejectionPredictor,
                                            load_predictor_for, policy_for)

__all__ = ["FEATURE_NAMES", "BlockFeatures", "ConfidencePolicy", "EntropyPolicy", "PredictorPolicy",
           "RejectionPredictor", "distribution_stats", "load_predictor_for", "policy_for"]
