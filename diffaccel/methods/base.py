"""The method protocol: the registry, the config base and its validators, and the two kinds of method.

A method is one frozen, validated config dataclass, registered under its name. Its fields are the
method's whole public surface; `default_policy` turns them into a Policy (the paper's schedule), and
the runtime asks it, for every call of a site its policy selects, what to do:

- a `TokenMethod` (ToMe, ToDo, SiTo) rewrites the call (`act`): fewer query tokens, fewer keys and
  values, with a restore of the output; `cost_model` lets it skip calls where that costs more than
  it saves; `conflict` refuses a site it cannot share;
- a `CachingMethod` (FORA, ToCa, DuCa) keeps the outputs of the sites it holds, and answers each call
  with a `Plan` against the stored entry (`plan`): compute and store, reuse, or `refresh` some tokens;
  it may also reuse whole blocks (`reuses_blocks`, `skips_block`).

The call contract they are typed with (Context, SiteCall, CacheEntry, Plan) is in `diffaccel.call`.
Adding a method is one file: a config dataclass subclassing one of the kinds, decorated with
`@register`. Its fields are declared with `option(default, doc=..., low=..., high=..., choices=...)`:
the bounds are checked when a config is made, and `Config.options()` hands the same type, range,
default and doc to the faces (the demo's controls, the ComfyUI nodes' inputs, the CLI).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..call import CacheEntry, Context, Plan, SiteCall
from ..policy import Piecewise, Policy
from ..sites import Site
from .forecast import FORECASTS, MAX_ORDER, AdaptiveSteps, decide, predict, push

_REGISTRY: dict[str, type[MethodConfig]] = {}


# -- the registry ----------------------------------------------------------------------------------


def register(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Make a method config available by its `name` (to accelerate_pipeline, the CLI, configs as data)."""
    if not cls.name or not isinstance(cls.name, str):
        raise TypeError(f"{cls.__name__} needs a class attribute `name` to be registered")
    if not dataclasses.is_dataclass(cls) or "__dataclass_fields__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__} must be a frozen dataclass (decorate it with @dataclass(frozen=True) "
                        f"under @register)")
    if not getattr(cls.__dict__.get("__init__"), "resolves", False):
        cls.__init__ = _resolving_init(cls)
    cls.__hash__ = MethodConfig.config_hash
    cls.__repr__ = MethodConfig.config_repr
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Names accepted by `accelerate_pipeline`."""
    return sorted(_REGISTRY)


def method_summary(name: str) -> str:
    """The first sentence of a registered method's module docstring (what the method does), for faces."""
    cls = method_class(name)
    doc = (sys.modules[cls.__module__].__doc__ or cls.__doc__ or name).strip()
    first = doc.split("\n\n")[0].replace("\n", " ")
    return first.split(". ")[0].rstrip(".") + "."


def option_label(value: Any) -> str:
    """How a choice is shown in a face's menu: None, True, False as "auto", "on", "off"; others as text."""
    if isinstance(value, bool) or value is None:
        return {None: "auto", True: "on", False: "off"}[value]
    return str(value)


def method_class(name: str) -> type[MethodConfig]:
    if not isinstance(name, str):
        raise TypeError(f"a method is a name, a config object or a list of them; got {type(name).__name__}")
    cls = _REGISTRY.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown method {name!r}; available: {available_methods()}")
    return cls


def _resolving_init(cls: type[MethodConfig]):
    """The dataclass __init__, then the one place where explicit versus default is resolved: a config
    made with a strength (a policy parameter's field, e.g. ratio=0.5, even at its default value) and
    no `cost_model` acts wherever its policy selects (cost_model=False). A call that gives every field
    (loading a saved config, dataclasses.replace) is data: cost_model stays as given, and None then
    means "the cost model decides at the default strength and schedule"."""
    init = cls.__init__
    positional = [f.name for f in dataclasses.fields(cls) if f.init and not f.kw_only]
    every = {f.name for f in dataclasses.fields(cls) if f.init} - {"policy"}

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        given = set(positional[:len(args)]) | set(kwargs)
        if (getattr(self, "cost_model", False) is None and "cost_model" not in given
                and not every <= given and given & set(self.params)):
            object.__setattr__(self, "cost_model", False)

    __init__.resolves = True
    return __init__


