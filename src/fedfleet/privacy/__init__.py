"""Differential privacy for federated averaging: clipping, Gaussian noise from a cryptographic generator,
adaptive clipping, and an accountant (Google's dp-accounting) that turns rounds into (epsilon, delta).

``plan.privacy_pipeline`` builds the party-side and fold transforms a ``privacy:`` section asks for.
"""

from fedfleet.privacy.accountant import Accountant, AccountantKind, Sampling, calibrate
from fedfleet.privacy.adaptive import AdaptiveClipConfig
from fedfleet.privacy.budget import Budget, PrivacyBudgetSpent
from fedfleet.privacy.central import CentralGaussian
from fedfleet.privacy.config import PrivacyConfig
from fedfleet.privacy.ledger import PrivacyLedger
from fedfleet.privacy.party import PartyGaussian
from fedfleet.privacy.plan import PrivacyPlan, plan_privacy

__all__ = [
    "Accountant",
    "AccountantKind",
    "AdaptiveClipConfig",
    "Budget",
    "CentralGaussian",
    "PartyGaussian",
    "PrivacyBudgetSpent",
    "PrivacyConfig",
    "PrivacyLedger",
    "PrivacyPlan",
    "Sampling",
    "calibrate",
    "plan_privacy",
]
