"""Apply Q-Sched coefficients to any diffusers scheduler.

``wrap(scheduler, coefficients)`` returns a new scheduler whose class is a thin
subclass of the scheduler's own class, made at run time. Its ``step`` multiplies
``sample`` by ``c_x[i]`` and ``model_output`` by ``c_eps[i]`` for the step index
``i`` the inner scheduler is at, then calls the inner ``step`` unchanged. Nothing
of the scheduler's source is copied, so every scheduler with a standard ``step``
works, and updates of diffusers come for free.

What the subclass preserves, and why:

* ``step`` and ``set_timesteps`` keep the inner signatures: pipelines inspect them
  to decide whether to pass ``eta``, ``generator``, ``timesteps`` or ``sigmas``.
* ``isinstance(wrapped, type(plain))`` holds, and ``order``/``config`` are the inner ones.
* The subclass carries the inner class's name and module, so ``save_pretrained`` of
  a pipeline writes the plain scheduler into ``model_index.json`` and
  ``scheduler_config.json``. Coefficients are instance state, never config: they
  travel in the schedule card (:mod:`qsched.card`).
* A coefficient equal to 1 is not multiplied at all, so all-ones coefficients give
  bit-identical images.

Extensions that change a step further (the PTQD baseline, :mod:`qsched.ptqd`)
subclass :func:`wrapped_class` of :func:`plain_class` and read the step index with
:func:`step_index_of`, so they keep all of the above.

Coefficients take effect at ``set_timesteps``: each sampling run uses the
coefficients set before it started (``set_coefficients`` during a run applies from
the next run), and their length is checked against the run's number of steps.

Identity versus real coefficients. With all-ones coefficients (or none: an instance
made by ``type(wrapped).from_config(...)`` or ``from_pretrained``) the wrapper is
transparent: ``step`` calls the inner ``step`` unchanged, so everything the plain
scheduler accepts is accepted -- ``step`` before ``set_timesteps`` (DDPM, Euler and
EulerAncestral step on the schedule built in ``__init__``), timesteps outside
``self.timesteps`` (DDIM, DDPM), any number of steps. With real coefficients three
checks protect the user, because a coefficient must be matched to the step it was
calibrated for: ``set_timesteps`` must come first, the coefficients must have as many
entries as the run has steps, and a scheduler without a step index (DDIM, DDPM) must
be given a timestep that occurs exactly once in its schedule.

Wrapped schedulers pickle (and deep-copy) with their coefficients, like the plain
ones, so pipelines can be sent to worker processes.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from qsched.errors import QSchedError
from qsched.schedule import QSchedCoefficients

_STEP_ARGUMENTS = ("model_output", "timestep", "sample")
_WRAPPED_CLASSES: dict[type, type] = {}


def is_wrapped(scheduler: Any) -> bool:
    """True if ``scheduler`` was made by :func:`wrap`."""
    return getattr(type(scheduler), "_qsched_base", None) is not None


def wrap(scheduler: Any, coefficients: QSchedCoefficients) -> Any:
    """A copy of ``scheduler`` (built from its config) that applies ``coefficients``.

    Wrapping a wrapped scheduler replaces its coefficients; wrappers never stack.
    """
    if not isinstance(coefficients, QSchedCoefficients):
        raise QSchedError(
            f"coefficients must be a QSchedCoefficients, got {type(coefficients).__name__}; "
            "build one with QSchedCoefficients.from_ramps(...) or QSchedCoefficients(c_x=..., c_eps=...)"
        )
    base = plain_class(scheduler)
    wrapped = wrapped_class(base).from_config(scheduler.config)
    wrapped.set_coefficients(coefficients)
    return wrapped


def unwrap(scheduler: Any) -> Any:
    """The plain scheduler: a new one from the same config if wrapped, else ``scheduler`` itself."""
    if not is_wrapped(scheduler):
        return scheduler
    return type(scheduler)._qsched_base.from_config(scheduler.config)


def plain_class(scheduler: Any) -> type:
    """The scheduler's own diffusers class (under any qsched wrapper); a non-scheduler is refused."""
    cls = type(scheduler)
    base = getattr(cls, "_qsched_base", None) or cls
    if not (callable(getattr(base, "step", None)) and callable(getattr(base, "set_timesteps", None))):
        raise QSchedError(
            f"{base.__name__} is not a diffusers scheduler (it needs step() and set_timesteps())"
        )
    if not hasattr(scheduler, "config"):
        raise QSchedError(f"{base.__name__} has no config; only diffusers schedulers can be wrapped")
    return base


def wrapped_class(base: type) -> type:
    """The Q-Sched subclass of the diffusers scheduler class ``base`` (made once, then reused)."""
    cls = _WRAPPED_CLASSES.get(base)
    if cls is None:
        _check_supported(base)
        cls = _make_wrapped_class(base)
        _WRAPPED_CLASSES[base] = cls
    return cls


def _check_supported(base: type) -> None:
    order = getattr(base, "order", 1)
    if order != 1:
        raise QSchedError(
            f"{base.__name__} has order {order}: it calls step() {order} times per sampling "
            "step, so per-step coefficients are ill-defined; use a first-order scheduler "
            "(LCM, TCD, Euler, EulerAncestral, DDIM, FlowMatchEuler, DPMSolverMultistep)"
        )
    params = inspect.signature(base.step).parameters
    missing = [name for name in _STEP_ARGUMENTS if name not in params]
    if missing:
        raise QSchedError(
            f"{base.__name__}.step has no argument(s) {', '.join(missing)}; Q-Sched needs "
            "step(model_output, timestep, sample, ...)"
        )