# -- validators ------------------------------------------------------------------------------------


def check_number(cls_name: str, field: str, value: Any, low: float, high: float, integer: bool = False,
                 low_open: bool = False) -> None:
    kind = "an int" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise TypeError(f"{cls_name}.{field} must be {kind}, got {value!r}")
    bracket = "(" if low_open else "["
    if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
        raise ValueError(f"{cls_name}.{field} must be in {bracket}{low}, {high}], got {value!r}")


def _is_choice(value: Any, choice: Any) -> bool:
    """value is choice: equal and of the same kind (True is not 1; 2.0 and numpy's 2 are 2)."""
    if value is choice:
        return True
    number = numbers.Real
    if isinstance(value, bool) or isinstance(choice, bool) or not (isinstance(value, number) and isinstance(choice, number)):
        return type(value) is type(choice) and value == choice
    return value == choice


def check_choice(cls_name: str, field: str, value: Any, allowed: tuple) -> None:
    if not any(_is_choice(value, a) for a in allowed):
        raise ValueError(f"{cls_name}.{field} must be one of {list(allowed)}, got {value!r}")


def check_bool(cls_name: str, field: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{cls_name}.{field} must be True or False, got {value!r}")


DOWNSAMPLES = (1, 2, 4, 8)


# -- declared options -------------------------------------------------------------------------------

_META = "diffaccel"


def option(default: Any = dataclasses.MISSING, *, doc: str, low: float | None = None, high: float | None = None,
           integer: bool = False, choices: tuple | None = None, kw_only: bool = False,
           default_factory: Any = dataclasses.MISSING) -> Any:
    """A method config field with what a face needs to offer it and what validation checks: `doc` (one
    or two sentences), numeric bounds [low, high] (`integer` for whole numbers) and/or `choices`
    (a value may be one of the choices or a number in the bounds when both are given)."""
    meta = {_META: dict(doc=" ".join(doc.split()), low=low, high=high, integer=integer,
                        choices=None if choices is None else tuple(choices))}
    kwargs: dict[str, Any] = dict(kw_only=kw_only, metadata=meta)
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    else:
        kwargs["default"] = default
    return field(**kwargs)


@dataclass(frozen=True)
class Option:
    """One config field as a face offers it.

    kind: "float", "int" (bounded numbers), "bool", "choice" (one of `choices`), "number_or_choice"
    (a bounded number or one of `choices`, e.g. ToDo's factor 2.0 or "auto"), or "json" (any other
    value, e.g. a dict, edited as JSON). main: a strength the policy schedules (e.g. ratio, interval),
    the knobs a face shows first."""

    name: str
    kind: str
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None
    main: bool = False

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["choices"] = None if self.choices is None else list(self.choices)
        return d


def _annotation(f: dataclasses.Field) -> str:
    """A field's type as written, without spaces ("bool", "bool|None", "float|str", ...)."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return text.replace(" ", "").replace("Optional[bool]", "bool|None")


def _option_of(cls: type, f: dataclasses.Field) -> Option:
    meta = f.metadata.get(_META, {})
    doc = meta.get("doc", "")
    low, high, choices = meta.get("low"), meta.get("high"), meta.get("choices")
    kind = "json"
    annotation = _annotation(f)
    if annotation == "bool|None":
        kind, choices = "choice", (None, True, False)
    elif low is not None or high is not None:
        kind = "number_or_choice" if choices else ("int" if meta.get("integer") else "float")
    elif choices:
        kind = "choice"
    elif annotation in ("bool", "int", "float"):
        kind = annotation
    return Option(f.name, kind, _default(f), doc, low, high, choices, f.name in cls.params)


def _check_option(cls_name: str, f: dataclasses.Field, value: Any, bounds: tuple | None = None) -> None:
    meta = f.metadata.get(_META)
    if meta is None:
        return
    low, high = bounds or (meta["low"], meta["high"])
    choices = meta["choices"]
    numeric = low is not None or high is not None
    if choices and any(_is_choice(value, c) for c in choices):
        return
    if numeric:
        if choices and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
            raise ValueError(f"{cls_name}.{f.name} must be a number in [{low}, {high}] or "
                             f"{' or '.join(map(repr, choices))}, got {value!r}")
        check_number(cls_name, f.name, value, -math.inf if low is None else low, math.inf if high is None else high,
                     integer=meta["integer"])
    elif choices:
        check_choice(cls_name, f.name, value, choices)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _frozen(value: Any) -> Any:
    """A hashable image of JSON-like data."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


# -- the config base -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config.

    policy: a Policy (or its dict, or JSON text) that replaces the method's default schedule (the
    paper's); parameters a policy rule does not set come from the config's fields. None: the default."""

    policy: Policy | dict | str | None = field(default=None, kw_only=True)

    name: ClassVar[str] = ""
    # Order on a shared site: key/value rewrites (ToDo) before query reductions (ToMe, SiTo).
    priority: ClassVar[int] = 0
    # Whether the method changes which query tokens a sub-layer computes (at most one per site).
    reduces_tokens: ClassVar[bool] = False
    # The policy parameters the method reads; each is also a config field, which gives its default.
    params: ClassVar[tuple[str, ...]] = ()
    # Whether the method reuses sub-layer outputs across steps (a CachingMethod; at most one per site).
    caches: ClassVar[bool] = False
    # The reference implementation's argument names -> config fields, so that its users' calls port
    # unchanged (`accelerate_pipeline(pipe, "sito", prune_ratio=0.5)`)
    aliases: ClassVar[dict[str, str]] = {}
    # Options at which the method changes nothing (zero strength: the contract suite's identity case)
    zero: ClassVar[dict[str, Any]] = {}

    def context_parallel_refusal(self, cp: Any = None) -> str | None:
        """Why this setting cannot run on a denoiser whose tokens diffusers' context parallelism (its
        ContextParallelConfig `cp`) splits across processes, or None where it runs there as on one process
        (see diffaccel.parallel). A method must say that it does: the base refuses."""
        return "it does not say that it runs on a slice of the tokens"

    def __post_init__(self):
        policy = self.policy
        if isinstance(policy, str):
            policy = Policy.from_json(policy)
        elif isinstance(policy, dict):
            policy = Policy.from_dict(policy)
        elif policy is not None and not isinstance(policy, Policy):
            raise TypeError(f"{type(self).__name__}.policy must be a Policy, a dict or JSON text, got {policy!r}")
        object.__setattr__(self, "policy", policy)
        if policy is not None:
            unknown = policy.param_names() - set(self.policy_params())
            if unknown:
                raise ValueError(f"policy sets {sorted(unknown)}, which {self.name} does not read"
                                 f"{self.unread_hint(unknown)}; allowed: {list(self.policy_params())}")
            for rule in policy.rules:
                for key, schedule in rule.params.items():
                    for value in schedule.knots():
                        self.check_param(key, value)
        self.check_options()
        self.validate()

    # -- options and data ---------------------------------------------------------------------
    @classmethod
    def options(cls) -> list[Option]:
        """The config's fields as faces offer them (type, bounds, default, doc), the policy aside;
        the strengths the policy schedules first."""
        opts = [_option_of(cls, f) for f in dataclasses.fields(cls) if f.init and f.name != "policy"]
        return sorted(opts, key=lambda o: not o.main)

    def check_options(self) -> None:
        """Check every declared option against its bounds and choices (bool fields: True or False)."""
        n = type(self).__name__
        for f in dataclasses.fields(self):
            if f.name == "policy":
                continue
            value = getattr(self, f.name)
            annotation = _annotation(f)
            if annotation == "bool" or (annotation == "bool|None" and value is not None):
                check_bool(n, f.name, value)
            _check_option(n, f, value, self.bounds(f.name))

    def bounds(self, name: str) -> tuple[float, float] | None:
        """(low, high) of a numeric option where this config's other fields narrow the declared range
        (None: as declared)."""
        return None

    @classmethod
    def translate(cls, key: str, value: Any) -> tuple[str, Any]:
        """An option as the user named it (a field or a reference's name) -> (config field, value)."""
        return cls.aliases.get(key, key), value

    @classmethod
    def option_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)} | set(cls.aliases)

    @classmethod
    def fields_of(cls, options: dict) -> dict:
        """Options as the user named them (fields, or the reference's names) -> {config field: value};
        a name the config does not have raises, naming the allowed ones."""
        for key in options:
            if key not in cls.option_names():
                raise unknown_option(key, [cls])
        return dict(cls.translate(k, v) for k, v in options.items())

    @classmethod
    def decode(cls, key: str, value: Any) -> Any:
        """A field's value as read from JSON (e.g. dict keys that JSON turned into strings)."""
        return value

    def to_dict(self) -> dict:
        """{"method": name, field: value, ...}; "policy" only when one was given. JSON-ready, and
        `MethodConfig.from_dict` gives back an equal config."""
        fields = sorted(dataclasses.fields(self), key=lambda f: f.kw_only)  # the positional ones first
        d = {f.name: getattr(self, f.name) for f in fields if f.name != "policy"}
        d = {"method": self.name, **{k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}}
        if self.policy is not None:
            d["policy"] = self.policy.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MethodConfig:
        """The config a `to_dict` (or a hand-written dict with a "method" key) describes."""
        if not isinstance(d, dict):
            raise TypeError(f"a method config is a dict with a 'method' key, got {type(d).__name__}")
        data = dict(d)
        name = data.pop("method", None)
        if cls is MethodConfig:
            if name is None:
                raise ValueError(f"a method dict needs a 'method' key naming the method, got {d!r}")
            return method_class(name).from_dict(d)
        if name is not None and method_class(name) is not cls:
            raise ValueError(f"{cls.__name__}.from_dict got a config of {name!r}")
        return cls(**{key: cls.decode(key, value) for key, value in cls.fields_of(data).items()})

    def with_options(self, **options: Any) -> MethodConfig:
        """A copy with these options (fields, or the reference's names) changed, made as a user makes a
        config: a strength given this way is explicit (see `register`)."""
        changes = self.fields_of(options)
        kept = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.init and getattr(self, f.name) != _default(f)}
        return type(self)(**{**kept, **changes})

    def config_hash(self) -> int:
        return hash(_frozen(self.to_dict()))

    def config_repr(self) -> str:
        """The fields in the order `to_dict` writes them (the method's own first, the policy last)."""
        d = self.to_dict()
        d.pop("method")
        if self.policy is not None:
            d["policy"] = self.policy
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in d.items())})"

    def policy_params(self) -> tuple[str, ...]:
        """The parameters a policy may schedule for this config: `params`, and any its other fields
        bring in (e.g. a caching method's forecast order)."""
        return self.params

    def unread_hint(self, unknown: set) -> str:
        """What to change so that a policy parameter it does not read would be read ("" if nothing)."""
        return ""

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise a clear error on bad field values that the declared options do not cover (values that
        depend on each other); `check_options` has run before."""

    def check_param(self, key: str, value: float) -> None:
        """Validate one scheduled parameter value (same bounds as the config field)."""
        self.validate_field(key, value)

    def validate_field(self, key: str, value: Any) -> None:
        dataclasses.replace(self, **{key: value}, policy=None)

    # -- where and when it acts -----------------------------------------------------------------
    def default_policy(self) -> Policy:
        raise NotImplementedError  # pragma: no cover - abstract

    def effective_policy(self) -> Policy:
        return self.policy if self.policy is not None else self.default_policy()

    def unsupported(self, site: Site) -> str | None:
        """Why this method cannot act on a site (None when it can)."""
        return None

    def conflict(self, site: Site, others: list[MethodConfig]) -> str | None:
        """Why this method cannot share the site with these others (None when it can)."""
        return None

    def is_identity(self, params: dict) -> bool:
        """Whether these parameters leave the sub-layer unchanged (zero strength)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def resolve(self, raw: dict | None) -> dict | None:
        """Policy output completed with config defaults; None when the method is idle."""
        if raw is None:
            return None
        params = {k: raw.get(k, getattr(self, k)) for k in self.params}
        return None if self.is_identity(params) else params

    def planned(self, site: Site, step: int, num_steps: int, params: dict | None) -> dict | None:
        """What describe() shows of the method's parameters at a step of a run of num_steps."""
        return params

    def needs_block_input(self) -> bool:
        """Whether the method reads the enclosing block's input (the runtime then records it)."""
        return False


