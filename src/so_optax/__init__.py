"""so_optax: second-order optimizers (SOAP, Sophia) as optax gradient transformations."""

from so_common import __version__
from so_optax._distribution import state_shardings
from so_optax._hessian_estimators import (
    GNBState,
    HutchinsonState,
    gnb_diag_from_labels,
    gnb_hessian_estimator,
    hutchinson_diag_from_probe,
    hutchinson_hessian_estimator,
)
from so_optax._soap import SOAP_STATIC_ARGS, ScaleBySoapState, scale_by_soap, soap
from so_optax._sophia import SOPHIA_STATIC_ARGS, SophiaClipRule, SophiaState, sophia, sophia_win_rate

__all__ = [
    "__version__",
    "SOAP_STATIC_ARGS",
    "ScaleBySoapState",
    "scale_by_soap",
    "soap",
    "SOPHIA_STATIC_ARGS",
    "SophiaState",
    "SophiaClipRule",
    "sophia",
    "sophia_win_rate",
    "GNBState",
    "HutchinsonState",
    "gnb_hessian_estimator",
    "hutchinson_hessian_estimator",
    "gnb_diag_from_labels",
    "hutchinson_diag_from_probe",
    "state_shardings",
]
