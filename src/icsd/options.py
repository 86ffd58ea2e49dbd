"""A backend's settings: a pydantic model next to its code, handed to it validated and unchanged.

A backend class (an LLM backend, a text-to-image backend) declares its options as a nested
pydantic model ``Options``. A stage config that picks a backend by name (``summarize.backend``,
``render.backend``) names the registry in ``backend_registry``; its section of a config file and
its command's options are then the stage's own fields plus every registered backend's options
(:func:`section_model`), so ``--summarize.base_url`` and ``icsd summarize --base-url`` come from
the openai backend's model, and ``icsd config show`` and ``--help`` list them. The stage asks its
config for :func:`backend_options`: the chosen backend's ``Options``, validated from the section's
values, which the stage passes to the backend as they are.

A key that several backends declare (``gguf_file``, ``device``) is one setting of the section: its
type and default are the first declaration's, and the contract tests check that every
declaration agrees.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from pydantic.fields import FieldInfo

from .errors import UserError

if TYPE_CHECKING:
    from .config import StageConfig
    from .registry import Registry


class BackendOptions(BaseModel):
    """The base of a backend's options: frozen and hashable (a loaded model can be cached by its
    options), and picklable (worker processes build their own backend from it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def options_model(backend: Any, default: type[BaseModel] = BackendOptions) -> type[BaseModel]:
    """The options model a backend class declares (``Options``), else ``default``."""
    model = getattr(backend, "Options", None)
    if model is None:
        return default
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise UserError(f"{getattr(backend, '__name__', backend)}.Options must be a pydantic model")
    return model


def default_options(config: type[StageConfig]) -> type[BaseModel]:
    """What a backend of ``config``'s registry that declares no ``Options`` takes."""
    from .registry import import_entry

    if config.backend_default_options is None:
        return BackendOptions
    model: type[BaseModel] = import_entry(config.backend_default_options)  # type: ignore[assignment]
    return model


def registry_of(config: type[StageConfig]) -> Registry[Any]:
    from .registry import import_entry

    assert config.backend_registry is not None
    registry: Registry[Any] = import_entry(config.backend_registry)  # type: ignore[assignment]
    return registry


def declared_options(config: type[StageConfig], name: str, warn: Callable[[str], None] | None = None) -> Any:
    """The options model of backend ``name`` of ``config``'s registry: the model registered beside
    it (imported without the backend), else the backend's ``Options``; None for a plugin that fails
    to import (reported through ``warn``)."""
    from .registry import import_entry

    registry = registry_of(config)
    hint = registry.options_entry(name)
    if hint is not None:
        return import_entry(hint)
    backend = registry.get(name) if warn is None else registry.get_or_warn(name, warn)
    return None if backend is None else options_model(backend, default_options(config))


def owners(config: type[StageConfig], warn: Callable[[str], None]) -> dict[str, list[tuple[str, FieldInfo]]]:
    """Every option key of the backends registered for ``config``, with each backend declaring it."""
    found: dict[str, list[tuple[str, FieldInfo]]] = {}
    for name in registry_of(config).names():
        model = declared_options(config, name, warn)
        if model is None:
            continue
        for key, info in model.model_fields.items():
            found.setdefault(key, []).append((name, info))
    return found


def section_model(config: type[StageConfig]) -> type[StageConfig]:
    """``config`` with the options of every backend registered now as fields of its own."""
    if config.backend_registry is None or config.backend_section:
        return config
    return _section(config, tuple(registry_of(config).names()))


def _warn(message: str) -> None:
    from .stages import _warn_once

    _warn_once(message)


@lru_cache(maxsize=16)
def _section(config: type[StageConfig], names: tuple[str, ...]) -> type[StageConfig]:
    fields: dict[str, Any] = {}
    for key, declared in owners(config, _warn).items():
        if key in config.model_fields:
            continue
        info = copy.copy(declared[0][1])
        by = [name for name, _ in declared]
        if len(by) < len(names):
            info.description = f"{info.description or ''} [{', '.join(by)}]".strip()
        fields[key] = (info.annotation, info)
    made: type[StageConfig] = create_model(  # type: ignore[call-overload]
        config.__name__, __base__=config, __module__=config.__module__, **fields
    )
    made.backend_section = True
    return made


def backend_options(cfg: StageConfig) -> Any:
    """The chosen backend's options, validated from ``cfg``'s values (one line when invalid);
    ``backend`` is the chosen backend's name."""
    config = type(cfg)
    name = cfg.chosen_backend()
    model = declared_options(config, name)
    values = {key: getattr(cfg, key) for key in model.model_fields if hasattr(cfg, key)}
    if "backend" in model.model_fields:
        values["backend"] = name
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        from .config import format_validation_error

        raise UserError(f"{name} backend: {format_validation_error(exc)}") from None
