"""Which API page each public name of mtl_optax belongs to.

Names are grouped by the private module that defines them (the method
families of the README's methods table). ``conf.py`` writes one page per
family from this table at build time, and ``tests/test_docs.py`` fails when a
public name belongs to no family, so the reference cannot miss a name.
"""

#: (page slug, title, one-line description, defining modules), in page order.
FAMILIES = (
    ("gradients", "Per-task gradients and training steps",
     "The three training paths: stacked per-task gradients, one weighted "
     "backward pass, and the Gram matrix first.",
     ("grads", "gram_first", "base")),
    ("baselines", "Baselines and fixed weightings",
     "The mean gradient, fixed or random weights, and wrappers over any "
     "method's weights.",
     ("aggregators:linear_scalarization,task_sum,WeightsState,ConstantState",
      "weightings")),
    ("min_norm", "Min-norm and conflict-averse methods",
     "MGDA, CAGrad and PCGrad.",
     ("aggregators", "cagrad", "two_task")),
    ("dual_cone", "Dual-cone projections", "UPGrad and DualProj.",
     ("dual_cone",)),
    ("closed_form", "Closed forms on the Gram matrix",
     "IMTL-G, Aligned-MTL and ConFIG.", ("closed_form", "momentum")),
    ("bargaining", "Bargaining and fairness", "Nash-MTL and FairGrad.",
     ("bargaining",)),
    ("priority", "Priority-constrained descent", "PCD.", ("priority",)),
    ("surgery", "Gradient surgery", "GradVac and GradDrop.", ("surgery",)),
    ("stochastic", "Stochastic multi-objective methods",
     "EXcess-MTL, SDMGrad, MoDo and MoCo.", ("stochastic",)),
    ("robust", "Robust aggregation", "Krum and the trimmed mean.",
     ("robust",)),
    ("loss_weighting", "Loss weightings (one backward pass)",
     "Methods that re-weight the task losses and train on the gradient of "
     "one weighted loss.", ("loss_weighting", "scalarization",
                            "meta_weighting")),
    ("marigold", "MARIGOLD", "Bi-level gradient balancing, zeroth order and "
     "exact forward mode.", ("marigold",)),
    ("transference", "Transference and task grouping",
     "Look-ahead task affinity, TAG's grouping and IT-MTL.",
     ("transference",)),
    ("flax", "Flax helpers", "NNX and Linen training steps.",
     ("flax_utils",)),
    ("metrics", "Evaluation", "Δm under both published conventions.",
     ("metrics",)),
)


def _owner(module: str, name: str):
  """The family slug of ``name`` defined in ``mtl_optax._src.<module>``."""
  fallback = None
  for slug, _, _, modules in FAMILIES:
    for entry in modules:
      mod, _, names = entry.partition(":")
      if mod != module:
        continue
      if names and name in names.split(","):
        return slug
      if not names and fallback is None:
        fallback = slug
  return fallback


def group_public_names():
  """``{slug: [names]}`` for every name of ``mtl_optax.__all__``.

  Raises:
    LookupError: a public name is defined in a module no family lists.
  """
  import mtl_optax
  groups = {slug: [] for slug, *_ in FAMILIES}
  missing = []
  for name in mtl_optax.__all__:
    value = getattr(mtl_optax, name)
    module = getattr(value, "__module__", "") or ""
    slug = _owner(module.rsplit(".", 1)[-1], name)
    if slug is None:
      missing.append(f"{name} ({module})")
    else:
      groups[slug].append(name)
  if missing:
    raise LookupError("public names with no API family in "
                      "docs/api_families.py: " + ", ".join(missing))
  return {slug: sorted(names, key=lambda n: (n[0].isupper(), n.lower()))
          for slug, names in groups.items() if names}


def gram_weightings_names():
  """The public names of ``mtl_optax.gram_weightings`` (empty if absent)."""
  try:
    from mtl_optax import gram_weightings  # pylint: disable=import-outside-toplevel
  except ImportError:
    return []
  return sorted(getattr(gram_weightings, "__all__", ()))