@dataclass(frozen=True)
class TokenMethod(MethodConfig):
    """A method that rewrites a sub-layer's call: fewer query tokens (`reduces_tokens`, at most one per
    site), or fewer keys and values, and restores the output.

    cost_model: skip calls where the rewrite costs more than it saves (diffaccel.cost). None: the cost
    model decides at the method's default strength and schedule only; a config made with a strength
    (e.g. ratio=0.5) acts wherever its policy selects."""

    cost_model: bool | None = option(None, kw_only=True, doc="Skip calls where the rewrite costs more than it "
                                     "saves. None: the cost model decides at the method's default strength and "
                                     "schedule only; a config made with a strength acts wherever its policy selects.")

    def uses_cost_model(self) -> bool:
        """Whether the cost model may skip calls: `cost_model` when set, else only at the method's
        default strength and schedule."""
        if self.cost_model is not None:
            return self.cost_model
        defaults = {f.name: _default(f) for f in dataclasses.fields(self)}
        return self.policy is None and all(getattr(self, k) == defaults.get(k) for k in self.params)

    def context_parallel_refusal(self, cp: Any = None) -> str | None:
        return ("it reduces tokens by their place on the whole image grid and their similarity across it, while "
                "each process holds a slice of the tokens")

    def act(self, site: Site, ctx: Context, params: dict, call: SiteCall) -> bool:
        """Rewrite the call; whether it changed anything (if not, ctx.notes[site.name] says why)."""
        raise NotImplementedError  # pragma: no cover - abstract


