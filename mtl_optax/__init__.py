"""mtl_optax: multi-task gradient balancing as pure optax transformations.

Every method maps stacked per-task gradients (each leaf ``(K, *shape)``, from
:func:`value_and_task_grads`) to one update tree and chains into any optax
optimizer::

    losses, grads = mo.value_and_task_grads(task_losses)(params, batch)
    tx = optax.chain(mo.cagrad(num_tasks=3, c=0.4), optax.adam(1e-3))
    updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses)

Methods that need no per-task gradients (MARIGOLD, FAMO, loss weightings)
take the gradient of one weighted loss from :func:`value_and_weighted_grad`.
"""

import types as _types

# --- per-task gradients and protocols ---
from mtl_optax._src.base import LossWeightingTransformation
from mtl_optax._src.base import masked_loss_fn
from mtl_optax._src.grads import value_and_task_grads
from mtl_optax._src.grads import value_and_task_grads_from_batches
from mtl_optax._src.grads import value_and_representation_grads
from mtl_optax._src.grads import value_and_weighted_grad

# --- foundation aggregators ---
from mtl_optax._src.aggregators import linear_scalarization
from mtl_optax._src.aggregators import mgda
from mtl_optax._src.aggregators import MGDAState
from mtl_optax._src.aggregators import pcgrad
from mtl_optax._src.aggregators import PCGradState
from mtl_optax._src.aggregators import task_sum
from mtl_optax._src.aggregators import WeightsState
from mtl_optax._src.cagrad import cagrad
from mtl_optax._src.cagrad import CAGradState

# --- aggregators: dual cone, closed forms, bargaining ---
from mtl_optax._src.bargaining import fairgrad
from mtl_optax._src.bargaining import FairGradState
from mtl_optax._src.bargaining import nash_mtl
from mtl_optax._src.bargaining import NashMTLState
from mtl_optax._src.closed_form import aligned_mtl
from mtl_optax._src.closed_form import config
from mtl_optax._src.closed_form import imtl_g
from mtl_optax._src.dual_cone import DualConeState
from mtl_optax._src.dual_cone import dualproj
from mtl_optax._src.dual_cone import upgrad

# --- aggregators: surgery, stochastic, robust, weightings ---
from mtl_optax._src.robust import krum
from mtl_optax._src.robust import KrumState
from mtl_optax._src.robust import trimmed_mean
from mtl_optax._src.robust import TrimmedMeanState
from mtl_optax._src.stochastic import excess_mtl
from mtl_optax._src.stochastic import ExcessMTLState
from mtl_optax._src.stochastic import moco
from mtl_optax._src.stochastic import MoCoState
from mtl_optax._src.stochastic import modo
from mtl_optax._src.stochastic import MoDoState
from mtl_optax._src.stochastic import sdmgrad
from mtl_optax._src.stochastic import SDMGradState
from mtl_optax._src.surgery import graddrop
from mtl_optax._src.surgery import GradDropState
from mtl_optax._src.surgery import gradvac
from mtl_optax._src.surgery import GradVacState
from mtl_optax._src.weightings import constant
from mtl_optax._src.weightings import ConstantState
from mtl_optax._src.weightings import ema_weights
from mtl_optax._src.weightings import EMAWeightsState
from mtl_optax._src.weightings import random_weighting
from mtl_optax._src.weightings import RandomWeightingState

# --- transference, TAG, IT-MTL ---
from mtl_optax._src.transference import it_mtl
from mtl_optax._src.transference import ITMTLState
from mtl_optax._src.transference import select_task_groups
from mtl_optax._src.transference import task_affinity
from mtl_optax._src.transference import TaskGrouping
from mtl_optax._src.transference import track_affinity
from mtl_optax._src.transference import TrackAffinityState

# --- MARIGOLD ---
from mtl_optax._src.marigold import gram_vector_product
from mtl_optax._src.marigold import marigold
from mtl_optax._src.marigold import MarigoldState

# --- loss weightings ---
from mtl_optax._src.loss_weighting import db_mtl
from mtl_optax._src.loss_weighting import DBMTLState
from mtl_optax._src.loss_weighting import dwa
from mtl_optax._src.loss_weighting import DWAState
from mtl_optax._src.loss_weighting import famo
from mtl_optax._src.loss_weighting import FAMOState
from mtl_optax._src.loss_weighting import gls
from mtl_optax._src.loss_weighting import gradnorm
from mtl_optax._src.loss_weighting import GradNormState
from mtl_optax._src.loss_weighting import imtl_l
from mtl_optax._src.loss_weighting import LearnedScaleState
from mtl_optax._src.loss_weighting import LossWeightsState
from mtl_optax._src.loss_weighting import random_loss_weighting
from mtl_optax._src.loss_weighting import RLWState
from mtl_optax._src.loss_weighting import scale_invariant
from mtl_optax._src.loss_weighting import stch
from mtl_optax._src.loss_weighting import STCHState
from mtl_optax._src.loss_weighting import uncertainty_weighting

# --- Flax ---
from mtl_optax._src.flax_utils import apply_task_gradients
from mtl_optax._src.flax_utils import label_by_path
from mtl_optax._src.flax_utils import nnx_loss_fn
from mtl_optax._src.flax_utils import nnx_train_step
from mtl_optax._src.flax_utils import nnx_value_and_task_grads
from mtl_optax._src.flax_utils import nnx_value_and_weighted_grad

# --- metrics ---
from mtl_optax._src.metrics import delta_m_flat
from mtl_optax._src.metrics import delta_m_per_task

# --- newer methods: preference scalarisations, meta-learned and momentum ---
from mtl_optax._src.scalarization import cosmos
from mtl_optax._src.scalarization import pbi
from mtl_optax._src.momentum import momentum_config
from mtl_optax._src.momentum import MomentumConfigState
from mtl_optax._src.momentum import psmgd
from mtl_optax._src.momentum import PSMGDState
from mtl_optax._src.meta_weighting import auto_lambda
from mtl_optax._src.meta_weighting import AutoLambdaState
from mtl_optax._src.meta_weighting import ldc_mtl
from mtl_optax._src.meta_weighting import LDCMTLState

# --- training-step protocol: task weights, Gram-first path ---
from mtl_optax._src.base import PassThroughState
from mtl_optax._src.base import task_weights
from mtl_optax._src.gram_first import value_and_gram
from mtl_optax._src.gram_first import value_and_gram_weighted_grad
from mtl_optax._src.flax_utils import nnx_value_and_gram_weighted_grad

# --- the Gram-weighting layer and Priority-Constrained Descent ---
from mtl_optax import gram_weightings
from mtl_optax._src.priority import pcd
from mtl_optax._src.priority import PCDState

# --- printable methods: each factory's transformation prints its call ---
from mtl_optax._src import naming as _naming
_naming.make_printable(globals(), [
    _name for _name, _value in list(globals().items())
    if not _name.startswith("_") and _naming.is_factory(_value)])

__version__ = "0.1.0.dev0"

# The family modules moved to mtl_optax._src; their old import paths warn.
# (``cagrad`` and ``marigold`` are the public functions of the same name.)
from mtl_optax._src import deprecation as _deprecation
_deprecation.alias_moved_modules(__name__, (
    "aggregators", "bargaining", "closed_form", "dual_cone", "flax_utils",
    "grads", "loss_weighting", "metrics", "robust", "stochastic", "surgery",
    "transference", "weightings"))

__all__ = tuple(sorted(
    name for name, value in globals().items()
    if not name.startswith("_") and not isinstance(value, _types.ModuleType)))