def _make_wrapped_class(base: type) -> type:
    base_step = base.step
    base_set_timesteps = base.set_timesteps
    step_signature = inspect.signature(base_step)

    @functools.wraps(base_step)
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _is_transparent(self):
            return base_step(self, *args, **kwargs)
        c_x, c_eps = self._qsched_factors(_bound_timestep(step_signature, self, args, kwargs))
        if c_x == 1.0 and c_eps == 1.0:
            return base_step(self, *args, **kwargs)
        bound = step_signature.bind(self, *args, **kwargs)
        if c_x != 1.0:
            bound.arguments["sample"] = bound.arguments["sample"] * c_x
        if c_eps != 1.0:
            bound.arguments["model_output"] = bound.arguments["model_output"] * c_eps
        return base_step(*bound.args, **bound.kwargs)

    @functools.wraps(base_set_timesteps)
    def set_timesteps(self: Any, *args: Any, **kwargs: Any) -> Any:
        self._qsched_active = None
        result = base_set_timesteps(self, *args, **kwargs)
        coefficients = self._qsched_coefficients
        if coefficients is not None and not coefficients.is_identity:
            coefficients.check_steps(len(self.timesteps))
        self._qsched_active = coefficients
        return result

    namespace = {
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": f"{base.__name__} with Q-Sched coefficients (made by qsched.wrap).",
        "_qsched_base": base,
        "_qsched_factory": wrapped_class,
        "_qsched_coefficients": None,
        "_qsched_active": None,
        "step": step,
        "set_timesteps": set_timesteps,
        "set_coefficients": _set_coefficients,
        "qsched_coefficients": property(lambda self: self._qsched_coefficients),
        "_qsched_factors": _factors,
        "__repr__": _repr,
        "__reduce_ex__": _reduce_ex,
    }
    return type(base.__name__, (base,), namespace)


def _is_transparent(scheduler: Any) -> bool:
    """True when the step needs no coefficient: none set, or all ones (for this run, or before any)."""
    coefficients = scheduler._qsched_active
    if coefficients is None:
        coefficients = scheduler._qsched_coefficients
        # Real coefficients set but no run started: _factors refuses it.
        return coefficients is None or coefficients.is_identity
    return coefficients.is_identity


def _reduce_ex(self: Any, protocol: Any) -> tuple:
    """Pickle by the plain class and the factory of the run-time subclass, plus the instance state.

    The subclass is made at run time and shares the plain class's name, so pickle
    could not find it by name; :func:`_rebuild` makes it again on the other side.
    """
    cls = type(self)
    return _rebuild, (cls._qsched_factory, cls._qsched_base), dict(self.__dict__)


def _rebuild(factory: Any, base: type) -> Any:
    cls = factory(base)
    return cls.__new__(cls)


def _set_coefficients(self: Any, coefficients: QSchedCoefficients) -> None:
    """Use ``coefficients`` from the next ``set_timesteps`` (the next sampling run) on."""
    if not isinstance(coefficients, QSchedCoefficients):
        raise QSchedError(f"coefficients must be a QSchedCoefficients, got {type(coefficients).__name__}")
    self._qsched_coefficients = coefficients


def _factors(self: Any, timestep: Any) -> tuple[float, float]:
    coefficients = self._qsched_active
    if coefficients is None:
        raise QSchedError(
            "step() was called before set_timesteps(); with Q-Sched coefficients call set_timesteps "
            "first, so that each coefficient meets the step it was calibrated for"
        )
    index = step_index_of(self, timestep)
    if not 0 <= index < coefficients.num_steps:
        raise QSchedError(
            f"the scheduler is at step {index} but the coefficients cover "
            f"{coefficients.num_steps} steps"
        )
    return coefficients.c_x[index], coefficients.c_eps[index]


def step_index_of(scheduler: Any, timestep: Any) -> int:
    """The index of the step about to run, as the inner scheduler sees it."""
    if hasattr(type(scheduler), "step_index"):
        if scheduler.step_index is None and hasattr(scheduler, "_init_step_index"):
            # The inner step() would do exactly this on its first call.
            scheduler._init_step_index(timestep)
        if scheduler.step_index is not None:
            return int(scheduler.step_index)
    # Schedulers without a step index (DDIM) locate the timestep in their schedule.
    timesteps = scheduler.timesteps
    matches = (timesteps == torch.as_tensor(timestep, device=timesteps.device)).nonzero()
    if len(matches) != 1:
        raise QSchedError(
            f"timestep {timestep!r} occurs {len(matches)} times in the schedule of "
            f"{type(scheduler).__name__}; cannot tell which step it is"
        )
    return int(matches[0, 0])


def _bound_timestep(signature: inspect.Signature, self: Any, args: tuple, kwargs: dict) -> Any:
    if "timestep" in kwargs:
        return kwargs["timestep"]
    position = list(signature.parameters).index("timestep") - 1  # minus self
    if position < len(args):
        return args[position]
    raise QSchedError("step() was called without a timestep")


def _repr(self: Any) -> str:
    coefficients = self._qsched_coefficients
    shown = coefficients.to_dict() if coefficients is not None else None
    return f"QSched[{type(self).__name__}](coefficients={shown}) {self.to_json_string()}"