@dataclass(frozen=True)
class CachingMethod(MethodConfig):
    """A method that keeps the outputs of the sites it holds and reuses them at later steps. The
    runtime keeps one entry per site and CFG branch, released when the run ends, and asks `plan` what
    to do with each call the entry fits.

    interval: steps one computed output serves (1: compute every step, the baseline).
    warmup: steps at the start of the run that are always computed; the last of them begins the
    first cycle (0 and 1 are the same)."""

    interval: int = option(3, low=1, high=1000, integer=True,
                           doc="Steps one computed output serves (1: compute every step, the baseline).")
    warmup: int = option(0, low=0, high=100_000, integer=True, kw_only=True,
                         doc="Steps at the start of the run that are always computed; the last of them begins "
                             "the first cycle (0 and 1 are the same).")
    forecast: str = option("reuse", choices=FORECASTS, kw_only=True,
                           doc='How a cached step is served: "reuse" (the stored output), "taylor" (the polynomial '
                               'through the last order + 1 computed outputs, TaylorSeer) or "hermite" (HiCache\'s '
                               'damped Hermite basis).')
    order: int = option(2, low=0, high=MAX_ORDER, integer=True, kw_only=True,
                        doc='Order of the forecast (0: reuse); a policy may schedule it per step and site. Each '
                            'cached site keeps order + 1 outputs.')
    forecast_from: float = option(0.0, low=0.0, high=1.0, kw_only=True,
                                  doc="Fraction of the run after which cached steps are forecast (before it they "
                                      "reuse): a few-step run's early features change too fast for a forecast.")
    hermite_scale: float = option(0.5, low=0.01, high=10.0, kw_only=True,
                                  doc='HiCache\'s scale sigma of the "hermite" forecast (smaller: more damped).')
    threshold: float | None = option(None, low=0.0, high=1e9, choices=(None,), kw_only=True,
                                     doc="Adaptive steps: a step is cached while the relative L1 change of the first "
                                         "cached sub-layer's input since the last computed step stays below this "
                                         "(0: every step computes); at most interval - 1 cached steps in a row. "
                                         "None: the static schedule.")

    caches = True
    params = ("interval",)
    zero = {"interval": 1}
    # whether the run's last step is always computed (FORA's code does; ToCa's and TaylorSeer's do not)
    computes_last: ClassVar[bool] = False

    def context_parallel_refusal(self, cp: Any = None) -> str | None:
        return None  # whole outputs of each process's slice; the schedule is the step counter (diffaccel.parallel)

    def policy_params(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.params + (("order",) if self.forecast != "reuse" else ())))

    def unread_hint(self, unknown: set) -> str:
        return " (a forecast order acts with forecast='taylor' or 'hermite')" if "order" in unknown else ""

    def resolve(self, raw: dict | None) -> dict | None:
        params = super().resolve(raw)
        if params is not None and self.forecast != "reuse":
            params["order"] = raw.get("order", self.order)
        return params

    def forecast_params(self) -> dict:
        """The forecast order's schedule in the default policy: `order` from `forecast_from` on, 0
        (reuse) before it ({} without a forecast)."""
        if self.forecast == "reuse":
            return {}
        if self.forecast_from <= 0:
            return {"order": self.order}
        return {"order": Piecewise(((0.0, 0), (self.forecast_from, self.order)))}

    def forecasting(self) -> bool:
        """Whether cached steps are forecast: a forecast other than "reuse" at an order above 0 at some
        step (order 0 everywhere is "reuse", to the bit)."""
        return self.forecast != "reuse" and self.order_cap() > 0

    def check_param(self, key: str, value: float) -> None:
        if key == "interval":  # schedules may give fractional intervals; they are rounded when used
            check_number(type(self).__name__, key, value, 1, 1000)
        elif key == "order":
            check_number(type(self).__name__, key, value, 0, MAX_ORDER)
        else:
            super().check_param(key, value)

    def unsupported(self, site: Site) -> str | None:
        return "acts on sub-layers, not whole blocks" if site.kind == "block" else None

    def plan(self, site: Site, ctx: Context, params: dict, entry: CacheEntry, call: SiteCall) -> Plan:
        """Given a cache entry that fits this call: REUSE (return the entry's output, the sub-layer does
        not run), PARTIAL (`refresh` rewrites the call to the tokens to recompute), RECOMPUTE (run in
        full inside the entry's cycle) or COMPUTE (run in full, store the output, a new cycle)."""
        return Plan.REUSE if self.reuses(site, ctx, params, entry) else Plan.COMPUTE

    def traced_plan(self, site: Site, ctx: Context, params: dict, entry: CacheEntry, call: SiteCall,
                    plan: Plan) -> Plan:
        """In a compiled denoiser, `plan` was made outside the call from the entry (`call` None):
        the plan to follow given the call's arguments (fixed in a compiled graph)."""
        return plan

    def compiled_params(self, site: Site, ctx: Context, params: dict, entry: CacheEntry | None,
                        plan: Plan) -> dict:
        """The parameters a compiled call reads, made outside it (e.g. sizes the graph takes as
        symbolic rather than as constants of one step)."""
        return params

    def reuses(self, site: Site, ctx: Context, params: dict, entry: CacheEntry) -> bool:
        """Whether this call returns the cached output instead of running (the default `plan`)."""
        return False

    def cycle_end(self, ctx: Context, params: dict) -> int | None:
        """For an output computed in full at this call, the step at which the next full computation is due."""
        return None

    def refresh(self, site: Site, ctx: Context, params: dict, entry: CacheEntry, call: SiteCall) -> None:
        """For a PARTIAL plan: rewrite the call and write its output into the entry (a restore)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def prepare_compute(self, site: Site, ctx: Context, params: dict, call: SiteCall) -> None:
        """A call about to run in full and be stored (e.g. ask for an attention probe)."""

    def init_entry(self, site: Site, ctx: Context, params: dict, entry: CacheEntry, hidden: torch.Tensor) -> None:
        """Fill `entry.extra` when a full output is stored (`hidden`: the call's input)."""

    # -- forecasts and adaptive steps (see methods.forecast) -------------------------------------
    def serve(self, site: Site, ctx: Context, params: dict, entry: CacheEntry) -> Any:
        """The output of a call that does not run (a REUSE plan): the stored output, or its forecast
        at this step, plus the corrections fresh tokens left (token-wise caching)."""
        if not self.forecasting():
            return entry.output
        out = self.forecast_at(ctx, params, entry)
        offset = entry.extra.get("offset")
        return out if offset is None else out + offset

    def forecast_at(self, ctx: Context, params: dict, entry: CacheEntry) -> Any:
        """The entry's forecast of its output at this step, at this step's order (without the
        corrections fresh tokens left)."""
        return predict(entry, ctx.step, round(params.get("order", 0)), self.forecast, self.hermite_scale)

    def stored(self, ctx: Context, params: dict, entry: CacheEntry, previous: CacheEntry | None) -> None:
        """A full output was just stored in `entry` at this step, replacing `previous` (None or an entry
        of the same call signature): keep the differences a forecast needs."""
        if self.forecasting():
            push(entry, previous, ctx.step, self.order_cap())

    def order_cap(self) -> int:
        """The highest order any step of the policy asks for (how many differences to keep)."""
        cap = self.__dict__.get("_order_cap")
        if cap is None:
            orders = [o for r in self.effective_policy().rules
                      for o in ([round(v) for v in r.params["order"].knots()] if "order" in r.params else [self.order])]
            cap = max(orders, default=self.order)
            self.__dict__["_order_cap"] = cap  # (a frozen config: computed once)
        return cap

    def begin_call(self, site: Site, ctx: Context, params: dict, call: SiteCall) -> None:
        """Before this call is planned: with `threshold` set, decide (once per step) whether the step
        computes, from how much this call's input changed."""
        self.observe(ctx, params, call.hidden)

    def observe(self, ctx: Context, params: dict, x: torch.Tensor) -> None:
        """With `threshold` set, the step's decision from the input `x` of the first call of the step the
        method holds (a sub-layer's, or a whole block's where blocks are reused whole); later calls of
        the step leave it as it is."""
        if self.threshold is None:
            return
        state = ctx.state.setdefault(("adaptive", self.name), AdaptiveSteps())
        cap = max(0, round(params["interval"]) - 1)
        decide(state, ctx, x, self.threshold, self.warmup, cap, self.computes_last, ctx.decisions, self.name)

    def step_decision(self, ctx: Context) -> bool | None:
        """With `threshold` set: whether this step computes, once decided (None: static schedule, or
        not decided yet at this call)."""
        if self.threshold is None:
            return None
        state = ctx.state.get(("adaptive", self.name))
        return state.compute if state is not None and state.step == ctx.step else None

    def reuses_blocks(self) -> bool:
        """Whether some steps skip whole blocks (see `skips_block`)."""
        return False

    def skips_block(self, ctx: Context, params: dict, entry: CacheEntry) -> bool:
        """For methods that reuse blocks: whether, at this call, the block holding this site may return
        its stored output without running (asked of every site of the block)."""
        return False


def unknown_option(key: str, configs: list) -> TypeError:
    """The error for an option no config of these methods has, naming the allowed ones."""
    allowed = sorted({f.name for c in configs for f in dataclasses.fields(c)})
    aliases = sorted({a for c in configs for a in c.aliases})
    names = "/".join(c.name for c in configs)
    return TypeError(f"unknown option {key!r} for {names}; allowed: {allowed}"
                     + (f" (or the reference's names {aliases})" if aliases else ""))
